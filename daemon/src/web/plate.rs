//! The page's state for a finished plate (`liveomics serve`): read from what the zarr sink
//! wrote, the plate and well attributes (fields, well-omics readouts and their history) and each
//! field's per-cell table (cell counts and means), so that the page shows what it showed live.

use std::path::Path;
use std::sync::Arc;

use liveomics_adapters::model::{AcquisitionPlan, ChannelInfo, Name, PlateFormat, WellId};
use serde_json::Value;
use zarrs::array::{Array, ArraySubset};
use zarrs::filesystem::FilesystemStore;

use crate::field::{WellReadout, WellShift};
use crate::live::{Live, WellView};
use crate::sink::zarr::anndata::TABLE;

/// Why a plate cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum PlateError {
    #[error("{path} is not an OME-Zarr plate written by liveomics: {reason}")]
    NotAPlate { path: String, reason: String },
}

/// Per-cell columns that say where a cell is, not what it measures: left out of the means.
const NOT_MEASURES: [&str; 9] = [
    "label",
    "field",
    "timepoint",
    "centroid_x_px",
    "centroid_y_px",
    "bbox_min_x",
    "bbox_min_y",
    "bbox_max_x",
    "bbox_max_y",
];

/// The `attributes` of the node `node` (a relative path) of the store at `dir`.
pub(super) fn attrs(dir: &Path, node: &str) -> Option<Value> {
    let text = std::fs::read_to_string(dir.join(node).join("zarr.json")).ok()?;
    serde_json::from_str::<Value>(&text).ok()?.get("attributes").cloned()
}

/// One column of a table as numbers, whatever its numeric type.
fn column(store: &Arc<FilesystemStore>, node: &str) -> Option<Vec<f64>> {
    let a = Array::open(store.clone(), node).ok()?;
    let all = ArraySubset::new_with_shape(a.shape().to_vec());
    if let Ok(v) = a.retrieve_array_subset::<Vec<f32>>(&all) {
        return Some(v.into_iter().map(f64::from).collect());
    }
    if let Ok(v) = a.retrieve_array_subset::<Vec<u32>>(&all) {
        return Some(v.into_iter().map(f64::from).collect());
    }
    a.retrieve_array_subset::<Vec<f64>>(&all).ok()
}

/// The page's state of the plate at `dir`.
pub fn load(dir: &Path) -> Result<Arc<Live>, PlateError> {
    let bad = |reason: &str| PlateError::NotAPlate {
        path: dir.display().to_string(),
        reason: reason.to_string(),
    };
    let root = attrs(dir, "").ok_or_else(|| bad("no readable zarr.json"))?;
    let marker = root.get("liveomics").ok_or_else(|| bad("no liveomics attributes"))?;
    let plate = root.pointer("/ome/plate").ok_or_else(|| bad("no ome.plate"))?;
    let name = marker.get("plate").and_then(Value::as_str).unwrap_or("plate");
    let format = marker.get("plate_format").and_then(Value::as_u64).unwrap_or(96) as u16;
    let format = PlateFormat::new(format).map_err(|e| bad(&e.to_string()))?;
    let wells: Vec<String> = plate
        .get("wells")
        .and_then(Value::as_array)
        .map(|w| {
            w.iter()
                .filter_map(|w| w.get("path")?.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let store = Arc::new(FilesystemStore::new(dir).map_err(|e| bad(&e.to_string()))?);
    let live = Arc::new(Live::default());
    let mut channels: Vec<String> = Vec::new();
    let mut fields_done = 0u64;
    let mut planned = Vec::new();
    for path in &wells {
        let Some((row, col)) = path.split_once('/') else {
            continue;
        };
        let Some(id) = WellId::parse(&format!("{row}{col}"), format).ok() else {
            continue;
        };
        planned.push(id);
        let well_attrs = attrs(dir, path).unwrap_or(Value::Null);
        let mut view = WellView::default();
        let complete: Vec<(u32, u32)> = well_attrs
            .pointer("/liveomics/complete")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default();
        for &(field, t) in &complete {
            view.fields.push((field, t));
            fields_done += 1;
            let image = format!("{path}/{field}");
            if channels.is_empty() {
                channels = attrs(dir, &image)
                    .and_then(|a| a.pointer("/ome/omero/channels").cloned())
                    .and_then(|c| c.as_array().cloned())
                    .map(|c| {
                        c.iter()
                            .filter_map(|c| c.get("label")?.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
            }
            let table = if attrs(dir, &format!("{image}/t{t}")).is_some() {
                format!("{image}/t{t}/{TABLE}")
            } else {
                format!("{image}/{TABLE}")
            };
            let order: Vec<String> = attrs(dir, &format!("{table}/obs"))
                .and_then(|a| a.get("column-order").cloned())
                .and_then(|c| serde_json::from_value(c).ok())
                .unwrap_or_default();
            let rows = column(&store, &format!("/{table}/obs/label")).map_or(0, |c| c.len());
            let cols: Vec<(String, Vec<f64>)> = order
                .iter()
                .filter(|c| !NOT_MEASURES.contains(&c.as_str()))
                .filter_map(|c| Some((c.clone(), column(&store, &format!("/{table}/obs/{c}"))?)))
                .collect();
            view.add_columns(rows, cols.iter().map(|(n, v)| (n.as_str(), v.clone())));
        }
        if let Some(loc) = well_attrs.pointer("/liveomics/localization").and_then(Value::as_object) {
            // A score whose profile holds a NaN (written as null) is left out.
            for s in loc
                .values()
                .filter_map(|v| serde_json::from_value::<WellShift>(v.clone()).ok())
            {
                view.add_shift(&s);
            }
        }
        if let Some(bulk) = well_attrs.pointer("/liveomics/bulk").and_then(Value::as_object) {
            for (model, v) in bulk {
                let Ok(latest) = serde_json::from_value::<WellReadout>(v.clone()) else {
                    continue;
                };
                let history: Vec<Vec<f32>> = v
                    .get("history")
                    .and_then(|h| serde_json::from_value(h.clone()).ok())
                    .unwrap_or_default();
                for (i, values) in history.iter().enumerate().filter(|(_, h)| !h.is_empty()) {
                    view.add_readout(&WellReadout {
                        model: model.clone(),
                        fields: i + 1,
                        values: values.clone(),
                        ..latest.clone()
                    });
                }
                view.add_readout(&latest);
            }
        }
        live.load_well(&id.name(), view);
    }
    let plan = AcquisitionPlan {
        plate: Name::new(name).map_err(|e| bad(&e.to_string()))?,
        format,
        channels: ChannelInfo::from_names(&channels),
        width: 0,
        height: 0,
        pixel_size_um: 0.0,
        wells: planned,
        fields_per_well: plate.get("field_count").and_then(Value::as_u64).unwrap_or(0) as u32,
        timepoints: 1,
        controls: Vec::new(),
    };
    let zarr = dir.file_name().map(|n| format!("/zarr/{}", n.to_string_lossy()));
    live.start(&plan, channels, zarr, "finished");
    live.set_fields_done(fields_done);
    Ok(live)
}
