//! OME-Zarr 0.5 HCS plate on the local filesystem, written with zarrs.
//!
//! Layout: `{output}/{plate}.zarr/{row}/{column}/{field}` with the raw channels as one
//! `(c, y, x)` uint16 array (`(t, c, y, x)` when the plan has several timepoints) and the nuclei
//! and cell labels under `labels/`. Within a field, arrays are written before the metadata that
//! lists them, and the well and plate listings are updated as soon as a field is complete, so a
//! plate interrupted at any time is readable and lists only complete fields. One sink thread owns
//! the store: no two writers ever touch the same chunk.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use liveomics_adapters::model::{AcquisitionPlan, PlateFormat, WellId};
use serde_json::{json, Map, Value};
use zarrs::array::codec::ZstdCodec;
use zarrs::array::{data_type, ArrayBuilder, ArraySubset};
use zarrs::filesystem::FilesystemStore;
use zarrs::group::GroupBuilder;

use super::{Sink, SinkError};
use crate::config::{Compression, ZarrSinkConfig};
use crate::stage::FieldWork;

const OME_VERSION: &str = "0.5";
pub const LABEL_NAMES: [&str; 2] = ["nuclei", "cells"];

/// The zarr sink; see the module docs for the layout.
pub struct ZarrSink {
    store: Arc<FilesystemStore>,
    plate_dir: PathBuf,
    plan: Arc<AcquisitionPlan>,
    cfg: ZarrSinkConfig,
    /// Fields listed in each well's metadata so far.
    wells: BTreeMap<WellId, BTreeSet<u32>>,
    /// Images whose arrays and metadata exist (a later timepoint only adds pixels).
    images: BTreeSet<(WellId, u32)>,
}

impl std::fmt::Debug for ZarrSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZarrSink").field("plate_dir", &self.plate_dir).finish()
    }
}

fn zerr<E: std::error::Error + Send + Sync + 'static>(path: &str) -> impl FnOnce(E) -> SinkError + '_ {
    move |e| SinkError::Zarr {
        path: path.to_string(),
        source: Box::new(e),
    }
}

impl ZarrSink {
    /// Where the plate of `plan` goes under `output`.
    pub fn plate_path(output: &Path, plan: &AcquisitionPlan) -> PathBuf {
        output.join(format!("{}.zarr", plan.plate))
    }

    /// Checks the output before any frame is acquired: the directory must be creatable and
    /// writable, and an existing plate is only replaced when asked.
    pub fn open(cfg: &ZarrSinkConfig, plan: Arc<AcquisitionPlan>, overwrite: bool) -> Result<Self, SinkError> {
        let out = &cfg.output;
        let io = |source| SinkError::Output {
            path: out.display().to_string(),
            source,
        };
        std::fs::create_dir_all(out).map_err(io)?;
        let probe = out.join(format!(".liveomics-probe-{}", std::process::id()));
        std::fs::write(&probe, b"probe").map_err(io)?;
        std::fs::remove_file(&probe).map_err(io)?;
        let plate_dir = Self::plate_path(out, &plan);
        if plate_dir.exists() {
            if !overwrite {
                return Err(SinkError::Exists {
                    path: plate_dir.display().to_string(),
                });
            }
            std::fs::remove_dir_all(&plate_dir).map_err(io)?;
        }
        std::fs::create_dir_all(&plate_dir).map_err(io)?;
        let store = Arc::new(FilesystemStore::new(&plate_dir).map_err(zerr("/"))?);
        let sink = Self {
            store,
            plate_dir,
            plan,
            cfg: cfg.clone(),
            wells: BTreeMap::new(),
            images: BTreeSet::new(),
        };
        sink.group("/", Map::new())?;
        Ok(sink)
    }

    pub fn plate_dir(&self) -> &Path {
        &self.plate_dir
    }

    fn group(&self, path: &str, attributes: Map<String, Value>) -> Result<(), SinkError> {
        GroupBuilder::new()
            .attributes(attributes)
            .build(self.store.clone(), path)
            .map_err(zerr(path))?
            .store_metadata()
            .map_err(zerr(path))
    }

    fn ome(content: Value) -> Map<String, Value> {
        let mut ome = content.as_object().cloned().unwrap_or_default();
        ome.insert("version".into(), json!(OME_VERSION));
        let mut m = Map::new();
        m.insert("ome".into(), Value::Object(ome));
        m
    }

