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

/// What a run asks of its segmentation, for `auto` to weigh InstanSeg's measured cost against:
/// fields of this size, each within `budget`, arriving `pace_fields_per_s` (when the source has
/// a pace: a simulated or paced microscope).
#[derive(Debug, Clone)]
pub struct Demand {
    pub width: usize,
    pub height: usize,
    /// Nucleus diameter in field pixels (sets InstanSeg's resampling).
    pub nucleus_px: f64,
    /// Whether the network segments cells too (it then reads the cytoplasm channel as well).
    pub cells: bool,
    pub budget: Duration,
    pub pace_fields_per_s: Option<f64>,
}

/// The share of a field's time InstanSeg may take: the rest of the pipeline (measurement, models,
/// the zarr encode) needs the remainder.
pub const AUTO_SHARE: f64 = 0.8;

impl Demand {
    /// The most one field's segmentation may cost: [`AUTO_SHARE`] of the budget, or of the time
    /// between fields when they come faster than the budget.
    pub fn limit(&self) -> Duration {
        let mut limit = self.budget.as_secs_f64();
        if let Some(p) = self.pace_fields_per_s.filter(|p| *p > 0.0) {
            limit = limit.min(1.0 / p);
        }
        Duration::from_secs_f64(limit * AUTO_SHARE)
    }

    /// Whether InstanSeg at `cost` per field sustains this demand, with the figures for the log.
    pub fn sustained_by(&self, cost: Duration) -> (bool, String) {
        let limit = self.limit();
        let pace = self
            .pace_fields_per_s
            .filter(|p| *p > 0.0)
            .map_or("no pace".to_string(), |p| format!("{p} fields/s"));
        let figures = format!(
            "InstanSeg costs {:.0} ms per {}x{} field here; the run allows {:.0} ms ({:.0} % of min(budget {} ms, 1 / {pace}))",
            cost.as_secs_f64() * 1e3,
            self.width,
            self.height,
            limit.as_secs_f64() * 1e3,
            AUTO_SHARE * 100.0,
            self.budget.as_millis(),
        );
        (cost <= limit, figures)
    }
}

/// InstanSeg's cost per field of `demand`'s size, measured warm: the network on a crop of at most
/// 512² model pixels, run twice (the first warms the session), scaled by the field's model
/// pixels (the network's work is linear in pixels), plus the post-processing share measured on
/// the same crop. About 1 s on 2 CPU cores, where a whole 2160² field would take 10.
pub fn measure(m: &InstanceModel, demand: &Demand, compute: &Compute) -> Result<Duration, StageError> {
    let factor = m.factor(demand.nucleus_px);
    let (mw, mh) = scale::scaled_size(demand.width, demand.height, factor);
    let side = |model: usize, field: usize| ((512.min(model) as f64 / factor).round() as usize).clamp(16, field);
    let (cw, ch) = (side(mw, demand.width), side(mh, demand.height));
    // Nucleus-sized blobs over a background, so that the post-processing has objects to find.
    let r = (demand.nucleus_px / 2.0).max(2.0);
    let plane: Vec<u16> = (0..cw * ch)
        .map(|i| {
            let (x, y) = ((i % cw) as f64, (i / cw) as f64);
            let (dx, dy) = ((x % (4.0 * r)) - 2.0 * r, (y % (4.0 * r)) - 2.0 * r);
            if dx * dx + dy * dy < r * r {
                2000
            } else {
                200 + (i * 7919 % 97) as u16
            }
        })
        .collect();
    let cells = demand.cells && m.has_cells();
    let planes: Vec<&[u16]> = vec![plane.as_slice(); 1 + usize::from(cells)];
    let run = || m.segment(compute, &planes, cw, ch, factor, cells);
    run()?;
    let t0 = Instant::now();
    run()?;
    let crop = t0.elapsed().as_secs_f64();
    let (crop_w, crop_h) = scale::scaled_size(cw, ch, factor);
    let scale = (mw * mh) as f64 / (crop_w * crop_h).max(1) as f64;
    Ok(Duration::from_secs_f64(crop * scale))
}

/// The InstanSeg model that `auto` or `instanseg` runs, or `None` for the classical path, with
/// the choice logged either way: `auto` falls back on any problem, `instanseg` only when ONNX
/// Runtime is missing. `seed_threshold` replaces the model's. With a `demand`, `auto` also
/// measures InstanSeg here and keeps it only where it sustains the run (an explicit `instanseg`
/// is always honoured).
#[allow(clippy::too_many_arguments)]
pub fn choose(
    auto: bool,
    model: &Path,
    opts: &RuntimeOptions,
    tile: TileOptions,
    seed_threshold: f32,
    cells: bool,
    demand: Option<(&Demand, &Compute)>,
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
            if let (true, Some((demand, compute))) = (auto, demand) {
                let verdict = measure(&m, demand, compute).map(|cost| demand.sustained_by(cost));
                match verdict {
                    Ok((true, figures)) => t::SegmentAutoMeasured {
                        chosen: "instanseg",
                        figures: &figures,
                    }
                    .emit(),
                    Ok((false, figures)) => {
                        t::SegmentAutoMeasured {
                            chosen: "classical",
                            figures: &figures,
                        }
                        .emit();
                        return fallback(&format!("{figures}: too slow for this run"));
                    }
                    Err(e) => return fallback(&format!("InstanSeg failed its timing run: {}", t::error_chain(&e))),
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn demand(budget_ms: u64, pace: Option<f64>) -> Demand {
        Demand {
            width: 2160,
            height: 2160,
            nucleus_px: 17.0,
            cells: false,
            budget: Duration::from_millis(budget_ms),
            pace_fields_per_s: pace,
        }
    }

    #[test]
    fn auto_keeps_instanseg_only_where_its_cost_fits_the_budget_and_the_pace() {
        let ms = Duration::from_millis;
        // 2 CPU cores on a 2160² field: about 10 s, against 2 fields/s within 2 s.
        let (ok, figures) = demand(2000, Some(2.0)).sustained_by(ms(10_000));
        assert!(!ok, "{figures}");
        assert!(figures.contains("10000 ms") && figures.contains("400 ms"), "{figures}");
        // A GPU: tens of ms.
        assert!(demand(2000, Some(2.0)).sustained_by(ms(40)).0);
        // The pace binds before the budget: 8 s of budget, but a field every 0.5 s.
        assert!(!demand(8000, Some(2.0)).sustained_by(ms(1000)).0);
        // Without a pace (a folder, the network) only the budget counts.
        assert!(demand(8000, None).sustained_by(ms(3000)).0);
        assert!(!demand(2000, None).sustained_by(ms(3000)).0);
        // The rest of the pipeline keeps its share: 95 % of the budget is too much.
        assert!(!demand(1000, None).sustained_by(ms(950)).0);
        assert_eq!(demand(1000, None).limit(), ms(800));
    }
}
