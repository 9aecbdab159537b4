//! Per-cell crops gathered into a model batch.

use super::*;

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
pub(super) fn resample_plane(
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
