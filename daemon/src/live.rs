//! What the plate page shows, kept up to date by the pipeline (a sink for the fields, the
//! tracker for latency and deadlines, the follow-up sink for requests and acks) or loaded once
//! from a finished plate (`liveomics serve`). Every change is also broadcast as one JSON event,
//! so the page's event stream sends a late joiner the whole state first and then each change.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use liveomics_adapters::model::AcquisitionPlan;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::field::{ColumnKind, FieldWork, WellReadout, WellShift};

/// Events buffered for a slow subscriber; one that falls further behind gets the whole state
/// again instead of the events it missed.
const EVENTS: usize = 256;
/// More (field, timepoint) pairs than a well can hold: the simulator's and the sources' limits
/// are far below.
const MAX_FIELDS: usize = 1_000_000;

/// One well as the page shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WellView {
    /// `(field, timepoint)` pairs written, in the order they finished.
    pub fields: Vec<(u32, u32)>,
    pub cells: u64,
    /// Mean over the well's cells of every per-cell measure (areas, `mean_{channel}`, model
    /// outputs), as in the tables.
    pub means: BTreeMap<String, f64>,
    /// Per well-omics model: its outputs, latest values and the values after each field (how the
    /// estimate converged).
    pub bulk: BTreeMap<String, BulkView>,
    /// Relocalization score per protein: the latest (most fields) of the well.
    pub localization: BTreeMap<String, WellShift>,
    pub deadline_misses: u64,
    pub degraded: u64,
    /// Fields of the well written raw while the workers were busy and not analysed yet
    /// (`pipeline.when_behind = "lag"`): acquired = `fields` + this.
    pub lagging: u64,
    pub followups: Vec<FollowupView>,
    /// Running sums behind `means`.
    #[serde(skip)]
    sums: BTreeMap<String, (f64, u64)>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct BulkView {
    pub outputs: Vec<String>,
    pub values: Vec<f32>,
    pub history: Vec<Vec<f32>>,
    /// Fields pooled in `values`.
    pub fields: usize,
}

/// A follow-up request for a well and what the bridge said of it.
#[derive(Debug, Clone, Serialize)]
pub struct FollowupView {
    pub id: String,
    pub rule: String,
    pub state: String,
}

impl WellView {
    /// Adds a field's per-cell columns (`name`, kind, values).
    pub fn add_columns<'a>(&mut self, rows: usize, columns: impl IntoIterator<Item = (&'a str, Vec<f64>)>) {
        self.cells += rows as u64;
        for (name, values) in columns {
            let s = self.sums.entry(name.to_string()).or_default();
            for v in values.into_iter().filter(|v| v.is_finite()) {
                s.0 += v;
                s.1 += 1;
            }
            if s.1 > 0 {
                self.means.insert(name.to_string(), s.0 / s.1 as f64);
            }
        }
    }

    /// Takes a relocalization score (the newest wins: [`WellShift::supersedes`]).
    pub fn add_shift(&mut self, s: &WellShift) {
        if self.localization.get(&s.protein).is_none_or(|old| s.supersedes(old)) {
            self.localization.insert(s.protein.clone(), s.clone());
        }
    }

    /// Takes a well-omics readout (the one pooled over the most fields wins: workers finish out
    /// of order) into the well's history.
    pub fn add_readout(&mut self, r: &WellReadout) {
        // A readout read from a plate file is not trusted to size the history.
        if r.fields > MAX_FIELDS {
            return;
        }
        let b = self.bulk.entry(r.model.clone()).or_default();
        if b.history.len() < r.fields {
            b.history.resize(r.fields, Vec::new());
        }
        if let Some(slot) = r.fields.checked_sub(1).and_then(|i| b.history.get_mut(i)) {
            *slot = r.values.clone();
        }
        if r.fields >= b.fields {
            b.fields = r.fields;
            b.outputs = r.outputs.clone();
            b.values = r.values.clone();
        }
    }
}

