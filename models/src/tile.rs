//! Whole-field models on fields of any size: the field is preprocessed once (so that
//! normalisation statistics are the field's, not each tile's), cut into tiles the model accepts,
//! and the outputs are blended back. Pixels within the output halo of a tile edge get weight 0
//! unless that edge is the field's border; past the halo, weights ramp linearly over `overlap`
//! pixels so that seams do not show.

use crate::description::{AxisKind, AxisSize};
use crate::error::ModelError;
use crate::model::Model;
use crate::tensor::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileOptions {
    /// Wanted tile side; rounded to what the model accepts.
    pub tile: usize,
    /// Blend width beyond the halo.
    pub overlap: usize,
    /// Tiles per `session.run`, when the model's batch axis allows more than one.
    pub batch: usize,
}

impl Default for TileOptions {
    fn default() -> Self {
        Self {
            tile: 512,
            overlap: 16,
            batch: 4,
        }
    }
}

/// Start positions of tiles of `t` covering `0..len`, with neighbours overlapping by at least
/// `min_overlap`.
fn starts(len: usize, t: usize, min_overlap: usize) -> Vec<usize> {
    if len <= t {
        return vec![0];
    }
    let stride = t.saturating_sub(min_overlap).max(1);
    let n = (len - t).div_ceil(stride) + 1;
    (0..n)
        .map(|k| ((k * (len - t)) as f64 / (n - 1) as f64).round() as usize)
        .collect()
}

/// Weight of position `i` of a tile starting at `s`, length `t`, in a field of length `len`.
fn weight(i: usize, s: usize, t: usize, len: usize, halo: usize, overlap: usize) -> f32 {
    let lo = if s == 0 { usize::MAX } else { i };
    let hi = if s + t >= len { usize::MAX } else { t - 1 - i };
    let d = lo.min(hi);
    if d < halo {
        0.0
    } else {
        (((d - halo + 1) as f32) / (overlap + 1) as f32).min(1.0)
    }
}

/// Reflect an index into `0..len` (numpy's "reflect": no repeated edge).
fn reflect(i: isize, len: usize) -> usize {
    if len == 1 {
        return 0;
    }
    let period = 2 * (len as isize - 1);
    let m = i.rem_euclid(period);
    (if m < len as isize { m } else { period - m }) as usize
}

impl Model {
    /// Runs a single-input, single-output model whose last two axes are space (y, x) on a field
    /// `input` of shape `[1?, C?, H, W]` as the description lays it out, by tiles.
    pub fn run_tiled(&self, input: Tensor, opts: &TileOptions) -> Result<Tensor, ModelError> {
        self.run_tiled_timed(input, opts).map(|(t, _)| t)
    }

