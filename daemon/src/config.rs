//! Configuration: typed TOML with every section `deny_unknown_fields`, units in key names, and a
//! loader that collects *all* problems with their key paths instead of stopping at the first.
//!
//! Loading has three passes: TOML syntax (one error, with line and column), shape (unknown keys,
//! wrong types: each bad key is recorded and removed, then decoding is retried so the next one is
//! found too), and meaning (ranges, cross-references, the registry's kinds; see `validate`).

use std::fmt;
use std::path::PathBuf;

use liveomics_adapters::folder::{FolderConfig, Speed};
use liveomics_adapters::simulator::SimulatorConfig;
use liveomics_adapters::Invalid;

use crate::zenoh_session::ZenohConfig;
use crate::zenoh_source::ZenohSourceConfig;
use serde::{Deserialize, Serialize};

/// The default configuration, embedded so that `liveomics run` works with no file at all.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The instrument's name: the second chunk of every zenoh key this daemon publishes.
    pub instrument: String,
    /// Time from a field's first frame to all sinks done; later is counted as a deadline miss.
    pub latency_budget_ms: u64,
    pub source: SourceConfig,
    pub pipeline: PipelineConfig,
    pub segmentation: SegmentationConfig,
    /// Where the image kernels (segmentation) run.
    pub compute: ComputeConfig,
    pub inference: InferenceConfig,
    pub sinks: SinksConfig,
    /// Rules that send the microscope back (the `followup` sink; needs a zenoh connection).
    pub closed_loop: crate::sink::followup::ClosedLoopConfig,
    /// The one zenoh session the zenoh source and sinks share: endpoints and security.
    pub zenoh: ZenohConfig,
    pub telemetry: TelemetryConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            instrument: "scope1".into(),
            latency_budget_ms: 2000,
            source: SourceConfig::default(),
            pipeline: PipelineConfig::default(),
            segmentation: SegmentationConfig::default(),
            compute: ComputeConfig::default(),
            inference: InferenceConfig::default(),
            sinks: SinksConfig::default(),
            closed_loop: Default::default(),
            zenoh: ZenohConfig::default(),
            telemetry: TelemetryConfig::default(),
        }
    }
}

/// The image kernels' back end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ComputeConfig {
    /// `auto` (CUDA device 0 when a driver and device exist, else the CPU, with the reason
    /// logged), `cpu`, or `cuda:N` (that device or a startup error). Models choose their own
    /// execution providers (`inference.models[].providers`).
    pub device: String,
}

impl Default for ComputeConfig {
    fn default() -> Self {
        Self { device: "auto".into() }
    }
}

/// Which source runs (`kind`, a name from the registry) and each kind's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    pub kind: String,
    pub simulator: SimulatorConfig,
    pub folder: FolderConfig,
    pub replay: ReplayConfig,
    pub zenoh: ZenohSourceConfig,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            kind: "simulator".into(),
            simulator: SimulatorConfig::default(),
            folder: FolderConfig::default(),
            replay: ReplayConfig::default(),
            zenoh: ZenohSourceConfig::default(),
        }
    }
}