/// The header: how the run is going.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Header {
    pub state: &'static str,
    pub fields_done: u64,
    pub fields_per_s: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub deadline_misses: u64,
    pub backlog: usize,
    /// Fields acquired and written raw whose analysis is still owed (they lagged).
    pub lagging: u64,
    /// The longest a lagged field waited for its analysis, arrival to the end of its stages.
    pub worst_lag_ms: f64,
    /// When the owed analysis will be done at the rate fields are being done, if any is owed.
    pub eta_s: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Snapshot<'a> {
    plate: &'a str,
    rows: u16,
    columns: u16,
    planned: &'a [String],
    fields_per_well: u32,
    channels: &'a [String],
    /// Where the plate store is served (`/zarr/{plate}.zarr`), when there is one.
    zarr: Option<&'a str>,
    header: &'a Header,
    wells: &'a BTreeMap<String, WellView>,
}

#[derive(Debug, Default)]
struct State {
    plate: String,
    rows: u16,
    columns: u16,
    planned: Vec<String>,
    fields_per_well: u32,
    channels: Vec<String>,
    zarr: Option<String>,
    header: Header,
    wells: BTreeMap<String, WellView>,
    started: Option<Instant>,
    /// Field latencies in microseconds: constant memory and time per field, however long the
    /// plate.
    latency_us: Option<hdrhistogram::Histogram<u64>>,
}

/// The page's state and its event stream; shared by the pipeline's threads and the server.
#[derive(Debug)]
pub struct Live {
    state: Mutex<State>,
    events: broadcast::Sender<String>,
}

impl Default for Live {
    fn default() -> Self {
        Self {
            state: Mutex::new(State::default()),
            events: broadcast::channel(EVENTS).0,
        }
    }
}

