//! The plate page's sink: every field, as it is written, updates what the page shows
//! ([`crate::live::Live`]) and its subscribers. Attached by the pipeline when the HTTP server
//! runs; not configured on its own.

use std::sync::Arc;

use crate::component::{Sink, SinkError};
use crate::field::FieldWork;
use crate::live::Live;

/// See the module docs.
#[derive(Debug)]
pub struct LiveSink(pub Arc<Live>);

impl Sink for LiveSink {
    fn name(&self) -> &'static str {
        "page"
    }

    fn write(&mut self, work: &FieldWork) -> Result<(), SinkError> {
        self.0.field(work);
        Ok(())
    }
}
