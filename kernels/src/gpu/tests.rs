//! Parity of every CUDA kernel with the CPU reference: exact equality (labels in the same
//! numbering, floats bit for bit up to the sign of zero). Each test runs on the host emulation of
//! the kernels, and also on CUDA device 0 when there is one; without one it says so.

#![allow(clippy::unwrap_used)]

use super::*;
use crate::backend::Backend;
use crate::cpu;
use crate::segment::CellParams;

/// The back ends to check: the emulation always, a real device when present.
fn backends() -> Vec<Gpu> {
    let mut v = vec![Gpu::emulated().unwrap()];
    match Gpu::open(0) {
        Ok(g) => v.push(g),
        Err(e) => eprintln!("CUDA parity skipped (emulated kernels checked only): {e}"),
    }
    v
}

/// xorshift64*: reproducible inputs without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

fn noise_u16(w: usize, h: usize, seed: u64) -> Vec<u16> {
    let mut r = Rng(seed);
    (0..w * h).map(|_| (r.next() % 4096) as u16 + 100).collect()
}

fn random_mask(w: usize, h: usize, p: f32, seed: u64) -> Vec<bool> {
    let mut r = Rng(seed);
    (0..w * h).map(|_| r.unit() < p).collect()
}

/// A field of touching discs (nuclei) and larger rings of textured cytoplasm around them.
fn field(w: usize, h: usize, count: usize, seed: u64) -> (Vec<u16>, Vec<u16>) {
    let mut r = Rng(seed);
    let mut dapi = vec![0f32; w * h];
    let mut cyto = vec![0f32; w * h];
    for _ in 0..count {
        let (cx, cy) = (r.unit() * w as f32, r.unit() * h as f32);
        let rad = 5.0 + 4.0 * r.unit();
        let bright = 1500.0 + 1500.0 * r.unit();
        for y in 0..h {
            for x in 0..w {
                let d = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
                let i = y * w + x;
                if d < rad {
                    dapi[i] = dapi[i].max(bright * (1.0 - 0.3 * d / rad));
                }
                if d < 2.2 * rad {
                    cyto[i] = cyto[i].max(600.0 * (1.0 - 0.4 * d / (2.2 * rad)));
                }
            }
        }
    }
    let mut noisy = |v: &[f32]| -> Vec<u16> { v.iter().map(|&x| (x + 100.0 + 60.0 * r.unit()) as u16).collect() };
    (noisy(&dapi), noisy(&cyto))
}

fn same_f32(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            x == y || (x.is_nan() && y.is_nan()),
            "{what}: pixel {i}: gpu {x} cpu {y}"
        );
    }
}

const SHAPES: [(usize, usize); 4] = [(37, 23), (64, 48), (1, 9), (9, 1)];

#[test]
fn normalize_and_blur_equal_the_cpu() {
    for g in backends() {
        for (k, &(w, h)) in SHAPES.iter().enumerate() {
            let raw = noise_u16(w, h, 11 + k as u64);
            let n_cpu = cpu::normalize_u16(&raw, w, h, 0.5, 99.5).unwrap();
            same_f32(&g.normalize_u16(&raw, w, h, 0.5, 99.5).unwrap(), &n_cpu, "normalize");
            for sigma in [0.0, 0.7, 1.5, 4.0] {
                let b = cpu::gaussian_blur(&n_cpu, w, h, sigma).unwrap();
                same_f32(
                    &g.gaussian_blur(&n_cpu, w, h, sigma).unwrap(),
                    &b,
                    &format!("blur {sigma} {w}x{h}"),
                );
            }
        }
        // A saturated plane has no range: all zeros, as on the CPU.
        let sat = vec![u16::MAX; 30];
        same_f32(
            &g.normalize_u16(&sat, 6, 5, 0.5, 99.5).unwrap(),
            &cpu::normalize_u16(&sat, 6, 5, 0.5, 99.5).unwrap(),
            "saturated",
        );
        assert!(g.normalize_u16(&sat, 6, 5, 60.0, 10.0).is_err());
    }
}

