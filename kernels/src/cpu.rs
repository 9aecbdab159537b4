//! CPU reference implementations. They are the definition of correct: a faster back end must match
//! them, so they favour clarity and exactness over tricks, and use rayon only where rows or columns
//! are independent (the result never depends on the thread count).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rayon::prelude::*;

use crate::{check_len, KernelError};

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

/// 1-D squared distance transform of a sampled function (Felzenszwalb & Huttenlocher 2012): the
/// lower envelope of parabolas rooted at the finite samples. Computed in f64 because `q²` for
/// fields of a few thousand pixels exceeds f32's exact integer range.
fn edt_1d(f: &[f64], out: &mut [f64], v: &mut [usize], z: &mut [f64]) {
    let mut k: Option<usize> = None;
    for q in 0..f.len() {
        if !f[q].is_finite() {
            continue;
        }
        let qf = q as f64;
        loop {
            match k {
                None => {
                    k = Some(0);
                    v[0] = q;
                    z[0] = f64::NEG_INFINITY;
                    z[1] = f64::INFINITY;
                    break;
                }
                Some(kk) => {
                    let p = v[kk];
                    let pf = p as f64;
                    let s = ((f[q] + qf * qf) - (f[p] + pf * pf)) / (2.0 * (qf - pf));
                    if s <= z[kk] {
                        k = kk.checked_sub(1);
                        if k.is_none() {
                            // z[0] is -inf, so this cannot happen; kept total for safety.
                            k = Some(0);
                            v[0] = q;
                            z[1] = f64::INFINITY;
                            break;
                        }
                        continue;
                    }
                    let kk = kk + 1;
                    v[kk] = q;
                    z[kk] = s;
                    z[kk + 1] = f64::INFINITY;
                    k = Some(kk);
                    break;
                }
            }
        }
    }
    if k.is_none() {
        out.iter_mut().for_each(|o| *o = f64::INFINITY);
        return;
    }
    let mut k = 0usize;
    for (q, o) in out.iter_mut().enumerate() {
        let qf = q as f64;
        while z[k + 1] < qf {
            k += 1;
        }
        let d = qf - v[k] as f64;
        *o = d * d + f[v[k]];
    }
}

/// Exact Euclidean distance of every foreground pixel to the nearest background pixel (0 on
/// background). Pixels beyond the image border count as foreground, so objects cut by the border
/// are not artificially thinned. An image with no background gets `f32::INFINITY` everywhere.
pub fn distance_transform(mask: &[bool], width: usize, height: usize) -> Result<Vec<f32>, KernelError> {
    check_len("mask", mask, width, height)?;
    let n = width.max(height);
    if width == 0 || height == 0 {
        return Ok(Vec::new());
    }
    // Column pass: on a binary image the 1-D transform along a column is the squared distance to
    // the nearest background pixel in that column, found with one sweep down and one up over
    // whole rows (vectorised, row-major, no transpose). Outside the image counts as foreground.
    let mut col = vec![u32::MAX; mask.len()];
    for y in 0..height {
        let (done, rest) = col.split_at_mut(y * width);
        let row = &mut rest[..width];
        let m = &mask[y * width..(y + 1) * width];
        match y {
            0 => row
                .iter_mut()
                .zip(m)
                .for_each(|(d, &f)| *d = if f { u32::MAX } else { 0 }),
            _ => {
                let above = &done[(y - 1) * width..];
                for ((d, &f), &a) in row.iter_mut().zip(m).zip(above) {
                    *d = if f { a.saturating_add(1) } else { 0 };
                }
            }
        }
    }
    for y in (0..height.saturating_sub(1)).rev() {
        let (head, tail) = col.split_at_mut((y + 1) * width);
        for (d, &b) in head[y * width..].iter_mut().zip(&tail[..width]) {
            *d = (*d).min(b.saturating_add(1));
        }
    }
    let rows: Vec<f64> = col
        .par_iter()
        .map(|&d| {
            if d == u32::MAX {
                f64::INFINITY
            } else {
                (d as f64) * (d as f64)
            }
        })
        .collect();
    let mut dst = vec![0f32; mask.len()];
    dst.par_chunks_mut(width).enumerate().for_each_init(
        || (vec![0f64; n], vec![0usize; n], vec![0f64; n + 1]),
        |(o64, v, z), (y, out)| {
            edt_1d(&rows[y * width..(y + 1) * width], &mut o64[..width], v, z);
            for (o, d) in out.iter_mut().zip(o64.iter()) {
                *o = d.sqrt() as f32;
            }
        },
    );
    Ok(dst)
}

