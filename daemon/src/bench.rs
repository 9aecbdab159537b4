//! `liveomics bench-write`: the zarr sink's write path on its own, for `benches/write_bench.py`,
//! which runs acquire-zarr and tensorstore on the same frames in the same script and prints the
//! ratios. Frames come from TIFF files so every writer gets identical bytes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use liveomics_adapters::tiff_io::{read_plane, Plane};
use rayon::prelude::*;
use zarrs::array::data_type;

use crate::component::SinkError;
use crate::sink::zarr::node::{store_plane, Store};
use crate::sink::zarr::{Compression, ZarrSinkConfig};

/// Problems running the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Tiff(#[from] liveomics_adapters::tiff_io::TiffError),
    #[error("{0} is not a uint16 image")]
    NotU16(PathBuf),
    #[error("frames differ in size: {0}")]
    Size(PathBuf),
    #[error("no frames given")]
    Empty,
    #[error(transparent)]
    Sink(#[from] SinkError),
}

/// Result of one run, printed as JSON.
#[derive(Debug, serde::Serialize)]
pub struct BenchResult {
    pub frames: usize,
    pub bytes: u64,
    pub seconds: f64,
    pub mb_per_s: f64,
    pub p50_frame_ms: f64,
    pub p99_frame_ms: f64,
}

