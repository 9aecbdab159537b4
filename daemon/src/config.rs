//! Configuration: the composition of the components' own sections (each typed, in its
//! component's module, `deny_unknown_fields`, units in key names), and a loader that collects
//! *all* problems with their key paths instead of stopping at the first.
//!
//! Loading has three passes: TOML syntax (one error, with line and column), shape (unknown keys,
//! wrong types: each bad key is recorded and removed, then decoding is retried so the next one is
//! found too; key paths come from the nesting), and meaning, which is the registry's
//! (`registry::load`: each component checks its section, then the stages are built against the
//! plan).

use std::fmt;

use liveomics_adapters::folder::FolderConfig;
use liveomics_adapters::simulator::SimulatorConfig;
use liveomics_adapters::Invalid;
use liveomics_kernels::gpu::DeviceRequest;
use serde::{Deserialize, Serialize};

use crate::cluster::ClusterConfig;
use crate::component::{SourceName, StageName};
use crate::inference::config::InferenceConfig;
use crate::localize::LocalizationConfig;
use crate::replay::ReplayConfig;
use crate::sink::followup::ClosedLoopConfig;
use crate::sink::SinksConfig;
use crate::stage::SegmentationConfig;
use crate::telemetry::TelemetryConfig;
use crate::zenoh_session::ZenohConfig;
use crate::zenoh_source::ZenohSourceConfig;

/// The default configuration, embedded so that `liveomics run` works with no file at all.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The instrument's name: the second chunk of every zenoh key this daemon publishes.
    pub instrument: String,
    /// Time from a field's first frame to all sinks done; later is counted as a deadline miss.
    pub latency_budget_ms: u64,
    pub source: SourceSection,
    pub pipeline: PipelineConfig,
    pub segmentation: SegmentationConfig,
    /// Where the image kernels (segmentation) run.
    pub compute: ComputeConfig,
    pub inference: InferenceConfig,
    /// Per-cell localization profiles and per-well relocalization scores (the `localize` stage).
    pub localization: LocalizationConfig,
    pub sinks: SinksConfig,
    /// Rules that send the microscope back (the `followup` sink; needs a zenoh connection).
    pub closed_loop: ClosedLoopConfig,
    /// The one zenoh session the zenoh source and sinks share: endpoints and security.
    pub zenoh: ZenohConfig,
    /// Several daemons sharing one plate (`docs/SCALING.md`).
    pub cluster: ClusterConfig,
    pub telemetry: TelemetryConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            instrument: "scope1".into(),
            latency_budget_ms: 2000,
            source: SourceSection::default(),
            pipeline: PipelineConfig::default(),
            segmentation: SegmentationConfig::default(),
            compute: ComputeConfig::default(),
            inference: InferenceConfig::default(),
            localization: LocalizationConfig::default(),
            sinks: SinksConfig::default(),
            closed_loop: Default::default(),
            zenoh: ZenohConfig::default(),
            cluster: ClusterConfig::default(),
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
    #[serde(with = "crate::component::as_text")]
    pub device: DeviceRequest,
}

impl Default for ComputeConfig {
    fn default() -> Self {
        Self {
            device: DeviceRequest::Auto,
        }
    }
}

/// Which source runs (`kind`, a name from the registry) and each kind's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceSection {
    pub kind: SourceName,
    pub simulator: SimulatorConfig,
    pub folder: FolderConfig,
    pub replay: ReplayConfig,
    pub zenoh: ZenohSourceConfig,
}

