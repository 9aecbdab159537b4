//! The sink extension point: where finished fields go. Each sink runs on its own thread behind
//! its own bounded queue, so a slow sink slows the pipeline (backpressure) instead of losing data.

pub mod cells_arrow;
pub mod followup;
pub mod zarr;
pub mod zenoh;

use crate::stage::FieldWork;

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

/// A destination for processed fields.
pub trait Sink: Send {
    fn name(&self) -> &'static str;
    /// Writes one field. Called from the sink's own thread, one field at a time.
    fn write(&mut self, work: &FieldWork) -> Result<(), SinkError>;
    /// Fields this sink already holds from an earlier run (resume); the source skips them.
    fn completed(&self) -> Vec<liveomics_adapters::model::FieldKey> {
        Vec::new()
    }
    /// Called once after the last field: flush and release.
    fn finish(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}