/// Writes `repeat` passes over `inputs` as a `(t, y, x)` uint16 array with one shard per frame,
/// `chunk_px` subchunks and blosc-zstd (level `level`, byte shuffle): the benchmark's layout.
pub fn write_frames(
    inputs: &[PathBuf],
    repeat: usize,
    out: &Path,
    chunk_px: u64,
    level: i32,
) -> Result<BenchResult, BenchError> {
    let mut frames = Vec::new();
    for p in inputs {
        match read_plane(p)? {
            (w, h, Plane::U16(d)) => frames.push((w, h, d)),
            _ => return Err(BenchError::NotU16(p.clone())),
        }
    }
    let (w, h) = frames.first().map(|f| (f.0, f.1)).ok_or(BenchError::Empty)?;
    if let Some((i, _)) = frames.iter().enumerate().find(|(_, f)| (f.0, f.1) != (w, h)) {
        return Err(BenchError::Size(inputs[i].clone()));
    }
    let n = frames.len() * repeat;
    if n == 0 {
        return Err(BenchError::Empty);
    }
    let cfg = ZarrSinkConfig {
        compression: Compression::BloscZstd,
        compression_level: level,
        shuffle: true,
        chunk_px,
        shard: true,
        ..Default::default()
    };
    let _ = std::fs::remove_dir_all(out);
    let store = Store::open(out, &cfg)?;
    let array = store.create_array(
        "/frames",
        vec![n as u64, h as u64, w as u64],
        vec!["t", "y", "x"],
        data_type::uint16(),
        0u16,
        serde_json::Map::new(),
    )?;
    let start = Instant::now();
    // Frames go to the pool as the sink's planes do: each is its own shard, so they are encoded
    // and written concurrently without ever sharing a file.
    let mut times = (0..n)
        .into_par_iter()
        .with_max_len(1)
        .map(|i| {
            let t0 = Instant::now();
            store_plane(&array, "/frames", &[i as u64], &frames[i % frames.len()].2)?;
            Ok(t0.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<Vec<f64>, SinkError>>()?;
    let seconds = start.elapsed().as_secs_f64();
    times.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| times[((p * (n as f64 - 1.0)).round() as usize).min(n - 1)];
    let bytes = (n * w * h * 2) as u64;
    Ok(BenchResult {
        frames: n,
        bytes,
        seconds,
        mb_per_s: bytes as f64 / 1e6 / seconds,
        p50_frame_ms: q(0.5),
        p99_frame_ms: q(0.99),
    })
}

/// What `liveomics bench-models` measures: wall time of the full model path against the time
/// spent in `session.run` on the same tiles or batches, in the same process.
#[derive(Debug, serde::Serialize)]
pub struct OverheadResult {
    pub what: String,
    pub items: usize,
    pub total_ms: f64,
    pub session_run_ms: f64,
    /// What the path is compared with: `session.run` alone (tiled), or gathering the crops and
    /// `session.run` on the same batches (batched).
    pub baseline: &'static str,
    pub baseline_ms: f64,
    /// total / baseline: 1.10 means pre/post-processing, tiling and batching add 10 %.
    pub ratio: f64,
    /// Batched: whether the model's preprocessing ran inside the crop gather.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fused_preprocessing: Option<bool>,
}

/// Whole-field tiling: `field_px`^2 field through `run_tiled` (preprocess, tiles, blend,
/// postprocess), `reps` times; the best run is reported.
pub fn tiled_overhead(
    model: &liveomics_models::Model,
    field_px: usize,
    tile: usize,
    reps: usize,
) -> Result<OverheadResult, liveomics_models::ModelError> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let channels = match model.descr.inputs[0].axes.get(1).map(|a| &a.size) {
        Some(liveomics_models::description::AxisSize::Fixed(c)) => *c,
        _ => 1,
    };
    let data: Vec<f32> = (0..channels * field_px * field_px)
        .map(|_| rng.random::<f32>() * 4000.0)
        .collect();
    let input = liveomics_models::Tensor::new(vec![1, channels, field_px, field_px], data);
    let opts = liveomics_models::TileOptions {
        tile,
        ..Default::default()
    };
    let mut best: Option<(f64, f64)> = None;
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        let (_, infer) = model.run_tiled_timed(input.clone(), &opts)?;
        let total = t0.elapsed().as_secs_f64() * 1e3;
        let infer = infer.as_secs_f64() * 1e3;
        if best.is_none_or(|(t, _)| total < t) {
            best = Some((total, infer));
        }
    }
    let (total_ms, session_run_ms) = best.unwrap_or_default();
    Ok(OverheadResult {
        what: format!("tiled {} {field_px}x{field_px}, tile {tile}", model.name()),
        items: 1,
        total_ms,
        session_run_ms,
        baseline: "session.run",
        baseline_ms: session_run_ms,
        ratio: total_ms / session_run_ms,
        fused_preprocessing: None,
    })
}

/// Per-cell batching as the daemon runs it: `fields` fields of `cells` crops cut from the
/// landmark planes of a simulated field (the model's elementwise preprocessing fused into the
/// gather when it has one), submitted from two threads through the batcher (queue, bucket
/// padding, split, postprocessing). The baseline, on the same crops in the same process, is what
/// no path can avoid: gather the crops and call `session.run` on the same batch shapes. Both run
/// `reps` times, alternating; the best of each is reported (on a shared machine the spread
/// between runs is larger than the difference being measured).
pub fn batched_overhead(
    model: std::sync::Arc<liveomics_models::Model>,
    fields: usize,
    cells: usize,
    max_batch: usize,
    reps: usize,
) -> Result<OverheadResult, liveomics_models::ModelError> {
    use liveomics_kernels::cpu::{crop_gather_u16_with, CropSpec};
    use rand::{Rng, SeedableRng};
    use std::sync::{Arc, Mutex};
    let shape_err = |message: String| liveomics_models::ModelError::Shape {
        model: model.name().to_string(),
        message,
    };
    let d = &model.descr.inputs[0];
    let fixed = |i: usize| match d.axes.get(i).map(|a| &a.size) {
        Some(liveomics_models::description::AxisSize::Fixed(n)) => Ok(*n),
        _ => Err(shape_err(format!(
            "input axis {i} must have a fixed size for --batched"
        ))),
    };
    let (channels, size) = (fixed(1)?, fixed(2)?);
    let field_px = 1024;
    let landmarks = landmark_field(field_px)?;
    let planes: Vec<&[u16]> = (0..channels)
        .map(|c| landmarks[c % landmarks.len()].as_slice())
        .collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let centers: Vec<Vec<(f32, f32)>> = (0..fields)
        .map(|_| {
            (0..cells)
                .map(|_| {
                    (
                        rng.random::<f32>() * field_px as f32,
                        rng.random::<f32>() * field_px as f32,
                    )
                })
                .collect()
        })
        .collect();
    let spec = CropSpec { size, scale: 1.0 };
    let gather = |c: &[(f32, f32)], pre: &(dyn Fn(usize, &mut [f32]) + Sync)| {
        crop_gather_u16_with(&planes, field_px, field_px, c, spec, pre)
            .map(|v| liveomics_models::Tensor::new(vec![c.len(), channels, size, size], v))
            .map_err(|e| shape_err(e.to_string()))
    };
    let pre = model.plane_preprocessor(0);
    let buckets = liveomics_models::buckets(max_batch);
    let per = channels * size * size;

    // Baseline: gather each field and run it in the batcher's pieces (full buckets, then the
    // rest padded to its bucket) with bare session.run.
    let baseline = || -> Result<(f64, f64), liveomics_models::ModelError> {
        let t0 = Instant::now();
        let mut baseline_run = std::time::Duration::ZERO;
        for c in &centers {
            let t = gather(c, &|_, _| {})?;
            let mut done = 0;
            while done < c.len() {
                let n = (c.len() - done).min(max_batch);
                let bucket = buckets.iter().copied().find(|&b| b >= n).unwrap_or(max_batch);
                let rows = &t.data[done * per..(done + n) * per];
                let padded: Vec<f32>;
                let piece = if n == bucket {
                    rows
                } else {
                    padded = rows
                        .iter()
                        .copied()
                        .chain(std::iter::repeat_n(0.0, (bucket - n) * per))
                        .collect();
                    &padded
                };
                let t1 = Instant::now();
                model.infer_views(&[(&[bucket, channels, size, size], piece)])?;
                baseline_run += t1.elapsed();
                done += n;
            }
        }
        Ok((t0.elapsed().as_secs_f64() * 1e3, baseline_run.as_secs_f64() * 1e3))
    };

    let path = || -> Result<(f64, f64), liveomics_models::ModelError> {
        let infer = Arc::new(Mutex::new(std::time::Duration::ZERO));
        let infer2 = Arc::clone(&infer);
        let batcher = liveomics_models::Batcher::new(
            Arc::clone(&model),
            liveomics_models::BatchOptions {
                max_batch,
                max_queue_delay: std::time::Duration::from_millis(2),
            },
            move |s| *infer2.lock().unwrap_or_else(|e| e.into_inner()) += s.infer_time,
        )?;
        let (a, b) = centers.split_at(fields / 2);
        let t0 = Instant::now();
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        // Each thread queues all its fields, then collects: the batcher is never starved, so the
        // ratio is the cost of the path, not of a caller waiting between fields.
        let work = |fields: &[Vec<(f32, f32)>]| -> Result<(), liveomics_models::ModelError> {
            let pending = fields
                .iter()
                .map(|c| match &pre {
                    Some(pre) => batcher.submit_prepared(gather(c, pre)?, deadline),
                    None => batcher.submit(gather(c, &|_, _| {})?, deadline),
                })
                .collect::<Result<Vec<_>, _>>()?;
            for rx in pending {
                rx.recv().map_err(|_| liveomics_models::ModelError::BatcherGone {
                    model: batcher.model().name().to_string(),
                })??;
            }
            Ok(())
        };
        std::thread::scope(|s| -> Result<(), liveomics_models::ModelError> {
            let h = s.spawn(|| work(a));
            work(b)?;
            // A panicked half would leave a ratio from half the work: pass the panic on.
            h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
        })?;
        let total_ms = t0.elapsed().as_secs_f64() * 1e3;
        let session_run_ms = infer.lock().unwrap_or_else(|e| e.into_inner()).as_secs_f64() * 1e3;
        Ok((total_ms, session_run_ms))
    };
    let (mut best_base, mut best_path) = ((f64::INFINITY, 0.0), (f64::INFINITY, 0.0));
    for _ in 0..reps.max(1) {
        let b = baseline()?;
        if b.0 < best_base.0 {
            best_base = b;
        }
        let p = path()?;
        if p.0 < best_path.0 {
            best_path = p;
        }
    }
    let ((baseline_ms, baseline_run_ms), (total_ms, session_run_ms)) = (best_base, best_path);
    Ok(OverheadResult {
        what: format!(
            "batched {} crops [{channels}, {size}, {size}], max_batch {max_batch}, best of {} (baseline session.run {baseline_run_ms:.1} ms)",
            model.name(),
            reps.max(1)
        ),
        items: fields * cells,
        total_ms,
        session_run_ms,
        baseline: "crop gather + session.run",
        baseline_ms,
        ratio: total_ms / baseline_ms,
        fused_preprocessing: Some(pre.is_some()),
    })
}

/// Cost of a seed-model role on one simulated field (`liveomics bench-models --well/--diffusion`).
#[derive(Debug, serde::Serialize)]
pub struct RoleCost {
    pub what: String,
    pub provider: String,
    /// Best of the repetitions, whole field.
    pub ms_per_field: f64,
    /// Diffusion: per denoiser evaluation of one protein.
    pub ms_per_protein_step: Option<f64>,
}

/// Landmark planes of a simulated field of the training cell line (the models' domain).
fn landmark_field(field_px: usize) -> Result<Vec<Vec<u16>>, liveomics_models::ModelError> {
    let cfg = liveomics_adapters::simulator::SimulatorConfig {
        gene_seed: Some(7),
        width_px: field_px as u32,
        height_px: field_px as u32,
        ..Default::default()
    };
    let sim = liveomics_adapters::simulator::Simulator::new(cfg).map_err(|e| liveomics_models::ModelError::Shape {
        model: "simulator".into(),
        message: e.to_string(),
    })?;
    let f = sim.render(liveomics_adapters::model::WellId { row: 1, column: 2 }, 0, 0);
    Ok(f.channels.into_iter().take(3).collect())
}

/// Well-omics: tile features of one field, pooled, and the head.
pub fn well_cost(
    m: &liveomics_models::WellModel,
    field_px: usize,
    reps: usize,
) -> Result<RoleCost, liveomics_models::ModelError> {
    let planes = landmark_field(field_px)?;
    let refs: Vec<&[u16]> = planes.iter().map(Vec::as_slice).collect();
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        let f = m.field_features(&refs, field_px, field_px)?;
        let mut pool = liveomics_models::Pool::default();
        pool.add(&f.data, m.features);
        m.readout(&pool)?;
        best = best.min(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(RoleCost {
        what: format!("well-omics {} {field_px}x{field_px}", m.name()),
        provider: m.encoder.provider.label(),
        ms_per_field: best,
        ms_per_protein_step: None,
    })
}

/// Diffusion: encode, `steps` Euler steps for a panel of `panel` proteins, decode.
pub fn diffusion_cost(
    d: &liveomics_models::Diffusion,
    field_px: usize,
    panel: usize,
    steps: usize,
    reps: usize,
) -> Result<RoleCost, liveomics_models::ModelError> {
    let planes = landmark_field(field_px)?;
    let refs: Vec<&[u16]> = planes.iter().map(Vec::as_slice).collect();
    let input = crate::inference::planes_tensor(&refs, field_px, field_px);
    let vocab = d.denoiser.descr.liveomics.proteins.len();
    let ids: Vec<usize> = (0..panel).map(|i| 1 + i % vocab.saturating_sub(1).max(1)).collect();
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        d.generate(&input, &ids, d.default_cell_line(), steps, 1, || {})?;
        best = best.min(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(RoleCost {
        what: format!(
            "diffusion {} {field_px}x{field_px}, panel {panel}, {steps} steps",
            d.name()
        ),
        provider: d.denoiser.provider.label(),
        ms_per_field: best,
        ms_per_protein_step: Some(best / (panel * steps).max(1) as f64),
    })
}

/// One image through nuclei segmentation and per-nucleus measurement (`liveomics bench-segment`).
#[derive(Debug, serde::Serialize)]
pub struct SegmentBench {
    /// `cpu`, or the CUDA device the kernels ran on.
    pub device: String,
    pub file: String,
    pub width: usize,
    pub height: usize,
    pub nuclei: u32,
    /// Best of the repeats, segmentation + region properties, TIFF reading excluded (on a GPU:
    /// uploads and downloads included).
    pub best_ms: f64,
    pub median_ms: f64,
}

/// Times the daemon's nuclei segmentation (smoothing, Otsu, distance transform, seeds, watershed,
/// size filter) plus region properties on each file, and writes the labels to `out_dir` for the
/// accuracy comparison in `benches/segment_bench.py`.
pub fn segment_files(
    compute: &liveomics_kernels::gpu::Compute,
    files: &[PathBuf],
    out_dir: &Path,
    (pixel_size_um, diameter_um): (f64, f64),
    foreground: liveomics_kernels::segment::Foreground,
    repeat: usize,
) -> Result<Vec<SegmentBench>, crate::segment_cli::SegmentError> {
    use liveomics_kernels::segment::NucleiParams;
    let gpu = |source| crate::segment_cli::SegmentError::Gpu {
        device: compute.describe(),
        source,
    };
    let mut params = NucleiParams::from_physical(diameter_um, pixel_size_um)?;
    params.foreground = foreground;
    let mut out = Vec::new();
    for f in files {
        let (w, h, planes) = liveomics_adapters::tiff_io::read_channels(f)?;
        let mut notes = Vec::new();
        let img = crate::segment_cli::to_u16(&planes[0], &mut notes);
        let mut times = Vec::new();
        let mut result = (Vec::new(), 0);
        for _ in 0..repeat.max(1) {
            let t0 = Instant::now();
            result = compute.segment_nuclei(&img, w, h, &params).map_err(gpu)?;
            let props = compute.region_props(&result.0, &[&img], w, h).map_err(gpu)?;
            std::hint::black_box(props);
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        write_plane_u32(&out_dir.join(&name), w, h, &result.0)?;
        out.push(SegmentBench {
            device: compute.describe(),
            file: name,
            width: w,
            height: h,
            nuclei: result.1,
            best_ms: times[0],
            median_ms: times[times.len() / 2],
        });
    }
    Ok(out)
}

fn write_plane_u32(path: &Path, w: usize, h: usize, labels: &[u32]) -> Result<(), crate::segment_cli::SegmentError> {
    Ok(liveomics_adapters::tiff_io::write_plane(
        path,
        w,
        h,
        &liveomics_adapters::tiff_io::Plane::U32(labels.to_vec()),
    )?)
}

/// `bench-instanseg`: one image through InstanSeg as the segment stage runs it, with where the
/// time goes, the classical path on the same image, and (with `dump`) the model's preprocessed
/// input and its nuclei at the model's scale, for benches/instanseg.py to run the TorchScript
/// original on the very same tensor and compare labels.
#[derive(Debug, serde::Serialize)]
pub struct InstansegBench {
    pub provider: String,
    /// Where the post-processing and the classical path ran.
    pub compute: String,
    pub width: usize,
    pub height: usize,
    pub model_width: usize,
    pub model_height: usize,
    pub factor: f64,
    pub nuclei: u32,
    /// Medians over the repetitions (after one warm-up), ms.
    pub resample_preprocess_network_ms: f64,
    pub post_ms: f64,
    pub total_ms: f64,
    pub classical_ms: f64,
    pub classical_nuclei: u32,
}

pub fn instanseg_image(
    model: &crate::inference::instances::InstanceModel,
    compute: &liveomics_kernels::gpu::Compute,
    image: &Path,
    factor: f64,
    reps: usize,
    dump: Option<&Path>,
) -> Result<InstansegBench, crate::segment_cli::SegmentError> {
    use liveomics_kernels::instanseg;
    use liveomics_kernels::segment::NucleiParams;
    let (w, h, planes) = liveomics_adapters::tiff_io::read_channels(image)?;
    let mut notes = Vec::new();
    let img = crate::segment_cli::to_u16(&planes[0], &mut notes);
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (mut net, mut post, mut total, mut classical) = (vec![], vec![], vec![], vec![]);
    let mut labels = None;
    let mut classical_n = 0;
    // Nucleus diameter in field pixels that this factor resamples to the model's.
    let params = NucleiParams::from_physical(model.nucleus_px / factor, 1.0)?;
    for rep in 0..=reps.max(1) {
        let r = model.segment(compute, &[&img], w, h, factor, false)?;
        let t0 = Instant::now();
        let (n, count) =
            compute
                .segment_nuclei(&img, w, h, &params)
                .map_err(|source| crate::segment_cli::SegmentError::Gpu {
                    device: compute.describe(),
                    source,
                })?;
        std::hint::black_box(n);
        if rep > 0 {
            classical.push(t0.elapsed().as_secs_f64() * 1e3);
            net.push(r.network.as_secs_f64() * 1e3);
            post.push(r.post.as_secs_f64() * 1e3);
            total.push((r.network + r.post).as_secs_f64() * 1e3);
        }
        classical_n = count;
        labels = Some(r);
    }
    let r = labels.expect("at least one repetition");
    let (mw, mh) = r.model_size;
    if let Some(dir) = dump {
        let to_err = |e: liveomics_models::ModelError| crate::segment_cli::SegmentError::Model {
            path: dir.to_path_buf(),
            source: Box::new(e),
        };
        let (mut input, _) = crate::inference::instances::InstanceModel::input(&[&img], w, h, factor);
        model.model.preprocess(0, &mut input);
        liveomics_models::npy::write(&dir.join("model_input.npy"), &input).map_err(to_err)?;
        let (e, _) = model.embedding(&[&img], w, h, factor)?;
        let mut inst = instanseg::instances(&e.data, model.channels, mw, mh, false, &model.params)?;
        instanseg::consecutive(&mut inst);
        let lab = liveomics_models::Tensor::new(vec![mh, mw], inst.nuclei.iter().map(|&v| v as f32).collect());
        liveomics_models::npy::write(&dir.join("nuclei_model_scale.npy"), &lab).map_err(to_err)?;
        let field = liveomics_models::Tensor::new(vec![h, w], r.nuclei.iter().map(|&v| v as f32).collect());
        liveomics_models::npy::write(&dir.join("nuclei.npy"), &field).map_err(to_err)?;
    }
    Ok(InstansegBench {
        provider: model.model.provider.label(),
        compute: compute.describe(),
        width: w,
        height: h,
        model_width: mw,
        model_height: mh,
        factor,
        nuclei: r.count,
        resample_preprocess_network_ms: median(net),
        post_ms: median(post),
        total_ms: median(total),
        classical_ms: median(classical),
        classical_nuclei: classical_n,
    })
}

/// What the localize stage costs on top of the measure stage, on one simulated field.
#[derive(Debug, serde::Serialize)]
pub struct LocalizeCost {
    pub field_px: usize,
    pub cells: usize,
    pub proteins: usize,
    /// Median ms: region properties over every channel (the measure stage).
    pub measure_ms: f64,
    /// Median ms: compartments and every protein's profiles (the localize stage).
    pub localize_ms: f64,
    /// `(measure + localize) / measure`.
    pub ratio: f64,
}

/// The measure stage's work with and without localization, alternated on the same simulated
/// field of four protein channels (the simulator's own labels, so segmentation is not timed);
/// proteins are profiled in parallel, as the stage does.
pub fn localize_cost(field_px: usize, reps: usize) -> Result<LocalizeCost, liveomics_kernels::KernelError> {
    use liveomics_adapters::simulator::{Localization as L, ProteinChannel, Simulator, SimulatorConfig};
    let proteins = [
        ("HNRNPA1", L::Nuclear),
        ("CALR", L::Er),
        ("ATP1A1", L::Membrane),
        ("TOMM20", L::Mitochondria),
    ];
    let cfg = SimulatorConfig {
        width_px: field_px as u32,
        height_px: field_px as u32,
        proteins: proteins
            .iter()
            .map(|(n, l)| ProteinChannel {
                name: n.to_string(),
                localization: *l,
            })
            .collect(),
        ..Default::default()
    };
    let sim = Simulator::new(cfg).map_err(|e| liveomics_kernels::KernelError::Parameter {
        name: "simulator",
        reason: e.to_string(),
    })?;
    let f = sim.render(liveomics_adapters::model::WellId { row: 1, column: 2 }, 0, 0);
    let (w, h) = (f.width, f.height);
    let planes: Vec<&[u16]> = f.channels.iter().map(Vec::as_slice).collect();
    // The stage's own defaults at the simulator's pixel size.
    let params = crate::localize::LocalizationConfig::default().params(0.65);
    let (mut measure, mut localize) = (Vec::new(), Vec::new());
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        let props = liveomics_kernels::measure::region_props(&f.cell_labels, &planes, w, h)?;
        let nuc = liveomics_kernels::measure::region_props(&f.nuclei_labels, &[], w, h)?;
        std::hint::black_box((props, nuc));
        measure.push(t0.elapsed().as_secs_f64() * 1e3);
        let t0 = Instant::now();
        let c =
            liveomics_kernels::localize::compartments(&f.nuclei_labels, &f.cell_labels, Some(planes[2]), w, h, params)?;
        let profiles: Result<Vec<_>, _> = planes[3..].par_iter().map(|p| c.profiles(p)).collect();
        std::hint::black_box(profiles?);
        localize.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (m, l) = (median(&mut measure), median(&mut localize));
    Ok(LocalizeCost {
        field_px,
        cells: f.cells.len(),
        proteins: proteins.len(),
        measure_ms: m,
        localize_ms: l,
        ratio: (m + l) / m,
    })
}
