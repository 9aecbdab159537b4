//! Several daemons sharing one plate (`[cluster]`): membership through zenoh liveliness, the
//! assignment of wells to members by rendezvous hashing, and the notices that tell every member
//! which fields are done. No coordinator: every member sees the same frames and the same
//! members, so every member computes the same owner for a well.
//!
//! - **Members**: each daemon holds the liveliness token
//!   `liveomics/{instrument}/workers/{plate}/{member}` and watches the others' (a liveliness
//!   subscriber with history). A member that dies loses its token when its session does
//!   (at once on a closed connection, after zenoh's lease on a silent one).
//! - **Wells**: a well goes, when its first frame is seen, to the live member of highest
//!   rendezvous weight for (plate, well), and stays there while that member lives (a member
//!   joining mid-plate takes only wells that start after it joined). When a member leaves, its
//!   wells go to the highest-weight member among those left: the same answer everywhere.
//! - **Done**: when every sink of a member is done with a field, it publishes
//!   `liveomics/{instrument}/cluster/{plate}/done/{well}/{field}/{timepoint}`; the other members
//!   drop the frames of that field they held for a handoff.
//! - **Joining late**: each member answers `liveomics/{instrument}/cluster/{plate}/wells/{member}`
//!   with the wells it knows the owners of, so a member that starts (or restarts) mid-plate
//!   learns where the wells in progress are before it takes any.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use liveomics_adapters::model::{FieldKey, Name};
use liveomics_adapters::Invalid;
use serde::{Deserialize, Serialize};
use zenoh::{Session, Wait};

use crate::telemetry as t;

/// The `[cluster]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Share the plate with the other daemons of the same instrument and plate.
    pub enabled: bool,
    /// This daemon's name among the members (a key chunk, `^[A-Za-z0-9]+$`); empty: the host
    /// name and the process id. A member restarted under the same name takes back nothing: its
    /// wells went to the others when it left.
    pub member: String,
    /// Wait at start until this many members (this one included) are live, so that the first
    /// wells are shared among all of them.
    pub expect_members: usize,
    /// How long to wait for `expect_members` before starting with those there are.
    pub startup_wait_ms: u64,
    /// Raw frames of other members' fields held until those are done, for a handoff should
    /// their member die; past this the oldest field's frames are dropped (logged, counted).
    pub handoff_buffer_mb: u64,
    /// At the end of the plate, how long the member that writes the plate's metadata waits for
    /// the others to finish before writing the final listing.
    pub finish_wait_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            member: String::new(),
            expect_members: 1,
            startup_wait_ms: 30_000,
            handoff_buffer_mb: 2048,
            finish_wait_ms: 120_000,
        }
    }
}

impl ClusterConfig {
    /// Range checks, keyed under `cluster`.
    pub fn validate(&self) -> Vec<Invalid> {
        let mut out = Vec::new();
        if !self.member.is_empty() && Name::new(&self.member).is_err() {
            out.push(Invalid::new(
                "cluster.member",
                format!("{:?} must match ^[A-Za-z0-9]+$ (it is a key chunk)", self.member),
            ));
        }
        if self.expect_members == 0 {
            out.push(Invalid::new("cluster.expect_members", "must be >= 1"));
        }
        if self.handoff_buffer_mb == 0 {
            out.push(Invalid::new("cluster.handoff_buffer_mb", "must be >= 1"));
        }
        out
    }

    /// The member name: the configured one, or the host name (letters and digits only) and the
    /// process id.
    pub fn member_name(&self) -> String {
        if !self.member.is_empty() {
            return self.member.clone();
        }
        let host: String = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect();
        format!("{host}p{}", std::process::id())
    }
}

/// Membership changes, in the order this member saw them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Joined(String),
    Left(String),
}

/// Problems joining the cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("zenoh: {0}")]
    Zenoh(String),
}

fn zerr(e: zenoh::Error) -> ClusterError {
    ClusterError::Zenoh(e.to_string())
}

/// The rendezvous weight of `member` for a well: the owner is the live member of highest weight,
/// so a member leaving moves only its own wells, spread evenly over the others.
pub fn weight(member: &str, plate: &str, well: &str) -> u64 {
    let h = crate::field::fnv1a(format!("{member}/{plate}/{well}").into_bytes());
    // splitmix64's finaliser: FNV-1a alone leaves weights of similar names correlated.
    let mut z = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The member of highest weight for `well` among `members` (ties broken by name).
pub fn rendezvous<'a>(members: impl IntoIterator<Item = &'a String>, plate: &str, well: &str) -> Option<&'a String> {
    members.into_iter().max_by_key(|m| (weight(m, plate, well), m.as_str()))
}

