//! Per-label reductions: the numbers every per-cell record carries.

use crate::{check_len, KernelError};

/// One object's geometry and intensities. Coordinates are pixels, `(x, y)` with the origin at the
/// top-left pixel's centre; the bounding box is half-open `[min, max)`.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionProps {
    pub label: u32,
    pub area_px: u64,
    pub centroid_x: f64,
    pub centroid_y: f64,
    pub bbox_min_x: u32,
    pub bbox_min_y: u32,
    pub bbox_max_x: u32,
    pub bbox_max_y: u32,
    /// Mean raw intensity per channel, in the order the channels were given.
    pub mean_intensity: Vec<f64>,
    pub max_intensity: Vec<u16>,
}

/// Measures every label `1..=max` present in `labels` over the given channels. Labels absent from
/// the image are skipped, so the output holds exactly the objects that exist, sorted by label.
pub fn region_props(
    labels: &[u32],
    channels: &[&[u16]],
    width: usize,
    height: usize,
) -> Result<Vec<RegionProps>, KernelError> {
    check_len("labels", labels, width, height)?;
    for c in channels {
        check_len("channel", c, width, height)?;
    }
    let n = labels.iter().copied().max().unwrap_or(0) as usize;
    let nc = channels.len();
    let mut area = vec![0u64; n + 1];
    let mut sx = vec![0f64; n + 1];
    let mut sy = vec![0f64; n + 1];
    let mut bb = vec![[u32::MAX, u32::MAX, 0u32, 0u32]; n + 1];
    let mut sums = vec![0f64; (n + 1) * nc];
    let mut maxs = vec![0u16; (n + 1) * nc];
    for y in 0..height {
        for x in 0..width {
            let i = y * width + x;
            let l = labels[i] as usize;
            if l == 0 {
                continue;
            }
            area[l] += 1;
            sx[l] += x as f64;
            sy[l] += y as f64;
            let b = &mut bb[l];
            b[0] = b[0].min(x as u32);
            b[1] = b[1].min(y as u32);
            b[2] = b[2].max(x as u32 + 1);
            b[3] = b[3].max(y as u32 + 1);
            for (c, ch) in channels.iter().enumerate() {
                let v = ch[i];
                sums[l * nc + c] += v as f64;
                let m = &mut maxs[l * nc + c];
                *m = (*m).max(v);
            }
        }
    }
    Ok(assemble(&Sums {
        channels: nc,
        area: &area,
        sum_x: &sx,
        sum_y: &sy,
        bbox: &bb,
        intensity: &sums,
        maxima: &maxs,
    }))
}

/// Per-label accumulators, indexed by label (`0` unused); intensities are label-major.
pub(crate) struct Sums<'a> {
    pub channels: usize,
    pub area: &'a [u64],
    pub sum_x: &'a [f64],
    pub sum_y: &'a [f64],
    pub bbox: &'a [[u32; 4]],
    pub intensity: &'a [f64],
    pub maxima: &'a [u16],
}

/// The records of the labels that occur, from accumulators the CPU or the GPU filled.
pub(crate) fn assemble(s: &Sums) -> Vec<RegionProps> {
    let (nc, area, sx, sy, bb, sums, maxs) = (s.channels, s.area, s.sum_x, s.sum_y, s.bbox, s.intensity, s.maxima);
    (1..area.len())
        .filter(|&l| area[l] > 0)
        .map(|l| {
            let a = area[l] as f64;
            RegionProps {
                label: l as u32,
                area_px: area[l],
                centroid_x: sx[l] / a,
                centroid_y: sy[l] / a,
                bbox_min_x: bb[l][0],
                bbox_min_y: bb[l][1],
                bbox_max_x: bb[l][2],
                bbox_max_y: bb[l][3],
                mean_intensity: (0..nc).map(|c| sums[l * nc + c] / a).collect(),
                max_intensity: (0..nc).map(|c| maxs[l * nc + c]).collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_a_square() {
        let (w, h) = (6, 5);
        let mut labels = vec![0u32; w * h];
        let mut ch = vec![0u16; w * h];
        for y in 1..3 {
            for x in 2..5 {
                labels[y * w + x] = 3;
                ch[y * w + x] = 10 * x as u16;
            }
        }
        let p = region_props(&labels, &[&ch], w, h).unwrap();
        assert_eq!(p.len(), 1);
        let r = &p[0];
        assert_eq!((r.label, r.area_px), (3, 6));
        assert_eq!((r.centroid_x, r.centroid_y), (3.0, 1.5));
        assert_eq!((r.bbox_min_x, r.bbox_min_y, r.bbox_max_x, r.bbox_max_y), (2, 1, 5, 3));
        assert_eq!(r.mean_intensity, vec![30.0]);
        assert_eq!(r.max_intensity, vec![40]);
    }
}
