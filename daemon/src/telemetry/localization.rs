//! Events of the localize stage: per-well relocalization scores.

use super::*;
use crate::field::WellShift;

/// A well's relocalization score for one protein, after a field.
#[derive(Debug)]
pub struct WellLocalization<'a> {
    pub field: &'a str,
    pub shift: &'a WellShift,
    /// The well was not called relocalized before this score.
    pub newly_called: bool,
}

impl WellLocalization<'_> {
    pub fn emit(&self) {
        let s = self.shift;
        if self.newly_called {
            info!(
                field = self.field,
                protein = %s.protein,
                well = %s.well,
                shift = s.shift,
                p = s.p,
                fields = s.fields,
                control_fields = s.control_fields,
                "well relocalized"
            );
        } else {
            debug!(
                field = self.field,
                protein = %s.protein,
                well = %s.well,
                shift = s.shift,
                p = s.p,
                "well localization"
            );
        }
        gauge!(WELL_RELOCALIZATION, "protein" => s.protein.clone(), "well" => s.well.clone()).set(s.shift);
    }
}

/// Localization profiles are measured but no well can be scored: the plan declares no control
/// wells and `localization.control_wells` is empty.
#[derive(Debug)]
pub struct LocalizationWithoutControls<'a> {
    pub plate: &'a str,
}

impl LocalizationWithoutControls<'_> {
    pub fn emit(&self) {
        warn!(
            plate = self.plate,
            "no control wells: per-cell localization is measured, but no well gets a relocalization \
             score (set localization.control_wells)"
        );
    }
}
