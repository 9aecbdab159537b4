//! The latency budget, enforced. Each model has a deadline class ([`Class`]): required work
//! always runs inline; optional work runs inline only when the field is predicted to make its
//! deadline with it ([`decide`]), else it is skipped (the field is *degraded*) and owed. What is
//! owed is recorded with the field in the OME-Zarr plate (so a killed daemon finds it again) and
//! kept in the [`Backlog`], which the pipeline's backfill thread works off, oldest field first,
//! when the workers are idle and, at the end of the plate, before exit.
//!
//! Fields reach the workers in arrival order and every field has the same budget, so arrival
//! order is earliest-deadline-first across fields; within a field required models run before
//! optional ones. The per-cell batcher orders its requests by the same [`Edf`] key and learns
//! its batch cost with the same [`Ewma`].

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use liveomics_adapters::model::FieldKey;
use liveomics_models::schedule::{Edf, Ewma};
use liveomics_models::Role;
use serde::{Deserialize, Serialize};

/// When a model's work must be done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    /// Always inline, never skipped: segmentation, measurement and what feeds the per-cell
    /// tables, the well readouts and the closed loop.
    Required,
    /// Inline when the field is predicted to make its deadline with it; otherwise skipped and
    /// backfilled later (virtual staining, diffusion panels).
    InlineIfOnTime,
    /// Never inline: run only when the pipeline is idle and at the end of the plate.
    Deferred,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Required => "required",
            Class::InlineIfOnTime => "inline-if-on-time",
            Class::Deferred => "deferred",
        }
    }

    /// The class a model gets when its config names none: images that only people look at can
    /// wait; what rules, tables and readouts are computed from cannot.
    pub fn default_for(role: Role) -> Self {
        match role {
            Role::VirtualStain | Role::VirtualStainDiffusion => Class::InlineIfOnTime,
            _ => Class::Required,
        }
    }

    /// Whether work of this class may be skipped inline: only whole-field images, which are
    /// written into their own channels and can be added to a written field later.
    pub fn allowed_for(self, role: Role) -> bool {
        self == Class::Required || matches!(role, Role::VirtualStain | Role::VirtualStainDiffusion)
    }
}

/// What to do with one model's work on one field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Run,
    Skip(Why),
}

/// Why optional work was skipped inline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The model's class is `deferred`.
    DeferredClass,
    /// Running it would end past the deadline: its predicted cost plus the predicted time of
    /// the sinks exceeds what is left.
    PredictedLate { predicted: Duration, left: Duration },
}

impl Why {
    pub fn describe(&self) -> String {
        match self {
            Why::DeferredClass => "its class is deferred".into(),
            Why::PredictedLate { predicted, left } => format!(
                "predicted {} ms with the sinks, {} ms left before the deadline",
                predicted.as_millis(),
                left.as_millis()
            ),
        }
    }
}

/// The decision for one model on one field at `now`. `cost` is the model's predicted run time
/// (`None` before its first run: it runs, so that its cost is learnt), `tail` the predicted
/// time from the end of the stages to every sink having written the field. Without anywhere to
/// backfill into (`can_defer` false) everything runs inline: skipped work would be lost.
pub fn decide(
    class: Class,
    cost: Option<Duration>,
    tail: Duration,
    now: Instant,
    deadline: Instant,
    can_defer: bool,
) -> Decision {
    if class == Class::Required || !can_defer {
        return Decision::Run;
    }
    if class == Class::Deferred {
        return Decision::Skip(Why::DeferredClass);
    }
    let Some(cost) = cost else {
        return Decision::Run;
    };
    let predicted = cost + tail;
    let left = deadline.saturating_duration_since(now);
    if predicted > left {
        Decision::Skip(Why::PredictedLate { predicted, left })
    } else {
        Decision::Run
    }
}

/// Work owed to a field that was written without it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owed {
    pub key: FieldKey,
    /// Models whose outputs the field lacks, in the order they are configured.
    pub models: Vec<String>,
    /// When it became owed (or was found owed at startup): the backlog's age.
    pub since: Instant,
}

