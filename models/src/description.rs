//! bioimage.io model descriptions, format 0.5, as far as liveomics runs them: ONNX weights,
//! tensor axes, pre/postprocessing, test tensors, and the `config.liveomics` section. Anything the
//! runtime does not implement is an error naming the field, never silently ignored: a model that
//! runs with a step skipped gives wrong numbers that look right.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::error::ModelError;
use crate::process::Proc;

/// What a model is for in the daemon; decides what it is fed and where its outputs go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Whole-field model whose output is a foreground (or boundary) probability map.
    Segmentation,
    /// Whole-field model whose output is an embedding that `config.liveomics.instanseg`'s
    /// post-processing turns into nuclei and cells; run by the segment stage.
    InstanceSegmentation,
    /// Whole-field model: landmark channels in, protein images out.
    VirtualStain,
    /// ProtiCelli's inference shape: encoder, EDM denoiser and decoder components, sampled one
    /// protein at a time (`diffusion.rs`).
    VirtualStainDiffusion,
    /// Per-cell crops in, one value per gene or protein out.
    CellOmics,
    /// Field features in, pooled per well.
    WellOmics,
    /// Named columns of the per-cell table in (other models' outputs, measurements), new
    /// columns out: a model that reads other models, run after them on every field.
    CellTable,
}

impl Role {
    pub const ALL: [Role; 7] = [
        Self::Segmentation,
        Self::InstanceSegmentation,
        Self::VirtualStain,
        Self::VirtualStainDiffusion,
        Self::CellOmics,
        Self::WellOmics,
        Self::CellTable,
    ];

    /// The name a configuration and a model description spell it with.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Segmentation => "segmentation",
            Self::InstanceSegmentation => "instance-segmentation",
            Self::VirtualStain => "virtual-stain",
            Self::VirtualStainDiffusion => "virtual-stain-diffusion",
            Self::CellOmics => "cell-omics",
            Self::WellOmics => "well-omics",
            Self::CellTable => "cell-table",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `config.liveomics` section of a description.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveomicsConfig {
    pub role: Option<Role>,
    /// Acquisition channel feeding each model input channel, in order.
    #[serde(default)]
    pub channels: Vec<String>,
    /// Names of the output channels or features (genes, proteins).
    #[serde(default)]
    pub outputs: Vec<String>,
    /// Per-cell table columns feeding a cell-table model's input, in order (`cellomics.G001`,
    /// `area_px`, or `cellomics.*` for every column with that prefix).
    #[serde(default)]
    pub columns: Vec<String>,
    /// Crop side in pixels for per-cell models.
    pub crop_size: Option<usize>,
    /// Protein label vocabulary of a diffusion model, in the order of its label ids.
    #[serde(default)]
    pub proteins: Vec<String>,
    /// Cell-line vocabulary of a diffusion model, in the order of its cell-line ids.
    #[serde(default)]
    pub cell_lines: Vec<String>,
    /// Image pixels per latent pixel of a diffusion model's encoder.
    pub downsample: Option<usize>,
    /// EDM sampling schedule of a diffusion model.
    pub sampler: Option<SamplerConfig>,
    /// Further ONNX networks of a multi-part model (`encoder`/`decoder`, `head`).
    #[serde(default)]
    pub components: BTreeMap<String, ComponentRef>,
    /// How a well-omics model pools tile features per well.
    pub pooling: Option<Pooling>,
    /// The post-processing of an instance-segmentation model (InstanSeg).
    pub instanseg: Option<crate::instanseg::InstansegConfig>,
}

/// The EDM schedule (Karras et al. 2022) a diffusion model was trained for.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplerConfig {
    pub sigma_max: f64,
    pub sigma_min: f64,
    pub rho: f64,
    pub steps: usize,
    pub sigma_data: f64,
}

/// Tile-feature pooling of a well-omics model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pooling {
    Mean,
    Max,
    /// Mean and max concatenated (the head takes twice the features).
    MeanMax,
}

