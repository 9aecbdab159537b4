//! The closed-loop rules as plain state: a finished field in, the follow-up requests it fires
//! out; acks in, request states out. No zenoh here (the sink in `mod.rs` carries the messages),
//! so every rule, cooldown, budget and ack transition is unit-tested without a session.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use liveomics_adapters::model::{AcquisitionPlan, WellId};
use serde_json::{json, Value};

use super::{Action, ClosedLoopConfig, Scope};
use crate::field::FieldWork;
use crate::telemetry::{self as t, FollowupState};

#[derive(Debug)]
struct PendingRequest {
    rule: String,
    well: WellId,
    sent: Instant,
    state: FollowupState,
    warned: bool,
}

/// A follow-up request a field fired: what to publish, and what to record once it is out.
#[derive(Debug, Clone)]
pub struct Request {
    pub id: String,
    /// The well whose field fired it.
    pub well: WellId,
    pub rule: String,
    /// `liveomics/{instrument}/followup/{plate}`.
    pub topic: String,
    /// The request as the bridge reads it (docs/PROTOCOL.md).
    pub body: Value,
    rule_index: usize,
    field: String,
    value: f64,
    cells: u64,
}

/// The rules of one plate and what they have done so far.
#[derive(Debug)]
pub struct Rules {
    instrument: String,
    plate: String,
    cfg: ClosedLoopConfig,
    channels: Vec<String>,
    wells_filter: Vec<Vec<WellId>>,
    pending: BTreeMap<String, PendingRequest>,
    last_fired: HashMap<(usize, WellId), Instant>,
    sent: u32,
    next_field: HashMap<WellId, u32>,
    well_acc: HashMap<(usize, WellId), (f64, u64)>,
    /// In a cluster, this member's name: part of every request id, which must be unique over
    /// the members.
    member: Option<String>,
    format: liveomics_adapters::model::PlateFormat,
}

/// For a metric `loc.{protein}.shift`: `Some` of the field's well's score for that protein, which
/// is `None` until the well can be scored (no control fields yet). `None` for other metrics.
/// Scores of other wells a control field carries are not this field's: a rule fires on a
/// well's own field, where the microscope can act on it.
fn well_score(work: &FieldWork, metric: &str) -> Option<Option<f64>> {
    let protein = metric.strip_prefix("loc.")?.strip_suffix(".shift")?;
    let well = work.field.key.well.name();
    Some(
        work.localization
            .iter()
            .find(|s| s.protein == protein && s.well == well)
            .map(|s| s.shift),
    )
}

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

impl Rules {
    pub fn new(c: &ClosedLoopConfig, instrument: &str, plan: &AcquisitionPlan) -> Self {
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
        Self {
            instrument: instrument.to_string(),
            plate: plan.plate.to_string(),
            cfg: c.clone(),
            channels: plan.channels.iter().map(|ch| ch.name.clone()).collect(),
            wells_filter,
            pending: BTreeMap::new(),
            last_fired: HashMap::new(),
            sent: 0,
            next_field: HashMap::new(),
            well_acc: HashMap::new(),
            member: None,
            format: plan.format,
        }
    }

    /// Rules of one member of a cluster: its request ids carry its name.
    pub fn in_cluster(mut self, member: &str) -> Self {
        self.member = Some(member.to_string());
        self
    }

    /// Another member of the cluster published a request: it counts against the plate's cap,
    /// starts its rule's cooldown in its well and takes its field numbers, as one of ours would.
    /// Returns the request id, or `None` for a body that is not a request of these rules.
    pub fn observed(&mut self, bytes: &[u8], now: Instant) -> Option<String> {
        let v: Value = serde_json::from_slice(bytes).ok()?;
        let id = v.get("id")?.as_str()?.to_string();
        let rule = v.get("rule")?.as_str()?;
        let ri = self.cfg.rules.iter().position(|r| r.name == rule)?;
        let well = WellId::parse(v.get("well")?.as_str()?, self.format).ok()?;
        self.sent += 1;
        self.last_fired.insert((ri, well), now);
        let last = v
            .get("fields")?
            .as_array()?
            .iter()
            .filter_map(|f| f.as_u64().and_then(|f| u32::try_from(f).ok()))
            .max();
        if let Some(last) = last {
            let next = self.next_field.entry(well).or_insert(self.cfg.followup_field_base);
            *next = (*next).max(last.saturating_add(1));
        }
        Some(id)
    }

    /// Per-cell values of a metric in this field.
    fn values(work: &FieldWork, metric: &str) -> Vec<f64> {
        work.table().f64(metric).unwrap_or_default()
    }

    /// One ack from the bridge (untrusted bytes): moves its request's state forward, or is
    /// logged and counted as rejected.
    /// Applies an ack from the bridge; returns the request's id, well, rule and new state when it
    /// moved it (a rejected ack is logged and counted here).
    pub fn ack(&mut self, bytes: &[u8]) -> Option<(String, WellId, String, FollowupState)> {
        let reject = |reason, detail, id, state| {
            t::FollowupAckRejected {
                reason,
                detail,
                id,
                state,
            }
            .emit()
        };
        let Ok(ack) = serde_json::from_slice::<Value>(bytes) else {
            reject("json", "not JSON", None, None);
            return None;
        };
        let (Some(id), Some(state)) = (ack["id"].as_str(), ack["state"].as_str()) else {
            reject("fields", "no string `id` and `state`", None, None);
            return None;
        };
        let Some(new) = FollowupState::from_ack(state) else {
            reject(
                "state",
                "`state` is none of scheduled, started, done, rejected",
                Some(id),
                Some(state),
            );
            return None;
        };
        let Some(p) = self.pending.get_mut(id) else {
            reject(
                "unknown_id",
                "no request with this id is pending",
                Some(id),
                Some(state),
            );
            return None;
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
            return None;
        }
        t::FollowupChanged {
            id: Some(id),
            after_ms: Some(p.sent.elapsed().as_millis() as u64),
            reason: ack["reason"].as_str(),
            ..t::FollowupChanged::new(&p.rule, new)
        }
        .emit();
        p.state = new;
        Some((id.to_string(), p.well, p.rule.clone(), new))
    }