#[derive(Debug, Default)]
struct BacklogState {
    owed: BTreeMap<Edf, Owed>,
    next: u64,
    /// Fields handed to the sinks with work owed that not every sink has reported yet.
    expected: usize,
    /// Degraded fields the plate store has recorded while other sinks may still hold them:
    /// owed once every sink is done with the field, so that no backfill overtakes the field
    /// itself in any sink.
    parked: HashMap<FieldKey, (Instant, Owed)>,
    /// Items taken and not yet handed back finished.
    running: usize,
    /// Items whose backfill failed: still owed in the plate, for the next run.
    failed: usize,
}

/// Owed work, oldest field first. The zarr sink records a degraded field here once the field
/// is on disk (and at startup, each field the plate says is owed); the backfill thread takes
/// from it.
#[derive(Debug, Default)]
pub struct Backlog {
    state: Mutex<BacklogState>,
}

impl Backlog {
    fn lock(&self) -> std::sync::MutexGuard<'_, BacklogState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A worker handed a degraded field to the sinks: the backlog is not settled until the
    /// field has been recorded (or its write failed, [`Backlog::arrived`]).
    pub fn expect(&self) {
        self.lock().expected += 1;
    }

    /// Every sink is done with the degraded field `key`: what the store recorded for it is owed
    /// from now on (nothing, if its write failed).
    pub fn arrived(&self, key: &FieldKey) {
        let mut s = self.lock();
        s.expected = s.expected.saturating_sub(1);
        if let Some((deadline, owed)) = s.parked.remove(key) {
            Self::insert(&mut s, owed, deadline);
        }
    }

    /// The plate store wrote a degraded field: owed once every sink is done with it
    /// ([`Backlog::arrived`]).
    pub fn written(&self, owed: Owed, deadline: Instant) {
        self.lock().parked.insert(owed.key.clone(), (deadline, owed));
    }

    /// Work owed to a field on disk, found at startup. `deadline` orders it (in plate order).
    pub fn record(&self, owed: Owed, deadline: Instant) {
        Self::insert(&mut self.lock(), owed, deadline);
    }

    fn insert(s: &mut BacklogState, owed: Owed, deadline: Instant) {
        let seq = s.next;
        s.next += 1;
        // One entry per field: a second record of the same field (a restart that finds what a
        // previous record already holds) replaces it.
        s.owed.retain(|_, o| o.key != owed.key);
        s.owed.insert(Edf { deadline, seq }, owed);
    }

    /// The oldest owed field. `during_intake`: the acquisition is still running, so at most one
    /// item is backfilled at a time and the rest of the machine stays with the live fields.
    pub fn take(&self, during_intake: bool) -> Option<Owed> {
        let mut s = self.lock();
        if during_intake && s.running > 0 {
            return None;
        }
        let (_, owed) = s.owed.pop_first()?;
        s.running += 1;
        Some(owed)
    }

    /// A taken item was handed to the sinks (`ok`), or failed and was reported.
    pub fn finished(&self, ok: bool) {
        let mut s = self.lock();
        s.running = s.running.saturating_sub(1);
        s.failed += usize::from(!ok);
    }

    /// A backfill handed to the sinks was not written by every one: still owed in the plate.
    pub fn not_written(&self) {
        self.lock().failed += 1;
    }

    /// Fields still owed: in the backlog, or failed and left owed in the plate.
    pub fn left(&self) -> usize {
        let s = self.lock();
        s.owed.len() + s.failed
    }

    /// Nothing owed, nothing on its way to being recorded, nothing running.
    pub fn settled(&self) -> bool {
        let s = self.lock();
        s.owed.is_empty() && s.expected == 0 && s.running == 0 && s.parked.is_empty()
    }

    /// Sets the backlog's gauges (size, age of the oldest) after a change.
    pub fn report(&self) {
        let (fields, oldest) = self.size(Instant::now());
        crate::telemetry::Backlog { fields, oldest }.emit();
    }

