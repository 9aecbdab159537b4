//! The extension points: what a source, a stage and a sink are at run time (`Stage`, `Sink`;
//! sources are `liveomics_adapters::source::Source`), and what their configuration sections
//! must do (`SourceConfig`, `StageConfig`, `SinkConfig`): check their own values and build their
//! component from their own section plus the [`Context`]. A component sees no other section:
//! what it needs from the rest of the run comes through the context, so components depend on
//! this module and never on the config that composes them (`config.rs`) or on each other.

use std::sync::Arc;

use liveomics_adapters::model::{AcquisitionPlan, FieldKey};
use liveomics_adapters::source::{Source, SourceError};
use liveomics_adapters::Invalid;
use liveomics_kernels::gpu::{Compute, DeviceRequest};
use serde::{Deserialize, Serialize};

use crate::field::FieldWork;
use crate::inference::config::InferenceConfig;
use crate::localize::config::LocalizationConfig;
use crate::resources::Resources;
use crate::zenoh_session::ZenohConfig;

/// What every component may read besides its own section. Built by the registry for each
/// component, with `section` set to where that component's section sits in the file.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The component's own section (`sinks.zarr`, `segmentation`, `source.folder`): every key a
    /// component reports is under it ([`Context::key`]), so keys come from nesting.
    pub section: &'a str,
    /// The instrument's name: the second chunk of every zenoh key.
    pub instrument: &'a str,
    /// The stages that run, in order.
    pub stages: &'a [StageName],
    /// Where the image kernels run (`compute.device`).
    pub device: DeviceRequest,
    /// The models and how they run: the inference stage runs them, the segment stage may take
    /// one as its probability model, and closed-loop rules name their outputs.
    pub inference: &'a InferenceConfig,
    /// What the `localize` stage profiles: closed-loop rules may name its columns and scores.
    pub localization: &'a LocalizationConfig,
    /// The model the segment stage runs itself (`segmentation.probability_model`; empty for
    /// none), which the inference stage leaves out.
    pub probability_model: &'a str,
    /// The one zenoh session's settings.
    pub zenoh: &'a ZenohConfig,
    /// What the components of a run share (compute back end, model sessions, zenoh session).
    pub resources: &'a Resources,
    /// Replace an existing output (`--overwrite`); not configuration.
    pub overwrite: bool,
    /// The latency budget per field (`latency_budget_ms`).
    pub budget_ms: u64,
    /// How fast the source offers fields, when it has a pace of its own (a simulated microscope):
    /// with the budget, what `segmentation.method = "auto"` must sustain.
    pub pace_fields_per_s: Option<f64>,
}

impl<'a> Context<'a> {
    /// The full key of `rel`, a key of the component's own section.
    pub fn key(&self, rel: &str) -> String {
        match (self.section.is_empty(), rel.is_empty()) {
            (true, _) => rel.to_string(),
            (false, true) => self.section.to_string(),
            (false, false) => format!("{}.{rel}", self.section),
        }
    }

    /// A problem with `rel`, a key of the component's own section.
    pub fn invalid(&self, rel: &str, message: impl Into<String>) -> Invalid {
        Invalid::new(&self.key(rel), message)
    }

    /// The same context for the component whose section is `section`.
    pub fn at(&self, section: &'a str) -> Self {
        Self { section, ..*self }
    }

    /// The compute back end (opened once per run and shared); a failure is about
    /// `compute.device`, not about the component asking.
    pub fn compute(&self) -> Result<Compute, Invalid> {
        self.resources.compute(self.device).map(|(c, _)| c)
    }

    pub fn runs(&self, stage: StageName) -> bool {
        self.stages.contains(&stage)
    }

    /// Whether `first` and `then` both run, `first` earlier: a stage reads what earlier stages
    /// added to the field, and nothing of later ones.
    pub fn runs_before(&self, first: StageName, then: StageName) -> bool {
        let pos = |s: StageName| self.stages.iter().position(|x| *x == s);
        matches!((pos(first), pos(then)), (Some(a), Some(b)) if a < b)
    }
}

/// The stages the registry knows (`pipeline.stages`), so that an unknown name is an error at
/// load and the pipeline never compares strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageName {
    Segment,
    Measure,
    Inference,
    Localize,
}

impl StageName {
    pub const ALL: [StageName; 4] = [Self::Segment, Self::Measure, Self::Inference, Self::Localize];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Segment => "segment",
            Self::Measure => "measure",
            Self::Inference => "inference",
            Self::Localize => "localize",
        }
    }

    /// Stages that must run before this one.
    pub fn after(self) -> &'static [StageName] {
        match self {
            Self::Measure => &[Self::Segment],
            Self::Localize => &[Self::Measure],
            Self::Segment | Self::Inference => &[],
        }
    }

    /// Whether the stage runs the image kernels (and so opens `compute.device`).
    pub fn uses_compute(self) -> bool {
        matches!(self, Self::Segment | Self::Measure | Self::Localize)
    }
}

