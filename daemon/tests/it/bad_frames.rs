//! Malformed input reaches the pipeline: each bad frame is rejected, logged and counted, a field
//! with a missing channel is passed on after the assembly timeout, channels out of order are
//! assembled, and the daemon keeps going.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::common;
use crossbeam_channel::Sender;

use liveomics::pipeline::{run_source, RunOptions};
use liveomics_adapters::model::{AcquisitionPlan, Frame, Pixels};
use liveomics_adapters::simulator::Simulator;
use liveomics_adapters::source::{Source, SourceError, SourceReport, StopToken};

/// Replays simulated fields with deliberate faults mixed in.
struct FaultySource {
    sim: Simulator,
    plan: AcquisitionPlan,
}

impl Source for FaultySource {
    fn plan(&self) -> &AcquisitionPlan {
        &self.plan
    }

    fn run(&mut self, out: &Sender<Frame>, _stop: &StopToken) -> Result<SourceReport, SourceError> {
        let mut report = SourceReport::default();
        let well = self.plan.wells[0];
        let mut send = |f: Frame| {
            out.send(f).map_err(|_| SourceError::Disconnected)?;
            report.frames += 1;
            Ok::<_, SourceError>(())
        };
        let key0 = self.sim.render(well, 0, 0).key;
        let frame = |field: u32, c: usize, px: Pixels, w: usize, h: usize| Frame {
            key: key0.clone().with_field(field),
            channel: c,
            width: w,
            height: h,
            pixels: px,
            acquired_at: SystemTime::now(),
            received_at: Instant::now(),
            origin: Default::default(),
        };
        let (w, h) = (self.plan.width, self.plan.height);
        for field in 0..3u32 {
            let sf = self.sim.render(well, field, 0);
            let mut channels: Vec<(usize, Vec<u16>)> = sf.channels.into_iter().enumerate().collect();
            // Field 2 arrives with its channels in reverse order.
            if field == 2 {
                channels.reverse();
            }
            for (c, px) in channels {
                // Field 1 never gets its last channel: it must still be written, flagged incomplete.
                if field == 1 && c == self.plan.channels.len() - 1 {
                    continue;
                }
                send(frame(field, c, Pixels::U16(Arc::from(px.clone())), w, h))?;
                if field == 0 && c == 0 {
                    send(frame(field, c, Pixels::U16(Arc::from(px)), w, h))?; // duplicate
                    send(frame(field, 1, Pixels::U16(Arc::from(vec![0u16; 10])), w, h))?; // byte count
                    send(frame(field, 1, Pixels::U16(Arc::from(vec![0u16; 64 * 64])), 64, 64))?; // shape
                    send(frame(field, 1, Pixels::F32(Arc::from(vec![0f32; w * h])), w, h))?; // dtype
                    send(frame(field, 99, Pixels::U16(Arc::from(vec![0u16; w * h])), w, h))?;
                    // channel
                }
            }
            report.fields += 1;
        }
        Ok(report)
    }
}

trait WithField {
    fn with_field(self, field: u32) -> Self;
}

impl WithField for liveomics_adapters::model::FieldKey {
    fn with_field(mut self, field: u32) -> Self {
        self.field = field;
        self
    }
}

fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send request");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("read metrics");
    body
}

#[test]
fn bad_frames_are_rejected_counted_and_the_run_continues() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sim_cfg = common::plate("faulty", &["A1"], 2, 256);
    let sim = Simulator::new(sim_cfg.clone()).expect("simulator");
    let plan = sim.plan().clone();
    let mut cfg = common::run_config(&sim_cfg, dir.path());
    cfg.pipeline.assembly_timeout_ms = 200;
    cfg.telemetry.http_listen = "127.0.0.1:0".into();
    let summary = run_source(&cfg, Box::new(FaultySource { sim, plan }), RunOptions::default()).expect("run");
    assert_eq!(
        summary.frames_rejected, 5,
        "duplicate, byte count, shape, dtype, channel"
    );
    assert_eq!(summary.fields_done, 3);
    assert_eq!(summary.fields_incomplete, 1);
    assert_eq!(summary.fields_failed, 0);
    assert!(summary.cells > 5);
    let plate = dir.path().join("faulty.zarr");
    let well: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(plate.join("A/1/zarr.json")).expect("well metadata"))
            .expect("json");
    assert_eq!(
        well["attributes"]["ome"]["well"]["images"].as_array().map(|a| a.len()),
        Some(3)
    );
    let metrics = scrape(summary.metrics_addr.expect("metrics address"));
    for reason in ["duplicate", "shape", "dtype", "channel"] {
        assert!(
            metrics.contains(&format!("liveomics_frames_rejected_total{{reason=\"{reason}\"}}")),
            "{reason} missing from metrics:\n{metrics}"
        );
    }
    assert!(metrics.contains("liveomics_fields_incomplete_total 1"), "{metrics}");
}
