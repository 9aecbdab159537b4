//! The data model of a field on its way from assembly to the sinks: what the stages add to it
//! (labels, per-cell records and model outputs, model images, well readouts) and the names its
//! outputs go by. Every stage and sink reads these types, and this module reads none of theirs.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use liveomics_adapters::model::{AcquisitionPlan, Field};
use liveomics_models::{Role, Tensor};

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
    /// Per-cell measures computed after the measure stage (localization profiles,
    /// `loc.{protein}.{feature}`), aligned with `records`.
    pub cell_measures: Vec<(String, Vec<f32>)>,
    /// Whole-field model outputs.
    pub images: Vec<ModelImage>,
    /// Models that failed on this field: their predictions are missing, not zero.
    pub failed_models: Vec<String>,
    /// Well-omics readouts of this field's well, updated with this field.
    pub well_readouts: Vec<WellReadout>,
    /// Relocalization scores of this field's well, one per protein, updated with this field.
    pub localization: Vec<WellShift>,
    /// Models skipped inline to keep the deadline (a degraded field): owed, and backfilled
    /// later into the same field.
    pub owed: Vec<String>,
    /// `Some(models)` when this is not a new field but the backfill of an already written one:
    /// it carries the raw planes and those models' outputs only, and sinks add them to the field.
    pub backfill: Option<Vec<String>>,
    /// The analysis of a field whose raw planes the plate already holds (it lagged): sinks
    /// treat it as a new field, except that the plate store leaves the raw planes as they are.
    pub raw_stored: bool,
    /// When the field's required work ended (its stages, less skipped or optional models).
    pub required_done_at: Option<Instant>,
    /// When the field left its worker for the sinks.
    pub stages_done_at: Option<Instant>,
    /// `plate/well/fN/tN`, for logs.
    pub name: String,
    /// The segmentation method that made the labels (`instanseg`, `classical`, `probability`),
    /// written with them: `auto` decides per run, so a resumed plate may hold both.
    pub segmented_by: Option<Arc<str>>,
    /// The per-cell table, built from the records and predictions the first time a sink asks
    /// ([`FieldWork::table`]), once the stages are done with the field.
    table: OnceLock<CellTable>,
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
            cell_measures: Vec::new(),
            images: Vec::new(),
            failed_models: Vec::new(),
            well_readouts: Vec::new(),
            localization: Vec::new(),
            owed: Vec::new(),
            backfill: None,
            raw_stored: false,
            required_done_at: None,
            stages_done_at: None,
            name,
            segmented_by: None,
            table: OnceLock::new(),
        }
    }

    /// A field acquired while every worker was busy (`pipeline.when_behind = "lag"`): only its
    /// raw planes, to be written to the plate at once and analysed from there later.
    pub fn lagged(field: Field, plan: Arc<AcquisitionPlan>, deadline: Instant) -> Self {
        let mut work = Self::new(field, plan, deadline);
        work.owed = vec![OWED_ANALYSIS.to_string()];
        work
    }

    /// Whether this is a lagged field's raw planes, owed all its analysis.
    pub fn is_lagged(&self) -> bool {
        self.owed.iter().any(|m| m == OWED_ANALYSIS)
    }

    /// The field's per-cell table: what the Arrow records, the AnnData table, the label
    /// properties, the closed-loop metrics and the jsonl means are all read from. Built once,
    /// on first use, from the field as the stages left it (sinks hold it shared and unchanged).
    pub fn table(&self) -> &CellTable {
        self.table.get_or_init(|| CellTable::of(self))
    }
}

/// What a per-cell column is, for the outputs that treat them differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// The cell's id in both label images.
    Label,
    /// Where the cell is: centroid and bounding box, in pixels.
    Position,
    /// A value measured or predicted per cell (areas, channel means, model outputs): what
    /// closed-loop rules and means are computed over.
    Measure,
}

/// One column's values, one per cell.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    U32(Vec<u32>),
    F32(Vec<f32>),
}

