"""The microscope never waits (issue 35): the README's default config at a common HCS rate
(24 fields of 1024², 4 channels, 2 fields/s) with InstanSeg forced on (the segmentation that
cannot keep up on 2 CPU cores; `auto` would take the classical path here), run twice in this
script on the same plate, `pipeline.when_behind = "hold"` and then `"lag"`:

- how long the simulated microscope was held by backpressure, and so how long the acquisition
  took (the plate's fields at its rate plus that hold);
- how long the whole run took (the analysis, which may end after the acquisition);
- the field latency p50/p99 (arrival to every sink done: a lagged field's includes its wait);
- the daemon's peak RSS (VmHWM, sampled every 20 ms);
- how many fields lagged, and whether the two plates are equal (tests/compare_plates.py, display
  windows aside).

    .venv/bin/python benches/lag_bench.py [--wells 8] [--fields 3] [--size 1024] [--rate 2]

With fewer fields than the queues hold (frames and fields, about 14 here) nothing is held either
way: the plate must be longer than that to show the difference.
"""

import argparse
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from compare_plates import compare, dump_toml  # noqa: E402

BIN = ROOT / "target" / "release" / "liveomics"


def config(args, out: pathlib.Path, when_behind: str) -> dict:
    d = tomllib.loads((ROOT / "config" / "default.toml").read_text())
    sim = d["source"]["simulator"]
    sim["wells"] = [f"{r}{c}" for r in "BCDEFG" for c in range(2, 12)][: args.wells]
    sim["control_wells"] = sim["wells"][:1]
    sim["fields_per_well"] = args.fields
    sim["width_px"] = sim["height_px"] = args.size
    sim["rate_fields_per_s"] = args.rate
    sim["proteins"] = [{"name": "TOMM20", "localization": "mitochondria"}]
    d["segmentation"]["method"] = "instanseg"
    d["segmentation"]["model"] = str(ROOT / d["segmentation"]["model"])
    d["pipeline"]["when_behind"] = when_behind
    d["sinks"]["zarr"]["output"] = str(out)
    d.setdefault("telemetry", {})["http_listen"] = ""
    d.setdefault("zenoh", {})["listen"] = []
    return d


def run(args, work: pathlib.Path, when_behind: str) -> dict:
    cfg = work / f"{when_behind}.toml"
    cfg.write_text(dump_toml(config(args, work / when_behind, when_behind)))
    log = open(work / f"{when_behind}.log", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen([str(BIN), "run", "--config", str(cfg), "--overwrite"], stdout=subprocess.PIPE,
                            stderr=log, text=True)
    peak = 0
    while proc.poll() is None:
        try:
            status = pathlib.Path(f"/proc/{proc.pid}/status").read_text()
            peak = max(peak, int(status.split("VmHWM:")[1].split()[0]))
        except (FileNotFoundError, IndexError):
            pass
        time.sleep(0.02)
    out = proc.stdout.read()
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{when_behind}: exit {proc.returncode}\n{out}\n{(work / f'{when_behind}.log').read_text()[-3000:]}")

    def num(pattern):
        m = re.search(pattern, out)
        if not m:
            raise SystemExit(f"{pattern!r} not in the summary:\n{out}")
        return float(m[1])

    fields = args.wells * args.fields
    held = num(r"acquisition held ([0-9.]+) s")
    lagged = re.search(r"lagged\s+(\d+) fields", out)
    return {
        "mode": when_behind,
        "fields": fields,
        "held_s": held,
        "acquisition_s": fields / args.rate + held,
        "run_s": wall,
        "p50_ms": num(r"latency\s+p50 (\d+) ms"),
        "p99_ms": num(r"p99 (\d+) ms, max"),
        "raw_p99_ms": num(r"raw on disk\s+p50 \d+ ms, p99 (\d+) ms"),
        "rss_mb": peak / 1024,
        "lagged": int(lagged[1]) if lagged else 0,
        "backlog_left": int(num(r"backlog left (\d+)")),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wells", type=int, default=8)
    ap.add_argument("--fields", type=int, default=3)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rate", type=float, default=2.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        rows = [run(args, work, "hold"), run(args, work, "lag")]
        plate = "demo.zarr"
        diffs = compare(work / "hold" / plate, work / "lag" / plate, frozenset({"window"}))
    print(f"{args.wells * args.fields} fields of {args.size}² × 4 channels offered at {args.rate} fields/s "
          f"({args.wells * args.fields / args.rate:.1f} s of acquisition), InstanSeg on this machine's CPU")
    print("| when_behind | source held | acquisition took | run took | raw on disk p99 | latency p50 / p99 | peak RSS "
          "| lagged | backlog left |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['mode']} | {r['held_s']:.1f} s | {r['acquisition_s']:.1f} s | {r['run_s']:.1f} s | "
              f"{r['raw_p99_ms'] / 1000:.2f} s | "
              f"{r['p50_ms'] / 1000:.1f} / {r['p99_ms'] / 1000:.1f} s | {r['rss_mb']:.0f} MB | {r['lagged']} | "
              f"{r['backlog_left']} |")
    hold, lag = rows
    print(f"acquisition {hold['acquisition_s'] / lag['acquisition_s']:.1f}x shorter with lag; plates equal: "
          f"{'yes' if not diffs else 'NO: ' + '; '.join(diffs[:5])}")


if __name__ == "__main__":
    main()
