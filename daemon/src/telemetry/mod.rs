//! The one place where liveomics logs and counts. Every internal event is a struct whose `emit`
//! writes the log line and updates the metric together, so the two never disagree. Metric names
//! are the constants below and are documented in `docs/METRICS.md`. The library crates
//! (`liveomics-models`, `-adapters`, `-kernels`) log at debug level only, for their own
//! debugging; whatever an operator needs from them reaches this module as data (a model's
//! provider and skipped providers, a source's rejected inputs).

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing::{debug, error, info, warn};

use serde::{Deserialize, Serialize};

mod http;

pub const FRAMES_IN: &str = "liveomics_frames_in_total";
pub const FRAMES_REJECTED: &str = "liveomics_frames_rejected_total";
pub const INPUTS_REJECTED: &str = "liveomics_inputs_rejected_total";
pub const FIELDS_ASSEMBLED: &str = "liveomics_fields_assembled_total";
pub const FIELDS_INCOMPLETE: &str = "liveomics_fields_incomplete_total";
pub const FIELDS_DONE: &str = "liveomics_fields_done_total";
pub const CELLS: &str = "liveomics_cells_total";
pub const STAGE_SECONDS: &str = "liveomics_stage_seconds";
pub const SINK_SECONDS: &str = "liveomics_sink_seconds";
pub const FIELD_LATENCY_SECONDS: &str = "liveomics_field_latency_seconds";
pub const DEADLINE_MISSES: &str = "liveomics_deadline_misses_total";
pub const QUEUE_DEPTH: &str = "liveomics_queue_depth";
pub const SOURCE_BLOCKED_US: &str = "liveomics_source_blocked_microseconds_total";
pub const ERRORS: &str = "liveomics_errors_total";
pub const MODEL_SECONDS: &str = "liveomics_model_seconds";
pub const BRIDGE_CONNECTED: &str = "liveomics_bridge_connected";
pub const MODEL_FAILURES: &str = "liveomics_model_failures_total";
pub const MODEL_BATCH_SIZE: &str = "liveomics_model_batch_size";
pub const MODEL_INFO: &str = "liveomics_model_info";
pub const COMPUTE_INFO: &str = "liveomics_compute_info";
pub const FOLLOWUPS: &str = "liveomics_followups_total";
pub const FOLLOWUP_ACKS_REJECTED: &str = "liveomics_followup_acks_rejected_total";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Address of the Prometheus endpoint (`/metrics`); port 0 picks a free port (logged); empty
    /// disables it. Localhost by default: metrics are not for the whole network.
    pub metrics_listen: String,
    pub log_format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `liveomics=debug`; `RUST_LOG` overrides it.
    pub log_level: String,
}

impl TelemetryConfig {
    /// Checks of the section's values, keyed under it.
    pub fn validate(&self) -> Vec<liveomics_adapters::Invalid> {
        use liveomics_adapters::Invalid;
        let mut out = Vec::new();
        if !self.metrics_listen.is_empty() && self.metrics_listen.parse::<SocketAddr>().is_err() {
            out.push(Invalid::new(
                "metrics_listen",
                format!(
                    "{:?} is not an address like 127.0.0.1:9464 (empty disables)",
                    self.metrics_listen
                ),
            ));
        }
        // A bare word that is not a level parses as a filter for a target of that name, which
        // silences everything else: "loud" would turn logging off. Each directive must be a
        // level or `target=level`.
        const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
        let bare_word = self.log_level.split(',').map(str::trim).find(|d| {
            !d.is_empty() && !d.contains('=') && !d.contains('[') && !LEVELS.contains(&d.to_ascii_lowercase().as_str())
        });
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() || bare_word.is_some() {
            out.push(Invalid::new(
                "log_level",
                format!(
                    "{:?} is not a log filter: use a level (trace, debug, info, warn, error, off), \
                     optionally with target=level directives, e.g. \"info,liveomics=debug\"",
                    self.log_level
                ),
            ));
        }
        out
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            metrics_listen: "127.0.0.1:9464".into(),
            log_format: LogFormat::Text,
            log_level: "info".into(),
        }
    }
}

