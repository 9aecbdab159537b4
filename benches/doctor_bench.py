"""`liveomics doctor`'s sustained rate against what `liveomics run` then achieves (issue 36): for
each config, doctor times the configured pipeline on N simulated fields; then `liveomics run`
runs the same config on the same N fields at full speed (the simulator's pace taken away, no
network, output to a temporary folder), alternately, ROUNDS times. Both rates are steady-state
rates: (fields - 1) over the span from the first field done by every sink to the last (for the
run, read off its `field done` log lines); the run's own summary rate (fields over the whole run,
start-up included) is printed beside them.

    .venv/bin/python benches/doctor_bench.py [--fields 12] [--rounds 2] [--config config/models.toml ...]
"""

import argparse
import copy
import datetime
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from compare_plates import dump_toml  # noqa: E402

ENV = {**os.environ, "NO_COLOR": "1"}
DONE = re.compile(r"^(\S+Z) .*field done")
SUMMARY = re.compile(r"fields\s+(\d+) done \(([\d.]+) fields/s\)")


def run_config(base: dict, folder: pathlib.Path, fields: int, out: pathlib.Path) -> dict:
    """`base` on the fields doctor times (its `measuring`): the first wells, at full speed."""
    d = copy.deepcopy(base)
    sim = d.setdefault("source", {}).setdefault("simulator", {})
    default = tomllib.loads(subprocess.run([BIN, "print-config"], capture_output=True, text=True).stdout)
    dsim = default["source"]["simulator"]
    fpw = min(fields, max(1, sim.get("fields_per_well", dsim["fields_per_well"])))
    wells = sim.get("wells", dsim["wells"])
    n = -(-fields // fpw)
    sim.update(plate="bench", rate_fields_per_s=0.0, timepoints=1, fields_per_well=fpw,
               wells=[wells[i] if i < len(wells) else wells[0] for i in range(n)], relocalization=[])
    d.setdefault("sinks", {}).setdefault("zarr", {})["output"] = str(out)
    d["sinks"].setdefault("zenoh", {})["enabled"] = False
    d.setdefault("zenoh", {}).update(listen=[], connect=[])
    d.setdefault("telemetry", {})["http_listen"] = ""
    for m in d.get("inference", {}).get("models", []):
        m["path"] = str((folder / m["path"]).resolve())
    if "model" in d.get("segmentation", {}):
        d["segmentation"]["model"] = str((folder / d["segmentation"]["model"]).resolve())
    return d


def steady(stderr: str) -> tuple[int, float]:
    times = [datetime.datetime.fromisoformat(m.group(1)) for line in stderr.splitlines() if (m := DONE.match(line))]
    span = (times[-1] - times[0]).total_seconds() if len(times) > 1 else 0.0
    return len(times), (len(times) - 1) / span if span > 0 else float("nan")


def main() -> int:
    global BIN
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", type=pathlib.Path, default=ROOT / "target" / "release" / "liveomics")
    ap.add_argument("--config", type=pathlib.Path, action="append",
                    help="configs to measure (default: the embedded one and config/models.toml)")
    ap.add_argument("--fields", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    BIN = str(args.binary)
    configs = args.config or [None, ROOT / "config" / "models.toml"]
    print(f"{'config':<22} {'round':>5} {'doctor f/s':>11} {'run f/s':>8} {'doctor/run':>10} {'run summary f/s':>16}  segmentation")
    worst = 0.0
    for c in configs:
        if c is None:
            base, folder, name = tomllib.loads(subprocess.run([BIN, "print-config"], capture_output=True,
                                                              text=True).stdout), pathlib.Path.cwd(), "embedded default"
        else:
            base, folder, name = tomllib.loads(c.read_text()), c.resolve().parent, c.name
        for r in range(args.rounds):
            with tempfile.TemporaryDirectory() as tmp:
                tmp = pathlib.Path(tmp)
                cmd = [BIN, "doctor", "--json", "--fields", str(args.fields)] + (["--config", str(c)] if c else [])
                d = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=tmp)
                if d.returncode != 0:
                    print(d.stderr[-3000:])
                    return 1
                doc = json.loads(d.stdout)
                cfg = tmp / "run.toml"
                cfg.write_text(dump_toml(run_config(base, folder, args.fields, tmp / "out")))
                p = subprocess.run([BIN, "run", "--config", str(cfg)], capture_output=True, text=True, env=ENV, cwd=tmp)
                if p.returncode != 0:
                    print(p.stderr[-3000:])
                    return 1
                n, rate = steady(p.stderr)
                m = SUMMARY.search(p.stdout)
                ratio = doc["sustained_fields_per_s"] / rate
                worst = max(worst, abs(ratio - 1))
                print(f"{name:<22} {r + 1:>5} {doc['sustained_fields_per_s']:>11.2f} {rate:>8.2f} {ratio:>10.2f} "
                      f"{float(m.group(2)) if m else float('nan'):>16.2f}  {doc['segmentation']} ({n} fields)")
    print(f"largest |doctor/run - 1|: {worst:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