#[test]
fn thresholds_equal_the_cpu() {
    for g in backends() {
        let mut r = Rng(5);
        let mut v: Vec<f32> = (0..5000)
            .map(|i| if i % 7 == 0 { 3.0 + r.unit() } else { r.unit() })
            .collect();
        v[17] = f32::NAN;
        v[99] = f32::INFINITY;
        assert_eq!(g.otsu_threshold(&v).unwrap(), cpu::otsu_threshold(&v));
        assert_eq!(g.triangle_threshold(&v).unwrap(), cpu::triangle_threshold(&v));
        for flat in [vec![2.5f32; 10], vec![f32::NAN; 10], vec![]] {
            assert_eq!(g.otsu_threshold(&flat).unwrap(), cpu::otsu_threshold(&flat));
        }
    }
}

#[test]
fn distance_transform_equals_the_cpu() {
    for g in backends() {
        for (k, &(w, h)) in SHAPES.iter().enumerate() {
            for p in [0.0, 0.3, 0.9, 1.0] {
                let m = random_mask(w, h, p, 40 + k as u64);
                let d = cpu::distance_transform(&m, w, h).unwrap();
                same_f32(
                    &g.distance_transform(&m, w, h).unwrap(),
                    &d,
                    &format!("edt {w}x{h} p={p}"),
                );
            }
        }
    }
}

#[test]
fn components_equal_the_cpu_in_the_same_numbering() {
    for g in backends() {
        for (k, &(w, h)) in SHAPES.iter().enumerate() {
            for p in [0.0, 0.45, 0.6, 1.0] {
                let m = random_mask(w, h, p, 70 + k as u64);
                for eight in [false, true] {
                    let c = cpu::connected_components(&m, w, h, eight).unwrap();
                    assert_eq!(
                        g.connected_components(&m, w, h, eight).unwrap(),
                        c,
                        "{w}x{h} p={p} eight={eight}"
                    );
                }
            }
        }
    }
}

#[test]
fn max_filter_and_peaks_equal_the_cpu() {
    for g in backends() {
        let (w, h) = (64, 48);
        let m = random_mask(w, h, 0.8, 3);
        let d = cpu::gaussian_blur(&cpu::distance_transform(&m, w, h).unwrap(), w, h, 1.0).unwrap();
        for radius in [0, 1, 3, 70] {
            same_f32(
                &g.max_filter(&d, w, h, radius).unwrap(),
                &cpu::max_filter(&d, w, h, radius).unwrap(),
                "max",
            );
            assert_eq!(
                g.peak_markers(&d, &m, w, h, radius, 1.0).unwrap(),
                cpu::peak_markers(&d, &m, w, h, radius, 1.0).unwrap()
            );
        }
    }
}

#[test]
fn downsample_crops_and_region_props_equal_the_cpu() {
    for g in backends() {
        for &(w, h) in &SHAPES {
            let a = noise_u16(w, h, 8);
            assert_eq!(
                g.downsample2x_mean(&a, w, h).unwrap(),
                cpu::downsample2x_mean(&a, w, h).unwrap()
            );
        }
        let (w, h) = (64, 48);
        let (a, b) = (noise_u16(w, h, 1), noise_u16(w, h, 2));
        let centers = [(0.0, 0.0), (31.5, 20.2), (63.0, 47.0), (-3.0, 50.0), (10.4, 2.5)];
        for (size, scale) in [(16, 1.0), (15, 1.0), (12, 1.7), (9, 0.5)] {
            let spec = CropSpec { size, scale };
            let cpu_batch = cpu::crop_gather_u16_with(&[&a, &b], w, h, &centers, spec, &|_, _| {}).unwrap();
            same_f32(
                &g.crop_gather_u16(&[&a, &b], w, h, &centers, spec).unwrap(),
                &cpu_batch,
                &format!("crops {size} x{scale}"),
            );
        }
        assert!(g
            .crop_gather_u16(&[&a], w, h, &centers, CropSpec { size: 0, scale: 1.0 })
            .is_err());
        let (labels, _) = cpu::connected_components(&random_mask(w, h, 0.5, 9), w, h, false).unwrap();
        assert_eq!(
            g.region_props(&labels, &[&a, &b], w, h).unwrap(),
            measure::region_props(&labels, &[&a, &b], w, h).unwrap()
        );
        assert!(g.region_props(&vec![0; w * h], &[&a], w, h).unwrap().is_empty());
    }
}