    /// Requests not done by `now` minus `request_timeout_ms`, warned about once each; returns
    /// their ids.
    pub fn timeouts(&mut self, now: Instant) -> Vec<String> {
        let mut out = Vec::new();
        for (id, p) in self.pending.iter_mut() {
            if !p.state.is_final()
                && !p.warned
                && now.saturating_duration_since(p.sent) > Duration::from_millis(self.cfg.request_timeout_ms)
            {
                p.warned = true;
                t::FollowupChanged {
                    id: Some(id),
                    after_ms: Some(now.saturating_duration_since(p.sent).as_millis() as u64),
                    last_state: Some(p.state),
                    timeout_ms: Some(self.cfg.request_timeout_ms),
                    ..t::FollowupChanged::new(&p.rule, FollowupState::Timeout)
                }
                .emit();
                out.push(id.clone());
            }
        }
        out
    }

    /// Requests not yet done (nor rejected).
    pub fn open(&self) -> Vec<&String> {
        self.pending
            .iter()
            .filter(|(_, p)| !p.state.is_final())
            .map(|(id, _)| id)
            .collect()
    }

    /// The state of a request, if it was sent.
    pub fn state(&self, id: &str) -> Option<FollowupState> {
        self.pending.get(id).map(|p| p.state)
    }

    /// Evaluates every rule on a finished field at `now`: the requests it fires, in rule order.
    /// Cooldowns, the plate's budget and field numbers are taken here; call [`Rules::sent`] for
    /// each request once it is published.
    pub fn field(&mut self, work: &FieldWork, now: Instant) -> Vec<Request> {
        let key = &work.field.key;
        let base = self.cfg.followup_field_base;
        let next = self.next_field.entry(key.well).or_insert(base);
        if key.field >= base {
            *next = (*next).max(key.field.saturating_add(1));
        }
        if let Some(id) = &work.field.origin.followup_id {
            t::FollowupFieldReceived { id, field: &work.name }.emit();
            return Vec::new();
        }
        let mut out = Vec::new();
        for (ri, rule) in self.cfg.rules.clone().iter().enumerate() {
            if !self.wells_filter[ri].is_empty() && !self.wells_filter[ri].contains(&key.well) {
                continue;
            }
            // A well's relocalization score arrives with the field, already over the well.
            let score = well_score(work, &rule.metric);
            let values = if rule.metric == "cells" || score.is_some() {
                Vec::new()
            } else {
                Self::values(work, &rule.metric)
            };
            let cells = work.records.len() as u64;
            let acc = self.well_acc.entry((ri, key.well)).or_insert((0.0, 0));
            acc.0 += values.iter().filter(|v| v.is_finite()).sum::<f64>();
            acc.1 += if rule.metric == "cells" || score.is_some() {
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
                    let v = match score {
                        Some(Some(z)) => z,
                        Some(None) => f64::NAN,
                        None if rule.metric == "cells" => k as f64,
                        None => mean(s, k),
                    };
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
            let id = match &self.member {
                Some(m) => format!("{}-{}-{m}-{}", rule.name, self.plate, self.sent),
                None => format!("{}-{}-{}", rule.name, self.plate, self.sent),
            };
            let events = self.events(&rule.action, work, &id, &fields);
            let not_before_unix_ns = match rule.action {
                Action::Revisit { delay_s } => unix_ns() + Duration::from_secs_f64(delay_s).as_nanos(),
                _ => 0,
            };
            // A lagged field's analysis came after the acquisition moved on: the request says
            // how late, and the bridge revisits the well all the same.
            let lag_ms = work.stages_done_at.map_or(0, |at| {
                at.saturating_duration_since(work.field.received_at).as_millis() as u64
            });
            let request = json!({
                "id": id,
                "rule": rule.name,
                "plate": self.plate,
                "well": key.well.name(),
                "trigger": {"field": key.field, "timepoint": key.timepoint, "metric": rule.metric,
                            "value": if value.is_finite() { json!(value) } else { Value::Null }, "cells": n,
                            "late": work.raw_stored, "lag_ms": lag_ms},
                "fields": fields,
                "not_before_unix_ns": not_before_unix_ns.to_string(),
                "requested_unix_ns": unix_ns().to_string(),
                "events": events,
            });
            out.push(Request {
                topic: format!("liveomics/{}/followup/{}", self.instrument, self.plate),
                body: request,
                id,
                rule_index: ri,
                rule: rule.name.clone(),
                well: key.well,
                field: work.name.clone(),
                value,
                cells: n,
            });
        }
        out
    }

    /// Records a request as published at `now`: it is pending, and its rule's cooldown starts.
    pub fn sent(&mut self, r: &Request, now: Instant) {
        t::FollowupChanged {
            id: Some(&r.id),
            field: Some(&r.field),
            value: r.value.is_finite().then_some(r.value),
            cells: Some(r.cells),
            ..t::FollowupChanged::new(&r.rule, FollowupState::Requested)
        }
        .emit();
        self.last_fired.insert((r.rule_index, r.well), now);
        self.pending.insert(
            r.id.clone(),
            PendingRequest {
                rule: r.rule.clone(),
                well: r.well,
                sent: now,
                state: FollowupState::Requested,
                warned: false,
            },
        );
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

#[cfg(test)]
mod tests;
