//! Dynamic batching of per-cell work across fields. Fields arrive from several workers with
//! different cell counts; one thread per model gathers their crops into batches, earliest
//! deadline first, and sends each field back exactly its own rows. A batch waits for more work
//! at most `max_queue_delay`, and never past the point where the earliest deadline could no
//! longer be met: the latency budget decides, not the batch size. Batch sizes are rounded up to
//! a few fixed buckets (padding with zeros) so that providers that compile per shape
//! (TensorRT, CUDA graphs) compile a handful of shapes, not one per batch.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};

use crate::error::ModelError;
use crate::model::Model;
use crate::schedule::{Edf, Ewma};
use crate::tensor::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    pub max_batch: usize,
    pub max_queue_delay: Duration,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self {
            max_batch: 64,
            max_queue_delay: Duration::from_millis(5),
        }
    }
}

/// Batch sizes used: powers of two up to `max_batch`, and `max_batch` itself.
pub fn buckets(max_batch: usize) -> Vec<usize> {
    let mut b: Vec<usize> = std::iter::successors(Some(1usize), |&x| Some(x * 2))
        .take_while(|&x| x < max_batch)
        .collect();
    b.push(max_batch.max(1));
    b
}

type Reply = Sender<Result<Tensor, ModelError>>;

struct Request {
    /// Earliest deadline first, in arrival order among equals.
    order: Edf,
    arrived: Instant,
    /// Preprocessed samples, `n` of them, each `sample_len` long.
    data: Vec<f32>,
    n: usize,
    reply: Reply,
}

impl PartialEq for Request {
    fn eq(&self, o: &Self) -> bool {
        self.order == o.order
    }
}
impl Eq for Request {}
impl PartialOrd for Request {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Request {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.order.cmp(&o.order)
    }
}

/// Per-batch statistics, for metrics and tests.
#[derive(Debug, Clone, Copy)]
pub struct BatchStats {
    pub samples: usize,
    pub padded_to: usize,
    pub requests: usize,
    pub run_time: Duration,
    /// Time inside `session.run` alone.
    pub infer_time: Duration,
}

/// Handle to a model's batching thread; cloneable, shared by workers. The thread ends by itself
/// when the last handle (and with it the last sender) is dropped.
#[derive(Debug, Clone)]
pub struct Batcher {
    model: Arc<Model>,
    tx: Sender<Request>,
}

