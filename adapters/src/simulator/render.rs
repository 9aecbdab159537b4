//! Rendering a field: cell shapes rasterised to labels, stains with textures, camera noise.

use super::*;

/// One rendered row: DAPI, ER and each protein channel.
pub(super) type StainRow = (Vec<f32>, Vec<f32>, Vec<Vec<f32>>);

/// Poisson sample: exact (Knuth) for small means, normal approximation above 30 where the two are
/// indistinguishable at camera precision and the exact method would cost O(λ).
pub(super) fn poisson(rng: &mut impl Rng, lambda: f64) -> f64 {
    if lambda <= 0.0 {
        return 0.0;
    }
    if lambda > 30.0 {
        return (lambda + lambda.sqrt() * normal(rng)).round().max(0.0);
    }
    let l = (-lambda).exp();
    let mut k = 0.0;
    let mut p = 1.0;
    loop {
        p *= rng.random::<f64>();
        if p <= l {
            return k;
        }
        k += 1.0;
    }
}

pub(super) fn smoothstep(edge0: f64, edge1: f64, x: f64) -> f64 {
    let t = ((x - edge0) / (edge1 - edge0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

pub(super) fn splat(img: &mut [f32], w: usize, x: f64, y: f64, v: f32) {
    let (x0, y0) = (x.floor() as usize, y.floor() as usize);
    let (fx, fy) = ((x - x0 as f64) as f32, (y - y0 as f64) as f32);
    img[y0 * w + x0] += v * (1.0 - fx) * (1.0 - fy);
    img[y0 * w + x0 + 1] += v * fx * (1.0 - fy);
    img[(y0 + 1) * w + x0] += v * (1.0 - fx) * fy;
    img[(y0 + 1) * w + x0 + 1] += v * fx * fy;
}

pub(super) fn touches_image(c: &SimCell, w: usize, h: usize) -> bool {
    c.cx + c.cell_r >= 0.0 && c.cy + c.cell_r >= 0.0 && c.cx - c.cell_r < w as f64 && c.cy - c.cell_r < h as f64
}

#[derive(Debug, Clone)]
pub(super) struct SimCell {
    pub(super) cx: f64,
    pub(super) cy: f64,
    pub(super) nuc_r: f64,
    pub(super) nuc_aspect: f64,
    pub(super) nuc_angle: f64,
    pub(super) nuc_harm: [(f64, f64); 4],
    pub(super) cell_r: f64,
    pub(super) cell_harm: [(f64, f64); 4],
    pub(super) mitotic: bool,
    pub(super) brightness: f64,
    pub(super) microtubules: f64,
    pub(super) er: f64,
    pub(super) z: [f64; LATENT],
    pub(super) expression: Vec<f64>,
    pub(super) stream: u64,
}

impl SimCell {
    /// Normalised radial distance to the nucleus outline (< 1 inside).
    pub(super) fn nucleus_rho(&self, x: f64, y: f64) -> f64 {
        let (dx, dy) = (x - self.cx, y - self.cy);
        let (s, c) = self.nuc_angle.sin_cos();
        let u = dx * c + dy * s;
        let v = -dx * s + dy * c;
        let a = self.nuc_r * self.nuc_aspect.sqrt();
        let b = self.nuc_r / self.nuc_aspect.sqrt();
        let theta = v.atan2(u);
        ((u / a).powi(2) + (v / b).powi(2)).sqrt() / outline(&self.nuc_harm, theta)
    }

    pub(super) fn cell_rho(&self, x: f64, y: f64) -> f64 {
        let (dx, dy) = (x - self.cx, y - self.cy);
        (dx * dx + dy * dy).sqrt() / (self.cell_r * outline(&self.cell_harm, dy.atan2(dx)))
    }
}

pub(super) fn outline(harm: &[(f64, f64); 4], theta: f64) -> f64 {
    1.0 + harm
        .iter()
        .enumerate()
        .map(|(k, (a, p))| a * ((k as f64 + 2.0) * theta + p).cos())
        .sum::<f64>()
}

/// Who owns each pixel. Overlaps are resolved by the smaller normalised distance, which gives
/// curved, plausible borders between neighbours.
pub(super) struct Geometry {
    pub(super) nuclei: Vec<u32>,
    pub(super) cells: Vec<u32>,
    pub(super) nuc_rho: Vec<f32>,
    pub(super) cell_rho: Vec<f32>,
    /// Label of cell `i` in the placed list (0 when its nucleus is not in the image).
    pub(super) id_of: Vec<u32>,
    /// Placed-list index of label `l`.
    pub(super) index_of: Vec<usize>,
    pub(super) nucleus_area: Vec<u64>,
    pub(super) cell_area: Vec<u64>,
}

pub(super) fn rasterize(cells: &[SimCell], w: usize, h: usize) -> Geometry {
    let mut nuclei = vec![0u32; w * h];
    let mut nuc_rho = vec![f32::INFINITY; w * h];
    let mut owner_nuc = vec![u32::MAX; w * h];
    for (ci, c) in cells.iter().enumerate() {
        let r = c.nuc_r * c.nuc_aspect.sqrt() * 1.5;
        for_box(c.cx, c.cy, r, w, h, |x, y| {
            let rho = c.nucleus_rho(x as f64, y as f64) as f32;
            let i = y * w + x;
            if rho < 1.0 && rho < nuc_rho[i] {
                nuc_rho[i] = rho;
                owner_nuc[i] = ci as u32;
            }
        });
    }
    // Labels are dense and assigned in placement order to the cells whose nucleus is visible.
    let mut id_of = vec![0u32; cells.len()];
    let mut index_of = vec![usize::MAX];
    for &o in &owner_nuc {
        if o != u32::MAX && id_of[o as usize] == 0 {
            id_of[o as usize] = 1;
        }
    }
    for (ci, id) in id_of.iter_mut().enumerate() {
        if *id != 0 {
            *id = index_of.len() as u32;
            index_of.push(ci);
        }
    }
    for (n, &o) in nuclei.iter_mut().zip(&owner_nuc) {
        if o != u32::MAX {
            *n = id_of[o as usize];
        }
    }
    let mut cell_labels = vec![0u32; w * h];
    let mut cell_rho = vec![f32::INFINITY; w * h];
    for (ci, c) in cells.iter().enumerate() {
        let id = id_of[ci];
        if id == 0 {
            continue;
        }
        for_box(c.cx, c.cy, c.cell_r * 1.8, w, h, |x, y| {
            let rho = c.cell_rho(x as f64, y as f64) as f32;
            let i = y * w + x;
            if rho < 1.0 && rho < cell_rho[i] {
                cell_rho[i] = rho;
                cell_labels[i] = id;
            }
        });
    }
    for i in 0..w * h {
        if nuclei[i] != 0 {
            cell_labels[i] = nuclei[i];
            cell_rho[i] = cell_rho[i].min(0.5);
        }
    }
    let n = index_of.len();
    let mut nucleus_area = vec![0u64; n];
    let mut cell_area = vec![0u64; n];
    for i in 0..w * h {
        nucleus_area[nuclei[i] as usize] += 1;
        cell_area[cell_labels[i] as usize] += 1;
    }
    Geometry {
        nuclei,
        cells: cell_labels,
        nuc_rho,
        cell_rho,
        id_of,
        index_of,
        nucleus_area,
        cell_area,
    }
}

pub(super) fn for_box(cx: f64, cy: f64, r: f64, w: usize, h: usize, mut f: impl FnMut(usize, usize)) {
    let x0 = (cx - r).floor().max(0.0) as usize;
    let y0 = (cy - r).floor().max(0.0) as usize;
    let x1 = ((cx + r).ceil() as i64).clamp(0, w as i64) as usize;
    let y1 = ((cy + r).ceil() as i64).clamp(0, h as i64) as usize;
    for y in y0..y1 {
        for x in x0..x1 {
            f(x, y);
        }
    }
}

/// Smooth random textures shared by all cells of a field.
pub(super) struct Textures {
    pub(super) fine: Vec<f32>,
    pub(super) coarse: Vec<f32>,
    /// 1 on the ridges of a noise field: a reticular, ER-like network.
    pub(super) ridge: Vec<f32>,
}

impl Textures {
    pub(super) fn new(w: usize, h: usize, ids: &[u64; 5]) -> Self {
        let fine = value_noise(w, h, 2.5, ids, 1);
        let coarse = value_noise(w, h, 9.0, ids, 2);
        let ridge = value_noise(w, h, 4.0, ids, 3)
            .into_iter()
            .map(|v| 1.0 - (2.0 * v - 1.0).abs())
            .collect();
        Self { fine, coarse, ridge }
    }
}

/// Value noise in `[0, 1]`: a random lattice every `scale` pixels, smoothly interpolated.
pub(super) fn value_noise(w: usize, h: usize, scale: f64, ids: &[u64; 5], which: u64) -> Vec<f32> {
    let gw = (w as f64 / scale).ceil() as usize + 2;
    let gh = (h as f64 / scale).ceil() as usize + 2;
    let mut rng = rng_for(&[ids[0], STREAM_TEXTURE, ids[1], ids[2], ids[3], ids[4], which]);
    let grid: Vec<f32> = (0..gw * gh).map(|_| rng.random::<f32>()).collect();
    let mut out = vec![0f32; w * h];
    out.par_chunks_mut(w).enumerate().for_each(|(y, row)| {
        let gy = y as f64 / scale;
        let (y0, ty) = (gy.floor() as usize, gy.fract());
        let sy = (ty * ty * (3.0 - 2.0 * ty)) as f32;
        for (x, o) in row.iter_mut().enumerate() {
            let gx = x as f64 / scale;
            let (x0, tx) = (gx.floor() as usize, gx.fract());
            let sx = (tx * tx * (3.0 - 2.0 * tx)) as f32;
            let g = |xx: usize, yy: usize| grid[yy * gw + xx];
            let a = g(x0, y0) * (1.0 - sx) + g(x0 + 1, y0) * sx;
            let b = g(x0, y0 + 1) * (1.0 - sx) + g(x0 + 1, y0 + 1) * sx;
            *o = a * (1.0 - sy) + b * sy;
        }
    });
    out
}
