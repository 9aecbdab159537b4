"""Shared helpers for the end-to-end tests: they run the real `liveomics` binary and read what it
writes and publishes with the Python tools users run (zarr-python, ome-zarr-models, eclipse-zenoh,
pyarrow, tifffile)."""

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("LIVEOMICS_BIN", ROOT / "target" / "release" / "liveomics"))


def pytest_configure(config):
    """CI sets LIVEOMICS_REQUIRE_ALL (`.ci/run`): there, ../shared and the Micro-Manager test
    adapters are always installed, so a test that would skip or quietly drop a case for want of
    them means a broken setup, and the run stops here instead."""
    if not os.environ.get("LIVEOMICS_REQUIRE_ALL"):
        return
    missing = []
    if not (ROOT.parent / "shared" / "models" / "unet2d_nuclei_broad").exists():
        missing.append("../shared/models/unet2d_nuclei_broad")
    for module in ("pymmcore_plus", "mm_test_adapters"):
        try:
            __import__(module)
        except ImportError as e:
            missing.append(f"{module} ({e})")
    if missing:
        raise pytest.UsageError(f"LIVEOMICS_REQUIRE_ALL is set but these are missing: {', '.join(missing)}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sim_toml(plate="e2e", wells=("B2", "B3"), fields=2, size=512, rate=0.0, seed=7, extra=""):
    wells_toml = ", ".join(f'"{w}"' for w in wells)
    return f"""
[source.simulator]
seed = {seed}
plate = "{plate}"
wells = [{wells_toml}]
control_wells = ["{wells[0]}"]
fields_per_well = {fields}
width_px = {size}
height_px = {size}
rate_fields_per_s = {rate}
{extra}
"""


def daemon_toml(out: Path, instrument: str, zenoh_port: int | None, sim: str, zenoh_enabled=True) -> str:
    connect = f'["tcp/127.0.0.1:{zenoh_port}"]' if zenoh_port else "[]"
    return f"""
instrument = "{instrument}"
latency_budget_ms = 5000
{sim}
[sinks.zarr]
output = "{out}"
[sinks.zenoh]
enabled = {str(zenoh_enabled).lower()}
[zenoh]
listen = []
connect = {connect}
[telemetry]
metrics_listen = "127.0.0.1:0"
"""


@pytest.fixture(scope="session")
def binary() -> Path:
    if not BIN.exists():
        pytest.fail(f"{BIN} not built: run `make build` (or `make test`, which builds it)")
    return BIN


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


def spawn_until(binary, cfg: Path, marker: str, timeout=30.0):
    """`liveomics run --config cfg` in the background, returned once its log shows `marker`
    (with the log lines so far); the test fails with that log if it never does."""
    proc = subprocess.Popen([str(binary), "run", "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if marker in line:
            return proc, lines
        if not line and proc.poll() is not None:
            break
    proc.kill()
    pytest.fail(f"daemon did not log {marker!r}: " + "".join(lines))


def start_zenoh_daemon(binary, tmp_path, endpoint: str, instrument="mm", plate="MM1", idle_exit_ms=6000,
                       zenoh_file="", extra=""):
    """A daemon fed by the zenoh source with a DemoCamera-shaped plate (DAPI, FITC, 512²),
    listening on `endpoint` with an optional zenoh config file; returned once it listens."""
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"""
instrument = "{instrument}"
latency_budget_ms = 5000
[source]
kind = "zenoh"
[source.zenoh]
plate = "{plate}"
channels = ["DAPI", "FITC"]
width_px = 512
height_px = 512
pixel_size_um = 1.0
idle_exit_ms = {idle_exit_ms}
[segmentation]
nuclei_channel = "DAPI"
cells_channel = "FITC"
nucleus_diameter_um = 10.0
[sinks.zarr]
output = "{tmp_path / 'out'}"
[zenoh]
listen = ["{endpoint}"]
config_file = "{zenoh_file}"
[telemetry]
metrics_listen = ""
{extra}
""")
    return spawn_until(binary, cfg, "listening for frames")


def run(binary, *args, timeout=300, **kw):
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)
