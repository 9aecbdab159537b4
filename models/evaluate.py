"""Scores the reference models on a held-out simulated plate (a seed not used in training) from
what the daemon wrote, against the simulator's ground truth. Prints a report and writes JSON.

    target/release/liveomics simulate --config models/train/heldout_plate.toml --out /tmp/heldout
    target/release/liveomics run --config models/train/heldout_plate.toml --output /tmp/heldout-out
    .venv/bin/python models/evaluate.py --truth /tmp/heldout --zarr /tmp/heldout-out/heldout.zarr \\
        --train-truth /tmp/train [--diffusion-fields 4]

Direct virtual staining: Pearson r per protein over the pixels inside truth cells, pooled over the
plate. Cell-omics: segmented cells are matched to truth cells (the truth label under the segmented
centroid); Pearson r per gene between predicted and true ln abundance. Well-omics: per gene across
wells, r^2 of the final readout against the true ln bulk abundance (ln of the mean over the well's
cells), and Image2Omics' "predictable" criterion: r^2 with p < 0.05 and per-well SMAPE below the
training-mean baseline's by a one-sided Wilcoxon signed-rank test, p < 0.05. Convergence: the same
r^2 after 1, 2, ... fields. Diffusion: Pearson r and PSNR of sampled images against the truth at
several step counts (run through `liveomics models sample`).
"""

import argparse
import csv
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import anndata
import numpy as np
import tifffile
import zarr
from scipy import stats

ROOT = pathlib.Path(__file__).resolve().parents[1]


def truth_cells(folder):
    rows = list(csv.DictReader(open(pathlib.Path(folder) / "truth" / "cells.csv")))
    genes = [k for k in rows[0] if k.startswith("G")]
    return rows, genes


def well_bulk(rows, genes):
    by = {}
    for r in rows:
        by.setdefault(r["well"], []).append([float(r[g]) for g in genes])
    return {w: np.log(np.mean(v, axis=0)) for w, v in by.items()}


def split_well(name):
    return name[0], str(int(name[1:]))


