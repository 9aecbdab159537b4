//! Uneven illumination (vignetting, a tilted lamp, autofluorescence gradients): a smooth
//! background is estimated from the image itself and divided out. Signal and background are lit
//! by the same field, so `(raw - offset) / background` is the signal in units of the local
//! background, the same in the corners as in the centre, and one global threshold fits all of it.

use rayon::prelude::*;

use crate::{check_len, KernelError};

/// Smooth background of a camera image, offset removed: the `percentile` of each `block`² tile
/// (the background between cells, which occupy only part of a tile), then a quadratic surface
/// fitted to the tiles by least squares, refitted once without the tiles it fits worst (tiles
/// full of cells). Illumination falls off smoothly (vignetting is close to quadratic), and a fit
/// extrapolates into the corners where tile averages would lag. At least 1.0 everywhere.
pub fn estimate_background_u16(
    src: &[u16],
    width: usize,
    height: usize,
    offset: f32,
    block: usize,
    percentile: f64,
) -> Result<Vec<f32>, KernelError> {
    check_len("src", src, width, height)?;
    check_tiles(block, percentile)?;
    let first: Vec<f32> = src.iter().map(|&v| v as f32 - offset).collect();
    let b1 = robust_surface(&tile_percentiles(&first, width, height, block, percentile));
    // The percentile of a tile sits low where the illumination slopes across the tile (most of
    // all in the corners): refit once on the image divided by the first surface, where it is flat.
    let ratio: Vec<f32> = first
        .par_chunks(width)
        .enumerate()
        .flat_map_iter(|(y, row)| {
            let v = unit(y as f64 + 0.5, height);
            row.iter()
                .enumerate()
                .map(move |(x, &p)| p / quadratic(&b1, unit(x as f64 + 0.5, width), v).max(1.0) as f32)
        })
        .collect();
    let b2 = robust_surface(&tile_percentiles(&ratio, width, height, block, percentile));
    let mut out = vec![0f32; width * height];
    out.par_chunks_mut(width).enumerate().for_each(|(y, row)| {
        let v = unit(y as f64 + 0.5, height);
        for (x, o) in row.iter_mut().enumerate() {
            let u = unit(x as f64 + 0.5, width);
            *o = (quadratic(&b1, u, v).max(1.0) * quadratic(&b2, u, v)).max(1.0) as f32;
        }
    });
    Ok(out)
}

/// `block >= 4` and a percentile in [0, 100].
pub(crate) fn check_tiles(block: usize, percentile: f64) -> Result<(), KernelError> {
    if block < 4 || !(0.0..=100.0).contains(&percentile) {
        return Err(KernelError::Parameter {
            name: "block/percentile",
            reason: format!("need block >= 4 and 0 <= percentile <= 100, got {block} and {percentile}"),
        });
    }
    Ok(())
}

/// `(u, v, percentile)` of each `block`² tile, u and v in [-1, 1] at the tile centre.
pub(crate) fn tile_percentiles(
    img: &[f32],
    width: usize,
    height: usize,
    block: usize,
    percentile: f64,
) -> Vec<(f64, f64, f64)> {
    let (gw, gh) = (width.div_ceil(block), height.div_ceil(block));
    let q: Vec<f32> = (0..gw * gh)
        .into_par_iter()
        .map(|g| {
            let (x0, y0, x1, y1) = tile(g, width, height, block);
            let mut v: Vec<f32> = Vec::with_capacity((x1 - x0) * (y1 - y0));
            for y in y0..y1 {
                v.extend_from_slice(&img[y * width + x0..y * width + x1]);
            }
            let k = rank(v.len(), percentile);
            *v.select_nth_unstable_by(k, f32::total_cmp).1
        })
        .collect();
    tile_points(&q, width, height, block)
}

/// Tile `g`'s pixel range `[x0, x1) x [y0, y1)` in row-major tile order.
fn tile(g: usize, width: usize, height: usize, block: usize) -> (usize, usize, usize, usize) {
    let gw = width.div_ceil(block);
    let (x0, y0) = ((g % gw) * block, (g / gw) * block);
    (x0, y0, (x0 + block).min(width), (y0 + block).min(height))
}

