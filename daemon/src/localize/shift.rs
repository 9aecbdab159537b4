//! The per-well relocalization score: how far a well's localization profiles are from the
//! control wells', against a permutation null over fields.
//!
//! Fields, not cells, are the unit: cells of one field share its staining, focus and density, so
//! a cell-level test would call every well different from every other. A well's profile is the
//! mean of its fields' mean profiles; the distance between two sets of fields is the squared
//! Euclidean distance of their profiles with each feature scaled by its cell-to-cell standard
//! deviation in the controls. The null is the distance of a pseudo-well, as many control fields
//! drawn at random, from the remaining controls: what a well that is a control looks like with
//! this many fields. `z` is how many null standard deviations the well's distance lies above the
//! null's mean (it grows with the size of the shift, so strong relocalizations rank above weak
//! ones), `p` the share of the null at least as far. A control well is scored against the other
//! controls, which is how the null is checked.

use std::collections::{BTreeMap, BTreeSet};

use liveomics_adapters::model::WellId;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Per feature over a field's cells: count, sum and sum of squares.
type Moments = (Vec<f64>, Vec<f64>, Vec<f64>);

/// One field's mean profile.
#[derive(Debug, Clone)]
struct FieldMean {
    well: WellId,
    mean: Vec<f64>,
}

/// A well's score for one protein, after the fields seen so far.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Shift {
    /// Fields of the well and of the controls it was compared with.
    pub fields: usize,
    pub control_fields: usize,
    /// The well's profile and the controls', feature by feature (`loc` features).
    pub profile: Vec<f32>,
    pub control: Vec<f32>,
    /// Scaled squared distance between the two.
    pub distance: f64,
    /// `(distance − null mean) / null sd`: the closed-loop metric `loc.{protein}.shift`.
    pub z: f64,
    /// Share of the null at least as far: `(1 + k) / (1 + draws)`, and never below one in the
    /// number of distinct pseudo-wells plus one.
    pub p: f64,
}

/// The fields seen so far of one protein on one plate, and the controls' cell statistics.
#[derive(Debug, Clone)]
pub struct ShiftPool {
    features: usize,
    controls: BTreeSet<WellId>,
    fields: BTreeMap<(WellId, u32, u32), FieldMean>,
    /// Over the control cells: count, sum and sum of squares per feature.
    cells: BTreeMap<(WellId, u32, u32), Moments>,
}

impl ShiftPool {
    pub fn new(features: usize, controls: BTreeSet<WellId>) -> Self {
        Self {
            features,
            controls,
            fields: BTreeMap::new(),
            cells: BTreeMap::new(),
        }
    }

    /// Adds (or replaces: a field processed again) one field's per-cell profiles. A feature that
    /// is NaN in every cell of the field stays NaN in its mean and is left out of the distance.
    pub fn add(&mut self, well: WellId, field: u32, timepoint: u32, cells: &[Vec<f32>]) {
        let f = self.features;
        let (mut n, mut s, mut q) = (vec![0f64; f], vec![0f64; f], vec![0f64; f]);
        for c in cells {
            for d in 0..f.min(c.len()) {
                let v = f64::from(c[d]);
                if v.is_finite() {
                    n[d] += 1.0;
                    s[d] += v;
                    q[d] += v * v;
                }
            }
        }
        if n.iter().all(|&k| k == 0.0) {
            return;
        }
        let mean = (0..f)
            .map(|d| if n[d] > 0.0 { s[d] / n[d] } else { f64::NAN })
            .collect();
        let key = (well, field, timepoint);
        self.fields.insert(key, FieldMean { well, mean });
        if self.controls.contains(&well) {
            self.cells.insert(key, (n, s, q));
        }
    }

    /// Wells with at least one field in the pool.
    pub fn wells(&self) -> BTreeSet<WellId> {
        self.fields.values().map(|m| m.well).collect()
    }

    /// Whether `well` is one of the controls.
    pub fn is_control(&self, well: WellId) -> bool {
        self.controls.contains(&well)
    }