fn find(parent: &mut [u32], mut x: u32) -> u32 {
    while parent[x as usize] != x {
        parent[x as usize] = parent[parent[x as usize] as usize];
        x = parent[x as usize];
    }
    x
}

/// Connected components of a mask (8-connectivity when `eight`), labels `1..=n` in raster order of
/// first appearance, 0 for background.
pub fn connected_components(
    mask: &[bool],
    width: usize,
    height: usize,
    eight: bool,
) -> Result<(Vec<u32>, u32), KernelError> {
    check_len("mask", mask, width, height)?;
    let points = (0..mask.len()).filter(|&i| mask[i]);
    Ok(label_points(points, mask.len(), width, eight))
}

/// Connected components of the pixels listed in `points` (raster order) in an image of `len`
/// pixels, labelled like [`connected_components`]: for sparse sets (peaks, leftovers) it costs
/// the points, not the image.
pub fn label_pixels(points: &[usize], len: usize, width: usize, eight: bool) -> (Vec<u32>, u32) {
    label_points(points.iter().copied(), len, width, eight)
}

/// Two-pass union-find labelling of the pixels `points` yields (in raster order) in an image of
/// `len` pixels: the dense and the sparse (peak) cases share it, and the sparse one touches only
/// its points instead of every pixel.
fn label_points(points: impl Iterator<Item = usize> + Clone, len: usize, width: usize, eight: bool) -> (Vec<u32>, u32) {
    let mut labels = vec![0u32; len];
    let mut parent: Vec<u32> = vec![0];
    for i in points.clone() {
        let (x, y) = (i % width, i / width);
        let mut neigh = [0u32; 4];
        let mut nn = 0;
        if x > 0 && labels[i - 1] != 0 {
            neigh[nn] = labels[i - 1];
            nn += 1;
        }
        if y > 0 {
            let up = i - width;
            if labels[up] != 0 {
                neigh[nn] = labels[up];
                nn += 1;
            }
            if eight {
                if x > 0 && labels[up - 1] != 0 {
                    neigh[nn] = labels[up - 1];
                    nn += 1;
                }
                if x + 1 < width && labels[up + 1] != 0 {
                    neigh[nn] = labels[up + 1];
                    nn += 1;
                }
            }
        }
        if nn == 0 {
            let l = parent.len() as u32;
            parent.push(l);
            labels[i] = l;
        } else {
            let mut root = find(&mut parent, neigh[0]);
            for &l in &neigh[1..nn] {
                let r = find(&mut parent, l);
                if r != root {
                    let (a, b) = if r < root { (r, root) } else { (root, r) };
                    parent[b as usize] = a;
                    root = a;
                }
            }
            labels[i] = root;
        }
    }
    let mut remap = vec![0u32; parent.len()];
    let mut next = 0u32;
    for i in points {
        let r = find(&mut parent, labels[i]) as usize;
        if remap[r] == 0 {
            next += 1;
            remap[r] = next;
        }
        labels[i] = remap[r];
    }
    (labels, next)
}

