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
//!
//! With covariates (`localization.adjust_for_morphology`), morphology is taken out first: a
//! perturbation that only changes the cells' shape (bigger
//! nuclei, smaller cells, a brighter ER) moves every protein's fractions with it. Each feature is
//! regressed, over the control cells, on per-cell covariates the stage hands in (log areas, log
//! landmark intensities), and fields are compared by their mean residuals, each feature scaled by
//! the controls' residual standard deviation; so what is scored is where the protein sits
//! beyond what the cells' morphology predicts. With no covariates it is the plain profile.

use std::collections::{BTreeMap, BTreeSet};

use liveomics_adapters::model::WellId;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One field's cells, summed: the count, the mean of each feature and of each covariate (the
/// intercept first), and for control fields the cross products a regression needs.
#[derive(Debug, Clone)]
struct FieldMean {
    well: WellId,
    cells: f64,
    mean: Vec<f64>,
    x_mean: Vec<f64>,
    /// Σ x xᵀ (K × K), Σ x y (K × F) and Σ y² (F), over the field's cells.
    xx: Vec<f64>,
    xy: Vec<f64>,
    yy: Vec<f64>,
}

/// A well's score for one protein, after the fields seen so far.
#[derive(Debug, Clone, PartialEq)]
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

/// The fields seen so far of one protein on one plate.
#[derive(Debug, Clone)]
pub struct ShiftPool {
    features: usize,
    /// Covariates per cell, the intercept not counted.
    covariates: usize,
    controls: BTreeSet<WellId>,
    fields: BTreeMap<(WellId, u32, u32), FieldMean>,
}

impl ShiftPool {
    pub fn new(features: usize, covariates: usize, controls: BTreeSet<WellId>) -> Self {
        Self {
            features,
            covariates,
            controls,
            fields: BTreeMap::new(),
        }
    }

