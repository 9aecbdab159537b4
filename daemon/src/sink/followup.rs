//! The closed loop: rules from config evaluated on every finished field, and follow-up
//! acquisition requests published to the microscope as useq-schema `MDAEvent`s on
//! `liveomics/{instrument}/followup/{plate}`. The bridge acknowledges each request on
//! `liveomics/{instrument}/followup/{plate}/ack` when it schedules it and when it is done;
//! requests not done within `request_timeout_ms` are warned about and counted. Rules are data,
//! not code: a metric, a comparison, a threshold, a minimum number of cells, which wells, an
//! action, a cooldown and a per-plate budget.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use liveomics_adapters::model::{AcquisitionPlan, WellId};
use liveomics_adapters::Invalid;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use zenoh::{Session, Wait};

use super::{Sink, SinkError};
use crate::config::Config;
use crate::stage::FieldWork;
use crate::telemetry::{self as t, FollowupState};
use crate::zenoh_session::SharedSession;

/// Longest cooldown or revisit delay: longer than any plate is on the stage, and small enough
/// that a `Duration` of it cannot overflow.
const MAX_SECONDS: f64 = 1.0e7;

/// `[closed_loop]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClosedLoopConfig {
    pub enabled: bool,
    /// Requests sent per plate at most, over all rules.
    pub max_followups_per_plate: u32,
    /// A request not acknowledged as done by then is reported (warning, metric).
    pub request_timeout_ms: u64,
    /// Follow-up fields of a well are numbered from here up, so that they never collide with the
    /// fields the acquisition plan itself will still deliver (the daemon does not know them).
    pub followup_field_base: u32,
    pub rules: Vec<RuleConfig>,
}

impl Default for ClosedLoopConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            max_followups_per_plate: 20,
            request_timeout_ms: 60_000,
            followup_field_base: 1000,
            rules: Vec::new(),
        }
    }
}

/// What a rule's metric is computed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Count the field's cells whose value passes; fire when at least `min_cells` do.
    #[default]
    Cell,
    /// The field's mean over its cells (or `cells`: its cell count) must pass, with at least
    /// `min_cells` cells.
    Field,
    /// The well's mean over all its cells so far (or `cells`: its cell count) must pass.
    Well,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Comparison {
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
}

impl Comparison {
    fn holds(self, v: f64, t: f64) -> bool {
        match self {
            Comparison::Gt => v > t,
            Comparison::Ge => v >= t,
            Comparison::Lt => v < t,
            Comparison::Le => v <= t,
        }
    }
}

/// What the microscope is asked to do when a rule fires.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// `fields` new positions in the same well, `spacing_um` apart along x from the trigger.
    MoreFields { fields: u32, spacing_um: f64 },
    /// The same position again in other channels (channel config names).
    Channels { channels: Vec<String> },
    /// A z-stack of `steps` planes `step_um` apart, centred on the trigger's z.
    ZStack { steps: u32, step_um: f64 },
    /// The same position and channels again after `delay_s`.
    Revisit { delay_s: f64 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    /// `cells`, `area_px`, `nucleus_area_px`, `mean_{channel}` or a prediction column `{model}.{output}`.
    pub metric: String,
    #[serde(default)]
    pub scope: Scope,
    pub comparison: Comparison,
    pub threshold: f64,
    #[serde(default)]
    pub min_cells: u32,
    /// Wells the rule watches; empty: all.
    #[serde(default)]
    pub wells: Vec<String>,
    /// Seconds before the same rule may fire again in the same well.
    #[serde(default)]
    pub cooldown_s: f64,
    pub action: Action,
}