#[derive(Debug, Default)]
struct View {
    live: BTreeSet<String>,
    /// Members whose source is subscribed to the plate's frames: only these are given wells, so
    /// that a member joining mid-plate is not given a well before it can receive its frames.
    ready: BTreeSet<String>,
    /// Well name → the member that owns it.
    wells: BTreeMap<String, String>,
    /// Fields done by any member (theirs from done notices), by well name: what the plate's
    /// writer lists between full listings of the store.
    done: BTreeMap<String, BTreeSet<(u32, u32)>>,
}

/// This daemon as a member of its plate's cluster: held in [`crate::resources::Resources`] for
/// the source (ownership, handoffs), the tracker (done notices), the zarr sink (who writes the
/// plate's metadata) and the follow-up sink (request ids).
pub struct Member {
    pub id: String,
    pub settings: ClusterConfig,
    instrument: String,
    plate: String,
    session: Session,
    view: Arc<Mutex<View>>,
    changes: Receiver<Change>,
    _token: zenoh::liveliness::LivelinessToken,
    ready_token: OnceLock<zenoh::liveliness::LivelinessToken>,
    _members: zenoh::pubsub::Subscriber<()>,
    _ready: zenoh::pubsub::Subscriber<()>,
    _wells: zenoh::query::Queryable<()>,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member").field("id", &self.id).finish()
    }
}

impl Member {
    /// Joins the plate's cluster: watches the members, declares this one, learns the wells in
    /// progress from the members there, and waits up to `startup_wait_ms` for `expect_members`.
    pub fn join(cfg: &ClusterConfig, session: Session, instrument: &str, plate: &str) -> Result<Self, ClusterError> {
        let id = cfg.member_name();
        let prefix = format!("liveomics/{instrument}/workers/{plate}");
        let view = Arc::new(Mutex::new(View::default()));
        let (tx, changes) = crossbeam_channel::unbounded::<Change>();
        let members = {
            let view = Arc::clone(&view);
            watch(&session, &prefix, move |id, joined| on_member(&view, id, joined))?
        };
        let ready = {
            let view = Arc::clone(&view);
            let prefix = format!("liveomics/{instrument}/cluster/{plate}/ready");
            watch(&session, &prefix, move |id, joined| on_ready(&view, &tx, id, joined))?
        };
        let token = session
            .liveliness()
            .declare_token(format!("{prefix}/{id}"))
            .wait()
            .map_err(zerr)?;
        let wells_key = format!("liveomics/{instrument}/cluster/{plate}/wells");
        let wells = {
            let view = Arc::clone(&view);
            let key = format!("{wells_key}/{id}");
            session
                .declare_queryable(key.clone())
                .callback(move |q| {
                    let owners = view.lock().unwrap_or_else(|p| p.into_inner()).wells.clone();
                    let _ = q.reply(&key, serde_json::to_vec(&owners).unwrap_or_default()).wait();
                })
                .wait()
                .map_err(zerr)?
        };
        let member = Self {
            id,
            settings: cfg.clone(),
            instrument: instrument.to_string(),
            plate: plate.to_string(),
            session,
            view,
            changes,
            _token: token,
            ready_token: OnceLock::new(),
            _members: members,
            _ready: ready,
            _wells: wells,
        };
        let started = Instant::now();
        let wait = Duration::from_millis(cfg.startup_wait_ms);
        while member.members().len() < cfg.expect_members && started.elapsed() < wait {
            std::thread::sleep(Duration::from_millis(50));
        }
        member.learn_wells();
        t::ClusterJoined {
            member: &member.id,
            members: &member.members(),
            expected: cfg.expect_members,
            waited: started.elapsed(),
        }
        .emit();
        Ok(member)
    }

    /// Asks the other members which wells they know the owners of; a well some member has seen
    /// keeps that owner.
    fn learn_wells(&self) {
        let Ok(replies) = self
            .session
            .get(self.cluster_key("wells/*"))
            .timeout(Duration::from_secs(2))
            .wait()
        else {
            return;
        };
        // Replies first, then the view: this member's own queryable answers too, and it needs
        // the view's lock to do so.
        let mut known = Vec::new();
        while let Ok(reply) = replies.recv() {
            let Ok(sample) = reply.result() else { continue };
            if let Ok(owners) = serde_json::from_slice::<BTreeMap<String, String>>(&sample.payload().to_bytes()) {
                known.extend(owners);
            }
        }
        let mut view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        for (well, owner) in known {
            if Name::new(&well).is_ok() && Name::new(&owner).is_ok() {
                view.wells.entry(well).or_insert(owner);
            }
        }
    }