/// The 0-based rank of the `percentile` among `len` values.
pub(crate) fn rank(len: usize, percentile: f64) -> usize {
    (((len - 1) as f64) * percentile / 100.0).round() as usize
}

/// Each tile's percentile `q` placed at the tile's centre, for the fit (the CUDA back end selects
/// the percentiles on the device).
pub(crate) fn tile_points(q: &[f32], width: usize, height: usize, block: usize) -> Vec<(f64, f64, f64)> {
    q.iter()
        .enumerate()
        .map(|(g, &q)| {
            let (x0, y0, x1, y1) = tile(g, width, height, block);
            (
                unit((x0 + x1) as f64 / 2.0, width),
                unit((y0 + y1) as f64 / 2.0, height),
                q as f64,
            )
        })
        .collect()
}

/// Quadratic fit, refitted once without the tiles beyond three median absolute residuals.
pub(crate) fn robust_surface(tiles: &[(f64, f64, f64)]) -> [f64; 6] {
    let coef = fit_quadratic(tiles);
    if tiles.len() < 12 {
        return coef;
    }
    let res: Vec<f64> = tiles
        .iter()
        .map(|&(u, v, z)| (z - quadratic(&coef, u, v)).abs())
        .collect();
    let mut sorted = res.clone();
    let mid = sorted.len() / 2;
    let mad = *sorted.select_nth_unstable_by(mid, f64::total_cmp).1;
    let keep: Vec<(f64, f64, f64)> = tiles
        .iter()
        .zip(&res)
        .filter(|(_, r)| **r <= 3.0 * mad.max(1e-9))
        .map(|(t, _)| *t)
        .collect();
    if keep.len() >= 6 {
        fit_quadratic(&keep)
    } else {
        coef
    }
}

/// Pixel position to [-1, 1] across the image.
pub(crate) fn unit(p: f64, n: usize) -> f64 {
    2.0 * p / n as f64 - 1.0
}

pub(crate) fn quadratic(c: &[f64; 6], u: f64, v: f64) -> f64 {
    c[0] + c[1] * u + c[2] * v + c[3] * u * u + c[4] * u * v + c[5] * v * v
}

/// Least-squares quadratic surface through `(u, v, z)` points (normal equations, 6x6).
fn fit_quadratic(points: &[(f64, f64, f64)]) -> [f64; 6] {
    let mut a = [[0f64; 7]; 6];
    for &(u, v, z) in points {
        let f = [1.0, u, v, u * u, u * v, v * v];
        for (row, fi) in a.iter_mut().zip(&f) {
            for (x, fj) in row.iter_mut().zip(&f) {
                *x += fi * fj;
            }
            row[6] += fi * z;
        }
    }
    // Gaussian elimination with partial pivoting; a singular system (too few tiles) keeps the
    // constant term only.
    for col in 0..6 {
        let pivot = (col..6)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap_or(col);
        a.swap(col, pivot);
        if a[col][col].abs() < 1e-12 {
            let mean = points.iter().map(|p| p.2).sum::<f64>() / points.len().max(1) as f64;
            return [mean, 0.0, 0.0, 0.0, 0.0, 0.0];
        }
        let pivot_row = a[col];
        for (r, row) in a.iter_mut().enumerate() {
            if r != col {
                let k = row[col] / pivot_row[col];
                for (x, p) in row.iter_mut().zip(&pivot_row).skip(col) {
                    *x -= k * p;
                }
            }
        }
    }
    std::array::from_fn(|i| a[i][6] / a[i][i])
}

/// `(raw - offset) / background - 1`: the image with its illumination divided out (0 = background).
pub fn flatten_u16(
    src: &[u16],
    width: usize,
    height: usize,
    offset: f32,
    block: usize,
) -> Result<Vec<f32>, KernelError> {
    let bg = estimate_background_u16(src, width, height, offset, block, 10.0)?;
    Ok(src
        .par_iter()
        .zip(&bg)
        .map(|(&v, &b)| (v as f32 - offset) / b - 1.0)
        .collect())
}

