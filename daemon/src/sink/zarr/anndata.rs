//! Per-cell tables in the AnnData on-disk format (Zarr v3), one per image at
//! `{image}/tables/table`, read by `anndata.read_zarr` and, as a SpatialData table annotating the
//! `cells` label image, by spatialdata.
//!
//! Why `table` and `cells`: SpatialData element names must be unique across element kinds, so
//! the table cannot be called `cells` like the label image it annotates, and `region` names that
//! label element (SpatialData names allow no `/`).
//!
//! Why per image and not one per plate: a table written with its field, before the field is listed
//! in the well, is complete or absent exactly when the field is, so crash recovery needs no table
//! surgery and a redone field cannot leave duplicate rows; fields never share a file, so writers
//! never contend. A plate-wide table is one `anndata.concat` away (see `docs/OUTPUT.md`).

use serde_json::{json, Map, Value};
use zarrs::array::data_type;

use super::node::Store;
use crate::component::SinkError;
use crate::field::{ColumnKind, FieldWork, Values};

fn attrs(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

fn array_attrs() -> Map<String, Value> {
    attrs(json!({"encoding-type": "array", "encoding-version": "0.2.0"}))
}

fn string_array(store: &Store, node: &str, values: &[String]) -> Result<(), SinkError> {
    store.column(
        node,
        data_type::string(),
        "",
        values,
        attrs(json!({"encoding-type": "string-array", "encoding-version": "0.2.0"})),
    )
}

fn categorical(store: &Store, node: &str, value: &str, rows: usize) -> Result<(), SinkError> {
    store.group(
        node,
        attrs(json!({"encoding-type": "categorical", "encoding-version": "0.2.0", "ordered": false})),
    )?;
    store.column(
        &format!("{node}/codes"),
        data_type::int8(),
        0i8,
        &vec![0i8; rows],
        array_attrs(),
    )?;
    string_array(store, &format!("{node}/categories"), &[value.to_string()])
}

/// A 0-d string (anndata's `string` encoding), as `uns` holds SpatialData's keys.
fn string_scalar(store: &Store, node: &str, value: &str) -> Result<(), SinkError> {
    store.scalar_string(
        node,
        value,
        attrs(json!({"encoding-type": "string", "encoding-version": "0.2.0"})),
    )
}

fn dict(store: &Store, node: &str) -> Result<(), SinkError> {
    store.group(
        node,
        attrs(json!({"encoding-type": "dict", "encoding-version": "0.1.0"})),
    )
}

/// The table's node under its image group.
pub const TABLE: &str = "tables/table";
/// The label image the table annotates (SpatialData's `region`), under the image's `labels`.
pub const REGION: &str = "cells";
const REGION_KEY: &str = "region";
const INSTANCE_KEY: &str = "label";

/// Writes the cells table of one field under `image` (the image group's node path).
pub fn write_table(store: &Store, image: &str, work: &FieldWork) -> Result<(), SinkError> {
    let root = format!("{image}/{TABLE}");
    store.remove(&root)?;
    let r = &work.records;
    let n = r.len();
    let key = &work.field.key;
    let obs = format!("{root}/obs");
    let index: Vec<String> = r
        .iter()
        .map(|c| {
            format!(
                "{}_{}_f{}_t{}_c{}",
                key.plate,
                key.well.name(),
                key.field,
                key.timepoint,
                c.label
            )
        })
        .collect();
    string_array(store, &format!("{obs}/_index"), &index)?;
    let mut order: Vec<String> = Vec::new();
    let mut u32col = |name: &str, f: &dyn Fn(usize) -> u32| -> Result<(), SinkError> {
        let v: Vec<u32> = (0..n).map(f).collect();
        order.push(name.to_string());
        store.column(&format!("{obs}/{name}"), data_type::uint32(), 0u32, &v, array_attrs())
    };
    // The table's integer columns first (`field` and `timepoint` of the key after the label),
    // then its float columns, each in the table's order.
    let table = work.table();
    u32col("label", &|i| r[i].label)?;
    u32col("field", &|_| key.field)?;
    u32col("timepoint", &|_| key.timepoint)?;
    for c in table.columns.iter().filter(|c| c.kind != ColumnKind::Label) {
        if let Values::U32(v) = &c.values {
            u32col(&c.name, &|i| v[i])?;
        }
    }
    for c in &table.columns {
        if let Values::F32(v) = &c.values {
            store.column(
                &format!("{obs}/{}", c.name),
                data_type::float32(),
                0f32,
                v,
                array_attrs(),
            )?;
            order.push(c.name.clone());
        }
    }
    for (name, value) in [
        ("plate", key.plate.to_string()),
        ("well", key.well.name()),
        (REGION_KEY, REGION.to_string()),
    ] {
        categorical(store, &format!("{obs}/{name}"), &value, n)?;
        order.push(name.to_string());
    }
    store.group(
        &obs,
        attrs(json!({
            "encoding-type": "dataframe", "encoding-version": "0.2.0",
            "_index": "_index", "column-order": order,
        })),
    )?;
    // Per-cell model outputs are the variables: `X` is cells x outputs (also in `obs`, by name,
    // for tools that read columns). Without per-cell models `var` is empty and `X` absent.
    let var = format!("{root}/var");
    let names: Vec<String> = work.cell_predictions.iter().map(|(n, _)| n.clone()).collect();
    string_array(store, &format!("{var}/_index"), &names)?;
    store.group(
        &var,
        attrs(json!({
            "encoding-type": "dataframe", "encoding-version": "0.2.0",
            "_index": "_index", "column-order": [],
        })),
    )?;
    if !names.is_empty() {
        let g = names.len();
        let mut x = vec![0f32; n * g];
        for (j, (_, values)) in work.cell_predictions.iter().enumerate() {
            for (i, v) in values.iter().enumerate().take(n) {
                x[i * g + j] = *v;
            }
        }
        store.matrix(&format!("{root}/X"), n, g, &x, array_attrs())?;
    }
    for d in ["obsm", "varm", "obsp", "varp", "layers", "uns"] {
        dict(store, &format!("{root}/{d}"))?;
    }
    // SpatialData reads its keys from `uns` (through anndata) and its format from the flat group
    // attributes, as its own writer puts them.
    let sd = format!("{root}/uns/spatialdata_attrs");
    dict(store, &sd)?;
    for (k, v) in [
        ("region", REGION),
        ("region_key", REGION_KEY),
        ("instance_key", INSTANCE_KEY),
    ] {
        string_scalar(store, &format!("{sd}/{k}"), v)?;
    }
    store.group(&format!("{image}/tables"), Map::new())?;
    store.group(
        &root,
        attrs(json!({
            "encoding-type": "anndata", "encoding-version": "0.1.0",
            "spatialdata-encoding-type": "ngff:regions_table", "version": "0.2",
            "region": REGION, "region_key": REGION_KEY, "instance_key": INSTANCE_KEY,
        })),
    )
}