    /// Adds (or replaces: a field processed again) one field's per-cell profiles, with each
    /// cell's covariates. Cells with a NaN feature or covariate (no signal) are left out.
    pub fn add(&mut self, well: WellId, field: u32, timepoint: u32, cells: &[Vec<f32>], covariates: &[Vec<f64>]) {
        let (f, k) = (self.features, self.covariates + 1);
        let mut m = FieldMean {
            well,
            cells: 0.0,
            mean: vec![0.0; f],
            x_mean: vec![0.0; k],
            xx: vec![0.0; k * k],
            xy: vec![0.0; k * f],
            yy: vec![0.0; f],
        };
        let mut x = vec![1.0; k];
        for (c, cov) in cells.iter().zip(covariates) {
            if c.len() < f
                || cov.len() != k - 1
                || c[..f].iter().any(|v| !v.is_finite())
                || cov.iter().any(|v| !v.is_finite())
            {
                continue;
            }
            x[1..].copy_from_slice(cov);
            m.cells += 1.0;
            for i in 0..k {
                m.x_mean[i] += x[i];
                for j in 0..k {
                    m.xx[i * k + j] += x[i] * x[j];
                }
                for (d, &y) in c[..f].iter().enumerate() {
                    m.xy[i * f + d] += x[i] * f64::from(y);
                }
            }
            for (d, &y) in c[..f].iter().enumerate() {
                let y = f64::from(y);
                m.mean[d] += y;
                m.yy[d] += y * y;
            }
        }
        if m.cells == 0.0 {
            return;
        }
        m.mean.iter_mut().for_each(|v| *v /= m.cells);
        m.x_mean.iter_mut().for_each(|v| *v /= m.cells);
        self.fields.insert((well, field, timepoint), m);
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
        let (beta, scale) = self.fit(&controls);
        let residual = |m: &FieldMean| -> Vec<f64> {
            let k = self.covariates + 1;
            (0..f)
                .map(|d| m.mean[d] - (0..k).map(|i| m.x_mean[i] * beta[i * f + d]).sum::<f64>())
                .collect()
        };
        let own_r: Vec<Vec<f64>> = own.iter().map(|m| residual(m)).collect();
        let ctl_r: Vec<Vec<f64>> = controls.iter().map(|m| residual(m)).collect();
        let own_sums = Sums::of(&own_r, f);
        let all = Sums::of(&ctl_r, f);
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
                pseudo.add(&ctl_r[i]);
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
            profile: f32s(Sums::of(&own.iter().map(|m| m.mean.clone()).collect::<Vec<_>>(), f).mean()),
            control: f32s(Sums::of(&controls.iter().map(|m| m.mean.clone()).collect::<Vec<_>>(), f).mean()),
            distance: observed,
            z,
            // Only C(J, k) distinct pseudo-wells exist: a well beyond all of them is as unusual
            // as one in C(J, k) + 1, however many draws were made.
            p: ((1 + hits) as f64 / (1 + permutations) as f64).max(1.0 / (1.0 + choose(controls.len(), k))),
        })
    }

    /// The regression of each feature on the covariates over the cells of `controls`:
    /// coefficients (K × F, the intercept first) and each feature's residual standard deviation.
    fn fit(&self, controls: &[&FieldMean]) -> (Vec<f64>, Vec<f64>) {
        let (f, k) = (self.features, self.covariates + 1);
        let (mut n, mut xx, mut xy, mut yy) = (0.0, vec![0.0; k * k], vec![0.0; k * f], vec![0.0; f]);
        for m in controls {
            n += m.cells;
            xx.iter_mut().zip(&m.xx).for_each(|(a, b)| *a += b);
            xy.iter_mut().zip(&m.xy).for_each(|(a, b)| *a += b);
            yy.iter_mut().zip(&m.yy).for_each(|(a, b)| *a += b);
        }
        // A slight ridge keeps collinear covariates (or too few cells) solvable.
        let trace: f64 = (0..k).map(|i| xx[i * k + i]).sum();
        let mut a = xx.clone();
        for i in 1..k {
            a[i * k + i] += 1e-9 * trace.max(1.0);
        }
        let beta = solve(&a, &xy, k, f);
        let scale = (0..f)
            .map(|d| {
                // Residual sum of squares: Σy² − 2βᵀΣxy + βᵀΣxxβ.
                let b: Vec<f64> = (0..k).map(|i| beta[i * f + d]).collect();
                let bxy: f64 = (0..k).map(|i| b[i] * xy[i * f + d]).sum();
                let bxxb: f64 = (0..k)
                    .map(|i| (0..k).map(|j| b[i] * xx[i * k + j] * b[j]).sum::<f64>())
                    .sum();
                let rss = (yy[d] - 2.0 * bxy + bxxb).max(0.0);
                if n > k as f64 {
                    (rss / (n - k as f64)).sqrt()
                } else {
                    0.0
                }
            })
            .collect();
        (beta, scale)
    }
}

