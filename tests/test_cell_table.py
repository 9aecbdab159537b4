"""A model that reads other models (role cell-table): `cell_protein_mlp` reads the cell-omics
model's per-cell transcripts and adds per-cell protein columns. From the outside: the columns are
in the zenoh Arrow records, the AnnData tables (obs and X) and the page's per-well means, equal in
all three and equal to Python onnxruntime on the transcripts the daemon wrote; a broken graph is a
config error under its key."""

import json
import shutil
import subprocess
import time

import numpy as np
import onnxruntime as ort
import pyarrow.ipc
import pytest
import yaml

from liveomics_testkit import (ROOT, daemon_config, free_port, http_get, inference_config, merged, run, sim_config,
                               toml_text)
from test_e2e import zenoh_listener

MODELS = ROOT / "models"
GENES = [f"G{i:03d}" for i in range(1, 17)]
PROTEINS = [f"P{i:03d}" for i in range(1, 9)]
SIM = {"gene_seed": 7, "translated_proteins": 8}


def chain(*extra, protein=None):
    return inference_config(("cellomics", MODELS / "cell_omics_cnn"),
                            ("protein", MODELS / "cell_protein_mlp", protein or {}), *extra, workers=2)


def python_chain(transcripts: np.ndarray) -> np.ndarray:
    d = yaml.safe_load((MODELS / "cell_protein_mlp" / "bioimageio.yaml").read_text())
    pre = d["inputs"][0]["preprocessing"][0]["kwargs"]
    post = d["outputs"][0]["postprocessing"][0]["kwargs"]
    x = ((transcripts - np.float32(pre["mean"])) / np.float32(pre["std"])).astype(np.float32)
    sess = ort.InferenceSession(str(MODELS / "cell_protein_mlp" / "weights.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {"transcripts": x})[0] * np.float32(post["gain"]) + np.float32(post["offset"])


def test_protein_columns_are_equal_in_zenoh_anndata_and_the_page(binary, tmp_path):
    import anndata

    zport, hport = free_port(), free_port()
    wells = ("B2", "B3")
    cfg = merged(merged(sim_config(plate="chain", wells=wells, fields=2, extra=SIM),
                        daemon_config(tmp_path / "out", "chaintest", zport)), chain())
    (tmp_path / "run.toml").write_text(toml_text(cfg))
    session, sub, messages = zenoh_listener(zport, "liveomics/chaintest/cells/**")
    try:
        p = run(binary, "run", "--config", tmp_path / "run.toml", timeout=300)
        time.sleep(0.5)
    finally:
        sub.undeclare()
        session.close()
    assert p.returncode == 0, p.stderr
    # The page as the run left the plate (`liveomics serve`): its per-well means of every column.
    proc = subprocess.Popen([str(binary), "serve", str(tmp_path / "out" / "chain.zarr"), "--listen",
                             f"127.0.0.1:{hport}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving" in proc.stdout.readline()
        state = json.loads(http_get(hport, "/api/state")[2])
    finally:
        proc.kill()
        proc.communicate()
    cols = [f"protein.{p}" for p in PROTEINS]
    genes = [f"cellomics.{g}" for g in GENES]
    records = {}
    for key, payload, _ in messages:
        t = pyarrow.ipc.open_stream(payload).read_all()
        records[key.rsplit("/", 2)[-2] + "/" + key.rsplit("/", 1)[-1]] = t
    assert len(records) == 4, sorted(records)
    for w in wells:
        row, col = w[0], w[1:]
        well_values = []
        for f in (0, 1):
            a = anndata.read_zarr(tmp_path / "out" / "chain.zarr" / row / col / str(f) / "tables" / "table")
            assert set(cols) <= set(a.obs.columns), a.obs.columns
            # Every per-cell model output is a variable of X, in run order: the chain after what it reads.
            assert list(a.var_names) == genes + cols
            x = np.asarray(a.X)
            assert np.array_equal(x[:, 16:], a.obs[cols].to_numpy())
            t = records[f"{w}/{f}"]
            assert t.num_rows == a.n_obs > 5
            for c in cols:
                assert np.array_equal(t.column(c).to_numpy(), a.obs[c].to_numpy()), c
            # The chain's input is the cell-omics model's output on the same field, as written.
            want = python_chain(a.obs[genes].to_numpy().astype(np.float32))
            assert np.abs(a.obs[cols].to_numpy() - want).max() <= 1e-4
            well_values.append(a.obs[cols].to_numpy().astype(np.float64))
        # The page's per-well means (its colour-by list) carry the protein columns, equal to the tables'.
        means = state["wells"][w]["means"]
        pooled = np.concatenate(well_values).mean(axis=0)
        for c, m in zip(cols, pooled):
            assert c in means and abs(means[c] - m) <= 1e-4 * max(1.0, abs(m)), (w, c, means.get(c), m)


def graph_error(binary, tmp_path, models: dict, extra_dirs=()) -> str:
    cfg = merged(merged(sim_config(extra=SIM), daemon_config(tmp_path / "out", "bad", None, zenoh_enabled=False)),
                 models)
    (tmp_path / "c.toml").write_text(toml_text(cfg))
    p = run(binary, "validate", tmp_path / "c.toml")
    assert p.returncode == 2, p.stdout + p.stderr
    return p.stderr


def test_a_chain_without_its_producer_is_a_config_error(binary, tmp_path):
    models = inference_config(("protein", MODELS / "cell_protein_mlp"))
    err = graph_error(binary, tmp_path, models)
    assert "inference.models[0].columns[0]" in err and 'no per-cell column "cellomics.G001"' in err, err


def test_a_cycle_and_a_length_mismatch_are_config_errors_under_their_keys(binary, tmp_path):
    # A copy of the chained model whose description reads the first model's outputs, and the
    # first reads the copy's: a cycle. A third reads 3 columns for its 16 inputs.
    copy = tmp_path / "protein2"
    shutil.copytree(MODELS / "cell_protein_mlp", copy)
    models = inference_config(
        ("cellomics", MODELS / "cell_omics_cnn"),
        ("a", MODELS / "cell_protein_mlp", {"columns": ["b.*", "cellomics.G009", "cellomics.G010",
                                                        "cellomics.G011", "cellomics.G012", "cellomics.G013",
                                                        "cellomics.G014", "cellomics.G015", "cellomics.G016"]}),
        ("b", copy, {"columns": ["a.*", "cellomics.G009", "cellomics.G010", "cellomics.G011", "cellomics.G012",
                                 "cellomics.G013", "cellomics.G014", "cellomics.G015", "cellomics.G016"]}),
        ("c", MODELS / "cell_protein_mlp", {"columns": ["area_px", "mean_dapi", "cellomics.G001"]}),
    )
    err = graph_error(binary, tmp_path, models)
    assert "inference.models[1].columns" in err and "inference.models[2].columns" in err and "cycle" in err, err
    assert "inference.models[3].columns" in err and "3 columns for an input of length 16" in err, err


@pytest.mark.parametrize("key, value, message", [
    ("channels", ["DAPI"], "reads per-cell columns, not channels"),
    ("class", "inline-if-on-time", "only virtual-staining models may wait"),
])
def test_a_chained_model_takes_columns_and_is_required(binary, tmp_path, key, value, message):
    err = graph_error(binary, tmp_path, chain(protein={key: value}))
    assert f"inference.models[1].{key}" in err and message in err, err
