//! Classical segmentation: nuclei by smoothing, a foreground threshold (per nucleus by default,
//! [`crate::local`]; or one global Otsu/triangle) and a distance-transform seeded watershed,
//! cells by propagation from the nuclei over a cytoplasm channel. Parameters are physical (µm) at the
//! config level and converted here, so that a change of objective does not need retuning.

use crate::backend::{Cpu, Steps};
use crate::{cpu, KernelError};

/// How the foreground threshold of a smoothed channel is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ThresholdMethod {
    /// Otsu's between-class variance: robust when foreground is a sizeable fraction.
    #[default]
    Otsu,
    /// Zack's triangle: for sparse or dim foreground on a dominant background peak.
    Triangle,
}

impl ThresholdMethod {
    pub fn threshold(self, smooth: &[f32]) -> f32 {
        match self {
            ThresholdMethod::Otsu => cpu::otsu_threshold(smooth),
            ThresholdMethod::Triangle => cpu::triangle_threshold(smooth),
        }
    }

    /// The same threshold from a histogram built elsewhere (on the GPU).
    pub(crate) fn threshold_of_histogram(self, lo: f32, scale: f32, hist: &[u64; 256]) -> f32 {
        match self {
            ThresholdMethod::Otsu => cpu::otsu_from_histogram(lo, scale, hist),
            ThresholdMethod::Triangle => cpu::triangle_from_histogram(lo, scale, hist),
        }
    }
}

/// How the nuclei foreground is separated from the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Foreground {
    /// Background-corrected, per-nucleus thresholds ([`crate::local`]): holds when nuclei of
    /// very different brightness share a field.
    #[default]
    Local,
    /// One automatic threshold for the whole field: the older path, kept for comparison and for
    /// fields of uniformly stained nuclei.
    Global(ThresholdMethod),
}

/// Nuclei parameters in pixels. Build them with [`NucleiParams::from_physical`] unless a test needs
/// exact pixel values.
#[derive(Debug, Clone, PartialEq)]
pub struct NucleiParams {
    /// The expected nucleus diameter: the scale of the local path's background tiles and peaks.
    pub diameter_px: f32,
    pub smoothing_sigma_px: f32,
    pub foreground: Foreground,
    /// Multiplies the automatic threshold (the global methods) or the half-maximum edge (the
    /// local one); below 1 keeps dim nuclei and halos, above 1 trims them.
    pub threshold_scale: f32,
    /// Half-width of the window in which a distance peak must be maximal to seed an object: about
    /// a third of a nucleus diameter splits touching pairs without cutting single ellipses.
    pub seed_radius_px: usize,
    /// Distance-transform peaks lower than this (pixels from the edge) do not seed: thin bridges
    /// and debris never become objects of their own.
    pub seed_min_depth_px: f32,
    pub min_area_px: usize,
    /// The smaller floor for objects touching the image border (cut by the field of view).
    pub min_area_at_border_px: usize,
    pub max_area_px: usize,
    /// Divide out uneven illumination before thresholding (off: percentile normalisation of
    /// the raw image).
    pub illumination: Option<Illumination>,
}

/// Illumination correction settings ([`crate::illumination`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Illumination {
    /// Camera offset (ADU at zero light), removed before dividing.
    pub offset: f32,
    /// Side of the tiles the background is estimated on: several nuclei wide, so that every tile
    /// holds background between cells.
    pub block_px: usize,
}

impl Illumination {
    /// Tiles of four nucleus diameters.
    pub fn for_nucleus_px(diameter_px: f64, offset: f32) -> Self {
        Self {
            offset,
            block_px: ((4.0 * diameter_px).round() as usize).max(16),
        }
    }
}

impl NucleiParams {
    /// Derives every pixel parameter from the expected nucleus diameter and the pixel size.
    pub fn from_physical(diameter_um: f64, pixel_size_um: f64) -> Result<Self, KernelError> {
        if !(diameter_um > 0.0) || !(pixel_size_um > 0.0) {
            return Err(KernelError::Parameter {
                name: "diameter_um/pixel_size_um",
                reason: format!("both must be > 0, got {diameter_um} and {pixel_size_um}"),
            });
        }
        let d = diameter_um / pixel_size_um;
        // Outside this a diameter or pixel size is wrong (a unit slip), and the kernels' windows
        // would not fit in memory or in an image.
        if !(2.0..=1000.0).contains(&d) {
            return Err(KernelError::Parameter {
                name: "diameter_um/pixel_size_um",
                reason: format!(
                    "a nucleus of {diameter_um} µm at {pixel_size_um} µm per pixel is {d:.3} pixels across; \
                     2 to 1000 are supported"
                ),
            });
        }
        let area = std::f64::consts::PI * (d / 2.0).powi(2);
        Ok(Self {
            diameter_px: d as f32,
            smoothing_sigma_px: (d / 12.0).clamp(0.5, 4.0) as f32,
            foreground: Foreground::Local,
            threshold_scale: 1.0,
            seed_radius_px: ((d / 3.0).round() as usize).max(1),
            seed_min_depth_px: (d / 8.0).max(1.0) as f32,
            min_area_px: (area * 0.15).round().max(4.0) as usize,
            min_area_at_border_px: (area * 0.02).round().max(4.0) as usize,
            max_area_px: (area * 8.0).round() as usize,
            illumination: None,
        })
    }
}

