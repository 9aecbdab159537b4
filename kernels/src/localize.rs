//! Where a protein sits in each cell: the fraction of the cell's signal in each compartment,
//! its intensity-weighted radial position, and two texture measures, from the landmarks the
//! field already has (nuclei and cell labels, the ER stain) and the protein's own texture
//! (puncta). Relocalization screens compare these per-cell profiles between wells.
//!
//! The compartments partition each cell, in this order of precedence: `nucleus` (the nuclei
//! labels), `membrane` (cell pixels within `rim_px` of the cell's outline), `er` (cytoplasm
//! where the ER stain is brighter than its surroundings: the reticulum), `puncta` (in the rest of the cytoplasm, the protein's
//! own spots: pixels whose difference from a Gaussian-smoothed copy stands out from the field's
//! spread of that difference, as mitochondria or vesicles do), `cytoplasm` (the rest). Landmarks
//! come first so that an ER protein's reticular texture is not taken for puncta. The five
//! fractions sum to 1.

use crate::cpu::{distance_transform, gaussian_blur};
use crate::{check_len, KernelError};

/// The compartments, in the order of a profile's first values.
pub const COMPARTMENTS: [&str; 5] = ["nucleus", "cytoplasm", "membrane", "er", "puncta"];

/// Every value of a profile, in order: the compartment fractions, then `radial` (the
/// intensity-weighted mean of the normalised radial position: 0 at the nucleus' centre, 1 on the
/// cell's outline), `cv` (coefficient of variation of the signal over the cell: how uneven it
/// is) and `er_corr` (Pearson correlation of the protein's detail with the ER stain's, each less
/// its smoothed self, over the cell's cytoplasm, rim excluded: whether it follows the reticulum).
pub const FEATURES: [&str; 8] = [
    "nucleus",
    "cytoplasm",
    "membrane",
    "er",
    "puncta",
    "radial",
    "cv",
    "er_corr",
];

/// Which compartment each pixel is in, before the protein's own puncta are known.
const OUTSIDE: u8 = 0;
const NUCLEUS: u8 = 1;
const CYTOPLASM: u8 = 2;
const MEMBRANE: u8 = 3;
const ER: u8 = 4;

/// Settings, in field pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocParams {
    /// Width of the membrane rim inside the cell's outline.
    pub rim_px: f32,
    /// Scale of the smoothing that puncta must stand out from.
    pub puncta_sigma_px: f32,
    /// How many robust standard deviations (1.4826 MAD) above the median difference a punctum is.
    pub puncta_mads: f32,
}

impl LocParams {
    pub fn check(&self) -> Result<(), KernelError> {
        let bad = |name, reason: &str| {
            Err(KernelError::Parameter {
                name,
                reason: reason.to_string(),
            })
        };
        if !(self.rim_px.is_finite() && self.rim_px > 0.0) {
            return bad("rim_px", "must be a positive number");
        }
        if !(self.puncta_sigma_px.is_finite() && self.puncta_sigma_px > 0.0) {
            return bad("puncta_sigma_px", "must be a positive number");
        }
        if !(self.puncta_mads.is_finite() && self.puncta_mads > 0.0) {
            return bad("puncta_mads", "must be a positive number");
        }
        Ok(())
    }
}

/// A field's compartments from its landmarks, computed once and shared by every protein of the
/// field (real and virtual).
#[derive(Debug, Clone)]
pub struct Compartments {
    width: usize,
    height: usize,
    /// Cell label of each pixel (0 outside cells).
    cells: Vec<u32>,
    class: Vec<u8>,
    /// Normalised radial position of each cell pixel.
    radial: Vec<f32>,
    /// The ER stain's detail (the stain less its surroundings), when there is one: what
    /// `er_corr` correlates the protein's detail with.
    er: Option<Vec<f32>>,
    labels: usize,
    params: LocParams,
}

/// The value of the background: the median of the pixels outside every cell when they are at
/// least 1 % of the field, else the field's 1st percentile (a confluent field).
fn background<T: Copy + Into<f64>>(plane: &[T], cells: &[u32]) -> f32 {
    let mut outside: Vec<f32> = plane
        .iter()
        .zip(cells)
        .filter(|(_, &c)| c == 0)
        .map(|(&v, _)| v.into() as f32)
        .filter(|v| v.is_finite())
        .collect();
    if outside.len() * 100 >= plane.len().max(1) {
        return quantile(&mut outside, 0.5);
    }
    let mut all: Vec<f32> = plane
        .iter()
        .map(|&v| v.into() as f32)
        .filter(|v| v.is_finite())
        .collect();
    quantile(&mut all, 0.01)
}

