//! The stage extension point and the two stages of v1: segmentation and per-cell measurement.
//!
//! A stage transforms a [`FieldWork`] in place on a worker thread. Stages are built once per
//! worker (they may keep scratch buffers), from the config and the acquisition plan, by the
//! registry.

use std::sync::Arc;
use std::time::Instant;

use liveomics_adapters::model::{AcquisitionPlan, Field};
use liveomics_adapters::Invalid;
use liveomics_kernels::gpu::Compute;
use liveomics_kernels::segment::{self, CellParams, NucleiParams};

use crate::config::Config;
use crate::resources::Resources;

/// Per-cell record: what the zenoh message and (later) the tables carry for each cell.
#[derive(Debug, Clone, PartialEq)]
pub struct CellRecord {
    /// Label id in both the nuclei and the cell label images.
    pub label: u32,
    pub centroid_x_px: f32,
    pub centroid_y_px: f32,
    pub area_px: u32,
    pub nucleus_area_px: u32,
    pub bbox_min_x: u32,
    pub bbox_min_y: u32,
    pub bbox_max_x: u32,
    pub bbox_max_y: u32,
    /// Mean raw intensity over the cell, one per plan channel; NaN for a missing channel.
    pub mean_intensity: Vec<f32>,
}

/// A field on its way through the stages to the sinks.
#[derive(Debug)]
pub struct FieldWork {
    pub field: Field,
    pub plan: Arc<AcquisitionPlan>,
    /// When the field must be done by every sink (first frame + latency budget).
    pub deadline: Instant,
    pub nuclei: Option<Vec<u32>>,
    pub cells: Option<Vec<u32>>,
    pub records: Vec<CellRecord>,
    /// Per-cell model outputs, one `(column, values)` per model output, aligned with `records`.
    pub cell_predictions: Vec<(String, Vec<f32>)>,
    /// Whole-field model outputs.
    pub images: Vec<crate::inference::ModelImage>,
    /// Models that failed on this field: their predictions are missing, not zero.
    pub failed_models: Vec<String>,
    /// Well-omics readouts of this field's well, updated with this field.
    pub well_readouts: Vec<crate::inference::WellReadout>,
    /// `plate/well/fN/tN`, for logs.
    pub name: String,
}

impl FieldWork {
    pub fn new(field: Field, plan: Arc<AcquisitionPlan>, deadline: Instant) -> Self {
        let name = field.key.to_string();
        Self {
            field,
            plan,
            deadline,
            nuclei: None,
            cells: None,
            records: Vec::new(),
            cell_predictions: Vec::new(),
            images: Vec::new(),
            failed_models: Vec::new(),
            well_readouts: Vec::new(),
            name,
        }
    }
}