/// Checks that need the plan: wells exist, metrics name a column the cells will have.
pub fn validate(cfg: &Config, plan: &AcquisitionPlan) -> Vec<Invalid> {
    let c = &cfg.closed_loop;
    let mut out = Vec::new();
    let models: Vec<&str> = cfg.inference.models.iter().map(|m| m.name.as_str()).collect();
    let mut names = std::collections::BTreeSet::new();
    for (i, r) in c.rules.iter().enumerate() {
        let key = format!("closed_loop.rules[{i}]");
        if r.name.is_empty() || !names.insert(r.name.as_str()) {
            out.push(Invalid::new(
                &format!("{key}.name"),
                format!("{:?} must be non-empty and unique", r.name),
            ));
        }
        let m = r.metric.as_str();
        let known = m == "cells"
            || m == "area_px"
            || m == "nucleus_area_px"
            || plan
                .channels
                .iter()
                .any(|ch| crate::sink::cells_arrow::mean_column(&ch.name) == m)
            || m.split_once('.').is_some_and(|(model, _)| models.contains(&model));
        if !known {
            let chans: Vec<String> = plan
                .channels
                .iter()
                .map(|ch| crate::sink::cells_arrow::mean_column(&ch.name))
                .collect();
            out.push(Invalid::new(
                &format!("{key}.metric"),
                format!(
                    "unknown metric {m:?}; known: cells, area_px, nucleus_area_px, {}, or {{model}}.{{output}}",
                    chans.join(", ")
                ),
            ));
        }
        if m == "cells" && r.scope == Scope::Cell {
            out.push(Invalid::new(
                &format!("{key}.scope"),
                "metric \"cells\" needs scope \"field\" or \"well\"",
            ));
        }
        for (j, w) in r.wells.iter().enumerate() {
            if let Err(e) = WellId::parse(w, plan.format) {
                out.push(Invalid::new(&format!("{key}.wells[{j}]"), e.to_string()));
            }
        }
        if !(r.threshold.is_finite() && (0.0..=MAX_SECONDS).contains(&r.cooldown_s)) {
            out.push(Invalid::new(
                &key,
                "threshold must be finite and cooldown_s in 0..=10000000 (about 115 days)",
            ));
        }
        let bad_action = match &r.action {
            Action::MoreFields { fields, spacing_um } => *fields == 0 || *fields > 100 || !(spacing_um.is_finite()),
            Action::Channels { channels } => channels.is_empty(),
            Action::ZStack { steps, step_um } => *steps == 0 || *steps > 1000 || !(*step_um > 0.0),
            Action::Revisit { delay_s } => !(0.0..=MAX_SECONDS).contains(delay_s),
        };
        if bad_action {
            out.push(Invalid::new(
                &format!("{key}.action"),
                "fields 1..=100, spacing finite; channels non-empty; steps 1..=1000 and step_um > 0; delay_s in 0..=10000000",
            ));
        }
    }
    out
}

#[derive(Debug)]
struct PendingRequest {
    rule: String,
    sent: Instant,
    state: FollowupState,
    warned: bool,
}

/// The closed-loop sink.
pub struct FollowupSink {
    session: Session,
    instrument: String,
    plate: String,
    cfg: ClosedLoopConfig,
    channels: Vec<String>,
    wells_filter: Vec<Vec<WellId>>,
    acks: zenoh::pubsub::Subscriber<zenoh::handlers::FifoChannelHandler<zenoh::sample::Sample>>,
    pending: BTreeMap<String, PendingRequest>,
    last_fired: HashMap<(usize, WellId), Instant>,
    sent: u32,
    next_field: HashMap<WellId, u32>,
    well_acc: HashMap<(usize, WellId), (f64, u64)>,
}

impl std::fmt::Debug for FollowupSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FollowupSink")
            .field("plate", &self.plate)
            .field("sent", &self.sent)
            .finish()
    }
}

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