/// Maximum over `[x - r, x + r]` for every `x` in three comparisons per pixel whatever `r`
/// (van Herk / Gil-Werman): block-wise prefix maxima `g` and suffix maxima `h` over the row
/// padded with -inf, then `out[x] = max(h[x], g[x + 2r])` in padded coordinates. Blocks are
/// walked as slices, so there is no division or border test per pixel.
fn running_max_1d(src: &[f32], out: &mut [f32], r: usize, g: &mut [f32], h: &mut [f32]) {
    let k = 2 * r + 1;
    let n = src.len() + 2 * r;
    // The padded row goes into `h` first; each block's suffix maxima then overwrite it in place.
    h[..r].fill(f32::NEG_INFINITY);
    h[r..r + src.len()].copy_from_slice(src);
    h[r + src.len()..n].fill(f32::NEG_INFINITY);
    for (gb, hb) in g[..n].chunks_mut(k).zip(h[..n].chunks_mut(k)) {
        let mut m = f32::NEG_INFINITY;
        for (gi, &v) in gb.iter_mut().zip(hb.iter()) {
            m = m.max(v);
            *gi = m;
        }
        let mut m = f32::NEG_INFINITY;
        for hi in hb.iter_mut().rev() {
            m = m.max(*hi);
            *hi = m;
        }
    }
    for ((o, &hv), &gv) in out.iter_mut().zip(&h[..]).zip(&g[2 * r..]) {
        *o = hv.max(gv);
    }
}

/// Square-window maximum filter (separable), used to find regional peaks for watershed seeds.
pub fn max_filter(src: &[f32], width: usize, height: usize, radius: usize) -> Result<Vec<f32>, KernelError> {
    check_len("src", src, width, height)?;
    if src.is_empty() {
        return Ok(Vec::new());
    }
    let mut tmp = vec![0f32; src.len()];
    tmp.par_chunks_mut(width).enumerate().for_each_init(
        || (vec![0f32; width + 2 * radius], vec![0f32; width + 2 * radius]),
        |(g, h), (y, row)| running_max_1d(&src[y * width..(y + 1) * width], row, radius, g, h),
    );
    let mut dst = vec![0f32; src.len()];
    dst.par_chunks_mut(width).enumerate().for_each(|(y, row)| {
        let a = y.saturating_sub(radius);
        let b = (y + radius + 1).min(height);
        row.iter_mut().for_each(|o| *o = f32::NEG_INFINITY);
        for sy in a..b {
            for (o, &v) in row.iter_mut().zip(&tmp[sy * width..(sy + 1) * width]) {
                *o = o.max(v);
            }
        }
    });
    Ok(dst)
}

/// Seeds for watershed: plateaus that are the maximum within `radius` and at least `min_value`,
/// restricted to `mask`. Each plateau becomes one marker (8-connected), labelled `1..=n`.
pub fn peak_markers(
    src: &[f32],
    mask: &[bool],
    width: usize,
    height: usize,
    radius: usize,
    min_value: f32,
) -> Result<(Vec<u32>, u32), KernelError> {
    check_len("mask", mask, width, height)?;
    let maxed = max_filter(src, width, height, radius)?;
    // Peaks are a few pixels per object: label only them, not the whole image.
    let peaks = pixels_where(width, height, |i| mask[i] && src[i] >= min_value && src[i] >= maxed[i]);
    Ok(label_points(peaks.iter().copied(), src.len(), width, true))
}

#[derive(PartialEq)]
struct QueueItem {
    priority: f32,
    order: u64,
    index: usize,
}

impl Eq for QueueItem {}

impl Ord for QueueItem {
    fn cmp(&self, other: &Self) -> Ordering {
        // BinaryHeap is a max-heap: invert so the lowest priority (then the oldest) pops first.
        other
            .priority
            .total_cmp(&self.priority)
            .then_with(|| other.order.cmp(&self.order))
    }
}

