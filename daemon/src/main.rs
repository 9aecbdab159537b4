//! `liveomics`: the command line over the library. Exit codes: 0 success, 1 runtime failure,
//! 2 invalid configuration or usage, 3 the plate finished but some fields failed to write,
//! 130 a second interrupt forced an immediate exit.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use liveomics::component::SourceName;
use liveomics::config::{Config, DEFAULT_TOML};
use liveomics::pipeline::{self, RunOptions, RunSummary};
use liveomics::replay::ReplayConfig;
use liveomics::resources::Resources;
use liveomics::telemetry;
use liveomics_adapters::folder::layout::{Layout, LayoutKind};
use liveomics_adapters::folder::Speed;
use liveomics_adapters::source::StopToken;

#[derive(Debug, Parser)]
#[command(
    name = "liveomics",
    version,
    about = "Live image-based omics beside a high-content screening microscope"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Acquire, segment, write OME-Zarr and publish on zenoh until the plate is done or SIGINT/SIGTERM.
    Run {
        /// Configuration file; without it the embedded default runs (a small simulated plate).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Replace an existing plate at the output path.
        #[arg(long)]
        overwrite: bool,
        /// Override `sinks.zarr.output`.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Check a configuration file and print every error with its key path (exit 2 if any).
    Validate { file: PathBuf },
    /// Write the configured simulated plate as TIFF files plus ground truth.
    Simulate {
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        config: Option<PathBuf>,
        /// Name image files as this instrument does: phenix, imagexpress or cellvoyager.
        #[arg(long, value_parser = parse_layout)]
        layout: Option<LayoutKind>,
        /// Write image files one by one at this rate (0: as fast as possible).
        #[arg(long, default_value_t = 0.0)]
        files_per_s: f64,
    },
    /// Re-run a finished plate (an instrument folder or a liveomics OME-Zarr plate) through the
    /// pipeline, in acquisition order, at the original pace scaled by --speed or as fast as possible.
    Replay {
        /// A `{plate}.zarr` written by liveomics, or a folder of instrument TIFFs.
        path: PathBuf,
        /// max, realtime, or a factor like 4x.
        #[arg(long, default_value = "max")]
        speed: String,
        /// Folder layout (phenix, imagexpress, cellvoyager); detected from the file names if absent.
        #[arg(long, value_parser = parse_layout)]
        layout: Option<LayoutKind>,
        /// Channel names in channel-number order, comma-separated (folders only).
        #[arg(long, value_delimiter = ',')]
        channels: Vec<String>,
        /// Pixel size of folder images without OME-XML.
        #[arg(long)]
        pixel_size_um: Option<f64>,
        /// Configuration for everything but the source (stages, sinks).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override `sinks.zarr.output`.
        #[arg(long)]
        output: Option<PathBuf>,
        #[arg(long)]
        overwrite: bool,
    },
    /// Segment nuclei (and cells) in a TIFF with the daemon's segmentation; writes uint32 label TIFFs.
    Segment(liveomics::segment_cli::SegmentRequest),
    /// Check and run ONNX models described by bioimage.io descriptions.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Print the embedded default configuration.
    PrintConfig,
    /// Benchmark: model path overhead (tiling, batching, pre/postprocessing) against bare
    /// session.run on the same tiles and batches; prints one JSON line per measurement.
    #[command(hide = true)]
    BenchModels(BenchModelsArgs),
    /// Benchmark helper for benches/segment_bench.py: nuclei segmentation + region properties per
    /// TIFF, labels written to --out-dir, one JSON line per file.
    #[command(hide = true)]
    BenchSegment {
        #[arg(long)]
        out_dir: PathBuf,
        #[arg(long, default_value_t = 0.65)]
        pixel_size_um: f64,
        #[arg(long, default_value_t = 11.0)]
        diameter_um: f64,
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// auto, cpu or cuda:N (as `compute.device`).
        #[arg(long, default_value = "cpu")]
        device: String,
        files: Vec<PathBuf>,
    },
    /// Benchmark helper: write uint16 TIFF frames through the zarr write path and print JSON
    /// (used by benches/write_bench.py).
    #[command(hide = true)]
    BenchWrite {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        #[arg(long, default_value_t = 512)]
        chunk_px: u64,
        #[arg(long, default_value_t = 1)]
        level: i32,
        frames: Vec<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct BenchModelsArgs {
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

#[derive(Debug, clap::Args)]
struct RuntimeArgs {
    /// Execution providers in order of preference, comma-separated: tensorrt[:N], cuda[:N], cpu.
    #[arg(long, value_delimiter = ',', default_value = "cuda,cpu")]
    providers: Vec<String>,
    /// libonnxruntime to load (default: ORT_DYLIB_PATH, the repo's .venv, then Python's onnxruntime).
    #[arg(long)]
    ort_library: Option<PathBuf>,
    /// Threads inside one ONNX operator (0: one per core).
    #[arg(long, default_value_t = 0)]
    intra_threads: usize,
}

impl RuntimeArgs {
    fn options(&self) -> anyhow::Result<liveomics_models::RuntimeOptions> {
        Ok(liveomics_models::RuntimeOptions {
            ort_library: self.ort_library.clone(),
            providers: self
                .providers
                .iter()
                .map(|p| liveomics_models::Provider::parse(p).map_err(anyhow::Error::from))
                .collect::<anyhow::Result<_>>()?,
            intra_threads: self.intra_threads,
        })
    }
}

#[derive(Debug, Subcommand)]
enum ModelsCommand {
    /// Load each model (folder or bioimageio.yaml), run its test tensors through
    /// preprocessing, inference and postprocessing, and compare with its expected outputs.
    /// Prints pass/fail, max abs error, the execution provider used and the latency; exit 1 on
    /// any failure.
    Check {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Largest accepted absolute error.
        #[arg(long, default_value_t = 1e-4, value_parser = tolerance)]
        tolerance: f32,
        /// Timed runs after the check (the median is printed).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..))]
        runs: u16,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// Sample virtual protein images with a virtual-stain-diffusion model (EDM Euler steps).
    Sample {
        path: PathBuf,
        /// Raw landmark planes, float32 `[1, C, H, W]` in the description's channel order.
        #[arg(long)]
        landmarks: PathBuf,
        /// Proteins to sample (comma-separated names from the model's vocabulary).
        #[arg(long, value_delimiter = ',', required = true)]
        proteins: Vec<String>,
        /// Cell line (default: the model's first that is not `none`).
        #[arg(long)]
        cell_line: Option<String>,
        /// Euler steps (default: the description's sampler).
        #[arg(long)]
        steps: Option<usize>,
        /// Initial standard normal noise `[K, latent channels, h, w]`; without it, --seed.
        #[arg(long)]
        noise: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Images `[K, H, W]` in photoelectrons.
        #[arg(long)]
        output: PathBuf,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// Run a model on a .npy input and write the output as .npy (float32).
    Predict {
        path: PathBuf,
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// Bare session.run: no pre- or postprocessing.
        #[arg(long, conflicts_with = "tiled")]
        raw: bool,
        /// Run by tiles of this side (whole-field models).
        #[arg(long)]
        tiled: Option<usize>,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
}

const EXIT_CONFIG: u8 = 2;
const EXIT_PARTIAL: u8 = 3;

fn load(path: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    liveomics::registry::load(path).map_err(|e| {
        eprint!("error: invalid configuration {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Models { command } => models(command),
        Command::Segment(req) => {
            telemetry::init_logging(&liveomics::telemetry::TelemetryConfig::default());
            match liveomics::segment_cli::segment_file(&req) {
                Ok(r) => {
                    for n in &r.notes {
                        telemetry::SegmentNote { note: n }.emit();
                    }
                    println!(
                        "{}x{}: {} nuclei{} in {:.1} ms -> {}",
                        r.width,
                        r.height,
                        r.nuclei,
                        r.cells.map(|c| format!(", {c} cells")).unwrap_or_default(),
                        r.elapsed.as_secs_f64() * 1e3,
                        req.out.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(
                    e @ (liveomics::segment_cli::SegmentError::Channel { .. }
                    | liveomics::segment_cli::SegmentError::Gpu {
                        source: liveomics_kernels::gpu::GpuError::Unavailable(_),
                        ..
                    }
                    | liveomics::segment_cli::SegmentError::Device(_)
                    | liveomics::segment_cli::SegmentError::Size { .. }),
                ) => {
                    eprintln!("error: {}", telemetry::error_chain(&e));
                    ExitCode::from(EXIT_CONFIG)
                }
                Err(e) => {
                    eprintln!("error: {}", telemetry::error_chain(&e));
                    ExitCode::FAILURE
                }
            }
        }
        Command::BenchSegment {
            out_dir,
            pixel_size_um,
            diameter_um,
            repeat,
            device,
            files,
        } => report((|| -> anyhow::Result<()> {
            let request = device
                .parse()
                .map_err(|e: liveomics_kernels::gpu::BadDeviceRequest| anyhow::anyhow!("--device {e}"))?;
            let (compute, fallback) = liveomics_kernels::gpu::Compute::select(request)?;
            if let Some(why) = fallback {
                eprintln!("device auto: running on the CPU ({why})");
            }
            for r in liveomics::bench::segment_files(&compute, &files, &out_dir, pixel_size_um, diameter_um, repeat)? {
                println!("{}", serde_json::to_string(&r)?);
            }
            Ok(())
        })()),
        Command::BenchModels(a) => report((|| -> anyhow::Result<()> {
            let opts = a.runtime.options()?;
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
            Ok(())
        })()),
        Command::PrintConfig => {
            print!("{DEFAULT_TOML}");
            ExitCode::SUCCESS
        }
        Command::BenchWrite {
            out,
            repeat,
            chunk_px,
            level,
            frames,
        } => report(
            liveomics::bench::write_frames(&frames, repeat, &out, chunk_px, level)
                .context("bench-write failed")
                .map(|r| println!("{}", serde_json::to_string(&r).unwrap_or_default())),
        ),
        Command::Validate { file } => match load(Some(&file)) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Simulate {
            out,
            config,
            layout,
            files_per_s,
        } => {
            let cfg = match load(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            report(
                liveomics::simulate::write_plate(&cfg.source.simulator, &out, layout, files_per_s)
                    .with_context(|| format!("cannot write the simulated plate to {}", out.display()))
                    .map(|n| println!("wrote {n} fields to {}", out.display())),
            )
        }
        Command::Replay {
            path,
            speed,
            layout,
            channels,
            pixel_size_um,
            config,
            output,
            overwrite,
        } => {
            let res = Resources::default();
            let mut cfg = match load_with_output(config.as_deref(), output, &res) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if let Some(px) = pixel_size_um {
                cfg.source.folder.pixel_size_um = px;
            }
            if let Err(e) = replay_source(&mut cfg, path, &speed, layout, channels, &res) {
                eprintln!("error: {e:#}");
                return ExitCode::from(EXIT_CONFIG);
            }
            execute(cfg, overwrite, true, res)
        }
        Command::Run {
            config,
            overwrite,
            output,
        } => {
            let res = Resources::default();
            match load_with_output(config.as_deref(), output, &res) {
                Ok(cfg) => execute(cfg, overwrite, false, res),
                Err(code) => code,
            }
        }
    }
}

fn models(cmd: ModelsCommand) -> ExitCode {
    use liveomics_models::diffusion::Noise;
    use liveomics_models::{npy, Component, Diffusion, Model, TileOptions};
    telemetry::init_logging(&liveomics::telemetry::TelemetryConfig {
        log_level: "error".into(),
        ..Default::default()
    });
    match cmd {
        ModelsCommand::Check {
            paths,
            tolerance,
            runs,
            runtime,
        } => {
            let opts = match runtime.options() {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let mut failed = 0;
            for p in &paths {
                let result = Model::load(p, &opts).and_then(|m| {
                    let mut report = m.check(usize::from(runs))?;
                    for name in m.descr.liveomics.components.keys() {
                        let c = Component::load(&m.descr, name, &opts)?;
                        if let Some(err) = c.check()? {
                            report.max_abs_error.push((name.clone(), err));
                        }
                    }
                    Ok((report, m.descr.name.clone(), m.skipped))
                });
                match result {
                    Ok((r, name, skipped)) => {
                        let worst = r.max_abs_error.iter().map(|(_, e)| *e).fold(0.0f32, f32::max);
                        let pass = worst <= tolerance;
                        failed += usize::from(!pass);
                        println!("{}  {name} ({})", if pass { "PASS" } else { "FAIL" }, p.display());
                        let errs: Vec<String> = r.max_abs_error.iter().map(|(id, e)| format!("{id} {e:.3e}")).collect();
                        println!(
                            "      provider {}  latency {:.1} ms (median of {})  max abs error {} (tolerance {tolerance:e})",
                            r.provider.label(),
                            r.latency.as_secs_f64() * 1e3,
                            runs.max(1),
                            errs.join(", ")
                        );
                        for s in skipped {
                            println!("      skipped {s}");
                        }
                    }
                    Err(e) => {
                        failed += 1;
                        println!("FAIL  {}\n      {}", p.display(), telemetry::error_chain(&e));
                    }
                }
            }
            if failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        ModelsCommand::Sample {
            path,
            landmarks,
            proteins,
            cell_line,
            steps,
            noise,
            seed,
            output,
            runtime,
        } => report((|| -> anyhow::Result<()> {
            let d = Diffusion::load(&path, &runtime.options()?)?;
            let ids = proteins
                .iter()
                .map(|p| {
                    d.protein_id(p).ok_or_else(|| {
                        anyhow::anyhow!(
                            "{p:?} is not in the vocabulary of {}: {}",
                            d.name(),
                            d.denoiser.descr.liveomics.proteins.join(", ")
                        )
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let line = match &cell_line {
                Some(c) => d
                    .cell_line_id(c)
                    .ok_or_else(|| anyhow::anyhow!("{c:?} is not a cell line of {}", d.name()))?,
                None => d.default_cell_line(),
            };
            let x = npy::read(&landmarks)?;
            let noise = match &noise {
                Some(p) => Noise::Given(npy::read(p)?),
                None => Noise::Seed(seed),
            };
            let steps = steps.unwrap_or(d.sampler.steps);
            let t0 = std::time::Instant::now();
            let y = d.generate_from(&x, &ids, line, steps, noise, || {})?;
            let secs = t0.elapsed().as_secs_f64();
            npy::write(&output, &y)?;
            eprintln!(
                "{}: {:?} in {:.2} s ({steps} steps, {:.1} ms per protein-step) on {}",
                d.name(),
                y.shape,
                secs,
                secs * 1e3 / (steps * ids.len()).max(1) as f64,
                d.denoiser.provider.label()
            );
            Ok(())
        })()),
        ModelsCommand::Predict {
            path,
            input,
            output,
            raw,
            tiled,
            runtime,
        } => report((|| -> anyhow::Result<()> {
            let m = Model::load(&path, &runtime.options()?)?;
            let x = npy::read(&input)?;
            let y = if raw {
                m.infer(&[&x])?.remove(0)
            } else if let Some(tile) = tiled {
                m.run_tiled(
                    x,
                    &TileOptions {
                        tile,
                        ..TileOptions::default()
                    },
                )?
            } else {
                m.run(vec![x])?.remove(0)
            };
            npy::write(&output, &y)?;
            eprintln!("{}: {:?} on {}", m.descr.name, y.shape, m.provider.label());
            Ok(())
        })()),
    }
}

/// Loads the config and applies `--output`.
/// The config for a run, checked with the run's resources (models load once).
fn load_with_output(
    path: Option<&std::path::Path>,
    output: Option<PathBuf>,
    res: &Resources,
) -> Result<Config, ExitCode> {
    let mut cfg = liveomics::registry::load_for_run(path, res).map_err(|e| {
        eprint!("error: invalid configuration {e}");
        ExitCode::from(EXIT_CONFIG)
    })?;
    if let Some(o) = output {
        cfg.sinks.zarr.output = o;
    }
    Ok(cfg)
}

fn parse_layout(s: &str) -> Result<LayoutKind, String> {
    match s {
        "phenix" | "operetta" => Ok(LayoutKind::Phenix),
        "imagexpress" => Ok(LayoutKind::Imagexpress),
        "cellvoyager" => Ok(LayoutKind::Cellvoyager),
        other => Err(format!("unknown layout {other:?}: phenix, imagexpress or cellvoyager")),
    }
}

/// Points the config's source at `path`: the replay source for a liveomics plate, the folder
/// source (no watching) for instrument files, with the layout detected from the names if needed.
fn replay_source(
    cfg: &mut Config,
    path: PathBuf,
    speed: &str,
    layout: Option<LayoutKind>,
    channels: Vec<String>,
    res: &Resources,
) -> anyhow::Result<()> {
    let speed = Speed::try_from(speed.to_string()).map_err(anyhow::Error::msg)?;
    if path.join("zarr.json").is_file() {
        // Writing the replay into the plate it reads would resume (or, with --overwrite, delete) it.
        let input = path.canonicalize()?;
        if cfg.sinks.zarr.enabled {
            let out = cfg
                .sinks
                .zarr
                .output
                .canonicalize()
                .unwrap_or_else(|_| cfg.sinks.zarr.output.clone());
            if input.parent() == Some(out.as_path()) {
                anyhow::bail!(
                    "the replay would write into the plate it reads ({}); choose another --output",
                    input.display()
                );
            }
        }
        cfg.source.kind = SourceName::Replay;
        cfg.source.replay = ReplayConfig { path, speed };
        return Ok(());
    }
    let f = &mut cfg.source.folder;
    f.path = path.clone();
    f.watch = false;
    f.speed = speed;
    if !channels.is_empty() {
        f.channels = channels;
    }
    let format = liveomics_adapters::model::PlateFormat::new(f.plate_format)?;
    let names: Vec<String> = std::fs::read_dir(&path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .flatten()
        .flat_map(|e| {
            if e.path().is_dir() {
                std::fs::read_dir(e.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .collect::<Vec<_>>()
            } else {
                vec![e]
            }
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let candidates = match layout {
        Some(l) => vec![l],
        None => vec![LayoutKind::Phenix, LayoutKind::Imagexpress, LayoutKind::Cellvoyager],
    };
    let best = candidates
        .into_iter()
        .filter_map(|k| {
            let l = Layout::new(k, "", format, true).ok()?;
            let parsed: Vec<_> = names.iter().filter_map(|n| l.parse(n).ok()).collect();
            Some((parsed.len(), k, parsed.into_iter().find_map(|p| p.plate)))
        })
        .max_by_key(|(n, _, _)| *n)
        .filter(|(n, _, _)| *n > 0)
        .ok_or_else(|| anyhow::anyhow!("no file in {} matches a known layout", path.display()))?;
    f.layout = best.1;
    if let Some(plate) = best.2 {
        f.plate = plate;
    }
    cfg.source.kind = SourceName::Folder;
    let errs = liveomics::registry::validate(cfg, res);
    if !errs.is_empty() {
        let lines: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        anyhow::bail!("{}", lines.join("; "));
    }
    Ok(())
}

/// Runs the pipeline with signal handling and prints the summary; the exit code says how it went.
fn execute(cfg: Config, overwrite: bool, progress: bool, resources: Resources) -> ExitCode {
    telemetry::init_logging(&cfg.telemetry);
    let stop = StopToken::new();
    if let Err(e) = install_signals(&stop) {
        return report(Err(e));
    }
    let opts = RunOptions {
        overwrite,
        resources,
        stop,
        progress,
        ..Default::default()
    };
    match pipeline::run(&cfg, opts).context("liveomics run failed") {
        Ok(summary) => {
            print_summary(&summary);
            if summary.fields_failed > 0 {
                ExitCode::from(EXIT_PARTIAL)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => report(Err(e)),
    }
}

/// First SIGINT/SIGTERM: stop intake and drain. Second: exit at once with 130. Signals keep their
/// own flag: a stop requested by the pipeline itself (storage failure) must not turn the operator's
/// first Ctrl-C into an immediate exit.
fn install_signals(stop: &StopToken) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let signalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, signalled.clone())
            .context("cannot install signal handler")?;
        signal_hook::flag::register(sig, signalled.clone()).context("cannot install signal handler")?;
        signal_hook::flag::register(sig, stop.flag()).context("cannot install signal handler")?;
    }
    Ok(())
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The well-omics plate readout: per model, the genes that vary most across wells, each well's
/// value (natural log abundance) with its spread across fields.
fn print_plate_readout(readouts: &[liveomics::field::WellReadout]) {
    const TOP: usize = 5;
    let mut models: Vec<&str> = readouts.iter().map(|r| r.model.as_str()).collect();
    models.dedup();
    for model in models {
        let wells: Vec<_> = readouts.iter().filter(|r| r.model == model).collect();
        let Some(first) = wells.first() else { continue };
        let n = wells.len() as f64;
        let mut order: Vec<(usize, f64)> = (0..first.outputs.len())
            .map(|g| {
                let mean = wells.iter().map(|w| w.values[g] as f64).sum::<f64>() / n;
                let var = wells.iter().map(|w| (w.values[g] as f64 - mean).powi(2)).sum::<f64>() / n;
                (g, var)
            })
            .collect();
        order.sort_by(|a, b| b.1.total_cmp(&a.1));
        let top: Vec<usize> = order.iter().take(TOP).map(|&(g, _)| g).collect();
        println!();
        println!(
            "plate readout ({model}, ln abundance ± spread across fields; the {TOP} genes that vary most across wells)"
        );
        let head: Vec<String> = top.iter().map(|&g| format!("{:>14}", first.outputs[g])).collect();
        println!("  well   fields {}", head.join(""));
        for w in &wells {
            let cells: Vec<String> = top
                .iter()
                .map(|&g| format!("{:>14}", format!("{:.2}±{:.2}", w.values[g], w.spread[g])))
                .collect();
            println!("  {:<6} {:>6} {}", w.well, w.fields, cells.join(""));
        }
    }
}

fn print_summary(s: &RunSummary) {
    let secs = s.elapsed.as_secs_f64();
    println!();
    println!("liveomics run summary");
    println!("  plate            {}", s.plate);
    println!("  wells            {}", s.wells);
    println!(
        "  fields           {} done ({:.2} fields/s): {} by every sink, {} failed in a sink; {} incomplete{}",
        s.fields_done,
        s.fields_done as f64 / secs.max(1e-9),
        s.fields_done.saturating_sub(s.fields_failed),
        s.fields_failed,
        s.fields_incomplete,
        if s.source.stopped_early {
            " (intake stopped early: signal or storage failure)"
        } else {
            ""
        }
    );
    println!("  fields acquired  {} ({} frames)", s.source.fields, s.source.frames);
    println!("  frames rejected  {}", s.frames_rejected);
    println!("  cells            {}", s.cells);
    println!(
        "  latency          p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (first frame to all sinks done)",
        s.latency_p50_ms, s.latency_p99_ms, s.latency_max_ms
    );
    println!(
        "  deadline misses  {} (budget {} ms)",
        s.deadline_misses, s.latency_budget_ms
    );
    println!(
        "  acquisition held {:.2} s by backpressure",
        s.source.blocked.as_secs_f64()
    );
    if !s.source.read_time.is_zero() {
        println!(
            "  input reading    {:.2} s ({:.0}% of elapsed), {} inputs skipped",
            s.source.read_time.as_secs_f64(),
            100.0 * s.source.read_time.as_secs_f64() / secs.max(1e-9),
            s.source.problems
        );
    }
    println!("  sinks            {}", s.sinks.join(", "));
    if let Some(a) = s.metrics_addr {
        println!("  metrics          http://{a}/metrics (while running)");
    }
    println!("  elapsed          {secs:.1} s");
    print_plate_readout(&s.well_readouts);
    if let Some(out) = &s.output {
        println!("  output           {}", out.display());
        println!();
        println!("Look at it:");
        println!("  napari --plugin napari-ome-zarr {}", out.display());
        println!(
            "  python -c \"import zarr; p = zarr.open_group('{}', mode='r'); print(p.tree())\"",
            out.display()
        );
    }
}

/// Says on stderr which execution provider a benchmarked model runs on, and why the ones before it
/// in `--providers` did not: a timing means little without it.
fn announce(m: &liveomics_models::Model) {
    eprintln!("{}: provider {}", m.descr.name, m.provider.label());
    for s in &m.skipped {
        eprintln!("  skipped {s}");
    }
}

/// `--tolerance`: a finite number >= 0 (NaN would make every comparison fail, a negative one
/// every check).
fn tolerance(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        _ => Err(format!("{s:?} is not a finite number >= 0")),
    }
}
