//! The instance-segmentation runner (`segmentation.method = "instanseg"`): an InstanSeg model's
//! network in ONNX Runtime by tiles, its post-processing in `liveomics_kernels::instanseg`, on a
//! field of any pixel size (resampled to the model's and the labels back).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use liveomics_kernels::gpu::Compute;
use liveomics_kernels::instanseg::{self, scale, InstanSegParams, Instances, Linear};
use liveomics_models::instanseg::InstansegConfig;
use liveomics_models::{Model, ModelError, Role, RuntimeOptions, Tensor, TileOptions};

use crate::component::StageError;
use crate::telemetry as t;

/// A loaded instance-segmentation model, shared by every worker (the session is behind a lock
/// inside [`Model`]; the post-processing runs on the caller's thread and rayon).
#[derive(Debug)]
pub struct InstanceModel {
    pub model: Model,
    pub params: InstanSegParams,
    /// The nucleus diameter, in model pixels, fields are resampled to.
    pub nucleus_px: f64,
    /// Channels the network gives per field (5: nuclei only; 10: nuclei and cells).
    pub channels: usize,
    tile: TileOptions,
}

/// Labels at the field's size, cells numbered like their nucleus, with where the time went.
#[derive(Debug, Clone)]
pub struct InstanceLabels {
    pub nuclei: Vec<u32>,
    pub cells: Option<Vec<u32>>,
    /// Objects: cells when cells were asked for, else nuclei.
    pub count: u32,
    /// The field's size at the model's pixel size.
    pub model_size: (usize, usize),
    pub network: Duration,
    pub post: Duration,
}

/// Why `method = "instanseg"` cannot run (`auto` runs the classical path instead).
#[derive(Debug, thiserror::Error)]
pub enum ChooseError {
    #[error("no InstanSeg model at {0}")]
    NoModel(PathBuf),
    #[error("{}: {source}", path.display())]
    Load {
        path: PathBuf,
        #[source]
        source: Box<ModelError>,
    },
}

/// A relative model path from the working directory, else from the repository holding the
/// running binary (`target/release/liveomics` → the repository root): `liveomics segment` and
/// `make run` find the shipped model from anywhere.
pub fn find_model(path: &Path) -> Option<PathBuf> {
    if path.exists() {
        return Some(path.to_path_buf());
    }
    if path.is_relative() {
        let exe = std::env::current_exe().ok()?;
        for up in exe.ancestors().skip(1).take(3) {
            let p = up.join(path);
            if p.exists() {
                return Some(p);
            }
        }
    }
    None
}

/// The InstanSeg model that `auto` or `instanseg` runs, or `None` for the classical path, with
/// the choice logged either way: `auto` falls back on any problem, `instanseg` only when ONNX
/// Runtime is missing. `seed_threshold` replaces the model's.
pub fn choose(
    auto: bool,
    model: &Path,
    opts: &RuntimeOptions,
    tile: TileOptions,
    seed_threshold: f32,
    cells: bool,
) -> Result<Option<InstanceModel>, ChooseError> {
    let fallback = |reason: &str| {
        t::SegmentMethodChosen {
            method: "classical",
            model: "",
            provider: "",
            reason: Some(reason),
        }
        .emit();
        Ok(None)
    };
    let Some(path) = find_model(model) else {
        let e = ChooseError::NoModel(model.to_path_buf());
        return if auto { fallback(&e.to_string()) } else { Err(e) };
    };
    match InstanceModel::load(&path, opts, tile, cells) {
        Ok(mut m) => {
            m.params.seed_threshold = seed_threshold;
            t::SegmentMethodChosen {
                method: "instanseg",
                model: &path.display().to_string(),
                provider: &m.model.provider.label(),
                reason: None,
            }
            .emit();
            Ok(Some(m))
        }
        Err(e) if auto || matches!(e, ModelError::OrtNotFound { .. } | ModelError::OrtLoad { .. }) => {
            fallback(&t::error_chain(&e))
        }
        Err(e) => Err(ChooseError::Load {
            path,
            source: Box::new(e),
        }),
    }
}

/// The kernels' parameters from the description's section (already checked when it loaded).
pub fn params(c: &InstansegConfig) -> InstanSegParams {
    InstanSegParams {
        mask_threshold: c.mask_threshold,
        peak_distance: c.peak_distance,
        seed_threshold: c.seed_threshold,
        overlap_threshold: c.overlap_threshold,
        window_size: c.window_size,
        cleanup_fragments: c.cleanup_fragments,
        resolve_cell_and_nucleus: c.resolve_cell_and_nucleus,
        classifier: c
            .pixel_classifier
            .iter()
            .map(|l| Linear {
                inputs: l.weight.first().map_or(0, Vec::len),
                outputs: l.weight.len(),
                weight: l.weight.iter().flatten().copied().collect(),
                bias: l.bias.clone(),
            })
            .collect(),
    }
}