impl PartialOrd for QueueItem {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Levels of the watershed's hierarchical queue: elevations are quantised to this many steps
/// between their minimum and maximum under the mask (for a distance map of nuclei a few tens of
/// pixels deep, a step is well under 0.01 px).
const WATERSHED_LEVELS: usize = 4096;

/// Marker-controlled watershed (Meyer's flooding) of `elevation`, restricted to `mask`; 8-connected.
/// Every masked pixel reachable from a marker gets that marker's label. A hierarchical queue of
/// FIFO buckets replaces the priority heap: each pixel is queued once and dequeued in O(1).
///
/// The flood order is a key per pixel, `(bucket, hops)`: the bucket is the highest level on the
/// way from the marker, the hops count steps since the flood entered that bucket (the queue pops
/// each bucket in waves of equal hops). A pixel takes
/// the label of the neighbour with the smallest key among those that reach it with its own
/// (smallest) key, as the queue's first pop would give it; between such neighbours of equal
/// key the smaller label wins, instead of whichever the queue held first. That makes the result
/// a function of the image alone, which a parallel relaxation (the CUDA back end) reproduces
/// exactly.
pub fn watershed(
    elevation: &[f32],
    markers: &[u32],
    mask: &[bool],
    width: usize,
    height: usize,
) -> Result<Vec<u32>, KernelError> {
    check_len("elevation", elevation, width, height)?;
    check_len("markers", markers, width, height)?;
    check_len("mask", mask, width, height)?;
    let (lo, hi) = elevation
        .iter()
        .zip(mask)
        .filter(|(v, &m)| m && v.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), (&v, _)| {
            (a.min(v), b.max(v))
        });
    let top = WATERSHED_LEVELS - 1;
    let scale = if hi > lo { top as f32 / (hi - lo) } else { 0.0 };
    let level = |i: usize| {
        let v = elevation[i];
        if v.is_finite() {
            (((v - lo) * scale) as usize).min(top)
        } else {
            top
        }
    };
    let mut labels = markers.to_vec();
    // A bucket is popped in waves of equal hops: the entries from lower buckets (hops 0), then
    // what each wave queued into the same bucket. A tie needs `j` queued by the wave being
    // popped (its key's neighbour had the popped pixels' key), so the pixels queued by the
    // current wave are marked, and unmarked when it ends (`fresh` lists them): one byte per
    // pixel, no per-pixel key.
    const FREE: u8 = 0;
    const QUEUED: u8 = 1;
    const THIS_WAVE: u8 = 2;
    let mut state: Vec<u8> = markers.iter().map(|&m| if m != 0 { QUEUED } else { FREE }).collect();
    let mut fresh: Vec<u32> = Vec::new();
    let mut buckets: Vec<Vec<u32>> = vec![Vec::new(); WATERSHED_LEVELS];
    let mut heads = vec![0usize; WATERSHED_LEVELS];
    // Markers first, in raster order, ahead of every other pixel.
    buckets[0].extend((0..markers.len()).filter(|&i| markers[i] != 0).map(|i| i as u32));
    let (mut cur, mut wave_end) = (0, buckets[0].len());
    loop {
        if heads[cur] == wave_end {
            for &j in &fresh {
                state[j as usize] = QUEUED;
            }
            fresh.clear();
            if heads[cur] == buckets[cur].len() {
                cur += 1;
                if cur == WATERSHED_LEVELS {
                    break;
                }
            }
            wave_end = buckets[cur].len();
            continue;
        }
        let i = buckets[cur][heads[cur]] as usize;
        heads[cur] += 1;
        let li = labels[i];
        let (x, y) = (i % width, i / width);
        let (x0, x1) = (x.saturating_sub(1), (x + 1).min(width - 1));
        let (y0, y1) = (y.saturating_sub(1), (y + 1).min(height - 1));
        for ny in y0..=y1 {
            for nx in x0..=x1 {
                let j = ny * width + nx;
                if !mask[j] {
                    continue;
                }
                let st = state[j];
                if st != FREE {
                    // Keys only grow along the queue, so `i` hands `j` its key through a
                    // neighbour of the smallest key exactly when `j` was queued in this wave:
                    // a tie, and the smaller label takes it.
                    if st == THIS_WAVE && li < labels[j] {
                        labels[j] = li;
                    }
                    continue;
                }
                state[j] = THIS_WAVE;
                fresh.push(j as u32);
                labels[j] = li;
                buckets[level(j).max(cur)].push(j as u32);
            }
        }
    }
    Ok(labels)
}

