//! Publishes each field's per-cell records on `liveomics/{instrument}/cells/{plate}/{well}/{field}`
//! as an Arrow IPC stream, with the field metadata as a JSON attachment (so a subscriber can route
//! a message without decoding it).

use liveomics_adapters::model::AcquisitionPlan;
use serde::{Deserialize, Serialize};
use zenoh::{Session, Wait};

use super::cells_arrow;
use crate::component::{zenoh_err, Context, Sink, SinkConfig, SinkError};
use crate::field::{FieldWork, WellReadout, WellShift};
use crate::zenoh_session::{SharedSession, ZenohConfig};

/// `[sinks.zenoh]`: the session itself is `[zenoh]`'s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ZenohSinkConfig {
    pub enabled: bool,
}

impl Default for ZenohSinkConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

impl SinkConfig for ZenohSinkConfig {
    fn enabled(&self) -> bool {
        self.enabled
    }

    fn build(&self, ctx: &Context, plan: std::sync::Arc<AcquisitionPlan>) -> Result<Box<dyn Sink>, SinkError> {
        Ok(Box::new(ZenohSink::open(
            &ctx.resources.zenoh,
            ctx.zenoh,
            ctx.instrument,
            plan.plate.as_str(),
        )?))
    }
}

/// Per-well state of the plate so far: what late joiners get from the summary queryable, and
/// what `liveomics/{instrument}/wells/{plate}/{well}` carries after every field of the well.
#[derive(Debug, Default, Clone, serde::Serialize)]
struct WellSummary {
    well: String,
    fields: u64,
    cells: u64,
    mean_cell_area_px: f64,
    /// Mean over the well's cells so far of every per-cell model output (`{model}.{output}`).
    predictions: std::collections::BTreeMap<String, f64>,
    /// Well-omics readouts by model: bulk abundance per gene from the features pooled over the
    /// well's fields so far, with the number of fields and the spread across fields.
    bulk: std::collections::BTreeMap<String, WellReadout>,
    /// Relocalization score per protein against the control wells, after the well's fields so
    /// far (the `localize` stage).
    localization: std::collections::BTreeMap<String, WellShift>,
    #[serde(skip)]
    prediction_cells: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Default, serde::Serialize)]
struct PlateSummary {
    plate: String,
    state: &'static str,
    fields_done: u64,
    cells: u64,
    wells: std::collections::BTreeMap<String, WellSummary>,
}

/// The zenoh sink. Besides one message per field it keeps a liveliness token
/// (`liveomics/{instrument}/alive`), publishes the daemon's status on `liveomics/{instrument}/status`
/// after every field, and answers `liveomics/{instrument}/summary/{plate}` with the plate so far.
pub struct ZenohSink {
    session: Session,
    instrument: String,
    summary: std::sync::Arc<std::sync::Mutex<PlateSummary>>,
    _token: zenoh::liveliness::LivelinessToken,
    _queryable: zenoh::query::Queryable<()>,
}

impl std::fmt::Debug for ZenohSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZenohSink")
            .field("instrument", &self.instrument)
            .finish()
    }
}

impl ZenohSink {
    pub fn open(session: &SharedSession, zcfg: &ZenohConfig, instrument: &str, plate: &str) -> Result<Self, SinkError> {
        let e = zenoh_err;
        let session = session.get(zcfg)?;
        let token = session
            .liveliness()
            .declare_token(format!("liveomics/{instrument}/alive"))
            .wait()
            .map_err(e("cannot declare the liveliness token"))?;
        let summary = std::sync::Arc::new(std::sync::Mutex::new(PlateSummary {
            plate: plate.to_string(),
            state: "running",
            ..Default::default()
        }));
        let shared = summary.clone();
        let key = format!("liveomics/{instrument}/summary/{plate}");
        let reply_key = key.clone();
        let queryable = session
            .declare_queryable(key)
            .callback(move |query| {
                let body = shared
                    .lock()
                    .map(|s| serde_json::to_vec(&*s).unwrap_or_default())
                    .unwrap_or_default();
                if let Err(err) = query.reply(reply_key.clone(), body).wait() {
                    crate::telemetry::ErrorOccurred {
                        kind: "summary_query",
                        field: None,
                        error: &*err,
                    }
                    .emit();
                }
            })
            .wait()
            .map_err(e("cannot declare the summary queryable"))?;
        Ok(Self {
            session,
            instrument: instrument.to_string(),
            summary,
            _token: token,
            _queryable: queryable,
        })
    }

    fn publish_status(&self) -> Result<(), SinkError> {
        let body = self
            .summary
            .lock()
            .map(|s| {
                serde_json::to_vec(&serde_json::json!({
                    "state": s.state, "plate": s.plate, "fields_done": s.fields_done, "cells": s.cells,
                }))
                .unwrap_or_default()
            })
            .unwrap_or_default();
        self.session
            .put(format!("liveomics/{}/status", self.instrument), body)
            .encoding("application/json")
            .congestion_control(zenoh::qos::CongestionControl::Block)
            .wait()
            .map_err(zenoh_err("cannot publish the plate status"))
    }

