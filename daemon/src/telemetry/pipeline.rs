//! Events of the pipeline: frames in, assembly, stages, sinks, completion, queues, backpressure and errors.

use super::*;

/// A frame arrived from the source.
#[derive(Debug)]
pub struct FrameReceived<'a> {
    pub channel: &'a str,
}

impl FrameReceived<'_> {
    pub fn emit(&self) {
        counter!(FRAMES_IN, "channel" => self.channel.to_string()).increment(1);
    }
}

/// A frame was refused (wrong size, dtype, channel, duplicate). It is logged with its field so
/// an operator can find it; the daemon carries on.
#[derive(Debug)]
pub struct FrameRejected<'a> {
    pub field: &'a str,
    pub channel: usize,
    pub reason: &'static str,
    pub detail: String,
}

impl FrameRejected<'_> {
    pub fn emit(&self) {
        warn!(
            field = self.field,
            channel = self.channel,
            reason = self.reason,
            "frame rejected: {}",
            self.detail
        );
        counter!(FRAMES_REJECTED, "reason" => self.reason).increment(1);
    }
}

/// A source skipped an input (a file): logged with its name, counted by reason.
#[derive(Debug)]
pub struct InputRejected<'a> {
    pub input: &'a str,
    pub reason: &'static str,
    pub detail: &'a str,
}

impl InputRejected<'_> {
    pub fn emit(&self) {
        warn!(
            input = self.input,
            reason = self.reason,
            "input skipped: {}",
            self.detail
        );
        counter!(INPUTS_REJECTED, "reason" => self.reason).increment(1);
    }
}

/// A publisher's frame numbers jumped: frames `[from, to)` of its stream were sent and never
/// arrived. Their fields go on incomplete after the assembly timeout; this says why.
#[derive(Debug)]
pub struct FramesLost<'a> {
    pub stream: &'a str,
    pub from: u64,
    pub to: u64,
    /// The key of the first frame that came after the gap.
    pub before: &'a str,
}

impl FramesLost<'_> {
    pub fn emit(&self) {
        warn!(
            stream = self.stream,
            from = self.from,
            to = self.to,
            "{} frames lost in transport (numbers {}..{} of the publisher's stream never arrived; the next was {}): asked the publisher to send them again; their fields go on incomplete if they do not come within the assembly timeout",
            self.to - self.from,
            self.from,
            self.to - 1,
            self.before
        );
        counter!(FRAMES_LOST).increment(self.to - self.from);
    }
}

/// A part of the pipeline spent `cpu` of processor time (a thread ended, a stage finished a
/// field): counted, so the account of a long run can be watched while it goes.
#[derive(Debug)]
pub struct CpuSpent<'a> {
    pub part: &'a str,
    pub cpu: std::time::Duration,
}

impl CpuSpent<'_> {
    pub fn emit(&self) {
        counter!(CPU_US, "part" => self.part.to_string()).increment(self.cpu.as_micros() as u64);
    }
}

/// A frame found missing came again: the publisher resent it when asked.
#[derive(Debug)]
pub struct FrameResent;

impl FrameResent {
    pub fn emit(&self) {
        debug!("a frame found missing was sent again by its publisher");
        counter!(FRAMES_RESENT).increment(1);
    }
}

/// A source read an input after all, late (an event the watcher missed) or despite a doubt (a
/// file whose pixels end in zeros, read once it stopped changing): logged with its name, counted
/// by reason, so a watcher that misses files shows before it misses one for good.
#[derive(Debug)]
pub struct InputRecovered<'a> {
    pub input: &'a str,
    pub reason: &'static str,
    pub detail: &'a str,
}

impl InputRecovered<'_> {
    pub fn emit(&self) {
        warn!(
            input = self.input,
            reason = self.reason,
            "input read late: {}",
            self.detail
        );
        counter!(INPUTS_RECOVERED, "reason" => self.reason).increment(1);
    }
}

/// A field left assembly; `missing` names channels that never came.
#[derive(Debug)]
pub struct FieldAssembled<'a> {
    pub field: &'a str,
    pub missing: &'a [String],
    pub passed: Passed,
}