/// Installs the log subscriber. `RUST_LOG` wins over the config so an operator can raise detail
/// without editing the file.
pub fn init_logging(cfg: &TelemetryConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cfg.log_level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let res = match cfg.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    // A second init (tests, or `run` after `validate`) keeps the first subscriber.
    drop(res);
}

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot start the metrics upkeep thread")]
    Upkeep(#[source] std::io::Error),
    #[error("cannot listen for metrics on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install the metrics recorder")]
    Recorder(#[source] metrics_exporter_prometheus::BuildError),
}

/// The Prometheus recorder plus, when configured, the HTTP endpoint serving `/metrics`
/// (`http.rs`).
#[derive(Debug)]
pub struct Metrics {
    handle: PrometheusHandle,
    pub addr: Option<SocketAddr>,
}

impl Metrics {
    pub fn install(cfg: &TelemetryConfig) -> Result<Self, TelemetryError> {
        // One recorder per process: a second run in the same process (tests, embedding) shares it,
        // and its endpoint serves the same registry.
        static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
        let handle = match HANDLE.get() {
            Some(h) => h.clone(),
            None => {
                let recorder = PrometheusBuilder::new()
                    .set_buckets(&[
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    ])
                    .map_err(TelemetryError::Recorder)?
                    .build_recorder();
                let handle = HANDLE.get_or_init(|| recorder.handle()).clone();
                // Fails only if another recorder was installed first; ours then stays unused.
                if metrics::set_global_recorder(recorder).is_ok() {
                    describe();
                    // Histogram samples pile up until a render or an upkeep drains them; a run
                    // nobody scrapes (or with the endpoint off) would grow all night without this.
                    let h = handle.clone();
                    std::thread::Builder::new()
                        .name("metrics-upkeep".into())
                        .spawn(move || loop {
                            std::thread::sleep(Duration::from_secs(5));
                            h.run_upkeep();
                        })
                        .map_err(TelemetryError::Upkeep)?;
                }
                handle
            }
        };
        let addr = if cfg.metrics_listen.is_empty() {
            None
        } else {
            let listener = TcpListener::bind(&cfg.metrics_listen).map_err(|source| TelemetryError::Bind {
                addr: cfg.metrics_listen.clone(),
                source,
            })?;
            let addr = listener.local_addr().ok();
            http::spawn(listener, handle.clone()).map_err(|source| TelemetryError::Bind {
                addr: cfg.metrics_listen.clone(),
                source,
            })?;
            if let Some(a) = addr {
                info!(metrics = %format!("http://{a}/metrics"), "metrics endpoint listening");
            }
            addr
        };
        Ok(Self { handle, addr })
    }

    pub fn render(&self) -> String {
        self.handle.render()
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(FRAMES_IN, "Frames received from the source, by channel");
    describe_counter!(FRAMES_REJECTED, "Frames rejected at assembly, by reason");
    describe_counter!(
        INPUTS_REJECTED,
        "Source inputs (files) skipped, by reason; each is logged with its name"
    );
    describe_counter!(FIELDS_ASSEMBLED, "Fields assembled (complete or not)");
    describe_counter!(
        FIELDS_INCOMPLETE,
        "Fields passed on with missing channels after the assembly timeout"
    );
    describe_counter!(FIELDS_DONE, "Fields written by every sink");
    describe_counter!(CELLS, "Cells segmented");
    describe_histogram!(STAGE_SECONDS, Unit::Seconds, "Time per field in each stage");
    describe_histogram!(SINK_SECONDS, Unit::Seconds, "Time per field in each sink");
    describe_histogram!(
        FIELD_LATENCY_SECONDS,
        Unit::Seconds,
        "First frame received to every sink done"
    );
    describe_counter!(DEADLINE_MISSES, "Fields done after their latency budget");
    describe_gauge!(QUEUE_DEPTH, "Items waiting in each bounded queue");
    describe_counter!(
        SOURCE_BLOCKED_US,
        Unit::Microseconds,
        "Time the source waited on a full frame queue (backpressure)"
    );
    describe_counter!(ERRORS, "Errors by kind; the daemon continued");
    describe_histogram!(
        MODEL_SECONDS,
        Unit::Seconds,
        "Time per field in each model (pre, inference, post), by model and execution provider"
    );
    describe_counter!(
        MODEL_FAILURES,
        "Fields a model failed on, by model; raw data and segmentation were still written"
    );
    describe_histogram!(
        MODEL_BATCH_SIZE,
        "Cell crops per session.run of per-cell models (before padding), by model"
    );
    describe_counter!(
        FOLLOWUPS,
        "Closed-loop follow-up requests by rule and what became of them"
    );
    describe_counter!(
        FOLLOWUP_ACKS_REJECTED,
        "Follow-up acks from the bridge that were not understood, by reason"
    );
    describe_gauge!(
        MODEL_INFO,
        "1 per loaded model, labelled with its role and the execution provider it runs on"
    );
}

/// The acquisition bridge came or went (its zenoh liveliness token).
#[derive(Debug)]
pub struct BridgeLiveliness<'a> {
    pub key: &'a str,
    pub alive: bool,
}

impl BridgeLiveliness<'_> {
    pub fn emit(&self) {
        if self.alive {
            info!(key = self.key, "acquisition bridge connected");
        } else {
            warn!(
                key = self.key,
                "acquisition bridge lost: fields in flight go on incomplete after the assembly timeout; waiting for it to return"
            );
        }
        gauge!(BRIDGE_CONNECTED).set(if self.alive { 1.0 } else { 0.0 });
    }
}

