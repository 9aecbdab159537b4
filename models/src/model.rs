//! A loaded model: its description, one ONNX Runtime session (created once, shared by every
//! worker), and the full pre -> inference -> post path.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ort::session::Session;
use ort::value::TensorRef;

use crate::description::{AxisKind, AxisSize, Description, TensorDescr};
use crate::error::ModelError;
use crate::npy;
use crate::runtime::{self, Provider, RuntimeOptions};
use crate::tensor::Tensor;

#[derive(Debug)]
pub struct Model {
    pub descr: Description,
    /// The provider the session actually runs on.
    pub provider: Provider,
    /// Providers skipped before it, with reasons (logged at load, printed by `models check`).
    pub skipped: Vec<String>,
    session: Mutex<Session>,
    input_names: Vec<String>,
    output_names: Vec<String>,
    /// Input dimensions as the ONNX graph declares them (-1 where free).
    input_dims: Vec<Vec<i64>>,
}

/// Outcome of running a model's own test tensors.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// Largest absolute difference per output, against the description's expected tensors.
    pub max_abs_error: Vec<(String, f32)>,
    pub provider: Provider,
    /// Median of the timed runs (after one warm-up).
    pub latency: Duration,
}

impl Model {
    /// Loads the description at `path` (file or folder), checks the weights' sha256, creates the
    /// session and checks that the description's tensors match the ONNX graph's.
    pub fn load(path: &Path, opts: &RuntimeOptions) -> Result<Self, ModelError> {
        Self::load_edited(path, opts, |_, bytes| Ok(bytes))
    }

    /// [`Model::load`] with the ONNX bytes passed through `edit` (after the sha256 check) before
    /// the session is made: a graph cut to the outputs a caller needs
    /// ([`crate::onnx_graph`]) runs only those. `edit` brings the description in line with
    /// what it changed (an output's channels), which the graph is then checked against.
    pub fn load_edited(
        path: &Path,
        opts: &RuntimeOptions,
        edit: impl FnOnce(&mut Description, Vec<u8>) -> Result<Vec<u8>, ModelError>,
    ) -> Result<Self, ModelError> {
        let mut descr = Description::load(path)?;
        let bytes = std::fs::read(&descr.weights).map_err(|source| ModelError::Io {
            path: descr.weights.clone(),
            source,
        })?;
        descr.verify_weights_bytes(&bytes)?;
        let rt = runtime::runtime(opts.ort_library.as_deref())?;
        let bytes = edit(&mut descr, bytes)?;
        let built = rt.session_from_bytes(&descr.name, &bytes, opts)?;
        for s in &built.skipped {
            tracing::debug!(model = %descr.name, "execution provider skipped: {s}");
        }
        let session = built.session;
        let shape_err = |message: String| ModelError::Shape {
            model: descr.name.clone(),
            message,
        };
        let pair =
            |what: &str, descrs: &[TensorDescr], outlets: &[ort::value::Outlet]| -> Result<Vec<String>, ModelError> {
                if descrs.len() != outlets.len() {
                    return Err(shape_err(format!(
                        "the description has {} {what}s, the ONNX graph has {}",
                        descrs.len(),
                        outlets.len()
                    )));
                }
                let mut names = Vec::new();
                for (i, d) in descrs.iter().enumerate() {
                    // Match by name when the export kept the ids, else by position.
                    let o = outlets.iter().find(|o| o.name() == d.id).unwrap_or(&outlets[i]);
                    if let Some(ty) = o.dtype().tensor_type() {
                        if ty != ort::value::TensorElementType::Float32 {
                            return Err(shape_err(format!(
                                "{what} {:?} is {ty:?} in the ONNX graph; liveomics feeds and reads float32",
                                o.name()
                            )));
                        }
                    }
                    if let Some(shape) = o.dtype().tensor_shape() {
                        if shape.len() != d.axes.len() {
                            return Err(shape_err(format!(
                                "{what} {:?} has {} axes in the description ({}) but rank {} in the ONNX graph",
                                d.id,
                                d.axes.len(),
                                d.axes.iter().map(|a| a.id.as_str()).collect::<Vec<_>>().join(","),
                                shape.len()
                            )));
                        }
                        for (a, &dim) in d.axes.iter().zip(shape.iter()) {
                            if let AxisSize::Fixed(n) = a.size {
                                if dim > 0 && dim as usize != n {
                                    return Err(shape_err(format!(
                                        "{what} {:?} axis {:?} is {n} in the description but {dim} in the ONNX graph",
                                        d.id, a.id
                                    )));
                                }
                            }
                        }
                    }
                    names.push(o.name().to_string());
                }
                Ok(names)
            };
        let input_names = pair("input", &descr.inputs, session.inputs())?;
        let input_dims = input_names
            .iter()
            .map(|n| {
                session
                    .inputs()
                    .iter()
                    .find(|o| o.name() == n)
                    .and_then(|o| o.dtype().tensor_shape())
                    .map(|s| s.iter().copied().collect())
                    .unwrap_or_default()
            })
            .collect();
        let output_names = pair("output", &descr.outputs, session.outputs())?;
        tracing::debug!(model = %descr.name, provider = %built.provider.label(), "model loaded");
        Ok(Self {
            descr,
            provider: built.provider,
            skipped: built.skipped,
            session: Mutex::new(session),
            input_names,
            output_names,
            input_dims,
        })
    }

