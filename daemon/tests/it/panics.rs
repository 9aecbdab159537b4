//! A thread that panics does not leave the others running: `run` joins every thread, collects
//! their results and only then reports the panic, so the other sinks have received and finished
//! every field.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use liveomics::component::{Sink, SinkError};
use liveomics::field::FieldWork;
use liveomics::pipeline::{run, RunError, RunOptions};

use crate::common;

use crate::models_common;

/// Panics on its second field.
struct Panics(usize);

impl Sink for Panics {
    fn name(&self) -> &'static str {
        "panics"
    }

    fn write(&mut self, _work: &FieldWork) -> Result<(), SinkError> {
        self.0 += 1;
        assert!(self.0 < 2, "the second field breaks this sink");
        Ok(())
    }
}

/// Counts the fields it receives and whether it was finished.
struct Counts(Arc<AtomicUsize>, Arc<AtomicUsize>);

impl Sink for Counts {
    fn name(&self) -> &'static str {
        "counts"
    }

    fn write(&mut self, _work: &FieldWork) -> Result<(), SinkError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn finish(&mut self) -> Result<(), SinkError> {
        self.1.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[test]
fn a_panicking_sink_is_reported_after_every_other_thread_has_finished() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let sim = common::plate("PANIC", &["A1", "A2"], 3, 128);
    let mut cfg = common::run_config(&sim, dir.path());
    cfg.sinks.zarr.enabled = false;
    let (written, finished) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let opts = RunOptions {
        extra_sinks: vec![Box::new(Panics(0)), Box::new(Counts(written.clone(), finished.clone()))],
        ..Default::default()
    };
    match run(&cfg, opts) {
        Err(RunError::Panicked(what)) => {
            assert!(what.contains("sink-panics"), "{what}");
            assert!(what.contains("the second field breaks this sink"), "{what}");
        }
        other => panic!("expected the sink's panic, got {other:?}"),
    }
    assert_eq!(written.load(Ordering::SeqCst), 6, "the other sink got every field");
    assert_eq!(
        finished.load(Ordering::SeqCst),
        1,
        "and was finished before run returned"
    );
}

/// A sink that dies while fields are owed work: the backfill threads wait for every degraded
/// field to be recorded, which a dead sink never reports, so they must give up instead of
/// holding the run open.
#[test]
fn a_sink_that_dies_with_work_owed_does_not_hold_the_run() {
    let Some(()) = models_common::ort_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let sim = common::plate("PANICOWED", &["A1", "A2"], 3, 128);
    let mut cfg = common::run_config(&sim, dir.path());
    cfg.pipeline.stages = vec![
        liveomics::component::StageName::Segment,
        liveomics::component::StageName::Measure,
        liveomics::component::StageName::Inference,
    ];
    cfg.inference.providers = vec!["cpu".into()];
    cfg.inference.models = vec![toml::from_str(&format!(
        "name = \"vstain\"\npath = {:?}\nclass = \"deferred\"",
        models_common::repo()
            .join("models/virtual_stain_unet")
            .display()
            .to_string()
    ))
    .expect("a model entry")];
    let opts = RunOptions {
        extra_sinks: vec![Box::new(Panics(0))],
        ..Default::default()
    };
    match run(&cfg, opts) {
        Err(RunError::Panicked(what)) => assert!(what.contains("sink-panics"), "{what}"),
        other => panic!("expected the sink's panic, got {other:?}"),
    }
}
