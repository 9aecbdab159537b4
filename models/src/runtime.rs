//! Finding and loading ONNX Runtime, and creating sessions on the first execution provider that
//! works. ORT is loaded at run time (`load-dynamic`) so that one binary runs with the CPU wheel or
//! the GPU wheel, whichever the site installed; and it can be loaded only once per process, so the
//! environment is a process-wide singleton.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use ort::ep::ExecutionProvider;
use ort::session::Session;

use crate::error::ModelError;

/// An execution provider as named in config (`tensorrt`, `cuda`, `cuda:1`, `cpu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    TensorRt { device: i32 },
    Cuda { device: i32 },
    Cpu,
}

/// An `inference.providers` entry that names no provider this build knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadProvider {
    #[error("bad device index in {0:?}")]
    DeviceIndex(String),
    #[error("unknown execution provider {0:?}; known: tensorrt[:N], cuda[:N], cpu")]
    Unknown(String),
}

impl Provider {
    pub fn parse(s: &str) -> Result<Self, BadProvider> {
        let (name, dev) = match s.split_once(':') {
            Some((n, d)) => (
                n,
                Some(d.parse::<i32>().map_err(|_| BadProvider::DeviceIndex(s.to_string()))?),
            ),
            None => (s, None),
        };
        let device = dev.unwrap_or(0);
        match name {
            "tensorrt" => Ok(Provider::TensorRt { device }),
            "cuda" => Ok(Provider::Cuda { device }),
            "cpu" if dev.is_none() => Ok(Provider::Cpu),
            _ => Err(BadProvider::Unknown(s.to_string())),
        }
    }

    /// The label used in logs and in the `provider` metric label.
    pub fn label(&self) -> String {
        match self {
            Provider::TensorRt { device } => format!("tensorrt:{device}"),
            Provider::Cuda { device } => format!("cuda:{device}"),
            Provider::Cpu => "cpu".into(),
        }
    }
}

/// How sessions are created; one per daemon, from the `[inference]` config section.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    pub ort_library: Option<PathBuf>,
    pub providers: Vec<Provider>,
    /// Threads inside one operator; 0 lets ORT decide (one per core).
    pub intra_threads: usize,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            ort_library: None,
            providers: vec![Provider::Cuda { device: 0 }, Provider::Cpu],
            intra_threads: 0,
        }
    }
}

/// The loaded ONNX Runtime.
#[derive(Debug)]
pub struct Runtime {
    pub library: PathBuf,
    /// The NVIDIA libraries of the library's Python environment, loaded for its CUDA provider.
    pub nvidia: crate::nvidia::NvidiaLibs,
    /// [`cuda_problem`]'s answer, found once: it probes the loader, and every session asks.
    cuda: OnceLock<Result<(), String>>,
    env: ort::environment::Environment,
}

/// Whether the CUDA provider can run here, checked before ORT tries it (ORT's own failure names
/// neither the missing library's folder nor a missing driver): `Err` says why, in order: no GPU
/// build of ORT, no NVIDIA driver (the provider needs `libcuda.so.1`, which only a driver
/// installs: no device can be used), or a library the provider needs that is nowhere it looked.
pub fn cuda_problem(rt: &Runtime) -> Result<(), String> {
    rt.cuda.get_or_init(|| check_cuda(rt)).clone()
}

fn check_cuda(rt: &Runtime) -> Result<(), String> {
    let Some(provider) = crate::nvidia::cuda_provider_file(&rt.library) else {
        return Err("this ONNX Runtime has no CUDA provider (install onnxruntime-gpu==1.31.1: `make gpu`)".into());
    };
    if let Err(e) = crate::nvidia::probe(Path::new("libcuda.so.1")) {
        return Err(format!("no CUDA device: no NVIDIA driver here ({e})"));
    }
    if let Err(e) = crate::nvidia::probe(&provider) {
        let looked = if rt.nvidia.looked_in.is_empty() {
            format!(
                "no NVIDIA libraries in {}: install onnxruntime-gpu[cuda,cudnn]==1.31.1",
                rt.library
                    .ancestors()
                    .nth(3)
                    .map(|p| p.join("nvidia/*/lib").display().to_string())
                    .unwrap_or_default()
            )
        } else {
            format!(
                "looked in {}, LD_LIBRARY_PATH and the system's",
                rt.nvidia
                    .looked_in
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        return Err(format!("the CUDA provider does not load: {e} ({looked})"));
    }
    Ok(())
}

static RUNTIME: OnceLock<Mutex<Option<Arc<Runtime>>>> = OnceLock::new();

fn lib_in(capi: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(capi)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("libonnxruntime.so") || n == "libonnxruntime.dylib" || n == "onnxruntime.dll"
            })
        })
        .collect();
    found.sort();
    found.pop()
}

