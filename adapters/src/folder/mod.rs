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

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::Sender;
use serde::{Deserialize, Serialize};

use self::layout::{Layout, LayoutKind, NameError, Parsed};
use crate::model::{AcquisitionPlan, FieldKey, Frame, Pixels, PlateFormat};
use crate::source::{wait_until, Problems, Source, SourceError, SourceProblem, SourceReport, StopToken};
use crate::tiff_io::{read_image, Plane};
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
    /// Size at which decoding last failed: retried only once the file changes.
    failed_at: Option<u64>,
    reported_stuck: bool,
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
    /// `Err(())`: could not decode; the caller retries when the file changes.
    fn read(&self, path: &Path, mtime: SystemTime, report: &mut SourceReport) -> Result<Option<Frame>, String> {
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
        let img = read_image(path).map_err(|e| {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                s.push_str(&format!(": {c}"));
                src = c.source();
            }
            s
        })?;
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
        let mut done: HashSet<PathBuf> = HashSet::new();
        let mut fields: HashSet<FieldKey> = HashSet::new();
        let mut last_activity = Instant::now();
        let stable = Duration::from_millis(self.cfg.stable_ms);
        let stuck = Duration::from_millis(self.cfg.stuck_timeout_ms);
        let idle = Duration::from_millis(self.cfg.idle_exit_ms);
        let mut initial = Vec::new();
        walk(&self.cfg.path, &mut initial);
        let touch = |pending: &mut BTreeMap<PathBuf, Candidate>, p: PathBuf, closed: bool| {
            let Ok(md) = std::fs::metadata(&p) else { return };
            if !md.is_file() {
                return;
            }
            let (size, mtime) = (md.len(), md.modified().unwrap_or(SystemTime::UNIX_EPOCH));
            let now = Instant::now();
            let c = pending.entry(p).or_insert(Candidate {
                size,
                mtime,
                changed_at: now,
                first_seen: now,
                closed: false,
                failed_at: None,
                reported_stuck: false,
            });
            if c.size != size || c.mtime != mtime {
                c.size = size;
                c.mtime = mtime;
                c.changed_at = now;
                c.closed = false;
            }
            c.closed |= closed;
        };
        for p in initial {
            touch(&mut pending, p, false);
        }
        while !stop.is_stopped() {
            if overflow.swap(false, std::sync::atomic::Ordering::Relaxed) {
                let mut all = Vec::new();
                walk(&self.cfg.path, &mut all);
                for p in all.into_iter().filter(|p| !done.contains(p)) {
                    touch(&mut pending, p, false);
                }
                last_activity = Instant::now();
            }
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
                    if !hidden && !done.contains(&p) {
                        touch(&mut pending, p, closed);
                        last_activity = Instant::now();
                    }
                }
            }
            let paths: Vec<PathBuf> = pending.keys().cloned().collect();
            for p in paths {
                // Polling catches size changes that produced no event (network shares).
                touch(&mut pending, p.clone(), false);
                let Some(c) = pending.get_mut(&p) else { continue };
                let ready = c.size > 0 && (c.closed || c.changed_at.elapsed() >= stable) && c.failed_at != Some(c.size);
                if !ready {
                    if c.first_seen.elapsed() > stuck {
                        if c.failed_at == Some(c.size) || c.changed_at.elapsed() > stuck {
                            // Unchanged since it failed to decode (or empty) for the whole timeout.
                            let detail = format!(
                                "{}: unreadable or empty, unchanged for {} s (truncated or corrupt)",
                                file_name(&p),
                                stuck.as_secs_f64()
                            );
                            pending.remove(&p);
                            self.problem(&mut report, &p, "unreadable", detail);
                            done.insert(p);
                        } else if !c.reported_stuck {
                            c.reported_stuck = true;
                            let detail =
                                format!("{}: still being written after {} s", file_name(&p), stuck.as_secs_f64());
                            self.problem(&mut report, &p, "stuck", detail);
                        }
                    }
                    continue;
                }
                let mtime = c.mtime;
                match self.read(&p, mtime, &mut report) {
                    Ok(Some(frame)) => {
                        pending.remove(&p);
                        done.insert(p);
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
                        done.insert(p);
                    }
                    Err(e) => {
                        if let Some(c) = pending.get_mut(&p) {
                            c.failed_at = Some(c.size);
                            if c.first_seen.elapsed() > stuck {
                                let name = file_name(&p);
                                self.problem(&mut report, &p, "unreadable", format!("{name}: {e}"));
                                pending.remove(&p);
                                done.insert(p);
                            }
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
            match self.read(&p, mtime, &mut report) {
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
                Err(e) => self.problem(&mut report, &p, "unreadable", format!("{}: {e}", file_name(&p))),
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
