//! The daemon's one zenoh session, shared by the zenoh source, the zenoh sink and the closed-loop
//! sink, and its configuration (`[zenoh]`).
//!
//! One session per process means one listening socket and one network identity (one TLS
//! certificate, one user name) for access-control rules to name. The default is private to the
//! host: listen on `tcp/127.0.0.1:7447`, no multicast scouting; a bridge or a notebook on the same
//! host connects to that endpoint. Security beyond that is zenoh's own (TLS, mTLS, user/password,
//! access control), loaded from `zenoh.config_file`; liveomics only sets the keys it owns (mode,
//! endpoints, scouting) and refuses a file that sets them too, so one place decides where the
//! daemon listens.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use liveomics_adapters::Invalid;
use serde::{Deserialize, Serialize};
use zenoh::{Session, Wait};

/// zenoh's session mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ZenohMode {
    Peer,
    Client,
}

/// The `[zenoh]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ZenohConfig {
    pub mode: ZenohMode,
    /// Endpoints to listen on; the default is loopback only. `[]` listens nowhere (the daemon
    /// then only connects).
    pub listen: Vec<String>,
    /// Endpoints to connect to, e.g. a router or the bridge's host.
    pub connect: Vec<String>,
    /// Multicast scouting announces the daemon to, and finds peers on, the whole LAN segment
    /// with no configuration: off unless asked for.
    pub multicast_scouting: bool,
    /// A full zenoh JSON5 configuration (TLS, mTLS, user/password authentication, access
    /// control); empty for none. It must not set the keys above (see `OWNED_KEYS`). Relative
    /// to the working directory, like every path in the config.
    pub config_file: PathBuf,
}

/// The zenoh transports compiled into the daemon (`daemon/Cargo.toml`).
pub const TRANSPORTS: &[&str] = &["tcp", "tls", "udp", "unixsock-stream"];

/// The loopback endpoint a daemon listens on by default and a bridge connects to by default
/// (zenoh's registered port).
pub const DEFAULT_ENDPOINT: &str = "tcp/127.0.0.1:7447";

impl Default for ZenohConfig {
    fn default() -> Self {
        Self {
            mode: ZenohMode::Peer,
            listen: vec![DEFAULT_ENDPOINT.into()],
            connect: Vec::new(),
            multicast_scouting: false,
            config_file: PathBuf::new(),
        }
    }
}

/// The zenoh keys liveomics sets from `[zenoh]`, with the liveomics key each comes from. A
/// `config_file` that sets one of them to anything but zenoh's default or the value liveomics
/// sets is an error, so the endpoints are decided in one place.
pub const OWNED_KEYS: &[(&str, &str)] = &[
    ("mode", "zenoh.mode"),
    ("listen/endpoints", "zenoh.listen"),
    ("connect/endpoints", "zenoh.connect"),
    ("scouting/multicast/enabled", "zenoh.multicast_scouting"),
];

/// Why a session config could not be made.
#[derive(Debug, thiserror::Error)]
#[error("{}", self.invalid())]
pub enum SessionConfigError {
    File {
        path: PathBuf,
        message: String,
    },
    Collision {
        path: PathBuf,
        zenoh_key: &'static str,
        ours: &'static str,
    },
    Value {
        key: String,
        message: String,
    },
}

impl SessionConfigError {
    /// The liveomics key this error is filed under, and what is wrong with it.
    pub fn invalid(&self) -> Invalid {
        match self {
            Self::File { path, message } => Invalid::new("zenoh.config_file", format!("{}: {message}", path.display())),
            Self::Collision { path, zenoh_key, ours } => Invalid::new(
                "zenoh.config_file",
                format!(
                    "{} sets `{zenoh_key}`, which liveomics sets from {ours}: remove it from the file",
                    path.display()
                ),
            ),
            Self::Value { key, message } => Invalid::new(key, message.clone()),
        }
    }
}

/// zenoh's message without the source location it appends (` at /…/src/x.rs:12.`), which
/// means nothing to a user fixing a config.
fn message(e: &dyn std::fmt::Display) -> String {
    let text = e.to_string();
    match text.rfind(" at /") {
        Some(i) if text[i..].contains(".rs:") => text[..i].to_string(),
        _ => text,
    }
}