#[test]
fn segmentation_on_the_gpu_equals_the_cpu() {
    for g in backends() {
        for (w, h, count, seed) in [(160, 120, 40, 1), (200, 90, 90, 2), (50, 40, 0, 3)] {
            let (dapi, cyto) = field(w, h, count, seed);
            let mut p = NucleiParams::from_physical(7.0, 0.5).unwrap();
            for threshold in [
                segment::Foreground::Local,
                segment::Foreground::Global(segment::ThresholdMethod::Otsu),
                segment::Foreground::Global(segment::ThresholdMethod::Triangle),
            ] {
                p.foreground = threshold;
                let cpu_nuclei = segment::segment_nuclei(&dapi, w, h, &p).unwrap();
                let gpu_nuclei = g.segment_nuclei(&dapi, w, h, &p).unwrap();
                assert_eq!(gpu_nuclei, cpu_nuclei, "nuclei {w}x{h} {threshold:?}");
                let cp = CellParams::default();
                assert_eq!(
                    g.segment_cells(&cpu_nuclei.0, &cyto, w, h, &cp).unwrap(),
                    segment::segment_cells(&cpu_nuclei.0, &cyto, w, h, &cp).unwrap()
                );
            }
            if count > 0 {
                assert!(g.segment_nuclei(&dapi, w, h, &p).unwrap().1 > 0);
            }
            p.illumination = Some(segment::Illumination::for_nucleus_px(14.0, 100.0));
            assert_eq!(
                g.segment_nuclei(&dapi, w, h, &p).unwrap(),
                segment::segment_nuclei(&dapi, w, h, &p).unwrap()
            );
            let prob: Vec<f32> = dapi
                .iter()
                .map(|&v| if v == 200 { f32::NAN } else { v as f32 / 4000.0 })
                .collect();
            assert_eq!(
                g.segment_nuclei_probability(&prob, w, h, 0.5, &p).unwrap(),
                segment::segment_nuclei_probability(&prob, w, h, 0.5, &p).unwrap()
            );
        }
        // Empty, saturated and all-foreground fields: no panic, the CPU's answer.
        let p = NucleiParams::from_physical(7.0, 0.5).unwrap();
        assert_eq!(
            g.segment_nuclei(&[], 0, 0, &p).unwrap(),
            segment::segment_nuclei(&[], 0, 0, &p).unwrap()
        );
        for img in [vec![u16::MAX; 40 * 30], vec![0u16; 40 * 30]] {
            assert_eq!(
                g.segment_nuclei(&img, 40, 30, &p).unwrap(),
                segment::segment_nuclei(&img, 40, 30, &p).unwrap()
            );
        }
        assert!(g.segment_nuclei(&[1, 2, 3], 2, 2, &p).is_err());
    }
}