impl Values {
    pub fn f64(&self) -> Vec<f64> {
        match self {
            Values::U32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Values::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub kind: ColumnKind,
    pub values: Values,
}

/// The per-cell columns of a field, in the one order every output lists them: `label`,
/// `centroid_x_px`, `centroid_y_px`, `area_px`, `nucleus_area_px`, the bounding box, `mean_{channel}`
/// for each plan channel, each per-cell model output (`{model}.{output}`), then the later
/// measures (`loc.{protein}.{feature}`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CellTable {
    pub rows: usize,
    pub columns: Vec<Column>,
}

/// The owed entry (`liveomics.owed`, the backlog) of a field whose whole analysis is owed: it
/// lagged behind the acquisition, and only its raw planes are in the plate.
pub const OWED_ANALYSIS: &str = "analysis";

/// Per-cell measures every field has, besides channel means and model outputs.
pub const GEOMETRY_MEASURES: [&str; 2] = ["area_px", "nucleus_area_px"];

impl CellTable {
    pub fn of(work: &FieldWork) -> Self {
        let r = &work.records;
        let mut columns = Vec::new();
        let u32col = |name: &str, kind, f: fn(&CellRecord) -> u32| Column {
            name: name.to_string(),
            kind,
            values: Values::U32(r.iter().map(f).collect()),
        };
        let label = u32col("label", ColumnKind::Label, |c| c.label);
        let area = u32col("area_px", ColumnKind::Measure, |c| c.area_px);
        let nucleus = u32col("nucleus_area_px", ColumnKind::Measure, |c| c.nucleus_area_px);
        let bbox = [
            u32col("bbox_min_x", ColumnKind::Position, |c| c.bbox_min_x),
            u32col("bbox_min_y", ColumnKind::Position, |c| c.bbox_min_y),
            u32col("bbox_max_x", ColumnKind::Position, |c| c.bbox_max_x),
            u32col("bbox_max_y", ColumnKind::Position, |c| c.bbox_max_y),
        ];
        let f32col = |name: String, kind, values: Vec<f32>| Column {
            name,
            kind,
            values: Values::F32(values),
        };
        columns.push(label);
        columns.push(f32col(
            "centroid_x_px".into(),
            ColumnKind::Position,
            r.iter().map(|c| c.centroid_x_px).collect(),
        ));
        columns.push(f32col(
            "centroid_y_px".into(),
            ColumnKind::Position,
            r.iter().map(|c| c.centroid_y_px).collect(),
        ));
        columns.push(area);
        columns.push(nucleus);
        columns.extend(bbox);
        for (i, ch) in work.plan.channels.iter().enumerate() {
            let values = r
                .iter()
                .map(|c| c.mean_intensity.get(i).copied().unwrap_or(f32::NAN))
                .collect();
            columns.push(f32col(mean_column(&ch.name), ColumnKind::Measure, values));
        }
        for (name, values) in work.cell_predictions.iter().chain(&work.cell_measures) {
            columns.push(f32col(name.clone(), ColumnKind::Measure, values.clone()));
        }
        Self { rows: r.len(), columns }
    }

