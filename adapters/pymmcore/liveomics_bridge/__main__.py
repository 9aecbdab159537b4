"""`liveomics-bridge`: a plate on Micro-Manager, streamed to liveomics."""

import argparse
import json
import logging

import useq
import zenoh
from pymmcore_plus import CMMCorePlus

from .bridge import Bridge


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--instrument", default="scope1")
    ap.add_argument("--plate", required=True)
    ap.add_argument("--plate-format", type=int, default=96)
    ap.add_argument("--wells", default="A1", help="comma-separated, e.g. A1,B2")
    ap.add_argument("--fields", type=int, default=2, help="fields per well (a row of positions)")
    ap.add_argument("--channels", default="DAPI,FITC", help="Micro-Manager Channel group configs")
    ap.add_argument("--mm-config", help="Micro-Manager .cfg (default: the demo configuration)")
    ap.add_argument("--adapters", help="device adapter folder (default: mm-test-adapters if installed)")
    ap.add_argument("--connect", action="append", default=[], help="zenoh endpoint, e.g. tcp/127.0.0.1:7447")
    ap.add_argument("--idle-s", type=float, default=3.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    core = CMMCorePlus()
    adapters = args.adapters
    if adapters is None:
        try:
            import mm_test_adapters

            adapters = mm_test_adapters.device_adapter_path()
        except ImportError:
            pass
    if adapters:
        core.setDeviceAdapterSearchPaths([adapters])
    core.loadSystemConfiguration(args.mm_config) if args.mm_config else core.loadSystemConfiguration()

    conf = zenoh.Config()
    if args.connect:
        conf.insert_json5("connect/endpoints", json.dumps(args.connect))
        conf.insert_json5("scouting/multicast/enabled", "false")
    wells = [w.strip() for w in args.wells.split(",") if w.strip()]
    rows = [ord(w[0].upper()) - ord("A") for w in wells]
    cols = [int(w[1:]) - 1 for w in wells]
    plan = useq.WellPlatePlan(plate=args.plate_format, a1_center_xy=(0, 0), selected_wells=(rows, cols),
                              well_points_plan=useq.GridRowsColumns(rows=1, columns=args.fields))
    seq = useq.MDASequence(stage_positions=plan, channels=args.channels.split(","))
    bridge = Bridge(core, args.instrument, args.plate, conf, idle_s=args.idle_s)
    try:
        stats = bridge.run(seq)
    finally:
        bridge.close()
    print(json.dumps({"frames": stats.frames, "requests": stats.requests, "blocked_s": stats.blocked_s,
                      "reaction_ms": stats.reaction_ms}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