/// The image kernels' back end was chosen (`compute.device`).
#[derive(Debug)]
pub struct ComputeSelected<'a> {
    pub requested: &'a str,
    pub device: &'a str,
    /// Why `auto` fell back to the CPU.
    pub fallback_reason: Option<&'a str>,
}

impl ComputeSelected<'_> {
    pub fn emit(&self) {
        match self.fallback_reason {
            Some(reason) => info!(
                requested = self.requested,
                device = self.device,
                reason,
                "image kernels run on the CPU"
            ),
            None => info!(requested = self.requested, device = self.device, "image kernels ready"),
        }
        gauge!(COMPUTE_INFO, "device" => self.device.to_string()).set(1.0);
    }
}

/// A model's session was created.
#[derive(Debug)]
pub struct ModelLoaded<'a> {
    pub model: &'a str,
    pub role: &'a str,
    pub provider: &'a str,
    /// Why each provider before `provider` in the configured list could not run the model.
    pub skipped: &'a [String],
    /// The ONNX Runtime library in use (found at run time, so worth a line in the log).
    pub library: &'a str,
}

impl ModelLoaded<'_> {
    pub fn emit(&self) {
        info!(
            model = self.model,
            role = self.role,
            provider = self.provider,
            skipped = ?self.skipped,
            library = self.library,
            "model ready"
        );
        gauge!(MODEL_INFO, "model" => self.model.to_string(), "role" => self.role.to_string(), "provider" => self.provider.to_string()).set(1.0);
    }
}

/// A model ran on one field.
#[derive(Debug)]
pub struct ModelRan<'a> {
    pub model: &'a str,
    pub provider: &'a str,
    pub field: &'a str,
    pub items: usize,
    pub elapsed: Duration,
}

impl ModelRan<'_> {
    pub fn emit(&self) {
        debug!(
            model = self.model,
            provider = self.provider,
            field = self.field,
            items = self.items,
            ms = self.elapsed.as_secs_f64() * 1e3,
            "model ran"
        );
        histogram!(MODEL_SECONDS, "model" => self.model.to_string(), "provider" => self.provider.to_string())
            .record(self.elapsed.as_secs_f64());
    }
}

/// A model failed on a field; the field goes on without its predictions.
#[derive(Debug)]
pub struct ModelFailed<'a> {
    pub model: &'a str,
    pub field: &'a str,
    pub error: &'a (dyn std::error::Error + 'static),
}

impl ModelFailed<'_> {
    pub fn emit(&self) {
        error!(
            model = self.model,
            field = self.field,
            "model failed: {}",
            error_chain(self.error)
        );
        counter!(MODEL_FAILURES, "model" => self.model.to_string()).increment(1);
    }
}

/// A per-cell batch ran.
#[derive(Debug)]
pub struct BatchRan<'a> {
    pub model: &'a str,
    pub samples: usize,
    pub padded_to: usize,
    pub requests: usize,
}

impl BatchRan<'_> {
    pub fn emit(&self) {
        debug!(
            model = self.model,
            samples = self.samples,
            padded_to = self.padded_to,
            fields = self.requests,
            "batch ran"
        );
        histogram!(MODEL_BATCH_SIZE, "model" => self.model.to_string()).record(self.samples as f64);
    }
}

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
    pub missed_deadline: bool,
}

impl FieldDone<'_> {
    pub fn emit(&self) {
        info!(
            field = self.field,
            cells = self.cells,
            latency_ms = (self.latency.as_secs_f64() * 1e3).round(),
            missed_deadline = self.missed_deadline,
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

/// `outer: cause: root cause`, the way an operator needs to read it.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    liveomics_models::error::chain(e)
}

/// What became of a closed-loop follow-up request: the `state` label of
/// `liveomics_followups_total`. A closed set, so that acks from the network cannot mint labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FollowupState {
    Requested,
    Scheduled,
    Started,
    Done,
    /// The bridge refused to execute it (wrong plate, outside the stage limits, over its caps).
    Rejected,
    Timeout,
    Suppressed,
    OverBudget,
}

