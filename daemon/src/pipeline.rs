//! The topology at run time: source → assembly → workers (stages) → one thread per sink →
//! completion tracker. Every hand-off is a bounded crossbeam channel, so a slow sink fills its
//! queue, then the workers', then assembly's, and finally blocks the source: frames wait, they are
//! never dropped. Shutdown is the mini-redis pattern: the stop token ends intake at a field
//! boundary, and each stage exits when its input channel closes because every sender upstream
//! has been dropped, so in-flight fields drain through to the sinks before the process exits.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use liveomics_adapters::model::{Field, Frame, WellId};
use liveomics_adapters::source::{Source, SourceError, SourceReport, StopToken};

use crate::assembly::{Assembler, AssemblyStats};
use crate::component::{Sink, SinkError};
use crate::config::Config;
use crate::cpu::{Account, Meter};
use crate::field::{FieldWork, WellReadout};
use crate::registry;
use crate::resources::Resources;
use crate::telemetry::{self as t, Metrics};

/// Why a run could not start or could not finish.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot start source {kind:?}")]
    Source {
        kind: &'static str,
        #[source]
        source: SourceError,
    },
    #[error("cannot open sink {name:?}")]
    Sink {
        name: &'static str,
        #[source]
        source: SinkError,
    },
    #[error("cannot build stage \"{name}\": {message}")]
    Stage {
        name: crate::component::StageName,
        message: String,
    },
    #[error(transparent)]
    Telemetry(#[from] t::TelemetryError),
    #[error(transparent)]
    Web(#[from] crate::web::WebError),
    #[error("the source failed")]
    SourceFailed(#[source] SourceError),
    /// Every thread was still joined and the others' results collected: what was written is
    /// complete and listed.
    #[error("pipeline thread(s) panicked: {0}")]
    Panicked(String),
    #[error("cannot spawn a thread")]
    Spawn(#[source] std::io::Error),
    #[error("cannot join the cluster: {0}")]
    Cluster(String),
}

/// Options of a run that are not configuration.
#[derive(Default)]
pub struct RunOptions {
    /// Replace an existing plate (`--overwrite`).
    pub overwrite: bool,
    /// What the stages, sources and sinks share; pass the one validation used, so that models
    /// load once.
    pub resources: Resources,
    pub stop: StopToken,
    /// Sinks built outside the registry, run after the configured ones (embedding, tests).
    pub extra_sinks: Vec<Box<dyn Sink>>,
    /// Show a progress bar on a terminal when the source knows how many fields it will deliver.
    pub progress: bool,
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("overwrite", &self.overwrite)
            .field("stop", &self.stop)
            .field(
                "extra_sinks",
                &self.extra_sinks.iter().map(|s| s.name()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// What a run did; printed at the end of `liveomics run`.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub plate: String,
    pub output: Option<PathBuf>,
    pub wells: usize,
    pub fields_done: u64,
    /// Fields at least one sink failed to write.
    pub fields_failed: u64,
    pub cells: u64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    pub deadline_misses: u64,
    pub latency_budget_ms: u64,
    pub frames_rejected: u64,
    pub fields_incomplete: u64,
    pub elapsed: Duration,
    pub source: SourceReport,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub sinks: Vec<&'static str>,
    /// Final well-omics readout of every well of this plate.
    pub well_readouts: Vec<WellReadout>,
    /// First frame to the end of the field's required work.
    pub required_p50_ms: f64,
    pub required_p99_ms: f64,
    /// First frame to the field's raw planes written by every sink: with the analysis for a
    /// field analysed on arrival, without it for one that lagged.
    pub raw_p50_ms: f64,
    pub raw_p99_ms: f64,
    /// Fields whose required work ended past their deadline.
    pub required_misses: u64,
    /// Fields written without optional work (owed), and fields whose owed work every sink
    /// has since written.
    pub degraded: u64,
    pub backfilled: u64,
    /// Fields the analysis lagged behind (`pipeline.when_behind = "lag"`): written raw at once,
    /// analysed from the plate later (they count in `fields_done` once analysed).
    pub lagged: u64,
    /// Fields still owed work at exit (a stop signal, or a backfill that failed): a restart on
    /// the same plate does them.
    pub backlog_left: usize,
    /// From the first field done by every sink to the last: the steady state, without the
    /// start-up and the pipeline's filling.
    pub done_span: Option<Duration>,
    /// Whether the source has a pace (`Source::paced`); without one, fields had no deadline.
    pub paced: bool,
    /// Where the processor time went.
    pub cpu: crate::cpu::Report,
}

/// A sink finished a field (successfully or not).
struct Done {
    name: String,
    key: liveomics_adapters::model::FieldKey,
    well: WellId,
    cells: usize,
    received_at: Instant,
    deadline: Instant,
    ok: bool,
    /// The well-omics readouts of the field's well after this field.
    well_readouts: Vec<WellReadout>,
    /// The field was written without some of its work, owed for backfill.
    degraded: bool,
    /// This is the backfill of these models into an already written field.
    backfill: Option<Vec<String>>,
    /// These were a lagged field's raw planes only; its analysis comes later as a field.
    lagged: bool,
    /// This is a lagged field's analysis: its raw planes were written before.
    raw_stored: bool,
    stages_done_at: Option<Instant>,
    required_done_at: Option<Instant>,
}

impl Done {
    fn of(work: &FieldWork, ok: bool) -> Self {
        Self {
            name: work.name.clone(),
            key: work.field.key.clone(),
            well: work.field.key.well,
            cells: work.records.len(),
            received_at: work.field.received_at,
            deadline: work.deadline,
            ok,
            well_readouts: work.well_readouts.clone(),
            degraded: !work.owed.is_empty(),
            backfill: work.backfill.clone(),
            lagged: work.is_lagged(),
            raw_stored: work.raw_stored,
            stages_done_at: work.stages_done_at,
            required_done_at: work.required_done_at,
        }
    }
}

/// Starts a pipeline thread whose CPU time, life and waits go to `part` of `account` when it ends.
fn spawn<T: Send + 'static>(
    name: &str,
    (account, part): (&Arc<Account>, &str),
    f: impl FnOnce(&mut Meter) -> T + Send + 'static,
) -> Result<JoinHandle<T>, RunError> {
    let account = Arc::clone(account);
    let part = part.to_string();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let mut meter = Meter::start();
            let out = f(&mut meter);
            meter.finish(&account, &part);
            out
        })
        .map_err(RunError::Spawn)
}

/// Joins a thread; a panic is recorded in `panics` (thread name and message) instead of
/// returned, so that every other thread is still joined and its result collected.
fn join<T>(h: JoinHandle<T>, panics: &mut Vec<String>) -> Option<T> {
    let name = h.thread().name().unwrap_or("unnamed").to_string();
    match h.join() {
        Ok(v) => Some(v),
        Err(payload) => {
            let why = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            panics.push(format!("{name}: {why}"));
            None
        }
    }
}

/// The "budget" of fields from a source without a pace: ten years, past any run.
const UNPACED_BUDGET: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Runs the configured source through the pipeline until it ends or `opts.stop` is set, then
/// drains and returns.
pub fn run(cfg: &Config, opts: RunOptions) -> Result<RunSummary, RunError> {
    let source = registry::build_source(cfg, &opts.resources).map_err(|source| RunError::Source {
        kind: cfg.source.kind.as_str(),
        source,
    })?;
    run_source(cfg, source, opts)
}

/// Runs a given source through the configured stages and sinks (`cfg.source` is not used): the
/// entry point for sources built outside the registry, such as tests feeding malformed frames.
pub fn run_source(cfg: &Config, mut source: Box<dyn Source>, mut opts: RunOptions) -> Result<RunSummary, RunError> {
    let started = Instant::now();
    let process_at_start = crate::cpu::process_time();
    let account = Arc::new(Account::default());
    let metrics = Metrics::install()?;
    let plan = Arc::new(source.plan().clone());

    // The HTTP server (page, metrics, the store for viewers) binds first: a taken port fails
    // before anything is written.
    let live = Arc::clone(&opts.resources.live);
    // The page serves and reads back a plate on a filesystem, not one in an object store.
    let plate_dir = (cfg.sinks.zarr.enabled && crate::sink::zarr::node::s3_url(&cfg.sinks.zarr.output).is_none())
        .then(|| crate::sink::zarr::ZarrSink::plate_path(&cfg.sinks.zarr.output, &plan));
    let http_addr = crate::web::start(
        &cfg.telemetry.http_listen,
        Some(metrics.handle()),
        Arc::clone(&live),
        plate_dir.clone(),
    )?;
    if let Some(addr) = http_addr {
        t::HttpListening { addr }.emit();
    }

    // Members of a cluster find each other before the sinks open: the zarr sink and the
    // source ask who owns what.
    if cfg.cluster.enabled {
        if opts.overwrite {
            return Err(RunError::Cluster(
                "--overwrite in a cluster would remove what the other members wrote; remove the plate before the run"
                    .into(),
            ));
        }
        let session = opts
            .resources
            .zenoh
            .get(&cfg.zenoh)
            .map_err(|e| RunError::Cluster(e.to_string()))?;
        let member = crate::cluster::Member::join(&cfg.cluster, session, &cfg.instrument, plan.plate.as_str())
            .map_err(|e| RunError::Cluster(e.to_string()))?;
        opts.resources.cluster.set(member);
    }

    // Sinks open before the first frame: an unusable output fails now, not an hour in.
    let mut sinks = registry::open_sinks(cfg, &plan, &opts.resources, opts.overwrite)
        .map_err(|(name, source)| RunError::Sink { name, source })?;
    sinks.append(&mut opts.extra_sinks);
    if http_addr.is_some() {
        let mut channels: Vec<String> = plan.channels.iter().map(|c| c.name.clone()).collect();
        if cfg.pipeline.stages.contains(&crate::component::StageName::Inference) {
            channels.extend(cfg.inference.virtual_channels().into_iter().map(|v| v.label));
        }
        let zarr = plate_dir
            .as_ref()
            .and_then(|d| d.file_name())
            .map(|n| format!("/zarr/{}", n.to_string_lossy()));
        live.start(&plan, channels, zarr, "running");
        sinks.push(Box::new(crate::sink::live::LiveSink(Arc::clone(&live))));
    }
    let done: Vec<liveomics_adapters::model::FieldKey> = sinks.iter().flat_map(|s| s.completed()).collect();
    if !done.is_empty() {
        source.skip(&done);
    }
    let sink_names: Vec<&'static str> = sinks.iter().map(|s| s.name()).collect();
    let output = sinks.iter().find_map(|s| s.output());
    let scheduler = Arc::clone(&opts.resources.scheduler);
    // Work may only be owed where it can be done later: read back from a plate on a filesystem.
    // Optional models may be skipped where the inference stage runs; a field the workers have
    // no room for is written raw and analysed later where an instrument waits for the
    // acquisition (`pipeline.when_behind = "lag"`). Backfill threads run where either can
    // happen, and then also do the owed work a resumed plate lists.
    let local_plate = output.clone().filter(|o| crate::sink::zarr::node::s3_url(o).is_none());
    let can_defer = local_plate.is_some() && cfg.pipeline.stages.contains(&crate::component::StageName::Inference);
    scheduler.enable_deferral(can_defer);
    let lag_into = local_plate
        .clone()
        .filter(|_| cfg.pipeline.when_behind == crate::config::WhenBehind::Lag && source.paced());
    let backfill_into = local_plate.filter(|_| can_defer || lag_into.is_some());
    let backfillers = if backfill_into.is_some() {
        cfg.pipeline.workers
    } else {
        0
    };
    let mut worker_stages = Vec::new();
    for _ in 0..cfg.pipeline.workers + backfillers {
        let stages = registry::build_stages(cfg, &plan, &opts.resources).map_err(|(name, e)| RunError::Stage {
            name,
            message: e.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
        })?;
        worker_stages.push(stages);
    }
    if let Some(&name) = cfg.pipeline.stages.iter().find(|s| s.uses_compute()) {
        let (compute, fallback) = opts
            .resources
            .compute(cfg.compute.device)
            .map_err(|e| RunError::Stage {
                name,
                message: e.to_string(),
            })?;
        crate::telemetry::ComputeSelected {
            requested: &cfg.compute.device.to_string(),
            device: &compute.describe(),
            fallback_reason: fallback.as_deref(),
        }
        .emit();
    }
    t::RunStarting {
        plan: &plan,
        sinks: &sink_names,
    }
    .emit();

    let p = &cfg.pipeline;
    let (frame_tx, frame_rx) = bounded::<Frame>(p.frame_queue);
    let (field_tx, field_rx) = bounded::<Field>(p.field_queue);
    let (done_tx, done_rx) = bounded::<Done>(1024);
    let mut sink_txs = Vec::new();
    let mut handles_sinks = Vec::new();
    let n_sinks = sinks.len();
    let sinks_alive = Arc::new(AtomicUsize::new(n_sinks));
    for mut sink in sinks {
        let (tx, rx) = bounded::<Arc<FieldWork>>(p.field_queue);
        sink_txs.push(tx);
        let done_tx = done_tx.clone();
        let stop = opts.stop.clone();
        let queue = format!("sink_{}", sink.name());
        let leaving = Leaving(Arc::clone(&sinks_alive));
        let part = format!("sink-{}", sink.name());
        handles_sinks.push(spawn(&part, (&account, &part), move |meter| {
            let _leaving = leaving;
            loop {
                let waited = Instant::now();
                let Ok(work) = rx.recv() else { break };
                meter.blocked(waited.elapsed());
                t::QueueDepth {
                    queue: &queue,
                    depth: rx.len(),
                }
                .emit();
                let t0 = Instant::now();
                let res = sink.write(&work);
                t::SinkWritten {
                    sink: sink.name(),
                    field: &work.name,
                    elapsed: t0.elapsed(),
                }
                .emit();
                if let Err(e) = &res {
                    t::ErrorOccurred {
                        kind: sink.name(),
                        field: Some(&work.name),
                        error: e,
                    }
                    .emit();
                    if e.stops_intake() && !stop.is_stopped() {
                        t::IntakeStopped { sink: sink.name() }.emit();
                        stop.stop();
                    }
                }
                let _ = done_tx.send(Done::of(&work, res.is_ok()));
            }
            if let Err(e) = sink.finish() {
                t::ErrorOccurred {
                    kind: sink.name(),
                    field: None,
                    error: &e,
                }
                .emit();
            }
        })?);
    }

    // Fields no instrument waits for (a replay at max speed) carry no deadline: a budget no run
    // reaches, so that they are never degraded and never counted late.
    let paced = source.paced();
    let budget = if paced {
        Duration::from_millis(cfg.latency_budget_ms)
    } else {
        UNPACED_BUDGET
    };
    let progress = match (opts.progress, source.expected_fields()) {
        (true, Some(n)) => {
            let pb = indicatif::ProgressBar::new(n);
            pb.set_style(
                indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} fields  {per_sec}  ETA {eta}  {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            Some(pb)
        }
        _ => None,
    };
    let tracker_progress = progress.clone();
    let tracker_scheduler = Arc::clone(&scheduler);
    let tracker_live = http_addr.map(|_| Arc::clone(&live));
    let tracker_member = opts.resources.cluster.member().cloned();
    let tracker = spawn("tracker", (&account, "tracker"), move |_| {
        track(
            done_rx,
            n_sinks,
            tracker_progress,
            &tracker_scheduler,
            tracker_live.as_deref(),
            tracker_member.as_deref(),
        )
    })?;
    let (problem_tx, problem_rx) = bounded::<liveomics_adapters::source::SourceProblem>(1024);
    source.observe(problem_tx);
    let problems = spawn("source-problems", (&account, "source-problems"), move |_| {
        for p in problem_rx {
            if p.recovered {
                t::InputRecovered {
                    input: &p.input,
                    reason: p.reason,
                    detail: &p.detail,
                }
                .emit();
            } else {
                t::InputRejected {
                    input: &p.input,
                    reason: p.reason,
                    detail: &p.detail,
                }
                .emit();
            }
        }
    })?;

    let busy = Arc::new(AtomicUsize::new(0));
    let workers_left = Arc::new(AtomicUsize::new(cfg.pipeline.workers));
    let mut backfill_stages = worker_stages.split_off(cfg.pipeline.workers);
    let mut workers = Vec::new();
    for (i, mut stages) in worker_stages.into_iter().enumerate() {
        let rx = field_rx.clone();
        let txs = sink_txs.clone();
        let done_tx = done_tx.clone();
        let plan = plan.clone();
        let busy = Arc::clone(&busy);
        let leaving = Leaving(Arc::clone(&workers_left));
        let scheduler = Arc::clone(&scheduler);
        let account_w = Arc::clone(&account);
        workers.push(spawn(&format!("worker-{i}"), (&account, "worker"), move |meter| {
            let _leaving = leaving;
            let mut first = true;
            loop {
                let waited = Instant::now();
                let Ok(field) = rx.recv() else { break };
                meter.blocked(waited.elapsed());
                meter.keep();
                let _busy = Busy::new(&busy);
                t::QueueDepth {
                    queue: "fields",
                    depth: rx.len(),
                }
                .emit();
                let deadline = field.received_at + budget;
                let mut work = FieldWork::new(field, plan.clone(), deadline);
                for stage in stages.iter_mut() {
                    let t0 = Instant::now();
                    if let Err(e) = stage.process(&mut work) {
                        t::ErrorOccurred {
                            kind: stage.name().as_str(),
                            field: Some(&work.name),
                            error: &e,
                        }
                        .emit();
                        continue;
                    }
                    let elapsed = t0.elapsed();
                    account_w.add(
                        &format!("stage-{}", stage.name().as_str()),
                        meter.lap(),
                        elapsed,
                        Duration::ZERO,
                    );
                    t::StageCompleted {
                        stage: stage.name().as_str(),
                        field: &work.name,
                        elapsed,
                    }
                    .emit();
                    scheduler.observe_stage(stage.name().as_str(), elapsed, first);
                }
                first = false;
                t::CellsMeasured {
                    field: &work.name,
                    cells: work.records.len(),
                }
                .emit();
                let now = Instant::now();
                let required = *work.required_done_at.get_or_insert(now);
                work.stages_done_at = Some(now);
                t::RequiredDone {
                    latency: required.saturating_duration_since(work.field.received_at),
                    missed_deadline: required > work.deadline,
                }
                .emit();
                if !work.owed.is_empty() {
                    scheduler.backlog.expect();
                }
                scheduler.entered_sinks(&work.field.key, now);
                let work = Arc::new(work);
                if txs.is_empty() {
                    let _ = done_tx.send(Done::of(&work, true));
                }
                let waited = Instant::now();
                for tx in &txs {
                    // A send only fails if the sink thread died; its panic is reported at join.
                    let _ = tx.send(work.clone());
                }
                meter.blocked(waited.elapsed());
            }
        })?);
    }
    let mut backfill = Vec::new();
    if let Some(plate_dir) = backfill_into {
        for (i, stages) in backfill_stages.drain(..).enumerate() {
            let b = Backfill {
                first: i == 0,
                scheduler: Arc::clone(&scheduler),
                stages,
                plan: plan.clone(),
                plate_dir: plate_dir.clone(),
                txs: sink_txs.clone(),
                fields: field_rx.clone(),
                busy: Arc::clone(&busy),
                workers_left: Arc::clone(&workers_left),
                sinks_alive: Arc::clone(&sinks_alive),
                n_sinks,
                stop: opts.stop.clone(),
                idle: Duration::from_millis(p.backfill_after_idle_ms),
                budget,
            };
            backfill.push(spawn(&format!("backfill-{i}"), (&account, "backfill"), move |_| {
                b.run()
            })?);
        }
    }
    let lag = lag_into.map(|_| Lag {
        txs: sink_txs.clone(),
        plan: plan.clone(),
        budget,
        scheduler: Arc::clone(&scheduler),
    });
    drop((field_rx, sink_txs, done_tx));

    let assembly_timeout = Duration::from_millis(p.assembly_timeout_ms);
    let asm_plan = plan.clone();
    let max_pending = p.max_pending_mb.saturating_mul(1 << 20);
    let assembler = spawn("assembly", (&account, "assembly"), move |_| {
        assemble(
            frame_rx,
            field_tx,
            Assembler::new(asm_plan, assembly_timeout, max_pending),
            lag,
        )
    })?;

    let stop = opts.stop.clone();
    let source_thread = spawn("source", (&account, "source"), move |meter| {
        let r = source.run(&frame_tx, &stop);
        if let Ok(report) = &r {
            meter.blocked(report.blocked);
        }
        drop(frame_tx);
        r
    })?;

    // Joined in the order data flows, each thread whatever happened to the others: a thread
    // that panicked drops its channel ends, so the rest drain and end too.
    let mut panics = Vec::new();
    let source_result = join(source_thread, &mut panics);
    let asm = join(assembler, &mut panics);
    for w in workers {
        join(w, &mut panics);
    }
    for b in backfill {
        join(b, &mut panics);
    }
    for s in handles_sinks {
        join(s, &mut panics);
    }
    let tracked = join(tracker, &mut panics);
    // Every user of the shared zenoh session has finished (the tracker publishes the cluster's
    // done notices): close it so the last messages leave.
    if let Err(e) = opts.resources.zenoh.close() {
        t::ErrorOccurred {
            kind: "zenoh",
            field: None,
            error: &*e,
        }
        .emit();
    }
    join(problems, &mut panics);
    if let Some(pb) = progress {
        pb.finish();
    }
    if http_addr.is_some() {
        live.finish(scheduler.backlog.left());
    }
    let (true, Some(source_result), Some(asm), Some(tracked)) = (panics.is_empty(), source_result, asm, tracked) else {
        return Err(RunError::Panicked(panics.join("; ")));
    };
    let source_report = source_result.map_err(RunError::SourceFailed)?;
    t::SourceBlocked {
        waited: source_report.blocked,
    }
    .emit();
    let q = |p: f64| tracked.latency_us.value_at_quantile(p) as f64 / 1e3;
    Ok(RunSummary {
        plate: plan.plate.to_string(),
        output,
        wells: tracked.wells.len(),
        fields_done: tracked.fields_done,
        fields_failed: tracked.fields_failed,
        cells: tracked.cells,
        latency_p50_ms: q(0.5),
        latency_p99_ms: q(0.99),
        latency_max_ms: tracked.latency_us.max() as f64 / 1e3,
        deadline_misses: tracked.misses,
        latency_budget_ms: cfg.latency_budget_ms,
        frames_rejected: asm.rejected,
        fields_incomplete: asm.incomplete,
        elapsed: started.elapsed(),
        source: source_report,
        metrics_addr: http_addr,
        sinks: sink_names,
        well_readouts: tracked
            .well_readouts
            .into_values()
            .filter(|r| r.plate == plan.plate.as_str())
            .collect(),
        required_p50_ms: tracked.required_us.value_at_quantile(0.5) as f64 / 1e3,
        required_p99_ms: tracked.required_us.value_at_quantile(0.99) as f64 / 1e3,
        raw_p50_ms: tracked.raw_us.value_at_quantile(0.5) as f64 / 1e3,
        raw_p99_ms: tracked.raw_us.value_at_quantile(0.99) as f64 / 1e3,
        required_misses: tracked.required_misses,
        degraded: tracked.degraded,
        backfilled: tracked.backfilled,
        lagged: tracked.lagged,
        backlog_left: scheduler.backlog.left(),
        done_span: tracked.first_done.zip(tracked.last_done).map(|(a, b)| b - a),
        paced,
        cpu: crate::cpu::Report {
            parts: account.parts(),
            process: crate::cpu::process_time()
                .zip(process_at_start)
                .map(|(b, a)| b.saturating_sub(a))
                .unwrap_or_default(),
            wall: started.elapsed(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        },
    })
}

/// Counts a worker (or a sink) out when it ends, however it ends: the backfill threads drain
/// the backlog once every worker has, and give up when a sink has died.
struct Leaving(Arc<AtomicUsize>);

impl Drop for Leaving {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Hands a taken backlog item back when dropped.
struct Finished<'a> {
    backlog: &'a crate::schedule::Backlog,
    ok: bool,
}

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.backlog.finished(self.ok);
    }
}

/// Marks a worker busy with a field while it lives.
struct Busy<'a>(&'a AtomicUsize);

impl<'a> Busy<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        Self(n)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A backfill thread: takes owed work from the backlog, oldest field first, when the workers
/// have been idle for `idle` (at most one item at a time then, so that a field arriving finds
/// the machine nearly free), and once every worker has ended, all of it before exit. Each item
/// is the field's raw planes read back from the plate, the owed models run on them, and the
/// result handed to every sink as a backfill.
struct Backfill {
    /// The thread that announces the end-of-plate drain.
    first: bool,
    scheduler: Arc<crate::schedule::Scheduler>,
    stages: Vec<Box<dyn crate::component::Stage>>,
    plan: Arc<liveomics_adapters::model::AcquisitionPlan>,
    plate_dir: PathBuf,
    txs: Vec<Sender<Arc<FieldWork>>>,
    fields: Receiver<Field>,
    busy: Arc<AtomicUsize>,
    workers_left: Arc<AtomicUsize>,
    /// Sink threads still running, of `n_sinks`: a sink that died (a panic, reported at join)
    /// would never report the fields it was handed, so the backlog could never settle.
    sinks_alive: Arc<AtomicUsize>,
    n_sinks: usize,
    stop: StopToken,
    idle: Duration,
    budget: Duration,
}

impl Backfill {
    fn run(mut self) {
        let mut idle_since: Option<Instant> = None;
        let mut draining = false;
        while !self.stop.is_stopped() && self.sinks_alive.load(Ordering::SeqCst) == self.n_sinks {
            let intake_over = self.workers_left.load(Ordering::SeqCst) == 0;
            let now = Instant::now();
            if intake_over && !draining {
                draining = true;
                if self.first {
                    t::BackfillDraining {
                        fields: self.scheduler.backlog.size(now).0,
                    }
                    .emit();
                }
            }
            let idle = self.busy.load(Ordering::SeqCst) == 0 && self.fields.is_empty();
            idle_since = if idle { Some(idle_since.unwrap_or(now)) } else { None };
            let ready = intake_over || idle_since.is_some_and(|t| now.saturating_duration_since(t) >= self.idle);
            if ready {
                if let Some(item) = self.scheduler.backlog.take(!intake_over) {
                    let scheduler = Arc::clone(&self.scheduler);
                    // Handed back however `one` ends, a panic included: the other backfill
                    // threads wait for every taken item before they may exit.
                    let mut taken = Finished {
                        backlog: &scheduler.backlog,
                        ok: false,
                    };
                    taken.ok = self.one(item);
                    drop(taken);
                    scheduler.backlog.report();
                    continue;
                }
            }
            if intake_over && self.scheduler.backlog.settled() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One owed field: whether its backfill reached the sinks.
    fn one(&mut self, owed: crate::schedule::Owed) -> bool {
        let name = owed.key.to_string();
        let field = match crate::sink::zarr::read_field(&self.plate_dir, &self.plan, &owed.key, owed.since) {
            Ok(f) => f,
            Err(e) => {
                t::BackfillFailed {
                    field: &name,
                    error: &e,
                }
                .emit();
                return false;
            }
        };
        if owed.models.iter().any(|m| m == crate::field::OWED_ANALYSIS) {
            self.analyse(field);
            return true;
        }
        let mut work = FieldWork::new(field, self.plan.clone(), Instant::now() + self.budget);
        for stage in self.stages.iter_mut() {
            if let Err(e) = stage.run_owed(&mut work, &owed.models) {
                t::BackfillFailed {
                    field: &name,
                    error: &e,
                }
                .emit();
                return false;
            }
        }
        work.backfill = Some(owed.models);
        work.stages_done_at = Some(Instant::now());
        let work = Arc::new(work);
        for tx in &self.txs {
            let _ = tx.send(work.clone());
        }
        true
    }
}

impl Backfill {
    /// A lagged field, read back from the plate: every stage runs on it as on a live field, and
    /// it goes to the sinks as a field (the plate store leaves its raw planes as they are). It
    /// gets a budget of its own from now, so that its optional models are decided as a live
    /// field's are; its latency still counts from when it was acquired.
    fn analyse(&mut self, field: Field) {
        let mut work = FieldWork::new(field, self.plan.clone(), Instant::now() + self.budget);
        work.raw_stored = true;
        for stage in self.stages.iter_mut() {
            if let Err(e) = stage.process(&mut work) {
                t::ErrorOccurred {
                    kind: stage.name().as_str(),
                    field: Some(&work.name),
                    error: &e,
                }
                .emit();
            }
        }
        let now = Instant::now();
        work.required_done_at.get_or_insert(now);
        work.stages_done_at = Some(now);
        if !work.owed.is_empty() {
            self.scheduler.backlog.expect();
        }
        self.scheduler.entered_sinks(&work.field.key, now);
        let work = Arc::new(work);
        for tx in &self.txs {
            let _ = tx.send(work.clone());
        }
    }
}

struct Tracked {
    fields_done: u64,
    fields_failed: u64,
    cells: u64,
    misses: u64,
    required_misses: u64,
    degraded: u64,
    backfilled: u64,
    lagged: u64,
    required_us: hdrhistogram::Histogram<u64>,
    raw_us: hdrhistogram::Histogram<u64>,
    wells: BTreeSet<WellId>,
    latency_us: hdrhistogram::Histogram<u64>,
    /// The latest readout of each well of each well-omics model: the one pooled over the most
    /// fields (workers may finish a well's fields out of order).
    well_readouts: BTreeMap<(String, String, String), WellReadout>,
    /// When the first and the latest field were done by every sink.
    first_done: Option<Instant>,
    last_done: Option<Instant>,
}

/// Counts sink completions; a field (or a field's backfill) is done when every sink has
/// reported it.
fn track(
    rx: Receiver<Done>,
    n_sinks: usize,
    progress: Option<indicatif::ProgressBar>,
    scheduler: &crate::schedule::Scheduler,
    live: Option<&crate::live::Live>,
    member: Option<&crate::cluster::Member>,
) -> Tracked {
    let mut pending: HashMap<(String, bool), (usize, bool)> = HashMap::new();
    let histogram = || hdrhistogram::Histogram::new(3).expect("3 significant figures is a valid precision");
    let mut out = Tracked {
        fields_done: 0,
        fields_failed: 0,
        cells: 0,
        misses: 0,
        required_misses: 0,
        degraded: 0,
        backfilled: 0,
        lagged: 0,
        required_us: histogram(),
        raw_us: histogram(),
        wells: BTreeSet::new(),
        latency_us: histogram(),
        well_readouts: BTreeMap::new(),
        first_done: None,
        last_done: None,
    };
    let need = n_sinks.max(1);
    for d in rx {
        let key = (d.name.clone(), d.backfill.is_some());
        let e = pending.entry(key.clone()).or_insert((0, true));
        e.0 += 1;
        e.1 &= d.ok;
        if e.0 < need {
            continue;
        }
        let (_, ok) = pending.remove(&key).unwrap_or((need, d.ok));
        let now = Instant::now();
        if let Some(models) = &d.backfill {
            t::FieldBackfilled {
                field: &d.name,
                models,
                age: now.saturating_duration_since(d.received_at),
                ok,
            }
            .emit();
            out.backfilled += u64::from(ok);
            if !ok {
                scheduler.backlog.not_written();
            }
            continue;
        }
        if d.lagged {
            // Its raw planes are in the plate: its analysis is owed from now on, and the field
            // counts as done when that analysis has reached every sink.
            let _ = out
                .raw_us
                .record(now.saturating_duration_since(d.received_at).as_micros() as u64);
            out.lagged += 1;
            scheduler.backlog.arrived(&d.key);
            scheduler.backlog.report();
            continue;
        }
        if let Some(at) = d.stages_done_at {
            scheduler.observe_tail(&d.key, now.saturating_duration_since(at));
        }
        if let Some(at) = d.required_done_at {
            let _ = out
                .required_us
                .record(at.saturating_duration_since(d.received_at).as_micros() as u64);
            out.required_misses += u64::from(at > d.deadline);
        }
        if d.degraded {
            out.degraded += 1;
            scheduler.backlog.arrived(&d.key);
            scheduler.backlog.report();
        }
        let latency = now - d.received_at;
        if !d.raw_stored {
            let _ = out.raw_us.record(latency.as_micros() as u64);
        }
        let missed = now > d.deadline;
        t::FieldDone {
            field: &d.name,
            cells: d.cells,
            latency,
            required: d.required_done_at.map(|at| at.saturating_duration_since(d.received_at)),
            missed_deadline: missed,
            degraded: d.degraded,
        }
        .emit();
        if let Some(live) = live {
            live.done(&d.well.name(), latency, missed, scheduler.backlog.left());
        }
        if let (Some(m), true) = (member, ok) {
            m.done(&d.key);
        }
        out.fields_done += 1;
        out.first_done.get_or_insert(now);
        out.last_done = Some(now);
        out.fields_failed += u64::from(!ok);
        out.cells += d.cells as u64;
        out.misses += u64::from(missed);
        out.wells.insert(d.well);
        let _ = out.latency_us.record(latency.as_micros() as u64);
        for r in d.well_readouts {
            let key = (r.model.clone(), r.plate.clone(), r.well.clone());
            match out.well_readouts.get(&key) {
                Some(prev) if prev.fields >= r.fields => {}
                _ => {
                    out.well_readouts.insert(key, r);
                }
            }
        }
        if let Some(pb) = &progress {
            pb.inc(1);
        }
    }
    out
}

/// Where assembly sends a field the workers have no room for (`pipeline.when_behind = "lag"`):
/// its raw planes straight to the sinks, the plate store first among them, its analysis owed.
struct Lag {
    txs: Vec<Sender<Arc<FieldWork>>>,
    plan: Arc<liveomics_adapters::model::AcquisitionPlan>,
    budget: Duration,
    scheduler: Arc<crate::schedule::Scheduler>,
}

impl Lag {
    /// Hands `field` to the workers, or, when their queue is full and the field is complete,
    /// its raw planes to the sinks: only a full disk (a sink's queue) can hold the acquisition
    /// then. An incomplete field waits for the workers as before: its missing planes could not
    /// be told from zeros once read back. Whether the field got anywhere.
    fn send(&self, tx: &Sender<Field>, field: Field) -> bool {
        let field = match tx.try_send(field) {
            Ok(()) => return true,
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => return false,
            Err(crossbeam_channel::TrySendError::Full(field)) => field,
        };
        if !field.missing_channels().is_empty() {
            return tx.send(field).is_ok();
        }
        let deadline = field.received_at + self.budget;
        let work = Arc::new(FieldWork::lagged(field, self.plan.clone(), deadline));
        t::FieldLagged {
            field: &work.name,
            queued: tx.len(),
        }
        .emit();
        self.scheduler.backlog.expect();
        for sink in &self.txs {
            // A send only fails if the sink thread died; its panic is reported at join.
            let _ = sink.send(work.clone());
        }
        true
    }
}

/// Runs the assembler on its thread: frames in, fields out, with a clock tick so a field
/// missing channels goes on after the timeout even when no frame arrives.
fn assemble(rx: Receiver<Frame>, tx: Sender<Field>, mut asm: Assembler, lag: Option<Lag>) -> AssemblyStats {
    let send = |field: Field| match &lag {
        Some(lag) => lag.send(&tx, field),
        None => tx.send(field).is_ok(),
    };
    let tick = Duration::from_millis(100).min(asm.timeout());
    loop {
        let out = match rx.recv_timeout(tick) {
            Ok(frame) => {
                t::QueueDepth {
                    queue: "frames",
                    depth: rx.len(),
                }
                .emit();
                let now = Instant::now();
                let mut out = asm.frame_at(frame, now);
                // Frames still waiting may be the missing channels, held back by backpressure:
                // no field times out before they are in.
                if rx.is_empty() {
                    out.extend(asm.tick(now));
                }
                out
            }
            Err(RecvTimeoutError::Timeout) => asm.tick(Instant::now()),
            Err(RecvTimeoutError::Disconnected) => break,
        };
        for field in out {
            if !send(field) {
                return asm.stats();
            }
        }
    }
    // Intake is over: whatever is still pending goes on as it is; nothing that arrived is lost.
    for field in asm.finish() {
        if !send(field) {
            break;
        }
    }
    asm.stats()
}
