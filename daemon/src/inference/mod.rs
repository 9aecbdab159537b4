//! The `inference` stage: runs the configured ONNX models on each field (whole-field roles, by
//! tiles) or on its cells (per-cell roles, crops batched across fields). Sessions are created
//! once per process and shared by every worker; a model that fails on a field is logged and
//! counted, and the field goes on to the sinks with its raw data and segmentation.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use liveomics_adapters::model::{AcquisitionPlan, WellId};
use liveomics_adapters::Invalid;
use liveomics_kernels::cpu::{crop_gather_u16_with, CropSpec};
use liveomics_models::description::{AxisKind, AxisSize, Description};
use liveomics_models::{
    BatchOptions, Batcher, Diffusion, Model, ModelError, Pool, Role, Tensor, TileOptions, WellModel,
};

mod checks;
pub mod config;
mod graph;
pub mod instances;

use crate::component::{Context, Stage, StageConfig, StageError, StageName};
use crate::field::{
    channel_index, mean_column, prediction_column, CellTable, FieldPool, FieldWork, ModelImage, Values, WellReadout,
    GEOMETRY_MEASURES,
};
use crate::resources::PlateStore;
use crate::schedule::{Class, Decision, Scheduler};
use crate::telemetry as t;
use checks::description_checks;
use config::{InferenceConfig, ModelConfig};

/// A well's pooled fields, by (field, timepoint).
type WellState = BTreeMap<(u32, u32), FieldPool>;

/// How a model runs, by its role: each runner holds what that role needs and nothing else, so
/// a per-cell model always has its batcher and a diffusion model its panel.
#[derive(Debug)]
enum Runner {
    /// A whole-field model run by tiles (`segmentation`, `virtual-stain`): an image per field.
    Field { model: Arc<Model>, role: Role },
    /// Crops around each cell, batched across fields (`cell-omics`): values per cell.
    Cells {
        model: Arc<Model>,
        batcher: Batcher,
        crop: CropSpec,
    },
    /// EDM sampling of a protein panel (`virtual-stain-diffusion`): an image per field.
    Diffusion {
        diffusion: Arc<Diffusion>,
        /// Protein names and their label ids.
        panel: Vec<(String, usize)>,
        cell_line: usize,
        steps: usize,
        seed: u64,
    },
    /// Columns of the per-cell table, batched across fields (`cell-table`): values per cell.
    Table { model: Arc<Model>, batcher: Batcher },
    /// Tile features pooled per well (`well-omics`): a readout of the field's well.
    Well {
        model: Arc<WellModel>,
        wells: Mutex<BTreeMap<(String, WellId), WellState>>,
        /// What the plate already pooled for a well (a resumed plate, other members of a cluster)
        /// is read from its store.
        plate: PlateStore,
    },
}

impl Runner {
    fn role(&self) -> Role {
        match self {
            Runner::Field { role, .. } => *role,
            Runner::Cells { .. } => Role::CellOmics,
            Runner::Diffusion { .. } => Role::VirtualStainDiffusion,
            Runner::Well { .. } => Role::WellOmics,
            Runner::Table { .. } => Role::CellTable,
        }
    }

    /// The network whose provider the model runs on.
    fn network(&self) -> &Model {
        match self {
            Runner::Field { model, .. } | Runner::Cells { model, .. } | Runner::Table { model, .. } => model,
            Runner::Diffusion { diffusion, .. } => &diffusion.denoiser,
            Runner::Well { model, .. } => &model.encoder,
        }
    }
}

/// A model ready to run, shared by all workers.
#[derive(Debug)]
struct Loaded {
    name: String,
    /// `inference.models[i]`, the key its errors are filed under.
    key: String,
    /// A cell-table model's declared input columns (resolved by the graph at stage build).
    reads: Option<graph::Reads>,
    /// Plan channel feeding each model input channel.
    channels: Vec<usize>,
    /// Output names: channels of an image, columns per cell, genes of a readout.
    outputs: Vec<String>,
    provider: String,
    runner: Runner,
    class: Class,
}

