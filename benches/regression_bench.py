"""Regression guard: this binary against an older one on the same folder, alternately, so that a
change that costs throughput shows in its own session (issue 38).

Both binaries replay the same simulated Opera Phenix folder at `--speed max` with the same
config, `--rounds` times each, in alternating order (old first in odd rounds, new first in even
ones, so neither always gets the warmer page cache), and the script prints each run's fields/s
and the median ratio new / old.

    .venv/bin/python benches/regression_bench.py --old /path/to/old/liveomics
    .venv/bin/python benches/regression_bench.py --old-rev 21c5e82      # builds that commit first

`--old-rev` builds the commit in a git worktree under /tmp with this repo's target directory
(dependencies are shared; only the workspace crates compile, 2-4 min on 2 cores), copies the
binary out, and rebuilds this checkout's (its sources touched first: cargo's fingerprints go by
modification time, and the worktree's are newer).
"""

import argparse
import re
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RATE = re.compile(r"fields\s+(\d+) done \(([\d.]+) fields/s\)")


def build_old(rev: str, work: Path) -> Path:
    tree = work / "tree"
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", tree, rev], check=True, capture_output=True)
    try:
        subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "liveomics",
                        "--target-dir", ROOT / "target"], cwd=tree, check=True)
        old = work / "liveomics-old"
        shutil.copy(ROOT / "target" / "release" / "liveomics", old)
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], capture_output=True)
    # The worktree's sources are newer than this checkout's, and cargo's fingerprints go by
    # modification time: touch ours so that the workspace crates are built from them again.
    for crate in ("daemon", "adapters", "models", "kernels"):
        for f in (ROOT / crate).rglob("*.rs"):
            f.touch()
    subprocess.run(["cargo", "build", "--release", "--locked"], cwd=ROOT, check=True)
    return old


def replay(binary: Path, folder: Path, cfg: Path, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    p = subprocess.run([binary, "replay", folder, "--config", cfg, "--speed", "max", "--output", out,
                        "--channels", "DAPI,Microtubules,ER,TOMM20", "--pixel-size-um", "0.65"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{binary} failed:\n{p.stderr[-3000:]}")
    return float(RATE.search(p.stdout).group(2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", type=Path, help="the older binary")
    ap.add_argument("--old-rev", help="a commit to build as the older binary instead")
    ap.add_argument("--new", type=Path, default=ROOT / "target" / "release" / "liveomics")
    ap.add_argument("--config", type=Path, help="stages and sinks (default: classical segmentation, zarr only)")
    ap.add_argument("--wells", type=int, default=4)
    ap.add_argument("--fields", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if (args.old is None) == (args.old_rev is None):
        raise SystemExit("give --old BINARY or --old-rev COMMIT")
    work = Path(tempfile.mkdtemp(prefix="liveomics-regress-"))
    try:
        old = args.old.resolve() if args.old else build_old(args.old_rev, work)
        new = args.new.resolve()
        cfg = args.config.resolve() if args.config else work / "c.toml"
        wells = [f"B{c}" for c in range(2, 2 + args.wells)]
        sim = work / "sim.toml"
        sim.write_text(f"""
[source.simulator]
plate = "R1"
wells = {wells!r}
control_wells = ["B2"]
fields_per_well = {args.fields}
width_px = {args.size}
height_px = {args.size}
""".replace("'", '"'))
        if not args.config:
            cfg.write_text(sim.read_text() + """
[segmentation]
method = "classical"
[sinks.zenoh]
enabled = false
[telemetry]
http_listen = ""
""")
        subprocess.run([new, "simulate", "--config", sim, "--out", work / "sim", "--layout", "phenix"],
                       check=True, capture_output=True)
        folder = work / "sim" / "images"
        rates = {"old": [], "new": []}
        for r in range(args.rounds):
            order = [("old", old), ("new", new)] if r % 2 == 0 else [("new", new), ("old", old)]
            for name, binary in order:
                rates[name].append(replay(binary, folder, cfg, work / "out"))
            print(f"round {r + 1}: old {rates['old'][-1]:.2f} fields/s, new {rates['new'][-1]:.2f} fields/s, "
                  f"ratio {rates['new'][-1] / rates['old'][-1]:.3f}")
        ratios = [n / o for n, o in zip(rates["new"], rates["old"])]
        print(f"{args.wells * args.fields} fields of {args.size}x{args.size}, {args.rounds} rounds: "
              f"old median {statistics.median(rates['old']):.2f} fields/s, new {statistics.median(rates['new']):.2f}; "
              f"median ratio new/old {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
