//! Per-cell records as an Arrow IPC stream: columnar, typed, and read directly by pyarrow
//! (`pyarrow.ipc.open_stream(payload).read_all()`), polars, or numpy via pyarrow. The format is
//! documented in `docs/PROTOCOL.md`; field-level facts sit in the schema metadata.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::{ArrayRef, Float32Array, RecordBatch, UInt32Array};
use arrow_ipc::writer::StreamWriter;
use arrow_schema::{ArrowError, DataType, Field, Schema};

use crate::field::{FieldWork, Values};

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
        ("owed_models".into(), work.owed.join(",")),
        // A field analysed from the plate after it lagged behind the acquisition, and how long
        // after it arrived its analysis ended.
        ("late".into(), work.raw_stored.to_string()),
        (
            "analysis_lag_ms".into(),
            work.stages_done_at
                .map_or(0, |at| at.saturating_duration_since(f.received_at).as_millis())
                .to_string(),
        ),
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

/// Encodes the field's cell table as one Arrow IPC stream holding one record batch.
pub fn encode(work: &FieldWork, instrument: &str) -> Result<Vec<u8>, ArrowError> {
    let (fields, arrays): (Vec<Field>, Vec<ArrayRef>) = work
        .table()
        .columns
        .iter()
        .map(|c| -> (Field, ArrayRef) {
            match &c.values {
                Values::U32(v) => (
                    Field::new(&c.name, DataType::UInt32, false),
                    Arc::new(UInt32Array::from(v.clone())),
                ),
                Values::F32(v) => (
                    Field::new(&c.name, DataType::Float32, false),
                    Arc::new(Float32Array::from(v.clone())),
                ),
            }
        })
        .unzip();
    let schema = Arc::new(Schema::new_with_metadata(fields, field_metadata(work, instrument)));
    let batch = RecordBatch::try_new(schema.clone(), arrays)?;
    let mut writer = StreamWriter::try_new(Vec::new(), &schema)?;
    writer.write(&batch)?;
    writer.finish()?;
    writer.into_inner()
}