    /// Declares this member ready for wells: called by the source once it is subscribed to the
    /// plate's frames and to the done notices, so that every frame of a well given to it reaches
    /// it.
    pub fn ready(&self) -> Result<(), ClusterError> {
        // Wells that started while this member was opening its sinks and loading its models went
        // to the others, which did not count it yet: it learns them again now that it receives
        // every frame, so that it does not claim one of them at its next frame.
        self.learn_wells();
        let token = self
            .session
            .liveliness()
            .declare_token(self.cluster_key(&format!("ready/{}", self.id)))
            .wait()
            .map_err(zerr)?;
        self.view
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ready
            .insert(self.id.clone());
        let _ = self.ready_token.set(token);
        Ok(())
    }

    /// The live members, this one included.
    pub fn members(&self) -> BTreeSet<String> {
        let mut live = self.view.lock().unwrap_or_else(|p| p.into_inner()).live.clone();
        live.insert(self.id.clone());
        live
    }

    /// Membership changes since the last call.
    pub fn changes(&self) -> Vec<Change> {
        self.changes.try_iter().collect()
    }

    /// The owner of `well`: the one it has, if that member is still ready; else the rendezvous
    /// choice among the ready members, which it keeps from now on.
    pub fn owner(&self, well: &str) -> String {
        let mut view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        let View { ready, wells, .. } = &mut *view;
        ready.insert(self.id.clone());
        if let Some(o) = wells.get(well).filter(|o| ready.contains(*o)) {
            return o.clone();
        }
        let o = rendezvous(ready.iter(), &self.plate, well)
            .cloned()
            .unwrap_or_else(|| self.id.clone());
        wells.insert(well.to_string(), o.clone());
        o
    }

    /// The wells `gone` owned, each given to its new owner; returns those now this member's.
    pub fn reassign(&self, gone: &str) -> Vec<String> {
        let mut view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        let View { ready, wells, .. } = &mut *view;
        ready.insert(self.id.clone());
        ready.remove(gone);
        let mut mine = Vec::new();
        for (well, owner) in wells.iter_mut().filter(|(_, o)| o.as_str() == gone) {
            if let Some(o) = rendezvous(ready.iter(), &self.plate, well) {
                owner.clone_from(o);
                if *o == self.id {
                    mine.push(well.clone());
                }
            }
        }
        mine
    }

    /// Writes the plate's own metadata: the live member of lowest name, one at a time.
    pub fn writes_plate(&self) -> bool {
        self.members().first() == Some(&self.id)
    }

