//! Fields to the model's pixel size and labels back: the network was trained at one scale, and
//! its seeds, windows and offsets are all in its pixels, so a field at another pixel size is
//! resampled before and the labels after.

use rayon::prelude::*;

/// The size of a `width x height` field at `factor` model pixels per field pixel (at least 1).
pub fn scaled_size(width: usize, height: usize, factor: f64) -> (usize, usize) {
    let s = |n: usize| ((n as f64 * factor).round() as usize).max(1);
    (s(width), s(height))
}

/// Linear interpolation between pixel centres (edges clamped), as scikit-image's `resize` with
/// `order=1` and no anti-aliasing.
pub fn resize_linear(src: &[f32], width: usize, height: usize, to_w: usize, to_h: usize) -> Vec<f32> {
    if (to_w, to_h) == (width, height) {
        return src.to_vec();
    }
    let taps = |from: usize, to: usize| -> Vec<(usize, usize, f32)> {
        let r = from as f64 / to as f64;
        (0..to)
            .map(|i| {
                let x = ((i as f64 + 0.5) * r - 0.5).clamp(0.0, (from - 1) as f64);
                let x0 = x.floor() as usize;
                let x1 = (x0 + 1).min(from - 1);
                (x0, x1, (x - x0 as f64) as f32)
            })
            .collect()
    };
    let (xs, ys) = (taps(width, to_w), taps(height, to_h));
    let mut out = vec![0f32; to_w * to_h];
    out.par_chunks_mut(to_w).zip(&ys).for_each(|(row, &(y0, y1, fy))| {
        let (a, b) = (&src[y0 * width..(y0 + 1) * width], &src[y1 * width..(y1 + 1) * width]);
        for (o, &(x0, x1, fx)) in row.iter_mut().zip(&xs) {
            let top = a[x0] + (a[x1] - a[x0]) * fx;
            let bottom = b[x0] + (b[x1] - b[x0]) * fx;
            *o = top + (bottom - top) * fy;
        }
    });
    out
}

/// Nearest-neighbour resampling of a label image (labels must not be blended).
pub fn resize_labels(src: &[u32], width: usize, height: usize, to_w: usize, to_h: usize) -> Vec<u32> {
    if (to_w, to_h) == (width, height) {
        return src.to_vec();
    }
    let index = |from: usize, to: usize| -> Vec<usize> {
        let r = from as f64 / to as f64;
        (0..to)
            .map(|i| (((i as f64 + 0.5) * r) as usize).min(from - 1))
            .collect()
    };
    let (xs, ys) = (index(width, to_w), index(height, to_h));
    let mut out = vec![0u32; to_w * to_h];
    out.par_chunks_mut(to_w).zip(&ys).for_each(|(row, &y)| {
        let line = &src[y * width..(y + 1) * width];
        for (o, &x) in row.iter_mut().zip(&xs) {
            *o = line[x];
        }
    });
    out
}
