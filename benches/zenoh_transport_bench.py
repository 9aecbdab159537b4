"""Frame transport into the daemon's zenoh source: 2160x2160 uint16 frames published from Python
(eclipse-zenoh, TCP on loopback) as fast as the daemon takes them, with the pipeline doing no
work (no stages, no sinks) so that only transport, validation and assembly are measured.

    .venv/bin/python benches/zenoh_transport_bench.py [--frames 60] [--size 2160] [--shm] [--fps F]
        [--transport tcp|tls|both]

Prints publish throughput (frames/s, MB/s: the publisher blocks when the daemon's queue is full,
so this is the end-to-end rate) and the daemon's transit latency (header acquired_unix_ns to
arrival, p50/p99). `--shm` publishes each frame from a zenoh shared-memory buffer (same host).
`--transport both` runs plain TCP and then TLS with the access-control examples of config/zenoh
(mTLS, certificates made here with openssl) back to back, and prints what TLS costs per frame.
"""

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zenoh

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "adapters" / "pymmcore"))
from liveomics_bridge import session_config  # noqa: E402
from liveomics_testkit import Daemon, free_port, merged, zenoh_daemon_config  # noqa: E402
from zenoh_tls import make_pki  # noqa: E402


def run(args, transport: str) -> dict:
    port = free_port()
    tmp = Path(tempfile.mkdtemp())
    endpoint, zfile, bfile = f"tcp/127.0.0.1:{port}", "", None
    if transport == "tls":
        pki = make_pki(tmp / "pki")
        endpoint = f"tls/127.0.0.1:{port}"
        zfile = pki.example("daemon-tls-acl.json5", tmp / "d.json5")
        bfile = pki.example("bridge-tls-acl.json5", tmp / "b.json5")
    no_work = {"pipeline": {"stages": []}, "sinks": {"zarr": {"enabled": False}, "zenoh": {"enabled": False}}}
    cfg = merged(zenoh_daemon_config(tmp / "out", endpoint, instrument="tb", plate="T1", channels=("DAPI",),
                                     size=args.size, idle_exit_ms=3000, zenoh_file=zfile), no_work)
    daemon = Daemon.start(cfg, tmp / "run.toml")
    session = zenoh.open(session_config(connect=[endpoint], config_file=bfile))
    time.sleep(0.5)
    img = np.random.default_rng(0).integers(0, 4096, (args.size, args.size), dtype=np.uint16)
    payload = img.astype("<u2").tobytes()
    provider = None
    if args.shm:
        from zenoh import shm

        provider = shm.ShmProvider.default_backend(16 * len(payload))
        policy = shm.BlockOn(shm.GarbageCollect())
    t0 = time.perf_counter()
    for i in range(args.frames):
        if args.fps:
            time.sleep(max(0.0, t0 + i / args.fps - time.perf_counter()))
        header = {"shape": [args.size, args.size], "dtype": "uint16", "acquired_unix_ns": time.time_ns()}
        data = payload
        if provider is not None:
            data = provider.alloc(len(payload), policy=policy)
            data[:] = payload  # the copy a camera driver would make into the buffer
        session.put(f"liveomics/tb/frames/T1/B{2 + i // 50}/{i % 50}/DAPI", data,
                    attachment=json.dumps(header).encode(), congestion_control=zenoh.CongestionControl.BLOCK)
    wall = time.perf_counter() - t0
    session.close()
    out, err = daemon.wait()
    nums = {k: float(v) for k, v in re.findall(r"(p50_ms|p99_ms|max_ms|frames|ingest_mb_s)=([0-9.]+)", err)}
    if "fields" not in out or nums.get("frames") != args.frames:
        print(out, err[-2000:])
    return {"transport": transport, "wall": wall, "bytes": len(payload), **nums}


def report(args, r: dict) -> None:
    mb = r["bytes"] * args.frames / 1e6
    mode = f"{r['transport'].upper()}, {'shared memory' if args.shm else 'bytes'}"
    pace = f" at {args.fps:g} fps" if args.fps else ""
    print(f"{mode}{pace}: {args.frames} frames of {args.size}x{args.size} uint16 ({r['bytes'] / 1e6:.1f} MB each): "
          f"published in {r['wall']:.2f} s = {args.frames / r['wall']:.1f} frames/s, {mb / r['wall']:.0f} MB/s, "
          f"{1e3 * r['wall'] / args.frames:.1f} ms per frame")
    print(f"  daemon: {r.get('frames', 0):.0f} frames, received at {r.get('ingest_mb_s', 0):.0f} MB/s "
          f"(first to last arrival), transit p50 {r.get('p50_ms')} ms, p99 {r.get('p99_ms')} ms, max {r.get('max_ms')} ms")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--size", type=int, default=2160)
    ap.add_argument("--shm", action="store_true", help="publish from zenoh shared memory")
    ap.add_argument("--fps", type=float, default=0.0, help="pace the publisher (0: as fast as it can)")
    ap.add_argument("--transport", choices=["tcp", "tls", "both"], default="tcp")
    args = ap.parse_args()
    kinds = ["tcp", "tls"] if args.transport == "both" else [args.transport]
    results = {k: run(args, k) for k in kinds}
    for r in results.values():
        report(args, r)
    if len(results) == 2:
        tcp, tls = results["tcp"], results["tls"]
        per_frame = 1e3 * (tls["wall"] - tcp["wall"]) / args.frames
        print(f"TLS costs {per_frame:+.1f} ms per frame published ({tls['wall'] / tcp['wall']:.2f}x the TCP time), "
              f"transit p50 {tls.get('p50_ms', 0) - tcp.get('p50_ms', 0):+.1f} ms, "
              f"p99 {tls.get('p99_ms', 0) - tcp.get('p99_ms', 0):+.1f} ms")


if __name__ == "__main__":
    main()
