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

/// Latent dimensions per cell: the first [`VISIBLE_LATENT`] shape the images, the rest only drive
/// "invisible" genes, which no image model should be able to predict (the controls).
pub const LATENT: usize = 6;
pub const VISIBLE_LATENT: usize = 3;

/// Where a protein channel's signal sits in the cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Localization {
    Nuclear,
    Cytoplasmic,
    Mitochondria,
    Membrane,
    Er,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProteinChannel {
    /// Channel label, e.g. the protein's gene symbol.
    pub name: String,
    pub localization: Localization,
}

/// The camera model: photoelectrons are Poisson, the read-out adds Gaussian noise and an offset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CameraConfig {
    pub offset_adu: f64,
    pub gain_adu_per_electron: f64,
    pub read_noise_electrons: f64,
    /// Photoelectrons at the brightest typical nucleus; other stains scale from it.
    pub peak_signal_electrons: f64,
    /// Autofluorescence and stray light, per pixel.
    pub background_electrons: f64,
    /// Relative brightness drop in the corners (flat-field), 0 for none.
    pub vignetting: f64,
}

impl Default for CameraConfig {
    fn default() -> Self {
        Self {
            offset_adu: 100.0,
            gain_adu_per_electron: 1.0,
            read_noise_electrons: 1.6,
            peak_signal_electrons: 3000.0,
            background_electrons: 40.0,
            vignetting: 0.15,
        }
    }
}

/// Simulator settings. Physical quantities carry their unit in the name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimulatorConfig {
    pub seed: u64,
    /// Seed of the gene model (how expression loads on the latent state): a property of the cell
    /// line, not of the plate, so that models trained on one plate apply to plates simulated
    /// with other seeds. Absent: `seed`.
    pub gene_seed: Option<u64>,
    pub plate: String,
    /// 96 or 384.
    pub plate_format: u16,
    /// Wells to image, in acquisition order (`B3` or `B03`).
    pub wells: Vec<String>,
    /// Wells whose perturbation is zero (negative controls).
    pub control_wells: Vec<String>,
    pub fields_per_well: u32,
    pub timepoints: u32,
    pub width_px: u32,
    pub height_px: u32,
    pub pixel_size_um: f64,
    pub nucleus_diameter_um: f64,
    pub cell_diameter_um: f64,
    pub cell_density_per_mm2: f64,
    /// Fraction of cells placed touching a neighbour's nucleus (the hard case for segmentation).
    pub touching_fraction: f64,
    pub mitotic_fraction: f64,
    /// Number of genes with simulated per-cell expression.
    pub genes: u32,
    /// How many of them (the first ones) shape the images; the rest are invisible controls.
    pub visible_genes: u32,
    /// Size of the per-well shift of the latent state, in units of the cell-to-cell spread.
    pub perturbation_strength: f64,
    pub proteins: Vec<ProteinChannel>,
    /// Fields per second; 0 acquires as fast as the pipeline accepts frames.
    pub rate_fields_per_s: f64,
    pub camera: CameraConfig,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            gene_seed: None,
            plate: "sim".into(),
            plate_format: 96,
            wells: vec!["B2".into(), "B3".into()],
            control_wells: vec!["B2".into()],
            fields_per_well: 2,
            timepoints: 1,
            width_px: 1024,
            height_px: 1024,
            pixel_size_um: 0.65,
            nucleus_diameter_um: 11.0,
            cell_diameter_um: 32.0,
            cell_density_per_mm2: 500.0,
            touching_fraction: 0.15,
            mitotic_fraction: 0.03,
            genes: 16,
            visible_genes: 8,
            perturbation_strength: 1.5,
            proteins: vec![ProteinChannel {
                name: "TOMM20".into(),
                localization: Localization::Mitochondria,
            }],
            rate_fields_per_s: 0.0,
            camera: CameraConfig::default(),
        }
    }
}

