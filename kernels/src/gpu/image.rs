//! Pixelwise operations, separable filters and automatic thresholds on the device
//! (`kernels/cuda/image.cu`).

use super::*;

impl Gpu {
    pub(super) fn normalize_dev(&self, src: &Buf, n: usize, low_pct: f64, high_pct: f64) -> Result<Buf, GpuError> {
        cpu::check_percentiles(low_pct, high_pct)?;
        let hist = self.dev.zeros::<u32>(65536)?;
        self.dev.launch(
            "hist_u16",
            Grid::linear(n),
            HistU16Args {
                src: src.ptr(),
                hist: hist.ptr(),
                n: n as u64,
            },
        )?;
        let counts: Vec<u64> = self.dev.read::<u32>(&hist, 65536)?.into_iter().map(u64::from).collect();
        let lo = cpu::percentile_from_histogram(&counts, n, low_pct) as f32;
        let hi = cpu::percentile_from_histogram(&counts, n, high_pct) as f32;
        self.stretch("normalize_u16", src, n, lo, hi)
    }

    /// `[lo, hi]` to `[0, 1]`, clamped, by `kernel` (`normalize_u16` or `normalize_f32`, whose
    /// argument structs share one layout).
    pub(super) fn stretch(&self, kernel: &'static str, src: &Buf, n: usize, lo: f32, hi: f32) -> Result<Buf, GpuError> {
        let scale = if hi > lo { 1.0 / (hi - lo) } else { 0.0 };
        let dst = self.dev.zeros::<f32>(n)?;
        self.dev.launch(
            kernel,
            Grid::linear(n),
            NormalizeArgs {
                src: src.ptr(),
                dst: dst.ptr(),
                n: n as u64,
                lo,
                scale,
            },
        )?;
        Ok(dst)
    }

    /// [`cpu::normalize_u16`].
    pub fn normalize_u16(
        &self,
        src: &[u16],
        width: usize,
        height: usize,
        low_pct: f64,
        high_pct: f64,
    ) -> Result<Vec<f32>, GpuError> {
        check_len("src", src, width, height)?;
        self.roundtrip(src, |d| self.normalize_dev(d, src.len(), low_pct, high_pct))
    }

    pub(super) fn blur_dev(&self, src: &Buf, width: usize, height: usize, sigma: f32) -> Result<Buf, GpuError> {
        let n = width * height;
        if sigma <= 0.0 || n == 0 {
            return self.dev.upload(&self.dev.read::<f32>(src, n)?);
        }
        let taps = cpu::gaussian_kernel(sigma);
        let k = self.dev.upload(&taps)?;
        self.separable(("blur_rows", "blur_cols"), src, width, height, |s, d| {
            Ok(BlurArgs {
                src: s.ptr(),
                dst: d.ptr(),
                taps: k.ptr(),
                width: side(width, "width")?,
                height: side(height, "height")?,
                radius: (taps.len() / 2) as u32,
            })
        })
    }

    /// [`cpu::gaussian_blur`].
    pub fn gaussian_blur(&self, src: &[f32], width: usize, height: usize, sigma: f32) -> Result<Vec<f32>, GpuError> {
        check_len("src", src, width, height)?;
        self.roundtrip(src, |d| self.blur_dev(d, width, height, sigma))
    }

    /// The automatic threshold of a device image: its 256-bin histogram is built on the device
    /// and split on the host by the CPU's own code.
    pub(super) fn threshold_dev(&self, src: &Buf, n: usize, method: segment::ThresholdMethod) -> Result<f32, GpuError> {
        let Some((lo, hi)) = self.finite_range(src, None, n)? else {
            return Ok(cpu::first_finite(&self.dev.read::<f32>(src, n)?));
        };
        if !(hi > lo) {
            // No range (constant, empty or all-NaN): rare, and the CPU's answer needs the pixels.
            return Ok(cpu::first_finite(&self.dev.read::<f32>(src, n)?));
        }
        let scale = (256f32 - 1.0) / (hi - lo);
        let hist = self.dev.zeros::<u32>(256)?;
        self.dev.launch(
            "hist256_f32",
            Grid::linear(n),
            Hist256Args {
                src: src.ptr(),
                hist: hist.ptr(),
                n: n as u64,
                lo,
                scale,
            },
        )?;
        let mut bins = [0u64; 256];
        for (b, c) in bins.iter_mut().zip(self.dev.read::<u32>(&hist, 256)?) {
            *b = c as u64;
        }
        Ok(method.threshold_of_histogram(lo, scale, &bins))
    }

    /// The smallest and largest finite values (under `mask`), or `None` when there are none.
    pub(super) fn finite_range(&self, src: &Buf, mask: Option<&Buf>, n: usize) -> Result<Option<(f32, f32)>, GpuError> {
        let range = self.dev.upload(&[u32::MAX, 0u32])?;
        self.dev.launch(
            "minmax_f32",
            Grid::linear(n),
            MinMaxArgs {
                src: src.ptr(),
                mask: mask.map_or(0, Buf::ptr),
                range: range.ptr(),
                n: n as u64,
            },
        )?;
        let r = self.dev.read::<u32>(&range, 2)?;
        Ok((r[0] <= r[1]).then(|| (unordered(r[0]), unordered(r[1]))))
    }

    /// [`cpu::otsu_threshold`].
    pub fn otsu_threshold(&self, src: &[f32]) -> Result<f32, GpuError> {
        let d = self.dev.upload(src)?;
        self.threshold_dev(&d, src.len(), segment::ThresholdMethod::Otsu)
    }

    /// [`cpu::triangle_threshold`].
    pub fn triangle_threshold(&self, src: &[f32]) -> Result<f32, GpuError> {
        let d = self.dev.upload(src)?;
        self.threshold_dev(&d, src.len(), segment::ThresholdMethod::Triangle)
    }

    /// Pixels above `threshold`, and every pixel `labels` (when given) labels.
    pub(super) fn mask_above_dev(
        &self,
        src: &Buf,
        labels: Option<&Buf>,
        n: usize,
        threshold: f32,
    ) -> Result<Buf, GpuError> {
        let mask = self.dev.zeros::<u8>(n)?;
        self.dev.launch(
            "threshold_above",
            Grid::linear(n),
            ThresholdArgs {
                src: src.ptr(),
                labels: labels.map_or(0, Buf::ptr),
                mask: mask.ptr(),
                n: n as u64,
                threshold,
            },
        )?;
        Ok(mask)
    }

    /// [`cpu::downsample2x_mean`].
    pub fn downsample2x_mean(
        &self,
        src: &[u16],
        width: usize,
        height: usize,
    ) -> Result<(Vec<u16>, usize, usize), GpuError> {
        check_len("src", src, width, height)?;
        let (w2, h2) = (width.div_ceil(2), height.div_ceil(2));
        if src.is_empty() {
            return Ok((Vec::new(), w2, h2));
        }
        let s = self.dev.upload(src)?;
        let d = self.dev.zeros::<u16>(w2 * h2)?;
        self.dev.launch(
            "downsample2x_mean",
            Grid::image(w2, h2),
            DownsampleArgs {
                src: s.ptr(),
                dst: d.ptr(),
                width: side(width, "width")?,
                height: side(height, "height")?,
                out_width: w2 as u32,
                out_height: h2 as u32,
            },
        )?;
        Ok((self.dev.read(&d, w2 * h2)?, w2, h2))
    }
}
