//! OME-Zarr 0.5 HCS plate on the local filesystem.
//!
//! Layout: `{output}/{plate}.zarr/{row}/{column}/{field}/` holds the raw channels as a multiscale
//! pyramid (`0`, `1`, … of shape `(c, y, x)`, or `(t, c, y, x)` with several timepoints), the
//! nuclei and cell labels under `labels/` with the same pyramid, and the per-cell table under
//! `tables/table` (AnnData). See `docs/OUTPUT.md`.
//!
//! Crash safety: within a field, every array, label and table is written before the image
//! metadata, and a field is listed in its well (and the well in the plate) only after that; all
//! `zarr.json` documents are replaced atomically. A plate interrupted at any point is therefore
//! valid and lists only complete fields. On restart the same plate is resumed: listed fields are
//! skipped, anything else under an unlisted field is removed and redone. One sink thread owns the
//! store, so no two writers ever touch the same chunk or shard.

pub mod anndata;
mod backfill;
pub mod config;
mod metadata;
pub mod node;
pub mod ome;
mod pyramid;
mod verify;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use liveomics_adapters::model::{AcquisitionPlan, FieldKey, PlateFormat, WellId};
use rayon::prelude::*;
use serde_json::{json, Map, Value};
use zarrs::array::{data_type, Array};

use self::node::{io_err, store_plane, Store};
use crate::cluster::Member;
use crate::component::{Context, Sink, SinkConfig, SinkError, StageName};
use crate::field::{FieldWork, Values, VirtualChannel, WellReadout, WellShift};
use crate::schedule::Scheduler;
pub use backfill::read_field;
pub use config::{Compression, ZarrSinkConfig};

pub const LABEL_NAMES: [&str; 2] = ["nuclei", "cells"];
/// Version of the liveomics layout recorded in the plate; a resume requires the same.
const LAYOUT_VERSION: u32 = 1;

/// Display window per channel, averaged over the fields seen so far, so every image opens with
/// the same, representative contrast.
#[derive(Debug, Clone, Default)]
struct RunningWindow {
    n: u64,
    lo: f64,
    hi: f64,
}

impl RunningWindow {
    fn update(&mut self, px: &[u16]) {
        let hist = liveomics_kernels::cpu::histogram_u16(px);
        let lo = liveomics_kernels::cpu::percentile_from_histogram(&hist, px.len(), 0.1) as f64;
        let hi = liveomics_kernels::cpu::percentile_from_histogram(&hist, px.len(), 99.9) as f64;
        self.n += 1;
        self.lo += (lo - self.lo) / self.n as f64;
        self.hi += (hi - self.hi) / self.n as f64;
    }

    fn window(&self) -> (u16, u16) {
        if self.n == 0 {
            return (0, 65535);
        }
        let lo = self.lo.round() as u16;
        (lo, (self.hi.round() as u16).max(lo.saturating_add(1)))
    }
}

/// A 2x reduction of a plane: `(pixels, width, height) -> (pixels, width, height)`.
type Halve<T> = fn(&[T], usize, usize) -> Result<(Vec<T>, usize, usize), liveomics_kernels::KernelError>;

/// The zarr sink; see the module docs.
pub struct ZarrSink {
    store: Store,
    plan: Arc<AcquisitionPlan>,
    cfg: ZarrSinkConfig,
    marker: ome::Marker,
    /// Written (field, timepoint) pairs per well: exactly what the metadata lists.
    wells: BTreeMap<WellId, BTreeSet<(u32, u32)>>,
    /// Written pairs that lacked channels: listed (readable) but redone if they come again.
    incomplete: BTreeMap<WellId, BTreeSet<(u32, u32)>>,
    /// Images whose arrays exist (a later timepoint only adds pixels).
    images: BTreeSet<(WellId, u32)>,
    windows: Vec<RunningWindow>,
    /// Acquisition time of each timepoint of each image, recorded for replay at the original pace.
    acquired: BTreeMap<(WellId, u32), BTreeMap<u32, u128>>,
    /// Model outputs written as channels after the acquired ones (`TOMM20 (virtual)`).
    virtual_channels: Vec<VirtualChannel>,
    /// Well-omics readouts per well and model, with the readout after each field (convergence).
    bulk: BTreeMap<WellId, BTreeMap<String, BulkHistory>>,
    /// Relocalization scores per well and protein: the latest and `(fields, shift, p)` by fields.
    localization: BTreeMap<WellId, BTreeMap<String, ShiftHistory>>,
    /// Wells whose scores a control field moved since their attributes were written: written
    /// at their next field or at the end, not at once (a plate's worth of metadata writes, each
    /// fsynced, per control field would hold the sink up).
    stale: BTreeSet<WellId>,
    /// Models owed to each image, by timepoint (its `liveomics.owed`).
    owed: BTreeMap<(WellId, u32), BTreeMap<u32, Vec<String>>>,
    /// Where owed work goes once its field is on disk.
    scheduler: Arc<Scheduler>,
    /// This daemon's membership when several share the plate: wells are reloaded from the store
    /// before each field, and only the plate's writer writes the plate's metadata.
    member: Option<Arc<Member>>,
}

