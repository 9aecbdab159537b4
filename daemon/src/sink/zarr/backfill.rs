//! Owed work and its backfill: a degraded field is written with its raw channels, labels and
//! tables, its image attributes list the models it is owed (`liveomics.owed`), and the plate is
//! valid as it is. The backfill reads the raw planes back ([`read_field`]), runs the owed
//! models, and [`ZarrSink::write_backfill`] adds their virtual channels to the same arrays and
//! takes the models off the list, in that order: a crash in between redoes the same planes.

use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use liveomics_adapters::model::{AcquisitionPlan, Field, FieldKey};
use zarrs::array::Array;
use zarrs::filesystem::FilesystemStore;

use super::node::{read_plane, zerr};
use super::ZarrSink;
use crate::component::SinkError;
use crate::field::FieldWork;
use crate::schedule::Owed;

/// The raw channels of a written field, read back from level 0 of its image, as a field that
/// first arrived at `received_at`.
pub fn read_field(
    plate_dir: &Path,
    plan: &AcquisitionPlan,
    key: &FieldKey,
    received_at: Instant,
) -> Result<Field, SinkError> {
    let node = format!("/{}/{}/{}/0", key.well.row_name(), key.well.column_name(), key.field);
    let store = Arc::new(FilesystemStore::new(plate_dir).map_err(zerr("/"))?);
    let array = Array::open(store.clone(), &node).map_err(zerr(&node))?;
    let shape = array.shape();
    let n = shape.len();
    if n < 2 || shape[n - 1] as usize != plan.width || shape[n - 2] as usize != plan.height {
        return Err(SinkError::Config(format!(
            "{node}: shape {shape:?} is not this plan's (c, {}, {}) image",
            plan.height, plan.width
        )));
    }
    let mut channels = Vec::with_capacity(plan.channels.len());
    for c in 0..plan.channels.len() as u64 {
        let px: Vec<u16> =
            read_plane(&array, c, u64::from(key.timepoint)).map_err(|e| SinkError::Config(format!("{node}: {e}")))?;
        channels.push(Some(Arc::from(px)));
    }
    Ok(Field {
        key: key.clone(),
        width: plan.width,
        height: plan.height,
        channels,
        acquired_at: acquired_at(&store, key).unwrap_or_else(SystemTime::now),
        received_at,
        origin: Default::default(),
    })
}

/// When the field was acquired, as its image records it (`liveomics.acquired_unix_ns`): a field
/// analysed late is published with the time it was acquired, not the time it was read back.
fn acquired_at(store: &Arc<FilesystemStore>, key: &FieldKey) -> Option<SystemTime> {
    let node = format!("/{}/{}/{}", key.well.row_name(), key.well.column_name(), key.field);
    let group = zarrs::group::Group::open(store.clone(), &node).ok()?;
    let ns: u64 = group
        .attributes()
        .get("liveomics")?
        .get("acquired_unix_ns")?
        .get(key.timepoint.to_string())?
        .as_str()?
        .parse()
        .ok()?;
    Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(ns))
}

impl ZarrSink {
    /// Remembers that the field of `work` is owed its skipped models, for its image attributes.
    pub(super) fn note_owed(&mut self, work: &FieldWork) {
        let key = &work.field.key;
        let image = self.owed.entry((key.well, key.field)).or_default();
        if work.owed.is_empty() {
            image.remove(&key.timepoint);
        } else {
            image.insert(key.timepoint, work.owed.clone());
        }
        if image.is_empty() {
            self.owed.remove(&(key.well, key.field));
        }
    }

    /// Hands a degraded field, now on disk, to the backlog (owed once every sink has it).
    pub(super) fn hand_to_backlog(&self, work: &FieldWork) {
        if work.owed.is_empty() {
            return;
        }
        self.scheduler.backlog.written(
            Owed {
                key: work.field.key.clone(),
                models: work.owed.clone(),
                since: work.field.received_at,
            },
            work.deadline,
        );
    }

    /// Adds the virtual channels of `models`, computed after the field was written, to its
    /// image, then takes them off the field's owed list.
    pub(super) fn write_backfill(&mut self, work: &FieldWork, models: &[String]) -> Result<(), SinkError> {
        let key = &work.field.key;
        let pair = (key.field, key.timepoint);
        if !self.wells.get(&key.well).is_some_and(|d| d.contains(&pair)) {
            return Err(SinkError::Config(format!(
                "backfill of {} for a field this plate does not list",
                work.name
            )));
        }
        self.store.renew()?;
        let image = format!("/{}/{}/{}", key.well.row_name(), key.well.column_name(), key.field);
        let planes = self.virtual_planes(work);
        for (c, px) in &planes {
            self.windows[*c].update(px);
        }
        self.write_planes(&image, key.timepoint, &planes)?;
        if let Some(owed) = self.owed.get_mut(&(key.well, key.field)) {
            if let Some(list) = owed.get_mut(&key.timepoint) {
                list.retain(|m| !models.contains(m));
                if list.is_empty() {
                    owed.remove(&key.timepoint);
                }
            }
            if owed.is_empty() {
                self.owed.remove(&(key.well, key.field));
            }
        }
        self.store.group(&image, self.image_metadata(key.well, key.field))?;
        if self.cfg.fsync {
            self.store.sync_tree(&image)?;
        }
        Ok(())
    }

    /// Owed work found in the plate at startup, handed to the backlog in plate order.
    pub(super) fn resume_owed(&self) {
        let now = Instant::now();
        for ((well, field), owed) in &self.owed {
            for (&timepoint, models) in owed {
                self.scheduler.backlog.record(
                    Owed {
                        key: FieldKey {
                            plate: self.plan.plate.clone(),
                            well: *well,
                            field: *field,
                            timepoint,
                        },
                        models: models.clone(),
                        since: now,
                    },
                    now,
                );
            }
        }
        self.scheduler.backlog.report();
    }
}