impl FollowupSink {
    pub fn open(cfg: &Config, plan: &AcquisitionPlan, session: &SharedSession) -> Result<Self, SinkError> {
        let c = &cfg.closed_loop;
        let session = session.get(&cfg.zenoh)?;
        let plate = plan.plate.to_string();
        let ack_key = format!("liveomics/{}/followup/{plate}/ack", cfg.instrument);
        let acks = session
            .declare_subscriber(&ack_key)
            .with(zenoh::handlers::FifoChannel::new(1024))
            .wait()
            .map_err(super::zenoh_err("cannot subscribe to follow-up acks"))?;
        let wells_filter = c
            .rules
            .iter()
            .map(|r| {
                r.wells
                    .iter()
                    .filter_map(|w| WellId::parse(w, plan.format).ok())
                    .collect()
            })
            .collect();
        t::ClosedLoopOn {
            rules: c.rules.len(),
            key: &format!("liveomics/{}/followup/{plate}", cfg.instrument),
        }
        .emit();
        Ok(Self {
            session,
            instrument: cfg.instrument.clone(),
            plate,
            cfg: c.clone(),
            channels: plan.channels.iter().map(|ch| ch.name.clone()).collect(),
            wells_filter,
            acks,
            pending: BTreeMap::new(),
            last_fired: HashMap::new(),
            sent: 0,
            next_field: HashMap::new(),
            well_acc: HashMap::new(),
        })
    }

    /// Per-cell values of a metric in this field.
    fn values(work: &FieldWork, metric: &str) -> Vec<f64> {
        let r = &work.records;
        match metric {
            "area_px" => r.iter().map(|c| c.area_px as f64).collect(),
            "nucleus_area_px" => r.iter().map(|c| c.nucleus_area_px as f64).collect(),
            m => {
                if let Some(ci) = work
                    .plan
                    .channels
                    .iter()
                    .position(|ch| crate::sink::cells_arrow::mean_column(&ch.name) == m)
                {
                    return r.iter().map(|c| c.mean_intensity[ci] as f64).collect();
                }
                work.cell_predictions
                    .iter()
                    .find(|(name, _)| name == m)
                    .map(|(_, v)| v.iter().map(|&x| x as f64).collect())
                    .unwrap_or_default()
            }
        }
    }

    fn drain_acks(&mut self) {
        while let Ok(Some(sample)) = self.acks.try_recv() {
            let bytes = sample.payload().to_bytes();
            let reject = |reason, detail, id, state| {
                t::FollowupAckRejected {
                    reason,
                    detail,
                    id,
                    state,
                }
                .emit()
            };
            let Ok(ack) = serde_json::from_slice::<Value>(&bytes) else {
                reject("json", "not JSON", None, None);
                continue;
            };
            let (Some(id), Some(state)) = (ack["id"].as_str(), ack["state"].as_str()) else {
                reject("fields", "no string `id` and `state`", None, None);
                continue;
            };
            let Some(new) = FollowupState::from_ack(state) else {
                reject(
                    "state",
                    "`state` is none of scheduled, started, done, rejected",
                    Some(id),
                    Some(state),
                );
                continue;
            };
            let Some(p) = self.pending.get_mut(id) else {
                reject(
                    "unknown_id",
                    "no request with this id is pending",
                    Some(id),
                    Some(state),
                );
                continue;
            };
            // Acks may overtake each other, or come twice: a state only moves forward, and a
            // request that is done or rejected stays so.
            if new <= p.state || p.state.is_final() {
                reject(
                    "stale",
                    "the request is already in this state or a later one",
                    Some(id),
                    Some(state),
                );
                continue;
            }
            t::FollowupChanged {
                id: Some(id),
                after_ms: Some(p.sent.elapsed().as_millis() as u64),
                reason: ack["reason"].as_str(),
                ..t::FollowupChanged::new(&p.rule, new)
            }
            .emit();
            p.state = new;
        }
        let timeout = Duration::from_millis(self.cfg.request_timeout_ms);
        for (id, p) in self.pending.iter_mut() {
            if !p.state.is_final() && !p.warned && p.sent.elapsed() > timeout {
                p.warned = true;
                t::FollowupChanged {
                    id: Some(id),
                    after_ms: Some(p.sent.elapsed().as_millis() as u64),
                    last_state: Some(p.state),
                    timeout_ms: Some(self.cfg.request_timeout_ms),
                    ..t::FollowupChanged::new(&p.rule, FollowupState::Timeout)
                }
                .emit();
            }
        }
    }

