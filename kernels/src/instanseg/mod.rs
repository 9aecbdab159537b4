//! InstanSeg's post-processing (Goldsborough et al. 2024), ported from the TorchScript of the
//! bioimage.io model `fluorescence_nuclei_and_cells` 0.1.1 (`InstanSeg_Torchscript.forward`), so
//! that only the network runs in ONNX Runtime and the rest is plain Rust on rayon.
//!
//! The network gives, per target (nuclei, then cells), five channels: two offsets that move each
//! pixel to an embedding near its object's, two sigma features, and a seed map. Seeds are the
//! local maxima of the seed map; around each seed a small MLP (the "pixel classifier") scores
//! every pixel of a window by its embedding's distance to the seed's; windows that overlap by
//! more than `overlap_threshold` of the smaller one are one object; a pixel takes the object that
//! scored it highest. The nuclei and cell images are then made consistent
//! ([`resolve::cells_and_nuclei`]).
//!
//! Written to reproduce the TorchScript's labels exactly on the same network output (the test
//! tensors of `models/instanseg_fluorescence`), including its tie rules (first maximum in
//! row-major order, lowest window on equal scores) and iteration limits.

pub(crate) mod merge;
pub mod resolve;
pub mod scale;
pub(crate) mod window;

#[cfg(test)]
mod tests;

use rayon::prelude::*;

use crate::KernelError;

/// Network channels per target: x offset, y offset, two sigma features, seed map.
pub const CHANNELS_PER_TARGET: usize = 5;

/// A dense layer of the pixel classifier: `weight` is `outputs x inputs`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    pub inputs: usize,
    pub outputs: usize,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// The post-processing's settings; the model description carries the values it was trained
/// with (`config.liveomics.instanseg`).
#[derive(Debug, Clone, PartialEq)]
pub struct InstanSegParams {
    /// A pixel belongs to a seed's object when the classifier scores it at least this.
    pub mask_threshold: f32,
    /// Seeds are maxima over a `(2 * peak_distance + 1)²` window.
    pub peak_distance: usize,
    /// Seeds must exceed this on the seed map (`channel / 15 + 0.5`).
    pub seed_threshold: f32,
    /// Windows overlapping by more than this fraction of the smaller one are one object.
    pub overlap_threshold: f32,
    /// Half the side of the window scored around a seed, in model pixels.
    pub window_size: usize,
    /// Keep only the part of a window's object connected to its seed, and fill its holes.
    pub cleanup_fragments: bool,
    /// Make nuclei and cells consistent (one nucleus per cell, nuclei inside their cells).
    pub resolve_cell_and_nucleus: bool,
    /// Layers applied in order with ReLU between them; 4 inputs (offset distance x, y, sigma
    /// features), 1 output (a logit).
    pub classifier: Vec<Linear>,
}

/// Widest layer the classifier may have (its activations live on the stack).
pub const MAX_WIDTH: usize = 64;

impl InstanSegParams {
    pub fn validate(&self) -> Result<(), KernelError> {
        let bad = |name: &'static str, reason: String| Err(KernelError::Parameter { name, reason });
        for (name, v) in [
            ("mask_threshold", self.mask_threshold),
            ("seed_threshold", self.seed_threshold),
            ("overlap_threshold", self.overlap_threshold),
        ] {
            if !(v.is_finite() && v > 0.0 && v < 1.0) {
                return bad(name, format!("must be within (0, 1), got {v}"));
            }
        }
        if self.window_size == 0 {
            return bad("window_size", "must be at least 1".into());
        }
        let mut width = 4;
        for (i, l) in self.classifier.iter().enumerate() {
            if l.inputs != width || l.outputs == 0 || l.outputs > MAX_WIDTH {
                return bad(
                    "pixel_classifier",
                    format!(
                        "layer {i} is {}x{}, the layer before gives {width}",
                        l.outputs, l.inputs
                    ),
                );
            }
            if l.weight.len() != l.inputs * l.outputs || l.bias.len() != l.outputs {
                return bad("pixel_classifier", format!("layer {i}'s weights do not fit its shape"));
            }
            width = l.outputs;
        }
        if self.classifier.is_empty() || width != 1 {
            return bad("pixel_classifier", format!("must end in one output, ends in {width}"));
        }
        Ok(())
    }
}

