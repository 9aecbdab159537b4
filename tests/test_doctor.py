"""`liveomics doctor`: what runs where, and the configured pipeline timed on this machine."""

import json

from liveomics_testkit import ROOT, merged, run, sim_config, toml_text


def doctor(binary, tmp_path, extra):
    cfg = tmp_path / "d.toml"
    cfg.write_text(toml_text(merged(sim_config(plate="doc", wells=("B2", "B3"), fields=2, size=256, rate=2.0), extra)))
    p = run(binary, "doctor", "--config", cfg, "--json", "--fields", 4, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)


def test_doctor_reports_the_runtime_and_times_the_configured_pipeline(binary, tmp_path):
    r = doctor(binary, tmp_path, {"segmentation": {"method": "classical"}, "latency_budget_ms": 60000})
    assert r["onnx_runtime"]["version"] == "1.31.1", r["onnx_runtime"]
    assert ["cpu", True] in r["onnx_runtime"]["providers_in_library"]
    # No GPU here: the reason names what is missing.
    assert r["cuda"]["device"] is None and "CUDA" in r["cuda"]["reason"]
    assert r["segmentation"] == "classical" and r["field"] == [256, 256] and r["fields_timed"] == 4
    costs = dict(r["costs_ms"])
    assert costs["stage segment"] > 0 and costs["stage measure"] > 0
    assert r["sustained_fields_per_s"] > 0 and r["plan_fields_per_s"] == 2.0
    assert r["keeps_up"] == (r["sustained_fields_per_s"] >= 2.0), r["verdict"]
    assert "a field's work takes" in r["verdict"]
    # Nothing is left behind: the measurement wrote to a temporary folder.
    assert not (tmp_path / "out").exists()


def test_doctor_times_each_model_on_its_provider_and_says_when_the_budget_is_too_small(binary, tmp_path):
    model = ROOT / "models" / "cell_omics_cnn"
    r = doctor(binary, tmp_path, {
        "latency_budget_ms": 1,
        "segmentation": {"method": "classical"},
        "pipeline": {"stages": ["segment", "measure", "inference"]},
        "inference": {"providers": ["cpu"], "models": [{"name": "omics", "path": str(model), "role": "cell-omics"}]},
    })
    assert r["models"] == [{"name": "omics", "path": str(model), "provider": {"Ok": "cpu"}, "skipped": []}]
    assert dict(r["costs_ms"])["model omics"] > 0
    assert not r["keeps_up"] and "over budget" in r["verdict"]