fn venv_candidates(root: &Path) -> Vec<PathBuf> {
    let lib = root.join(".venv/lib");
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&lib) {
        for e in rd.flatten() {
            out.push(e.path().join("site-packages/onnxruntime/capi"));
        }
    }
    if out.is_empty() {
        out.push(lib.join("python3.*/site-packages/onnxruntime/capi"));
    }
    out
}

/// Where ONNX Runtime is looked for, in order: config, `ORT_DYLIB_PATH`, the repo's `.venv`
/// (next to the working directory, the executable's build tree, or the source tree), then the
/// active Python's `onnxruntime` package.
pub fn find_library(configured: Option<&Path>) -> Result<PathBuf, ModelError> {
    let mut tried = Vec::new();
    if let Some(p) = configured {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        tried.push(format!("inference.ort_library = {} (not a file)", p.display()));
        return Err(ModelError::OrtNotFound { tried });
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        tried.push(format!("ORT_DYLIB_PATH = {} (not a file)", p.display()));
    } else {
        tried.push("ORT_DYLIB_PATH (not set)".into());
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        // target/release/liveomics -> the repo root.
        if let Some(r) = exe.ancestors().nth(3) {
            roots.push(r.to_path_buf());
        }
    }
    if let Some(r) = Path::new(env!("CARGO_MANIFEST_DIR")).parent() {
        roots.push(r.to_path_buf());
    }
    roots.dedup();
    for root in roots {
        for capi in venv_candidates(&root) {
            if let Some(p) = lib_in(&capi) {
                return Ok(p);
            }
            tried.push(format!("{}/libonnxruntime.so*", capi.display()));
        }
    }
    for py in ["python3", "python"] {
        let out = std::process::Command::new(py)
            .args([
                "-c",
                "import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))",
            ])
            .output();
        match out {
            Ok(o) if o.status.success() => {
                let dir = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("capi");
                if let Some(p) = lib_in(&dir) {
                    return Ok(p);
                }
                tried.push(format!("{py}: {}/libonnxruntime.so*", dir.display()));
            }
            _ => tried.push(format!("{py} -c 'import onnxruntime' (no such module)")),
        }
    }
    Err(ModelError::OrtNotFound { tried })
}

/// The process's ONNX Runtime, loading it on first use.
pub fn runtime(configured: Option<&Path>) -> Result<Arc<Runtime>, ModelError> {
    let cell = RUNTIME.get_or_init(|| Mutex::new(None));
    let mut slot = cell.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(rt) = slot.as_ref() {
        if let Some(want) = configured {
            if want != rt.library {
                return Err(ModelError::OrtAlreadyLoaded {
                    loaded: rt.library.clone(),
                    requested: want.to_path_buf(),
                });
            }
        }
        return Ok(Arc::clone(rt));
    }
    let library = find_library(configured)?;
    let load_err = |message: String| ModelError::OrtLoad {
        path: library.clone(),
        message,
    };
    let env = ort::init_from(&library)
        .map_err(|e| load_err(e.to_string()))?
        .with_name("liveomics")
        .build()
        .map_err(|e| load_err(e.to_string()))?;
    tracing::debug!(library = %library.display(), "ONNX Runtime loaded");
    let nvidia = if crate::nvidia::cuda_provider_file(&library).is_some() {
        crate::nvidia::preload(&library)
    } else {
        crate::nvidia::NvidiaLibs::default()
    };
    if !nvidia.failed.is_empty() {
        tracing::debug!(failed = ?nvidia.failed, "NVIDIA libraries that did not load");
    }
    let rt = Arc::new(Runtime {
        library,
        nvidia,
        cuda: OnceLock::new(),
        env,
    });
    *slot = Some(Arc::clone(&rt));
    Ok(rt)
}

/// The execution providers this ONNX Runtime library was built with (after [`runtime`] loaded
/// it): CPU always; CUDA and TensorRT only in `onnxruntime-gpu`. Available is not registered: a
/// provider registers per session, where its CUDA libraries and a device must also be found.
pub fn providers_in_library() -> Vec<(&'static str, bool)> {
    vec![
        ("cpu", true),
        ("cuda", ort::ep::CUDA::is_available().unwrap_or(false)),
        ("tensorrt", ort::ep::TensorRT::is_available().unwrap_or(false)),
    ]
}

