"""Closed-loop reaction latency with the real Micro-Manager device layer (DemoCamera): from the
trigger field's last frame leaving the bridge to the start of the follow-up event in
pymmcore-plus. In between: zenoh to the daemon, assembly, segmentation, measurement, rule
evaluation, the request back over zenoh, useq validation and queueing ahead of the plan.

    .venv/bin/python benches/closed_loop_bench.py [--wells 8] [--fields 3] [--tls]

The rule fires on every planned field (cooldown 0), asking for one more field each time.
`--tls` runs daemon and bridge with the TLS + access-control examples of config/zenoh
(certificates made here with openssl, as in the tests).
"""

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mm_test_adapters
import numpy as np
import useq
from pymmcore_plus import CMMCorePlus

from liveomics_bridge import Bridge, FollowupLimits, session_config

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "liveomics"
sys.path.insert(0, str(ROOT / "tests"))
from zenoh_tls import make_pki  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wells", type=int, default=8)
    ap.add_argument("--fields", type=int, default=3)
    ap.add_argument("--tls", action="store_true", help="TLS + access control (config/zenoh examples)")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = Path(tempfile.mkdtemp())
    scheme, zfile = "tcp", ""
    if args.tls:
        pki = make_pki(tmp / "pki")
        scheme, zfile = "tls", pki.example("daemon-tls-acl.json5", tmp / "d.json5")
    endpoint = f"{scheme}/127.0.0.1:{port}"
    cfg = tmp / "run.toml"
    cfg.write_text(f"""
instrument = "mm"
[source]
kind = "zenoh"
[source.zenoh]
plate = "RL"
channels = ["DAPI", "FITC"]
width_px = 512
height_px = 512
pixel_size_um = 1.0
idle_exit_ms = 5000
[segmentation]
nuclei_channel = "DAPI"
cells_channel = "FITC"
[sinks.zarr]
output = "{tmp / 'out'}"
[zenoh]
listen = ["{endpoint}"]
config_file = "{zfile}"
[telemetry]
metrics_listen = ""
[closed_loop]
enabled = true
max_followups_per_plate = 1000
[[closed_loop.rules]]
name = "every"
metric = "cells"
scope = "field"
comparison = ">="
threshold = 0
action = {{ kind = "more_fields", fields = 1, spacing_um = 300.0 }}
""")
    proc = subprocess.Popen([str(BIN), "run", "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while "listening for frames" not in proc.stderr.readline():
        pass
    core = CMMCorePlus()
    core.setDeviceAdapterSearchPaths([mm_test_adapters.device_adapter_path()])
    core.loadSystemConfiguration()
    core.setExposure(5)
    bfile = pki.example("bridge-tls-acl.json5", tmp / "b.json5") if args.tls else None
    conf = session_config(connect=[endpoint], config_file=bfile)
    # Every field asks for a follow-up: caps well above what the plate can request.
    limits = FollowupLimits(max_requests=100_000, max_per_minute=100_000)
    bridge = Bridge(core, "mm", "RL", conf, idle_s=3.0, limits=limits)
    time.sleep(0.5)
    rows = [i % 8 for i in range(args.wells)]
    cols = [i // 8 for i in range(args.wells)]
    plan = useq.WellPlatePlan(plate=96, a1_center_xy=(0, 0), selected_wells=(rows, cols),
                              well_points_plan=useq.GridRowsColumns(rows=1, columns=args.fields))
    t0 = time.perf_counter()
    try:
        stats = bridge.run(useq.MDASequence(stage_positions=plan, channels=["DAPI", "FITC"]))
    finally:
        bridge.close()
    wall = time.perf_counter() - t0
    out, err = proc.communicate(timeout=120)
    r = np.array(stats.reaction_ms)
    print(f"{'TLS + ACL' if args.tls else 'TCP'}: {args.wells} wells x {args.fields} fields, DemoCamera 512x512 "
          f"x 2 channels: {stats.frames} frames in {wall:.1f} s, {stats.requests} follow-ups, "
          f"{stats.rejected_requests} rejected")
    print(f"reaction latency (last trigger frame published -> follow-up event started), n={len(r)}: "
          f"p50 {np.percentile(r, 50):.1f} ms, p99 {np.percentile(r, 99):.1f} ms, max {r.max():.1f} ms")
    for name, v in (("  daemon decides (trigger frame out -> request published)", stats.decision_ms),
                    ("  acquisition reaches it (request received -> event started)", stats.queue_ms)):
        v = np.array(v)
        print(f"{name}: p50 {np.percentile(v, 50):.1f} ms, p99 {np.percentile(v, 99):.1f} ms")
    print("daemon:", " ".join(line.strip() for line in out.splitlines() if "latency" in line))


if __name__ == "__main__":
    main()