/// The latest well-omics readout of a well and the readout after each of its fields.
type BulkHistory = (WellReadout, Vec<Vec<f32>>);

/// The latest relocalization score of a well for a protein, and by the well's field count the
/// newest score: `(control fields, shift, p)`.
type ShiftHistory = (WellShift, BTreeMap<usize, (usize, f64, f64)>);

impl std::fmt::Debug for ZarrSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZarrSink").field("plate_dir", &self.store.root).finish()
    }
}

/// `B/3` → well id.
fn parse_well_path(path: &str) -> Option<WellId> {
    let (row, col) = path.split_once('/')?;
    let r = row
        .bytes()
        .next()
        .filter(|b| b.is_ascii_uppercase() && row.len() == 1)?;
    let c: u16 = col.parse().ok().filter(|&c| c >= 1)?;
    Some(WellId {
        row: (r - b'A') as u16,
        column: c - 1,
    })
}

impl ZarrSink {
    /// Where the plate of `plan` goes under `output`.
    pub fn plate_path(output: &Path, plan: &AcquisitionPlan) -> PathBuf {
        match output.to_str().filter(|_| node::s3_url(output).is_some()) {
            Some(url) => PathBuf::from(format!("{}/{}.zarr", url.trim_end_matches('/'), plan.plate)),
            None => output.join(format!("{}.zarr", plan.plate)),
        }
    }

    /// What must match for a restart to resume into an existing plate.
    fn marker(cfg: &ZarrSinkConfig, plan: &AcquisitionPlan, virtual_channels: &[VirtualChannel]) -> ome::Marker {
        ome::Marker {
            layout: LAYOUT_VERSION,
            plate: plan.plate.to_string(),
            plate_format: plan.format.wells,
            channels: plan.channels.iter().map(|c| c.name.clone()).collect(),
            width_px: plan.width,
            height_px: plan.height,
            pixel_size_um: plan.pixel_size_um,
            timepoints: plan.timepoints,
            pyramid_levels: cfg.pyramid_levels,
            chunk_px: cfg.chunk_px,
            shard: cfg.shard,
            compression: cfg.compression,
            virtual_channels: virtual_channels.iter().map(|v| v.label.clone()).collect(),
        }
    }

