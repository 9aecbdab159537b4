//! Segmentation accuracy on simulator ground truth, on seeds the defaults were never tuned on,
//! sparse and confluent (StarDist's AP: TP / (TP + FP + FN) with one-to-one IoU matching; AP@0.7
//! is printed alongside). Nuclei AP@0.5 >= 0.90 and cells AP@0.5 >= 0.85 everywhere, sparse and
//! confluent.

#![allow(clippy::unwrap_used)]

use liveomics_adapters::model::WellId;
use liveomics_adapters::simulator::{Simulator, SimulatorConfig};
use liveomics_adapters::source::Source;
use liveomics_kernels::metrics::match_labels;
use liveomics_kernels::segment::{
    segment_cells, segment_nuclei, CellParams, Foreground, Illumination, NucleiParams, ThresholdMethod,
};

struct Score {
    nuclei: [f64; 2],
    cells: [f64; 2],
    objects: usize,
}

/// A simulated well of 768² fields: the defaults with the given density and touching fraction.
fn plate(seed: u64, density: f64, touching: f64, fields: u32, vignetting: f64) -> SimulatorConfig {
    SimulatorConfig {
        camera: liveomics_adapters::simulator::CameraConfig {
            vignetting,
            ..Default::default()
        },
        seed,
        wells: vec!["C4".into()],
        control_wells: vec!["C4".into()],
        fields_per_well: fields,
        width_px: 768,
        height_px: 768,
        cell_density_per_mm2: density,
        touching_fraction: touching,
        rate_fields_per_s: 0.0,
        ..SimulatorConfig::default()
    }
}

fn evaluate(seed: u64, density: f64, touching: f64, fields: u32) -> Score {
    let cfg = plate(seed, density, touching, fields, 0.15);
    let np = NucleiParams::from_physical(cfg.nucleus_diameter_um, cfg.pixel_size_um).unwrap();
    score(cfg, &np, &CellParams::default())
}

fn evaluate_with(seed: u64, density: f64, touching: f64, fields: u32, vignetting: f64, correct: bool) -> Score {
    let cfg = plate(seed, density, touching, fields, vignetting);
    let mut np = NucleiParams::from_physical(cfg.nucleus_diameter_um, cfg.pixel_size_um).unwrap();
    np.foreground = Foreground::Global(ThresholdMethod::Otsu);
    np.illumination = correct.then(|| {
        Illumination::for_nucleus_px(
            cfg.nucleus_diameter_um / cfg.pixel_size_um,
            cfg.camera.offset_adu as f32,
        )
    });
    score(cfg, &np, &CellParams::default())
}

fn score(cfg: SimulatorConfig, np: &NucleiParams, cp: &CellParams) -> Score {
    let sim = Simulator::new(cfg.clone()).unwrap();
    let well = WellId::parse("C4", sim.plan().format).unwrap();
    let (mut tp_n, mut all_n, mut tp_c, mut all_c) = ([0usize; 2], [0usize; 2], [0usize; 2], [0usize; 2]);
    let mut objects = 0;
    for f in 0..cfg.fields_per_well {
        let field = sim.render(well, f, 0);
        let (w, h) = (field.width, field.height);
        let (nuclei, _) = segment_nuclei(&field.channels[0], w, h, np).unwrap();
        let er = sim.plan().channels.iter().position(|c| c.name == "ER").unwrap();
        let cells = segment_cells(&nuclei, &field.channels[er], w, h, cp).unwrap();
        let mn = match_labels(&nuclei, &field.nuclei_labels, &[0.5, 0.7]).unwrap();
        let mc = match_labels(&cells, &field.cell_labels, &[0.5, 0.7]).unwrap();
        for k in 0..2 {
            tp_n[k] += mn[k].tp;
            all_n[k] += mn[k].tp + mn[k].fp + mn[k].fn_;
            tp_c[k] += mc[k].tp;
            all_c[k] += mc[k].tp + mc[k].fp + mc[k].fn_;
        }
        objects += field.cells.len();
    }
    let ap = |tp: [usize; 2], all: [usize; 2]| [0, 1].map(|k| tp[k] as f64 / all[k].max(1) as f64);
    Score {
        nuclei: ap(tp_n, all_n),
        cells: ap(tp_c, all_c),
        objects,
    }
}

#[test]
fn ap_on_held_out_seeds_sparse_and_confluent() {
    for (name, seed, density, touching) in [
        ("sparse", 9001, 250.0, 0.05),
        ("sparse", 9011, 250.0, 0.05),
        ("confluent", 9002, 900.0, 0.35),
        ("confluent", 9012, 900.0, 0.35),
    ] {
        let s = evaluate(seed, density, touching, 3);
        eprintln!(
            "{name} (seed {seed}): {} cells; nuclei AP@0.5 {:.3} AP@0.7 {:.3}; cells AP@0.5 {:.3} AP@0.7 {:.3}",
            s.objects, s.nuclei[0], s.nuclei[1], s.cells[0], s.cells[1]
        );
        assert!(s.objects > 50, "{name}: too few cells to judge");
        assert!(s.nuclei[0] >= 0.90, "{name}: nuclei AP@0.5 {:.3}", s.nuclei[0]);
        assert!(s.cells[0] >= 0.85, "{name}: cells AP@0.5 {:.3}", s.cells[0]);
    }
}