#[test]
fn device_requests_parse_and_auto_never_fails() {
    assert_eq!("auto".parse(), Ok(DeviceRequest::Auto));
    assert_eq!("cpu".parse(), Ok(DeviceRequest::Cpu));
    assert_eq!("cuda:3".parse(), Ok(DeviceRequest::Cuda(3)));
    assert_eq!("cuda".parse(), Ok(DeviceRequest::Cuda(0)));
    assert!("gpu"
        .parse::<DeviceRequest>()
        .unwrap_err()
        .to_string()
        .contains("cuda:N"));
    assert!("cuda:x".parse::<DeviceRequest>().is_err());
    let (c, reason) = Compute::select(DeviceRequest::Auto).unwrap();
    assert_eq!(
        reason.is_none(),
        c.is_gpu(),
        "auto fell back without a reason, or gave one for a GPU"
    );
    if !c.is_gpu() {
        // Without a device, asking for one by number is an error that says why.
        let e = Compute::select(DeviceRequest::Cuda(0)).unwrap_err().to_string();
        assert!(e.contains("CUDA"), "{e}");
    }
}

/// The kernel sources compile with NVRTC (the compiler the daemon uses at run time), when the
/// library can be found: a system CUDA, or the `nvidia-cuda-nvrtc` wheel `make test` installs
/// into `.venv`.
#[test]
fn kernels_compile_with_nvrtc() {
    if let Err(why) = load_nvrtc() {
        eprintln!("skipped: {why}");
        return;
    }
    let ptx = compile("compute_80").unwrap();
    for k in device::KERNELS {
        assert!(ptx.contains(&format!(".entry {k}(")), "kernel {k} missing from the PTX");
    }
}

/// Makes `libnvrtc.so.13` loadable by name: already on the library path, or preloaded from the
/// wheel in the repository's `.venv` (the dynamic loader then resolves the name to it).
fn load_nvrtc() -> Result<(), String> {
    // SAFETY: probes whether the library opens.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Ok(());
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(".venv")
        .join("lib");
    let found = std::fs::read_dir(&root)
        .map_err(|e| format!("no NVRTC on the library path and no {}: {e}", root.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/nvidia/cu13/lib/libnvrtc.so.13"))
        .find(|p| p.exists())
        .ok_or_else(|| format!("no NVRTC on the library path or under {}", root.display()))?;
    // SAFETY: NVRTC's initialisers are those of any CUDA application; the handle is leaked so
    // that the library stays loaded for cudarc to find by name.
    let lib = unsafe { libloading::Library::new(&found) }.map_err(|e| format!("{}: {e}", found.display()))?;
    std::mem::forget(lib);
    Ok(())
}

#[test]
fn floods_equal_the_cpu_including_ties() {
    for g in backends() {
        for (k, &(w, h)) in [(64usize, 48usize), (37, 23), (1, 30), (30, 1)].iter().enumerate() {
            let mut r = Rng(900 + k as u64);
            let mask = random_mask(w, h, 0.85, 31 + k as u64);
            // Coarse values make plateaus: many pixels are reached by two labels at equal keys.
            let elev: Vec<f32> = (0..w * h).map(|_| (r.next() % 4) as f32).collect();
            let mut markers = vec![0u32; w * h];
            for (l, i) in (0..w * h).step_by(97).enumerate() {
                markers[i] = l as u32 + 1;
            }
            let masked: Vec<bool> = mask.iter().zip(&markers).map(|(&m, &l)| m || l != 0).collect();
            assert_eq!(
                g.watershed(&elev, &markers, &masked, w, h).unwrap(),
                cpu::watershed(&elev, &markers, &masked, w, h).unwrap(),
                "watershed {w}x{h}"
            );
            let flat = vec![0.5f32; w * h];
            for weight in [1.0f32, 0.3] {
                for image in [&elev, &flat] {
                    assert_eq!(
                        g.propagate(image, &markers, &masked, w, h, weight).unwrap(),
                        cpu::propagate(image, &markers, &masked, w, h, weight).unwrap(),
                        "propagate {w}x{h} weight {weight}"
                    );
                }
            }
        }
    }
}

/// Small fields with three markers on three elevation values: nearly every pixel is reached at
/// equal keys from more than one marker, so the tie rule decides most labels.
#[test]
fn floods_resolve_ties_as_on_the_cpu() {
    let g = Gpu::emulated().unwrap();
    for seed in 0..200u64 {
        let (w, h) = (7usize, 5usize);
        let mut r = Rng(1000 + seed);
        let elev: Vec<f32> = (0..w * h).map(|_| (r.next() % 3) as f32).collect();
        let mut markers = vec![0u32; w * h];
        for l in 1..=3 {
            markers[(r.next() % (w * h) as u64) as usize] = l;
        }
        let mask = vec![true; w * h];
        assert_eq!(
            g.watershed(&elev, &markers, &mask, w, h).unwrap(),
            cpu::watershed(&elev, &markers, &mask, w, h).unwrap(),
            "watershed, seed {seed}"
        );
        assert_eq!(
            g.propagate(&elev, &markers, &mask, w, h, 1.0).unwrap(),
            cpu::propagate(&elev, &markers, &mask, w, h, 1.0).unwrap(),
            "propagate, seed {seed}"
        );
    }
}

#[test]
fn illumination_correction_equals_the_cpu() {
    for g in backends() {
        for (w, h, block) in [(160usize, 120usize, 28usize), (37, 23, 8), (64, 48, 64)] {
            let (dapi, _) = field(w, h, 30, 5);
            // Vignetting: the corners get half the light of the centre.
            let raw: Vec<u16> = dapi
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    let (x, y) = ((i % w) as f32 / w as f32 - 0.5, (i / w) as f32 / h as f32 - 0.5);
                    (100.0 + (v as f32 - 100.0) * (1.0 - (x * x + y * y))) as u16
                })
                .collect();
            let flat = illumination::flatten_u16(&raw, w, h, 100.0, block).unwrap();
            same_f32(&g.flatten_u16(&raw, w, h, 100.0, block).unwrap(), &flat, "flatten");
            let mut with_nan = flat.clone();
            with_nan[3] = f32::NAN;
            for (lo, hi) in [(0.5, 99.95), (0.0, 100.0), (10.0, 10.5)] {
                same_f32(
                    &g.normalize_f32(&with_nan, lo, hi).unwrap(),
                    &illumination::normalize_f32(&with_nan, lo, hi).unwrap(),
                    "normalize_f32",
                );
            }
        }
        assert!(g.flatten_u16(&[1, 2, 3, 4], 2, 2, 0.0, 2).is_err());
    }
}