    fn has_time(&self) -> bool {
        self.plan.timepoints > 1
    }

    /// Axes time → channel → space, as OME-Zarr requires.
    fn axes(&self) -> Vec<Value> {
        let mut axes = Vec::new();
        if self.has_time() {
            axes.push(json!({"name": "t", "type": "time"}));
        }
        axes.push(json!({"name": "c", "type": "channel"}));
        axes.push(json!({"name": "y", "type": "space", "unit": "micrometer"}));
        axes.push(json!({"name": "x", "type": "space", "unit": "micrometer"}));
        axes
    }

    fn multiscales(&self, name: &str) -> Value {
        let px = self.plan.pixel_size_um;
        let mut scale = vec![json!(1.0)];
        if self.has_time() {
            scale.push(json!(1.0));
        }
        scale.push(json!(px));
        scale.push(json!(px));
        json!([{
            "name": name,
            "axes": self.axes(),
            "datasets": [{
                "path": "0",
                "coordinateTransformations": [{"type": "scale", "scale": scale}]
            }]
        }])
    }

    /// Creates an image (`uint16`) or label (`uint32`) array with the field's shape.
    fn create_array(&self, path: &str, channels: u64, labels: bool) -> Result<(), SinkError> {
        let (h, w) = (self.plan.height as u64, self.plan.width as u64);
        let chunk = self.cfg.chunk_px;
        let mut shape = vec![channels, h, w];
        let mut chunks = vec![1, chunk.min(h), chunk.min(w)];
        let mut names = vec!["c", "y", "x"];
        if self.has_time() {
            shape.insert(0, self.plan.timepoints as u64);
            chunks.insert(0, 1);
            names.insert(0, "t");
        }
        let mut b = if labels {
            ArrayBuilder::new(shape, chunks, data_type::uint32(), 0u32)
        } else {
            ArrayBuilder::new(shape, chunks, data_type::uint16(), 0u16)
        };
        if self.cfg.compression == Compression::Zstd {
            b.bytes_to_bytes_codecs(vec![Arc::new(ZstdCodec::new(self.cfg.zstd_level, false))]);
        }
        b.dimension_names(Some(names));
        b.build(self.store.clone(), path)
            .map_err(zerr(path))?
            .store_metadata()
            .map_err(zerr(path))
    }

    fn store_plane<T: zarrs::array::Element>(&self, path: &str, t: u32, c: u64, data: &[T]) -> Result<(), SinkError> {
        let (h, w) = (self.plan.height as u64, self.plan.width as u64);
        let array = zarrs::array::Array::open(self.store.clone(), path).map_err(zerr(path))?;
        let mut ranges = vec![c..c + 1, 0..h, 0..w];
        if self.has_time() {
            ranges.insert(0, t as u64..t as u64 + 1);
        }
        array
            .store_array_subset(&ArraySubset::new_with_ranges(&ranges), data)
            .map_err(zerr(path))
    }

    fn image_metadata(&self, work: &FieldWork) -> Value {
        let channels: Vec<Value> = self
            .plan
            .channels
            .iter()
            .enumerate()
            .map(|(c, ch)| {
                let (start, end) = work.field.channels[c]
                    .as_deref()
                    .map(display_window)
                    .unwrap_or((0, 65535));
                json!({
                    "label": ch.name,
                    "color": ch.color,
                    "active": true,
                    "window": {"min": 0, "max": 65535, "start": start, "end": end},
                })
            })
            .collect();
        json!({
            "multiscales": self.multiscales("raw"),
            "omero": {"channels": channels, "rdefs": {"model": "color"}},
        })
    }

    fn write_labels(&self, image: &str, work: &FieldWork) -> Result<(), SinkError> {
        let t = work.field.key.timepoint;
        let present: Vec<(&str, &Vec<u32>)> = LABEL_NAMES
            .iter()
            .zip([&work.nuclei, &work.cells])
            .filter_map(|(n, l)| l.as_ref().map(|l| (*n, l)))
            .collect();
        if present.is_empty() {
            return Ok(());
        }
        let new = !self.images.contains(&(work.field.key.well, work.field.key.field));
        for (name, labels) in &present {
            let arr = format!("{image}/labels/{name}/0");
            if new {
                self.create_array(&arr, 1, true)?;
            }
            self.store_plane(&arr, t, 0, labels)?;
        }
        if new {
            for (name, labels) in &present {
                let max = labels.iter().copied().max().unwrap_or(0);
                let colors: Vec<Value> = (1..=max.min(4096))
                    .map(|l| json!({"label-value": l, "rgba": label_color(l)}))
                    .collect();
                self.group(
                    &format!("{image}/labels/{name}"),
                    Self::ome(json!({
                        "multiscales": self.multiscales(name),
                        "image-label": {"colors": colors, "source": {"image": "../../"}},
                    })),
                )?;
            }
            let names: Vec<&str> = present.iter().map(|(n, _)| *n).collect();
            self.group(&format!("{image}/labels"), Self::ome(json!({"labels": names})))?;
        }
        Ok(())
    }