/// Propagates labels from seeds over an intensity image (CellProfiler's "propagate"): a pixel joins
/// the seed with the cheapest path, where a step costs the intensity difference plus
/// `spatial_weight` times its length. Spatial weight keeps boundaries between cells of similar
/// brightness near the midline; intensity keeps them on dark gaps. Between paths of exactly
/// equal cost through neighbours of equal cost the smaller label wins, so the result does not
/// depend on the order of the heap (and a parallel relaxation reproduces it).
pub fn propagate(
    image: &[f32],
    seeds: &[u32],
    mask: &[bool],
    width: usize,
    height: usize,
    spatial_weight: f32,
) -> Result<Vec<u32>, KernelError> {
    check_len("image", image, width, height)?;
    check_len("seeds", seeds, width, height)?;
    check_len("mask", mask, width, height)?;
    flood(seeds, mask, width, height, |cost, to, (from, diag)| {
        let step = if diag { std::f32::consts::SQRT_2 } else { 1.0 };
        cost + (image[to] - image[from]).abs() + spatial_weight * step
    })
}

/// Shared priority flood. `next(cost_so_far, to, (from, diagonal))` gives the priority of `to`.
fn flood(
    seeds: &[u32],
    mask: &[bool],
    width: usize,
    height: usize,
    next: impl Fn(f32, usize, (usize, bool)) -> f32,
) -> Result<Vec<u32>, KernelError> {
    let mut labels = vec![0u32; seeds.len()];
    let mut cost = vec![f32::INFINITY; seeds.len()];
    // Pixels are popped in runs of equal cost. A tie for `j` needs the neighbour that set its
    // cost to have the popped pixel's cost, i.e. to be in the current run: `state` marks the
    // pixels whose cost the current run set (`fresh` lists them, to unmark when it ends) and
    // those popped for good, in one byte per pixel.
    const OPEN: u8 = 0;
    const THIS_RUN: u8 = 1;
    const DONE: u8 = 2;
    let mut state = vec![OPEN; seeds.len()];
    let mut fresh: Vec<u32> = Vec::new();
    let mut run = f32::NAN;
    let mut heap = BinaryHeap::new();
    let mut order = 0u64;
    for (i, &s) in seeds.iter().enumerate() {
        if s != 0 {
            labels[i] = s;
            cost[i] = 0.0;
            heap.push(QueueItem {
                priority: f32::NEG_INFINITY,
                order,
                index: i,
            });
            order += 1;
        }
    }
    const N8: [(isize, isize, bool); 8] = [
        (-1, 0, false),
        (1, 0, false),
        (0, -1, false),
        (0, 1, false),
        (-1, -1, true),
        (1, -1, true),
        (-1, 1, true),
        (1, 1, true),
    ];
    while let Some(QueueItem { index, priority, .. }) = heap.pop() {
        if state[index] == DONE {
            continue;
        }
        if priority.to_bits() != run.to_bits() {
            for &j in &fresh {
                if state[j as usize] == THIS_RUN {
                    state[j as usize] = OPEN;
                }
            }
            fresh.clear();
            run = priority;
        }
        state[index] = DONE;
        let (x, y) = ((index % width) as isize, (index / width) as isize);
        for (dx, dy, diag) in N8 {
            let (nx, ny) = (x + dx, y + dy);
            if nx < 0 || ny < 0 || nx >= width as isize || ny >= height as isize {
                continue;
            }
            let j = ny as usize * width + nx as usize;
            if state[j] == DONE || !mask[j] {
                continue;
            }
            let c = next(cost[index], j, (index, diag));
            if c < cost[j] {
                cost[j] = c;
                labels[j] = labels[index];
                if state[j] != THIS_RUN {
                    state[j] = THIS_RUN;
                    fresh.push(j as u32);
                }
                heap.push(QueueItem {
                    priority: c,
                    order,
                    index: j,
                });
                order += 1;
            } else if c == cost[j] && state[j] == THIS_RUN && labels[index] < labels[j] {
                labels[j] = labels[index];
            }
        }
    }
    Ok(labels)
}

