//! The segmentation steps on device buffers: `segment` composes them, so a field is segmented on
//! the device from the raw upload to the label download.

use super::flood::Flood;
use super::*;
use crate::backend::Steps;
use crate::segment::{Illumination, ThresholdMethod};

impl Steps for Gpu {
    type Error = GpuError;
    type Image = Buf;
    /// One byte per pixel.
    type Mask = Buf;
    type Labels = Buf;
    /// A byte mask.
    type Unreached = Buf;
    const IS_GPU: bool = true;

    fn name(&self) -> String {
        self.description.clone()
    }

    fn normalize_raw(
        &self,
        raw: &[u16],
        width: usize,
        height: usize,
        illumination: Option<Illumination>,
        low_pct: f64,
        high_pct: f64,
    ) -> Result<Buf, GpuError> {
        let src = self.dev.upload(raw)?;
        match illumination {
            Some(il) => {
                let flat = self.flatten_dev(&src, width, height, il.offset, il.block_px)?;
                self.normalize_f32_dev(&flat, raw.len(), low_pct, high_pct)
            }
            None => self.normalize_dev(&src, raw.len(), low_pct, high_pct),
        }
    }

    fn image(&self, values: &[f32]) -> Result<Buf, GpuError> {
        self.dev.upload(values)
    }

    fn labels(&self, labels: &[u32]) -> Result<Buf, GpuError> {
        self.dev.upload(labels)
    }

    fn blur(&self, img: &Buf, width: usize, height: usize, sigma: f32) -> Result<Buf, GpuError> {
        self.blur_dev(img, width, height, sigma)
    }

    fn threshold(&self, img: &Buf, n: usize, method: ThresholdMethod) -> Result<f32, GpuError> {
        self.threshold_dev(img, n, method)
    }

    fn mask_above(&self, img: &Buf, labelled: Option<&Buf>, n: usize, threshold: f32) -> Result<Buf, GpuError> {
        self.mask_above_dev(img, labelled, n, threshold)
    }

    /// On the host: per-region percentiles and the hole test are sequential bookkeeping over a
    /// few hundred regions, and the field goes back to the device for the watershed.
    fn local_foreground(
        &self,
        norm: &Buf,
        smooth: &Buf,
        width: usize,
        height: usize,
        p: &NucleiParams,
    ) -> Result<Buf, GpuError> {
        let n = width * height;
        let mask = crate::local::nuclei_foreground(
            &self.dev.read::<f32>(norm, n)?,
            &self.dev.read::<f32>(smooth, n)?,
            width,
            height,
            p,
        )?;
        let bytes: Vec<u8> = mask.into_iter().map(u8::from).collect();
        self.dev.upload(&bytes)
    }

    fn distance(&self, mask: &Buf, width: usize, height: usize) -> Result<Buf, GpuError> {
        self.edt_dev(mask, width, height)
    }

    fn peak_markers(
        &self,
        img: &Buf,
        mask: &Buf,
        width: usize,
        height: usize,
        radius: usize,
        min_value: f32,
    ) -> Result<(Buf, u32), GpuError> {
        self.peak_markers_dev(img, mask, width, height, radius, min_value)
    }

    fn negate(&self, img: &mut Buf, n: usize) -> Result<(), GpuError> {
        self.dev.launch(
            "negate_f32",
            Grid::linear(n),
            NegateArgs {
                data: img.ptr(),
                n: n as u64,
            },
        )
    }

    fn watershed(
        &self,
        elevation: &Buf,
        markers: &Buf,
        mask: &Buf,
        width: usize,
        height: usize,
    ) -> Result<(Buf, Buf), GpuError> {
        self.watershed_dev(elevation, markers, mask, width, height)
    }

    fn label_unreached(
        &self,
        labels: &mut Buf,
        unreached: Buf,
        offset: u32,
        width: usize,
        height: usize,
    ) -> Result<u32, GpuError> {
        let (blobs, count) = self.components_dev(&unreached, width, height, true)?;
        if count > 0 {
            self.dev.launch(
                "add_blobs",
                Grid::linear(width * height),
                AddBlobsArgs {
                    labels: labels.ptr(),
                    blobs: blobs.ptr(),
                    n: (width * height) as u64,
                    offset,
                },
            )?;
        }
        Ok(count)
    }

