//! The liveomics daemon as a library: configuration, the registry of sources/stages/sinks, the
//! pipeline that connects them, and telemetry. `main.rs` is a thin CLI over this.

pub mod assembly;
pub mod bench;
pub mod cluster;
pub mod component;
pub mod config;
pub mod cpu;
pub mod doctor;
pub mod field;
pub mod inference;
pub mod live;
pub mod localize;
pub mod pipeline;
pub mod registry;
pub mod replay;
pub mod resources;
pub mod schedule;
pub mod segment_cli;
pub mod simulate;
pub mod sink;
pub mod stage;
pub mod telemetry;
pub mod web;
pub mod zenoh_session;
pub mod zenoh_source;