/// Why a stage could not process a field. The field still goes to the sinks with what it has:
/// raw pixels are never lost because analysis failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("channel {0:?} is missing from this field")]
    MissingChannel(String),
    #[error(transparent)]
    Kernel(#[from] liveomics_kernels::KernelError),
    #[error(transparent)]
    Gpu(#[from] liveomics_kernels::gpu::GpuError),
    #[error(transparent)]
    Model(Box<liveomics_models::ModelError>),
}

/// One processing step.
pub trait Stage: Send {
    fn name(&self) -> &'static str;
    fn process(&mut self, work: &mut FieldWork) -> Result<(), StageError>;
}

/// Finds a channel by name (case-insensitive, as users type them).
pub fn channel_index(plan: &AcquisitionPlan, name: &str) -> Option<usize> {
    plan.channels.iter().position(|c| c.name.eq_ignore_ascii_case(name))
}

/// Nuclei, then cells propagated from them over the cytoplasm channel.
#[derive(Debug)]
pub struct SegmentStage {
    probability: Option<(crate::inference::ProbabilityModel, f32)>,
    nuclei_channel: usize,
    cells_channel: Option<usize>,
    nuclei: NucleiParams,
    cells: CellParams,
    exclude_border: bool,
    compute: Compute,
}

impl SegmentStage {
    pub fn new(cfg: &Config, plan: &AcquisitionPlan, res: &Resources) -> Result<Self, Invalid> {
        let s = &cfg.segmentation;
        let find = |key: &str, name: &str| {
            channel_index(plan, name).ok_or_else(|| {
                let known: Vec<&str> = plan.channels.iter().map(|c| c.name.as_str()).collect();
                Invalid::new(
                    key,
                    format!("no channel named {name:?}; channels: {}", known.join(", ")),
                )
            })
        };
        let nuclei_channel = find("segmentation.nuclei_channel", &s.nuclei_channel)?;
        let cells_channel = if s.cells_channel.is_empty() {
            None
        } else {
            Some(find("segmentation.cells_channel", &s.cells_channel)?)
        };
        let mut nuclei = NucleiParams::from_physical(s.nucleus_diameter_um, plan.pixel_size_um)
            .map_err(|e| Invalid::new("segmentation.nucleus_diameter_um", e.to_string()))?;
        nuclei.threshold = s.nuclei_threshold.into();
        nuclei.illumination = s.illumination_correction.then(|| {
            liveomics_kernels::segment::Illumination::for_nucleus_px(
                s.nucleus_diameter_um / plan.pixel_size_um,
                s.camera_offset_adu as f32,
            )
        });
        let probability = if s.probability_model.is_empty() {
            None
        } else {
            if !(s.probability_threshold > 0.0 && s.probability_threshold < 1.0) {
                return Err(Invalid::new(
                    "segmentation.probability_threshold",
                    "must be within (0, 1)",
                ));
            }
            Some((
                crate::inference::ProbabilityModel::new(cfg, plan, &s.probability_model, res)?,
                s.probability_threshold,
            ))
        };
        Ok(Self {
            probability,
            nuclei_channel,
            cells_channel,
            nuclei,
            cells: CellParams {
                threshold_scale: s.cells_threshold_scale,
                ..CellParams::default()
            },
            exclude_border: s.exclude_border_objects,
            compute: res.compute(&cfg.compute.device)?.0,
        })
    }
}

impl Stage for SegmentStage {
    fn name(&self) -> &'static str {
        "segment"
    }

    fn process(&mut self, work: &mut FieldWork) -> Result<(), StageError> {
        let f = &work.field;
        let missing = |c: usize| StageError::MissingChannel(work.plan.channels[c].name.clone());
        let dapi = f.channels[self.nuclei_channel]
            .as_ref()
            .ok_or_else(|| missing(self.nuclei_channel))?;
        let (mut nuclei, _) = match &self.probability {
            Some((model, threshold)) => {
                let prob = model.probability(work)?;
                self.compute
                    .segment_nuclei_probability(&prob, f.width, f.height, *threshold, &self.nuclei)?
            }
            None => self.compute.segment_nuclei(dapi, f.width, f.height, &self.nuclei)?,
        };
        let cells = match self.cells_channel {
            // Without the cytoplasm channel the nuclei still stand; the error is reported.
            Some(c) => match f.channels[c].as_ref() {
                Some(cyto) => Some(
                    self.compute
                        .segment_cells(&nuclei, cyto, f.width, f.height, &self.cells)?,
                ),
                None => {
                    let err = missing(c);
                    work.nuclei = Some(nuclei);
                    return Err(err);
                }
            },
            None => None,
        };
        let mut cells = cells;
        if self.exclude_border {
            segment::exclude_border_objects(&mut nuclei, cells.as_deref_mut(), f.width, f.height)?;
        }
        work.cells = cells;
        work.nuclei = Some(nuclei);
        Ok(())
    }
}

/// Per-cell geometry and intensities over every channel that arrived, on the `compute.device`
/// back end.
#[derive(Debug)]
pub struct MeasureStage {
    compute: Compute,
}

impl MeasureStage {
    pub fn new(cfg: &Config, res: &Resources) -> Result<Self, Invalid> {
        Ok(Self {
            compute: res.compute(&cfg.compute.device)?.0,
        })
    }
}

impl Stage for MeasureStage {
    fn name(&self) -> &'static str {
        "measure"
    }

    fn process(&mut self, work: &mut FieldWork) -> Result<(), StageError> {
        let Some(nuclei) = work.nuclei.as_ref() else {
            return Ok(());
        };
        let f = &work.field;
        let present: Vec<usize> = (0..f.channels.len()).filter(|&c| f.channels[c].is_some()).collect();
        let planes: Vec<&[u16]> = present.iter().filter_map(|&c| f.channels[c].as_deref()).collect();
        let cells = work.cells.as_ref().unwrap_or(nuclei);
        let props = self.compute.region_props(cells, &planes, f.width, f.height)?;
        let nuc = self.compute.region_props(nuclei, &[], f.width, f.height)?;
        let mut nuc_area = vec![0u32; nuc.last().map(|p| p.label as usize + 1).unwrap_or(0)];
        for p in &nuc {
            nuc_area[p.label as usize] = p.area_px as u32;
        }
        work.records = props
            .into_iter()
            .map(|p| {
                let mut mean = vec![f32::NAN; f.channels.len()];
                for (k, &c) in present.iter().enumerate() {
                    mean[c] = p.mean_intensity[k] as f32;
                }
                CellRecord {
                    label: p.label,
                    centroid_x_px: p.centroid_x as f32,
                    centroid_y_px: p.centroid_y as f32,
                    area_px: p.area_px as u32,
                    nucleus_area_px: nuc_area.get(p.label as usize).copied().unwrap_or(0),
                    bbox_min_x: p.bbox_min_x,
                    bbox_min_y: p.bbox_min_y,
                    bbox_max_x: p.bbox_max_x,
                    bbox_max_y: p.bbox_max_y,
                    mean_intensity: mean,
                }
            })
            .collect();
        Ok(())
    }
}
