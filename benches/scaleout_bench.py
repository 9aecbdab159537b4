"""Scale-out over several daemons (issue 21): fields/s with 1, 2 and 3 members sharing a plate,
each pinned to its own core with `taskset` so that the sharing shows on a small machine, and the
time a handoff takes when a member dies.

A zenoh router on a loopback port (this script's session) publishes a simulated plate (16 wells ×
3 fields, 4 channels of 1024²) as fast as the members take it; each member runs classical
segmentation, measurement and the reference well-omics model (`models/well_omics_mil`) with one
worker and writes the plate to the same place: a local directory, or with `--s3` moto's S3 server.
Member i runs on core i mod (cores), so with 2 cores the third member shares a core.

- **fields/s**: fields of the plate over the time from the first frame published to the last
  field done (the members' own `field done` log times);
- **handoff**: with 2 members, the plate paced at 2 fields/s, one member SIGKILLed, once it
  has done 3 fields, right after a field of one of its wells went out: the time from the kill to the survivor's `took over wells` line (zenoh's
  detection of the lost session and the reassignment) and to the last of the taken-over fields
  done; and the readouts then equal those of the run without a kill;
- **per field**: the bytes a member receives (every member receives every frame), and the store
  objects and metadata documents one field writes.

    .venv/bin/python benches/scaleout_bench.py [--s3] [--cores 0,1] [--json out.json]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import cluster_kit as ck  # noqa: E402
from liveomics_testkit import BIN, free_port, toml_text  # noqa: E402

WELLS = [f"{r}{c}" for r in "BCDE" for c in range(2, 6)]
FIELDS = 3
SIZE = 1024
TIME = re.compile(r"^(\S+Z)\s")


def log_times(lines, marker):
    """The UTC times (seconds since the epoch) of the log lines holding `marker`."""
    out = []
    for line in lines:
        if marker in line:
            m = TIME.match(line)
            if m:
                out.append(datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp())
    return out


def start(cfgs, dest, cores, env):
    """The members, member i pinned to `cores[i % len(cores)]`, once each listens."""
    procs = []
    for i, cfg in enumerate(cfgs):
        path = dest / f"member{i}.toml"
        path.write_text(toml_text(cfg))
        cmd = ["taskset", "-c", str(cores[i % len(cores)]), str(BIN), "run", "--config", str(path)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    logs = [[] for _ in procs]
    listening = [threading.Event() for _ in procs]

    def read(i):
        for line in procs[i].stderr:
            logs[i].append(line)
            if "listening for frames" in line:
                listening[i].set()

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(len(procs))]
    for r in readers:
        r.start()
    for i, e in enumerate(listening):
        if not e.wait(120):
            for p in procs:
                p.kill()
            raise RuntimeError("member did not start: " + "".join(logs[i])[-3000:])
    return procs, logs, readers


def plate_of(out, s3, prefix):
    import zarr

    return s3.group(f"{prefix}/{ck.PLATE}.zarr") if s3 else zarr.open_group(Path(out) / f"{ck.PLATE}.zarr", mode="r")


def objects_per_field(out, s3, prefix) -> dict:
    """Objects (files) one field's node holds, and how many of them are metadata documents."""
    node = f"{ck.PLATE}.zarr/{WELLS[0][0]}/{WELLS[0][1:]}/0"
    if s3:
        keys = s3.fs().find(f"{s3.bucket}/{prefix}/{node}")
    else:
        keys = [str(p) for p in (Path(out) / node).rglob("*") if p.is_file() and not p.name.startswith(".")]
    return {"objects": len(keys), "metadata": sum(k.endswith("zarr.json") for k in keys)}


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(n, frames, channels, tmp, cores, s3, kill_after=None, rate=0.0, tag=""):
    port = free_port()
    hub = ck.hub(port)
    prefix = f"bench-{tag}-{n}-{int(time.time() * 1000)}"
    out = f"s3://{s3.bucket}/{prefix}" if s3 else tmp / prefix
    cfgs = [ck.daemon_config(out, port, channels, SIZE, f"m{i}" if n > 1 else None, n, idle_exit_ms=4000)
            for i in range(n)]
    env = s3.env if s3 else None
    procs, logs, readers = start(cfgs, tmp, cores, env)
    try:
        on_field = None
        if kill_after is not None:
            class Victim:
                proc = procs[1]
                lines = logs[1]

            on_field = ck.killer(Victim, frames, [f"m{i}" for i in range(n)], "m1", min_done=kill_after)
        s3_cpu0 = cpu_s(s3.proc.pid) if s3 else 0.0
        t0 = time.time()
        ck.publish(hub, frames, fields_per_s=rate, on_field=on_field)
        killed_at = on_field.killed_at if on_field else None
        for p in procs:
            p.wait(900)
        for r in readers:
            r.join(10)
    finally:
        hub.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
    s3_cpu = cpu_s(s3.proc.pid) - s3_cpu0 if s3 else 0.0
    done = [t for lines in logs for t in log_times(lines, "field done")]
    fields = len(WELLS) * FIELDS
    result = {"members": n, "fields_done": len(done), "fields": fields,
              "fields_per_s": fields / (max(done) - t0) if done else 0.0,
              "plate": plate_of(out, s3, prefix), "out": out, "prefix": prefix}
    if s3:
        result["s3_server_cpu_s_per_field"] = s3_cpu / fields
        result["s3_server_cpu_share"] = s3_cpu / (max(done) - t0) if done else 0.0
    if killed_at is not None:
        survivor = logs[0]
        took = log_times(survivor, "took over wells")
        taken = [line for line in survivor if "took over wells" in line]
        result["handoff_detect_s"] = (took[0] - killed_at) if took else None
        result["handoff_line"] = taken[0].strip()[:300] if taken else None
        result["last_done_after_kill_s"] = max(done) - killed_at
        wells = re.findall(r'"([A-Z]+[0-9]+)"', taken[0].split("wells=", 1)[1]) if taken else []
        redone = [t for line in survivor if "field done" in line and any(f"/{w}/f" in line for w in wells)
                  for t in log_times([line], "field done") if took and t >= took[0]]
        result["redone_first_s"] = (min(redone) - killed_at) if redone else float("nan")
        result["victim_done"] = sum("field done" in x for x in logs[1])
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--s3", action="store_true", help="write the plate to moto's S3 server")
    ap.add_argument("--cores", default=",".join(str(c) for c in sorted(os.sched_getaffinity(0))))
    ap.add_argument("--json")
    args = ap.parse_args()
    cores = [int(c) for c in args.cores.split(",")]
    s3 = ck.S3Server() if args.s3 else None
    report = {"cores": cores, "storage": "s3 (moto)" if s3 else "directory", "field_px": SIZE}
    try:
        with tempfile.TemporaryDirectory(prefix="scaleout-") as d:
            tmp = Path(d)
            channels, frames = ck.stage_plate(BIN, tmp, WELLS, FIELDS, SIZE)
            per_field_bytes = sum(px.nbytes for w, f, c, px in frames) / (len(WELLS) * FIELDS)
            report["bytes_per_field_each_member_receives"] = per_field_bytes
            runs = {}
            for n in (1, 2, 3):
                r = run(n, frames, channels, tmp, cores, s3, tag="rate")
                runs[n] = r
                print(f"{n} member(s): {r['fields_done']}/{r['fields']} fields, {r['fields_per_s']:.2f} fields/s "
                      f"({r['fields_per_s'] / runs[1]['fields_per_s']:.2f}x one member)", flush=True)
                if s3:
                    print(f"  the S3 server used {r['s3_server_cpu_s_per_field'] * 1e3:.0f} ms CPU per field, "
                          f"{r['s3_server_cpu_share']:.2f} cores over the run", flush=True)
            report["rate"] = {n: {k: v for k, v in r.items() if k not in ("plate", "out")} for n, r in runs.items()}
            ref = ck.readouts(runs[1]["plate"])
            for n in (2, 3):
                got = ck.readouts(runs[n]["plate"])
                diff = max(float(np.abs(got[w][1] - ref[w][1]).max()) for w in ref)
                report["rate"][n]["max_readout_diff_vs_one"] = diff
                print(f"  {n} members: readouts differ from one member's by at most {diff:.2e}")
            k = run(2, frames, channels, tmp, cores, s3, kill_after=3, rate=2.0, tag="kill")
            got = ck.readouts(k["plate"])
            k["max_readout_diff_vs_one"] = max(float(np.abs(got[w][1] - ref[w][1]).max()) for w in ref)
            report["handoff"] = {key: v for key, v in k.items() if key not in ("plate", "out")}
            print(f"handoff: victim did {k['victim_done']} fields; took over {k['handoff_detect_s']:.2f} s after "
                  f"the kill; the plate's last field done {k['last_done_after_kill_s']:.2f} s after it; "
                  f"{k['fields_done'] - k['victim_done']} fields done by the survivor; readouts differ from one "
                  f"member's by at most {k['max_readout_diff_vs_one']:.2e}")
            print(f"  {k['handoff_line']}")
            print(f"  the first taken-over field done {k['redone_first_s']:.2f} s after the kill")
            objects = objects_per_field(runs[2]["out"], s3, runs[2]["prefix"])
            report["objects_per_field"] = objects
            print(f"per field: each member receives every frame, {per_field_bytes / 1e6:.1f} MB here; the field "
                  f"writes {objects['objects']} objects ({objects['metadata']} of them zarr.json) under its node, "
                  f"plus its well's zarr.json and, from the plate's writer, the plate's")
    finally:
        if s3:
            s3.close()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