/// The `q` quantile by selection (the values are reordered); 0 for none.
fn quantile(v: &mut [f32], q: f64) -> f32 {
    if v.is_empty() {
        return 0.0;
    }
    let k = ((v.len() - 1) as f64 * q).round() as usize;
    *v.select_nth_unstable_by(k, f32::total_cmp).1
}

/// `plane − background`, at least 0; NaN stays NaN (it is left out of every sum).
fn signal<T: Copy + Into<f64>>(plane: &[T], bg: f32) -> Vec<f32> {
    plane.iter().map(|&v| (v.into() as f32 - bg).max(0.0)).collect()
}

/// Builds the compartments of a field from its nuclei and cell labels (cell `k` holds nucleus
/// `k`, as the segment stage writes them) and, when there is one, its ER stain.
pub fn compartments(
    nuclei: &[u32],
    cells: &[u32],
    er: Option<&[u16]>,
    width: usize,
    height: usize,
    params: LocParams,
) -> Result<Compartments, KernelError> {
    params.check()?;
    check_len("nuclei", nuclei, width, height)?;
    check_len("cells", cells, width, height)?;
    if let Some(e) = er {
        check_len("er", e, width, height)?;
    }
    let labels = cells.iter().copied().max().unwrap_or(0) as usize + 1;
    // Distance to the outline: interior pixels are those whose 4 neighbours in the image all
    // belong to the same cell; the image's border is not an outline (a cut cell's edge is not
    // its membrane).
    let interior: Vec<bool> = (0..cells.len())
        .map(|i| {
            let l = cells[i];
            let (x, y) = (i % width, i / width);
            l != 0
                && (x == 0 || cells[i - 1] == l)
                && (x + 1 == width || cells[i + 1] == l)
                && (y == 0 || cells[i - width] == l)
                && (y + 1 == height || cells[i + width] == l)
        })
        .collect();
    let to_outline = distance_transform(&interior, width, height)?;
    // Nucleus centroid of each cell (the cell's own centroid when it has no nucleus).
    let mut acc = vec![[0f64; 3]; labels];
    let mut cell_acc = vec![[0f64; 3]; labels];
    for (i, &l) in cells.iter().enumerate() {
        if l == 0 {
            continue;
        }
        let (x, y) = ((i % width) as f64, (i / width) as f64);
        let a = if nuclei[i] != 0 {
            &mut acc[l as usize]
        } else {
            &mut cell_acc[l as usize]
        };
        a[0] += x;
        a[1] += y;
        a[2] += 1.0;
    }
    let centre: Vec<(f64, f64)> = acc
        .iter()
        .zip(&cell_acc)
        .map(|(n, c)| {
            let a = if n[2] > 0.0 {
                *n
            } else {
                [n[0] + c[0], n[1] + c[1], n[2] + c[2]]
            };
            (a[0] / a[2].max(1.0), a[1] / a[2].max(1.0))
        })
        .collect();
    let mut class = vec![OUTSIDE; cells.len()];
    let mut radial = vec![0f32; cells.len()];
    for (i, &l) in cells.iter().enumerate() {
        if l == 0 {
            continue;
        }
        class[i] = if nuclei[i] != 0 {
            NUCLEUS
        } else if to_outline[i] <= params.rim_px {
            MEMBRANE
        } else {
            CYTOPLASM
        };
        let (cx, cy) = centre[l as usize];
        let (x, y) = ((i % width) as f64, (i / width) as f64);
        let dc = ((x - cx).powi(2) + (y - cy).powi(2)).sqrt() as f32;
        let de = if to_outline[i].is_finite() { to_outline[i] } else { 0.0 };
        radial[i] = if dc + de > 0.0 { dc / (dc + de) } else { 0.0 };
    }
    let er = er.map(|e| signal(e, background(e, cells)));
    let mut detail = None;
    if let Some(e) = &er {
        // The reticulum: cytoplasm where the ER stain is brighter than its own surroundings
        // (a Gaussian twice the puncta scale), so its network, not the perinuclear gradient of
        // the stain, makes the compartment.
        let finite: Vec<f32> = e.iter().map(|v| if v.is_finite() { *v } else { 0.0 }).collect();
        let around = gaussian_blur(&finite, width, height, 2.0 * params.puncta_sigma_px)?;
        for i in 0..cells.len() {
            if class[i] == CYTOPLASM && e[i] > around[i] {
                class[i] = ER;
            }
        }
        detail = Some(e.iter().zip(&around).map(|(v, a)| v - a).collect());
    }
    Ok(Compartments {
        width,
        height,
        cells: cells.to_vec(),
        class,
        radial,
        er: detail,
        labels,
        params,
    })
}

