//! Well-omics (the Image2Omics shape): a tile encoder turns each tile of a field into a feature
//! vector; the features of every tile of every field of a well are pooled (mean, max, or both);
//! a head maps the pooled vector to bulk abundances per well. The pool is kept as running
//! sums, so the readout after each field costs one head run, whatever the number of fields.

use std::path::Path;
use std::sync::Arc;

use crate::component::Component;
use crate::description::{AxisSize, Pooling};
use crate::error::ModelError;
use crate::model::Model;
use crate::runtime::RuntimeOptions;
use crate::tensor::Tensor;

#[derive(Debug)]
pub struct WellModel {
    pub encoder: Arc<Model>,
    pub head: Component,
    pub pooling: Pooling,
    /// Side of the square tiles the encoder takes.
    pub tile: usize,
    pub features: usize,
}

/// Running pool of tile features for one well.
#[derive(Debug, Clone, Default)]
pub struct Pool {
    pub tiles: usize,
    sum: Vec<f64>,
    max: Vec<f32>,
}

impl Pool {
    pub fn add(&mut self, features: &[f32], dim: usize) {
        if self.sum.is_empty() {
            self.sum = vec![0.0; dim];
            self.max = vec![f32::NEG_INFINITY; dim];
        }
        for row in features.chunks(dim) {
            for (i, &v) in row.iter().enumerate() {
                self.sum[i] += v as f64;
                self.max[i] = self.max[i].max(v);
            }
            self.tiles += 1;
        }
    }

    /// Tiles, per-feature sums and maxima: what another pool needs to take this one in.
    pub fn parts(&self) -> (usize, &[f64], &[f32]) {
        (self.tiles, &self.sum, &self.max)
    }

    /// Takes in a pool given by its parts (e.g. one field's, stored by another process). Pools
    /// taken in the same order give the same sums, bit for bit.
    pub fn absorb(&mut self, tiles: usize, sum: &[f64], max: &[f32]) {
        if self.sum.is_empty() {
            self.sum = vec![0.0; sum.len()];
            self.max = vec![f32::NEG_INFINITY; max.len()];
        }
        for (a, b) in self.sum.iter_mut().zip(sum) {
            *a += b;
        }
        for (a, b) in self.max.iter_mut().zip(max) {
            *a = a.max(*b);
        }
        self.tiles += tiles;
    }

    /// The pooled vector the head takes.
    pub fn pooled(&self, pooling: Pooling) -> Vec<f32> {
        let n = self.tiles.max(1) as f64;
        let mean = self.sum.iter().map(|s| (s / n) as f32);
        match pooling {
            Pooling::Mean => mean.collect(),
            Pooling::Max => self.max.clone(),
            Pooling::MeanMax => mean.chain(self.max.iter().copied()).collect(),
        }
    }
}

impl WellModel {
    pub fn load(path: &Path, opts: &RuntimeOptions) -> Result<Self, ModelError> {
        let encoder = Arc::new(Model::load(path, opts)?);
        let d = &encoder.descr;
        let bad = |key: &str, message: String| ModelError::Description {
            model: d.name.clone(),
            key: key.into(),
            message,
        };
        let pooling = d.liveomics.pooling.ok_or_else(|| {
            bad(
                "config.liveomics.pooling",
                "missing; a well-omics model needs mean, max or mean-max".into(),
            )
        })?;
        let sides: Vec<&AxisSize> = d.inputs[0].axes.iter().skip(2).map(|a| &a.size).collect();
        let tile = match sides.as_slice() {
            [AxisSize::Fixed(a), AxisSize::Fixed(b)] if a == b => *a,
            other => {
                return Err(bad(
                    "inputs[0].axes",
                    format!("a well-omics encoder takes square tiles of a fixed size, not {other:?}"),
                ))
            }
        };
        let features = match d.outputs[0].axes.get(1).map(|a| &a.size) {
            Some(AxisSize::Fixed(n)) => *n,
            other => {
                return Err(bad(
                    "outputs[0].axes[1]",
                    format!("the feature axis needs a fixed size, not {other:?}"),
                ))
            }
        };
        let head = Component::load(d, "head", opts)?;
        Ok(Self {
            encoder,
            head,
            pooling,
            tile,
            features,
        })
    }

    pub fn name(&self) -> &str {
        self.encoder.name()
    }

    /// Tile origins covering `side` pixels with tiles of `tile`: non-overlapping, the last one
    /// moved back to end at the border so that every pixel is seen.
    pub fn origins(side: usize, tile: usize) -> Vec<usize> {
        if side <= tile {
            return vec![0];
        }
        let mut o: Vec<usize> = (0..side / tile).map(|i| i * tile).collect();
        if !side.is_multiple_of(tile) {
            o.push(side - tile);
        }
        o
    }

    /// Features `[T, F]` of every tile of raw planes `planes` (`C` planes of `w * h`).
    pub fn field_features(&self, planes: &[&[u16]], w: usize, h: usize) -> Result<Tensor, ModelError> {
        let t = self.tile;
        if w < t || h < t {
            return Err(ModelError::Shape {
                model: self.name().into(),
                message: format!("the field ({w}x{h}) is smaller than the encoder's {t} px tile"),
            });
        }
        let (ys, xs) = (Self::origins(h, t), Self::origins(w, t));
        let n = ys.len() * xs.len();
        let mut data = Vec::with_capacity(n * planes.len() * t * t);
        for &y0 in &ys {
            for &x0 in &xs {
                for p in planes {
                    for y in y0..y0 + t {
                        data.extend(p[y * w + x0..y * w + x0 + t].iter().map(|&v| v as f32));
                    }
                }
            }
        }
        let out = self.encoder.run(vec![Tensor::new(vec![n, planes.len(), t, t], data)])?;
        Ok(out
            .into_iter()
            .next()
            .unwrap_or_else(|| Tensor::zeros(vec![0, self.features])))
    }

    /// The head on one pooled vector.
    pub fn readout(&self, pool: &Pool) -> Result<Vec<f32>, ModelError> {
        let v = pool.pooled(self.pooling);
        let n = v.len();
        Ok(self.head.infer(&[&Tensor::new(vec![1, n], v)])?.swap_remove(0).data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_field() {
        assert_eq!(WellModel::origins(512, 256), vec![0, 256]);
        assert_eq!(WellModel::origins(600, 256), vec![0, 256, 344]);
        assert_eq!(WellModel::origins(256, 256), vec![0]);
    }

    #[test]
    fn pooling_is_running_mean_and_max() {
        let mut p = Pool::default();
        p.add(&[1.0, 5.0, 3.0, -1.0], 2);
        p.add(&[2.0, 0.0], 2);
        assert_eq!(p.tiles, 3);
        assert_eq!(p.pooled(Pooling::Mean), vec![2.0, 4.0 / 3.0]);
        assert_eq!(p.pooled(Pooling::Max), vec![3.0, 5.0]);
        assert_eq!(p.pooled(Pooling::MeanMax).len(), 4);
    }
}