fn endpoint_problem(ep: &str) -> Option<String> {
    match ep.parse::<zenoh::config::EndPoint>() {
        Ok(_) => None,
        Err(e) => Some(format!(
            "{ep:?} is not a zenoh endpoint like tcp/127.0.0.1:7447 ({})",
            message(&e)
        )),
    }
}

/// Whether an endpoint can only be reached from this host: loopback addresses and local sockets.
pub fn is_local_endpoint(ep: &str) -> bool {
    let Some((proto, rest)) = ep.split_once('/') else {
        return false;
    };
    if proto.starts_with("unixsock") || proto == "unixpipe" {
        return true;
    }
    let addr = rest.split(['#', '?']).next().unwrap_or("");
    let host = match addr.rsplit_once(':') {
        Some((h, _port)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => addr,
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl ZenohConfig {
    /// Every problem of meaning, with key paths relative to `[zenoh]`'s parent (`zenoh.…`).
    pub fn validate(&self) -> Vec<Invalid> {
        let mut out = Vec::new();
        for (key, list) in [("zenoh.listen", &self.listen), ("zenoh.connect", &self.connect)] {
            for (i, ep) in list.iter().enumerate() {
                let proto = ep.split('/').next().unwrap_or("");
                if let Some(msg) = endpoint_problem(ep) {
                    out.push(Invalid::new(&format!("{key}[{i}]"), msg));
                } else if !TRANSPORTS.contains(&proto) {
                    out.push(Invalid::new(
                        &format!("{key}[{i}]"),
                        format!("{proto:?} is not a transport of this build (one of {TRANSPORTS:?})"),
                    ));
                }
                if proto == "tls" && self.config_file.as_os_str().is_empty() {
                    out.push(Invalid::new(
                        &format!("{key}[{i}]"),
                        "a tls endpoint needs certificates: set zenoh.config_file (docs/SECURITY.md)",
                    ));
                }
            }
        }
        if self.mode == ZenohMode::Client && self.connect.is_empty() && !self.multicast_scouting {
            out.push(Invalid::new(
                "zenoh.connect",
                "client mode needs a router to connect to (or multicast_scouting = true)",
            ));
        }
        if let Err(e) = self.session_config() {
            out.push(e.invalid());
        }
        out
    }

    /// The endpoints, listened on or connected to, that are not local to this host.
    fn network_endpoints(&self) -> Vec<&String> {
        self.listen
            .iter()
            .chain(&self.connect)
            .filter(|ep| !is_local_endpoint(ep))
            .collect()
    }

    /// Whether other hosts can reach this session (a non-local endpoint either way, or
    /// scouting) while nothing in `config_file` protects it: the reason to warn at start.
    pub fn exposed(&self, z: &zenoh::Config) -> bool {
        let net = self.network_endpoints();
        (self.multicast_scouting || !net.is_empty()) && !protects(z, &net)
    }

    /// The zenoh configuration: `config_file` (or zenoh's defaults), then the keys liveomics owns.
    pub fn session_config(&self) -> Result<zenoh::Config, SessionConfigError> {
        if self.config_file.as_os_str().is_empty() {
            return self.apply(zenoh::Config::default());
        }
        let file = load_file(&self.config_file)?;
        let default = zenoh::Config::default();
        let ours = self.apply(zenoh::Config::default())?;
        for &(zenoh_key, ours_key) in OWNED_KEYS {
            let v = json_at(&file, zenoh_key);
            if v != json_at(&default, zenoh_key) && v != json_at(&ours, zenoh_key) {
                return Err(SessionConfigError::Collision {
                    path: self.config_file.clone(),
                    zenoh_key,
                    ours: ours_key,
                });
            }
        }
        self.apply(file)
    }

    /// `z` with the keys liveomics owns set from this section.
    fn apply(&self, mut z: zenoh::Config) -> Result<zenoh::Config, SessionConfigError> {
        let value = |key: &'static str| {
            move |e: zenoh::Error| SessionConfigError::Value {
                key: key.to_string(),
                message: message(&e),
            }
        };
        let mode = match self.mode {
            ZenohMode::Peer => "\"peer\"",
            ZenohMode::Client => "\"client\"",
        };
        z.insert_json5("mode", mode).map_err(value("zenoh.mode"))?;
        let list = |v: &[String]| serde_json::to_string(v).unwrap_or_else(|_| "[]".into());
        z.insert_json5("listen/endpoints", &list(&self.listen))
            .map_err(value("zenoh.listen"))?;
        z.insert_json5("connect/endpoints", &list(&self.connect))
            .map_err(value("zenoh.connect"))?;
        z.insert_json5(
            "scouting/multicast/enabled",
            if self.multicast_scouting { "true" } else { "false" },
        )
        .map_err(value("zenoh.multicast_scouting"))?;
        Ok(z)
    }
}

/// The keys of a zenoh config file that name files (certificates, keys, the password
/// dictionary): relative ones resolve against the file's folder, where they are shipped, not
/// against the daemon's working directory (zenoh's own rule).
const FILE_KEYS: &[&str] = &[
    "transport/link/tls/root_ca_certificate",
    "transport/link/tls/listen_private_key",
    "transport/link/tls/listen_certificate",
    "transport/link/tls/connect_private_key",
    "transport/link/tls/connect_certificate",
    "transport/auth/usrpwd/dictionary_file",
];

fn load_file(path: &Path) -> Result<zenoh::Config, SessionConfigError> {
    let err = |e: zenoh::Error| SessionConfigError::File {
        path: path.to_path_buf(),
        message: message(&e),
    };
    let mut z = zenoh::Config::from_file(path).map_err(err)?;
    let dir = path.parent().unwrap_or(Path::new(""));
    for key in FILE_KEYS {
        if let Some(serde_json::Value::String(f)) = json_at(&z, key) {
            if !f.is_empty() && Path::new(&f).is_relative() {
                let full = serde_json::to_string(&dir.join(&f).display().to_string()).unwrap_or_default();
                z.insert_json5(key, &full).map_err(err)?;
            }
        }
    }
    Ok(z)
}

fn json_at(z: &zenoh::Config, key: &str) -> Option<serde_json::Value> {
    z.get_json(key).ok().and_then(|j| serde_json::from_str(&j).ok())
}

/// Whether a loaded configuration protects a session that other hosts can reach: access
/// control, user/password authentication, or mutual TLS on every non-local endpoint.
fn protects(z: &zenoh::Config, endpoints: &[&String]) -> bool {
    let set = |key: &str| json_at(z, key).is_some_and(|v| !v.is_null() && v != serde_json::Value::Bool(false));
    let all_tls = !endpoints.is_empty() && endpoints.iter().all(|ep| ep.starts_with("tls/"));
    set("access_control/enabled")
        || set("transport/auth/usrpwd/user")
        || set("transport/auth/usrpwd/dictionary_file")
        || (all_tls && set("transport/link/tls/enable_mtls"))
}

/// The daemon's session, opened on first use and shared by every component that talks zenoh.
/// Created empty before anything runs, so validation can construct components without opening
/// a socket; every component passes the run's `[zenoh]` section, and the first one opens it.
#[derive(Clone, Default)]
pub struct SharedSession {
    session: Arc<Mutex<Option<Session>>>,
}

impl std::fmt::Debug for SharedSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never waits: `get` may be opening the session right now.
        let open = self.session.try_lock().map(|s| s.is_some()).ok();
        f.debug_struct("SharedSession").field("open", &open).finish()
    }
}

