//! The one place where liveomics logs and counts. Every internal event is a struct whose `emit`
//! writes the log line and updates the metric together, so the two never disagree. Metric names
//! are the constants below and are documented in `docs/METRICS.md`. The library crates
//! (`liveomics-models`, `-adapters`, `-kernels`) log at debug level only, for their own
//! debugging; whatever an operator needs from them reaches this module as data (a model's
//! provider and skipped providers, a source's rejected inputs).

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing::{debug, error, info, warn};

use serde::{Deserialize, Serialize};

mod closed_loop;
mod cluster;
mod localization;
mod models;
mod network;
mod pipeline;
mod schedule;

pub use closed_loop::*;
pub use cluster::*;
pub use localization::*;
pub use models::*;
pub use network::*;
pub use pipeline::*;
pub use schedule::*;

pub const FRAMES_IN: &str = "liveomics_frames_in_total";
pub const FRAMES_REJECTED: &str = "liveomics_frames_rejected_total";
pub const CPU_US: &str = "liveomics_cpu_microseconds_total";
pub const FRAMES_LOST: &str = "liveomics_frames_lost_total";
pub const FRAMES_RESENT: &str = "liveomics_frames_resent_total";
pub const INPUTS_REJECTED: &str = "liveomics_inputs_rejected_total";
pub const INPUTS_RECOVERED: &str = "liveomics_inputs_recovered_total";
pub const FIELDS_ASSEMBLED: &str = "liveomics_fields_assembled_total";
pub const FIELDS_INCOMPLETE: &str = "liveomics_fields_incomplete_total";
pub const FIELDS_DONE: &str = "liveomics_fields_done_total";
pub const FIELDS_UNVERIFIED: &str = "liveomics_fields_unverified_total";
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
pub const SEGMENT_METHOD_INFO: &str = "liveomics_segment_method_info";
pub const FOLLOWUPS: &str = "liveomics_followups_total";
pub const FOLLOWUP_ACKS_REJECTED: &str = "liveomics_followup_acks_rejected_total";
pub const DEGRADED: &str = "liveomics_work_deferred_total";
pub const BACKFILLED: &str = "liveomics_fields_backfilled_total";
pub const LAGGED: &str = "liveomics_fields_lagged_total";
pub const BACKFILL_LOST: &str = "liveomics_backfill_failures_total";
pub const BACKLOG_FIELDS: &str = "liveomics_backlog_fields";
pub const BACKLOG_AGE_SECONDS: &str = "liveomics_backlog_oldest_seconds";
pub const REQUIRED_LATENCY_SECONDS: &str = "liveomics_required_latency_seconds";
pub const REQUIRED_MISSES: &str = "liveomics_required_deadline_misses_total";
pub const WELL_RELOCALIZATION: &str = "liveomics_well_relocalization_shift";
pub const CLUSTER_MEMBERS: &str = "liveomics_cluster_members";
pub const CLUSTER_HANDOFF_FIELDS: &str = "liveomics_cluster_handoff_fields_total";
pub const CLUSTER_BUFFER_EVICTED: &str = "liveomics_cluster_buffer_evicted_total";
pub const CLUSTER_FRAMES_PASSED: &str = "liveomics_cluster_frames_passed_total";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Address of the daemon's HTTP server: `/metrics`, the live plate page at `/`, and the plate
    /// store for viewers under `/zarr/` (docs/OUTPUT.md); port 0 picks a free port (logged);
    /// empty disables it. Localhost by default: none of it is for the whole network. Also read
    /// under its former name, `metrics_listen`.
    #[serde(alias = "metrics_listen")]
    pub http_listen: String,
    pub log_format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `liveomics=debug`; `RUST_LOG` overrides it.
    pub log_level: String,
}