impl SimulatorConfig {
    /// Every problem, with its key relative to this section.
    pub fn validate(&self) -> Vec<Invalid> {
        let mut out = Vec::new();
        let mut bad = |key: &str, message: String| out.push(Invalid::new(key, message));
        if let Err(e) = Name::new(&self.plate) {
            bad("plate", e.to_string());
        }
        match PlateFormat::new(self.plate_format) {
            Err(e) => bad("plate_format", e.to_string()),
            Ok(fmt) => {
                if self.wells.is_empty() {
                    bad("wells", "at least one well is needed".into());
                }
                let mut seen = std::collections::BTreeSet::new();
                for (i, w) in self.wells.iter().enumerate() {
                    match WellId::parse(w, fmt) {
                        Err(e) => bad(&format!("wells[{i}]"), e.to_string()),
                        Ok(id) => {
                            if !seen.insert(id) {
                                bad(&format!("wells[{i}]"), format!("well {w} is listed twice"));
                            }
                        }
                    }
                }
                for (i, w) in self.control_wells.iter().enumerate() {
                    if let Err(e) = WellId::parse(w, fmt) {
                        bad(&format!("control_wells[{i}]"), e.to_string());
                    }
                }
            }
        }
        if self.fields_per_well == 0 || self.fields_per_well > 10_000 {
            bad(
                "fields_per_well",
                format!("must be 1..=10000, got {}", self.fields_per_well),
            );
        }
        if self.timepoints == 0 || self.timepoints > 100_000 {
            bad("timepoints", format!("must be 1..=100000, got {}", self.timepoints));
        }
        for (key, v) in [("width_px", self.width_px), ("height_px", self.height_px)] {
            if !(64..=4096).contains(&v) {
                bad(key, format!("must be 64..=4096, got {v}"));
            }
        }
        for (key, v) in [
            ("pixel_size_um", self.pixel_size_um),
            ("nucleus_diameter_um", self.nucleus_diameter_um),
            ("cell_diameter_um", self.cell_diameter_um),
            ("cell_density_per_mm2", self.cell_density_per_mm2),
        ] {
            if !(v.is_finite() && v > 0.0) {
                bad(key, format!("must be a positive number, got {v}"));
            }
        }
        // Bounds of what a microscope field can be: beyond them the simulator would draw cells
        // larger than any image, or more of them than fit in memory.
        if self.pixel_size_um.is_finite() && !(0.01..=100.0).contains(&self.pixel_size_um) {
            bad(
                "pixel_size_um",
                format!("must be 0.01..=100, got {}", self.pixel_size_um),
            );
        }
        let cell_px = self.cell_diameter_um / self.pixel_size_um;
        if cell_px.is_finite() && cell_px > 1000.0 {
            bad(
                "cell_diameter_um",
                format!("is {cell_px:.0} pixels across at this pixel size; at most 1000"),
            );
        }
        if self.cell_density_per_mm2.is_finite() && self.cell_density_per_mm2 > 100_000.0 {
            bad(
                "cell_density_per_mm2",
                format!(
                    "must be at most 100000 (cells touch at about 10000), got {}",
                    self.cell_density_per_mm2
                ),
            );
        }
        if self.cell_diameter_um <= self.nucleus_diameter_um {
            bad("cell_diameter_um", "must be larger than nucleus_diameter_um".into());
        }
        for (key, v) in [
            ("touching_fraction", self.touching_fraction),
            ("mitotic_fraction", self.mitotic_fraction),
        ] {
            if !(0.0..=1.0).contains(&v) {
                bad(key, format!("must be within 0..=1, got {v}"));
            }
        }
        if self.genes == 0 || self.genes > 100_000 {
            bad("genes", format!("must be 1..=100000, got {}", self.genes));
        }
        if self.visible_genes > self.genes {
            bad("visible_genes", "cannot exceed genes".into());
        }
        if !(self.rate_fields_per_s == 0.0 || (0.001..=10_000.0).contains(&self.rate_fields_per_s)) {
            bad(
                "rate_fields_per_s",
                format!(
                    "must be 0 (as fast as possible) or 0.001..=10000, got {}",
                    self.rate_fields_per_s
                ),
            );
        }
        if !(self.perturbation_strength >= 0.0) {
            bad("perturbation_strength", "must be >= 0".into());
        }
        for (i, p) in self.proteins.iter().enumerate() {
            // The name becomes a channel label and the simulator's truth file names.
            if crate::model::Name::new(&p.name).is_err() {
                bad(
                    &format!("proteins[{i}].name"),
                    format!("{:?} must match ^[A-Za-z0-9]+$ (1-64 characters)", p.name),
                );
            }
            if LANDMARKS.iter().any(|(n, _)| n.eq_ignore_ascii_case(&p.name)) {
                bad(
                    &format!("proteins[{i}].name"),
                    format!("{} is a landmark channel name", p.name),
                );
            }
        }
        let c = &self.camera;
        for (key, v) in [
            ("camera.offset_adu", c.offset_adu),
            ("camera.gain_adu_per_electron", c.gain_adu_per_electron),
            ("camera.read_noise_electrons", c.read_noise_electrons),
            ("camera.peak_signal_electrons", c.peak_signal_electrons),
            ("camera.background_electrons", c.background_electrons),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                bad(key, format!("must be a number >= 0, got {v}"));
            }
        }
        if !(0.0..1.0).contains(&c.vignetting) {
            bad("camera.vignetting", "must be within 0..1".into());
        }
        out
    }
}

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
        m
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
        let mut clean = self.stain_images(&cells, &geo, &tex, w, h, &ids);
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
                brightness: (0.15 * z[1] + 0.1 * normal(&mut rng)).exp() * if mitotic { 2.2 } else { 1.0 },
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
        w: usize,
        h: usize,
        ids: &[u64; 5],
    ) -> Vec<Vec<f32>> {
        let n_protein = self.cfg.proteins.len();
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
        let rows: Vec<StainRow> = (0..h)
            .into_par_iter()
            .map(|y| {
                let mut d = vec![0f32; w];
                let mut e = vec![0f32; w];
                let mut pr = vec![vec![0f32; w]; n_protein];
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
                    for (p, out) in pr.iter_mut().enumerate() {
                        let g = protein_gene[p];
                        let level = (c.expression[g] / gene_scale[p]) as f32;
                        out[x] = 0.4
                            * peak
                            * level
                            * match self.cfg.proteins[p].localization {
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
                            };
                    }
                }
                (d, e, pr)
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
                if self.cfg.proteins[p].localization != Localization::Mitochondria || owner == 0 {
                    continue;
                }
                let level = (c.expression[protein_gene[p]] / gene_scale[p]) as f32;
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
        out
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

/// One rendered row: DAPI, ER and each protein channel.
type StainRow = (Vec<f32>, Vec<f32>, Vec<Vec<f32>>);

/// Poisson sample: exact (Knuth) for small means, normal approximation above 30 where the two are
/// indistinguishable at camera precision and the exact method would cost O(λ).
fn poisson(rng: &mut impl Rng, lambda: f64) -> f64 {
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

fn smoothstep(edge0: f64, edge1: f64, x: f64) -> f64 {
    let t = ((x - edge0) / (edge1 - edge0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

fn splat(img: &mut [f32], w: usize, x: f64, y: f64, v: f32) {
    let (x0, y0) = (x.floor() as usize, y.floor() as usize);
    let (fx, fy) = ((x - x0 as f64) as f32, (y - y0 as f64) as f32);
    img[y0 * w + x0] += v * (1.0 - fx) * (1.0 - fy);
    img[y0 * w + x0 + 1] += v * fx * (1.0 - fy);
    img[(y0 + 1) * w + x0] += v * (1.0 - fx) * fy;
    img[(y0 + 1) * w + x0 + 1] += v * fx * fy;
}

fn touches_image(c: &SimCell, w: usize, h: usize) -> bool {
    c.cx + c.cell_r >= 0.0 && c.cy + c.cell_r >= 0.0 && c.cx - c.cell_r < w as f64 && c.cy - c.cell_r < h as f64
}

#[derive(Debug, Clone)]
struct SimCell {
    cx: f64,
    cy: f64,
    nuc_r: f64,
    nuc_aspect: f64,
    nuc_angle: f64,
    nuc_harm: [(f64, f64); 4],
    cell_r: f64,
    cell_harm: [(f64, f64); 4],
    mitotic: bool,
    brightness: f64,
    microtubules: f64,
    er: f64,
    z: [f64; LATENT],
    expression: Vec<f64>,
    stream: u64,
}

impl SimCell {
    /// Normalised radial distance to the nucleus outline (< 1 inside).
    fn nucleus_rho(&self, x: f64, y: f64) -> f64 {
        let (dx, dy) = (x - self.cx, y - self.cy);
        let (s, c) = self.nuc_angle.sin_cos();
        let u = dx * c + dy * s;
        let v = -dx * s + dy * c;
        let a = self.nuc_r * self.nuc_aspect.sqrt();
        let b = self.nuc_r / self.nuc_aspect.sqrt();
        let theta = v.atan2(u);
        ((u / a).powi(2) + (v / b).powi(2)).sqrt() / outline(&self.nuc_harm, theta)
    }

    fn cell_rho(&self, x: f64, y: f64) -> f64 {
        let (dx, dy) = (x - self.cx, y - self.cy);
        (dx * dx + dy * dy).sqrt() / (self.cell_r * outline(&self.cell_harm, dy.atan2(dx)))
    }
}

fn outline(harm: &[(f64, f64); 4], theta: f64) -> f64 {
    1.0 + harm
        .iter()
        .enumerate()
        .map(|(k, (a, p))| a * ((k as f64 + 2.0) * theta + p).cos())
        .sum::<f64>()
}

/// Who owns each pixel. Overlaps are resolved by the smaller normalised distance, which gives
/// curved, plausible borders between neighbours.
struct Geometry {
    nuclei: Vec<u32>,
    cells: Vec<u32>,
    nuc_rho: Vec<f32>,
    cell_rho: Vec<f32>,
    /// Label of cell `i` in the placed list (0 when its nucleus is not in the image).
    id_of: Vec<u32>,
    /// Placed-list index of label `l`.
    index_of: Vec<usize>,
    nucleus_area: Vec<u64>,
    cell_area: Vec<u64>,
}

fn rasterize(cells: &[SimCell], w: usize, h: usize) -> Geometry {
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

fn for_box(cx: f64, cy: f64, r: f64, w: usize, h: usize, mut f: impl FnMut(usize, usize)) {
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
struct Textures {
    fine: Vec<f32>,
    coarse: Vec<f32>,
    /// 1 on the ridges of a noise field: a reticular, ER-like network.
    ridge: Vec<f32>,
}

impl Textures {
    fn new(w: usize, h: usize, ids: &[u64; 5]) -> Self {
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
fn value_noise(w: usize, h: usize, scale: f64, ids: &[u64; 5], which: u64) -> Vec<f32> {
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

impl Source for Simulator {
    fn plan(&self) -> &AcquisitionPlan {
        &self.plan
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

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> SimulatorConfig {
        SimulatorConfig {
            width_px: 256,
            height_px: 256,
            ..Default::default()
        }
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let a = Simulator::new(small()).unwrap();
        let b = Simulator::new(small()).unwrap();
        let well = a.plan().wells[1];
        let fa = a.render(well, 1, 0);
        let fb = b.render(well, 1, 0);
        assert_eq!(fa.channels, fb.channels);
        assert_eq!(fa.nuclei_labels, fb.nuclei_labels);
        let c = Simulator::new(SimulatorConfig { seed: 2, ..small() }).unwrap();
        assert_ne!(c.render(well, 1, 0).channels[0], fa.channels[0]);
        assert_ne!(a.render(well, 0, 0).channels[0], fa.channels[0]);
    }

    #[test]
    fn truth_is_consistent_with_label_images() {
        let s = Simulator::new(small()).unwrap();
        let f = s.render(s.plan().wells[0], 0, 0);
        assert!(!f.cells.is_empty());
        let max_label = f.nuclei_labels.iter().copied().max().unwrap();
        assert_eq!(max_label as usize, f.cells.len());
        for c in &f.cells {
            let n = f.nuclei_labels.iter().filter(|&&l| l == c.label).count() as u64;
            let m = f.cell_labels.iter().filter(|&&l| l == c.label).count() as u64;
            assert_eq!(n, c.nucleus_area_px);
            assert_eq!(m, c.cell_area_px);
            assert!(m >= n, "cell {} smaller than its nucleus", c.label);
            assert_eq!(c.expression.len(), s.genes().names.len());
        }
        // Every nucleus pixel lies inside its own cell.
        assert!(f
            .nuclei_labels
            .iter()
            .zip(&f.cell_labels)
            .all(|(&n, &c)| n == 0 || n == c));
        // Nuclei are bright in DAPI: mean inside well above mean outside.
        let (mut inside, mut ni, mut outside, mut no) = (0f64, 0f64, 0f64, 0f64);
        for (&l, &v) in f.nuclei_labels.iter().zip(&f.channels[0]) {
            if l != 0 {
                inside += v as f64;
                ni += 1.0;
            } else {
                outside += v as f64;
                no += 1.0;
            }
        }
        assert!(
            inside / ni > 5.0 * (outside / no),
            "{} vs {}",
            inside / ni,
            outside / no
        );
    }

    #[test]
    fn control_wells_are_unshifted_and_invisible_genes_ignore_visible_latent() {
        let s = Simulator::new(small()).unwrap();
        assert_eq!(s.well_shift(s.plan().wells[0]), [0.0; LATENT]);
        assert_ne!(s.well_shift(s.plan().wells[1]), [0.0; LATENT]);
        let g = s.genes();
        for (i, w) in g.weights.iter().enumerate() {
            let vis: f64 = w[..VISIBLE_LATENT].iter().map(|v| v.abs()).sum();
            let hid: f64 = w[VISIBLE_LATENT..].iter().map(|v| v.abs()).sum();
            if g.visible[i] {
                assert_eq!(hid, 0.0);
            } else {
                assert_eq!(vis, 0.0);
            }
        }
    }

    #[test]
    fn invalid_config_reports_every_problem() {
        let cfg = SimulatorConfig {
            plate: "a/b".into(),
            wells: vec!["Z99".into()],
            width_px: 10,
            ..Default::default()
        };
        let keys: Vec<String> = cfg.validate().into_iter().map(|i| i.key).collect();
        assert_eq!(keys, vec!["plate", "wells[0]", "width_px"]);
    }

    #[test]
    fn values_no_microscope_has_are_refused_before_they_reach_an_allocation() {
        let cfg = SimulatorConfig {
            pixel_size_um: 1e-9,
            cell_density_per_mm2: 1e300,
            rate_fields_per_s: 1e-300,
            timepoints: u32::MAX,
            proteins: vec![ProteinChannel {
                name: "../x".into(),
                localization: Localization::Nuclear,
            }],
            ..Default::default()
        };
        let keys: Vec<String> = cfg.validate().into_iter().map(|i| i.key).collect();
        for key in [
            "timepoints",
            "pixel_size_um",
            "cell_diameter_um",
            "cell_density_per_mm2",
            "rate_fields_per_s",
            "proteins[0].name",
        ] {
            assert!(keys.contains(&key.to_string()), "{key} not in {keys:?}");
        }
    }
}
