//! A seeded, deterministic HCS plate: cells with latent states, wells with perturbations, genes
//! whose expression some stains reveal and some do not, and a camera that adds real noise.
//!
//! Every random draw comes from a ChaCha stream keyed by (seed, purpose, well, field, ...), so a
//! field renders to the same bytes whatever the thread count or the order fields are asked for.
//! That is what lets tests compare the daemon's output to the simulator pixel for pixel.

use std::f64::consts::PI;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::Sender;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::model::{AcquisitionPlan, ChannelInfo, FieldKey, Frame, Name, Pixels, PlateFormat, WellId};
use crate::source::{wait_until, Source, SourceError, SourceReport, StopToken};
use crate::Invalid;

mod config;
mod render;
#[cfg(test)]
mod tests;

pub use config::*;
use render::*;

/// The three ProtiCelli landmark stains, always the first channels, with their display colours.
pub const LANDMARKS: [(&str, &str); 3] = [("DAPI", "0000FF"), ("Microtubules", "FF0000"), ("ER", "FFFF00")];
const PROTEIN_COLORS: [&str; 4] = ["00FF00", "FF00FF", "00FFFF", "FFFFFF"];

/// Per-gene expression model: `log e = base + weights · z`. Visible genes load only on visible
/// latent dimensions; invisible ones only on the hidden dimensions.
#[derive(Debug, Clone, Serialize)]
pub struct GeneModel {
    pub names: Vec<String>,
    pub visible: Vec<bool>,
    pub base: Vec<f64>,
    pub weights: Vec<[f64; LATENT]>,
    /// Proteins translated from these genes (`translated_proteins`), never imaged.
    pub translation: Vec<Translation>,
}

/// How one unimaged protein follows its genes: `ln p = offset + gain · Σ weights · ln e + noise_sd · ε`,
/// with `ε` drawn per cell.
#[derive(Debug, Clone, Serialize)]
pub struct Translation {
    pub name: String,
    /// Indices of the genes it is translated from, all visible or all invisible.
    pub genes: Vec<usize>,
    pub weights: Vec<f64>,
    pub gain: f64,
    pub offset: f64,
    pub noise_sd: f64,
    /// Whether its genes are visible genes (so the images carry information about it).
    pub visible: bool,
}

/// Ground truth of one simulated cell.
#[derive(Debug, Clone, Serialize)]
pub struct CellTruth {
    pub label: u32,
    pub centroid_x: f64,
    pub centroid_y: f64,
    pub nucleus_area_px: u64,
    pub cell_area_px: u64,
    pub mitotic: bool,
    pub latent: [f64; LATENT],
    pub expression: Vec<f64>,
    /// Abundance of each translated protein ([`GeneModel::translation`] order), never imaged.
    pub translated: Vec<f64>,
    /// Per protein channel: the share of its signal drawn in a relocalization's target
    /// compartment (0 outside relocalizing wells).
    pub relocalized: Vec<f64>,
    /// Per protein channel: the fraction of the cell's noise-free signal in each compartment
    /// ([`COMPARTMENTS`] order), summed before the point-spread function; NaN for a cell with no
    /// signal.
    pub localization: Vec<[f64; 5]>,
}

/// A rendered field: the camera images and everything a test needs to judge a pipeline.
#[derive(Debug, Clone)]
pub struct SimulatedField {
    pub key: FieldKey,
    pub width: usize,
    pub height: usize,
    /// Raw camera images, one per channel of the plan.
    pub channels: Vec<Vec<u16>>,
    pub nuclei_labels: Vec<u32>,
    pub cell_labels: Vec<u32>,
    pub cells: Vec<CellTruth>,
    /// Noise-free protein images (photoelectrons before the camera), one per protein channel.
    pub protein_clean: Vec<Vec<f32>>,
}

/// The generator. Cheap to clone; rendering a field needs only `&self`.
#[derive(Debug, Clone)]
pub struct Simulator {
    cfg: SimulatorConfig,
    plan: AcquisitionPlan,
    genes: GeneModel,
    controls: Vec<WellId>,
    skip: std::collections::HashSet<FieldKey>,
}

