//! The two pieces of deadline scheduling that the per-cell batcher and the daemon's field
//! scheduler share, so that "earliest deadline first" and "how long will this take" are decided
//! one way: the order of work by deadline ([`Edf`]) and a cost learnt from recent run times
//! ([`Ewma`]).

use std::time::{Duration, Instant};

/// The order of work: earliest deadline first, then first come (a sequence number), so that
/// work with equal deadlines keeps its arrival order and the order is total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Edf {
    pub deadline: Instant,
    pub seq: u64,
}

/// A cost predicted from recent run times: an exponentially weighted mean with weight 1/8 on
/// the newest run, so one slow run moves the prediction by an eighth of the difference and a
/// lasting change is followed within a few runs. Before the first run it predicts nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Ewma {
    mean: Option<Duration>,
    runs: u64,
}

impl Ewma {
    /// Starts from a prior instead of nothing (the batcher's first batch must not wait for a
    /// deadline it cannot predict).
    pub fn with_prior(prior: Duration) -> Self {
        Self {
            mean: Some(prior),
            runs: 0,
        }
    }

    /// Adds a measured run.
    pub fn observe(&mut self, took: Duration) {
        self.runs += 1;
        self.mean = Some(match self.mean {
            Some(m) if self.runs > 1 => (m * 7 + took) / 8,
            _ => took,
        });
    }

    /// The predicted cost; `None` before any run (and without a prior).
    pub fn predict(&self) -> Option<Duration> {
        self.mean
    }

    /// Runs observed so far.
    pub fn runs(&self) -> u64 {
        self.runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edf_orders_by_deadline_then_arrival() {
        let t0 = Instant::now();
        let a = Edf {
            deadline: t0 + Duration::from_millis(20),
            seq: 0,
        };
        let b = Edf {
            deadline: t0 + Duration::from_millis(10),
            seq: 1,
        };
        let c = Edf {
            deadline: t0 + Duration::from_millis(10),
            seq: 2,
        };
        let mut v = vec![a, c, b];
        v.sort();
        assert_eq!(v, vec![b, c, a]);
    }

    #[test]
    fn ewma_follows_runs_and_knows_nothing_before_them() {
        let mut e = Ewma::default();
        assert_eq!(e.predict(), None);
        e.observe(Duration::from_millis(80));
        assert_eq!(e.predict(), Some(Duration::from_millis(80)));
        e.observe(Duration::from_millis(160));
        assert_eq!(e.predict(), Some(Duration::from_millis(90)));
        for _ in 0..64 {
            e.observe(Duration::from_millis(160));
        }
        let p = e.predict().unwrap().as_millis();
        assert!((159..=160).contains(&p), "{p}");
        assert_eq!(e.runs(), 66);
    }

    #[test]
    fn a_prior_is_replaced_by_the_first_run() {
        let mut e = Ewma::with_prior(Duration::from_millis(1));
        assert_eq!(e.predict(), Some(Duration::from_millis(1)));
        e.observe(Duration::from_millis(40));
        assert_eq!(e.predict(), Some(Duration::from_millis(40)));
    }
}
