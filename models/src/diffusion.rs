//! ProtiCelli-style virtual staining by latent diffusion: the landmark stains are encoded once
//! per field, then each protein of the panel is sampled from seeded noise by Euler steps over the
//! EDM sigma schedule (Karras et al. 2022, the sampler ProtiCelli uses), and decoded. The
//! description's `config.liveomics` gives the components, the schedule, and the protein and
//! cell-line vocabularies, so a real export drops in without code changes.
//!
//! The proteins of a panel are sampled together as one batch (the same landmark latent, one
//! protein id per row), so a panel costs `steps` denoiser runs, not `steps * panel`.

use std::path::Path;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::component::Component;
use crate::description::SamplerConfig;
use crate::error::ModelError;
use crate::model::Model;
use crate::runtime::RuntimeOptions;
use crate::tensor::Tensor;

#[derive(Debug)]
pub struct Diffusion {
    /// The denoiser, with the description.
    pub denoiser: Arc<Model>,
    pub encoder: Component,
    pub decoder: Component,
    pub sampler: SamplerConfig,
    pub downsample: usize,
    /// Channels of the latent the denoiser takes (its first input's channel axis).
    pub latent_channels: usize,
}

/// The EDM schedule: `steps` sigmas from `sigma_max` down to `sigma_min` with exponent `rho`,
/// then 0 (the last Euler step lands on the clean sample).
pub fn edm_sigmas(s: &SamplerConfig, steps: usize) -> Vec<f64> {
    let (a, b) = (s.sigma_max.powf(1.0 / s.rho), s.sigma_min.powf(1.0 / s.rho));
    let mut out: Vec<f64> = (0..steps)
        .map(|i| {
            let t = if steps > 1 { i as f64 / (steps - 1) as f64 } else { 0.0 };
            (a + t * (b - a)).powf(s.rho)
        })
        .collect();
    out.push(0.0);
    out
}

/// Standard normal noise from a seeded stream (ChaCha8, Box-Muller): the same seed gives the
/// same sample on every machine and thread count.
pub fn seeded_noise(shape: Vec<usize>, seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut data = Vec::with_capacity(n + 1);
    while data.len() < n {
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        data.push((r * t.cos()) as f32);
        data.push((r * t.sin()) as f32);
    }
    data.truncate(n);
    Tensor::new(shape, data)
}

impl Diffusion {
    pub fn load(path: &Path, opts: &RuntimeOptions) -> Result<Self, ModelError> {
        let denoiser = Arc::new(Model::load(path, opts)?);
        let d = &denoiser.descr;
        let missing = |key: &str| ModelError::Description {
            model: d.name.clone(),
            key: format!("config.liveomics.{key}"),
            message: "missing; a virtual-stain-diffusion model needs it".into(),
        };
        let sampler = d.liveomics.sampler.ok_or_else(|| missing("sampler"))?;
        let downsample = d.liveomics.downsample.ok_or_else(|| missing("downsample"))?;
        if d.liveomics.proteins.is_empty() {
            return Err(missing("proteins"));
        }
        if d.liveomics.cell_lines.is_empty() {
            return Err(missing("cell_lines"));
        }
        if d.inputs.len() != 5 || d.outputs.len() != 1 {
            return Err(ModelError::Description {
                model: d.name.clone(),
                key: "inputs".into(),
                message: format!(
                    "a diffusion denoiser takes (noisy, sigma, landmarks, protein, cell_line) and returns one \
                     tensor; this one has {} inputs and {} outputs",
                    d.inputs.len(),
                    d.outputs.len()
                ),
            });
        }
        let latent_channels = match d.inputs[0].axes.get(1).map(|a| &a.size) {
            Some(crate::description::AxisSize::Fixed(n)) => *n,
            other => {
                return Err(ModelError::Description {
                    model: d.name.clone(),
                    key: "inputs[0].axes[1]".into(),
                    message: format!("the noisy latent needs a fixed channel axis, not {other:?}"),
                })
            }
        };
        let encoder = Component::load(d, "encoder", opts)?;
        let decoder = Component::load(d, "decoder", opts)?;
        Ok(Self {
            sampler,
            downsample,
            latent_channels,
            encoder,
            decoder,
            denoiser,
        })
    }

    pub fn name(&self) -> &str {
        self.denoiser.name()
    }

