"""Nuclei segmentation speed and accuracy: liveomics vs scikit-image doing the same pipeline
(percentile normalisation, Gaussian, Otsu, exact distance transform, peak markers, watershed,
size filter, regionprops) with the same parameters on the same simulated images, in one script;
and liveomics' default local foreground (background surface and per-nucleus thresholds, in place
of the one Otsu threshold) on the same images, for what it costs.

    .venv/bin/pip install -r benches/requirements.txt
    .venv/bin/python benches/segment_bench.py [--sizes 512 2160] [--fields 2] [--repeat 3]

Images come from `liveomics simulate` (held-out seed, default density: about 1000 nuclei on a
2160^2 field at 0.65 um/px); accuracy is AP@0.5 / AP@0.7 against the simulator's true labels.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi
from skimage import feature, filters, measure, segmentation

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from liveomics_testkit import ap  # noqa: E402

BIN = ROOT / "target" / "release" / "liveomics"


def params(diameter_um, pixel_um):
    d = diameter_um / pixel_um
    area = np.pi * (d / 2) ** 2
    return dict(
        sigma=float(np.clip(d / 12, 0.5, 4.0)),
        seed_radius=max(int(round(d / 3)), 1),
        min_depth=max(d / 8, 1.0),
        min_area=max(round(area * 0.15), 4),
        min_area_at_border=max(round(area * 0.02), 4),
        max_area=round(area * 8),
    )


def skimage_nuclei(img, p):
    lo, hi = np.percentile(img, (0.5, 99.95))
    norm = np.clip((img.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1)
    smooth = filters.gaussian(norm, p["sigma"], preserve_range=True)
    mask = smooth > filters.threshold_otsu(smooth)
    dist = filters.gaussian(ndi.distance_transform_edt(mask), 1.0, preserve_range=True)
    components, _ = ndi.label(mask)
    peaks = feature.peak_local_max(dist, min_distance=p["seed_radius"], threshold_abs=p["min_depth"],
                                   labels=components, exclude_border=False)
    markers = np.zeros(img.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = segmentation.watershed(-dist, markers, mask=mask)
    sizes = np.bincount(labels.ravel())
    # Objects cut by the image border are held to a smaller floor (as liveomics does).
    border = np.zeros(len(sizes), bool)
    border[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = True
    bad = (sizes < np.where(border, p["min_area_at_border"], p["min_area"])) | (sizes > p["max_area"])
    bad[0] = False
    labels[bad[labels]] = 0
    props = measure.regionprops(labels, intensity_image=img)
    for r in props:
        r.area, r.centroid, r.bbox, r.intensity_mean
    return labels


def main():
    ap_ = argparse.ArgumentParser()
    ap_.add_argument("--sizes", type=int, nargs="+", default=[512, 2160])
    ap_.add_argument("--fields", type=int, default=2)
    ap_.add_argument("--repeat", type=int, default=3)
    ap_.add_argument("--seed", type=int, default=4242)
    ap_.add_argument("--device", default="cpu", help="liveomics' back end: cpu, auto or cuda:N")
    ap_.add_argument("--binary", type=Path, default=BIN,
                     help="the liveomics binary (on a device machine: the one carried there)")
    args = ap_.parse_args()
    p = params(11.0, 0.65)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size in args.sizes:
            d = tmp / str(size)
            cfg = d / "c.toml"
            d.mkdir()
            cfg.write_text(f"""[source.simulator]
seed = {args.seed}
plate = "bench"
wells = ["B2"]
control_wells = ["B2"]
fields_per_well = {args.fields}
width_px = {size}
height_px = {size}
rate_fields_per_s = 0.0
""")
            subprocess.run([args.binary, "simulate", "--config", cfg, "--out", d / "sim"], check=True, capture_output=True)
            files = sorted((d / "sim" / "images").glob("*_DAPI.tif"))
            runs = {}
            for threshold in ("otsu", "local"):
                (d / threshold).mkdir()
                out = subprocess.run([args.binary, "bench-segment", "--out-dir", d / threshold, "--repeat",
                                      str(args.repeat), "--device", args.device, "--threshold", threshold, *files],
                                     check=True, capture_output=True, text=True).stdout
                runs[threshold] = {r["file"]: r for r in map(json.loads, out.splitlines())}
            ours, local = runs["otsu"], runs["local"]
            for f in files:
                img = tifffile.imread(f)
                truth = tifffile.imread(d / "sim" / "truth" / f.name.replace("_DAPI.tif", "_nuclei.tif"))
                times = []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    sk = skimage_nuclei(img, p)
                    times.append((time.perf_counter() - t0) * 1e3)
                lo = tifffile.imread(d / "otsu" / f.name)
                ll = tifffile.imread(d / "local" / f.name)
                rows.append(dict(size=size, file=f.name, nuclei_true=int(truth.max()),
                                 ours_ms=ours[f.name]["best_ms"], skimage_ms=min(times),
                                 local_ms=local[f.name]["best_ms"],
                                 ours_ap50=ap(lo, truth, 0.5), ours_ap70=ap(lo, truth, 0.7),
                                 sk_ap50=ap(sk, truth, 0.5), sk_ap70=ap(sk, truth, 0.7),
                                 local_ap50=ap(ll, truth, 0.5), local_ap70=ap(ll, truth, 0.7)))
    print(f"liveomics ran on: {next(iter(ours.values()))['device'] if rows else args.device}")
    print("same pipeline (one Otsu threshold) on both sides; 'local': liveomics' default foreground")
    print(f"{'size':>5} {'nuclei':>6} {'liveomics ms':>12} {'skimage ms':>10} {'speedup':>7}  "
          f"{'AP@0.5 ours/sk':>15} {'AP@0.7 ours/sk':>15} {'local ms':>9} {'AP@0.5/0.7 local':>17}")
    for r in rows:
        print(f"{r['size']:>5} {r['nuclei_true']:>6} {r['ours_ms']:>12.1f} {r['skimage_ms']:>10.1f} "
              f"{r['skimage_ms'] / r['ours_ms']:>6.1f}x  {r['ours_ap50']:.3f}/{r['sk_ap50']:.3f}     "
              f"{r['ours_ap70']:.3f}/{r['sk_ap70']:.3f}     {r['local_ms']:>9.1f} "
              f"{r['local_ap50']:.3f}/{r['local_ap70']:.3f}")
    for size in args.sizes:
        rs = [r for r in rows if r["size"] == size]
        print(f"{size}^2: liveomics is {sum(r['skimage_ms'] for r in rs) / sum(r['ours_ms'] for r in rs):.1f}x "
              f"faster than scikit-image over {len(rs)} fields")


if __name__ == "__main__":
    main()
