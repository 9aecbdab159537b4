//! The two priority floods: the nuclei watershed and the propagation of cells from nuclei.

use super::*;

#[derive(PartialEq)]
struct QueueItem {
    priority: f32,
    order: u64,
    index: usize,
}

impl Eq for QueueItem {}

impl Ord for QueueItem {
    fn cmp(&self, other: &Self) -> Ordering {
        // BinaryHeap is a max-heap: invert so the lowest priority (then the oldest) pops first.
        other
            .priority
            .total_cmp(&self.priority)
            .then_with(|| other.order.cmp(&self.order))
    }
}

impl PartialOrd for QueueItem {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Levels of the watershed's hierarchical queue: elevations are quantised to this many steps
/// between their minimum and maximum under the mask (for a distance map of nuclei a few tens of
/// pixels deep, a step is well under 0.01 px).
const WATERSHED_LEVELS: usize = 4096;

/// Marker-controlled watershed (Meyer's flooding) of `elevation`, restricted to `mask`; 8-connected.
/// Every masked pixel reachable from a marker gets that marker's label. A hierarchical queue of
/// FIFO buckets replaces the priority heap: each pixel is queued once and dequeued in O(1).
///
/// The flood order is a key per pixel, `(bucket, hops)`: the bucket is the highest level on the
/// way from the marker, the hops count steps since the flood entered that bucket (the queue pops
/// each bucket in waves of equal hops). A pixel takes
/// the label of the neighbour with the smallest key among those that reach it with its own
/// (smallest) key, as the queue's first pop would give it; between such neighbours of equal
/// key the smaller label wins, instead of whichever the queue held first. That makes the result
/// a function of the image alone, which a parallel relaxation (the CUDA back end) reproduces
/// exactly.
pub fn watershed(
    elevation: &[f32],
    markers: &[u32],
    mask: &[bool],
    width: usize,
    height: usize,
) -> Result<Vec<u32>, KernelError> {
    check_len("elevation", elevation, width, height)?;
    check_len("markers", markers, width, height)?;
    check_len("mask", mask, width, height)?;
    let (lo, hi) = elevation
        .iter()
        .zip(mask)
        .filter(|(v, &m)| m && v.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), (&v, _)| {
            (a.min(v), b.max(v))
        });
    let top = WATERSHED_LEVELS - 1;
    let scale = if hi > lo { top as f32 / (hi - lo) } else { 0.0 };
    let level = |i: usize| {
        let v = elevation[i];
        if v.is_finite() {
            (((v - lo) * scale) as usize).min(top)
        } else {
            top
        }
    };
    let mut labels = markers.to_vec();
    // A bucket is popped in waves of equal hops: the entries from lower buckets (hops 0), then
    // what each wave queued into the same bucket. A tie needs `j` queued by the wave being
    // popped (its key's neighbour had the popped pixels' key), so the pixels queued by the
    // current wave are marked, and unmarked when it ends (`fresh` lists them): one byte per
    // pixel, no per-pixel key.
    const FREE: u8 = 0;
    const QUEUED: u8 = 1;
    const THIS_WAVE: u8 = 2;
    let mut state: Vec<u8> = markers.iter().map(|&m| if m != 0 { QUEUED } else { FREE }).collect();
    let mut fresh: Vec<u32> = Vec::new();
    let mut buckets: Vec<Vec<u32>> = vec![Vec::new(); WATERSHED_LEVELS];
    let mut heads = vec![0usize; WATERSHED_LEVELS];
    // Markers first, in raster order, ahead of every other pixel.
    buckets[0].extend((0..markers.len()).filter(|&i| markers[i] != 0).map(|i| i as u32));
    let (mut cur, mut wave_end) = (0, buckets[0].len());
    loop {
        if heads[cur] == wave_end {
            for &j in &fresh {
                state[j as usize] = QUEUED;
            }
            fresh.clear();
            if heads[cur] == buckets[cur].len() {
                cur += 1;
                if cur == WATERSHED_LEVELS {
                    break;
                }
            }
            wave_end = buckets[cur].len();
            continue;
        }
        let i = buckets[cur][heads[cur]] as usize;
        heads[cur] += 1;
        let li = labels[i];
        let (x, y) = (i % width, i / width);
        let (x0, x1) = (x.saturating_sub(1), (x + 1).min(width - 1));
        let (y0, y1) = (y.saturating_sub(1), (y + 1).min(height - 1));
        for ny in y0..=y1 {
            for nx in x0..=x1 {
                let j = ny * width + nx;
                if !mask[j] {
                    continue;
                }
                let st = state[j];
                if st != FREE {
                    // Keys only grow along the queue, so `i` hands `j` its key through a
                    // neighbour of the smallest key exactly when `j` was queued in this wave:
                    // a tie, and the smaller label takes it.
                    if st == THIS_WAVE && li < labels[j] {
                        labels[j] = li;
                    }
                    continue;
                }
                state[j] = THIS_WAVE;
                fresh.push(j as u32);
                labels[j] = li;
                buckets[level(j).max(cur)].push(j as u32);
            }
        }
    }
    Ok(labels)
}