/// Why the session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Config(#[from] SessionConfigError),
    #[error("cannot open the zenoh session (listen {listen:?}, connect {connect:?})")]
    Open {
        listen: Vec<String>,
        connect: Vec<String>,
        #[source]
        source: zenoh::Error,
    },
}

impl SharedSession {
    /// The session, opened from `cfg` if this is the first call.
    pub fn get(&self, cfg: &ZenohConfig) -> Result<Session, OpenError> {
        let mut guard = self.session.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = guard.as_ref() {
            return Ok(s.clone());
        }
        let zcfg = cfg.session_config()?;
        let exposed = cfg.exposed(&zcfg);
        let session = zenoh::open(zcfg).wait().map_err(|source| OpenError::Open {
            listen: cfg.listen.clone(),
            connect: cfg.connect.clone(),
            source,
        })?;
        crate::telemetry::ZenohOpened {
            zid: &session.zid().to_string(),
            mode: &format!("{:?}", cfg.mode),
            listening: &cfg.listen.join(","),
            config_file: (!cfg.config_file.as_os_str().is_empty())
                .then(|| cfg.config_file.display().to_string())
                .as_deref(),
        }
        .emit();
        if exposed {
            let endpoints: Vec<&str> = cfg.network_endpoints().iter().map(|s| s.as_str()).collect();
            crate::telemetry::ZenohExposed {
                endpoints: &endpoints.join(","),
                multicast_scouting: cfg.multicast_scouting,
            }
            .emit();
        }
        *guard = Some(session.clone());
        Ok(session)
    }

