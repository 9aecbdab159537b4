//! The `[inference]` section: the ONNX models of a run and how they run. A section of its own
//! below every component, because three read it: the inference stage runs the models, the
//! segment stage may take one as its probability model, and closed-loop rules name their
//! outputs.

use std::path::PathBuf;

use liveomics_adapters::Invalid;
use liveomics_models::description::{AxisKind, Description};
use liveomics_models::Role;
use serde::{Deserialize, Serialize};

use crate::field::{virtual_label, VirtualChannel};
use crate::schedule::Class;

/// ONNX models and how they run (the `inference` stage).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    /// Path to libonnxruntime; empty searches ORT_DYLIB_PATH, the repo's .venv, then Python.
    pub ort_library: PathBuf,
    /// Execution providers in order of preference: `tensorrt[:N]`, `cuda[:N]`, `cpu`. The first
    /// that registers runs the model; which one is logged and exported as a metric label.
    pub providers: Vec<String>,
    /// Threads inside one ONNX operator; 0 lets ONNX Runtime use one per core.
    pub intra_threads: usize,
    /// Most cell crops per `session.run` for per-cell models.
    pub max_batch: usize,
    /// Longest a per-cell batch waits for more fields (never past the earliest field's deadline).
    pub max_queue_delay_ms: u64,
    /// Tile side for whole-field models (rounded to a size the model accepts).
    pub tile_px: usize,
    /// Blend width between tiles, beyond the model's halo.
    pub tile_overlap_px: usize,
    /// Tiles per `session.run` of a whole-field model: more amortise the call, fewer keep the
    /// memory of one run small (a GPU's, for large tiles).
    pub tile_batch: usize,
    pub models: Vec<ModelConfig>,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        Self {
            ort_library: PathBuf::new(),
            providers: vec!["cuda".into(), "cpu".into()],
            intra_threads: 0,
            max_batch: 64,
            max_queue_delay_ms: 5,
            tile_px: 512,
            tile_overlap_px: 16,
            tile_batch: 4,
            models: Vec::new(),
        }
    }
}

/// One model the inference stage runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Short name (`^[A-Za-z0-9_-]+$`): metric label and prefix of the model's output columns.
    pub name: String,
    /// The model's folder or its bioimageio.yaml.
    pub path: PathBuf,
    /// `segmentation`, `virtual-stain`, `virtual-stain-diffusion`, `cell-omics`, `well-omics`
    /// or `cell-table`; overrides the
    /// description's `config.liveomics.role` (third-party models have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// Acquisition channels feeding the model's input channels, in order; overrides the
    /// description's `config.liveomics.channels`.
    #[serde(default)]
    pub channels: Vec<String>,
    /// cell-table: the per-cell table columns feeding the model's input, in order: another
    /// model's outputs (`cellomics.G001`), measurements (`area_px`, `mean_DAPI`), or `prefix*`
    /// for every column with that prefix in table order. Overrides the description's
    /// `config.liveomics.columns` (and the names of its input's channel axis).
    #[serde(default)]
    pub columns: Vec<String>,
    /// virtual-stain-diffusion: the proteins sampled for every field, from the description's
    /// `config.liveomics.proteins`. A full proteome cannot run live; choose a panel.
    #[serde(default)]
    pub panel: Vec<String>,
    /// virtual-stain-diffusion: the cell line conditioning the sampler (default: the
    /// description's first that is not `none`).
    #[serde(default)]
    pub cell_line: String,
    /// virtual-stain-diffusion: Euler steps per sample (default: the description's sampler).
    #[serde(default)]
    pub steps: Option<usize>,
    /// virtual-stain-diffusion: most denoiser evaluations (`panel size x steps`) per field; a
    /// configuration above it is refused at startup, because it could not keep up.
    #[serde(default = "default_protein_steps")]
    pub max_protein_steps_per_field: usize,
    /// virtual-stain-diffusion: seed of the sampling noise (combined with the field's key).
    #[serde(default)]
    pub seed: u64,
    /// cell-omics: field pixels per crop pixel. A model trained at another pixel size gets crops
    /// resampled to its scale: its training pixel size over the camera's (e.g. 2.0 for a 0.65 µm
    /// model on 0.325 µm pixels).
    #[serde(default = "default_crop_scale")]
    pub crop_scale: f32,
    /// When the model's work must be done: `required` (always inline), `inline-if-on-time`
    /// (skipped when the field would miss its deadline, then backfilled) or `deferred` (only
    /// backfilled). Default: `inline-if-on-time` for virtual staining, `required` for the rest;
    /// only virtual-staining roles may wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<Class>,
}

