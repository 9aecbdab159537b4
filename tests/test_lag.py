"""The microscope never waits (issue 35): with `pipeline.when_behind = "lag"` (the default) a
paced acquisition faster than the analysis has its fields written raw to the plate at once and
analysed from the plate when workers are free; the plate at the end equals an all-inline run of
the same plate, and every field's cells reach zenoh, late ones marked so. `hold` keeps the
backpressure: the source waits for the analysis instead."""

import json
import re
import time

import zarr
import zenoh

from compare_plates import compare
from liveomics_testkit import ROOT, daemon_toml, free_port, inference_config, run, sim_config

MODELS = ROOT / "models"
WELLS = ("B2", "B3")
FIELDS = 6
#: Display windows are running means over the fields written so far: they depend on the order of
#: writes, which lagging changes. Everything else must be equal.
WINDOW = frozenset({"window"})


def config(out, when_behind, rate, port=None, jsonl=None):
    inf = inference_config(("vstain", MODELS / "virtual_stain_unet", {"class": "required"}),
                           ("cellomics", MODELS / "cell_omics_cnn"), workers=1)
    inf["pipeline"].update({"when_behind": when_behind, "field_queue": 1, "frame_queue": 4,
                            "backfill_after_idle_ms": 200})
    inf["latency_budget_ms"] = 60000
    inf["segmentation"] = {"method": "classical"}
    if jsonl:
        inf["sinks"] = {"jsonl": {"enabled": True, "path": jsonl}}
    return daemon_toml(out, "lag", port, sim_config(plate="lag", wells=WELLS, fields=FIELDS, size=512, rate=rate),
                       zenoh_enabled=port is not None, extra=inf)


def held_seconds(stdout):
    m = re.search(r"acquisition held ([0-9.]+) s by backpressure", stdout)
    assert m, stdout
    return float(m[1])


def lagged(stdout):
    m = re.search(r"lagged\s+(\d+) fields", stdout)
    return int(m[1]) if m else 0


def test_a_fast_acquisition_lags_instead_of_waiting_and_the_plate_equals_an_inline_run(binary, tmp_path):
    # Reference: every field analysed inline, the source held as long as it takes (rate 0: no
    # instrument, so the pipeline sets the pace).
    (tmp_path / "ref.toml").write_text(config(tmp_path / "ref", "hold", 0.0))
    p = run(binary, "run", "--config", tmp_path / "ref.toml", timeout=600)
    assert p.returncode == 0, p.stderr
    assert lagged(p.stdout) == 0, p.stdout

    # The same plate from a microscope at 50 fields/s, far beyond one worker: with `hold` the
    # microscope waits for the analysis.
    (tmp_path / "hold.toml").write_text(config(tmp_path / "hold", "hold", 50.0))
    p = run(binary, "run", "--config", tmp_path / "hold.toml", timeout=600)
    assert p.returncode == 0, p.stderr
    held_hold = held_seconds(p.stdout)
    assert lagged(p.stdout) == 0, p.stdout

    # With `lag` it does not: fields are written raw and analysed after, and nothing is lost.
    port = free_port()
    conf = zenoh.Config()
    conf.insert_json5("listen/endpoints", json.dumps([f"tcp/127.0.0.1:{port}"]))
    conf.insert_json5("scouting/multicast/enabled", "false")
    cells, states = [], []
    (tmp_path / "lag.toml").write_text(config(tmp_path / "lag", "lag", 50.0, port=port, jsonl=tmp_path / "f.jsonl"))
    with zenoh.open(conf) as session:
        subs = [
            session.declare_subscriber("liveomics/lag/cells/lag/**", lambda s: cells.append(
                {k: v for k, v in json.loads(bytes(s.attachment.to_bytes())).items()})),
            session.declare_subscriber("liveomics/lag/fields/lag/**", lambda s: states.append(
                json.loads(bytes(s.payload.to_bytes())))),
        ]
        p = run(binary, "run", "--config", tmp_path / "lag.toml", timeout=600)
        time.sleep(0.5)
        for s in subs:
            s.undeclare()
    assert p.returncode == 0, p.stderr
    n = len(WELLS) * FIELDS
    n_lagged = lagged(p.stdout)
    assert n_lagged >= 3, p.stdout
    assert "backlog left 0" in p.stdout, p.stdout
    assert f"fields           {n} done" in p.stdout, p.stdout
    held_lag = held_seconds(p.stdout)
    print(f"source held {held_lag:.2f} s with lag, {held_hold:.2f} s with hold; {n_lagged} of {n} fields lagged")
    assert held_lag < held_hold / 2, (held_lag, held_hold)

    # Same labels, tables, raw and virtual channels as the inline run.
    assert compare(tmp_path / "ref" / "lag.zarr", tmp_path / "lag" / "lag.zarr", WINDOW) == []
    g = zarr.open_group(str(tmp_path / "lag" / "lag.zarr"), mode="r")
    for w in WELLS:
        for f in range(FIELDS):
            assert not g[f"{w[0]}/{w[1:]}/{f}"].attrs.get("liveomics", {}).get("owed"), (w, f)

    # Every field's cells reached zenoh once, the late ones marked late, after a version-1 state
    # that said their analysis was owed.
    assert len(cells) == n, cells
    late = [c for c in cells if c["late"] == "true"]
    assert len(late) == n_lagged, cells
    assert all(int(c["analysis_lag_ms"]) > 0 for c in late)
    owed = [s for s in states if s["version"] == 1]
    assert len(owed) == n_lagged and all(s["owed"] == ["analysis"] for s in owed), states
    done = [s for s in states if s["version"] == 2]
    assert len(done) == n_lagged and all(s["backfilled"] == ["analysis"] and s["complete"] for s in done), states
    lines = [json.loads(x) for x in (tmp_path / "f.jsonl").read_text().splitlines()]
    assert len(lines) == n and sum(x["late"] for x in lines) == n_lagged, lines


def test_a_daemon_killed_while_fields_are_owed_their_analysis_finishes_them_on_restart(binary, tmp_path):
    """SIGKILL as soon as a field has lagged: whatever was written raw is listed owed its analysis
    in the plate, the restart does that analysis (and acquires what was not written), and the
    plate equals an all-inline run."""
    import signal
    import subprocess

    (tmp_path / "ref.toml").write_text(config(tmp_path / "ref", "hold", 0.0))
    assert run(binary, "run", "--config", tmp_path / "ref.toml", timeout=600).returncode == 0
    cfg = tmp_path / "lag.toml"
    cfg.write_text(config(tmp_path / "lag", "lag", 50.0))
    proc = subprocess.Popen([str(binary), "run", "--config", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        seen = 0
        for line in proc.stderr:
            seen += "field lagged" in line
            if seen >= 2:
                break
        assert seen >= 2, "no field lagged"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    again = run(binary, "run", "--config", cfg, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "backlog left 0" in again.stdout, again.stdout
    assert compare(tmp_path / "ref" / "lag.zarr", tmp_path / "lag" / "lag.zarr", WINDOW) == []
