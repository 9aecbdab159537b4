use super::*;

fn small() -> SimulatorConfig {
    SimulatorConfig {
        width_px: 256,
        height_px: 256,
        ..Default::default()
    }
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let a = Simulator::new(small()).unwrap();
    let b = Simulator::new(small()).unwrap();
    let well = a.plan().wells[1];
    let fa = a.render(well, 1, 0);
    let fb = b.render(well, 1, 0);
    assert_eq!(fa.channels, fb.channels);
    assert_eq!(fa.nuclei_labels, fb.nuclei_labels);
    let c = Simulator::new(SimulatorConfig { seed: 2, ..small() }).unwrap();
    assert_ne!(c.render(well, 1, 0).channels[0], fa.channels[0]);
    assert_ne!(a.render(well, 0, 0).channels[0], fa.channels[0]);
}

#[test]
fn truth_is_consistent_with_label_images() {
    let s = Simulator::new(small()).unwrap();
    let f = s.render(s.plan().wells[0], 0, 0);
    assert!(!f.cells.is_empty());
    let max_label = f.nuclei_labels.iter().copied().max().unwrap();
    assert_eq!(max_label as usize, f.cells.len());
    for c in &f.cells {
        let n = f.nuclei_labels.iter().filter(|&&l| l == c.label).count() as u64;
        let m = f.cell_labels.iter().filter(|&&l| l == c.label).count() as u64;
        assert_eq!(n, c.nucleus_area_px);
        assert_eq!(m, c.cell_area_px);
        assert!(m >= n, "cell {} smaller than its nucleus", c.label);
        assert_eq!(c.expression.len(), s.genes().names.len());
    }
    // Every nucleus pixel lies inside its own cell.
    assert!(f
        .nuclei_labels
        .iter()
        .zip(&f.cell_labels)
        .all(|(&n, &c)| n == 0 || n == c));
    // Nuclei are bright in DAPI: mean inside well above mean outside.
    let (mut inside, mut ni, mut outside, mut no) = (0f64, 0f64, 0f64, 0f64);
    for (&l, &v) in f.nuclei_labels.iter().zip(&f.channels[0]) {
        if l != 0 {
            inside += v as f64;
            ni += 1.0;
        } else {
            outside += v as f64;
            no += 1.0;
        }
    }
    assert!(
        inside / ni > 5.0 * (outside / no),
        "{} vs {}",
        inside / ni,
        outside / no
    );
}

#[test]
fn control_wells_are_unshifted_and_invisible_genes_ignore_visible_latent() {
    let s = Simulator::new(small()).unwrap();
    assert_eq!(s.well_shift(s.plan().wells[0]), [0.0; LATENT]);
    assert_ne!(s.well_shift(s.plan().wells[1]), [0.0; LATENT]);
    let g = s.genes();
    for (i, w) in g.weights.iter().enumerate() {
        let vis: f64 = w[..VISIBLE_LATENT].iter().map(|v| v.abs()).sum();
        let hid: f64 = w[VISIBLE_LATENT..].iter().map(|v| v.abs()).sum();
        if g.visible[i] {
            assert_eq!(hid, 0.0);
        } else {
            assert_eq!(vis, 0.0);
        }
    }
}

/// The stain gradient dims the right-hand nuclei and nothing else: same cells, same labels.
#[test]
fn nuclear_stain_gradient_dims_nuclei_across_the_field() {
    let even = Simulator::new(small()).unwrap();
    let uneven = Simulator::new(SimulatorConfig {
        nuclear_stain_gradient: 0.8,
        ..small()
    })
    .unwrap();
    let well = WellId::parse("B2", even.plan().format).unwrap();
    let (a, b) = (even.render(well, 0, 0), uneven.render(well, 0, 0));
    assert_eq!(a.nuclei_labels, b.nuclei_labels);
    let w = a.width;
    let offset = CameraConfig::default().offset_adu;
    // Mean nuclear signal above the offset per half of the field, uneven / even.
    let ratio = |left: bool| {
        let (mut sa, mut sb) = (0.0, 0.0);
        for (i, &l) in a.nuclei_labels.iter().enumerate() {
            if l != 0 && ((i % w) < w / 2) == left {
                sa += f64::from(a.channels[0][i]) - offset;
                sb += f64::from(b.channels[0][i]) - offset;
            }
        }
        sb / sa
    };
    // 0.2^t averaged over t in [0, 0.5] is 0.69, over [0.5, 1] 0.31 (plus noise and cells
    // straddling the middle).
    let (left, right) = (ratio(true), ratio(false));
    assert!(
        (0.6..0.8).contains(&left) && (0.22..0.42).contains(&right),
        "left {left:.2} right {right:.2}"
    );
}

