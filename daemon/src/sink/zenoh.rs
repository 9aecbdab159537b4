//! Publishes each field's per-cell records on `liveomics/{instrument}/cells/{plate}/{well}/{field}`
//! as an Arrow IPC stream, with the field metadata as a JSON attachment (so a subscriber can route
//! a message without decoding it).

use zenoh::{Session, Wait};

use super::{cells_arrow, Sink, SinkError};
use crate::config::{ZenohMode, ZenohSinkConfig};
use crate::stage::FieldWork;

/// Builds a zenoh session config from ours: peer mode needs no router; explicit endpoints and
/// multicast scouting are both configurable so tests can stay private to loopback.
pub fn session_config(cfg: &ZenohSinkConfig) -> Result<zenoh::Config, SinkError> {
    connection_config(cfg.mode, &cfg.connect, &cfg.listen, cfg.multicast_scouting).map_err(SinkError::Zenoh)
}

/// The session config for a mode, endpoints and scouting choice (shared by the zenoh sink and source).
pub fn connection_config(
    mode: ZenohMode,
    connect: &[String],
    listen: &[String],
    multicast_scouting: bool,
) -> Result<zenoh::Config, String> {
    let mut z = zenoh::Config::default();
    let e = |e: zenoh::Error| e.to_string();
    let mode = match mode {
        ZenohMode::Peer => "\"peer\"",
        ZenohMode::Client => "\"client\"",
    };
    z.insert_json5("mode", mode).map_err(e)?;
    let list = |v: &[String]| serde_json::to_string(v).unwrap_or_else(|_| "[]".into());
    if !connect.is_empty() {
        z.insert_json5("connect/endpoints", &list(connect)).map_err(e)?;
    }
    if !listen.is_empty() {
        z.insert_json5("listen/endpoints", &list(listen)).map_err(e)?;
    }
    z.insert_json5(
        "scouting/multicast/enabled",
        if multicast_scouting { "true" } else { "false" },
    )
    .map_err(e)?;
    Ok(z)
}

/// The zenoh sink.
pub struct ZenohSink {
    session: Session,
    instrument: String,
}

impl std::fmt::Debug for ZenohSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZenohSink")
            .field("instrument", &self.instrument)
            .finish()
    }
}

impl ZenohSink {
    pub fn open(cfg: &ZenohSinkConfig, instrument: &str) -> Result<Self, SinkError> {
        let session = zenoh::open(session_config(cfg)?)
            .wait()
            .map_err(|e| SinkError::Zenoh(format!("cannot open session: {e}")))?;
        tracing::info!(zid = %session.zid(), mode = ?cfg.mode, "zenoh session open");
        Ok(Self {
            session,
            instrument: instrument.to_string(),
        })
    }

    /// The key of a field's per-cell message. Every chunk is a validated name.
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
        let payload = cells_arrow::encode(work, &self.instrument).map_err(SinkError::Encode)?;
        let meta = cells_arrow::field_metadata(work, &self.instrument);
        let attachment = serde_json::to_vec(&meta).unwrap_or_default();
        self.session
            .put(Self::cells_key(&self.instrument, work), payload)
            .encoding("application/vnd.apache.arrow.stream")
            .attachment(attachment)
            .wait()
            .map_err(|e| SinkError::Zenoh(e.to_string()))
    }

    fn finish(&mut self) -> Result<(), SinkError> {
        self.session.close().wait().map_err(|e| SinkError::Zenoh(e.to_string()))
    }
}
