//! The daemon's integration tests, one module per subject, in one test binary: each binary links
//! the whole dependency graph, and on a 2-core CI machine eight links cost minutes.

mod common;
#[path = "../../../models/tests/common/mod.rs"]
mod models_common;

mod backpressure;
mod bad_frames;
mod instanseg;
mod jsonl_sink;
mod metrics_http;
mod panics;
mod pending_cap;
mod segmentation_ap;
