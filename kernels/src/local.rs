//! The nuclei foreground when one global threshold cannot hold: a field whose nuclei range from
//! dim interphase ones to mitotic ones many times brighter, or whose brightness drifts across the
//! field. One threshold either loses the dim nuclei (Otsu splits bright from everything else) or
//! swells the bright ones into their halos. Here every nucleus gets its own threshold instead:
//!
//! 1. the background is a smooth surface (the illumination module's robust quadratic through
//!    tile percentiles) and the noise is measured from the image itself (median absolute
//!    deviation of its finest scale), so "signal" means so many noise levels above background,
//!    the same for a dim nucleus as for a bright one;
//! 2. that low threshold makes candidate regions, split by intensity peaks at the nucleus scale
//!    (a seeded watershed on the intensity: a dim nucleus beside a bright one keeps its own
//!    region, as do touching nuclei each with their own chromatin maximum);
//! 3. each region keeps the pixels above half of its own bright level ([`EDGE_FRACTION`]): the
//!    edge of a uniformly stained object blurred by the optics sits at half its plateau, so the
//!    boundary follows each nucleus whatever its brightness, and a dark neck between two
//!    touching nuclei falls out;
//! 4. holes inside one region (nucleoli, dim chromatin) are filled.
//!
//! The caller splits the result by shape (distance-transform seeds) as for a global threshold.
//! The only input beyond the image is the nucleus diameter; the two constants are physical
//! (a noise multiple, the half-maximum edge), not tuned per image.

use rayon::prelude::*;

use crate::cpu::{self, gaussian_kernel};
use crate::illumination::{quadratic, robust_surface, tile_percentiles, unit};
use crate::{check_len, KernelError};

/// Candidate foreground lies this many noise levels (of the smoothed image) above background: at
/// 5σ a 1024² field of pure noise has no candidate pixel (one-sided tail 3e-7).
pub const NOISE_MULTIPLE: f32 = 5.0;

/// A nucleus keeps its pixels above this fraction of its own bright level (its 95th
/// percentile above background): the half-maximum edge of a blurred uniform object.
pub const EDGE_FRACTION: f32 = 0.5;

/// The tile percentile that estimates the background (the gaps between cells).
const BACKGROUND_PERCENTILE: f64 = 10.0;

/// What [`local_foreground`] measured, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalStats {
    /// Noise of the smoothed image, in the image's units.
    pub noise: f32,
    /// Candidate regions (one per intensity peak) before each took its own threshold.
    pub regions: u32,
}