/// Solves `a x = b` for `x` (`a` K × K, `b` K × F, row-major) by Gaussian elimination with
/// partial pivoting; a singular pivot leaves that coefficient at 0.
fn solve(a: &[f64], b: &[f64], k: usize, f: usize) -> Vec<f64> {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    for col in 0..k {
        let pivot = (col..k)
            .max_by(|&i, &j| a[i * k + col].abs().total_cmp(&a[j * k + col].abs()))
            .unwrap_or(col);
        for j in 0..k {
            a.swap(col * k + j, pivot * k + j);
        }
        for d in 0..f {
            b.swap(col * f + d, pivot * f + d);
        }
        let p = a[col * k + col];
        if p.abs() < 1e-300 {
            continue;
        }
        for row in 0..k {
            if row == col {
                continue;
            }
            let factor = a[row * k + col] / p;
            if factor == 0.0 {
                continue;
            }
            for j in 0..k {
                a[row * k + j] -= factor * a[col * k + j];
            }
            for d in 0..f {
                b[row * f + d] -= factor * b[col * f + d];
            }
        }
    }
    let mut x = vec![0.0; k * f];
    for i in 0..k {
        let p = a[i * k + i];
        if p.abs() >= 1e-300 {
            for d in 0..f {
                x[i * f + d] = b[i * f + d] / p;
            }
        }
    }
    x
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

    fn of(fields: &[Vec<f64>], features: usize) -> Self {
        let mut s = Self::new(features);
        for m in fields {
            s.add(m);
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

    fn normal(rng: &mut ChaCha8Rng) -> f64 {
        Distribution::<f64>::sample(&StandardNormal, rng)
    }

    /// Cells of one field: a morphology covariate around `size`, feature 0 following it
    /// (0.3 per unit) around `centre`, feature 1 pure noise, with a per-field offset (the field
    /// effect a cell-level test would mistake for a shift).
    fn cells(rng: &mut ChaCha8Rng, centre: f64, size: f64) -> (Vec<Vec<f32>>, Vec<Vec<f64>>) {
        let offset = 0.05 * normal(rng);
        (0..50)
            .map(|_| {
                let x = size + 0.5 * normal(rng);
                let y = centre + offset + 0.3 * x + 0.2 * normal(rng);
                (vec![y as f32, (0.5 + 0.2 * normal(rng)) as f32], vec![x])
            })
            .unzip()
    }

    /// A plate: 6 controls, 40 control-like wells, 10 wells whose profile moved, 10 wells whose
    /// cells only changed size; 3 fields each. With `adjust`, scored on morphology residuals.
    fn plate(adjust: bool) -> ShiftPool {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let controls: BTreeSet<WellId> = (0..6).map(well).collect();
        let mut pool = ShiftPool::new(2, usize::from(adjust), controls);
        for (wells, centre, size) in [
            (0..6, 0.5, 0.0),
            (10..50, 0.5, 0.0),
            (50..60, 0.8, 0.0),
            (60..70, 0.5, 1.0),
        ] {
            for w in wells {
                for f in 0..3 {
                    let (y, x) = cells(&mut rng, centre, size);
                    let x = if adjust { x } else { vec![Vec::new(); y.len()] };
                    pool.add(well(w), f, 0, &y, &x);
                }
            }
        }
        pool
    }

    #[test]
    fn control_like_wells_are_not_called_and_shifted_ones_are() {
        for adjust in [false, true] {
            let pool = plate(adjust);
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
    }

    #[test]
    fn a_change_of_morphology_alone_is_not_a_relocalization_once_adjusted() {
        let (plain, adjusted) = (plate(false), plate(true));
        for w in 60..70 {
            let (p, a) = (
                plain.score(well(w), 999, 6, 1).unwrap(),
                adjusted.score(well(w), 999, 6, 1).unwrap(),
            );
            assert!(p.z > 10.0, "unadjusted, bigger cells look moved: {p:?}");
            assert!(a.z < 3.0, "adjusted, they do not: {a:?}");
            // The profile reported is the raw one either way.
            assert_eq!(p.profile, a.profile);
        }
    }

    #[test]
    fn no_score_without_two_control_fields_and_nan_features_are_skipped() {
        let controls: BTreeSet<WellId> = [well(0)].into();
        let mut pool = ShiftPool::new(2, 0, controls);
        let none = |n: usize| vec![Vec::new(); n];
        pool.add(well(1), 0, 0, &[vec![0.1, 0.2]], &none(1));
        pool.add(well(0), 0, 0, &[vec![0.1, 0.3]], &none(1));
        assert!(pool.score(well(1), 99, 2, 1).is_none());
        pool.add(
            well(0),
            1,
            0,
            &[vec![0.2, 0.1], vec![0.3, f32::NAN], vec![0.25, 0.2]],
            &none(3),
        );
        let s = pool.score(well(1), 99, 2, 1).unwrap();
        assert!(s.distance.is_finite());
        // A field processed again replaces itself; a field of cells without signal is no field.
        pool.add(well(1), 0, 0, &[vec![0.2, 0.2]], &none(1));
        pool.add(well(1), 1, 0, &[vec![f32::NAN, f32::NAN]], &none(1));
        assert_eq!(pool.score(well(1), 99, 2, 1).unwrap().fields, 1);
    }
}