    /// Owed fields and the age of the oldest.
    pub fn size(&self, now: Instant) -> (usize, Duration) {
        let s = self.lock();
        let oldest = s
            .owed
            .values()
            .map(|o| now.saturating_duration_since(o.since))
            .max()
            .unwrap_or_default();
        (s.owed.len(), oldest)
    }
}

/// What the workers, the sinks and the tracker share about the budget: the learnt costs, the
/// backlog, and whether skipping is possible at all.
#[derive(Debug, Default)]
pub struct Scheduler {
    /// Per model: runs seen, and the cost learnt from all but the first (a first run pays for
    /// session set-up, allocations and a GPU's autotuning: learnt from, it could make a model
    /// look too slow for every later field).
    costs: Mutex<BTreeMap<String, (u64, Ewma)>>,
    /// Per stage and per model: runs and their total time, all but each one's first run (as
    /// `costs`), for the run's account of where the time went (`liveomics doctor`).
    spent: Mutex<BTreeMap<String, (u64, Duration)>>,
    tail: Mutex<Ewma>,
    /// Fields handed to the sinks and not yet written by every one, with when they were handed
    /// over. The oldest one's wait is a lower bound on the tail that holds before any field has
    /// come out of the sinks: at the start of a plate a burst of fields would otherwise all be
    /// judged as if the sinks took no time.
    in_sinks: Mutex<HashMap<FieldKey, Instant>>,
    can_defer: AtomicBool,
    pub backlog: Backlog,
}

impl Scheduler {
    /// Turns skipping on: there is a plate store to backfill into.
    pub fn enable_deferral(&self, on: bool) {
        self.can_defer.store(on, Ordering::Relaxed);
    }

    pub fn can_defer(&self) -> bool {
        self.can_defer.load(Ordering::Relaxed)
    }

    /// The decision for `model` of `class` on a field due at `deadline`.
    pub fn decide(&self, model: &str, class: Class, now: Instant, deadline: Instant) -> Decision {
        let cost = self
            .costs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(model)
            .and_then(|(_, e)| e.predict());
        decide(class, cost, self.tail(now), now, deadline, self.can_defer())
    }