    /// The batch size the ONNX graph fixes for input `i`, if it fixes one (exports often do,
    /// even when the description leaves the batch axis free).
    pub fn fixed_batch(&self, i: usize) -> Option<usize> {
        let b = self.descr.inputs[i].batch_axis()?;
        let d = *self.input_dims.get(i)?.get(b)?;
        (d > 0).then_some(d as usize)
    }

    pub fn name(&self) -> &str {
        &self.descr.name
    }

    /// Checks that `t` fits input `i`'s declared axes.
    pub fn check_input(&self, i: usize, t: &Tensor) -> Result<(), ModelError> {
        self.check_input_axes(i, t, false)
    }

    /// [`Model::check_input`], optionally ignoring the batch size (the batcher splits batches to
    /// what the model takes).
    pub fn check_input_axes(&self, i: usize, t: &Tensor, any_batch: bool) -> Result<(), ModelError> {
        let d = &self.descr.inputs[i];
        if t.shape.len() != d.axes.len() {
            return Err(ModelError::Shape {
                model: self.descr.name.clone(),
                message: format!("input {:?} needs {} axes, got shape {:?}", d.id, d.axes.len(), t.shape),
            });
        }
        for (a, &n) in d.axes.iter().zip(&t.shape) {
            if !(any_batch && a.kind == AxisKind::Batch || a.size.accepts(n)) {
                return Err(ModelError::Shape {
                    model: self.descr.name.clone(),
                    message: format!("input {:?} axis {:?} cannot be {n} (allowed: {:?})", d.id, a.id, a.size),
                });
            }
        }
        Ok(())
    }

    pub fn preprocess(&self, i: usize, t: &mut Tensor) {
        for p in &self.descr.inputs[i].processing {
            p.apply(t);
        }
    }

