"""The relocalization readout on a held-out simulated plate (issue 23).

60 wells × 3 fields of 1024² (seed 12, the reference models' cell line, gene_seed 7): 8 declared
control wells, 16 control-like wells (unperturbed, not declared: the check of the null), and 36
perturbed wells (the simulator's latent shift: cell and nucleus size, stain levels, expression),
in each of which one protein also moves, about half of it and varying per cell: HNRNPA1 nucleus →
cytoplasm in 18, ATP1A1 membrane → cytoplasm (internalization) in 6, TOMM20 mitochondria →
cytoplasm in 6, CALR ER → membrane (surface exposure) in 6. The daemon runs segment, measure, the
reference virtual-stain U-Net (CALR, ATP1A1, HNRNPA1) and the localize stage; the script then
reads the wells' OME-Zarr attributes and the per-cell AnnData tables and prints:

- per protein, ROC AUC of its score (`loc.{protein}.shift`) separating the wells where it moved
  from every other scored well (the others' perturbed wells included), from the acquired channel
  and from the U-Net's virtual one;
- the default call's (z ≥ 3 and p ≤ 0.01) rate on control-like wells (every protein), on
  perturbed wells for proteins that did not move, and on the wells where the protein moved;
- Pearson r per compartment and protein between each cell's measured fractions and the
  simulator's truth (cells matched through the truth's label image at the measured centroid);
- the localize stage's cost per field against the measure stage's (`liveomics bench-localize`),
  1024² and 2160², in the same process.

    .venv/bin/python benches/localization_bench.py [--json out.json] [--adjust]
"""

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import anndata
import numpy as np
import tifffile
import tomli_w
import zarr

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "liveomics"
ROWS, COLS = "BCDEFG", range(2, 12)
PROTEINS = [("HNRNPA1", "nuclear"), ("CALR", "er"), ("ATP1A1", "membrane"), ("TOMM20", "mitochondria")]
PARTS = ["nucleus", "cytoplasm", "membrane", "er", "puncta"]


def layout():
    wells = [f"{r}{c}" for r in ROWS for c in COLS]
    controls = [w for w in wells if w[1:] in ("2", "11") and w[0] in "BCDE"]
    rest = [w for w in wells if w not in controls]
    like = rest[0::3][:16]
    left = [w for w in rest if w not in like]
    others = left[1::2]
    moved = {"HNRNPA1": left[0::2], "ATP1A1": others[0::3], "TOMM20": others[1::3], "CALR": others[2::3]}
    return wells, controls, like, moved