def pearson(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


class Pooled:
    """Pearson r over every pixel of the plate, from running sums (the plate does not fit in
    memory at once)."""

    def __init__(self):
        self.sums = np.zeros(5)
        self.n = 0

    def add(self, x, y):
        self.sums += [x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum()]
        self.n += x.size

    def r(self):
        sx, sy, sxx, syy, sxy = self.sums / max(self.n, 1)
        return float((sxy - sx * sy) / np.sqrt((sxx - sx * sx) * (syy - sy * sy)))


def virtual_staining(manifest, truth, plate, ceiling):
    """Within-cell Pearson r of every `X (virtual)` channel against its clean truth: pooled over
    the plate, and the median over fields. In the same pass, four images composed per truth cell
    that say which half of the prediction limits r:

    - `bound`: the clean truth's own within-cell pattern at `level_ceiling`'s per-cell level (each
      truth cell scaled by its predicted over true level), what a perfect model could reach;
    - `ceiling_level`: the model's pattern at that same ceiling level, what the model would reach
      if its level were as good as the landmarks allow;
    - `true_level`: the model's pattern at the true level (each cell of the prediction scaled so
      that its mean is the truth's);
    - `true_pattern`: the truth's pattern at the model's level (each cell of the truth scaled so
      that its mean is the prediction's)."""
    pooled, per_field, per_cell = {}, {}, {}
    composed = {"bound": {}, "ceiling_level": {}, "true_level": {}, "true_pattern": {}}
    for well in manifest["wells"]:
        row, col = split_well(well)
        for f in range(manifest["fields_per_well"]):
            node = plate[f"{row}/{col}/{f}"]
            labels = [c["label"] for c in node.attrs["ome"]["omero"]["channels"]]
            raw = node["0"]
            lab = tifffile.imread(truth / "truth" / f"{well}_f{f}_t0_cells.tif")
            mask = lab > 0
            cell_ids = np.unique(lab)[1:]
            area = np.maximum(np.bincount(lab.ravel(), minlength=lab.max() + 1), 1)
            for c, label in enumerate(labels):
                if not label.endswith(" (virtual)"):
                    continue
                protein = label[: -len(" (virtual)")]
                path = truth / "truth" / f"{well}_f{f}_t0_{protein}_clean.tif"
                if not path.exists():
                    continue
                img = np.asarray(raw[c] if raw.ndim == 3 else raw[0, c], np.float64)
                truth_img = tifffile.imread(path).astype(np.float64)
                pred, want = img[mask], truth_img[mask]
                pooled.setdefault(protein, Pooled()).add(pred, want)
                per_field.setdefault(protein, []).append(pearson(pred, want))
                # Per cell: its mean intensity (the level), and r within it (the pattern).
                level_pred = np.bincount(lab.ravel(), weights=img.ravel(), minlength=len(area)) / area
                level_true = np.bincount(lab.ravel(), weights=truth_img.ravel(), minlength=len(area)) / area
                cells = per_cell.setdefault(protein, ([], [], []))
                cells[0].extend(level_pred[cell_ids])
                cells[1].extend(level_true[cell_ids])
                for cell in cell_ids[area[cell_ids] > 200]:
                    m = lab == cell
                    cells[2].append(pearson(img[m], truth_img[m]))
                swap = np.where(level_pred > 0, level_true / np.where(level_pred > 0, level_pred, 1), 1.0)
                to_model = np.where(level_true > 0, level_pred / np.where(level_true > 0, level_true, 1), 0.0)
                images = {"true_level": img * swap[lab], "true_pattern": truth_img * to_model[lab]}
                if protein in ceiling:
                    ratio = ceiling[protein]["ratio"]
                    scale = np.array([0.0] + [ratio.get((well, f, i), 1.0) for i in range(1, lab.max() + 1)])
                    images["bound"] = truth_img * scale[lab]
                    images["ceiling_level"] = images["true_level"] * scale[lab]
                for name, composite in images.items():
                    acc, fields = composed[name].setdefault(protein, (Pooled(), []))
                    acc.add(composite[mask], want)
                    fields.append(pearson(composite[mask], want))
    result = {}
    for p, acc in pooled.items():
        level, within = per_cell[p][:2], per_cell[p][2]
        result[p] = {"pooled": acc.r(), "median_per_field": float(np.nanmedian(per_field[p])),
                     "per_cell_mean_r": pearson(*level), "within_cell_median_r": float(np.nanmedian(within))}
        for name, by_protein in composed.items():
            if p in by_protein:
                got, fields = by_protein[p]
                result[p][name] = {"pooled": got.r(), "median_per_field": float(np.nanmedian(fields))}
    return result


# How the simulator reads a cell's latent state z into what a landmark image shows
# (adapters/src/simulator.rs, place_cells): (coefficient on z, independent noise sd) of the log
# of cell radius, nucleus size, DAPI brightness, microtubule density and ER brightness.
READOUTS = [({0: 0.12}, 0.12), ({1: 0.10}, 0.08), ({1: 0.15}, 0.10), ({2: 0.25}, 0.10), ({0: 0.2, 2: -0.2}, 0.10)]


def readout_design(rows, rng):
    """Per cell: the five morphology readouts measured exactly (with the simulator's own noise),
    the well's mean visible latent state (what seeing many cells of a well could add), and 1."""
    z = np.array([[float(r[f"z{i}"]) for i in range(6)] for r in rows])
    feats = np.stack([sum(c * z[:, d] for d, c in coef.items()) + sd * rng.standard_normal(len(z))
                      for coef, sd in READOUTS], axis=1)
    wells = np.array([r["well"] for r in rows])
    well_mean = np.zeros((len(z), 3))
    for w in set(wells):
        well_mean[wells == w] = z[wells == w, :3].mean(axis=0)
    return np.c_[feats, well_mean, np.ones(len(z))]


def level_ceiling(rows, train_rows, manifest):
    """The best per-cell linear r any image model could reach for each protein's level: the
    reported gene's log abundance predicted from `readout_design`, by least squares fitted on the
    training plate and scored on this one; the prediction exp(mean + residual variance / 2) is the
    conditional mean in linear units. Also returns, per held-out cell, predicted over true level,
    for the bound `virtual_staining` scores."""
    rng = np.random.default_rng(0)
    x_train, x = readout_design(train_rows, rng), readout_design(rows, rng)
    visible = max(1, manifest["config"]["visible_genes"])
    out = {}
    for i, p in enumerate(pr["name"] for pr in manifest["config"]["proteins"]):
        gene = manifest["genes"][i % visible]["name"]
        y_train = np.log(np.array([float(r[gene]) for r in train_rows]))
        y = np.log(np.array([float(r[gene]) for r in rows]))
        b, *_ = np.linalg.lstsq(x_train, y_train, rcond=None)
        pred = np.exp(x @ b + (y_train - x_train @ b).var() / 2)
        out[p] = {"gene": gene, "log_sd": float(y.std()), "level_r_ceiling": pearson(pred, np.exp(y)),
                  "ratio": {(r["well"], int(r["field"]), int(r["label"])): float(q)
                            for r, q in zip(rows, pred / np.exp(y))}}
    return out


def cell_omics(manifest, truth, plate, rows, genes, model):
    index = {(r["well"], int(r["field"]), int(r["label"])): r for r in rows}
    pred, want = [], []
    for well in manifest["wells"]:
        row, col = split_well(well)
        for f in range(manifest["fields_per_well"]):
            a = anndata.read_zarr(plate.store.root / row / col / str(f) / "tables" / "table")
            cols = [f"{model}.{g}" for g in genes]
            if not set(cols) <= set(a.obs.columns):
                continue
            labels = tifffile.imread(truth / "truth" / f"{well}_f{f}_t0_cells.tif")
            for (_, o) in a.obs.iterrows():
                y, x = int(round(o["centroid_y_px"])), int(round(o["centroid_x_px"]))
                t = index.get((well, f, int(labels[y, x])))
                if t is None:
                    continue
                pred.append([o[c] for c in cols])
                want.append([np.log(float(t[g])) for g in genes])
    pred, want = np.array(pred), np.array(want)
    return {g: pearson(pred[:, i], want[:, i]) for i, g in enumerate(genes)}, len(pred)


def smape(pred, true):
    return 2 * np.abs(pred - true) / (np.abs(pred) + np.abs(true))


def well_omics(manifest, plate, rows, genes, train_rows, model):
    bulk = well_bulk(rows, genes)
    train_mean = np.mean(list(well_bulk(train_rows, genes).values()), axis=0)
    final, history = {}, {}
    for well in manifest["wells"]:
        row, col = split_well(well)
        b = plate[f"{row}/{col}"].attrs.get("liveomics", {}).get("bulk", {}).get(model)
        if b:
            final[well] = np.array(b["values"])
            history[well] = [np.array(h) for h in b["history"]]
    wells = sorted(final)
    pred = np.stack([final[w] for w in wells])
    true = np.stack([bulk[w] for w in wells])
    per_gene = {}
    for i, g in enumerate(genes):
        r, p = stats.pearsonr(pred[:, i], true[:, i])
        s_model = smape(np.exp(pred[:, i]), np.exp(true[:, i]))
        s_base = smape(np.exp(np.full(len(wells), train_mean[i])), np.exp(true[:, i]))
        w = stats.wilcoxon(s_model, s_base, alternative="less")
        per_gene[g] = {"r2": float(r * r), "r": float(r), "p_r": float(p), "smape": float(s_model.mean()),
                       "smape_baseline": float(s_base.mean()), "p_wilcoxon": float(w.pvalue),
                       "predictable": bool(r > 0 and p < 0.05 and w.pvalue < 0.05)}
    n_max = min(len(h) for h in history.values())
    convergence = []
    for n in range(1, n_max + 1):
        pn = np.stack([history[w][n - 1] for w in wells])
        r2 = [stats.pearsonr(pn[:, i], true[:, i])[0] ** 2 for i in range(len(genes))]
        dist = float(np.mean(np.abs(pn - pred)))
        convergence.append({"fields": n, "r2_per_gene": r2, "mean_abs_to_final": dist})
    return per_gene, convergence, len(wells)


def diffusion(truth, manifest, fields, steps_list, binary):
    model = ROOT / "models" / "proticelli_tiny"
    out = {}
    wells = manifest["wells"][:fields]
    proteins = ["TOMM20", "CALR", "ATP1A1", "HNRNPA1"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        for steps in steps_list:
            rs = {p: [] for p in proteins}
            ps = {p: [] for p in proteins}
            t0 = time.time()
            for well in wells:
                lm = np.stack([tifffile.imread(truth / "images" / f"{well}_f0_t0_{c}.tif")
                               for c in ["DAPI", "Microtubules", "ER"]]).astype(np.float32)[None]
                np.save(tmp / "lm.npy", lm)
                subprocess.run([binary, "models", "sample", str(model), "--landmarks", str(tmp / "lm.npy"),
                                "--proteins", ",".join(proteins), "--steps", str(steps), "--seed", "1",
                                "--output", str(tmp / "out.npy"), "--providers", "cpu"],
                               check=True, capture_output=True)
                got = np.load(tmp / "out.npy")
                mask = tifffile.imread(truth / "truth" / f"{well}_f0_t0_cells.tif") > 0
                for k, p in enumerate(proteins):
                    want = tifffile.imread(truth / "truth" / f"{well}_f0_t0_{p}_clean.tif")
                    rs[p].append(pearson(got[k][mask], want[mask]))
                    mse = float(np.mean((got[k] - want) ** 2))
                    ps[p].append(10 * np.log10(float(want.max()) ** 2 / mse))
            out[steps] = {p: {"pearson_r": float(np.mean(rs[p])), "psnr_db": float(np.mean(ps[p]))}
                          for p in proteins}
            out[steps]["seconds_per_field"] = (time.time() - t0) / len(wells)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--truth", required=True, type=pathlib.Path, help="`liveomics simulate` folder of the plate")
    ap.add_argument("--zarr", required=True, type=pathlib.Path, help="the plate.zarr the daemon wrote")
    ap.add_argument("--train-truth", required=True, type=pathlib.Path, help="the training plate (baseline)")
    ap.add_argument("--cell-model", default="cellomics")
    ap.add_argument("--well-model", default="wellomics")
    ap.add_argument("--diffusion-fields", type=int, default=0, help="held-out fields to sample (0: skip)")
    ap.add_argument("--diffusion-steps", default="10,25,50")
    ap.add_argument("--binary", default=str(ROOT / "target" / "release" / "liveomics"))
    ap.add_argument("--json", type=pathlib.Path, help="write the figures here")
    args = ap.parse_args()
    manifest = json.loads((args.truth / "manifest.json").read_text())
    visible = {g["name"]: g["visible"] for g in manifest["genes"]}
    plate = zarr.open_group(args.zarr, mode="r")
    rows, genes = truth_cells(args.truth)
    train_rows, _ = truth_cells(args.train_truth)
    report = {"plate": manifest["plate"], "seed": manifest["config"]["seed"]}
    ok = True

    ceiling = level_ceiling(rows, train_rows, manifest)
    vs = virtual_staining(manifest, args.truth, plate, ceiling)
    report["virtual_stain_pearson_r"] = vs
    print("direct virtual staining: Pearson r within cells, pooled over the plate and median per field "
          "(must be >= 0.8)")
    for p, r in vs.items():
        print(f"  {p:10s} pooled {r['pooled']:.3f}  median per field {r['median_per_field']:.3f}  "
              f"(per-cell mean r {r['per_cell_mean_r']:.3f}, within-cell median r {r['within_cell_median_r']:.3f})")
        ok &= min(r["pooled"], r["median_per_field"]) >= 0.8
    if not vs:
        print("  no virtual channels in the plate (was a virtual-stain model configured?)")
        ok = False
    else:
        report["virtual_stain_level_ceiling"] = {
            p: {k: v for k, v in c.items() if k != "ratio"} for p, c in ceiling.items() if p in vs}
        print("  ceiling from exact morphology readouts (see level_ceiling): per-cell level r, "
              "and the r of a perfect pattern at that level")
        for p, r in vs.items():
            c, b = ceiling.get(p), r.get("bound")
            if c and b:
                print(f"  {p:10s} reports {c['gene']} (log sd {c['log_sd']:.2f} across cells): "
                      f"level r ceiling {c['level_r_ceiling']:.3f}; bound pooled {b['pooled']:.3f}  "
                      f"median per field {b['median_per_field']:.3f}")
        print("  which half limits r: the model's pattern at the true per-cell level, and the true "
              "pattern at the model's level (pooled / median per field)")
        for p, r in vs.items():
            a, b = r["true_level"], r["true_pattern"]
            print(f"  {p:10s} model pattern, true level {a['pooled']:.3f} / {a['median_per_field']:.3f}; "
                  f"true pattern, model level {b['pooled']:.3f} / {b['median_per_field']:.3f}")
            if "ceiling_level" in r:
                c = r["ceiling_level"]
                print(f"  {'':10s} model pattern, ceiling level {c['pooled']:.3f} / {c['median_per_field']:.3f}")

    co, n_cells = cell_omics(manifest, args.truth, plate, rows, genes, args.cell_model)
    report["cell_omics_pearson_r"] = co
    print(f"cell-omics: Pearson r per gene over {n_cells} matched cells (visible >= 0.7, invisible |r| <= 0.2)")
    for g, r in co.items():
        good = r >= 0.7 if visible[g] else abs(r) <= 0.2
        ok &= good
        print(f"  {g} {'visible  ' if visible[g] else 'invisible'} {r:+.3f} {'ok' if good else 'FAIL'}")

    wo, conv, n_wells = well_omics(manifest, plate, rows, genes, train_rows, args.well_model)
    report["well_omics"] = wo
    report["well_omics_convergence"] = conv
    n_pred = sum(v["predictable"] for v in wo.values())
    print(f"well-omics over {n_wells} wells: r^2 per gene (visible >= 0.8), Image2Omics predictable")
    for g, v in wo.items():
        good = v["r2"] >= 0.8 if visible[g] else True
        ok &= good
        print(f"  {g} {'visible  ' if visible[g] else 'invisible'} r2 {v['r2']:.3f} (p {v['p_r']:.1e})  "
              f"SMAPE {v['smape']:.3f} vs baseline {v['smape_baseline']:.3f} (Wilcoxon p {v['p_wilcoxon']:.1e})  "
              f"{'predictable' if v['predictable'] else '-'}")
    print(f"  predictable genes: {n_pred}/{len(wo)} ({100 * n_pred / len(wo):.0f}%)")
    report["predictable_fraction"] = n_pred / len(wo)
    print("well-omics convergence: mean r^2 of visible genes, mean |readout - final| vs fields imaged")
    vis_idx = [i for i, g in enumerate(genes) if visible[g]]
    for c in conv:
        print(f"  {c['fields']} fields: r2 {np.mean([c['r2_per_gene'][i] for i in vis_idx]):.3f}  "
              f"|d| {c['mean_abs_to_final']:.3f}")

    if args.diffusion_fields > 0:
        steps = [int(s) for s in args.diffusion_steps.split(",")]
        d = diffusion(args.truth, manifest, args.diffusion_fields, steps, args.binary)
        report["diffusion"] = d
        print(f"diffusion sampler on {args.diffusion_fields} held-out fields: Pearson r within cells, PSNR")
        for s, v in d.items():
            line = "  ".join(f"{p} r {x['pearson_r']:.3f} PSNR {x['psnr_db']:.1f} dB" for p, x in v.items()
                             if isinstance(x, dict))
            print(f"  {s:3d} steps ({v['seconds_per_field']:.1f} s/field for 4 proteins): {line}")

    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=float))
    print("all must-show thresholds met" if ok else "SOME THRESHOLDS NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