/// SplitMix64: turns (seed, stream ids) into independent, well-mixed ChaCha seeds.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn rng_for(parts: &[u64]) -> ChaCha8Rng {
    let mut h = 0x5EED_u64;
    for &p in parts {
        h = mix(h ^ p);
    }
    ChaCha8Rng::seed_from_u64(h)
}

fn normal(rng: &mut impl Rng) -> f64 {
    StandardNormal.sample(rng)
}

const STREAM_GENES: u64 = 1;
const STREAM_WELL: u64 = 2;
const STREAM_CELLS: u64 = 3;
const STREAM_TEXTURE: u64 = 4;
const STREAM_NOISE: u64 = 5;
const STREAM_RELOCALIZATION: u64 = 6;
const STREAM_TRANSLATION: u64 = 7;

/// Per-cell sums of a protein's noise-free signal by compartment, along one row: runs of one
/// label, so a row holds few entries.
type RowSums = Vec<(u32, [f64; 5])>;

fn add_to(sums: &mut RowSums, label: u32, part: usize, v: f64) {
    match sums.last_mut() {
        Some((l, s)) if *l == label => s[part] += v,
        _ => {
            let mut s = [0.0; 5];
            s[part] = v;
            sums.push((label, s));
        }
    }
}

impl Simulator {
    pub fn new(cfg: SimulatorConfig) -> Result<Self, SourceError> {
        let issues = cfg.validate();
        if !issues.is_empty() {
            let msg: Vec<String> = issues.iter().map(|i| i.to_string()).collect();
            return Err(SourceError::Config(msg.join("; ")));
        }
        let format = PlateFormat::new(cfg.plate_format)?;
        let wells = cfg
            .wells
            .iter()
            .map(|w| WellId::parse(w, format))
            .collect::<Result<Vec<_>, _>>()?;
        let controls = cfg
            .control_wells
            .iter()
            .map(|w| WellId::parse(w, format))
            .collect::<Result<Vec<_>, _>>()?;
        let mut channels: Vec<ChannelInfo> = LANDMARKS
            .iter()
            .map(|(n, c)| ChannelInfo {
                name: n.to_string(),
                color: c.to_string(),
            })
            .collect();
        for (i, p) in cfg.proteins.iter().enumerate() {
            channels.push(ChannelInfo {
                name: p.name.clone(),
                color: PROTEIN_COLORS[i % PROTEIN_COLORS.len()].to_string(),
            });
        }
        let plan = AcquisitionPlan {
            plate: Name::new(&cfg.plate)?,
            format,
            channels,
            width: cfg.width_px as usize,
            height: cfg.height_px as usize,
            pixel_size_um: cfg.pixel_size_um,
            wells,
            fields_per_well: cfg.fields_per_well,
            timepoints: cfg.timepoints,
            controls: controls.clone(),
        };
        let genes = Self::gene_model(&cfg);
        Ok(Self {
            cfg,
            plan,
            genes,
            controls,
            skip: Default::default(),
        })
    }

    pub fn config(&self) -> &SimulatorConfig {
        &self.cfg
    }

    pub fn genes(&self) -> &GeneModel {
        &self.genes
    }

