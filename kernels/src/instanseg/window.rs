//! The window around one seed: every pixel scored by the pixel classifier, then (with
//! `cleanup_fragments`) cut to the part connected to the seed, holes filled.

use super::{sigmoid, Fields, InstanSegParams, MAX_WIDTH};

/// A `side x side` window of scores whose top-left pixel is (`top`, `left`) in the image.
pub(crate) struct Window {
    pub top: usize,
    pub left: usize,
    pub side: usize,
    pub score: Vec<f32>,
}

impl Window {
    /// The top-left pixel of the window of half-side `ws` around the seed at (`y`, `x`),
    /// clamped inside the `width x height` image.
    pub fn corner(y: usize, x: usize, ws: usize, width: usize, height: usize) -> (usize, usize) {
        (y.clamp(ws, height - ws) - ws, x.clamp(ws, width - ws) - ws)
    }

    /// Scores the window of half-side `ws` around the seed at (`y`, `x`): the window is clamped
    /// inside the image, the seed's embedding is the reference.
    pub fn score(f: &Fields, y: usize, x: usize, ws: usize, height: usize, p: &InstanSegParams) -> Self {
        let w = f.width;
        let side = 2 * ws;
        let (top, left) = Self::corner(y, x, ws, w, height);
        let c = [f.x[y * w + x], f.y[y * w + x]];
        let mut score = Vec::with_capacity(side * side);
        for i in 0..side {
            let row = (top + i) * w + left;
            for j in 0..side {
                let q = row + j;
                let features = [f.x[q] - c[0], f.y[q] - c[1], f.sigma[0][q], f.sigma[1][q]];
                score.push(sigmoid(classify(&features, p)));
            }
        }
        let mut win = Self { top, left, side, score };
        if p.cleanup_fragments {
            win.cleanup((y - top) * side + (x - left), p.mask_threshold);
        }
        win
    }

    /// Keeps the object connected to the seed (8-connected, as torch's 3x3 max-pool flood fill,
    /// at most `side` steps) and gives its holes the threshold score, so they count as inside
    /// but lose to any other object scoring them.
    fn cleanup(&mut self, seed: usize, threshold: f32) {
        let s = self.side;
        let mask: Vec<bool> = self.score.iter().map(|&v| v >= threshold).collect();
        let filled = flood(&mask, s, &[seed], s);
        let near = dilate(&filled, s, 3);
        let far: Vec<usize> = (0..s * s).filter(|&i| !near[i]).collect();
        let outside: Vec<bool> = filled.iter().map(|&b| !b).collect();
        let reached = flood(&outside, s, &far, s);
        for i in 0..s * s {
            if !filled[i] {
                self.score[i] = if reached[i] { 0.0 } else { threshold };
            }
        }
    }
}

/// The classifier's logit for one pixel: dense layers with ReLU between them.
fn classify(features: &[f32; 4], p: &InstanSegParams) -> f32 {
    let mut a = [0f32; MAX_WIDTH];
    let mut b = [0f32; MAX_WIDTH];
    a[..4].copy_from_slice(features);
    let last = p.classifier.len() - 1;
    for (k, l) in p.classifier.iter().enumerate() {
        for ((out, row), bias) in b.iter_mut().zip(l.weight.chunks_exact(l.inputs)).zip(&l.bias) {
            let mut acc = 0f32;
            for (wi, xi) in row.iter().zip(&a[..l.inputs]) {
                acc += wi * xi;
            }
            let v = acc + bias;
            *out = if k < last { v.max(0.0) } else { v };
        }
        std::mem::swap(&mut a, &mut b);
    }
    a[0]
}

/// Pixels of `mask` reached from `seeds` in at most `limit` 8-connected steps through `mask`
/// (a seed outside the mask starts the walk but is not itself reached): torch's iterated
/// `maxpool3x3(seed) & mask`, which stops when nothing changes or after `limit` rounds.
pub(crate) fn flood(mask: &[bool], side: usize, seeds: &[usize], limit: usize) -> Vec<bool> {
    let mut reached = vec![false; side * side];
    let mut seen = vec![false; side * side];
    let mut frontier: Vec<usize> = Vec::with_capacity(seeds.len());
    for &q in seeds {
        if !seen[q] {
            seen[q] = true;
            reached[q] = mask[q];
            frontier.push(q);
        }
    }
    let mut next = Vec::new();
    for _ in 0..limit {
        if frontier.is_empty() {
            break;
        }
        for &q in &frontier {
            let (y, x) = (q / side, q % side);
            for ny in y.saturating_sub(1)..(y + 2).min(side) {
                for nx in x.saturating_sub(1)..(x + 2).min(side) {
                    let r = ny * side + nx;
                    if mask[r] && !reached[r] {
                        reached[r] = true;
                        seen[r] = true;
                        next.push(r);
                    }
                }
            }
        }
        std::mem::swap(&mut frontier, &mut next);
        next.clear();
    }
    reached
}

/// `mask` grown by `radius` pixels in the chessboard metric, clipped to the window.
pub(crate) fn dilate(mask: &[bool], side: usize, radius: usize) -> Vec<bool> {
    let mut rows = vec![false; side * side];
    for y in 0..side {
        for x in 0..side {
            let (x0, x1) = (x.saturating_sub(radius), (x + radius + 1).min(side));
            rows[y * side + x] = mask[y * side + x0..y * side + x1].iter().any(|&b| b);
        }
    }
    let mut out = vec![false; side * side];
    for y in 0..side {
        let (y0, y1) = (y.saturating_sub(radius), (y + radius + 1).min(side));
        for x in 0..side {
            out[y * side + x] = (y0..y1).any(|yy| rows[yy * side + x]);
        }
    }
    out
}
