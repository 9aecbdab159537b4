//! The back end the image kernels run on: [`Steps`], implemented by the CPU reference ([`Cpu`])
//! and by the CUDA device ([`crate::gpu::Gpu`]), and [`Backend`], the object-safe operations
//! `segment` composes from them once for both. [`Compute`] holds
//! the one `compute.device` chose, so a caller names an operation once and never matches on the
//! device (model: candle's `backend.rs`).

use std::fmt::Debug;
use std::sync::Arc;

use crate::gpu::{DeviceRequest, Gpu, GpuError};
use crate::instanseg::{self, InstanSegParams, Instances};
use crate::measure::{self, RegionProps};
use crate::segment::{self, CellParams, Illumination, NucleiParams, ThresholdMethod};
use crate::{cpu, illumination, KernelError};

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

    /// [`instanseg::instances`] of an InstanSeg network's output.
    fn instanseg(
        &self,
        embedding: &[f32],
        channels: usize,
        width: usize,
        height: usize,
        cells: bool,
        p: &InstanSegParams,
    ) -> Result<Instances, GpuError>;
}

/// What a back end implements: the steps the segmentation is composed of, on its own buffers
/// (host vectors, device memory), so that `segment` writes the algorithm once and a field stays
/// on the device from the raw upload to the label download. Each step returns what the CPU's
/// step returns, bit for bit (the GPU parity tests check it); [`Backend`] follows for every
/// implementor.
pub trait Steps {
    type Error: From<KernelError>;
    /// An `f32` plane.
    type Image;
    /// A foreground mask.
    type Mask;
    /// A `u32` label plane.
    type Labels;
    /// The masked pixels a flood left unlabelled.
    type Unreached;
    const IS_GPU: bool;

    /// `cpu`, or the device with its name and architecture.
    fn name(&self) -> String;

    /// A raw plane to [0, 1] by its `low`/`high` percentiles, with the illumination divided out
    /// first when given.
    fn normalize_raw(
        &self,
        raw: &[u16],
        width: usize,
        height: usize,
        illumination: Option<Illumination>,
        low_pct: f64,
        high_pct: f64,
    ) -> Result<Self::Image, Self::Error>;

    fn image(&self, values: &[f32]) -> Result<Self::Image, Self::Error>;

    fn labels(&self, labels: &[u32]) -> Result<Self::Labels, Self::Error>;

    /// [`cpu::gaussian_blur`].
    fn blur(&self, img: &Self::Image, width: usize, height: usize, sigma: f32) -> Result<Self::Image, Self::Error>;

    fn threshold(&self, img: &Self::Image, n: usize, method: ThresholdMethod) -> Result<f32, Self::Error>;

    /// Pixels above `threshold` (NaN is not), and every pixel `labelled` labels when given.
    fn mask_above(
        &self,
        img: &Self::Image,
        labelled: Option<&Self::Labels>,
        n: usize,
        threshold: f32,
    ) -> Result<Self::Mask, Self::Error>;

    /// [`crate::local::local_foreground`] of a normalised image and its smoothing.
    fn local_foreground(
        &self,
        norm: &Self::Image,
        smooth: &Self::Image,
        width: usize,
        height: usize,
        p: &NucleiParams,
    ) -> Result<Self::Mask, Self::Error>;

    /// [`cpu::distance_transform`].
    fn distance(&self, mask: &Self::Mask, width: usize, height: usize) -> Result<Self::Image, Self::Error>;

    /// [`cpu::peak_markers`].
    fn peak_markers(
        &self,
        img: &Self::Image,
        mask: &Self::Mask,
        width: usize,
        height: usize,
        radius: usize,
        min_value: f32,
    ) -> Result<(Self::Labels, u32), Self::Error>;

    fn negate(&self, img: &mut Self::Image, n: usize) -> Result<(), Self::Error>;

    /// [`cpu::watershed`], and the masked pixels it did not reach.
    fn watershed(
        &self,
        elevation: &Self::Image,
        markers: &Self::Labels,
        mask: &Self::Mask,
        width: usize,
        height: usize,
    ) -> Result<(Self::Labels, Self::Unreached), Self::Error>;

    /// Labels each 8-connected blob of `unreached` `offset + 1..`, in raster order of its first
    /// pixel; returns how many there were.
    fn label_unreached(
        &self,
        labels: &mut Self::Labels,
        unreached: Self::Unreached,
        offset: u32,
        width: usize,
        height: usize,
    ) -> Result<u32, Self::Error>;

