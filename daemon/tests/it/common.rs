//! Shared by the daemon's integration tests: a small simulated plate and a run config around it.

#![allow(dead_code)]

use liveomics::config::Config;
use liveomics_adapters::simulator::SimulatorConfig;

/// A simulated plate of `wells` (no controls) with `fields` fields of `px`² each.
pub fn plate(name: &str, wells: &[&str], fields: u32, px: u32) -> SimulatorConfig {
    SimulatorConfig {
        plate: name.into(),
        wells: wells.iter().map(|w| w.to_string()).collect(),
        control_wells: vec![],
        fields_per_well: fields,
        width_px: px,
        height_px: px,
        ..Default::default()
    }
}

/// A run of `sim` that writes OME-Zarr under `out`, with zenoh and the metrics endpoint off:
/// tests change what they exercise on top of it.
pub fn run_config(sim: &SimulatorConfig, out: &std::path::Path) -> Config {
    let mut cfg = Config::default();
    cfg.source.simulator = sim.clone();
    cfg.sinks.zenoh.enabled = false;
    cfg.sinks.zarr.output = out.to_path_buf();
    cfg.telemetry.http_listen = String::new();
    // The tests exercise the pipeline, not a model: the classical path, whatever is installed.
    cfg.segmentation.method = liveomics::stage::SegmentMethod::Classical;
    cfg
}
