use super::crop::resample_plane;
use super::distance::running_max_1d;
use super::*;

#[test]
fn downsample_means_and_keeps_labels() {
    let img: Vec<u16> = vec![0, 4, 8, 1, 3, 9, 100, 100, 100];
    let (d, w, h) = downsample2x_mean(&img, 3, 3).unwrap();
    assert_eq!((w, h), (2, 2));
    assert_eq!(d, vec![2, 9, 100, 100]);
    let labels: Vec<u32> = vec![1, 1, 2, 1, 1, 2, 3, 3, 3];
    let (l, _, _) = downsample2x_nearest(&labels, 3, 3).unwrap();
    assert_eq!(l, vec![1, 2, 3, 3]);
}

#[test]
fn otsu_separates_two_levels() {
    let mut v = vec![10.0f32; 1000];
    v.extend(vec![200.0f32; 500]);
    let t = otsu_threshold(&v);
    assert!(t > 10.0 && t < 200.0, "{t}");
}

#[test]
fn edt_matches_brute_force() {
    let (w, h) = (23, 17);
    let mask: Vec<bool> = (0..w * h).map(|i| (i * 7919 % 13) != 0).collect();
    let d = distance_transform(&mask, w, h).unwrap();
    for y in 0..h {
        for x in 0..w {
            let mut best = f32::INFINITY;
            for yy in 0..h {
                for xx in 0..w {
                    if !mask[yy * w + xx] {
                        let dd = ((x as f32 - xx as f32).powi(2) + (y as f32 - yy as f32).powi(2)).sqrt();
                        best = best.min(dd);
                    }
                }
            }
            let got = d[y * w + x];
            assert!((got - best).abs() < 1e-4, "({x},{y}) {got} vs {best}");
        }
    }
}

#[test]
fn components_count_diagonal_only_with_eight() {
    let mask = vec![true, false, false, true];
    assert_eq!(connected_components(&mask, 2, 2, false).unwrap().1, 2);
    assert_eq!(connected_components(&mask, 2, 2, true).unwrap().1, 1);
}

#[test]
fn watershed_splits_two_touching_discs() {
    let (w, h) = (60, 30);
    let mut mask = vec![false; w * h];
    for y in 0..h {
        for x in 0..w {
            let d1 = ((x as f32 - 18.0).powi(2) + (y as f32 - 15.0).powi(2)).sqrt();
            let d2 = ((x as f32 - 40.0).powi(2) + (y as f32 - 15.0).powi(2)).sqrt();
            mask[y * w + x] = d1 < 12.0 || d2 < 12.0;
        }
    }
    let dist = distance_transform(&mask, w, h).unwrap();
    let (markers, n) = peak_markers(&dist, &mask, w, h, 5, 3.0).unwrap();
    assert_eq!(n, 2);
    let elev: Vec<f32> = dist.iter().map(|d| -d).collect();
    let labels = watershed(&elev, &markers, &mask, w, h).unwrap();
    assert_ne!(labels[15 * w + 18], labels[15 * w + 40]);
    assert!(labels.iter().zip(&mask).all(|(l, m)| (*l != 0) == *m));
}

#[test]
fn blur_preserves_mean_and_rejects_bad_shape() {
    let v: Vec<f32> = (0..100).map(|i| (i % 10) as f32).collect();
    let b = gaussian_blur(&v, 10, 10, 1.5).unwrap();
    let (m1, m2) = (v.iter().sum::<f32>(), b.iter().sum::<f32>());
    assert!((m1 - m2).abs() / m1 < 1e-3);
    assert!(gaussian_blur(&v, 11, 10, 1.0).is_err());
}

#[test]
fn filter_by_area_renumbers() {
    // 5 x 3: only the middle row's middle pixels are away from the border.
    let l = vec![
        0, 0, 0, 0, 4, //
        0, 5, 5, 9, 0, //
        7, 7, 7, 7, 0,
    ];
    let (out, n) = filter_by_area(&l, 5, 2, 1, 100);
    // 9 is interior and below 2 px: dropped; 4 touches the border and keeps its 1 px.
    assert_eq!(n, 3);
    assert_eq!(out, vec![0, 0, 0, 0, 1, 0, 2, 2, 0, 0, 3, 3, 3, 3, 0]);
    let (_, strict) = filter_by_area(&l, 5, 2, 2, 100);
    assert_eq!(strict, 2);
    assert_eq!(filter_by_area(&[], 5, 2, 2, 100), (vec![], 0));
}

#[test]
fn normalize_maps_percentiles_to_unit_range() {
    let v: Vec<u16> = (0..1000).map(|i| 100 + i as u16).collect();
    let n = normalize_u16(&v, 100, 10, 0.0, 100.0).unwrap();
    assert_eq!(n[0], 0.0);
    assert_eq!(n[999], 1.0);
    assert!(normalize_u16(&v, 100, 10, 50.0, 10.0).is_err());
}

#[test]
fn triangle_sits_at_the_foot_of_the_background_peak() {
    // 95 % background around 100 (spread 100..110), 5 % dim foreground spread 150..1000.
    let mut v: Vec<f32> = (0..9500).map(|i| 100.0 + (i % 11) as f32).collect();
    v.extend((0..500).map(|i| 150.0 + (i as f32) * 1.7));
    let t = triangle_threshold(&v);
    assert!(t > 105.0 && t < 200.0, "triangle {t}");
    assert_eq!(triangle_threshold(&[3.0; 10]), 3.0);
    assert_eq!(otsu_threshold(&[f32::NAN, 2.0, 2.0]), 2.0);
}

