//! A real third-party bioimage.io model (../shared/models/unet2d_nuclei_broad) through the whole
//! path: description, sha256, session, preprocessing, inference, postprocessing.

#![allow(clippy::unwrap_used)] // test helpers panic on setup failures by design

use crate::common;

use liveomics_models::Model;

#[test]
fn unet_nuclei_reproduces_its_test_tensors() {
    let (Some(()), Some(path)) = (common::ort_or_skip(), common::shared_model("unet2d_nuclei_broad")) else {
        return;
    };
    let model = Model::load(&path, &common::cpu()).unwrap();
    let report = model.check(1).unwrap();
    assert!(!report.max_abs_error.is_empty(), "no test tensor was compared");
    for (id, err) in &report.max_abs_error {
        eprintln!("{id}: max abs error {err:e}");
        assert!(*err <= 1e-4, "{id}: {err}");
    }
}
