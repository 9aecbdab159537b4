//! InstanSeg's post-processing with its per-pixel and per-window work on the device
//! (`kernels/cuda/instanseg.cu`): the embedding fields, the seeds, the pixel classifier over
//! every window and each window's cleanup. The seeds are compacted and the windows merged into
//! labels on the host: both are small next to the scoring, which is `seeds x (2 ws)²` classifier
//! evaluations.

use super::*;
use crate::instanseg::{self, merge, window::Window, InstanSegParams, CHANNELS_PER_TARGET};

impl Gpu {
    /// One target's labels from its five channels (`Steps::instanseg` runs the targets one
    /// after the other: each already fills the device).
    pub(super) fn instanseg_target(
        &self,
        e: &[f32],
        width: usize,
        height: usize,
        p: &InstanSegParams,
    ) -> Result<Vec<u32>, GpuError> {
        let n = width * height;
        if width < 2 || height < 2 {
            return Ok(vec![0; n]);
        }
        let (w, h) = (side(width, "width")?, side(height, "height")?);
        side(CHANNELS_PER_TARGET * n, "pixel count")?;
        let emb = self.dev.upload(e)?;
        let (xx, yy) = (
            self.dev.upload(&instanseg::grid(width))?,
            self.dev.upload(&instanseg::grid(height))?,
        );
        let (x, y, seed) = (
            self.dev.zeros::<f32>(n)?,
            self.dev.zeros::<f32>(n)?,
            self.dev.zeros::<f32>(n)?,
        );
        let fields = InstansegFieldsArgs {
            emb: emb.ptr(),
            xx: xx.ptr(),
            yy: yy.ptr(),
            x: x.ptr(),
            y: y.ptr(),
            seed: seed.ptr(),
            width: w,
            height: h,
        };
        self.dev.launch("instanseg_fields", Grid::linear(n), fields)?;
        let flag = self.dev.zeros::<u8>(n)?;
        let peaks = InstansegPeaksArgs {
            map: seed.ptr(),
            flag: flag.ptr(),
            width: w,
            height: h,
            distance: side(p.peak_distance, "peak_distance")?,
            threshold: p.seed_threshold,
        };
        self.dev.launch("instanseg_peaks", Grid::image(width, height), peaks)?;
        // Raster order, as the CPU lists them: the window numbering and its tie rule follow it.
        let seeds: Vec<usize> = self
            .dev
            .read::<u8>(&flag, n)?
            .iter()
            .enumerate()
            .filter_map(|(i, &f)| (f != 0).then_some(i))
            .collect();
        if seeds.is_empty() {
            return Ok(vec![0; n]);
        }
        let ws = instanseg::window_half_side(width, height, p);
        let s = 2 * ws;
        let count = seeds.len();
        side(count * s * s, "window pixels")?;
        let mut placed = Vec::with_capacity(4 * count);
        for &i in &seeds {
            let (sy, sx) = (i / width, i % width);
            let (top, left) = Window::corner(sy, sx, ws, width, height);
            placed.extend([sy, sx, top, left].map(|v| v as u32));
        }
        let windows = self.dev.upload(&placed)?;
        let (mut layers, mut shapes) = (Vec::new(), Vec::new());
        for l in &p.classifier {
            layers.extend_from_slice(&l.weight);
            layers.extend_from_slice(&l.bias);
            shapes.extend([l.inputs as u32, l.outputs as u32]);
        }
        let (layers_d, shapes_d) = (self.dev.upload(&layers)?, self.dev.upload(&shapes)?);
        let score = self.dev.zeros::<f32>(count * s * s)?;
        let sigma = |k: usize| emb.ptr() + (k * n * std::mem::size_of::<f32>()) as u64;
        let scoring = InstansegScoreArgs {
            x: x.ptr(),
            y: y.ptr(),
            sigma0: sigma(2),
            sigma1: sigma(3),
            windows: windows.ptr(),
            layers: layers_d.ptr(),
            shapes: shapes_d.ptr(),
            score: score.ptr(),
            width: w,
            side: s as u32,
            count: count as u32,
            layer_count: p.classifier.len() as u32,
        };
        self.dev
            .launch("instanseg_score", Grid::linear(count * s * s), scoring)?;
        if p.cleanup_fragments {
            let scratch = self.dev.zeros::<u8>(3 * count * s * s)?;
            let queue = self.dev.zeros::<u32>(count * (s * s + 1))?;
            let cleanup = InstansegCleanupArgs {
                score: score.ptr(),
                windows: windows.ptr(),
                scratch: scratch.ptr(),
                queue: queue.ptr(),
                side: s as u32,
                count: count as u32,
                threshold: p.mask_threshold,
            };
            self.dev.launch("instanseg_cleanup", Grid::linear(count), cleanup)?;
        }
        let scores = self.dev.read::<f32>(&score, count * s * s)?;
        let windows: Vec<Window> = placed
            .chunks_exact(4)
            .zip(scores.chunks_exact(s * s))
            .map(|(c, sc)| Window {
                top: c[2] as usize,
                left: c[3] as usize,
                side: s,
                score: sc.to_vec(),
            })
            .collect();
        Ok(merge::labels(&windows, width, height, p))
    }
}