/// Cell-body parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct CellParams {
    pub smoothing_sigma_px: f32,
    /// Multiplies the Otsu threshold of the cytoplasm channel: cytoplasm fades towards the cell
    /// edge, so the foreground threshold sits below Otsu's split.
    pub threshold_scale: f32,
    /// Cost per pixel of distance relative to a unit change of normalised intensity. Textured
    /// cytoplasm (reticular ER, filaments) makes intensity a poor boundary cue inside a cell, so
    /// distance dominates: boundaries between touching cells fall near the midline between
    /// nuclei, bent by the dark gaps between them (chosen on simulator seed 77; held-out
    /// AP in daemon/tests/it/segmentation_ap.rs).
    pub spatial_weight: f32,
}

impl Default for CellParams {
    fn default() -> Self {
        Self {
            smoothing_sigma_px: 1.5,
            threshold_scale: 0.3,
            spatial_weight: 1.0,
        }
    }
}

/// Labels nuclei `1..=n` on the CPU; returns the label image and `n`.
pub fn segment_nuclei(
    raw: &[u16],
    width: usize,
    height: usize,
    p: &NucleiParams,
) -> Result<(Vec<u32>, u32), KernelError> {
    nuclei(&Cpu, raw, width, height, p)
}

/// Nuclei from a foreground probability map (e.g. a U-Net's output) on the CPU: pixels above
/// `threshold` are foreground, and touching nuclei are split by the same seeded watershed as the
/// threshold path. NaN probabilities count as background.
pub fn segment_nuclei_probability(
    prob: &[f32],
    width: usize,
    height: usize,
    threshold: f32,
    p: &NucleiParams,
) -> Result<(Vec<u32>, u32), KernelError> {
    nuclei_from_probability(&Cpu, prob, width, height, threshold, p)
}

/// Grows each nucleus into its cell over the cytoplasm channel on the CPU; cell `k` contains
/// nucleus `k`.
pub fn segment_cells(
    nuclei: &[u32],
    cytoplasm_raw: &[u16],
    width: usize,
    height: usize,
    p: &CellParams,
) -> Result<Vec<u32>, KernelError> {
    cells(&Cpu, nuclei, cytoplasm_raw, width, height, p)
}

/// The nuclei algorithm, written once for every back end: percentile normalisation (after
/// dividing out the illumination if asked), smoothing, the foreground (per nucleus or one
/// threshold), then [`split_foreground`].
pub(crate) fn nuclei<S: Steps>(
    s: &S,
    raw: &[u16],
    width: usize,
    height: usize,
    p: &NucleiParams,
) -> Result<(Vec<u32>, u32), S::Error> {
    crate::check_len("raw", raw, width, height)?;
    if raw.is_empty() {
        return Ok((Vec::new(), 0));
    }
    let n = raw.len();
    let norm = s.normalize_raw(raw, width, height, p.illumination, 0.5, 99.95)?;
    let smooth = s.blur(&norm, width, height, p.smoothing_sigma_px)?;
    let mask = match p.foreground {
        Foreground::Local => s.local_foreground(&norm, &smooth, width, height, p)?,
        Foreground::Global(method) => {
            let t = s.threshold(&smooth, n, method)? * p.threshold_scale;
            s.mask_above(&smooth, None, n, t)?
        }
    };
    split_foreground(s, &mask, width, height, p)
}

/// [`segment_nuclei_probability`] on any back end.
pub(crate) fn nuclei_from_probability<S: Steps>(
    s: &S,
    prob: &[f32],
    width: usize,
    height: usize,
    threshold: f32,
    p: &NucleiParams,
) -> Result<(Vec<u32>, u32), S::Error> {
    crate::check_len("probability", prob, width, height)?;
    if prob.is_empty() {
        return Ok((Vec::new(), 0));
    }
    let image = s.image(prob)?;
    let mask = s.mask_above(&image, None, prob.len(), threshold)?;
    split_foreground(s, &mask, width, height, p)
}