    /// The predicted time from the end of a field's stages to every sink having written it:
    /// what the sinks have taken so far, or how long the oldest field still in them has waited,
    /// whichever is longer.
    fn tail(&self, now: Instant) -> Duration {
        let learnt = self
            .tail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .predict()
            .unwrap_or_default();
        let waiting = self
            .in_sinks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|at| now.saturating_duration_since(*at))
            .max()
            .unwrap_or_default();
        learnt.max(waiting)
    }

    /// A worker handed field `key` to the sinks at `at`.
    pub fn entered_sinks(&self, key: &FieldKey, at: Instant) {
        self.in_sinks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), at);
    }

    /// A model ran on a field in `took`.
    pub fn observe(&self, model: &str, took: Duration) {
        let mut costs = self.costs.lock().unwrap_or_else(|e| e.into_inner());
        let (seen, cost) = costs.entry(model.to_string()).or_default();
        *seen += 1;
        if *seen > 1 {
            cost.observe(took);
            self.spend(&format!("model {model}"), took);
        }
    }

    /// A stage finished a field in `took` (its first field is left out, as a model's first run).
    pub fn observe_stage(&self, stage: &str, took: Duration, first: bool) {
        if !first {
            self.spend(&format!("stage {stage}"), took);
        }
    }

    fn spend(&self, what: &str, took: Duration) {
        let mut spent = self.spent.lock().unwrap_or_else(|e| e.into_inner());
        let (n, total) = spent.entry(what.to_string()).or_default();
        *n += 1;
        *total += took;
    }

    /// Mean time per run of every stage (`stage {name}`) and model (`model {name}`) so far, with
    /// the number of runs it is the mean of.
    pub fn account(&self) -> Vec<(String, u64, Duration)> {
        let spent = self.spent.lock().unwrap_or_else(|e| e.into_inner());
        spent
            .iter()
            .map(|(k, &(n, total))| (k.clone(), n, total / (n.max(1) as u32)))
            .collect()
    }

    /// Field `key` went from the end of its stages to written by every sink in `took`.
    pub fn observe_tail(&self, key: &FieldKey, took: Duration) {
        self.in_sinks.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
        self.tail.lock().unwrap_or_else(|e| e.into_inner()).observe(took);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use liveomics_adapters::model::{Name, WellId};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn key(field: u32) -> FieldKey {
        FieldKey {
            plate: Name::new("p").unwrap(),
            well: WellId { row: 0, column: 0 },
            field,
            timepoint: 0,
        }
    }

    fn owed(field: u32, since: Instant) -> Owed {
        Owed {
            key: key(field),
            models: vec!["vstain".into()],
            since,
        }
    }

    #[test]
    fn required_work_is_never_skipped_however_late() {
        let t0 = Instant::now();
        let deadline = t0 + ms(100);
        for now in [t0, t0 + ms(99), t0 + ms(5000)] {
            for can_defer in [true, false] {
                assert_eq!(
                    decide(Class::Required, Some(ms(10_000)), ms(500), now, deadline, can_defer),
                    Decision::Run
                );
            }
        }
    }

    #[test]
    fn optional_work_is_skipped_when_predicted_late_and_run_when_on_time() {
        let t0 = Instant::now();
        let deadline = t0 + ms(2000);
        // 1200 ms left, 900 + 200 predicted: on time.
        assert_eq!(
            decide(
                Class::InlineIfOnTime,
                Some(ms(900)),
                ms(200),
                t0 + ms(800),
                deadline,
                true
            ),
            Decision::Run
        );
        // 1000 ms left, 900 + 200 predicted: late.
        assert_eq!(
            decide(
                Class::InlineIfOnTime,
                Some(ms(900)),
                ms(200),
                t0 + ms(1000),
                deadline,
                true
            ),
            Decision::Skip(Why::PredictedLate {
                predicted: ms(1100),
                left: ms(1000)
            })
        );
        // Already past the deadline.
        assert!(matches!(
            decide(Class::InlineIfOnTime, Some(ms(1)), ms(0), t0 + ms(2500), deadline, true),
            Decision::Skip(Why::PredictedLate { left, .. }) if left == Duration::ZERO
        ));
    }

    #[test]
    fn unknown_cost_runs_to_be_learnt_and_nothing_is_skipped_without_a_store() {
        let t0 = Instant::now();
        let deadline = t0 + ms(10);
        assert_eq!(
            decide(Class::InlineIfOnTime, None, ms(0), t0 + ms(9), deadline, true),
            Decision::Run
        );
        assert_eq!(
            decide(Class::InlineIfOnTime, Some(ms(50)), ms(0), t0, deadline, false),
            Decision::Run
        );
        assert_eq!(
            decide(Class::Deferred, Some(ms(1)), ms(0), t0, deadline, false),
            Decision::Run
        );
        assert_eq!(
            decide(Class::Deferred, Some(ms(1)), ms(0), t0, deadline, true),
            Decision::Skip(Why::DeferredClass)
        );
    }

    #[test]
    fn the_scheduler_learns_costs_and_the_tail() {
        let s = Scheduler::default();
        s.enable_deferral(true);
        let t0 = Instant::now();
        let deadline = t0 + ms(1000);
        assert_eq!(s.decide("vs", Class::InlineIfOnTime, t0, deadline), Decision::Run);
        // The first run is a warm-up, however slow: not learnt from.
        s.observe("vs", ms(60_000));
        assert_eq!(s.decide("vs", Class::InlineIfOnTime, t0, deadline), Decision::Run);
        s.observe("vs", ms(600));
        assert_eq!(s.decide("vs", Class::InlineIfOnTime, t0, deadline), Decision::Run);
        s.observe_tail(&key(0), ms(500));
        assert!(matches!(
            s.decide("vs", Class::InlineIfOnTime, t0, deadline),
            Decision::Skip(Why::PredictedLate { .. })
        ));
        // Other models' costs are their own.
        assert_eq!(s.decide("other", Class::InlineIfOnTime, t0, deadline), Decision::Run);
    }

    #[test]
    fn a_field_waiting_in_the_sinks_counts_before_any_has_come_out() {
        let s = Scheduler::default();
        s.enable_deferral(true);
        s.observe("vs", ms(20));
        s.observe("vs", ms(20));
        let t0 = Instant::now();
        let deadline = t0 + ms(150);
        assert_eq!(s.decide("vs", Class::InlineIfOnTime, t0, deadline), Decision::Run);
        // A field has sat in the sinks for 200 ms: the next one's sinks will take at least that.
        s.entered_sinks(&key(0), t0);
        let now = t0 + ms(200);
        let Decision::Skip(Why::PredictedLate { predicted, .. }) =
            s.decide("vs", Class::InlineIfOnTime, now, now + ms(150))
        else {
            panic!("a 200 ms wait in the sinks plus 20 ms of model does not fit in 150 ms");
        };
        assert_eq!(predicted, ms(220));
        // Once it is out, what was learnt counts, and nothing waits.
        s.observe_tail(&key(0), ms(10));
        assert_eq!(s.decide("vs", Class::InlineIfOnTime, now, now + ms(150)), Decision::Run);
    }

    #[test]
    fn backfill_takes_the_earliest_deadline_first_one_at_a_time_during_intake() {
        let b = Backlog::default();
        let t0 = Instant::now();
        b.record(owed(3, t0), t0 + ms(300));
        b.record(owed(1, t0), t0 + ms(100));
        b.record(owed(2, t0), t0 + ms(200));
        assert_eq!(b.size(t0).0, 3);
        let first = b.take(true).unwrap();
        assert_eq!(first.key.field, 1);
        assert!(b.take(true).is_none(), "one at a time while fields are still coming");
        let second = b.take(false).unwrap();
        assert_eq!(second.key.field, 2);
        b.finished(true);
        b.finished(true);
        assert_eq!(b.take(true).unwrap().key.field, 3);
        assert!(!b.settled());
        b.finished(true);
        assert!(b.settled());
    }

    #[test]
    fn a_degraded_field_is_owed_only_once_every_sink_is_done_with_it() {
        let b = Backlog::default();
        let t0 = Instant::now();
        b.expect();
        assert!(!b.settled());
        b.written(owed(1, t0), t0);
        assert!(b.take(false).is_none(), "another sink may still hold the field");
        assert!(!b.settled());
        b.arrived(&key(1));
        assert!(!b.settled());
        b.take(false).unwrap();
        b.finished(true);
        assert!(b.settled());
        // A field whose store write failed was never written: nothing is owed.
        b.expect();
        b.arrived(&key(2));
        assert!(b.settled());
        assert_eq!(b.left(), 0);
        b.not_written();
        assert_eq!(b.left(), 1);
    }

    #[test]
    fn a_field_recorded_twice_is_owed_once() {
        let b = Backlog::default();
        let t0 = Instant::now();
        b.record(owed(1, t0), t0);
        b.record(owed(1, t0), t0 + ms(5));
        assert_eq!(b.size(t0).0, 1);
    }

    #[test]
    fn the_backlog_age_is_its_oldest_item() {
        let b = Backlog::default();
        let t0 = Instant::now();
        b.record(owed(1, t0), t0);
        b.record(owed(2, t0 + ms(40)), t0 + ms(40));
        assert_eq!(b.size(t0 + ms(100)), (2, ms(100)));
    }

    #[test]
    fn classes_default_by_role_and_only_images_may_wait() {
        assert_eq!(Class::default_for(Role::VirtualStain), Class::InlineIfOnTime);
        assert_eq!(Class::default_for(Role::VirtualStainDiffusion), Class::InlineIfOnTime);
        assert_eq!(Class::default_for(Role::CellOmics), Class::Required);
        assert_eq!(Class::default_for(Role::WellOmics), Class::Required);
        assert!(!Class::Deferred.allowed_for(Role::CellOmics));
        assert!(!Class::InlineIfOnTime.allowed_for(Role::WellOmics));
        assert!(Class::Deferred.allowed_for(Role::VirtualStainDiffusion));
        assert!(Class::Required.allowed_for(Role::CellOmics));
    }
}
