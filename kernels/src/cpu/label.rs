//! Connected components in raster numbering, the size filter and border contact.

use super::*;

fn find(parent: &mut [u32], mut x: u32) -> u32 {
    while parent[x as usize] != x {
        parent[x as usize] = parent[parent[x as usize] as usize];
        x = parent[x as usize];
    }
    x
}

/// Connected components of a mask (8-connectivity when `eight`), labels `1..=n` in raster order of
/// first appearance, 0 for background.
pub fn connected_components(
    mask: &[bool],
    width: usize,
    height: usize,
    eight: bool,
) -> Result<(Vec<u32>, u32), KernelError> {
    check_len("mask", mask, width, height)?;
    let points = (0..mask.len()).filter(|&i| mask[i]);
    Ok(label_points(points, mask.len(), width, eight))
}

/// Connected components of the pixels listed in `points` (raster order) in an image of `len`
/// pixels, labelled like [`connected_components`]: for sparse sets (peaks, leftovers) it costs
/// the points, not the image.
pub fn label_pixels(points: &[usize], len: usize, width: usize, eight: bool) -> (Vec<u32>, u32) {
    label_points(points.iter().copied(), len, width, eight)
}

/// Two-pass union-find labelling of the pixels `points` yields (in raster order) in an image of
/// `len` pixels: the dense and the sparse (peak) cases share it, and the sparse one touches only
/// its points instead of every pixel.
pub(super) fn label_points(
    points: impl Iterator<Item = usize> + Clone,
    len: usize,
    width: usize,
    eight: bool,
) -> (Vec<u32>, u32) {
    let mut labels = vec![0u32; len];
    let mut parent: Vec<u32> = vec![0];
    for i in points.clone() {
        let (x, y) = (i % width, i / width);
        let mut neigh = [0u32; 4];
        let mut nn = 0;
        if x > 0 && labels[i - 1] != 0 {
            neigh[nn] = labels[i - 1];
            nn += 1;
        }
        if y > 0 {
            let up = i - width;
            if labels[up] != 0 {
                neigh[nn] = labels[up];
                nn += 1;
            }
            if eight {
                if x > 0 && labels[up - 1] != 0 {
                    neigh[nn] = labels[up - 1];
                    nn += 1;
                }
                if x + 1 < width && labels[up + 1] != 0 {
                    neigh[nn] = labels[up + 1];
                    nn += 1;
                }
            }
        }
        if nn == 0 {
            let l = parent.len() as u32;
            parent.push(l);
            labels[i] = l;
        } else {
            let mut root = find(&mut parent, neigh[0]);
            for &l in &neigh[1..nn] {
                let r = find(&mut parent, l);
                if r != root {
                    let (a, b) = if r < root { (r, root) } else { (root, r) };
                    parent[b as usize] = a;
                    root = a;
                }
            }
            labels[i] = root;
        }
    }
    let mut remap = vec![0u32; parent.len()];
    let mut next = 0u32;
    for i in points {
        let r = find(&mut parent, labels[i]) as usize;
        if remap[r] == 0 {
            next += 1;
            remap[r] = next;
        }
        labels[i] = remap[r];
    }
    (labels, next)
}

/// Drops objects outside `[min_area, max_area]` pixels and renumbers the rest `1..=n` in raster
/// order, so label ids are dense and stable for a given input. An object touching the image
/// border is only held to `min_area_at_border`: it is cut by the field of view, not debris, and
/// dropping it would hand its pixels' cell to its neighbours.
pub fn filter_by_area(
    labels: &[u32],
    width: usize,
    min_area: usize,
    min_area_at_border: usize,
    max_area: usize,
) -> (Vec<u32>, u32) {
    let max_label = labels.iter().copied().max().unwrap_or(0) as usize;
    let mut area = vec![0usize; max_label + 1];
    for &l in labels {
        area[l as usize] += 1;
    }
    let mut at_border = vec![false; max_label + 1];
    mark_border_labels(labels, width, &mut at_border);
    let mut remap = vec![0u32; max_label + 1];
    let mut next = 0u32;
    let mut out = vec![0u32; labels.len()];
    for (o, &l) in out.iter_mut().zip(labels) {
        if l == 0 {
            continue;
        }
        let li = l as usize;
        let min = if at_border[li] { min_area_at_border } else { min_area };
        if remap[li] == 0 && area[li] >= min && area[li] <= max_area {
            next += 1;
            remap[li] = next;
        }
        *o = remap[li];
    }
    (out, next)
}

/// Sets `touches[l]` for every label `l` on the outermost rows and columns of a `width`-wide
/// label image (`touches` must cover its largest label; an empty image marks nothing).
pub fn mark_border_labels(labels: &[u32], width: usize, touches: &mut [bool]) {
    let Some(height) = labels.len().checked_div(width).filter(|&h| h > 0) else {
        return;
    };
    for y in [0, height - 1] {
        for &l in &labels[y * width..(y + 1) * width] {
            touches[l as usize] = true;
        }
    }
    for y in 0..height {
        touches[labels[y * width] as usize] = true;
        touches[labels[y * width + width - 1] as usize] = true;
    }
}

/// Indices of the pixels of a `width` x `height` image where `keep(i)` holds, in raster order,
/// computed row-parallel: the input of [`label_pixels`] for sparse sets.
pub fn pixels_where(width: usize, height: usize, keep: impl Fn(usize) -> bool + Sync) -> Vec<usize> {
    (0..height)
        .into_par_iter()
        .flat_map_iter(|y| (y * width..(y + 1) * width).filter(|&i| keep(i)))
        .collect()
}