    /// Closes the session if it was opened: called once every component using it has finished,
    /// so the last messages are flushed before the process exits.
    pub fn close(&self) -> Result<(), zenoh::Error> {
        let taken = self.session.lock().unwrap_or_else(|p| p.into_inner()).take();
        match taken {
            Some(s) => s.close().wait(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(z: &zenoh::Config, key: &str) -> serde_json::Value {
        serde_json::from_str(&z.get_json(key).unwrap()).unwrap()
    }

    #[test]
    fn the_default_is_loopback_only_without_scouting() {
        let cfg = ZenohConfig::default();
        assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
        let z = cfg.session_config().unwrap();
        assert!(!cfg.exposed(&z));
        assert_eq!(json(&z, "listen/endpoints"), serde_json::json!(["tcp/127.0.0.1:7447"]));
        assert_eq!(json(&z, "connect/endpoints"), serde_json::json!([]));
        assert_eq!(json(&z, "scouting/multicast/enabled"), serde_json::json!(false));
    }

    #[test]
    fn local_endpoints_are_told_from_network_ones() {
        for ep in [
            "tcp/127.0.0.1:7447",
            "tcp/[::1]:7447",
            "tls/localhost:7447",
            "unixsock-stream//tmp/z.sock",
        ] {
            assert!(is_local_endpoint(ep), "{ep}");
        }
        for ep in [
            "tcp/0.0.0.0:7447",
            "tcp/[::]:0",
            "tls/192.168.1.5:7447",
            "tcp/scope-pc:7447",
            "nonsense",
        ] {
            assert!(!is_local_endpoint(ep), "{ep}");
        }
    }

    #[test]
    fn files_named_in_a_zenoh_file_resolve_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("z.json5");
        std::fs::write(
            &path,
            r#"{ transport: { link: { tls: { root_ca_certificate: "certs/ca.pem", listen_certificate: "/abs/c.pem" } } } }"#,
        )
        .unwrap();
        let z = load_file(&path).unwrap();
        let ca = dir.path().join("certs/ca.pem").display().to_string();
        assert_eq!(
            json(&z, "transport/link/tls/root_ca_certificate"),
            serde_json::json!(ca)
        );
        assert_eq!(
            json(&z, "transport/link/tls/listen_certificate"),
            serde_json::json!("/abs/c.pem")
        );
    }

    #[test]
    fn a_file_adds_security_and_keeps_our_endpoints() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("z.json5");
        std::fs::write(
            &path,
            r#"{ transport: { link: { tls: { root_ca_certificate: "/ca.pem", enable_mtls: true } } },
                 access_control: { enabled: true, default_permission: "deny" } }"#,
        )
        .unwrap();
        let cfg = ZenohConfig {
            listen: vec!["tls/127.0.0.1:7447".into()],
            config_file: path,
            ..ZenohConfig::default()
        };
        let z = cfg.session_config().unwrap();
        assert_eq!(
            json(&z, "transport/link/tls/root_ca_certificate"),
            serde_json::json!("/ca.pem")
        );
        assert_eq!(json(&z, "access_control/enabled"), serde_json::json!(true));
        assert_eq!(json(&z, "listen/endpoints"), serde_json::json!(["tls/127.0.0.1:7447"]));
    }

    #[test]
    fn a_file_that_sets_our_keys_is_an_error_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        for (body, zenoh_key, ours) in [
            (
                r#"{ listen: { endpoints: ["tcp/0.0.0.0:7447"] } }"#,
                "listen/endpoints",
                "zenoh.listen",
            ),
            (
                r#"{ connect: { endpoints: ["tcp/10.0.0.2:7447"] } }"#,
                "connect/endpoints",
                "zenoh.connect",
            ),
            (
                r#"{ scouting: { multicast: { enabled: true } } }"#,
                "scouting/multicast/enabled",
                "zenoh.multicast_scouting",
            ),
            (r#"{ mode: "client" }"#, "mode", "zenoh.mode"),
        ] {
            let path = dir.path().join("z.json5");
            std::fs::write(&path, body).unwrap();
            let cfg = ZenohConfig {
                config_file: path,
                ..ZenohConfig::default()
            };
            let problems = cfg.validate();
            assert_eq!(problems.len(), 1, "{body}: {problems:?}");
            let text = problems[0].to_string();
            assert!(text.starts_with("zenoh.config_file"), "{text}");
            assert!(text.contains(zenoh_key) && text.contains(ours), "{text}");
        }
    }