/// Label images of one field at the model's scale: cells share their nucleus's label; cells
/// without a nucleus come after the last nucleus.
#[derive(Debug, Clone, PartialEq)]
pub struct Instances {
    pub nuclei: Vec<u32>,
    pub cells: Option<Vec<u32>>,
}

/// Runs the post-processing on the network output `embedding` (`channels x height x width`,
/// row-major; 5 channels for nuclei only, 10 for nuclei and cells). `cells` asks for the second
/// target when the network has it. Labels are as the TorchScript numbers them (not consecutive);
/// [`consecutive`] renumbers them.
pub fn instances(
    embedding: &[f32],
    channels: usize,
    width: usize,
    height: usize,
    cells: bool,
    p: &InstanSegParams,
) -> Result<Instances, KernelError> {
    instances_with(embedding, channels, width, height, cells, p, true, |e| {
        Ok(target(e, width, height, p))
    })
}

/// [`instances`] with each target's labels from `target` (given that target's five channels):
/// the CPU's [`target`] or the CUDA back end's. `parallel` runs the two targets on rayon.
#[allow(clippy::too_many_arguments)]
pub(crate) fn instances_with<E, F>(
    embedding: &[f32],
    channels: usize,
    width: usize,
    height: usize,
    cells: bool,
    p: &InstanSegParams,
    parallel: bool,
    target: F,
) -> Result<Instances, E>
where
    E: From<KernelError> + Send,
    F: Fn(&[f32]) -> Result<Vec<u32>, E> + Sync,
{
    p.validate()?;
    let n = width * height;
    if channels != CHANNELS_PER_TARGET && channels != 2 * CHANNELS_PER_TARGET {
        return Err(KernelError::Parameter {
            name: "channels",
            reason: format!("InstanSeg outputs 5 channels per target, got {channels}"),
        }
        .into());
    }
    crate::check_len("embedding", embedding, width * channels, height)?;
    let targets = if cells && channels == 2 * CHANNELS_PER_TARGET {
        2
    } else {
        1
    };
    let one = |t: usize| target(&embedding[t * CHANNELS_PER_TARGET * n..(t + 1) * CHANNELS_PER_TARGET * n]);
    let mut labels: Vec<Vec<u32>> = if parallel {
        (0..targets).into_par_iter().map(one).collect::<Result<_, E>>()?
    } else {
        (0..targets).map(one).collect::<Result<_, E>>()?
    };
    let nuclei_raw = labels.remove(0);
    Ok(match labels.pop() {
        Some(cells_raw) if p.resolve_cell_and_nucleus => {
            let (nuclei, cells) = resolve::cells_and_nuclei(&nuclei_raw, &cells_raw);
            Instances {
                nuclei,
                cells: Some(cells),
            }
        }
        cells => Instances {
            nuclei: nuclei_raw,
            cells,
        },
    })
}

/// Renumbers 1..N by first value, the same map for nuclei and cells (so a cell keeps its
/// nucleus's label); returns the number of cells (or nuclei, without cells).
pub fn consecutive(inst: &mut Instances) -> u32 {
    let base = inst.cells.as_deref().unwrap_or(&inst.nuclei);
    let mut ids: Vec<u32> = base.iter().copied().filter(|&v| v > 0).collect();
    ids.extend(inst.nuclei.iter().copied().filter(|&v| v > 0));
    ids.sort_unstable();
    ids.dedup();
    let map = |v: &mut u32| {
        if *v > 0 {
            *v = ids.binary_search(v).map_or(0, |i| i as u32 + 1);
        }
    };
    inst.nuclei.par_iter_mut().for_each(map);
    if let Some(c) = inst.cells.as_mut() {
        c.par_iter_mut().for_each(map);
    }
    ids.len() as u32
}

