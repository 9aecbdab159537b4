"""The model runtime from the outside: `liveomics models check/predict` against Python
onnxruntime, and the daemon's inference stage writing per-cell predictions that Python
recomputes from the written images."""

import warnings

import anndata
import numpy as np
import onnxruntime as ort
import pytest
import zarr

from liveomics_testkit import ROOT, daemon_config, daemon_toml, inference_config, merged, run, sim_config, toml_text

FIXTURES = ROOT / "models" / "fixtures"
SHARED_UNET = ROOT.parent / "shared" / "models" / "unet2d_nuclei_broad"


def shipped_models():
    """Every model folder the project ships (fixtures and reference models), plus the shared
    third-party U-Net when ../shared is there."""
    found = sorted(p.parent for p in (ROOT / "models").rglob("bioimageio.yaml"))
    if SHARED_UNET.exists():
        found.append(SHARED_UNET)
    return found


def test_models_check_passes_and_fails_honestly(binary):
    paths = [FIXTURES / "fcn", FIXTURES / "cellnet"]
    if SHARED_UNET.exists():
        paths.append(SHARED_UNET)
    p = run(binary, "models", "check", "--providers", "cpu", *paths)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("PASS") == len(paths)
    assert "provider cpu" in p.stdout and "max abs error" in p.stdout
    bad = run(binary, "models", "check", "--providers", "cpu", FIXTURES / "sqrt", FIXTURES / "fcn")
    assert bad.returncode == 1
    assert "FAIL" in bad.stdout and "non-finite" in bad.stdout and "PASS" in bad.stdout
    missing = run(binary, "models", "check", "--providers", "cpu", FIXTURES / "nope")
    assert missing.returncode == 1 and "cannot read" in missing.stdout


def random_input(sess: ort.InferenceSession, rng) -> np.ndarray:
    dims = []
    for d in sess.get_inputs()[0].shape:
        dims.append(d if isinstance(d, int) and d > 0 else 2 if not dims else 64)
    return (rng.random(dims) * 4 - 1).astype(np.float32)


@pytest.mark.parametrize("model", shipped_models(), ids=lambda p: p.name)
def test_rust_equals_python_onnxruntime(binary, tmp_path, model):
    if model.name == "sqrt":
        pytest.skip("sqrt is the NaN fixture: its output is NaN by design")
    sess = ort.InferenceSession(str(model / "weights.onnx"), providers=["CPUExecutionProvider"])
    if len(sess.get_inputs()) > 1:
        pytest.skip("multi-input model (the diffusion denoiser): test_seed_models checks it against Python")
    x = random_input(sess, np.random.default_rng(5))
    np.save(tmp_path / "x.npy", x)
    p = run(binary, "models", "predict", model, "--raw", "--providers", "cpu",
            "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy")
    assert p.returncode == 0, p.stderr
    want = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    got = np.load(tmp_path / "y.npy")
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5


def zmuv(x, axes):
    return (x - x.mean(axis=axes, keepdims=True)) / (x.std(axis=axes, keepdims=True) + 1e-6)


def crops(image: np.ndarray, centers, size: int) -> np.ndarray:
    """The daemon's crop convention: centre pixel at size//2, zero outside the image."""
    c, h, w = image.shape
    out = np.zeros((len(centers), c, size, size), np.float32)
    for i, (x, y) in enumerate(centers):
        x0, y0 = int(np.round(x)) - size // 2, int(np.round(y)) - size // 2
        ys, xs = slice(max(y0, 0), min(y0 + size, h)), slice(max(x0, 0), min(x0 + size, w))
        out[i, :, ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0] = image[:, ys, xs]
    return out


def test_daemon_writes_per_cell_predictions_python_reproduces(binary, tmp_path):
    cfg = tmp_path / "c.toml"
    sim = sim_config(plate="inf", wells=("B2", "C3"), fields=2, size=400, seed=11)
    models = inference_config(("cellnet", FIXTURES / "cellnet"), ("fg", FIXTURES / "fcn"), workers=2, max_batch=16)
    cfg.write_text(daemon_toml(tmp_path / "out", "inftest", None, sim, zenoh_enabled=False, extra=models))
    p = run(binary, "run", "--config", cfg)
    assert p.returncode == 0, p.stderr[-3000:]
    sess = ort.InferenceSession(str(FIXTURES / "cellnet" / "weights.onnx"), providers=["CPUExecutionProvider"])
    plate = tmp_path / "out" / "inf.zarr"
    checked = 0
    for well in ("B/2", "C/3"):
        for field in ("0", "1"):
            path = plate / well / field
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                a = anndata.read_zarr(path / "tables" / "table")
            cols = [f"cellnet.GENE{k}" for k in range(5)]
            assert set(cols) <= set(a.obs.columns), a.obs.columns
            img = zarr.open_array(path / "0", mode="r")[:]
            img = img.reshape((-1,) + img.shape[-2:])[:2].astype(np.float32)  # DAPI, Microtubules
            x = crops(img, list(zip(a.obs["centroid_x_px"], a.obs["centroid_y_px"])), 32)
            want = sess.run(None, {"crops": zmuv(x, (2, 3)).astype(np.float32)})[0] * 2 + 1
            got = a.obs[cols].to_numpy()
            assert got.shape == want.shape and len(got) > 10
            assert np.abs(got - want).max() <= 1e-4
            checked += len(got)
    assert checked > 40