    fn plate_metadata(&self) -> Value {
        let fmt = self.plan.format;
        let rows: Vec<Value> = (0..fmt.rows())
            .map(|r| json!({"name": PlateFormat::row_name(r)}))
            .collect();
        let columns: Vec<Value> = (0..fmt.columns())
            .map(|c| json!({"name": PlateFormat::column_name(c)}))
            .collect();
        let wells: Vec<Value> = self
            .wells
            .keys()
            .map(|w| {
                json!({
                    "path": format!("{}/{}", w.row_name(), w.column_name()),
                    "rowIndex": w.row,
                    "columnIndex": w.column,
                })
            })
            .collect();
        let field_count = self.wells.values().map(|f| f.len()).max().unwrap_or(0);
        json!({"plate": {
            "name": self.plan.plate.to_string(),
            "version": OME_VERSION,
            "rows": rows,
            "columns": columns,
            "wells": wells,
            "field_count": field_count,
        }})
    }
}

/// Display window from the 0.1 and 99.9 percentiles, so a viewer opens the image legibly.
fn display_window(px: &[u16]) -> (u16, u16) {
    let hist = liveomics_kernels::cpu::histogram_u16(px);
    let lo = liveomics_kernels::cpu::percentile_from_histogram(&hist, px.len(), 0.1) as u16;
    let hi = liveomics_kernels::cpu::percentile_from_histogram(&hist, px.len(), 99.9) as u16;
    (lo, hi.max(lo.saturating_add(1)))
}

/// A stable, distinct colour per label id (golden-angle hue).
fn label_color(l: u32) -> [u8; 4] {
    let h = (l as f64 * 137.507_764) % 360.0;
    let x = 1.0 - ((h / 60.0) % 2.0 - 1.0).abs();
    let (r, g, b) = match (h / 60.0) as u32 {
        0 => (1.0, x, 0.0),
        1 => (x, 1.0, 0.0),
        2 => (0.0, 1.0, x),
        3 => (0.0, x, 1.0),
        4 => (x, 0.0, 1.0),
        _ => (1.0, 0.0, x),
    };
    [(r * 255.0) as u8, (g * 255.0) as u8, (b * 255.0) as u8, 255]
}

impl Sink for ZarrSink {
    fn name(&self) -> &'static str {
        "zarr"
    }

    fn write(&mut self, work: &FieldWork) -> Result<(), SinkError> {
        let key = &work.field.key;
        let (row, col) = (key.well.row_name(), key.well.column_name());
        let image = format!("/{row}/{col}/{}", key.field);
        let raw = format!("{image}/0");
        let new_image = !self.images.contains(&(key.well, key.field));
        if new_image {
            self.create_array(&raw, self.plan.channels.len() as u64, false)?;
        }
        for (c, px) in work.field.channels.iter().enumerate() {
            if let Some(px) = px {
                self.store_plane(&raw, key.timepoint, c as u64, px)?;
            }
        }
        self.write_labels(&image, work)?;
        if new_image {
            self.group(&image, Self::ome(self.image_metadata(work)))?;
            self.images.insert((key.well, key.field));
        }
        let new_well = !self.wells.contains_key(&key.well);
        let fields = self.wells.entry(key.well).or_default();
        if fields.insert(key.field) {
            let images: Vec<Value> = fields.iter().map(|f| json!({"path": f.to_string()})).collect();
            if new_well {
                self.group(&format!("/{row}"), Map::new())?;
            }
            self.group(&format!("/{row}/{col}"), Self::ome(json!({"well": {"images": images}})))?;
            self.group("/", Self::ome(self.plate_metadata()))?;
        }
        Ok(())
    }
}
