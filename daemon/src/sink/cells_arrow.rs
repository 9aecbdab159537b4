//! Per-cell records as an Arrow IPC stream: columnar, typed, and read directly by pyarrow
//! (`pyarrow.ipc.open_stream(payload).read_all()`), polars, or numpy via pyarrow. The format is
//! documented in `docs/PROTOCOL.md`; field-level facts sit in the schema metadata.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::{ArrayRef, Float32Array, RecordBatch, UInt32Array};
use arrow_ipc::writer::StreamWriter;
use arrow_schema::{ArrowError, DataType, Field, Schema};

use crate::field::{mean_column, FieldWork};

/// Field-level metadata: the same map goes into the Arrow schema and the zenoh attachment.
pub fn field_metadata(work: &FieldWork, instrument: &str) -> HashMap<String, String> {
    let f = &work.field;
    let unix_ns = f
        .acquired_at
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    HashMap::from([
        ("liveomics.format".into(), "cells/1".into()),
        ("instrument".into(), instrument.to_string()),
        ("plate".into(), f.key.plate.to_string()),
        ("well".into(), f.key.well.name()),
        ("row".into(), f.key.well.row_name()),
        ("column".into(), f.key.well.column_name()),
        ("field".into(), f.key.field.to_string()),
        ("timepoint".into(), f.key.timepoint.to_string()),
        ("acquired_unix_ns".into(), unix_ns.to_string()),
        ("width_px".into(), f.width.to_string()),
        ("height_px".into(), f.height.to_string()),
        ("pixel_size_um".into(), work.plan.pixel_size_um.to_string()),
        ("cells".into(), work.records.len().to_string()),
        ("segmented".into(), work.nuclei.is_some().to_string()),
        ("failed_models".into(), work.failed_models.join(",")),
        (
            "channels".into(),
            work.plan
                .channels
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(","),
        ),
    ])
}

/// Encodes the field's records as one Arrow IPC stream holding one record batch.
pub fn encode(work: &FieldWork, instrument: &str) -> Result<Vec<u8>, ArrowError> {
    let r = &work.records;
    let u32col = |name: &str, f: &dyn Fn(usize) -> u32| -> (Field, ArrayRef) {
        (
            Field::new(name, DataType::UInt32, false),
            Arc::new(UInt32Array::from((0..r.len()).map(f).collect::<Vec<_>>())),
        )
    };
    let f32col = |name: &str, f: &dyn Fn(usize) -> f32| -> (Field, ArrayRef) {
        (
            Field::new(name, DataType::Float32, false),
            Arc::new(Float32Array::from((0..r.len()).map(f).collect::<Vec<_>>())),
        )
    };
    let mut cols = vec![
        u32col("label", &|i| r[i].label),
        f32col("centroid_x_px", &|i| r[i].centroid_x_px),
        f32col("centroid_y_px", &|i| r[i].centroid_y_px),
        u32col("area_px", &|i| r[i].area_px),
        u32col("nucleus_area_px", &|i| r[i].nucleus_area_px),
        u32col("bbox_min_x", &|i| r[i].bbox_min_x),
        u32col("bbox_min_y", &|i| r[i].bbox_min_y),
        u32col("bbox_max_x", &|i| r[i].bbox_max_x),
        u32col("bbox_max_y", &|i| r[i].bbox_max_y),
    ];
    for (c, ch) in work.plan.channels.iter().enumerate() {
        cols.push(f32col(&mean_column(&ch.name), &|i| r[i].mean_intensity[c]));
    }
    for (name, values) in &work.cell_predictions {
        cols.push(f32col(name, &|i| values[i]));
    }
    let (fields, arrays): (Vec<Field>, Vec<ArrayRef>) = cols.into_iter().unzip();
    let schema = Arc::new(Schema::new_with_metadata(fields, field_metadata(work, instrument)));
    let batch = RecordBatch::try_new(schema.clone(), arrays)?;
    let mut writer = StreamWriter::try_new(Vec::new(), &schema)?;
    writer.write(&batch)?;
    writer.finish()?;
    writer.into_inner()
}
