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
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import useq

from liveomics_bridge import Bridge, FollowupLimits, session_config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from liveomics_testkit import Daemon, demo_core, free_port, merged, zenoh_daemon_config  # noqa: E402
from zenoh_tls import make_pki  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wells", type=int, default=8)
    ap.add_argument("--fields", type=int, default=3)
    ap.add_argument("--tls", action="store_true", help="TLS + access control (config/zenoh examples)")
    args = ap.parse_args()
    port = free_port()
    tmp = Path(tempfile.mkdtemp())
    scheme, zfile = "tcp", ""
    if args.tls:
        pki = make_pki(tmp / "pki")
        scheme, zfile = "tls", pki.example("daemon-tls-acl.json5", tmp / "d.json5")
    endpoint = f"{scheme}/127.0.0.1:{port}"
    every_field = {"closed_loop": {
        "enabled": True,
        "max_followups_per_plate": 1000,
        "rules": [{"name": "every", "metric": "cells", "scope": "field", "comparison": ">=", "threshold": 0,
                   "action": {"kind": "more_fields", "fields": 1, "spacing_um": 300.0}}],
    }}
    cfg = merged(zenoh_daemon_config(tmp / "out", endpoint, instrument="mm", plate="RL", idle_exit_ms=5000,
                                     zenoh_file=zfile), every_field)
    daemon = Daemon.start(cfg, tmp / "run.toml")
    core = demo_core()
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
    out, err = daemon.wait()
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
