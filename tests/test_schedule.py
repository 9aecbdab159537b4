"""The latency budget, enforced (issue 19), from the outside: optional models skipped inline when
a field would be late, backfilled into the same OME-Zarr field before exit, with the plate at the
end equal to a run that did everything inline; a daemon killed mid-backfill and restarted
finishes what was owed, once per field. The scheduler's decisions themselves are unit-tested with
a fake clock in daemon/src/schedule.rs."""

import json
import re
import signal
import subprocess
import time

import numpy as np
import pytest
import zarr
import zenoh

from compare_plates import compare
from liveomics_testkit import ROOT, daemon_toml, free_port, inference_config, run, sim_config

MODELS = ROOT / "models"
WELLS = ("B2", "B3")
FIELDS = 3
#: Display windows are running means over the fields written so far: they depend on the order of
#: writes, which backfilling changes. Everything else must be equal.
WINDOW = frozenset({"window"})


def config(out, vstain_class=None, budget_ms=5000, port=None, rate=0.0, jsonl=None, idle_ms=None, cell_class=None):
    extra = {"class": vstain_class} if vstain_class else {}
    cell = {"class": cell_class} if cell_class else {}
    inf = inference_config(("vstain", MODELS / "virtual_stain_unet", extra),
                           ("cellomics", MODELS / "cell_omics_cnn", cell), workers=2)
    inf["latency_budget_ms"] = budget_ms
    if idle_ms is not None:
        inf["pipeline"]["backfill_after_idle_ms"] = idle_ms
    if jsonl:
        inf["sinks"] = {"jsonl": {"enabled": True, "path": jsonl}}
    return daemon_toml(out, "sched", port, sim_config(plate="sched", wells=WELLS, fields=FIELDS, size=256, rate=rate),
                       zenoh_enabled=port is not None, extra=inf)


def summary_counts(stdout):
    m = re.search(r"degraded (\d+), backfilled (\d+)", stdout)
    assert m, stdout
    return int(m[1]), int(m[2])


def virtual_planes(plate):
    g = zarr.open_group(str(plate), mode="r")
    out = {}
    for w in WELLS:
        for f in range(FIELDS):
            image = g[f"{w[0]}/{w[1:]}/{f}"]
            labels = [c["label"] for c in image.attrs["ome"]["omero"]["channels"]]
            k = next(i for i, c in enumerate(labels) if "virtual" in c)
            out[(w, f)] = np.asarray(image["0"][k:])
    return out


def owed_anywhere(plate):
    g = zarr.open_group(str(plate), mode="r")
    return {(w, f): g[f"{w[0]}/{w[1:]}/{f}"].attrs.get("liveomics", {}).get("owed")
            for w in WELLS for f in range(FIELDS)
            if g[f"{w[0]}/{w[1:]}/{f}"].attrs.get("liveomics", {}).get("owed")}


def reference_plate(binary, tmp_path):
    """The plate with every model inline (class required: the behaviour before the scheduler)."""
    (tmp_path / "ref.toml").write_text(config(tmp_path / "ref", vstain_class="required"))
    p = run(binary, "run", "--config", tmp_path / "ref.toml", timeout=600)
    assert p.returncode == 0, p.stderr
    assert summary_counts(p.stdout) == (0, 0)
    return tmp_path / "ref" / "sched.zarr"


def test_deferred_work_is_backfilled_into_the_same_plate_and_announced(binary, tmp_path):
    ref = reference_plate(binary, tmp_path)
    port = free_port()
    conf = zenoh.Config()
    conf.insert_json5("listen/endpoints", json.dumps([f"tcp/127.0.0.1:{port}"]))
    conf.insert_json5("scouting/multicast/enabled", "false")
    updates = []
    (tmp_path / "d.toml").write_text(config(tmp_path / "d", vstain_class="deferred", port=port,
                                            jsonl=tmp_path / "fields.jsonl"))
    with zenoh.open(conf) as session:
        sub = session.declare_subscriber("liveomics/sched/fields/sched/**",
                                         lambda s: updates.append(json.loads(bytes(s.payload.to_bytes()))))
        p = run(binary, "run", "--config", tmp_path / "d.toml", timeout=600)
        time.sleep(0.5)
        sub.undeclare()
    assert p.returncode == 0, p.stderr
    n = len(WELLS) * FIELDS
    assert summary_counts(p.stdout) == (n, n), p.stdout
    assert "backlog left 0" in p.stdout, p.stdout
    assert "field degraded" in p.stderr and "its class is deferred" in p.stderr
    # Same arrays, labels and tables as the inline run: nothing was lost or changed by waiting.
    diffs = compare(ref, tmp_path / "d" / "sched.zarr", WINDOW)
    assert diffs == [], diffs
    assert owed_anywhere(tmp_path / "d" / "sched.zarr") == {}
    # Each field announced degraded (version 1, owed) then complete (version 2).
    by_field = {}
    for u in updates:
        by_field.setdefault((u["well"], u["field"]), []).append(u)
    assert len(by_field) == n, updates
    for seq in by_field.values():
        assert [u["version"] for u in seq] == [1, 2], seq
        assert seq[0]["owed"] == ["vstain"] and seq[1]["owed"] == [] and seq[1]["complete"]
    lines = [json.loads(x) for x in (tmp_path / "fields.jsonl").read_text().splitlines()]
    assert sum(1 for x in lines if x.get("backfilled") == ["vstain"]) == n