impl InstanceModel {
    /// Loads the model at `path` (folder or description); it must have the
    /// instance-segmentation role and give 5 or 10 channels. Without `cells`, a network that
    /// gives both is cut to its nuclei decoder ([`liveomics_models::onnx_graph`]): the same
    /// nuclei for a third less work; when the graph cannot be cut, it runs whole (logged).
    pub fn load(path: &Path, opts: &RuntimeOptions, tile: TileOptions, cells: bool) -> Result<Self, ModelError> {
        let mut cut = None;
        let model = Model::load_edited(path, opts, |d, bytes| {
            if cells || d.outputs.len() != 1 || d.output_channels(0).len() != 2 * instanseg::CHANNELS_PER_TARGET {
                return Ok(bytes);
            }
            Ok(match liveomics_models::onnx_graph::keep_first_half_of_output(&bytes) {
                Ok((pruned, dropped)) => {
                    cut = Some(Ok(dropped));
                    d.truncate_output_channels(0, instanseg::CHANNELS_PER_TARGET);
                    pruned
                }
                Err(e) => {
                    cut = Some(Err(e.to_string()));
                    bytes
                }
            })
        })?;
        if let Some(outcome) = &cut {
            t::InstansegNetworkCut {
                model: &model.descr.name,
                outcome: outcome.as_ref().copied().map_err(String::as_str),
            }
            .emit();
        }
        let d = &model.descr;
        let wrong = |key: &str, message: String| ModelError::Description {
            model: d.name.clone(),
            key: key.into(),
            message,
        };
        if d.liveomics.role != Some(Role::InstanceSegmentation) {
            return Err(wrong(
                "config.liveomics.role",
                format!(
                    "is {}, not instance-segmentation",
                    d.liveomics.role.map_or("unset", Role::as_str)
                ),
            ));
        }
        let section = d
            .liveomics
            .instanseg
            .as_ref()
            .ok_or_else(|| wrong("config.liveomics.instanseg", "missing".into()))?;
        let channels = model.output_channels(0).len();
        if channels != instanseg::CHANNELS_PER_TARGET && channels != 2 * instanseg::CHANNELS_PER_TARGET {
            return Err(wrong(
                "outputs[0]",
                format!("has {channels} channels; InstanSeg gives 5 per target"),
            ));
        }
        Ok(Self {
            params: params(section),
            nucleus_px: section.nucleus_diameter_px,
            channels,
            model,
            tile,
        })
    }

    /// Whether the network gives cells as well as nuclei.
    pub fn has_cells(&self) -> bool {
        self.channels == 2 * instanseg::CHANNELS_PER_TARGET
    }

    /// Model pixels per field pixel for nuclei `nucleus_px` wide in the field.
    pub fn factor(&self, nucleus_px: f64) -> f64 {
        self.nucleus_px / nucleus_px
    }

    /// The network output for `planes` (`width x height`) resampled by `factor`:
    /// `[channels, h, w]` and that size.
    pub fn embedding(
        &self,
        planes: &[&[u16]],
        width: usize,
        height: usize,
        factor: f64,
    ) -> Result<(Tensor, (usize, usize)), StageError> {
        let (input, (w, h)) = Self::input(planes, width, height, factor);
        let mut out = self.model.run_tiled(input, &self.tile)?;
        if out.data.len() != self.channels * h * w {
            return Err(ModelError::Shape {
                model: self.model.descr.name.clone(),
                message: format!(
                    "the network gave {} values for {} channels of {w}x{h}",
                    out.data.len(),
                    self.channels
                ),
            }
            .into());
        }
        out.shape = vec![self.channels, h, w];
        Ok((out, (w, h)))
    }

    /// The network's input before its preprocessing: `planes` resampled by `factor`, as
    /// `[1, C, h, w]`, and that size.
    pub fn input(planes: &[&[u16]], width: usize, height: usize, factor: f64) -> (Tensor, (usize, usize)) {
        let (w, h) = scale::scaled_size(width, height, factor);
        let mut data = Vec::with_capacity(planes.len() * w * h);
        for p in planes {
            let plane: Vec<f32> = p.iter().map(|&v| v as f32).collect();
            data.extend(scale::resize_linear(&plane, width, height, w, h));
        }
        (Tensor::new(vec![1, planes.len(), h, w], data), (w, h))
    }

    /// Nuclei (and cells, when `cells` and the model gives them) of one field, resampled by
    /// `factor` model pixels per field pixel ([`InstanceModel::factor`]); the post-processing
    /// runs on `compute` (the CUDA kernels, or the CPU).
    pub fn segment(
        &self,
        compute: &Compute,
        planes: &[&[u16]],
        width: usize,
        height: usize,
        factor: f64,
        cells: bool,
    ) -> Result<InstanceLabels, StageError> {
        let t0 = Instant::now();
        let (embedding, (w, h)) = self.embedding(planes, width, height, factor)?;
        let t1 = Instant::now();
        let inst = compute.instanseg(&embedding.data, self.channels, w, h, cells, &self.params)?;
        // Back to the field's size first, so that the numbering skips objects too small to
        // survive the resampling.
        let back = |l: Vec<u32>| scale::resize_labels(&l, w, h, width, height);
        let mut inst = Instances {
            nuclei: back(inst.nuclei),
            cells: inst.cells.map(back),
        };
        let count = instanseg::consecutive(&mut inst);
        Ok(InstanceLabels {
            nuclei: inst.nuclei,
            cells: inst.cells,
            count,
            model_size: (w, h),
            network: t1 - t0,
            post: t1.elapsed(),
        })
    }
}