/// Propagates labels from seeds over an intensity image (CellProfiler's "propagate"): a pixel joins
/// the seed with the cheapest path, where a step costs the intensity difference plus
/// `spatial_weight` times its length. Spatial weight keeps boundaries between cells of similar
/// brightness near the midline; intensity keeps them on dark gaps. Between paths of exactly
/// equal cost through neighbours of equal cost the smaller label wins, so the result does not
/// depend on the order of the heap (and a parallel relaxation reproduces it).
pub fn propagate(
    image: &[f32],
    seeds: &[u32],
    mask: &[bool],
    width: usize,
    height: usize,
    spatial_weight: f32,
) -> Result<Vec<u32>, KernelError> {
    check_len("image", image, width, height)?;
    check_len("seeds", seeds, width, height)?;
    check_len("mask", mask, width, height)?;
    flood(seeds, mask, width, height, |cost, to, (from, diag)| {
        let step = if diag { std::f32::consts::SQRT_2 } else { 1.0 };
        cost + (image[to] - image[from]).abs() + spatial_weight * step
    })
}

/// Shared priority flood. `next(cost_so_far, to, (from, diagonal))` gives the priority of `to`.
fn flood(
    seeds: &[u32],
    mask: &[bool],
    width: usize,
    height: usize,
    next: impl Fn(f32, usize, (usize, bool)) -> f32,
) -> Result<Vec<u32>, KernelError> {
    let mut labels = vec![0u32; seeds.len()];
    let mut cost = vec![f32::INFINITY; seeds.len()];
    // Pixels are popped in runs of equal cost. A tie for `j` needs the neighbour that set its
    // cost to have the popped pixel's cost, i.e. to be in the current run: `state` marks the
    // pixels whose cost the current run set (`fresh` lists them, to unmark when it ends) and
    // those popped for good, in one byte per pixel.
    const OPEN: u8 = 0;
    const THIS_RUN: u8 = 1;
    const DONE: u8 = 2;
    let mut state = vec![OPEN; seeds.len()];
    let mut fresh: Vec<u32> = Vec::new();
    let mut run = f32::NAN;
    let mut heap = BinaryHeap::new();
    let mut order = 0u64;
    for (i, &s) in seeds.iter().enumerate() {
        if s != 0 {
            labels[i] = s;
            cost[i] = 0.0;
            heap.push(QueueItem {
                priority: f32::NEG_INFINITY,
                order,
                index: i,
            });
            order += 1;
        }
    }
    const N8: [(isize, isize, bool); 8] = [
        (-1, 0, false),
        (1, 0, false),
        (0, -1, false),
        (0, 1, false),
        (-1, -1, true),
        (1, -1, true),
        (-1, 1, true),
        (1, 1, true),
    ];
    while let Some(QueueItem { index, priority, .. }) = heap.pop() {
        if state[index] == DONE {
            continue;
        }
        if priority.to_bits() != run.to_bits() {
            for &j in &fresh {
                if state[j as usize] == THIS_RUN {
                    state[j as usize] = OPEN;
                }
            }
            fresh.clear();
            run = priority;
        }
        state[index] = DONE;
        let (x, y) = ((index % width) as isize, (index / width) as isize);
        for (dx, dy, diag) in N8 {
            let (nx, ny) = (x + dx, y + dy);
            if nx < 0 || ny < 0 || nx >= width as isize || ny >= height as isize {
                continue;
            }
            let j = ny as usize * width + nx as usize;
            if state[j] == DONE || !mask[j] {
                continue;
            }
            let c = next(cost[index], j, (index, diag));
            if c < cost[j] {
                cost[j] = c;
                labels[j] = labels[index];
                if state[j] != THIS_RUN {
                    state[j] = THIS_RUN;
                    fresh.push(j as u32);
                }
                heap.push(QueueItem {
                    priority: c,
                    order,
                    index: j,
                });
                order += 1;
            } else if c == cost[j] && state[j] == THIS_RUN && labels[index] < labels[j] {
                labels[j] = labels[index];
            }
        }
    }
    Ok(labels)
}