impl FollowupState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Scheduled => "scheduled",
            Self::Started => "started",
            Self::Done => "done",
            Self::Rejected => "rejected",
            Self::Timeout => "timeout",
            Self::Suppressed => "suppressed",
            Self::OverBudget => "over_budget",
        }
    }

    /// The states a bridge may acknowledge; anything else in an ack is rejected. They only move
    /// forward (`Ord`): a `scheduled` that arrives after `done` changes nothing.
    pub fn from_ack(s: &str) -> Option<Self> {
        match s {
            "scheduled" => Some(Self::Scheduled),
            "started" => Some(Self::Started),
            "done" => Some(Self::Done),
            "rejected" => Some(Self::Rejected),
            _ => None,
        }
    }

    /// Whether nothing more will happen to the request (no timeout is owed).
    pub fn is_final(self) -> bool {
        matches!(self, Self::Done | Self::Rejected)
    }
}

/// A follow-up request changed state (sent, acknowledged, timed out, held back by cooldown or
/// budget); logged with its id, counted by rule and state.
#[derive(Debug)]
pub struct FollowupChanged<'a> {
    pub rule: &'a str,
    pub state: FollowupState,
    pub id: Option<&'a str>,
    pub field: Option<&'a str>,
    /// Since the request was sent.
    pub after_ms: Option<u64>,
    /// The rule's metric value that fired it, and over how many cells.
    pub value: Option<f64>,
    pub cells: Option<u64>,
    /// For a timeout: the last state acknowledged, and the configured limit.
    pub last_state: Option<FollowupState>,
    pub timeout_ms: Option<u64>,
    /// For a rejection: the bridge's reason, as it sent it (logged cut to 64 characters, never a
    /// metric label).
    pub reason: Option<&'a str>,
}

impl<'a> FollowupChanged<'a> {
    /// The event with only its rule and state; the caller fills in what it knows.
    pub fn new(rule: &'a str, state: FollowupState) -> Self {
        Self {
            rule,
            state,
            id: None,
            field: None,
            after_ms: None,
            value: None,
            cells: None,
            last_state: None,
            timeout_ms: None,
            reason: None,
        }
    }

    pub fn emit(&self) {
        let (rule, state, id, field) = (self.rule, self.state.as_str(), self.id, self.field);
        match self.state {
            FollowupState::Requested => info!(
                rule,
                id,
                field,
                value = self.value,
                cells = self.cells,
                "follow-up requested"
            ),
            FollowupState::Scheduled | FollowupState::Started | FollowupState::Done => {
                info!(rule, state, id, after_ms = self.after_ms, "follow-up acknowledged")
            }
            FollowupState::Rejected => warn!(
                rule,
                id,
                reason = self.reason.map(|r| r.chars().take(64).collect::<String>()),
                after_ms = self.after_ms,
                "follow-up rejected by the bridge"
            ),
            FollowupState::Timeout => warn!(
                rule,
                id,
                last_state = self.last_state.map(FollowupState::as_str),
                after_ms = self.after_ms,
                timeout_ms = self.timeout_ms,
                "follow-up request not done within its timeout"
            ),
            FollowupState::Suppressed => debug!(rule, field, "follow-up held back by the rule's cooldown"),
            FollowupState::OverBudget => warn!(rule, field, "follow-up budget of the plate used up"),
        }
        counter!(FOLLOWUPS, "rule" => self.rule.to_string(), "state" => state).increment(1);
    }
}

/// A follow-up ack from the network was not understood; logged, counted by reason, ignored.
#[derive(Debug)]
pub struct FollowupAckRejected<'a> {
    pub reason: &'static str,
    pub detail: &'a str,
    /// What the ack said, cut to 64 characters (it comes from the network).
    pub id: Option<&'a str>,
    pub state: Option<&'a str>,
}

impl FollowupAckRejected<'_> {
    pub fn emit(&self) {
        let cut = |s: Option<&str>| s.map(|s| s.chars().take(64).collect::<String>());
        warn!(
            reason = self.reason,
            id = cut(self.id),
            state = cut(self.state),
            "follow-up ack ignored: {}",
            self.detail
        );
        counter!(FOLLOWUP_ACKS_REJECTED, "reason" => self.reason).increment(1);
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

/// The closed loop is on: where its requests go.
#[derive(Debug)]
pub struct ClosedLoopOn<'a> {
    pub rules: usize,
    pub key: &'a str,
}

