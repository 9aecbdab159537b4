//! The sink extension point: where finished fields go. Each sink runs on its own thread behind
//! its own bounded queue, so a slow sink slows the pipeline (backpressure) instead of losing data.

pub mod cells_arrow;
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
    #[error("plate {path} already exists; pass --overwrite to replace it")]
    Exists { path: String },
    #[error("zarr store error at {path}")]
    Zarr {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("zenoh: {0}")]
    Zenoh(String),
    #[error("cannot encode per-cell records")]
    Encode(#[source] arrow_schema::ArrowError),
}

/// A destination for processed fields.
pub trait Sink: Send {
    fn name(&self) -> &'static str;
    /// Writes one field. Called from the sink's own thread, one field at a time.
    fn write(&mut self, work: &FieldWork) -> Result<(), SinkError>;
    /// Called once after the last field: flush and release.
    fn finish(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}
