//! The model runtime: ONNX Runtime loaded at run time, bioimage.io model descriptions (format
//! 0.5), execution-provider fallback, whole-field tiling and per-cell dynamic batching. The
//! daemon's inference stage and `liveomics models` are thin layers over this crate.

pub mod batch;
pub mod component;
pub mod description;
pub mod diffusion;
pub mod error;
pub mod instanseg;
pub mod model;
pub mod npy;
pub mod nvidia;
pub mod onnx_graph;
pub mod process;
pub mod runtime;
pub mod schedule;
pub mod tensor;
pub mod tile;
pub mod well;

pub use batch::{buckets, BatchOptions, Batcher};
pub use component::Component;
pub use description::{Description, Role};
pub use diffusion::Diffusion;
pub use error::ModelError;
pub use model::{CheckReport, Model};
pub use runtime::{BadProvider, Provider, RuntimeOptions};
pub use tensor::Tensor;
pub use tile::TileOptions;
pub use well::{Pool, WellModel};