/// Strong vignetting (corners at 40 % of the centre): with one global threshold, dividing the
/// estimated illumination out of the nuclear channel recovers what the corners lose, and costs
/// nothing at the default vignetting. The default local foreground needs no correction.
#[test]
fn illumination_correction_recovers_vignetted_corners() {
    let seed = 9021;
    let plain = evaluate_with(seed, 500.0, 0.15, 2, 0.6, false);
    let corrected = evaluate_with(seed, 500.0, 0.15, 2, 0.6, true);
    let default_plain = evaluate_with(seed, 500.0, 0.15, 2, 0.15, false);
    let default_corrected = evaluate_with(seed, 500.0, 0.15, 2, 0.15, true);
    let cfg = plate(seed, 500.0, 0.15, 2, 0.6);
    let np = NucleiParams::from_physical(cfg.nucleus_diameter_um, cfg.pixel_size_um).unwrap();
    let local = score(cfg, &np, &CellParams::default());
    eprintln!(
        "vignetting 0.6, otsu: nuclei AP@0.5 {:.3} -> {:.3}, cells {:.3} -> {:.3}; vignetting 0.15: nuclei {:.3} -> {:.3}, cells {:.3} -> {:.3}; vignetting 0.6, local, uncorrected: nuclei {:.3}, cells {:.3}",
        plain.nuclei[0], corrected.nuclei[0], plain.cells[0], corrected.cells[0],
        default_plain.nuclei[0], default_corrected.nuclei[0], default_plain.cells[0], default_corrected.cells[0],
        local.nuclei[0], local.cells[0]
    );
    assert!(
        corrected.nuclei[0] >= 0.90,
        "corrected nuclei AP@0.5 {:.3}",
        corrected.nuclei[0]
    );
    assert!(corrected.nuclei[0] > plain.nuclei[0] + 0.02 || corrected.cells[0] > plain.cells[0] + 0.02);
    assert!(default_corrected.nuclei[0] >= 0.90);
    assert!(local.nuclei[0] >= 0.90, "local nuclei AP@0.5 {:.3}", local.nuclei[0]);
}

/// The case one global threshold fails on real images (DSB2018): nuclear stain falling to 15 %
/// across the field and bright mitotic nuclei beside dim interphase ones, sparse and clustered.
/// The default local foreground keeps the dim nuclei; Otsu, printed beside it, loses them.
#[test]
fn dim_nuclei_beside_bright_ones_and_clusters() {
    for (name, seed, density, touching) in [
        ("uneven, sparse", 9031, 300.0, 0.05),
        ("uneven, clustered", 9032, 900.0, 0.5),
    ] {
        let cfg = SimulatorConfig {
            nuclear_stain_gradient: 0.85,
            mitotic_fraction: 0.1,
            mitotic_brightness: 3.0,
            ..plate(seed, density, touching, 2, 0.15)
        };
        let mut np = NucleiParams::from_physical(cfg.nucleus_diameter_um, cfg.pixel_size_um).unwrap();
        let local = score(cfg.clone(), &np, &CellParams::default());
        np.foreground = Foreground::Global(ThresholdMethod::Otsu);
        let otsu = score(cfg, &np, &CellParams::default());
        eprintln!(
            "{name} (seed {seed}): {} cells; nuclei AP@0.5/0.7 local {:.3}/{:.3}, otsu {:.3}/{:.3}; cells AP@0.5 local {:.3}, otsu {:.3}",
            local.objects, local.nuclei[0], local.nuclei[1], otsu.nuclei[0], otsu.nuclei[1], local.cells[0], otsu.cells[0]
        );
        assert!(local.objects > 50, "{name}: too few cells to judge");
        assert!(
            local.nuclei[0] >= 0.85,
            "{name}: local nuclei AP@0.5 {:.3}",
            local.nuclei[0]
        );
        assert!(
            local.nuclei[0] > otsu.nuclei[0] + 0.1,
            "{name}: local {:.3} vs otsu {:.3}",
            local.nuclei[0],
            otsu.nuclei[0]
        );
    }
}

/// How the cell defaults were chosen: a sweep on tuning seed 77, confluent (never on the held-out
/// seeds above). `cargo test --release -p liveomics --test segmentation_ap -- --ignored --nocapture`
/// On 2026-11-21 every setting gave cells AP@0.5 0.848-0.860; the defaults (0.3, 1.0) gave 0.860.
#[test]
#[ignore = "tuning sweep, minutes; run by hand"]
fn sweep_cell_parameters_on_the_tuning_seed() {
    for scale in [0.15f32, 0.2, 0.3, 0.45] {
        for weight in [0.6f32, 1.0, 1.6, 2.5] {
            let cp = CellParams {
                threshold_scale: scale,
                spatial_weight: weight,
                ..CellParams::default()
            };
            let cfg = plate(77, 900.0, 0.35, 3, 0.15);
            let np = NucleiParams::from_physical(cfg.nucleus_diameter_um, cfg.pixel_size_um).unwrap();
            let s = score(cfg, &np, &cp);
            eprintln!(
                "threshold_scale {scale} spatial_weight {weight}: cells AP@0.5 {:.3} AP@0.7 {:.3}",
                s.cells[0], s.cells[1]
            );
        }
    }
}