impl Default for SourceSection {
    fn default() -> Self {
        Self {
            kind: SourceName::Simulator,
            simulator: SimulatorConfig::default(),
            folder: FolderConfig::default(),
            replay: ReplayConfig::default(),
            zenoh: ZenohSourceConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Processing stages in order, by registered name.
    pub stages: Vec<StageName>,
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
    /// How long every worker must have been idle, with no field waiting, before owed work
    /// (skipped inline to keep deadlines) is backfilled during the acquisition; one field at a
    /// time then. Whatever is still owed is backfilled at the end of the plate.
    pub backfill_after_idle_ms: u64,
    /// After the first SIGINT/SIGTERM, how long the fields in flight may take to drain before the
    /// daemon exits anyway (130): a field inside a long kernel must not keep an operator's Ctrl-C
    /// waiting for minutes. The plate is crash-safe, so what was cut is unlisted and redone on
    /// resume.
    pub stop_grace_ms: u64,
    /// What a paced acquisition does when the workers fall behind it (the queue in front of
    /// them is full): `lag` writes the field's raw planes to the plate at once and owes its
    /// analysis, done from the plate when workers are free, so the microscope never waits for
    /// analysis; `hold` keeps backpressure on the source, for experiments that need every
    /// decision before the microscope moves on.
    pub when_behind: WhenBehind,
}

/// `pipeline.when_behind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenBehind {
    Lag,
    Hold,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            stages: vec![StageName::Segment, StageName::Measure],
            frame_queue: 32,
            field_queue: 4,
            workers: 1,
            assembly_timeout_ms: 10_000,
            max_pending_mb: 2048,
            backfill_after_idle_ms: 1000,
            stop_grace_ms: 30_000,
            when_behind: WhenBehind::Lag,
        }
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

    /// Reads a file, or the embedded default when `path` is `None`, and checks its shape: the
    /// config that is left once every bad value is taken out (see `parse`), the shape errors,
    /// and the origin to report them under. Meaning is checked by `registry::load`.
    pub fn read(path: Option<&std::path::Path>) -> (Option<Self>, Vec<Invalid>, String) {
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
                        return (None, vec![Invalid::new("(file)", what)], origin);
                    }
                }
            }
        };
        let (mut cfg, errors) = Self::parse(&text);
        if let (Some(cfg), Some(dir)) = (cfg.as_mut(), path.and_then(std::path::Path::parent)) {
            cfg.resolve_inputs(dir);
        }
        (cfg, errors, origin)
    }

    /// Relative paths of the inputs a config ships with (models, the ONNX Runtime library, the
    /// zenoh config file) resolve against the config file's folder, so that `liveomics run
    /// --config /repo/config/models.toml` works from any directory. A path that is not beside the
    /// file is left as it was: relative to the working directory (configs written before this
    /// rule), and for the segmentation model also the repository of the binary (`find_model`).
    /// Outputs and instrument folders stay relative to the working directory.
    pub fn resolve_inputs(&mut self, dir: &std::path::Path) {
        let resolve = |p: &mut std::path::PathBuf| {
            if p.as_os_str().is_empty() || p.is_absolute() {
                return;
            }
            let beside = dir.join(&*p);
            if beside.exists() {
                *p = beside;
            }
        };
        resolve(&mut self.segmentation.model);
        resolve(&mut self.inference.ort_library);
        resolve(&mut self.zenoh.config_file);
        for m in &mut self.inference.models {
            resolve(&mut m.path);
        }
    }

    /// Checks of the keys this module owns (the top level and `[pipeline]`); each component
    /// checks its own section.
    pub fn validate_own(&self) -> Vec<Invalid> {
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
        out.extend(self.pipeline.validate().into_iter().map(|e| e.under("pipeline")));
        out.extend(self.cluster.validate());
        if self.cluster.enabled {
            // Members share frames through zenoh and the plate through its store.
            if self.source.kind != SourceName::Zenoh {
                out.push(Invalid::new(
                    "cluster.enabled",
                    format!(
                        "needs source.kind = \"zenoh\" (the members share its frames), not {:?}",
                        self.source.kind.as_str()
                    ),
                ));
            }
            if !self.sinks.zarr.enabled {
                out.push(Invalid::new(
                    "cluster.enabled",
                    "needs sinks.zarr (the members share the plate store)",
                ));
            }
            if self.pipeline.stages.contains(&crate::component::StageName::Localize) {
                out.push(Invalid::new(
                    "cluster.enabled",
                    "the localize stage scores wells against a pool of control fields each daemon keeps for itself; it cannot run in a cluster yet",
                ));
            }
        }
        out
    }
}