    fn gene_model(cfg: &SimulatorConfig) -> GeneModel {
        let mut rng = rng_for(&[cfg.gene_seed.unwrap_or(cfg.seed), STREAM_GENES]);
        let g = cfg.genes as usize;
        let width = g.to_string().len().max(3);
        let mut m = GeneModel {
            names: (1..=g).map(|i| format!("G{i:0width$}")).collect(),
            visible: (0..g).map(|i| i < cfg.visible_genes as usize).collect(),
            base: Vec::with_capacity(g),
            weights: Vec::with_capacity(g),
            translation: Vec::new(),
        };
        for i in 0..g {
            m.base.push(1.0 + 1.5 * rng.random::<f64>());
            let mut w = [0.0; LATENT];
            let dims = if m.visible[i] {
                0..VISIBLE_LATENT
            } else {
                VISIBLE_LATENT..LATENT
            };
            for d in dims {
                w[d] = 0.6 * normal(&mut rng);
            }
            m.weights.push(w);
        }
        // Its own stream: the gene model above draws what it drew before proteins existed.
        let mut rng = rng_for(&[cfg.gene_seed.unwrap_or(cfg.seed), STREAM_TRANSLATION]);
        let (visible, hidden): (Vec<usize>, Vec<usize>) = (0..g).partition(|&i| m.visible[i]);
        let width = (cfg.translated_proteins as usize).to_string().len().max(3);
        for j in 0..cfg.translated_proteins as usize {
            let from_visible = j % 2 == 0;
            let pool = if from_visible { &visible } else { &hidden };
            if pool.is_empty() {
                break;
            }
            let k = if pool.len() > 1 && rng.random::<f64>() < 0.5 {
                2
            } else {
                1
            };
            let mut genes = Vec::with_capacity(k);
            while genes.len() < k {
                let gi = pool[rng.random_range(0..pool.len())];
                if !genes.contains(&gi) {
                    genes.push(gi);
                }
            }
            let weights = (0..k).map(|_| 0.5 + 0.5 * rng.random::<f64>()).collect();
            m.translation.push(Translation {
                name: format!("P{:0width$}", j + 1),
                genes,
                weights,
                gain: 0.6 + 0.6 * rng.random::<f64>(),
                offset: -0.5 + rng.random::<f64>(),
                noise_sd: 0.1 + 0.15 * rng.random::<f64>(),
                visible: from_visible,
            });
        }
        m
    }

    /// Each translated protein's abundance in a cell of this expression; the noise is drawn from
    /// the cell's own stream, so nothing else a plate renders changes with it.
    fn translate(&self, expression: &[f64], cell_stream: u64) -> Vec<f64> {
        if self.genes.translation.is_empty() {
            return Vec::new();
        }
        let mut rng = rng_for(&[self.cfg.seed, STREAM_TRANSLATION, cell_stream]);
        self.genes
            .translation
            .iter()
            .map(|t| {
                let drive: f64 = t
                    .genes
                    .iter()
                    .zip(&t.weights)
                    .map(|(&g, w)| w * expression[g].ln())
                    .sum();
                (t.offset + t.gain * drive + t.noise_sd * normal(&mut rng)).exp()
            })
            .collect()
    }

    /// The perturbation of a well: zero for controls, otherwise a seeded random shift.
    pub fn well_shift(&self, well: WellId) -> [f64; LATENT] {
        if self.controls.contains(&well) {
            return [0.0; LATENT];
        }
        let mut rng = rng_for(&[self.cfg.seed, STREAM_WELL, well.row as u64, well.column as u64]);
        let mut s = [0.0; LATENT];
        for v in s.iter_mut() {
            *v = self.cfg.perturbation_strength * normal(&mut rng) / (LATENT as f64).sqrt() * 2.0;
        }
        s
    }

