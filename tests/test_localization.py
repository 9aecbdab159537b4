"""The relocalization readout (issue 23) from the outside: a simulated plate where HNRNPA1 moves
from the nucleus to the cytoplasm in two wells, run with the localize stage after the reference
virtual-stain model. Per-cell localization columns land in the AnnData tables (acquired and
virtual proteins), per-well scores in the wells' OME-Zarr attributes and on zenoh, and a
closed-loop rule on `loc.HNRNPA1.shift` fires where the protein moved and never in a control-like
well. The figures on a larger held-out plate come from benches/localization_bench.py."""

import csv
import json
import subprocess
import time
import urllib.request
import warnings

import anndata
import numpy as np
import pytest
import tifffile
import zarr
import zenoh

from liveomics_testkit import ROOT, daemon_toml, free_port, inference_config, run, sim_config, toml_text

CONTROLS = ["B2", "B3", "B7", "B8"]
CONTROL_LIKE = ["B4"]            # unperturbed, but not declared a control: the null's check
MOVED = ["B5", "B6"]             # perturbed, and HNRNPA1 relocalized
PERTURBED = ["C2"]               # perturbed only
WELLS = CONTROLS + CONTROL_LIKE + MOVED + PERTURBED
FIELDS = 3
PROTEINS = [
    {"name": "HNRNPA1", "localization": "nuclear"},
    {"name": "CALR", "localization": "er"},
    {"name": "ATP1A1", "localization": "membrane"},
    {"name": "TOMM20", "localization": "mitochondria"},
]


def simulator():
    return sim_config(plate="loc", wells=WELLS, fields=FIELDS, size=512, seed=5, extra={
        "gene_seed": 7, "control_wells": CONTROLS + CONTROL_LIKE, "proteins": PROTEINS,
        "relocalization": [{"protein": "HNRNPA1", "to": "cytoplasmic", "wells": MOVED, "fraction": 0.5}],
    })


