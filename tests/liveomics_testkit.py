"""What the tests (`tests/`) and the benchmarks (`benches/`) share: where the binary is, daemon
configurations built as dicts and written as TOML (tomli-w), and one way to start a daemon and
wait until it is ready. A plain module, not pytest's conftest, so that benchmarks import it too:

    sys.path.insert(0, str(ROOT / "tests")); from liveomics_testkit import Daemon, zenoh_daemon_config
"""

import copy
import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import tomli_w

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("LIVEOMICS_BIN", ROOT / "target" / "release" / "liveomics"))


def ap(pred, truth, tau: float) -> float:
    """StarDist's average precision: TP / (TP + FP + FN), objects matched one to one at
    IoU > tau (unique for tau >= 0.5, so no assignment problem)."""
    p, t = pred.ravel().astype(np.int64), truth.ravel().astype(np.int64)
    both = (p > 0) & (t > 0)
    pairs, inter = np.unique(np.stack([p[both], t[both]]), axis=1, return_counts=True)
    area_p = np.bincount(p)
    area_t = np.bincount(t)
    iou = inter / (area_p[pairs[0]] + area_t[pairs[1]] - inter)
    tp = int((iou > tau).sum())
    n_p, n_t = int((area_p[1:] > 0).sum()), int((area_t[1:] > 0).sum())
    return tp / max(tp + (n_p - tp) + (n_t - tp), 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, headers=None) -> tuple[int, dict, bytes]:
    """GET `path` from the daemon's HTTP server on loopback: status, headers (lower-case), body."""
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", path, headers=headers or {})
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, body


def run(binary, *args, timeout=300, **kw):
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)