    fn filter_by_area(
        &self,
        labels: Buf,
        max_label: u32,
        width: usize,
        height: usize,
        p: &NucleiParams,
    ) -> Result<(Buf, u32), GpuError> {
        let kept = self.filter_by_area_dev(&labels, max_label, width, height, p)?;
        Ok((labels, kept))
    }

    /// A spatial weight that is not positive makes steps free, paths of equal cost form cycles
    /// and the parallel relaxation no longer reproduces the queue: the host runs those.
    fn propagate(
        &self,
        image: &Buf,
        seeds: &Buf,
        mask: &Buf,
        width: usize,
        height: usize,
        spatial_weight: f32,
    ) -> Result<Buf, GpuError> {
        if !(spatial_weight > 0.0 && spatial_weight.is_finite()) {
            let n = width * height;
            let mask: Vec<bool> = self.dev.read::<u8>(mask, n)?.into_iter().map(|b| b != 0).collect();
            let labels = cpu::propagate(
                &self.dev.read::<f32>(image, n)?,
                &self.dev.read::<u32>(seeds, n)?,
                &mask,
                width,
                height,
                spatial_weight,
            )?;
            return self.dev.upload(&labels);
        }
        let flood = Flood::Propagate { image, spatial_weight };
        Ok(self.flood_dev(flood, seeds, mask, width, height)?.0)
    }

    fn download(&self, labels: Buf, n: usize) -> Result<Vec<u32>, GpuError> {
        self.dev.read(&labels, n)
    }

    /// [`measure::region_props`].
    fn region_props(
        &self,
        labels: &[u32],
        channels: &[&[u16]],
        width: usize,
        height: usize,
    ) -> Result<Vec<RegionProps>, GpuError> {
        check_len("labels", labels, width, height)?;
        let n = labels.iter().copied().max().unwrap_or(0) as usize + 1;
        let nc = channels.len();
        if labels.is_empty() || n == 1 {
            for c in channels {
                check_len("channel", c, width, height)?;
            }
            return Ok(Vec::new());
        }
        let planes = self.upload_planes(channels, width, height)?;
        let l = self.dev.upload(labels)?;
        let area = self.dev.zeros::<u64>(n)?;
        let (sx, sy) = (self.dev.zeros::<f64>(n)?, self.dev.zeros::<f64>(n)?);
        let bbox = self.dev.upload(&[u32::MAX, u32::MAX, 0, 0].repeat(n))?;
        let sums = self.dev.zeros::<f64>(n * nc)?;
        let maxima = self.dev.zeros::<u32>(n * nc)?;
        self.dev.launch(
            "region_props",
            Grid::image(width, height),
            PropsArgs {
                labels: l.ptr(),
                channels: planes.ptr(),
                area: area.ptr(),
                sum_x: sx.ptr(),
                sum_y: sy.ptr(),
                bbox: bbox.ptr(),
                sums: sums.ptr(),
                maxima: maxima.ptr(),
                width: side(width, "width")?,
                height: side(height, "height")?,
                channel_count: nc as u32,
            },
        )?;
        let bb: Vec<[u32; 4]> = self
            .dev
            .read::<u32>(&bbox, 4 * n)?
            .chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect();
        let maxs: Vec<u16> = self
            .dev
            .read::<u32>(&maxima, n * nc)?
            .into_iter()
            .map(|m| m as u16)
            .collect();
        Ok(measure::assemble(&measure::Sums {
            channels: nc,
            area: &self.dev.read(&area, n)?,
            sum_x: &self.dev.read(&sx, n)?,
            sum_y: &self.dev.read(&sy, n)?,
            bbox: &bb,
            intensity: &self.dev.read(&sums, n * nc)?,
            maxima: &maxs,
        }))
    }

    fn instanseg(
        &self,
        embedding: &[f32],
        channels: usize,
        width: usize,
        height: usize,
        cells: bool,
        p: &crate::instanseg::InstanSegParams,
    ) -> Result<crate::instanseg::Instances, GpuError> {
        crate::instanseg::instances_with(embedding, channels, width, height, cells, p, false, |e| {
            self.instanseg_target(e, width, height, p)
        })
    }
}
