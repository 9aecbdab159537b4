//! `liveomics doctor`: what runs where on this machine, and how fast. The environment (ONNX
//! Runtime, its execution providers, the CUDA driver and device, the kernels' back end), then a
//! measurement: the configured pipeline itself, run warm on a small simulated plate of the plan's
//! field size at full speed (no network, output to a temporary folder), with the time per field
//! of every stage and model and the fields per second it sustains, set against the plan's pace
//! and the latency budget.
//!
//! Why the real pipeline and not a model of it: the figure a user compares with `liveomics run`
//! must come from the same code (queues, workers, sinks, thread pools contending for the cores);
//! a sum of isolated timings misses the contention that decides throughput on a small machine.

use std::path::{Path, PathBuf};

use liveomics_adapters::source::StopToken;
use liveomics_kernels::gpu::{Compute, DeviceRequest};
use liveomics_models::{Model, RuntimeOptions};
use serde::Serialize;

use crate::component::SourceName;
use crate::config::{Config, ConfigErrors};
use crate::pipeline::{self, RunError, RunOptions};
use crate::resources::Resources;

#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    #[error("the measurement run failed")]
    Run(#[from] RunError),
    #[error("cannot use the temporary folder {}", path.display())]
    Temp {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the measurement run finished {0} fields: too few to time (ask for --fields >= 3)")]
    TooFew(u64),
}

/// Everything `doctor` found, printed as text or JSON.
#[derive(Debug, Serialize)]
pub struct Report {
    pub config: String,
    pub onnx_runtime: OrtReport,
    pub cuda: CudaReport,
    pub kernels: String,
    pub models: Vec<ModelReport>,
    pub segmentation: String,
    pub field: (usize, usize),
    pub fields_timed: u64,
    /// Mean time per field of each stage and model, warm (their first run left out).
    pub costs_ms: Vec<(String, f64)>,
    /// Fields per second the pipeline sustains here: (fields - 1) over the span from the first
    /// field done by every sink to the last.
    pub sustained_fields_per_s: f64,
    pub plan_fields_per_s: Option<f64>,
    pub budget_ms: u64,
    /// The stages' time per field (their sum), against the budget.
    pub field_work_ms: f64,
    pub keeps_up: bool,
    pub verdict: String,
}

#[derive(Debug, Serialize)]
pub struct OrtReport {
    pub library: Option<String>,
    pub version: Option<String>,
    pub error: Option<String>,
    /// Built into the library (`onnxruntime-gpu` has CUDA and TensorRT).
    pub providers_in_library: Vec<(String, bool)>,
    pub providers_asked: Vec<String>,
    /// Whether the CUDA provider can run, or exactly why not (no GPU build, no driver, a library
    /// missing and where it was looked for).
    pub cuda_provider: Result<(), String>,
    /// The NVIDIA libraries of the library's environment that the daemon loaded for the
    /// provider, and those that did not load (with the loader's reason).
    pub nvidia_looked_in: Vec<String>,
    pub nvidia_loaded: Vec<String>,
    pub nvidia_failed: Vec<(String, String)>,
}

#[derive(Debug, Serialize)]
pub struct CudaReport {
    /// The device the CUDA kernels would run on, or why none (driver, device, NVRTC).
    pub device: Option<String>,
    pub reason: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ModelReport {
    pub name: String,
    pub path: String,
    /// The provider its session registered on, or the load error.
    pub provider: Result<String, String>,
    /// Providers asked for first that did not register, with why.
    pub skipped: Vec<String>,
}

/// The version in a library's file name (`libonnxruntime.so.1.31.1`).
fn version_of(library: &Path) -> Option<String> {
    let name = library.file_name()?.to_str()?;
    let v = name.rsplit_once(".so.").map(|(_, v)| v)?;
    (!v.is_empty()).then(|| v.to_string())
}

fn ort_report(opts: &RuntimeOptions) -> OrtReport {
    let asked = opts.providers.iter().map(|p| p.label()).collect();
    match liveomics_models::runtime::runtime(opts.ort_library.as_deref()) {
        Ok(rt) => OrtReport {
            library: Some(rt.library.display().to_string()),
            version: version_of(&rt.library),
            error: None,
            providers_in_library: liveomics_models::runtime::providers_in_library()
                .into_iter()
                .map(|(p, a)| (p.to_string(), a))
                .collect(),
            providers_asked: asked,
            cuda_provider: liveomics_models::runtime::cuda_problem(&rt),
            nvidia_looked_in: rt.nvidia.looked_in.iter().map(|p| p.display().to_string()).collect(),
            nvidia_loaded: rt.nvidia.loaded.clone(),
            nvidia_failed: rt.nvidia.failed.clone(),
        },
        Err(e) => OrtReport {
            library: None,
            version: None,
            error: Some(crate::telemetry::error_chain(&e)),
            providers_in_library: Vec::new(),
            providers_asked: asked,
            cuda_provider: Err("no ONNX Runtime".into()),
            nvidia_looked_in: Vec::new(),
            nvidia_loaded: Vec::new(),
            nvidia_failed: Vec::new(),
        },
    }
}

fn cuda_report() -> CudaReport {
    match Compute::select(DeviceRequest::Cuda(0)) {
        Ok((c, _)) => CudaReport {
            device: Some(c.describe()),
            reason: None,
        },
        Err(e) => CudaReport {
            device: None,
            reason: Some(e.to_string()),
        },
    }
}

/// The measurement run's config: the configured stages and zarr sink on `fields` simulated
/// fields of the plan's size at full speed, written under `out`, with nothing on the network.
fn measuring(cfg: &Config, plan_size: (usize, usize), pixel_um: f64, fields: u32, out: &Path) -> Config {
    let mut m = cfg.clone();
    if m.source.kind != SourceName::Simulator {
        // Another source's plan: the simulator's landmark channels at its field size.
        m.source.simulator.width_px = plan_size.0 as u32;
        m.source.simulator.height_px = plan_size.1 as u32;
        m.source.simulator.pixel_size_um = pixel_um;
    }
    m.source.kind = SourceName::Simulator;
    let sim = &mut m.source.simulator;
    sim.plate = "doctor".into();
    sim.rate_fields_per_s = 0.0;
    sim.timepoints = 1;
    sim.fields_per_well = fields.min(sim.fields_per_well.max(1));
    let wells = fields.div_ceil(sim.fields_per_well) as usize;
    let first = sim.wells.first().cloned().unwrap_or_else(|| "B2".into());
    sim.wells = (0..wells)
        .map(|i| sim.wells.get(i).cloned().unwrap_or_else(|| first.clone()))
        .collect();
    sim.wells.dedup();
    sim.relocalization.clear();
    m.sinks.zarr.output = out.to_path_buf();
    m.sinks.zenoh.enabled = false;
    m.sinks.jsonl.enabled = false;
    m.closed_loop.enabled = false;
    m.cluster.enabled = false;
    m.zenoh.listen.clear();
    m.zenoh.connect.clear();
    m.telemetry.http_listen = String::new();
    m
}

/// Runs the checks and the measurement. `path` is the config file (the embedded default when
/// `None`); `fields` how many simulated fields to time.
pub fn doctor(path: Option<&Path>, fields: u32) -> Result<Report, DoctorError> {
    let res = Resources::default();
    let cfg = crate::registry::load_for_run(path, &res)?;
    let opts = cfg.inference.runtime_options();
    let onnx_runtime = ort_report(&opts);
    let cuda = cuda_report();
    let kernels = res
        .compute(cfg.compute.device)
        .map(|(c, why)| match why {
            Some(why) => format!("{} ({why})", c.describe()),
            None => c.describe(),
        })
        .unwrap_or_else(|e| e.to_string());
    let models = cfg
        .inference
        .models
        .iter()
        .map(|m| {
            let loaded = Model::load(&m.path, &opts);
            ModelReport {
                name: m.name.clone(),
                path: m.path.display().to_string(),
                skipped: loaded.as_ref().map(|l| l.skipped.clone()).unwrap_or_default(),
                provider: loaded
                    .map(|l| l.provider.label())
                    .map_err(|e| crate::telemetry::error_chain(&e)),
            }
        })
        .collect();

    let plan = crate::registry::build_source(&cfg, &res)
        .map(|s| s.plan().clone())
        .map_err(|source| RunError::Source {
            kind: cfg.source.kind.as_str(),
            source,
        })?;
    let size = (plan.width, plan.height);
    // Removed when dropped, whatever happens to the run.
    let temp = tempfile::Builder::new()
        .prefix("liveomics-doctor-")
        .tempdir()
        .map_err(|source| DoctorError::Temp {
            path: std::env::temp_dir(),
            source,
        })?;
    let m = measuring(&cfg, size, plan.pixel_size_um, fields.max(3), temp.path());
    let scheduler = res.scheduler.clone();
    let summary = pipeline::run(
        &m,
        RunOptions {
            overwrite: true,
            resources: res,
            stop: StopToken::new(),
            extra_sinks: Vec::new(),
            progress: false,
        },
    );
    let segmentation = first_label_method(&temp.path().join("doctor.zarr")).unwrap_or_else(|| "none".into());
    drop(temp);
    let summary = summary?;
    let span = summary.done_span.unwrap_or_default().as_secs_f64();
    if summary.fields_done < 3 || span <= 0.0 {
        return Err(DoctorError::TooFew(summary.fields_done));
    }
    let sustained = (summary.fields_done - 1) as f64 / span;
    let costs_ms: Vec<(String, f64)> = scheduler
        .account()
        .into_iter()
        .map(|(k, _, d)| (k, d.as_secs_f64() * 1e3))
        .collect();
    let field_work_ms: f64 = costs_ms
        .iter()
        .filter(|(k, _)| k.starts_with("stage "))
        .map(|(_, ms)| ms)
        .sum();
    let pace = (cfg.source.kind == SourceName::Simulator && cfg.source.simulator.rate_fields_per_s > 0.0)
        .then_some(cfg.source.simulator.rate_fields_per_s);
    let within_budget = field_work_ms <= cfg.latency_budget_ms as f64;
    let keeps_pace = pace.is_none_or(|p| sustained >= p);
    let keeps_up = within_budget && keeps_pace;
    let mut verdict = format!(
        "sustains {sustained:.2} fields/s of {}x{} here; a field's work takes {field_work_ms:.0} ms of its {} ms budget",
        size.0, size.1, cfg.latency_budget_ms
    );
    match pace {
        Some(p) if keeps_pace => verdict += &format!("; the plan acquires {p} fields/s: keeps up ({:.1}x)", sustained / p),
        Some(p) => {
            verdict += &format!(
                "; the plan acquires {p} fields/s: falls behind ({:.0} % of the pace; the acquisition would be held or the analysis lag)",
                100.0 * sustained / p
            )
        }
        None => verdict += "; the source sets no pace (a folder, the network, a replay)",
    }
    if !within_budget {
        verdict += ": over budget";
    }
    Ok(Report {
        config: path.map_or("embedded default config".into(), |p| p.display().to_string()),
        onnx_runtime,
        cuda,
        kernels,
        models,
        segmentation,
        field: size,
        fields_timed: summary.fields_done,
        costs_ms,
        sustained_fields_per_s: sustained,
        plan_fields_per_s: pace,
        budget_ms: cfg.latency_budget_ms,
        field_work_ms,
        keeps_up,
        verdict,
    })
}

/// The segmentation method the measurement run recorded on its first field's labels.
fn first_label_method(plate: &Path) -> Option<String> {
    let row = std::fs::read_dir(plate)
        .ok()?
        .flatten()
        .find(|e| e.path().is_dir())?
        .path();
    let col = std::fs::read_dir(row)
        .ok()?
        .flatten()
        .find(|e| e.path().is_dir())?
        .path();
    let text = std::fs::read_to_string(col.join("0/labels/nuclei/zarr.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.pointer("/attributes/liveomics/segmentation")?
        .as_str()
        .map(str::to_string)
}

impl Report {
    /// The report as a person reads it.
    pub fn text(&self) -> String {
        let mut s = format!("liveomics doctor ({})\n", self.config);
        let o = &self.onnx_runtime;
        match (&o.library, &o.error) {
            (Some(lib), _) => {
                s += &format!(
                    "  onnx runtime     {} ({lib})\n",
                    o.version.as_deref().unwrap_or("version unknown")
                );
                let have: Vec<String> = o
                    .providers_in_library
                    .iter()
                    .map(|(p, a)| format!("{p} {}", if *a { "yes" } else { "no" }))
                    .collect();
                s += &format!("  providers        in the library: {}\n", have.join(", "));
                match &o.cuda_provider {
                    Ok(()) => s += "  cuda provider    loads\n",
                    Err(why) => s += &format!("  cuda provider    cannot run: {why}\n"),
                }
                if !o.nvidia_looked_in.is_empty() {
                    s += &format!(
                        "  nvidia libraries {} loaded, {} not ({})\n",
                        o.nvidia_loaded.len(),
                        o.nvidia_failed.len(),
                        o.nvidia_looked_in.join(", ")
                    );
                }
            }
            (None, Some(e)) => s += &format!("  onnx runtime     not found: {e}\n"),
            _ => {}
        }
        s += &format!("                   asked for: {}\n", o.providers_asked.join(", "));
        match (&self.cuda.device, &self.cuda.reason) {
            (Some(d), _) => s += &format!("  cuda             {d}\n"),
            (None, Some(r)) => s += &format!("  cuda             none: {r}\n"),
            _ => {}
        }
        s += &format!("  image kernels    {}\n", self.kernels);
        for m in &self.models {
            match &m.provider {
                Ok(p) => s += &format!("  model            {} on {p}", m.name),
                Err(e) => s += &format!("  model            {} does not load: {e}", m.name),
            }
            if !m.skipped.is_empty() {
                s += &format!(" (skipped: {})", m.skipped.join("; "));
            }
            s += "\n";
        }
        s += &format!("  segmentation     {}\n", self.segmentation);
        s += &format!(
            "  measured         {} simulated fields of {}x{}, warm, at full speed (per field, mean):\n",
            self.fields_timed, self.field.0, self.field.1
        );
        for (k, ms) in &self.costs_ms {
            s += &format!("    {k:<30} {ms:>9.1} ms\n");
        }
        s += &format!(
            "  sustained        {:.2} fields/s\n  verdict          {}: {}\n",
            self.sustained_fields_per_s,
            if self.keeps_up { "ok" } else { "too slow" },
            self.verdict
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_is_read_from_the_library_name() {
        let v = version_of(Path::new("/x/capi/libonnxruntime.so.1.31.1"));
        assert_eq!(v.as_deref(), Some("1.31.1"));
        assert_eq!(version_of(Path::new("/x/libonnxruntime.dylib")), None);
    }

    #[test]
    fn the_measuring_config_runs_offline_on_the_asked_fields() {
        let cfg = crate::registry::load(None).unwrap();
        let m = measuring(&cfg, (1024, 1024), 0.65, 7, Path::new("/tmp/x"));
        let sim = &m.source.simulator;
        assert_eq!(sim.rate_fields_per_s, 0.0);
        assert_eq!(sim.fields_per_well * sim.wells.len() as u32, 9);
        assert!(!m.sinks.zenoh.enabled && m.zenoh.listen.is_empty() && m.telemetry.http_listen.is_empty());
        assert_eq!(m.pipeline.stages, cfg.pipeline.stages);
    }
}
