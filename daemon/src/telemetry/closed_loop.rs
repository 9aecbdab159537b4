//! Events of the closed loop: follow-up requests, their acks and their states.

use super::*;

/// What became of a closed-loop follow-up request: the `state` label of
/// `liveomics_followups_total`. A closed set, so that acks from the network cannot mint labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FollowupState {
    Requested,
    Scheduled,
    Started,
    Done,
    /// The bridge refused to execute it (wrong plate, outside the stage limits, over its caps).
    Rejected,
    Timeout,
    Suppressed,
    OverBudget,
}

impl FollowupState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Scheduled => "scheduled",
            Self::Started => "started",
            Self::Done => "done",
            Self::Rejected => "rejected",
            Self::Timeout => "timeout",
            Self::Suppressed => "suppressed",
            Self::OverBudget => "over_budget",
        }
    }

    /// The states a bridge may acknowledge; anything else in an ack is rejected. They only move
    /// forward (`Ord`): a `scheduled` that arrives after `done` changes nothing.
    pub fn from_ack(s: &str) -> Option<Self> {
        match s {
            "scheduled" => Some(Self::Scheduled),
            "started" => Some(Self::Started),
            "done" => Some(Self::Done),
            "rejected" => Some(Self::Rejected),
            _ => None,
        }
    }

    /// Whether nothing more will happen to the request (no timeout is owed).
    pub fn is_final(self) -> bool {
        matches!(self, Self::Done | Self::Rejected)
    }
}

/// A follow-up request changed state (sent, acknowledged, timed out, held back by cooldown or
/// budget); logged with its id, counted by rule and state.
#[derive(Debug)]
pub struct FollowupChanged<'a> {
    pub rule: &'a str,
    pub state: FollowupState,
    pub id: Option<&'a str>,
    pub field: Option<&'a str>,
    /// Since the request was sent.
    pub after_ms: Option<u64>,
    /// The rule's metric value that fired it, and over how many cells.
    pub value: Option<f64>,
    pub cells: Option<u64>,
    /// For a timeout: the last state acknowledged, and the configured limit.
    pub last_state: Option<FollowupState>,
    pub timeout_ms: Option<u64>,
    /// For a rejection: the bridge's reason, as it sent it (logged cut to 64 characters, never a
    /// metric label).
    pub reason: Option<&'a str>,
}

impl<'a> FollowupChanged<'a> {
    /// The event with only its rule and state; the caller fills in what it knows.
    pub fn new(rule: &'a str, state: FollowupState) -> Self {
        Self {
            rule,
            state,
            id: None,
            field: None,
            after_ms: None,
            value: None,
            cells: None,
            last_state: None,
            timeout_ms: None,
            reason: None,
        }
    }

    pub fn emit(&self) {
        let (rule, state, id, field) = (self.rule, self.state.as_str(), self.id, self.field);
        match self.state {
            FollowupState::Requested => info!(
                rule,
                id,
                field,
                value = self.value,
                cells = self.cells,
                "follow-up requested"
            ),
            FollowupState::Scheduled | FollowupState::Started | FollowupState::Done => {
                info!(rule, state, id, after_ms = self.after_ms, "follow-up acknowledged")
            }
            FollowupState::Rejected => warn!(
                rule,
                id,
                reason = self.reason.map(|r| r.chars().take(64).collect::<String>()),
                after_ms = self.after_ms,
                "follow-up rejected by the bridge"
            ),
            FollowupState::Timeout => warn!(
                rule,
                id,
                last_state = self.last_state.map(FollowupState::as_str),
                after_ms = self.after_ms,
                timeout_ms = self.timeout_ms,
                "follow-up request not done within its timeout"
            ),
            FollowupState::Suppressed => debug!(rule, field, "follow-up held back by the rule's cooldown"),
            FollowupState::OverBudget => warn!(rule, field, "follow-up budget of the plate used up"),
        }
        counter!(FOLLOWUPS, "rule" => self.rule.to_string(), "state" => state).increment(1);
    }
}

/// A follow-up ack from the network was not understood; logged, counted by reason, ignored.
#[derive(Debug)]
pub struct FollowupAckRejected<'a> {
    pub reason: &'static str,
    pub detail: &'a str,
    /// What the ack said, cut to 64 characters (it comes from the network).
    pub id: Option<&'a str>,
    pub state: Option<&'a str>,
}

impl FollowupAckRejected<'_> {
    pub fn emit(&self) {
        let cut = |s: Option<&str>| s.map(|s| s.chars().take(64).collect::<String>());
        warn!(
            reason = self.reason,
            id = cut(self.id),
            state = cut(self.state),
            "follow-up ack ignored: {}",
            self.detail
        );
        counter!(FOLLOWUP_ACKS_REJECTED, "reason" => self.reason).increment(1);
    }
}

/// The closed loop is on: where its requests go.
#[derive(Debug)]
pub struct ClosedLoopOn<'a> {
    pub rules: usize,
    pub key: &'a str,
}

impl ClosedLoopOn<'_> {
    pub fn emit(&self) {
        info!(rules = self.rules, key = self.key, "closed loop on");
    }
}

/// A field the microscope took because of a follow-up request arrived.
#[derive(Debug)]
pub struct FollowupFieldReceived<'a> {
    pub id: &'a str,
    pub field: &'a str,
}

impl FollowupFieldReceived<'_> {
    pub fn emit(&self) {
        info!(followup_id = self.id, field = self.field, "follow-up field received");
    }
}

/// A rule asking for more fields fired but they cannot be placed (no stage position, or no
/// field numbers left in the well).
#[derive(Debug)]
pub struct FollowupUnplaceable<'a> {
    pub rule: &'a str,
    pub field: &'a str,
    pub why: &'a str,
}

impl FollowupUnplaceable<'_> {
    pub fn emit(&self) {
        warn!(
            rule = self.rule,
            field = self.field,
            "{}: cannot place more fields",
            self.why
        );
    }
}

/// The run ended with follow-up requests the microscope never reported done.
#[derive(Debug)]
pub struct FollowupsOpenAtEnd<'a> {
    pub ids: &'a [&'a String],
}

impl FollowupsOpenAtEnd<'_> {
    pub fn emit(&self) {
        warn!(requests = ?self.ids, "follow-up requests not done when the run ended");
    }
}
