//! Illumination flattening and percentile selection of `f32` planes on the device
//! (`kernels/cuda/illumination.cu`).

use super::*;

impl Gpu {
    /// [`illumination::flatten_u16`] on the device: the tile percentiles and both surfaces are
    /// computed here, the two small fits on the host.
    pub(super) fn flatten_dev(
        &self,
        raw: &Buf,
        width: usize,
        height: usize,
        offset: f32,
        block: usize,
    ) -> Result<Buf, GpuError> {
        let percentile = 10.0;
        illumination::check_tiles(block, percentile)?;
        let n = width * height;
        let first = self.dev.zeros::<f32>(n)?;
        self.dev.launch(
            "subtract_offset",
            Grid::linear(n),
            OffsetArgs {
                src: raw.ptr(),
                dst: first.ptr(),
                n: n as u64,
                offset,
            },
        )?;
        let b1 = illumination::robust_surface(&self.tile_points(&first, width, height, block, percentile)?);
        let mut args = SurfaceArgs {
            src: raw.ptr(),
            first: first.ptr(),
            dst: 0,
            b1,
            b2: [0.0; 6],
            width: side(width, "width")?,
            height: side(height, "height")?,
            offset,
        };
        let ratio = self.dev.zeros::<f32>(n)?;
        args.dst = ratio.ptr();
        self.dev.launch("surface_ratio", Grid::image(width, height), args)?;
        args.b2 = illumination::robust_surface(&self.tile_points(&ratio, width, height, block, percentile)?);
        let flat = self.dev.zeros::<f32>(n)?;
        args.dst = flat.ptr();
        self.dev.launch("surface_flatten", Grid::image(width, height), args)?;
        Ok(flat)
    }

    /// Each tile's percentile, selected on the device, placed at the tile centres.
    pub(super) fn tile_points(
        &self,
        img: &Buf,
        width: usize,
        height: usize,
        block: usize,
        percentile: f64,
    ) -> Result<Vec<(f64, f64, f64)>, GpuError> {
        let (gw, gh) = (width.div_ceil(block), height.div_ceil(block));
        let scratch = self.dev.zeros::<u32>(gw * gh * block * block)?;
        let out = self.dev.zeros::<f32>(gw * gh)?;
        self.dev.launch(
            "tile_select",
            Grid::linear(gw * gh),
            TileSelectArgs {
                img: img.ptr(),
                scratch: scratch.ptr(),
                out: out.ptr(),
                percentile,
                width: side(width, "width")?,
                height: side(height, "height")?,
                block: side(block, "block")?,
                grid_w: gw as u32,
                grid_h: gh as u32,
            },
        )?;
        let q = self.dev.read::<f32>(&out, gw * gh)?;
        Ok(illumination::tile_points(&q, width, height, block))
    }

    /// The value of the given rank among `n` floats (NaN as 0, total order), by a two-pass
    /// radix selection on the device.
    pub(super) fn select_f32_dev(&self, src: &Buf, n: usize, rank: usize) -> Result<f32, GpuError> {
        let hist = self.dev.zeros::<u32>(65536)?;
        let mut args = RadixArgs {
            src: src.ptr(),
            hist: hist.ptr(),
            n: n as u64,
            high: 0,
            pass: 0,
        };
        let mut rank = rank as u64;
        let mut key = 0u32;
        for pass in 0..2u32 {
            args.pass = pass;
            self.dev.write(&hist, &vec![0u32; 65536])?;
            self.dev.launch("radix_hist", Grid::linear(n), args)?;
            let counts = self.dev.read::<u32>(&hist, 65536)?;
            let mut below = 0u64;
            let bin = counts
                .iter()
                .position(|&c| {
                    if below + c as u64 > rank {
                        true
                    } else {
                        below += c as u64;
                        false
                    }
                })
                .ok_or_else(|| GpuError::Internal("radix selection ran past the histogram".into()))?;
            rank -= below;
            key = (key << 16) | bin as u32;
            args.high = bin as u32;
        }
        Ok(unordered(key))
    }

    /// [`illumination::normalize_f32`] on the device.
    pub(super) fn normalize_f32_dev(&self, src: &Buf, n: usize, low_pct: f64, high_pct: f64) -> Result<Buf, GpuError> {
        cpu::check_percentiles(low_pct, high_pct)?;
        let lo = self.select_f32_dev(src, n, illumination::rank(n, low_pct))?;
        let hi = self.select_f32_dev(src, n, illumination::rank(n, high_pct))?;
        self.stretch("normalize_f32", src, n, lo, hi)
    }

    /// [`illumination::flatten_u16`].
    pub fn flatten_u16(
        &self,
        src: &[u16],
        width: usize,
        height: usize,
        offset: f32,
        block: usize,
    ) -> Result<Vec<f32>, GpuError> {
        check_len("src", src, width, height)?;
        if src.is_empty() {
            return Ok(illumination::flatten_u16(src, width, height, offset, block)?);
        }
        self.roundtrip(src, |d| self.flatten_dev(d, width, height, offset, block))
    }

    /// [`illumination::normalize_f32`].
    pub fn normalize_f32(&self, src: &[f32], low_pct: f64, high_pct: f64) -> Result<Vec<f32>, GpuError> {
        if src.is_empty() {
            return Ok(illumination::normalize_f32(src, low_pct, high_pct)?);
        }
        self.roundtrip(src, |d| self.normalize_f32_dev(d, src.len(), low_pct, high_pct))
    }
}