/// torch's float32 `linspace` (first half counted from `start`, second from `end`).
pub(crate) fn linspace(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    (0..n)
        .map(|i| {
            if i < n / 2 {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Where each pixel's embedding lands: its offset (`(sigmoid - 0.5) * 8`) plus its position on
/// a grid of a quarter pixel per pixel.
pub(crate) struct Fields<'a> {
    pub x: Vec<f32>,
    pub y: Vec<f32>,
    pub sigma: [&'a [f32]; 2],
    pub width: usize,
}

/// Seeds: pixels of `map` above `threshold` that are the first maximum, in row-major order, of
/// their `(2d+1)²` window (max pooling with indices, as torch computes it). Row-major order.
pub(crate) fn peaks(map: &[f32], width: usize, height: usize, d: usize, threshold: f32) -> Vec<(usize, usize)> {
    let rows: Vec<Vec<(usize, usize)>> = (0..height)
        .into_par_iter()
        .map(|y| {
            let mut out = Vec::new();
            for x in 0..width {
                let v = map[y * width + x];
                if !(v > threshold) {
                    continue;
                }
                let (y0, y1) = (y.saturating_sub(d), (y + d + 1).min(height));
                let (x0, x1) = (x.saturating_sub(d), (x + d + 1).min(width));
                let first = (y0..y1).all(|qy| {
                    (x0..x1).all(|qx| {
                        let q = map[qy * width + qx];
                        if q.is_nan() {
                            return false;
                        }
                        if (qy, qx) < (y, x) {
                            q < v
                        } else {
                            q <= v
                        }
                    })
                });
                if first {
                    out.push((y, x));
                }
            }
            out
        })
        .collect();
    rows.into_iter().flatten().collect()
}

/// The embedding grid of a side of `n` pixels: a quarter pixel per pixel.
pub(crate) fn grid(n: usize) -> Vec<f32> {
    linspace(0.0, (n * 64) as f32 / 256.0, n)
}

/// The half-side of the windows scored on a `width x height` image: torch clamps seeds to
/// [ws, side - ws]; on sides under 2 * window_size that would index outside the image, so the
/// window shrinks to fit instead (never the case from 64 px up).
pub(crate) fn window_half_side(width: usize, height: usize, p: &InstanSegParams) -> usize {
    p.window_size.min(height / 2).min(width / 2).max(1)
}

/// One target's labels: seeds, scored windows, merged objects.
fn target(e: &[f32], width: usize, height: usize, p: &InstanSegParams) -> Vec<u32> {
    let n = width * height;
    let ch = |k: usize| &e[k * n..(k + 1) * n];
    let (xx, yy) = (grid(width), grid(height));
    let offset = |k: usize, grid: &(dyn Fn(usize) -> f32 + Sync)| -> Vec<f32> {
        ch(k)
            .par_iter()
            .enumerate()
            .map(|(i, &v)| (sigmoid(v) - 0.5) * 8.0 + grid(i))
            .collect()
    };
    let fields = Fields {
        x: offset(0, &|i| xx[i % width]),
        y: offset(1, &|i| yy[i / width]),
        sigma: [ch(2), ch(3)],
        width,
    };
    let seed_map: Vec<f32> = ch(4).par_iter().map(|&v| v / 15.0 + 0.5).collect();
    let seeds = peaks(&seed_map, width, height, p.peak_distance, p.seed_threshold);
    if seeds.is_empty() || width < 2 || height < 2 {
        return vec![0; n];
    }
    let ws = window_half_side(width, height, p);
    let windows: Vec<window::Window> = seeds
        .par_iter()
        .map(|&(y, x)| window::Window::score(&fields, y, x, ws, height, p))
        .collect();
    merge::labels(&windows, width, height, p)
}
