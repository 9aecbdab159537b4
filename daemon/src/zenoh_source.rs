//! The `zenoh` source: frames published by the microscope's control software (or anything else)
//! on `liveomics/{instrument}/frames/{plate}/{well}/{field}/{channel}`; the payload is the raw
//! pixels (row-major, little-endian), the attachment a JSON header (docs/PROTOCOL.md).
//!
//! Everything from the network is untrusted: every key chunk is validated before it becomes an id,
//! the byte count must match the declared shape and dtype, and a bad frame is reported (logged with
//! its key, counted) and dropped while the rest go on. The subscriber's queue is a FIFO that blocks
//! zenoh's receive path when full, so a slow pipeline pushes back on the publisher instead of
//! losing frames.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Sender;
use liveomics_adapters::model::{AcquisitionPlan, FieldKey, Frame, Name, Origin, Pixels, WellId};
use liveomics_adapters::source::{Problems, Source, SourceError, SourceProblem, SourceReport, StopToken};
use liveomics_adapters::Invalid;
use serde::{Deserialize, Serialize};
use zenoh::Wait;

use crate::cluster::{Change, Cluster, FieldId, Held};
use crate::component::{Context, SourceConfig};
use crate::zenoh_session::{SharedSession, ZenohConfig};

liveomics_adapters::source_section! {
/// `[source.zenoh]`. Its plate is the only one accepted, and its channels are named as they
/// appear in the key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ZenohSourceConfig {
    /// End after this long without a frame (0: run until stopped).
    pub idle_exit_ms: u64,
    /// Subscriber queue, in frames; when full, zenoh's receive path waits (backpressure).
    pub queue_frames: usize,
}
}

impl Default for ZenohSourceConfig {
    fn default() -> Self {
        Self {
            plate: "plate".into(),
            plate_format: 96,
            channels: vec!["DAPI".into(), "Microtubules".into(), "ER".into()],
            width_px: 2048,
            height_px: 2048,
            pixel_size_um: 0.65,
            timepoints: 1,
            idle_exit_ms: 0,
            queue_frames: 64,
        }
    }
}

impl SourceConfig for ZenohSourceConfig {
    fn validate(&self, ctx: &Context, problems: &mut Vec<Invalid>) {
        problems.extend(self.validate().into_iter().map(|e| e.under(ctx.section)));
    }

    fn build(&self, ctx: &Context) -> Result<Box<dyn Source>, SourceError> {
        let mut source = ZenohSource::new(self, ctx.instrument, ctx.resources.zenoh.clone(), ctx.zenoh.clone())?;
        source.cluster = ctx.resources.cluster.clone();
        Ok(Box::new(source))
    }
}

impl ZenohSourceConfig {
    /// Range checks, keyed under the section.
    pub fn validate(&self) -> Vec<Invalid> {
        let mut out = Vec::new();
        self.plate_spec().validate(&mut out);
        for (i, c) in self.channels.iter().enumerate() {
            if Name::new(c).is_err() {
                out.push(Invalid::new(
                    &format!("channels[{i}]"),
                    format!("{c:?} must match ^[A-Za-z0-9]+$ (it is a key chunk)"),
                ));
            }
        }
        for (k, v) in [("width_px", self.width_px), ("height_px", self.height_px)] {
            if !(1..=16384).contains(&v) {
                out.push(Invalid::new(k, format!("must be 1..=16384, got {v}")));
            }
        }
        if !(self.pixel_size_um > 0.0 && self.pixel_size_um.is_finite()) {
            out.push(Invalid::new("pixel_size_um", "must be > 0"));
        }
        if self.queue_frames == 0 {
            out.push(Invalid::new("queue_frames", "must be >= 1"));
        }
        out
    }
}

/// The publisher's numbering of its frames (`stream`, `seq` in the header), read apart from the
/// rest so that a frame rejected for another reason still counts as arrived.
#[derive(Debug, Deserialize)]
struct Numbered {
    stream: String,
    seq: u64,
}

