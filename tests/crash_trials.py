"""Many SIGKILL trials (the test suite runs 3): kill at a random point, restart, check the plate.

    cd tests && ../.venv/bin/python crash_trials.py --trials 20
"""

import argparse
import tempfile
from pathlib import Path

from liveomics_testkit import BIN
from test_output import crash_trial


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    args = ap.parse_args()
    rows = []
    for seed in range(1, args.trials + 1):
        with tempfile.TemporaryDirectory() as d:
            complete, partial, redone = crash_trial(BIN, Path(d), seed)
            rows.append((seed, complete, partial, redone))
            print(f"trial {seed:2d}: {complete} fields complete at the kill, {partial} partial, {redone} acquired on restart: plate OK")
    killed_mid_field = sum(1 for r in rows if r[2] > 0)
    print(f"{len(rows)} trials passed; {killed_mid_field} killed with a partial field on disk")


if __name__ == "__main__":
    main()
