//! `run`, `replay`, `validate`, `simulate`: the subcommands that load a configuration.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use liveomics::component::SourceName;
use liveomics::config::Config;
use liveomics::pipeline::{self, RunOptions, RunSummary};
use liveomics::replay::ReplayConfig;
use liveomics::resources::Resources;
use liveomics::telemetry;
use liveomics_adapters::folder::layout::{Layout, LayoutKind};
use liveomics_adapters::folder::Speed;
use liveomics_adapters::source::StopToken;

use super::{Usage, EXIT_PARTIAL};

/// `liveomics run`.
pub fn run(config: Option<PathBuf>, overwrite: bool, output: Option<PathBuf>, cpu: bool) -> anyhow::Result<ExitCode> {
    let res = Resources::default();
    let cfg = load_with_output(config.as_deref(), output, &res)?;
    execute(cfg, overwrite, false, cpu, res)
}

/// `liveomics validate FILE`.
pub fn validate(file: &Path) -> anyhow::Result<ExitCode> {
    liveomics::registry::load(Some(file))?;
    println!("{}: ok", file.display());
    Ok(ExitCode::SUCCESS)
}

/// `liveomics doctor`.
pub fn doctor(config: Option<&Path>, json: bool, fields: u32) -> anyhow::Result<ExitCode> {
    early_logging(config);
    let report = liveomics::doctor::doctor(config, fields)?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(ExitCode::SUCCESS)
}

/// `liveomics simulate`.
pub fn simulate(
    out: &Path,
    config: Option<PathBuf>,
    layout: Option<LayoutKind>,
    files_per_s: f64,
) -> anyhow::Result<ExitCode> {
    let cfg = liveomics::registry::load(config.as_deref())?;
    let n = liveomics::simulate::write_plate(&cfg.source.simulator, out, layout, files_per_s)
        .with_context(|| format!("cannot write the simulated plate to {}", out.display()))?;
    println!("wrote {n} fields to {}", out.display());
    Ok(ExitCode::SUCCESS)
}

/// `liveomics replay`'s arguments.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// A `{plate}.zarr` written by liveomics, or a folder of instrument TIFFs.
    pub path: PathBuf,
    /// max, realtime, or a factor like 4x.
    #[arg(long, default_value = "max")]
    pub speed: String,
    /// Folder layout (phenix, imagexpress, cellvoyager); detected from the file names if absent.
    #[arg(long, value_parser = super::parse_layout)]
    pub layout: Option<LayoutKind>,
    /// Channel names in channel-number order, comma-separated (folders only).
    #[arg(long, value_delimiter = ',')]
    pub channels: Vec<String>,
    /// Pixel size of folder images without OME-XML.
    #[arg(long)]
    pub pixel_size_um: Option<f64>,
    /// Configuration for everything but the source (stages, sinks).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override `sinks.zarr.output`.
    #[arg(long)]
    pub output: Option<PathBuf>,
    #[arg(long)]
    pub overwrite: bool,
    /// After the summary, where the processor time went: a table per part of the pipeline.
    #[arg(long)]
    pub cpu: bool,
}

/// `liveomics replay PATH`.
pub fn replay(a: ReplayArgs) -> anyhow::Result<ExitCode> {
    let res = Resources::default();
    let mut cfg = load_with_output(a.config.as_deref(), a.output, &res)?;
    if let Some(px) = a.pixel_size_um {
        cfg.source.folder.pixel_size_um = px;
    }
    replay_source(&mut cfg, a.path, &a.speed, a.layout, a.channels, &res).map_err(Usage)?;
    execute(cfg, a.overwrite, true, a.cpu, res)
}

/// The config for a run, checked with the run's resources (models load once), with `--output`
/// applied.
fn load_with_output(path: Option<&Path>, output: Option<PathBuf>, res: &Resources) -> anyhow::Result<Config> {
    early_logging(path);
    let mut cfg = liveomics::registry::load_for_run(path, res)?;
    if let Some(o) = output {
        cfg.sinks.zarr.output = o;
    }
    Ok(cfg)
}

