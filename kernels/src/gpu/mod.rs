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

mod crop;
mod device;
mod distance;
#[cfg(any(test, feature = "emulation"))]
mod emu;
mod flatten;
mod flood;
mod image;
mod instanseg;
mod label;
mod steps;
#[cfg(test)]
mod tests;

use std::str::FromStr;

use cudarc::driver::DeviceRepr;

use crate::cpu::{self, CropSpec};
use crate::illumination;
use crate::measure::{self, RegionProps};
use crate::segment::{self, NucleiParams};
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
    InstansegFieldsArgs { emb: u64, xx: u64, yy: u64, x: u64, y: u64, seed: u64, width: u32, height: u32 }
    InstansegPeaksArgs { map: u64, flag: u64, width: u32, height: u32, distance: u32, threshold: f32 }
    InstansegScoreArgs {
        x: u64, y: u64, sigma0: u64, sigma1: u64, windows: u64, layers: u64, shapes: u64, score: u64,
        width: u32, side: u32, count: u32, layer_count: u32,
    }
    InstansegCleanupArgs {
        score: u64, windows: u64, scratch: u64, queue: u64, side: u32, count: u32, threshold: f32,
    }
}

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

    /// The kernels run on the host, serially: for parity tests on machines without a GPU (the
    /// `emulation` feature lets other crates' tests use it; it needs a C compiler at run time).
    #[cfg(any(test, feature = "emulation"))]
    pub fn emulated() -> Result<Self, GpuError> {
        Ok(Self {
            dev: Device::Emu(emu::Emu::new()?),
            description: "host emulation of the CUDA kernels".into(),
        })
    }

    pub fn describe(&self) -> &str {
        &self.description
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

    /// Waits for the device (for timing).
    pub fn sync(&self) -> Result<(), GpuError> {
        self.dev.sync()
    }
}