impl ClosedLoopOn<'_> {
    pub fn emit(&self) {
        info!(rules = self.rules, key = self.key, "closed loop on");
    }
}

/// A field the microscope took because of a follow-up request arrived.
#[derive(Debug)]
pub struct FollowupFieldReceived<'a> {
    pub id: &'a str,
    pub field: &'a str,
}

impl FollowupFieldReceived<'_> {
    pub fn emit(&self) {
        info!(followup_id = self.id, field = self.field, "follow-up field received");
    }
}

/// A rule asking for more fields fired but they cannot be placed (no stage position, or no
/// field numbers left in the well).
#[derive(Debug)]
pub struct FollowupUnplaceable<'a> {
    pub rule: &'a str,
    pub field: &'a str,
    pub why: &'a str,
}

impl FollowupUnplaceable<'_> {
    pub fn emit(&self) {
        warn!(
            rule = self.rule,
            field = self.field,
            "{}: cannot place more fields",
            self.why
        );
    }
}

/// The run ended with follow-up requests the microscope never reported done.
#[derive(Debug)]
pub struct FollowupsOpenAtEnd<'a> {
    pub ids: &'a [&'a String],
}

impl FollowupsOpenAtEnd<'_> {
    pub fn emit(&self) {
        warn!(requests = ?self.ids, "follow-up requests not done when the run ended");
    }
}

/// The daemon's zenoh session is open: its id (what access-control rules and peers see), the
/// locators it listens on, and the zenoh configuration file it loaded.
#[derive(Debug)]
pub struct ZenohOpened<'a> {
    pub zid: &'a str,
    pub mode: &'a str,
    pub listening: &'a str,
    pub config_file: Option<&'a str>,
}

impl ZenohOpened<'_> {
    pub fn emit(&self) {
        info!(
            zid = self.zid,
            mode = self.mode,
            listening = self.listening,
            config_file = self.config_file.unwrap_or("none"),
            "zenoh session open"
        );
    }
}

/// The zenoh session can be reached from other hosts (a non-loopback endpoint, listened on or
/// connected to, or multicast scouting) and `zenoh.config_file` adds neither access control,
/// user/password authentication, nor mutual TLS on every such endpoint: anyone on the network
/// could publish frames or follow-up acks. Logged once at start.
#[derive(Debug)]
pub struct ZenohExposed<'a> {
    /// The non-local endpoints, listened on or connected to.
    pub endpoints: &'a str,
    pub multicast_scouting: bool,
}

impl ZenohExposed<'_> {
    pub fn emit(&self) {
        warn!(
            endpoints = self.endpoints,
            multicast_scouting = self.multicast_scouting,
            "zenoh is reachable from the network without TLS, authentication or access control; \
             set zenoh.config_file (docs/SECURITY.md)"
        );
    }
}

/// The zenoh source subscribed to its frames.
#[derive(Debug)]
pub struct SourceListening<'a> {
    pub key: &'a str,
}

impl SourceListening<'_> {
    pub fn emit(&self) {
        info!(key = self.key, "listening for frames");
    }
}

/// At the end of a zenoh-fed run: how long frames took from acquisition to arrival (for frames
/// whose header carries the acquisition time) and the ingest rate.
#[derive(Debug)]
pub struct FrameTransit {
    pub frames: u64,
    pub ingest_mb_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl FrameTransit {
    pub fn emit(&self) {
        info!(
            frames = self.frames,
            ingest_mb_s = self.ingest_mb_s,
            p50_ms = self.p50_ms,
            p99_ms = self.p99_ms,
            max_ms = self.max_ms,
            "frame transit (acquired_unix_ns in the header to arrival)"
        );
    }
}

/// The acquisition bridge left during the run and had not come back when it ended.
#[derive(Debug)]
pub struct BridgeGoneAtEnd<'a> {
    pub key: &'a str,
}

impl BridgeGoneAtEnd<'_> {
    pub fn emit(&self) {
        warn!(
            key = self.key,
            "the acquisition bridge left and did not come back: the plate may be incomplete"
        );
    }
}

/// Something `liveomics segment` noticed about its input that the user should know.
#[derive(Debug)]
pub struct SegmentNote<'a> {
    pub note: &'a str,
}

impl SegmentNote<'_> {
    pub fn emit(&self) {
        warn!("{}", self.note);
    }
}
