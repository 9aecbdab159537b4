//! The `folder` source: watches the directory an HCS instrument writes into (inotify through
//! `notify`, or polling for network shares), or replays a finished one in acquisition order.
//!
//! A file is read only once it is complete: after a close-after-write event, or when its size and
//! modification time have not changed for `stable_ms`. A file that decodes badly is retried when
//! it changes; one that stays bad or keeps changing past `stuck_timeout_ms` is reported by name
//! and counted. Nothing taken from a file name becomes a path: names are parsed into validated
//! well ids and numbers.

mod config;
pub mod layout;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::Sender;
use serde::{Deserialize, Serialize};

use self::layout::{Layout, LayoutKind, NameError, Parsed};
use crate::model::{AcquisitionPlan, FieldKey, Frame, Pixels, PlateFormat};
use crate::source::{wait_until, Problems, Source, SourceError, SourceProblem, SourceReport, StopToken};
use crate::tiff_io::{read_header, read_image, read_image_limited, Plane, TiffError};
use crate::Invalid;
pub use config::*;

/// Files under `dir`, recursively, skipping hidden names (editors' and writers' temporaries).
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'))
        {
            continue;
        }
        match e.file_type() {
            Ok(t) if t.is_dir() => walk(&p, out),
            Ok(t) if t.is_file() => out.push(p),
            _ => {}
        }
    }
}

/// A file seen but not yet read.
#[derive(Debug)]
struct Candidate {
    size: u64,
    mtime: SystemTime,
    changed_at: Instant,
    first_seen: Instant,
    closed: bool,
    /// The state (size, mtime) at which the last read failed, and why: tried again only once
    /// the file changes, and given up only once it has stopped changing for `stuck_timeout_ms`.
    failed: Option<((u64, SystemTime), Retry)>,
    reported_stuck: bool,
}

/// Why a read gave no frame this time; the file is tried again when it changes.
#[derive(Debug, Clone, PartialEq)]
enum Retry {
    /// It does not decode, names data past its end, or changed while it was read.
    Unfinished(String),
    /// Its last pixel bytes are zero: a preallocated file whose pixels are still to come.
    ZeroTail,
}

/// What a watched file was when it was read: a change after that is reported.
type Stamp = (u64, SystemTime);

fn stamp(p: &Path) -> Option<Stamp> {
    let md = std::fs::metadata(p).ok()?;
    md.is_file()
        .then(|| (md.len(), md.modified().unwrap_or(SystemTime::UNIX_EPOCH)))
}

/// The folder source.
pub struct FolderSource {
    cfg: FolderConfig,
    plan: AcquisitionPlan,
    layout: Layout,
    problems: Problems,
    skip: HashSet<FieldKey>,
}

impl std::fmt::Debug for FolderSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FolderSource").field("path", &self.cfg.path).finish()
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Records what `p` is now (size, mtime) among the files waiting to be read; a change restarts
/// its stability clock.
fn touch(pending: &mut BTreeMap<PathBuf, Candidate>, p: PathBuf, closed: bool) {
    let Some((size, mtime)) = stamp(&p) else { return };
    let now = Instant::now();
    let c = pending.entry(p).or_insert(Candidate {
        size,
        mtime,
        changed_at: now,
        first_seen: now,
        closed: false,
        failed: None,
        reported_stuck: false,
    });
    if c.size != size || c.mtime != mtime {
        c.size = size;
        c.mtime = mtime;
        c.changed_at = now;
        c.closed = false;
    }
    c.closed |= closed;
}