/// Gaps in each publisher's frame numbers: frames a publisher sent that never arrived (its zenoh
/// session closed on a long block, a link dropped them). A stream is one publisher's run (the
/// bridge draws a new id when it starts), numbered from 0 without gaps.
#[derive(Debug, Default)]
pub struct Gaps {
    next: std::collections::HashMap<String, u64>,
    /// Numbers found missing and not come since, to tell a resend from a duplicate.
    missing: std::collections::BTreeSet<(String, u64)>,
}

/// What one arrival says about its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The next number, or a duplicate of one seen.
    InOrder,
    /// Numbers `[from, to)` were skipped: lost, unless they come again.
    Gap { from: u64, to: u64 },
    /// A number found missing earlier: the publisher sent it again.
    Filled,
}

impl Gaps {
    /// Streams remembered at once: publishers of one plate are few; a flood of made-up ids must
    /// not grow the map.
    const STREAMS: usize = 64;
    /// Missing numbers remembered at once, for the same reason.
    const MISSING: usize = 100_000;

    pub fn see(&mut self, stream: &str, seq: u64) -> Seen {
        if !self.next.contains_key(stream) && self.next.len() >= Self::STREAMS {
            return Seen::InOrder;
        }
        let next = self.next.entry(stream.to_string()).or_insert(0);
        if seq < *next {
            return if self.missing.remove(&(stream.to_string(), seq)) {
                Seen::Filled
            } else {
                Seen::InOrder
            };
        }
        let from = *next;
        *next = seq + 1;
        if seq == from {
            return Seen::InOrder;
        }
        for s in from..seq {
            if self.missing.len() >= Self::MISSING {
                break;
            }
            self.missing.insert((stream.to_string(), s));
        }
        Seen::Gap { from, to: seq }
    }
}

/// The JSON header carried as the zenoh attachment of each frame.
#[derive(Debug, Clone, Deserialize)]
struct Header {
    /// `[height, width]`.
    shape: [usize; 2],
    dtype: String,
    #[serde(default)]
    timepoint: u32,
    #[serde(default)]
    acquired_unix_ns: Option<u64>,
    /// Stage position `[x, y, z]` in µm.
    #[serde(default)]
    stage_um: Option<[f64; 3]>,
    /// The acquisition event's index (useq-schema `MDAEvent.index`), kept as given.
    #[serde(default)]
    event_index: Option<serde_json::Value>,
    /// The follow-up request this frame answers.
    #[serde(default)]
    followup_id: Option<String>,
    /// Pixel size the camera reports; must agree with the configured one (within 1 %), since
    /// the plate's physical scale is written from the configuration.
    #[serde(default)]
    pixel_size_um: Option<f64>,
}

/// The zenoh source.
#[derive(Debug)]
pub struct ZenohSource {
    cfg: ZenohSourceConfig,
    instrument: String,
    plan: AcquisitionPlan,
    problems: Problems,
    skip: std::collections::HashSet<FieldKey>,
    session: SharedSession,
    zenoh: ZenohConfig,
    /// Membership of the plate's cluster, when `[cluster]` is on: frames of wells another member
    /// owns are held, not decoded, until that member finishes their field.
    cluster: Cluster,
}

/// A frame as it came off the network, held for a handoff.
type RawFrame = (String, zenoh::bytes::ZBytes, Option<zenoh::bytes::ZBytes>);

/// The well, field and timepoint of a frame from its key and header, without decoding it; `None`
/// for a malformed one, which the decoding path then reports.
fn field_id(key: &str, attachment: Option<&[u8]>) -> Option<FieldId> {
    let parts: Vec<&str> = key.split('/').collect();
    let [_, _, _, _, well, field, _] = parts.as_slice() else {
        return None;
    };
    let field = field.parse().ok()?;
    #[derive(Deserialize)]
    struct Timepoint {
        #[serde(default)]
        timepoint: u32,
    }
    let t = serde_json::from_slice::<Timepoint>(attachment?).ok()?.timepoint;
    Some((well.to_string(), field, t))
}