/// Why assembly passed a field on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passed {
    /// Every channel arrived.
    Complete,
    /// `pipeline.assembly_timeout_ms` went by without the missing channels.
    Timeout,
    /// The partial fields held more than `pipeline.max_pending_mb`; this was the oldest.
    MemoryCap,
    /// Intake ended (the source finished or the run was stopped).
    IntakeEnded,
}

impl FieldAssembled<'_> {
    pub fn emit(&self) {
        counter!(FIELDS_ASSEMBLED).increment(1);
        if self.missing.is_empty() {
            debug!(field = self.field, "field assembled");
            return;
        }
        let why = match self.passed {
            Passed::Complete | Passed::Timeout => "after the assembly timeout",
            Passed::MemoryCap => {
                "because partial fields held more than pipeline.max_pending_mb (an acquisition \
                 that sends channel by channel needs it and the timeout raised)"
            }
            Passed::IntakeEnded => "at the end of intake",
        };
        warn!(field = self.field, missing = ?self.missing, "field passed on incomplete {why}; its channels that come later are rejected as late");
        counter!(FIELDS_INCOMPLETE).increment(1);
    }
}

/// A stage finished a field.
#[derive(Debug)]
pub struct StageCompleted<'a> {
    pub stage: &'static str,
    pub field: &'a str,
    pub elapsed: Duration,
}

impl StageCompleted<'_> {
    pub fn emit(&self) {
        debug!(
            stage = self.stage,
            field = self.field,
            ms = self.elapsed.as_secs_f64() * 1e3,
            "stage done"
        );
        histogram!(STAGE_SECONDS, "stage" => self.stage).record(self.elapsed.as_secs_f64());
    }
}

/// Cells were measured in a field.
#[derive(Debug)]
pub struct CellsMeasured<'a> {
    pub field: &'a str,
    pub cells: usize,
}

impl CellsMeasured<'_> {
    pub fn emit(&self) {
        counter!(CELLS).increment(self.cells as u64);
    }
}

/// A sink finished (or failed) a field.
#[derive(Debug)]
pub struct SinkWritten<'a> {
    pub sink: &'static str,
    pub field: &'a str,
    pub elapsed: Duration,
}

impl SinkWritten<'_> {
    pub fn emit(&self) {
        debug!(
            sink = self.sink,
            field = self.field,
            ms = self.elapsed.as_secs_f64() * 1e3,
            "sink wrote field"
        );
        histogram!(SINK_SECONDS, "sink" => self.sink).record(self.elapsed.as_secs_f64());
    }
}

/// Every sink is done with a field: the end-to-end latency and whether it met its deadline.
#[derive(Debug)]
pub struct FieldDone<'a> {
    pub field: &'a str,
    pub cells: usize,
    pub latency: Duration,
    /// First frame to the end of the field's required work.
    pub required: Option<Duration>,
    pub missed_deadline: bool,
    /// Written without some optional work, which is owed.
    pub degraded: bool,
}

impl FieldDone<'_> {
    pub fn emit(&self) {
        info!(
            field = self.field,
            cells = self.cells,
            latency_ms = (self.latency.as_secs_f64() * 1e3).round(),
            required_ms = self.required.map(|r| (r.as_secs_f64() * 1e3).round()),
            missed_deadline = self.missed_deadline,
            degraded = self.degraded,
            "field done"
        );
        counter!(FIELDS_DONE).increment(1);
        histogram!(FIELD_LATENCY_SECONDS).record(self.latency.as_secs_f64());
        if self.missed_deadline {
            counter!(DEADLINE_MISSES).increment(1);
        }
    }
}

/// A queue's depth, updated by its consumer each time it takes an item.
#[derive(Debug)]
pub struct QueueDepth<'a> {
    pub queue: &'a str,
    pub depth: usize,
}

impl QueueDepth<'_> {
    pub fn emit(&self) {
        gauge!(QUEUE_DEPTH, "queue" => self.queue.to_string()).set(self.depth as f64);
    }
}

/// The source waited because the pipeline was full.
#[derive(Debug)]
pub struct SourceBlocked {
    pub waited: Duration,
}

impl SourceBlocked {
    pub fn emit(&self) {
        counter!(SOURCE_BLOCKED_US).increment(self.waited.as_micros() as u64);
        if self.waited > Duration::from_secs(1) {
            warn!(
                waited_ms = self.waited.as_millis() as u64,
                "acquisition held back: the pipeline is behind"
            );
        }
    }
}

