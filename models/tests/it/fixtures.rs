//! The runtime against the fixture models (models/fixtures, written by make_fixtures.py with
//! Python onnxruntime): parity, tiling, batching, and every bad-input path of the issue.

#![allow(clippy::unwrap_used)] // test helpers panic on setup failures by design

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use liveomics_models::{BatchOptions, Batcher, Model, ModelError, Tensor, TileOptions};
use rand::{Rng, SeedableRng};

fn load(name: &str) -> Option<Model> {
    common::ort_or_skip()?;
    Some(Model::load(&common::fixture(name), &common::cpu()).unwrap())
}

fn random(shape: Vec<usize>, seed: u64, scale: f32) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    Tensor::new(shape, (0..n).map(|_| rng.random::<f32>() * scale).collect())
}

#[test]
fn fixtures_match_python_onnxruntime() {
    for name in ["fcn", "cellnet"] {
        let Some(m) = load(name) else { return };
        let r = m.check(1).unwrap();
        assert!(!r.max_abs_error.is_empty(), "{name}: no test tensor was compared");
        for (id, err) in r.max_abs_error {
            assert!(err <= 1e-5, "{name}.{id}: {err}");
        }
    }
}

#[test]
fn tiled_equals_whole_image_on_a_2160_field() {
    let Some(m) = load("fcn") else { return };
    let field = random(vec![1, 1, 2160, 2160], 7, 4000.0);
    let whole = m.run(vec![field.clone()]).unwrap().remove(0);
    for opts in [
        TileOptions::default(),
        TileOptions {
            tile: 200,
            overlap: 0,
            batch: 3,
        },
    ] {
        let tiled = m.run_tiled(field.clone(), &opts).unwrap();
        let err = tiled.max_abs_diff(&whole).unwrap();
        assert!(err <= 1e-4, "{opts:?}: max abs diff {err}");
    }
    // A field smaller than a tile, and one not a multiple of the size step, still run.
    let small = random(vec![1, 1, 37, 50], 8, 100.0);
    let out = m.run_tiled(small, &TileOptions::default()).unwrap();
    assert_eq!(out.shape, vec![1, 2, 37, 50]);
}

