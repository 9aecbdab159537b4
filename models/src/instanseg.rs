//! `config.liveomics.instanseg`: what an instance-segmentation model's description carries for
//! the post-processing that runs outside ONNX (`liveomics_kernels::instanseg`): the settings it
//! was trained with and the pixel classifier's weights. Written by `models/import/instanseg.py`.

use serde::Deserialize;

/// The section as written; checked by [`InstansegConfig::check`] when the description loads.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstansegConfig {
    /// The pixel size the model was trained at.
    pub pixel_size_um: f64,
    /// The nucleus diameter, in model pixels, at which the model segments best: fields are
    /// resampled so that their nuclei (`segmentation.nucleus_diameter_um` over the pixel size)
    /// have it, and the labels back. Cultured cells' nuclei are larger than the tissue nuclei
    /// the model was trained on, so matching nucleus size beats matching pixel size.
    pub nucleus_diameter_px: f64,
    pub mask_threshold: f32,
    pub peak_distance: usize,
    pub seed_threshold: f32,
    pub overlap_threshold: f32,
    /// Used by two-channel seed maps only; kept so that the original's settings are all here.
    pub fg_threshold: f32,
    pub window_size: usize,
    pub cleanup_fragments: bool,
    pub resolve_cell_and_nucleus: bool,
    /// Dense layers in order, each `weight` (`outputs` rows of `inputs`) and `bias`.
    pub pixel_classifier: Vec<DenseLayer>,
    /// Nuclei and cell labels of the original model on the test input (npy), for parity checks.
    pub test_labels: Option<TestLabels>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenseLayer {
    pub weight: Vec<Vec<f32>>,
    pub bias: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestLabels {
    pub source: String,
    pub sha256: Option<String>,
}

impl InstansegConfig {
    /// The first problem, as (key below `config.liveomics.instanseg`, message).
    pub fn check(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, m: String| Err((k.to_string(), m));
        for (k, v) in [
            ("pixel_size_um", self.pixel_size_um),
            ("nucleus_diameter_px", self.nucleus_diameter_px),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(k, format!("must be positive, got {v}"));
            }
        }
        for (k, v) in [
            ("mask_threshold", self.mask_threshold),
            ("seed_threshold", self.seed_threshold),
            ("overlap_threshold", self.overlap_threshold),
        ] {
            if !(v > 0.0 && v < 1.0) {
                return bad(k, format!("must be within (0, 1), got {v}"));
            }
        }
        if self.window_size == 0 {
            return bad("window_size", "must be at least 1".into());
        }
        let mut width = 4;
        for (i, l) in self.pixel_classifier.iter().enumerate() {
            let rows_fit = !l.weight.is_empty() && l.weight.iter().all(|r| r.len() == width);
            if !rows_fit || l.bias.len() != l.weight.len() {
                return bad(
                    &format!("pixel_classifier[{i}]"),
                    format!("needs {} bias values and rows of {width} weights", l.weight.len()),
                );
            }
            width = l.weight.len();
        }
        if self.pixel_classifier.is_empty() || width != 1 {
            return bad("pixel_classifier", format!("must end in one output, ends in {width}"));
        }
        Ok(())
    }
}