    /// The useq-schema events for an action at the trigger field's position.
    fn events(&self, action: &Action, work: &FieldWork, id: &str, fields: &[u32]) -> Vec<Value> {
        let origin = &work.field.origin;
        let well = work.field.key.well.name();
        let [x, y, z] = origin.stage_um.map_or([None; 3], |p| p.map(Some));
        let event = |p: usize, field: u32, channel: &str, c: usize, pos: [Option<f64>; 3], zi: Option<usize>| {
            let mut index = serde_json::Map::new();
            index.insert("p".into(), json!(p));
            index.insert("c".into(), json!(c));
            if let Some(zi) = zi {
                index.insert("z".into(), json!(zi));
            }
            let mut e = json!({
                "index": index,
                "channel": {"config": channel, "group": "Channel"},
                "pos_name": format!("{well}_{field:04}"),
                "metadata": {"liveomics": {"followup_id": id, "plate": self.plate, "well": well, "field": field}},
            });
            for (k, v) in ["x_pos", "y_pos", "z_pos"].iter().zip(pos) {
                if let Some(v) = v {
                    e[*k] = json!(v);
                }
            }
            e
        };
        let mut out = Vec::new();
        match action {
            Action::MoreFields { spacing_um, .. } => {
                for (p, &f) in fields.iter().enumerate() {
                    let dx = spacing_um * (p as f64 + 1.0);
                    for (c, ch) in self.channels.iter().enumerate() {
                        out.push(event(p, f, ch, c, [x.map(|x| x + dx), y, z], None));
                    }
                }
            }
            Action::Channels { channels } => {
                for (c, ch) in channels.iter().enumerate() {
                    out.push(event(0, fields[0], ch, c, [x, y, z], None));
                }
            }
            Action::ZStack { steps, step_um } => {
                let half = (*steps as f64 - 1.0) / 2.0;
                for zi in 0..*steps as usize {
                    let dz = (zi as f64 - half) * step_um;
                    for (c, ch) in self.channels.iter().enumerate() {
                        out.push(event(
                            0,
                            fields[0],
                            ch,
                            c,
                            [x, y, z.map(|z| z + dz).or(Some(dz))],
                            Some(zi),
                        ));
                    }
                }
            }
            Action::Revisit { .. } => {
                for (c, ch) in self.channels.iter().enumerate() {
                    out.push(event(0, fields[0], ch, c, [x, y, z], None));
                }
            }
        }
        out
    }
}