/// The foreground mask of `norm` (a nuclear image, any linear scale) whose smoothed version is
/// `smooth` (Gaussian of `smoothing_sigma_px`), for nuclei about `diameter_px` across.
/// `edge_scale` multiplies [`EDGE_FRACTION`] (1 for the physical edge).
pub fn local_foreground(
    norm: &[f32],
    smooth: &[f32],
    width: usize,
    height: usize,
    smoothing_sigma_px: f32,
    diameter_px: f32,
    edge_scale: f32,
) -> Result<(Vec<bool>, LocalStats), KernelError> {
    check_len("norm", norm, width, height)?;
    check_len("smooth", smooth, width, height)?;
    if !(diameter_px.is_finite() && diameter_px >= 2.0) {
        return Err(KernelError::Parameter {
            name: "diameter_px",
            reason: format!("must be >= 2, got {diameter_px}"),
        });
    }
    let n = norm.len();
    if n == 0 {
        return Ok((Vec::new(), LocalStats { noise: 0.0, regions: 0 }));
    }
    let noise = smoothed_noise(norm, width, height, smoothing_sigma_px)?;
    let floor = NOISE_MULTIPLE * noise;
    let signal = above_background(smooth, width, height, diameter_px, noise);
    let low: Vec<bool> = signal.par_iter().map(|&v| v > floor).collect();

    // Intensity at the nucleus scale: one peak per nucleus, so touching nuclei and a dim one
    // beside a bright one start regions of their own.
    let coarse = cpu::gaussian_blur(norm, width, height, diameter_px / 6.0)?;
    let radius = ((diameter_px / 3.0).round() as usize).max(1);
    let (markers, peaks) = cpu::peak_markers(&coarse, &low, width, height, radius, f32::NEG_INFINITY)?;
    let elevation: Vec<f32> = coarse.par_iter().map(|v| -v).collect();
    let mut regions = cpu::watershed(&elevation, &markers, &low, width, height)?;
    // A candidate blob with no peak of its own (a brighter neighbour's window covers it) is
    // still one region, not lost.
    let left = cpu::pixels_where(width, height, |i| low[i] && regions[i] == 0);
    let (blobs, extra) = cpu::label_pixels(&left, n, width, true);
    for &i in &left {
        regions[i] = peaks + blobs[i];
    }
    let count = (peaks + extra) as usize;

    let level = bright_levels(&regions, &signal, count);
    let edge = EDGE_FRACTION * edge_scale;
    let threshold: Vec<f32> = level.iter().map(|&l| (edge * l).max(floor)).collect();
    let mut keep: Vec<bool> = regions
        .par_iter()
        .zip(&signal)
        .map(|(&r, &v)| r != 0 && v >= threshold[r as usize])
        .collect();
    fill_holes_within_regions(&mut keep, &regions, width, height);
    Ok((
        keep,
        LocalStats {
            noise,
            regions: peaks + extra,
        },
    ))
}

/// [`local_foreground`] with the nuclei parameters' diameter, smoothing and edge scale: what
/// both back ends run for [`crate::segment::Foreground::Local`].
pub fn nuclei_foreground(
    norm: &[f32],
    smooth: &[f32],
    width: usize,
    height: usize,
    p: &crate::segment::NucleiParams,
) -> Result<Vec<bool>, KernelError> {
    local_foreground(
        norm,
        smooth,
        width,
        height,
        p.smoothing_sigma_px,
        p.diameter_px,
        p.threshold_scale,
    )
    .map(|(mask, _)| mask)
}

/// The noise of `img` after a Gaussian of `sigma`: the median absolute deviation of the image's
/// finest scale (`img` minus its blur at 1 px, mostly noise wherever there is no edge),
/// converted to white-noise sigma through the exact gains of the two discrete kernels.
fn smoothed_noise(img: &[f32], width: usize, height: usize, sigma: f32) -> Result<f32, KernelError> {
    let fine = cpu::gaussian_blur(img, width, height, 1.0)?;
    let mut resid: Vec<f32> = img
        .par_iter()
        .zip(&fine)
        .map(|(a, b)| a - b)
        .filter(|v| v.is_finite())
        .collect();
    if resid.is_empty() {
        return Ok(0.0);
    }
    let median = select(&mut resid, 0.5);
    resid.par_iter_mut().for_each(|v| *v = (*v - median).abs());
    let mad = select(&mut resid, 0.5);
    // White noise n: (n - g*n) has variance sum((delta - g)^2) = 1 - 2 g0^2 + (sum g^2)^2 for a
    // separable kernel with centre tap g0; g*n has (sum g^2)^2.
    let g1 = gaussian_kernel(1.0);
    let c = g1[g1.len() / 2];
    let s1: f32 = g1.iter().map(|v| v * v).sum();
    let resid_gain = (1.0 - 2.0 * c * c + s1 * s1).sqrt();
    let smooth_gain = if sigma > 0.0 {
        gaussian_kernel(sigma).iter().map(|v| v * v).sum::<f32>()
    } else {
        1.0
    };
    Ok(1.4826 * mad / resid_gain * smooth_gain)
}

