//! The back end the image kernels run on: one trait, implemented by the CPU reference ([`Cpu`],
//! over `segment` and `measure`) and by the CUDA device ([`crate::gpu::Gpu`]). [`Compute`] holds
//! the one `compute.device` chose, so a caller names an operation once and never matches on the
//! device (model: candle's `backend.rs`).

use std::fmt::Debug;
use std::sync::Arc;

use crate::gpu::{DeviceRequest, Gpu, GpuError};
use crate::measure::{self, RegionProps};
use crate::segment::{self, CellParams, NucleiParams};

/// What the daemon's stages run on a field. Each operation returns what the CPU reference
/// returns, bit for bit, whichever back end runs it.
pub trait Backend: Send + Sync + Debug {
    /// `cpu`, or the device with its name and architecture.
    fn describe(&self) -> String;

    fn is_gpu(&self) -> bool;

    /// [`segment::segment_nuclei`].
    fn segment_nuclei(
        &self,
        raw: &[u16],
        width: usize,
        height: usize,
        p: &NucleiParams,
    ) -> Result<(Vec<u32>, u32), GpuError>;

    /// [`segment::segment_nuclei_probability`].
    fn segment_nuclei_probability(
        &self,
        prob: &[f32],
        width: usize,
        height: usize,
        threshold: f32,
        p: &NucleiParams,
    ) -> Result<(Vec<u32>, u32), GpuError>;

    /// [`segment::segment_cells`].
    fn segment_cells(
        &self,
        nuclei: &[u32],
        cytoplasm_raw: &[u16],
        width: usize,
        height: usize,
        p: &CellParams,
    ) -> Result<Vec<u32>, GpuError>;

    /// [`measure::region_props`].
    fn region_props(
        &self,
        labels: &[u32],
        channels: &[&[u16]],
        width: usize,
        height: usize,
    ) -> Result<Vec<RegionProps>, GpuError>;
}

/// The CPU reference.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

impl Backend for Cpu {
    fn describe(&self) -> String {
        "cpu".into()
    }

    fn is_gpu(&self) -> bool {
        false
    }

    fn segment_nuclei(
        &self,
        raw: &[u16],
        width: usize,
        height: usize,
        p: &NucleiParams,
    ) -> Result<(Vec<u32>, u32), GpuError> {
        Ok(segment::segment_nuclei(raw, width, height, p)?)
    }

    fn segment_nuclei_probability(
        &self,
        prob: &[f32],
        width: usize,
        height: usize,
        threshold: f32,
        p: &NucleiParams,
    ) -> Result<(Vec<u32>, u32), GpuError> {
        Ok(segment::segment_nuclei_probability(prob, width, height, threshold, p)?)
    }

    fn segment_cells(
        &self,
        nuclei: &[u32],
        cytoplasm_raw: &[u16],
        width: usize,
        height: usize,
        p: &CellParams,
    ) -> Result<Vec<u32>, GpuError> {
        Ok(segment::segment_cells(nuclei, cytoplasm_raw, width, height, p)?)
    }

    fn region_props(
        &self,
        labels: &[u32],
        channels: &[&[u16]],
        width: usize,
        height: usize,
    ) -> Result<Vec<RegionProps>, GpuError> {
        Ok(measure::region_props(labels, channels, width, height)?)
    }
}

/// The back end chosen for a run. Cloning shares the device (one CUDA context, one compile of
/// the kernels, whatever the number of workers). Dereferences to the [`Backend`].
#[derive(Debug, Clone)]
pub struct Compute(Arc<dyn Backend>);

impl Compute {
    pub fn cpu() -> Self {
        Self(Arc::new(Cpu))
    }

    /// Resolves a request. `Auto` never fails: without a usable device it returns the CPU and the
    /// reason, for the caller to log once.
    pub fn select(req: DeviceRequest) -> Result<(Self, Option<String>), GpuError> {
        let gpu = |g: Gpu| Self(Arc::new(g));
        match req {
            DeviceRequest::Cpu => Ok((Self::cpu(), None)),
            DeviceRequest::Cuda(n) => Ok((gpu(Gpu::open(n)?), None)),
            DeviceRequest::Auto => match Gpu::open(0) {
                Ok(g) => Ok((gpu(g), None)),
                Err(e) => Ok((Self::cpu(), Some(e.to_string()))),
            },
        }
    }
}

impl std::ops::Deref for Compute {
    type Target = dyn Backend;

    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}
