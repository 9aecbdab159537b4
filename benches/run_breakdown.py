"""Where a field's time goes in `liveomics run`: per stage and per sink, the mean time per field
(from the daemon's own `stage done` / `sink wrote field` debug events; debug for liveomics
only, so that no other crate's logging weighs on the run), next to the end-to-end
latency p50/p99 of the same run (`field done`). Stages run one after another on a field; the sinks
then run in parallel, each on its own thread, so a field's latency is about the sum of its stages
plus its slowest sink, plus queueing.

    .venv/bin/python benches/run_breakdown.py [--config FILE] [--runs 2]

Without --config the embedded default plate runs (what `make run` runs).
"""

import argparse
import os
import pathlib
import re
import statistics
import subprocess
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIELD = re.compile(r"(\w+)=(\"[^\"]*\"|\S+)")


def parse(log):
    stages, sinks, latency = {}, {}, []
    for line in log.splitlines():
        kv = {k: v.strip('"') for k, v in FIELD.findall(line)}
        if "stage done" in line and "stage" in kv:
            stages.setdefault(kv["stage"], []).append(float(kv["ms"]))
        elif "sink wrote field" in line and "sink" in kv:
            sinks.setdefault(kv["sink"], []).append(float(kv["ms"]))
        elif "field done" in line and "latency_ms" in kv:
            latency.append(float(kv["latency_ms"]))
    return stages, sinks, latency


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=pathlib.Path)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--binary", type=pathlib.Path, default=ROOT / "target" / "release" / "liveomics")
    args = ap.parse_args()
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as out:
            cmd = [str(args.binary), "run", "--overwrite", "--output", out]
            if args.config:
                cmd += ["--config", str(args.config)]
            p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RUST_LOG": "info,liveomics=debug", "NO_COLOR": "1"},
                               cwd=ROOT, check=True)
        stages, sinks, latency = parse(p.stderr)
        if not latency:
            raise SystemExit("no `field done` lines in the log")
        parts = [f"{k} {statistics.mean(v):.0f}" for k, v in stages.items()]
        parts += [f"sink {k} {statistics.mean(v):.0f}" for k, v in sinks.items()]
        print(f"run {run + 1}: {len(latency)} fields, latency p50 {pct(latency, 0.5):.0f} ms, "
              f"p99 {pct(latency, 0.99):.0f} ms; mean ms per field: {', '.join(parts)}")


if __name__ == "__main__":
    main()
