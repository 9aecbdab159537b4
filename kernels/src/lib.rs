//! Image operations for liveomics.
//!
//! Every operation is a plain function over row-major buffers with explicit width/height, so that the
//! CPU reference here and the CUDA back end ([`gpu`]) can share one signature and be
//! compared pixel for pixel. `segment` composes them into the segmentation the daemon runs, and
//! [`backend::Compute`] runs it on the back end ([`backend::Backend`]) that `compute.device`
//! selects.

pub mod backend;
pub mod cpu;
pub mod gpu;
pub mod illumination;
pub mod instanseg;
pub mod local;
pub mod localize;
pub mod measure;
pub mod metrics;
pub mod segment;

/// Errors are about shapes and parameters: the kernels never see untrusted bytes directly, but a
/// mismatch between a buffer and its declared size must not become an out-of-bounds panic.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("buffer `{name}` has {actual} elements, expected {expected} ({width}x{height})")]
    Shape {
        name: &'static str,
        actual: usize,
        expected: usize,
        width: usize,
        height: usize,
    },
    #[error("invalid parameter `{name}`: {reason}")]
    Parameter { name: &'static str, reason: String },
}

/// Checks that a buffer holds exactly `width * height` elements.
pub fn check_len<T>(name: &'static str, buf: &[T], width: usize, height: usize) -> Result<(), KernelError> {
    let expected = width * height;
    if buf.len() != expected {
        return Err(KernelError::Shape {
            name,
            actual: buf.len(),
            expected,
            width,
            height,
        });
    }
    Ok(())
}
