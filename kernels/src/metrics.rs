//! Instance-segmentation accuracy against ground truth, the StarDist convention: objects match
//! one-to-one when their intersection over union exceeds τ, and AP(τ) = TP / (TP + FP + FN).
//! For τ ≥ 0.5 a match is unique on both sides (two objects cannot both overlap a third by more
//! than half of their union), so greedy matching is exact and no assignment solver is needed.

use std::collections::HashMap;

use crate::KernelError;

/// Matching counts at one IoU threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Matching {
    pub tau: f64,
    pub tp: usize,
    pub fp: usize,
    pub fn_: usize,
    /// TP / (TP + FP + FN); 1 when both images are empty.
    pub ap: f64,
}

/// Matches predicted labels against true labels (0 is background in both) at each `tau` (≥ 0.5).
pub fn match_labels(pred: &[u32], truth: &[u32], taus: &[f64]) -> Result<Vec<Matching>, KernelError> {
    if pred.len() != truth.len() {
        return Err(KernelError::Parameter {
            name: "pred/truth",
            reason: format!("label images differ in size ({} vs {})", pred.len(), truth.len()),
        });
    }
    if let Some(&t) = taus.iter().find(|&&t| !(0.5..1.0).contains(&t)) {
        return Err(KernelError::Parameter {
            name: "tau",
            reason: format!("{t} is outside [0.5, 1): one-to-one matching by IoU needs tau >= 0.5"),
        });
    }
    let mut area_p: HashMap<u32, u64> = HashMap::new();
    let mut area_t: HashMap<u32, u64> = HashMap::new();
    let mut inter: HashMap<(u32, u32), u64> = HashMap::new();
    for (&p, &t) in pred.iter().zip(truth) {
        if p != 0 {
            *area_p.entry(p).or_default() += 1;
        }
        if t != 0 {
            *area_t.entry(t).or_default() += 1;
        }
        if p != 0 && t != 0 {
            *inter.entry((p, t)).or_default() += 1;
        }
    }
    let ious: Vec<f64> = inter
        .iter()
        .map(|(&(p, t), &i)| i as f64 / (area_p[&p] + area_t[&t] - i) as f64)
        .collect();
    Ok(taus
        .iter()
        .map(|&tau| {
            let tp = ious.iter().filter(|&&iou| iou > tau).count();
            let fp = area_p.len() - tp;
            let fn_ = area_t.len() - tp;
            let denom = tp + fp + fn_;
            Matching {
                tau,
                tp,
                fp,
                fn_,
                ap: if denom == 0 { 1.0 } else { tp as f64 / denom as f64 },
            }
        })
        .collect())
}

/// Pixels on which two label images disagree up to renumbering: labels are paired one-to-one
/// (background with background), largest overlaps first, and every pixel outside a pair's
/// overlap counts. 0 means the same partition.
pub fn partition_differences(a: &[u32], b: &[u32]) -> usize {
    let mut pairs: HashMap<(u32, u32), usize> = HashMap::new();
    for (&x, &y) in a.iter().zip(b) {
        *pairs.entry((x, y)).or_default() += 1;
    }
    let mut counts: Vec<((u32, u32), usize)> = pairs.into_iter().collect();
    counts.sort_unstable_by(|p, q| q.1.cmp(&p.1).then(p.0.cmp(&q.0)));
    let (mut used_a, mut used_b) = (std::collections::HashSet::new(), std::collections::HashSet::new());
    let mut agree = 0;
    for ((x, y), c) in counts {
        if (x == 0) != (y == 0) || used_a.contains(&x) || used_b.contains(&y) {
            continue;
        }
        used_a.insert(x);
        used_b.insert(y);
        agree += c;
    }
    a.len().max(b.len()) - agree
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_ap() {
        // truth: two objects; pred: one exact match, one half-overlap (IoU 1/3), one extra.
        let truth = [1, 1, 1, 1, 2, 2, 0, 0, 0];
        let pred = [5, 5, 5, 5, 6, 0, 6, 0, 7];
        let m = match_labels(&pred, &truth, &[0.5]).unwrap()[0];
        assert_eq!((m.tp, m.fp, m.fn_), (1, 2, 1));
        assert!((m.ap - 0.25).abs() < 1e-12);
        let empty = match_labels(&[0; 4], &[0; 4], &[0.5, 0.7]).unwrap();
        assert!(empty.iter().all(|m| m.ap == 1.0));
        assert!(match_labels(&pred, &truth, &[0.3]).is_err());
    }
}