impl std::fmt::Display for StageName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The sources the registry knows (`source.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceName {
    Simulator,
    Folder,
    Replay,
    Zenoh,
}

impl SourceName {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Simulator => "simulator",
            Self::Folder => "folder",
            Self::Replay => "replay",
            Self::Zenoh => "zenoh",
        }
    }
}

/// A source's section.
pub trait SourceConfig {
    /// Checks of the section's values; every problem is pushed under its key.
    fn validate(&self, ctx: &Context, problems: &mut Vec<Invalid>);
    /// The source, ready to run (a zenoh source opens the session only when it starts running).
    fn build(&self, ctx: &Context) -> Result<Box<dyn Source>, SourceError>;
}

/// A stage's section.
pub trait StageConfig {
    /// Checks of the section's values that need no plan.
    fn validate(&self, _ctx: &Context, _problems: &mut Vec<Invalid>) {}
    /// The stage for one worker, checked against the plan (channel names exist, models fit);
    /// `Err` names every key that makes it impossible.
    fn build(&self, ctx: &Context, plan: &AcquisitionPlan) -> Result<Box<dyn Stage>, Vec<Invalid>>;
}

/// A sink's section.
pub trait SinkConfig {
    fn enabled(&self) -> bool;
    /// Checks of the section's values that need no plan.
    fn validate(&self, _ctx: &Context, _problems: &mut Vec<Invalid>) {}
    /// Checks against the plan the source will produce (channel names in rules, wells).
    fn validate_plan(&self, _ctx: &Context, _plan: &AcquisitionPlan, _problems: &mut Vec<Invalid>) {}
    /// Opens the sink before the first frame, so that an unusable output fails now.
    fn build(&self, ctx: &Context, plan: Arc<AcquisitionPlan>) -> Result<Box<dyn Sink>, SinkError>;
}

/// Why a stage could not process a field. The field still goes to the sinks with what it has:
/// raw pixels are never lost because analysis failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("channel {0:?} is missing from this field")]
    MissingChannel(String),
    #[error("model {0:?} is owed to this field but is not one of this run's [[inference.models]]")]
    NotConfigured(String),
    /// A column a cell-table model reads is absent: the model that produces it failed on this field.
    #[error("per-cell column {0:?} is missing from this field (the model that produces it failed)")]
    MissingColumn(String),
    #[error(transparent)]
    Kernel(#[from] liveomics_kernels::KernelError),
    #[error(transparent)]
    Gpu(#[from] liveomics_kernels::gpu::GpuError),
    #[error(transparent)]
    Model(Box<liveomics_models::ModelError>),
}

impl From<liveomics_models::ModelError> for StageError {
    fn from(e: liveomics_models::ModelError) -> Self {
        StageError::Model(Box::new(e))
    }
}

/// One processing step. Built once per worker (it may keep scratch buffers); it transforms a
/// field in place on that worker's thread.
pub trait Stage: Send {
    fn name(&self) -> StageName;
    fn process(&mut self, work: &mut FieldWork) -> Result<(), StageError>;
    /// Runs `models`, work that was skipped on this field when it was processed, for a backfill;
    /// a stage that skips nothing has nothing to do.
    fn run_owed(&mut self, _work: &mut FieldWork, _models: &[String]) -> Result<(), StageError> {
        Ok(())
    }
}

/// Sink failures. A failed field is logged and counted; the sink keeps serving later fields.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("output {path} is not usable")]
    Output {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds a different plate: {reason}; nothing was written (pass --overwrite to replace it)")]
    DifferentPlate { path: String, reason: String },
    #[error("invalid sink configuration: {0}")]
    Config(String),
    #[error(
        "{path} exists and is not a plate written by liveomics; nothing was written, and it is never \
         deleted, --overwrite or not: move it or choose another output"
    )]
    NotOurs { path: String },
    #[error(
        "{path} looks like a plate but its root metadata (zarr.json) is not readable JSON, so it \
         cannot be resumed or told to be liveomics' own; nothing was written, and it is never \
         deleted: repair or move it, or choose another output"
    )]
    UnreadableRoot { path: String },
    #[error("zarr store error at {path}")]
    Zarr {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("zenoh: {what}")]
    Zenoh {
        what: &'static str,
        #[source]
        source: ::zenoh::Error,
    },
    #[error(transparent)]
    Session(#[from] crate::zenoh_session::OpenError),
    #[error(transparent)]
    Kernel(#[from] liveomics_kernels::KernelError),
    #[error("cannot encode per-cell records")]
    Encode(#[source] arrow_schema::ArrowError),
}

/// Wraps a zenoh error with what the sink was doing, keeping it as the source.
pub(crate) fn zenoh_err(what: &'static str) -> impl FnOnce(::zenoh::Error) -> SinkError {
    move |source| SinkError::Zenoh { what, source }
}

impl SinkError {
    /// Storage failures (disk full, permissions, I/O) stop intake: acquiring more frames that
    /// cannot be kept would only lose them. Everything complete so far stays valid.
    pub fn stops_intake(&self) -> bool {
        matches!(self, SinkError::Output { .. } | SinkError::Zarr { .. })
    }
}

/// A destination for processed fields. Each sink runs on its own thread behind its own bounded
/// queue, so a slow sink slows the pipeline (backpressure) instead of losing data.
pub trait Sink: Send {
    fn name(&self) -> &'static str;
    /// Writes one field. Called from the sink's own thread, one field at a time.
    fn write(&mut self, work: &FieldWork) -> Result<(), SinkError>;
    /// Fields this sink already holds from an earlier run (resume); the source skips them.
    fn completed(&self) -> Vec<FieldKey> {
        Vec::new()
    }
    /// Where this sink keeps the plate on disk, if it does (the run's summary prints it).
    fn output(&self) -> Option<std::path::PathBuf> {
        None
    }
    /// Called once after the last field: flush and release.
    fn finish(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// Settings held as their text form in the file and as a type in memory (`compute.device`).
pub mod as_text {
    use std::fmt::Display;
    use std::str::FromStr;

    pub fn serialize<T: Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: serde::Deserializer<'de>,
    {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