/// An extra ONNX network of a model, checked like the main weights.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentRef {
    pub source: String,
    pub sha256: Option<String>,
    /// Test tensors (npy, relative to the description) that `models check` reproduces.
    pub test_input: Option<String>,
    pub test_output: Option<String>,
    /// Per-channel normalisation applied to the input (`(x - mean) / std`).
    #[serde(default)]
    pub mean: Vec<f32>,
    #[serde(default)]
    pub std: Vec<f32>,
    /// Factor applied to the output.
    pub gain: Option<f32>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AxisKind {
    Batch,
    Channel { names: Vec<String> },
    Index,
    Space,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AxisSize {
    /// Batch axis without a fixed size, or an output axis whose size the data decides.
    Any,
    Fixed(usize),
    /// `min + n * step` for any n >= 0.
    Parameterized {
        min: usize,
        step: usize,
    },
    /// Same as another tensor's axis, plus an offset.
    Reference {
        tensor: String,
        axis: String,
        offset: i64,
    },
}

impl AxisSize {
    /// Smallest valid size >= `want` (None when the size is fixed below `want`... or any size).
    pub fn fit(&self, want: usize) -> Option<usize> {
        match *self {
            AxisSize::Any => Some(want),
            AxisSize::Fixed(n) => (n >= want).then_some(n),
            AxisSize::Parameterized { min, step } => {
                if want <= min || step == 0 {
                    Some(min)
                } else {
                    Some(min + (want - min).div_ceil(step) * step)
                }
            }
            AxisSize::Reference { .. } => None,
        }
    }

    pub fn accepts(&self, n: usize) -> bool {
        match *self {
            AxisSize::Any => true,
            AxisSize::Fixed(m) => n == m,
            AxisSize::Parameterized { min, step } => {
                n >= min && (step == 0 && n == min || step > 0 && (n - min).is_multiple_of(step))
            }
            AxisSize::Reference { .. } => true,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub id: String,
    pub kind: AxisKind,
    pub size: AxisSize,
    /// Pixels at each border of an output that the model cannot compute correctly.
    pub halo: usize,
    /// Physical unit of a space axis; an output's must equal the unit of the axis it refers to.
    pub unit: Option<String>,
    /// Physical size of one step along the axis (1 when not given); an output that refers to an
    /// input axis has the input's scale, or bioimage.io would read it as resampled.
    pub scale: f64,
}

#[derive(Debug, Clone)]
pub struct TensorDescr {
    pub id: String,
    pub axes: Vec<Axis>,
    pub test_tensor: Option<PathBuf>,
    pub processing: Vec<Proc>,
}

impl TensorDescr {
    pub fn axis(&self, id: &str) -> Option<usize> {
        self.axes.iter().position(|a| a.id == id)
    }

    /// Indices of the space axes, in order (usually y then x).
    pub fn space_axes(&self) -> Vec<usize> {
        (0..self.axes.len())
            .filter(|&i| self.axes[i].kind == AxisKind::Space)
            .collect()
    }

    pub fn batch_axis(&self) -> Option<usize> {
        self.axes.iter().position(|a| a.kind == AxisKind::Batch)
    }

    pub fn halo(&self) -> usize {
        self.axes.iter().map(|a| a.halo).max().unwrap_or(0)
    }
}

#[derive(Debug, Clone)]
pub struct Description {
    pub name: String,
    /// The folder the description lives in; relative sources resolve against it.
    pub root: PathBuf,
    pub inputs: Vec<TensorDescr>,
    pub outputs: Vec<TensorDescr>,
    pub weights: PathBuf,
    pub weights_sha256: Option<String>,
    pub liveomics: LiveomicsConfig,
    /// How far outputs may be from the test tensors (`config.bioimageio.reproducibility_tolerance`).
    pub tolerance: Option<f32>,
}

#[derive(Deserialize)]
struct RawDescription {
    name: String,
    format_version: String,
    #[serde(rename = "type")]
    kind: String,
    inputs: Vec<RawTensor>,
    outputs: Vec<RawTensor>,
    weights: BTreeMap<String, Value>,
    #[serde(default)]
    config: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
struct RawTensor {
    id: String,
    axes: Vec<Value>,
    test_tensor: Option<FileRef>,
    #[serde(default)]
    preprocessing: Vec<RawProc>,
    #[serde(default)]
    postprocessing: Vec<RawProc>,
}

#[derive(Deserialize)]
struct FileRef {
    source: String,
    sha256: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct RawProc {
    pub id: String,
    #[serde(default)]
    pub kwargs: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OnnxWeights {
    source: String,
    sha256: Option<String>,
    #[serde(default)]
    opset_version: Option<u32>,
    #[serde(default)]
    parent: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    authors: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    comment: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    external_data: Option<Value>,
}

/// Finds the description in a folder (or takes the file itself).
pub fn description_path(path: &Path) -> PathBuf {
    if path.is_dir() {
        for name in ["bioimageio.yaml", "rdf.yaml"] {
            let p = path.join(name);
            if p.exists() {
                return p;
            }
        }
        return path.join("bioimageio.yaml");
    }
    path.to_path_buf()
}

impl Description {
    /// Reads and checks a description. `path` is the YAML file or the folder holding it.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        const OUTSIDE: &str = "must be a relative path inside the model folder";
        let file = description_path(path);
        let model = file.display().to_string();
        let text = std::fs::read_to_string(&file).map_err(|source| ModelError::Io {
            path: file.clone(),
            source,
        })?;
        let err = |key: &str, message: String| ModelError::Description {
            model: model.clone(),
            key: key.to_string(),
            message,
        };
        // A file that is not YAML at all (a .toml, a binary) makes serde quote all of it: cut.
        let raw: RawDescription = serde_yaml_ng::from_str(&text).map_err(|e| {
            let m = e.to_string();
            let m = if m.chars().count() > 300 {
                format!(
                    "{}… (is this a bioimageio.yaml?)",
                    m.chars().take(300).collect::<String>()
                )
            } else {
                m
            };
            err("(document)", m)
        })?;
        if raw.kind != "model" {
            return Err(err(
                "type",
                format!("is {:?}; only \"model\" descriptions run", raw.kind),
            ));
        }
        if !raw.format_version.starts_with("0.5") {
            return Err(err(
                "format_version",
                format!(
                    "is {:?}; liveomics reads format 0.5 (convert with bioimageio.spec's update_format)",
                    raw.format_version
                ),
            ));
        }
        let root = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let onnx = match raw.weights.get("onnx") {
            Some(v) => {
                serde_yaml_ng::from_value::<OnnxWeights>(v.clone()).map_err(|e| err("weights.onnx", e.to_string()))?
            }
            None => {
                let have: Vec<&str> = raw.weights.keys().map(String::as_str).collect();
                return Err(err(
                    "weights.onnx",
                    format!(
                        "missing; this model has {} weights, and liveomics runs ONNX only (export with torch.onnx.export)",
                        have.join(", ")
                    ),
                ));
            }
        };
        // bioimage.io: `parent` names the weights these were converted from, and those must be
        // in the description too (a conversion's origin outside the package goes in `comment`).
        if let Some(p) = onnx.parent.as_deref().filter(|p| !raw.weights.contains_key(*p)) {
            let have: Vec<&str> = raw.weights.keys().map(String::as_str).collect();
            return Err(err(
                "weights.onnx.parent",
                format!(
                    "is {p:?}, which is not among this description's weights ({}); name the source in `comment` instead",
                    have.join(", ")
                ),
            ));
        }
        if let Some(op) = onnx.opset_version {
            if op > 23 {
                return Err(err(
                    "weights.onnx.opset_version",
                    format!("{op} is newer than ONNX Runtime 1.31 implements (<= 23)"),
                ));
            }
        }
        let liveomics = match raw.config.get("liveomics") {
            Some(v) => serde_yaml_ng::from_value::<LiveomicsConfig>(v.clone())
                .map_err(|e| err("config.liveomics", e.to_string()))?,
            None => LiveomicsConfig::default(),
        };
        // bioimage.io 0.5's `config.bioimageio.reproducibility_tolerance`: the largest of its
        // absolute tolerances (a converted model declares how far it may be from its original).
        let tolerance = raw
            .config
            .get("bioimageio")
            .and_then(|b| b.get("reproducibility_tolerance"))
            .and_then(Value::as_sequence)
            .map(|entries| {
                entries
                    .iter()
                    .filter_map(|e| e.get("absolute_tolerance").and_then(Value::as_f64))
                    .fold(0.0f64, f64::max) as f32
            });
        let tensors = |list: Vec<RawTensor>, what: &str, output: bool| -> Result<Vec<TensorDescr>, ModelError> {
            list.into_iter()
                .enumerate()
                .map(|(i, t)| {
                    let key = format!("{what}[{i}]");
                    let axes = t
                        .axes
                        .iter()
                        .enumerate()
                        .map(|(j, a)| parse_axis(a, output).map_err(|m| err(&format!("{key}.axes[{j}]"), m)))
                        .collect::<Result<Vec<_>, _>>()?;
                    let mut ids: Vec<&str> = axes.iter().map(|a| a.id.as_str()).collect();
                    ids.sort_unstable();
                    if ids.windows(2).any(|w| w[0] == w[1]) {
                        return Err(err(&format!("{key}.axes"), "two axes have the same id".into()));
                    }
                    let procs = if output { &t.postprocessing } else { &t.preprocessing };
                    let stage = if output { "postprocessing" } else { "preprocessing" };
                    let processing = procs
                        .iter()
                        .enumerate()
                        .map(|(j, p)| Proc::parse(p, &axes, output).map_err(|m| err(&format!("{key}.{stage}[{j}]"), m)))
                        .collect::<Result<Vec<_>, _>>()?;
                    if let Some(f) = &t.test_tensor {
                        if !inside_package(&f.source) {
                            return Err(err(&format!("{key}.test_tensor.source"), OUTSIDE.into()));
                        }
                    }
                    let test_tensor = t.test_tensor.map(|f| (root.join(&f.source), f.sha256));
                    if let Some((p, Some(sum))) = &test_tensor {
                        verify_sha256(&model, p, sum)?;
                    }
                    Ok(TensorDescr {
                        id: t.id,
                        axes,
                        test_tensor: test_tensor.map(|(p, _)| p),
                        processing,
                    })
                })
                .collect()
        };
        let inputs = tensors(raw.inputs, "inputs", false)?;
        let outputs = tensors(raw.outputs, "outputs", true)?;
        if inputs.is_empty() || outputs.is_empty() {
            return Err(err("inputs/outputs", "a model needs at least one of each".into()));
        }
        for (i, o) in outputs.iter().enumerate() {
            for (j, a) in o.axes.iter().enumerate() {
                if let AxisSize::Reference { tensor, axis, offset } = &a.size {
                    let key = format!("outputs[{i}].axes[{j}]");
                    let r = inputs
                        .iter()
                        .chain(outputs.iter())
                        .find(|t| &t.id == tensor)
                        .and_then(|t| t.axis(axis).map(|k| &t.axes[k]))
                        .ok_or_else(|| {
                            err(
                                &format!("{key}.size"),
                                format!("refers to {tensor}.{axis}, which no tensor has"),
                            )
                        })?;
                    check_reference(a, r, *offset).map_err(|(k, m)| err(&format!("{key}.{k}"), m))?;
                }
            }
        }
        // The names in config.liveomics must fit the tensors they name, for the roles whose
        // main weights take the landmarks and give the named outputs (a diffusion denoiser takes
        // latents, a well encoder gives features: their components are checked where they load).
        if liveomics.role == Some(Role::CellTable) {
            let kinds: Vec<&AxisKind> = inputs[0].axes.iter().map(|a| &a.kind).collect();
            if !matches!(
                kinds.as_slice(),
                [AxisKind::Batch, AxisKind::Channel { .. } | AxisKind::Index]
            ) {
                return Err(err(
                    "inputs[0].axes",
                    "a cell-table model takes (batch, channel): one vector of columns per cell".into(),
                ));
            }
        }
        if matches!(
            liveomics.role,
            Some(Role::Segmentation | Role::VirtualStain | Role::CellOmics | Role::CellTable)
        ) {
            // The axis the names count (channel, or index for a vector of values), found by kind.
            let fixed = |t: &TensorDescr| {
                t.axes
                    .iter()
                    .find(|a| matches!(a.kind, AxisKind::Channel { .. } | AxisKind::Index))
                    .and_then(|a| match a.size {
                        AxisSize::Fixed(n) => Some(n),
                        _ => None,
                    })
            };
            if let Some(n) = fixed(&inputs[0]) {
                if !liveomics.columns.is_empty()
                    && !liveomics.columns.iter().any(|c| c.ends_with('*'))
                    && liveomics.columns.len() != n
                {
                    return Err(err(
                        "config.liveomics.columns",
                        format!("names {} columns; the input has {n}", liveomics.columns.len()),
                    ));
                }
                if !liveomics.channels.is_empty() && liveomics.channels.len() != n {
                    return Err(err(
                        "config.liveomics.channels",
                        format!("names {} channels; the input has {n}", liveomics.channels.len()),
                    ));
                }
            }
            if let Some(n) = fixed(&outputs[0]) {
                if !liveomics.outputs.is_empty() && liveomics.outputs.len() != n {
                    return Err(err(
                        "config.liveomics.outputs",
                        format!("names {} outputs; the output has {n}", liveomics.outputs.len()),
                    ));
                }
            }
            let space = inputs[0].axes.iter().filter(|a| a.kind == AxisKind::Space);
            for n in space.filter_map(|a| match a.size {
                AxisSize::Fixed(n) => Some(n),
                _ => None,
            }) {
                if let Some(c) = liveomics.crop_size.filter(|c| *c != n) {
                    return Err(err(
                        "config.liveomics.crop_size",
                        format!("crop_size {c} does not fit the input's {n}-pixel crops"),
                    ));
                }
            }
        }
        if liveomics.role == Some(Role::InstanceSegmentation) {
            let section = liveomics.instanseg.as_ref().ok_or_else(|| {
                err(
                    "config.liveomics.instanseg",
                    "missing; an instance-segmentation model needs its post-processing settings".into(),
                )
            })?;
            section
                .check()
                .map_err(|(k, m)| err(&format!("config.liveomics.instanseg.{k}"), m))?;
            if let Some(t) = &section.test_labels {
                if !inside_package(&t.source) {
                    return Err(err("config.liveomics.instanseg.test_labels", OUTSIDE.into()));
                }
            }
        }
        for (name, c) in &liveomics.components {
            let key = format!("config.liveomics.components.{name}");
            let sources = [Some(&c.source), c.test_input.as_ref(), c.test_output.as_ref()];
            if !sources.into_iter().flatten().all(|s| inside_package(s)) {
                return Err(err(&key, OUTSIDE.into()));
            }
            let path = root.join(&c.source);
            if !path.exists() {
                return Err(err(&format!("{key}.source"), format!("{} is missing", path.display())));
            }
            if c.mean.len() != c.std.len() || c.std.iter().any(|s| !(*s > 0.0)) {
                return Err(err(&key, "mean and std need the same length and std > 0".into()));
            }
            for t in [&c.test_input, &c.test_output].into_iter().flatten() {
                if !root.join(t).exists() {
                    return Err(err(&key, format!("test tensor {t} is missing")));
                }
            }
        }
        if let Some(s) = &liveomics.sampler {
            let ok = s.sigma_max > s.sigma_min && s.sigma_min > 0.0 && s.rho > 0.0 && s.steps > 0 && s.sigma_data > 0.0;
            if !ok {
                return Err(err(
                    "config.liveomics.sampler",
                    "needs sigma_max > sigma_min > 0, rho > 0, steps > 0, sigma_data > 0".into(),
                ));
            }
        }
        if !inside_package(&onnx.source) {
            return Err(err("weights.onnx.source", OUTSIDE.into()));
        }
        let weights = root.join(&onnx.source);
        if !weights.exists() {
            return Err(err("weights.onnx.source", format!("{} is missing", weights.display())));
        }
        Ok(Self {
            name: raw.name,
            root,
            inputs,
            outputs,
            weights,
            weights_sha256: onnx.sha256,
            liveomics,
            tolerance,
        })
    }

    /// Checks the weights file against its sha256 (reads it once; about 10 ms per 10 MB).
    /// Keeps the first `n` channels of output `i` (after a graph edit dropped the others).
    pub fn truncate_output_channels(&mut self, i: usize, n: usize) {
        for a in &mut self.outputs[i].axes {
            if let AxisKind::Channel { names } = &mut a.kind {
                names.truncate(n);
                if let AxisSize::Fixed(size) = &mut a.size {
                    *size = (*size).min(n);
                }
            }
        }
    }

    /// The channel names of output `i` (empty when it has no channel axis).
    pub fn output_channels(&self, i: usize) -> Vec<String> {
        self.outputs[i]
            .axes
            .iter()
            .find_map(|a| match &a.kind {
                AxisKind::Channel { names } => Some(names.clone()),
                _ => None,
            })
            .unwrap_or_default()
    }

    pub fn verify_weights(&self) -> Result<(), ModelError> {
        match &self.weights_sha256 {
            Some(sum) => verify_sha256(&self.name, &self.weights, sum),
            None => Ok(()),
        }
    }

    /// [`Description::verify_weights`] on the weights' bytes, read once by the caller.
    pub fn verify_weights_bytes(&self, bytes: &[u8]) -> Result<(), ModelError> {
        match &self.weights_sha256 {
            Some(sum) => verify_sha256_of(&self.name, &self.weights, bytes, sum),
            None => Ok(()),
        }
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn verify_sha256(model: &str, path: &Path, expected: &str) -> Result<(), ModelError> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    verify_sha256_of(model, path, &bytes, expected)
}

/// [`verify_sha256`] on bytes already read from `path`.
pub(crate) fn verify_sha256_of(model: &str, path: &Path, bytes: &[u8], expected: &str) -> Result<(), ModelError> {
    let actual = sha256_hex(bytes);
    if !actual.eq_ignore_ascii_case(expected) {
        return Err(ModelError::Checksum {
            model: model.to_string(),
            path: path.to_path_buf(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}

/// The rules bioimage.io's own validator applies to an output axis whose size refers to `r`:
/// the same unit, the same scale (a different one means a resampled output, which liveomics does
/// not run), and a halo that leaves at least one valid pixel at the smallest size. Without them a
/// description passes here and fails in every other bioimage.io tool.
fn check_reference(a: &Axis, r: &Axis, offset: i64) -> Result<(), (&'static str, String)> {
    if a.kind == AxisKind::Space && a.unit != r.unit {
        let name = |u: &Option<String>| u.clone().unwrap_or_else(|| "none".into());
        return Err((
            "unit",
            format!(
                "is {}, the unit of {} it refers to is {}: they must match",
                name(&a.unit),
                r.id,
                name(&r.unit)
            ),
        ));
    }
    if a.kind == AxisKind::Space && (a.scale - r.scale).abs() > 1e-9 {
        return Err((
            "scale",
            format!(
                "is {}, {} it refers to has {}: resampling outputs is not supported",
                a.scale, r.id, r.scale
            ),
        ));
    }
    if a.halo > 0 {
        let smallest = match r.size {
            AxisSize::Fixed(n) => Some(n as i64),
            AxisSize::Parameterized { min, .. } => Some(min as i64),
            _ => None,
        };
        if let Some(n) = smallest.map(|n| n + offset) {
            if n - 2 * (a.halo as i64) < 1 {
                return Err((
                    "halo",
                    format!(
                        "{} leaves no valid pixel at the smallest size {n} of {}: raise its size.min above {}",
                        a.halo,
                        r.id,
                        2 * a.halo
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn as_usize(v: &Value, what: &str) -> Result<usize, String> {
    v.as_u64()
        .map(|n| n as usize)
        .ok_or_else(|| format!("{what} must be a non-negative integer, got {v:?}"))
}

fn parse_axis(v: &Value, output: bool) -> Result<Axis, String> {
    let map = v.as_mapping().ok_or("an axis must be a mapping")?;
    let get = |k: &str| map.get(Value::String(k.into()));
    let kind_name = get("type").and_then(Value::as_str).ok_or("axis has no `type`")?;
    let default_id = match kind_name {
        "batch" => "batch",
        "channel" => "channel",
        "index" => "index",
        "space" => "x",
        "time" => return Err("time axes are not supported (liveomics runs per field, not per time series)".into()),
        other => return Err(format!("unknown axis type {other:?}")),
    };
    let id = get("id").and_then(Value::as_str).unwrap_or(default_id).to_string();
    let kind = match kind_name {
        "batch" => AxisKind::Batch,
        "channel" => {
            let names = get("channel_names")
                .and_then(Value::as_sequence)
                .ok_or("channel axis needs channel_names")?
                .iter()
                .map(|n| n.as_str().map(str::to_string).ok_or("channel names must be strings"))
                .collect::<Result<Vec<_>, _>>()?;
            AxisKind::Channel { names }
        }
        "index" => AxisKind::Index,
        _ => AxisKind::Space,
    };
    if let Some(unit) = get("unit").and_then(Value::as_str) {
        if kind == AxisKind::Space && !matches!(unit, "micrometer" | "pixel" | "nanometer") {
            return Err(format!("space unit {unit:?} is not supported"));
        }
    }
    let size = match (&kind, get("size")) {
        (AxisKind::Channel { names }, None) => AxisSize::Fixed(names.len()),
        (AxisKind::Batch, None) => AxisSize::Any,
        (_, Some(s)) if s.is_u64() => AxisSize::Fixed(as_usize(s, "size")?),
        (_, Some(Value::Mapping(m))) => {
            let f = |k: &str| m.get(Value::String(k.into()));
            if let (Some(min), Some(step)) = (f("min"), f("step")) {
                AxisSize::Parameterized {
                    min: as_usize(min, "size.min")?,
                    step: as_usize(step, "size.step")?,
                }
            } else if let (Some(t), Some(a)) = (f("tensor_id"), f("axis_id")) {
                AxisSize::Reference {
                    tensor: t.as_str().ok_or("size.tensor_id must be a string")?.into(),
                    axis: a.as_str().ok_or("size.axis_id must be a string")?.into(),
                    offset: f("offset").and_then(Value::as_i64).unwrap_or(0),
                }
            } else if output && f("max").is_some() {
                AxisSize::Any
            } else {
                return Err("size must be an integer, {min, step} or {tensor_id, axis_id[, offset]}".into());
            }
        }
        (AxisKind::Index, None) if output => AxisSize::Any,
        (_, None) => return Err("axis has no size".into()),
        (_, Some(other)) => return Err(format!("size {other:?} is not understood")),
    };
    let halo = match get("halo") {
        Some(h) if output => as_usize(h, "halo")?,
        Some(_) => return Err("halo is only allowed on output axes".into()),
        None => 0,
    };
    let unit = get("unit").and_then(Value::as_str).map(str::to_string);
    let scale = get("scale").and_then(Value::as_f64).unwrap_or(1.0);
    // An output whose size refers to an input axis is checked against that axis in `load`.
    let referenced = matches!(size, AxisSize::Reference { .. });
    if (scale - 1.0).abs() > 1e-9 && kind == AxisKind::Space && output && !referenced {
        return Err(format!("output scale {scale} (resampling outputs) is not supported"));
    }
    Ok(Axis {
        id,
        kind,
        size,
        halo,
        unit,
        scale,
    })
}

/// Whether a file named by a description stays inside its package: a downloaded description
/// must not make us read (and hash, and load) files elsewhere on the machine.
fn inside_package(source: &str) -> bool {
    let p = Path::new(source);
    !source.is_empty()
        && p.components()
            .all(|c| matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_fit_and_accept() {
        let p = AxisSize::Parameterized { min: 64, step: 16 };
        assert_eq!(p.fit(10), Some(64));
        assert_eq!(p.fit(65), Some(80));
        assert!(p.accepts(96) && !p.accepts(70) && !p.accepts(48));
        assert_eq!(AxisSize::Fixed(512).fit(600), None);
    }

    #[test]
    fn files_outside_the_package_are_refused() {
        for ok in ["weights.onnx", "./weights.onnx", "sub/test.npy"] {
            assert!(inside_package(ok), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../other/weights.onnx", "sub/../../x.npy"] {
            assert!(!inside_package(bad), "{bad}");
        }
    }
}
