//! From scored windows to one label image: each pixel takes the window that scored it highest
//! (the lowest window on a tie), and windows that overlap by more than `overlap_threshold` of the
//! smaller one's area are one object, numbered by the first window in it.

use std::collections::HashMap;

use super::window::Window;
use super::InstanSegParams;

/// torch's `find_connected_components` gives up after this many label-propagation rounds.
const COMPONENT_ROUNDS: usize = 100;

pub(crate) fn labels(windows: &[Window], width: usize, height: usize, p: &InstanSegParams) -> Vec<u32> {
    let t = p.mask_threshold;
    let mut best = vec![f32::NEG_INFINITY; width * height];
    let mut label = vec![0u32; width * height];
    let mut area = vec![0u32; windows.len()];
    let mut members: Vec<(u32, u32)> = Vec::new();
    for (k, w) in windows.iter().enumerate() {
        for i in 0..w.side {
            let row = (w.top + i) * width + w.left;
            for j in 0..w.side {
                let v = w.score[i * w.side + j];
                if v >= t {
                    let q = row + j;
                    area[k] += 1;
                    members.push((q as u32, k as u32));
                    if v > best[q] {
                        best[q] = v;
                        label[q] = k as u32 + 1;
                    }
                }
            }
        }
    }
    let component = components(windows.len(), &overlaps(members), &area, p.overlap_threshold);
    for l in label.iter_mut().filter(|l| **l > 0) {
        *l = component[*l as usize - 1];
    }
    label
}

/// Pixels shared by each pair of windows (`a < b`), from (pixel, window) memberships.
fn overlaps(mut members: Vec<(u32, u32)>) -> HashMap<(u32, u32), u32> {
    members.sort_unstable();
    let mut shared = HashMap::new();
    let mut i = 0;
    while i < members.len() {
        let mut j = i + 1;
        while j < members.len() && members[j].0 == members[i].0 {
            j += 1;
        }
        for a in i..j {
            for b in a + 1..j {
                *shared.entry((members[a].1, members[b].1)).or_insert(0) += 1;
            }
        }
        i = j;
    }
    shared
}

/// 1-based component label of each window: the smallest window number reachable through
/// overlaps above `threshold` (intersection over the smaller area, in float32 as torch divides),
/// found by the same synchronous min-label propagation, with its round limit.
fn components(n: usize, shared: &HashMap<(u32, u32), u32>, area: &[u32], threshold: f32) -> Vec<u32> {
    let mut edges: Vec<(usize, usize)> = shared
        .iter()
        .filter(|(&(a, b), &c)| c as f32 / area[a as usize].min(area[b as usize]) as f32 > threshold)
        .map(|(&(a, b), _)| (a as usize, b as usize))
        .collect();
    edges.sort_unstable();
    let mut labels: Vec<u32> = (1..=n as u32).collect();
    for _ in 0..COMPONENT_ROUNDS {
        let mut next = labels.clone();
        for &(a, b) in &edges {
            next[a] = next[a].min(labels[b]);
            next[b] = next[b].min(labels[a]);
        }
        let done = next == labels;
        labels = next;
        if done {
            break;
        }
    }
    labels
}