/// `smooth` minus its background: a robust quadratic surface through the tiles' low percentile
/// (tiles of four nuclei, so each holds gaps between cells), raised by what that percentile
/// sits below the background's mean in noise alone (1.28 sigma for the 10th).
fn above_background(smooth: &[f32], width: usize, height: usize, diameter_px: f32, noise: f32) -> Vec<f32> {
    let block = ((4.0 * diameter_px).round() as usize).max(16);
    let coef = robust_surface(&tile_percentiles(smooth, width, height, block, BACKGROUND_PERCENTILE));
    let lift = 1.2816 * noise as f64;
    let mut out = vec![0f32; smooth.len()];
    out.par_chunks_mut(width).enumerate().for_each(|(y, row)| {
        let v = unit(y as f64 + 0.5, height);
        let src = &smooth[y * width..(y + 1) * width];
        for (x, (o, &s)) in row.iter_mut().zip(src).enumerate() {
            let b = quadratic(&coef, unit(x as f64 + 0.5, width), v) + lift;
            // NaN (a dead pixel) is no signal.
            *o = if s.is_finite() { s - b as f32 } else { f32::NEG_INFINITY };
        }
    });
    out
}

/// Each region's bright level: the 95th percentile of its signal (robust to a hot pixel).
fn bright_levels(regions: &[u32], signal: &[f32], count: usize) -> Vec<f32> {
    let mut values: Vec<Vec<f32>> = vec![Vec::new(); count + 1];
    for (&r, &v) in regions.iter().zip(signal) {
        if r != 0 {
            values[r as usize].push(v);
        }
    }
    values
        .into_par_iter()
        .map(|mut v| if v.is_empty() { 0.0 } else { select(&mut v, 0.95) })
        .collect()
}

/// Fills each background component (4-connected) that does not reach the border and lies within
/// one region: a hole in one nucleus, never a gap enclosed by several.
///
/// Only gaps inside regions are labelled (every pixel outside all regions is background, so a
/// gap touching one is not a hole): a fraction of the field instead of its whole background.
fn fill_holes_within_regions(keep: &mut [bool], regions: &[u32], width: usize, height: usize) {
    let n = keep.len();
    let gaps = cpu::pixels_where(width, height, |i| !keep[i] && regions[i] != 0);
    let (comp, count) = cpu::label_pixels(&gaps, n, width, false);
    // Per component: the one region all its pixels lie in, or u32::MAX when it reaches the
    // border, the outside of every region, or two regions.
    let mut owner = vec![0u32; count as usize + 1];
    for &i in &gaps {
        let c = comp[i] as usize;
        let (x, y) = (i % width, i / width);
        let r = regions[i];
        let border = x == 0 || y == 0 || x + 1 == width || y + 1 == height;
        let outside =
            border || regions[i - 1] == 0 || regions[i + 1] == 0 || regions[i - width] == 0 || regions[i + width] == 0;
        owner[c] = if outside || (owner[c] != 0 && owner[c] != r) {
            u32::MAX
        } else {
            r
        };
    }
    for &i in &gaps {
        let o = owner[comp[i] as usize];
        if o != 0 && o != u32::MAX {
            keep[i] = true;
        }
    }
}