    /// [`Model::run_tiled`], also returning the time spent inside `session.run` (for the
    /// overhead benchmark: everything else is tiling, pre- and postprocessing).
    pub fn run_tiled_timed(
        &self,
        mut input: Tensor,
        opts: &TileOptions,
    ) -> Result<(Tensor, std::time::Duration), ModelError> {
        let mut infer_time = std::time::Duration::ZERO;
        let name = self.descr.name.clone();
        let shape_err = |message: String| ModelError::Shape {
            model: name.clone(),
            message,
        };
        if self.descr.inputs.len() != 1 || self.descr.outputs.len() != 1 {
            return Err(shape_err("tiling needs a model with one input and one output".into()));
        }
        let din = &self.descr.inputs[0];
        let dout = &self.descr.outputs[0];
        let rank = din.axes.len();
        let space_last = |axes: &[crate::description::Axis]| {
            axes.len() >= 2
                && axes[axes.len() - 2..].iter().all(|a| a.kind == AxisKind::Space)
                && axes[..axes.len() - 2].iter().all(|a| a.kind != AxisKind::Space)
        };
        if !space_last(&din.axes) || !space_last(&dout.axes) {
            return Err(shape_err(
                "tiling needs the last two axes of input and output to be y, x".into(),
            ));
        }
        for a in &dout.axes[dout.axes.len() - 2..] {
            if let AxisSize::Reference { offset, .. } = a.size {
                if offset != 0 {
                    return Err(shape_err(format!(
                        "output axis {:?} has offset {offset}; tiling needs same-size outputs",
                        a.id
                    )));
                }
            }
        }
        if input.shape.len() != rank {
            return Err(shape_err(format!(
                "field shape {:?} does not have the model's {rank} axes",
                input.shape
            )));
        }
        let (h, w) = (input.shape[rank - 2], input.shape[rank - 1]);
        let lead: usize = input.shape[..rank - 2].iter().product();
        let halo = dout.halo();
        let side = |axis: usize, len: usize| -> Result<usize, ModelError> {
            let a = &din.axes[axis];
            a.size
                .fit(opts.tile.min(len).max(1))
                .or(match a.size {
                    AxisSize::Fixed(n) => Some(n),
                    _ => None,
                })
                .ok_or_else(|| shape_err(format!("input axis {:?} has no usable tile size", a.id)))
        };
        let (th, tw) = (side(rank - 2, h)?, side(rank - 1, w)?);
        for (t, len) in [(th, h), (tw, w)] {
            if t < len && t <= 2 * halo {
                return Err(shape_err(format!("tile {t} leaves nothing inside the halo {halo}")));
            }
        }
        self.preprocess(0, &mut input);
        let ys = starts(h, th, 2 * halo + opts.overlap);
        let xs = starts(w, tw, 2 * halo + opts.overlap);
        let tiles: Vec<(usize, usize)> = ys.iter().flat_map(|&y| xs.iter().map(move |&x| (y, x))).collect();
        let batch_axis = din.batch_axis();
        let per_run = match (batch_axis.map(|b| &din.axes[b].size), self.fixed_batch(0)) {
            (_, Some(n)) => n,
            (Some(AxisSize::Any), None) => opts.batch.max(1),
            (Some(s), None) if s.accepts(opts.batch) => opts.batch.max(1),
            _ => 1,
        };
        let mut acc: Option<Tensor> = None;
        let mut wsum = vec![0f32; h * w];
        let mut out_lead = 0;
        for group in tiles.chunks(per_run) {
            let mut shape = input.shape.clone();
            shape[rank - 2] = th;
            shape[rank - 1] = tw;
            let one: usize = lead * th * tw;
            let mut data = Vec::with_capacity(one * group.len());
            for &(y0, x0) in group {
                for l in 0..lead {
                    let plane = &input.data[l * h * w..(l + 1) * h * w];
                    for ty in 0..th {
                        let sy = reflect((y0 + ty) as isize, h);
                        let row = &plane[sy * w..(sy + 1) * w];
                        if x0 + tw <= w {
                            data.extend_from_slice(&row[x0..x0 + tw]);
                        } else {
                            data.extend((0..tw).map(|tx| row[reflect((x0 + tx) as isize, w)]));
                        }
                    }
                }
            }
            if let Some(b) = batch_axis {
                shape[b] = group.len();
            }
            let tile_in = Tensor::new(shape, data);
            let t0 = std::time::Instant::now();
            let out = self.infer(&[&tile_in])?.remove(0);
            infer_time += t0.elapsed();
            let orank = out.shape.len();
            if out.shape[orank - 2] != th || out.shape[orank - 1] != tw {
                return Err(shape_err(format!("output tile {:?} is not {th}x{tw}", out.shape)));
            }
            let olead_all: usize = out.shape[..orank - 2].iter().product();
            let olead = olead_all / group.len();
            let acc = acc.get_or_insert_with(|| {
                out_lead = olead;
                let mut s = out.shape.clone();
                if let Some(b) = dout.batch_axis() {
                    s[b] = 1;
                }
                s[orank - 2] = h;
                s[orank - 1] = w;
                Tensor::zeros(s)
            });
            for (k, &(y0, x0)) in group.iter().enumerate() {
                let wx: Vec<f32> = (0..tw.min(w - x0))
                    .map(|tx| weight(tx, x0, tw, w, halo, opts.overlap))
                    .collect();
                for ty in 0..th.min(h - y0) {
                    let wy = weight(ty, y0, th, h, halo, opts.overlap);
                    if wy == 0.0 {
                        continue;
                    }
                    let dst = (y0 + ty) * w + x0;
                    for (s, &wxv) in wsum[dst..dst + wx.len()].iter_mut().zip(&wx) {
                        *s += wy * wxv;
                    }
                    for l in 0..out_lead {
                        let src = ((k * out_lead + l) * th + ty) * tw;
                        let a = &mut acc.data[l * h * w + dst..l * h * w + dst + wx.len()];
                        for ((a, &o), &wxv) in a.iter_mut().zip(&out.data[src..src + wx.len()]).zip(&wx) {
                            *a += wy * wxv * o;
                        }
                    }
                }
            }
        }
        let mut out = acc.ok_or_else(|| shape_err("no tiles".into()))?;
        let inv: Vec<f32> = wsum.iter().map(|&s| 1.0 / s).collect();
        for plane in out.data.chunks_mut(h * w) {
            for (v, &s) in plane.iter_mut().zip(&inv) {
                *v *= s;
            }
        }
        self.postprocess(0, &mut out);
        Ok((out, infer_time))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_with_overlap_and_weights_sum_positive() {
        for (len, t, halo, ov) in [(2160, 512, 32, 16), (100, 64, 8, 8), (64, 64, 8, 0), (513, 512, 4, 4)] {
            let s = starts(len, t, 2 * halo + ov);
            assert_eq!(s[0], 0);
            assert!(s.last().copied().unwrap() + t >= len);
            for i in 0..len {
                let total: f32 = s
                    .iter()
                    .filter(|&&x| i >= x && i < x + t)
                    .map(|&x| weight(i - x, x, t, len, halo, ov))
                    .sum();
                assert!(total > 0.0, "pixel {i} uncovered in {len}/{t}");
            }
        }
    }

    #[test]
    fn reflect_indices() {
        assert_eq!(reflect(-1, 5), 1);
        assert_eq!(reflect(5, 5), 3);
        assert_eq!(reflect(2, 5), 2);
    }
}