fn default_crop_scale() -> f32 {
    1.0
}

fn default_protein_steps() -> usize {
    200
}

impl InferenceConfig {
    /// Checks of values alone, keyed under `[inference]`; model files are checked when a stage
    /// that runs them is built against the plan.
    pub fn validate(&self) -> Vec<Invalid> {
        let mut out = Vec::new();
        if self.providers.is_empty() {
            out.push(Invalid::new("providers", "list at least one provider (e.g. [\"cpu\"])"));
        }
        for (i, p) in self.providers.iter().enumerate() {
            if let Err(e) = liveomics_models::Provider::parse(p) {
                out.push(Invalid::new(&format!("providers[{i}]"), e.to_string()));
            }
        }
        if self.max_batch == 0 || self.max_batch > 4096 {
            out.push(Invalid::new(
                "max_batch",
                format!("must be 1..=4096, got {}", self.max_batch),
            ));
        }
        if self.tile_batch == 0 || self.tile_batch > 256 {
            out.push(Invalid::new(
                "tile_batch",
                format!("must be 1..=256, got {}", self.tile_batch),
            ));
        }
        if self.tile_px < 16 {
            out.push(Invalid::new("tile_px", format!("must be >= 16, got {}", self.tile_px)));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let key = format!("models[{i}]");
            let ok = !m.name.is_empty()
                && m.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !ok {
                out.push(Invalid::new(
                    &format!("{key}.name"),
                    format!("{:?} must match ^[A-Za-z0-9_-]+$", m.name),
                ));
            }
            if !names.insert(m.name.as_str()) {
                out.push(Invalid::new(
                    &format!("{key}.name"),
                    format!("{:?} is used twice", m.name),
                ));
            }
            if m.name == crate::field::OWED_ANALYSIS {
                out.push(Invalid::new(
                    &format!("{key}.name"),
                    format!(
                        "{:?} is reserved: the plate lists a lagged field as owed its {0:?}",
                        m.name
                    ),
                ));
            }
            if !(m.crop_scale.is_finite() && m.crop_scale > 0.0) {
                out.push(Invalid::new(
                    &format!("{key}.crop_scale"),
                    format!("must be a finite number > 0, got {}", m.crop_scale),
                ));
            }
        }
        out
    }

    pub fn runtime_options(&self) -> liveomics_models::RuntimeOptions {
        liveomics_models::RuntimeOptions {
            ort_library: (!self.ort_library.as_os_str().is_empty()).then(|| self.ort_library.clone()),
            providers: self
                .providers
                .iter()
                .filter_map(|p| liveomics_models::Provider::parse(p).ok())
                .collect(),
            intra_threads: self.intra_threads,
        }
    }
}

impl InferenceConfig {
    /// The virtual channels the configured models will produce, in config order. Read from the
    /// descriptions only (no sessions), so the zarr sink can size its images before the first
    /// field.
    pub fn virtual_channels(&self) -> Vec<VirtualChannel> {
        let mut out = Vec::new();
        for m in &self.models {
            let Ok(d) = Description::load(&m.path) else { continue };
            let role = m.role.or(d.liveomics.role);
            let names: Vec<String> = match role {
                Some(Role::VirtualStain) if !d.liveomics.outputs.is_empty() => d.liveomics.outputs.clone(),
                Some(Role::VirtualStain) => d.outputs[0]
                    .axes
                    .iter()
                    .find_map(|a| match &a.kind {
                        AxisKind::Channel { names } => Some(names.clone()),
                        _ => None,
                    })
                    .unwrap_or_default(),
                Some(Role::VirtualStainDiffusion) => m.panel.clone(),
                _ => continue,
            };
            for n in names {
                out.push(VirtualChannel {
                    model: m.name.clone(),
                    label: virtual_label(role.unwrap_or(Role::VirtualStain), &n),
                    output: n,
                });
            }
        }
        out
    }
}