impl ZenohSource {
    /// `session` is the daemon's shared session, opened from `zenoh` when the source starts
    /// running (if no sink opened it first).
    pub fn new(
        cfg: &ZenohSourceConfig,
        instrument: &str,
        session: SharedSession,
        zenoh: ZenohConfig,
    ) -> Result<Self, SourceError> {
        let issues = cfg.validate();
        if !issues.is_empty() {
            let msg: Vec<String> = issues.iter().map(|i| i.to_string()).collect();
            return Err(SourceError::Config(msg.join("; ")));
        }
        let plan = AcquisitionPlan::open_ended(
            &cfg.plate,
            cfg.plate_format,
            &cfg.channels,
            (cfg.width_px as usize, cfg.height_px as usize),
            cfg.pixel_size_um,
            cfg.timepoints,
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            instrument: Name::new(instrument)?.to_string(),
            plan,
            problems: Problems::default(),
            skip: Default::default(),
            session,
            zenoh,
            cluster: Cluster::default(),
        })
    }

    /// The key expression this source subscribes to.
    pub fn key_expr(&self) -> String {
        format!("liveomics/{}/frames/{}/*/*/*", self.instrument, self.plan.plate)
    }

    /// Turns one sample into a frame, or says why not.
    fn frame(&self, key: &str, payload: &[u8], attachment: Option<&[u8]>) -> Result<Frame, (&'static str, String)> {
        let parts: Vec<&str> = key.split('/').collect();
        let [_, _, _, plate, well, field, channel] = parts.as_slice() else {
            return Err((
                "key",
                format!("{key}: expected liveomics/{{instrument}}/frames/{{plate}}/{{well}}/{{field}}/{{channel}}"),
            ));
        };
        for chunk in [plate, well, field, channel] {
            if Name::new(chunk).is_err() {
                return Err(("key", format!("{key}: {chunk:?} is not a name (^[A-Za-z0-9]+$)")));
            }
        }
        let well = WellId::parse(well, self.plan.format).map_err(|e| ("key", format!("{key}: {e}")))?;
        let field: u32 = field
            .parse()
            .map_err(|_| ("key", format!("{key}: field {field:?} is not a number")))?;
        let channel = self
            .plan
            .channels
            .iter()
            .position(|c| c.name.eq_ignore_ascii_case(channel))
            .ok_or_else(|| ("channel", format!("{key}: channel {channel:?} is not configured")))?;
        let header: Header = attachment
            .ok_or_else(|| ("header", format!("{key}: no attachment with the frame header")))
            .and_then(|a| serde_json::from_slice(a).map_err(|e| ("header", format!("{key}: bad header: {e}"))))?;
        if let Some(px) = header.pixel_size_um {
            let want = self.plan.pixel_size_um;
            if !(px.is_finite() && (px - want).abs() <= 0.01 * want) {
                return Err((
                    "pixel_size",
                    format!(
                        "{key}: pixel size {px} µm in the header, {want} µm configured (source.zenoh.pixel_size_um)"
                    ),
                ));
            }
        }
        let [h, w] = header.shape;
        // Before a byte is decoded: a frame of another shape could not join a field anyway.
        if (h, w) != (self.plan.height, self.plan.width) {
            return Err((
                "shape",
                format!(
                    "{key}: a {h}x{w} frame, the plate's fields are {}x{}",
                    self.plan.height, self.plan.width
                ),
            ));
        }
        let n = h
            .checked_mul(w)
            .ok_or_else(|| ("shape", format!("{key}: shape overflows")))?;
        let bytes16 = n.saturating_mul(2);
        let pixels = match header.dtype.as_str() {
            "uint16" | "<u2" if payload.len() == bytes16 => Pixels::U16(pixels_from_le_bytes(payload)),
            "uint8" | "|u1" if payload.len() == n => {
                Pixels::U16(payload.iter().map(|&b| u16::from(b)).collect::<Vec<_>>().into())
            }
            "uint16" | "<u2" | "uint8" | "|u1" => {
                return Err((
                    "bytes",
                    format!("{key}: {} bytes for a {h}x{w} {} frame", payload.len(), header.dtype),
                ))
            }
            other => return Err(("dtype", format!("{key}: dtype {other:?}; uint16 or uint8 expected"))),
        };
        let acquired_at = header
            .acquired_unix_ns
            .map(|ns| UNIX_EPOCH + Duration::from_nanos(ns))
            .unwrap_or_else(SystemTime::now);
        Ok(Frame {
            key: FieldKey {
                plate: self.plan.plate.clone(),
                well,
                field,
                timepoint: header.timepoint,
            },
            channel,
            width: w,
            height: h,
            pixels,
            acquired_at,
            received_at: Instant::now(),
            origin: Origin {
                stage_um: header.stage_um.filter(|p| p.iter().all(|v| v.is_finite())),
                event_index: header.event_index.map(|v| v.to_string()),
                followup_id: header.followup_id.filter(|id| id.len() <= 128),
            },
        })
    }
}

