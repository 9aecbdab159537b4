//! The CUDA back end: the operations of [`crate::cpu`] as kernels (`kernels/cuda/*.cu`), compiled
//! at run time with NVRTC for the device found, cached on disk, and launched through the driver
//! API (cudarc, loaded dynamically, so builds without CUDA run and fall back to the CPU).
//!
//! Results equal the CPU reference exactly: floating-point kernels repeat the CPU's operations in
//! its order with multiply-add contraction off, and labels come out in the same raster order.
//! The two floods (the nuclei watershed and the propagation of cells) are parallel relaxations
//! to the same fixed point the CPU's queues reach (see `kernels/cuda/flood.cu`), so a field is
//! segmented on the device from the raw upload to the label download.

#![allow(unsafe_code)]

mod device;
#[cfg(test)]
mod emu;
#[cfg(test)]
mod tests;

use std::str::FromStr;

use cudarc::driver::DeviceRepr;

use crate::cpu::{self, CropSpec};
use crate::illumination;
use crate::measure::{self, RegionProps};
use crate::segment::{self, CellParams, NucleiParams};
use crate::{check_len, KernelError};
use device::{Buf, Device, Grid, KernelArgs, Pod};

pub use crate::backend::Compute;
pub use device::{compile, cuda_program};

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no usable CUDA device: {0}")]
    Unavailable(String),
    #[error("compiling the CUDA kernels with NVRTC: {0}")]
    Compile(String),
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("CUDA back end: {0}")]
    Internal(String),
}

impl GpuError {
    fn driver(e: cudarc::driver::DriverError) -> Self {
        GpuError::Driver(e.to_string())
    }
}

/// The `compute.device` setting: where image kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    /// CUDA device 0 when a driver and device exist, else the CPU (with the reason logged).
    #[default]
    Auto,
    Cpu,
    /// This CUDA device or an error: asking for a GPU by number means wanting that one.
    Cuda(usize),
}

/// A `compute.device` (or `--device`) that is none of the accepted spellings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?}: expected \"auto\", \"cpu\" or \"cuda:N\"")]
pub struct BadDeviceRequest(pub String);

impl FromStr for DeviceRequest {
    type Err = BadDeviceRequest;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| BadDeviceRequest(s.to_string())),
        }
    }
}

impl std::fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

macro_rules! kernel_args {
    ($($name:ident { $($field:ident : $ty:ty),* $(,)? })*) => {$(
        /// Mirror of the C struct of the same name in `kernels/cuda`.
        #[repr(C)]
        #[derive(Debug, Clone, Copy)]
        struct $name { $($field: $ty),* }
        // SAFETY: plain `#[repr(C)]` data of numbers and device addresses.
        unsafe impl DeviceRepr for $name {}
        // SAFETY: the fields are those of the C struct, in its order and with its types
        // (pointers as u64), so the layouts agree.
        unsafe impl KernelArgs for $name {}
    )*};
}

kernel_args! {
    HistU16Args { src: u64, hist: u64, n: u64 }
    NormalizeArgs { src: u64, dst: u64, n: u64, lo: f32, scale: f32 }
    BlurArgs { src: u64, dst: u64, taps: u64, width: u32, height: u32, radius: u32 }
    MinMaxArgs { src: u64, mask: u64, range: u64, n: u64 }
    Hist256Args { src: u64, hist: u64, n: u64, lo: f32, scale: f32 }
    ThresholdArgs { src: u64, labels: u64, mask: u64, n: u64, threshold: f32 }
    DownsampleArgs { src: u64, dst: u64, width: u32, height: u32, out_width: u32, out_height: u32 }
    EdtColsArgs { mask: u64, sq: u64, width: u32, height: u32 }
    EdtRowsArgs { sq: u64, dst: u64, v: u64, z: u64, width: u32, height: u32 }
    MaxFilterArgs { src: u64, dst: u64, width: u32, height: u32, radius: u32 }
    PeaksArgs { src: u64, maxed: u64, mask: u64, peak: u64, n: u64, min_value: f32 }
    CcArgs { mask: u64, parent: u64, width: u32, height: u32, eight: u32 }
    RankArgs { parent: u64, row_roots: u64, labels: u64, width: u32, height: u32 }
    PropsArgs {
        labels: u64, channels: u64, area: u64, sum_x: u64, sum_y: u64, bbox: u64, sums: u64,
        maxima: u64, width: u32, height: u32, channel_count: u32,
    }
    CropArgs {
        channels: u64, centers: u64, out: u64, width: u32, height: u32, channel_count: u32,
        crop_count: u32, size: u32, scale: f32,
    }
    NegateArgs { data: u64, n: u64 }
    FloodInitArgs {
        elevation: u64, seeds: u64, levels: u64, key: u64, labels: u64, n: u64, lo: f32, scale: f32,
        top: u32,
    }
    FloodArgs {
        mask: u64, seeds: u64, levels: u64, image: u64, key: u64, labels: u64, changed: u64,
        width: u32, height: u32, spatial_weight: f32,
    }
    FloodFinishArgs { mask: u64, labels: u64, left: u64, n: u64 }
    AddBlobsArgs { labels: u64, blobs: u64, n: u64, offset: u32 }
    LabelStatsArgs { labels: u64, area: u64, first: u64, border: u64, width: u32, height: u32 }
    RemapArgs { labels: u64, remap: u64, n: u64 }
    OffsetArgs { src: u64, dst: u64, n: u64, offset: f32 }
    TileSelectArgs {
        img: u64, scratch: u64, out: u64, percentile: f64, width: u32, height: u32, block: u32,
        grid_w: u32, grid_h: u32,
    }
    SurfaceArgs {
        src: u64, first: u64, dst: u64, b1: [f64; 6], b2: [f64; 6], width: u32, height: u32, offset: f32,
    }
    RadixArgs { src: u64, hist: u64, n: u64, high: u32, pass: u32 }
}