#[test]
fn invalid_config_reports_every_problem() {
    let cfg = SimulatorConfig {
        plate: "a/b".into(),
        wells: vec!["Z99".into()],
        width_px: 10,
        mitotic_brightness: 0.5,
        nuclear_stain_gradient: f64::NAN,
        ..Default::default()
    };
    let keys: Vec<String> = cfg.validate().into_iter().map(|i| i.key).collect();
    assert_eq!(
        keys,
        vec![
            "plate",
            "wells[0]",
            "width_px",
            "mitotic_brightness",
            "nuclear_stain_gradient"
        ]
    );
}

#[test]
fn values_no_microscope_has_are_refused_before_they_reach_an_allocation() {
    let cfg = SimulatorConfig {
        pixel_size_um: 1e-9,
        cell_density_per_mm2: 1e300,
        rate_fields_per_s: 1e-300,
        timepoints: u32::MAX,
        proteins: vec![ProteinChannel {
            name: "../x".into(),
            localization: Localization::Nuclear,
        }],
        ..Default::default()
    };
    let keys: Vec<String> = cfg.validate().into_iter().map(|i| i.key).collect();
    for key in [
        "timepoints",
        "pixel_size_um",
        "cell_diameter_um",
        "cell_density_per_mm2",
        "rate_fields_per_s",
        "proteins[0].name",
    ] {
        assert!(keys.contains(&key.to_string()), "{key} not in {keys:?}");
    }
}