impl TelemetryConfig {
    /// Checks of the section's values, keyed under it.
    pub fn validate(&self) -> Vec<liveomics_adapters::Invalid> {
        use liveomics_adapters::Invalid;
        let mut out = Vec::new();
        if !self.http_listen.is_empty() && self.http_listen.parse::<SocketAddr>().is_err() {
            out.push(Invalid::new(
                "http_listen",
                format!(
                    "{:?} is not an address like 127.0.0.1:9464 (empty disables)",
                    self.http_listen
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
            http_listen: "127.0.0.1:9464".into(),
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
    // ONNX Runtime logs every arena allocation at info: only its warnings, unless asked for.
    let mentions_ort = |f: &str| f.split(',').any(|d| d.trim_start().starts_with("ort"));
    let asked = std::env::var("RUST_LOG").is_ok_and(|v| mentions_ort(&v)) || mentions_ort(&cfg.log_level);
    let filter = match "ort=warn".parse() {
        Ok(d) if !asked => filter.add_directive(d),
        _ => filter,
    };
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
    #[error("cannot install the metrics recorder")]
    Recorder(#[source] metrics_exporter_prometheus::BuildError),
}

/// The Prometheus recorder; the daemon's HTTP server (`web/`) renders it at `/metrics`.
#[derive(Debug)]
pub struct Metrics {
    handle: PrometheusHandle,
}

impl Metrics {
    pub fn install() -> Result<Self, TelemetryError> {
        // One recorder per process: a second run in the same process (tests, embedding) shares it,
        // and its endpoint serves the same registry. Built and installed under one lock, so two
        // runs starting together cannot each build one and serve the one not installed.
        static HANDLE: std::sync::Mutex<Option<PrometheusHandle>> = std::sync::Mutex::new(None);
        let mut slot = HANDLE.lock().unwrap_or_else(|e| e.into_inner());
        let handle = match slot.as_ref() {
            Some(h) => h.clone(),
            None => {
                let recorder = PrometheusBuilder::new()
                    .set_buckets(&[
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    ])
                    .map_err(TelemetryError::Recorder)?
                    .build_recorder();
                let handle = recorder.handle();
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
                *slot = Some(handle.clone());
                handle
            }
        };
        Ok(Self { handle })
    }

    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// What the HTTP server renders `/metrics` from.
    pub fn handle(&self) -> PrometheusHandle {
        self.handle.clone()
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(FRAMES_IN, "Frames received from the source, by channel");
    describe_counter!(FRAMES_REJECTED, "Frames rejected at assembly, by reason");
    describe_counter!(
        CPU_US,
        "Processor time spent by each part of the pipeline's own threads (stage-*, sink-*, worker, source, assembly, tracker, backfill), in microseconds"
    );
    describe_counter!(
        FRAMES_LOST,
        "Frames a publisher numbered and sent that never arrived (gaps in its sequence numbers)"
    );
    describe_counter!(
        FRAMES_RESENT,
        "Frames found missing that the publisher sent again when asked"
    );
    describe_counter!(
        INPUTS_REJECTED,
        "Source inputs (files) skipped, by reason; each is logged with its name"
    );
    describe_counter!(
        INPUTS_RECOVERED,
        "Source inputs (files) read late or despite a doubt, by reason; each is logged with its name"
    );
    describe_counter!(FIELDS_ASSEMBLED, "Fields assembled (complete or not)");
    describe_counter!(
        FIELDS_INCOMPLETE,
        "Fields passed on with missing channels after the assembly timeout"
    );
    describe_counter!(FIELDS_DONE, "Fields written by every sink");
    describe_counter!(
        FIELDS_UNVERIFIED,
        "Fields a resumed plate listed that failed verification and are redone, by the part that failed"
    );
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
        SEGMENT_METHOD_INFO,
        "1 for the segmentation method the segment stage runs (auto resolves to instanseg or classical)"
    );
    describe_gauge!(
        WELL_RELOCALIZATION,
        "Relocalization score (z against the permutation null over control fields) by protein and well, after the well's latest field"
    );
    describe_gauge!(
        MODEL_INFO,
        "1 per loaded model, labelled with its role and the execution provider it runs on"
    );
}

/// `outer: cause: root cause`, the way an operator needs to read it.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    liveomics_models::error::chain(e)
}