    /// Opens the output before any frame is acquired. A new plate is created; the same plate
    /// (same plan and layout) is resumed; a different one is an error unless `overwrite`.
    pub fn open(
        cfg: &ZarrSinkConfig,
        plan: Arc<AcquisitionPlan>,
        virtual_channels: Vec<VirtualChannel>,
        overwrite: bool,
        scheduler: Arc<Scheduler>,
        member: Option<Arc<Member>>,
        plate: &crate::resources::PlateStore,
    ) -> Result<Self, SinkError> {
        let out = &cfg.output;
        let plate_dir = Self::plate_path(out, &plan);
        let marker = Self::marker(cfg, &plan, &virtual_channels);
        let store = if node::s3_url(out).is_some() {
            Store::open_object(&plate_dir, cfg)?
        } else {
            if out.exists() && !out.is_dir() {
                return Err(SinkError::Config(format!(
                    "sinks.zarr.output {} exists and is not a directory",
                    out.display()
                )));
            }
            std::fs::create_dir_all(out).map_err(io_err(out))?;
            let probe = out.join(format!(".liveomics-probe-{}", std::process::id()));
            std::fs::write(&probe, b"probe").map_err(io_err(&probe))?;
            std::fs::remove_file(&probe).map_err(io_err(&probe))?;
            if plate_dir.exists() && !plate_dir.is_dir() {
                return Err(SinkError::NotOurs {
                    path: plate_dir.display().to_string(),
                });
            }
            Store::open(&plate_dir, cfg)?
        };
        if overwrite && !store.nothing_written() {
            // Only a plate this program wrote (or an empty one) is ever deleted: the path
            // comes from config and plate names, and a typo must not remove someone's data.
            let ours = store.attributes("/").is_some_and(|a| a.contains_key("liveomics"));
            if !ours && store.exists("/") && store.attributes("/").is_none() {
                return Err(SinkError::UnreadableRoot {
                    path: plate_dir.display().to_string(),
                });
            }
            if !ours {
                return Err(SinkError::NotOurs {
                    path: plate_dir.display().to_string(),
                });
            }
            store.remove_all()?;
        }
        let store = if overwrite && !store.is_object() {
            Store::open(&plate_dir, cfg)?
        } else {
            store
        };
        let mut sink = Self {
            store,
            windows: vec![RunningWindow::default(); plan.channels.len() + virtual_channels.len()],
            virtual_channels,
            bulk: BTreeMap::new(),
            localization: BTreeMap::new(),
            stale: BTreeSet::new(),
            plan,
            cfg: cfg.clone(),
            marker,
            wells: BTreeMap::new(),
            images: BTreeSet::new(),
            acquired: BTreeMap::new(),
            incomplete: BTreeMap::new(),
            owed: BTreeMap::new(),
            scheduler,
            member,
        };
        // Members of a cluster start together: a plate another member is creating (a
        // directory, no metadata yet) is new here too, and its root is the plate writer's to write.
        let has_root = sink.store.exists("/");
        if !sink.store.nothing_written() && (sink.member.is_none() || has_root) {
            sink.load_existing(&plate_dir)?;
            sink.resume_owed();
        }
        plate.set(Arc::clone(&sink.store.zarrs));
        if sink.member.is_none() || !has_root {
            sink.write_plate()?;
        }
        Ok(sink)
    }

    fn load_existing(&mut self, plate_dir: &Path) -> Result<(), SinkError> {
        let different = |reason: String| SinkError::DifferentPlate {
            path: plate_dir.display().to_string(),
            reason,
        };
        let not_ours = || SinkError::NotOurs {
            path: plate_dir.display().to_string(),
        };
        let root = match self.store.attributes("/") {
            Some(a) => Value::Object(a),
            None if self.store.exists("/") => {
                return Err(SinkError::UnreadableRoot {
                    path: plate_dir.display().to_string(),
                })
            }
            None => return Err(not_ours()),
        };
        // Compared as JSON, so that a marker of another layout is listed key by key, not
        // refused as unreadable.
        let marker = serde_json::to_value(&self.marker).unwrap_or(Value::Null);
        let (plate, stored) = ome::read::<ome::PlateAttrs, Value>(&root);
        match stored {
            Some(m) if m == marker => {}
            Some(m) => {
                let keys: Vec<&String> = match (&m, &marker) {
                    (Value::Object(a), Value::Object(b)) => a
                        .keys()
                        .chain(b.keys())
                        .filter(|k| a.get(*k) != b.get(*k))
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect(),
                    _ => Vec::new(),
                };
                return Err(different(format!(
                    "it was written with a different plan or layout (differing: {}; {m} here, {} now)",
                    if keys.is_empty() {
                        "the layout".to_string()
                    } else {
                        keys.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
                    },
                    marker
                )));
            }
            None => return Err(not_ours()),
        }
        for w in plate.map(|p| p.plate.wells).unwrap_or_default() {
            if let Some(id) = parse_well_path(&w.path) {
                if self.load_well(id, true) {
                    // Its listing names fields that failed verification: list only what holds.
                    self.write_well(id)?;
                }
            }
        }
        crate::telemetry::PlateResumed {
            plate: &plate_dir.display().to_string(),
            complete_fields: self.wells.values().map(|s| s.len()).sum::<usize>(),
        }
        .emit();
        Ok(())
    }