impl Source for ZenohSource {
    fn plan(&self) -> &AcquisitionPlan {
        &self.plan
    }

    fn observe(&mut self, problems: Sender<SourceProblem>) {
        self.problems = Problems::new(problems);
    }

    fn skip(&mut self, done: &[FieldKey]) {
        self.skip.extend(done.iter().cloned());
    }

    fn run(&mut self, out: &Sender<Frame>, stop: &StopToken) -> Result<SourceReport, SourceError> {
        let mut report = SourceReport::default();
        let c = &self.cfg;
        let zerr = |e: zenoh::Error| SourceError::Io {
            context: "zenoh".into(),
            source: std::io::Error::other(e.to_string()),
        };
        let session = self.session.get(&self.zenoh).map_err(|e| SourceError::Io {
            context: "zenoh".into(),
            source: std::io::Error::other(crate::telemetry::error_chain(&e)),
        })?;
        // A frame's size is checked as it arrives, on zenoh's receive path, before it is
        // queued: one larger than a plane of the plan is dropped there and reported here, so
        // the queue holds at most `queue_frames` planes whatever the network sends. A full
        // queue blocks the receive path (backpressure), as zenoh's own FIFO would.
        let max_bytes = self.plan.width * self.plan.height * 2;
        let (sample_tx, samples) = crossbeam_channel::bounded::<Arrival>(c.queue_frames);
        let subscriber = session
            .declare_subscriber(self.key_expr())
            .callback(move |sample: zenoh::sample::Sample| {
                let len = sample.payload().len();
                let arrival = if len > max_bytes {
                    Arrival::TooLarge(sample.key_expr().as_str().to_string(), len)
                } else {
                    Arrival::Frame(sample)
                };
                let _ = sample_tx.send(arrival);
            })
            .wait()
            .map_err(zerr)?;
        let bridge_key = format!("liveomics/{}/bridge/{}", self.instrument, self.plan.plate);
        let liveliness = session
            .liveliness()
            .declare_subscriber(&bridge_key)
            .history(true)
            .with(zenoh::handlers::FifoChannel::new(16))
            .wait()
            .map_err(zerr)?;
        let mut bridge_alive: Option<bool> = None;
        // Publisher's acquisition time to arrival here, for frames whose header carries it
        // (same host or synchronised clocks): the transport's share of the latency budget.
        let mut transit_us = hdrhistogram::Histogram::<u64>::new(3).ok();
        let mut span: Option<(Instant, Instant, u64)> = None;
        let idle = Duration::from_millis(c.idle_exit_ms);
        let mut last = Instant::now();
        let mut fields = std::collections::HashSet::new();
        let mut gaps = Gaps::default();
        let resend_key = format!("liveomics/{}/bridge/{}/resend", self.instrument, self.plan.plate);
        let member = self.cluster.member().cloned();
        let done_notices = match &member {
            Some(m) => Some(
                session
                    .declare_subscriber(m.done_key("*/*/*"))
                    .with(zenoh::handlers::FifoChannel::new(4096))
                    .wait()
                    .map_err(zerr)?,
            ),
            None => None,
        };
        if let Some(m) = &member {
            m.ready().map_err(|e| SourceError::Io {
                context: "cluster: cannot declare this member ready".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
        }
        // In a cluster, listening means ready: a member's wells may come with the next frame.
        crate::telemetry::SourceListening { key: &self.key_expr() }.emit();
        let mut held: Held<RawFrame> = Held::new(
            member
                .as_ref()
                .map_or(0, |m| m.settings.handoff_buffer_mb as usize * 1024 * 1024),
        );
        // Frames taken over from a member that left, decoded before the next network sample.
        let mut taken: std::collections::VecDeque<RawFrame> = Default::default();
        while !stop.is_stopped() {
            if let (Some(m), Some(notices)) = (&member, &done_notices) {
                while let Ok(Some(s)) = notices.try_recv() {
                    let key = s.key_expr().as_str();
                    if let Some(id) = key.strip_prefix(&m.done_key("")).and_then(|rest| {
                        let mut p = rest.split('/');
                        Some((p.next()?.to_string(), p.next()?.parse().ok()?, p.next()?.parse().ok()?))
                    }) {
                        m.note_done(&id.0, id.1, id.2);
                        held.done(&id);
                    }
                }
                for change in m.changes() {
                    let Change::Left(gone) = change else { continue };
                    let mut wells: std::collections::BTreeSet<String> = m.reassign(&gone).into_iter().collect();
                    // Also wells that `owner` already gave this member when a frame came between
                    // the departure and now: the frames held for the dead member before it are
                    // redone too.
                    wells.extend(held.wells().into_iter().filter(|w| m.owner(w) == m.id));
                    let mut n = 0;
                    for w in &wells {
                        for (_, frames) in held.take_well(w) {
                            n += 1;
                            taken.extend(frames);
                        }
                    }
                    let wells: Vec<String> = wells.into_iter().collect();
                    if !wells.is_empty() {
                        crate::telemetry::ClusterHandoff {
                            from: &gone,
                            wells: &wells,
                            fields: n,
                        }
                        .emit();
                    }
                }
            }
            while let Ok(Some(s)) = liveliness.try_recv() {
                let alive = s.kind() == zenoh::sample::SampleKind::Put;
                if bridge_alive != Some(alive) {
                    bridge_alive = Some(alive);
                    crate::telemetry::BridgeLiveliness {
                        key: &bridge_key,
                        alive,
                    }
                    .emit();
                }
            }
            let (key, payload, attachment) = if let Some(raw) = taken.pop_front() {
                raw
            } else {
                let sample = match samples.recv_timeout(Duration::from_millis(100)) {
                    Ok(Arrival::Frame(s)) => s,
                    Ok(Arrival::TooLarge(key, len)) => {
                        last = Instant::now();
                        let detail = format!(
                            "{key}: {len} bytes, more than a {}x{} uint16 plane ({max_bytes}); dropped before it was queued",
                            self.plan.height, self.plan.width
                        );
                        self.problems.report(&mut report, key, "bytes", detail);
                        continue;
                    }
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                        if !idle.is_zero() && last.elapsed() > idle {
                            break;
                        }
                        continue;
                    }
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                };
                last = Instant::now();
                let raw: RawFrame = (
                    sample.key_expr().as_str().to_string(),
                    sample.payload().clone(),
                    sample.attachment().cloned(),
                );
                // Numbered as it arrives, before a cluster member holds it for another: a frame
                // held is not lost.
                if let Some(n) = raw
                    .2
                    .as_ref()
                    .and_then(|a| serde_json::from_slice::<Numbered>(&a.to_bytes()).ok())
                    .filter(|n| n.stream.len() <= 64)
                {
                    match gaps.see(&n.stream, n.seq) {
                        Seen::InOrder => {}
                        Seen::Gap { from, to } => {
                            report.lost += to - from;
                            crate::telemetry::FramesLost {
                                stream: &n.stream,
                                from,
                                to,
                                before: &raw.0,
                            }
                            .emit();
                            // The publisher may still hold them (the bridge keeps its last
                            // frames): ask, while their fields are still being assembled.
                            let ask = serde_json::json!({"stream": n.stream, "from": from, "to": to});
                            let _ = session.put(&resend_key, ask.to_string()).wait();
                        }
                        Seen::Filled => {
                            report.resent += 1;
                            crate::telemetry::FrameResent.emit();
                        }
                    }
                }

                if let Some(m) = &member {
                    let attachment = raw.2.as_ref().map(|a| a.to_bytes());
                    if let Some(id) = field_id(&raw.0, attachment.as_deref()) {
                        let owner = m.owner(&id.0);
                        if owner == m.id && held.has_well(&id.0) {
                            // The well's owner left and this frame came before its departure was
                            // handled above: the frames held for it go first.
                            let from = held.held_for(&id.0).unwrap_or_default().to_string();
                            let fields = held.take_well(&id.0);
                            crate::telemetry::ClusterHandoff {
                                from: &from,
                                wells: std::slice::from_ref(&id.0),
                                fields: fields.len(),
                            }
                            .emit();
                            for (_, frames) in fields {
                                taken.extend(frames);
                            }
                            taken.push_back(raw);
                            continue;
                        }
                        if owner != m.id {
                            let bytes = raw.1.len();
                            for ((w, f, t), frames) in held.hold(id, &owner, raw, bytes) {
                                crate::telemetry::ClusterBufferEvicted {
                                    field: &format!("{w}/{f}/t{t}"),
                                    frames,
                                }
                                .emit();
                            }
                            crate::telemetry::ClusterFramePassed.emit();
                            continue;
                        }
                    }
                }
                raw
            };
            let payload = payload.to_bytes();
            let attachment = attachment.map(|a| a.to_bytes().into_owned());
            let r0 = Instant::now();
            let parsed = self.frame(&key, &payload, attachment.as_deref());
            report.read_time += r0.elapsed();
            match parsed {
                Ok(frame) => {
                    if let (Some(h), Ok(d)) = (transit_us.as_mut(), SystemTime::now().duration_since(frame.acquired_at))
                    {
                        let _ = h.record(d.as_micros() as u64);
                    }
                    let now = Instant::now();
                    let s = span.get_or_insert((now, now, 0));
                    s.1 = now;
                    s.2 += payload.len() as u64;
                    if self.skip.contains(&frame.key) {
                        continue;
                    }
                    if fields.insert(frame.key.clone()) {
                        report.fields += 1;
                    }
                    report.send(out, frame)?;
                }
                Err((reason, detail)) => self.problems.report(&mut report, key, reason, detail),
            }
        }
        report.stopped_early = stop.is_stopped();
        if let Some(h) = transit_us.filter(|h| !h.is_empty()) {
            let (first, last, bytes) = span.unwrap_or((Instant::now(), Instant::now(), 0));
            let secs = (last - first).as_secs_f64();
            crate::telemetry::FrameTransit {
                frames: h.len(),
                ingest_mb_s: if secs > 0.0 { bytes as f64 / 1e6 / secs } else { 0.0 },
                p50_ms: h.value_at_quantile(0.5) as f64 / 1e3,
                p99_ms: h.value_at_quantile(0.99) as f64 / 1e3,
                max_ms: h.max() as f64 / 1e3,
            }
            .emit();
        }
        if bridge_alive == Some(false) {
            crate::telemetry::BridgeGoneAtEnd { key: &bridge_key }.emit();
        }
        // Undeclared here; the session itself is shared with the sinks, which still publish.
        drop(liveliness);
        drop(subscriber);
        drop(done_notices);
        Ok(report)
    }
}

/// What the subscriber's callback hands the source's loop: a frame to decode, or the key and size
/// of one too large to queue.
enum Arrival {
    Frame(zenoh::sample::Sample),
    TooLarge(String, usize),
}

/// Little-endian uint16 bytes to pixels (the wire format is little-endian whatever the host).
fn pixels_from_le_bytes(bytes: &[u8]) -> Arc<[u16]> {
    bytes
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect::<Vec<_>>()
        .into()
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn gaps_in_a_publishers_numbers_are_the_frames_lost() {
        let mut g = Gaps::default();
        assert_eq!(g.see("a", 0), Seen::InOrder);
        assert_eq!(g.see("a", 1), Seen::InOrder);
        assert_eq!(g.see("a", 4), Seen::Gap { from: 2, to: 4 }, "2 and 3 never came");
        assert_eq!(g.see("a", 3), Seen::Filled, "3 sent again");
        assert_eq!(g.see("a", 3), Seen::InOrder, "a duplicate is no second fill");
        assert_eq!(g.see("a", 1), Seen::InOrder);
        assert_eq!(g.see("a", 5), Seen::InOrder);
        assert_eq!(
            g.see("b", 2),
            Seen::Gap { from: 0, to: 2 },
            "a stream's first frames lost too"
        );
        assert_eq!(g.see("a", 6), Seen::InOrder, "streams are apart");
        for i in 0..100 {
            g.see(&format!("flood{i}"), 7);
        }
        assert!(g.next.len() <= Gaps::STREAMS);
        g.see("a", 6 + 2 * Gaps::MISSING as u64);
        assert!(g.missing.len() <= Gaps::MISSING);
    }

    /// The key grammar both ends share: `tests/vectors/frame_keys.json`, which the Python
    /// bridge's test reads too.
    #[test]
    fn frame_keys_follow_the_shared_vectors() {
        let v: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/vectors/frame_keys.json")).expect("the vectors are JSON");
        let plan = &v["plan"];
        let names = |k: &str| -> Vec<String> {
            plan[k]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c.as_str().map(String::from))
                .collect()
        };
        let cfg = ZenohSourceConfig {
            plate: plan["plate"].as_str().unwrap_or_default().into(),
            plate_format: plan["plate_format"].as_u64().unwrap_or_default() as u16,
            channels: names("channels"),
            width_px: 4,
            height_px: 4,
            ..ZenohSourceConfig::default()
        };
        let instrument = plan["instrument"].as_str().unwrap_or_default();
        let src = ZenohSource::new(&cfg, instrument, SharedSession::default(), ZenohConfig::default())
            .expect("the vectors' plan is a valid source");
        let header = br#"{"shape":[4,4],"dtype":"uint16"}"#;
        let payload = [0u8; 32];
        let list = |k: &str| v[k].as_array().cloned().unwrap_or_default();
        assert!(list("valid").len() >= 3 && list("invalid").len() >= 10);
        for case in list("valid") {
            let key = case["key"].as_str().unwrap_or_default();
            let frame = src
                .frame(key, &payload, Some(header))
                .unwrap_or_else(|e| panic!("{key} refused: {e:?}"));
            assert_eq!(
                Some(frame.key.well.to_string().as_str()),
                case["well"].as_str(),
                "{key}"
            );
            assert_eq!(Some(u64::from(frame.key.field)), case["field"].as_u64(), "{key}");
            assert_eq!(Some(frame.channel as u64), case["channel_index"].as_u64(), "{key}");
        }
        for case in list("invalid") {
            let key = case["key"].as_str().unwrap_or_default();
            match src.frame(key, &payload, Some(header)) {
                Ok(f) => panic!("{key} accepted as {:?}", f.key),
                Err((reason, _)) => assert_eq!(Some(reason), case["reason"].as_str(), "{key}"),
            }
        }
    }

