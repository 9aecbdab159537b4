//! `liveomics`: the command line over the library. Exit codes: 0 success, 1 runtime failure,
//! 2 invalid configuration or usage, 3 the plate finished but some fields failed to write,
//! 130 a second interrupt forced an immediate exit.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use liveomics::config::{Config, DEFAULT_TOML};
use liveomics::pipeline::{self, RunOptions, RunSummary};
use liveomics::registry::SinkOptions;
use liveomics::telemetry;
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
    },
    /// Print the embedded default configuration.
    PrintConfig,
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

const EXIT_CONFIG: u8 = 2;
const EXIT_PARTIAL: u8 = 3;

fn load(path: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprint!("error: invalid configuration {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
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
        Command::Simulate { out, config } => {
            let cfg = match load(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            report(
                liveomics::simulate::write_plate(&cfg.source.simulator, &out)
                    .with_context(|| format!("cannot write the simulated plate to {}", out.display()))
                    .map(|n| println!("wrote {n} fields to {}", out.display())),
            )
        }
        Command::Run {
            config,
            overwrite,
            output,
        } => {
            let mut cfg = match load(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if let Some(o) = output {
                cfg.sinks.zarr.output = o;
            }
            telemetry::init_logging(&cfg.telemetry);
            let stop = StopToken::new();
            if let Err(e) = install_signals(&stop) {
                return report(Err(e));
            }
            let opts = RunOptions {
                sinks: SinkOptions { overwrite },
                stop,
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
    }
}

/// First SIGINT/SIGTERM: stop intake and drain. Second: exit at once with 130.
fn install_signals(stop: &StopToken) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, stop.flag())
            .context("cannot install signal handler")?;
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

fn print_summary(s: &RunSummary) {
    let secs = s.elapsed.as_secs_f64();
    println!();
    println!("liveomics run summary");
    println!("  plate            {}", s.plate);
    println!("  wells            {}", s.wells);
    println!(
        "  fields           {} done ({:.2} fields/s), {} failed to write, {} incomplete{}",
        s.fields_done,
        s.fields_done as f64 / secs.max(1e-9),
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
    println!("  sinks            {}", s.sinks.join(", "));
    if let Some(a) = s.metrics_addr {
        println!("  metrics          http://{a}/metrics (while running)");
    }
    println!("  elapsed          {secs:.1} s");
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
