"""Scores the chained per-cell model (`cell_protein_mlp`, role cell-table: the cell-omics model's
predicted transcripts in, the abundance of proteins that are never imaged out) on the held-out
plate, from the per-cell tables the daemon wrote, against the simulator's truth.

    target/release/liveomics simulate --config models/train/train_plate.toml --out /tmp/train
    target/release/liveomics simulate --config models/train/heldout_plate.toml --out /tmp/heldout
    target/release/liveomics run --config models/train/heldout_plate.toml --output /tmp/heldout-out
    .venv/bin/python models/evaluate_translation.py --truth /tmp/heldout \\
        --zarr /tmp/heldout-out/heldout.zarr --train-truth /tmp/train

Segmented cells are matched to truth cells as in models/evaluate.py (the truth label under the
segmented centroid). Per protein, three Pearson r against the true ln abundance:

- `chain`: what the daemon wrote (`protein.P00k`), the model fed the cell-omics model's
  predictions from the images;
- `bound`: the information bound, the r reachable from the true transcripts the images can
  reveal (least squares of ln p on the true ln abundance of the visible genes, fitted on the
  training plate's truth, scored on these cells);
- `input ceiling`: the r reachable from the columns the model reads (least squares of ln p on the
  cell-omics predictions of all genes, fitted on these very cells: optimistic), i.e. how much of
  the bound survives the image -> transcript model before the chain sees it;
- `true input`: the same ONNX model fed the true ln abundance of all genes instead of predictions.

It also prints, per protein, the ceiling of a chain that would read the cells' measurements too
(ln of `area_px`, `nucleus_area_px` and the landmark channel means, besides the predictions): what
a cell-table model could gain from columns the daemon already has.

Must show: proteins translated from visible genes at >= 0.9 x their bound; proteins from invisible
genes at |r| < 0.1.
"""

import argparse
import csv
import json
import pathlib
import sys

import anndata
import numpy as np
import onnxruntime as ort
import tifffile
import yaml
from evaluate import pearson

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_model(folder, x):
    """The model as the daemon runs it: its description's input normalisation, ONNX, output scaling."""
    d = yaml.safe_load((folder / "bioimageio.yaml").read_text())
    pre = d["inputs"][0]["preprocessing"][0]["kwargs"]
    post = d["outputs"][0]["postprocessing"][0]["kwargs"]
    mean, std = np.float32(pre["mean"]), np.float32(pre["std"])
    gain, offset = np.float32(post["gain"]), np.float32(post["offset"])
    sess = ort.InferenceSession(str(folder / "weights.onnx"), providers=["CPUExecutionProvider"])
    z = ((x - mean) / std).astype(np.float32)
    return sess.run(None, {sess.get_inputs()[0].name: z})[0] * gain + offset


