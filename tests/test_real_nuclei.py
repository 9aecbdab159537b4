"""Segmentation accuracy on real annotated fluorescence nuclei, not the simulator: the DSB2018
image StarDist ships in its PyPI wheel (512x512, 125 nuclei; `tests/real_data.py` fetches it into
`.cache/real-data`, `make test` runs that first). AP is StarDist's (one-to-one at IoU > tau).

The floors are regression guards a little under what was measured (docs/BENCHMARKS.md, "Nuclei
segmentation on real annotated images"): the default (InstanSeg, nuclei measured by the classical
path) holds the 0.80 at AP@0.5 issue 18 asks for; raise them as segmentation improves. This image
also chose the classical path's local threshold (issue 18 Build 4), so its classical figures are
not an independent measure."""

import numpy as np
import pytest
import tifffile
from liveomics_testkit import ROOT, ap, run

REAL = ROOT / ".cache" / "real-data"


@pytest.fixture(scope="module")
def dsb2018():
    img, mask = REAL / "dsb2018_img2d.tif", REAL / "dsb2018_mask2d.tif"
    if not (img.exists() and mask.exists()):
        pytest.skip("skipped: no real data in .cache/real-data (run `make real-data`)")
    return img, tifffile.imread(mask)


def test_stardist_ap_counts_matches_misses_and_false_objects():
    truth = np.zeros((20, 20), np.uint16)
    truth[2:8, 2:8], truth[10:16, 10:16] = 1, 2
    assert ap(truth, truth, 0.5) == 1.0
    pred = np.zeros_like(truth)
    pred[2:8, 2:8] = 5  # one match under another id
    pred[17:19, 0:2] = 6  # one false object; truth 2 is missed
    assert ap(pred, truth, 0.5) == pytest.approx(1 / 3)
    shifted = np.zeros_like(truth)
    shifted[4:10, 2:8] = 1  # IoU 24/48 = 0.5: not a match at tau 0.5
    assert ap(shifted, truth, 0.5) == 0.0


# The image has no pixel size. 0.46 um is the one at which the default 11 um nucleus is the
# annotation's median nucleus (23.7 px): what a user who knew the microscope would pass.
@pytest.mark.parametrize("name,args,method,floor50,floor70", [
    ("default", [], "instanseg", 0.80, 0.60),
    ("pixel size given", ["--pixel-size-um", 0.46], "instanseg", 0.80, 0.60),
    ("classical", ["--method", "classical"], "classical", 0.80, 0.65),
    ("classical, pixel size given", ["--method", "classical", "--pixel-size-um", 0.46], "classical", 0.70, 0.52),
    ("classical, one otsu threshold", ["--method", "classical", "--threshold", "otsu"], "classical", 0.55, 0.32),
])
def test_segment_on_real_dsb2018_nuclei(binary, tmp_path, dsb2018, name, args, method, floor50, floor70):
    img, truth = dsb2018
    out = tmp_path / "labels.tif"
    p = run(binary, "segment", img, "--out", out, "--device", "cpu", *args)
    assert p.returncode == 0, p.stderr
    assert f"({method})" in p.stdout, p.stdout
    labels = tifffile.imread(out)
    assert labels.shape == truth.shape
    a50, a70 = ap(labels, truth, 0.5), ap(labels, truth, 0.7)
    print(f"DSB2018 img2d, `liveomics segment` {name} ({method}): {labels.max()} objects, "
          f"AP@0.5 {a50:.3f}, AP@0.7 {a70:.3f}")
    assert a50 >= floor50 and a70 >= floor70, (a50, a70)
