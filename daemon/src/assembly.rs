//! Frames into fields: a state machine with no threads and no clock of its own. Frames and
//! clock ticks go in, fields come out, so every rule (complete, incomplete after the timeout,
//! evicted by the memory cap, late and duplicate frames rejected) is unit-tested directly; the
//! pipeline's assembly thread only feeds it from the frame queue.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use liveomics_adapters::model::{AcquisitionPlan, Field, FieldKey, Frame, Pixels};

use crate::telemetry as t;

/// What assembly counted, for the run summary.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AssemblyStats {
    pub rejected: u64,
    pub incomplete: u64,
}

#[derive(Debug)]
struct Pending {
    channels: Vec<Option<Arc<[u16]>>>,
    acquired_at: std::time::SystemTime,
    received_at: Instant,
    /// When its latest frame reached assembly: the timeout counts from here.
    last_arrival: Instant,
    origin: liveomics_adapters::model::Origin,
    have: usize,
    /// Pixel bytes held, for `pipeline.max_pending_mb`.
    bytes: u64,
}

/// Fields already passed on that a late frame is recognised by (rather than starting a new
/// field); the oldest are forgotten past this many.
const REMEMBERED: usize = 100_000;

/// Groups frames into fields. A complete field goes on at once. A field still missing channels
/// `timeout` after its latest frame reached assembly goes on incomplete, and so do the oldest others when the
/// frames waiting would hold more than `max_pending` bytes; each with a counted warning, its raw
/// frames kept, never dropped. Invalid, late and duplicate frames are rejected, logged and
/// counted.
#[derive(Debug)]
pub struct Assembler {
    plan: Arc<AcquisitionPlan>,
    timeout: Duration,
    max_pending: u64,
    pending: HashMap<FieldKey, Pending>,
    emitted: HashSet<FieldKey>,
    emitted_order: VecDeque<FieldKey>,
    /// Pixel bytes of every pending field.
    held: u64,
    stats: AssemblyStats,
}