impl Live {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, event: Value) {
        // No subscriber is not an error: the page is optional.
        let _ = self.events.send(event.to_string());
    }

    /// A run starts: the plate's layout, what it plans to acquire, and where its store is.
    /// `channels`: the labels of the image's channels, acquired then virtual, as thumbnails
    /// index them.
    pub fn start(&self, plan: &AcquisitionPlan, channels: Vec<String>, zarr: Option<String>, state: &'static str) {
        let mut s = self.lock();
        s.plate = plan.plate.to_string();
        s.rows = plan.format.rows();
        s.columns = plan.format.columns();
        s.planned = plan.wells.iter().map(|w| w.name()).collect();
        s.fields_per_well = plan.fields_per_well;
        s.channels = channels;
        s.zarr = zarr;
        s.header.state = state;
        s.started = Some(Instant::now());
        let snapshot = Self::snapshot_of(&s);
        drop(s);
        self.send(snapshot);
    }

    /// The whole state as the first event of a stream.
    pub fn snapshot(&self) -> String {
        Self::snapshot_of(&self.lock()).to_string()
    }

    fn snapshot_of(s: &State) -> Value {
        let mut v = serde_json::to_value(Snapshot {
            plate: &s.plate,
            rows: s.rows,
            columns: s.columns,
            planned: &s.planned,
            fields_per_well: s.fields_per_well,
            channels: &s.channels,
            zarr: s.zarr.as_deref(),
            header: &s.header,
            wells: &s.wells,
        })
        .unwrap_or(Value::Null);
        v["type"] = json!("snapshot");
        v
    }

    /// Subscribes to the changes after now.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.events.subscribe()
    }

    fn well_event(&self, well: &str, view: &WellView) {
        self.send(json!({"type": "well", "well": well, "data": view}));
    }

    /// A field reached the sinks with its cells, readouts and whether it was degraded.
    pub fn field(&self, work: &FieldWork) {
        if work.backfill.is_some() {
            return;
        }
        let k = &work.field.key;
        let well = k.well.name();
        if work.is_lagged() {
            let mut s = self.lock();
            s.header.lagging += 1;
            let view = s.wells.entry(well.clone()).or_default();
            view.lagging += 1;
            let view = view.clone();
            let header = Self::with_eta(&mut s.header);
            drop(s);
            self.send(json!({"type": "header", "data": header}));
            self.well_event(&well, &view);
            return;
        }
        let table = work.table();
        let mut s = self.lock();
        if work.raw_stored {
            let lag = work.stages_done_at.map_or(0.0, |at| {
                at.saturating_duration_since(work.field.received_at).as_secs_f64() * 1e3
            });
            let h = &mut s.header;
            h.lagging = h.lagging.saturating_sub(1);
            h.worst_lag_ms = h.worst_lag_ms.max(lag);
            let v = s.wells.entry(well.clone()).or_default();
            v.lagging = v.lagging.saturating_sub(1);
        }
        let view = s.wells.entry(well.clone()).or_default();
        view.fields.push((k.field, k.timepoint));
        view.add_columns(
            table.rows,
            table
                .columns
                .iter()
                .filter(|c| c.kind == ColumnKind::Measure)
                .map(|c| (c.name.as_str(), c.values.f64())),
        );
        for r in &work.well_readouts {
            view.add_readout(r);
        }
        view.degraded += u64::from(!work.owed.is_empty());
        // Scores may be of other wells too (a control field rescores every well).
        let mut touched = std::collections::BTreeSet::from([well]);
        for sh in &work.localization {
            s.wells.entry(sh.well.clone()).or_default().add_shift(sh);
            touched.insert(sh.well.clone());
        }
        let views: Vec<(String, WellView)> = touched
            .into_iter()
            .filter_map(|w| s.wells.get(&w).map(|v| (w, v.clone())))
            .collect();
        drop(s);
        for (w, view) in &views {
            self.well_event(w, view);
        }
    }

    /// Every sink finished a field `latency` after its first frame.
    pub fn done(&self, well: &str, latency: Duration, missed: bool, backlog: usize) {
        let mut s = self.lock();
        let hist = s.latency_us.get_or_insert_with(|| {
            hdrhistogram::Histogram::new(3).expect("3 significant figures is a valid precision")
        });
        let _ = hist.record(latency.as_micros() as u64);
        let (p50, p99) = (
            hist.value_at_quantile(0.5) as f64 / 1e3,
            hist.value_at_quantile(0.99) as f64 / 1e3,
        );
        let elapsed = s.started.map(|t| t.elapsed().as_secs_f64()).unwrap_or_default();
        let h = &mut s.header;
        h.fields_done += 1;
        h.deadline_misses += u64::from(missed);
        h.latency_p50_ms = p50;
        h.latency_p99_ms = p99;
        h.fields_per_s = if elapsed > 0.0 {
            h.fields_done as f64 / elapsed
        } else {
            0.0
        };
        h.backlog = backlog;
        let header = Self::with_eta(h);
        let well_view = if missed {
            let v = s.wells.entry(well.to_string()).or_default();
            v.deadline_misses += 1;
            Some(v.clone())
        } else {
            None
        };
        drop(s);
        self.send(json!({"type": "header", "data": header}));
        if let Some(v) = well_view {
            self.well_event(well, &v);
        }
    }

    /// The header with its estimate of when the owed analysis is done: the fields owed at the
    /// rate fields are being done so far.
    fn with_eta(h: &mut Header) -> Header {
        h.eta_s = (h.lagging > 0 && h.fields_per_s > 0.0).then(|| h.lagging as f64 / h.fields_per_s);
        h.clone()
    }

    /// A follow-up request was sent for `well`, or the bridge acknowledged one.
    pub fn followup(&self, well: &str, id: &str, rule: &str, state: &str) {
        let mut s = self.lock();
        let view = s.wells.entry(well.to_string()).or_default();
        match view.followups.iter_mut().find(|f| f.id == id) {
            Some(f) => f.state = state.to_string(),
            None => view.followups.push(FollowupView {
                id: id.to_string(),
                rule: rule.to_string(),
                state: state.to_string(),
            }),
        }
        let view = view.clone();
        drop(s);
        self.well_event(well, &view);
    }

    /// The run ended (or, for a finished plate, there is no run).
    pub fn finish(&self, backlog: usize) {
        let mut s = self.lock();
        s.header.state = "finished";
        s.header.backlog = backlog;
        let header = s.header.clone();
        drop(s);
        self.send(json!({"type": "header", "data": header}));
    }

    /// A well loaded from a finished plate.
    pub fn load_well(&self, well: &str, view: WellView) {
        self.lock().wells.insert(well.to_string(), view);
    }

    /// Fields of a finished plate, for its header.
    pub fn set_fields_done(&self, n: u64) {
        self.lock().header.fields_done = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_means_skip_non_finite_values_and_weigh_cells() {
        let mut w = WellView::default();
        w.add_columns(2, [("area_px", vec![10.0, 20.0]), ("x", vec![f64::NAN, 4.0])]);
        w.add_columns(1, [("area_px", vec![60.0])]);
        assert_eq!(w.cells, 3);
        assert_eq!(w.means["area_px"], 30.0);
        assert_eq!(w.means["x"], 4.0);
    }

    #[test]
    fn a_late_subscriber_gets_the_state_so_far_then_changes() {
        let live = Live::default();
        live.followup("B2", "r1", "rule", "requested");
        let snapshot: Value = serde_json::from_str(&live.snapshot()).unwrap();
        assert_eq!(snapshot["type"], "snapshot");
        assert_eq!(snapshot["wells"]["B2"]["followups"][0]["state"], "requested");
        let mut rx = live.subscribe();
        live.followup("B2", "r1", "rule", "done");
        let ev: Value = serde_json::from_str(&rx.try_recv().unwrap()).unwrap();
        assert_eq!(ev["data"]["followups"][0]["state"], "done");
        assert_eq!(ev["data"]["followups"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn a_lagged_field_counts_as_owed_until_its_analysis_arrives() {
        use liveomics_adapters::model::{Field, FieldKey, WellId};
        use std::sync::Arc;
        use std::time::SystemTime;
        let channels = ["DAPI".to_string()];
        let plan = Arc::new(AcquisitionPlan::open_ended("P1", 96, &channels, (1, 1), 1.0, 1).unwrap());
        let field = Field {
            key: FieldKey {
                plate: plan.plate.clone(),
                well: WellId::parse("B2", plan.format).unwrap(),
                field: 0,
                timepoint: 0,
            },
            width: 1,
            height: 1,
            channels: vec![None],
            acquired_at: SystemTime::now(),
            received_at: Instant::now() - Duration::from_millis(1500),
            origin: Default::default(),
        };
        let live = Live::default();
        live.field(&FieldWork::lagged(field.clone(), plan.clone(), Instant::now()));
        let snapshot: Value = serde_json::from_str(&live.snapshot()).unwrap();
        assert_eq!(snapshot["header"]["lagging"], 1);
        assert_eq!(snapshot["wells"]["B2"]["lagging"], 1);
        assert_eq!(snapshot["wells"]["B2"]["fields"].as_array().unwrap().len(), 0);
        let mut analysed = FieldWork::new(field, plan, Instant::now());
        analysed.raw_stored = true;
        analysed.stages_done_at = Some(Instant::now());
        live.field(&analysed);
        let snapshot: Value = serde_json::from_str(&live.snapshot()).unwrap();
        assert_eq!(snapshot["header"]["lagging"], 0);
        assert_eq!(snapshot["wells"]["B2"]["lagging"], 0);
        assert_eq!(snapshot["wells"]["B2"]["fields"].as_array().unwrap().len(), 1);
        assert!(snapshot["header"]["worst_lag_ms"].as_f64().unwrap() >= 1500.0);
    }

    #[test]
    fn readout_history_is_filed_by_field_count() {
        let mut w = WellView::default();
        let r = |fields, v| WellReadout {
            model: "m".into(),
            plate: "p".into(),
            well: "B2".into(),
            fields,
            tiles: 1,
            outputs: vec!["g".into()],
            values: vec![v],
            spread: vec![0.0],
            pool: Vec::new(),
        };
        w.add_readout(&r(2, 2.0));
        w.add_readout(&r(4, 4.0));
        w.add_readout(&r(3, 3.0));
        w.add_readout(&r(1, 1.0));
        assert_eq!(w.bulk["m"].history, vec![vec![1.0], vec![2.0], vec![3.0], vec![4.0]]);
        assert_eq!(w.bulk["m"].values, vec![4.0], "the readout over the most fields");
    }
}
