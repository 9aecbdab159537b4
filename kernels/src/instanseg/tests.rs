use super::merge::labels;
use super::resolve::{cells_and_nuclei, fastremap};
use super::window::{dilate, flood, Window};
use super::*;

#[test]
fn linspace_counts_each_half_from_its_own_end() {
    let v = linspace(0.0, 64.0, 257);
    assert_eq!((v[0], v[128], v[256]), (0.0, 32.0, 64.0));
    assert_eq!(linspace(2.0, 9.0, 1), vec![2.0]);
}

#[test]
fn a_plateau_has_one_seed_its_first_pixel_and_the_threshold_is_strict() {
    let (w, h) = (7, 5);
    let mut m = vec![0.1f32; w * h];
    m[2 * w + 2] = 0.9;
    m[2 * w + 3] = 0.9;
    m[4 * w + 6] = 0.7;
    assert_eq!(peaks(&m, w, h, 1, 0.7), vec![(2, 2)]);
    m[4 * w + 6] = 0.71;
    assert_eq!(peaks(&m, w, h, 1, 0.7), vec![(2, 2), (4, 6)]);
    // Within distance 3 the plateau's first pixel also dominates the corner.
    assert_eq!(peaks(&m, w, h, 3, 0.7), vec![(2, 2)]);
}

#[test]
fn flood_stops_after_its_step_limit_and_starts_from_a_seed_outside_the_mask() {
    let side = 8;
    let mut mask = vec![false; side * side];
    mask[1..side].fill(true); // a line on row 0 from column 1
    let all = flood(&mask, side, &[0], side);
    assert_eq!(all.iter().filter(|&&b| b).count(), 7);
    assert!(!all[0], "the seed is not in the mask");
    let three = flood(&mask, side, &[0], 3);
    assert_eq!(three.iter().filter(|&&b| b).count(), 3);
}

#[test]
fn dilation_is_chessboard_and_clipped() {
    let side = 5;
    let mut m = vec![false; side * side];
    m[0] = true;
    let d = dilate(&m, side, 1);
    assert_eq!(d.iter().filter(|&&b| b).count(), 4);
}

#[test]
fn fastremap_ranks_values_and_leaves_background() {
    assert_eq!(fastremap(&[0, 7, 7, 3, 0]), vec![0, 2, 2, 1, 0]);
    assert_eq!(fastremap(&[0, 0]), vec![0, 0]);
}

/// A 1-D "image" row of labels: nucleus and cell layout made by hand.
#[test]
fn cells_keep_their_largest_nucleus_and_nothing_is_lost() {
    // cell 1 holds nuclei 1 (3 px) and 2 (2 px); cell 2 has no nucleus; nucleus 3 has no cell.
    let nuclei = [1, 1, 1, 0, 2, 2, 0, 0, 0, 0, 3, 3];
    let cells = [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 0, 0];
    let (n, c) = cells_and_nuclei(&nuclei, &cells);
    // Nucleus 1 is kept (label 1) and names its cell; 2 and 3 come after it, each its own cell.
    assert_eq!(n, vec![1, 1, 1, 0, 2, 2, 0, 0, 0, 0, 3, 3]);
    assert_eq!(&c[..7], &[1, 1, 1, 1, 2, 2, 1]);
    assert_eq!(&c[10..], &[3, 3]);
    // The unnucleated cell keeps its pixels under one label after every other one.
    assert!(c[7] > 3 && c[7] == c[8] && c[8] == c[9]);
}

fn params() -> InstanSegParams {
    InstanSegParams {
        mask_threshold: 0.53,
        peak_distance: 5,
        seed_threshold: 0.7,
        overlap_threshold: 0.3,
        window_size: 8,
        cleanup_fragments: true,
        resolve_cell_and_nucleus: true,
        // Scores a pixel by its embedding distance: logit = 4 - |dx| - |dy| (through ReLUs).
        classifier: vec![
            Linear {
                inputs: 4,
                outputs: 4,
                weight: vec![1., 0., 0., 0., -1., 0., 0., 0., 0., 1., 0., 0., 0., -1., 0., 0.],
                bias: vec![0.; 4],
            },
            Linear {
                inputs: 4,
                outputs: 1,
                weight: vec![-1.; 4],
                bias: vec![4.0],
            },
        ],
    }
}

#[test]
fn windows_overlapping_enough_are_one_object_numbered_by_the_first() {
    let p = params();
    let (w, h) = (40, 20);
    let mk = |top: usize, left: usize, side: usize| {
        let mut score = vec![0.0; side * side];
        for i in 2..side - 2 {
            for j in 2..side - 2 {
                score[i * side + j] = 0.9;
            }
        }
        Window { top, left, side, score }
    };
    // Windows 1 and 2 share most of their area; window 3 stands apart.
    let windows = [mk(0, 0, 12), mk(1, 1, 12), mk(0, 25, 12)];
    let l = labels(&windows, w, h, &p);
    assert_eq!(l[3 * w + 3], 1);
    assert_eq!(l[10 * w + 10], 1, "window 2's own pixels join window 1's object");
    assert_eq!(l[5 * w + 30], 3);
}

#[test]
fn parameters_are_checked() {
    let mut p = params();
    assert!(p.validate().is_ok());
    p.classifier[1].inputs = 3;
    assert!(p.validate().is_err());
    let mut p = params();
    p.mask_threshold = 1.5;
    assert!(p.validate().is_err());
}

#[test]
fn resampling_keeps_a_ramp_and_labels_stay_labels() {
    let (w, h) = (8, 4);
    let ramp: Vec<f32> = (0..w * h).map(|i| (i % w) as f32).collect();
    let up = scale::resize_linear(&ramp, w, h, 16, 8);
    assert!((up[16 + 8] - 3.75).abs() < 1e-6, "{}", up[24]);
    let labels: Vec<u32> = (0..w * h).map(|i| (i % w / 4) as u32 + 1).collect();
    let down = scale::resize_labels(&labels, w, h, 4, 2);
    assert_eq!(down, vec![1, 1, 2, 2, 1, 1, 2, 2]);
    assert_eq!(scale::scaled_size(1000, 10, 1.3), (1300, 13));
}