    /// Renders one field. Pure function of (config, well, field, timepoint).
    pub fn render(&self, well: WellId, field: u32, timepoint: u32) -> SimulatedField {
        let (w, h) = (self.plan.width, self.plan.height);
        let key = FieldKey {
            plate: self.plan.plate.clone(),
            well,
            field,
            timepoint,
        };
        let ids = [
            self.cfg.seed,
            well.row as u64,
            well.column as u64,
            field as u64,
            timepoint as u64,
        ];
        let cells = self.place_cells(well, &ids);
        let geo = rasterize(&cells, w, h);
        let tex = Textures::new(w, h, &ids);
        let moved = self.relocalized(well, &cells);
        let (mut clean, sums) = self.stain_images(&cells, &geo, &tex, (w, h), &ids, &moved);
        let protein_clean: Vec<Vec<f32>> = clean[3..].to_vec();
        let raw: Vec<Vec<u16>> = clean
            .iter_mut()
            .enumerate()
            .map(|(c, img)| self.camera(img, w, h, &ids, c as u64))
            .collect();
        let truth = cells
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let label = geo.id_of[i];
                (label != 0).then(|| CellTruth {
                    label,
                    centroid_x: c.cx,
                    centroid_y: c.cy,
                    nucleus_area_px: geo.nucleus_area[label as usize],
                    cell_area_px: geo.cell_area[label as usize],
                    mitotic: c.mitotic,
                    latent: c.z,
                    expression: c.expression.clone(),
                    translated: self.translate(&c.expression, c.stream),
                    relocalized: moved.iter().map(|m| m[i]).collect(),
                    localization: sums
                        .iter()
                        .map(|by_label| {
                            let s = by_label[label as usize];
                            let total: f64 = s.iter().sum();
                            s.map(|v| if total > 0.0 { v / total } else { f64::NAN })
                        })
                        .collect(),
                })
            })
            .collect();
        SimulatedField {
            key,
            width: w,
            height: h,
            channels: raw,
            nuclei_labels: geo.nuclei,
            cell_labels: geo.cells,
            cells: truth,
            protein_clean,
        }
    }

    /// Per protein channel and placed cell: the share of its signal relocalized in this well.
    /// Drawn from its own stream per cell, so plates without relocalization render the same
    /// bytes as before it existed.
    fn relocalized(&self, well: WellId, cells: &[SimCell]) -> Vec<Vec<f64>> {
        let format = self.plan.format;
        self.cfg
            .proteins
            .iter()
            .map(|p| {
                let r = self.cfg.relocalization.iter().find(|r| {
                    r.protein == p.name && r.wells.iter().any(|w| WellId::parse(w, format).ok() == Some(well))
                });
                cells
                    .iter()
                    .map(|c| {
                        r.map_or(0.0, |r| {
                            let mut rng = rng_for(&[self.cfg.seed, STREAM_RELOCALIZATION, c.stream]);
                            (r.fraction + 0.15 * normal(&mut rng)).clamp(0.0, 1.0)
                        })
                    })
                    .collect()
            })
            .collect()
    }

    fn place_cells(&self, well: WellId, ids: &[u64; 5]) -> Vec<SimCell> {
        let cfg = &self.cfg;
        let mut rng = rng_for(&[ids[0], STREAM_CELLS, ids[1], ids[2], ids[3], ids[4]]);
        let px = cfg.pixel_size_um;
        let (w, h) = (cfg.width_px as f64, cfg.height_px as f64);
        let nuc_r = cfg.nucleus_diameter_um / px / 2.0;
        let cell_r = cfg.cell_diameter_um / px / 2.0;
        let margin = cell_r;
        let area_mm2 = (w + 2.0 * margin) * (h + 2.0 * margin) * px * px * 1e-6;
        let target = (cfg.cell_density_per_mm2 * area_mm2).round() as usize;
        let shift = self.well_shift(well);
        let stain_drop = (1.0 - cfg.nuclear_stain_gradient).ln();
        let stain_at = |cx: f64| (stain_drop * (cx / w).clamp(0.0, 1.0)).exp();
        let mut cells: Vec<SimCell> = Vec::with_capacity(target);
        let mut attempts = 0;
        while cells.len() < target && attempts < target * 200 {
            attempts += 1;
            let mut z = [0.0; LATENT];
            for (d, v) in z.iter_mut().enumerate() {
                *v = shift[d] + normal(&mut rng);
            }
            let mitotic = rng.random::<f64>() < cfg.mitotic_fraction;
            let size_n = (0.10 * z[1] + 0.08 * normal(&mut rng)).exp() * if mitotic { 0.72 } else { 1.0 };
            let r_n = nuc_r * size_n;
            let touching = !cells.is_empty() && rng.random::<f64>() < cfg.touching_fraction;
            let (cx, cy) = if touching {
                let other = &cells[rng.random_range(0..cells.len())];
                let ang = rng.random::<f64>() * 2.0 * PI;
                let d = (other.nuc_r + r_n) * (0.88 + 0.12 * rng.random::<f64>());
                (other.cx + d * ang.cos(), other.cy + d * ang.sin())
            } else {
                (
                    -margin + rng.random::<f64>() * (w + 2.0 * margin),
                    -margin + rng.random::<f64>() * (h + 2.0 * margin),
                )
            };
            // Nuclei may touch (the touching ones sit at 0.88-1.0x the sum of radii) but never pile up.
            let min_factor = if touching { 0.85 } else { 1.25 };
            if cells
                .iter()
                .any(|o| ((o.cx - cx).powi(2) + (o.cy - cy).powi(2)).sqrt() < min_factor * (o.nuc_r + r_n))
            {
                continue;
            }
            let harmonics = |rng: &mut ChaCha8Rng, amp: f64| -> [(f64, f64); 4] {
                let mut hs = [(0.0, 0.0); 4];
                for (k, hk) in hs.iter_mut().enumerate() {
                    *hk = (
                        amp * rng.random::<f64>() / (k + 1) as f64,
                        rng.random::<f64>() * 2.0 * PI,
                    );
                }
                hs
            };
            let expression = (0..self.genes.names.len())
                .map(|g| {
                    let lin: f64 = self.genes.weights[g].iter().zip(&z).map(|(a, b)| a * b).sum();
                    (self.genes.base[g] + lin).exp()
                })
                .collect();
            cells.push(SimCell {
                cx,
                cy,
                nuc_r: r_n,
                nuc_aspect: 1.0 + 0.35 * rng.random::<f64>(),
                nuc_angle: rng.random::<f64>() * PI,
                nuc_harm: harmonics(&mut rng, 0.08),
                cell_r: cell_r * (0.12 * z[0] + 0.12 * normal(&mut rng)).exp(),
                cell_harm: harmonics(&mut rng, 0.35),
                mitotic,
                brightness: (0.15 * z[1] + 0.1 * normal(&mut rng)).exp()
                    * if mitotic { cfg.mitotic_brightness } else { 1.0 }
                    * stain_at(cx),
                microtubules: (0.25 * z[2] + 0.1 * normal(&mut rng)).exp(),
                er: (0.2 * (z[0] - z[2]) + 0.1 * normal(&mut rng)).exp(),
                z,
                expression,
                stream: rng.random(),
            });
        }
        cells
    }

    fn stain_images(
        &self,
        cells: &[SimCell],
        geo: &Geometry,
        tex: &Textures,
        (w, h): (usize, usize),
        ids: &[u64; 5],
        moved: &[Vec<f64>],
    ) -> (Vec<Vec<f32>>, Vec<Vec<[f64; 5]>>) {
        let n_protein = self.cfg.proteins.len();
        // Where each protein goes in relocalizing wells (its own compartment elsewhere).
        let target: Vec<Localization> = self
            .cfg
            .proteins
            .iter()
            .map(|p| {
                self.cfg
                    .relocalization
                    .iter()
                    .find(|r| r.protein == p.name)
                    .map_or(p.localization, |r| r.to)
            })
            .collect();
        // Relative expression of the gene each protein reports, so that brightness follows biology.
        let protein_gene: Vec<usize> = (0..n_protein)
            .map(|p| p % (self.cfg.visible_genes.max(1) as usize).min(self.genes.names.len()))
            .collect();
        let gene_scale: Vec<f64> = protein_gene
            .iter()
            .map(|&g| {
                let w2: f64 = self.genes.weights[g].iter().map(|v| v * v).sum();
                (self.genes.base[g] + 0.5 * w2).exp()
            })
            .collect();
        let peak = self.cfg.camera.peak_signal_electrons as f32;
        let mut dapi = vec![0f32; w * h];
        let mut er = vec![0f32; w * h];
        let mut prot: Vec<Vec<f32>> = vec![vec![0f32; w * h]; n_protein];
        // Per-pixel stains: rows in parallel, each pixel a pure function of geometry and textures.
        let rows: Vec<(StainRow, Vec<RowSums>)> = (0..h)
            .into_par_iter()
            .map(|y| {
                let mut d = vec![0f32; w];
                let mut e = vec![0f32; w];
                let mut pr = vec![vec![0f32; w]; n_protein];
                let mut sums: Vec<RowSums> = vec![Vec::new(); n_protein];
                for x in 0..w {
                    let i = y * w + x;
                    let cl = geo.cells[i];
                    if cl == 0 {
                        continue;
                    }
                    let c = &cells[geo.index_of[cl as usize]];
                    let nl = geo.nuclei[i];
                    let rho_c = geo.cell_rho[i];
                    let dx = x as f64 - c.cx;
                    let dy = y as f64 - c.cy;
                    let rn = (dx * dx + dy * dy).sqrt() / c.nuc_r;
                    if nl != 0 {
                        let edge = smoothstep(1.0, 0.8, geo.nuc_rho[i] as f64) as f32;
                        let chrom = if c.mitotic {
                            0.3 + 1.4 * tex.fine[i] * tex.fine[i]
                        } else {
                            0.7 + 0.35 * tex.fine[i] + 0.15 * tex.coarse[i]
                        };
                        d[x] = peak * c.brightness as f32 * chrom * edge;
                        e[x] = 0.08 * peak * c.er as f32;
                    } else {
                        let t = ((rn - 1.0) / (c.cell_r / c.nuc_r - 1.0)).clamp(0.0, 1.0) as f32;
                        let rim = (-((rn - 1.05).powi(2)) / 0.02).exp() as f32;
                        let reticulum = tex.ridge[i].powi(3);
                        let fade = smoothstep(1.0, 0.85, rho_c as f64) as f32;
                        e[x] = 0.5
                            * peak
                            * c.er as f32
                            * fade
                            * ((0.25 + 0.75 * (-3.0 * t).exp()) * (0.35 + 0.65 * reticulum) + 0.6 * rim);
                    }
                    let pattern = |loc: Localization| -> f32 {
                        match loc {
                            Localization::Nuclear => {
                                if nl != 0 {
                                    0.8 + 0.4 * tex.coarse[i]
                                } else {
                                    0.0
                                }
                            }
                            Localization::Cytoplasmic => {
                                if nl == 0 {
                                    (0.7 + 0.3 * tex.coarse[i]) * smoothstep(1.0, 0.85, rho_c as f64) as f32
                                } else {
                                    0.1
                                }
                            }
                            Localization::Membrane => smoothstep(0.8, 0.97, rho_c as f64) as f32,
                            Localization::Er => {
                                if nl == 0 {
                                    0.35 + 0.65 * tex.ridge[i].powi(3)
                                } else {
                                    0.0
                                }
                            }
                            Localization::Mitochondria => 0.0,
                        }
                    };
                    for (p, out) in pr.iter_mut().enumerate() {
                        let g = protein_gene[p];
                        let level = (c.expression[g] / gene_scale[p]) as f32;
                        let home = self.cfg.proteins[p].localization;
                        let m = moved[p][geo.index_of[cl as usize]] as f32;
                        let a_home = 0.4 * peak * level * (1.0 - m) * pattern(home);
                        let a_to = 0.4 * peak * level * m * pattern(target[p]);
                        out[x] = a_home + a_to;
                        add_to(&mut sums[p], cl, home.compartment(), f64::from(a_home));
                        add_to(&mut sums[p], cl, target[p].compartment(), f64::from(a_to));
                    }
                }
                ((d, e, pr), sums)
            })
            .collect();
        let labels = geo.index_of.len();
        let mut truth = vec![vec![[0f64; 5]; labels]; n_protein];
        let rows: Vec<StainRow> = rows
            .into_iter()
            .map(|(row, sums)| {
                for (p, s) in sums.into_iter().enumerate() {
                    for (l, v) in s {
                        for k in 0..5 {
                            truth[p][l as usize][k] += v[k];
                        }
                    }
                }
                row
            })
            .collect();
        for (y, (d, e, pr)) in rows.into_iter().enumerate() {
            dapi[y * w..(y + 1) * w].copy_from_slice(&d);
            er[y * w..(y + 1) * w].copy_from_slice(&e);
            for (p, row) in pr.into_iter().enumerate() {
                prot[p][y * w..(y + 1) * w].copy_from_slice(&row);
            }
        }
        // Filaments and organelles are drawn per cell, sequentially, into shared images.
        let mut mt = vec![0f32; w * h];
        for (ci, c) in cells.iter().enumerate() {
            let label = geo.id_of[ci];
            if label == 0 && !touches_image(c, w, h) {
                continue;
            }
            let mut rng = rng_for(&[ids[0], STREAM_TEXTURE, c.stream]);
            let owner = geo.id_of[ci];
            let n_fil = (18.0 * c.microtubules * (c.cell_r / 20.0)).round() as usize + 6;
            let amp = 0.45 * peak * c.microtubules as f32;
            let start_r = c.nuc_r * 1.1;
            for _ in 0..n_fil {
                let a0 = rng.random::<f64>() * 2.0 * PI;
                let curl = 0.02 * normal(&mut rng);
                let (mut x, mut y) = (c.cx + start_r * a0.cos(), c.cy + start_r * a0.sin());
                let mut a = a0 + 0.3 * normal(&mut rng);
                for _ in 0..(c.cell_r * 3.0) as usize {
                    x += 0.7 * a.cos();
                    y += 0.7 * a.sin();
                    a += curl;
                    if x < 0.0 || y < 0.0 || x >= (w - 1) as f64 || y >= (h - 1) as f64 {
                        break;
                    }
                    let i = y as usize * w + x as usize;
                    if owner == 0 || geo.cells[i] != owner {
                        break;
                    }
                    splat(&mut mt, w, x, y, amp);
                }
            }
            for p in 0..n_protein {
                // Spots carry the share of the signal that sits in mitochondria: all of it for a
                // mitochondrial protein outside relocalizing wells.
                let m = moved[p][ci] as f32;
                let share = match (self.cfg.proteins[p].localization, target[p]) {
                    (Localization::Mitochondria, Localization::Mitochondria) => 1.0,
                    (Localization::Mitochondria, _) => 1.0 - m,
                    (_, Localization::Mitochondria) => m,
                    _ => 0.0,
                };
                if share == 0.0 || owner == 0 {
                    continue;
                }
                let level = share * (c.expression[protein_gene[p]] / gene_scale[p]) as f32;
                let n_spots = (c.cell_r * c.cell_r * 0.12) as usize;
                for _ in 0..n_spots {
                    let a = rng.random::<f64>() * 2.0 * PI;
                    let r = c.nuc_r * 1.1 + rng.random::<f64>().sqrt() * (c.cell_r - c.nuc_r * 1.1) * 0.9;
                    let (sx, sy) = (c.cx + r * a.cos(), c.cy + r * a.sin());
                    let len = 1 + rng.random_range(0..4);
                    let dir = rng.random::<f64>() * PI;
                    for s in 0..len {
                        let (px, py) = (sx + s as f64 * dir.cos(), sy + s as f64 * dir.sin());
                        if px < 0.0 || py < 0.0 || px >= (w - 1) as f64 || py >= (h - 1) as f64 {
                            continue;
                        }
                        if geo.cells[py as usize * w + px as usize] == owner {
                            splat(&mut prot[p], w, px, py, 1.2 * peak * level);
                            truth[p][owner as usize][4] += f64::from(1.2 * peak * level);
                        }
                    }
                }
            }
        }
        // Optics: everything is seen through the same point-spread function.
        let blur = |img: Vec<f32>, s: f32| liveomics_kernels::cpu::gaussian_blur(&img, w, h, s).unwrap_or(img);
        let mut cytoplasm_mt = vec![0f32; w * h];
        for (i, o) in cytoplasm_mt.iter_mut().enumerate() {
            let cl = geo.cells[i];
            if cl != 0 && geo.nuclei[i] == 0 {
                let c = &cells[geo.index_of[cl as usize]];
                *o = 0.05 * peak * c.microtubules as f32 * smoothstep(1.0, 0.85, geo.cell_rho[i] as f64) as f32;
            }
        }
        let mt: Vec<f32> = blur(mt, 0.8).iter().zip(&cytoplasm_mt).map(|(a, b)| a + b).collect();
        let mut out = vec![blur(dapi, 0.9), mt, blur(er, 0.9)];
        out.extend(prot.into_iter().map(|p| blur(p, 0.9)));
        (out, truth)
    }

    /// Photons to camera counts: background and vignetting, Poisson shot noise, read noise, offset.
    fn camera(&self, clean: &mut [f32], w: usize, h: usize, ids: &[u64; 5], channel: u64) -> Vec<u16> {
        let cam = &self.cfg.camera;
        let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
        let rmax2 = cx * cx + cy * cy;
        let mut out = vec![0u16; w * h];
        out.par_chunks_mut(w).enumerate().for_each(|(y, row)| {
            let mut rng = rng_for(&[ids[0], STREAM_NOISE, ids[1], ids[2], ids[3], ids[4], channel, y as u64]);
            for (x, o) in row.iter_mut().enumerate() {
                let r2 = ((x as f64 - cx).powi(2) + (y as f64 - cy).powi(2)) / rmax2;
                let flat = 1.0 - cam.vignetting * r2;
                let lambda = (clean[y * w + x] as f64 + cam.background_electrons) * flat;
                let electrons = poisson(&mut rng, lambda);
                let adu = cam.offset_adu
                    + cam.gain_adu_per_electron * (electrons + cam.read_noise_electrons * normal(&mut rng));
                *o = adu.round().clamp(0.0, 65535.0) as u16;
            }
        });
        clean.iter_mut().for_each(|v| *v = v.max(0.0));
        out
    }
}