impl FolderSource {
    pub fn new(mut cfg: FolderConfig) -> Result<Self, SourceError> {
        let issues = cfg.validate();
        if !issues.is_empty() {
            let msg: Vec<String> = issues.iter().map(|i| i.to_string()).collect();
            return Err(SourceError::Config(msg.join("; ")));
        }
        if !cfg.path.is_dir() {
            return Err(SourceError::Config(format!(
                "{} is not a directory",
                cfg.path.display()
            )));
        }
        // Watch events name absolute paths; a walk of a relative path would name the same files
        // differently, and files already done would be read again after a rescan.
        cfg.path = std::fs::canonicalize(&cfg.path).map_err(|e| SourceError::Io {
            context: format!("cannot resolve {}", cfg.path.display()),
            source: e,
        })?;
        let format = PlateFormat::new(cfg.plate_format)?;
        let layout = Layout::new(cfg.layout, &cfg.pattern, format, cfg.one_based)
            .map_err(|e| SourceError::Config(e.to_string()))?;
        let (mut width, mut height, mut pixel) = (cfg.width_px as usize, cfg.height_px as usize, cfg.pixel_size_um);
        if width == 0 || pixel == 0.0 {
            let mut files = Vec::new();
            walk(&cfg.path, &mut files);
            files.sort();
            let first = files
                .iter()
                .find(|p| layout.parse(&file_name(p)).is_ok())
                .ok_or_else(|| {
                    SourceError::Config(format!(
                    "no {:?} image in {} yet: set width_px, height_px and pixel_size_um to start on an empty folder",
                    cfg.layout,
                    cfg.path.display()
                ))
                })?;
            let img = read_image(first).map_err(|e| SourceError::Config(e.to_string()))?;
            if width == 0 {
                (width, height) = (img.width, img.height);
            }
            if pixel == 0.0 {
                pixel = img.pixel_size_um.ok_or_else(|| {
                    SourceError::Config(format!(
                        "{} has no OME-XML pixel size: set pixel_size_um",
                        first.display()
                    ))
                })?;
            }
        }
        let plan = AcquisitionPlan::open_ended(
            &cfg.plate,
            cfg.plate_format,
            &cfg.channels,
            (width, height),
            pixel,
            cfg.timepoints,
        )?;
        Ok(Self {
            cfg,
            plan,
            layout,
            problems: Problems::default(),
            skip: HashSet::new(),
        })
    }

    fn problem(&self, report: &mut SourceReport, path: &Path, reason: &'static str, detail: String) {
        self.problems.report(report, path.display().to_string(), reason, detail);
    }

    /// Reads one complete file into a frame. `Ok(None)`: not an image of this plate (reported).
    /// `Err`: not readable yet; the caller tries again when the file changes. A file whose last
    /// pixel bytes are zero is read only with `allow_zero_tail` (once it stopped changing).
    fn read(
        &self,
        path: &Path,
        mtime: SystemTime,
        report: &mut SourceReport,
        allow_zero_tail: bool,
    ) -> Result<Option<Frame>, Retry> {
        let name = file_name(path);
        let parsed: Parsed = match self.layout.parse(&name) {
            Ok(p) => layout::with_folders(self.cfg.layout, p, path),
            Err(NameError::Thumbnail) => return Ok(None),
            Err(e @ NameError::NoMatch(_)) => {
                self.problem(report, path, "unmatched_name", format!("{name} {e}"));
                return Ok(None);
            }
            Err(NameError::Value(e)) => {
                self.problem(report, path, "bad_name", format!("{name}: {e}"));
                return Ok(None);
            }
        };
        if let Some(p) = &parsed.plate {
            if p != self.plan.plate.as_str() {
                self.problem(
                    report,
                    path,
                    "plate",
                    format!("{name} is from plate {p}, not {}", self.plan.plate),
                );
                return Ok(None);
            }
        }
        if parsed.channel >= self.plan.channels.len() {
            self.problem(
                report,
                path,
                "channel",
                format!(
                    "{name}: channel {} but {} are configured",
                    parsed.channel + 1,
                    self.plan.channels.len()
                ),
            );
            return Ok(None);
        }
        if parsed.timepoint >= self.plan.timepoints {
            self.problem(
                report,
                path,
                "timepoint",
                format!("{name}: timepoint beyond `timepoints`"),
            );
            return Ok(None);
        }
        if parsed.plane > 0 {
            self.problem(
                report,
                path,
                "plane",
                format!("{name}: z-planes other than the first are not read yet"),
            );
            return Ok(None);
        }
        let t0 = Instant::now();
        let chain = |e: &dyn std::error::Error| {
            let mut s = e.to_string();
            let mut src = e.source();
            while let Some(c) = src {
                s.push_str(&format!(": {c}"));
                src = c.source();
            }
            s
        };
        let before = stamp(path);
        let header = match read_header(path) {
            Ok(h) => h,
            Err(TiffError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(Retry::Unfinished(format!("{name}: gone before it was read")));
            }
            Err(e) => return Err(Retry::Unfinished(chain(&e))),
        };
        if !matches!(header.sample.as_str(), "uint8" | "uint16") {
            let detail = format!("{name}: {} pixels; uint8 or uint16 expected", header.sample);
            self.problem(report, path, "dtype", detail);
            return Ok(None);
        }
        // Checked before a pixel is decoded: a file's directory may name gigabytes.
        if (header.width, header.height) != (self.plan.width, self.plan.height) {
            let detail = format!(
                "{name}: {}x{} pixels, the plate's fields are {}x{}",
                header.width, header.height, self.plan.width, self.plan.height
            );
            self.problem(report, path, "shape", detail);
            return Ok(None);
        }
        if header.zero_tail && !allow_zero_tail {
            return Err(Retry::ZeroTail);
        }
        let img = read_image_limited(path, self.plan.width * self.plan.height * 2 + (1 << 20))
            .map_err(|e| Retry::Unfinished(chain(&e)))?;
        // Re-checked after reading: a writer that went on meanwhile would leave a mix of old and
        // new bytes, so the read is thrown away and the file tried again once it settles.
        if stamp(path) != before {
            return Err(Retry::Unfinished(format!("{name}: changed while it was read")));
        }
        report.read_time += t0.elapsed();
        let pixels = match img.plane {
            Plane::U16(d) => Pixels::U16(Arc::from(d)),
            Plane::U8(d) => Pixels::U16(d.into_iter().map(u16::from).collect::<Vec<_>>().into()),
            Plane::U32(_) | Plane::F32(_) => {
                self.problem(
                    report,
                    path,
                    "dtype",
                    format!("{name}: 32-bit pixels; uint8 or uint16 expected"),
                );
                return Ok(None);
            }
        };
        Ok(Some(Frame {
            key: FieldKey {
                plate: self.plan.plate.clone(),
                well: parsed.well,
                field: parsed.field,
                timepoint: parsed.timepoint,
            },
            channel: parsed.channel,
            width: img.width,
            height: img.height,
            pixels,
            acquired_at: mtime,
            received_at: Instant::now(),
            origin: Default::default(),
        }))
    }

