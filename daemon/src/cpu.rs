//! Where a run's processor time went: per part of the pipeline (each stage, each sink, the
//! source, assembly, the tracker) the core-seconds its threads spent, their wall time and the
//! time they waited on a queue; the worker pools (rayon, ONNX Runtime) as what the process spent
//! beyond those threads; and the pipeline's efficiency, busy core-seconds over wall × cores. A
//! user sees at once whether the machine or the pipeline is the limit.
//!
//! Thread time comes from Linux's `/proc/thread-self/schedstat` (nanoseconds on a CPU), process
//! time from `/proc/self/stat` (clock ticks, 100 per second); elsewhere the account is empty.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

/// Linux's `USER_HZ`, the unit of `/proc/*/stat` times: 100 on every architecture it runs on.
const TICKS_PER_SECOND: u64 = 100;

/// Time the calling thread has spent on a CPU.
pub fn thread_time() -> Option<Duration> {
    if let Ok(s) = std::fs::read_to_string("/proc/thread-self/schedstat") {
        if let Some(ns) = s.split_whitespace().next().and_then(|v| v.parse().ok()) {
            return Some(Duration::from_nanos(ns));
        }
    }
    stat_time("/proc/thread-self/stat")
}

/// Time the whole process (every thread, live or gone) has spent on a CPU.
pub fn process_time() -> Option<Duration> {
    stat_time("/proc/self/stat")
}

/// `utime + stime` of a `stat` file; the name (field 2) may hold spaces, so fields are counted
/// after its closing parenthesis.
fn stat_time(path: &str) -> Option<Duration> {
    let s = std::fs::read_to_string(path).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 1000 / TICKS_PER_SECOND))
}

/// One part's totals.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Part {
    /// Time its own threads spent on a CPU.
    pub cpu: Duration,
    /// Time its threads existed (summed over threads).
    pub wall: Duration,
    /// Of that, time spent waiting to hand work on (a full queue) or for work (an empty one).
    pub blocked: Duration,
}

/// The account of one run, filled by its threads as they go.
#[derive(Debug, Default)]
pub struct Account {
    parts: Mutex<BTreeMap<String, Part>>,
}

impl Account {
    pub fn add(&self, part: &str, cpu: Duration, wall: Duration, blocked: Duration) {
        let mut parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        let p = parts.entry(part.to_string()).or_default();
        p.cpu += cpu;
        p.wall += wall;
        p.blocked += blocked;
        crate::telemetry::CpuSpent { part, cpu }.emit();
    }

    pub fn parts(&self) -> BTreeMap<String, Part> {
        self.parts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The account of a finished run, as the summary prints it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub parts: BTreeMap<String, Part>,
    /// The process's CPU time during the run, every thread included.
    pub process: Duration,
    pub wall: Duration,
    pub cores: usize,
}

impl Report {
    /// What the process spent on threads that are no part's own: the rayon pool of the kernels
    /// and ONNX Runtime's intra-op pools, working for the stages.
    pub fn pools(&self) -> Duration {
        let own: Duration = self.parts.values().map(|p| p.cpu).sum();
        self.process.saturating_sub(own)
    }

    /// Busy core-seconds over what the cores allowed in the run's wall time.
    pub fn efficiency(&self) -> f64 {
        let available = self.wall.as_secs_f64() * self.cores as f64;
        if available > 0.0 {
            self.process.as_secs_f64() / available
        } else {
            0.0
        }
    }
}

/// A thread's part in the account: its CPU time and life from `start` to `finish`, less what it
/// handed to other parts with `lap` (a worker's stages), with the time it says it waited.
#[derive(Debug)]
pub struct Meter {
    t0: std::time::Instant,
    mark: Option<Duration>,
    own: Duration,
    blocked: Duration,
}

impl Meter {
    pub fn start() -> Self {
        Self {
            t0: std::time::Instant::now(),
            mark: thread_time(),
            own: Duration::ZERO,
            blocked: Duration::ZERO,
        }
    }

    /// Adds time this thread waited on a queue.
    pub fn blocked(&mut self, d: Duration) {
        self.blocked += d;
    }

    /// This thread's CPU time since the last mark, for the caller to give to another part.
    pub fn lap(&mut self) -> Duration {
        let now = thread_time();
        let d = match (self.mark, now) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => Duration::ZERO,
        };
        self.mark = now;
        d
    }

    /// Keeps this thread's CPU time since the last mark as its own.
    pub fn keep(&mut self) {
        let d = self.lap();
        self.own += d;
    }

    pub fn finish(mut self, account: &Account, part: &str) {
        self.keep();
        account.add(part, self.own, self.t0.elapsed(), self.blocked);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_thread_is_counted_and_a_sleeping_one_is_not() {
        let Some(_) = thread_time() else {
            eprintln!("skipped: no /proc/thread-self (not Linux)");
            return;
        };
        let account = Account::default();
        std::thread::scope(|s| {
            s.spawn(|| {
                let m = Meter::start();
                // A fixed amount of work (about 0.25 s of one core), not a wall-clock span: on a
                // loaded machine a span holds less CPU time, the work does not.
                let mut x = 0u64;
                for _ in 0..200_000_000u64 {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
                m.finish(&account, "busy");
            });
            s.spawn(|| {
                let mut m = Meter::start();
                std::thread::sleep(Duration::from_millis(200));
                m.blocked(Duration::from_millis(200));
                m.finish(&account, "idle");
            });
        });
        let parts = account.parts();
        assert!(parts["busy"].cpu >= Duration::from_millis(100), "{parts:?}");
        assert!(parts["idle"].cpu < Duration::from_millis(50), "{parts:?}");
        assert_eq!(parts["idle"].blocked, Duration::from_millis(200));
        let report = Report {
            parts,
            process: Duration::from_millis(1000),
            wall: Duration::from_millis(1000),
            cores: 2,
        };
        assert!((report.efficiency() - 0.5).abs() < 1e-9);
        assert!(report.pools() <= Duration::from_millis(850));
        assert!(process_time().is_some());
    }
}