#[derive(Debug)]
pub struct InferenceStage {
    /// Required models first, then the optional ones in config order: optional work never
    /// delays required work.
    models: Vec<Arc<Loaded>>,
    tile: TileOptions,
    scheduler: Arc<Scheduler>,
    /// The exact columns each cell-table model reads, in its input order ([`graph::resolve`]).
    table_inputs: BTreeMap<String, Vec<String>>,
    /// Whether this is the last stage: only then is the rest of a field's required work known
    /// when an optional model is weighed against its deadline, so only then is anything skipped.
    last: bool,
}

impl StageConfig for InferenceConfig {
    fn validate(&self, ctx: &Context, problems: &mut Vec<Invalid>) {
        problems.extend(self.validate().into_iter().map(|e| e.under(ctx.section)));
    }

    fn build(&self, ctx: &Context, plan: &AcquisitionPlan) -> Result<Box<dyn Stage>, Vec<Invalid>> {
        Ok(Box::new(InferenceStage::new(ctx, plan)?))
    }
}

impl InferenceStage {
    /// Loads every configured model (once per run: the resources share them between workers);
    /// the error lists every model that cannot run, each under its key.
    pub fn new(ctx: &Context, plan: &AcquisitionPlan) -> Result<Self, Vec<Invalid>> {
        let mut models = Vec::new();
        let mut errors = Vec::new();
        for (i, m) in ctx.inference.models.iter().enumerate() {
            // The segmentation stage runs its probability model itself, before segmenting.
            if m.name == ctx.probability_model {
                continue;
            }
            match load(ctx, plan, i, m) {
                Ok(l) => models.push(l),
                // A runtime or provider problem is the same for every model: said once.
                Err(e) if errors.contains(&e) => {}
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        models.sort_by_key(|l| l.class != Class::Required);
        let table_inputs = order_per_cell(ctx, plan, &mut models)?;
        let inf = ctx.inference;
        Ok(Self {
            models,
            table_inputs,
            tile: TileOptions {
                tile: inf.tile_px,
                overlap: inf.tile_overlap_px,
                batch: inf.tile_batch,
            },
            scheduler: Arc::clone(&ctx.resources.scheduler),
            last: ctx.stages.last() == Some(&StageName::Inference),
        })
    }
}

/// The columns the per-cell table has when the inference stage starts on a field: the measure
/// stage's, and the localize stage's when it runs first.
fn base_columns(ctx: &Context, plan: &AcquisitionPlan) -> Vec<String> {
    let mut cols: Vec<String> = ["centroid_x_px", "centroid_y_px"]
        .into_iter()
        .chain(GEOMETRY_MEASURES)
        .chain(["bbox_min_x", "bbox_min_y", "bbox_max_x", "bbox_max_y"])
        .map(String::from)
        .collect();
    cols.extend(plan.channels.iter().map(|c| mean_column(&c.name)));
    if ctx.runs_before(StageName::Localize, StageName::Inference) {
        for (protein, _) in ctx.localization.real(plan) {
            for f in liveomics_kernels::localize::FEATURES {
                cols.push(format!("loc.{protein}.{f}"));
            }
        }
    }
    cols
}

/// Resolves the per-cell model graph and puts the per-cell models (`cell-omics`, `cell-table`)
/// in an order where each runs after every model it reads; the other models keep their places.
/// A chained model inherits the class of what it reads: per-cell models are all `required`
/// (only virtual staining may wait), so a chained model never reads an output that was skipped.
fn order_per_cell(
    ctx: &Context,
    plan: &AcquisitionPlan,
    models: &mut [Arc<Loaded>],
) -> Result<BTreeMap<String, Vec<String>>, Vec<Invalid>> {
    let per_cell = |l: &Loaded| matches!(l.runner, Runner::Cells { .. } | Runner::Table { .. });
    let nodes: Vec<graph::Node> = models
        .iter()
        .filter(|l| per_cell(l))
        .map(|l| graph::Node {
            name: l.name.clone(),
            key: l.key.clone(),
            outputs: l.outputs.iter().map(|o| prediction_column(&l.name, o)).collect(),
            reads: l.reads.clone(),
        })
        .collect();
    if nodes.iter().all(|n| n.reads.is_none()) {
        return Ok(BTreeMap::new());
    }
    let resolved = graph::resolve(&base_columns(ctx, plan), &nodes)?;
    let ordered: Vec<Arc<Loaded>> = resolved
        .order
        .iter()
        .filter_map(|n| models.iter().find(|l| &l.name == n).cloned())
        .collect();
    for (slot, l) in models.iter_mut().filter(|l| per_cell(l)).zip(ordered) {
        *slot = l;
    }
    Ok(resolved.inputs)
}

/// Why an instance-segmentation model is not an `[[inference.models]]` entry.
pub(crate) const INSTANCE_ROLE: &str = "instance-segmentation models are run by the segment stage: set \
     segmentation.method = \"instanseg\" and segmentation.model to the model's folder";

/// Model `i`, loaded once per run for the same settings (the run's resources keep it): every
/// worker's stage shares its session, batcher and well pools.
fn load(ctx: &Context, plan: &AcquisitionPlan, i: usize, m: &ModelConfig) -> Result<Arc<Loaded>, Invalid> {
    let ctx = ctx.at("inference");
    let inf = ctx.inference;
    let cache_key = format!(
        "inference|{m:?}|{:?}|{}|{}|{:?}",
        inf.runtime_options(),
        inf.max_batch,
        inf.max_queue_delay_ms,
        plan.channels
    );
    ctx.resources.loaded(&cache_key, || load_new(&ctx, inf, plan, i, m))
}

/// Description checks against the plan, then the session and, for per-cell models, the batcher.
fn load_new(
    ctx: &Context,
    inf: &InferenceConfig,
    plan: &AcquisitionPlan,
    i: usize,
    m: &ModelConfig,
) -> Result<Loaded, Invalid> {
    let opts = inf.runtime_options();
    let key = ctx.key(&format!("models[{i}]"));
    let d = Description::load(&m.path).map_err(|e| Invalid::new(&format!("{key}.path"), t::error_chain(&e)))?;
    let (role, channels, crop) = description_checks(i, m, &d, ctx, plan)?;
    let class = m.class.unwrap_or(Class::default_for(role));
    if !class.allowed_for(role) {
        return Err(Invalid::new(
            &format!("{key}.class"),
            format!(
                "a {} model is {}: its outputs feed the per-cell tables, the well readouts and the \
                 closed loop, which are written with the field; only virtual-staining models may wait",
                role.as_str(),
                Class::Required.as_str()
            ),
        ));
    }
    // Filed under the key that fixes it: the runtime library and the providers are settings of
    // `[inference]`, everything else is about the model at `path`.
    let path_err = |e: ModelError| {
        let at = match &e {
            ModelError::OrtNotFound { .. } | ModelError::OrtLoad { .. } | ModelError::OrtAlreadyLoaded { .. } => {
                ctx.key("ort_library")
            }
            ModelError::NoProvider { .. } => ctx.key("providers"),
            _ => format!("{key}.path"),
        };
        // Not about one model: said without its name, so that it is said once for all.
        let message = match &e {
            ModelError::NoProvider { tried, reasons, .. } => format!(
                "none of the execution providers {tried:?} could be registered:\n  {}",
                reasons.join("\n  ")
            ),
            _ => t::error_chain(&e),
        };
        Invalid::new(&at, message)
    };
    let runner = match role {
        Role::VirtualStainDiffusion => {
            let diffusion = Arc::new(Diffusion::load(&m.path, &opts).map_err(path_err)?);
            let panel = m
                .panel
                .iter()
                .filter_map(|p| diffusion.protein_id(p).map(|id| (p.clone(), id)))
                .collect();
            let cell_line = if m.cell_line.is_empty() {
                diffusion.default_cell_line()
            } else {
                diffusion.cell_line_id(&m.cell_line).unwrap_or(0)
            };
            Runner::Diffusion {
                steps: m.steps.unwrap_or(diffusion.sampler.steps),
                diffusion,
                panel,
                cell_line,
                seed: m.seed,
            }
        }
        Role::WellOmics => Runner::Well {
            model: Arc::new(WellModel::load(&m.path, &opts).map_err(path_err)?),
            wells: Mutex::new(BTreeMap::new()),
            plate: ctx.resources.plate.clone(),
        },
        Role::CellTable => {
            let model = Arc::new(Model::load(&m.path, &opts).map_err(path_err)?);
            let batcher = batcher(&model, inf, &m.name, &key)?;
            Runner::Table { model, batcher }
        }
        Role::CellOmics => {
            let model = Arc::new(Model::load(&m.path, &opts).map_err(path_err)?);
            let batcher = batcher(&model, inf, &m.name, &key)?;
            Runner::Cells {
                model,
                batcher,
                crop: CropSpec {
                    size: crop,
                    scale: m.crop_scale,
                },
            }
        }
        Role::InstanceSegmentation => return Err(Invalid::new(&format!("{key}.role"), INSTANCE_ROLE)),
        Role::Segmentation | Role::VirtualStain => Runner::Field {
            model: Arc::new(Model::load(&m.path, &opts).map_err(path_err)?),
            role,
        },
    };
    let model = runner.network();
    let provider = model.provider.label();
    let library = liveomics_models::runtime::runtime(opts.ort_library.as_deref())
        .map(|r| r.library.display().to_string())
        .unwrap_or_default();
    t::ModelLoaded {
        model: &m.name,
        role: role.as_str(),
        provider: &provider,
        skipped: &model.skipped,
        library: &library,
    }
    .emit();
    let outputs = {
        let named = model.output_channels(0);
        if !d.liveomics.outputs.is_empty() {
            d.liveomics.outputs.clone()
        } else {
            named
        }
    };
    let outputs = match &runner {
        Runner::Diffusion { panel, .. } => panel.iter().map(|(p, _)| p.clone()).collect(),
        _ => outputs,
    };
    let reads = (role == Role::CellTable).then(|| graph::Reads {
        patterns: if !m.columns.is_empty() {
            m.columns.clone()
        } else if !d.liveomics.columns.is_empty() {
            d.liveomics.columns.clone()
        } else {
            match &d.inputs[0].axes[1].kind {
                AxisKind::Channel { names } => names.clone(),
                _ => Vec::new(),
            }
        },
        key: format!("{key}.columns"),
        length: match d.inputs[0].axes[1].size {
            AxisSize::Fixed(n) => Some(n),
            _ => None,
        },
    });
    Ok(Loaded {
        name: m.name.clone(),
        key,
        reads,
        channels,
        outputs,
        provider,
        runner,
        class,
    })
}

/// The batcher of a per-cell model: its crops or rows are batched across fields.
fn batcher(model: &Arc<Model>, inf: &InferenceConfig, name: &str, key: &str) -> Result<Batcher, Invalid> {
    let name = name.to_string();
    Batcher::new(
        Arc::clone(model),
        BatchOptions {
            max_batch: inf.max_batch,
            max_queue_delay: std::time::Duration::from_millis(inf.max_queue_delay_ms),
        },
        move |s| {
            t::BatchRan {
                model: &name,
                samples: s.samples,
                padded_to: s.padded_to,
                requests: s.requests,
            }
            .emit()
        },
    )
    .map_err(|e| Invalid::new(key, t::error_chain(&e)))
}

/// A per-cell model's `[n, k]` output as `k` columns of the field's table.
fn push_cell_outputs(l: &Loaded, work: &mut FieldWork, out: &Tensor, n: usize) {
    let per = out.data.len().checked_div(n).unwrap_or(l.outputs.len());
    for k in 0..per {
        let name = l.outputs.get(k).cloned().unwrap_or_else(|| format!("out{k}"));
        let values = (0..n).map(|c| out.data[c * per + k]).collect();
        work.cell_predictions.push((prediction_column(&l.name, &name), values));
    }
}

impl InferenceStage {
    /// A cell-table model's input: its columns of the field's table, one row per cell.
    fn table_rows(&self, l: &Loaded, work: &FieldWork) -> Result<Tensor, StageError> {
        let cols = self.table_inputs.get(&l.name).map(Vec::as_slice).unwrap_or_default();
        // Not `work.table()`: that is built once and kept for the sinks, and this model's own
        // outputs are not in it yet.
        let table = CellTable::of(work);
        let (n, k) = (work.records.len(), cols.len());
        let mut data = vec![0f32; n * k];
        for (j, c) in cols.iter().enumerate() {
            let col = table.get(c).ok_or_else(|| StageError::MissingColumn(c.clone()))?;
            match &col.values {
                Values::U32(v) => v.iter().enumerate().for_each(|(i, &x)| data[i * k + j] = x as f32),
                Values::F32(v) => v.iter().enumerate().for_each(|(i, &x)| data[i * k + j] = x),
            }
        }
        Ok(Tensor::new(vec![n, k], data))
    }

    fn run_one(&self, l: &Loaded, work: &mut FieldWork) -> Result<usize, StageError> {
        let f = &work.field;
        let planes = model_planes(l, work)?;
        match &l.runner {
            Runner::Cells { model, batcher, crop } => {
                let centers: Vec<(f32, f32)> = work
                    .records
                    .iter()
                    .map(|r| (r.centroid_x_px, r.centroid_y_px))
                    .collect();
                let n = centers.len();
                let shape = vec![n, planes.len(), crop.size, crop.size];
                // Elementwise preprocessing runs inside the gather, on each crop plane while it
                // is in cache; anything else runs on the whole batch as it is submitted.
                let out = match model.plane_preprocessor(0) {
                    Some(pre) => {
                        let crops = crop_gather_u16_with(&planes, f.width, f.height, &centers, *crop, &pre)?;
                        batcher.run_prepared(Tensor::new(shape, crops), work.deadline)?
                    }
                    None => {
                        let crops = crop_gather_u16_with(&planes, f.width, f.height, &centers, *crop, &|_, _| {})?;
                        batcher.run(Tensor::new(shape, crops), work.deadline)?
                    }
                };
                push_cell_outputs(l, work, &out, n);
                Ok(n)
            }
            Runner::Table { batcher, .. } => {
                let rows = self.table_rows(l, work)?;
                let n = work.records.len();
                let out = batcher.run(rows, work.deadline)?;
                push_cell_outputs(l, work, &out, n);
                Ok(n)
            }
            Runner::Diffusion {
                diffusion,
                panel,
                cell_line,
                steps,
                seed,
            } => {
                let input = planes_tensor(&planes, f.width, f.height);
                let k = &f.key;
                let field_seed = crate::field::fnv1a(
                    format!("{seed}/{}/{}/{}/{}", k.plate, k.well.name(), k.field, k.timepoint).into_bytes(),
                );
                let ids: Vec<usize> = panel.iter().map(|(_, id)| *id).collect();
                let out = diffusion.generate(&input, &ids, *cell_line, *steps, field_seed, || {})?;
                work.images.push(ModelImage {
                    model: l.name.clone(),
                    role: Role::VirtualStainDiffusion,
                    channels: l.outputs.clone(),
                    data: out,
                });
                Ok(panel.len() * steps)
            }
            Runner::Well { model, wells, plate } => {
                let feats = model.field_features(&planes, f.width, f.height)?;
                let mut field_pool = Pool::default();
                field_pool.add(&feats.data, model.features);
                let k = &f.key;
                let (tiles, sum, max) = field_pool.parts();
                let mine = FieldPool {
                    field: k.field,
                    timepoint: k.timepoint,
                    tiles,
                    sum: sum.to_vec(),
                    max: max.to_vec(),
                    values: model.readout(&field_pool)?,
                };
                let stored = stored_pool(plate, k.well, &l.name);
                let mut wells = wells.lock().unwrap_or_else(|e| e.into_inner());
                let st = wells.entry((k.plate.to_string(), k.well)).or_default();
                for p in stored {
                    st.entry((p.field, p.timepoint)).or_insert(p);
                }
                st.entry((k.field, k.timepoint)).or_insert(mine);
                let mut pool = Pool::default();
                for p in st.values() {
                    pool.absorb(p.tiles, &p.sum, &p.max);
                }
                let values = model.readout(&pool)?;
                let per_field: Vec<Vec<f32>> = st.values().map(|p| p.values.clone()).collect();
                let readout = WellReadout {
                    model: l.name.clone(),
                    plate: k.plate.to_string(),
                    well: k.well.name(),
                    fields: st.len(),
                    tiles: pool.tiles,
                    outputs: l.outputs.clone(),
                    spread: spread(&per_field, values.len()),
                    values,
                    pool: st.values().cloned().collect(),
                };
                work.well_readouts.push(readout);
                Ok(feats.shape.first().copied().unwrap_or(0))
            }
            Runner::Field { model, role } => {
                let data = run_field_model(model, &self.tile, &planes, f.width, f.height)?;
                work.images.push(ModelImage {
                    model: l.name.clone(),
                    role: *role,
                    channels: l.outputs.clone(),
                    data,
                });
                Ok(1)
            }
        }
    }
}

/// The fields of `well` pooled for `model` as the plate store has them (the well's
/// `liveomics.bulk.{model}.pool`, written by the last run or member that wrote the well).
fn stored_pool(plate: &PlateStore, well: WellId, model: &str) -> Vec<FieldPool> {
    plate
        .attributes(&format!("{}/{}", well.row_name(), well.column_name()))
        .and_then(|a| a.get("liveomics")?.get("bulk")?.get(model)?.get("pool").cloned())
        .and_then(|p| serde_json::from_value(p).ok())
        .unwrap_or_default()
}

/// Sample standard deviation across fields of each output (0 with fewer than two fields).
fn spread(per_field: &[Vec<f32>], n: usize) -> Vec<f32> {
    let k = per_field.len();
    if k < 2 {
        return vec![0.0; n];
    }
    (0..n)
        .map(|g| {
            let mean = per_field.iter().map(|v| v[g] as f64).sum::<f64>() / k as f64;
            let var = per_field.iter().map(|v| (v[g] as f64 - mean).powi(2)).sum::<f64>() / (k - 1) as f64;
            var.sqrt() as f32
        })
        .collect()
}

/// The acquisition channels a model takes, in its input order.
fn model_planes<'a>(l: &Loaded, work: &'a FieldWork) -> Result<Vec<&'a [u16]>, StageError> {
    l.channels
        .iter()
        .map(|&c| {
            work.field.channels[c]
                .as_deref()
                .ok_or_else(|| StageError::MissingChannel(work.plan.channels[c].name.clone()))
        })
        .collect()
}

