//! `[localization]`: which channels are profiled, the compartments' sizes, the control wells
//! and the score's null. Read by the `localize` stage and, for the metrics rules may name, by
//! the closed loop (through the `Context`), so it imports no component.

use liveomics_adapters::model::AcquisitionPlan;
use liveomics_kernels::localize::{LocParams, FEATURES};
use liveomics_models::Role;
use serde::{Deserialize, Serialize};

use crate::field::node_safe;

/// `[localization]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalizationConfig {
    /// Acquired channels to profile; empty: every channel not listed in `landmarks`.
    pub proteins: Vec<String>,
    /// The stains that define the cell rather than report a protein (left out of the default
    /// `proteins`).
    pub landmarks: Vec<String>,
    /// The ER stain that defines the `er` compartment and `er_corr`; empty: no ER compartment.
    pub er_channel: String,
    /// Profile every virtual-stain output too (`{protein}_virtual`, `{protein}_diffusion`).
    pub virtual_channels: bool,
    /// Width of the membrane rim inside the cell's outline.
    pub rim_um: f64,
    /// Scale of the smoothing puncta must stand out from.
    pub puncta_sigma_um: f64,
    /// Robust standard deviations above the field's median that make a punctum.
    pub puncta_mads: f64,
    /// Control wells besides those the source declares (a simulated plate's `control_wells`).
    pub control_wells: Vec<String>,
    /// Take the source's declared controls; false: only `control_wells` (when the plan's
    /// controls are for another purpose, or to hold some back as a check of the null).
    pub controls_from_plan: bool,
    /// Score where the protein sits beyond what each cell's morphology (log cell and nucleus
    /// areas, log landmark intensities) predicts, from a regression over the control cells, so
    /// that a perturbation that only changes the cells' shape scores as a control. Off by
    /// default: on the held-out simulated plate it cut the calls on unmoved proteins in
    /// perturbed wells only from 175 to 169 of 186 and lowered TOMM20's AUC from 1.0 to 0.895
    /// (docs/BENCHMARKS.md); the simulator's perturbations change more than these covariates.
    pub adjust_for_morphology: bool,
    /// Draws of the null of each well's score (pseudo-wells of control fields).
    pub permutations: usize,
    /// Control fields (outside the well) a well's score waits for: fewer make too few distinct
    /// pseudo-wells for a null (4 fields give 6), and every well looks shifted.
    pub min_control_fields: usize,
    /// `loc.{protein}.shift` at or above which a well is reported relocalized (with `alpha`).
    pub shift_threshold: f64,
    /// The largest `p` at which a well is reported relocalized: the false-positive rate per well
    /// and protein the call allows. Few control fields cannot reach it (4 fields of the well
    /// against 8 give at most 70 distinct pseudo-wells, p ≥ 0.014), so early calls wait.
    pub alpha: f64,
}

impl Default for LocalizationConfig {
    fn default() -> Self {
        Self {
            proteins: Vec::new(),
            landmarks: vec!["DAPI".into(), "Microtubules".into(), "ER".into()],
            er_channel: "ER".into(),
            virtual_channels: true,
            rim_um: 1.5,
            puncta_sigma_um: 1.3,
            puncta_mads: 4.0,
            control_wells: Vec::new(),
            controls_from_plan: true,
            adjust_for_morphology: false,
            permutations: 999,
            min_control_fields: 6,
            shift_threshold: 3.0,
            alpha: 0.01,
        }
    }
}

/// The key of a virtual channel's profile.
pub(crate) fn virtual_key(role: Role, protein: &str) -> String {
    match role {
        Role::VirtualStainDiffusion => format!("{}_diffusion", node_safe(protein)),
        _ => format!("{}_virtual", node_safe(protein)),
    }
}

impl LocalizationConfig {
    /// The acquired channels profiled, as `(key, channel index)`.
    pub(crate) fn real(&self, plan: &AcquisitionPlan) -> Vec<(String, usize)> {
        plan.channels
            .iter()
            .enumerate()
            .filter(|(_, c)| {
                if self.proteins.is_empty() {
                    !self.landmarks.iter().any(|l| l.eq_ignore_ascii_case(&c.name))
                } else {
                    self.proteins.iter().any(|p| p.eq_ignore_ascii_case(&c.name))
                }
            })
            .map(|(i, c)| (node_safe(&c.name), i))
            .collect()
    }

    /// Whether `metric` is a localization metric this run can produce: a per-cell
    /// `loc.{protein}.{feature}` or the well's `loc.{protein}.shift` (returned as `Some(true)`).
    pub fn metric(&self, metric: &str, plan: &AcquisitionPlan, virtual_models: bool) -> Option<bool> {
        let rest = metric.strip_prefix("loc.")?;
        let (protein, feature) = rest.rsplit_once('.')?;
        let known = self.real(plan).iter().any(|(k, _)| k == protein)
            || (self.virtual_channels
                && virtual_models
                && (protein.ends_with("_virtual") || protein.ends_with("_diffusion")));
        if !known {
            return None;
        }
        match feature {
            "shift" => Some(true),
            f if FEATURES.contains(&f) => Some(false),
            _ => None,
        }
    }

    /// The landmark channels that are acquired: each cell's log mean intensity in them is a
    /// morphology covariate.
    pub(crate) fn landmark_channels(&self, plan: &AcquisitionPlan) -> Vec<usize> {
        plan.channels
            .iter()
            .enumerate()
            .filter(|(_, c)| self.landmarks.iter().any(|l| l.eq_ignore_ascii_case(&c.name)))
            .map(|(i, _)| i)
            .collect()
    }

    pub(crate) fn params(&self, pixel_size_um: f64) -> LocParams {
        LocParams {
            rim_px: (self.rim_um / pixel_size_um) as f32,
            puncta_sigma_px: (self.puncta_sigma_um / pixel_size_um) as f32,
            puncta_mads: self.puncta_mads as f32,
        }
    }
}
