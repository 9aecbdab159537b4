//! Events of the cluster mode: members coming and going, wells handed off, frames held for a
//! handoff and the plate writer's wait at the end.

use super::*;

/// This daemon joined its plate's cluster.
#[derive(Debug)]
pub struct ClusterJoined<'a> {
    pub member: &'a str,
    pub members: &'a std::collections::BTreeSet<String>,
    pub expected: usize,
    pub waited: Duration,
}

impl ClusterJoined<'_> {
    pub fn emit(&self) {
        let members: Vec<&str> = self.members.iter().map(String::as_str).collect();
        if self.members.len() < self.expected {
            warn!(
                member = self.member,
                members = ?members,
                expected = self.expected,
                waited_ms = self.waited.as_millis() as u64,
                "joined the cluster with fewer members than expected"
            );
        } else {
            info!(member = self.member, members = ?members, "joined the cluster");
        }
        gauge!(CLUSTER_MEMBERS).set(self.members.len() as f64);
    }
}

/// Another member's liveliness token appeared or went away.
#[derive(Debug)]
pub struct ClusterMemberChanged<'a> {
    pub member: &'a str,
    pub joined: bool,
    /// Live members after the change.
    pub members: usize,
}

impl ClusterMemberChanged<'_> {
    pub fn emit(&self) {
        if self.joined {
            info!(member = self.member, members = self.members, "cluster member joined");
        } else {
            warn!(
                member = self.member,
                members = self.members,
                "cluster member left: its wells go to the others"
            );
        }
        gauge!(CLUSTER_MEMBERS).set(self.members as f64);
    }
}

/// Fields of a member that left, which this one now does from the frames it held.
#[derive(Debug)]
pub struct ClusterHandoff<'a> {
    pub from: &'a str,
    pub wells: &'a [String],
    pub fields: usize,
}

impl ClusterHandoff<'_> {
    pub fn emit(&self) {
        info!(
            from = self.from,
            wells = ?self.wells,
            fields = self.fields,
            "took over wells of a member that left; redoing its unfinished fields"
        );
        counter!(CLUSTER_HANDOFF_FIELDS).increment(self.fields as u64);
    }
}

/// Frames of other members' fields dropped from the handoff buffer over `handoff_buffer_mb`:
/// should their member die before finishing them, they are lost.
#[derive(Debug)]
pub struct ClusterBufferEvicted<'a> {
    pub field: &'a str,
    pub frames: usize,
}

impl ClusterBufferEvicted<'_> {
    pub fn emit(&self) {
        warn!(
            field = self.field,
            frames = self.frames,
            "handoff buffer full (cluster.handoff_buffer_mb): dropped the oldest held field; it cannot be redone here if its member dies"
        );
        counter!(CLUSTER_BUFFER_EVICTED).increment(1);
    }
}

/// A frame of a well another member owns, held (undecoded) for a handoff.
#[derive(Debug)]
pub struct ClusterFramePassed;

impl ClusterFramePassed {
    pub fn emit(&self) {
        counter!(CLUSTER_FRAMES_PASSED).increment(1);
    }
}

/// The plate writer stopped waiting for the other members at the end of the plate.
#[derive(Debug)]
pub struct ClusterFinishTimedOut<'a> {
    pub member: &'a str,
    pub others: usize,
    pub waited: Duration,
}

impl ClusterFinishTimedOut<'_> {
    pub fn emit(&self) {
        warn!(
            member = self.member,
            others = self.others,
            waited_ms = self.waited.as_millis() as u64,
            "other members still running at the end (cluster.finish_wait_ms): the plate metadata written now may miss their last wells; the last member to finish writes it again"
        );
    }
}

/// A done notice could not be published.
#[derive(Debug)]
pub struct ClusterNoticeFailed<'a> {
    pub key: &'a str,
    pub error: &'a str,
}

impl ClusterNoticeFailed<'_> {
    pub fn emit(&self) {
        warn!(key = self.key, error = self.error, "cannot publish a done notice");
        counter!(ERRORS, "kind" => "cluster_notice").increment(1);
    }
}
