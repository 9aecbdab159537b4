//! The model crate's integration tests in one binary (one link of ONNX Runtime's bindings, not two).

#[path = "../common/mod.rs"]
mod common;

mod fixtures;
mod third_party;