    /// Input `i`'s preprocessing as `f(channel, plane)` when every step is elementwise per channel
    /// (`fixed_zero_mean_unit_variance`, `scale_linear`, `clip`, ...), for inputs laid out
    /// `[batch, channel, ...]`: the crop gather applies it to each plane while the plane is in
    /// cache, and the batch goes to [`crate::Batcher::submit_prepared`]. `None` when a step needs
    /// statistics of the data (`zero_mean_unit_variance`, `scale_range`) or another layout.
    pub fn plane_preprocessor(&self, i: usize) -> Option<impl Fn(usize, &mut [f32]) + Sync + '_> {
        let input = &self.descr.inputs[i];
        let channel = input
            .axes
            .iter()
            .position(|a| matches!(a.kind, crate::description::AxisKind::Channel { .. }));
        let layout_ok = matches!(
            input.axes.first().map(|a| &a.kind),
            Some(crate::description::AxisKind::Batch)
        ) && channel.is_none_or(|c| c == 1);
        let steps = &input.processing;
        (layout_ok && steps.iter().all(|p| p.is_elementwise_per(channel)))
            .then_some(move |c: usize, plane: &mut [f32]| steps.iter().for_each(|p| p.apply_run(c, plane)))
    }

    pub fn postprocess(&self, i: usize, t: &mut Tensor) {
        for p in &self.descr.outputs[i].processing {
            p.apply(t);
        }
    }

    /// Bare `session.run` on already preprocessed inputs; checks outputs for NaN.
    pub fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, ModelError> {
        let views: Vec<(&[usize], &[f32])> = inputs.iter().map(|t| (t.shape.as_slice(), t.data.as_slice())).collect();
        self.infer_views(&views)
    }

    /// [`Model::infer`] on borrowed `(shape, data)` views: the batcher runs slices of its gathered
    /// buffer without copying them.
    pub fn infer_views(&self, inputs: &[(&[usize], &[f32])]) -> Result<Vec<Tensor>, ModelError> {
        run_session(
            &self.session,
            &self.descr.name,
            &self.input_names,
            &self.output_names,
            inputs,
        )
    }

    /// Pre-processing, inference and post-processing for inputs shaped as the description says.
    pub fn run(&self, mut inputs: Vec<Tensor>) -> Result<Vec<Tensor>, ModelError> {
        if inputs.len() != self.descr.inputs.len() {
            return Err(ModelError::Shape {
                model: self.descr.name.clone(),
                message: format!(
                    "{} inputs given, the model takes {}",
                    inputs.len(),
                    self.descr.inputs.len()
                ),
            });
        }
        for (i, t) in inputs.iter_mut().enumerate() {
            self.check_input(i, t)?;
            self.preprocess(i, t);
        }
        let refs: Vec<&Tensor> = inputs.iter().collect();
        let mut outputs = self.infer(&refs)?;
        for (i, t) in outputs.iter_mut().enumerate() {
            self.postprocess(i, t);
        }
        Ok(outputs)
    }

    /// Runs the description's test inputs and compares with its test outputs.
    pub fn check(&self, timed_runs: usize) -> Result<CheckReport, ModelError> {
        let read = |tensors: &[TensorDescr]| {
            tensors
                .iter()
                .map(|d| {
                    npy::read(d.test_tensor.as_deref().ok_or_else(|| ModelError::Description {
                        model: self.descr.name.clone(),
                        key: format!("{}.test_tensor", d.id),
                        message: "missing; `models check` needs the model's test tensors".into(),
                    })?)
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let inputs = read(&self.descr.inputs)?;
        let expected = read(&self.descr.outputs)?;
        let got = self.run(inputs.clone())?;
        let mut max_abs_error = Vec::new();
        for ((d, e), g) in self.descr.outputs.iter().zip(&expected).zip(&got) {
            let err = g.max_abs_diff(e).ok_or_else(|| ModelError::Shape {
                model: self.descr.name.clone(),
                message: format!(
                    "output {:?} has shape {:?}, the test tensor {:?}",
                    d.id, g.shape, e.shape
                ),
            })?;
            max_abs_error.push((d.id.clone(), err));
        }
        let mut times = Vec::new();
        for _ in 0..timed_runs.max(1) {
            let t0 = Instant::now();
            self.run(inputs.clone())?;
            times.push(t0.elapsed());
        }
        times.sort();
        Ok(CheckReport {
            max_abs_error,
            provider: self.provider,
            latency: times[times.len() / 2],
        })
    }

    /// The channel names of output `i`, when its channel axis lists them.
    pub fn output_channels(&self, i: usize) -> Vec<String> {
        self.descr.output_channels(i)
    }
}

/// One `session.run` with float32 inputs bound to `input_names` in order; every output is read
/// as float32 and checked for NaN/inf (a model that emits NaN fails loudly, not downstream).
pub(crate) fn run_session(
    session: &Mutex<Session>,
    model: &str,
    input_names: &[String],
    output_names: &[String],
    inputs: &[(&[usize], &[f32])],
) -> Result<Vec<Tensor>, ModelError> {
    let ort_err = |what: &str, source: ort::Error| ModelError::Ort {
        model: model.to_string(),
        what: what.to_string(),
        source,
    };
    let values = inputs
        .iter()
        .map(|&(shape, data)| {
            let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
            TensorRef::from_array_view((shape, data)).map_err(|e| ort_err("input tensor", e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let named: Vec<(String, ort::session::SessionInputValue<'_>)> = input_names
        .iter()
        .cloned()
        .zip(values.into_iter().map(Into::into))
        .collect();
    let mut session = session.lock().unwrap_or_else(|e| e.into_inner());
    let outputs = session.run(named).map_err(|e| ort_err("run", e))?;
    let mut out = Vec::with_capacity(output_names.len());
    for name in output_names {
        let (shape, data) = outputs[name.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(|e| ort_err("output tensor", e))?;
        let bad = data.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            return Err(ModelError::NonFinite {
                model: model.to_string(),
                output: name.clone(),
                count: bad,
            });
        }
        out.push(Tensor::new(shape.iter().map(|&d| d as usize).collect(), data.to_vec()));
    }
    Ok(out)
}