/// Which flood [`Gpu::flood_dev`] runs.
#[derive(Debug, Clone, Copy)]
enum Flood<'a> {
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

/// Image sides are u32 on the device.
fn side(v: usize, name: &'static str) -> Result<u32, GpuError> {
    u32::try_from(v).map_err(|_| {
        GpuError::Kernel(KernelError::Parameter {
            name,
            reason: format!("{v} exceeds the CUDA back end's u32 range"),
        })
    })
}

/// Decodes the order-preserving u32 of `minmax_f32`.
fn unordered(e: u32) -> f32 {
    if e & 0x8000_0000 != 0 {
        f32::from_bits(e & 0x7fff_ffff)
    } else {
        f32::from_bits(!e)
    }
}

/// A CUDA device with the liveomics kernels loaded.
#[derive(Debug)]
pub struct Gpu {
    dev: Device,
    description: String,
}

impl Gpu {
    /// Opens CUDA device `ordinal`; fails with the reason when there is no driver, no such
    /// device, no NVRTC, or the kernels do not compile for it.
    pub fn open(ordinal: usize) -> Result<Self, GpuError> {
        let cuda = device::Cuda::open(ordinal)?;
        let description = cuda.description.clone();
        Ok(Self {
            dev: Device::Cuda(cuda),
            description,
        })
    }

    /// The kernels run on the host, serially (tests only).
    #[cfg(test)]
    pub(crate) fn emulated() -> Result<Self, GpuError> {
        Ok(Self {
            dev: Device::Emu(emu::Emu::new()?),
            description: "host emulation of the CUDA kernels".into(),
        })
    }

    pub fn describe(&self) -> &str {
        &self.description
    }