impl Source for Simulator {
    fn plan(&self) -> &AcquisitionPlan {
        &self.plan
    }

    /// A simulated microscope waits between fields only at a positive rate; at 0 it delivers as
    /// fast as the pipeline takes them, like a replay at `max` speed, and nothing waits on a field.
    fn paced(&self) -> bool {
        self.cfg.rate_fields_per_s > 0.0
    }

    fn skip(&mut self, done: &[FieldKey]) {
        self.skip.extend(done.iter().cloned());
    }

    fn run(&mut self, out: &Sender<Frame>, stop: &StopToken) -> Result<SourceReport, SourceError> {
        let mut report = SourceReport::default();
        let period =
            (self.cfg.rate_fields_per_s > 0.0).then(|| Duration::from_secs_f64(1.0 / self.cfg.rate_fields_per_s));
        let start = Instant::now();
        let mut k = 0u32;
        for t in 0..self.plan.timepoints {
            for &well in &self.plan.wells {
                for f in 0..self.plan.fields_per_well {
                    let key = FieldKey {
                        plate: self.plan.plate.clone(),
                        well,
                        field: f,
                        timepoint: t,
                    };
                    if self.skip.contains(&key) {
                        continue;
                    }
                    if let Some(p) = period {
                        wait_until(start + p * k, stop);
                    }
                    if stop.is_stopped() {
                        report.stopped_early = true;
                        return Ok(report);
                    }
                    k += 1;
                    let field = self.render(well, f, t);
                    let acquired_at = SystemTime::now();
                    for (c, px) in field.channels.into_iter().enumerate() {
                        let frame = Frame {
                            key: field.key.clone(),
                            channel: c,
                            width: field.width,
                            height: field.height,
                            pixels: Pixels::U16(Arc::from(px)),
                            acquired_at,
                            received_at: Instant::now(),
                            origin: Default::default(),
                        };
                        report.send(out, frame)?;
                    }
                    report.fields += 1;
                }
            }
        }
        Ok(report)
    }
}