/// A pixel classifier whose logit is `1 - |dx| - |dy| + sigma0 / 4` (ReLU pairs give the
/// absolute values), so that windows hold diamond-shaped objects cut by the offsets' noise.
fn diamond_classifier(window_size: usize, cleanup: bool) -> crate::instanseg::InstanSegParams {
    use crate::instanseg::{InstanSegParams, Linear};
    InstanSegParams {
        mask_threshold: 0.53,
        peak_distance: 3,
        seed_threshold: 0.7,
        overlap_threshold: 0.3,
        window_size,
        cleanup_fragments: cleanup,
        resolve_cell_and_nucleus: true,
        classifier: vec![
            Linear {
                inputs: 4,
                outputs: 5,
                weight: vec![
                    1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.25,
                    0.0,
                ],
                bias: vec![0.0, 0.0, 0.0, 0.0, 2.0],
            },
            Linear {
                inputs: 5,
                outputs: 1,
                weight: vec![-1.0, -1.0, -1.0, -1.0, 1.0],
                bias: vec![-1.0],
            },
        ],
    }
}

/// Ten channels (nuclei, then cells) of an InstanSeg-like output: offsets pulling pixels to the
/// nearest of `count` centres, noise, seed maps peaked at the centres (one on a plateau), and one
/// NaN in each of an offset and a seed map.
fn instanseg_embedding(w: usize, h: usize, count: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng(seed);
    let centres: Vec<(f32, f32)> = (0..count).map(|_| (r.unit() * w as f32, r.unit() * h as f32)).collect();
    let n = w * h;
    let mut e = vec![0f32; 10 * n];
    for t in 0..2 {
        let spread = if t == 0 { 6.0 } else { 20.0 };
        for y in 0..h {
            for x in 0..w {
                let i = y * w + x;
                let (cx, cy) = centres
                    .iter()
                    .copied()
                    .min_by(|a, b| {
                        let d = |c: &(f32, f32)| (c.0 - x as f32).powi(2) + (c.1 - y as f32).powi(2);
                        d(a).total_cmp(&d(b))
                    })
                    .unwrap_or((-1e3, -1e3));
                let d2 = (cx - x as f32).powi(2) + (cy - y as f32).powi(2);
                let o = t * 5 * n;
                e[o + i] = 0.12 * (cx - x as f32) + 0.4 * (r.unit() - 0.5);
                e[o + n + i] = 0.12 * (cy - y as f32) + 0.4 * (r.unit() - 0.5);
                e[o + 2 * n + i] = r.unit() - 0.5;
                e[o + 3 * n + i] = r.unit();
                let s = 0.95 * (-d2 / spread).exp() + 0.1 * r.unit();
                e[o + 4 * n + i] = 15.0 * (s - 0.5);
            }
        }
    }
    // A 2x2 plateau on the first centre: one seed, its first pixel.
    if let (Some(&(cx, cy)), true) = (centres.first(), w >= 2 && h >= 2) {
        let (x, y) = ((cx as usize).min(w - 2), (cy as usize).min(h - 2));
        for i in [y * w + x, y * w + x + 1, (y + 1) * w + x, (y + 1) * w + x + 1] {
            e[4 * n + i] = 7.5;
        }
    }
    e[3 * w + 5] = f32::NAN;
    e[4 * n + 7 * w + 9] = f32::NAN;
    e
}