impl Assembler {
    pub fn new(plan: Arc<AcquisitionPlan>, timeout: Duration, max_pending: u64) -> Self {
        Self {
            plan,
            timeout,
            max_pending,
            pending: HashMap::new(),
            emitted: HashSet::new(),
            emitted_order: VecDeque::new(),
            held: 0,
            stats: AssemblyStats::default(),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn stats(&self) -> AssemblyStats {
        self.stats
    }

    /// Pixel bytes held by fields still waiting for channels.
    pub fn held_bytes(&self) -> u64 {
        self.held
    }

    fn emit(&mut self, key: FieldKey, p: Pending, passed: t::Passed) -> Field {
        let plan = &self.plan;
        let field = Field {
            key,
            width: plan.width,
            height: plan.height,
            channels: p.channels,
            acquired_at: p.acquired_at,
            received_at: p.received_at,
            origin: p.origin,
        };
        let missing: Vec<String> = field
            .missing_channels()
            .into_iter()
            .map(|i| plan.channels[i].name.clone())
            .collect();
        t::FieldAssembled {
            field: &field.key.to_string(),
            missing: &missing,
            passed,
        }
        .emit();
        self.stats.incomplete += u64::from(!missing.is_empty());
        self.emitted.insert(field.key.clone());
        self.emitted_order.push_back(field.key.clone());
        if self.emitted_order.len() > REMEMBERED {
            if let Some(old) = self.emitted_order.pop_front() {
                self.emitted.remove(&old);
            }
        }
        field
    }

    fn reject(&mut self, frame: &Frame, reason: &'static str, detail: String) {
        t::FrameRejected {
            field: &frame.key.to_string(),
            channel: frame.channel,
            reason,
            detail,
        }
        .emit();
        self.stats.rejected += 1;
    }

    /// One frame in; the fields it lets go on, in order (partial fields it evicts over the
    /// memory cap, then its own field if it completes it).
    pub fn frame(&mut self, frame: Frame) -> Vec<Field> {
        let at = frame.received_at;
        self.frame_at(frame, at)
    }

    /// [`Assembler::frame`] for a frame that reached assembly at `arrived` (the source's stamp
    /// says when it was produced; under backpressure it may have waited long in the queue).
    pub fn frame_at(&mut self, frame: Frame, arrived: Instant) -> Vec<Field> {
        let mut out = Vec::new();
        let plan = self.plan.clone();
        let n = plan.channels.len();
        if frame.key.plate != plan.plate {
            self.reject(
                &frame,
                "plate",
                format!("plate {} is not {}", frame.key.plate, plan.plate),
            );
            return out;
        }
        if frame.key.well.row >= plan.format.rows() || frame.key.well.column >= plan.format.columns() {
            self.reject(&frame, "well", format!("well {} is outside the plate", frame.key.well));
            return out;
        }
        if frame.key.timepoint >= plan.timepoints {
            let detail = format!("timepoint {} but the plan has {}", frame.key.timepoint, plan.timepoints);
            self.reject(&frame, "timepoint", detail);
            return out;
        }
        if frame.channel >= n {
            self.reject(
                &frame,
                "channel",
                format!("channel index {} but the plan has {n}", frame.channel),
            );
            return out;
        }
        if frame.width != plan.width || frame.height != plan.height || frame.pixels.len() != plan.width * plan.height {
            let detail = format!(
                "{}x{} with {} pixels, expected {}x{}",
                frame.width,
                frame.height,
                frame.pixels.len(),
                plan.width,
                plan.height
            );
            self.reject(&frame, "shape", detail);
            return out;
        }
        let px = match &frame.pixels {
            Pixels::U16(p) => p.clone(),
            other => {
                let detail = format!("{} pixels, expected uint16", other.dtype());
                self.reject(&frame, "dtype", detail);
                return out;
            }
        };
        if self.emitted.contains(&frame.key) {
            self.reject(&frame, "late", "the field was already passed on".into());
            return out;
        }
        if self
            .pending
            .get(&frame.key)
            .is_some_and(|p| p.channels[frame.channel].is_some())
        {
            self.reject(&frame, "duplicate", "channel already received for this field".into());
            return out;
        }
        // Over the memory cap, the oldest other partial fields go on first; this frame's own
        // field never does (its channels would then come back as a second field), and a frame
        // that completes its field frees memory at once, so it evicts nothing.
        let frame_bytes = (px.len() * 2) as u64;
        let completes = self.pending.get(&frame.key).map_or(0, |p| p.have) + 1 == n;
        while !completes && self.held + frame_bytes > self.max_pending {
            let oldest = self
                .pending
                .iter()
                .filter(|(k, _)| **k != frame.key)
                .min_by_key(|(_, p)| p.received_at)
                .map(|(k, _)| k.clone());
            let Some((k, p)) = oldest.and_then(|k| self.pending.remove_entry(&k)) else {
                break;
            };
            self.held -= p.bytes;
            out.push(self.emit(k, p, t::Passed::MemoryCap));
        }
        let entry = self.pending.entry(frame.key.clone()).or_insert_with(|| Pending {
            channels: vec![None; n],
            acquired_at: frame.acquired_at,
            received_at: frame.received_at,
            last_arrival: arrived,
            origin: frame.origin.clone(),
            have: 0,
            bytes: 0,
        });
        t::FrameReceived {
            channel: &plan.channels[frame.channel].name,
        }
        .emit();
        entry.channels[frame.channel] = Some(px);
        entry.have += 1;
        entry.bytes += frame_bytes;
        entry.received_at = entry.received_at.min(frame.received_at);
        entry.last_arrival = entry.last_arrival.max(arrived);
        let complete = entry.have == n;
        self.held += frame_bytes;
        if complete {
            if let Some(p) = self.pending.remove(&frame.key) {
                self.held -= p.bytes;
                out.push(self.emit(frame.key, p, t::Passed::Complete));
            }
        }
        out
    }

    /// The clock at `now`: fields that got no frame for longer than the timeout go on as they
    /// are. The caller ticks only while no frame waits for it, so that frames held back by
    /// backpressure never make their own field late.
    pub fn tick(&mut self, now: Instant) -> Vec<Field> {
        let mut expired: Vec<(FieldKey, Instant)> = self
            .pending
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.last_arrival) > self.timeout)
            .map(|(k, p)| (k.clone(), p.received_at))
            .collect();
        expired.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        let mut out = Vec::new();
        for (k, _) in expired {
            if let Some(p) = self.pending.remove(&k) {
                self.held -= p.bytes;
                out.push(self.emit(k, p, t::Passed::Timeout));
            }
        }
        out
    }

