//! The `localize` stage (`[localization]`): where each protein sits in each cell, and how far
//! each well's localization is from the control wells'.
//!
//! Per cell and per protein channel, acquired or virtual, it adds the columns
//! `loc.{protein}.{feature}` (`liveomics_kernels::localize::FEATURES`: the fraction of the cell's
//! signal in the nucleus, cytoplasm, membrane rim, ER and puncta, the radial position, the
//! coefficient of variation, the correlation with the ER stain). Per well it updates, after every
//! field, the relocalization score against the plan's control wells (`shift.rs`), which travels
//! with the field to the sinks (`FieldWork::localization`) and the closed loop
//! (`loc.{protein}.shift`); a control field rescores every well seen so far, so its scores
//! travel with it for all of them. It runs after `measure` and, to profile virtual channels, after
//! `inference`; a stage after `inference` means no optional model is skipped inline, so every
//! field's virtual channels are there to profile.

pub mod config;
pub mod shift;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use liveomics_adapters::model::{AcquisitionPlan, WellId};
use liveomics_adapters::Invalid;
use liveomics_kernels::localize::{self, LocParams, FEATURES};
use liveomics_models::Role;
use rayon::prelude::*;

use crate::component::{Context, Stage, StageConfig, StageError, StageName};
use crate::field::{channel_index, fnv1a, localization_column, FieldWork, WellShift};
use crate::telemetry as t;
use config::virtual_key;
pub use config::LocalizationConfig;
use shift::{Shift, ShiftPool};