#[test]
fn interleaved_fields_get_exactly_their_own_cells() {
    let Some(m) = load("cellnet") else { return };
    let m = Arc::new(m);
    let batches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let b2 = Arc::clone(&batches);
    let batcher = Batcher::new(
        Arc::clone(&m),
        BatchOptions {
            max_batch: 16,
            max_queue_delay: Duration::from_millis(3),
        },
        move |s| {
            assert!(s.padded_to >= s.samples);
            b2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        },
    )
    .unwrap();
    let workers: Vec<_> = (0..4u64)
        .map(|w| {
            let batcher = batcher.clone();
            let m = Arc::clone(&m);
            std::thread::spawn(move || {
                for f in 0..12u64 {
                    let cells = ((w * 7 + f * 5) % 41) as usize; // 0..40 cells, some fields above max_batch
                    let crops = random(vec![cells, 2, 32, 32], w * 100 + f, 300.0);
                    // Different deadlines so that the queue reorders.
                    let deadline = Instant::now() + Duration::from_millis(5 + (f % 3) * 20);
                    let got = batcher.run(crops.clone(), deadline).unwrap();
                    assert_eq!(got.shape, vec![cells, 5]);
                    if cells > 0 {
                        let alone = m.run(vec![crops]).unwrap().remove(0);
                        let err = got.max_abs_diff(&alone).unwrap();
                        assert!(err <= 1e-5, "worker {w} field {f}: {err}");
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert!(batches.load(std::sync::atomic::Ordering::Relaxed) > 0);
}

/// Copies a fixture to a temp dir so that a test can break it.
fn broken_copy(name: &str, edit: impl FnOnce(&std::path::Path)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(common::fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    edit(dir.path());
    dir
}

fn set_sha(dir: &std::path::Path) {
    let w = std::fs::read(dir.join("weights.onnx")).unwrap();
    let sum = liveomics_models::description::sha256_hex(&w);
    let y = std::fs::read_to_string(dir.join("bioimageio.yaml")).unwrap();
    let start = y.find("weights:").unwrap();
    let at = start + y[start..].find("sha256: ").unwrap() + 8;
    let end = at + y[at..].find('\n').unwrap();
    std::fs::write(dir.join("bioimageio.yaml"), format!("{}{sum}{}", &y[..at], &y[end..])).unwrap();
}

fn edit_yaml(dir: &std::path::Path, from: &str, to: &str) {
    let p = dir.join("bioimageio.yaml");
    let y = std::fs::read_to_string(&p).unwrap();
    assert!(y.contains(from), "{from}");
    std::fs::write(p, y.replacen(from, to, 1)).unwrap();
}

#[test]
fn bad_models_fail_with_clear_errors() {
    if common::ort_or_skip().is_none() {
        return;
    }
    let load_err = |d: &tempfile::TempDir| Model::load(d.path(), &common::cpu()).unwrap_err();

    let d = broken_copy("fcn", |p| {
        std::fs::write(p.join("weights.onnx"), b"not an onnx file").unwrap()
    });
    let e = load_err(&d);
    assert!(matches!(e, ModelError::Checksum { .. }), "{e}");

    let d = broken_copy("fcn", |p| {
        std::fs::write(p.join("weights.onnx"), b"not an onnx file").unwrap();
        set_sha(p);
    });
    let e = load_err(&d).to_string();
    assert!(
        e.contains("liveomics fixture FCN") && e.contains("cannot load the weights"),
        "{e}"
    );

    let d = broken_copy("fcn", |p| {
        let mut w = std::fs::read(p.join("weights.onnx")).unwrap();
        assert_eq!(w[0], 0x08, "ir_version is the first field");
        w[1] = 14;
        std::fs::write(p.join("weights.onnx"), w).unwrap();
        set_sha(p);
    });
    let e = load_err(&d).to_string();
    assert!(e.contains("IR") && e.contains("<= 13"), "{e}");

    let d = broken_copy("fcn", |p| std::fs::remove_file(p.join("weights.onnx")).unwrap());
    let e = load_err(&d).to_string();
    assert!(e.contains("weights.onnx") && e.contains("missing"), "{e}");

    let d = broken_copy("cellnet", |p| {
        edit_yaml(p, "size: 32\n", "size: 48\n");
        edit_yaml(p, "size: 32\n", "size: 48\n");
        edit_yaml(p, "crop_size: 32", "crop_size: 48");
    });
    let e = load_err(&d).to_string();
    assert!(e.contains("is 48 in the description but 32 in the ONNX graph"), "{e}");

    let d = broken_copy("cellnet", |p| edit_yaml(p, "crop_size: 32", "crop_size: 48"));
    let e = load_err(&d).to_string();
    assert!(
        e.contains("config.liveomics.crop_size") && e.contains("32-pixel crops"),
        "{e}"
    );

    let d = broken_copy("fcn", |p| {
        edit_yaml(p, "      - type: channel\n        channel_names: [DAPI]\n", "")
    });
    let e = load_err(&d).to_string();
    assert!(e.contains("3 axes in the description") && e.contains("rank 4"), "{e}");

    let d = broken_copy("fcn", |p| edit_yaml(p, "zero_mean_unit_variance", "histogram_equalize"));
    let e = load_err(&d).to_string();
    assert!(
        e.contains("inputs[0].preprocessing[0]") && e.contains("histogram_equalize"),
        "{e}"
    );

    let d = broken_copy("fcn", |p| {
        edit_yaml(p, "kwargs: {axes: [x, y]}", "kwargs: {axes: [x, z]}")
    });
    let e = load_err(&d).to_string();
    assert!(e.contains("\"z\" is not an axis"), "{e}");

    // What bioimage.io's own validator refuses is refused here too, with its key.
    let d = broken_copy("fcn", |p| {
        edit_yaml(p, "size: {min: 24, step: 8}", "size: {min: 16, step: 8}")
    });
    let e = load_err(&d).to_string();
    assert!(
        e.contains("outputs[0].axes[2].halo") && e.contains("smallest size 16"),
        "{e}"
    );
    let d = broken_copy("fcn", |p| {
        edit_yaml(p, "        halo: 8\n", "        halo: 8\n        unit: micrometer\n")
    });
    let e = load_err(&d).to_string();
    assert!(e.contains("outputs[0].axes[2].unit") && e.contains("must match"), "{e}");
    let d = broken_copy("fcn", |p| {
        edit_yaml(
            p,
            "    opset_version: 17\n",
            "    opset_version: 17\n    parent: torchscript\n",
        )
    });
    let e = load_err(&d).to_string();
    assert!(e.contains("weights.onnx.parent") && e.contains("torchscript"), "{e}");

    let Some(m) = load("sqrt") else { return };
    let e = m.check(1).unwrap_err();
    assert!(matches!(e, ModelError::NonFinite { count: 256, .. }), "{e}");
    let ok = m.run(vec![random(vec![1, 1, 4, 4], 1, 1.0)]).unwrap();
    assert_eq!(ok[0].shape, vec![1, 1, 4, 4]);
}
