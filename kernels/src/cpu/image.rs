//! Pointwise maps, histograms and percentiles, the Gaussian blur, automatic thresholds and
//! pyramid downsampling.

use super::*;

/// Maps raw camera counts to `[0, 1]` between two percentiles of the image's own histogram, so that
/// thresholds downstream do not depend on exposure or camera offset.
pub fn normalize_u16(
    src: &[u16],
    width: usize,
    height: usize,
    low_percentile: f64,
    high_percentile: f64,
) -> Result<Vec<f32>, KernelError> {
    check_len("src", src, width, height)?;
    check_percentiles(low_percentile, high_percentile)?;
    let hist = histogram_u16(src);
    let lo = percentile_from_histogram(&hist, src.len(), low_percentile) as f32;
    let hi = percentile_from_histogram(&hist, src.len(), high_percentile) as f32;
    let scale = if hi > lo { 1.0 / (hi - lo) } else { 0.0 };
    Ok(src
        .par_iter()
        .map(|&v| ((v as f32 - lo) * scale).clamp(0.0, 1.0))
        .collect())
}

/// `0 <= low < high <= 100`, or an error naming both.
pub(crate) fn check_percentiles(low_percentile: f64, high_percentile: f64) -> Result<(), KernelError> {
    if !(0.0..=100.0).contains(&low_percentile)
        || !(0.0..=100.0).contains(&high_percentile)
        || low_percentile >= high_percentile
    {
        return Err(KernelError::Parameter {
            name: "percentiles",
            reason: format!("need 0 <= low < high <= 100, got {low_percentile} and {high_percentile}"),
        });
    }
    Ok(())
}

/// Full 16-bit histogram: exact percentiles of camera data without sorting.
pub fn histogram_u16(src: &[u16]) -> Vec<u64> {
    src.par_chunks(1 << 16)
        .fold(
            || vec![0u64; 65536],
            |mut h, chunk| {
                for &v in chunk {
                    h[v as usize] += 1;
                }
                h
            },
        )
        .reduce(
            || vec![0u64; 65536],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    *x += y;
                }
                a
            },
        )
}

/// The smallest bin value at or above `pct` percent of `total` samples.
pub fn percentile_from_histogram(hist: &[u64], total: usize, pct: f64) -> usize {
    if total == 0 {
        return 0;
    }
    let target = ((pct / 100.0) * (total as f64 - 1.0)).round() as u64;
    let mut acc = 0u64;
    for (i, &c) in hist.iter().enumerate() {
        acc += c;
        if acc > target {
            return i;
        }
    }
    hist.len().saturating_sub(1)
}

