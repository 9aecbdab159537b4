//! Events of the latency budget's enforcement: work skipped inline (degraded fields), work owed
//! and backfilled, and the backlog.

use std::time::Duration;

use metrics::{counter, gauge, histogram};
use tracing::{error, info};

use super::{
    BACKFILLED, BACKFILL_LOST, BACKLOG_AGE_SECONDS, BACKLOG_FIELDS, DEGRADED, LAGGED, REQUIRED_LATENCY_SECONDS,
    REQUIRED_MISSES,
};

/// Optional work was skipped inline on a field, and is owed to it.
#[derive(Debug)]
pub struct WorkDeferred<'a> {
    pub field: &'a str,
    pub model: &'a str,
    pub class: &'a str,
    pub why: &'a str,
}

impl WorkDeferred<'_> {
    pub fn emit(&self) {
        info!(
            field = self.field,
            model = self.model,
            class = self.class,
            why = self.why,
            "field degraded: model skipped inline, owed for backfill"
        );
        counter!(DEGRADED, "model" => self.model.to_string(), "class" => self.class.to_string()).increment(1);
    }
}

/// Every worker was busy when a field was acquired (`pipeline.when_behind = "lag"`): its raw
/// planes go to the plate at once and its analysis is owed, so the acquisition does not wait.
#[derive(Debug)]
pub struct FieldLagged<'a> {
    pub field: &'a str,
    /// Fields waiting for a worker at that moment.
    pub queued: usize,
}

impl FieldLagged<'_> {
    pub fn emit(&self) {
        info!(
            field = self.field,
            queued = self.queued,
            "field lagged: workers busy, raw planes written now, analysis owed"
        );
        counter!(LAGGED).increment(1);
    }
}

/// The required work of a field (its stages, less the models that may be skipped) ended:
/// its latency from the first frame, and whether that was already past the deadline.
#[derive(Debug)]
pub struct RequiredDone {
    pub latency: Duration,
    pub missed_deadline: bool,
}

impl RequiredDone {
    pub fn emit(&self) {
        histogram!(REQUIRED_LATENCY_SECONDS).record(self.latency.as_secs_f64());
        if self.missed_deadline {
            counter!(REQUIRED_MISSES).increment(1);
        }
    }
}

/// Every sink wrote the outputs a field was owed: the field is complete.
#[derive(Debug)]
pub struct FieldBackfilled<'a> {
    pub field: &'a str,
    pub models: &'a [String],
    /// From the field's first frame to complete.
    pub age: Duration,
    pub ok: bool,
}

impl FieldBackfilled<'_> {
    pub fn emit(&self) {
        if self.ok {
            info!(
                field = self.field,
                models = ?self.models,
                age_s = (self.age.as_secs_f64() * 10.0).round() / 10.0,
                "field backfilled"
            );
            counter!(BACKFILLED).increment(1);
        } else {
            error!(field = self.field, models = ?self.models, "backfill not written by every sink");
            counter!(BACKFILL_LOST).increment(1);
        }
    }
}

/// Owed work that cannot be done: its field's raw planes could not be read back, or the model
/// failed again. Logged with the reason; the field stays owed in the plate for the next run.
#[derive(Debug)]
pub struct BackfillFailed<'a> {
    pub field: &'a str,
    pub error: &'a (dyn std::error::Error + 'static),
}

impl BackfillFailed<'_> {
    pub fn emit(&self) {
        error!(field = self.field, error = %super::error_chain(self.error), "backfill failed; the field stays owed in the plate");
        counter!(BACKFILL_LOST).increment(1);
    }
}

/// The backlog's size and the age of its oldest field, after each change.
#[derive(Debug)]
pub struct Backlog {
    pub fields: usize,
    pub oldest: Duration,
}

impl Backlog {
    pub fn emit(&self) {
        gauge!(BACKLOG_FIELDS).set(self.fields as f64);
        gauge!(BACKLOG_AGE_SECONDS).set(self.oldest.as_secs_f64());
    }
}

/// The end of the plate: the backlog is worked off before exit.
#[derive(Debug)]
pub struct BackfillDraining {
    pub fields: usize,
}

impl BackfillDraining {
    pub fn emit(&self) {
        if self.fields > 0 {
            info!(
                fields = self.fields,
                "acquisition over: backfilling owed work before exit"
            );
        }
    }
}