/// Logging from the file's `[telemetry]` alone (defaults for what is missing or wrong: the full
/// check reports it) before the config is checked, because checking loads the models and what
/// their loading says (provider, segment method, fallbacks) belongs in the run's log.
fn early_logging(path: Option<&Path>) {
    let section = path
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|t| t.get("telemetry").cloned())
        .and_then(|v| v.try_into::<telemetry::TelemetryConfig>().ok())
        .unwrap_or_default();
    telemetry::init_logging(&section);
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

/// Runs the pipeline with signal handling and prints the summary; 3 when some field failed to
/// write.
fn execute(cfg: Config, overwrite: bool, progress: bool, cpu: bool, resources: Resources) -> anyhow::Result<ExitCode> {
    telemetry::init_logging(&cfg.telemetry);
    let stop = StopToken::new();
    let grace = std::time::Duration::from_millis(cfg.pipeline.stop_grace_ms);
    install_signals(&stop, Some(grace))?;
    let opts = RunOptions {
        overwrite,
        resources,
        stop,
        progress,
        ..Default::default()
    };
    let summary = pipeline::run(&cfg, opts).context("liveomics run failed")?;
    print_summary(&summary);
    if cpu {
        print_cpu_table(&summary.cpu);
    }
    Ok(if summary.fields_failed > 0 {
        ExitCode::from(EXIT_PARTIAL)
    } else {
        ExitCode::SUCCESS
    })
}

/// First SIGINT/SIGTERM: stop intake and drain, for at most `grace` (then exit 130 anyway: a field
/// inside a long kernel cannot be interrupted, and the plate is crash-safe). Second: exit at once
/// with 130. Signals keep their own flag: a stop requested by the pipeline itself (storage
/// failure) must not turn the operator's first Ctrl-C into an immediate exit.
fn install_signals(stop: &StopToken, grace: Option<std::time::Duration>) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let signalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, signalled.clone())
            .context("cannot install signal handler")?;
        signal_hook::flag::register(sig, signalled.clone()).context("cannot install signal handler")?;
        signal_hook::flag::register(sig, stop.flag()).context("cannot install signal handler")?;
    }
    if let Some(grace) = grace {
        let flag = signalled.clone();
        std::thread::Builder::new()
            .name("stop-grace".into())
            .spawn(move || {
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                std::thread::sleep(grace);
                telemetry::StopOverran { grace }.emit();
                std::process::exit(130);
            })
            .context("cannot start the stop watchdog")?;
    }
    Ok(())
}

/// One line: the process's processor time against what the cores allowed, and its main shares.
fn print_cpu_line(c: &liveomics::cpu::Report) {
    if c.process.is_zero() {
        return;
    }
    let sum = |prefix: &str| -> f64 {
        c.parts
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, p)| p.cpu.as_secs_f64())
            .sum()
    };
    let rest = c.process.as_secs_f64() - sum("stage-") - sum("sink-") - c.pools().as_secs_f64();
    println!(
        "  cpu              {:.1} core-s of {:.1} available ({} cores): efficiency {:.0}%; stages {:.1}, their pools (rayon, ONNX Runtime) {:.1}, sinks {:.1}, the rest {:.1} (--cpu: per part)",
        c.process.as_secs_f64(),
        c.wall.as_secs_f64() * c.cores as f64,
        c.cores,
        100.0 * c.efficiency(),
        sum("stage-"),
        c.pools().as_secs_f64(),
        sum("sink-"),
        rest.max(0.0)
    );
}