impl Sink for FollowupSink {
    fn name(&self) -> &'static str {
        "followup"
    }

    fn write(&mut self, work: &FieldWork) -> Result<(), SinkError> {
        self.drain_acks();
        let key = &work.field.key;
        let base = self.cfg.followup_field_base;
        let next = self.next_field.entry(key.well).or_insert(base);
        if key.field >= base {
            *next = (*next).max(key.field.saturating_add(1));
        }
        if let Some(id) = &work.field.origin.followup_id {
            t::FollowupFieldReceived { id, field: &work.name }.emit();
            return Ok(());
        }
        let now = Instant::now();
        for (ri, rule) in self.cfg.rules.clone().iter().enumerate() {
            if !self.wells_filter[ri].is_empty() && !self.wells_filter[ri].contains(&key.well) {
                continue;
            }
            let values = if rule.metric == "cells" {
                Vec::new()
            } else {
                Self::values(work, &rule.metric)
            };
            let cells = work.records.len() as u64;
            let acc = self.well_acc.entry((ri, key.well)).or_insert((0.0, 0));
            acc.0 += values.iter().filter(|v| v.is_finite()).sum::<f64>();
            acc.1 += if rule.metric == "cells" {
                cells
            } else {
                values.iter().filter(|v| v.is_finite()).count() as u64
            };
            let mean = |s: f64, n: u64| if n > 0 { s / n as f64 } else { f64::NAN };
            let (value, n, fires) = match rule.scope {
                Scope::Cell => {
                    let n = values
                        .iter()
                        .filter(|&&v| rule.comparison.holds(v, rule.threshold))
                        .count() as u64;
                    (n as f64, n, n >= u64::from(rule.min_cells.max(1)))
                }
                Scope::Field => {
                    let v = if rule.metric == "cells" {
                        cells as f64
                    } else {
                        mean(values.iter().sum(), values.len() as u64)
                    };
                    (
                        v,
                        cells,
                        cells >= u64::from(rule.min_cells) && rule.comparison.holds(v, rule.threshold),
                    )
                }
                Scope::Well => {
                    let (s, k) = *acc;
                    let v = if rule.metric == "cells" { k as f64 } else { mean(s, k) };
                    (
                        v,
                        k,
                        k >= u64::from(rule.min_cells) && rule.comparison.holds(v, rule.threshold),
                    )
                }
            };
            if !fires {
                continue;
            }
            let cooldown = Duration::from_secs_f64(rule.cooldown_s);
            if let Some(last) = self.last_fired.get(&(ri, key.well)) {
                if now.duration_since(*last) < cooldown {
                    t::FollowupChanged {
                        field: Some(&work.name),
                        ..t::FollowupChanged::new(&rule.name, FollowupState::Suppressed)
                    }
                    .emit();
                    continue;
                }
            }
            if self.sent >= self.cfg.max_followups_per_plate {
                t::FollowupChanged {
                    field: Some(&work.name),
                    ..t::FollowupChanged::new(&rule.name, FollowupState::OverBudget)
                }
                .emit();
                continue;
            }
            if matches!(rule.action, Action::MoreFields { .. }) && work.field.origin.stage_um.is_none() {
                t::FollowupUnplaceable {
                    rule: &rule.name,
                    field: &work.name,
                    why: "no stage position for this field",
                }
                .emit();
                continue;
            }
            let new_fields: u32 = match rule.action {
                Action::MoreFields { fields, .. } => fields,
                _ => 1,
            };
            let next = self.next_field.entry(key.well).or_insert(base);
            // Field numbers come from the network: a well already at u32::MAX gets no more.
            let end = next.saturating_add(new_fields);
            let fields: Vec<u32> = (*next..end).collect();
            *next = end;
            if fields.is_empty() {
                t::FollowupUnplaceable {
                    rule: &rule.name,
                    field: &work.name,
                    why: "the well's field numbers are used up",
                }
                .emit();
                continue;
            }
            self.sent += 1;
            let id = format!("{}-{}-{}", rule.name, self.plate, self.sent);
            let events = self.events(&rule.action, work, &id, &fields);
            let not_before_unix_ns = match rule.action {
                Action::Revisit { delay_s } => unix_ns() + Duration::from_secs_f64(delay_s).as_nanos(),
                _ => 0,
            };
            let request = json!({
                "id": id,
                "rule": rule.name,
                "plate": self.plate,
                "well": key.well.name(),
                "trigger": {"field": key.field, "timepoint": key.timepoint, "metric": rule.metric,
                            "value": if value.is_finite() { json!(value) } else { Value::Null }, "cells": n},
                "fields": fields,
                "not_before_unix_ns": not_before_unix_ns.to_string(),
                "requested_unix_ns": unix_ns().to_string(),
                "events": events,
            });
            let topic = format!("liveomics/{}/followup/{}", self.instrument, self.plate);
            self.session
                .put(&topic, serde_json::to_vec(&request).unwrap_or_default())
                .encoding("application/json")
                .congestion_control(zenoh::qos::CongestionControl::Block)
                .wait()
                .map_err(super::zenoh_err("cannot publish a follow-up request"))?;
            t::FollowupChanged {
                id: Some(&id),
                field: Some(&work.name),
                value: value.is_finite().then_some(value),
                cells: Some(n),
                ..t::FollowupChanged::new(&rule.name, FollowupState::Requested)
            }
            .emit();
            self.last_fired.insert((ri, key.well), now);
            self.pending.insert(
                id,
                PendingRequest {
                    rule: rule.name.clone(),
                    sent: now,
                    state: FollowupState::Requested,
                    warned: false,
                },
            );
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), SinkError> {
        self.drain_acks();
        let open: Vec<&String> = self
            .pending
            .iter()
            .filter(|(_, p)| !p.state.is_final())
            .map(|(id, _)| id)
            .collect();
        if !open.is_empty() {
            t::FollowupsOpenAtEnd { ids: &open }.emit();
        }
        Ok(())
    }
}