    /// Adds what the store holds of well `id` to what the sink knows of it: its fields (complete
    /// or not), their acquisition times and owed work, and its readouts when they pooled more
    /// fields. On resume; and in a cluster before each field, since another member may have
    /// written the well before it came here. With `verify` (resume), each complete field is
    /// checked first (`verify.rs`); one that fails is reported and left out, so the source
    /// redoes it. Returns whether any failed.
    fn load_well(&mut self, id: WellId, verify: bool) -> bool {
        let path = format!("{}/{}", id.row_name(), id.column_name());
        let liveomics_of = |node: &str| self.store.attributes(node).map(Value::Object);
        let Some(well) = liveomics_of(&path).map(|a| ome::read::<Value, ome::WellLiveomics>(&a).1) else {
            return false;
        };
        let well = well.unwrap_or_default();
        let mut done: BTreeSet<(u32, u32)> = well.complete.into_iter().collect();
        let incomplete: BTreeSet<(u32, u32)> = well.incomplete.into_iter().collect();
        let mut failed = false;
        if verify {
            done.retain(|&(f, t)| match self.verify_field(id, f, t) {
                Ok(()) => true,
                Err(e) => {
                    crate::telemetry::FieldUnverified {
                        field: &format!("{}/{}/f{f}/t{t}", self.plan.plate, id.name()),
                        part: e.part,
                        detail: &e.detail,
                    }
                    .emit();
                    failed = true;
                    false
                }
            });
        }
        for &(f, _) in done.iter().chain(&incomplete) {
            if !self.images.insert((id, f)) {
                continue;
            }
            let image: ome::ImageLiveomics = liveomics_of(&format!("{path}/{f}"))
                .and_then(|a| ome::read::<Value, _>(&a).1)
                .unwrap_or_default();
            let entry = self.acquired.entry((id, f)).or_default();
            for (t, ns) in image.acquired_unix_ns {
                if let (Ok(t), Ok(ns)) = (t.parse(), ns.parse()) {
                    entry.insert(t, ns);
                }
            }
            for (t, models) in image.owed {
                if let (Ok(t), false) = (t.parse::<u32>(), models.is_empty()) {
                    self.owed.entry((id, f)).or_default().insert(t, models);
                }
            }
        }
        let known = self.wells.entry(id).or_default();
        let known_incomplete = self.incomplete.entry(id).or_default();
        for p in &done {
            // Complete in the store wins over incomplete here: another member finished it.
            known.insert(*p);
            known_incomplete.remove(p);
        }
        for p in &incomplete {
            if known.insert(*p) {
                known_incomplete.insert(*p);
            }
        }
        let bulk = self.bulk.entry(id).or_default();
        for (model, v) in well.bulk {
            let (Ok(r), Some(history)) = (
                serde_json::from_value::<WellReadout>(v.clone()),
                v.get("history")
                    .and_then(|h| serde_json::from_value::<Vec<Vec<f32>>>(h.clone()).ok()),
            ) else {
                continue;
            };
            let mut r = r;
            r.pool = v
                .get("pool")
                .and_then(|p| serde_json::from_value(p.clone()).ok())
                .unwrap_or_default();
            if bulk.get(&model).is_none_or(|(last, _)| r.fields > last.fields) {
                bulk.insert(model, (r, history));
            }
        }
        failed
    }

    /// The wells the store lists, with their fields: what a cluster's final plate metadata
    /// lists, whichever member wrote them.
    fn stored_wells(&self) -> BTreeMap<WellId, BTreeSet<(u32, u32)>> {
        let mut out = BTreeMap::new();
        for row in self.store.children("/") {
            for col in self.store.children(&row) {
                let path = format!("{row}/{col}");
                let Some(id) = parse_well_path(&path) else { continue };
                let Some(attrs) = self.store.attributes(&path).map(Value::Object) else {
                    continue;
                };
                let well: ome::WellLiveomics = ome::read::<Value, _>(&attrs).1.unwrap_or_default();
                let fields: BTreeSet<(u32, u32)> = well.complete.into_iter().chain(well.incomplete).collect();
                if !fields.is_empty() {
                    out.insert(id, fields);
                }
            }
        }
        out
    }

    pub fn plate_dir(&self) -> &Path {
        &self.store.root
    }

    fn completed_fields(&self) -> Vec<FieldKey> {
        self.wells
            .iter()
            .flat_map(|(w, done)| {
                let incomplete = self.incomplete.get(w);
                done.iter()
                    .filter(move |p| !incomplete.is_some_and(|i| i.contains(p)))
                    .map(|&(field, timepoint)| FieldKey {
                        plate: self.plan.plate.clone(),
                        well: *w,
                        field,
                        timepoint,
                    })
            })
            .collect()
    }
}

impl SinkConfig for ZarrSinkConfig {
    fn enabled(&self) -> bool {
        self.enabled
    }

    fn validate(&self, ctx: &Context, problems: &mut Vec<liveomics_adapters::Invalid>) {
        problems.extend(self.validate().into_iter().map(|e| e.under(ctx.section)));
    }

