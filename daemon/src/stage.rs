//! The two image-kernel stages: segmentation (`[segmentation]`) and per-cell measurement. Each
//! is built once per worker from its section, the context and the acquisition plan.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use liveomics_adapters::model::AcquisitionPlan;
use liveomics_adapters::Invalid;
use liveomics_kernels::gpu::Compute;
use liveomics_kernels::segment::{self, CellParams, NucleiParams};
use serde::{Deserialize, Serialize};

use crate::component::{Context, Stage, StageConfig, StageError, StageName};
use crate::field::{channel_index, CellRecord, FieldWork};
use crate::inference::instances::InstanceModel;
use crate::inference::ProbabilityModel;
use crate::telemetry as t;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentationConfig {
    /// How nuclei (and cells) are found: `auto`, `classical`, `instanseg` or `probability`.
    pub method: SegmentMethod,
    /// The InstanSeg model (folder or description) for `instanseg` and `auto`; a relative path
    /// is looked up from the working directory, then from the repository the binary was built in.
    pub model: PathBuf,
    /// InstanSeg's seed threshold, in place of the model's own (0.7 for the shipped model, set
    /// on the tissue it was trained on): on cultured cells its seed map is weaker, and 0.3 finds
    /// the dim nuclei 0.7 misses (DSB2018 AP@0.5 0.82 against 0.69, docs/BENCHMARKS.md).
    pub seed_threshold: f32,
    /// Where InstanSeg's cells come from (with `cells_channel`).
    pub instanseg_cells: InstansegCells,
    /// Largest side, in model pixels, the network sees in one run: fields up to it go whole.
    /// Tiles (with the model's 64 px halo) change labels on up to 1.5% of pixels at some scales
    /// (docs/BENCHMARKS.md), so the default takes a 2160² field at 0.65 µm (1659 model px) whole.
    pub instanseg_tile_px: usize,
    /// Channel (by name) holding the nuclear stain.
    pub nuclei_channel: String,
    /// Channel (by name) the cell bodies are propagated over; empty for nuclei only.
    pub cells_channel: String,
    /// Expected nucleus diameter; every pixel parameter is derived from it and the pixel size.
    pub nucleus_diameter_um: f64,
    /// Foreground of the nuclear channel (classical path): `local` (background-corrected and
    /// per-object, so dim nuclei beside bright ones are kept), or one global `otsu` or
    /// `triangle` threshold for the whole field.
    pub nuclei_threshold: NucleiThreshold,
    /// Name of an `[[inference.models]]` entry with the segmentation role: its foreground
    /// probability (first output channel, > `probability_threshold`) replaces the automatic
    /// threshold, and the same seeded watershed splits touching nuclei. Empty: threshold-based.
    pub probability_model: String,
    pub probability_threshold: f32,
    /// Cytoplasm foreground threshold as a fraction of Otsu's.
    pub cells_threshold_scale: f32,
    /// Divide uneven illumination (vignetting) out of the nuclear channel before thresholding: a
    /// smooth background is estimated per field from tiles of four nucleus diameters
    /// (`kernels/src/illumination.rs`). Worth it when corners are much dimmer than the centre.
    pub illumination_correction: bool,
    /// Camera offset removed before dividing (ADU at zero light).
    pub camera_offset_adu: f64,
    /// Drop cells (with their nuclei) that touch the field's edge: a cut cell biases per-cell
    /// area and intensity. Off by default, because the fields tile the well and counts, well
    /// readouts and follow-up triggers want every cell.
    pub exclude_border_objects: bool,
}

impl Default for SegmentationConfig {
    fn default() -> Self {
        Self {
            method: SegmentMethod::Auto,
            model: PathBuf::from(DEFAULT_MODEL),
            seed_threshold: DEFAULT_SEED_THRESHOLD,
            instanseg_cells: InstansegCells::Propagate,
            instanseg_tile_px: DEFAULT_INSTANSEG_TILE_PX,
            nuclei_channel: "DAPI".into(),
            cells_channel: "ER".into(),
            nucleus_diameter_um: 11.0,
            nuclei_threshold: NucleiThreshold::Local,
            probability_model: String::new(),
            probability_threshold: 0.5,
            cells_threshold_scale: 0.3,
            illumination_correction: false,
            camera_offset_adu: 100.0,
            exclude_border_objects: false,
        }
    }
}

/// The InstanSeg model `make` keeps in the repository (converted by `make import-instanseg`).
pub const DEFAULT_MODEL: &str = "models/instanseg_fluorescence";

/// `segmentation.instanseg_tile_px` unless given.
pub const DEFAULT_INSTANSEG_TILE_PX: usize = 2048;

