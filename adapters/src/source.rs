//! The source extension point: anything that produces frames (simulator today; zenoh, instrument
//! folders and replay in their own issues) implements [`Source`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::Sender;

use crate::model::{AcquisitionPlan, Frame, ModelError};

/// Cooperative stop request shared by the daemon and its source. Sources check it between fields,
/// so a stop never leaves half a field in the pipeline.
#[derive(Debug, Clone, Default)]
pub struct StopToken(Arc<AtomicBool>);

impl StopToken {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// The flag itself, for signal handlers that can only set an `AtomicBool`.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }
}

/// Why a source stopped early.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("the pipeline closed its input while the source still had frames")]
    Disconnected,
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid source configuration: {0}")]
    Config(String),
}

/// What a source did, for the run summary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceReport {
    pub fields: u64,
    pub frames: u64,
    /// True when the source ended because a stop was requested rather than because it ran out.
    pub stopped_early: bool,
    /// Time spent waiting on a full pipeline: backpressure made visible.
    pub blocked: std::time::Duration,
    /// Time spent reading and decoding inputs (files), for throughput accounting.
    pub read_time: std::time::Duration,
    /// Inputs skipped with a reported problem.
    pub problems: u64,
    /// Frames a publisher numbered and sent that never arrived (gaps in its sequence numbers).
    pub lost: u64,
    /// Of those, frames the publisher sent again when asked (they may still have joined their
    /// field).
    pub resent: u64,
    /// Inputs read after all, late, with a reported notice: files a watch event missed and a
    /// rescan found, files read although they looked unfinished.
    pub recovered: u64,
}

/// An input a source could not use (a corrupt file, a name that matches no layout). The daemon
/// logs it with the input's name and counts it; the source carries on with everything else.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceProblem {
    /// The input, e.g. the file path.
    pub input: String,
    /// Short, stable reason: the metric label.
    pub reason: &'static str,
    pub detail: String,
    /// The input was used after all (found late, read despite a doubt); false: it was skipped.
    pub recovered: bool,
}

/// A producer of frames. `run` blocks on its own thread; sending on the bounded channel blocks when
/// the pipeline is behind, which is how backpressure reaches the acquisition: frames wait, they
/// are never dropped.
pub trait Source: Send {
    /// What will be acquired, known before the first frame.
    fn plan(&self) -> &AcquisitionPlan;

    /// Where to report inputs that were skipped; sources without such inputs ignore it.
    fn observe(&mut self, _problems: Sender<SourceProblem>) {}

    /// Whether an instrument's timing stands behind the fields: a microscope (live or
    /// simulated), a watched folder, a replay at its original pace or a multiple of it. Fields
    /// of a source that is not paced (a replay at `max` speed) carry no deadline: nothing
    /// waits for them, only the run's throughput counts, so they are never degraded and never
    /// late.
    fn paced(&self) -> bool {
        true
    }

    /// How many fields the source will deliver, when it knows (replay): drives a progress bar.
    fn expected_fields(&self) -> Option<u64> {
        None
    }

    /// Fields already complete in the output (a resumed plate): a source that can choose what it
    /// acquires skips them; one that cannot (a live microscope) ignores this, and the sinks
    /// recognise the repeats.
    fn skip(&mut self, _done: &[crate::model::FieldKey]) {}

    /// Produces frames until the acquisition ends or `stop` is set. A source that drives the
    /// acquisition stops at the next field boundary, so every field it started is delivered whole;
    /// one that only watches (a folder) stops at once, and a field it cut short is written
    /// incomplete and redone when the plate is resumed.
    fn run(&mut self, out: &Sender<Frame>, stop: &StopToken) -> Result<SourceReport, SourceError>;
}

impl SourceReport {
    /// Sends a frame downstream, blocking while the pipeline is full, and accounts for it: every
    /// source hands frames over through this, so backpressure is measured the same way everywhere.
    pub fn send(&mut self, out: &Sender<Frame>, frame: Frame) -> Result<(), SourceError> {
        let t0 = std::time::Instant::now();
        out.send(frame).map_err(|_| SourceError::Disconnected)?;
        self.blocked += t0.elapsed();
        self.frames += 1;
        Ok(())
    }
}

/// Sleeps until `due` or until a stop is requested, whichever comes first (pacing a simulated or
/// replayed acquisition without making a stop wait).
pub fn wait_until(due: std::time::Instant, stop: &StopToken) {
    use std::time::{Duration, Instant};
    while Instant::now() < due && !stop.is_stopped() {
        std::thread::sleep((due - Instant::now()).min(Duration::from_millis(50)));
    }
}

/// Where a source reports skipped inputs: to the daemon when it is observing, else to the log.
#[derive(Debug, Clone, Default)]
pub struct Problems(Option<Sender<SourceProblem>>);

impl Problems {
    pub fn new(tx: Sender<SourceProblem>) -> Self {
        Self(Some(tx))
    }

    /// Reports one skipped input and counts it in `report`.
    pub fn report(&self, report: &mut SourceReport, input: String, reason: &'static str, detail: String) {
        report.problems += 1;
        self.send(input, reason, detail, false);
    }

    /// Reports an input that was read after all, but late or with a doubt, and counts it.
    pub fn recovered(&self, report: &mut SourceReport, input: String, reason: &'static str, detail: String) {
        report.recovered += 1;
        self.send(input, reason, detail, true);
    }

    fn send(&self, input: String, reason: &'static str, detail: String, recovered: bool) {
        match &self.0 {
            Some(tx) => {
                let _ = tx.send(SourceProblem {
                    input,
                    reason,
                    detail,
                    recovered,
                });
            }
            None => tracing::debug!(input = %input, reason, "{detail}"),
        }
    }
}