/// Drops objects outside `[min_area, max_area]` pixels and renumbers the rest `1..=n` in raster
/// order, so label ids are dense and stable for a given input. An object touching the image
/// border is only held to `min_area_at_border`: it is cut by the field of view, not debris, and
/// dropping it would hand its pixels' cell to its neighbours.
pub fn filter_by_area(
    labels: &[u32],
    width: usize,
    min_area: usize,
    min_area_at_border: usize,
    max_area: usize,
) -> (Vec<u32>, u32) {
    let max_label = labels.iter().copied().max().unwrap_or(0) as usize;
    let mut area = vec![0usize; max_label + 1];
    for &l in labels {
        area[l as usize] += 1;
    }
    let mut at_border = vec![false; max_label + 1];
    mark_border_labels(labels, width, &mut at_border);
    let mut remap = vec![0u32; max_label + 1];
    let mut next = 0u32;
    let mut out = vec![0u32; labels.len()];
    for (o, &l) in out.iter_mut().zip(labels) {
        if l == 0 {
            continue;
        }
        let li = l as usize;
        let min = if at_border[li] { min_area_at_border } else { min_area };
        if remap[li] == 0 && area[li] >= min && area[li] <= max_area {
            next += 1;
            remap[li] = next;
        }
        *o = remap[li];
    }
    (out, next)
}

/// Sets `touches[l]` for every label `l` on the outermost rows and columns of a `width`-wide
/// label image (`touches` must cover its largest label; an empty image marks nothing).
pub fn mark_border_labels(labels: &[u32], width: usize, touches: &mut [bool]) {
    let Some(height) = labels.len().checked_div(width).filter(|&h| h > 0) else {
        return;
    };
    for y in [0, height - 1] {
        for &l in &labels[y * width..(y + 1) * width] {
            touches[l as usize] = true;
        }
    }
    for y in 0..height {
        touches[labels[y * width] as usize] = true;
        touches[labels[y * width + width - 1] as usize] = true;
    }
}

/// Indices of the pixels of a `width` x `height` image where `keep(i)` holds, in raster order,
/// computed row-parallel: the input of [`label_pixels`] for sparse sets.
pub fn pixels_where(width: usize, height: usize, keep: impl Fn(usize) -> bool + Sync) -> Vec<usize> {
    (0..height)
        .into_par_iter()
        .flat_map_iter(|y| (y * width..(y + 1) * width).filter(|&i| keep(i)))
        .collect()
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

#[cfg(test)]
mod tests {
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
}

/// Gathers `centers.len()` crops of `size`x`size` pixels centred on each `(x, y)` from every
/// channel into one contiguous N x C x S x S f32 batch, zero outside the image: the input layout
/// of per-cell models, built in one pass so the batch can go to the model without a copy.
pub fn crop_gather_u16(
    channels: &[&[u16]],
    width: usize,
    height: usize,
    centers: &[(f32, f32)],
    size: usize,
) -> Result<Vec<f32>, KernelError> {
    crop_gather_u16_with(
        channels,
        width,
        height,
        centers,
        CropSpec { size, scale: 1.0 },
        &|_, _| {},
    )
}

/// How crops are cut from a field.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropSpec {
    /// Crop side in output pixels (the model's input size).
    pub size: usize,
    /// Field pixels per crop pixel. 1 copies pixels; another value resamples a window of
    /// `size * scale` field pixels bilinearly, for a model trained at another pixel size
    /// (e.g. 2.0 feeds a 0.65 µm model from a 0.325 µm camera). Bilinear sampling does not
    /// low-pass first, so scales above 2 alias fine texture.
    pub scale: f32,
}