impl Batcher {
    /// `on_batch` is called after every batch (metrics).
    pub fn new(
        model: Arc<Model>,
        opts: BatchOptions,
        on_batch: impl Fn(&BatchStats) + Send + 'static,
    ) -> Result<Self, ModelError> {
        let d = &model.descr.inputs[0];
        if model.descr.inputs.len() != 1 || model.descr.outputs.len() != 1 || d.batch_axis() != Some(0) {
            return Err(ModelError::Shape {
                model: model.name().to_string(),
                message: "per-cell batching needs one input and one output with the batch axis first".into(),
            });
        }
        let mut opts = opts;
        if let Some(n) = model.fixed_batch(0) {
            opts.max_batch = n;
        }
        let (tx, rx) = bounded::<Request>(1024);
        let m = Arc::clone(&model);
        std::thread::Builder::new()
            .name(format!("batch-{}", model.name()))
            .spawn(move || batch_loop(&m, opts, &rx, on_batch))
            .map_err(|source| ModelError::Io {
                path: "thread".into(),
                source,
            })?;
        Ok(Self { model, tx })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Queues `samples` (shape `[n, ...]` as the model's input) and returns where the `[n, ...]`
    /// output will arrive. Preprocessing runs here, on the caller's thread, so the batching
    /// thread only runs the model.
    pub fn submit(
        &self,
        mut samples: Tensor,
        deadline: Instant,
    ) -> Result<Receiver<Result<Tensor, ModelError>>, ModelError> {
        self.model.check_input_axes(0, &samples, true)?;
        self.model.preprocess(0, &mut samples);
        self.enqueue(samples, deadline)
    }

    /// [`Batcher::submit`] for samples already preprocessed, by the crop gather with
    /// [`Model::plane_preprocessor`].
    pub fn submit_prepared(
        &self,
        samples: Tensor,
        deadline: Instant,
    ) -> Result<Receiver<Result<Tensor, ModelError>>, ModelError> {
        self.model.check_input_axes(0, &samples, true)?;
        self.enqueue(samples, deadline)
    }

    fn enqueue(&self, samples: Tensor, deadline: Instant) -> Result<Receiver<Result<Tensor, ModelError>>, ModelError> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = samples.shape.first().copied().unwrap_or(0);
        let (reply, rx) = bounded(1);
        self.tx
            .send(Request {
                order: Edf {
                    deadline,
                    seq: SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                },
                arrived: Instant::now(),
                data: samples.data,
                n,
                reply,
            })
            .map_err(|_| ModelError::BatcherGone {
                model: self.model.name().to_string(),
            })?;
        Ok(rx)
    }

    /// Submits and waits.
    pub fn run(&self, samples: Tensor, deadline: Instant) -> Result<Tensor, ModelError> {
        self.wait(samples, deadline, false)
    }

    /// [`Batcher::submit_prepared`] and waits.
    pub fn run_prepared(&self, samples: Tensor, deadline: Instant) -> Result<Tensor, ModelError> {
        self.wait(samples, deadline, true)
    }

    fn wait(&self, samples: Tensor, deadline: Instant, prepared: bool) -> Result<Tensor, ModelError> {
        if samples.shape.first() == Some(&0) {
            let mut shape = self.output_sample_shape();
            shape.insert(0, 0);
            return Ok(Tensor::new(shape, Vec::new()));
        }
        let rx = if prepared {
            self.submit_prepared(samples, deadline)?
        } else {
            self.submit(samples, deadline)?
        };
        rx.recv().map_err(|_| ModelError::BatcherGone {
            model: self.model.name().to_string(),
        })?
    }

    fn output_sample_shape(&self) -> Vec<usize> {
        self.model.descr.outputs[0]
            .axes
            .iter()
            .skip(1)
            .map(|a| match a.size {
                crate::description::AxisSize::Fixed(n) => n,
                _ => 0,
            })
            .collect()
    }
}

fn batch_loop(model: &Model, opts: BatchOptions, rx: &Receiver<Request>, on_batch: impl Fn(&BatchStats)) {
    let buckets = buckets(opts.max_batch);
    let mut pending: BinaryHeap<Reverse<Request>> = BinaryHeap::new();
    // Smoothed run time of a full batch: how long before a deadline a batch must start.
    let mut est_run = Ewma::with_prior(Duration::from_millis(1));
    loop {
        if pending.is_empty() {
            match rx.recv() {
                Ok(r) => pending.push(Reverse(r)),
                Err(_) => return,
            }
        }
        // Wait for more work while the batch is not full, the oldest request has not waited
        // max_queue_delay, and the earliest deadline still has slack.
        loop {
            let queued: usize = pending.iter().map(|r| r.0.n).sum();
            if queued >= opts.max_batch {
                break;
            }
            let oldest = pending.iter().map(|r| r.0.arrived).min().unwrap_or_else(Instant::now);
            let earliest = pending.peek().map(|r| r.0.order.deadline).unwrap_or_else(Instant::now);
            let run = est_run.predict().unwrap_or_default();
            let until = (oldest + opts.max_queue_delay).min(earliest.checked_sub(run).unwrap_or(earliest));
            let now = Instant::now();
            if until <= now {
                break;
            }
            match rx.recv_timeout(until - now) {
                Ok(r) => pending.push(Reverse(r)),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let mut batch = Vec::new();
        let mut total = 0;
        while let Some(Reverse(r)) = pending.peek() {
            if !batch.is_empty() && total + r.n > opts.max_batch {
                break;
            }
            total += r.n;
            if let Some(Reverse(r)) = pending.pop() {
                batch.push(r);
            }
        }
        let t0 = Instant::now();
        let (padded, infer_time) = run_batch(model, &buckets, &mut batch, total);
        let run_time = t0.elapsed();
        est_run.observe(run_time);
        on_batch(&BatchStats {
            samples: total,
            padded_to: padded,
            requests: batch.len(),
            run_time,
            infer_time,
        });
    }
}

/// Runs one batch (in bucket-sized pieces when a single request is larger than the largest
/// bucket) and answers each request with its own rows. Returns the padded size and the time
/// spent in `session.run`.
fn run_batch(model: &Model, buckets: &[usize], batch: &mut [Request], total: usize) -> (usize, Duration) {
    let mut infer_time = Duration::ZERO;
    let sample_shape: Vec<usize> = {
        let mut s: Vec<usize> = model.descr.inputs[0]
            .axes
            .iter()
            .map(|a| match a.size {
                crate::description::AxisSize::Fixed(n) => n,
                _ => 0,
            })
            .collect();
        s.remove(0);
        s
    };
    let sample_len: usize = batch
        .first()
        .map(|r| r.data.len() / r.n.max(1))
        .unwrap_or_else(|| sample_shape.iter().product());
    let max = buckets.last().copied().unwrap_or(1);
    // A batch of one request (a field with more cells than max_batch) runs on that request's own
    // buffer; only several small requests are gathered into one.
    let mut all: Vec<f32> = if batch.len() == 1 {
        std::mem::take(&mut batch[0].data)
    } else {
        let mut all = Vec::with_capacity(total.div_ceil(max) * max * sample_len);
        for r in batch.iter_mut() {
            all.append(&mut r.data);
        }
        all
    };
    let mut outputs: Vec<f32> = Vec::new();
    let mut out_sample: Option<Vec<usize>> = None;
    let mut padded_total = 0;
    let mut failure: Option<ModelError> = None;
    let mut done = 0;
    while done < total {
        let n = (total - done).min(max);
        let bucket = buckets.iter().copied().find(|&b| b >= n).unwrap_or(max);
        padded_total += bucket;
        let shape: Vec<usize> = std::iter::once(bucket)
            .chain(infer_sample_shape(&sample_shape, sample_len))
            .collect();
        // A piece that fills its bucket runs on a view of the gathered buffer; only a partial
        // last piece is copied, to be padded (and a single piece is padded in place).
        let padded: Vec<f32>;
        let data: &[f32] = if n == bucket {
            &all[done * sample_len..(done + n) * sample_len]
        } else if done == 0 && n == total {
            all.resize(bucket * sample_len, 0.0);
            &all
        } else {
            let mut d = all[done * sample_len..(done + n) * sample_len].to_vec();
            d.resize(bucket * sample_len, 0.0);
            padded = d;
            &padded
        };
        let t0 = Instant::now();
        let result = model.infer_views(&[(&shape, data)]);
        infer_time += t0.elapsed();
        match result {
            Ok(mut o) => {
                let o = o.remove(0);
                let per = o.data.len() / bucket;
                out_sample.get_or_insert_with(|| o.shape[1..].to_vec());
                outputs.extend_from_slice(&o.data[..n * per]);
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
        done += n;
    }
    let mut offset = 0;
    for r in batch.iter() {
        let result = match (&failure, &out_sample) {
            (Some(e), _) => Err(ModelError::Shape {
                model: model.name().to_string(),
                // Every request of the batch gets the failure, each as its own error: the cause
                // chain goes into the message (the error is not `Clone`).
                message: format!("batch failed: {}", crate::error::chain(e)),
            }),
            (None, Some(s)) => {
                let per: usize = s.iter().product();
                let mut shape = vec![r.n];
                shape.extend(s);
                let mut t = Tensor::new(shape, outputs[offset * per..(offset + r.n) * per].to_vec());
                model.postprocess(0, &mut t);
                Ok(t)
            }
            (None, None) => Err(ModelError::Shape {
                model: model.name().to_string(),
                message: "empty batch".into(),
            }),
        };
        offset += r.n;
        // The field may have been abandoned (worker shut down); nothing to answer then.
        let _ = r.reply.send(result);
    }
    (padded_total, infer_time)
}

/// The declared sample shape with its free axes filled from the actual sample length (crops are
/// square, so one free pair of space axes is resolved as a square).
fn infer_sample_shape(declared: &[usize], sample_len: usize) -> Vec<usize> {
    let known: usize = declared.iter().filter(|&&d| d > 0).product();
    let free = declared.iter().filter(|&&d| d == 0).count();
    let rest = sample_len / known.max(1);
    let side = match free {
        0 => 1,
        1 => rest,
        _ => (rest as f64).powf(1.0 / free as f64).round() as usize,
    };
    declared.iter().map(|&d| if d == 0 { side } else { d }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_sizes() {
        assert_eq!(buckets(64), vec![1, 2, 4, 8, 16, 32, 64]);
        assert_eq!(buckets(48), vec![1, 2, 4, 8, 16, 32, 48]);
        assert_eq!(buckets(1), vec![1]);
        assert_eq!(infer_sample_shape(&[3, 0, 0], 3 * 64 * 64), vec![3, 64, 64]);
    }
}