#[test]
fn a_relocalization_moves_the_protein_in_its_wells_only_and_the_truth_says_so() {
    let proteins = vec![
        ProteinChannel {
            name: "HNRNPA1".into(),
            localization: Localization::Nuclear,
        },
        ProteinChannel {
            name: "TOMM20".into(),
            localization: Localization::Mitochondria,
        },
    ];
    let plain = SimulatorConfig {
        proteins: proteins.clone(),
        ..small()
    };
    let moved = SimulatorConfig {
        relocalization: vec![Relocalization {
            protein: "HNRNPA1".into(),
            to: Localization::Cytoplasmic,
            wells: vec!["B3".into()],
            fraction: 0.6,
        }],
        ..plain.clone()
    };
    let (a, b) = (Simulator::new(plain).unwrap(), Simulator::new(moved).unwrap());
    let (b2, b3) = (a.plan().wells[0], a.plan().wells[1]);
    // Other wells, and other proteins of the relocalizing well, render the same bytes.
    assert_eq!(a.render(b2, 0, 0).channels, b.render(b2, 0, 0).channels);
    let (fa, fb) = (a.render(b3, 0, 0), b.render(b3, 0, 0));
    assert_eq!(fa.channels[..3], fb.channels[..3], "landmarks are untouched");
    assert_eq!(fa.channels[4], fb.channels[4], "TOMM20 is untouched");
    assert_ne!(fa.channels[3], fb.channels[3]);
    let mean = |f: &SimulatedField, p: usize, k: usize| {
        let v: Vec<f64> = f
            .cells
            .iter()
            .map(|c| c.localization[p][k])
            .filter(|v| v.is_finite())
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    // Nuclear at home: all of its signal in the nucleus; relocalized: about 60 % in the cytoplasm.
    assert!(mean(&fa, 0, 0) > 0.999, "{}", mean(&fa, 0, 0));
    assert!((0.45..0.75).contains(&mean(&fb, 0, 1)), "{}", mean(&fb, 0, 1));
    assert!(mean(&fb, 1, 4) > 0.999, "TOMM20 is all puncta: {}", mean(&fb, 1, 4));
    let m: f64 = fb.cells.iter().map(|c| c.relocalized[0]).sum::<f64>() / fb.cells.len() as f64;
    assert!((0.5..0.7).contains(&m), "mean relocalized share {m}");
    for c in &fb.cells {
        let s: f64 = c.localization[0].iter().sum();
        assert!((s - 1.0).abs() < 1e-9);
    }
    let bad = SimulatorConfig {
        relocalization: vec![Relocalization {
            protein: "XYZ".into(),
            to: Localization::Nuclear,
            wells: vec!["Z99".into()],
            fraction: 2.0,
        }],
        ..small()
    };
    let keys: Vec<String> = bad.validate().iter().map(|e| e.to_string()).collect();
    for k in [
        "relocalization[0].protein",
        "relocalization[0].fraction",
        "relocalization[0].wells[0]",
    ] {
        assert!(keys.iter().any(|e| e.contains(k)), "{k} not in {keys:?}");
    }
}

/// Translated proteins follow their genes with their own noise, half from visible genes and half
/// from invisible ones, and change nothing else a plate renders.
#[test]
fn translated_proteins_follow_their_genes_and_leave_the_images_alone() {
    let plain = Simulator::new(small()).unwrap();
    let with = Simulator::new(SimulatorConfig {
        translated_proteins: 6,
        ..small()
    })
    .unwrap();
    assert_eq!(plain.genes().weights, with.genes().weights);
    let t = &with.genes().translation;
    assert_eq!(t.len(), 6);
    for (j, p) in t.iter().enumerate() {
        assert_eq!(p.visible, j % 2 == 0, "{}", p.name);
        assert!(
            p.genes.iter().all(|&g| with.genes().visible[g] == p.visible),
            "{}",
            p.name
        );
    }
    let well = WellId::parse("B3", plain.plan().format).unwrap();
    let (a, b) = (plain.render(well, 0, 0), with.render(well, 0, 0));
    assert_eq!(a.channels, b.channels);
    assert!(a.cells.iter().all(|c| c.translated.is_empty()));
    // ln p is linear in its genes' ln e up to the protein's own noise: the residual of that line
    // has the protein's noise_sd. Cells of several fields, for a stable spread.
    let cells: Vec<_> = (0..6).flat_map(|f| with.render(well, f, 0).cells).collect();
    for (j, p) in t.iter().enumerate() {
        let drive: Vec<f64> = cells
            .iter()
            .map(|c| {
                p.genes
                    .iter()
                    .zip(&p.weights)
                    .map(|(&g, w)| w * c.expression[g].ln())
                    .sum()
            })
            .collect();
        let resid: Vec<f64> = cells
            .iter()
            .zip(&drive)
            .map(|(c, d)| c.translated[j].ln() - p.offset - p.gain * d)
            .collect();
        let n = resid.len() as f64;
        let mean = resid.iter().sum::<f64>() / n;
        let sd = (resid.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(n > 60.0, "{n} cells");
        assert!(
            mean.abs() < 0.1 && (sd / p.noise_sd - 1.0).abs() < 0.3,
            "{}: residual {mean} ± {sd}",
            p.name
        );
    }
    // Deterministic: the same cell gets the same abundance again.
    assert_eq!(with.render(well, 0, 0).cells[0].translated, b.cells[0].translated);
}

#[test]
fn only_a_positive_rate_is_a_pace_that_gives_fields_deadlines() {
    let at = |rate_fields_per_s| {
        let cfg = SimulatorConfig {
            rate_fields_per_s,
            ..small()
        };
        Simulator::new(cfg).unwrap().paced()
    };
    assert!(!at(0.0));
    assert!(at(2.0));
}
