//! The exact Euclidean distance transform, the max filter and the watershed seeds found with it.

use super::label::label_points;
use super::*;

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

/// Maximum over `[x - r, x + r]` for every `x` in three comparisons per pixel whatever `r`
/// (van Herk / Gil-Werman): block-wise prefix maxima `g` and suffix maxima `h` over the row
/// padded with -inf, then `out[x] = max(h[x], g[x + 2r])` in padded coordinates. Blocks are
/// walked as slices, so there is no division or border test per pixel.
pub(super) fn running_max_1d(src: &[f32], out: &mut [f32], r: usize, g: &mut [f32], h: &mut [f32]) {
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
