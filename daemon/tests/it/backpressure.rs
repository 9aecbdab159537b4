//! A slow sink slows the source down; no field is lost and none is written twice.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common;

use liveomics::component::{Sink, SinkError};
use liveomics::field::FieldWork;
use liveomics::pipeline::{run, RunOptions};
use liveomics_adapters::simulator::SimulatorConfig;

/// Takes 150 ms per field and remembers what it saw.
struct SlowSink {
    seen: Arc<Mutex<Vec<String>>>,
}

impl Sink for SlowSink {
    fn name(&self) -> &'static str {
        "slow"
    }

    fn write(&mut self, work: &FieldWork) -> Result<(), SinkError> {
        std::thread::sleep(Duration::from_millis(150));
        self.seen
            .lock()
            .map_err(|_| SinkError::Config("the test sink's lock is poisoned".into()))?
            .push(work.name.clone());
        Ok(())
    }
}

#[test]
fn slow_sink_blocks_the_source_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = SimulatorConfig {
        rate_fields_per_s: 0.0,
        ..common::plate("slow", &["A1", "A2"], 8, 128)
    };
    let mut cfg = common::run_config(&sim, dir.path());
    cfg.pipeline.frame_queue = 2;
    cfg.pipeline.field_queue = 1;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let opts = RunOptions {
        extra_sinks: vec![Box::new(SlowSink { seen: seen.clone() })],
        ..Default::default()
    };
    let summary = run(&cfg, opts).expect("run");
    assert_eq!(summary.source.fields, 16);
    assert_eq!(summary.fields_done, 16);
    assert_eq!(summary.frames_rejected, 0);
    // 16 fields × 150 ms (2.4 s) through queues holding about five fields: the source waits.
    assert!(
        summary.source.blocked > Duration::from_millis(1000),
        "source blocked only {:?}",
        summary.source.blocked
    );
    let seen = seen.lock().expect("lock").clone();
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(seen.len(), 16);
    assert_eq!(unique.len(), 16, "no field twice");
}