    /// Label id of a protein in the model's vocabulary.
    pub fn protein_id(&self, name: &str) -> Option<usize> {
        let v = &self.denoiser.descr.liveomics.proteins;
        v.iter().position(|p| p.eq_ignore_ascii_case(name))
    }

    /// The cell line used when none is configured: the first that is not `none` (the
    /// unconditioned label), else the first.
    pub fn default_cell_line(&self) -> usize {
        let v = &self.denoiser.descr.liveomics.cell_lines;
        v.iter().position(|c| !c.eq_ignore_ascii_case("none")).unwrap_or(0)
    }

    pub fn cell_line_id(&self, name: &str) -> Option<usize> {
        let v = &self.denoiser.descr.liveomics.cell_lines;
        v.iter().position(|p| p.eq_ignore_ascii_case(name))
    }

    /// Latent side for an image side: the smallest size at or above `side / downsample` that the
    /// denoiser accepts.
    fn latent_side(&self, side: usize, axis: usize) -> Result<usize, ModelError> {
        let size = &self.denoiser.descr.inputs[0].axes[axis].size;
        let want = side.div_ceil(self.downsample);
        (want..want + 64)
            .find(|&n| size.accepts(n))
            .ok_or_else(|| ModelError::Shape {
                model: self.name().to_string(),
                message: format!("no latent size near {want} is accepted ({size:?})"),
            })
    }

    /// Encodes raw landmark planes `[1, C, H, W]` (edge-padded to what the denoiser accepts);
    /// returns the latent and the padded image size.
    pub fn encode(&self, landmarks: &Tensor) -> Result<(Tensor, usize, usize), ModelError> {
        let (h, w) = (landmarks.shape[2], landmarks.shape[3]);
        let (lh, lw) = (self.latent_side(h, 2)?, self.latent_side(w, 3)?);
        let (ph, pw) = (lh * self.downsample, lw * self.downsample);
        let padded = pad_edge(landmarks, ph, pw);
        Ok((self.encoder.run(padded)?, ph, pw))
    }

    /// Euler sampling over the EDM schedule from `noise` (standard normal, one row per protein),
    /// conditioned on the landmark latent `cond` (`[1, ...]`).
    pub fn sample(
        &self,
        cond: &Tensor,
        proteins: &[usize],
        cell_line: usize,
        noise: &Tensor,
        steps: usize,
        mut on_step: impl FnMut(),
    ) -> Result<Tensor, ModelError> {
        let b = proteins.len();
        let sigmas = edm_sigmas(&self.sampler, steps);
        let mut cond_b = Tensor::new(
            [vec![b], cond.shape[1..].to_vec()].concat(),
            Vec::with_capacity(cond.data.len() * b),
        );
        for _ in 0..b {
            cond_b.data.extend_from_slice(&cond.data);
        }
        let ids = Tensor::new(vec![b], proteins.iter().map(|&p| p as f32).collect());
        let line = Tensor::new(vec![b], vec![cell_line as f32; b]);
        let s0 = sigmas[0] as f32;
        let mut x = Tensor::new(noise.shape.clone(), noise.data.iter().map(|v| v * s0).collect());
        for i in 0..steps {
            let (s, next) = (sigmas[i], sigmas[i + 1]);
            let sigma = Tensor::new(vec![b], vec![s as f32; b]);
            let d = self.denoiser.infer(&[&x, &sigma, &cond_b, &ids, &line])?.swap_remove(0);
            let k = ((next - s) / s) as f32;
            for (xv, dv) in x.data.iter_mut().zip(&d.data) {
                *xv += (*xv - dv) * k;
            }
            on_step();
        }
        Ok(x)
    }

    /// Decodes latents `[B, L, h, w]` to images `[B, 1, H, W]` (times the decoder's gain).
    pub fn decode(&self, latent: Tensor) -> Result<Tensor, ModelError> {
        self.decoder.run(latent)
    }

    /// Virtual images `[K, H, W]` of `proteins` for raw landmark planes `[1, C, H, W]`; noise
    /// seeded by `seed`. `on_step` is called after every denoiser run (cost accounting).
    pub fn generate(
        &self,
        landmarks: &Tensor,
        proteins: &[usize],
        cell_line: usize,
        steps: usize,
        seed: u64,
        on_step: impl FnMut(),
    ) -> Result<Tensor, ModelError> {
        self.generate_from(landmarks, proteins, cell_line, steps, Noise::Seed(seed), on_step)
    }

