"""Trains liveomics' reference models on a simulated plate and exports them as bioimage.io
model folders (ONNX weights at IR 9 / opset 17, description, test tensors) under models/.

    make train-env                       # jax (CPU) + optax into .venv-train (not part of make test)
    target/release/liveomics simulate --config models/train/train_plate.toml --out /tmp/train
    target/release/liveomics simulate --config models/train/calibration_plate.toml --out /tmp/calibration
    .venv-train/bin/python models/train/train.py --plate /tmp/train --calibration-plate /tmp/calibration

Everything is seeded (--seed); on one machine the same command writes the same weights. What each
model learns from is in models/README.md. Each export is checked against the jax function with
onnxruntime before its description is written.
"""

import argparse
import csv
import datetime
import hashlib
import json
import pathlib
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import optax
import tifffile

import nets

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUFFIX = ""
CALIBRATION = None  # the plate the chained per-cell model trains on (--calibration-plate)
LANDMARKS = ["DAPI", "Microtubules", "ER"]
VSTAIN_PROTEINS = ["CALR", "ATP1A1", "HNRNPA1"]
VSTAIN_WIDTH = 8  # channels of the U-Net's full-resolution level (then 2x, 4x, 8x)
VSTAIN_LEVELS = 3


def vstain_halo():
    """Output pixels a tile edge spoils: the effective receptive field, not the theoretical one
    (32 for three levels, 48 for four)."""
    return 16 * (VSTAIN_LEVELS - 1)


# Weight of the per-cell level term in the virtual-staining loss (the pixel term has weight 1).
VSTAIN_CELL_WEIGHT = 0.0
VSTAIN_LOG_INPUT = False
VSTAIN_MAX_WIDTH = None  # cap on the channels of the deeper levels (cost)
VSTAIN_LEVEL_LOSS = "asinh"  # per-cell level term: "asinh" (relative) or "linear" (as the pooled r weighs it)
DIFFUSION_PROTEINS = ["none", "TOMM20", "CALR", "ATP1A1", "HNRNPA1"]
# "none" (id 0) is the unconditioned cell line, as ProtiCelli's "none" protein label: a zero
# embedding added at export; the simulated line is id 1.
CELL_LINES = ["none", "sim-default"]
CROP = 96
TILE = 256
# Optimiser steps per network at --steps-scale 1 (about 75 min on 2 CPU cores in all).
STEPS = {"vstain": 5000, "autoencoder": 1500, "denoiser": 3000, "cellomics": 2000, "wellomics": 600,
         "cellprotein": 3000}
EDM = {"sigma_max": 80.0, "sigma_min": 0.002, "rho": 7.0, "steps": 50, "sigma_data": 0.5}


# ---- data ----------------------------------------------------------------------------------

class Plate:
    """A `liveomics simulate` folder in memory: landmark images, clean protein images, cells."""

    def __init__(self, folder, max_wells=None):
        folder = pathlib.Path(folder)
        self.manifest = json.loads((folder / "manifest.json").read_text())
        self.genes = [g["name"] for g in self.manifest["genes"]]
        self.translated = [p["name"] for p in self.manifest.get("translated_proteins", [])]
        self.visible = [g["visible"] for g in self.manifest["genes"]]
        self.proteins = [p["name"] for p in self.manifest["config"]["proteins"]]
        self.fields = []
        for well in self.manifest["wells"][:max_wells]:
            for f in range(self.manifest["fields_per_well"]):
                stem = f"{well}_f{f}_t0"
                self.fields.append({
                    "well": well, "field": f,
                    "landmarks": np.stack([tifffile.imread(folder / "images" / f"{stem}_{c}.tif") for c in LANDMARKS]),
                    "proteins": {p: tifffile.imread(folder / "truth" / f"{stem}_{p}_clean.tif") for p in self.proteins},
                    "cells_mask": tifffile.imread(folder / "truth" / f"{stem}_cells.tif"),
                    "cells": [],
                })
        index = {(d["well"], d["field"]): d for d in self.fields}
        with open(folder / "truth" / "cells.csv") as fh:
            for row in csv.DictReader(fh):
                d = index.get((row["well"], int(row["field"])))
                if d is None:
                    continue
                d["cells"].append((float(row["centroid_x"]), float(row["centroid_y"]),
                                   np.array([float(row[g]) for g in self.genes], np.float64),
                                   np.array([float(row[p]) for p in self.translated], np.float64)))
        stack = np.stack([d["landmarks"] for d in self.fields]).astype(np.float64)
        self.mean = stack.mean(axis=(0, 2, 3)).astype(np.float32)
        self.std = stack.std(axis=(0, 2, 3)).astype(np.float32)

    def norm(self, landmarks):
        return ((landmarks.astype(np.float32) - self.mean[:, None, None]) / self.std[:, None, None]).astype(np.float32)


def crop_gather(planes, centers, size):
    """numpy twin of kernels::cpu::crop_gather_u16: centre at size/2, zeros outside the image."""
    c, h, w = planes.shape
    out = np.zeros((len(centers), c, size, size), np.float32)
    for i, (cx, cy) in enumerate(centers):
        x0 = int(np.floor(cx + 0.5)) - size // 2
        y0 = int(np.floor(cy + 0.5)) - size // 2
        ys, xs = max(0, y0), max(0, x0)
        ye, xe = min(h, y0 + size), min(w, x0 + size)
        if ye > ys and xe > xs:
            out[i, :, ys - y0:ye - y0, xs - x0:xe - x0] = planes[:, ys:ye, xs:xe]
    return out


# ---- training loop and export checks --------------------------------------------------------