    fn normalize_dev(&self, src: &Buf, n: usize, low_pct: f64, high_pct: f64) -> Result<Buf, GpuError> {
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
    fn stretch(&self, kernel: &'static str, src: &Buf, n: usize, lo: f32, hi: f32) -> Result<Buf, GpuError> {
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

    fn blur_dev(&self, src: &Buf, width: usize, height: usize, sigma: f32) -> Result<Buf, GpuError> {
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

    /// A row pass into a scratch image, then a column pass into the result.
    fn separable<A: KernelArgs>(
        &self,
        (rows, cols): (&'static str, &'static str),
        src: &Buf,
        width: usize,
        height: usize,
        args: impl Fn(&Buf, &Buf) -> Result<A, GpuError>,
    ) -> Result<Buf, GpuError> {
        let tmp = self.dev.zeros::<f32>(width * height)?;
        let dst = self.dev.zeros::<f32>(width * height)?;
        self.dev.launch(rows, Grid::image(width, height), args(src, &tmp)?)?;
        self.dev.launch(cols, Grid::image(width, height), args(&tmp, &dst)?)?;
        Ok(dst)
    }

    /// Uploads `src`, runs a device operation on it and reads its result of the same length.
    fn roundtrip<T: Pod, U: Pod>(
        &self,
        src: &[T],
        op: impl FnOnce(&Buf) -> Result<Buf, GpuError>,
    ) -> Result<Vec<U>, GpuError> {
        let out = op(&self.dev.upload(src)?)?;
        self.dev.read(&out, src.len())
    }

    /// A boolean mask as the bytes the kernels read.
    fn upload_mask(&self, mask: &[bool]) -> Result<Buf, GpuError> {
        self.dev.upload(&mask.iter().map(|&b| b as u8).collect::<Vec<u8>>())
    }

    /// [`cpu::gaussian_blur`].
    pub fn gaussian_blur(&self, src: &[f32], width: usize, height: usize, sigma: f32) -> Result<Vec<f32>, GpuError> {
        check_len("src", src, width, height)?;
        self.roundtrip(src, |d| self.blur_dev(d, width, height, sigma))
    }

    /// The automatic threshold of a device image: its 256-bin histogram is built on the device
    /// and split on the host by the CPU's own code.
    fn threshold_dev(&self, src: &Buf, n: usize, method: segment::ThresholdMethod) -> Result<f32, GpuError> {
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
    fn finite_range(&self, src: &Buf, mask: Option<&Buf>, n: usize) -> Result<Option<(f32, f32)>, GpuError> {
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

    /// Launches `kernel` until a whole batch of sweeps changes nothing. The relaxations only
    /// ever lower keys, so this ends; the bound is a guard against a broken kernel.
    fn relax<A: KernelArgs>(
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
    fn mask_above(&self, src: &Buf, labels: Option<&Buf>, n: usize, threshold: f32) -> Result<Buf, GpuError> {
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

    fn edt_dev(&self, mask: &Buf, width: usize, height: usize) -> Result<Buf, GpuError> {
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

    fn max_filter_dev(&self, src: &Buf, width: usize, height: usize, radius: usize) -> Result<Buf, GpuError> {
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

    /// Labels of a device mask, `1..=n` in raster order of first pixel: the CPU's numbering.
    fn components_dev(&self, mask: &Buf, width: usize, height: usize, eight: bool) -> Result<(Buf, u32), GpuError> {
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

    fn peak_markers_dev(
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

    /// Channels stacked channel-major into one device buffer.
    fn upload_planes(&self, channels: &[&[u16]], width: usize, height: usize) -> Result<Buf, GpuError> {
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

    /// Distance map, smoothing, seeds, watershed, unflooded blobs and size filter, all on the
    /// device (the CPU's `segment::split_foreground`).
    fn split_foreground(
        &self,
        mask: &Buf,
        width: usize,
        height: usize,
        p: &NucleiParams,
    ) -> Result<(Vec<u32>, u32), GpuError> {
        let n = width * height;
        let dist = self.edt_dev(mask, width, height)?;
        let elevation = self.blur_dev(&dist, width, height, 1.0)?;
        let (markers, count) =
            self.peak_markers_dev(&elevation, mask, width, height, p.seed_radius_px, p.seed_min_depth_px)?;
        // Flood from the deepest points outwards: the elevation is the negated distance.
        self.dev.launch(
            "negate_f32",
            Grid::linear(n),
            NegateArgs {
                data: elevation.ptr(),
                n: n as u64,
            },
        )?;
        let (labels, left) = self.watershed_dev(&elevation, &markers, mask, width, height)?;
        let (blobs, extra) = self.components_dev(&left, width, height, true)?;
        if extra > 0 {
            self.dev.launch(
                "add_blobs",
                Grid::linear(n),
                AddBlobsArgs {
                    labels: labels.ptr(),
                    blobs: blobs.ptr(),
                    n: n as u64,
                    offset: count,
                },
            )?;
        }
        let kept = self.filter_by_area_dev(&labels, count + extra, width, height, p)?;
        Ok((self.dev.read(&labels, n)?, kept))
    }

    /// [`cpu::watershed`] on the device: the labels and the masked pixels left unreached.
    fn watershed_dev(
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
    fn flood_dev(
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
    fn filter_by_area_dev(
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

    /// [`cpu::propagate`]. A spatial weight that is not positive makes steps free, paths of equal
    /// cost form cycles and the parallel relaxation no longer reproduces the queue: the host runs
    /// those.
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
        if image.is_empty() || !(spatial_weight > 0.0 && spatial_weight.is_finite()) {
            return Ok(cpu::propagate(image, seeds, mask, width, height, spatial_weight)?);
        }
        let (i, s, md) = (
            self.dev.upload(image)?,
            self.dev.upload(seeds)?,
            self.upload_mask(mask)?,
        );
        let (labels, _) = self.flood_dev(
            Flood::Propagate {
                image: &i,
                spatial_weight,
            },
            &s,
            &md,
            width,
            height,
        )?;
        self.dev.read(&labels, image.len())
    }

    /// [`illumination::flatten_u16`] on the device: the tile percentiles and both surfaces are
    /// computed here, the two small fits on the host.
    fn flatten_dev(&self, raw: &Buf, width: usize, height: usize, offset: f32, block: usize) -> Result<Buf, GpuError> {
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
    fn tile_points(
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
    fn select_f32_dev(&self, src: &Buf, n: usize, rank: usize) -> Result<f32, GpuError> {
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
    fn normalize_f32_dev(&self, src: &Buf, n: usize, low_pct: f64, high_pct: f64) -> Result<Buf, GpuError> {
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

    /// Waits for the device (for timing).
    pub fn sync(&self) -> Result<(), GpuError> {
        self.dev.sync()
    }
}

impl crate::backend::Backend for Gpu {
    fn describe(&self) -> String {
        Gpu::describe(self).into()
    }

    fn is_gpu(&self) -> bool {
        true
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

    /// [`segment::segment_nuclei`].
    fn segment_nuclei(
        &self,
        raw: &[u16],
        width: usize,
        height: usize,
        p: &NucleiParams,
    ) -> Result<(Vec<u32>, u32), GpuError> {
        check_len("raw", raw, width, height)?;
        if raw.is_empty() {
            return Ok(segment::segment_nuclei(raw, width, height, p)?);
        }
        let src = self.dev.upload(raw)?;
        let norm = match p.illumination {
            Some(il) => {
                let flat = self.flatten_dev(&src, width, height, il.offset, il.block_px)?;
                self.normalize_f32_dev(&flat, raw.len(), 0.5, 99.95)?
            }
            None => self.normalize_dev(&src, raw.len(), 0.5, 99.95)?,
        };
        let smooth = self.blur_dev(&norm, width, height, p.smoothing_sigma_px)?;
        let t = self.threshold_dev(&smooth, raw.len(), p.threshold)? * p.threshold_scale;
        let mask = self.mask_above(&smooth, None, raw.len(), t)?;
        self.split_foreground(&mask, width, height, p)
    }

    /// [`segment::segment_nuclei_probability`].
    fn segment_nuclei_probability(
        &self,
        prob: &[f32],
        width: usize,
        height: usize,
        threshold: f32,
        p: &NucleiParams,
    ) -> Result<(Vec<u32>, u32), GpuError> {
        check_len("probability", prob, width, height)?;
        if prob.is_empty() {
            return Ok((Vec::new(), 0));
        }
        let d = self.dev.upload(prob)?;
        let mask = self.mask_above(&d, None, prob.len(), threshold)?;
        self.split_foreground(&mask, width, height, p)
    }

    /// [`segment::segment_cells`].
    fn segment_cells(
        &self,
        nuclei: &[u32],
        cytoplasm_raw: &[u16],
        width: usize,
        height: usize,
        p: &CellParams,
    ) -> Result<Vec<u32>, GpuError> {
        check_len("nuclei", nuclei, width, height)?;
        check_len("cytoplasm", cytoplasm_raw, width, height)?;
        if nuclei.is_empty() {
            return Ok(segment::segment_cells(nuclei, cytoplasm_raw, width, height, p)?);
        }
        let n = nuclei.len();
        let norm = self.normalize_dev(&self.dev.upload(cytoplasm_raw)?, n, 0.5, 99.5)?;
        let smooth = self.blur_dev(&norm, width, height, p.smoothing_sigma_px)?;
        let t = self.threshold_dev(&smooth, n, segment::ThresholdMethod::Otsu)? * p.threshold_scale;
        if !(p.spatial_weight > 0.0 && p.spatial_weight.is_finite()) {
            let smooth = self.dev.read::<f32>(&smooth, n)?;
            return Ok(segment::propagate_cells(nuclei, &smooth, t, width, height, p)?);
        }
        let seeds = self.dev.upload(nuclei)?;
        let mask = self.mask_above(&smooth, Some(&seeds), n, t)?;
        let flood = Flood::Propagate {
            image: &smooth,
            spatial_weight: p.spatial_weight,
        };
        let (labels, _) = self.flood_dev(flood, &seeds, &mask, width, height)?;
        self.dev.read(&labels, n)
    }
}