/// Replay of an OME-Zarr plate written by liveomics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplayConfig {
    /// The `{plate}.zarr` directory.
    pub path: PathBuf,
    pub speed: Speed,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            speed: Speed::Max,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Processing stages in order, by registered name.
    pub stages: Vec<String>,
    /// Frames buffered between the source and assembly; when full, the source waits.
    pub frame_queue: usize,
    /// Fields buffered between each pair of stages and in front of each sink.
    pub field_queue: usize,
    /// Threads running the stages, one field each (each also uses the shared rayon pool).
    pub workers: usize,
    /// How long assembly waits for a field's missing channels before passing it on incomplete.
    pub assembly_timeout_ms: u64,
    /// Memory assembly may hold in frames of fields still waiting for channels; beyond it the
    /// oldest field goes on incomplete, so that a sender that never completes its fields cannot
    /// fill memory. An acquisition that sends channel by channel (all positions in one channel,
    /// then the next) holds a whole channel's frames and needs it (and the timeout) raised.
    pub max_pending_mb: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            stages: vec!["segment".into(), "measure".into()],
            frame_queue: 32,
            field_queue: 4,
            workers: 1,
            assembly_timeout_ms: 10_000,
            max_pending_mb: 2048,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentationConfig {
    /// Channel (by name) holding the nuclear stain.
    pub nuclei_channel: String,
    /// Channel (by name) the cell bodies are propagated over; empty for nuclei only.
    pub cells_channel: String,
    /// Expected nucleus diameter; every pixel parameter is derived from it and the pixel size.
    pub nucleus_diameter_um: f64,
    /// Automatic threshold of the nuclear channel: `otsu`, or `triangle` for sparse or dim nuclei.
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
            nuclei_channel: "DAPI".into(),
            cells_channel: "ER".into(),
            nucleus_diameter_um: 11.0,
            nuclei_threshold: NucleiThreshold::Otsu,
            probability_model: String::new(),
            probability_threshold: 0.5,
            cells_threshold_scale: 0.3,
            illumination_correction: false,
            camera_offset_adu: 100.0,
            exclude_border_objects: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[derive(Default)]
pub struct SinksConfig {
    pub zarr: ZarrSinkConfig,
    pub zenoh: ZenohSinkConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    None,
    Zstd,
    BloscZstd,
    BloscLz4,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ZarrSinkConfig {
    pub enabled: bool,
    /// Directory that holds `{plate}.zarr`; relative paths are relative to the working directory.
    pub output: PathBuf,
    pub compression: Compression,
    /// zstd: 1..=22; blosc: 0..=9.
    pub compression_level: i32,
    /// Byte shuffle before blosc (helps 16-bit camera data a lot).
    pub shuffle: bool,
    /// Chunk edge in pixels for y and x (the subchunk edge when sharding).
    pub chunk_px: u64,
    /// One shard per plane (frame): few files per field, each written by one call.
    pub shard: bool,
    /// Resolution levels including full resolution; each next level is 2x smaller.
    pub pyramid_levels: u32,
    /// Write the per-cell AnnData table of each field.
    pub tables: bool,
    /// Flush a field's files to the disk before listing it, so a power loss cannot leave a listed
    /// field with missing data.
    pub fsync: bool,
}

impl Default for ZarrSinkConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            output: PathBuf::from("out"),
            compression: Compression::BloscZstd,
            compression_level: 1,
            shuffle: true,
            chunk_px: 512,
            shard: true,
            pyramid_levels: 3,
            tables: true,
            fsync: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ZenohSinkConfig {
    pub enabled: bool,
}

impl Default for ZenohSinkConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// The session keys `[sinks.zenoh]` and `[source.zenoh]` had before the daemon opened one
/// session for both; an old config is told where they went instead of hearing "unknown field".
const MOVED_TO_ZENOH: &[&str] = &["mode", "connect", "listen", "multicast_scouting"];

fn moved_key_message(path: &[String], message: &str) -> Option<String> {
    let [section, zenoh, key] = path else { return None };
    let old_section = (section == "sinks" || section == "source") && zenoh == "zenoh";
    (old_section && message.starts_with("unknown field") && MOVED_TO_ZENOH.contains(&key.as_str()))
        .then(|| format!("moved to zenoh.{key}: the daemon opens one zenoh session for its source and sinks"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NucleiThreshold {
    Otsu,
    Triangle,
}

impl From<NucleiThreshold> for liveomics_kernels::segment::ThresholdMethod {
    fn from(t: NucleiThreshold) -> Self {
        match t {
            NucleiThreshold::Otsu => Self::Otsu,
            NucleiThreshold::Triangle => Self::Triangle,
        }
    }
}

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
    /// `segmentation`, `virtual-stain`, `virtual-stain-diffusion`, `cell-omics` or
    /// `well-omics`; overrides the
    /// description's `config.liveomics.role` (third-party models have none).
    #[serde(default)]
    pub role: String,
    /// Acquisition channels feeding the model's input channels, in order; overrides the
    /// description's `config.liveomics.channels`.
    #[serde(default)]
    pub channels: Vec<String>,
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
}

fn default_crop_scale() -> f32 {
    1.0
}

fn default_protein_steps() -> usize {
    200
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Address of the Prometheus endpoint (`/metrics`); port 0 picks a free port (logged); empty
    /// disables it. Localhost by default: metrics are not for the whole network.
    pub metrics_listen: String,
    pub log_format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `liveomics=debug`; `RUST_LOG` overrides it.
    pub log_level: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            metrics_listen: "127.0.0.1:9464".into(),
            log_format: LogFormat::Text,
            log_level: "info".into(),
        }
    }
}

/// Every problem found in a configuration. Displayed one per line, `key.path: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    pub origin: String,
    pub errors: Vec<Invalid>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}: {} error(s)", self.origin, self.errors.len())?;
        for e in &self.errors {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Shape errors removed per load before giving up: a file with more is not a config.
const MAX_SHAPE_ERRORS: usize = 100;

impl Config {
    /// Parses and checks shape only; `validate` checks meaning.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigErrors> {
        match Self::parse(text) {
            (Some(cfg), errors) if errors.is_empty() => Ok(cfg),
            (_, errors) => Err(ConfigErrors {
                origin: origin.to_string(),
                errors,
            }),
        }
    }

    /// The shape errors, and the config that is left once every bad value is taken out
    /// (defaults in its place), so that `load` can check its meaning in the same report. `None`
    /// when nothing usable is left (a syntax error, too many errors, array elements taken out).
    fn parse(text: &str) -> (Option<Self>, Vec<Invalid>) {
        let fail = |errors| (None, errors);
        let mut value: toml::Value = match toml::from_str::<toml::Table>(text) {
            Ok(t) => toml::Value::Table(t),
            Err(e) => {
                let at = e
                    .span()
                    .map(|s| {
                        let line = text[..s.start].matches('\n').count() + 1;
                        let col = s.start - text[..s.start].rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
                        format!("line {line} column {col}")
                    })
                    .unwrap_or_default();
                return fail(vec![Invalid::new(&at, format!("TOML syntax: {}", e.message()))]);
            }
        };
        let mut errors = Vec::new();
        // Array elements taken out so far, by the array's path, as indices of the file: later
        // errors are reported with the file's indices, not the shortened array's.
        let mut removed: std::collections::HashMap<String, Vec<usize>> = std::collections::HashMap::new();
        loop {
            match serde_path_to_error::deserialize::<_, Config>(value.clone()) {
                // With array elements taken out, meaning errors would name the shifted indices.
                Ok(cfg) => return (removed.is_empty().then_some(cfg), errors),
                Err(e) => {
                    let segments: Vec<String> = e
                        .path()
                        .iter()
                        .map(|s| match s {
                            serde_path_to_error::Segment::Seq { index } => format!("[{index}]"),
                            other => other.to_string(),
                        })
                        .collect();
                    let message = e.inner().to_string();
                    // Make sure an unknown key's path ends with the key itself, whichever way the
                    // deserializer reported it.
                    let mut path = segments;
                    if let Some(unknown) = message
                        .strip_prefix("unknown field `")
                        .and_then(|r| r.split('`').next())
                    {
                        if path.last().map(String::as_str) != Some(unknown) {
                            path.push(unknown.to_string());
                        }
                    }
                    // The path as the file numbers it.
                    let mut original = path.clone();
                    for (i, seg) in path.iter().enumerate() {
                        let Some(cur) = seg_index(seg) else { continue };
                        let mut at = cur;
                        if let Some(gone) = removed.get(&join_path(&original[..i])) {
                            for &g in gone {
                                if g <= at {
                                    at += 1;
                                }
                            }
                        }
                        original[i] = format!("[{at}]");
                    }
                    let text = moved_key_message(&original, &message).unwrap_or_else(|| first_line(&message));
                    errors.push(Invalid::new(&join_path(&original), text));
                    // An error inside an array element takes the whole element out: taking out
                    // only the bad key would make a required one "missing" in the next pass.
                    let cut = match path.iter().rposition(|s| seg_index(s).is_some()) {
                        Some(i) => {
                            let gone = removed.entry(join_path(&original[..i])).or_default();
                            if let Some(at) = seg_index(&original[i]) {
                                gone.push(at);
                                gone.sort_unstable();
                            }
                            &path[..=i]
                        }
                        None => &path[..],
                    };
                    if !remove_path(&mut value, cut) || errors.len() >= MAX_SHAPE_ERRORS {
                        return fail(errors);
                    }
                }
            }
        }
    }

    /// Loads a file, or the embedded default when `path` is `None`; shape and meaning both checked
    /// (with resources of its own: a run passes its own to [`Config::load_for_run`]).
    pub fn load(path: Option<&std::path::Path>) -> Result<Self, ConfigErrors> {
        Self::load_for_run(path, &crate::resources::Resources::default())
    }

    /// [`Config::load`] whose meaning checks build the stages into `res`, the resources the run
    /// will use: models load once per process.
    pub fn load_for_run(
        path: Option<&std::path::Path>,
        res: &crate::resources::Resources,
    ) -> Result<Self, ConfigErrors> {
        let (text, origin) = match path {
            None => (DEFAULT_TOML.to_string(), "embedded default config".to_string()),
            Some(p) => {
                let origin = p.display().to_string();
                match std::fs::read_to_string(p) {
                    Ok(t) => (t, origin),
                    Err(e) => {
                        let what = if e.kind() == std::io::ErrorKind::InvalidData {
                            format!("cannot read it as UTF-8 text: {e}")
                        } else {
                            format!("cannot read it: {e}")
                        };
                        return Err(ConfigErrors {
                            origin,
                            errors: vec![Invalid::new("(file)", what)],
                        });
                    }
                }
            }
        };
        // Shape and meaning in one report: the meaning of what is left after the shape errors
        // (a value of the wrong type does not hide an out-of-range one elsewhere). A section that
        // lost a value has a default in its place, so its meaning is not judged; and the plan,
        // stages and models feed every cross-check, so a shape error in `source`, `pipeline` or
        // `inference` leaves meaning for the next run.
        let (cfg, mut errors) = Self::parse(&text);
        let section = |key: &str| key.split(['.', '[']).next().unwrap_or("").to_string();
        let damaged: std::collections::BTreeSet<String> = errors.iter().map(|e| section(&e.key)).collect();
        let cross = ["source", "pipeline", "inference"].iter().any(|s| damaged.contains(*s));
        match cfg.filter(|_| !cross) {
            Some(cfg) => {
                errors.extend(
                    crate::registry::validate(&cfg, res)
                        .into_iter()
                        .filter(|e| !damaged.contains(&section(&e.key))),
                );
                if errors.is_empty() {
                    Ok(cfg)
                } else {
                    Err(ConfigErrors { origin, errors })
                }
            }
            None => Err(ConfigErrors { origin, errors }),
        }
    }

    /// Range checks that need no registry; the registry adds kind/stage/sink checks.
    pub fn validate_values(&self) -> Vec<Invalid> {
        let mut out = Vec::new();
        if liveomics_adapters::model::Name::new(&self.instrument).is_err() {
            out.push(Invalid::new(
                "instrument",
                format!(
                    "{:?} must match ^[A-Za-z0-9]+$ (it is a zenoh key chunk)",
                    self.instrument
                ),
            ));
        }
        if self.latency_budget_ms == 0 {
            out.push(Invalid::new("latency_budget_ms", "must be > 0"));
        }
        let p = &self.pipeline;
        for (key, v, max) in [
            ("pipeline.frame_queue", p.frame_queue, 100_000),
            ("pipeline.field_queue", p.field_queue, 10_000),
            ("pipeline.workers", p.workers, 256),
        ] {
            if v == 0 || v > max {
                out.push(Invalid::new(key, format!("must be 1..={max}, got {v}")));
            }
        }
        if p.assembly_timeout_ms == 0 {
            out.push(Invalid::new("pipeline.assembly_timeout_ms", "must be > 0"));
        }
        if p.max_pending_mb == 0 {
            out.push(Invalid::new("pipeline.max_pending_mb", "must be > 0"));
        }
        if let Err(e) = self.compute.device.parse::<liveomics_kernels::gpu::DeviceRequest>() {
            out.push(Invalid::new("compute.device", e.to_string()));
        }
        out.extend(self.inference.validate_values());
        let s = &self.segmentation;
        if !(s.nucleus_diameter_um.is_finite() && s.nucleus_diameter_um > 0.0) {
            out.push(Invalid::new(
                "segmentation.nucleus_diameter_um",
                "must be a positive number",
            ));
        }
        if !(s.cells_threshold_scale > 0.0 && s.cells_threshold_scale <= 4.0) {
            out.push(Invalid::new(
                "segmentation.cells_threshold_scale",
                "must be within (0, 4]",
            ));
        }
        if !(s.camera_offset_adu.is_finite() && (0.0..65535.0).contains(&s.camera_offset_adu)) {
            out.push(Invalid::new(
                "segmentation.camera_offset_adu",
                "must be within [0, 65535)",
            ));
        }
        let z = &self.sinks.zarr;
        let levels = match z.compression {
            Compression::Zstd => Some(1..=22),
            Compression::BloscZstd | Compression::BloscLz4 => Some(0..=9),
            Compression::None => None,
        };
        if let Some(r) = levels {
            if !r.contains(&z.compression_level) {
                out.push(Invalid::new(
                    "sinks.zarr.compression_level",
                    format!(
                        "must be {}..={} for {:?}, got {}",
                        r.start(),
                        r.end(),
                        z.compression,
                        z.compression_level
                    ),
                ));
            }
        }
        if !(1..=8).contains(&z.pyramid_levels) {
            out.push(Invalid::new(
                "sinks.zarr.pyramid_levels",
                format!("must be 1..=8, got {}", z.pyramid_levels),
            ));
        }
        if !(16..=8192).contains(&z.chunk_px) {
            out.push(Invalid::new(
                "sinks.zarr.chunk_px",
                format!("must be 16..=8192, got {}", z.chunk_px),
            ));
        }
        if z.enabled && z.output.as_os_str().is_empty() {
            out.push(Invalid::new("sinks.zarr.output", "must not be empty"));
        }
        out.extend(self.zenoh.validate());
        let t = &self.telemetry;
        if !t.metrics_listen.is_empty() && t.metrics_listen.parse::<std::net::SocketAddr>().is_err() {
            out.push(Invalid::new(
                "telemetry.metrics_listen",
                format!(
                    "{:?} is not an address like 127.0.0.1:9464 (empty disables)",
                    t.metrics_listen
                ),
            ));
        }
        // A bare word that is not a level parses as a filter for a target of that name, which
        // silences everything else: "loud" would turn logging off. Each directive must be a
        // level or `target=level`.
        const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
        let bare_word = t.log_level.split(',').map(str::trim).find(|d| {
            !d.is_empty() && !d.contains('=') && !d.contains('[') && !LEVELS.contains(&d.to_ascii_lowercase().as_str())
        });
        if tracing_subscriber::EnvFilter::try_new(&t.log_level).is_err() || bare_word.is_some() {
            out.push(Invalid::new(
                "telemetry.log_level",
                format!(
                    "{:?} is not a log filter: use a level (trace, debug, info, warn, error, off), \
                     optionally with target=level directives, e.g. \"info,liveomics=debug\"",
                    t.log_level
                ),
            ));
        }
        match self.source.kind.as_str() {
            "simulator" => out.extend(
                self.source
                    .simulator
                    .validate()
                    .into_iter()
                    .map(|i| i.under("source.simulator")),
            ),
            "folder" => out.extend(
                self.source
                    .folder
                    .validate()
                    .into_iter()
                    .map(|i| i.under("source.folder")),
            ),
            "zenoh" => out.extend(
                self.source
                    .zenoh
                    .validate()
                    .into_iter()
                    .map(|i| i.under("source.zenoh")),
            ),
            "replay" if self.source.replay.path.as_os_str().is_empty() => {
                out.push(Invalid::new("source.replay.path", "the plate to replay is required"))
            }
            _ => {}
        }
        out
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_string()
}

fn join_path(segments: &[String]) -> String {
    let mut out = String::new();
    for s in segments {
        if !out.is_empty() && !s.starts_with('[') {
            out.push('.');
        }
        out.push_str(s);
    }
    out
}

/// The index of a `[i]` path segment.
fn seg_index(seg: &str) -> Option<usize> {
    seg.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// Removes the value at `path` so decoding can continue past it; false if nothing was removed.
fn remove_path(value: &mut toml::Value, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut cur = value;
    for seg in parents {
        cur = match (cur, seg.strip_prefix('[').and_then(|s| s.strip_suffix(']'))) {
            (toml::Value::Array(a), Some(i)) => match i.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                Some(v) => v,
                None => return false,
            },
            (toml::Value::Table(t), None) => match t.get_mut(seg) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match (cur, last.strip_prefix('[').and_then(|s| s.strip_suffix(']'))) {
        (toml::Value::Array(a), Some(i)) => match i.parse::<usize>() {
            Ok(i) if i < a.len() => {
                a.remove(i);
                true
            }
            _ => false,
        },
        (toml::Value::Table(t), None) => t.remove(last).is_some(),
        _ => false,
    }
}

impl InferenceConfig {
    /// Checks of values alone; model files are checked when the stage is built against the plan.
    pub fn validate_values(&self) -> Vec<Invalid> {
        let mut out = Vec::new();
        if self.providers.is_empty() {
            out.push(Invalid::new(
                "inference.providers",
                "list at least one provider (e.g. [\"cpu\"])",
            ));
        }
        for (i, p) in self.providers.iter().enumerate() {
            if let Err(e) = liveomics_models::Provider::parse(p) {
                out.push(Invalid::new(&format!("inference.providers[{i}]"), e.to_string()));
            }
        }
        if self.max_batch == 0 || self.max_batch > 4096 {
            out.push(Invalid::new(
                "inference.max_batch",
                format!("must be 1..=4096, got {}", self.max_batch),
            ));
        }
        if self.tile_batch == 0 || self.tile_batch > 256 {
            out.push(Invalid::new(
                "inference.tile_batch",
                format!("must be 1..=256, got {}", self.tile_batch),
            ));
        }
        if self.tile_px < 16 {
            out.push(Invalid::new(
                "inference.tile_px",
                format!("must be >= 16, got {}", self.tile_px),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let key = format!("inference.models[{i}]");
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
            if !m.role.is_empty() && crate::inference::parse_role(&m.role).is_none() {
                out.push(Invalid::new(
                    &format!("{key}.role"),
                    format!(
                        "unknown role {:?}; known: segmentation, virtual-stain, virtual-stain-diffusion, cell-omics, well-omics",
                        m.role
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let cfg = Config::load(None).unwrap();
        assert_eq!(cfg.source.kind, "simulator");
    }

    #[test]
    fn three_mistakes_three_errors_with_paths() {
        let text = r#"
            latency_budget_ms = "soon"
            [pipeline]
            workerz = 2
            [sinks.zarr]
            compression = "lz77"
        "#;
        let err = Config::from_toml(text, "t.toml").unwrap_err();
        let keys: Vec<&str> = err.errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys.len(), 3, "{err}");
        for k in ["latency_budget_ms", "pipeline.workerz", "sinks.zarr.compression"] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn meaning_errors_are_all_reported() {
        let text = r#"
            instrument = "scope/1"
            latency_budget_ms = 0
            [source.simulator]
            [segmentation]
            nuclei_channel = "Hoechst"
            [compute]
            device = "gpu0"
            [telemetry]
            log_level = "loud"
            [pipeline]
            max_pending_mb = 0
            [[inference.models]]
            name = "cells"
            path = "models/cell_omics_cnn"
            crop_scale = 0.0
        "#;
        let cfg = Config::from_toml(text, "t.toml").unwrap();
        let errs = cfg.inference.validate_values();
        assert!(
            errs.iter().any(|e| e.key == "inference.models[0].crop_scale"),
            "{errs:?}"
        );
        let errs = crate::registry::validate(&cfg, &crate::resources::Resources::default());
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        for k in [
            "instrument",
            "latency_budget_ms",
            "segmentation.nuclei_channel",
            "compute.device",
            "telemetry.log_level",
            "pipeline.max_pending_mb",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn errors_in_array_elements_keep_the_files_indices_and_invent_nothing() {
        let text = r#"
            [[inference.models]]
            name = 5
            path = "a"
            [[inference.models]]
            name = "ok"
            path = "b"
            [[inference.models]]
            name = "c"
            path = "c"
            colour = "red"
        "#;
        let err = Config::from_toml(text, "t.toml").unwrap_err();
        let keys: Vec<&str> = err.errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            ["inference.models[0].name", "inference.models[2].colour"],
            "{err}"
        );
        assert!(!err.to_string().contains("missing field"), "{err}");
    }

    #[test]
    fn load_reports_shape_and_meaning_together_without_judging_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            r#"
            [segmentation]
            nuclei_threshold = "median"
            [sinks.zarr]
            compression = "ztsd"
            compression_level = 15
            [telemetry]
            log_level = "loud"
        "#,
        )
        .unwrap();
        let err = Config::load(Some(&path)).unwrap_err();
        let keys: Vec<&str> = err.errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "segmentation.nuclei_threshold",
                "sinks.zarr.compression",
                "telemetry.log_level"
            ],
            "{err}"
        );
    }

    #[test]
    fn syntax_errors_give_a_line() {
        let err = Config::from_toml("a = [\n", "t.toml").unwrap_err();
        assert_eq!(err.errors.len(), 1);
        assert!(err.errors[0].key.starts_with("line "), "{err}");
    }
}
