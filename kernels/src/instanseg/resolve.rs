//! InstanSeg's `resolve_cell_and_nucleus_boundaries`: each cell keeps its largest nucleus (one
//! with more than half its area inside the cell) and takes its label; nuclei always lie inside
//! their cell; nuclei without a cell become their own cell; cells without a nucleus keep their
//! pixels under labels after the last nucleus.

use std::collections::HashMap;

/// torch's `torch_fastremap`: every value replaced by its rank among the image's distinct values
/// (so 0 stays 0 when there is background).
pub fn fastremap(x: &[u32]) -> Vec<u32> {
    if x.iter().all(|&v| v == 0) {
        return x.to_vec();
    }
    let mut values: Vec<u32> = x.to_vec();
    values.sort_unstable();
    values.dedup();
    x.iter()
        .map(|v| values.binary_search(v).expect("value present") as u32)
        .collect()
}

/// Overlap counts of nucleus `n` with cell `c` (1-based labels of consecutive images) and each
/// nucleus's area.
fn overlaps(nuclei: &[u32], cells: &[u32]) -> (HashMap<(u32, u32), u32>, Vec<u32>) {
    let count = nuclei.iter().copied().max().unwrap_or(0) as usize;
    let mut area = vec![0u32; count + 1];
    let mut shared = HashMap::new();
    for (&n, &c) in nuclei.iter().zip(cells) {
        if n > 0 {
            area[n as usize] += 1;
            if c > 0 {
                *shared.entry((n, c)).or_insert(0) += 1;
            }
        }
    }
    (shared, area)
}

/// The (nucleus, cell) pairs where more than half of the nucleus lies in the cell, in float32.
fn inside(shared: &HashMap<(u32, u32), u32>, area: &[u32]) -> Vec<(u32, u32)> {
    let mut pairs: Vec<(u32, u32)> = shared
        .iter()
        .filter(|(&(n, _), &k)| k as f32 / area[n as usize] as f32 > 0.5)
        .map(|(&pair, _)| pair)
        .collect();
    pairs.sort_unstable();
    pairs
}

/// Keeps `values` of `x` whose membership `keep` holds, zeroes the rest.
fn only(x: &[u32], keep: &[bool]) -> Vec<u32> {
    x.iter().map(|&v| if keep[v as usize] { v } else { 0 }).collect()
}

/// Consistent nuclei and cells from the two raw label images of one field.
pub fn cells_and_nuclei(nuclei: &[u32], cells: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let any = |x: &[u32]| x.iter().any(|&v| v > 0);
    if !any(nuclei) {
        return if any(cells) {
            (nuclei.to_vec(), cells.to_vec())
        } else {
            (vec![0; nuclei.len()], vec![0; cells.len()])
        };
    }
    if !any(cells) {
        return (nuclei.to_vec(), nuclei.to_vec());
    }
    let n0 = fastremap(nuclei);
    let c0 = fastremap(cells);

    // Keep, per cell, the nuclei of largest area among those more than half inside it, and the
    // cells that have any such nucleus.
    let (shared, area) = overlaps(&n0, &c0);
    let pairs = inside(&shared, &area);
    let cell_count = c0.iter().copied().max().unwrap_or(0) as usize;
    let mut biggest = vec![0u32; cell_count + 1];
    for &(n, c) in &pairs {
        biggest[c as usize] = biggest[c as usize].max(area[n as usize]);
    }
    let mut keep_nucleus = vec![false; area.len()];
    let mut keep_cell = vec![false; cell_count + 1];
    for &(n, c) in &pairs {
        keep_cell[c as usize] = true;
        if area[n as usize] == biggest[c as usize] {
            keep_nucleus[n as usize] = true;
        }
    }
    keep_nucleus[0] = true;
    keep_cell[0] = true;
    let n2 = fastremap(&only(&n0, &keep_nucleus));
    let c2 = fastremap(&only(&c0, &keep_cell));
    if !any(&n2) {
        return if any(&c2) {
            (n2, c2)
        } else {
            (vec![0; nuclei.len()], vec![0; cells.len()])
        };
    }
    if !any(&c2) {
        return (n2.clone(), n2);
    }

    // Each kept cell takes the label of its nucleus (the first, should two be equally large).
    let (shared2, area2) = overlaps(&n2, &c2);
    let mut cell_to_nucleus = vec![None; c2.iter().copied().max().unwrap_or(0) as usize + 1];
    for (n, c) in inside(&shared2, &area2) {
        cell_to_nucleus[c as usize].get_or_insert(n);
    }
    cell_to_nucleus[0] = Some(0);
    let mut cells_out: Vec<u32> = c2.iter().map(|&c| cell_to_nucleus[c as usize].unwrap_or(0)).collect();

    // The nuclei that were not kept come back after the kept ones, each its own cell.
    let kept = n2.iter().copied().max().unwrap_or(0);
    let rest: Vec<u32> = n0.iter().zip(&n2).map(|(&o, &k)| if k > 0 { 0 } else { o }).collect();
    let rest = fastremap(&rest);
    let nuclei_out: Vec<u32> = n2
        .iter()
        .zip(&rest)
        .map(|(&k, &r)| k + if r > 0 { r + kept } else { 0 })
        .collect();
    for (c, &n) in cells_out.iter_mut().zip(&nuclei_out) {
        if n > 0 {
            *c = n;
        }
    }
    // Cells without a nucleus keep their pixels, numbered after every label so far.
    let top = cells_out.iter().copied().max().unwrap_or(0);
    for (c, &orig) in cells_out.iter_mut().zip(&c0) {
        if *c == 0 && orig > 0 {
            *c = orig + top;
        }
    }
    (nuclei_out, cells_out)
}
