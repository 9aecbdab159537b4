"""The reference models (models/README.md) from the outside: their descriptions pass
bioimageio.spec, Rust reproduces their Python-onnxruntime test tensors, the diffusion sampler
equals a Python reference of the same EDM Euler schedule, and the daemon writes virtual channels,
per-cell predictions and live per-well readouts."""

import json
import re
import subprocess
import threading
import time
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import yaml
import zarr
import zenoh

from liveomics_testkit import ROOT, daemon_toml, free_port, inference_config, run, sim_config
from test_inference import crops

MODELS = ROOT / "models"
REFERENCE = ["virtual_stain_unet", "proticelli_tiny", "cell_omics_cnn", "well_omics_mil", "cell_protein_mlp"]
LANDMARKS = ["DAPI", "Microtubules", "ER"]
# The simulated cell line the reference models were trained on (models/train/*.toml).
SIM = {"gene_seed": 7, "proteins": [
    {"name": "TOMM20", "localization": "mitochondria"},
    {"name": "CALR", "localization": "er"},
    {"name": "ATP1A1", "localization": "membrane"},
    {"name": "HNRNPA1", "localization": "nuclear"},
]}


# Every description liveomics ships: the reference models and the converted third-party ones.
SHIPPED = sorted(p.parent.name for p in MODELS.glob("*/bioimageio.yaml"))
BIOIMAGEIO_PY = ROOT / ".venv-bioimageio" / "bin" / "python"


def test_every_shipped_model_is_checked():
    assert {*REFERENCE, "instanseg_fluorescence"} <= set(SHIPPED), SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_description_passes_bioimageio_spec(name):
    """With file checks, and offline as here: a description must not need GitHub to validate."""
    from bioimageio.spec import load_description

    d = load_description(MODELS / name / "bioimageio.yaml", perform_io_checks=True)
    assert d.validation_summary.status in ("passed", "valid-format"), d.validation_summary.format()


def test_bioimageio_core_reproduces_every_description():
    """bioimage.io's own runtime (bioimageio.core's test_description, in its own venv) loads each
    description's weights and reproduces its test tensors, as any bioimage.io tool would."""
    if not BIOIMAGEIO_PY.exists():
        pytest.skip("skipped: no .venv-bioimageio (run `make bioimageio`)")
    paths = [MODELS / n / "bioimageio.yaml" for n in SHIPPED]
    p = subprocess.run([BIOIMAGEIO_PY, ROOT / "tests" / "bioimageio_core_check.py", *paths],
                       capture_output=True, text=True, timeout=900)
    results = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(SHIPPED), p.stdout + p.stderr[-3000:]
    failed = [r for r in results if not r["passed"]]
    assert not failed and p.returncode == 0, json.dumps(failed, indent=1)
    assert all(r["core"] == "passed" for r in results), results


def test_models_check_reproduces_python_test_tensors(binary):
    """The test outputs were computed with Python onnxruntime (models/train/train.py); `models
    check` runs the main weights and every component in Rust and must match them to 1e-5 of the
    model's largest expected value. Relative, because float32 rounding grows with the values and
    the CPU's kernels: the U-Net's outputs reach 5200, and Python onnxruntime itself differs from
    the committed tensors by 4e-3 there on an AMD EPYC without AVX-512."""
    out = ""
    for n in REFERENCE:
        scale = max(float(np.abs(np.load(f)).max()) for f in (MODELS / n).glob("test_*.npy")
                    if "output" in f.name or f.name == "test_denoised.npy")
        p = run(binary, "models", "check", "--providers", "cpu", "--runs", "1", "--tolerance",
                f"{1e-5 * max(1.0, scale):.3e}", MODELS / n)
        assert p.returncode == 0 and p.stdout.count("PASS") == 1, p.stdout + p.stderr
        out += p.stdout
    for component in ("encoder", "decoder", "head"):
        assert re.search(rf"{component} \d\.\d+e-?\d+", out), out


