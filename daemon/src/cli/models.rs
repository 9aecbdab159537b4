//! `liveomics models check|sample|predict`: bioimage.io models on their own, outside a run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use liveomics::telemetry;
use liveomics_models::diffusion::Noise;
use liveomics_models::{npy, Component, Diffusion, Model, TileOptions};

use super::Usage;

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
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
    Sample(SampleArgs),
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

#[derive(Debug, clap::Args)]
pub struct RuntimeArgs {
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
    pub fn options(&self) -> anyhow::Result<liveomics_models::RuntimeOptions> {
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

/// `liveomics models …`: quiet logging (the output is the report), then the subcommand.
pub fn models(cmd: ModelsCommand) -> anyhow::Result<ExitCode> {
    telemetry::init_logging(&telemetry::TelemetryConfig {
        log_level: "error".into(),
        ..Default::default()
    });
    match cmd {
        ModelsCommand::Check {
            paths,
            tolerance,
            runs,
            runtime,
        } => check(&paths, tolerance, runs, &runtime),
        ModelsCommand::Sample(a) => sample(a),
        ModelsCommand::Predict {
            path,
            input,
            output,
            raw,
            tiled,
            runtime,
        } => predict(&path, &input, &output, raw, tiled, &runtime),
    }
}

/// `models check`: exit 1 when any model fails its test tensors.
fn check(paths: &[PathBuf], tolerance: f32, runs: u16, runtime: &RuntimeArgs) -> anyhow::Result<ExitCode> {
    let opts = runtime.options().map_err(Usage)?;
    let mut failed = 0;
    for p in paths {
        let result = Model::load(p, &opts).and_then(|m| {
            let mut report = m.check(usize::from(runs))?;
            for name in m.descr.liveomics.components.keys() {
                let c = Component::load(&m.descr, name, &opts)?;
                if let Some(err) = c.check()? {
                    report.max_abs_error.push((name.clone(), err));
                }
            }
            let declared = m.descr.tolerance.unwrap_or(0.0);
            Ok((report, m.descr.name.clone(), m.skipped, declared))
        });
        match result {
            Ok((r, name, skipped, declared)) => {
                // A description may declare a looser tolerance (a converted model's distance
                // from its original); the larger one applies.
                let tolerance = tolerance.max(declared);
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
    Ok(if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `models sample`'s arguments.
#[derive(Debug, clap::Args)]
pub struct SampleArgs {
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
}

/// `models sample`.
fn sample(a: SampleArgs) -> anyhow::Result<ExitCode> {
    let SampleArgs {
        path,
        landmarks,
        proteins,
        cell_line,
        steps,
        noise,
        seed,
        output,
        runtime,
    } = a;
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
    Ok(ExitCode::SUCCESS)
}

/// `models predict`.
fn predict(
    path: &std::path::Path,
    input: &std::path::Path,
    output: &std::path::Path,
    raw: bool,
    tiled: Option<usize>,
    runtime: &RuntimeArgs,
) -> anyhow::Result<ExitCode> {
    let m = Model::load(path, &runtime.options()?)?;
    let x = npy::read(input)?;
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
    npy::write(output, &y)?;
    eprintln!("{}: {:?} on {}", m.descr.name, y.shape, m.provider.label());
    Ok(ExitCode::SUCCESS)
}

/// `--tolerance`: a finite number >= 0 (NaN would make every comparison fail, a negative one
/// every check).
fn tolerance(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        _ => Err(format!("{s:?} is not a finite number >= 0")),
    }
}