    /// The well's score now, or `None` until it has a field and there are `min_controls` (at
    /// least 2) control fields outside it to compare with. `permutations` draws of the null,
    /// from `seed`.
    pub fn score(&self, well: WellId, permutations: usize, min_controls: usize, seed: u64) -> Option<Shift> {
        let f = self.features;
        let own: Vec<&FieldMean> = self.fields.values().filter(|m| m.well == well).collect();
        let controls: Vec<&FieldMean> = self
            .fields
            .values()
            .filter(|m| m.well != well && self.controls.contains(&m.well))
            .collect();
        if own.is_empty() || controls.len() < min_controls.max(2) {
            return None;
        }
        let scale = self.scale(well);
        let own_sums = Sums::of(&own, f);
        let all = Sums::of(&controls, f);
        let observed = own_sums.distance(&all, &scale);
        // The null: a pseudo-well of as many control fields (one fewer than the controls at
        // most) against the rest, drawn at random. The rest's sums are the controls' less the
        // pseudo-well's, so a draw costs the pseudo-well's fields only.
        let k = own.len().min(controls.len() - 1);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut order: Vec<usize> = (0..controls.len()).collect();
        let mut null = Vec::with_capacity(permutations);
        let mut pseudo = Sums::new(f);
        for _ in 0..permutations {
            // The first k after a partial Fisher-Yates shuffle are a uniform draw of k fields.
            for i in 0..k {
                let j = rng.random_range(i..order.len());
                order.swap(i, j);
            }
            pseudo.clear();
            for &i in &order[..k] {
                pseudo.add(&controls[i].mean);
            }
            null.push(pseudo.distance(&all.less(&pseudo), &scale));
        }
        let hits = null.iter().filter(|&&t| t >= observed).count();
        let m = null.iter().sum::<f64>() / null.len().max(1) as f64;
        let var = null.iter().map(|t| (t - m).powi(2)).sum::<f64>() / null.len().max(2).saturating_sub(1) as f64;
        let sd = var.sqrt();
        let z = if sd > 0.0 { (observed - m) / sd } else { 0.0 };
        let f32s = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
        Some(Shift {
            fields: own.len(),
            control_fields: controls.len(),
            profile: f32s(own_sums.mean()),
            control: f32s(all.mean()),
            distance: observed,
            z,
            // Only C(J, k) distinct pseudo-wells exist: a well beyond all of them is as unusual
            // as one in C(J, k) + 1, however many draws were made.
            p: ((1 + hits) as f64 / (1 + permutations) as f64).max(1.0 / (1.0 + choose(controls.len(), k))),
        })
    }

    /// Cell-to-cell standard deviation of each feature over the control cells outside `well`.
    fn scale(&self, well: WellId) -> Vec<f64> {
        let f = self.features;
        let (mut n, mut s, mut q) = (vec![0f64; f], vec![0f64; f], vec![0f64; f]);
        for (key, (cn, cs, cq)) in &self.cells {
            if key.0 == well {
                continue;
            }
            for d in 0..f {
                n[d] += cn[d];
                s[d] += cs[d];
                q[d] += cq[d];
            }
        }
        (0..f)
            .map(|d| {
                if n[d] < 2.0 {
                    return 0.0;
                }
                let m = s[d] / n[d];
                ((q[d] / n[d] - m * m).max(0.0)).sqrt()
            })
            .collect()
    }
}

/// `n` choose `k`, as a float (large values only need to be large).
fn choose(n: usize, k: usize) -> f64 {
    (0..k.min(n)).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
}

/// Per feature over a set of fields: the sum of their means and how many were finite.
#[derive(Debug, Clone)]
struct Sums {
    sum: Vec<f64>,
    count: Vec<f64>,
}

impl Sums {
    fn new(features: usize) -> Self {
        Self {
            sum: vec![0.0; features],
            count: vec![0.0; features],
        }
    }

    fn of(fields: &[&FieldMean], features: usize) -> Self {
        let mut s = Self::new(features);
        for m in fields {
            s.add(&m.mean);
        }
        s
    }

    fn clear(&mut self) {
        self.sum.fill(0.0);
        self.count.fill(0.0);
    }

    /// Adds one field's means (NaN features skipped).
    fn add(&mut self, mean: &[f64]) {
        for (d, &v) in mean.iter().enumerate().take(self.sum.len()) {
            if v.is_finite() {
                self.sum[d] += v;
                self.count[d] += 1.0;
            }
        }
    }