impl PipelineConfig {
    fn validate(&self) -> Vec<Invalid> {
        let mut out = Vec::new();
        for (key, v, max) in [
            ("frame_queue", self.frame_queue, 100_000),
            ("field_queue", self.field_queue, 10_000),
            ("workers", self.workers, 256),
        ] {
            if v == 0 || v > max {
                out.push(Invalid::new(key, format!("must be 1..={max}, got {v}")));
            }
        }
        if self.assembly_timeout_ms == 0 {
            out.push(Invalid::new("assembly_timeout_ms", "must be > 0"));
        }
        if self.max_pending_mb == 0 {
            out.push(Invalid::new("max_pending_mb", "must be > 0"));
        }
        if self.backfill_after_idle_ms > 3_600_000 {
            out.push(Invalid::new(
                "backfill_after_idle_ms",
                format!("must be at most 3600000 (an hour), got {}", self.backfill_after_idle_ms),
            ));
        }
        if !(100..=3_600_000).contains(&self.stop_grace_ms) {
            out.push(Invalid::new(
                "stop_grace_ms",
                format!("must be 100 to 3600000 (an hour), got {}", self.stop_grace_ms),
            ));
        }
        let mut seen: Vec<StageName> = Vec::new();
        for (i, name) in self.stages.iter().enumerate() {
            let key = format!("stages[{i}]");
            for dep in name.after() {
                if !seen.contains(dep) {
                    out.push(Invalid::new(
                        &key,
                        format!("stage \"{name}\" needs \"{dep}\" before it"),
                    ));
                }
            }
            if seen.contains(name) {
                out.push(Invalid::new(&key, format!("stage \"{name}\" is listed twice")));
            }
            seen.push(*name);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_inputs_resolve_beside_the_config_file_and_outputs_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("conf");
        std::fs::create_dir_all(conf.join("m")).unwrap();
        let file = conf.join("run.toml");
        std::fs::write(
            &file,
            "[segmentation]\nmodel = \"m\"\n[zenoh]\nconfig_file = \"z.json5\"\n\
             [[inference.models]]\nname = \"a\"\npath = \"m\"\n\
             [[inference.models]]\nname = \"b\"\npath = \"/abs/model\"\n\
             [sinks.zarr]\noutput = \"out\"\n",
        )
        .unwrap();
        let (cfg, errors, _) = Config::read(Some(&file));
        let cfg = cfg.unwrap_or_else(|| panic!("{errors:?}"));
        assert_eq!(cfg.segmentation.model, conf.join("m"));
        assert_eq!(cfg.inference.models[0].path, conf.join("m"));
        assert_eq!(cfg.inference.models[1].path, std::path::PathBuf::from("/abs/model"));
        // Not beside the file: left to the working directory.
        assert_eq!(cfg.zenoh.config_file, std::path::PathBuf::from("z.json5"));
        assert_eq!(cfg.sinks.zarr.output, std::path::PathBuf::from("out"));
        // The embedded default resolves nothing.
        let (cfg, _, _) = Config::read(None);
        assert_eq!(
            cfg.unwrap().segmentation.model,
            std::path::PathBuf::from("models/instanseg_fluorescence")
        );
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
    fn names_that_are_types_are_checked_at_load() {
        let text = r#"
            [source]
            kind = "camera"
            [compute]
            device = "gpu0"
            [pipeline]
            stages = ["segment", "segmnet"]
            [[inference.models]]
            name = "m"
            path = "m"
            role = "virtual_stain"
        "#;
        let err = Config::from_toml(text, "t.toml").unwrap_err();
        let keys: Vec<&str> = err.errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "compute.device",
                "inference.models[0].role",
                "pipeline.stages[1]",
                "source.kind"
            ],
            "{err}"
        );
        assert!(err.to_string().contains("cuda:N"), "{err}");
        assert!(err.to_string().contains("virtual-stain"), "{err}");
    }

    /// The plate-plan keys are declared once for the folder and zenoh sources
    /// (`liveomics_adapters::source_section!`) and still report errors under their own key.
    #[test]
    fn plate_plan_keys_keep_their_paths() {
        let text = r#"
            [source.folder]
            plate_format = "big"
            platez = "P1"
            [source.zenoh]
            width_px = -3
        "#;
        let err = Config::from_toml(text, "t.toml").unwrap_err();
        let keys: Vec<&str> = err.errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "source.folder.plate_format",
                "source.folder.platez",
                "source.zenoh.width_px"
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