def test_bad_model_config_is_reported_with_its_key(binary, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
[pipeline]
stages = ["segment", "measure", "inference"]
[inference]
providers = ["cpu", "gpu"]
[[inference.models]]
name = "cellnet"
path = "{FIXTURES / 'cellnet'}"
channels = ["DAPI", "Phalloidin"]
[[inference.models]]
name = "bad name"
path = "{tmp_path / 'missing'}"
""")
    p = run(binary, "validate", cfg)
    assert p.returncode == 2
    for needle in ("inference.providers[1]", "inference.models[0].channels", "Phalloidin", "inference.models[1].name"):
        assert needle in p.stderr, p.stderr


def test_model_failing_at_run_time_leaves_raw_data_and_segmentation(binary, tmp_path):
    """A model whose output is NaN on real fields: each field is still written whole, the failure
    is logged and counted, the other models keep running."""
    broken = tmp_path / "nan_model"
    broken.mkdir()
    for f in (FIXTURES / "sqrt").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    y = (broken / "bioimageio.yaml").read_text()
    y = y.replace("    test_tensor: {source: test_input.npy",
                  "    preprocessing:\n      - id: scale_linear\n        kwargs: {gain: -1.0}\n"
                  "    test_tensor: {source: test_input.npy", 1)
    (broken / "bioimageio.yaml").write_text(y)
    cfg = tmp_path / "c.toml"
    sim = sim_config(plate="nan", wells=("B2",), fields=2, size=256, seed=2)
    models = inference_config(("nan", broken, {"role": "segmentation"}), ("cellnet", FIXTURES / "cellnet"))
    cfg.write_text(daemon_toml(tmp_path / "out", "nantest", None, sim, zenoh_enabled=False, extra=models))
    p = run(binary, "run", "--config", cfg)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stderr.count("model failed") == 2 and "non-finite" in p.stderr
    for field in ("0", "1"):
        path = tmp_path / "out" / "nan.zarr" / "B" / "2" / field
        assert zarr.open_array(path / "0", mode="r").shape[-2:] == (256, 256)
        assert (zarr.open_array(path / "labels" / "cells" / "0", mode="r")[:] > 0).any()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = anndata.read_zarr(path / "tables" / "table")
        assert "cellnet.GENE0" in a.obs.columns and np.isfinite(a.obs["cellnet.GENE0"]).all()


def test_live_well_table_example_prints_predictions(binary, tmp_path):
    """docs/examples/live_well_table.py, run as a user would, against a daemon running a per-cell
    model; per-well readouts are also published on liveomics/{instrument}/wells/{plate}/{well}."""
    import json as _json
    import subprocess
    import sys

    import zenoh as _zenoh

    from liveomics_testkit import free_port

    port, port2 = free_port(), free_port()
    example = subprocess.Popen([sys.executable, str(ROOT / "docs" / "examples" / "live_well_table.py"),
                                "--instrument", "livetest", "--listen", f"tcp/127.0.0.1:{port}", "--fields", "4"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert example.stdout.readline().strip() == "listening"
    wells = []
    conf = _zenoh.Config()
    conf.insert_json5("listen/endpoints", _json.dumps([f"tcp/127.0.0.1:{port2}"]))
    conf.insert_json5("scouting/multicast/enabled", "false")
    watcher = _zenoh.open(conf)
    watcher.declare_subscriber("liveomics/livetest/wells/live/*", lambda s: wells.append(_json.loads(s.payload.to_bytes())))
    cfg = tmp_path / "c.toml"
    sim = sim_config(plate="live", wells=("B2", "C3"), fields=2, size=256, seed=5, rate=2.0)
    connect = {"zenoh": {"connect": [f"tcp/127.0.0.1:{port}", f"tcp/127.0.0.1:{port2}"]}}
    models = inference_config(("cellnet", FIXTURES / "cellnet"))
    cfg.write_text(toml_text(merged(merged(merged(sim, daemon_config(tmp_path / "out", "livetest", None)), connect),
                                    models)))
    p = run(binary, "run", "--config", cfg)
    assert p.returncode == 0, p.stderr[-3000:]
    out, err = example.communicate(timeout=60)
    watcher.close()
    assert example.returncode == 0, err
    last = out.strip().split("after 4 fields")[-1]
    assert "B2" in last and "C3" in last and "cellnet.GENE0" in last, out
    assert len(wells) == 4 and {w["well"] for w in wells} == {"B2", "C3"}
    assert {"fields", "cells", "mean_cell_area_px", "predictions"} <= set(wells[-1])
    assert max(w["fields"] for w in wells) == 2 and "cellnet.GENE0" in wells[-1]["predictions"]