    fn build(&self, ctx: &Context, plan: Arc<AcquisitionPlan>) -> Result<Box<dyn Sink>, SinkError> {
        let virtual_channels = if ctx.runs(StageName::Inference) {
            ctx.inference.virtual_channels()
        } else {
            Vec::new()
        };
        Ok(Box::new(ZarrSink::open(
            self,
            plan,
            virtual_channels,
            ctx.overwrite,
            Arc::clone(&ctx.resources.scheduler),
            ctx.resources.cluster.member().cloned(),
            &ctx.resources.plate,
        )?))
    }
}

impl Sink for ZarrSink {
    fn name(&self) -> &'static str {
        "zarr"
    }

    fn output(&self) -> Option<PathBuf> {
        Some(self.store.root.clone())
    }

    fn finish(&mut self) -> Result<(), SinkError> {
        for well in std::mem::take(&mut self.stale) {
            self.write_well(well)?;
        }
        // The plate's writer lists the wells last, once the other members are done with theirs.
        if let Some(m) = self.member.clone() {
            if m.writes_plate() {
                m.wait_alone(std::time::Duration::from_millis(m.settings.finish_wait_ms));
            }
            self.write_plate_listed()?;
        }
        Ok(())
    }

    fn completed(&self) -> Vec<FieldKey> {
        self.completed_fields()
    }

    fn write(&mut self, work: &FieldWork) -> Result<(), SinkError> {
        if let Some(models) = &work.backfill {
            return self.write_backfill(work, models);
        }
        let key = &work.field.key;
        let pair = (key.field, key.timepoint);
        if self.member.is_some() {
            self.load_well(key.well, false);
        }
        let listed = self.wells.get(&key.well).is_some_and(|d| d.contains(&pair));
        let was_incomplete = self.incomplete.get(&key.well).is_some_and(|d| d.contains(&pair));
        // A listed field still owed its analysis (it lagged) is written again when it arrives
        // analysed: from this daemon's backlog, or from the frames another member held for a
        // member that died before it analysed the field (docs/SCALING.md).
        let owes_analysis = self
            .owed
            .get(&(key.well, key.field))
            .and_then(|t| t.get(&key.timepoint))
            .is_some_and(|models| models.iter().any(|m| m == crate::field::OWED_ANALYSIS));
        if listed && !was_incomplete && !work.raw_stored && !owes_analysis {
            crate::telemetry::FieldAlreadyWritten { field: &work.name }.emit();
            return Ok(());
        }
        self.store.renew()?;
        let (row, col) = (key.well.row_name(), key.well.column_name());
        let image = format!("/{row}/{col}/{}", key.field);
        let new_image = !self.images.contains(&(key.well, key.field));
        if new_image {
            // Whatever a crash left here is not listed anywhere: start the image afresh.
            self.store.remove(&image)?;
            let channels = self.plan.channels.len() + self.virtual_channels.len();
            self.create_pyramid(&image, channels as u64, false)?;
        }
        if !work.raw_stored {
            for (c, px) in work.field.channels.iter().enumerate() {
                if let Some(px) = px {
                    self.windows[c].update(px);
                }
            }
        }
        let virtual_planes = self.virtual_planes(work);
        for (c, px) in &virtual_planes {
            self.windows[*c].update(px);
        }
        if work.raw_stored {
            // A lagged field's analysis: its raw planes went in when it was acquired.
            self.write_planes(&image, key.timepoint, &virtual_planes)?;
        } else {
            self.write_raw(&image, work, &virtual_planes)?;
        }
        let labels: Vec<(&str, &Vec<u32>)> = LABEL_NAMES
            .iter()
            .zip([&work.nuclei, &work.cells])
            .filter_map(|(n, l)| l.as_ref().map(|l| (*n, l)))
            .collect();
        for (name, _) in &labels {
            // A later timepoint may be the first one segmented: create what is missing.
            let node = format!("{image}/labels/{name}");
            if new_image || !self.store.exists(&format!("{node}/0")) {
                self.create_pyramid(&node, 1, true)?;
            }
        }
        labels.par_iter().try_for_each(|(name, l)| {
            let node = format!("{image}/labels/{name}");
            self.write_label(&node, key.timepoint, l)?;
            self.store.group(&node, self.label_metadata(name, work))
        })?;
        if !labels.is_empty() {
            let names = ome::Labels {
                labels: labels.iter().map(|(n, _)| n.to_string()).collect(),
            };
            self.store
                .group(&format!("{image}/labels"), ome::attributes::<_, ()>(Some(&names), None))?;
        }
        if self.cfg.tables && work.nuclei.is_some() {
            let table_image = if self.has_time() {
                let node = format!("{image}/t{}", key.timepoint);
                self.store.group(&node, Map::new())?;
                node
            } else {
                image.clone()
            };
            anndata::write_table(&self.store, &table_image, work)?;
        }
        let ns = work
            .field
            .acquired_at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        if !work.raw_stored {
            self.acquired
                .entry((key.well, key.field))
                .or_default()
                .insert(key.timepoint, ns);
        }
        self.note_owed(work);
        self.store.group(&image, self.image_metadata(key.well, key.field))?;
        self.images.insert((key.well, key.field));
        if self.cfg.fsync {
            self.store.sync_tree(&image)?;
        }
        let new_well = !self.wells.contains_key(&key.well);
        let done = self.wells.entry(key.well).or_default();
        done.insert(pair);
        let incomplete = self.incomplete.entry(key.well).or_default();
        if work.field.missing_channels().is_empty() {
            incomplete.remove(&pair);
        } else {
            incomplete.insert(pair);
        }
        if new_well {
            self.store.group(&format!("/{row}"), Map::new())?;
        }
        let bulk = self.bulk.entry(key.well).or_default();
        for r in &work.well_readouts {
            // Workers finish out of order: a readout is filed under its own field count, and the
            // latest is the one that pooled the most fields.
            let (last, history) = bulk.entry(r.model.clone()).or_insert_with(|| (r.clone(), Vec::new()));
            if history.len() < r.fields {
                history.resize(r.fields, Vec::new());
            }
            if let Some(slot) = r.fields.checked_sub(1).and_then(|i| history.get_mut(i)) {
                *slot = r.values.clone();
            }
            if r.fields >= last.fields {
                *last = r.clone();
            }
        }
        // Scores may be of other wells too (a control field rescores every well).
        for s in &work.localization {
            let Ok(well) = WellId::parse(&s.well, self.plan.format) else {
                continue;
            };
            let (last, history) = self
                .localization
                .entry(well)
                .or_default()
                .entry(s.protein.clone())
                .or_insert_with(|| (s.clone(), BTreeMap::new()));
            if history.get(&s.fields).is_none_or(|&(c, _, _)| s.control_fields >= c) {
                history.insert(s.fields, (s.control_fields, s.shift, s.p));
            }
            if s.supersedes(last) {
                *last = s.clone();
            }
            if well != key.well && self.wells.contains_key(&well) {
                self.stale.insert(well);
            }
        }
        self.stale.remove(&key.well);
        self.write_well(key.well)?;
        self.write_plate()?;
        self.hand_to_backlog(work);
        Ok(())
    }
}