#[test]
fn instanseg_post_processing_equals_the_cpu() {
    use crate::instanseg;
    use crate::metrics::partition_differences;
    for g in backends() {
        let emulated = g.describe().contains("emulation");
        for (w, h, count, ws) in [(96, 80, 14, 8), (12, 40, 3, 8), (64, 64, 0, 8)] {
            let e = instanseg_embedding(w, h, count, 7 + w as u64);
            for cleanup in [true, false] {
                for cells in [false, true] {
                    let p = diamond_classifier(ws, cleanup);
                    let want = instanseg::instances(&e, 10, w, h, cells, &p).unwrap();
                    let got = Backend::instanseg(&g, &e, 10, w, h, cells, &p).unwrap();
                    let what = format!("{w}x{h}, {count} centres, cleanup {cleanup}, cells {cells}");
                    if count > 0 {
                        assert!(want.nuclei.iter().any(|&v| v > 0), "{what}: the test finds objects");
                    }
                    if emulated {
                        assert_eq!(got, want, "{what}");
                    } else {
                        // expf on the device may differ from the host's by an ulp: a pixel scored
                        // within an ulp of the threshold or of another window may go either way.
                        let d = partition_differences(&got.nuclei, &want.nuclei);
                        eprintln!("{}: {what}: {d} nuclei pixels differ", g.describe());
                        assert!(d * 1000 <= w * h, "{what}: {d} pixels differ");
                    }
                }
            }
        }
        // Five channels (nuclei only) and a field too small for a window.
        let e = instanseg_embedding(96, 80, 14, 3);
        let p = diamond_classifier(8, true);
        let five = &e[..5 * 96 * 80];
        assert_eq!(
            Backend::instanseg(&g, five, 5, 96, 80, true, &p).unwrap(),
            instanseg::instances(five, 5, 96, 80, true, &p).unwrap()
        );
        let tiny = instanseg_embedding(1, 9, 1, 3);
        assert_eq!(
            Backend::instanseg(&g, &tiny, 10, 1, 9, true, &p).unwrap(),
            instanseg::instances(&tiny, 10, 1, 9, true, &p).unwrap()
        );
    }
}