/// [`crop_gather_u16`] with resampling, and `per_plane(channel, plane)` applied to every crop
/// plane right after it is written, while it is still in cache: the model's elementwise
/// preprocessing done here saves a pass over the whole batch in memory (the batch of a per-cell
/// model is larger than the last-level cache). Padding is written before `per_plane` runs, so
/// it sees exactly what a whole-tensor preprocessing would see.
pub fn crop_gather_u16_with(
    channels: &[&[u16]],
    width: usize,
    height: usize,
    centers: &[(f32, f32)],
    spec: CropSpec,
    per_plane: &(dyn Fn(usize, &mut [f32]) + Sync),
) -> Result<Vec<f32>, KernelError> {
    for c in channels {
        check_len("crop_gather channel", c, width, height)?;
    }
    check_crop_spec(spec)?;
    let size = spec.size;
    let per_crop = channels.len() * size * size;
    let mut out = vec![0f32; centers.len() * per_crop];
    if per_crop == 0 {
        return Ok(out);
    }
    let (w, h) = (width as isize, height as isize);
    out.par_chunks_mut(per_crop)
        .zip(centers.par_iter())
        .for_each(|(crop, &(cx, cy))| {
            // The centre pixel sits at size/2 (the same convention for odd and even sizes).
            let (rx, ry) = (cx.round() as isize, cy.round() as isize);
            for (c, src) in channels.iter().enumerate() {
                let plane = &mut crop[c * size * size..(c + 1) * size * size];
                if spec.scale == 1.0 {
                    let (x0, y0) = (rx - (size / 2) as isize, ry - (size / 2) as isize);
                    // Columns of the crop that fall inside the image, the same for every row.
                    let (a, b) = (
                        (-x0).clamp(0, size as isize) as usize,
                        (w - x0).clamp(0, size as isize) as usize,
                    );
                    for dy in 0..size {
                        let y = y0 + dy as isize;
                        if y < 0 || y >= h || a >= b {
                            continue;
                        }
                        let row = &src[y as usize * width..(y as usize + 1) * width];
                        let from = &row[(x0 + a as isize) as usize..(x0 + b as isize) as usize];
                        for (o, &v) in plane[dy * size + a..dy * size + b].iter_mut().zip(from) {
                            *o = v as f32;
                        }
                    }
                } else {
                    resample_plane(src, width, height, (rx, ry), spec, plane);
                }
                per_plane(c, plane);
            }
        });
    Ok(out)
}

/// A crop side of at least one pixel and a finite, positive scale.
pub(crate) fn check_crop_spec(spec: CropSpec) -> Result<(), KernelError> {
    if spec.size == 0 {
        return Err(KernelError::Parameter {
            name: "size",
            reason: "crop size must be > 0".into(),
        });
    }
    if !(spec.scale.is_finite() && spec.scale > 0.0) {
        return Err(KernelError::Parameter {
            name: "scale",
            reason: format!("crop scale must be finite and > 0, got {}", spec.scale),
        });
    }
    Ok(())
}

/// Bilinear samples at `scale` spacing around `(rx, ry)`; a sample whose 2x2 neighbourhood
/// leaves the image reads zeros there, as the unscaled crop's padding does.
fn resample_plane(
    src: &[u16],
    width: usize,
    height: usize,
    (rx, ry): (isize, isize),
    spec: CropSpec,
    plane: &mut [f32],
) {
    let size = spec.size;
    let half = size as f32 / 2.0;
    let at = |x: isize, y: isize| -> f32 {
        if x < 0 || y < 0 || x >= width as isize || y >= height as isize {
            0.0
        } else {
            src[y as usize * width + x as usize] as f32
        }
    };
    for dy in 0..size {
        let sy = ry as f32 + (dy as f32 - half + 0.5) * spec.scale - 0.5;
        let (y0, fy) = (sy.floor() as isize, sy - sy.floor());
        for dx in 0..size {
            let sx = rx as f32 + (dx as f32 - half + 0.5) * spec.scale - 0.5;
            let (x0, fx) = (sx.floor() as isize, sx - sx.floor());
            let top = at(x0, y0) * (1.0 - fx) + at(x0 + 1, y0) * fx;
            let bottom = at(x0, y0 + 1) * (1.0 - fx) + at(x0 + 1, y0 + 1) * fx;
            plane[dy * size + dx] = top * (1.0 - fy) + bottom * fy;
        }
    }
}

#[cfg(test)]
mod crop_tests {
    use super::*;

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
}