#[test]
fn running_max_matches_naive() {
    let src: Vec<f32> = (0..37).map(|i| ((i * 7919) % 23) as f32).collect();
    for r in [0usize, 1, 2, 5, 40] {
        let mut out = vec![0f32; src.len()];
        let (mut g, mut h) = (vec![0f32; src.len() + 2 * r], vec![0f32; src.len() + 2 * r]);
        running_max_1d(&src, &mut out, r, &mut g, &mut h);
        for (x, &o) in out.iter().enumerate() {
            let naive = src[x.saturating_sub(r)..(x + r + 1).min(src.len())]
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(o, naive, "r {r} x {x}");
        }
    }
}

#[test]
fn crops_are_centred_and_zero_padded() {
    let (w, h) = (5, 4);
    let a: Vec<u16> = (0..20).collect();
    let b: Vec<u16> = (100..120).collect();
    let out = crop_gather_u16(&[&a, &b], w, h, &[(2.0, 2.0), (0.0, 0.0)], 3).unwrap();
    assert_eq!(out.len(), 2 * 2 * 9);
    assert_eq!(&out[..9], &[6.0, 7.0, 8.0, 11.0, 12.0, 13.0, 16.0, 17.0, 18.0]);
    assert_eq!(&out[9..12], &[106.0, 107.0, 108.0]);
    assert_eq!(&out[18..27], &[0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 5.0, 6.0]);
    // A crop wider than the image on both sides, and one entirely outside it.
    let wide = crop_gather_u16(&[&a], w, h, &[(2.0, 1.0), (40.0, 40.0)], 9).unwrap();
    assert_eq!(&wide[4 * 9..5 * 9], &[0.0, 0.0, 5.0, 6.0, 7.0, 8.0, 9.0, 0.0, 0.0]);
    assert!(wide[81..].iter().all(|&v| v == 0.0));
}

#[test]
fn sparse_peak_labels_equal_dense_components() {
    let (w, h) = (97, 61);
    // Smooth bumps with plateaus (quantised) so that peaks are sometimes several pixels.
    let src: Vec<f32> = (0..w * h)
        .map(|i| {
            let (x, y) = ((i % w) as f32, (i / w) as f32);
            (((x * 0.31).sin() + (y * 0.23).cos() + (x * y * 0.002).sin()) * 4.0).round()
        })
        .collect();
    let mask: Vec<bool> = (0..w * h).map(|i| i % 13 != 0).collect();
    let (labels, n) = peak_markers(&src, &mask, w, h, 3, -2.0).unwrap();
    let maxed = max_filter(&src, w, h, 3).unwrap();
    let dense: Vec<bool> = (0..w * h)
        .map(|i| mask[i] && src[i] >= -2.0 && src[i] >= maxed[i])
        .collect();
    let (want, m) = connected_components(&dense, w, h, true).unwrap();
    assert!(n > 5);
    assert_eq!((labels, n), (want, m));
}

#[test]
fn per_plane_sees_padding_and_its_channel() {
    let (w, h) = (5, 4);
    let a: Vec<u16> = (0..20).collect();
    let b: Vec<u16> = (100..120).collect();
    let spec = CropSpec { size: 3, scale: 1.0 };
    let f = |c: usize, p: &mut [f32]| p.iter_mut().for_each(|v| *v = (*v - 1.0) / (c as f32 + 2.0));
    let out = crop_gather_u16_with(&[&a, &b], w, h, &[(0.0, 0.0)], spec, &f).unwrap();
    let mut want = crop_gather_u16(&[&a, &b], w, h, &[(0.0, 0.0)], 3).unwrap();
    f(0, &mut want[..9]);
    f(1, &mut want[9..]);
    assert_eq!(out, want);
    assert_eq!(out[0], -0.5);
}

#[test]
fn rescaled_crops_sample_the_field_at_the_scale() {
    // A linear ramp is reproduced exactly by bilinear sampling: value = x + 10 y.
    let (w, h) = (40, 40);
    let ramp: Vec<u16> = (0..w * h).map(|i| ((i % w) + 10 * (i / w)) as u16).collect();
    let spec = CropSpec { size: 4, scale: 2.0 };
    let out = crop_gather_u16_with(&[&ramp], w, h, &[(20.0, 20.0)], spec, &|_, _| {}).unwrap();
    // Samples at 20 + (d - 2 + 0.5) * 2 - 0.5 = 16.5, 18.5, 20.5, 22.5.
    let xs = [16.5f32, 18.5, 20.5, 22.5];
    for (dy, y) in xs.iter().enumerate() {
        for (dx, x) in xs.iter().enumerate() {
            assert!((out[dy * 4 + dx] - (x + 10.0 * y)).abs() < 1e-3, "{dx},{dy}");
        }
    }
    // Scale 1 through the resampling path equals the copying path.
    let one = crop_gather_u16(&[&ramp], w, h, &[(3.0, 37.0)], 8).unwrap();
    let mut plane = vec![0f32; 64];
    resample_plane(&ramp, w, h, (3, 37), CropSpec { size: 8, scale: 1.0 }, &mut plane);
    assert_eq!(one, plane);
    let bad = CropSpec { size: 4, scale: 0.0 };
    assert!(crop_gather_u16_with(&[&ramp], w, h, &[(1.0, 1.0)], bad, &|_, _| {}).is_err());
}