    /// The key of a field's per-cell message. Every chunk is a validated name.
    /// `liveomics/{instrument}/fields/{plate}/{well}/{field}`: a degraded field's state, version 1
    /// when it is written without the work it is owed, version 2 when the backfill completed it
    /// (docs/PROTOCOL.md).
    fn publish_field_state(&self, work: &FieldWork) -> Result<(), SinkError> {
        let k = &work.field.key;
        let analysis = [crate::field::OWED_ANALYSIS.to_string()];
        let (version, owed, backfilled): (u32, &[String], &[String]) = match &work.backfill {
            Some(models) => (2, &[], models),
            // A lagged field, now analysed (its cells follow).
            None if work.raw_stored => (2, &work.owed, &analysis),
            None => (1, &work.owed, &[]),
        };
        let body = serde_json::json!({
            "plate": k.plate.as_str(),
            "well": k.well.name(),
            "field": k.field,
            "timepoint": k.timepoint,
            "version": version,
            "owed": owed,
            "backfilled": backfilled,
            "complete": owed.is_empty(),
            "failed_models": work.failed_models,
        });
        self.session
            .put(
                format!(
                    "liveomics/{}/fields/{}/{}/{}",
                    self.instrument,
                    k.plate,
                    k.well.name(),
                    k.field
                ),
                serde_json::to_vec(&body).unwrap_or_default(),
            )
            .encoding("application/json")
            .congestion_control(zenoh::qos::CongestionControl::Block)
            .wait()
            .map_err(zenoh_err("cannot publish a field's state"))
    }

    pub fn cells_key(instrument: &str, work: &FieldWork) -> String {
        let k = &work.field.key;
        format!("liveomics/{instrument}/cells/{}/{}/{}", k.plate, k.well.name(), k.field)
    }
}

impl Sink for ZenohSink {
    fn name(&self) -> &'static str {
        "zenoh"
    }

    fn write(&mut self, work: &FieldWork) -> Result<(), SinkError> {
        // A lagged field's raw planes only: announced owed its analysis, cells when it has them.
        if work.backfill.is_some() || work.is_lagged() {
            return self.publish_field_state(work);
        }
        if !work.owed.is_empty() || work.raw_stored {
            self.publish_field_state(work)?;
        }
        let payload = cells_arrow::encode(work, &self.instrument).map_err(SinkError::Encode)?;
        let meta = cells_arrow::field_metadata(work, &self.instrument);
        let attachment = serde_json::to_vec(&meta).unwrap_or_default();
        self.session
            .put(Self::cells_key(&self.instrument, work), payload)
            .encoding("application/vnd.apache.arrow.stream")
            .congestion_control(zenoh::qos::CongestionControl::Block)
            .attachment(attachment)
            .wait()
            .map_err(zenoh_err("cannot publish a field's cells"))?;
        if let Ok(mut s) = self.summary.lock() {
            let n = work.records.len() as u64;
            let area: f64 = work.records.iter().map(|r| r.area_px as f64).sum();
            s.fields_done += 1;
            s.cells += n;
            let well = work.field.key.well.name();
            let w = s.wells.entry(well.clone()).or_default();
            w.well = well;
            let total = w.mean_cell_area_px * w.cells as f64 + area;
            w.fields += 1;
            w.cells += n;
            w.mean_cell_area_px = if w.cells > 0 { total / w.cells as f64 } else { 0.0 };
            for (name, values) in &work.cell_predictions {
                let finite: Vec<f64> = values.iter().filter(|v| v.is_finite()).map(|&v| v as f64).collect();
                let k = w.prediction_cells.entry(name.clone()).or_default();
                let m = w.predictions.entry(name.clone()).or_default();
                let sum = *m * *k as f64 + finite.iter().sum::<f64>();
                *k += finite.len() as u64;
                *m = if *k > 0 { sum / *k as f64 } else { 0.0 };
            }
            for r in &work.well_readouts {
                // Fields finish out of order across workers: never replace a readout by an older one.
                if w.bulk.get(&r.model).is_none_or(|old| old.fields <= r.fields) {
                    w.bulk.insert(r.model.clone(), r.clone());
                }
            }
            // Scores may be of other wells too (a control field rescores every well): each
            // well whose score moved is published again.
            let mut touched = std::collections::BTreeSet::from([work.field.key.well.name()]);
            for sh in &work.localization {
                let w = s.wells.entry(sh.well.clone()).or_default();
                w.well = sh.well.clone();
                if w.localization.get(&sh.protein).is_none_or(|old| sh.supersedes(old)) {
                    w.localization.insert(sh.protein.clone(), sh.clone());
                }
                touched.insert(sh.well.clone());
            }
            for well in touched {
                let body = serde_json::to_vec(&s.wells[&well]).unwrap_or_default();
                self.session
                    .put(
                        format!("liveomics/{}/wells/{}/{well}", self.instrument, work.field.key.plate),
                        body,
                    )
                    .encoding("application/json")
                    .congestion_control(zenoh::qos::CongestionControl::Block)
                    .wait()
                    .map_err(zenoh_err("cannot publish a well readout"))?;
            }
        }
        self.publish_status()
    }

    fn finish(&mut self) -> Result<(), SinkError> {
        if let Ok(mut s) = self.summary.lock() {
            s.state = "finished";
        }
        // The session is the daemon's; the pipeline closes it once every sink has finished.
        self.publish_status()
    }
}
