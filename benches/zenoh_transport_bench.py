"""Frame transport into the daemon's zenoh source: 2160x2160 uint16 frames published from Python
(eclipse-zenoh, TCP on loopback) as fast as the daemon takes them, with the pipeline doing no
work (no stages, no sinks) so that only transport, validation and assembly are measured.

    .venv/bin/python benches/zenoh_transport_bench.py [--frames 60] [--size 2160]

Prints publish throughput (frames/s, MB/s: the publisher blocks when the daemon's queue is full,
so this is the end-to-end rate) and the daemon's transit latency (header acquired_unix_ns to
arrival, p50/p99). `--shm` publishes each frame from a zenoh shared-memory buffer (same host).
"""

import argparse
import json
import re
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import zenoh

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "liveomics"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--size", type=int, default=2160)
    ap.add_argument("--shm", action="store_true", help="publish from zenoh shared memory")
    ap.add_argument("--fps", type=float, default=0.0, help="pace the publisher (0: as fast as it can)")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = Path(tempfile.mkdtemp())
    cfg = tmp / "run.toml"
    cfg.write_text(f"""
instrument = "tb"
[source]
kind = "zenoh"
[source.zenoh]
plate = "T1"
channels = ["DAPI"]
width_px = {args.size}
height_px = {args.size}
idle_exit_ms = 3000
[pipeline]
stages = []
[sinks.zarr]
enabled = false
[sinks.zenoh]
enabled = false
[zenoh]
listen = ["tcp/127.0.0.1:{port}"]
[telemetry]
metrics_listen = ""
""")
    proc = subprocess.Popen([str(BIN), "run", "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while "listening for frames" not in proc.stderr.readline():
        pass
    conf = zenoh.Config()
    conf.insert_json5("connect/endpoints", json.dumps([f"tcp/127.0.0.1:{port}"]))
    conf.insert_json5("scouting/multicast/enabled", "false")
    session = zenoh.open(conf)
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
    out, err = proc.communicate(timeout=120)
    mb = len(payload) * args.frames / 1e6
    print(f"{'shared memory' if args.shm else 'bytes'}{f' at {args.fps:g} fps' if args.fps else ''}: {args.frames} frames of {args.size}x{args.size} uint16 ({len(payload) / 1e6:.1f} MB each): "
          f"published in {wall:.2f} s = {args.frames / wall:.1f} frames/s, {mb / wall:.0f} MB/s")
    m = re.search(r"frame transit.*", err)
    line = m.group(0) if m else ""
    nums = dict(re.findall(r"(p50_ms|p99_ms|max_ms|frames|ingest_mb_s)=([0-9.]+)", err))
    print(f"daemon: {nums.get('frames')} frames, received at {float(nums.get('ingest_mb_s', 0)):.0f} MB/s "
          f"(first to last arrival), transit p50 {nums.get('p50_ms')} ms, "
          f"p99 {nums.get('p99_ms')} ms, max {nums.get('max_ms')} ms")
    if "fields" not in out:
        print(out, err[-2000:])


if __name__ == "__main__":
    main()
