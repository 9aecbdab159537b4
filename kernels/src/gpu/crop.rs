//! Per-cell crops gathered on the device (`kernels/cuda/crop.cu`).

use super::*;

impl Gpu {
    /// Channels stacked channel-major into one device buffer.
    pub(super) fn upload_planes(&self, channels: &[&[u16]], width: usize, height: usize) -> Result<Buf, GpuError> {
        let mut all = Vec::with_capacity(channels.len() * width * height);
        for c in channels {
            check_len("channel", c, width, height)?;
            all.extend_from_slice(c);
        }
        self.dev.upload(&all)
    }

    /// [`cpu::crop_gather_u16_with`] without the fused preprocessing: the batch comes back raw.
    pub fn crop_gather_u16(
        &self,
        channels: &[&[u16]],
        width: usize,
        height: usize,
        centers: &[(f32, f32)],
        spec: CropSpec,
    ) -> Result<Vec<f32>, GpuError> {
        cpu::check_crop_spec(spec)?;
        let total = centers.len() * channels.len() * spec.size * spec.size;
        if total == 0 {
            for c in channels {
                check_len("crop_gather channel", c, width, height)?;
            }
            return Ok(Vec::new());
        }
        let planes = self.upload_planes(channels, width, height)?;
        let xy: Vec<f32> = centers.iter().flat_map(|&(x, y)| [x, y]).collect();
        let c = self.dev.upload(&xy)?;
        let out = self.dev.zeros::<f32>(total)?;
        self.dev.launch(
            "crop_gather",
            Grid::linear(total),
            CropArgs {
                channels: planes.ptr(),
                centers: c.ptr(),
                out: out.ptr(),
                width: side(width, "width")?,
                height: side(height, "height")?,
                channel_count: side(channels.len(), "channels")?,
                crop_count: side(centers.len(), "crops")?,
                size: side(spec.size, "size")?,
                scale: spec.scale,
            },
        )?;
        self.dev.read(&out, total)
    }
}
