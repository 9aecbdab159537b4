//! The attributes of a liveomics plate, typed: OME-NGFF 0.5 (`ome`: plate, well, multiscales,
//! omero, labels, image-label) and liveomics' own beside them (`liveomics`: the plate's resume
//! marker, each well's complete and incomplete fields and readouts, each image's acquisition
//! times). The zarr sink writes these, and resume and replay read them back, so that the three
//! agree on every name by construction.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::Compression;

/// The OME-Zarr (NGFF) version written.
pub const OME_VERSION: &str = "0.5";

/// `{"ome": {"version": …, …content}}` plus `liveomics` when given: a node's attributes.
pub fn attributes<T: Serialize, L: Serialize>(ome: Option<&T>, liveomics: Option<&L>) -> Map<String, Value> {
    let mut m = Map::new();
    if let Some(content) = ome {
        let mut o = match serde_json::to_value(content) {
            Ok(Value::Object(o)) => o,
            _ => Map::new(),
        };
        o.insert("version".into(), Value::from(OME_VERSION));
        m.insert("ome".into(), Value::Object(o));
    }
    if let Some(l) = liveomics {
        m.insert("liveomics".into(), serde_json::to_value(l).unwrap_or(Value::Null));
    }
    m
}

/// The `ome` and `liveomics` attributes of a node, read back; `None` for each that is absent
/// or not of the expected shape.
pub fn read<T: DeserializeOwned, L: DeserializeOwned>(attrs: &Value) -> (Option<T>, Option<L>) {
    let get = |k: &str| attrs.get(k).cloned();
    (
        get("ome").and_then(|v| serde_json::from_value(v).ok()),
        get("liveomics").and_then(|v| serde_json::from_value(v).ok()),
    )
}

/// A row or column of a plate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Named {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WellRef {
    pub path: String,
    #[serde(rename = "rowIndex")]
    pub row_index: u16,
    #[serde(rename = "columnIndex")]
    pub column_index: u16,
}

/// `ome.plate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plate {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    #[serde(default)]
    pub rows: Vec<Named>,
    #[serde(default)]
    pub columns: Vec<Named>,
    #[serde(default)]
    pub wells: Vec<WellRef>,
    #[serde(default)]
    pub field_count: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlateAttrs {
    pub plate: Plate,
}

/// An image of a well (`ome.well.images[]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRef {
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Well {
    #[serde(default)]
    pub images: Vec<ImageRef>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WellAttrs {
    pub well: Well,
}

/// What a plate must match for a restart to resume into it (`liveomics` on the plate).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Marker {
    pub layout: u32,
    pub plate: String,
    pub plate_format: u16,
    pub channels: Vec<String>,
    pub width_px: usize,
    pub height_px: usize,
    pub pixel_size_um: f64,
    pub timepoints: u32,
    pub pyramid_levels: u32,
    pub chunk_px: u64,
    pub shard: bool,
    pub compression: Compression,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub virtual_channels: Vec<String>,
}

/// `liveomics` on a well: the fields listed (as `[field, timepoint]`), those written without
/// all their channels, and the well-omics readouts with their history.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WellLiveomics {
    #[serde(default)]
    pub complete: Vec<(u32, u32)>,
    #[serde(default)]
    pub incomplete: Vec<(u32, u32)>,
    #[serde(default)]
    pub bulk: Map<String, Value>,
    /// Relocalization score per protein (the latest, over the most fields) with `history`: the
    /// score after each number of fields, `[fields, shift, p]`.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub localization: Map<String, Value>,
}

/// `liveomics` on a label image: the segmentation method that made it (`segmentation.method =
/// "auto"` decides per run by timing InstanSeg, so the plate says which ran).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelLiveomics {
    pub segmentation: String,
}

/// `liveomics` on an image: when each timepoint was acquired (ns since the epoch, as strings:
/// JSON readers lose precision past 2^53).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageLiveomics {
    #[serde(default)]
    pub acquired_unix_ns: BTreeMap<String, String>,
    /// Models skipped inline to keep the deadline, by timepoint: their virtual channels are
    /// empty until the backfill writes them and takes them off this list.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub owed: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Axis {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transform {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub scale: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dataset {
    pub path: String,
    #[serde(rename = "coordinateTransformations", default)]
    pub transforms: Vec<Transform>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Multiscale {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub axes: Vec<Axis>,
    #[serde(default)]
    pub datasets: Vec<Dataset>,
    /// How the lower levels were made (NGFF SHOULD; ngff-zarr's strict schema requires it), so a
    /// reader can tell intensities averaged from labels picked.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The downsampling method and its parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub min: u32,
    pub max: u32,
    pub start: u32,
    pub end: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OmeroChannel {
    #[serde(default)]
    pub label: String,
    #[serde(default)]
    pub color: String,
    #[serde(default)]
    pub active: bool,
    pub window: Option<Window>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Omero {
    #[serde(default)]
    pub channels: Vec<OmeroChannel>,
    #[serde(default)]
    pub rdefs: Map<String, Value>,
}

/// `ome` on an image: its pyramid and its channels' display settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageAttrs {
    #[serde(default)]
    pub multiscales: Vec<Multiscale>,
    pub omero: Option<Omero>,
}

/// `ome` on a label image: its pyramid, a colour per label and per-label properties.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabelAttrs {
    pub multiscales: Vec<Multiscale>,
    #[serde(rename = "image-label")]
    pub image_label: ImageLabel,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageLabel {
    pub colors: Vec<LabelColor>,
    /// Per label: `label-value` and the label's measurements (free-form by NGFF).
    pub properties: Vec<Map<String, Value>>,
    pub source: LabelSource,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabelColor {
    #[serde(rename = "label-value")]
    pub label_value: u32,
    pub rgba: [u8; 4],
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabelSource {
    pub image: String,
}

/// `ome` on an image's `labels` group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Labels {
    pub labels: Vec<String>,
}
