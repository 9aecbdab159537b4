"""The bridge's zenoh session: private to this host unless told otherwise, with zenoh's own
security (TLS, mTLS, user/password, access control) loaded from a JSON5 file.

The rules match the daemon's `[zenoh]` section (docs/SECURITY.md): the bridge connects to the
daemon's default loopback endpoint, listens nowhere and does not scout by multicast; a
configuration file may add anything except the keys set here, which are an error when the file
sets them too (one place decides where the bridge connects).
"""

from __future__ import annotations

import json
from pathlib import Path

import zenoh

#: The daemon's default listen endpoint (zenoh's registered port, on loopback).
DEFAULT_ENDPOINT = "tcp/127.0.0.1:7447"

#: zenoh keys the bridge sets itself, with the option each comes from.
OWNED_KEYS = {
    "mode": "mode",
    "connect/endpoints": "connect",
    "listen/endpoints": "listen",
    "scouting/multicast/enabled": "multicast_scouting",
}


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
        for key, option in OWNED_KEYS.items():
            if conf.get_json(key) != default.get_json(key):
                raise SessionConfigError(
                    f"zenoh config file {config_file} sets `{key}`, which the bridge sets from "
                    f"its {option} option: remove it from the file")
    else:
        conf = zenoh.Config()
    conf.insert_json5("mode", json.dumps(mode))
    conf.insert_json5("connect/endpoints", json.dumps(connect))
    conf.insert_json5("listen/endpoints", json.dumps(listen))
    conf.insert_json5("scouting/multicast/enabled", json.dumps(bool(multicast_scouting)))
    return conf