    #[test]
    fn a_file_may_restate_what_liveomics_sets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("z.json5");
        std::fs::write(
            &path,
            r#"{ mode: "peer", scouting: { multicast: { enabled: false } } }"#,
        )
        .unwrap();
        let cfg = ZenohConfig {
            config_file: path,
            ..ZenohConfig::default()
        };
        assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
    }

    #[test]
    fn network_endpoints_without_protection_are_exposed() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, body: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, body).unwrap();
            p
        };
        let plain = write("plain.json5", "{ transport: { link: { tx: { lease: 10000 } } } }");
        let mtls = write(
            "mtls.json5",
            r#"{ transport: { link: { tls: { root_ca_certificate: "/ca.pem", enable_mtls: true } } } }"#,
        );
        let acl = write(
            "acl.json5",
            r#"{ access_control: { enabled: true, default_permission: "deny" } }"#,
        );
        let case = |listen: &[&str], connect: &[&str], scouting: bool, file: Option<&PathBuf>| {
            let cfg = ZenohConfig {
                listen: listen.iter().map(|s| s.to_string()).collect(),
                connect: connect.iter().map(|s| s.to_string()).collect(),
                multicast_scouting: scouting,
                config_file: file.cloned().unwrap_or_default(),
                ..ZenohConfig::default()
            };
            cfg.exposed(&cfg.session_config().unwrap())
        };
        assert!(!case(&["tcp/127.0.0.1:7447"], &[], false, None));
        assert!(case(&["tcp/0.0.0.0:7447"], &[], false, None));
        assert!(
            case(&[], &["tcp/10.0.0.5:7447"], false, None),
            "connecting out counts too"
        );
        assert!(case(&["tcp/127.0.0.1:7447"], &[], true, None), "scouting");
        assert!(
            case(&["tcp/0.0.0.0:7447"], &[], false, Some(&plain)),
            "a file without security"
        );
        assert!(
            case(&["tcp/0.0.0.0:7447"], &[], false, Some(&mtls)),
            "mTLS does not cover tcp"
        );
        assert!(!case(&["tls/0.0.0.0:7447"], &[], false, Some(&mtls)));
        assert!(!case(&["tcp/0.0.0.0:7447"], &[], false, Some(&acl)));
    }

    #[test]
    fn transports_not_built_in_and_tls_without_certificates_are_errors() {
        let cfg = ZenohConfig {
            listen: vec!["quic/127.0.0.1:7447".into(), "tls/127.0.0.1:7448".into()],
            ..ZenohConfig::default()
        };
        let problems: Vec<String> = cfg.validate().iter().map(|i| i.to_string()).collect();
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("zenoh.listen[0]") && p.contains("transport")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("zenoh.listen[1]") && p.contains("config_file")),
            "{problems:?}"
        );
    }

    #[test]
    fn bad_files_and_endpoints_name_their_keys() {
        let cfg = ZenohConfig {
            listen: vec!["127.0.0.1:7447".into()],
            connect: vec!["tcp/ok:1".into(), "tcp".into()],
            config_file: "/nonexistent/zenoh.json5".into(),
            ..ZenohConfig::default()
        };
        let keys: Vec<String> = cfg.validate().iter().map(|i| i.to_string()).collect();
        assert!(keys.iter().any(|k| k.starts_with("zenoh.listen[0]")), "{keys:?}");
        assert!(keys.iter().any(|k| k.starts_with("zenoh.connect[1]")), "{keys:?}");
        assert!(keys.iter().any(|k| k.starts_with("zenoh.config_file")), "{keys:?}");
        assert!(!keys.iter().any(|k| k.starts_with("zenoh.connect[0]")), "{keys:?}");
    }
}