    fn watch_loop(&mut self, out: &Sender<Frame>, stop: &StopToken) -> Result<SourceReport, SourceError> {
        let mut report = SourceReport::default();
        // Bounded: a burst of events beyond it (thousands of files at once) is not queued but
        // flagged, and the loop then walks the folder, which finds every file anyway.
        let (tx, rx) = crossbeam_channel::bounded::<notify::Result<notify::Event>>(4096);
        let overflow = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let overflowed = std::sync::Arc::clone(&overflow);
        let handler = move |ev| {
            if tx.try_send(ev).is_err() {
                overflowed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        };
        let io = |e: notify::Error| SourceError::Io {
            context: "cannot watch the folder".into(),
            source: std::io::Error::other(e.to_string()),
        };
        let mut watcher: Box<dyn notify::Watcher> = if self.cfg.polling {
            let c = notify::Config::default().with_poll_interval(Duration::from_millis(self.cfg.poll_interval_ms));
            Box::new(notify::PollWatcher::new(handler, c).map_err(io)?)
        } else {
            Box::new(notify::recommended_watcher(handler).map_err(io)?)
        };
        watcher
            .watch(&self.cfg.path, notify::RecursiveMode::Recursive)
            .map_err(io)?;
        let mut pending: BTreeMap<PathBuf, Candidate> = BTreeMap::new();
        let mut done: HashMap<PathBuf, Option<Stamp>> = HashMap::new();
        let mut fields: HashSet<FieldKey> = HashSet::new();
        let mut last_activity = Instant::now();
        let stable = Duration::from_millis(self.cfg.stable_ms);
        let stuck = Duration::from_millis(self.cfg.stuck_timeout_ms);
        let idle = Duration::from_millis(self.cfg.idle_exit_ms);
        let rescan = Duration::from_millis(self.cfg.rescan_ms);
        let mut last_rescan = Instant::now();
        let mut initial = Vec::new();
        walk(&self.cfg.path, &mut initial);
        for p in initial {
            touch(&mut pending, p, false);
        }
        while !stop.is_stopped() {
            let overflowed = overflow.swap(false, std::sync::atomic::Ordering::Relaxed);
            while let Ok(ev) = rx.try_recv() {
                let Ok(ev) = ev else { continue };
                // The kernel's own event queue overflowed: some files were never reported.
                if ev.need_rescan() {
                    overflow.store(true, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                let closed = matches!(
                    ev.kind,
                    notify::EventKind::Access(notify::event::AccessKind::Close(notify::event::AccessMode::Write))
                );
                for p in ev.paths {
                    let hidden = p
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with('.'));
                    if hidden {
                        continue;
                    }
                    if p.is_dir() {
                        // A directory created or moved in: files written into it before its own
                        // watch was in place, or moved in with it, raise no event of their own.
                        // (Not on access events: reading a directory, as the rescan does, raises
                        // those.)
                        let arrived = matches!(
                            ev.kind,
                            notify::EventKind::Create(_)
                                | notify::EventKind::Modify(notify::event::ModifyKind::Name(_))
                        );
                        if arrived {
                            let mut inside = Vec::new();
                            walk(&p, &mut inside);
                            for f in inside.into_iter().filter(|f| !done.contains_key(f)) {
                                touch(&mut pending, f, false);
                                last_activity = Instant::now();
                            }
                        }
                    } else if !done.contains_key(&p) {
                        touch(&mut pending, p, closed);
                        last_activity = Instant::now();
                    }
                }
            }
            if overflowed || (!rescan.is_zero() && last_rescan.elapsed() >= rescan) {
                last_rescan = Instant::now();
                if self.reconcile(&mut pending, &mut done, &mut report, !overflowed) {
                    last_activity = Instant::now();
                }
            }
            let paths: Vec<PathBuf> = pending.keys().cloned().collect();
            for p in paths {
                // Polling catches size changes that produced no event (network shares).
                touch(&mut pending, p.clone(), false);
                let Some(c) = pending.get_mut(&p) else { continue };
                let now = (c.size, c.mtime);
                let failed_here = c.failed.as_ref().filter(|(at, _)| *at == now).map(|(_, r)| r.clone());
                // Unchanged for the whole timeout: whatever it is now, it stays.
                let settled = c.changed_at.elapsed() > stuck;
                let allow_zero_tail = match failed_here {
                    None => {
                        let ready = c.size > 0 && (c.closed || c.changed_at.elapsed() >= stable);
                        if ready {
                            false
                        } else {
                            if c.size == 0 && settled {
                                let detail = format!("{}: empty for {} s", file_name(&p), stuck.as_secs_f64());
                                pending.remove(&p);
                                self.problem(&mut report, &p, "unreadable", detail);
                                done.insert(p, None);
                            } else if c.first_seen.elapsed() > stuck && !settled && !c.reported_stuck {
                                c.reported_stuck = true;
                                let detail = format!(
                                    "{}: still being written after {} s; read once it is complete",
                                    file_name(&p),
                                    stuck.as_secs_f64()
                                );
                                self.problems
                                    .recovered(&mut report, p.display().to_string(), "stuck", detail);
                            }
                            continue;
                        }
                    }
                    Some(Retry::Unfinished(e)) => {
                        // Final only once the file has stopped changing: a slow writer that
                        // pauses is read when it resumes and finishes.
                        if settled {
                            let detail = format!("{e} (unchanged for {} s: truncated or corrupt)", stuck.as_secs_f64());
                            pending.remove(&p);
                            self.problem(&mut report, &p, "unreadable", detail);
                            done.insert(p, None);
                        }
                        continue;
                    }
                    Some(Retry::ZeroTail) if !settled => continue,
                    Some(Retry::ZeroTail) => true,
                };
                let mtime = c.mtime;
                match self.read(&p, mtime, &mut report, allow_zero_tail) {
                    Ok(Some(frame)) => {
                        if allow_zero_tail {
                            let detail = format!(
                                "{}: its last pixel bytes are zero and it has not changed for {} s; read as it is",
                                file_name(&p),
                                stuck.as_secs_f64()
                            );
                            self.problems
                                .recovered(&mut report, p.display().to_string(), "zero_tail", detail);
                        }
                        pending.remove(&p);
                        done.insert(p, Some(now));
                        last_activity = Instant::now();
                        if self.skip.contains(&frame.key) {
                            continue;
                        }
                        if fields.insert(frame.key.clone()) {
                            report.fields += 1;
                        }
                        report.send(out, frame)?;
                    }
                    Ok(None) => {
                        pending.remove(&p);
                        done.insert(p, None);
                    }
                    Err(r) => {
                        if let Some(c) = pending.get_mut(&p) {
                            c.failed = Some((now, r));
                        }
                    }
                }
            }
            if !idle.is_zero() && pending.is_empty() && last_activity.elapsed() > idle {
                return Ok(report);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        report.stopped_early = true;
        Ok(report)
    }

    /// Walks the folder against what was seen: a file no event reported is taken up (and, on
    /// a periodic rescan, reported as found late), a file changed after it was read is reported.
    /// Cheap: one `stat` per file. Returns whether it found anything new.
    fn reconcile(
        &self,
        pending: &mut BTreeMap<PathBuf, Candidate>,
        done: &mut HashMap<PathBuf, Option<Stamp>>,
        report: &mut SourceReport,
        count_missed: bool,
    ) -> bool {
        let mut all = Vec::new();
        walk(&self.cfg.path, &mut all);
        // An event may still be on its way for a file this young.
        let young = Duration::from_millis(1000.max(2 * self.cfg.poll_interval_ms));
        let mut found = false;
        for p in all {
            if pending.contains_key(&p) {
                continue;
            }
            match done.get_mut(&p) {
                Some(Some(read_as)) => {
                    if let Some(now) = stamp(&p).filter(|s| s != read_as) {
                        let detail = format!(
                            "{}: changed after it was read ({} bytes then, {} now); the plate keeps the pixels read then",
                            file_name(&p),
                            read_as.0,
                            now.0
                        );
                        *read_as = now;
                        self.problem(report, &p, "changed_after_read", detail);
                    }
                }
                Some(None) => {}
                None => {
                    touch(pending, p.clone(), false);
                    found = true;
                    let old = pending
                        .get(&p)
                        .and_then(|c| c.mtime.elapsed().ok())
                        .is_some_and(|age| age > young);
                    if count_missed && old {
                        let detail = format!(
                            "{}: found by the periodic rescan; no watch event reported it",
                            file_name(&p)
                        );
                        self.problems
                            .recovered(report, p.display().to_string(), "missed_event", detail);
                    }
                }
            }
        }
        found
    }

    /// A finished folder, in acquisition order (modification time), paced by `speed`.
    fn replay(&mut self, out: &Sender<Frame>, stop: &StopToken) -> Result<SourceReport, SourceError> {
        let mut report = SourceReport::default();
        let mut files = Vec::new();
        walk(&self.cfg.path, &mut files);
        let mut files: Vec<(SystemTime, PathBuf)> = files
            .into_iter()
            .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
            .collect();
        files.sort();
        let start = Instant::now();
        let t_first = files.first().map(|f| f.0);
        let mut fields: HashSet<FieldKey> = HashSet::new();
        let mut current: Option<FieldKey> = None;
        for (mtime, p) in files {
            if let (Speed::Factor(f), Some(t0)) = (self.cfg.speed, t_first) {
                wait_until(start + mtime.duration_since(t0).unwrap_or_default().div_f64(f), stop);
            }
            match self.read(&p, mtime, &mut report, true) {
                Ok(Some(frame)) => {
                    // A stop takes effect between fields, so the last field is delivered whole.
                    if stop.is_stopped() && current.as_ref() != Some(&frame.key) {
                        report.stopped_early = true;
                        return Ok(report);
                    }
                    if self.skip.contains(&frame.key) {
                        continue;
                    }
                    current = Some(frame.key.clone());
                    if fields.insert(frame.key.clone()) {
                        report.fields += 1;
                    }
                    report.send(out, frame)?;
                }
                Ok(None) => {}
                Err(Retry::Unfinished(e)) => self.problem(&mut report, &p, "unreadable", e),
                Err(Retry::ZeroTail) => {}
            }
        }
        Ok(report)
    }
}

impl Source for FolderSource {
    fn plan(&self) -> &AcquisitionPlan {
        &self.plan
    }

    fn observe(&mut self, problems: Sender<SourceProblem>) {
        self.problems = Problems::new(problems);
    }

    fn paced(&self) -> bool {
        self.cfg.watch || self.cfg.speed != Speed::Max
    }

    fn expected_fields(&self) -> Option<u64> {
        if self.cfg.watch {
            return None;
        }
        let mut files = Vec::new();
        walk(&self.cfg.path, &mut files);
        let keys: HashSet<FieldKey> = files
            .iter()
            .filter_map(|p| {
                Some(layout::with_folders(
                    self.cfg.layout,
                    self.layout.parse(&file_name(p)).ok()?,
                    p,
                ))
            })
            .filter(|p| p.plane == 0)
            .map(|p| FieldKey {
                plate: self.plan.plate.clone(),
                well: p.well,
                field: p.field,
                timepoint: p.timepoint,
            })
            .filter(|k| !self.skip.contains(k))
            .collect();
        Some(keys.len() as u64)
    }

    fn skip(&mut self, done: &[FieldKey]) {
        self.skip.extend(done.iter().cloned());
    }

    fn run(&mut self, out: &Sender<Frame>, stop: &StopToken) -> Result<SourceReport, SourceError> {
        if self.cfg.watch {
            self.watch_loop(out, stop)
        } else {
            self.replay(out, stop)
        }
    }
}