/// A session and the provider it runs on.
#[derive(Debug)]
pub struct BuiltSession {
    pub session: Session,
    pub provider: Provider,
    /// Why each provider before it was skipped.
    pub skipped: Vec<String>,
}

impl Runtime {
    /// Creates a session on the first provider of `opts.providers` that registers. A provider
    /// that is listed but cannot run (no GPU wheel, no device, no driver) is skipped with its
    /// reason; if none is left, the error lists every reason. ORT itself would fall back to CPU
    /// silently, so each GPU provider is registered with `error_on_failure`.
    pub fn session(&self, model: &str, weights: &Path, opts: &RuntimeOptions) -> Result<BuiltSession, ModelError> {
        let bytes = std::fs::read(weights).map_err(|source| ModelError::Io {
            path: weights.to_path_buf(),
            source,
        })?;
        self.session_from_bytes(model, &bytes, opts)
    }

    /// [`Runtime::session`] on ONNX bytes already in memory (weights edited before loading).
    pub fn session_from_bytes(
        &self,
        model: &str,
        bytes: &[u8],
        opts: &RuntimeOptions,
    ) -> Result<BuiltSession, ModelError> {
        let mut skipped = Vec::new();
        for &p in &opts.providers {
            match self.try_session(model, bytes, p, opts) {
                Ok(session) => {
                    return Ok(BuiltSession {
                        session,
                        provider: p,
                        skipped,
                    })
                }
                // The CPU provider is always there: when it fails, the weights are the problem.
                Err(reason) if p == Provider::Cpu => {
                    return Err(ModelError::Weights {
                        model: model.to_string(),
                        message: reason,
                    })
                }
                Err(reason) => skipped.push(format!("{}: {reason}", p.label())),
            }
        }
        Err(ModelError::NoProvider {
            model: model.to_string(),
            tried: opts.providers.iter().map(Provider::label).collect(),
            reasons: skipped,
        })
    }

    fn try_session(&self, model: &str, bytes: &[u8], p: Provider, opts: &RuntimeOptions) -> Result<Session, String> {
        let ort_err = |e: ort::Error| e.to_string();
        let mut b = Session::builder(&self.env).map_err(ort_err)?;
        if opts.intra_threads > 0 {
            b = b.with_intra_threads(opts.intra_threads).map_err(|e| e.to_string())?;
        }
        // ORT's pool threads busy-wait after each run by default; in a daemon whose other stages
        // (segmentation, zarr writing) need the same cores, that steals the time they need.
        b = b.with_intra_op_spinning(false).map_err(|e| e.to_string())?;
        b = b.with_inter_op_spinning(false).map_err(|e| e.to_string())?;
        let ep = match p {
            Provider::Cpu => None,
            Provider::Cuda { device } => {
                if !ort::ep::CUDA::is_available().unwrap_or(false) {
                    return Err(
                        "this ONNX Runtime has no CUDA provider (install onnxruntime-gpu==1.31.1: `make gpu`)".into(),
                    );
                }
                cuda_problem(self)?;
                Some(
                    ort::ep::CUDA::default()
                        .with_device_id(device)
                        .build()
                        .error_on_failure(),
                )
            }
            Provider::TensorRt { device } => {
                if !ort::ep::TensorRT::is_available().unwrap_or(false) {
                    return Err(
                        "this ONNX Runtime has no TensorRT provider (install onnxruntime-gpu and TensorRT)".into(),
                    );
                }
                Some(
                    ort::ep::TensorRT::default()
                        .with_device_id(device)
                        .build()
                        .error_on_failure(),
                )
            }
        };
        if let Some(ep) = ep {
            b = b.with_execution_providers([ep]).map_err(|e| e.to_string())?;
        }
        let session = b.commit_from_memory(bytes).map_err(|e| {
            let msg = e.to_string();
            if msg.contains("Unsupported model IR version") || msg.contains("IR version") {
                format!("{msg} (ONNX Runtime 1.31 reads IR <= 13; re-export with model.ir_version = 13 or lower)")
            } else {
                msg
            }
        })?;
        tracing::debug!(model, provider = %p.label(), "session created");
        Ok(session)
    }
}
