//! Distance transform, max filter and watershed seeds on the device (`kernels/cuda/distance.cu`).

use super::*;

impl Gpu {
    pub(super) fn edt_dev(&self, mask: &Buf, width: usize, height: usize) -> Result<Buf, GpuError> {
        let (w, h) = (side(width, "width")?, side(height, "height")?);
        let sq = self.dev.zeros::<f64>(width * height)?;
        self.dev.launch(
            "edt_cols",
            Grid::linear(width),
            EdtColsArgs {
                mask: mask.ptr(),
                sq: sq.ptr(),
                width: w,
                height: h,
            },
        )?;
        let dst = self.dev.zeros::<f32>(width * height)?;
        let v = self.dev.zeros::<u32>(width * height)?;
        let z = self.dev.zeros::<f64>((width + 1) * height)?;
        self.dev.launch(
            "edt_rows",
            Grid::linear(height),
            EdtRowsArgs {
                sq: sq.ptr(),
                dst: dst.ptr(),
                v: v.ptr(),
                z: z.ptr(),
                width: w,
                height: h,
            },
        )?;
        Ok(dst)
    }

    /// [`cpu::distance_transform`].
    pub fn distance_transform(&self, mask: &[bool], width: usize, height: usize) -> Result<Vec<f32>, GpuError> {
        check_len("mask", mask, width, height)?;
        if mask.is_empty() {
            return Ok(Vec::new());
        }
        let d = self.upload_mask(mask)?;
        let out = self.edt_dev(&d, width, height)?;
        self.dev.read(&out, mask.len())
    }

    pub(super) fn max_filter_dev(
        &self,
        src: &Buf,
        width: usize,
        height: usize,
        radius: usize,
    ) -> Result<Buf, GpuError> {
        self.separable(("max_rows", "max_cols"), src, width, height, |s, d| {
            Ok(MaxFilterArgs {
                src: s.ptr(),
                dst: d.ptr(),
                width: side(width, "width")?,
                height: side(height, "height")?,
                radius: side(radius, "radius")?,
            })
        })
    }

    /// [`cpu::max_filter`].
    pub fn max_filter(&self, src: &[f32], width: usize, height: usize, radius: usize) -> Result<Vec<f32>, GpuError> {
        check_len("src", src, width, height)?;
        self.roundtrip(src, |d| self.max_filter_dev(d, width, height, radius))
    }

    pub(super) fn peak_markers_dev(
        &self,
        src: &Buf,
        mask: &Buf,
        width: usize,
        height: usize,
        radius: usize,
        min_value: f32,
    ) -> Result<(Buf, u32), GpuError> {
        let n = width * height;
        let maxed = self.max_filter_dev(src, width, height, radius)?;
        let peak = self.dev.zeros::<u8>(n)?;
        self.dev.launch(
            "peaks",
            Grid::linear(n),
            PeaksArgs {
                src: src.ptr(),
                maxed: maxed.ptr(),
                mask: mask.ptr(),
                peak: peak.ptr(),
                n: n as u64,
                min_value,
            },
        )?;
        self.components_dev(&peak, width, height, true)
    }

    /// [`cpu::peak_markers`].
    pub fn peak_markers(
        &self,
        src: &[f32],
        mask: &[bool],
        width: usize,
        height: usize,
        radius: usize,
        min_value: f32,
    ) -> Result<(Vec<u32>, u32), GpuError> {
        check_len("src", src, width, height)?;
        check_len("mask", mask, width, height)?;
        if src.is_empty() {
            return Ok((Vec::new(), 0));
        }
        let (s, md) = (self.dev.upload(src)?, self.upload_mask(mask)?);
        let (labels, n) = self.peak_markers_dev(&s, &md, width, height, radius, min_value)?;
        Ok((self.dev.read(&labels, src.len())?, n))
    }
}
