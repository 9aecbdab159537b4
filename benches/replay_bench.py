"""Reprocessing throughput: `liveomics replay FOLDER --speed max` on a simulated Opera Phenix folder,
with the share of time spent reading TIFFs, against tifffile decoding the same files in this script.

    .venv/bin/python benches/replay_bench.py [--wells 4] [--fields 4] [--size 1024]
"""

import argparse
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import tifffile


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wells", type=int, default=4)
    ap.add_argument("--fields", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--binary", type=Path, default=Path("target/release/liveomics"))
    args = ap.parse_args()
    binary = args.binary.resolve()
    work = Path(tempfile.mkdtemp(prefix="liveomics-replay-"))
    try:
        wells = [f"B{c}" for c in range(2, 2 + args.wells)]
        cfg = work / "c.toml"
        cfg.write_text(
            f"""
[source.simulator]
plate = "R1"
wells = {wells!r}
control_wells = ["B2"]
fields_per_well = {args.fields}
width_px = {args.size}
height_px = {args.size}
[sinks.zenoh]
enabled = false
[telemetry]
http_listen = ""
""".replace("'", '"')
        )
        subprocess.run([binary, "simulate", "--config", cfg, "--out", work / "sim", "--layout", "phenix"], check=True, capture_output=True)
        files = sorted((work / "sim" / "images").glob("*.tiff"))
        mb = sum(f.stat().st_size for f in files) / 1e6
        t0 = time.perf_counter()
        out = subprocess.run(
            [binary, "replay", work / "sim" / "images", "--config", cfg, "--channels", "DAPI,Microtubules,ER,TOMM20",
             "--pixel-size-um", "0.65", "--output", work / "out"],
            check=True, capture_output=True, text=True,
        ).stdout
        wall = time.perf_counter() - t0
        fields = int(re.search(r"fields\s+(\d+) done \(([\d.]+) fields/s\)", out).group(1))
        fps = float(re.search(r"fields\s+\d+ done \(([\d.]+) fields/s\)", out).group(1))
        read_s, read_pct = re.search(r"input reading\s+([\d.]+) s \((\d+)% of elapsed\)", out).groups()
        t0 = time.perf_counter()
        for f in files:
            tifffile.imread(f)
        tiff_s = time.perf_counter() - t0
        print(f"{fields} fields ({len(files)} files, {mb:.0f} MB) of {args.size}x{args.size}, 4 channels, full pipeline")
        print(f"liveomics replay --speed max: {fps:.2f} fields/s ({wall:.1f} s wall incl. start-up)")
        print(f"TIFF reading inside the daemon: {float(read_s):.2f} s = {read_pct}% of the run ({mb / float(read_s):.0f} MB/s)")
        print(f"tifffile reading the same files: {tiff_s:.2f} s ({mb / tiff_s:.0f} MB/s); "
              f"liveomics/tifffile read speed {tiff_s / float(read_s):.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
