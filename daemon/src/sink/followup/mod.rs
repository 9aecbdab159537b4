//! The closed loop: rules from config evaluated on every finished field, and follow-up
//! acquisition requests published to the microscope as useq-schema `MDAEvent`s on
//! `liveomics/{instrument}/followup/{plate}`. The bridge acknowledges each request on
//! `liveomics/{instrument}/followup/{plate}/ack` when it schedules it and when it is done;
//! requests not done within `request_timeout_ms` are warned about and counted. Rules are data,
//! not code: a metric, a comparison, a threshold, a minimum number of cells, which wells, an
//! action, a cooldown and a per-plate budget.

mod rules;

use std::sync::Arc;
use std::time::Instant;

use liveomics_adapters::model::{AcquisitionPlan, WellId};
use liveomics_adapters::Invalid;
pub use rules::{Request, Rules};
use serde::{Deserialize, Serialize};
use zenoh::{Session, Wait};

use crate::component::{zenoh_err, Context, Sink, SinkConfig, SinkError, StageName};
use crate::field::{mean_column, FieldWork, GEOMETRY_MEASURES};
use crate::telemetry as t;

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
fn validate(c: &ClosedLoopConfig, ctx: &Context, plan: &AcquisitionPlan) -> Vec<Invalid> {
    let mut out = Vec::new();
    let models: Vec<&str> = ctx.inference.models.iter().map(|m| m.name.as_str()).collect();
    let mut names = std::collections::BTreeSet::new();
    for (i, r) in c.rules.iter().enumerate() {
        let key = ctx.key(&format!("rules[{i}]"));
        if r.name.is_empty() || !names.insert(r.name.as_str()) {
            out.push(Invalid::new(
                &format!("{key}.name"),
                format!("{:?} must be non-empty and unique", r.name),
            ));
        }
        let m = r.metric.as_str();
        let virtual_models = ctx.inference.models.iter().any(|m| {
            matches!(
                m.role,
                Some(liveomics_models::Role::VirtualStain | liveomics_models::Role::VirtualStainDiffusion)
            ) || m.role.is_none()
        });
        let localization = ctx
            .runs(StageName::Localize)
            .then(|| ctx.localization.metric(m, plan, virtual_models))
            .flatten();
        let known = m == "cells"
            || GEOMETRY_MEASURES.contains(&m)
            || plan.channels.iter().any(|ch| mean_column(&ch.name) == m)
            || localization.is_some()
            || m.split_once('.').is_some_and(|(model, _)| models.contains(&model));
        if !known {
            let chans: Vec<String> = plan.channels.iter().map(|ch| mean_column(&ch.name)).collect();
            out.push(Invalid::new(
                &format!("{key}.metric"),
                format!(
                    "unknown metric {m:?}; known: cells, {}, {}, {{model}}.{{output}}, or with the \
                     \"localize\" stage loc.{{protein}}.{{feature}} and loc.{{protein}}.shift",
                    GEOMETRY_MEASURES.join(", "),
                    chans.join(", ")
                ),
            ));
        }
        if localization == Some(true) && r.scope != Scope::Well {
            out.push(Invalid::new(
                &format!("{key}.scope"),
                format!("{m:?} is a well's score: it needs scope \"well\""),
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

/// The closed-loop sink: the rules, and the zenoh session that carries their requests out and
/// the bridge's acks in.
pub struct FollowupSink {
    session: Session,
    acks: zenoh::pubsub::Subscriber<zenoh::handlers::FifoChannelHandler<zenoh::sample::Sample>>,
    rules: Rules,
    /// In a cluster, the requests the other members publish.
    others: Option<zenoh::pubsub::Subscriber<zenoh::handlers::FifoChannelHandler<zenoh::sample::Sample>>>,
    /// The plate page's state: requests and their acks per well.
    live: std::sync::Arc<crate::live::Live>,
}

impl std::fmt::Debug for FollowupSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FollowupSink").field("rules", &self.rules).finish()
    }
}

impl SinkConfig for ClosedLoopConfig {
    fn enabled(&self) -> bool {
        self.enabled
    }

    fn validate_plan(&self, ctx: &Context, plan: &AcquisitionPlan, problems: &mut Vec<Invalid>) {
        problems.extend(validate(self, ctx, plan));
    }

    fn build(&self, ctx: &Context, plan: Arc<AcquisitionPlan>) -> Result<Box<dyn Sink>, SinkError> {
        Ok(Box::new(FollowupSink::open(self, ctx, &plan)?))
    }
}

impl FollowupSink {
    pub fn open(c: &ClosedLoopConfig, ctx: &Context, plan: &AcquisitionPlan) -> Result<Self, SinkError> {
        let session = ctx.resources.zenoh.get(ctx.zenoh)?;
        let plate = plan.plate.to_string();
        let ack_key = format!("liveomics/{}/followup/{plate}/ack", ctx.instrument);
        let acks = session
            .declare_subscriber(&ack_key)
            .with(zenoh::handlers::FifoChannel::new(1024))
            .wait()
            .map_err(zenoh_err("cannot subscribe to follow-up acks"))?;
        // The other members' requests count here too (caps, cooldowns, field numbers).
        let member = ctx.resources.cluster.member().map(|m| m.id.clone());
        let others = match &member {
            Some(_) => Some(
                session
                    .declare_subscriber(format!("liveomics/{}/followup/{plate}", ctx.instrument))
                    .allowed_origin(zenoh::sample::Locality::Remote)
                    .with(zenoh::handlers::FifoChannel::new(1024))
                    .wait()
                    .map_err(zenoh_err("cannot subscribe to the other members' follow-up requests"))?,
            ),
            None => None,
        };
        let mut rules = Rules::new(c, ctx.instrument, plan);
        if let Some(m) = &member {
            rules = rules.in_cluster(m);
        }
        t::ClosedLoopOn {
            rules: c.rules.len(),
            key: &format!("liveomics/{}/followup/{plate}", ctx.instrument),
        }
        .emit();
        Ok(Self {
            session,
            acks,
            rules,
            others,
            live: std::sync::Arc::clone(&ctx.resources.live),
        })
    }

    fn drain_acks(&mut self) {
        if let Some(others) = &self.others {
            while let Ok(Some(sample)) = others.try_recv() {
                self.rules.observed(&sample.payload().to_bytes(), Instant::now());
            }
        }
        while let Ok(Some(sample)) = self.acks.try_recv() {
            if let Some((id, well, rule, state)) = self.rules.ack(&sample.payload().to_bytes()) {
                self.live.followup(&well.name(), &id, &rule, state.as_str());
            }
        }
        self.rules.timeouts(Instant::now());
    }
}

impl Sink for FollowupSink {
    fn name(&self) -> &'static str {
        "followup"
    }

    fn write(&mut self, work: &FieldWork) -> Result<(), SinkError> {
        self.drain_acks();
        // Rules fired on the field when it was first written; a backfill adds images only. A
        // lagged field's rules fire when its analysis arrives.
        if work.backfill.is_some() || work.is_lagged() {
            return Ok(());
        }
        let now = Instant::now();
        for request in self.rules.field(work, now) {
            self.session
                .put(&request.topic, serde_json::to_vec(&request.body).unwrap_or_default())
                .encoding("application/json")
                .congestion_control(zenoh::qos::CongestionControl::Block)
                .wait()
                .map_err(zenoh_err("cannot publish a follow-up request"))?;
            self.rules.sent(&request, now);
            self.live
                .followup(&request.well.name(), &request.id, &request.rule, "requested");
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), SinkError> {
        self.drain_acks();
        let open = self.rules.open();
        if !open.is_empty() {
            t::FollowupsOpenAtEnd { ids: &open }.emit();
        }
        Ok(())
    }
}