/// `segmentation.seed_threshold` and `--seed-threshold` unless given.
pub const DEFAULT_SEED_THRESHOLD: f32 = 0.3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SegmentMethod {
    /// `probability` when `probability_model` is set; else `instanseg` when its model is found
    /// and ONNX Runtime loads; else `classical`, with the reason logged.
    Auto,
    /// Threshold, distance-transform seeds and watershed on the nuclear channel; cells by
    /// propagation over the cytoplasm channel.
    Classical,
    /// The InstanSeg model at `model`: nuclei and, with `cells_channel`, cells from its own
    /// output. Falls back to `classical`, logged, when ONNX Runtime is missing.
    Instanseg,
    /// `probability_model`'s foreground probability, split by the classical watershed.
    #[value(skip)]
    Probability,
}

impl SegmentMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Classical => "classical",
            Self::Instanseg => "instanseg",
            Self::Probability => "probability",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum InstansegCells {
    /// Propagated from InstanSeg's nuclei over the cytoplasm channel, as the classical path
    /// does: right for cytoplasm stains (ER, CellMask), which the shipped model was not trained
    /// on (it scores cell AP@0.5 0.02-0.4 on the simulator's ER channel, docs/BENCHMARKS.md).
    Propagate,
    /// The model's own cells, the cytoplasm channel fed beside the nuclear one: for membrane
    /// markers like those it was trained on.
    Model,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NucleiThreshold {
    /// Background surface plus noise, then a threshold per object: survives a field whose
    /// nuclei differ tenfold in brightness (DSB2018 AP@0.5 in docs/BENCHMARKS.md).
    Local,
    /// One Otsu threshold for the field: fine when every nucleus is about as bright.
    Otsu,
    /// One triangle threshold for the field: for sparse nuclei on a large background.
    Triangle,
}

impl From<NucleiThreshold> for liveomics_kernels::segment::Foreground {
    fn from(t: NucleiThreshold) -> Self {
        use liveomics_kernels::segment::ThresholdMethod;
        match t {
            NucleiThreshold::Local => Self::Local,
            NucleiThreshold::Otsu => Self::Global(ThresholdMethod::Otsu),
            NucleiThreshold::Triangle => Self::Global(ThresholdMethod::Triangle),
        }
    }
}

/// Nuclei, then cells propagated from them over the cytoplasm channel.
#[derive(Debug)]
pub struct SegmentStage {
    probability: Option<(crate::inference::ProbabilityModel, f32)>,
    instances: Option<Arc<InstanceModel>>,
    instanseg_cells: InstansegCells,
    /// Nucleus diameter in field pixels, from which InstanSeg's resampling follows.
    nucleus_px: f64,
    nuclei_channel: usize,
    cells_channel: Option<usize>,
    nuclei: NucleiParams,
    cells: CellParams,
    exclude_border: bool,
    compute: Compute,
    /// The method that segments this run (`auto` resolved), recorded with every field.
    method: Arc<str>,
}

impl SegmentStage {
    pub fn new(s: &SegmentationConfig, ctx: &Context, plan: &AcquisitionPlan) -> Result<Self, Invalid> {
        let find = |key: &str, name: &str| {
            channel_index(plan, name).ok_or_else(|| {
                let known: Vec<&str> = plan.channels.iter().map(|c| c.name.as_str()).collect();
                ctx.invalid(
                    key,
                    format!("no channel named {name:?}; channels: {}", known.join(", ")),
                )
            })
        };
        let nuclei_channel = find("nuclei_channel", &s.nuclei_channel)?;
        let cells_channel = if s.cells_channel.is_empty() {
            None
        } else {
            Some(find("cells_channel", &s.cells_channel)?)
        };
        let mut nuclei = NucleiParams::from_physical(s.nucleus_diameter_um, plan.pixel_size_um)
            .map_err(|e| ctx.invalid("nucleus_diameter_um", e.to_string()))?;
        nuclei.foreground = s.nuclei_threshold.into();
        nuclei.illumination = s.illumination_correction.then(|| {
            liveomics_kernels::segment::Illumination::for_nucleus_px(
                s.nucleus_diameter_um / plan.pixel_size_um,
                s.camera_offset_adu as f32,
            )
        });
        let method = match s.method {
            SegmentMethod::Auto if !s.probability_model.is_empty() => SegmentMethod::Probability,
            m => m,
        };
        let instances = match method {
            SegmentMethod::Auto | SegmentMethod::Instanseg => instance_model(s, method, ctx, plan)?,
            _ => None,
        };
        if let Some(m) = &instances {
            let factor = m.factor(s.nucleus_diameter_um / plan.pixel_size_um);
            if factor > MAX_INSTANSEG_UPSCALE {
                let (w, h) = (plan.width as f64 * factor, plan.height as f64 * factor);
                return Err(ctx.invalid(
                    "nucleus_diameter_um",
                    format!(
                        "{} µm is {:.1} px at {} µm/px: InstanSeg would enlarge every field {factor:.1}x to                          {w:.0}x{h:.0} px to give its nuclei the {:.0} px it segments best, a cost that grows                          with the square; at most {MAX_INSTANSEG_UPSCALE}x is allowed (is the diameter or the                          pixel size in the wrong unit?)",
                        s.nucleus_diameter_um,
                        s.nucleus_diameter_um / plan.pixel_size_um,
                        plan.pixel_size_um,
                        m.nucleus_px
                    ),
                ));
            }
        }
        let probability = if method != SegmentMethod::Probability {
            None
        } else {
            if !(s.probability_threshold > 0.0 && s.probability_threshold < 1.0) {
                return Err(ctx.invalid("probability_threshold", "must be within (0, 1)"));
            }
            Some((
                ProbabilityModel::new(ctx, plan, &s.probability_model)?,
                s.probability_threshold,
            ))
        };
        let model = instances.as_ref().map(|m| m.model.descr.root.display().to_string());
        let chosen = match (&instances, &probability) {
            (Some(_), _) => "instanseg",
            (None, Some(_)) => "probability",
            (None, None) => "classical",
        };
        t::SegmentMethodChosen {
            method: chosen,
            model: model.as_deref().unwrap_or(""),
            provider: "",
            reason: None,
        }
        .gauge();
        Ok(Self {
            probability,
            instances,
            instanseg_cells: s.instanseg_cells,
            nucleus_px: s.nucleus_diameter_um / plan.pixel_size_um,
            nuclei_channel,
            cells_channel,
            nuclei,
            cells: CellParams {
                threshold_scale: s.cells_threshold_scale,
                ..CellParams::default()
            },
            exclude_border: s.exclude_border_objects,
            compute: ctx.compute()?,
            method: Arc::from(chosen),
        })
    }
}

/// The most InstanSeg may enlarge a field to give its nuclei the size it segments best: nuclei
/// smaller than a quarter of that (3 px for the shipped model) are a unit slip or beyond what it
/// can see, and the enlarged field's cost grows with the square of the factor (a 2 px nucleus on a
/// 1024² field would make it 6656² px).
const MAX_INSTANSEG_UPSCALE: f64 = 4.0;

/// The InstanSeg model for `auto` and `instanseg`, loaded once per run (every worker shares the
/// session), or `None` with the reason logged once: the classical path runs instead.
fn instance_model(
    s: &SegmentationConfig,
    method: SegmentMethod,
    ctx: &Context,
    plan: &AcquisitionPlan,
) -> Result<Option<Arc<InstanceModel>>, Invalid> {
    let inf = ctx.inference;
    let opts = inf.runtime_options();
    // Without the model's cells the network is cut to its nuclei decoder.
    let cells = s.instanseg_cells == InstansegCells::Model && !s.cells_channel.is_empty();
    let key = format!(
        "segment-method|{method:?}|{:?}|{}|{}|{cells}|{opts:?}",
        s.model, s.seed_threshold, s.instanseg_tile_px
    );
    let tile = liveomics_models::TileOptions {
        tile: s.instanseg_tile_px,
        overlap: inf.tile_overlap_px,
        batch: 1,
    };
    let demand = crate::inference::instances::Demand {
        width: plan.width,
        height: plan.height,
        nucleus_px: s.nucleus_diameter_um / plan.pixel_size_um,
        cells,
        budget: std::time::Duration::from_millis(ctx.budget_ms),
        pace_fields_per_s: ctx.pace_fields_per_s,
    };
    let compute = ctx.compute()?;
    let chosen = ctx.resources.loaded(&key, || {
        crate::inference::instances::choose(
            method == SegmentMethod::Auto,
            &s.model,
            &opts,
            tile,
            s.seed_threshold,
            cells,
            Some((&demand, &compute)),
        )
        .map(|m| m.map(Arc::new))
        .map_err(|e| ctx.invalid("model", t::error_chain(&e)))
    })?;
    Ok(chosen.as_ref().clone())
}

impl StageConfig for SegmentationConfig {
    fn validate(&self, ctx: &Context, problems: &mut Vec<Invalid>) {
        if self.instanseg_tile_px < 64 {
            problems.push(ctx.invalid("instanseg_tile_px", "must be at least 64"));
        }
        if !(self.seed_threshold > 0.0 && self.seed_threshold < 1.0) {
            problems.push(ctx.invalid("seed_threshold", "must be within (0, 1)"));
        }
        match (self.method, self.probability_model.is_empty()) {
            (SegmentMethod::Probability, true) => problems.push(ctx.invalid(
                "probability_model",
                "method = \"probability\" needs the name of an [[inference.models]] entry",
            )),
            (SegmentMethod::Classical | SegmentMethod::Instanseg, false) => problems.push(ctx.invalid(
                "probability_model",
                format!(
                    "is only used by method = \"probability\" (method is {:?})",
                    self.method.as_str()
                ),
            )),
            _ => {}
        }
        if !(self.nucleus_diameter_um.is_finite() && self.nucleus_diameter_um > 0.0) {
            problems.push(ctx.invalid("nucleus_diameter_um", "must be a positive number"));
        }
        if !(self.cells_threshold_scale > 0.0 && self.cells_threshold_scale <= 4.0) {
            problems.push(ctx.invalid("cells_threshold_scale", "must be within (0, 4]"));
        }
        if !(self.camera_offset_adu.is_finite() && (0.0..65535.0).contains(&self.camera_offset_adu)) {
            problems.push(ctx.invalid("camera_offset_adu", "must be within [0, 65535)"));
        }
    }

    fn build(&self, ctx: &Context, plan: &AcquisitionPlan) -> Result<Box<dyn Stage>, Vec<Invalid>> {
        Ok(Box::new(SegmentStage::new(self, ctx, plan).map_err(|e| vec![e])?))
    }
}

impl Stage for SegmentStage {
    fn name(&self) -> StageName {
        StageName::Segment
    }

    fn process(&mut self, work: &mut FieldWork) -> Result<(), StageError> {
        work.segmented_by = Some(self.method.clone());
        let f = &work.field;
        let missing = |c: usize| StageError::MissingChannel(work.plan.channels[c].name.clone());
        let dapi = f.channels[self.nuclei_channel]
            .as_ref()
            .ok_or_else(|| missing(self.nuclei_channel))?;
        if let Some(m) = &self.instances {
            return self.instanseg(m, work);
        }
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

impl SegmentStage {
    /// Nuclei from InstanSeg; with a cytoplasm channel, cells propagated from them or the
    /// model's own (`segmentation.instanseg_cells`).
    fn instanseg(&self, m: &InstanceModel, work: &mut FieldWork) -> Result<(), StageError> {
        let t0 = Instant::now();
        let f = &work.field;
        let plane = |c: usize| {
            f.channels[c]
                .as_deref()
                .ok_or_else(|| StageError::MissingChannel(work.plan.channels[c].name.clone()))
        };
        let mut planes = vec![plane(self.nuclei_channel)?];
        let cyto = self.cells_channel.map(plane).transpose()?;
        let from_model = self.instanseg_cells == InstansegCells::Model && m.has_cells();
        if let (Some(c), true) = (cyto, from_model) {
            planes.push(c);
        }
        let r = m.segment(
            &self.compute,
            &planes,
            f.width,
            f.height,
            m.factor(self.nucleus_px),
            from_model && cyto.is_some(),
        )?;
        let (mut nuclei, mut cells) = (r.nuclei, r.cells);
        if let (Some(c), None) = (cyto, &cells) {
            cells = Some(self.compute.segment_cells(&nuclei, c, f.width, f.height, &self.cells)?);
        }
        if self.exclude_border {
            segment::exclude_border_objects(&mut nuclei, cells.as_deref_mut(), f.width, f.height)?;
        }
        t::ModelRan {
            model: &m.model.descr.name,
            provider: &m.model.provider.label(),
            field: &work.name,
            items: r.count as usize,
            elapsed: t0.elapsed(),
        }
        .emit();
        work.nuclei = Some(nuclei);
        work.cells = cells;
        Ok(())
    }
}

/// Per-cell geometry and intensities over every channel that arrived, on the `compute.device`
/// back end.
#[derive(Debug)]
pub struct MeasureStage {
    compute: Compute,
}

/// The measure stage has no settings of its own: it measures every channel that arrived.
#[derive(Debug, Clone, Copy, Default)]
pub struct MeasureConfig;

impl StageConfig for MeasureConfig {
    fn build(&self, ctx: &Context, _plan: &AcquisitionPlan) -> Result<Box<dyn Stage>, Vec<Invalid>> {
        Ok(Box::new(MeasureStage {
            compute: ctx.compute().map_err(|e| vec![e])?,
        }))
    }
}

impl Stage for MeasureStage {
    fn name(&self) -> StageName {
        StageName::Measure
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
