"""The bridge's zenoh session: private to this host unless told otherwise, with zenoh's own
security (TLS, mTLS, user/password, access control) loaded from a JSON5 file.

The rules match the daemon's `[zenoh]` section (docs/SECURITY.md): the bridge connects to the
daemon's default loopback endpoint, listens nowhere and does not scout by multicast; a
configuration file may add anything except the keys set here, which are an error when the file
sets them too (one place decides where the bridge connects).
"""

from __future__ import annotations

import ipaddress
import json
import logging
from pathlib import Path

import zenoh

log = logging.getLogger("liveomics_bridge")

#: The daemon's default listen endpoint (zenoh's registered port, on loopback).
DEFAULT_ENDPOINT = "tcp/127.0.0.1:7447"

#: zenoh keys the bridge sets itself, with the argument each comes from.
OWNED_KEYS = {
    "mode": "mode",
    "connect/endpoints": "connect",
    "listen/endpoints": "listen",
    "scouting/multicast/enabled": "multicast_scouting",
}


def is_local_endpoint(ep: str) -> bool:
    """Loopback addresses and local sockets: endpoints other hosts cannot reach."""
    proto, _, rest = ep.partition("/")
    if proto.startswith("unixsock") or proto == "unixpipe":
        return True
    addr = rest.split("#")[0].split("?")[0]
    host = addr.rsplit(":", 1)[0].strip("[]") if ":" in addr else addr
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _protected(conf: zenoh.Config, endpoints: list[str]) -> bool:
    def on(key):
        v = json.loads(conf.get_json(key))
        return v not in (None, False)

    all_tls = bool(endpoints) and all(ep.startswith("tls/") for ep in endpoints)
    return (on("access_control/enabled") or on("transport/auth/usrpwd/user")
            or on("transport/auth/usrpwd/dictionary_file") or (all_tls and on("transport/link/tls/enable_mtls")))


def _apply(conf: zenoh.Config, mode: str, connect: list[str], listen: list[str], scouting: bool) -> zenoh.Config:
    conf.insert_json5("mode", json.dumps(mode))
    conf.insert_json5("connect/endpoints", json.dumps(connect))
    conf.insert_json5("listen/endpoints", json.dumps(listen))
    conf.insert_json5("scouting/multicast/enabled", json.dumps(bool(scouting)))
    return conf


class SessionConfigError(ValueError):
    """A zenoh configuration file that cannot be used; the message names the file and key."""


def session_config(connect: list[str] | None = None, listen: list[str] | None = None,
                   config_file: str | Path | None = None, multicast_scouting: bool = False,
                   mode: str = "peer") -> zenoh.Config:
    """A `zenoh.Config`: `config_file` (or zenoh's defaults), then mode, endpoints and scouting.

    `connect` defaults to the daemon's loopback endpoint; `listen` to nothing."""
    if mode not in ("peer", "client"):
        raise SessionConfigError(f"mode must be peer or client, got {mode!r}")
    connect = [DEFAULT_ENDPOINT] if connect is None else list(connect)
    listen = [] if listen is None else list(listen)
    if config_file:
        try:
            conf = zenoh.Config.from_file(str(config_file))
        except Exception as e:  # zenoh reports parse and validation errors alike
            raise SessionConfigError(f"zenoh config file {config_file}: {e}") from e
        default = zenoh.Config()
        ours = _apply(zenoh.Config(), mode, connect, listen, multicast_scouting)
        for key, option in OWNED_KEYS.items():
            value = json.loads(conf.get_json(key))
            if value not in (json.loads(default.get_json(key)), json.loads(ours.get_json(key))):
                raise SessionConfigError(
                    f"zenoh config file {config_file} sets `{key}`, which the bridge sets from "
                    f"its {option} argument: remove it from the file")
    else:
        conf = zenoh.Config()
    conf = _apply(conf, mode, connect, listen, multicast_scouting)
    network = [ep for ep in connect + listen if not is_local_endpoint(ep)]
    if (network or multicast_scouting) and not _protected(conf, network):
        log.warning("zenoh is reachable from the network (%s) without TLS, authentication or access "
                    "control: anyone there could send follow-up requests; use --zenoh-config "
                    "(docs/SECURITY.md)", ", ".join(network) or "multicast scouting")
    return conf