/// Camera planes as one `(1, C, H, W)` float tensor, the input of every whole-field role.
pub fn planes_tensor(planes: &[&[u16]], width: usize, height: usize) -> Tensor {
    let mut data = Vec::with_capacity(planes.len() * width * height);
    for p in planes {
        data.extend(p.iter().map(|&v| v as f32));
    }
    Tensor::new(vec![1, planes.len(), height, width], data)
}

/// A whole-field model on the field's planes, by tiles: `[K, H, W]`.
fn run_field_model(
    model: &Model,
    tile: &TileOptions,
    planes: &[&[u16]],
    width: usize,
    height: usize,
) -> Result<Tensor, StageError> {
    let mut out = model.run_tiled(planes_tensor(planes, width, height), tile)?;
    let k = out.data.len() / (width * height);
    out.shape = vec![k, height, width];
    Ok(out)
}

/// A whole-field model whose first output channel is a foreground probability, run by the
/// segmentation stage (`segmentation.probability_model`).
#[derive(Debug, Clone)]
pub struct ProbabilityModel {
    loaded: Arc<Loaded>,
    model: Arc<Model>,
    tile: TileOptions,
}

impl ProbabilityModel {
    /// Loads (or shares) the inference model named `name`; it must have the segmentation role.
    /// `ctx` is the segment stage's: a wrong name is its `probability_model`'s problem.
    pub fn new(ctx: &Context, plan: &AcquisitionPlan, name: &str) -> Result<Self, Invalid> {
        let key = &ctx.key("probability_model");
        let (i, m) = ctx
            .inference
            .models
            .iter()
            .enumerate()
            .find(|(_, m)| m.name == name)
            .ok_or_else(|| {
                let known: Vec<&str> = ctx.inference.models.iter().map(|m| m.name.as_str()).collect();
                Invalid::new(
                    key,
                    format!("no [[inference.models]] named {name:?}; models: {}", known.join(", ")),
                )
            })?;
        let loaded = load(ctx, plan, i, m)?;
        let model = match &loaded.runner {
            Runner::Field {
                model,
                role: Role::Segmentation,
            } => Arc::clone(model),
            other => {
                return Err(Invalid::new(
                    key,
                    format!("model {name:?} has role {}, not segmentation", other.role().as_str()),
                ))
            }
        };
        Ok(Self {
            loaded,
            model,
            tile: TileOptions {
                tile: ctx.inference.tile_px,
                overlap: ctx.inference.tile_overlap_px,
                batch: ctx.inference.tile_batch,
            },
        })
    }

