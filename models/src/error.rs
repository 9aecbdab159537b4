use std::path::PathBuf;

/// Everything that can go wrong loading or running a model. Each variant names the model (its
/// description's path or name) so that a daemon running several models says which one failed.
/// A variant with a `#[source]` does not repeat it in its own message: callers print the chain.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("no ONNX Runtime library found; tried:\n  {}\nfix: run `make python` (installs onnxruntime==1.31.1 into .venv), set inference.ort_library or ORT_DYLIB_PATH to libonnxruntime.so, or `pip install onnxruntime==1.31.1`", tried.join("\n  "))]
    OrtNotFound { tried: Vec<String> },
    #[error("cannot load ONNX Runtime from {path}: {message}")]
    OrtLoad { path: PathBuf, message: String },
    #[error("ONNX Runtime was already loaded from {loaded} in this process; cannot switch to {requested}")]
    OrtAlreadyLoaded { loaded: PathBuf, requested: PathBuf },
    #[error("{model}: {what}")]
    Ort {
        model: String,
        what: String,
        #[source]
        source: ort::Error,
    },
    #[error("{}: cannot read", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A description field that is malformed, missing, or names a feature liveomics does not
    /// implement; `key` is the path inside the description (`inputs[0].axes[2].size`).
    #[error("{model}: {key}: {message}")]
    Description {
        model: String,
        key: String,
        message: String,
    },
    #[error("{model}: {} has sha256 {actual}, the description says {expected}", path.display())]
    Checksum {
        model: String,
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{}: not a usable .npy file: {message}", path.display())]
    Npy { path: PathBuf, message: String },
    /// Input or output tensors that do not fit what the description declares.
    #[error("{model}: {message}")]
    Shape { model: String, message: String },
    #[error("{model}: output {output:?} has {count} non-finite values (NaN or infinite)")]
    NonFinite {
        model: String,
        output: String,
        count: usize,
    },
    #[error("{model}: none of the execution providers {tried:?} could be registered:\n  {}", reasons.join("\n  "))]
    NoProvider {
        model: String,
        tried: Vec<String>,
        reasons: Vec<String>,
    },
    #[error("{model}: ONNX Runtime cannot load the weights: {message}")]
    Weights { model: String, message: String },
    #[error("{model}: the batching thread has stopped")]
    BatcherGone { model: String },
}

/// `error: cause: root cause` of any error, for messages that must carry a chain as text.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
