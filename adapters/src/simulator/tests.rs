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