/// Something failed but the daemon continues; `kind` is the metric label.
#[derive(Debug)]
pub struct ErrorOccurred<'a> {
    pub kind: &'static str,
    pub field: Option<&'a str>,
    pub error: &'a (dyn std::error::Error + 'static),
}

impl ErrorOccurred<'_> {
    pub fn emit(&self) {
        let chain = error_chain(self.error);
        match self.field {
            Some(f) => error!(kind = self.kind, field = f, "{chain}"),
            None => error!(kind = self.kind, "{chain}"),
        }
        counter!(ERRORS, "kind" => self.kind).increment(1);
    }
}

/// The run's plan is known and its sinks are open: what the operator is about to get.
#[derive(Debug)]
pub struct RunStarting<'a> {
    pub plan: &'a liveomics_adapters::model::AcquisitionPlan,
    pub sinks: &'a [&'static str],
}

impl RunStarting<'_> {
    pub fn emit(&self) {
        let p = self.plan;
        info!(
            plate = %p.plate,
            wells = p.wells.len(),
            fields_per_well = p.fields_per_well,
            channels = ?p.channels.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            size = %format!("{}x{}", p.width, p.height),
            sinks = ?self.sinks,
            "acquisition starting"
        );
    }
}

/// A sink's storage failed in a way more fields would only repeat (disk full, read-only): intake
/// stops so that the plate ends with every listed field complete.
#[derive(Debug)]
pub struct IntakeStopped<'a> {
    pub sink: &'a str,
}

impl IntakeStopped<'_> {
    pub fn emit(&self) {
        error!(
            sink = self.sink,
            "storage failed: stopping intake; complete fields stay valid"
        );
    }
}

/// The fields in flight did not drain within `pipeline.stop_grace_ms` of the first stop signal
/// (one is inside a long kernel): the daemon exits anyway.
#[derive(Debug)]
pub struct StopOverran {
    pub grace: std::time::Duration,
}

impl StopOverran {
    pub fn emit(&self) {
        warn!(
            grace_s = self.grace.as_secs_f64(),
            "the fields in flight did not finish within pipeline.stop_grace_ms of the stop signal: exiting now (130); the plate lists only complete fields, and a restart redoes the rest"
        );
    }
}

/// The zarr sink found the plate from an earlier run and goes on with it.
#[derive(Debug)]
pub struct PlateResumed<'a> {
    pub plate: &'a str,
    pub complete_fields: usize,
}

impl PlateResumed<'_> {
    pub fn emit(&self) {
        info!(
            plate = self.plate,
            complete_fields = self.complete_fields,
            "resuming an existing plate: complete fields are skipped, partial ones redone"
        );
    }
}

/// A field a resumed plate lists as complete failed verification (`sink/zarr/verify.rs`): it is
/// taken off the listing and redone when the source brings it again; nothing of it is deleted
/// before then, so a source that cannot (a live microscope gone on) leaves its bytes in place.
#[derive(Debug)]
pub struct FieldUnverified<'a> {
    pub field: &'a str,
    pub part: &'static str,
    pub detail: &'a str,
}

impl FieldUnverified<'_> {
    pub fn emit(&self) {
        warn!(
            field = self.field,
            part = self.part,
            "listed field failed verification on resume, taken off the listing to be redone: {}",
            self.detail
        );
        counter!(FIELDS_UNVERIFIED, "part" => self.part).increment(1);
    }
}

/// A field a resumed plate already holds complete came again and was not rewritten.
#[derive(Debug)]
pub struct FieldAlreadyWritten<'a> {
    pub field: &'a str,
}

impl FieldAlreadyWritten<'_> {
    pub fn emit(&self) {
        info!(field = self.field, "already complete in the plate; not written again");
    }
}

/// The HTTP server is up: the plate page and `/metrics`.
#[derive(Debug)]
pub struct HttpListening {
    pub addr: std::net::SocketAddr,
}

impl HttpListening {
    pub fn emit(&self) {
        info!(
            page = %format!("http://{}/", self.addr),
            metrics = %format!("http://{}/metrics", self.addr),
            "http server listening: plate page and metrics"
        );
    }
}