/// Normalised taps of a Gaussian of `sigma`, radius `ceil(3 sigma)`: shared with the CUDA blur.
pub(crate) fn gaussian_kernel(sigma: f32) -> Vec<f32> {
    let radius = (3.0 * sigma).ceil().max(1.0) as usize;
    let mut k: Vec<f32> = (0..=2 * radius)
        .map(|i| {
            let x = i as f32 - radius as f32;
            (-x * x / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let s: f32 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= s);
    k
}

#[inline]
fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    let mut i = i;
    if n == 1 {
        return 0;
    }
    loop {
        if i < 0 {
            i = -i - 1;
        } else if i >= n {
            i = 2 * n - i - 1;
        } else {
            return i as usize;
        }
    }
}

/// Separable Gaussian with mirrored borders; `sigma <= 0` returns a copy.
pub fn gaussian_blur(src: &[f32], width: usize, height: usize, sigma: f32) -> Result<Vec<f32>, KernelError> {
    check_len("src", src, width, height)?;
    if sigma <= 0.0 || width == 0 || height == 0 {
        return Ok(src.to_vec());
    }
    let k = gaussian_kernel(sigma);
    let r = (k.len() / 2) as isize;
    let mut tmp = vec![0f32; src.len()];
    let ru = r as usize;
    tmp.par_chunks_mut(width).enumerate().for_each(|(y, row)| {
        let s = &src[y * width..(y + 1) * width];
        // Interior: one pass per tap over contiguous slices (vectorises); borders mirror.
        if width > 2 * ru {
            let inner = width - 2 * ru;
            for (j, &kv) in k.iter().enumerate() {
                for (o, &v) in row[ru..ru + inner].iter_mut().zip(&s[j..j + inner]) {
                    *o += kv * v;
                }
            }
        }
        for x in (0..width).filter(|&x| x < ru || x + ru >= width) {
            row[x] = k
                .iter()
                .enumerate()
                .map(|(j, kv)| kv * s[reflect(x as isize + j as isize - r, width)])
                .sum();
        }
    });
    let mut dst = vec![0f32; src.len()];
    dst.par_chunks_mut(width).enumerate().for_each(|(y, row)| {
        for (j, kv) in k.iter().enumerate() {
            let sy = reflect(y as isize + j as isize - r, height);
            let s = &tmp[sy * width..(sy + 1) * width];
            for (o, v) in row.iter_mut().zip(s) {
                *o += kv * v;
            }
        }
    });
    Ok(dst)
}

/// 256-bin histogram of the finite values between their min and max: `(lo, bins per unit,
/// counts)`, or `None` when there is no range (constant, empty or all-NaN image).
pub(crate) fn histogram_f32(src: &[f32]) -> Option<(f32, f32, [u64; 256])> {
    const BINS: usize = 256;
    const CHUNK: usize = 1 << 16;
    let (lo, hi) = src
        .par_chunks(CHUNK)
        .map(|c| {
            c.iter()
                .filter(|v| v.is_finite())
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)))
        })
        .reduce(
            || (f32::INFINITY, f32::NEG_INFINITY),
            |(a, b), (c, d)| (a.min(c), b.max(d)),
        );
    if !(hi > lo) {
        return None;
    }
    let scale = (BINS as f32 - 1.0) / (hi - lo);
    let hist = src
        .par_chunks(CHUNK)
        .map(|c| {
            let mut h = [0u64; BINS];
            for &v in c.iter().filter(|v| v.is_finite()) {
                h[((v - lo) * scale) as usize] += 1;
            }
            h
        })
        .reduce(
            || [0u64; BINS],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                a
            },
        );
    Some((lo, scale, hist))
}

/// Otsu's threshold over a 256-bin histogram between the image's min and max. Returns the value
/// that best separates two classes; pixels `> threshold` are foreground.
pub fn otsu_threshold(src: &[f32]) -> f32 {
    match histogram_f32(src) {
        Some((lo, scale, hist)) => otsu_from_histogram(lo, scale, &hist),
        None => first_finite(src),
    }
}

/// The threshold of an image without a range: its value (or 0 when nothing is finite).
pub(crate) fn first_finite(src: &[f32]) -> f32 {
    src.iter().copied().find(|v| v.is_finite()).unwrap_or(0.0)
}

/// Otsu's split of a [`histogram_f32`] (the CUDA back end builds the histogram on the device).
pub(crate) fn otsu_from_histogram(lo: f32, scale: f32, hist: &[u64; 256]) -> f32 {
    let total: u64 = hist.iter().sum();
    let sum_all: f64 = hist.iter().enumerate().map(|(i, &c)| i as f64 * c as f64).sum();
    let (mut w0, mut sum0) = (0f64, 0f64);
    let (mut best, mut best_t) = (-1f64, 0usize);
    for (t, &c) in hist.iter().enumerate() {
        w0 += c as f64;
        sum0 += t as f64 * c as f64;
        let w1 = total as f64 - w0;
        if w0 == 0.0 || w1 == 0.0 {
            continue;
        }
        let m0 = sum0 / w0;
        let m1 = (sum_all - sum0) / w1;
        let between = w0 * w1 * (m0 - m1) * (m0 - m1);
        if between > best {
            best = between;
            best_t = t;
        }
    }
    lo + (best_t as f32 + 0.5) / scale
}