impl StageConfig for LocalizationConfig {
    fn validate(&self, ctx: &Context, problems: &mut Vec<Invalid>) {
        for (key, v) in [
            ("rim_um", self.rim_um),
            ("puncta_sigma_um", self.puncta_sigma_um),
            ("puncta_mads", self.puncta_mads),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 1000.0) {
                problems.push(ctx.invalid(key, format!("must be within (0, 1000], got {v}")));
            }
        }
        if !(19..=100_000).contains(&self.permutations) {
            problems.push(ctx.invalid(
                "permutations",
                format!(
                    "must be 19..=100000 (fewer cannot reach p < 0.05), got {}",
                    self.permutations
                ),
            ));
        }
        if !(2..=100_000).contains(&self.min_control_fields) {
            problems.push(ctx.invalid(
                "min_control_fields",
                format!("must be 2..=100000, got {}", self.min_control_fields),
            ));
        }
        if !(self.alpha > 0.0 && self.alpha < 1.0) {
            problems.push(ctx.invalid("alpha", format!("must be within (0, 1), got {}", self.alpha)));
        }
        if !self.shift_threshold.is_finite() {
            problems.push(ctx.invalid("shift_threshold", "must be a finite number"));
        }
    }

    fn build(&self, ctx: &Context, plan: &AcquisitionPlan) -> Result<Box<dyn Stage>, Vec<Invalid>> {
        let mut problems = Vec::new();
        for (i, p) in self.proteins.iter().enumerate() {
            if channel_index(plan, p).is_none() {
                problems.push(ctx.invalid(&format!("proteins[{i}]"), format!("no acquisition channel {p:?}")));
            }
        }
        let er = if self.er_channel.is_empty() {
            None
        } else {
            let found = channel_index(plan, &self.er_channel);
            if found.is_none() {
                problems.push(ctx.invalid(
                    "er_channel",
                    format!(
                        "no acquisition channel {:?} (empty: no ER compartment)",
                        self.er_channel
                    ),
                ));
            }
            found
        };
        let mut controls: BTreeSet<WellId> = if self.controls_from_plan {
            plan.controls.iter().copied().collect()
        } else {
            BTreeSet::new()
        };
        for (i, w) in self.control_wells.iter().enumerate() {
            match WellId::parse(w, plan.format) {
                Ok(id) => {
                    controls.insert(id);
                }
                Err(e) => problems.push(ctx.invalid(&format!("control_wells[{i}]"), e.to_string())),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let key = format!("localization-pool|{}", plan.plate);
        let pool = ctx
            .resources
            .loaded::<_, std::convert::Infallible>(&key, || {
                Ok(Pools {
                    controls: controls.clone(),
                    by_protein: Mutex::new(BTreeMap::new()),
                    called: Mutex::new(BTreeSet::new()),
                })
            })
            .unwrap_or_else(|e| match e {});
        if controls.is_empty() {
            t::LocalizationWithoutControls {
                plate: plan.plate.as_str(),
            }
            .emit();
        }
        Ok(Box::new(LocalizeStage {
            params: self.params(plan.pixel_size_um),
            real: self.real(plan),
            morphology: self.adjust_for_morphology.then(|| self.landmark_channels(plan)),
            virtual_channels: self.virtual_channels,
            er,
            pool,
            permutations: self.permutations,
            min_controls: self.min_control_fields,
            threshold: self.shift_threshold,
            alpha: self.alpha,
        }))
    }
}

/// The features a well's score is computed over: the compartment fractions and the radial
/// position, where the protein sits. The texture measures (`cv`, `er_corr`) stay per-cell
/// columns: they follow the cells' shape and stain levels as much as the protein's place, so a
/// perturbation that changes morphology alone would move the score.
const SCORED: usize = 6;

/// The per-protein pools of a plate, shared by every worker's stage.
#[derive(Debug)]
struct Pools {
    controls: BTreeSet<WellId>,
    by_protein: Mutex<BTreeMap<String, ShiftPool>>,
    /// `(protein, well)` pairs called relocalized, so the log says so once per change.
    called: Mutex<BTreeSet<(String, String)>>,
}

impl Pools {
    /// Records the call of a score; true when the well has just become relocalized.
    fn call(&self, s: &WellShift) -> bool {
        let mut called = self.called.lock().unwrap_or_else(|p| p.into_inner());
        let key = (s.protein.clone(), s.well.clone());
        if s.relocalized {
            called.insert(key)
        } else {
            called.remove(&key);
            false
        }
    }
}

/// One worker's localize stage.
#[derive(Debug)]
pub struct LocalizeStage {
    params: LocParams,
    real: Vec<(String, usize)>,
    /// The landmark channels whose intensities, with the areas, are the morphology covariates;
    /// `None`: no adjustment.
    morphology: Option<Vec<usize>>,
    virtual_channels: bool,
    er: Option<usize>,
    pool: Arc<Pools>,
    permutations: usize,
    min_controls: usize,
    threshold: f64,
    alpha: f64,
}

impl Stage for LocalizeStage {
    fn name(&self) -> StageName {
        StageName::Localize
    }

    fn process(&mut self, work: &mut FieldWork) -> Result<(), StageError> {
        let Some(nuclei) = work.nuclei.as_ref() else {
            return Ok(());
        };
        let f = &work.field;
        let (w, h) = (f.width, f.height);
        let cells = work.cells.as_ref().unwrap_or(nuclei);
        let er = self.er.and_then(|c| f.channels[c].as_deref());
        let comps = localize::compartments(nuclei, cells, er, w, h, self.params)?;
        // Every protein plane of the field, acquired channels that arrived, then model outputs,
        // profiled in parallel.
        let real: Vec<(String, &[u16])> = self
            .real
            .iter()
            .filter_map(|(key, c)| f.channels[*c].as_deref().map(|p| (key.clone(), p)))
            .collect();
        let mut virtual_planes: Vec<(String, &[f32])> = Vec::new();
        if self.virtual_channels {
            for img in work
                .images
                .iter()
                .filter(|i| matches!(i.role, Role::VirtualStain | Role::VirtualStainDiffusion))
            {
                for (k, protein) in img.channels.iter().enumerate() {
                    if let Some(plane) = img.data.data.get(k * w * h..(k + 1) * w * h) {
                        virtual_planes.push((virtual_key(img.role, protein), plane));
                    }
                }
            }
        }
        let mut profiles: Vec<(String, Vec<[f32; 8]>)> = real
            .into_par_iter()
            .map(|(key, p)| comps.profiles(p).map(|v| (key, v)))
            .collect::<Result<_, _>>()?;
        profiles.extend(
            virtual_planes
                .into_par_iter()
                .map(|(key, p)| comps.profiles(p).map(|v| (key, v)))
                .collect::<Result<Vec<_>, _>>()?,
        );
        let labels: Vec<usize> = work.records.iter().map(|r| r.label as usize).collect();
        let covariates: Vec<Vec<f64>> = work
            .records
            .iter()
            .map(|r| match &self.morphology {
                None => Vec::new(),
                Some(landmarks) => {
                    let mut x = vec![f64::from(r.area_px).ln(), f64::from(r.nucleus_area_px + 1).ln()];
                    // A landmark missing from the field leaves its cells out of the score.
                    x.extend(landmarks.iter().map(|&c| {
                        let v = f64::from(r.mean_intensity.get(c).copied().unwrap_or(f32::NAN));
                        if v.is_finite() {
                            v.max(1.0).ln()
                        } else {
                            f64::NAN
                        }
                    }));
                    x
                }
            })
            .collect();
        let covariate_count = self.morphology.as_ref().map_or(0, |l| 2 + l.len());
        let key = &f.key;
        let mut shifts = Vec::new();
        for (protein, by_label) in profiles {
            let rows: Vec<Vec<f32>> = labels
                .iter()
                .map(|&l| by_label.get(l).map_or(vec![f32::NAN; FEATURES.len()], |p| p.to_vec()))
                .collect();
            for (d, feature) in FEATURES.iter().enumerate() {
                work.cell_measures.push((
                    localization_column(&protein, feature),
                    rows.iter().map(|r| r[d]).collect(),
                ));
            }
            // A control field moves every well's reference: all wells seen so far are scored
            // again (wells imaged before enough control fields get their first score here).
            // Any other field scores its own well.
            let scores: Vec<(WellId, Shift)> = {
                let mut pools = self.pool.by_protein.lock().unwrap_or_else(|p| p.into_inner());
                let pool = pools
                    .entry(protein.clone())
                    .or_insert_with(|| ShiftPool::new(SCORED, covariate_count, self.pool.controls.clone()));
                pool.add(key.well, key.field, key.timepoint, &rows, &covariates);
                let wells = if pool.is_control(key.well) {
                    pool.wells()
                } else {
                    [key.well].into()
                };
                wells
                    .into_iter()
                    .filter_map(|well| {
                        // Seeded by what the score is of, so the same fields give the same score
                        // whatever order the workers finish in.
                        let name = well.name();
                        let seed = fnv1a(
                            [protein.as_bytes(), name.as_bytes()]
                                .into_iter()
                                .flat_map(|p| p.iter().copied().chain([0xff])),
                        );
                        pool.score(well, self.permutations, self.min_controls, seed)
                            .map(|s| (well, s))
                    })
                    .collect()
            };
            for (well, s) in scores {
                let shift = WellShift {
                    protein: protein.clone(),
                    well: well.name(),
                    fields: s.fields,
                    control_fields: s.control_fields,
                    features: FEATURES[..SCORED].iter().map(|f| f.to_string()).collect(),
                    profile: s.profile,
                    control: s.control,
                    distance: s.distance,
                    shift: s.z,
                    p: s.p,
                    relocalized: s.z >= self.threshold && s.p <= self.alpha,
                };
                let newly = self.pool.call(&shift);
                t::WellLocalization {
                    field: &work.name,
                    shift: &shift,
                    newly_called: newly,
                }
                .emit();
                shifts.push(shift);
            }
        }
        work.localization = shifts;
        Ok(())
    }
}
