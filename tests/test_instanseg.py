"""InstanSeg (models/instanseg_fluorescence: the network in ONNX Runtime, the post-processing in
Rust) as the segment method: on the simulator's fields beside the classical path, in the daemon
with its config checked, and the fallback to the classical path when ONNX Runtime is missing.
Its accuracy on real nuclei is in test_real_nuclei.py, its parity with the TorchScript original
in daemon/tests/it/instanseg.rs."""

import numpy as np
import pytest
import tifffile
import zarr
from liveomics_testkit import ROOT, ap, daemon_toml, run, sim_config, simulated_field

MODEL = ROOT / "models" / "instanseg_fluorescence"


@pytest.fixture(scope="module")
def field(binary, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("iseg")
    img, truth = simulated_field(binary, tmp)
    tifffile.imwrite(tmp / "in.tif", np.stack([img["DAPI"], img["ER"]]))
    return tmp / "in.tif", truth


def test_instanseg_nuclei_and_propagated_cells_on_a_simulated_field(binary, field, tmp_path):
    src, truth = field
    p = run(binary, "segment", src, "--out", tmp_path / "n.tif", "--cells-out", tmp_path / "c.tif",
            "--cells-channel", 1, "--pixel-size-um", 0.65, "--device", "cpu")
    assert p.returncode == 0, p.stderr
    assert "(instanseg)" in p.stdout and "segmentation runs InstanSeg" in p.stderr
    nuclei, cells = tifffile.imread(tmp_path / "n.tif"), tifffile.imread(tmp_path / "c.tif")
    a = {k: (ap(v, truth[k], 0.5), ap(v, truth[k], 0.7)) for k, v in (("nuclei", nuclei), ("cells", cells))}
    print(f"simulated field, InstanSeg: nuclei AP@0.5/0.7 {a['nuclei']}, propagated cells {a['cells']}")
    assert a["nuclei"][0] >= 0.95 and a["nuclei"][1] >= 0.9
    assert a["cells"][0] >= 0.9
    # A cell has its nucleus's label.
    inside = (nuclei > 0) & (cells > 0)
    assert (nuclei[inside] == cells[inside]).mean() > 0.99


def test_the_models_own_cells_on_request(binary, field, tmp_path):
    src, truth = field
    p = run(binary, "segment", src, "--out", tmp_path / "n.tif", "--cells-out", tmp_path / "c.tif",
            "--cells-channel", 1, "--pixel-size-um", 0.65, "--instanseg-cells", "model", "--device", "cpu")
    assert p.returncode == 0, p.stderr
    nuclei, cells = tifffile.imread(tmp_path / "n.tif"), tifffile.imread(tmp_path / "c.tif")
    # Every nucleus lies inside the cell of the same label (InstanSeg's resolution step).
    inside = nuclei > 0
    assert inside.any() and (cells[inside] == nuclei[inside]).all()
    print(f"simulated field, InstanSeg's own cells: AP@0.5 {ap(cells, truth['cells'], 0.5):.3f} "
          "(the model was trained on membrane markers, not ER)")


@pytest.mark.parametrize("case", ["tiny", "zero", "saturated", "some_nan", "all_nan"])
def test_bad_images_give_a_valid_label_image_and_a_reason(binary, tmp_path, case):
    """Images a microscope or a converter can produce: smaller than the network's tile, empty,
    saturated, with NaN holes or nothing finite. Each gives a label image of the input's shape
    (empty where there is nothing to find) and says why in the log, through InstanSeg."""
    rng = np.random.default_rng(3)
    img = {
        "tiny": (rng.random((8, 8)) * 1000).astype(np.uint16),
        "zero": np.zeros((256, 256), np.uint16),
        "saturated": np.full((256, 256), 65535, np.uint16),
        "some_nan": (rng.random((256, 256)) * 1000).astype(np.float32),
        "all_nan": np.full((256, 256), np.nan, np.float32),
    }[case]
    if case == "some_nan":
        img[10:60, 10:60] = np.nan
    tifffile.imwrite(tmp_path / "in.tif", img)
    p = run(binary, "segment", tmp_path / "in.tif", "--out", tmp_path / "n.tif", "--method", "instanseg",
            "--pixel-size-um", 0.5, "--device", "cpu")
    assert p.returncode == 0, p.stderr
    assert "segmentation runs InstanSeg" in p.stderr
    labels = tifffile.imread(tmp_path / "n.tif")
    assert labels.shape == img.shape and labels.dtype.kind == "u"
    if case in ("zero", "saturated", "all_nan"):
        assert labels.max() == 0
        assert "no nuclei found" in p.stderr, p.stderr
    if case.endswith("nan"):
        assert "NaN or infinite pixel(s) treated as background" in p.stderr, p.stderr
        assert (labels[img != img] == 0).all()


def test_explicit_instanseg_without_a_model_is_a_usage_error(binary, field, tmp_path):
    src, _ = field
    p = run(binary, "segment", src, "--out", tmp_path / "n.tif", "--method", "instanseg",
            "--model", tmp_path / "nowhere")
    assert p.returncode == 2 and "no model at" in p.stderr, p.stderr
    assert not (tmp_path / "n.tif").exists()


def test_daemon_runs_instanseg_and_writes_its_labels(binary, tmp_path):
    out = tmp_path / "out"
    cfg = tmp_path / "c.toml"
    cfg.write_text(daemon_toml(out, "iseg", None, sim_config(plate="iseg", wells=("B2",), fields=1, size=256, seed=5),
                               zenoh_enabled=False,
                               extra={"segmentation": {"method": "instanseg", "model": str(MODEL)},
                                      "inference": {"providers": ["cpu"]}}))
    p = run(binary, "run", "--config", cfg)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "segmentation runs InstanSeg" in p.stderr
    nuclei = zarr.open_array(out / "iseg.zarr" / "B" / "2" / "0" / "labels" / "nuclei" / "0", mode="r")[:]
    cells = zarr.open_array(out / "iseg.zarr" / "B" / "2" / "0" / "labels" / "cells" / "0", mode="r")[:]
    assert nuclei.max() > 3 and set(np.unique(nuclei)) <= set(np.unique(cells))


@pytest.mark.parametrize("budget_ms,rate,chosen", [(60000, 0.0, "instanseg"), (1, 2.0, "classical")])
def test_auto_times_instanseg_and_keeps_it_only_where_it_sustains_the_run(binary, tmp_path, budget_ms, rate, chosen):
    """`auto` times InstanSeg here and logs the figures either way: a minute per field fits any
    machine, 1 ms none. The plate's labels come from the method it chose (InstanSeg's are not the
    classical path's)."""
    out = tmp_path / "out"
    cfg = tmp_path / "c.toml"
    cfg.write_text(daemon_toml(out, "auto", None, sim_config(plate="auto", wells=("B2",), fields=1, size=256, seed=5,
                                                              rate=rate),
                               zenoh_enabled=False,
                               extra={"latency_budget_ms": budget_ms,
                                      "segmentation": {"method": "auto", "model": str(MODEL)},
                                      "inference": {"providers": ["cpu"]}}))
    p = run(binary, "run", "--config", cfg)
    assert p.returncode == 0, p.stderr[-3000:]
    line = next((ln for ln in p.stderr.splitlines() if "segmentation auto:" in ln), "")
    assert "InstanSeg costs" in line and "per 256x256 field" in line and f'chosen="{chosen}"' in line, p.stderr[-3000:]
    assert ("segmentation runs InstanSeg" in p.stderr) == (chosen == "instanseg")
    assert ("too slow for this run" in p.stderr) == (chosen == "classical")
    for name in ("nuclei", "cells"):
        attrs = zarr.open_group(out / "auto.zarr" / "B" / "2" / "0" / "labels" / name, mode="r").attrs
        assert attrs["liveomics"] == {"segmentation": chosen}


def test_daemon_config_errors_name_their_keys(binary, tmp_path):
    base = sim_config(plate="bad", wells=("B2",), fields=1, size=256)
    cases = [
        ({"segmentation": {"method": "instanseg", "model": str(tmp_path / "none")}}, "segmentation.model"),
        ({"segmentation": {"method": "instanseg", "seed_threshold": 1.5}}, "segmentation.seed_threshold"),
        ({"segmentation": {"method": "probability"}}, "segmentation.probability_model"),
        # 2 px nuclei: InstanSeg would enlarge the field 6.5x (issue 37: 184 s and 7.5 GB a field).
        ({"segmentation": {"method": "instanseg", "model": str(MODEL), "nucleus_diameter_um": 1.3}},
         "segmentation.nucleus_diameter_um"),
        ({"segmentation": {"method": "classical"}, "pipeline": {"stages": ["segment", "measure", "inference"]},
          "inference": {"providers": ["cpu"], "models": [{"name": "iseg", "path": str(MODEL)}]}},
         "inference.models[0].role"),
        # Outputs it could not write (issue 37): a path through a file, a filesystem without room.
        ({"sinks": {"zarr": {"output": "/etc/passwd/out"}}}, "sinks.zarr.output"),
        ({"sinks": {"zarr": {"output": "/proc/liveomics"}}}, "sinks.zarr.output"),
    ]
    for extra, key in cases:
        cfg = tmp_path / "c.toml"
        cfg.write_text(daemon_toml(tmp_path / "out", "bad", None, base, zenoh_enabled=False, extra=extra))
        p = run(binary, "validate", cfg)
        assert p.returncode == 2 and key in p.stderr, (key, p.stderr[-2000:])


def test_without_onnx_runtime_the_daemon_falls_back_to_the_classical_path(binary, tmp_path):
    out = tmp_path / "out"
    cfg = tmp_path / "c.toml"
    cfg.write_text(daemon_toml(out, "fb", None, sim_config(plate="fb", wells=("B2",), fields=1, size=256),
                               zenoh_enabled=False,
                               extra={"segmentation": {"method": "instanseg", "model": str(MODEL)},
                                      "inference": {"ort_library": str(tmp_path / "libonnxruntime.so")}}))
    p = run(binary, "run", "--config", cfg)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "segmentation falls back to the classical path" in p.stderr, p.stderr[-3000:]
    nuclei = zarr.open_array(out / "fb.zarr" / "B" / "2" / "0" / "labels" / "nuclei" / "0", mode="r")[:]
    assert nuclei.max() > 3


def test_ctrl_c_inside_a_long_kernel_exits_within_the_grace(binary, tmp_path):
    """A first SIGINT while InstanSeg is inside a 1024² field (about 3 s here): the fields in flight
    get `pipeline.stop_grace_ms` (0.3 s here) to drain, then the daemon exits 130 and says why;
    the plate stays valid and a restart completes it."""
    import signal
    import subprocess
    import time

    out = tmp_path / "out"
    cfg = tmp_path / "c.toml"
    cfg.write_text(daemon_toml(out, "grace", None, sim_config(plate="grace", wells=("B2",), fields=3, size=1024, seed=5),
                               zenoh_enabled=False,
                               extra={"segmentation": {"method": "instanseg", "model": str(MODEL)},
                                      "pipeline": {"stop_grace_ms": 300},
                                      "inference": {"providers": ["cpu"]}}))
    proc = subprocess.Popen([str(binary), "run", "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "acquisition starting" in line:
            break
    time.sleep(1.0)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - t0
    assert proc.returncode == 130, err[-3000:]
    assert "did not finish within pipeline.stop_grace_ms" in err, err[-3000:]
    assert took < 2.5, f"exited {took:.1f} s after the signal"
    again = run(binary, "run", "--config", cfg)
    assert again.returncode == 0, again.stderr[-3000:]
    plate = zarr.open_group(out / "grace.zarr", mode="r")
    assert sorted(i["path"] for i in plate["B/2"].attrs["ome"]["well"]["images"]) == ["0", "1", "2"]