    /// Intake is over: every pending field goes on as it is, in key order.
    pub fn finish(&mut self) -> Vec<Field> {
        let mut rest: Vec<(FieldKey, Pending)> = self.pending.drain().collect();
        rest.sort_by(|a, b| a.0.cmp(&b.0));
        self.held = 0;
        rest.into_iter()
            .map(|(k, p)| self.emit(k, p, t::Passed::IntakeEnded))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use liveomics_adapters::model::WellId;

    use super::*;

    const W: usize = 8;

    fn plan(channels: usize) -> Arc<AcquisitionPlan> {
        let names: Vec<String> = (0..channels).map(|c| format!("C{c}")).collect();
        Arc::new(AcquisitionPlan::open_ended("P1", 96, &names, (W, W), 1.0, 1).unwrap())
    }

    fn frame(plan: &AcquisitionPlan, well: &str, field: u32, channel: usize, at: Instant) -> Frame {
        Frame {
            key: FieldKey {
                plate: plan.plate.clone(),
                well: WellId::parse(well, plan.format).unwrap(),
                field,
                timepoint: 0,
            },
            channel,
            width: W,
            height: W,
            pixels: Pixels::U16(vec![channel as u16; W * W].into()),
            acquired_at: SystemTime::now(),
            received_at: at,
            origin: Default::default(),
        }
    }

    fn names(fields: &[Field]) -> Vec<String> {
        fields.iter().map(|f| f.key.to_string()).collect()
    }

    #[test]
    fn a_field_goes_on_when_its_last_channel_arrives() {
        let p = plan(3);
        let mut a = Assembler::new(p.clone(), Duration::from_secs(5), u64::MAX);
        let t0 = Instant::now();
        assert!(a.frame(frame(&p, "B2", 0, 2, t0)).is_empty());
        assert!(a.frame(frame(&p, "B2", 0, 0, t0)).is_empty());
        assert_eq!(a.held_bytes(), 2 * (W * W * 2) as u64);
        let out = a.frame(frame(&p, "B2", 0, 1, t0));
        assert_eq!(names(&out), ["P1/B2/f0/t0"]);
        let px: Vec<u16> = out[0].channels.iter().map(|c| c.as_ref().unwrap()[0]).collect();
        assert_eq!(px, [0, 1, 2], "channels in plan order, whatever the arrival order");
        assert_eq!(a.held_bytes(), 0);
        assert_eq!(a.stats(), AssemblyStats::default());
    }

    #[test]
    fn a_field_whose_frames_keep_coming_is_not_timed_out() {
        let p = plan(3);
        let mut a = Assembler::new(p.clone(), Duration::from_secs(5), u64::MAX);
        let t0 = Instant::now();
        // The source stamped all three channels at t0, but backpressure held them: they reach
        // assembly 4 s apart, 8 s in all, each within the timeout of the one before.
        assert!(a.frame_at(frame(&p, "B2", 0, 0, t0), t0).is_empty());
        assert!(a.tick(t0 + Duration::from_secs(4)).is_empty());
        assert!(a
            .frame_at(frame(&p, "B2", 0, 1, t0), t0 + Duration::from_secs(4))
            .is_empty());
        assert!(
            a.tick(t0 + Duration::from_secs(8)).is_empty(),
            "4 s since its latest frame"
        );
        let out = a.frame_at(frame(&p, "B2", 0, 2, t0), t0 + Duration::from_secs(8));
        assert_eq!(out.len(), 1);
        assert!(out[0].missing_channels().is_empty());
        assert_eq!(
            out[0].received_at, t0,
            "latency still counts from the first frame's stamp"
        );
        assert_eq!(a.stats().incomplete, 0);
    }

    #[test]
    fn a_field_missing_channels_goes_on_after_the_timeout_counted_incomplete() {
        let p = plan(2);
        let mut a = Assembler::new(p.clone(), Duration::from_secs(5), u64::MAX);
        let t0 = Instant::now();
        a.frame(frame(&p, "A1", 0, 0, t0));
        a.frame(frame(&p, "A2", 0, 0, t0 + Duration::from_secs(3)));
        assert!(a.tick(t0 + Duration::from_secs(4)).is_empty());
        let out = a.tick(t0 + Duration::from_secs(6));
        assert_eq!(names(&out), ["P1/A1/f0/t0"], "only the one past its timeout");
        assert!(
            out[0].channels[1].is_none() && out[0].channels[0].is_some(),
            "its frame is kept"
        );
        assert_eq!(names(&a.tick(t0 + Duration::from_secs(9))), ["P1/A2/f0/t0"]);
        assert_eq!(a.stats().incomplete, 2);
    }

    #[test]
    fn over_the_memory_cap_the_oldest_other_field_goes_on_first() {
        let p = plan(2);
        let frame_bytes = (W * W * 2) as u64;
        let mut a = Assembler::new(p.clone(), Duration::from_secs(60), 2 * frame_bytes);
        let t0 = Instant::now();
        a.frame(frame(&p, "A1", 0, 0, t0));
        a.frame(frame(&p, "A2", 0, 0, t0 + Duration::from_millis(1)));
        // A third partial field does not fit: the oldest (A1) goes on, not the newcomer's own.
        let out = a.frame(frame(&p, "A3", 0, 0, t0 + Duration::from_millis(2)));
        assert_eq!(names(&out), ["P1/A1/f0/t0"]);
        assert_eq!(a.held_bytes(), 2 * frame_bytes);
        // A frame that completes its field evicts nothing, even at the cap.
        let out = a.frame(frame(&p, "A2", 0, 1, t0 + Duration::from_millis(3)));
        assert_eq!(names(&out), ["P1/A2/f0/t0"]);
        assert_eq!(a.stats().incomplete, 1);
        assert_eq!(names(&a.finish()), ["P1/A3/f0/t0"], "intake over: the rest goes on");
        assert_eq!(a.held_bytes(), 0);
    }

    #[test]
    fn late_duplicate_and_malformed_frames_are_rejected_and_counted() {
        let p = plan(2);
        let mut a = Assembler::new(p.clone(), Duration::from_secs(60), u64::MAX);
        let t0 = Instant::now();
        a.frame(frame(&p, "A1", 0, 0, t0));
        assert!(a.frame(frame(&p, "A1", 0, 0, t0)).is_empty(), "duplicate channel");
        assert_eq!(a.frame(frame(&p, "A1", 0, 1, t0)).len(), 1);
        assert!(a.frame(frame(&p, "A1", 0, 1, t0)).is_empty(), "late: the field went on");
        let mut bad = frame(&p, "A2", 0, 0, t0);
        bad.channel = 7;
        assert!(a.frame(bad).is_empty());
        let mut small = frame(&p, "A2", 0, 0, t0);
        small.width = 4;
        assert!(a.frame(small).is_empty());
        let mut u8s = frame(&p, "A2", 0, 0, t0);
        u8s.pixels = Pixels::U8(vec![0u8; W * W].into());
        assert!(a.frame(u8s).is_empty());
        let mut later = frame(&p, "A2", 0, 0, t0);
        later.key.timepoint = 3;
        assert!(a.frame(later).is_empty());
        assert_eq!(a.stats().rejected, 6);
        assert!(a.finish().is_empty(), "nothing of the rejected frames is pending");
    }
}