    pub fn get(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// The values of column `name` as numbers, or `None` when the field has no such column.
    pub fn f64(&self, name: &str) -> Option<Vec<f64>> {
        self.get(name).map(|c| c.values.f64())
    }
}

/// Finds a channel by name (case-insensitive, as users type them).
pub fn channel_index(plan: &AcquisitionPlan, name: &str) -> Option<usize> {
    plan.channels.iter().position(|c| c.name.eq_ignore_ascii_case(name))
}

/// Column of a per-cell model output in the cell tables: `{model}.{output}`, with anything but
/// letters, digits, `_` and `-` in the output name replaced by `_` (it becomes a zarr node name).
pub fn prediction_column(model: &str, output: &str) -> String {
    format!("{model}.{}", node_safe(output))
}

/// Stable 64-bit FNV-1a of a byte sequence: seeds keyed by names (a field's sampling noise, a
/// well's null draws) must not change with the Rust version or the order work finishes in.
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `name` with anything but letters, digits, `_` and `-` replaced by `_`: a part of a column
/// name that becomes a zarr node name.
pub fn node_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// An image a whole-field model produced: `[K, H, W]`, one plane per output channel.
#[derive(Debug, Clone)]
pub struct ModelImage {
    pub model: String,
    pub role: Role,
    pub channels: Vec<String>,
    pub data: Tensor,
}

/// The readout of a well-omics model for one well, after the fields seen so far.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WellReadout {
    pub model: String,
    pub plate: String,
    pub well: String,
    /// Fields pooled so far.
    pub fields: usize,
    pub tiles: usize,
    /// Output names (genes), aligned with `values` and `spread`.
    pub outputs: Vec<String>,
    /// The head on the features pooled over every tile of every field so far.
    pub values: Vec<f32>,
    /// Standard deviation across fields of the per-field readouts (0 with one field): how much
    /// the readout still depends on which fields were imaged.
    pub spread: Vec<f32>,
    /// Each pooled field's share, by field: stored with the well, so that a daemon that takes
    /// the well over (a cluster's handoff) pools the fields another one did. Not published.
    #[serde(skip)]
    pub pool: Vec<FieldPool>,
}

/// One field's share of a well-omics pool. Kept per field, the pool of a well whose fields were
/// done by several daemons is their union, summed in field order whoever did which.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FieldPool {
    pub field: u32,
    pub timepoint: u32,
    pub tiles: usize,
    pub sum: Vec<f64>,
    pub max: Vec<f32>,
    /// The head on this field alone (for the spread across fields).
    pub values: Vec<f32>,
}

/// A well's relocalization score for one protein after the fields seen so far: its localization
/// profile against the control wells', with a null drawn from the control fields
/// (`daemon/src/localize/shift.rs`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WellShift {
    /// The profiled channel: its name, or `{protein}_virtual` / `{protein}_diffusion` for a
    /// model's output.
    pub protein: String,
    pub well: String,
    /// Fields of the well and of the controls it was compared with.
    pub fields: usize,
    pub control_fields: usize,
    /// Names of the profile's features, aligned with `profile` and `control`.
    pub features: Vec<String>,
    /// The well's profile (mean of its fields' mean cell profiles) and the controls'.
    pub profile: Vec<f32>,
    pub control: Vec<f32>,
    /// Squared distance of the two, each feature scaled by its cell-to-cell sd in the controls.
    pub distance: f64,
    /// `(distance − null mean) / null sd`: the closed-loop metric `loc.{protein}.shift`.
    pub shift: f64,
    /// Share of the null (pseudo-wells of control fields) at least as far from the controls.
    pub p: f64,
    /// `shift` at or above `localization.shift_threshold` and `p` at most `localization.alpha`.
    pub relocalized: bool,
}

impl WellShift {
    /// Whether this score supersedes `other` (of the same well and protein): more of the well's
    /// fields, or as many against more control fields. Workers finish out of order, so sinks
    /// keep the newest by this and not by arrival.
    pub fn supersedes(&self, other: &WellShift) -> bool {
        (self.fields, self.control_fields) >= (other.fields, other.control_fields)
    }
}

/// Per-cell column of a localization feature: `loc.{protein}.{feature}`.
pub fn localization_column(protein: &str, feature: &str) -> String {
    format!("loc.{protein}.{feature}")
}

/// Label of a virtual channel in the OME-Zarr image: direct models give `TOMM20 (virtual)`,
/// diffusion models `TOMM20 (virtual diffusion)` (sampled, not a regression).
pub fn virtual_label(role: Role, protein: &str) -> String {
    match role {
        Role::VirtualStainDiffusion => format!("{protein} (virtual diffusion)"),
        _ => format!("{protein} (virtual)"),
    }
}

/// Whether an OME-Zarr channel label is one of ours for a model output (replay skips those:
/// they were computed, not acquired).
pub fn is_virtual_label(label: &str) -> bool {
    label.ends_with(" (virtual)") || label.ends_with(" (virtual diffusion)")
}

/// A virtual channel the zarr sink adds after the acquired ones.
#[derive(Debug, Clone, PartialEq)]
pub struct VirtualChannel {
    pub model: String,
    pub output: String,
    pub label: String,
}

/// Column name for a channel's mean intensity: `mean_` + the channel name, lower-cased, with
/// anything but letters and digits replaced by `_`.
pub fn mean_column(channel: &str) -> String {
    let clean: String = channel
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("mean_{clean}")
}
