"""Live well table: subscribe to liveomics' per-cell records (Arrow IPC over zenoh) and print, after
every field, one row per well with its fields, cells, mean cell area and the mean of every
per-cell model output so far.

    python docs/examples/live_well_table.py [--instrument scope1] [--connect tcp/127.0.0.1:7447] [--fields N]

Without --connect or --listen it connects to the daemon's default endpoint on this host
(tcp/127.0.0.1:7447); with --listen the daemon connects to it (`[zenoh] connect`). --fields N
exits after N fields (the test uses it); otherwise it runs until Ctrl-C.
"""

import argparse
import json
import threading
from collections import defaultdict

import pyarrow.ipc
import zenoh


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--instrument", default="*")
    ap.add_argument("--connect", action="append", default=[])
    ap.add_argument("--listen", action="append", default=[])
    ap.add_argument("--fields", type=int, default=0)
    args = ap.parse_args()
    conf = zenoh.Config()
    connect = args.connect or ([] if args.listen else ["tcp/127.0.0.1:7447"])
    conf.insert_json5("connect/endpoints", json.dumps(connect))
    conf.insert_json5("listen/endpoints", json.dumps(args.listen))
    conf.insert_json5("scouting/multicast/enabled", "false")
    wells = defaultdict(lambda: {"fields": 0, "cells": 0, "sums": defaultdict(float)})
    seen = [0]
    done = threading.Event()
    lock = threading.Lock()

    def on_cells(sample):
        table = pyarrow.ipc.open_stream(sample.payload.to_bytes()).read_all()
        meta = json.loads(sample.attachment.to_bytes())
        numeric = ["area_px"] + [c for c in table.column_names if "." in c]  # predictions: {model}.{output}
        with lock:
            w = wells[meta["well"]]
            w["fields"] += 1
            w["cells"] += table.num_rows
            for c in numeric:
                w["sums"][c] += float(sum(v for v in table.column(c).to_pylist() if v == v))
            seen[0] += 1
            cols = sorted({c for w in wells.values() for c in w["sums"]})
            print(f"\n{meta['plate']} after {seen[0]} fields")
            print(f"{'well':>5} {'fields':>6} {'cells':>6} " + " ".join(f"{c:>16}" for c in cols))
            for name in sorted(wells):
                w = wells[name]
                means = [w["sums"][c] / w["cells"] if w["cells"] else float("nan") for c in cols]
                print(f"{name:>5} {w['fields']:>6} {w['cells']:>6} " + " ".join(f"{m:>16.3f}" for m in means),
                      flush=True)
            if args.fields and seen[0] >= args.fields:
                done.set()

    session = zenoh.open(conf)
    session.declare_subscriber(f"liveomics/{args.instrument}/cells/**", on_cells)
    print("listening", flush=True)
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    session.close()


if __name__ == "__main__":
    main()