# The third-party InstanSeg conversion is the one large model in git (its network is 20 MB).
THIRD_PARTY = {"instanseg_fluorescence": 25 * 2**20}


def test_reference_models_are_small_and_loadable_by_ir9_runtimes():
    import onnx

    total, third_party = 0, dict.fromkeys(THIRD_PARTY, 0)
    for f in [*MODELS.glob("*/*.onnx"), *MODELS.glob("*/*.npy")]:
        if f.parent.name == "fixtures":
            continue
        if f.suffix == ".onnx":
            m = onnx.load(f)
            assert m.ir_version <= 13 and all(o.version <= 21 for o in m.opset_import), f
        if f.parent.name in third_party:
            third_party[f.parent.name] += f.stat().st_size
        else:
            total += f.stat().st_size
    assert 0 < total <= 10 * 2**20, total
    for name, size in third_party.items():
        assert 0 < size <= THIRD_PARTY[name], (name, size)


def edm_sigmas(smax, smin, rho, steps):
    i = np.arange(steps, dtype=np.float64)
    s = (smax ** (1 / rho) + i / (steps - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return np.append(s, 0.0)


def python_sampler(folder, landmarks, proteins, steps, noise):
    """The reference: ProtiCelli's Euler sampler over the EDM schedule, written from the paper's
    description with onnxruntime, independent of the Rust code."""
    cfg = yaml.safe_load((folder / "bioimageio.yaml").read_text())["config"]["liveomics"]
    comp, sam = cfg["components"], cfg["sampler"]
    cpu = ["CPUExecutionProvider"]
    enc = ort.InferenceSession(str(folder / comp["encoder"]["source"]), providers=cpu)
    den = ort.InferenceSession(str(folder / "weights.onnx"), providers=cpu)
    dec = ort.InferenceSession(str(folder / comp["decoder"]["source"]), providers=cpu)
    mean = np.array(comp["encoder"]["mean"], np.float32)[None, :, None, None]
    std = np.array(comp["encoder"]["std"], np.float32)[None, :, None, None]
    cond = enc.run(None, {enc.get_inputs()[0].name: (landmarks - mean) / std})[0]
    b = len(proteins)
    cond = np.repeat(cond, b, axis=0)
    ids = np.array([cfg["proteins"].index(p) for p in proteins], np.float32)
    line = np.float32(next(i for i, c in enumerate(cfg["cell_lines"]) if c != "none"))
    sig = edm_sigmas(sam["sigma_max"], sam["sigma_min"], sam["rho"], steps)
    x = noise * np.float32(sig[0])
    names = [i.name for i in den.get_inputs()]
    for s, nxt in zip(sig[:-1], sig[1:]):
        feed = [x, np.full(b, s, np.float32), cond, ids, np.full(b, line, np.float32)]
        d = den.run(None, dict(zip(names, feed)))[0]
        x = x + (x - d) * np.float32((nxt - s) / s)
    img = dec.run(None, {dec.get_inputs()[0].name: x})[0] * np.float32(comp["decoder"]["gain"])
    return img[:, 0]


def test_diffusion_sampler_equals_python_reference(binary, tmp_path):
    folder = MODELS / "proticelli_tiny"
    raw = np.load(folder / "test_encoder_input.npy")  # [1, 3, 128, 128] raw landmarks
    cfg = yaml.safe_load((folder / "bioimageio.yaml").read_text())["config"]["liveomics"]
    proteins, steps = ["TOMM20", "CALR"], 12
    down = cfg["downsample"]
    noise = np.random.default_rng(3).standard_normal(
        (len(proteins), 4, raw.shape[2] // down, raw.shape[3] // down)).astype(np.float32)
    np.save(tmp_path / "lm.npy", raw)
    np.save(tmp_path / "noise.npy", noise)
    p = run(binary, "models", "sample", folder, "--landmarks", tmp_path / "lm.npy", "--proteins",
            ",".join(proteins), "--steps", steps, "--noise", tmp_path / "noise.npy", "--providers", "cpu",
            "--output", tmp_path / "y.npy")
    assert p.returncode == 0, p.stderr
    got = np.load(tmp_path / "y.npy")
    want = python_sampler(folder, raw, proteins, steps, noise)
    assert got.shape == want.shape == (2, 128, 128)
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(got - want).max() <= 1e-4 * scale, np.abs(got - want).max()
    # Different proteins from the same noise and landmarks are different images.
    assert np.abs(got[0] - got[1]).mean() > 1.0


def seed_models_config(panel=("TOMM20",), steps=4, budget=200):
    return inference_config(
        ("vstain", MODELS / "virtual_stain_unet"),
        ("cellomics", MODELS / "cell_omics_cnn"),
        ("wellomics", MODELS / "well_omics_mil"),
        ("diffusion", MODELS / "proticelli_tiny",
         {"panel": list(panel), "steps": steps, "max_protein_steps_per_field": budget}),
        workers=2,
    )


def test_daemon_writes_virtual_channels_cell_predictions_and_live_well_readouts(binary, tmp_path):
    port = free_port()
    wells = ("B2", "B3", "C4")
    cfg = daemon_toml(tmp_path / "out", "seedtest", port, sim_config(plate="seeds", wells=wells, fields=2, extra=SIM),
                      extra=seed_models_config())
    (tmp_path / "c.toml").write_text(cfg)
    v = run(binary, "validate", tmp_path / "c.toml")
    assert v.returncode == 0, v.stdout + v.stderr

    conf = zenoh.Config()
    conf.insert_json5("listen/endpoints", json.dumps([f"tcp/127.0.0.1:{port}"]))
    conf.insert_json5("scouting/multicast/enabled", "false")
    got = []
    lock = threading.Lock()

    def on(sample):
        with lock:
            got.append(json.loads(bytes(sample.payload.to_bytes())))

    with zenoh.open(conf) as session:
        sub = session.declare_subscriber("liveomics/seedtest/wells/seeds/*", on)
        p = run(binary, "run", "--config", tmp_path / "c.toml", timeout=600)
        time.sleep(0.5)
        sub.undeclare()
    out, err = p.stdout, p.stderr
    assert p.returncode == 0, err
    # The end-of-run summary prints the plate readout.
    assert "plate readout (wellomics" in out, out
    for w in wells:
        assert re.search(rf"^\s+{w}\s+2\s", out, re.M), out

    plate = zarr.open_group(tmp_path / "out" / "seeds.zarr", mode="r")
    from ome_zarr_models.v05.hcs import HCS

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HCS.from_zarr(plate)
    img = plate["B/3/0"]
    labels = [c["label"] for c in img.attrs["ome"]["omero"]["channels"]]
    assert labels[:7] == LANDMARKS + ["TOMM20", "CALR", "ATP1A1", "HNRNPA1"]
    assert labels[7:] == ["CALR (virtual)", "ATP1A1 (virtual)", "HNRNPA1 (virtual)", "TOMM20 (virtual diffusion)"]
    raw = np.asarray(img["0"])
    assert raw.shape[0] == 11
    truth_like = raw[4].astype(float)  # acquired CALR
    virtual = raw[7].astype(float)
    assert virtual.max() > 100 and np.corrcoef(truth_like.ravel(), virtual.ravel())[0, 1] > 0.5
    assert raw[10].max() > 0  # the diffusion sample was written

    import anndata

    a = anndata.read_zarr(tmp_path / "out" / "seeds.zarr" / "B" / "3" / "0" / "tables" / "table")
    genes = [f"cellomics.G{i:03d}" for i in range(1, 17)]
    assert set(genes) <= set(a.obs.columns)
    assert np.isfinite(a.obs[genes].to_numpy()).all() and a.n_obs > 5
    assert list(a.var_names) == genes and a.X.shape == (a.n_obs, 16)
    assert np.array_equal(np.asarray(a.X), a.obs[genes].to_numpy())
    # The model's fixed zero-mean/unit-variance runs inside the crop gather; Python onnxruntime
    # on crops of the written raw channels, preprocessed as a whole batch, gives the same values.
    descr = yaml.safe_load((MODELS / "cell_omics_cnn" / "bioimageio.yaml").read_text())
    pre = descr["inputs"][0]["preprocessing"][0]["kwargs"]
    post = descr["outputs"][0]["postprocessing"][0]["kwargs"]
    centers = [(np.floor(x + 0.5), np.floor(y + 0.5)) for x, y in zip(a.obs["centroid_x_px"], a.obs["centroid_y_px"])]
    x = crops(raw[:3].astype(np.float32), centers, 96)
    x = (x - np.float32(pre["mean"])[None, :, None, None]) / np.float32(pre["std"])[None, :, None, None]
    sess = ort.InferenceSession(str(MODELS / "cell_omics_cnn" / "weights.onnx"), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"crops": x.astype(np.float32)})[0] * np.float32(post["gain"]) + np.float32(post["offset"])
    assert np.abs(a.obs[genes].to_numpy() - want).max() <= 1e-4

    # Per-well readouts: after every field, with the field count and a spread.
    by_well = {}
    for m in got:
        b = m["bulk"]["wellomics"]
        by_well.setdefault(m["well"], []).append(b["fields"])
        assert len(b["values"]) == len(b["spread"]) == len(b["outputs"]) == 16
    assert set(by_well) == set(wells), by_well
    for w, counts in by_well.items():
        # One message per field; a message never carries fewer fields than an earlier one.
        assert len(counts) == 2 and counts == sorted(counts) and counts[-1] == 2, (w, counts)
    well_attrs = plate["C/4"].attrs["liveomics"]["bulk"]["wellomics"]
    assert well_attrs["fields"] == 2 and len(well_attrs["history"]) == 2
    assert all(s >= 0 for s in well_attrs["spread"]) and any(s > 0 for s in well_attrs["spread"])


@pytest.mark.parametrize(
    "models, key, message",
    [
        (seed_models_config(panel=("TOMM20", "GFP")), "inference.models[3].panel", "GFP not in the vocabulary"),
        (seed_models_config(panel=("TOMM20", "CALR"), steps=50, budget=60), "inference.models[3].panel",
         "2 proteins x 50 steps = 100 denoiser runs per field, above max_protein_steps_per_field = 60"),
    ],
)
def test_panel_problems_are_config_errors(binary, tmp_path, models, key, message):
    cfg = daemon_toml(tmp_path / "out", "bad", None, sim_config(extra=SIM), zenoh_enabled=False, extra=models)
    (tmp_path / "c.toml").write_text(cfg)
    p = run(binary, "validate", tmp_path / "c.toml")
    assert p.returncode == 2, p.stdout + p.stderr
    assert key in p.stderr and message in p.stderr, p.stderr


def test_crop_size_the_model_does_not_accept_is_a_config_error(binary, tmp_path):
    """A copy of the cell-omics description that asks for 64 px crops of its 96 px input."""
    folder = tmp_path / "cellomics64"
    folder.mkdir()
    for f in (MODELS / "cell_omics_cnn").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    y = (folder / "bioimageio.yaml").read_text().replace("crop_size: 96", "crop_size: 64")
    (folder / "bioimageio.yaml").write_text(y)
    cfg = daemon_toml(tmp_path / "out", "bad", None, sim_config(extra=SIM), zenoh_enabled=False,
                      extra=inference_config(("cells", folder)))
    (tmp_path / "c.toml").write_text(cfg)
    p = run(binary, "validate", tmp_path / "c.toml")
    assert p.returncode == 2 and "inference.models[0]" in p.stderr and "crop_size 64" in p.stderr, p.stderr


@pytest.mark.parametrize("name", ["models.toml", "diffusion.toml", "overload.toml", "relocalization.toml",
                                  "translation.toml"])
def test_a_repo_config_runs_from_any_directory(binary, tmp_path, name):
    """Model paths in a config file resolve against its folder, not the working directory."""
    p = run(binary, "validate", ROOT / "config" / name, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