/// The triangle threshold (Zack et al. 1977): the histogram bin farthest from the line joining
/// the histogram's peak to the end of its longer tail. Where foreground is a small, dim fraction
/// of the field (sparse wells, weak stains) Otsu splits the background peak; the triangle
/// method keeps to its foot.
pub fn triangle_threshold(src: &[f32]) -> f32 {
    match histogram_f32(src) {
        Some((lo, scale, hist)) => triangle_from_histogram(lo, scale, &hist),
        None => first_finite(src),
    }
}

/// The triangle threshold of a [`histogram_f32`].
pub(crate) fn triangle_from_histogram(lo: f32, scale: f32, hist: &[u64; 256]) -> f32 {
    let first = hist.iter().position(|&c| c > 0).unwrap_or(0);
    let last = hist.iter().rposition(|&c| c > 0).unwrap_or(255);
    let peak = (0..256).max_by_key(|&i| (hist[i], std::cmp::Reverse(i))).unwrap_or(0);
    // Walk from the peak towards the longer tail; the line runs peak -> tail end.
    let (end, step): (usize, isize) = if last - peak >= peak - first {
        (last, 1)
    } else {
        (first, -1)
    };
    let (x0, y0) = (peak as f64, hist[peak] as f64);
    let (x1, y1) = (end as f64, hist[end] as f64);
    let (dx, dy) = (x1 - x0, y1 - y0);
    let norm = (dx * dx + dy * dy).sqrt().max(1e-12);
    let mut best = (0f64, peak);
    let mut i = peak as isize;
    while i != end as isize {
        let (x, y) = (i as f64, hist[i as usize] as f64);
        let d = (dy * x - dx * y + x1 * y0 - y1 * x0).abs() / norm;
        if d > best.0 {
            best = (d, i as usize);
        }
        i += step;
    }
    lo + (best.1 as f32 + 0.5) / scale
}

/// Halves an image by averaging 2×2 blocks (rounded), for pyramid levels. Odd edges repeat the
/// last row/column, so the output is `ceil(w/2) × ceil(h/2)` and covers the whole field.
pub fn downsample2x_mean(src: &[u16], width: usize, height: usize) -> Result<(Vec<u16>, usize, usize), KernelError> {
    check_len("src", src, width, height)?;
    let (w2, h2) = (width.div_ceil(2), height.div_ceil(2));
    let mut out = vec![0u16; w2 * h2];
    out.par_chunks_mut(w2.max(1)).enumerate().for_each(|(y, row)| {
        let (y0, y1) = (2 * y, (2 * y + 1).min(height - 1));
        for (x, o) in row.iter_mut().enumerate() {
            let (x0, x1) = (2 * x, (2 * x + 1).min(width - 1));
            let s = src[y0 * width + x0] as u32
                + src[y0 * width + x1] as u32
                + src[y1 * width + x0] as u32
                + src[y1 * width + x1] as u32;
            *o = ((s + 2) / 4) as u16;
        }
    });
    Ok((out, w2, h2))
}

/// Halves a label image by taking the top-left pixel of each 2×2 block: labels must not be
/// averaged into ids that do not exist.
pub fn downsample2x_nearest(src: &[u32], width: usize, height: usize) -> Result<(Vec<u32>, usize, usize), KernelError> {
    check_len("src", src, width, height)?;
    let (w2, h2) = (width.div_ceil(2), height.div_ceil(2));
    let mut out = vec![0u32; w2 * h2];
    out.par_chunks_mut(w2.max(1)).enumerate().for_each(|(y, row)| {
        for (x, o) in row.iter_mut().enumerate() {
            *o = src[2 * y * width + 2 * x];
        }
    });
    Ok((out, w2, h2))
}