/// Per-cell sums of one protein.
#[derive(Debug, Clone, Copy, Default)]
struct Acc {
    parts: [f64; 5],
    total: f64,
    radial: f64,
    n: f64,
    sq: f64,
    /// Over the cytoplasm, for the ER correlation: n, Σs, Σe, Σs², Σe², Σse.
    co: [f64; 6],
}

impl Compartments {
    /// The profile of every cell for one protein plane (camera counts or a virtual stain's
    /// output), indexed by cell label: `[label][feature]` in [`FEATURES`] order. A cell with no
    /// signal above background has NaN fractions; `er_corr` is NaN without an ER stain.
    pub fn profiles<T: Copy + Into<f64>>(&self, protein: &[T]) -> Result<Vec<[f32; 8]>, KernelError> {
        let (w, h) = (self.width, self.height);
        check_len("protein", protein, w, h)?;
        let s = signal(protein, background(protein, &self.cells));
        let finite: Vec<f32> = s.iter().map(|v| if v.is_finite() { *v } else { 0.0 }).collect();
        let smooth = gaussian_blur(&finite, w, h, self.params.puncta_sigma_px)?;
        // The spread of the difference over the field's cytoplasm sets what stands out.
        let mut diff: Vec<f32> = (0..s.len())
            .filter(|&i| self.class[i] == CYTOPLASM && s[i].is_finite())
            .map(|i| s[i] - smooth[i])
            .collect();
        let med = quantile(&mut diff, 0.5);
        for d in diff.iter_mut() {
            *d = (*d - med).abs();
        }
        let mad = 1.4826 * quantile(&mut diff, 0.5);
        let cut = med + self.params.puncta_mads * mad.max(f32::EPSILON);
        let mut acc = vec![Acc::default(); self.labels];
        for (i, &l) in self.cells.iter().enumerate() {
            let v = s[i];
            if l == 0 || !v.is_finite() {
                continue;
            }
            let c = self.class[i];
            let part = match c {
                NUCLEUS => 0,
                MEMBRANE => 2,
                ER => 3,
                _ if v - smooth[i] > cut => 4,
                _ => 1,
            };
            let a = &mut acc[l as usize];
            let v = f64::from(v);
            a.parts[part] += v;
            a.total += v;
            a.radial += v * f64::from(self.radial[i]);
            a.n += 1.0;
            a.sq += v * v;
            if let (Some(er), true) = (&self.er, matches!(c, CYTOPLASM | ER)) {
                let (e, d) = (f64::from(er[i]), v - f64::from(smooth[i]));
                if e.is_finite() {
                    let co = &mut a.co;
                    co[0] += 1.0;
                    co[1] += d;
                    co[2] += e;
                    co[3] += d * d;
                    co[4] += e * e;
                    co[5] += d * e;
                }
            }
        }
        Ok(acc
            .iter()
            .map(|a| {
                let mut out = [f32::NAN; 8];
                if a.total > 0.0 {
                    for (o, p) in out.iter_mut().zip(a.parts) {
                        *o = (p / a.total) as f32;
                    }
                    out[5] = (a.radial / a.total) as f32;
                    let mean = a.total / a.n;
                    out[6] = ((a.sq / a.n - mean * mean).max(0.0).sqrt() / mean) as f32;
                }
                let co = a.co;
                if co[0] > 1.0 {
                    let vs = co[3] - co[1] * co[1] / co[0];
                    let ve = co[4] - co[2] * co[2] / co[0];
                    let cov = co[5] - co[1] * co[2] / co[0];
                    if vs > 0.0 && ve > 0.0 {
                        out[7] = (cov / (vs * ve).sqrt()) as f32;
                    }
                }
                out
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: LocParams = LocParams {
        rim_px: 2.0,
        puncta_sigma_px: 2.0,
        puncta_mads: 4.0,
    };

    /// Two square cells side by side on a background of 100, each with a nucleus in its middle.
    fn field() -> (Vec<u32>, Vec<u32>, usize, usize) {
        let (w, h) = (64, 32);
        let mut cells = vec![0u32; w * h];
        let mut nuclei = vec![0u32; w * h];
        for y in 2..30 {
            for x in 2..62 {
                let l = if x < 32 { 1 } else { 2 };
                cells[y * w + x] = l;
                let cx = if l == 1 { 16 } else { 47 };
                if (x as i32 - cx).abs() < 6 && (y as i32 - 16).abs() < 6 {
                    nuclei[y * w + x] = l;
                }
            }
        }
        (nuclei, cells, w, h)
    }

    #[test]
    fn a_nuclear_protein_is_nuclear_and_a_membrane_one_is_on_the_rim() {
        let (nuclei, cells, w, h) = field();
        let c = compartments(&nuclei, &cells, None, w, h, P).unwrap();
        // Cell 1: nuclear protein; cell 2: signal on its outline only.
        let mut prot = vec![100u16; w * h];
        for i in 0..w * h {
            if nuclei[i] == 1 {
                prot[i] = 1100;
            }
            if cells[i] == 2 && c.class[i] == MEMBRANE {
                prot[i] = 600;
            }
        }
        let p = c.profiles(&prot).unwrap();
        assert!((p[1][0] - 1.0).abs() < 1e-6, "nuclear fraction {}", p[1][0]);
        assert!((p[2][2] - 1.0).abs() < 1e-6, "membrane fraction {}", p[2][2]);
        for l in [1, 2] {
            let sum: f32 = p[l][..5].iter().sum();
            assert!((sum - 1.0).abs() < 1e-5);
        }
        // Radial position: near the centre for the nuclear cell, near the outline for the rim.
        assert!(p[1][5] < 0.5 && p[2][5] > 0.8, "radial {} {}", p[1][5], p[2][5]);
        assert!(p[0][0].is_nan(), "label 0 is no cell");
    }

    #[test]
    fn er_and_puncta_follow_the_stain_and_the_spots() {
        let (nuclei, cells, w, h) = field();
        // ER stain: bright in the columns x % 4 == 0 of the cytoplasm.
        let er: Vec<u16> = (0..w * h)
            .map(|i| if cells[i] != 0 && (i % w) % 4 == 0 { 900 } else { 200 })
            .collect();
        let c = compartments(&nuclei, &cells, Some(&er), w, h, P).unwrap();
        let mut prot = vec![100u16; w * h];
        for i in 0..w * h {
            let (x, y) = (i % w, i / w);
            if cells[i] == 1 && c.class[i] == ER {
                prot[i] = 500;
            }
            // Cell 2: a dim even cytoplasm with a few bright isolated spots.
            if cells[i] == 2 && nuclei[i] == 0 && c.class[i] != MEMBRANE {
                prot[i] = if x % 4 == 2 && y % 5 == 0 { 5000 } else { 150 };
            }
        }
        let p = c.profiles(&prot).unwrap();
        assert!(p[1][3] > 0.99, "ER fraction {}", p[1][3]);
        assert!(p[1][7] > 0.9, "ER correlation {}", p[1][7]);
        assert!(p[2][4] > 0.5, "puncta fraction {}", p[2][4]);
        assert!(
            p[2][6] > p[1][6],
            "spots are more uneven than ER: {} vs {}",
            p[2][6],
            p[1][6]
        );
    }

    #[test]
    fn virtual_planes_and_nan_are_accepted_and_shapes_checked() {
        let (nuclei, cells, w, h) = field();
        let c = compartments(&nuclei, &cells, None, w, h, P).unwrap();
        let mut prot = vec![0f32; w * h];
        for i in 0..w * h {
            if nuclei[i] != 0 {
                prot[i] = 10.0;
            }
        }
        prot[w * 16 + 16] = f32::NAN;
        let p = c.profiles(&prot).unwrap();
        assert!((p[1][0] - 1.0).abs() < 1e-6 && (p[2][0] - 1.0).abs() < 1e-6);
        assert!(c.profiles(&prot[1..]).is_err());
        assert!(compartments(&nuclei, &cells[1..], None, w, h, P).is_err());
        let bad = LocParams { rim_px: 0.0, ..P };
        assert!(compartments(&nuclei, &cells, None, w, h, bad).is_err());
    }
}
