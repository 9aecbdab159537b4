//! Acquisition for liveomics: the data model (plate, well, field, channel, frame) and the sources
//! that produce frames. Sources know nothing of the pipeline beyond a bounded channel.

pub mod folder;
pub mod model;
pub mod plate_spec;
pub mod simulator;
pub mod source;
pub mod tiff_io;

use std::fmt;

/// One problem in a configuration section, with the key it is about (relative to the section; the
/// daemon prefixes the section's own path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub key: String,
    pub message: String,
}

impl Invalid {
    pub fn new(key: &str, message: impl Into<String>) -> Self {
        Self {
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// The same problem seen from an enclosing section.
    pub fn under(mut self, prefix: &str) -> Self {
        self.key = if self.key.is_empty() {
            prefix.to_string()
        } else {
            format!("{prefix}.{}", self.key)
        };
        self
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}