def test_a_budget_too_small_for_the_optional_model_degrades_and_backfills(binary, tmp_path):
    ref = reference_plate(binary, tmp_path)
    # 1 ms is too little for any field: required work runs inline anyway, and the virtual stain
    # is skipped on every field decided once its cost is learnt (from the second run on, so some
    # worker of the two meets such a field among the six). A budget that fits the required work
    # but not the stain would make this test depend on the machine's speed; the arithmetic of
    # that case is unit-tested with a fake clock in daemon/src/schedule.rs.
    # The simulated microscope is paced (a positive rate): its fields have deadlines.
    (tmp_path / "o.toml").write_text(config(tmp_path / "o", budget_ms=1, rate=1000.0))
    p = run(binary, "run", "--config", tmp_path / "o.toml", timeout=600)
    assert p.returncode == 0, p.stderr
    degraded, backfilled = summary_counts(p.stdout)
    assert degraded >= 1 and degraded == backfilled, p.stdout
    assert "predicted" in p.stderr and "before the deadline" in p.stderr
    assert compare(ref, tmp_path / "o" / "sched.zarr", WINDOW) == []
    # At rate 0 nothing waits on a field (as fast as the pipeline takes them): the same 1 ms
    # budget is no deadline, nothing is degraded and nothing counts as late.
    (tmp_path / "u.toml").write_text(config(tmp_path / "u", budget_ms=1, rate=0.0))
    p = run(binary, "run", "--config", tmp_path / "u.toml", timeout=600)
    assert p.returncode == 0, p.stderr
    assert summary_counts(p.stdout) == (0, 0), p.stdout
    assert "fields had no deadline" in p.stdout, p.stdout
    assert compare(ref, tmp_path / "u" / "sched.zarr", WINDOW) == []


def test_idle_gaps_in_the_acquisition_are_used_for_backfill(binary, tmp_path):
    # 2 fields/s of 256² fields leave the two workers idle most of the time: with a 50 ms idle
    # threshold the owed virtual stains are backfilled between fields, not only at the end.
    (tmp_path / "i.toml").write_text(config(tmp_path / "i", vstain_class="deferred", rate=2.0, idle_ms=50))
    p = run(binary, "run", "--config", tmp_path / "i.toml", timeout=600)
    assert p.returncode == 0, p.stderr
    n = len(WELLS) * FIELDS
    assert summary_counts(p.stdout) == (n, n), p.stdout
    log = p.stderr.splitlines()
    done = [i for i, x in enumerate(log) if "field done" in x]
    backfilled = [i for i, x in enumerate(log) if "field backfilled" in x]
    assert backfilled and backfilled[0] < done[-1], "no backfill before the last field was done:\n" + p.stderr


def test_a_class_that_would_lose_table_columns_is_refused_with_its_key(binary, tmp_path):
    (tmp_path / "x.toml").write_text(config(tmp_path / "x", cell_class="deferred"))
    p = run(binary, "validate", tmp_path / "x.toml")
    assert p.returncode != 0
    assert "inference.models[1].class" in p.stdout + p.stderr, p.stdout + p.stderr
    assert "only virtual-staining models may wait" in p.stdout + p.stderr


def test_a_daemon_killed_mid_backfill_finishes_it_on_restart_once_per_field(binary, tmp_path):
    ref = reference_plate(binary, tmp_path)
    cfg = tmp_path / "k.toml"
    cfg.write_text(config(tmp_path / "k", vstain_class="deferred"))
    proc = subprocess.Popen([str(binary), "run", "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = []
    deadline = time.time() + 300
    while time.time() < deadline:
        line = proc.stderr.readline()
        log.append(line)
        if "field backfilled" in line or (not line and proc.poll() is not None):
            break
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert any("field backfilled" in x for x in log), "".join(log)
    plate = tmp_path / "k" / "sched.zarr"
    owed = owed_anywhere(plate)
    assert 0 < len(owed) < len(WELLS) * FIELDS, owed
    again = run(binary, "run", "--config", cfg, timeout=600)
    assert again.returncode == 0, again.stderr
    # Nothing acquired again; exactly the fields still owed are backfilled.
    assert re.search(r"fields acquired\s+0 ", again.stdout), again.stdout
    assert summary_counts(again.stdout) == (0, len(owed)), again.stdout
    assert again.stderr.count("field backfilled") == len(owed)
    assert owed_anywhere(plate) == {}
    assert compare(ref, plate, WINDOW) == []
    g = zarr.open_group(str(plate), mode="r")
    for w in WELLS:
        images = [i["path"] for i in g[f"{w[0]}/{w[1:]}"].attrs["ome"]["well"]["images"]]
        assert sorted(images) == [str(f) for f in range(FIELDS)], images


@pytest.mark.parametrize("speed", ["max", "1000x"])
def test_a_replay_at_max_speed_has_no_deadlines_and_a_paced_one_keeps_them(binary, tmp_path, speed):
    """No deadline where no instrument waits (issue 38): a replay at `max` takes every model inline
    and counts no miss whatever the budget; a paced replay, even 1000x, keeps the budget and
    degrades under it as a live run does. Both plates equal the all-inline one."""
    ref = reference_plate(binary, tmp_path)
    (tmp_path / "r.toml").write_text(config(tmp_path / "r", budget_ms=1))
    p = run(binary, "replay", ref, "--speed", speed, "--config", tmp_path / "r.toml", timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    degraded, backfilled = summary_counts(p.stdout)
    if speed == "max":
        assert degraded == 0 and "fields had no deadline" in p.stdout, p.stdout
        assert "field degraded" not in p.stderr
    else:
        assert degraded >= 1 and degraded == backfilled, p.stdout
        assert "deadline misses  " in p.stdout and "(budget 1 ms)" in p.stdout
    out = tmp_path / "r" / "sched.zarr"
    assert owed_anywhere(out) == {}
    want, got = virtual_planes(ref), virtual_planes(out)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))