impl ZarrSink {
    /// A well's group attributes from what the sink holds of it: its images, which are
    /// complete, its well-omics readouts and relocalization scores with their histories.
    fn write_well(&self, id: WellId) -> Result<(), SinkError> {
        let done = self.wells.get(&id).cloned().unwrap_or_default();
        let incomplete = self.incomplete.get(&id).cloned().unwrap_or_default();
        let fields: BTreeSet<u32> = done.iter().map(|&(f, _)| f).collect();
        let images = fields.iter().map(|f| ome::ImageRef { path: f.to_string() }).collect();
        let complete = done.iter().filter(|p| !incomplete.contains(p)).copied().collect();
        let missing = incomplete.iter().copied().collect();
        let bulk: Map<String, Value> = self
            .bulk
            .get(&id)
            .into_iter()
            .flatten()
            .map(|(model, (r, history))| {
                let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
                v["history"] = json!(history);
                if !r.pool.is_empty() {
                    v["pool"] = json!(r.pool);
                }
                (model.clone(), v)
            })
            .collect();
        let localization: Map<String, Value> = self
            .localization
            .get(&id)
            .into_iter()
            .flatten()
            .map(|(protein, (s, history))| {
                let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
                v["history"] = json!(history
                    .iter()
                    .map(|(n, (c, z, p))| json!([n, c, z, p]))
                    .collect::<Vec<_>>());
                (protein.clone(), v)
            })
            .collect();
        let well = ome::WellAttrs {
            well: ome::Well { images },
        };
        let liveomics = ome::WellLiveomics {
            complete,
            incomplete: missing,
            bulk,
            localization,
        };
        self.store.group(
            &format!("/{}/{}", id.row_name(), id.column_name()),
            ome::attributes(Some(&well), Some(&liveomics)),
        )
    }
}
