//! The jsonl sink through a real pipeline run: one line per field, with what the stages measured.

#![allow(clippy::unwrap_used)] // a test that cannot read its own output should stop there

use std::path::Path;
use std::sync::{Arc, Mutex};

use liveomics::component::{Sink, SinkError};
use liveomics::config::Config;
use liveomics::field::FieldWork;
use liveomics::pipeline::{run, RunOptions};
use liveomics::sink::jsonl::JsonlSinkConfig;
use serde_json::Value;

use liveomics_adapters::simulator::SimulatorConfig;

/// Records what the pipeline handed to the sinks, to check the lines against.
struct Seen(Arc<Mutex<Vec<(String, usize, f64)>>>);

impl Sink for Seen {
    fn name(&self) -> &'static str {
        "seen"
    }

    fn write(&mut self, work: &FieldWork) -> Result<(), SinkError> {
        let areas: Vec<f64> = work.records.iter().map(|r| r.area_px as f64).collect();
        let mean = areas.iter().sum::<f64>() / areas.len().max(1) as f64;
        let name = format!("{}/{}", work.field.key.well, work.field.key.field);
        self.0.lock().unwrap().push((name, work.records.len(), mean));
        Ok(())
    }
}

fn config(dir: &Path) -> Config {
    let mut cfg = Config::default();
    cfg.source.simulator = SimulatorConfig {
        plate: "J1".into(),
        wells: vec!["A1".into(), "B2".into()],
        control_wells: vec![],
        fields_per_well: 2,
        width_px: 192,
        height_px: 192,
        ..Default::default()
    };
    cfg.sinks.zarr.enabled = false;
    cfg.sinks.zenoh.enabled = false;
    cfg.sinks.jsonl = JsonlSinkConfig {
        enabled: true,
        path: dir.join("sub/fields.jsonl"),
    };
    cfg.telemetry.http_listen = String::new();
    cfg
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn one_line_per_field_with_what_the_pipeline_measured() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let opts = RunOptions {
        extra_sinks: vec![Box::new(Seen(seen.clone()))],
        ..Default::default()
    };
    let summary = run(&cfg, opts).unwrap();
    assert_eq!(summary.sinks, ["jsonl", "seen"]);
    let got = lines(&cfg.sinks.jsonl.path);
    let seen = seen.lock().unwrap();
    assert_eq!(got.len(), 4);
    assert_eq!(seen.len(), 4);
    for (name, cells, mean_area) in seen.iter() {
        let line = got
            .iter()
            .find(|l| format!("{}/{}", l["well"].as_str().unwrap(), l["field"]) == *name)
            .unwrap_or_else(|| panic!("no line for {name}: {got:?}"));
        assert_eq!(line["plate"], "J1");
        assert_eq!(line["cells"].as_u64().unwrap() as usize, *cells);
        assert!(*cells > 0, "{line}");
        let area = line["means"]["area_px"].as_f64().unwrap();
        assert!((area - mean_area).abs() < 1e-6, "{area} vs {mean_area}");
        assert!(line["means"]["mean_dapi"].as_f64().unwrap() > 0.0, "{line}");
        assert_eq!(line["incomplete"], false);
    }
}

#[test]
fn a_second_run_appends_and_overwrite_starts_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.source.simulator.wells = vec!["C3".into()];
    cfg.source.simulator.fields_per_well = 1;
    run(&cfg, RunOptions::default()).unwrap();
    run(&cfg, RunOptions::default()).unwrap();
    assert_eq!(lines(&cfg.sinks.jsonl.path).len(), 2);
    let opts = RunOptions {
        overwrite: true,
        ..Default::default()
    };
    run(&cfg, opts).unwrap();
    assert_eq!(lines(&cfg.sinks.jsonl.path).len(), 1);
}

#[test]
fn a_path_that_is_a_directory_is_a_config_error_under_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.sinks.jsonl.path = dir.path().to_path_buf();
    let errs = liveomics::registry::validate(&cfg, &Default::default());
    assert!(errs.iter().any(|e| e.key == "sinks.jsonl.path"), "{errs:?}");
}