    /// [`Diffusion::generate`] with the initial noise given or seeded.
    pub fn generate_from(
        &self,
        landmarks: &Tensor,
        proteins: &[usize],
        cell_line: usize,
        steps: usize,
        noise: Noise,
        on_step: impl FnMut(),
    ) -> Result<Tensor, ModelError> {
        let (h, w) = (landmarks.shape[2], landmarks.shape[3]);
        let (cond, ph, pw) = self.encode(landmarks)?;
        let shape = vec![proteins.len(), self.latent_channels, cond.shape[2], cond.shape[3]];
        let noise = match noise {
            Noise::Seed(seed) => seeded_noise(shape, seed),
            Noise::Given(t) if t.shape == shape => t,
            Noise::Given(t) => {
                return Err(ModelError::Shape {
                    model: self.name().to_string(),
                    message: format!("noise has shape {:?}, the latent needs {shape:?}", t.shape),
                })
            }
        };
        let z = self.sample(&cond, proteins, cell_line, &noise, steps, on_step)?;
        let img = self.decode(z)?;
        let mut out = Vec::with_capacity(proteins.len() * h * w);
        for k in 0..proteins.len() {
            let plane = &img.data[k * ph * pw..(k + 1) * ph * pw];
            for y in 0..h {
                out.extend_from_slice(&plane[y * pw..y * pw + w]);
            }
        }
        Ok(Tensor::new(vec![proteins.len(), h, w], out))
    }
}

/// Where the initial noise of a sample comes from.
#[derive(Debug, Clone)]
pub enum Noise {
    Seed(u64),
    /// Standard normal values shaped `[K, latent channels, h, w]` (parity tests).
    Given(Tensor),
}

/// `[N, C, H, W]` grown to `[N, C, ph, pw]` by repeating the last row and column.
fn pad_edge(t: &Tensor, ph: usize, pw: usize) -> Tensor {
    let (n, c, h, w) = (t.shape[0], t.shape[1], t.shape[2], t.shape[3]);
    if (h, w) == (ph, pw) {
        return t.clone();
    }
    let mut out = Vec::with_capacity(n * c * ph * pw);
    for plane in t.data.chunks(h * w) {
        for y in 0..ph {
            let row = &plane[y.min(h - 1) * w..(y.min(h - 1) + 1) * w];
            out.extend_from_slice(row);
            out.extend(std::iter::repeat_n(row[w - 1], pw - w));
        }
    }
    Tensor::new(vec![n, c, ph, pw], out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_matches_the_edm_formula() {
        let s = SamplerConfig {
            sigma_max: 80.0,
            sigma_min: 0.002,
            rho: 7.0,
            steps: 50,
            sigma_data: 0.5,
        };
        let v = edm_sigmas(&s, 50);
        assert_eq!(v.len(), 51);
        assert!((v[0] - 80.0).abs() < 1e-9 && (v[49] - 0.002).abs() < 1e-12 && v[50] == 0.0);
        assert!(v.windows(2).all(|w| w[0] > w[1]));
        // Midpoint by the formula, computed independently.
        let mid = (80f64.powf(1.0 / 7.0) + 0.5 * (0.002f64.powf(1.0 / 7.0) - 80f64.powf(1.0 / 7.0))).powi(7);
        let v3 = edm_sigmas(&s, 3);
        assert!((v3[1] - mid).abs() < 1e-12);
    }

    #[test]
    fn seeded_noise_is_standard_normal_and_reproducible() {
        let a = seeded_noise(vec![4, 64, 64], 7);
        assert_eq!(a.data, seeded_noise(vec![4, 64, 64], 7).data);
        assert_ne!(a.data, seeded_noise(vec![4, 64, 64], 8).data);
        let n = a.data.len() as f64;
        let mean = a.data.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = a.data.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.02 && (var - 1.0).abs() < 0.03, "mean {mean} var {var}");
    }

    #[test]
    fn edge_padding_repeats_the_border() {
        let t = Tensor::new(vec![1, 1, 2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let p = pad_edge(&t, 3, 3);
        assert_eq!(p.data, vec![1.0, 2.0, 2.0, 3.0, 4.0, 4.0, 3.0, 4.0, 4.0]);
    }
}
