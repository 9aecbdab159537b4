"""Accuracy of `liveomics segment` on real annotated nuclei (DSB2018 `img2d`, 125 nuclei; fetched
by `tests/real_data.py`), over the settings a user can give it: nucleus diameter and threshold
method (local, the default, or one global otsu/triangle). With scikit-image installed
(benches/requirements.txt) the same classical pipeline in scikit-image (segment_bench.py's, one
Otsu threshold) is scored on the same image, in the same script.

    .venv/bin/python tests/real_data.py && .venv/bin/python benches/real_nuclei.py
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from liveomics_testkit import BIN, ap  # noqa: E402

REAL = ROOT / ".cache" / "real-data"


def main():
    img, truth = REAL / "dsb2018_img2d.tif", tifffile.imread(REAL / "dsb2018_mask2d.tif")
    print(f"DSB2018 img2d: {len(np.unique(truth)) - 1} annotated nuclei; AP one-to-one at IoU > tau")
    print(f"{'method':<28} {'objects':>7} {'AP@0.5':>7} {'AP@0.7':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for diameter in (None, 5, 7, 9, 11, 13):
            for threshold in ("local", "otsu", "triangle"):
                if diameter is None and threshold == "triangle":
                    continue
                out = Path(tmp) / "l.tif"
                args = [str(BIN), "segment", str(img), "--out", str(out), "--device", "cpu", "--method", "classical",
                        "--threshold", threshold]
                if diameter is not None:
                    args += ["--diameter-um", str(diameter)]
                subprocess.run(args, check=True, capture_output=True)
                lab = tifffile.imread(out)
                name = f"classical default {threshold}" if diameter is None else f"classical d={diameter} {threshold}"
                print(f"{name:<28} {lab.max():>7} {ap(lab, truth, 0.5):>7.3f} {ap(lab, truth, 0.7):>7.3f}")
    try:
        from segment_bench import params, skimage_nuclei
    except ImportError as e:
        print(f"scikit-image baseline skipped: {e}")
        return
    image = tifffile.imread(img)
    for diameter in (7, 9, 11, 13):
        lab = skimage_nuclei(image, params(float(diameter), 0.65))
        print(f"{f'scikit-image d={diameter} otsu':<28} {lab.max():>7} {ap(lab, truth, 0.5):>7.3f} {ap(lab, truth, 0.7):>7.3f}")


if __name__ == "__main__":
    main()