def fit(name, loss_fn, params, batches, steps, lr):
    sched = optax.cosine_decay_schedule(lr, steps, alpha=0.05)
    # Clipped: the simulated intensities are heavy-tailed (a few very bright cells per well).
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(sched))
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    key = jax.random.PRNGKey(zlib.crc32(name.encode()) % 2**31)  # not hash(): salted per process
    t0, recent = time.time(), []
    for i in range(steps):
        key, sub = jax.random.split(key)
        params, state, loss = step(params, state, next(batches), sub)
        recent.append(float(loss))
        if (i + 1) % max(1, steps // 10) == 0:
            print(f"  {name} step {i + 1}/{steps} loss {np.mean(recent):.4f} ({time.time() - t0:.0f} s)", flush=True)
            recent = []
    return params


def save_onnx(model, path, jax_fn, example):
    """Saves the ONNX model after checking onnxruntime reproduces the jax function on `example`."""
    onnx.checker.check_model(model)
    onnx.save(model, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    got = sess.run(None, dict(zip(names, example)))
    want = jax_fn(*example)
    for g, w in zip(got, want):
        err = float(np.max(np.abs(g - np.asarray(w))))
        assert err < 1e-3 * max(1.0, float(np.max(np.abs(w)))), f"{path.name}: onnx vs jax {err}"
    print(f"  {path.relative_to(ROOT)}: {path.stat().st_size / 1e6:.2f} MB, onnx vs jax max abs {err:.2e}")
    return got


def sha(path):
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def npy(folder, name, array):
    np.save(folder / name, np.ascontiguousarray(array, dtype=np.float32))
    return f"{{source: {name}, sha256: {sha(folder / name)}}}"


def header(name, description, tags):
    return f"""format_version: 0.5.4
type: model
name: {name}
description: {json.dumps(description)}
authors:
  - name: liveomics developers
cite:
  - text: "liveomics reference model, trained on the liveomics simulator (models/README.md)"
    url: https://github.com/liveomics/liveomics
license: MIT
documentation: README.md
tags: [{", ".join(tags)}]
timestamp: '{datetime.date(2026, 11, 21).isoformat()}T00:00:00+00:00'
"""


def fixed_zmuv(plate):
    return (f"      - id: fixed_zero_mean_unit_variance\n"
            f"        kwargs: {{axis: channel, mean: {[round(float(v), 4) for v in plate.mean]}, "
            f"std: {[round(float(v), 4) for v in plate.std]}}}\n")


def weights(source, extra=""):
    return f"""weights:
  onnx:
    source: {source}
    sha256: {sha(source)}
    opset_version: {nets.OPSET}
"""


def readme(folder, title, body):
    (folder / "README.md").write_text(
        f"# {title}\n\n{body}\n\nTrained by `models/train/train.py`; data, seed and held-out metrics: "
        "`models/README.md`.\n\n# Validation\n\nThe test tensors are reproduced by `liveomics models check` "
        "(Rust) and by Python onnxruntime (`tests/test_seed_models.py`); held-out accuracy is measured by "
        "`models/evaluate.py` on a plate simulated with a seed not used in training.\n")


def landmark_input(tensor_id, size, test_tensor):
    """The description's input block for raw landmark planes, y and x sized `size`."""
    return f"""  - id: {tensor_id}
    axes:
      - type: batch
      - type: channel
        channel_names: [{", ".join(LANDMARKS)}]
      - id: y
        type: space
        size: {size}
      - id: x
        type: space
        size: {size}
    test_tensor: {test_tensor}
"""


def norm_landmarks_for(plate, lm):
    """What fixed_zero_mean_unit_variance does to the raw landmark planes (rounded like the yaml)."""
    mean = np.array([round(float(v), 4) for v in plate.mean], np.float32)
    std = np.array([round(float(v), 4) for v in plate.std], np.float32)
    return (lm.astype(np.float32) - mean[:, None, None]) / std[:, None, None]


# ---- 1. direct virtual staining ------------------------------------------------------------

def train_vstain(plate, rng, steps):
    folder = ROOT / ("virtual_stain_unet" + SUFFIX)
    folder.mkdir(exist_ok=True)
    k = len(VSTAIN_PROTEINS)
    x_all = np.stack([plate.norm(d["landmarks"]) for d in plate.fields])
    y_all = np.stack([np.stack([d["proteins"][p] for p in VSTAIN_PROTEINS]) for d in plate.fields]) / 1000.0
    # Each protein in asinh(y / scale): the brightness of a protein spans decades across cells and
    # wells, and in linear units the brightest few would decide the loss (and one protein the
    # others). The exported network ends in sinh; the per-protein scale is the postprocessing.
    scale = np.array([np.percentile(y_all[:, c][y_all[:, c] > 0], 90) for c in range(k)], np.float32)
    y_all = np.arcsinh(y_all / scale[None, :, None, None]).astype(np.float32)
    size = 128
    masks = np.stack([d["cells_mask"] for d in plate.fields]).astype(np.int32)
    max_label = int(masks.max()) + 1

    def batches():
        while True:
            idx = rng.integers(0, len(x_all), 16)
            ys, xs = rng.integers(0, x_all.shape[2] - size, 16), rng.integers(0, x_all.shape[3] - size, 16)
            xb = np.stack([x_all[i, :, y:y + size, x:x + size] for i, y, x in zip(idx, ys, xs)])
            yb = np.stack([y_all[i, :, y:y + size, x:x + size] for i, y, x in zip(idx, ys, xs)])
            mb = np.stack([masks[i, y:y + size, x:x + size] for i, y, x in zip(idx, ys, xs)])
            flip = rng.integers(0, 2, 2)
            if flip[0]:
                xb, yb, mb = xb[..., ::-1], yb[..., ::-1], mb[..., ::-1]
            if flip[1]:
                xb, yb, mb = xb[..., ::-1, :], yb[..., ::-1, :], mb[..., ::-1, :]
            # One segment id per (patch, cell); background is segment 0 of every patch.
            seg = mb + max_label * np.arange(16)[:, None, None]
            yield jnp.asarray(xb.copy()), jnp.asarray(yb.copy()), jnp.asarray(seg.copy()), jnp.asarray(mb.copy() > 0)

    n_seg = 16 * max_label

    def loss(p, batch, key):
        # Pixels in asinh space, plus each cell's mean intensity (in linear units, compared in
        # asinh space): the level of a cell is what the evaluation's within-cell r is most
        # sensitive to, and a per-pixel loss only learns it indirectly.
        x, y, seg, inside = batch
        out = nets.unet(nets.J(p), x)[0]
        pixel = jnp.mean((out - y) ** 2)
        w = inside.astype(jnp.float32)[:, None]
        ids = jnp.broadcast_to(seg[:, None], out.shape).transpose(1, 0, 2, 3).reshape(k, -1)

        def cell_means(v):
            v = (v * w).transpose(1, 0, 2, 3).reshape(k, -1)
            return jax.vmap(lambda row, i: jax.ops.segment_sum(row, i, n_seg))(v, ids)

        count = jax.ops.segment_sum(w.reshape(-1), seg.reshape(-1), n_seg)
        pred_m = cell_means(jnp.sinh(jnp.clip(out, -8.0, 8.0))) / jnp.maximum(count, 1.0)
        true_m = cell_means(jnp.sinh(y)) / jnp.maximum(count, 1.0)
        if VSTAIN_LEVEL_LOSS == "linear":
            # Squared error of each cell's mean in linear units, relative to the batch's signal
            # per protein: bright cells weigh as much as they do in a pooled Pearson r.
            num = jnp.sum((pred_m - true_m) ** 2 * count, axis=1)
            den = jnp.sum(true_m**2 * count, axis=1) + 1e-6
            cell = jnp.mean(num / den)
        else:
            err = (jnp.arcsinh(pred_m) - jnp.arcsinh(true_m)) ** 2
            cell = jnp.sum(err * count) / jnp.maximum(k * jnp.sum(count), 1.0)
        return pixel + VSTAIN_CELL_WEIGHT * cell if VSTAIN_CELL_WEIGHT else pixel

    init = nets.unet_init(jax.random.PRNGKey(1), 6 if VSTAIN_LOG_INPUT else 3, k, VSTAIN_WIDTH, VSTAIN_LEVELS,
                          VSTAIN_MAX_WIDTH)
    if VSTAIN_LOG_INPUT:
        # asinh((raw - background) / (std / 10)) from the normalised input x = (raw - mean) / std:
        # background is each channel's 1st percentile, so the log-like range starts just above it.
        lm = np.stack([d["landmarks"] for d in plate.fields[:32]]).astype(np.float32)
        bg = np.percentile(lm, 1, axis=(0, 2, 3)).astype(np.float32)
        init["inlog"] = {"gain": jnp.full((3,), 10.0, jnp.float32),
                         "offset": jnp.asarray(10.0 * (plate.mean - bg) / plate.std, jnp.float32)}
    params = fit("virtual-stain", loss, init, batches(),
                 steps["vstain"], 1e-3)

    def linear(ops, x):
        return [ops.sinh(nets.unet(ops, x)[0])]

    model = nets.export(linear, params, [("landmarks", [None, 3, None, None])],
                        [("proteins", [None, k, None, None])], "liveomics direct virtual staining U-Net")
    d = plate.fields[0]
    test_in = d["landmarks"][None, :, :256, :256].astype(np.float32)
    example = [norm_landmarks_for(plate, test_in[0])[None]]
    out = save_onnx(model, folder / "weights.onnx", lambda x: linear(nets.J(params), jnp.asarray(x)), example)
    gain = [round(float(v) * 1000.0, 3) for v in scale]
    test_out = out[0] * np.array(gain, np.float32)[None, :, None, None]
    names = ", ".join(VSTAIN_PROTEINS)
    text = header("liveomics virtual staining U-Net",
                  "Landmark stains (DAPI, microtubules, ER) to noise-free images of proteins that were not stained.",
                  ["virtual-staining", "fluorescence", "2d", "liveomics"]) + "inputs:\n" + landmark_input(
        "landmarks", f"{{min: 128, step: {2 ** VSTAIN_LEVELS}}}", npy(folder, "test_input.npy", test_in)) + f"""    preprocessing:
{fixed_zmuv(plate)}outputs:
  - id: proteins
    axes:
      - type: batch
      - type: channel
        channel_names: [{names}]
      - id: y
        type: space
        size: {{tensor_id: landmarks, axis_id: y}}
        halo: {vstain_halo()}
      - id: x
        type: space
        size: {{tensor_id: landmarks, axis_id: x}}
        halo: {vstain_halo()}
    test_tensor: {npy(folder, "test_output.npy", test_out)}
    postprocessing:
      - id: scale_linear
        kwargs: {{axis: channel, gain: {gain}, offset: {[0.0] * k}}}
{weights(folder / "weights.onnx")}config:
  liveomics:
    role: virtual-stain
    channels: [{", ".join(LANDMARKS)}]
    outputs: [{names}]
"""
    (folder / "bioimageio.yaml").write_text(text.replace(str(folder) + "/", ""))
    readme(folder, "Direct virtual staining (U-Net)",
           f"Input: raw landmark planes {LANDMARKS}. Output: noise-free images of {VSTAIN_PROTEINS} in "
           "photoelectrons, one channel each. Fully convolutional (any size that is a multiple of "
           f"{2 ** VSTAIN_LEVELS}); halo {vstain_halo()}.")
    return params


# ---- 2. diffusion (ProtiCelli shape, tiny) -------------------------------------------------

def train_diffusion(plate, rng, steps):
    folder = ROOT / ("proticelli_tiny" + SUFFIX)
    folder.mkdir(exist_ok=True)
    x_all = np.stack([plate.norm(d["landmarks"]) for d in plate.fields])
    prot_names = DIFFUSION_PROTEINS[1:]
    # Protein images in asinh(photoelectrons / 1000): bright outliers compressed, so that the
    # latents have a bounded spread; the exported decoder ends in sinh.
    p_all = np.arcsinh(np.stack([np.stack([d["proteins"][p] for p in prot_names]) for d in plate.fields]) / 1000.0)
    p_all = p_all.astype(np.float32)
    n = len(plate.fields)

    # Autoencoder on single-channel patches of every landmark and protein.
    def ae_batches(size=64, b=32):
        while True:
            idx = rng.integers(0, n, b)
            ch = rng.integers(0, 3 + len(prot_names), b)
            ys, xs = rng.integers(0, 512 - size, b), rng.integers(0, 512 - size, b)
            out = np.stack([(x_all[i, c] if c < 3 else p_all[i, c - 3])[y:y + size, x:x + size]
                            for i, c, y, x in zip(idx, ch, ys, xs)])[:, None]
            yield jnp.asarray(out)

    def ae_loss(p, x, key):
        ops = nets.J(p)
        return jnp.mean((nets.decoder(ops, nets.encoder(ops, x)[0])[0] - x) ** 2)

    ae = fit("autoencoder", ae_loss, nets.ae_init(jax.random.PRNGKey(2)), ae_batches(), steps["autoencoder"], 2e-3)
    enc = jax.jit(lambda x: nets.encoder(nets.J(ae), x)[0])
    # Latent scale so that latents have std sigma_data (folded into the encoder and decoder weights).
    sample = np.concatenate([np.asarray(enc(jnp.asarray(p_all[i:i + 4, :, :256, :256].reshape(-1, 1, 256, 256))))
                             for i in range(0, min(n, 64), 4)])
    scale = EDM["sigma_data"] / float(sample.std())
    ae["enc4"] = {"w": ae["enc4"]["w"] * scale, "b": ae["enc4"]["b"] * scale}
    ae["dec1"] = {"w": ae["dec1"]["w"] / scale, "b": ae["dec1"]["b"]}
    enc = jax.jit(lambda x: nets.encoder(nets.J(ae), x)[0])

    size = 128
    lat = size // 4

    def den_batches(b=32):
        while True:
            idx = rng.integers(0, n, b)
            ys, xs = rng.integers(0, 512 - size, b), rng.integers(0, 512 - size, b)
            pr = rng.integers(0, len(prot_names), b)
            lm = np.stack([x_all[i, :, y:y + size, x:x + size] for i, y, x in zip(idx, ys, xs)])
            tg = np.stack([p_all[i, k, y:y + size, x:x + size] for i, k, y, x in zip(idx, pr, ys, xs)])[:, None]
            z_lm = np.asarray(enc(jnp.asarray(lm.reshape(-1, 1, size, size)))).reshape(b, 3 * nets.LATENT, lat, lat)
            z_p = np.asarray(enc(jnp.asarray(tg)))
            yield (jnp.asarray(z_p), jnp.asarray(z_lm), jnp.asarray((pr + 1).astype(np.float32)),
                   jnp.zeros((b,), jnp.float32))

    def den_loss(p, batch, key):
        y, lm, pid, line = batch
        k1, k2 = jax.random.split(key)
        # EDM's log-normal noise levels, half of them replaced by log-uniform ones over the whole
        # sampling schedule: the sampler starts at sigma_max, far in the log-normal's tail.
        k1, k3, k4 = jax.random.split(k1, 3)
        lognormal = -1.2 + 1.2 * jax.random.normal(k1, (y.shape[0],))
        uniform = jax.random.uniform(k3, (y.shape[0],), minval=np.log(EDM["sigma_min"]),
                                     maxval=np.log(EDM["sigma_max"]))
        sigma = jnp.exp(jnp.where(jax.random.bernoulli(k4, 0.5, (y.shape[0],)), uniform, lognormal))
        noisy = y + sigma[:, None, None, None] * jax.random.normal(k2, y.shape)
        d = nets.denoiser(nets.J(p), noisy, sigma, lm, pid, line, EDM["sigma_data"])[0]
        sd = EDM["sigma_data"]
        weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
        return jnp.mean(weight[:, None, None, None] * (d - y) ** 2)

    den = fit("denoiser", den_loss,
              nets.denoiser_init(jax.random.PRNGKey(3), 3 * nets.LATENT, len(DIFFUSION_PROTEINS), len(CELL_LINES) - 1),
              den_batches(), steps["denoiser"], 1e-3)
    den["line"] = jnp.concatenate([jnp.zeros_like(den["line"][:1]), den["line"]])

    enc_model = nets.export(lambda o, x: nets.encoder(o, x, groups=3), ae, [("landmarks", [None, 3, None, None])],
                            [("latent", [None, 3 * nets.LATENT, None, None])], "liveomics tiny encoder")
    dec_model = nets.export(lambda o, z: nets.decoder(o, z, sinh=True), ae, [("latent", [None, nets.LATENT, None, None])],
                            [("image", [None, 1, None, None])], "liveomics tiny decoder")
    den_model = nets.export(lambda o, *a: nets.denoiser(o, *a, sigma_data=EDM["sigma_data"]), den,
                            [("noisy", [None, nets.LATENT, None, None]), ("sigma", [None]),
                             ("landmarks", [None, 3 * nets.LATENT, None, None]), ("protein", [None]),
                             ("cell_line", [None])],
                            [("denoised", [None, nets.LATENT, None, None])], "liveomics tiny EDM denoiser")
    d = plate.fields[0]
    raw = d["landmarks"][None, :, :128, :128].astype(np.float32)
    lm_norm = norm_landmarks_for(plate, raw[0])[None]
    z_lm = save_onnx(enc_model, folder / "encoder.onnx",
                     lambda x: [nets.encoder(nets.J(ae), jnp.asarray(x), groups=3)[0]], [lm_norm])[0]
    noisy = np.random.default_rng(5).standard_normal((1, nets.LATENT, 32, 32)).astype(np.float32)
    den_in = [noisy, np.array([2.5], np.float32), z_lm, np.array([1.0], np.float32), np.array([1.0], np.float32)]
    den_out = save_onnx(den_model, folder / "weights.onnx",
                        lambda *a: nets.denoiser(nets.J(den), *[jnp.asarray(v) for v in a],
                                                 sigma_data=EDM["sigma_data"]), den_in)[0]
    dec_out = save_onnx(dec_model, folder / "decoder.onnx",
                        lambda z: nets.decoder(nets.J(ae), jnp.asarray(z), sinh=True), [den_out])[0]
    np.save(folder / "test_encoder_input.npy", raw)
    np.save(folder / "test_encoder_output.npy", z_lm)
    np.save(folder / "test_decoder_output.npy", dec_out * 1000.0)
    ins = [("noisy", f"[batch, channel{nets.LATENT}, y, x]"), ("sigma", "[batch]"),
           ("landmarks", f"[batch, channel{3 * nets.LATENT}, y, x]"), ("protein", "[batch]"),
           ("cell_line", "[batch]")]
    axes = {
        "noisy": [("channel", nets.LATENT)], "landmarks": [("channel", 3 * nets.LATENT)],
    }
    inputs = ""
    for (name, _), value in zip(ins, den_in):
        inputs += f"  - id: {name}\n    axes:\n      - type: batch\n"
        if name in axes:
            inputs += (f"      - type: channel\n        channel_names: [{', '.join(f'{name}{i}' for i in range(axes[name][0][1]))}]\n"
                       "      - id: y\n        type: space\n        size: {min: 8, step: 2}\n"
                       "      - id: x\n        type: space\n        size: {min: 8, step: 2}\n")
        inputs += f"    test_tensor: {npy(folder, f'test_{name}.npy', value)}\n"
    text = header("liveomics tiny ProtiCelli-style latent diffusion",
                  "Landmark latents condition an EDM denoiser that samples one protein image per run (Euler, "
                  "ProtiCelli's schedule); encoder and decoder are a tiny autoencoder.",
                  ["virtual-staining", "diffusion", "2d", "liveomics"]) + "inputs:\n" + inputs + f"""outputs:
  - id: denoised
    axes:
      - type: batch
      - type: channel
        channel_names: [{', '.join(f'z{i}' for i in range(nets.LATENT))}]
      - id: y
        type: space
        size: {{tensor_id: noisy, axis_id: y}}
      - id: x
        type: space
        size: {{tensor_id: noisy, axis_id: x}}
    test_tensor: {npy(folder, "test_denoised.npy", den_out)}
{weights(folder / "weights.onnx")}config:
  liveomics:
    role: virtual-stain-diffusion
    channels: [{", ".join(LANDMARKS)}]
    outputs: [{", ".join(prot_names)}]
    proteins: [{", ".join(DIFFUSION_PROTEINS)}]
    cell_lines: [{", ".join(CELL_LINES)}]
    downsample: 4
    sampler: {{sigma_max: {EDM["sigma_max"]}, sigma_min: {EDM["sigma_min"]}, rho: {EDM["rho"]}, \
steps: {EDM["steps"]}, sigma_data: {EDM["sigma_data"]}}}
    components:
      encoder:
        source: encoder.onnx
        sha256: {sha(folder / "encoder.onnx")}
        test_input: test_encoder_input.npy
        test_output: test_encoder_output.npy
        mean: {[round(float(v), 4) for v in plate.mean]}
        std: {[round(float(v), 4) for v in plate.std]}
      decoder:
        source: decoder.onnx
        sha256: {sha(folder / "decoder.onnx")}
        test_input: test_denoised.npy
        test_output: test_decoder_output.npy
        gain: 1000.0
"""
    (folder / "bioimageio.yaml").write_text(text.replace(str(folder) + "/", ""))
    readme(folder, "Tiny ProtiCelli-style latent diffusion",
           "Three ONNX components, ProtiCelli's inference shape: `encoder.onnx` (landmarks, normalised, to a "
           "stacked latent at 1/4, each landmark encoded alone), `weights.onnx` (the EDM-preconditioned denoiser: "
           "noisy latent, sigma, landmark latent, protein id, cell-line id; ids as float32) and `decoder.onnx` "
           "(latent to a protein image, times `gain` for photoelectrons). Sampling is the daemon's job.")


# ---- 3. cell-omics -------------------------------------------------------------------------

def gene_stats(plate):
    logs = np.log(np.concatenate([[c[2] for c in d["cells"]] for d in plate.fields if d["cells"]]))
    return logs.mean(axis=0), logs.std(axis=0)


def train_cellomics(plate, rng, steps):
    folder = ROOT / ("cell_omics_cnn" + SUFFIX)
    folder.mkdir(exist_ok=True)
    crops, targets = [], []
    mu, sd = gene_stats(plate)
    for d in plate.fields:
        if not d["cells"]:
            continue
        centers = [(c[0], c[1]) for c in d["cells"]]
        crops.append(crop_gather(d["landmarks"].astype(np.float32), centers, CROP))
        targets.append((np.log(np.stack([c[2] for c in d["cells"]])) - mu) / sd)
    crops = np.concatenate(crops)
    crops = (crops - plate.mean[None, :, None, None]) / plate.std[None, :, None, None]
    targets = np.concatenate(targets).astype(np.float32)
    print(f"  cell-omics: {len(crops)} cells")

    def batches(b=64):
        while True:
            idx = rng.integers(0, len(crops), b)
            x = crops[idx]
            if rng.integers(0, 2):
                x = x[..., ::-1]
            x = np.rot90(x, rng.integers(0, 4), axes=(2, 3))
            yield jnp.asarray(x.copy()), jnp.asarray(targets[idx])

    def loss(p, batch, key):
        x, y = batch
        return jnp.mean((nets.cellnet(nets.J(p), x)[0] - y) ** 2)

    g = len(plate.genes)
    params = fit("cell-omics", loss, nets.cellnet_init(jax.random.PRNGKey(4), 3, g), batches(), steps["cellomics"], 2e-3)
    model = nets.export(nets.cellnet, params, [("crops", [None, 3, CROP, CROP])], [("abundance", [None, g])],
                        "liveomics per-cell abundance CNN")
    d = next(d for d in plate.fields if len(d["cells"]) >= 8)
    raw = crop_gather(d["landmarks"].astype(np.float32), [(c[0], c[1]) for c in d["cells"][:8]], CROP)
    example = [np.stack([norm_landmarks_for(plate, r) for r in raw])]
    out = save_onnx(model, folder / "weights.onnx", lambda x: nets.cellnet(nets.J(params), jnp.asarray(x)), example)
    test_out = out[0] * sd.astype(np.float32) + mu.astype(np.float32)
    genes = ", ".join(plate.genes)
    text = header("liveomics per-cell abundance CNN",
                  "A 96 px crop around each segmented cell to the log abundance of each gene.",
                  ["image-to-omics", "single-cell", "2d", "liveomics"]) + "inputs:\n" + landmark_input(
        "crops", CROP, npy(folder, "test_input.npy", raw)) + f"""    preprocessing:
{fixed_zmuv(plate)}outputs:
  - id: abundance
    axes:
      - type: batch
      - type: channel
        channel_names: [{genes}]
    test_tensor: {npy(folder, "test_output.npy", test_out)}
    postprocessing:
      - id: scale_linear
        kwargs: {{axis: channel, gain: {[round(float(v), 6) for v in sd]}, offset: {[round(float(v), 6) for v in mu]}}}
{weights(folder / "weights.onnx")}config:
  liveomics:
    role: cell-omics
    channels: [{", ".join(LANDMARKS)}]
    outputs: [{genes}]
    crop_size: {CROP}
"""
    (folder / "bioimageio.yaml").write_text(text.replace(str(folder) + "/", ""))
    readme(folder, "Per-cell abundance CNN",
           f"Input: {CROP} px crops of {LANDMARKS} centred on each cell (the kernels' crop gather). Output: natural "
           f"log of the abundance of {g} genes ({genes}).")


# ---- 5. per-cell RNA -> protein (scProSpatial shape), chained on cell-omics ---------------------

def description_values(folder, key):
    """The list after `key:` in a description we wrote (bioimageio.yaml), e.g. a normalisation's
    mean: what the daemon will apply, read back rather than recomputed."""
    import re
    text = (folder / "bioimageio.yaml").read_text()
    m = re.search(rf"{key}: \[([^\]]*)\]", text)
    return np.array([float(v) for v in m.group(1).split(",")], np.float32)


def cellomics_predictions(plate):
    """The committed cell-omics model's ln abundances for every cell of the plate (crops at the
    true centroids), exactly as the daemon computes them: its description's normalisation,
    the ONNX weights, its output scaling."""
    folder = ROOT / "cell_omics_cnn"
    mean, std = description_values(folder, "mean"), description_values(folder, "std")
    gain, offset = description_values(folder, "gain"), description_values(folder, "offset")
    sess = ort.InferenceSession(str(folder / "weights.onnx"), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    preds = []
    for d in plate.fields:
        if not d["cells"]:
            continue
        crops = crop_gather(d["landmarks"].astype(np.float32), [(c[0], c[1]) for c in d["cells"]], CROP)
        crops = (crops - mean[None, :, None, None]) / std[None, :, None, None]
        preds.append(sess.run(None, {name: crops.astype(np.float32)})[0] * gain + offset)
    return np.concatenate(preds)


def train_cellprotein(plate, rng, steps):
    """Trained on the calibration plate (`--calibration-plate`), not the training plate: the
    cell-omics model's predictions for cells it was trained on are better than for any new cell."""
    plate = CALIBRATION or plate
    if not plate.translated:
        raise SystemExit("cell-protein: the plate has no translated proteins (translated_proteins in its config)")
    folder = ROOT / ("cell_protein_mlp" + SUFFIX)
    folder.mkdir(exist_ok=True)
    x_raw = cellomics_predictions(plate).astype(np.float32)
    y_log = np.log(np.concatenate([np.stack([c[3] for c in d["cells"]]) for d in plate.fields if d["cells"]]))
    x_mu, x_sd = x_raw.mean(axis=0), x_raw.std(axis=0)
    y_mu, y_sd = y_log.mean(axis=0), y_log.std(axis=0)
    x = ((x_raw - x_mu) / x_sd).astype(np.float32)
    y = ((y_log - y_mu) / y_sd).astype(np.float32)
    print(f"  cell-protein: {len(x)} cells, {x.shape[1]} predicted transcripts -> {y.shape[1]} proteins")

    def batches(b=256):
        while True:
            idx = rng.integers(0, len(x), b)
            yield jnp.asarray(x[idx]), jnp.asarray(y[idx])

    def loss(p, batch, key):
        xb, yb = batch
        return jnp.mean((nets.tablenet(nets.J(p), xb)[0] - yb) ** 2)

    g, k = x.shape[1], y.shape[1]
    params = fit("cell-protein", loss, nets.tablenet_init(jax.random.PRNGKey(5), g, k), batches(),
                 steps["cellprotein"], 3e-3)
    model = nets.export(nets.tablenet, params, [("transcripts", [None, g])], [("abundance", [None, k])],
                        "liveomics per-cell RNA to protein")
    raw = x_raw[:8]
    example = [((raw - x_mu) / x_sd).astype(np.float32)]
    out = save_onnx(model, folder / "weights.onnx", lambda v: nets.tablenet(nets.J(params), jnp.asarray(v)), example)
    test_out = out[0] * y_sd.astype(np.float32) + y_mu.astype(np.float32)
    genes, proteins = ", ".join(plate.genes), ", ".join(plate.translated)
    columns = ", ".join(f"cellomics.{g}" for g in plate.genes)
    text = header("liveomics per-cell RNA to protein",
                  "Each cell's predicted ln transcript abundances (cell-omics outputs) to the ln abundance of "
                  "proteins that were never imaged.",
                  ["omics-to-omics", "single-cell", "liveomics"]) + f"""inputs:
  - id: transcripts
    axes:
      - type: batch
      - type: channel
        channel_names: [{genes}]
    test_tensor: {npy(folder, "test_input.npy", raw)}
    preprocessing:
      - id: fixed_zero_mean_unit_variance
        kwargs: {{axis: channel, mean: {[round(float(v), 6) for v in x_mu]}, std: {[round(float(v), 6) for v in x_sd]}}}
outputs:
  - id: abundance
    axes:
      - type: batch
      - type: channel
        channel_names: [{proteins}]
    test_tensor: {npy(folder, "test_output.npy", test_out)}
    postprocessing:
      - id: scale_linear
        kwargs: {{axis: channel, gain: {[round(float(v), 6) for v in y_sd]}, offset: {[round(float(v), 6) for v in y_mu]}}}
{weights(folder / "weights.onnx")}config:
  liveomics:
    role: cell-table
    columns: [{columns}]
    outputs: [{proteins}]
"""
    (folder / "bioimageio.yaml").write_text(text.replace(str(folder) + "/", ""))
    readme(folder, "Per-cell RNA to protein",
           f"Input: per cell, the ln abundance of {g} genes ({genes}) as the `cell_omics_cnn` model named "
           f"`cellomics` predicts them (the per-cell table's `cellomics.*` columns). Output: the natural log of "
           f"the abundance of {k} proteins ({proteins}) that are never imaged. Trained on the cell-omics model's "
           "predictions for the training plate's cells, so it weighs each transcript by how well the images "
           "reveal it.")


# ---- 4. well-omics (Image2Omics shape) -----------------------------------------------------

def train_wellomics(plate, rng, steps):
    folder = ROOT / ("well_omics_mil" + SUFFIX)
    folder.mkdir(exist_ok=True)
    tiles, tile_cells, tile_well = [], [], []
    wells = sorted({d["well"] for d in plate.fields})
    for d in plate.fields:
        x = plate.norm(d["landmarks"])
        for ty in range(0, x.shape[1] - TILE + 1, TILE):
            for tx in range(0, x.shape[2] - TILE + 1, TILE):
                tiles.append(x[:, ty:ty + TILE, tx:tx + TILE])
                tile_cells.append(np.array([c[2] for c in d["cells"]
                                            if tx <= c[0] < tx + TILE and ty <= c[1] < ty + TILE] or
                                           np.zeros((0, len(plate.genes)))))
                tile_well.append(wells.index(d["well"]))
    tiles = np.stack(tiles)
    tile_well = np.array(tile_well)
    by_well = [np.flatnonzero(tile_well == w) for w in range(len(wells))]
    all_bulk = np.log(np.stack([np.concatenate([tile_cells[i] for i in ix]).mean(axis=0) for ix in by_well]))
    mu, sd = all_bulk.mean(axis=0), all_bulk.std(axis=0)
    bag = 8

    def batches(b=8):
        while True:
            xs, ys, ms = [], [], []
            for w in rng.integers(0, len(wells), b):
                k = int(rng.integers(1, min(bag, len(by_well[w])) + 1))
                pick = rng.choice(by_well[w], k, replace=False)
                cells = np.concatenate([tile_cells[i] for i in pick])
                if len(cells) == 0:
                    cells = np.concatenate([tile_cells[i] for i in by_well[w]])
                x = tiles[pick]
                x = np.rot90(x, rng.integers(0, 4), axes=(2, 3))
                pad = np.zeros((bag,) + x.shape[1:], np.float32)
                pad[:k] = x
                m = np.zeros(bag, np.float32)
                m[:k] = 1
                xs.append(pad)
                ms.append(m)
                ys.append((np.log(cells.mean(axis=0)) - mu) / sd)
            yield jnp.asarray(np.stack(xs)), jnp.asarray(np.stack(ms)), jnp.asarray(np.stack(ys).astype(np.float32))

    def loss(p, batch, key):
        x, m, y = batch
        b = x.shape[0]
        ops = nets.J(p)
        f = nets.tile_encoder(ops, x.reshape((b * bag,) + x.shape[2:]))[0].reshape(b, bag, -1)
        pooled = (f * m[:, :, None]).sum(axis=1) / m.sum(axis=1, keepdims=True)
        return jnp.mean((nets.well_head(ops, pooled)[0] - y) ** 2)

    g = len(plate.genes)
    params = fit("well-omics", loss, nets.tilenet_init(jax.random.PRNGKey(5), 3, g), batches(), steps["wellomics"], 1e-3)
    enc_model = nets.export(nets.tile_encoder, params, [("tiles", [None, 3, TILE, TILE])],
                            [("features", [None, nets.FEATURES])], "liveomics well-omics tile encoder")
    head_params = dict(params)
    head_params["h2"] = {"w": params["h2"]["w"] * sd[None, :].astype(np.float32),
                         "b": params["h2"]["b"] * sd.astype(np.float32) + mu.astype(np.float32)}
    head_model = nets.export(nets.well_head, head_params, [("features", [None, nets.FEATURES])],
                             [("abundance", [None, g])], "liveomics well-omics head")
    d = plate.fields[0]
    raw = np.stack([d["landmarks"][:, :TILE, :TILE], d["landmarks"][:, TILE:, TILE:]]).astype(np.float32)
    example = [np.stack([norm_landmarks_for(plate, r) for r in raw])]
    feats = save_onnx(enc_model, folder / "weights.onnx",
                      lambda x: nets.tile_encoder(nets.J(params), jnp.asarray(x)), example)[0]
    pooled = feats.mean(axis=0, keepdims=True)
    head_out = save_onnx(head_model, folder / "head.onnx",
                         lambda f: nets.well_head(nets.J(head_params), jnp.asarray(f)), [pooled])[0]
    np.save(folder / "test_head_input.npy", pooled)
    np.save(folder / "test_head_output.npy", head_out)
    genes = ", ".join(plate.genes)
    text = header("liveomics well-omics MIL",
                  "Image2Omics shape: a tile encoder to a feature vector, features pooled per well, a head to the "
                  "log bulk abundance of each gene in the well.",
                  ["image-to-omics", "bulk", "2d", "liveomics"]) + "inputs:\n" + landmark_input(
        "tiles", TILE, npy(folder, "test_input.npy", raw)) + f"""    preprocessing:
{fixed_zmuv(plate)}outputs:
  - id: features
    axes:
      - type: batch
      - type: channel
        channel_names: [{", ".join(f"f{i}" for i in range(nets.FEATURES))}]
    test_tensor: {npy(folder, "test_output.npy", feats)}
{weights(folder / "weights.onnx")}config:
  liveomics:
    role: well-omics
    channels: [{", ".join(LANDMARKS)}]
    outputs: [{genes}]
    pooling: mean
    components:
      head:
        source: head.onnx
        sha256: {sha(folder / "head.onnx")}
        test_input: test_head_input.npy
        test_output: test_head_output.npy
"""
    (folder / "bioimageio.yaml").write_text(text.replace(str(folder) + "/", ""))
    readme(folder, "Well-omics MIL (Image2Omics shape)",
           f"`weights.onnx`: {TILE} px tiles of {LANDMARKS} to {nets.FEATURES} features. Features of every tile of "
           f"every field of a well are mean-pooled; `head.onnx` maps the pooled vector to the natural log of the "
           f"bulk abundance of {g} genes ({genes}).")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plate", required=True, help="a `liveomics simulate` folder (models/train/train_plate.toml)")
    ap.add_argument("--only", default="vstain,diffusion,cellomics,wellomics,cellprotein")
    ap.add_argument("--calibration-plate", help="a `liveomics simulate` folder of models/train/calibration_plate.toml "
                    "(cellprotein trains on it; default: --plate)")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiplies every network's step count")
    ap.add_argument("--seed", type=int, default=20261121)
    ap.add_argument("--max-wells", type=int, help="train on the first N wells only (smoke runs)")
    ap.add_argument("--vstain-width", type=int, default=VSTAIN_WIDTH)
    ap.add_argument("--vstain-levels", type=int, default=VSTAIN_LEVELS)
    ap.add_argument("--vstain-log-input", type=int, default=int(VSTAIN_LOG_INPUT))
    ap.add_argument("--vstain-max-width", type=int, default=VSTAIN_MAX_WIDTH)
    ap.add_argument("--vstain-level-loss", choices=["asinh", "linear"], default=VSTAIN_LEVEL_LOSS)
    ap.add_argument("--vstain-cell-weight", type=float, default=VSTAIN_CELL_WEIGHT)
    ap.add_argument("--out-suffix", default="", help="write model folders as NAME+SUFFIX (experiments)")
    args = ap.parse_args()
    globals()["VSTAIN_WIDTH"] = args.vstain_width
    globals()["VSTAIN_LEVELS"] = args.vstain_levels
    globals()["VSTAIN_LOG_INPUT"] = bool(args.vstain_log_input)
    globals()["VSTAIN_MAX_WIDTH"] = args.vstain_max_width
    globals()["VSTAIN_LEVEL_LOSS"] = args.vstain_level_loss
    globals()["VSTAIN_CELL_WEIGHT"] = args.vstain_cell_weight
    globals()["SUFFIX"] = args.out_suffix
    plate = Plate(args.plate, args.max_wells)
    if args.calibration_plate and "cellprotein" in args.only.split(","):
        globals()["CALIBRATION"] = Plate(args.calibration_plate, args.max_wells)
    print(f"plate {args.plate}: {len(plate.fields)} fields")
    for name, fn in [("vstain", train_vstain), ("diffusion", train_diffusion), ("cellomics", train_cellomics),
                     ("wellomics", train_wellomics), ("cellprotein", train_cellprotein)]:
        if name in args.only.split(","):
            t0 = time.time()
            print(f"{name}:", flush=True)
            steps = {k: max(1, round(v * args.steps_scale)) for k, v in STEPS.items()}
            fn(plate, np.random.default_rng([args.seed, len(name)]), steps)
            print(f"{name}: {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
