//! The simulator's config: plate layout, cell and gene model, camera.

use super::*;

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

impl Localization {
    /// Index of the compartment in the truth's fractions: nucleus, cytoplasm, membrane, er,
    /// puncta (the daemon's `loc` columns in the same order).
    pub fn compartment(self) -> usize {
        match self {
            Self::Nuclear => 0,
            Self::Cytoplasmic => 1,
            Self::Membrane => 2,
            Self::Er => 3,
            Self::Mitochondria => 4,
        }
    }
}

/// The compartments of the truth's localization fractions, in order.
pub const COMPARTMENTS: [&str; 5] = ["nucleus", "cytoplasm", "membrane", "er", "puncta"];

/// A known relocalization, the truth a relocalization readout is tested against: in `wells`,
/// each cell draws a share of `protein`'s signal (about `fraction`, varying from cell to cell)
/// in the pattern of the `to` compartment instead of its own, as a drug that sends a nuclear
/// protein to the cytoplasm does. Morphology is untouched, so only the protein's own channel
/// shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Relocalization {
    pub protein: String,
    pub to: Localization,
    pub wells: Vec<String>,
    #[serde(default = "default_relocalized_fraction")]
    pub fraction: f64,
}

fn default_relocalized_fraction() -> f64 {
    0.5
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
    /// How much brighter a mitotic nucleus's condensed chromatin is than an interphase one's.
    pub mitotic_brightness: f64,
    /// Drop of the nuclear stain across the field, left to right (exponential in each cell's x):
    /// 0 for even staining, 0.85 for right-hand nuclei at 15 % of left-hand ones, as in a well
    /// stained unevenly. Unlike vignetting it is per cell, so flat-field correction cannot undo it.
    pub nuclear_stain_gradient: f64,
    /// Number of genes with simulated per-cell expression.
    pub genes: u32,
    /// How many of them (the first ones) shape the images; the rest are invisible controls.
    pub visible_genes: u32,
    /// Size of the per-well shift of the latent state, in units of the cell-to-cell spread.
    pub perturbation_strength: f64,
    /// Proteins whose per-cell abundance is simulated but never imaged (`P001`, `P002`, …): each
    /// is translated from one or two genes with a protein-specific gain and noise, the even ones
    /// from visible genes and the odd ones from invisible genes, so a model reading per-cell
    /// transcripts can predict the first kind and not the second. Written to `truth/cells.csv`;
    /// 0 (the default) leaves plates as they were.
    pub translated_proteins: u32,
    pub proteins: Vec<ProteinChannel>,
    /// Known relocalizations of proteins in some wells (none by default).
    pub relocalization: Vec<Relocalization>,
    /// Fields per second; 0 acquires as fast as the pipeline accepts frames, with no deadline.
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
            mitotic_brightness: 2.2,
            nuclear_stain_gradient: 0.0,
            genes: 16,
            visible_genes: 8,
            perturbation_strength: 1.5,
            translated_proteins: 0,
            proteins: vec![ProteinChannel {
                name: "TOMM20".into(),
                localization: Localization::Mitochondria,
            }],
            relocalization: Vec::new(),
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
        if !(1.0..=20.0).contains(&self.mitotic_brightness) {
            bad(
                "mitotic_brightness",
                format!("must be within 1..=20, got {}", self.mitotic_brightness),
            );
        }
        if !(0.0..0.99).contains(&self.nuclear_stain_gradient) {
            bad(
                "nuclear_stain_gradient",
                format!("must be within 0..0.99, got {}", self.nuclear_stain_gradient),
            );
        }
        if self.genes == 0 || self.genes > 100_000 {
            bad("genes", format!("must be 1..=100000, got {}", self.genes));
        }
        if self.visible_genes > self.genes {
            bad("visible_genes", "cannot exceed genes".into());
        }
        if self.translated_proteins > 10_000 {
            bad(
                "translated_proteins",
                format!("must be 0..=10000, got {}", self.translated_proteins),
            );
        }
        if self.translated_proteins > 1 && (self.visible_genes == 0 || self.visible_genes == self.genes) {
            bad(
                "translated_proteins",
                "needs both visible and invisible genes (0 < visible_genes < genes): half of the \
                 proteins follow each kind"
                    .into(),
            );
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
        for (i, r) in self.relocalization.iter().enumerate() {
            let key = format!("relocalization[{i}]");
            match self.proteins.iter().find(|p| p.name == r.protein) {
                None => bad(
                    &format!("{key}.protein"),
                    format!("{:?} is not one of the simulated proteins", r.protein),
                ),
                Some(p) if p.localization == r.to => bad(
                    &format!("{key}.to"),
                    format!("{} already sits in {:?}", r.protein, r.to),
                ),
                Some(_) => {}
            }
            if !(0.0..=1.0).contains(&r.fraction) {
                bad(
                    &format!("{key}.fraction"),
                    format!("must be within 0..=1, got {}", r.fraction),
                );
            }
            if let Ok(fmt) = PlateFormat::new(self.plate_format) {
                for (j, w) in r.wells.iter().enumerate() {
                    if let Err(e) = WellId::parse(w, fmt) {
                        bad(&format!("{key}.wells[{j}]"), e.to_string());
                    }
                }
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
