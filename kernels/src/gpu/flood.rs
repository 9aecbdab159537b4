//! The two floods (nuclei watershed, cell propagation) as parallel relaxations, and the size
//! filter (`kernels/cuda/flood.cu`).

use super::*;
use crate::backend::Steps;

/// Which flood [`Gpu::flood_dev`] runs.
#[derive(Debug, Clone, Copy)]
pub(super) enum Flood<'a> {
    /// Keys from the quantised elevation (the CPU's hierarchical queue levels).
    Watershed {
        elevation: &'a Buf,
        lo: f32,
        scale: f32,
        top: u32,
    },
    /// Keys are path costs over the image.
    Propagate { image: &'a Buf, spatial_weight: f32 },
}

/// Relaxation sweeps launched between two reads of the `changed` flag.
const SWEEPS_PER_CHECK: usize = 8;

impl Gpu {
    /// Launches `kernel` until a whole batch of sweeps changes nothing. The relaxations only
    /// ever lower keys, so this ends; the bound is a guard against a broken kernel.
    pub(super) fn relax<A: KernelArgs>(
        &self,
        kernel: &'static str,
        grid: Grid,
        args: A,
        changed: &Buf,
        n: usize,
    ) -> Result<(), GpuError> {
        let mut sweeps = 0usize;
        loop {
            self.dev.write(changed, &[0u32])?;
            for _ in 0..SWEEPS_PER_CHECK {
                self.dev.launch(kernel, grid, args)?;
            }
            sweeps += SWEEPS_PER_CHECK;
            if self.dev.read::<u32>(changed, 1)?[0] == 0 {
                return Ok(());
            }
            if sweeps > 2 * n + 2 * SWEEPS_PER_CHECK {
                return Err(GpuError::Internal(format!(
                    "{kernel} did not settle in {sweeps} sweeps"
                )));
            }
        }
    }

    /// [`cpu::watershed`] on the device: the labels and the masked pixels left unreached.
    pub(super) fn watershed_dev(
        &self,
        elevation: &Buf,
        markers: &Buf,
        mask: &Buf,
        width: usize,
        height: usize,
    ) -> Result<(Buf, Buf), GpuError> {
        let top = 4095u32;
        let (lo, scale) = match self.finite_range(elevation, Some(mask), width * height)? {
            Some((lo, hi)) if hi > lo => (lo, top as f32 / (hi - lo)),
            _ => (0.0, 0.0),
        };
        self.flood_dev(
            Flood::Watershed {
                elevation,
                lo,
                scale,
                top,
            },
            markers,
            mask,
            width,
            height,
        )
    }

    /// Both floods: keys relaxed to their fixed point, then labels along the tight links
    /// (`kernels/cuda/flood.cu`). Returns the labels and the masked pixels left unreached.
    pub(super) fn flood_dev(
        &self,
        kind: Flood,
        seeds: &Buf,
        mask: &Buf,
        width: usize,
        height: usize,
    ) -> Result<(Buf, Buf), GpuError> {
        let n = width * height;
        let levels = self
            .dev
            .zeros::<u16>(if matches!(kind, Flood::Watershed { .. }) { n } else { 1 })?;
        let key = self.dev.zeros::<u64>(n)?;
        let labels = self.dev.zeros::<u32>(n)?;
        let (elevation, image, lo, scale, top, spatial_weight) = match kind {
            Flood::Watershed {
                elevation,
                lo,
                scale,
                top,
            } => (elevation.ptr(), 0, lo, scale, top, 0.0),
            Flood::Propagate { image, spatial_weight } => (0, image.ptr(), 0.0, 0.0, 0, spatial_weight),
        };
        self.dev.launch(
            "flood_init",
            Grid::linear(n),
            FloodInitArgs {
                elevation,
                seeds: seeds.ptr(),
                levels: levels.ptr(),
                key: key.ptr(),
                labels: labels.ptr(),
                n: n as u64,
                lo,
                scale,
                top,
            },
        )?;
        let changed = self.dev.zeros::<u32>(1)?;
        let args = FloodArgs {
            mask: mask.ptr(),
            seeds: seeds.ptr(),
            levels: levels.ptr(),
            image,
            key: key.ptr(),
            labels: labels.ptr(),
            changed: changed.ptr(),
            width: side(width, "width")?,
            height: side(height, "height")?,
            spatial_weight,
        };
        for phase in ["flood_keys", "flood_labels"] {
            self.relax(phase, Grid::image(width, height), args, &changed, n)?;
        }
        let left = self.dev.zeros::<u8>(n)?;
        self.dev.launch(
            "flood_finish",
            Grid::linear(n),
            FloodFinishArgs {
                mask: mask.ptr(),
                labels: labels.ptr(),
                left: left.ptr(),
                n: n as u64,
            },
        )?;
        Ok((labels, left))
    }