def merged(base: dict, extra: dict) -> dict:
    """`base` with `extra` laid over it, section by section (a copy; neither is changed)."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merged(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def toml_text(cfg: dict) -> str:
    """A configuration dict as the TOML file the daemon reads (paths become strings)."""
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return str(v) if isinstance(v, Path) else v

    return tomli_w.dumps(plain(cfg))


# No test binds a fixed port: the embedded defaults (zenoh on 7447, metrics on 9464) may be held
# by a developer's daemon. Every config built here listens nowhere or on port 0.
NO_FIXED_PORTS = {"zenoh": {"listen": []}, "telemetry": {"http_listen": "127.0.0.1:0"}}


def sim_config(plate="e2e", wells=("B2", "B3"), fields=2, size=512, rate=0.0, seed=7, extra=None) -> dict:
    """`[source.simulator]` of a small plate whose first well is its control well, with the
    simulator keys in `extra` added; zenoh listens nowhere and the metrics endpoint takes a free
    port (`NO_FIXED_PORTS`; a test of the defaults removes them)."""
    return {**copy.deepcopy(NO_FIXED_PORTS), "source": {"simulator": {
        "seed": seed, "plate": plate, "wells": list(wells), "control_wells": [wells[0]],
        "fields_per_well": fields, "width_px": size, "height_px": size, "rate_fields_per_s": rate,
        **(extra or {}),
    }}}


def simulated_field(binary, dest: Path, seed=31, size=512) -> tuple[dict, dict]:
    """One simulated field written by `liveomics simulate` under `dest`: its DAPI and ER images
    and its nuclei and cell truth, by name."""
    import tifffile

    cfg = dest / "field.toml"
    cfg.write_text(toml_text({"source": {"simulator": {
        "seed": seed, "wells": ["B2"], "control_wells": ["B2"], "fields_per_well": 1,
        "width_px": size, "height_px": size}}}))
    subprocess.run([str(binary), "simulate", "--config", str(cfg), "--out", str(dest / "sim")], check=True,
                   capture_output=True)
    img = {c: tifffile.imread(dest / "sim" / "images" / f"B2_f0_t0_{c}.tif") for c in ("DAPI", "ER")}
    truth = {k: tifffile.imread(dest / "sim" / "truth" / f"B2_f0_t0_{k}.tif") for k in ("nuclei", "cells")}
    return img, truth


def daemon_config(out: Path, instrument: str, zenoh_port: int | None, zenoh_enabled=True) -> dict:
    """A run writing OME-Zarr under `out`, publishing on zenoh through `zenoh_port` (a peer
    listening there) or nowhere, with the metrics endpoint on a free port."""
    return {
        "instrument": instrument,
        # The plumbing under test, not a model: the classical path whatever is installed
        # (test_instanseg.py runs the model).
        "segmentation": {"method": "classical"},
        "latency_budget_ms": 5000,
        "sinks": {"zarr": {"output": out}, "zenoh": {"enabled": zenoh_enabled}},
        "zenoh": {"listen": [], "connect": [f"tcp/127.0.0.1:{zenoh_port}"] if zenoh_port else []},
        "telemetry": {"http_listen": "127.0.0.1:0"},
    }


def zenoh_daemon_config(out: Path, endpoint: str, instrument="mm", plate="MM1", channels=("DAPI", "FITC"),
                        size=512, idle_exit_ms=6000, zenoh_file="") -> dict:
    """A daemon fed by the zenoh source (a DemoCamera-shaped plate by default: DAPI and FITC,
    512²), listening on `endpoint`, with an optional zenoh config file (TLS, access control)."""
    return {
        "instrument": instrument,
        "latency_budget_ms": 5000,
        "source": {"kind": "zenoh", "zenoh": {
            "plate": plate, "channels": list(channels), "width_px": size, "height_px": size,
            "pixel_size_um": 1.0, "idle_exit_ms": idle_exit_ms,
        }},
        "segmentation": {"method": "classical", "nuclei_channel": channels[0], "cells_channel": channels[-1],
                         "nucleus_diameter_um": 10.0},
        "sinks": {"zarr": {"output": out}},
        "zenoh": {"listen": [endpoint], "config_file": str(zenoh_file)},
        "telemetry": {"http_listen": ""},
    }


def sim_toml(plate="e2e", wells=("B2", "B3"), fields=2, size=512, rate=0.0, seed=7, extra=None) -> str:
    """`sim_config` as TOML text."""
    return toml_text(sim_config(plate, wells, fields, size, rate, seed, extra))


def daemon_toml(out: Path, instrument: str, zenoh_port: int | None, sim: dict, zenoh_enabled=True,
                extra: dict | None = None) -> str:
    """`daemon_config` around `sim` (a `sim_config`), with the sections of `extra` laid over it,
    as TOML text."""
    return toml_text(merged(merged(sim, daemon_config(out, instrument, zenoh_port, zenoh_enabled)), extra or {}))


def inference_config(*models, workers=1, **settings) -> dict:
    """The pipeline with the inference stage and `[inference]` on CPU, with one
    `[[inference.models]]` per `(name, path, extra keys...)`."""
    return {
        "pipeline": {"stages": ["segment", "measure", "inference"], "workers": workers},
        "inference": {"providers": ["cpu"], **settings, "models": [
            {"name": name, "path": path, **{k: v for e in extra for k, v in e.items()}}
            for name, path, *extra in models
        ]},
    }


class Daemon:
    """`liveomics run --config FILE` in the background, from a config dict (or an existing file),
    returned by `start` once its log shows `ready` (a `RuntimeError` with the log if it exits or
    times out first). As a context manager it kills a daemon still running at the end.

        with Daemon.start(cfg_dict, tmp / "run.toml") as d:
            ...
            out, err = d.wait()
    """

    def __init__(self, proc: subprocess.Popen, lines: list[str]):
        self.proc = proc
        self.lines = lines

    @classmethod
    def start(cls, cfg: dict | Path, path: Path | None = None, ready="listening for frames", timeout=30.0,
              binary: Path = BIN) -> "Daemon":
        if isinstance(cfg, dict):
            if path is None:
                raise ValueError("a config dict needs the path to write it to")
            path.write_text(toml_text(cfg))
            cfg = path
        proc = subprocess.Popen([str(binary), "run", "--config", str(cfg)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        lines = []
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if ready in line:
                return cls(proc, lines)
            if not line and proc.poll() is not None:
                break
        proc.kill()
        rest = proc.communicate()[1] if proc.poll() is not None else ""
        raise RuntimeError(f"daemon did not log {ready!r}: " + "".join(lines) + rest)

    def wait(self, timeout=120.0) -> tuple[str, str]:
        """Stdout and the rest of stderr once the daemon exits by itself."""
        return self.proc.communicate(timeout=timeout)

    def __enter__(self) -> "Daemon":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def wait_for(pred, what: str = "the condition", timeout=60.0, step=0.05):
    """Polls `pred` until it returns something true and returns that; fails the test with `what`
    after `timeout` seconds. Tests wait on events, never on a fixed sleep."""
    import pytest

    deadline = time.time() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.time() >= deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def spawn_until(binary, cfg: Path, marker: str, timeout=30.0):
    """`Daemon.start` of the file `cfg` for tests that manage the process themselves."""
    d = Daemon.start(cfg, ready=marker, timeout=timeout, binary=binary)
    return d.proc, d.lines


def start_zenoh_daemon(binary, tmp_path, endpoint: str, instrument="mm", plate="MM1", idle_exit_ms=6000,
                       zenoh_file="", extra: dict | None = None):
    """A `zenoh_daemon_config` daemon (with `extra` laid over it) writing under `tmp_path / "out"`,
    returned once it listens: `(process, log lines so far)`."""
    cfg = merged(zenoh_daemon_config(tmp_path / "out", endpoint, instrument, plate, idle_exit_ms=idle_exit_ms,
                                     zenoh_file=zenoh_file), extra or {})
    d = Daemon.start(cfg, tmp_path / "run.toml", binary=binary)
    return d.proc, d.lines


def loopback_hub(port: int):
    """A plain zenoh peer listening on `tcp/127.0.0.1:port` (no scouting): the daemon's place
    for tests that drive the bridge alone."""
    import json

    import zenoh

    conf = zenoh.Config()
    conf.insert_json5("listen/endpoints", json.dumps([f"tcp/127.0.0.1:{port}"]))
    conf.insert_json5("scouting/multicast/enabled", "false")
    return zenoh.open(conf)


def demo_core():
    """Micro-Manager's demo configuration (DemoCamera) from mm-test-adapters, 5 ms exposure."""
    import mm_test_adapters
    import pymmcore_plus

    core = pymmcore_plus.CMMCorePlus()
    core.setDeviceAdapterSearchPaths([mm_test_adapters.device_adapter_path()])
    core.loadSystemConfiguration()
    core.setExposure(5)
    return core
