//! InstanSeg in Rust against the original: the converted model's test tensors
//! (`models/instanseg_fluorescence`, written by `models/import/instanseg.py` from the TorchScript
//! model) hold the TorchScript network's output and the whole TorchScript model's labels.

#![allow(clippy::unwrap_used)] // test helpers panic on setup failures by design

use crate::models_common as common;

use liveomics::inference::instances::{params, InstanceModel};
use liveomics_kernels::gpu::Compute;
use liveomics_kernels::instanseg::{self, Instances};
use liveomics_kernels::metrics::partition_differences;
use liveomics_models::{npy, Description, TileOptions};

/// The test input as camera planes, `w`, `h`.
fn test_planes() -> (Vec<Vec<u16>>, usize, usize) {
    let raw = npy::read(&model_dir().join("test_input.npy")).unwrap();
    let (h, w) = (raw.shape[2], raw.shape[3]);
    // The test input holds integers 1..180: exact as camera counts.
    let planes = raw
        .data
        .chunks(w * h)
        .map(|p| p.iter().map(|&v| v as u16).collect())
        .collect();
    (planes, w, h)
}

fn model_dir() -> std::path::PathBuf {
    common::repo().join("models/instanseg_fluorescence")
}

/// The expected nuclei and cell labels, `[2, h, w]`.
fn expected() -> (Vec<u32>, Vec<u32>, usize, usize) {
    let t = npy::read(&model_dir().join("test_labels.npy")).unwrap();
    let (h, w) = (t.shape[2], t.shape[3]);
    let l: Vec<u32> = t.data.iter().map(|&v| v as u32).collect();
    (l[..w * h].to_vec(), l[w * h..].to_vec(), w, h)
}

fn differences(got: &Instances, nuclei: &[u32], cells: &[u32]) -> (usize, usize) {
    (
        partition_differences(&got.nuclei, nuclei),
        partition_differences(got.cells.as_ref().unwrap(), cells),
    )
}

#[test]
fn post_processing_equals_the_torchscript_on_its_own_network_output() {
    let d = Description::load(&model_dir()).unwrap();
    let p = params(d.liveomics.instanseg.as_ref().unwrap());
    let e = npy::read(&model_dir().join("test_output.npy")).unwrap();
    let (c, h, w) = (e.shape[1], e.shape[2], e.shape[3]);
    let got = instanseg::instances(&e.data, c, w, h, true, &p).unwrap();
    let (nuclei, cells, ..) = expected();
    let (dn, dc) = differences(&got, &nuclei, &cells);
    let count = |l: &[u32]| l.iter().copied().max().unwrap_or(0);
    eprintln!(
        "{w}x{h}: {} nuclei, {} cells; pixels differing from the TorchScript labels: nuclei {dn}, cells {dc}",
        count(&got.nuclei),
        count(got.cells.as_ref().unwrap())
    );
    assert_eq!((dn, dc), (0, 0));
    // Renumbering keeps every object and a cell's nucleus's label.
    let mut renumbered = got.clone();
    instanseg::consecutive(&mut renumbered);
    assert_eq!(differences(&renumbered, &nuclei, &cells), (0, 0));
}

/// The CUDA back end's post-processing (its kernels on the host emulation, and on device 0 when
/// there is one) on the same network output: the CPU's labels, so the TorchScript's.
#[test]
fn cuda_post_processing_equals_the_torchscript_on_its_own_network_output() {
    let d = Description::load(&model_dir()).unwrap();
    let p = params(d.liveomics.instanseg.as_ref().unwrap());
    let e = npy::read(&model_dir().join("test_output.npy")).unwrap();
    let (c, h, w) = (e.shape[1], e.shape[2], e.shape[3]);
    let (nuclei, cells, ..) = expected();
    let mut backends = vec![Compute::emulated().unwrap()];
    match liveomics_kernels::gpu::Gpu::open(0) {
        Ok(_) => backends.push(
            Compute::select(liveomics_kernels::gpu::DeviceRequest::Cuda(0))
                .unwrap()
                .0,
        ),
        Err(e) => eprintln!("CUDA device skipped (host emulation of the kernels checked only): {e}"),
    }
    let cpu = instanseg::instances(&e.data, c, w, h, true, &p).unwrap();
    for b in backends {
        let got = b.instanseg(&e.data, c, w, h, true, &p).unwrap();
        let (dn, dc) = differences(&got, &nuclei, &cells);
        eprintln!(
            "{}: pixels differing from the TorchScript labels: nuclei {dn}, cells {dc}",
            b.describe()
        );
        if b.describe().contains("emulation") {
            assert_eq!(got, cpu, "the emulated kernels give the CPU's labels exactly");
        } else {
            // The device's expf may differ from the host's by an ulp (docs/GPU.md).
            assert!(dn + dc <= w * h / 1000, "nuclei {dn}, cells {dc}");
        }
    }
}

#[test]
fn the_whole_model_through_onnx_runtime_matches_the_torchscript_labels() {
    let Some(()) = common::ort_or_skip() else {
        return;
    };
    let m = InstanceModel::load(&model_dir(), &common::cpu(), TileOptions::default(), true).unwrap();
    let (planes, w, h) = test_planes();
    let views: Vec<&[u16]> = planes.iter().map(Vec::as_slice).collect();
    let got = m.segment(&Compute::cpu(), &views, w, h, 1.0, true).unwrap();
    let (nuclei, cells, ..) = expected();
    let inst = Instances {
        nuclei: got.nuclei,
        cells: got.cells,
    };
    let (dn, dc) = differences(&inst, &nuclei, &cells);
    eprintln!(
        "ONNX network + Rust post-processing: {} objects; pixels differing from TorchScript: nuclei {dn}, cells {dc} of {}",
        got.count,
        w * h
    );
    // The ONNX network differs from TorchScript's by float rounding (< 1e-3): a few pixels on
    // object borders may change hands, never whole objects.
    assert!(dn + dc <= w * h / 200, "nuclei {dn}, cells {dc}");
}

/// Without the model's cells the network is cut to its nuclei decoder: the same five channels,
/// bit for bit, as the whole network's first five, so the same nuclei.
#[test]
fn the_nuclei_decoder_alone_gives_the_whole_networks_nuclei() {
    let Some(()) = common::ort_or_skip() else {
        return;
    };
    let whole = InstanceModel::load(&model_dir(), &common::cpu(), TileOptions::default(), true).unwrap();
    let cut = InstanceModel::load(&model_dir(), &common::cpu(), TileOptions::default(), false).unwrap();
    assert_eq!((whole.channels, cut.channels), (10, 5));
    assert!(whole.has_cells() && !cut.has_cells());
    let (planes, w, h) = test_planes();
    let nuclear = [planes[0].as_slice()];
    let (a, _) = whole.embedding(&nuclear, w, h, 1.0).unwrap();
    let (b, _) = cut.embedding(&nuclear, w, h, 1.0).unwrap();
    assert_eq!(b.shape, [5, h, w]);
    assert_eq!(&a.data[..5 * w * h], &b.data[..], "nuclei channels differ");
    let la = whole.segment(&Compute::cpu(), &nuclear, w, h, 1.0, false).unwrap();
    let lb = cut.segment(&Compute::cpu(), &nuclear, w, h, 1.0, false).unwrap();
    assert!(la.count > 0);
    assert_eq!(la.nuclei, lb.nuclei);
    assert!(lb.cells.is_none());
}