    /// Waits until this is the only live member or `timeout` passes; true when alone.
    pub fn wait_alone(&self, timeout: Duration) -> bool {
        let started = Instant::now();
        loop {
            let others = self.members().len() - 1;
            if others == 0 {
                return true;
            }
            if started.elapsed() >= timeout {
                t::ClusterFinishTimedOut {
                    member: &self.id,
                    others,
                    waited: timeout,
                }
                .emit();
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Records a field as done (by this member or, from its notice, another).
    pub fn note_done(&self, well: &str, field: u32, timepoint: u32) {
        let mut view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        view.done
            .entry(well.to_string())
            .or_default()
            .insert((field, timepoint));
    }

    /// The fields done so far by any member, by well name.
    pub fn fields_done(&self) -> BTreeMap<String, BTreeSet<(u32, u32)>> {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).done.clone()
    }

    /// Tells the other members that every sink here is done with `key`.
    pub fn done(&self, key: &FieldKey) {
        self.note_done(&key.well.name(), key.field, key.timepoint);
        let k = self.done_key(&format!("{}/{}/{}", key.well.name(), key.field, key.timepoint));
        // Blocking, not dropped under load: a lost notice leaves the others holding the field's
        // frames until the buffer evicts them, and out of the plate metadata until the end.
        let put = self
            .session
            .put(&k, self.id.as_bytes().to_vec())
            .congestion_control(zenoh::qos::CongestionControl::Block);
        if let Err(e) = put.wait() {
            t::ClusterNoticeFailed {
                key: &k,
                error: &e.to_string(),
            }
            .emit();
        }
    }

    /// The key of done notices under `rest` (`*/*/*` to subscribe to all of them).
    pub fn done_key(&self, rest: &str) -> String {
        self.cluster_key(&format!("done/{rest}"))
    }

    /// `liveomics/{instrument}/cluster/{plate}/{rest}`: the keys the members speak on.
    fn cluster_key(&self, rest: &str) -> String {
        format!("liveomics/{}/cluster/{}/{rest}", self.instrument, self.plate)
    }
}

/// Watches the liveliness tokens `{prefix}/{member}` (those already there too): `on(member,
/// joined)` for each that comes or goes; keys that do not name a valid member are ignored.
fn watch(
    session: &Session,
    prefix: &str,
    on: impl Fn(&str, bool) + Send + Sync + 'static,
) -> Result<zenoh::pubsub::Subscriber<()>, ClusterError> {
    let under = format!("{prefix}/");
    session
        .liveliness()
        .declare_subscriber(format!("{prefix}/*"))
        .history(true)
        .callback(move |s| {
            if let Some(id) = s
                .key_expr()
                .as_str()
                .strip_prefix(&under)
                .filter(|id| Name::new(id).is_ok())
            {
                on(id, s.kind() == zenoh::sample::SampleKind::Put);
            }
        })
        .wait()
        .map_err(zerr)
}

/// A membership token came or went: the members that count for the startup wait, the plate
/// writer and the wait at the end.
fn on_member(view: &Mutex<View>, id: &str, joined: bool) {
    let mut v = view.lock().unwrap_or_else(|p| p.into_inner());
    let changed = if joined {
        v.live.insert(id.to_string())
    } else {
        v.live.remove(id)
    };
    let members = v.live.len();
    drop(v);
    if changed {
        t::ClusterMemberChanged {
            member: id,
            joined,
            members,
        }
        .emit();
    }
}

/// A ready token came or went: the members wells are given to. A ready member's departure
/// hands its wells to the others ([`Member::changes`]).
fn on_ready(view: &Mutex<View>, tx: &Sender<Change>, id: &str, joined: bool) {
    let mut v = view.lock().unwrap_or_else(|p| p.into_inner());
    let change = if joined {
        v.ready.insert(id.to_string()).then(|| Change::Joined(id.to_string()))
    } else {
        v.ready.remove(id).then(|| Change::Left(id.to_string()))
    };
    drop(v);
    if let Some(c) = change {
        let _ = tx.send(c);
    }
}

/// The run's cluster membership, if `[cluster]` is on: joined once by the pipeline before the
/// sinks open.
#[derive(Debug, Clone, Default)]
pub struct Cluster(Arc<OnceLock<Arc<Member>>>);

impl Cluster {
    pub fn set(&self, member: Member) -> Arc<Member> {
        let m = Arc::new(member);
        let _ = self.0.set(Arc::clone(&m));
        m
    }

    pub fn member(&self) -> Option<&Arc<Member>> {
        self.0.get()
    }
}

/// A field as the cluster names it: well, field, timepoint.
pub type FieldId = (String, u32, u32);

/// Frames of other members' fields, held as they came (undecoded) until their member says the
/// field is done, so that if that member dies its new owner redoes the field from them. Bounded:
/// past `limit` bytes the oldest field goes.
#[derive(Debug)]
pub struct Held<T> {
    limit: usize,
    bytes: usize,
    fields: BTreeMap<FieldId, (usize, Vec<T>)>,
    order: std::collections::VecDeque<FieldId>,
    /// Per well, the member its frames were held for.
    owners: BTreeMap<String, String>,
}

impl<T> Held<T> {
    pub fn new(limit_bytes: usize) -> Self {
        Self {
            limit: limit_bytes,
            bytes: 0,
            fields: BTreeMap::new(),
            order: Default::default(),
            owners: BTreeMap::new(),
        }
    }

    /// Holds a frame of `field` for its owner; returns the fields dropped to stay under the
    /// limit, with their frame counts.
    pub fn hold(&mut self, field: FieldId, owner: &str, frame: T, bytes: usize) -> Vec<(FieldId, usize)> {
        self.owners.insert(field.0.clone(), owner.to_string());
        let entry = self.fields.entry(field.clone()).or_insert_with(|| {
            self.order.push_back(field.clone());
            (0, Vec::new())
        });
        entry.0 += bytes;
        entry.1.push(frame);
        self.bytes += bytes;
        let mut evicted = Vec::new();
        while self.bytes > self.limit {
            let Some(oldest) = self.order.pop_front() else { break };
            if let Some((b, frames)) = self.fields.remove(&oldest) {
                self.bytes -= b;
                evicted.push((oldest, frames.len()));
            }
        }
        evicted
    }

    /// The field's member finished it: its frames are not needed.
    pub fn done(&mut self, field: &FieldId) {
        if let Some((b, _)) = self.fields.remove(field) {
            self.bytes -= b;
            self.order.retain(|f| f != field);
        }
    }

    /// Takes the held fields of `well`, in the order they were first seen.
    pub fn take_well(&mut self, well: &str) -> Vec<(FieldId, Vec<T>)> {
        let ids: Vec<FieldId> = self.order.iter().filter(|f| f.0 == well).cloned().collect();
        self.order.retain(|f| f.0 != well);
        self.owners.remove(well);
        ids.into_iter()
            .filter_map(|id| {
                let (b, frames) = self.fields.remove(&id)?;
                self.bytes -= b;
                Some((id, frames))
            })
            .collect()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The member `well`'s frames were last held for.
    pub fn held_for(&self, well: &str) -> Option<&str> {
        self.owners.get(well).map(String::as_str)
    }

    /// Whether any field of `well` is held.
    pub fn has_well(&self, well: &str) -> bool {
        self.fields
            .range((well.to_string(), 0, 0)..)
            .next()
            .is_some_and(|((w, _, _), _)| w == well)
    }

    /// The wells with held fields.
    pub fn wells(&self) -> BTreeSet<String> {
        self.fields.keys().map(|(w, _, _)| w.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("m{i}")).collect()
    }

    #[test]
    fn wells_spread_evenly_and_a_leaving_member_moves_only_its_own() {
        let wells: Vec<String> = (0..384)
            .map(|i| format!("{}{}", (b'A' + (i / 24) as u8) as char, i % 24 + 1))
            .collect();
        let three = names(3);
        let owner = |ms: &[String], w: &str| rendezvous(ms.iter(), "P1", w).cloned().unwrap_or_default();
        let mut counts = BTreeMap::new();
        for w in &wells {
            *counts.entry(owner(&three, w)).or_insert(0) += 1;
        }
        for (m, c) in &counts {
            assert!((96..=160).contains(c), "{m} owns {c} of 384 wells");
        }
        let two: Vec<String> = three.iter().filter(|m| *m != "m1").cloned().collect();
        for w in &wells {
            let before = owner(&three, w);
            let after = owner(&two, w);
            if before != "m1" {
                assert_eq!(before, after, "{w} moved although its owner stayed");
            } else {
                assert_ne!(after, "m1");
            }
        }
    }

    #[test]
    fn the_same_members_give_the_same_owner_in_any_order() {
        let a = names(4);
        let mut b = a.clone();
        b.reverse();
        for w in ["A1", "B7", "H12", "P24"] {
            assert_eq!(rendezvous(a.iter(), "P", w), rendezvous(b.iter(), "P", w));
        }
    }

    #[test]
    fn held_frames_are_bounded_released_when_done_and_taken_by_well() {
        let id = |w: &str, f: u32| (w.to_string(), f, 0);
        let mut h = Held::new(10);
        assert!(h.hold(id("A1", 0), "m", 1, 4).is_empty());
        assert!(h.hold(id("A1", 0), "m", 2, 4).is_empty());
        assert!(h.hold(id("B2", 0), "m", 3, 2).is_empty());
        // Over the limit: the oldest field goes whole.
        assert_eq!(h.hold(id("B2", 1), "m", 4, 3), vec![(id("A1", 0), 2)]);
        assert_eq!(h.bytes(), 5);
        h.done(&id("B2", 0));
        assert_eq!(h.bytes(), 3);
        assert!(h.hold(id("A1", 1), "m2", 5, 1).is_empty());
        assert_eq!(h.wells(), BTreeSet::from(["A1".to_string(), "B2".to_string()]));
        assert!(h.has_well("A1") && !h.has_well("A") && !h.has_well("A10"));
        assert_eq!(h.held_for("A1"), Some("m2"));
        assert_eq!(h.take_well("B2"), vec![(id("B2", 1), vec![4])]);
        assert_eq!(h.take_well("A1"), vec![(id("A1", 1), vec![5])]);
        assert_eq!(h.bytes(), 0);
        assert!(h.wells().is_empty() && !h.has_well("A1") && h.held_for("A1").is_none());
    }

    #[test]
    fn bad_settings_are_reported_with_their_keys() {
        let c = ClusterConfig {
            member: "a/b".into(),
            expect_members: 0,
            handoff_buffer_mb: 0,
            ..Default::default()
        };
        let keys: Vec<String> = c.validate().iter().map(|i| i.key.clone()).collect();
        assert_eq!(
            keys,
            ["cluster.member", "cluster.expect_members", "cluster.handoff_buffer_mb"]
        );
    }
}
