"""`liveomics-bridge`: a plate on Micro-Manager, streamed to liveomics."""

import argparse
import json
import logging

import useq
from pymmcore_plus import CMMCorePlus

from .bridge import Bridge, FollowupLimits
from .session import DEFAULT_ENDPOINT, SessionConfigError, session_config


def _limits(text: str) -> tuple[float, float, float, float]:
    parts = [float(v) for v in text.split(",")]
    if len(parts) != 4 or parts[0] > parts[1] or parts[2] > parts[3]:
        raise argparse.ArgumentTypeError("expected XMIN,XMAX,YMIN,YMAX in µm with min <= max")
    return parts[0], parts[1], parts[2], parts[3]


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
    ap.add_argument("--connect", action="append", default=None,
                    help=f"zenoh endpoint of the daemon (repeatable; default {DEFAULT_ENDPOINT})")
    ap.add_argument("--listen", action="append", default=None, help="zenoh endpoint to listen on (default: none)")
    ap.add_argument("--multicast-scouting", action="store_true", help="announce and find peers on the LAN")
    ap.add_argument("--zenoh-config", help="zenoh JSON5 file: TLS, mTLS, user/password, access control "
                                           "(must not set mode, endpoints or scouting)")
    ap.add_argument("--stage-limits-um", type=_limits,
                    help="XMIN,XMAX,YMIN,YMAX a follow-up may visit (default: the plate's wells)")
    ap.add_argument("--max-requests", type=int, default=100, help="follow-up requests executed per plate")
    ap.add_argument("--max-requests-per-minute", type=float, default=30.0)
    ap.add_argument("--max-events-per-request", type=int, default=64)
    ap.add_argument("--idle-s", type=float, default=3.0)
    ap.add_argument("--wait-for-daemon-s", type=float, default=30.0,
                    help="seconds to wait for the daemon to subscribe before acquiring (0: start at once)")
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

    try:
        conf = session_config(connect=args.connect, listen=args.listen, config_file=args.zenoh_config,
                              multicast_scouting=args.multicast_scouting)
    except SessionConfigError as e:
        ap.error(str(e))
    limits = FollowupLimits(stage_um=args.stage_limits_um, max_requests=args.max_requests,
                            max_per_minute=args.max_requests_per_minute,
                            max_events_per_request=args.max_events_per_request)
    wells = [w.strip() for w in args.wells.split(",") if w.strip()]
    rows = [ord(w[0].upper()) - ord("A") for w in wells]
    cols = [int(w[1:]) - 1 for w in wells]
    plan = useq.WellPlatePlan(plate=args.plate_format, a1_center_xy=(0, 0), selected_wells=(rows, cols),
                              well_points_plan=useq.GridRowsColumns(rows=1, columns=args.fields))
    seq = useq.MDASequence(stage_positions=plan, channels=args.channels.split(","))
    bridge = Bridge(core, args.instrument, args.plate, conf, idle_s=args.idle_s, limits=limits)
    try:
        if args.wait_for_daemon_s > 0 and not bridge.wait_for_daemon(args.wait_for_daemon_s):
            logging.error("no daemon subscribed to liveomics/%s/frames/%s/** within %.0f s: nothing acquired",
                          args.instrument, args.plate, args.wait_for_daemon_s)
            return 2
        stats = bridge.run(seq)
    finally:
        bridge.close()
    print(json.dumps({"frames": stats.frames, "requests": stats.requests, "blocked_s": stats.blocked_s,
                      "rejected": stats.rejected_by_reason, "reaction_ms": stats.reaction_ms}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