    /// [`cpu::filter_by_area`] with the nuclei size limits; `max_label` bounds the labels.
    fn filter_by_area(
        &self,
        labels: Self::Labels,
        max_label: u32,
        width: usize,
        height: usize,
        p: &NucleiParams,
    ) -> Result<(Self::Labels, u32), Self::Error>;

    /// [`cpu::propagate`].
    fn propagate(
        &self,
        image: &Self::Image,
        seeds: &Self::Labels,
        mask: &Self::Mask,
        width: usize,
        height: usize,
        spatial_weight: f32,
    ) -> Result<Self::Labels, Self::Error>;

    fn download(&self, labels: Self::Labels, n: usize) -> Result<Vec<u32>, Self::Error>;

    /// [`measure::region_props`].
    fn region_props(
        &self,
        labels: &[u32],
        channels: &[&[u16]],
        width: usize,
        height: usize,
    ) -> Result<Vec<RegionProps>, Self::Error>;

    /// [`instanseg::instances`].
    fn instanseg(
        &self,
        embedding: &[f32],
        channels: usize,
        width: usize,
        height: usize,
        cells: bool,
        p: &InstanSegParams,
    ) -> Result<Instances, Self::Error>;
}

impl<S> Backend for S
where
    S: Steps + Send + Sync + Debug,
    GpuError: From<S::Error>,
{
    fn describe(&self) -> String {
        self.name()
    }

    fn is_gpu(&self) -> bool {
        S::IS_GPU
    }

    fn segment_nuclei(
        &self,
        raw: &[u16],
        width: usize,
        height: usize,
        p: &NucleiParams,
    ) -> Result<(Vec<u32>, u32), GpuError> {
        Ok(segment::nuclei(self, raw, width, height, p)?)
    }

    fn segment_nuclei_probability(
        &self,
        prob: &[f32],
        width: usize,
        height: usize,
        threshold: f32,
        p: &NucleiParams,
    ) -> Result<(Vec<u32>, u32), GpuError> {
        Ok(segment::nuclei_from_probability(
            self, prob, width, height, threshold, p,
        )?)
    }

    fn segment_cells(
        &self,
        nuclei: &[u32],
        cytoplasm_raw: &[u16],
        width: usize,
        height: usize,
        p: &CellParams,
    ) -> Result<Vec<u32>, GpuError> {
        Ok(segment::cells(self, nuclei, cytoplasm_raw, width, height, p)?)
    }

    fn region_props(
        &self,
        labels: &[u32],
        channels: &[&[u16]],
        width: usize,
        height: usize,
    ) -> Result<Vec<RegionProps>, GpuError> {
        Ok(Steps::region_props(self, labels, channels, width, height)?)
    }

    fn instanseg(
        &self,
        embedding: &[f32],
        channels: usize,
        width: usize,
        height: usize,
        cells: bool,
        p: &InstanSegParams,
    ) -> Result<Instances, GpuError> {
        Ok(Steps::instanseg(self, embedding, channels, width, height, cells, p)?)
    }
}

/// The CPU reference.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

impl Steps for Cpu {
    type Error = KernelError;
    type Image = Vec<f32>;
    type Mask = Vec<bool>;
    type Labels = Vec<u32>;
    /// Pixel indices in raster order: few, so labelled sparsely.
    type Unreached = Vec<usize>;
    const IS_GPU: bool = false;

    fn name(&self) -> String {
        "cpu".into()
    }

    fn normalize_raw(
        &self,
        raw: &[u16],
        width: usize,
        height: usize,
        illumination: Option<Illumination>,
        low_pct: f64,
        high_pct: f64,
    ) -> Result<Vec<f32>, KernelError> {
        match illumination {
            Some(il) => illumination::normalize_f32(
                &illumination::flatten_u16(raw, width, height, il.offset, il.block_px)?,
                low_pct,
                high_pct,
            ),
            None => cpu::normalize_u16(raw, width, height, low_pct, high_pct),
        }
    }

    fn image(&self, values: &[f32]) -> Result<Vec<f32>, KernelError> {
        Ok(values.to_vec())
    }

    fn labels(&self, labels: &[u32]) -> Result<Vec<u32>, KernelError> {
        Ok(labels.to_vec())
    }

