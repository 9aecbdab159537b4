"""Overnight soak: does the daemon's memory, file-handle or thread count grow with the number of
fields? Runs `liveomics run` on a simulated plate as fast as the pipeline goes, samples the
process (VmRSS, open descriptors, threads from /proc) against the fields done so far (its
`field done` log lines; the metrics endpoint is up but nobody scrapes it, as on most
microscopes), and prints the growth after warm-up: the least-squares slope of RSS over the
second half of the run, in MB per 1000 fields, and the median RSS over the last tenth of the
fields against the second tenth (after warm-up). Per tenth of the fields it also prints the
end-to-end latency (p50 / p99 of the `field done` lines), which should not drift either; pace
the acquisition with `--rate` so that latency is processing, not queueing.

    .venv/bin/python benches/soak_bench.py [--wells 96] [--fields 8] [--size 512] [--rate 8] [--models]

`--models` adds the three reference models of config/models.toml (virtual staining, cell-omics,
well-omics), so the inference path and its batching threads are soaked too. The plate is written
to a temporary folder and removed afterwards (`--keep` keeps it).
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Log:
    """The daemon's log, read as it grows: the latency of every `field done` line so far."""

    def __init__(self, path):
        self.file = open(path, errors="replace")
        self.latency = []
        self.partial = ""

    def fields_done(self):
        # A line still being written stays in `partial` until its newline arrives.
        *lines, self.partial = (self.partial + self.file.read()).split("\n")
        for line in lines:
            m = re.search(r" field done .*latency_ms=([\d.]+)", line)
            if m:
                self.latency.append(float(m.group(1)))
        return len(self.latency)


def sample(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss, fds, threads


def slope(xs, ys):
    n = len(xs)
    if n < 2:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0


def config(args, out):
    rows = "ABCDEFGH"
    wells = [f"{rows[i // 12]}{i % 12 + 1}" for i in range(args.wells)]
    text = f"""
[source.simulator]
plate = "soak"
plate_format = 96
gene_seed = 7
wells = {wells!r}
control_wells = ["A1"]
fields_per_well = {args.fields}
width_px = {args.size}
height_px = {args.size}
rate_fields_per_s = {args.rate}
proteins = [{{ name = "TOMM20", localization = "mitochondria" }}, {{ name = "CALR", localization = "er" }}]

[sinks.zarr]
output = "{out}"

[sinks.zenoh]
enabled = true

[zenoh]
listen = []

[telemetry]
http_listen = "127.0.0.1:0"
"""
    if args.models:
        text += f"""
[pipeline]
stages = ["segment", "measure", "inference"]
workers = 2

[inference]
providers = ["cpu"]
intra_threads = 1
tile_px = {args.size}

[[inference.models]]
name = "vstain"
path = "{ROOT / 'models/virtual_stain_unet'}"

[[inference.models]]
name = "cellomics"
path = "{ROOT / 'models/cell_omics_cnn'}"

[[inference.models]]
name = "wellomics"
path = "{ROOT / 'models/well_omics_mil'}"
"""
    return text.replace("'", '"')


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wells", type=int, default=96, help="wells of a 96-well plate, row by row (1..96)")
    ap.add_argument("--fields", type=int, default=8, help="fields per well")
    ap.add_argument("--size", type=int, default=512, help="field side in pixels")
    ap.add_argument("--models", action="store_true", help="also run the three reference models")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="acquisition pace in fields/s (0: as fast as the pipeline goes; latency then includes queueing)")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    ap.add_argument("--binary", type=Path, default=ROOT / "target" / "release" / "liveomics")
    ap.add_argument("--keep", action="store_true", help="keep the written plate")
    args = ap.parse_args()
    if not 1 <= args.wells <= 96:
        ap.error("--wells must be 1..96")
    total = args.wells * args.fields
    work = Path(tempfile.mkdtemp(prefix="liveomics-soak-"))
    cfg = work / "soak.toml"
    cfg.write_text(config(args, work / "out"))
    log = open(work / "daemon.log", "w")
    reader = Log(work / "daemon.log")
    t0 = time.perf_counter()
    proc = subprocess.Popen([args.binary, "run", "--config", cfg], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    samples = []
    try:
        while proc.poll() is None:
            done = reader.fields_done()
            try:
                rss, fds, threads = sample(proc.pid)
            except (FileNotFoundError, ProcessLookupError, AttributeError):
                break
            samples.append((done, rss, fds, threads))
            time.sleep(args.interval)
        rc = proc.wait()
        wall = time.perf_counter() - t0
        log.close()
        if rc != 0:
            print((work / "daemon.log").read_text()[-4000:])
            raise SystemExit(f"liveomics run exited {rc}")
        size_mb = sum(f.stat().st_size for f in (work / "out").rglob("*") if f.is_file()) / 1e6
        last = max(s[0] for s in samples)
        print(f"{total} fields of {args.size}x{args.size} ({args.wells} wells x {args.fields}), "
              f"{'segment, measure and the three reference models' if args.models else 'segment and measure'}; "
              f"{wall:.0f} s wall, {total / wall:.2f} fields/s, {size_mb:.0f} MB written; "
              f"{len(samples)} samples, last at {last} fields done")
        # Per tenth of the fields: the median RSS (single samples swing with the frames in flight
        # and the allocator), and the most descriptors and threads seen.
        running = [s for s in samples if s[0] < last] or samples
        reader.fields_done()
        latency = reader.latency
        print(f"{'fields done':>14} {'median RSS MB':>14} {'max fds':>8} {'max threads':>12} "
              f"{'latency p50 / p99 ms':>21}")
        deciles = []
        for i in range(10):
            part = [s for s in running if i * last / 10 <= s[0] < (i + 1) * last / 10]
            if not part:
                continue
            rss = statistics.median(s[1] for s in part)
            deciles.append(rss)
            lat = sorted(latency[int(i * len(latency) / 10):int((i + 1) * len(latency) / 10)]) or [float("nan")]
            print(f"{int(i * last / 10):>6}..{int((i + 1) * last / 10):<7} {rss:>14.1f} "
                  f"{max(s[2] for s in part):>8} {max(s[3] for s in part):>12} "
                  f"{lat[len(lat) // 2]:>10.0f} / {lat[min(len(lat) - 1, int(0.99 * len(lat)))]:<8.0f}")
        half = [s for s in running if s[0] >= 0.5 * last]
        per_k = 1000 * slope([s[0] for s in half], [s[1] for s in half])
        warm = deciles[min(1, len(deciles) - 1)]
        print(f"median RSS, last tenth over second tenth: x{deciles[-1] / warm:.3f} "
              f"({warm:.1f} -> {deciles[-1]:.1f} MB); peak {max(s[1] for s in samples):.1f} MB")
        print(f"RSS slope over the second half: {per_k:+.1f} MB per 1000 fields")
    finally:
        if proc.poll() is None:
            proc.kill()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
