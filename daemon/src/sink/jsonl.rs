//! `[sinks.jsonl]`: one JSON object per finished field, one per line, appended to a file: the
//! field's key, its cell count, the mean of every per-cell column over its cells, the models
//! that failed on it and its well's readouts after it. For `tail -f`, `jq`, a spreadsheet or a
//! LIMS import, where OME-Zarr is too much and zenoh is not at hand. Each line is written in one
//! call and flushed, so a reader never sees half a line of a field that was written.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use liveomics_adapters::model::AcquisitionPlan;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::component::{Context, Sink, SinkConfig, SinkError};
use crate::field::{ColumnKind, FieldWork};

/// `[sinks.jsonl]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JsonlSinkConfig {
    pub enabled: bool,
    /// The file the lines are appended to (created with its directory); relative paths are
    /// relative to the working directory. `--overwrite` starts it afresh.
    pub path: PathBuf,
}

impl Default for JsonlSinkConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            path: PathBuf::from("out/fields.jsonl"),
        }
    }
}

impl SinkConfig for JsonlSinkConfig {
    fn enabled(&self) -> bool {
        self.enabled
    }

    fn validate(&self, ctx: &Context, problems: &mut Vec<liveomics_adapters::Invalid>) {
        if self.enabled && (self.path.as_os_str().is_empty() || self.path.is_dir()) {
            problems.push(ctx.invalid("path", format!("{:?} must name a file", self.path)));
        }
    }

    fn build(&self, ctx: &Context, _plan: Arc<AcquisitionPlan>) -> Result<Box<dyn Sink>, SinkError> {
        Ok(Box::new(JsonlSink::open(&self.path, ctx.overwrite)?))
    }
}

/// The open file.
#[derive(Debug)]
pub struct JsonlSink {
    path: PathBuf,
    file: File,
}

impl JsonlSink {
    pub fn open(path: &Path, overwrite: bool) -> Result<Self, SinkError> {
        let io = |source| SinkError::Output {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(!overwrite)
            .write(true)
            .truncate(overwrite)
            .open(path)
            .map_err(io)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// The line of one field (without its newline).
    pub fn line(&self, work: &FieldWork) -> Value {
        let k = &work.field.key;
        if let Some(models) = &work.backfill {
            // A written field completed later: which models' outputs it now has.
            return json!({
                "plate": k.plate.as_str(),
                "well": k.well.to_string(),
                "field": k.field,
                "timepoint": k.timepoint,
                "backfilled": models,
                "failed_models": work.failed_models,
            });
        }
        let table = work.table();
        let mean = |values: Vec<f64>| -> Value {
            let (sum, count) = values
                .into_iter()
                .filter(|v| v.is_finite())
                .fold((0.0f64, 0usize), |(s, c), v| (s + v, c + 1));
            if count == 0 {
                Value::Null
            } else {
                json!(sum / count as f64)
            }
        };
        let means: Map<String, Value> = table
            .columns
            .iter()
            .filter(|c| c.kind == ColumnKind::Measure)
            .map(|c| (c.name.clone(), mean(c.values.f64())))
            .collect();
        let readouts: Vec<Value> = work
            .well_readouts
            .iter()
            .map(|r| {
                let values: Map<String, Value> = r
                    .outputs
                    .iter()
                    .cloned()
                    .zip(r.values.iter().map(|v| json!(v)))
                    .collect();
                json!({"model": r.model, "fields": r.fields, "values": values})
            })
            .collect();
        let acquired_unix_ns = work
            .field
            .acquired_at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        json!({
            "plate": k.plate.as_str(),
            "well": k.well.to_string(),
            "field": k.field,
            "timepoint": k.timepoint,
            "acquired_unix_ns": acquired_unix_ns,
            "incomplete": work.field.channels.iter().any(Option::is_none),
            "cells": table.rows,
            "means": means,
            "failed_models": work.failed_models,
            "owed": work.owed,
            "late": work.raw_stored,
            "well_readouts": readouts,
            "localization": work.localization,
        })
    }
}

impl Sink for JsonlSink {
    fn name(&self) -> &'static str {
        "jsonl"
    }

    fn write(&mut self, work: &FieldWork) -> Result<(), SinkError> {
        // A lagged field's raw planes: its line is written when its analysis arrives.
        if work.is_lagged() {
            return Ok(());
        }
        let mut line = serde_json::to_vec(&self.line(work)).map_err(|e| SinkError::Output {
            path: self.path.display().to_string(),
            source: e.into(),
        })?;
        line.push(b'\n');
        self.file.write_all(&line).map_err(|source| SinkError::Output {
            path: self.path.display().to_string(),
            source,
        })
    }

    fn finish(&mut self) -> Result<(), SinkError> {
        self.file.sync_data().map_err(|source| SinkError::Output {
            path: self.path.display().to_string(),
            source,
        })
    }
}