/// The `q` quantile of `v` (nearest rank), reordering `v`.
fn select(v: &mut [f32], q: f64) -> f32 {
    let k = (((v.len() - 1) as f64) * q).round() as usize;
    *v.select_nth_unstable_by(k, f32::total_cmp).1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dim and a bright disk (1:8) on a noisy background: both are found, each to its own
    /// edge, where Otsu on the same image keeps only the bright one.
    #[test]
    fn a_dim_nucleus_beside_a_bright_one_keeps_its_own_edge() {
        let (w, h) = (128, 96);
        let mut img = vec![0f32; w * h];
        let mut state = 12345u64;
        let disks = [(40.0f32, 48.0f32, 0.1f32), (80.0, 48.0, 0.8)];
        for y in 0..h {
            for x in 0..w {
                // xorshift noise, uniform with sigma 0.006
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 11) as f32 / (1u64 << 53) as f32 - 0.5;
                let mut v = 0.05 + 0.02 * u;
                for &(cx, cy, b) in &disks {
                    let r = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
                    v += b * (1.0 - ((r - 9.0) / 1.5).clamp(0.0, 1.0));
                }
                img[y * w + x] = v;
            }
        }
        let smooth = cpu::gaussian_blur(&img, w, h, 1.5).unwrap();
        let (mask, stats) = local_foreground(&img, &smooth, w, h, 1.5, 20.0, 1.0).unwrap();
        assert!(stats.noise > 0.0 && stats.noise < 0.01, "noise {}", stats.noise);
        for &(cx, cy, _) in &disks {
            let inside = (0..w * h)
                .filter(|&i| {
                    let (x, y) = ((i % w) as f32, (i / w) as f32);
                    ((x - cx).powi(2) + (y - cy).powi(2)).sqrt() <= 9.0
                })
                .collect::<Vec<_>>();
            let kept = inside.iter().filter(|&&i| mask[i]).count();
            let around = (0..w * h)
                .filter(|&i| {
                    let (x, y) = ((i % w) as f32, (i / w) as f32);
                    let r = ((x - cx).powi(2) + (y - cy).powi(2)).sqrt();
                    (12.0..16.0).contains(&r) && mask[i]
                })
                .count();
            assert!(
                kept * 10 >= inside.len() * 9,
                "disk at {cx}: {kept} of {}",
                inside.len()
            );
            assert_eq!(around, 0, "disk at {cx} swelled into its halo");
        }
        let otsu = cpu::otsu_threshold(&smooth);
        let dim_center = 48 * w + 40;
        assert!(smooth[dim_center] < otsu, "the case is not one Otsu fails");
    }

    #[test]
    fn flat_and_empty_images_have_no_foreground() {
        let (w, h) = (64, 64);
        for v in [0.0f32, 0.5, 1.0] {
            let img = vec![v; w * h];
            let (mask, _) = local_foreground(&img, &img, w, h, 1.0, 12.0, 1.0).unwrap();
            assert!(mask.iter().all(|&m| !m), "flat {v}");
        }
        let (mask, _) = local_foreground(&[], &[], 0, 0, 1.0, 12.0, 1.0).unwrap();
        assert!(mask.is_empty());
        let mut nan = vec![0.1f32; w * h];
        nan[100] = f32::NAN;
        let (mask, _) = local_foreground(&nan, &nan, w, h, 1.0, 12.0, 1.0).unwrap();
        assert!(!mask[100]);
        assert!(local_foreground(&nan, &nan, w, h, 1.0, 1.0, 1.0).is_err());
    }

    #[test]
    fn a_hole_in_one_nucleus_is_filled_but_a_gap_between_two_is_not() {
        // 7 x 5: region 1 is a ring around (2, 2); the gap at column 5 lies between regions 1 and 2.
        #[rustfmt::skip]
        let regions = vec![
            0, 0, 0, 0, 0, 0, 0,
            0, 1, 1, 1, 1, 2, 0,
            0, 1, 1, 1, 1, 2, 0,
            0, 1, 1, 1, 1, 2, 0,
            0, 0, 0, 0, 0, 0, 0,
        ];
        let mut keep: Vec<bool> = regions.iter().map(|&r| r != 0).collect();
        keep[2 * 7 + 2] = false;
        keep[2 * 7 + 4] = false;
        keep[2 * 7 + 5] = false;
        let before = keep.clone();
        fill_holes_within_regions(&mut keep, &regions, 7, 5);
        assert!(keep[2 * 7 + 2], "hole inside region 1");
        assert!(!keep[2 * 7 + 4] && !keep[2 * 7 + 5], "gap touching region 2");
        assert_eq!(
            keep.iter().filter(|&&k| k).count(),
            before.iter().filter(|&&k| k).count() + 1
        );
    }
}
