"""The latency budget under overload (issue 19): config/overload.toml offers 1.5 fields/s of 1024²
with the diffusion panel and the direct virtual stain, about twice what 2 CPU cores sustain with
every model inline. Three runs of the same plate, in this one script:

1. before: every model `class = "required"`, i.e. everything inline, the behaviour before the
   scheduler;
2. after: the config as it is (virtual staining `inline-if-on-time`): skipped when a field would
   be late, backfilled before exit;
3. killed: as 2, SIGKILLed once the end-of-plate backfill has written a field, then restarted on
   the same plate, which must backfill exactly the fields still owed.

For each: required-work latency p50/p99 after warm-up (the first WARMUP fields done are left
out: the models' costs are unknown until they have run), field latency (first frame to every
sink done), deadline misses, degraded and backfilled fields, frames lost, acquisition held.
Then the plates of 2 and 3 are compared with 1 (tests/compare_plates.py: every array and every
attribute, display windows aside, which are running means and depend on write order).

    .venv/bin/python benches/overload_bench.py [--config config/overload.toml]
"""

import argparse
import copy
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from compare_plates import compare, dump_toml  # noqa: E402

WARMUP = 4
FIELD = re.compile(r"(\w+)=(\"[^\"]*\"|\S+)")
ENV = {**os.environ, "NO_COLOR": "1"}


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def write_config(base: dict, out: pathlib.Path, path: pathlib.Path, inline_all: bool) -> pathlib.Path:
    d = copy.deepcopy(base)
    d["sinks"]["zarr"]["output"] = str(out)
    d.setdefault("telemetry", {})["http_listen"] = ""
    for m in d["inference"]["models"]:
        m["path"] = str((ROOT / "config" / m["path"]).resolve())  # relative to the config file
        if inline_all:
            m["class"] = "required"
    path.write_text(dump_toml(d))
    return path


def summary(stdout: str, stderr: str) -> dict:
    def num(pattern):
        m = re.search(pattern, stdout)
        if not m:
            raise SystemExit(f"no {pattern!r} in the summary:\n{stdout}")
        return float(m[1])

    done = []
    for line in stderr.splitlines():
        if "field done" in line:
            kv = {k: v.strip('"') for k, v in FIELD.findall(line)}
            done.append((float(kv["latency_ms"]), float(kv.get("required_ms", "nan")), kv.get("degraded") == "true"))
    steady = done[WARMUP:]
    return {
        "fields": int(num(r"fields acquired\s+(\d+)")),
        "frames": int(num(r"fields acquired\s+\d+ \((\d+) frames\)")),
        "rejected": int(num(r"frames rejected\s+(\d+)")),
        "incomplete": int(num(r"; (\d+) incomplete")),
        "misses": int(num(r"deadline misses\s+(\d+)")),
        "required_late": int(num(r"late on (\d+) fields")),
        "degraded": int(num(r"degraded (\d+)")),
        "backfilled": int(num(r"backfilled (\d+)")),
        "left": int(num(r"backlog left (\d+)")),
        "held_s": num(r"acquisition held ([\d.]+) s"),
        "elapsed_s": num(r"elapsed\s+([\d.]+) s"),
        "req_p50": pct([r for _, r, _ in steady], 0.5),
        "req_p99": pct([r for _, r, _ in steady], 0.99),
        "lat_p50": pct([lat for lat, _, _ in steady], 0.5),
        "lat_p99": pct([lat for lat, _, _ in steady], 0.99),
    }


def run(binary, cfg) -> tuple[dict, str, str]:
    p = subprocess.run([str(binary), "run", "--config", str(cfg)], capture_output=True, text=True, env=ENV, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"run failed ({p.returncode}): {p.stderr[-3000:]}")
    return summary(p.stdout, p.stderr), p.stdout, p.stderr


def killed_then_restarted(binary, cfg) -> tuple[int, dict, float]:
    """Kills the run after its first end-of-plate backfill, restarts it; returns the fields owed
    at the kill, the restart's summary and how long the restart took."""
    proc = subprocess.Popen([str(binary), "run", "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    draining = False
    while True:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise SystemExit("the run ended before its backfill could be interrupted")
        draining |= "backfilling owed work before exit" in line
        if draining and "field backfilled" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    t0 = time.monotonic()
    s, _, err = run(binary, cfg)
    return err.count("field backfilled"), s, time.monotonic() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=pathlib.Path, default=ROOT / "config" / "overload.toml")
    ap.add_argument("--binary", type=pathlib.Path, default=ROOT / "target" / "release" / "liveomics")
    args = ap.parse_args()
    base = tomllib.loads(args.config.read_text())
    budget = base["latency_budget_ms"]
    sim = base["source"]["simulator"]
    print(f"{args.config.relative_to(ROOT)}: {len(sim['wells']) * sim['fields_per_well']} fields of "
          f"{sim['width_px']}x{sim['height_px']} offered at {sim['rate_fields_per_s']} fields/s, budget {budget} ms; "
          f"latencies over the fields after the first {WARMUP}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        rows = {}
        rows["before (all inline)"], _, _ = run(args.binary, write_config(base, tmp / "before", tmp / "before.toml", True))
        rows["after (scheduler)"], _, _ = run(args.binary, write_config(base, tmp / "after", tmp / "after.toml", False))
        kcfg = write_config(base, tmp / "killed", tmp / "killed.toml", False)
        restart_backfilled, restart, restart_s = killed_then_restarted(args.binary, kcfg)
        head = (f"{'run':<22}{'req p50':>9}{'req p99':>9}{'lat p50':>9}{'lat p99':>9}{'misses':>8}{'req late':>9}"
                f"{'degraded':>9}{'backfill':>9}{'lost':>6}{'held s':>8}{'elapsed':>8}")
        print(head)
        for name, r in rows.items():
            lost = r["rejected"] + r["incomplete"]
            print(f"{name:<22}{r['req_p50']:>9.0f}{r['req_p99']:>9.0f}{r['lat_p50']:>9.0f}{r['lat_p99']:>9.0f}"
                  f"{r['misses']:>8}{r['required_late']:>9}{r['degraded']:>9}{r['backfilled']:>9}{lost:>6}"
                  f"{r['held_s']:>8.1f}{r['elapsed_s']:>8.1f}")
        b, a = rows["before (all inline)"], rows["after (scheduler)"]
        print(f"required-work p99 after/before: {a['req_p99']:.0f} / {b['req_p99']:.0f} ms "
              f"({b['req_p99'] / a['req_p99']:.1f}x lower); within the {budget} ms budget: {a['req_p99'] <= budget}")
        print(f"after: degraded {a['degraded']}, backfilled {a['backfilled']}, left {a['left']}; "
              f"raw frames lost {a['rejected'] + a['incomplete']} of {a['frames']}")
        print(f"killed mid-backfill, restarted: the restart acquired {restart['fields']} fields, backfilled "
              f"{restart['backfilled']} (log lines: {restart_backfilled}), left {restart['left']}, in {restart_s:.1f} s")
        for name in ("after", "killed"):
            diffs = compare(tmp / "before" / f"{sim['plate']}.zarr", tmp / name / f"{sim['plate']}.zarr",
                            frozenset({"window"}))
            print(f"plate {name} vs before: {len(diffs)} difference(s)" + "".join(f"\n  {d}" for d in diffs[:10]))


if __name__ == "__main__":
    main()
