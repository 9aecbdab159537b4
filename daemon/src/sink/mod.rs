//! The sinks, registered in one place: each sink is its module plus one line in `SinksConfig`
//! (its section under `[sinks]`) and one in `SinksConfig::all` (its name and the order sinks
//! open in). What a sink is and what its section must do is `crate::component`'s `Sink` and
//! `SinkConfig`; the closed-loop sink's section is `[closed_loop]`, outside `[sinks]`.

pub mod cells_arrow;
pub mod followup;
pub mod jsonl;
pub mod live;
pub mod zarr;
pub mod zenoh;

use serde::{Deserialize, Serialize};

use crate::component::SinkConfig;

/// `[sinks]`: one section per sink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SinksConfig {
    pub zarr: zarr::ZarrSinkConfig,
    pub zenoh: zenoh::ZenohSinkConfig,
    pub jsonl: jsonl::JsonlSinkConfig,
}

impl SinksConfig {
    /// Every sink under `[sinks]` by name (its section is `sinks.{name}`), in the order they open.
    pub fn all(&self) -> Vec<(&'static str, &dyn SinkConfig)> {
        vec![("zarr", &self.zarr), ("zenoh", &self.zenoh), ("jsonl", &self.jsonl)]
    }
}
