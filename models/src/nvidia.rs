//! The NVIDIA libraries of the Python environment that holds ONNX Runtime's GPU build, loaded by
//! this process itself so that the CUDA provider finds them without `LD_LIBRARY_PATH`.
//!
//! The one place in this crate that calls the dynamic loader directly (`unsafe`: loading a
//! library runs its initialisers). It loads only NVIDIA's libraries from the environment
//! `onnxruntime-gpu[cuda,cudnn]` was installed into, and ORT's provider library to probe it,
//! exactly as onnxruntime's Python package (`preload_dlls`) and ORT itself load them.
#![allow(unsafe_code)]

use std::path::{Path, PathBuf};

/// What [`preload`] found: the folders it looked in, the libraries it loaded and those it
/// could not, with the loader's reason.
#[derive(Debug, Default, Clone)]
pub struct NvidiaLibs {
    pub looked_in: Vec<PathBuf>,
    pub loaded: Vec<String>,
    pub failed: Vec<(String, String)>,
}

/// The CUDA provider's file beside `library`, when this ONNX Runtime has one (`onnxruntime-gpu`).
pub fn cuda_provider_file(library: &Path) -> Option<PathBuf> {
    let p = library.parent()?.join("libonnxruntime_providers_cuda.so");
    p.is_file().then_some(p)
}

/// Loads, globally, every library under `site-packages/nvidia/*/lib` of the environment that
/// holds `library` (what `pip install "onnxruntime-gpu[cuda,cudnn]"` puts there: CUDA runtime,
/// cuBLAS, cuDNN, cuFFT, cuRAND, nvJitLink), as the Python package's `preload_dlls()` does: the
/// CUDA provider's dependencies then resolve by soname, with no `LD_LIBRARY_PATH`. Libraries
/// that need another one are retried until a pass loads nothing new.
pub fn preload(library: &Path) -> NvidiaLibs {
    let mut out = NvidiaLibs::default();
    // .../site-packages/onnxruntime/capi/libonnxruntime.so.X -> .../site-packages/nvidia
    let Some(nvidia) = library.ancestors().nth(3).map(|sp| sp.join("nvidia")) else {
        return out;
    };
    let mut pending: Vec<PathBuf> = Vec::new();
    for pkg in std::fs::read_dir(&nvidia).into_iter().flatten().flatten() {
        let lib = pkg.path().join("lib");
        if !lib.is_dir() {
            continue;
        }
        out.looked_in.push(lib.clone());
        for f in std::fs::read_dir(&lib).into_iter().flatten().flatten() {
            let name = f.file_name().to_string_lossy().to_string();
            if name.starts_with("lib") && name.contains(".so") {
                pending.push(f.path());
            }
        }
    }
    pending.sort();
    let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL;
    loop {
        let before = pending.len();
        let mut errors = Vec::new();
        pending.retain(|p| {
            // SAFETY: loading runs the library's initialisers; these are NVIDIA's CUDA
            // libraries, loaded exactly as onnxruntime's own Python package loads them.
            match unsafe { libloading::os::unix::Library::open(Some(p), flags) } {
                Ok(l) => {
                    // Kept for the life of the process: the provider resolves against them.
                    std::mem::forget(l);
                    out.loaded.push(p.display().to_string());
                    false
                }
                Err(e) => {
                    errors.push((p.display().to_string(), loader_error(&e)));
                    true
                }
            }
        });
        out.failed = errors;
        if pending.is_empty() || pending.len() == before {
            break;
        }
    }
    out
}

/// Whether `path` (a file, or a soname the loader searches for) loads, without keeping it.
pub fn probe(path: &Path) -> Result<(), String> {
    let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL;
    // SAFETY: see the module: ORT's provider or the NVIDIA driver, which ORT would load next.
    unsafe { libloading::os::unix::Library::open(Some(path), flags) }
        .map(drop)
        .map_err(|e| loader_error(&e))
}

/// The loader's own message (libloading keeps `dlerror()`'s text as the error's source).
fn loader_error(e: &libloading::Error) -> String {
    match std::error::Error::source(e) {
        Some(s) => s.to_string(),
        None => e.to_string(),
    }
}