    /// These sums without `other`'s (a subset of them).
    fn less(&self, other: &Sums) -> Sums {
        Sums {
            sum: self.sum.iter().zip(&other.sum).map(|(a, b)| a - b).collect(),
            count: self.count.iter().zip(&other.count).map(|(a, b)| a - b).collect(),
        }
    }

    /// Mean over the fields of their means, NaN where no field had the feature.
    fn mean(&self) -> Vec<f64> {
        self.sum
            .iter()
            .zip(&self.count)
            .map(|(s, &n)| if n > 0.0 { s / n } else { f64::NAN })
            .collect()
    }

    /// Squared distance of the two means, each feature divided by its scale; features missing
    /// on either side or without a scale are left out.
    fn distance(&self, other: &Sums, scale: &[f64]) -> f64 {
        (0..self.sum.len())
            .filter(|&d| self.count[d] > 0.0 && other.count[d] > 0.0 && scale[d] > 0.0)
            .map(|d| ((self.sum[d] / self.count[d] - other.sum[d] / other.count[d]) / scale[d]).powi(2))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_distr::{Distribution, StandardNormal};

    fn well(column: u16) -> WellId {
        WellId { row: 1, column }
    }

    /// Cells of one field: feature 0 around `centre`, feature 1 pure noise, with a per-field
    /// offset (the field effect a cell-level test would mistake for a shift).
    fn cells(rng: &mut ChaCha8Rng, centre: f64) -> Vec<Vec<f32>> {
        let offset = 0.05 * Distribution::<f64>::sample(&StandardNormal, &mut *rng);
        (0..50)
            .map(|_| {
                let a: f64 = StandardNormal.sample(&mut *rng);
                let b: f64 = StandardNormal.sample(&mut *rng);
                vec![(centre + offset + 0.2 * a) as f32, (0.5 + 0.2 * b) as f32]
            })
            .collect()
    }

    #[test]
    fn control_like_wells_are_not_called_and_shifted_ones_are() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let controls: BTreeSet<WellId> = (0..6).map(well).collect();
        let mut pool = ShiftPool::new(2, controls.clone());
        for &c in &controls {
            for f in 0..3 {
                pool.add(c, f, 0, &cells(&mut rng, 0.5));
            }
        }
        // 40 control-like wells that are not declared controls, and 10 shifted ones.
        for w in 10..50 {
            for f in 0..3 {
                pool.add(well(w), f, 0, &cells(&mut rng, 0.5));
            }
        }
        for w in 50..60 {
            for f in 0..3 {
                pool.add(well(w), f, 0, &cells(&mut rng, 0.8));
            }
        }
        let score = |w: u16| pool.score(well(w), 999, 6, u64::from(w)).unwrap();
        let false_calls = (10..50).filter(|&w| score(w).p < 0.05).count();
        assert!(false_calls <= 5, "{false_calls} of 40 control-like wells at p < 0.05");
        for w in 50..60 {
            let s = score(w);
            assert!(s.p < 0.01 && s.z > 3.0, "shifted well {w}: {s:?}");
            assert_eq!((s.fields, s.control_fields), (3, 18));
        }
        // A control is scored against the other controls only.
        assert_eq!(score(0).control_fields, 15);
    }

    #[test]
    fn no_score_without_two_control_fields_and_nan_features_are_skipped() {
        let controls: BTreeSet<WellId> = [well(0)].into();
        let mut pool = ShiftPool::new(2, controls);
        pool.add(well(1), 0, 0, &[vec![0.1, f32::NAN]]);
        pool.add(well(0), 0, 0, &[vec![0.1, f32::NAN]]);
        assert!(pool.score(well(1), 99, 2, 1).is_none());
        pool.add(well(0), 1, 0, &[vec![0.2, f32::NAN], vec![0.3, f32::NAN]]);
        let s = pool.score(well(1), 99, 2, 1).unwrap();
        assert!(s.distance.is_finite() && s.profile[1].is_nan());
        // A field processed again replaces itself.
        pool.add(well(1), 0, 0, &[vec![0.2, f32::NAN]]);
        assert_eq!(pool.score(well(1), 99, 2, 1).unwrap().fields, 1);
    }
}