def auc(pos, neg):
    pos, neg = np.asarray(pos), np.asarray(neg)
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--fields", type=int, default=3)
    ap.add_argument("--adjust", action="store_true", help="localization.adjust_for_morphology = true")
    args = ap.parse_args()
    wells, controls, like, moved = layout()
    targets = {"HNRNPA1": "cytoplasmic", "ATP1A1": "cytoplasmic", "TOMM20": "cytoplasmic", "CALR": "membrane"}
    sim = {"seed": 12, "gene_seed": 7, "plate": "heldout", "plate_format": 96, "wells": wells,
           "control_wells": controls + like, "fields_per_well": args.fields, "width_px": 1024, "height_px": 1024,
           "pixel_size_um": 0.65, "rate_fields_per_s": 0.0,
           "proteins": [{"name": n, "localization": loc} for n, loc in PROTEINS],
           "relocalization": [{"protein": p, "to": targets[p], "wells": w, "fraction": 0.5} for p, w in moved.items()]}
    tmp = Path(tempfile.mkdtemp(prefix="locbench-"))
    cfg = {"instrument": "locbench", "latency_budget_ms": 60000, "source": {"kind": "simulator", "simulator": sim},
           "segmentation": {"method": "classical"},
           "pipeline": {"stages": ["segment", "measure", "inference", "localize"], "workers": 2},
           "inference": {"providers": ["cpu"], "intra_threads": 1, "tile_px": 1024,
                         "models": [{"name": "vstain", "path": str(ROOT / "models" / "virtual_stain_unet")}]},
           "localization": {"controls_from_plan": False, "control_wells": controls,
                            "adjust_for_morphology": args.adjust},
           "sinks": {"zarr": {"output": str(tmp / "out")}, "zenoh": {"enabled": False}},
           "telemetry": {"http_listen": ""}}
    (tmp / "run.toml").write_text(tomli_w.dumps(cfg))
    (tmp / "sim.toml").write_text(tomli_w.dumps({"source": {"simulator": sim}}))
    t0 = time.time()
    subprocess.run([BIN, "run", "--config", tmp / "run.toml"], check=True, capture_output=True)
    run_s = time.time() - t0
    subprocess.run([BIN, "simulate", "--config", tmp / "sim.toml", "--out", tmp / "truth"], check=True,
                   capture_output=True)
    plate = tmp / "out" / "heldout.zarr"
    scores = {w: zarr.open_group(str(plate / w[0] / w[1:]), mode="r").attrs["liveomics"].get("localization", {})
              for w in wells}
    out = {"plate": {"wells": len(wells), "fields_per_well": args.fields, "controls": controls,
                     "control_like": like, "moved": moved},
           "adjust_for_morphology": args.adjust, "run_s": round(run_s, 1)}
    perturbed = [w for ws in moved.values() for w in ws]
    unscored = [w for w in wells if w not in controls and not scores[w]]
    out["unscored_wells"] = unscored
    for protein, where in moved.items():
        for key in (protein, f"{protein}_virtual"):
            if key not in scores[perturbed[0]]:
                continue
            pos = [scores[w][key]["shift"] for w in where]
            neg = [scores[w][key]["shift"] for w in like + perturbed if w not in where]
            out[f"auc {key}"] = round(auc(pos, neg), 3)
            out[f"called {key} where it moved"] = [int(sum(scores[w][key]["relocalized"] for w in where)), len(where)]
    keys = sorted({k for w in like for k in scores[w]})
    calls = [scores[w][k]["relocalized"] for w in like for k in keys]
    out["false calls, control-like wells (every protein key)"] = [int(sum(calls)), len(calls)]
    calls = [scores[w][k]["relocalized"] for p, ws in moved.items() for w in ws for k in keys
             if not k.startswith(p)]
    out["calls, perturbed wells, proteins that did not move (every key)"] = [int(sum(calls)), len(calls)]
    # Per-cell fractions against the truth.
    truth = {}
    with open(tmp / "truth" / "truth" / "cells.csv") as fh:
        for row in csv.DictReader(fh):
            truth[(row["well"], int(row["field"]), int(row["label"]))] = row
    pairs = {(p, c): ([], []) for p, _ in PROTEINS for c in PARTS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for w in wells:
            for f in range(args.fields):
                obs = anndata.read_zarr(plate / w[0] / w[1:] / str(f) / "tables" / "table").obs
                labels = tifffile.imread(tmp / "truth" / "truth" / f"{w}_f{f}_t0_cells.tif")
                ys = np.clip(np.round(obs["centroid_y_px"].to_numpy()).astype(int), 0, labels.shape[0] - 1)
                xs = np.clip(np.round(obs["centroid_x_px"].to_numpy()).astype(int), 0, labels.shape[1] - 1)
                for i, t in enumerate(labels[ys, xs]):
                    row = truth.get((w, f, int(t))) if t else None
                    if row is None:
                        continue
                    for p, _ in PROTEINS:
                        for c in PARTS:
                            m, e = obs[f"loc.{p}.{c}"].iloc[i], float(row[f"loc_{p}_{c}"])
                            if np.isfinite(m) and np.isfinite(e):
                                pairs[(p, c)][0].append(m)
                                pairs[(p, c)][1].append(e)
    r = {}
    for (p, c), (m, e) in pairs.items():
        if len(m) > 10 and np.std(e) > 1e-6 and np.std(m) > 1e-6:
            r[f"{p}.{c}"] = round(float(np.corrcoef(m, e)[0, 1]), 3)
    out["pearson_r"] = r
    pooled = {}
    for c in PARTS:
        m = [v for p, _ in PROTEINS for v in pairs[(p, c)][0]]
        e = [v for p, _ in PROTEINS for v in pairs[(p, c)][1]]
        pooled[c] = round(float(np.corrcoef(m, e)[0, 1]), 3)
    out["pearson_r_by_compartment, all four proteins' cells"] = pooled
    out["cells_matched"] = len(pairs[("HNRNPA1", "nucleus")][0])
    cost = subprocess.run([BIN, "bench-localize", "--repeat", "5"], check=True, capture_output=True, text=True)
    out["cost"] = [json.loads(x) for x in cost.stdout.splitlines()]
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