    /// Property test of the frame decoder: keys, payloads and headers from the network, mutated
    /// at random from valid ones or made of noise, never panic; the valid frame still parses.
    #[test]
    fn malformed_input_never_panics() {
        let cfg = ZenohSourceConfig {
            plate: "P1".into(),
            channels: vec!["DAPI".into(), "ER".into()],
            width_px: 4,
            height_px: 4,
            ..ZenohSourceConfig::default()
        };
        let src = ZenohSource::new(&cfg, "scope1", SharedSession::default(), ZenohConfig::default()).unwrap();
        let key = "liveomics/scope1/frames/P1/B2/0/DAPI";
        let header = br#"{"shape":[4,4],"dtype":"uint16","timepoint":0,"acquired_unix_ns":1,"stage_um":[1.0,2.0,3.0],"event_index":{"p":1,"c":0},"followup_id":"r-1","pixel_size_um":0.65}"#;
        let payload = vec![7u8; 32];
        let ok = src.frame(key, &payload, Some(header)).unwrap();
        assert_eq!(ok.origin.stage_um, Some([1.0, 2.0, 3.0]));
        assert_eq!(ok.origin.followup_id.as_deref(), Some("r-1"));
        let wrong_scale = br#"{"shape":[4,4],"dtype":"uint16","pixel_size_um":0.325}"#;
        assert_eq!(src.frame(key, &payload, Some(wrong_scale)).unwrap_err().0, "pixel_size");
        let specials: [&[u8]; 8] = [
            br#"{"shape":[18446744073709551615,18446744073709551615],"dtype":"uint16"}"#,
            br#"{"shape":[9223372036854775807,3],"dtype":"uint16"}"#,
            br#"{"shape":[4],"dtype":"uint16"}"#,
            br#"{"shape":[4,4],"dtype":7}"#,
            br#"{"shape":[4,4],"dtype":"uint16","stage_um":[1e309,0,0]}"#,
            br#"{"shape":[4,4],"dtype":"uint16","followup_id":""}"#,
            b"",
            b"\xff\xfe{",
        ];
        let keys = [
            key,
            "liveomics/scope1/frames/P1/B2/0",
            "liveomics/scope1/frames/P1/../0/DAPI",
            "liveomics/scope1/frames/P1/B2/-1/DAPI",
            "liveomics/scope1/frames/P1/Z99/0/DAPI",
            "liveomics/scope1/frames/P1/B2/99999999999999999999/DAPI",
            "//////",
            "",
        ];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for i in 0..20_000 {
            let k = if rng.random_bool(0.8) {
                keys[rng.random_range(0..keys.len())].to_string()
            } else {
                (0..rng.random_range(0..60))
                    .map(|_| rng.random_range(32u8..127) as char)
                    .collect()
            };
            let mut att: Vec<u8> = match i % 3 {
                0 => header.to_vec(),
                1 => specials[rng.random_range(0..specials.len())].to_vec(),
                _ => (0..rng.random_range(0..80)).map(|_| rng.random()).collect(),
            };
            for _ in 0..rng.random_range(0..4) {
                if !att.is_empty() {
                    let j = rng.random_range(0..att.len());
                    att[j] = rng.random();
                }
            }
            if rng.random_bool(0.1) {
                att.truncate(rng.random_range(0..=att.len()));
            }
            let pl: Vec<u8> = vec![1; rng.random_range(0..70)];
            let attachment = if rng.random_bool(0.05) {
                None
            } else {
                Some(att.as_slice())
            };
            let _ = src.frame(&k, &pl, attachment);
        }
    }
}
