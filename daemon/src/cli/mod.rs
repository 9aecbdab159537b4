//! The command line: one module per group of subcommands, one function per subcommand (its
//! arguments in, `anyhow::Result<ExitCode>` out), and one place that maps errors to exit codes
//! ([`exit`]). Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage, 3 the
//! plate finished but some fields failed to write, 130 a second interrupt forced an immediate exit.

mod bench;
mod models;
mod run;
mod segment;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use liveomics::config::ConfigErrors;
use liveomics_adapters::folder::layout::LayoutKind;

pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_PARTIAL: u8 = 3;

/// An error in what the user asked for (a flag, a file named, a device that is not there): exit
/// 2, like an invalid configuration, rather than 1, a failure while running.
#[derive(Debug)]
pub struct Usage(pub anyhow::Error);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for Usage {}

impl Usage {
    pub fn msg(m: impl std::fmt::Display) -> Self {
        Self(anyhow::anyhow!("{m}"))
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "liveomics",
    version,
    about = "Live image-based omics beside a high-content screening microscope"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
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
        /// After the summary, where the processor time went: a table per part of the pipeline.
        #[arg(long)]
        cpu: bool,
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
    Replay(run::ReplayArgs),
    /// Segment nuclei (and cells) in a TIFF with the daemon's segmentation; writes uint32 label TIFFs.
    Segment(liveomics::segment_cli::SegmentRequest),
    /// Check and run ONNX models described by bioimage.io descriptions.
    Models {
        #[command(subcommand)]
        command: models::ModelsCommand,
    },
    /// Serve a finished plate: the plate page at `/` and the OME-Zarr store for viewers under
    /// `/zarr/`, as during its run, until SIGINT/SIGTERM.
    Serve {
        /// The plate (`….zarr`) a liveomics run wrote.
        plate: PathBuf,
        /// Address to listen on; port 0 picks a free one.
        #[arg(long, default_value = "127.0.0.1:9464")]
        listen: String,
    },
    /// What runs where on this machine (ONNX Runtime and its providers, CUDA, the kernels) and
    /// how fast: the configured pipeline timed warm on simulated fields of the plan's size, the
    /// fields/s it sustains against the plan's pace and the budget, and a plain verdict.
    Doctor {
        /// Configuration file; without it the embedded default.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
        /// Simulated fields to time (the first of each stage and model is left out as warm-up).
        #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(3..=1000))]
        fields: u32,
    },
    /// Print the embedded default configuration.
    PrintConfig,
    /// Benchmark: model path overhead (tiling, batching, pre/postprocessing) against bare
    /// session.run on the same tiles and batches; prints one JSON line per measurement.
    #[command(hide = true)]
    BenchModels(bench::BenchModelsArgs),
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
        /// Foreground of the nuclear channel: local, or one global otsu/triangle (scikit-image's
        /// pipeline in the script is otsu).
        #[arg(long, value_enum, default_value_t = liveomics::stage::NucleiThreshold::Local)]
        threshold: liveomics::stage::NucleiThreshold,
        files: Vec<PathBuf>,
    },
    /// Benchmark helper for benches/instanseg.py: one TIFF through InstanSeg (network, post-
    /// processing) and the classical path, one JSON line; --dump writes the model's input.
    #[command(hide = true)]
    BenchInstanseg(bench::BenchInstansegArgs),
    /// Benchmark helper for benches/localization_bench.py: the measure stage's work with and
    /// without localization on a simulated field, one JSON line per field size.
    #[command(hide = true)]
    BenchLocalize {
        #[arg(long, default_values_t = [1024, 2160])]
        field_px: Vec<usize>,
        #[arg(long, default_value_t = 5)]
        repeat: usize,
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

/// Parses the command line, runs the subcommand and turns its outcome into the exit code.
pub fn main() -> ExitCode {
    exit(dispatch(Cli::parse().command))
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run {
            config,
            overwrite,
            output,
            cpu,
        } => run::run(config, overwrite, output, cpu),
        Command::Validate { file } => run::validate(&file),
        Command::Simulate {
            out,
            config,
            layout,
            files_per_s,
        } => run::simulate(&out, config, layout, files_per_s),
        Command::Replay(a) => run::replay(a),
        Command::Segment(req) => segment::segment(&req),
        Command::Serve { plate, listen } => run::serve(&plate, &listen),
        Command::Models { command } => models::models(command),
        Command::Doctor { config, json, fields } => run::doctor(config.as_deref(), json, fields),
        Command::PrintConfig => {
            print!("{}", liveomics::config::DEFAULT_TOML);
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchModels(a) => bench::bench_models(&a),
        Command::BenchSegment {
            out_dir,
            pixel_size_um,
            diameter_um,
            repeat,
            device,
            threshold,
            files,
        } => bench::bench_segment(&out_dir, pixel_size_um, diameter_um, repeat, &device, threshold, &files),
        Command::BenchInstanseg(a) => bench::bench_instanseg(&a),
        Command::BenchLocalize { field_px, repeat } => {
            for px in field_px {
                let r = liveomics::bench::localize_cost(px, repeat)?;
                println!("{}", serde_json::to_string(&r)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchWrite {
            out,
            repeat,
            chunk_px,
            level,
            frames,
        } => bench::bench_write(&out, repeat, chunk_px, level, &frames),
    }
}

/// The one place errors become exit codes (and their one line on stderr, with the chain of
/// causes): an invalid configuration lists every problem and exits 2, a [`Usage`] error exits 2,
/// anything else 1.
fn exit(outcome: anyhow::Result<ExitCode>) -> ExitCode {
    match outcome {
        Ok(code) => code,
        Err(e) => {
            if let Some(c) = e.downcast_ref::<ConfigErrors>() {
                eprint!("error: invalid configuration {c}");
                return ExitCode::from(EXIT_USAGE);
            }
            eprintln!("error: {e:#}");
            ExitCode::from(if e.downcast_ref::<Usage>().is_some() {
                EXIT_USAGE
            } else {
                EXIT_FAILURE
            })
        }
    }
}

fn parse_layout(s: &str) -> Result<LayoutKind, String> {
    match s {
        "phenix" | "operetta" => Ok(LayoutKind::Phenix),
        "imagexpress" => Ok(LayoutKind::Imagexpress),
        "cellvoyager" => Ok(LayoutKind::Cellvoyager),
        other => Err(format!("unknown layout {other:?}: phenix, imagexpress or cellvoyager")),
    }
}
