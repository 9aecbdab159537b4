//! Connected components in the CPU's raster numbering, and per-label measurements, on the device
//! (`kernels/cuda/label.cu`).

use super::*;

impl Gpu {
    /// Labels of a device mask, `1..=n` in raster order of first pixel: the CPU's numbering.
    pub(super) fn components_dev(
        &self,
        mask: &Buf,
        width: usize,
        height: usize,
        eight: bool,
    ) -> Result<(Buf, u32), GpuError> {
        let n = width * height;
        let (w, h) = (side(width, "width")?, side(height, "height")?);
        side(n, "pixel count")?;
        let parent = self.dev.zeros::<u32>(n)?;
        let cc = CcArgs {
            mask: mask.ptr(),
            parent: parent.ptr(),
            width: w,
            height: h,
            eight: eight as u32,
        };
        self.dev.launch("cc_init", Grid::linear(n), cc)?;
        self.dev.launch("cc_merge", Grid::image(width, height), cc)?;
        self.dev.launch("cc_flatten", Grid::linear(n), cc)?;
        let rows = self.dev.zeros::<u32>(height)?;
        let labels = self.dev.zeros::<u32>(n)?;
        let rank = RankArgs {
            parent: parent.ptr(),
            row_roots: rows.ptr(),
            labels: labels.ptr(),
            width: w,
            height: h,
        };
        self.dev.launch("cc_count_roots", Grid::linear(height), rank)?;
        // Exclusive scan of a few thousand row counts: cheaper on the host than a launch.
        let mut counts = self.dev.read::<u32>(&rows, height)?;
        let mut total = 0u32;
        for c in counts.iter_mut() {
            let k = *c;
            *c = total;
            total += k;
        }
        self.dev.write(&rows, &counts)?;
        self.dev.launch("cc_rank_roots", Grid::linear(height), rank)?;
        self.dev.launch("cc_label", Grid::linear(n), rank)?;
        Ok((labels, total))
    }

    /// [`cpu::connected_components`].
    pub fn connected_components(
        &self,
        mask: &[bool],
        width: usize,
        height: usize,
        eight: bool,
    ) -> Result<(Vec<u32>, u32), GpuError> {
        check_len("mask", mask, width, height)?;
        if mask.is_empty() {
            return Ok((Vec::new(), 0));
        }
        let d = self.upload_mask(mask)?;
        let (labels, n) = self.components_dev(&d, width, height, eight)?;
        Ok((self.dev.read(&labels, mask.len())?, n))
    }
}