def truth_rows(folder):
    rows = list(csv.DictReader(open(pathlib.Path(folder) / "truth" / "cells.csv")))
    manifest = json.loads((pathlib.Path(folder) / "manifest.json").read_text())
    return rows, manifest


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--truth", required=True, type=pathlib.Path)
    ap.add_argument("--zarr", required=True, type=pathlib.Path)
    ap.add_argument("--train-truth", required=True, type=pathlib.Path)
    ap.add_argument("--model", default="protein", help="the cell-table model's name in the run config")
    ap.add_argument("--cell-model", default="cellomics", help="the cell-omics model the chain reads")
    ap.add_argument("--folder", type=pathlib.Path, default=ROOT / "models" / "cell_protein_mlp")
    ap.add_argument("--json", type=pathlib.Path)
    args = ap.parse_args()
    rows, manifest = truth_rows(args.truth)
    train, train_manifest = truth_rows(args.train_truth)
    genes = [g["name"] for g in manifest["genes"]]
    visible_genes = [g["name"] for g in manifest["genes"] if g["visible"]]
    proteins = manifest.get("translated_proteins", [])
    if not proteins:
        sys.exit(f"{args.truth}: the plate has no translated proteins")
    names = [p["name"] for p in proteins]

    # The bound: ln p from the true ln e of the visible genes, by least squares on the training plate.
    def design(rs):
        return np.column_stack([np.ones(len(rs))] + [np.log([float(r[g]) for r in rs]) for g in visible_genes])

    target_train = np.log([[float(r[p]) for p in names] for r in train])
    coef, *_ = np.linalg.lstsq(design(train), target_train, rcond=None)

    index = {(r["well"], int(r["field"]), int(r["label"])): r for r in rows}
    measured = ["area_px", "nucleus_area_px", "mean_dapi", "mean_microtubules", "mean_er"]
    pred, inputs, extra, matched = [], [], [], []
    for well in manifest["wells"]:
        row, col = well[0], str(int(well[1:]))
        for f in range(manifest["fields_per_well"]):
            a = anndata.read_zarr(args.zarr / row / col / str(f) / "tables" / "table")
            cols = [f"{args.model}.{p}" for p in names]
            missing = set(cols) - set(a.obs.columns)
            if missing:
                sys.exit(f"{well} field {f}: no columns {sorted(missing)} (was the chain configured?)")
            labels = tifffile.imread(args.truth / "truth" / f"{well}_f{f}_t0_cells.tif")
            ys = np.clip(np.round(a.obs["centroid_y_px"].to_numpy()).astype(int), 0, labels.shape[0] - 1)
            xs = np.clip(np.round(a.obs["centroid_x_px"].to_numpy()).astype(int), 0, labels.shape[1] - 1)
            values = a.obs[cols].to_numpy()
            read = a.obs[[f"{args.cell_model}.{g}" for g in genes]].to_numpy()
            more = np.log(np.maximum(a.obs[measured].to_numpy(np.float64), 1e-3))
            for i, (y, x) in enumerate(zip(ys, xs)):
                t = index.get((well, f, int(labels[y, x])))
                if t is not None:
                    pred.append(values[i])
                    inputs.append(read[i])
                    extra.append(more[i])
                    matched.append(t)
    pred = np.array(pred)
    want = np.log([[float(t[p]) for p in names] for t in matched])
    bound = design(matched) @ coef
    x_in = np.column_stack([np.ones(len(inputs)), np.array(inputs, np.float64)])
    ceiling = x_in @ np.linalg.lstsq(x_in, want, rcond=None)[0]
    x_more = np.column_stack([x_in, np.array(extra)])
    ceiling_more = x_more @ np.linalg.lstsq(x_more, want, rcond=None)[0]
    fed_true = run_model(args.folder, np.log([[float(t[g]) for g in genes] for t in matched]).astype(np.float32))

    report = {"cells": len(matched), "proteins": {}}
    ok = True
    print(f"RNA -> protein per cell ({args.model}), {len(matched)} segmented cells matched to truth on plate "
          f"{manifest['plate']} (seed {manifest['config']['seed']}); Pearson r of ln abundance")
    print(f"  {'protein':8s} {'genes':10s} {'kind':9s} {'chain':>7s} {'bound':>7s} {'ratio':>6s} "
          f"{'ceiling':>8s} {'of ceil':>7s} {'true input':>10s}  must show")
    for i, p in enumerate(proteins):
        r_chain = pearson(pred[:, i], want[:, i])
        r_bound = pearson(bound[:, i], want[:, i])
        r_true = pearson(fed_true[:, i], want[:, i])
        r_ceiling = pearson(ceiling[:, i], want[:, i])
        if p["visible"]:
            good = r_chain >= 0.9 * r_bound
            rule = ">= 0.9 x bound"
        else:
            good = abs(r_chain) < 0.1
            rule = "|r| < 0.1"
        ok &= good
        report["proteins"][p["name"]] = {
            "genes": p["genes"], "visible": p["visible"], "noise_sd": p["noise_sd"],
            "chain_r": r_chain, "bound_r": r_bound, "input_ceiling_r": r_ceiling, "true_input_r": r_true,
            "ok": good,
        }
        ratio = r_chain / r_bound if p["visible"] and r_bound > 0 else float("nan")
        of_ceiling = r_chain / r_ceiling if p["visible"] and r_ceiling > 0 else float("nan")
        print(f"  {p['name']:8s} {'+'.join(p['genes']):10s} {'visible' if p['visible'] else 'invisible':9s} "
              f"{r_chain:+7.3f} {r_bound:+7.3f} {ratio:6.3f} {r_ceiling:+8.3f} {of_ceiling:7.3f} {r_true:+10.3f}  "
              f"{rule}: {'ok' if good else 'FAIL'}")
    print(f"  ceiling with the measurements too ({', '.join(measured)}), and as a share of the bound:")
    print("  " + "  ".join(
        f"{p['name']} {pearson(ceiling_more[:, i], want[:, i]):+.3f}"
        + (f" ({pearson(ceiling_more[:, i], want[:, i]) / pearson(bound[:, i], want[:, i]):.2f})" if p["visible"] else "")
        for i, p in enumerate(proteins)))
    for i, p in enumerate(proteins):
        report["proteins"][p["name"]]["ceiling_with_measurements_r"] = pearson(ceiling_more[:, i], want[:, i])
    print("  per gene, the cell-omics predictions the chain reads: Pearson r against the true ln abundance")
    print("  " + "  ".join(f"{g} {pearson(np.array(inputs)[:, j], np.log([float(t[g]) for t in matched])):+.2f}"
                           for j, g in enumerate(genes)))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print("all must-show thresholds met" if ok else "SOME THRESHOLDS NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