/// `--cpu`: per part, core-seconds, share of the process, wall time, share of it on a CPU and
/// time waiting on a queue.
fn print_cpu_table(c: &liveomics::cpu::Report) {
    let total = c.process.as_secs_f64().max(1e-9);
    println!(
        "\nwhere the processor time went ({:.1} s wall, {} cores)",
        c.wall.as_secs_f64(),
        c.cores
    );
    println!(
        "  {:<24} {:>9} {:>7} {:>9} {:>7} {:>9}",
        "part", "core-s", "share", "wall s", "on cpu", "waited s"
    );
    let mut rows: Vec<(String, liveomics::cpu::Part)> = c.parts.clone().into_iter().collect();
    rows.push((
        "pools (rayon, ORT)".into(),
        liveomics::cpu::Part {
            cpu: c.pools(),
            ..Default::default()
        },
    ));
    rows.sort_by_key(|r| std::cmp::Reverse(r.1.cpu));
    for (name, p) in rows {
        let wall = p.wall.as_secs_f64();
        let on_cpu = if wall > 0.0 {
            format!("{:.0}%", 100.0 * p.cpu.as_secs_f64() / wall)
        } else {
            "-".into()
        };
        println!(
            "  {:<24} {:>9.2} {:>6.0}% {:>9.2} {:>7} {:>9.2}",
            name,
            p.cpu.as_secs_f64(),
            100.0 * p.cpu.as_secs_f64() / total,
            wall,
            on_cpu,
            p.blocked.as_secs_f64()
        );
    }
    println!(
        "  {:<24} {:>9.2}   100%          efficiency {:.0}% of {:.1} core-s",
        "process",
        c.process.as_secs_f64(),
        100.0 * c.efficiency(),
        c.wall.as_secs_f64() * c.cores as f64
    );
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
        "  required work    p50 {:.0} ms, p99 {:.0} ms (first frame to the end of required work), late on {} fields",
        s.required_p50_ms, s.required_p99_ms, s.required_misses
    );
    if s.paced {
        println!(
            "  deadline misses  {} (budget {} ms)",
            s.deadline_misses, s.latency_budget_ms
        );
    } else {
        println!("  deadline misses  none: no instrument waits for this source (max speed), fields had no deadline");
    }
    println!(
        "  raw on disk      p50 {:.0} ms, p99 {:.0} ms (first frame to the raw planes written by every sink)",
        s.raw_p50_ms, s.raw_p99_ms
    );
    if s.lagged > 0 {
        println!(
            "  lagged           {} fields written raw while every worker was busy, analysed from the plate later (pipeline.when_behind = \"lag\")",
            s.lagged
        );
    }
    println!(
        "  scheduler        degraded {}, backfilled {}, backlog left {}{}",
        s.degraded,
        s.backfilled,
        s.backlog_left,
        if s.backlog_left > 0 {
            " (owed in the plate: a run on the same plate backfills it)"
        } else {
            ""
        }
    );
    println!(
        "  acquisition held {:.2} s by backpressure",
        s.source.blocked.as_secs_f64()
    );
    if s.source.lost > 0 {
        println!(
            "  frames lost      {} in transport (gaps in the publisher's numbers; see the log), {} of them sent again",
            s.source.lost, s.source.resent
        );
    }
    if !s.source.read_time.is_zero() {
        println!(
            "  input reading    {:.2} s ({:.0}% of elapsed), {} inputs skipped, {} read late",
            s.source.read_time.as_secs_f64(),
            100.0 * s.source.read_time.as_secs_f64() / secs.max(1e-9),
            s.source.problems,
            s.source.recovered
        );
    }
    print_cpu_line(&s.cpu);
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

/// `liveomics serve`: the page and the store of a finished plate, until a signal.
pub fn serve(plate: &std::path::Path, listen: &str) -> anyhow::Result<ExitCode> {
    liveomics::telemetry::init_logging(&liveomics::telemetry::TelemetryConfig::default());
    let live = liveomics::web::plate::load(plate).map_err(|e| Usage(e.into()))?;
    let metrics = liveomics::telemetry::Metrics::install()?;
    let Some(addr) = liveomics::web::start(listen, Some(metrics.handle()), live, Some(plate.to_path_buf()))? else {
        return Err(Usage::msg("--listen must be an address, e.g. 127.0.0.1:9464").into());
    };
    let name = plate
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    println!(
        "serving {} at http://{addr}/ (the store at http://{addr}/zarr/{name}); Ctrl-C stops",
        plate.display()
    );
    let stop = StopToken::new();
    install_signals(&stop, None)?;
    while !stop.is_stopped() {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    Ok(ExitCode::SUCCESS)
}