/// Distance-transform seeds, watershed within the mask, size filter: labels `1..=n`.
fn split_foreground<S: Steps>(
    s: &S,
    mask: &S::Mask,
    width: usize,
    height: usize,
    p: &NucleiParams,
) -> Result<(Vec<u32>, u32), S::Error> {
    let n = width * height;
    let dist = s.distance(mask, width, height)?;
    let mut elevation = s.blur(&dist, width, height, 1.0)?;
    let (markers, count) = s.peak_markers(&elevation, mask, width, height, p.seed_radius_px, p.seed_min_depth_px)?;
    // Flood from the deepest points outwards: the elevation is the negated distance, in place.
    s.negate(&mut elevation, n)?;
    let (mut labels, unreached) = s.watershed(&elevation, &markers, mask, width, height)?;
    // Foreground blobs too shallow to hold a seed are what the flood did not reach (it fills
    // every 8-connected blob that has a seed). Each still becomes one object (the size filter
    // decides whether it is kept), so no foreground is silently lost.
    let extra = s.label_unreached(&mut labels, unreached, count, width, height)?;
    let (labels, kept) = s.filter_by_area(labels, count + extra, width, height, p)?;
    Ok((s.download(labels, n)?, kept))
}

/// The cells algorithm on any back end: the cytoplasm is normalised, smoothed and thresholded,
/// and the foreground (plus every nucleus) is flooded from the nuclei.
pub(crate) fn cells<S: Steps>(
    s: &S,
    nuclei: &[u32],
    cytoplasm_raw: &[u16],
    width: usize,
    height: usize,
    p: &CellParams,
) -> Result<Vec<u32>, S::Error> {
    crate::check_len("nuclei", nuclei, width, height)?;
    crate::check_len("cytoplasm", cytoplasm_raw, width, height)?;
    if nuclei.is_empty() {
        return Ok(Vec::new());
    }
    let n = nuclei.len();
    // Not illumination-corrected: the cytoplasm stain covers most of a confluent field, so its
    // low percentiles are not background (correcting it cost cells AP on the simulator).
    let norm = s.normalize_raw(cytoplasm_raw, width, height, None, 0.5, 99.5)?;
    let smooth = s.blur(&norm, width, height, p.smoothing_sigma_px)?;
    let t = s.threshold(&smooth, n, ThresholdMethod::Otsu)? * p.threshold_scale;
    let seeds = s.labels(nuclei)?;
    let mask = s.mask_above(&smooth, Some(&seeds), n, t)?;
    let labels = s.propagate(&smooth, &seeds, &mask, width, height, p.spatial_weight)?;
    s.download(labels, n)
}

/// Removes every object that touches the image border from `nuclei` and `cells` (label `k` in
/// one is label `k` in the other, so an object goes from both if either touches) and renumbers
/// the rest `1..=n` in the same order in both. Returns `n`.
pub fn exclude_border_objects(
    nuclei: &mut [u32],
    cells: Option<&mut [u32]>,
    width: usize,
    height: usize,
) -> Result<u32, KernelError> {
    crate::check_len("nuclei", nuclei, width, height)?;
    if let Some(c) = cells.as_deref() {
        crate::check_len("cells", c, width, height)?;
    }
    let max = nuclei
        .iter()
        .chain(cells.as_deref().into_iter().flatten())
        .copied()
        .max()
        .unwrap_or(0) as usize;
    let mut touches = vec![false; max + 1];
    for img in std::iter::once(&*nuclei).chain(cells.as_deref()) {
        cpu::mark_border_labels(img, width, &mut touches);
    }
    let mut remap = vec![0u32; max + 1];
    let mut n = 0;
    for (l, r) in remap.iter_mut().enumerate().skip(1) {
        if !touches[l] {
            n += 1;
            *r = n;
        }
    }
    nuclei.iter_mut().for_each(|l| *l = remap[*l as usize]);
    if let Some(c) = cells {
        c.iter_mut().for_each(|l| *l = remap[*l as usize]);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn border_objects_leave_both_images_and_the_rest_is_renumbered() {
        // 5 x 4: object 1's nucleus is interior but its cell reaches the left edge; object 2 is
        // interior in both; object 3 touches the bottom.
        let mut nuclei = vec![
            0, 0, 0, 0, 0, //
            0, 1, 0, 2, 0, //
            0, 0, 0, 0, 0, //
            0, 0, 3, 0, 0,
        ];
        let mut cells = vec![
            0, 0, 0, 0, 0, //
            1, 1, 2, 2, 0, //
            0, 0, 2, 2, 0, //
            0, 0, 3, 0, 0,
        ];
        let n = exclude_border_objects(&mut nuclei, Some(&mut cells), 5, 4).unwrap();
        assert_eq!(n, 1);
        assert_eq!(nuclei.iter().filter(|&&l| l == 1).count(), 1);
        assert_eq!(nuclei[8], 1);
        assert_eq!(cells, vec![0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0]);
        let mut empty: Vec<u32> = vec![];
        assert_eq!(exclude_border_objects(&mut empty, None, 0, 0).unwrap(), 0);
    }
}