    /// [`cpu::filter_by_area`] in place: areas, first pixels and border contact on the device,
    /// the decision per label and the raster-order renumbering table on the host.
    pub(super) fn filter_by_area_dev(
        &self,
        labels: &Buf,
        max_label: u32,
        width: usize,
        height: usize,
        p: &NucleiParams,
    ) -> Result<u32, GpuError> {
        let n = width * height;
        let m = max_label as usize + 1;
        let area = self.dev.zeros::<u32>(m)?;
        let first = self.dev.upload(&vec![u32::MAX; m])?;
        let border = self.dev.zeros::<u8>(m)?;
        self.dev.launch(
            "label_stats",
            Grid::image(width, height),
            LabelStatsArgs {
                labels: labels.ptr(),
                area: area.ptr(),
                first: first.ptr(),
                border: border.ptr(),
                width: width as u32,
                height: height as u32,
            },
        )?;
        let (area, first, border) = (
            self.dev.read::<u32>(&area, m)?,
            self.dev.read::<u32>(&first, m)?,
            self.dev.read::<u8>(&border, m)?,
        );
        let mut kept: Vec<usize> = (1..m)
            .filter(|&l| {
                let min = if border[l] != 0 {
                    p.min_area_at_border_px
                } else {
                    p.min_area_px
                };
                let a = area[l] as usize;
                a > 0 && a >= min && a <= p.max_area_px
            })
            .collect();
        kept.sort_by_key(|&l| first[l]);
        let mut remap = vec![0u32; m];
        for (k, &l) in kept.iter().enumerate() {
            remap[l] = k as u32 + 1;
        }
        let r = self.dev.upload(&remap)?;
        self.dev.launch(
            "remap_labels",
            Grid::linear(n),
            RemapArgs {
                labels: labels.ptr(),
                remap: r.ptr(),
                n: n as u64,
            },
        )?;
        Ok(kept.len() as u32)
    }

    /// [`cpu::watershed`].
    pub fn watershed(
        &self,
        elevation: &[f32],
        markers: &[u32],
        mask: &[bool],
        width: usize,
        height: usize,
    ) -> Result<Vec<u32>, GpuError> {
        check_len("elevation", elevation, width, height)?;
        check_len("markers", markers, width, height)?;
        check_len("mask", mask, width, height)?;
        let n = elevation.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let (e, k, md) = (
            self.dev.upload(elevation)?,
            self.dev.upload(markers)?,
            self.upload_mask(mask)?,
        );
        let (labels, _) = self.watershed_dev(&e, &k, &md, width, height)?;
        self.dev.read(&labels, n)
    }

    /// [`cpu::propagate`], through [`Steps::propagate`] (which runs the cases the relaxation
    /// cannot on the host).
    pub fn propagate(
        &self,
        image: &[f32],
        seeds: &[u32],
        mask: &[bool],
        width: usize,
        height: usize,
        spatial_weight: f32,
    ) -> Result<Vec<u32>, GpuError> {
        check_len("image", image, width, height)?;
        check_len("seeds", seeds, width, height)?;
        check_len("mask", mask, width, height)?;
        if image.is_empty() {
            return Ok(Vec::new());
        }
        let (i, s, md) = (
            self.dev.upload(image)?,
            self.dev.upload(seeds)?,
            self.upload_mask(mask)?,
        );
        let labels = Steps::propagate(self, &i, &s, &md, width, height, spatial_weight)?;
        self.dev.read(&labels, image.len())
    }
}
