//! Events of the zenoh session and the zenoh source: opening, exposure, the bridge's liveliness, frame transit.

use super::*;

/// The acquisition bridge came or went (its zenoh liveliness token).
#[derive(Debug)]
pub struct BridgeLiveliness<'a> {
    pub key: &'a str,
    pub alive: bool,
}

impl BridgeLiveliness<'_> {
    pub fn emit(&self) {
        if self.alive {
            info!(key = self.key, "acquisition bridge connected");
        } else {
            warn!(
                key = self.key,
                "acquisition bridge lost: fields in flight go on incomplete after the assembly timeout; waiting for it to return"
            );
        }
        gauge!(BRIDGE_CONNECTED).set(if self.alive { 1.0 } else { 0.0 });
    }
}

/// The daemon's zenoh session is open: its id (what access-control rules and peers see), the
/// locators it listens on, and the zenoh configuration file it loaded.
#[derive(Debug)]
pub struct ZenohOpened<'a> {
    pub zid: &'a str,
    pub mode: &'a str,
    pub listening: &'a str,
    pub config_file: Option<&'a str>,
}

impl ZenohOpened<'_> {
    pub fn emit(&self) {
        info!(
            zid = self.zid,
            mode = self.mode,
            listening = self.listening,
            config_file = self.config_file.unwrap_or("none"),
            "zenoh session open"
        );
    }
}

/// The zenoh session can be reached from other hosts (a non-loopback endpoint, listened on or
/// connected to, or multicast scouting) and `zenoh.config_file` adds neither access control,
/// user/password authentication, nor mutual TLS on every such endpoint: anyone on the network
/// could publish frames or follow-up acks. Logged once at start.
#[derive(Debug)]
pub struct ZenohExposed<'a> {
    /// The non-local endpoints, listened on or connected to.
    pub endpoints: &'a str,
    pub multicast_scouting: bool,
}

impl ZenohExposed<'_> {
    pub fn emit(&self) {
        warn!(
            endpoints = self.endpoints,
            multicast_scouting = self.multicast_scouting,
            "zenoh is reachable from the network without TLS, authentication or access control; \
             set zenoh.config_file (docs/SECURITY.md)"
        );
    }
}

/// The zenoh source subscribed to its frames.
#[derive(Debug)]
pub struct SourceListening<'a> {
    pub key: &'a str,
}

impl SourceListening<'_> {
    pub fn emit(&self) {
        info!(key = self.key, "listening for frames");
    }
}

/// At the end of a zenoh-fed run: how long frames took from acquisition to arrival (for frames
/// whose header carries the acquisition time) and the ingest rate.
#[derive(Debug)]
pub struct FrameTransit {
    pub frames: u64,
    pub ingest_mb_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl FrameTransit {
    pub fn emit(&self) {
        info!(
            frames = self.frames,
            ingest_mb_s = self.ingest_mb_s,
            p50_ms = self.p50_ms,
            p99_ms = self.p99_ms,
            max_ms = self.max_ms,
            "frame transit (acquired_unix_ns in the header to arrival)"
        );
    }
}

/// The acquisition bridge left during the run and had not come back when it ended.
#[derive(Debug)]
pub struct BridgeGoneAtEnd<'a> {
    pub key: &'a str,
}

impl BridgeGoneAtEnd<'_> {
    pub fn emit(&self) {
        warn!(
            key = self.key,
            "the acquisition bridge left and did not come back: the plate may be incomplete"
        );
    }
}
