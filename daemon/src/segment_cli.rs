//! `liveomics segment`: the daemon's segmentation on an image file, for checking parameters on
//! real data and for comparing with other tools. Reads a 2-D single- or multi-channel TIFF
//! (uint8, uint16, uint32 or float32), writes uint32 label TIFFs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use liveomics_adapters::tiff_io::{read_channels, read_image, write_plane, Plane, TiffError};
use liveomics_kernels::gpu::{Compute, DeviceRequest, GpuError};
use liveomics_kernels::segment::{CellParams, NucleiParams};
use liveomics_kernels::KernelError;
use liveomics_models::{ModelError, Provider, RuntimeOptions, TileOptions};

use crate::component::StageError;
use crate::inference::instances::{ChooseError, InstanceModel};
use crate::stage::{SegmentMethod, DEFAULT_MODEL};

#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error(transparent)]
    Tiff(#[from] TiffError),
    #[error("{path}: has {have} channel(s); --{which}-channel {want} does not exist (channels count from 0)")]
    Channel {
        path: PathBuf,
        which: &'static str,
        have: usize,
        want: usize,
    },
    #[error("{0}: the image is empty (0 pixels)")]
    Empty(PathBuf),
    #[error("--device {0}")]
    Device(#[from] liveomics_kernels::gpu::BadDeviceRequest),
    #[error("--device {device}: {source}")]
    Gpu { device: String, source: GpuError },
    /// A nucleus size in pixels no image has: a usage error (`--pixel-size-um` overrides the
    /// file's own pixel size).
    #[error("--diameter-um {diameter_um} at {pixel_size_um} µm per pixel (from {pixel_from})")]
    Size {
        diameter_um: f64,
        pixel_size_um: f64,
        pixel_from: &'static str,
        #[source]
        source: KernelError,
    },
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("--model {path}")]
    Model {
        path: PathBuf,
        #[source]
        source: Box<ModelError>,
    },
    #[error("--method instanseg: no model at {0} (pass --model)")]
    NoModel(PathBuf),
    #[error(transparent)]
    Stage(#[from] StageError),
}

/// What `segment` was asked to do (the command line of `liveomics segment`).
#[derive(Debug, Clone, clap::Args)]
pub struct SegmentRequest {
    /// 2-D TIFF, one channel or several (pages or interleaved samples); uint8/16/32 or float32.
    pub input: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Cell label image (needs --cells-channel).
    #[arg(long, requires = "cells_channel")]
    pub cells_out: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub nuclei_channel: usize,
    #[arg(long)]
    pub cells_channel: Option<usize>,
    /// Pixel size; defaults to the OME-XML PhysicalSizeX, else 0.65.
    #[arg(long)]
    pub pixel_size_um: Option<f64>,
    /// Expected nucleus diameter: every pixel parameter is derived from it.
    #[arg(long, default_value_t = 11.0)]
    pub diameter_um: f64,
    /// auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Foreground of the nuclear channel (classical): local, or one global otsu/triangle.
    #[arg(long, value_enum, default_value_t = crate::stage::NucleiThreshold::Local)]
    pub threshold: crate::stage::NucleiThreshold,
    /// auto: InstanSeg when its model is found, ONNX Runtime loads and the pixel size is known
    /// (the TIFF's or --pixel-size-um), else classical; the log says which and why.
    #[arg(long, value_enum, default_value_t = SegmentMethod::Auto)]
    pub method: SegmentMethod,
    /// InstanSeg model folder.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Where InstanSeg's cells come from (with --cells-channel).
    #[arg(long, value_enum, default_value_t = crate::stage::InstansegCells::Propagate)]
    pub instanseg_cells: crate::stage::InstansegCells,
    /// InstanSeg's seed threshold in place of the model's (lower finds dimmer nuclei).
    #[arg(long, default_value_t = crate::stage::DEFAULT_SEED_THRESHOLD)]
    pub seed_threshold: f32,
    /// ONNX Runtime library; default: ORT_DYLIB_PATH, the repository's .venv, then Python's.
    #[arg(long)]
    pub ort_library: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct SegmentReport {
    pub width: usize,
    pub height: usize,
    pub nuclei: u32,
    pub cells: Option<u32>,
    pub elapsed: Duration,
    /// `instanseg` or `classical`.
    pub method: &'static str,
    /// Why the result may be empty or the input was adjusted (NaN, constant image, ...).
    pub notes: Vec<String>,
}

/// Brings any supported sample type to the u16 the kernels take, noting what was changed.
/// Float images are mapped linearly from their finite range; NaN and infinities become the
/// minimum (background) and are counted.
pub fn to_u16(plane: &Plane, notes: &mut Vec<String>) -> Vec<u16> {
    match plane {
        Plane::U16(v) => v.clone(),
        Plane::U8(v) => v.iter().map(|&x| x as u16 * 257).collect(),
        Plane::U32(v) => {
            let max = v.iter().copied().max().unwrap_or(0);
            if max <= u16::MAX as u32 {
                v.iter().map(|&x| x as u16).collect()
            } else {
                notes.push(format!("uint32 values up to {max} scaled to 16 bits"));
                v.iter().map(|&x| (x as u64 * 65535 / max as u64) as u16).collect()
            }
        }
        Plane::F32(v) => {
            let bad = v.iter().filter(|x| !x.is_finite()).count();
            let (lo, hi) = v
                .iter()
                .filter(|x| x.is_finite())
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
            if bad > 0 {
                notes.push(format!("{bad} NaN or infinite pixel(s) treated as background"));
            }
            if !(hi > lo) {
                notes.push("no finite intensity range (constant or all-NaN image)".into());
                return vec![0; v.len()];
            }
            let scale = 65535.0 / (hi - lo) as f64;
            v.iter()
                .map(|&x| {
                    if x.is_finite() {
                        ((x - lo) as f64 * scale).round() as u16
                    } else {
                        0
                    }
                })
                .collect()
        }
    }
}

pub fn segment_file(req: &SegmentRequest) -> Result<SegmentReport, SegmentError> {
    let request: DeviceRequest = req.device.parse().map_err(SegmentError::Device)?;
    let gpu_err = |source| SegmentError::Gpu {
        device: req.device.clone(),
        source,
    };
    let (compute, fallback) = Compute::select(request).map_err(gpu_err)?;
    crate::telemetry::ComputeSelected {
        requested: &req.device,
        device: &compute.describe(),
        fallback_reason: fallback.as_deref(),
    }
    .emit();
    let t0 = Instant::now();
    let (w, h, planes) = read_channels(&req.input)?;
    if w == 0 || h == 0 || planes.is_empty() {
        return Err(SegmentError::Empty(req.input.clone()));
    }
    let channel = |which: &'static str, k: usize| {
        planes.get(k).ok_or(SegmentError::Channel {
            path: req.input.clone(),
            which,
            have: planes.len(),
            want: k,
        })
    };
    let mut notes = Vec::new();
    let dapi = to_u16(channel("nuclei", req.nuclei_channel)?, &mut notes);
    let cyto = match req.cells_channel {
        Some(k) => Some(to_u16(channel("cells", k)?, &mut notes)),
        None => None,
    };
    let (pixel_size_um, pixel_from, known) = match req.pixel_size_um {
        Some(p) => (p, "--pixel-size-um", true),
        None => match read_image(&req.input).ok().and_then(|i| i.pixel_size_um) {
            Some(p) => (p, "the TIFF's metadata", true),
            None => (0.65, "the default; pass --pixel-size-um", false),
        },
    };
    let mut params =
        NucleiParams::from_physical(req.diameter_um, pixel_size_um).map_err(|source| SegmentError::Size {
            diameter_um: req.diameter_um,
            pixel_size_um,
            pixel_from,
            source,
        })?;
    params.foreground = req.threshold.into();
    if let Some(m) = instance_model(req)? {
        let nucleus_px = if known {
            req.diameter_um / pixel_size_um
        } else {
            let px = nucleus_px_measured(&compute, &dapi, w, h, &params, req.diameter_um / pixel_size_um)
                .map_err(gpu_err)?;
            notes.push(format!(
                "pixel size unknown: InstanSeg resampled for nuclei of {px:.1} px, the classical path's median"
            ));
            px
        };
        let mut planes = vec![dapi.as_slice()];
        let from_model = req.instanseg_cells == crate::stage::InstansegCells::Model && m.has_cells();
        if let (Some(c), true) = (&cyto, from_model) {
            planes.push(c.as_slice());
        }
        let mut r = m.segment(
            &compute,
            &planes,
            w,
            h,
            m.factor(nucleus_px),
            from_model && req.cells_out.is_some(),
        )?;
        if let (Some(c), None, Some(_)) = (&cyto, &r.cells, &req.cells_out) {
            let cells = compute
                .segment_cells(&r.nuclei, c, w, h, &CellParams::default())
                .map_err(gpu_err)?;
            r.count = r.nuclei.iter().copied().max().unwrap_or(0);
            r.cells = Some(cells);
        }
        // With the model's own cells, nuclei share the cells' numbering: count them, not the top label.
        let mut ids: Vec<u32> = r.nuclei.iter().copied().filter(|&v| v > 0).collect();
        ids.sort_unstable();
        ids.dedup();
        let nuclei_n = ids.len() as u32;
        if nuclei_n == 0 {
            notes.push("no nuclei found (empty, saturated or featureless nuclear channel?)".into());
        }
        write_labels(&req.out, w, h, &r.nuclei)?;
        if let (Some(cells), Some(path)) = (&r.cells, &req.cells_out) {
            write_labels(path, w, h, cells)?;
        }
        return Ok(SegmentReport {
            width: w,
            height: h,
            nuclei: nuclei_n,
            cells: r.cells.as_ref().map(|_| r.count),
            elapsed: t0.elapsed(),
            method: "instanseg",
            notes,
        });
    }
    let (nuclei, n) = compute.segment_nuclei(&dapi, w, h, &params).map_err(gpu_err)?;
    if n == 0 {
        notes.push("no nuclei found (empty, saturated or featureless nuclear channel?)".into());
    }
    write_labels(&req.out, w, h, &nuclei)?;
    let mut cells_n = None;
    if let (Some(cyto), Some(path)) = (cyto, &req.cells_out) {
        let cells = compute
            .segment_cells(&nuclei, &cyto, w, h, &CellParams::default())
            .map_err(gpu_err)?;
        cells_n = Some(n);
        write_labels(path, w, h, &cells)?;
    }
    Ok(SegmentReport {
        width: w,
        height: h,
        nuclei: n,
        cells: cells_n,
        elapsed: t0.elapsed(),
        method: "classical",
        notes,
    })
}

/// The InstanSeg model `--method` asks for, or `None` (classical) with the reason logged.
fn instance_model(req: &SegmentRequest) -> Result<Option<InstanceModel>, SegmentError> {
    if !matches!(req.method, SegmentMethod::Auto | SegmentMethod::Instanseg) {
        return Ok(None);
    }
    let providers = if req.device == "cpu" {
        vec![Provider::Cpu]
    } else {
        vec![Provider::Cuda { device: 0 }, Provider::Cpu]
    };
    let opts = RuntimeOptions {
        ort_library: req.ort_library.clone(),
        providers,
        ..RuntimeOptions::default()
    };
    let tile = TileOptions {
        tile: crate::stage::DEFAULT_INSTANSEG_TILE_PX,
        batch: 1,
        ..TileOptions::default()
    };
    crate::inference::instances::choose(
        req.method == SegmentMethod::Auto,
        &req.model,
        &opts,
        tile,
        req.seed_threshold,
        req.instanseg_cells == crate::stage::InstansegCells::Model && req.cells_out.is_some(),
        // One image, no instrument waiting: nothing for `auto` to weigh the model against.
        None,
    )
    .map_err(|e| match e {
        ChooseError::NoModel(p) => SegmentError::NoModel(p),
        ChooseError::Load { path, source } => SegmentError::Model { path, source },
    })
}

/// The median nucleus diameter (of a disc of the same area) the classical path finds: the
/// nucleus size InstanSeg resamples for when the image says nothing of its pixel size.
fn nucleus_px_measured(
    compute: &Compute,
    dapi: &[u16],
    w: usize,
    h: usize,
    params: &NucleiParams,
    none_found: f64,
) -> Result<f64, GpuError> {
    let (labels, n) = compute.segment_nuclei(dapi, w, h, params)?;
    let mut area = vec![0u32; n as usize + 1];
    for &l in &labels {
        area[l as usize] += 1;
    }
    let mut d: Vec<f64> = area[1..]
        .iter()
        .filter(|&&a| a > 0)
        .map(|&a| 2.0 * (a as f64 / std::f64::consts::PI).sqrt())
        .collect();
    if d.is_empty() {
        return Ok(none_found);
    }
    d.sort_by(f64::total_cmp);
    Ok(d[d.len() / 2])
}

fn write_labels(path: &Path, w: usize, h: usize, labels: &[u32]) -> Result<(), SegmentError> {
    Ok(write_plane(path, w, h, &Plane::U32(labels.to_vec()))?)
}