    fn blur(&self, img: &Vec<f32>, width: usize, height: usize, sigma: f32) -> Result<Vec<f32>, KernelError> {
        cpu::gaussian_blur(img, width, height, sigma)
    }

    fn threshold(&self, img: &Vec<f32>, _n: usize, method: ThresholdMethod) -> Result<f32, KernelError> {
        Ok(method.threshold(img))
    }

    fn mask_above(
        &self,
        img: &Vec<f32>,
        labelled: Option<&Vec<u32>>,
        _n: usize,
        threshold: f32,
    ) -> Result<Vec<bool>, KernelError> {
        Ok(match labelled {
            Some(l) => img.iter().zip(l).map(|(&v, &l)| v > threshold || l != 0).collect(),
            None => img.iter().map(|&v| v > threshold).collect(),
        })
    }

    fn local_foreground(
        &self,
        norm: &Vec<f32>,
        smooth: &Vec<f32>,
        width: usize,
        height: usize,
        p: &NucleiParams,
    ) -> Result<Vec<bool>, KernelError> {
        crate::local::nuclei_foreground(norm, smooth, width, height, p)
    }

    fn distance(&self, mask: &Vec<bool>, width: usize, height: usize) -> Result<Vec<f32>, KernelError> {
        cpu::distance_transform(mask, width, height)
    }

    fn peak_markers(
        &self,
        img: &Vec<f32>,
        mask: &Vec<bool>,
        width: usize,
        height: usize,
        radius: usize,
        min_value: f32,
    ) -> Result<(Vec<u32>, u32), KernelError> {
        cpu::peak_markers(img, mask, width, height, radius, min_value)
    }

    fn negate(&self, img: &mut Vec<f32>, _n: usize) -> Result<(), KernelError> {
        img.iter_mut().for_each(|v| *v = -*v);
        Ok(())
    }

    fn watershed(
        &self,
        elevation: &Vec<f32>,
        markers: &Vec<u32>,
        mask: &Vec<bool>,
        width: usize,
        height: usize,
    ) -> Result<(Vec<u32>, Vec<usize>), KernelError> {
        let labels = cpu::watershed(elevation, markers, mask, width, height)?;
        let left = cpu::pixels_where(width, height, |i| mask[i] && labels[i] == 0);
        Ok((labels, left))
    }

    fn label_unreached(
        &self,
        labels: &mut Vec<u32>,
        unreached: Vec<usize>,
        offset: u32,
        width: usize,
        _height: usize,
    ) -> Result<u32, KernelError> {
        if unreached.is_empty() {
            return Ok(0);
        }
        let (blobs, count) = cpu::label_pixels(&unreached, labels.len(), width, true);
        for &i in &unreached {
            labels[i] = offset + blobs[i];
        }
        Ok(count)
    }

    fn filter_by_area(
        &self,
        labels: Vec<u32>,
        _max_label: u32,
        width: usize,
        _height: usize,
        p: &NucleiParams,
    ) -> Result<(Vec<u32>, u32), KernelError> {
        Ok(cpu::filter_by_area(
            &labels,
            width,
            p.min_area_px,
            p.min_area_at_border_px,
            p.max_area_px,
        ))
    }

    fn propagate(
        &self,
        image: &Vec<f32>,
        seeds: &Vec<u32>,
        mask: &Vec<bool>,
        width: usize,
        height: usize,
        spatial_weight: f32,
    ) -> Result<Vec<u32>, KernelError> {
        cpu::propagate(image, seeds, mask, width, height, spatial_weight)
    }

    fn download(&self, labels: Vec<u32>, _n: usize) -> Result<Vec<u32>, KernelError> {
        Ok(labels)
    }

    fn region_props(
        &self,
        labels: &[u32],
        channels: &[&[u16]],
        width: usize,
        height: usize,
    ) -> Result<Vec<RegionProps>, KernelError> {
        measure::region_props(labels, channels, width, height)
    }

    fn instanseg(
        &self,
        embedding: &[f32],
        channels: usize,
        width: usize,
        height: usize,
        cells: bool,
        p: &InstanSegParams,
    ) -> Result<Instances, KernelError> {
        instanseg::instances(embedding, channels, width, height, cells, p)
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

    /// The CUDA back end on the host emulation of its kernels ([`Gpu::emulated`]).
    #[cfg(any(test, feature = "emulation"))]
    pub fn emulated() -> Result<Self, GpuError> {
        Ok(Self(Arc::new(Gpu::emulated()?)))
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