    /// The foreground probability of the field, `H * W`, with the model's latency recorded.
    pub fn probability(&self, work: &FieldWork) -> Result<Vec<f32>, StageError> {
        let t0 = Instant::now();
        let (w, h) = (work.field.width, work.field.height);
        let planes = model_planes(&self.loaded, work)?;
        let mut out = run_field_model(&self.model, &self.tile, &planes, w, h)?;
        t::ModelRan {
            model: &self.loaded.name,
            provider: &self.loaded.provider,
            field: &work.name,
            items: 1,
            elapsed: t0.elapsed(),
        }
        .emit();
        out.data.truncate(w * h);
        Ok(out.data)
    }
}

impl Stage for InferenceStage {
    fn name(&self) -> StageName {
        StageName::Inference
    }

    /// Runs every model; one failing does not stop the others. Required models first; then
    /// each optional one only if the scheduler predicts the field still makes its deadline with
    /// it, else it is owed (the field is degraded). Returns the first failure (all are logged
    /// and counted).
    fn process(&mut self, work: &mut FieldWork) -> Result<(), StageError> {
        let mut first_err = None;
        // A backfill reads the raw planes back from the plate, where a channel that never arrived
        // reads as zeros: an incomplete field's work is done now, never owed. Nor is anything
        // skipped when stages follow this one: their cost is not weighed.
        let may_skip = self.last && work.field.missing_channels().is_empty();
        for l in &self.models {
            if l.class != Class::Required {
                work.required_done_at.get_or_insert_with(Instant::now);
                let decision = if may_skip {
                    self.scheduler.decide(&l.name, l.class, Instant::now(), work.deadline)
                } else {
                    Decision::Run
                };
                if let Decision::Skip(why) = decision {
                    t::WorkDeferred {
                        field: &work.name,
                        model: &l.name,
                        class: l.class.as_str(),
                        why: &why.describe(),
                    }
                    .emit();
                    work.owed.push(l.name.clone());
                    continue;
                }
            }
            if let Err(e) = self.run_timed(l, work) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn run_owed(&mut self, work: &mut FieldWork, models: &[String]) -> Result<(), StageError> {
        // Owed to a model this run does not have (renamed or removed since): the field stays
        // owed rather than being written off as backfilled.
        if let Some(unknown) = models.iter().find(|m| !self.models.iter().any(|l| &l.name == *m)) {
            return Err(StageError::NotConfigured(unknown.clone()));
        }
        let mut first_err = None;
        for l in self.models.iter().filter(|l| models.contains(&l.name)) {
            if let Err(e) = self.run_timed(l, work) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl InferenceStage {
    /// One model on the field, timed: its cost is what the scheduler predicts from.
    fn run_timed(&self, l: &Loaded, work: &mut FieldWork) -> Result<(), StageError> {
        let t0 = Instant::now();
        match self.run_one(l, work) {
            Ok(items) => {
                let elapsed = t0.elapsed();
                self.scheduler.observe(&l.name, elapsed);
                t::ModelRan {
                    model: &l.name,
                    provider: &l.provider,
                    field: &work.name,
                    items,
                    elapsed,
                }
                .emit();
                Ok(())
            }
            Err(e) => {
                t::ModelFailed {
                    model: &l.name,
                    field: &work.name,
                    error: &e,
                }
                .emit();
                work.failed_models.push(l.name.clone());
                Err(e)
            }
        }
    }
}