@pytest.fixture(scope="module")
def plate(binary, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loc")
    port = free_port()
    conf = zenoh.Config()
    conf.insert_json5("mode", '"peer"')
    conf.insert_json5("listen/endpoints", json.dumps([f"tcp/127.0.0.1:{port}"]))
    conf.insert_json5("scouting/multicast/enabled", "false")
    session = zenoh.open(conf)
    wells, followups = [], []
    subs = [
        session.declare_subscriber("liveomics/loc/wells/**", lambda s: wells.append(json.loads(s.payload.to_bytes()))),
        session.declare_subscriber("liveomics/loc/followup/loc", lambda s: followups.append(json.loads(s.payload.to_bytes()))),
    ]
    extra = inference_config(("vstain", ROOT / "models" / "virtual_stain_unet"), workers=2)
    extra["pipeline"]["stages"].append("localize")
    extra["localization"] = {"controls_from_plan": False, "control_wells": CONTROLS}
    extra["sinks"] = {"jsonl": {"enabled": True, "path": tmp / "fields.jsonl"}}
    extra["closed_loop"] = {"enabled": True, "rules": [{
        "name": "moved", "metric": "loc.HNRNPA1.shift", "scope": "well", "comparison": ">=",
        "threshold": 30.0, "cooldown_s": 3600, "action": {"kind": "revisit", "delay_s": 600},
    }]}
    cfg = tmp / "run.toml"
    cfg.write_text(daemon_toml(tmp / "out", "loc", port, simulator(), extra=extra))
    time.sleep(0.5)
    r = run(binary, "run", "--config", cfg, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    time.sleep(1.0)
    for s in subs:
        s.undeclare()
    session.close()
    truth_cfg = tmp / "truth.toml"
    truth_cfg.write_text(toml_text(simulator()))
    t = run(binary, "simulate", "--config", truth_cfg, "--out", tmp / "truth")
    assert t.returncode == 0, t.stderr
    return tmp, wells, followups, r.stderr


def tables(root):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for w in WELLS:
            for f in range(FIELDS):
                yield w, f, anndata.read_zarr(root / "out" / "loc.zarr" / w[0] / w[1:] / str(f) / "tables" / "table").obs


def shifts(root, well):
    return zarr.open_group(str(root / "out" / "loc.zarr" / well[0] / well[1:]), mode="r").attrs["liveomics"]["localization"]


def test_every_protein_acquired_and_virtual_gets_per_cell_profiles(plate):
    root, *_ = plate
    keys = [p["name"] for p in PROTEINS] + ["CALR_virtual", "ATP1A1_virtual", "HNRNPA1_virtual"]
    parts = ["nucleus", "cytoplasm", "membrane", "er", "puncta"]
    for _, _, obs in tables(root):
        for k in keys:
            cols = [f"loc.{k}.{c}" for c in parts + ["radial", "cv", "er_corr"]]
            assert set(cols) <= set(obs.columns), k
            sums = obs[[f"loc.{k}.{c}" for c in parts]].sum(axis=1, skipna=False).dropna()
            assert len(sums) > 0.9 * len(obs), k
            np.testing.assert_allclose(sums, 1.0, atol=1e-4)
            assert obs[f"loc.{k}.radial"].dropna().between(0, 1).all()
    # Where each protein sits, as the simulator drew it, in a control well.
    obs = next(o for w, _, o in tables(root) if w == "B2")
    assert obs["loc.HNRNPA1.nucleus"].median() > 0.5
    assert obs["loc.ATP1A1.membrane"].median() > obs["loc.HNRNPA1.membrane"].median()
    assert obs["loc.CALR.er_corr"].median() > obs["loc.HNRNPA1.er_corr"].median()
    assert obs["loc.TOMM20.puncta"].median() > obs["loc.CALR.puncta"].median()


def test_per_cell_fractions_follow_the_simulator_truth(plate):
    root, *_ = plate
    truth = {}
    with open(root / "truth" / "truth" / "cells.csv") as fh:
        for row in csv.DictReader(fh):
            truth[(row["well"], int(row["field"]), int(row["label"]))] = float(row["loc_HNRNPA1_nucleus"])
    measured, expected = [], []
    for w, f, obs in tables(root):
        labels = tifffile.imread(root / "truth" / "truth" / f"{w}_f{f}_t0_cells.tif")
        for _, c in obs.iterrows():
            t = labels[int(round(c["centroid_y_px"])), int(round(c["centroid_x_px"]))]
            v = c["loc.HNRNPA1.nucleus"]
            if t and np.isfinite(v) and (w, f, int(t)) in truth:
                measured.append(v)
                expected.append(truth[(w, f, int(t))])
    assert len(measured) > 500
    r = np.corrcoef(measured, expected)[0, 1]
    assert r > 0.8, f"Pearson r of the HNRNPA1 nuclear fraction with the truth: {r:.3f}"


def test_wells_where_the_protein_moved_score_above_every_other(plate):
    root, wells_msgs, _, _ = plate
    # Every well is scored: the controls imaged before enough other control fields were in get
    # theirs when later control fields rescore every well.
    scored = WELLS
    score = {w: shifts(root, w)["HNRNPA1"] for w in scored}
    assert all(score[w]["fields"] == FIELDS for w in scored)
    assert all(score[w]["control_fields"] == FIELDS * (len(CONTROLS) - (w in CONTROLS)) for w in scored)
    assert min(score[w]["shift"] for w in MOVED) > max(score[w]["shift"] for w in scored if w not in MOVED)
    assert all(score[w]["relocalized"] for w in MOVED)
    for w in CONTROLS + CONTROL_LIKE:
        attrs = zarr.open_group(str(root / "out" / "loc.zarr" / w[0] / w[1:]), mode="r").attrs["liveomics"]
        for protein, s in attrs.get("localization", {}).items():
            assert not s["relocalized"], (w, protein, s["shift"])
    # Each score comes with its history: [fields, control fields, shift, p] after each field.
    assert [h[:2] for h in score["B5"]["history"]] == [[n, FIELDS * len(CONTROLS)] for n in range(1, FIELDS + 1)]
    # The same readout went out on zenoh, after the well's last field.
    last = {}
    for m in wells_msgs:
        if "HNRNPA1" in m.get("localization", {}):
            s = m["localization"]["HNRNPA1"]
            old = last.get(m["well"], {"fields": 0, "control_fields": 0})
            if (s["fields"], s["control_fields"]) >= (old["fields"], old["control_fields"]):
                last[m["well"]] = s
    for w in scored:
        assert last[w]["shift"] == pytest.approx(score[w]["shift"])


def test_the_closed_loop_fires_on_the_shift_where_the_protein_moved_only(plate):
    root, _, followups, _ = plate
    fired = {f["well"] for f in followups}
    assert set(MOVED) <= fired
    assert not fired & set(CONTROLS + CONTROL_LIKE)
    assert all(f["trigger"]["metric"] == "loc.HNRNPA1.shift" and f["trigger"]["value"] >= 30 for f in followups)
    lines = [json.loads(x) for x in (root / "fields.jsonl").read_text().splitlines()]
    assert any(s["protein"] == "HNRNPA1_virtual" for x in lines for s in x["localization"])


def test_bad_localization_settings_are_reported_with_their_keys(binary, tmp_path):
    extra = {"pipeline": {"stages": ["segment", "localize"]},
             "localization": {"rim_um": 0, "permutations": 5, "er_channel": "Nope", "control_wells": ["Z99"]},
             "closed_loop": {"enabled": True, "rules": [{
                 "name": "x", "metric": "loc.TOMM20.shift", "scope": "cell", "comparison": ">", "threshold": 1,
                 "action": {"kind": "revisit", "delay_s": 1}}]}}
    cfg = tmp_path / "bad.toml"
    sim = sim_config(plate="bad", extra={"proteins": [{"name": "TOMM20", "localization": "mitochondria"}]})
    cfg.write_text(daemon_toml(tmp_path / "out", "bad", None, sim, zenoh_enabled=False, extra=extra))
    r = run(binary, "validate", cfg)
    assert r.returncode == 2, r.stdout + r.stderr
    for key in ["pipeline.stages[1]", "localization.rim_um", "localization.permutations"]:
        assert key in r.stderr, key


def test_the_shipped_relocalization_config_is_valid(binary):
    r = run(binary, "validate", ROOT / "config" / "relocalization.toml", cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_page_of_the_finished_plate_shows_the_scores(binary, plate):
    root, *_ = plate
    port = free_port()
    proc = subprocess.Popen([str(binary), "serve", str(root / "out" / "loc.zarr"), "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving" in proc.stdout.readline()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=10) as r:
            state = json.loads(r.read())
        for w in MOVED:
            s = state["wells"][w]["localization"]["HNRNPA1"]
            assert s["relocalized"] and s["shift"] == pytest.approx(shifts(root, w)["HNRNPA1"]["shift"])
        assert not state["wells"]["B4"]["localization"]["HNRNPA1"]["relocalized"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
