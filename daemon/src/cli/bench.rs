//! The hidden `bench-*` subcommands that `benches/` drive: one JSON line per measurement.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

use super::models::RuntimeArgs;
use super::Usage;

#[derive(Debug, clap::Args)]
pub struct BenchModelsArgs {
    /// Whole-field model run by tiles.
    #[arg(long)]
    tiled: Option<PathBuf>,
    #[arg(long, default_value_t = 2160)]
    field_px: usize,
    #[arg(long, default_value_t = 512)]
    tile: usize,
    /// Per-cell model run through the batcher.
    #[arg(long)]
    batched: Option<PathBuf>,
    #[arg(long, default_value_t = 20)]
    fields: usize,
    #[arg(long, default_value_t = 200)]
    cells: usize,
    #[arg(long, default_value_t = 64)]
    max_batch: usize,
    /// Well-omics model: tile features + pooling + head on a simulated field of --field-px.
    #[arg(long)]
    well: Option<PathBuf>,
    /// Diffusion model: a simulated field of --field-px, --panel proteins, --steps Euler steps.
    #[arg(long)]
    diffusion: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    panel: usize,
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 3)]
    reps: usize,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

/// `bench-models`: model path overhead against bare `session.run` on the same tiles and batches.
pub fn bench_models(a: &BenchModelsArgs) -> anyhow::Result<ExitCode> {
    let opts = a.runtime.options().map_err(Usage)?;
    if let Some(p) = &a.tiled {
        let m = liveomics_models::Model::load(p, &opts)?;
        announce(&m);
        let r = liveomics::bench::tiled_overhead(&m, a.field_px, a.tile, a.reps)?;
        println!("{}", serde_json::to_string(&r)?);
    }
    if let Some(p) = &a.batched {
        let m = std::sync::Arc::new(liveomics_models::Model::load(p, &opts)?);
        announce(&m);
        let r = liveomics::bench::batched_overhead(m, a.fields, a.cells, a.max_batch, a.reps)?;
        println!("{}", serde_json::to_string(&r)?);
    }
    if let Some(p) = &a.well {
        let m = liveomics_models::WellModel::load(p, &opts)?;
        announce(&m.encoder);
        let r = liveomics::bench::well_cost(&m, a.field_px, a.reps)?;
        println!("{}", serde_json::to_string(&r)?);
    }
    if let Some(p) = &a.diffusion {
        let d = liveomics_models::Diffusion::load(p, &opts)?;
        announce(&d.denoiser);
        let r = liveomics::bench::diffusion_cost(&d, a.field_px, a.panel, a.steps, a.reps)?;
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// `bench-segment`: nuclei segmentation and region properties per TIFF.
pub fn bench_segment(
    out_dir: &Path,
    pixel_size_um: f64,
    diameter_um: f64,
    repeat: usize,
    device: &str,
    threshold: liveomics::stage::NucleiThreshold,
    files: &[PathBuf],
) -> anyhow::Result<ExitCode> {
    let request = device
        .parse()
        .map_err(|e: liveomics_kernels::gpu::BadDeviceRequest| Usage::msg(format!("--device {e}")))?;
    let (compute, fallback) = liveomics_kernels::gpu::Compute::select(request)?;
    if let Some(why) = fallback {
        eprintln!("device auto: running on the CPU ({why})");
    }
    for r in liveomics::bench::segment_files(
        &compute,
        files,
        out_dir,
        (pixel_size_um, diameter_um),
        threshold.into(),
        repeat,
    )? {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Args)]
pub struct BenchInstansegArgs {
    /// A 2-D TIFF (its first channel is the nuclear one).
    image: PathBuf,
    #[arg(long, default_value = liveomics::stage::DEFAULT_MODEL)]
    model: PathBuf,
    /// Model pixels per image pixel.
    #[arg(long)]
    factor: f64,
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Tile side for the network (as `inference.tile_px`).
    #[arg(long, default_value_t = liveomics::stage::DEFAULT_INSTANSEG_TILE_PX)]
    tile: usize,
    /// Run the whole network (nuclei and cells decoders), as the TorchScript original does, not
    /// the nuclei decoder alone the daemon runs when cells come from elsewhere.
    #[arg(long)]
    whole_network: bool,
    /// InstanSeg's seed threshold; default: the model's own (what the TorchScript original uses).
    #[arg(long)]
    seed_threshold: Option<f32>,
    /// Folder for model_input.npy, nuclei_model_scale.npy and nuclei.npy.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Where the post-processing (and the classical comparison) runs: `cpu`, `auto`, `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

/// `bench-instanseg`: see [`liveomics::bench::instanseg_image`].
pub fn bench_instanseg(a: &BenchInstansegArgs) -> anyhow::Result<ExitCode> {
    let opts = a.runtime.options().map_err(Usage)?;
    let path = liveomics::inference::instances::find_model(&a.model).unwrap_or_else(|| a.model.clone());
    let mut m = liveomics::inference::instances::InstanceModel::load(
        &path,
        &opts,
        liveomics_models::TileOptions {
            tile: a.tile,
            ..Default::default()
        },
        a.whole_network,
    )?;
    if let Some(v) = a.seed_threshold {
        m.params.seed_threshold = v;
    }
    announce(&m.model);
    let request = a
        .device
        .parse()
        .map_err(|e: liveomics_kernels::gpu::BadDeviceRequest| Usage::msg(format!("--device {e}")))?;
    let (compute, fallback) = liveomics_kernels::gpu::Compute::select(request)?;
    if let Some(why) = fallback {
        eprintln!("device auto: running on the CPU ({why})");
    }
    eprintln!("post-processing on {}", compute.describe());
    let r = liveomics::bench::instanseg_image(&m, &compute, &a.image, a.factor, a.reps, a.dump.as_deref())?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(ExitCode::SUCCESS)
}

/// `bench-write`: frames through the zarr write path.
pub fn bench_write(
    out: &Path,
    repeat: usize,
    chunk_px: u64,
    level: i32,
    frames: &[PathBuf],
) -> anyhow::Result<ExitCode> {
    let r = liveomics::bench::write_frames(frames, repeat, out, chunk_px, level).context("bench-write failed")?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(ExitCode::SUCCESS)
}

/// Says on stderr which execution provider a benchmarked model runs on, and why the ones before it
/// in `--providers` did not: a timing means little without it.
fn announce(m: &liveomics_models::Model) {
    eprintln!("{}: provider {}", m.descr.name, m.provider.label());
    for s in &m.skipped {
        eprintln!("  skipped {s}");
    }
}
