//! A sender that never completes its fields cannot fill the daemon's memory: assembly passes the
//! oldest on, flagged incomplete, once the partial fields hold `pipeline.max_pending_mb`. (Its own
//! test binary: the metrics registry is per process, and bad_frames.rs counts incomplete fields.)

use crate::common;

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crossbeam_channel::Sender;
use liveomics::pipeline::{run_source, RunOptions};
use liveomics_adapters::model::{AcquisitionPlan, Frame, Pixels};
use liveomics_adapters::simulator::Simulator;
use liveomics_adapters::source::{Source, SourceError, SourceReport, StopToken};

/// Sends only the first channel of many fields, then waits for the first of them to be written
/// before it ends: assembly must pass the oldest on at `pipeline.max_pending_mb` instead of
/// holding every partial field until the (long) assembly timeout.
struct PartialSource {
    sim: Simulator,
    plan: AcquisitionPlan,
    fields: u32,
    written: std::path::PathBuf,
    seen_while_running: Arc<std::sync::atomic::AtomicBool>,
}

impl Source for PartialSource {
    fn plan(&self) -> &AcquisitionPlan {
        &self.plan
    }

    fn run(&mut self, out: &Sender<Frame>, _stop: &StopToken) -> Result<SourceReport, SourceError> {
        let mut report = SourceReport::default();
        let well = self.plan.wells[0];
        for field in 0..self.fields {
            let sf = self.sim.render(well, field, 0);
            let frame = Frame {
                key: sf.key.clone(),
                channel: 0,
                width: self.plan.width,
                height: self.plan.height,
                pixels: Pixels::U16(Arc::from(sf.channels[0].clone())),
                acquired_at: SystemTime::now(),
                received_at: Instant::now(),
                origin: Default::default(),
            };
            out.send(frame).map_err(|_| SourceError::Disconnected)?;
            report.frames += 1;
            report.fields += 1;
        }
        let until = Instant::now() + std::time::Duration::from_secs(20);
        while Instant::now() < until {
            if self.written.exists() {
                self.seen_while_running.store(true, std::sync::atomic::Ordering::SeqCst);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(report)
    }
}

#[test]
fn partial_fields_beyond_the_pending_cap_go_on_incomplete_while_intake_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 1024² frames are 2 MiB each: a 5 MiB cap holds two partial fields.
    let sim_cfg = common::plate("partial", &["A1"], 6, 1024);
    let sim = Simulator::new(sim_cfg.clone()).expect("simulator");
    let plan = sim.plan().clone();
    let mut cfg = common::run_config(&sim_cfg, dir.path());
    cfg.pipeline.assembly_timeout_ms = 600_000;
    cfg.pipeline.max_pending_mb = 5;
    let seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let source = PartialSource {
        sim,
        plan,
        fields: 6,
        written: dir.path().join("partial.zarr/A/1/0/zarr.json"),
        seen_while_running: Arc::clone(&seen),
    };
    let summary = run_source(&cfg, Box::new(source), RunOptions::default()).expect("run");
    assert!(
        seen.load(std::sync::atomic::Ordering::SeqCst),
        "field 0 was not written while the source was still running"
    );
    assert_eq!(summary.fields_done, 6);
    assert_eq!(summary.fields_incomplete, 6);
}