/// Percentile normalisation of a float image to [0, 1] (NaN counts as 0).
pub fn normalize_f32(src: &[f32], low_percentile: f64, high_percentile: f64) -> Result<Vec<f32>, KernelError> {
    crate::cpu::check_percentiles(low_percentile, high_percentile)?;
    if src.is_empty() {
        return Ok(Vec::new());
    }
    let mut v: Vec<f32> = src.iter().map(|x| if x.is_nan() { 0.0 } else { *x }).collect();
    let at = |p: f64, v: &mut Vec<f32>| {
        let k = rank(v.len(), p);
        *v.select_nth_unstable_by(k, f32::total_cmp).1
    };
    let lo = at(low_percentile, &mut v);
    let hi = at(high_percentile, &mut v);
    let scale = if hi > lo { 1.0 / (hi - lo) } else { 0.0 };
    Ok(src
        .par_iter()
        .map(|&x| {
            if x.is_nan() {
                0.0
            } else {
                ((x - lo) * scale).clamp(0.0, 1.0)
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Background 40 and blobs of 400 photoelectrons under a vignetting that halves the corners,
    /// plus a camera offset of 100.
    fn vignetted(w: usize, h: usize) -> (Vec<u16>, Vec<(usize, usize)>) {
        let mut blobs = Vec::new();
        for by in (40..h - 20).step_by(80) {
            for bx in (40..w - 20).step_by(80) {
                blobs.push((bx, by));
            }
        }
        let mut img = vec![0u16; w * h];
        for y in 0..h {
            for x in 0..w {
                let (dx, dy) = (x as f32 / w as f32 - 0.5, y as f32 / h as f32 - 0.5);
                let v = 1.0 - (dx * dx + dy * dy);
                let mut e = 40.0;
                for &(bx, by) in &blobs {
                    let d2 = ((x as f32 - bx as f32).powi(2) + (y as f32 - by as f32).powi(2)) / 64.0;
                    e += 400.0 * (-d2).exp();
                }
                img[y * w + x] = (100.0 + e * v).round() as u16;
            }
        }
        (img, blobs)
    }

    #[test]
    fn flattening_removes_vignetting() {
        let (w, h) = (400, 400);
        let (img, blobs) = vignetted(w, h);
        let flat = flatten_u16(&img, w, h, 100.0, 64).unwrap();
        // Background is ~0 everywhere, corners included.
        for &(x, y) in &[(5, 5), (395, 5), (160, 160), (5, 395), (395, 395), (80, 320)] {
            let v = flat[y * w + x];
            assert!(v.abs() < 0.15, "background at ({x},{y}) = {v}");
        }
        // Every blob peak is ~10 (400 / 40) wherever it is; raw peaks differ by ~1.6x.
        let peaks: Vec<f32> = blobs.iter().map(|&(x, y)| flat[y * w + x]).collect();
        let raw: Vec<f32> = blobs.iter().map(|&(x, y)| img[y * w + x] as f32 - 100.0).collect();
        let spread =
            |v: &[f32]| v.iter().cloned().fold(f32::MIN, f32::max) / v.iter().cloned().fold(f32::MAX, f32::min);
        assert!(spread(&raw) > 1.4, "raw spread {}", spread(&raw));
        assert!(spread(&peaks) < 1.15, "flattened spread {}", spread(&peaks));
        assert!(peaks.iter().all(|p| (p - 10.0).abs() < 1.2), "{peaks:?}");
    }

    #[test]
    fn normalize_f32_maps_percentiles_to_unit_range() {
        let v: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        let n = normalize_f32(&v, 1.0, 99.0).unwrap();
        assert_eq!(n[0], 0.0);
        assert_eq!(n[999], 1.0);
        assert!((n[500] - 0.5).abs() < 0.01);
        assert!(normalize_f32(&v, 50.0, 10.0).is_err());
    }

    #[test]
    fn bad_parameters_are_errors() {
        assert!(estimate_background_u16(&[0; 16], 4, 4, 0.0, 2, 10.0).is_err());
        assert!(estimate_background_u16(&[0; 15], 4, 4, 0.0, 8, 10.0).is_err());
    }
}
