"""End to end: the daemon on a small simulated plate, checked against the simulator's own files."""

import json
import signal
import subprocess
import time
import warnings

import numpy as np
import pyarrow.ipc
import pytest
import tifffile
import zarr
import zenoh

from liveomics_testkit import daemon_toml, free_port, run, sim_config, sim_toml, spawn_until


def zenoh_listener(port: int, key: str):
    """A real zenoh peer listening on loopback (multicast scouting off, so parallel tests stay apart)."""
    conf = zenoh.Config()
    conf.insert_json5("mode", '"peer"')
    conf.insert_json5("listen/endpoints", json.dumps([f"tcp/127.0.0.1:{port}"]))
    conf.insert_json5("scouting/multicast/enabled", "false")
    session = zenoh.open(conf)
    messages = []
    sub = session.declare_subscriber(
        key,
        lambda s: messages.append(
            (str(s.key_expr), s.payload.to_bytes(), s.attachment.to_bytes() if s.attachment is not None else None)
        ),
    )
    return session, sub, messages


@pytest.fixture(scope="module")
def plate_run(binary, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    port = free_port()
    session, sub, messages = zenoh_listener(port, "liveomics/e2etest/cells/**")
    sim = sim_config(plate="e2e", wells=("B2", "C5"), fields=2, size=512)
    cfg = tmp / "run.toml"
    cfg.write_text(daemon_toml(tmp / "out", "e2etest", port, sim))
    proc = run(binary, "run", "--config", cfg)
    time.sleep(0.5)  # let the last zenoh message land
    sub.undeclare()
    session.close()
    truth = tmp / "truth"
    sim_proc = run(binary, "simulate", "--config", cfg, "--out", truth)
    assert sim_proc.returncode == 0, sim_proc.stderr
    return proc, tmp / "out" / "e2e.zarr", truth, messages


def test_run_exits_cleanly_and_summarises(plate_run):
    proc, _, _, _ = plate_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fields           4 done" in proc.stdout, proc.stdout
    assert "deadline misses" in proc.stdout and "p99" in proc.stdout


def test_zarr_pixels_equal_simulator_and_every_field_once(plate_run):
    _, plate, truth, _ = plate_run
    manifest = json.loads((truth / "manifest.json").read_text())
    root = zarr.open_group(plate, mode="r")
    wells = root.attrs["ome"]["plate"]["wells"]
    assert sorted(w["path"] for w in wells) == ["B/2", "C/5"]
    for w in wells:
        images = root[w["path"]].attrs["ome"]["well"]["images"]
        assert [i["path"] for i in images] == ["0", "1"], "every field listed exactly once"
        row, col = w["path"].split("/")
        for f in ("0", "1"):
            arr = zarr.open_array(plate / row / col / f / "0", mode="r")
            assert arr.shape == (len(manifest["channels"]), 512, 512)
            assert arr.dtype == np.uint16
            for c, ch in enumerate(manifest["channels"]):
                expected = tifffile.imread(truth / "images" / f"{row}{col}_f{f}_t0_{ch['name']}.tif")
                np.testing.assert_array_equal(arr[c], expected)
            labels = zarr.open_group(plate / row / col / f / "labels", mode="r")
            assert labels.attrs["ome"]["labels"] == ["nuclei", "cells"]
            nuc = zarr.open_array(plate / row / col / f / "labels" / "nuclei" / "0", mode="r")[0]
            cells = zarr.open_array(plate / row / col / f / "labels" / "cells" / "0", mode="r")[0]
            assert nuc.max() > 10
            # Every nucleus pixel lies inside the cell with the same id.
            inside = nuc > 0
            assert np.array_equal(cells[inside], nuc[inside])


def test_ome_zarr_models_validates_hcs_with_warnings_as_errors(plate_run):
    from ome_zarr_models.v05.hcs import HCS

    _, plate, _, _ = plate_run
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hcs = HCS.from_zarr(zarr.open_group(plate, mode="r"))
    assert len(hcs.attributes.ome.plate.wells) == 2


def test_zenoh_one_message_per_field_with_cell_counts_near_truth(plate_run):
    _, _, truth, messages = plate_run
    keys = [k for k, _, _ in messages]
    expected = {f"liveomics/e2etest/cells/e2e/{w}/{f}" for w in ("B2", "C5") for f in (0, 1)}
    assert sorted(keys) == sorted(expected), "one message per field"
    truth_cells = {}
    with open(truth / "truth" / "cells.csv") as fh:
        header = fh.readline().strip().split(",")
        for line in fh:
            row = dict(zip(header, line.strip().split(",")))
            k = (row["well"], int(row["field"]))
            truth_cells[k] = truth_cells.get(k, 0) + 1
    for key, payload, attachment in messages:
        table = pyarrow.ipc.open_stream(payload).read_all()
        meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
        att = json.loads(attachment)
        assert att["cells"] == meta["cells"] == str(table.num_rows)
        well, field = key.split("/")[-2], int(key.split("/")[-1])
        assert meta["well"] == well and meta["field"] == str(field)
        n_truth = truth_cells[(well, field)]
        assert abs(table.num_rows - n_truth) <= 0.10 * n_truth, f"{key}: {table.num_rows} vs truth {n_truth}"
        cols = set(table.column_names)
        assert {"label", "centroid_x_px", "centroid_y_px", "area_px", "mean_dapi", "mean_er"} <= cols
        assert (table.column("area_px").to_numpy() >= table.column("nucleus_area_px").to_numpy()).all()


def test_simulate_is_deterministic(binary, tmp_path):
    cfg = tmp_path / "sim.toml"
    cfg.write_text(sim_toml(wells=("D4",), fields=1, size=256, seed=11))
    for d in ("a", "b"):
        assert run(binary, "simulate", "--config", cfg, "--out", tmp_path / d).returncode == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.tif"))
    assert len(files) >= 6
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_validate_reports_three_mistakes_with_key_paths(binary, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('latency_budget_ms = "soon"\n[pipeline]\nworkerz = 2\n[sinks.zarr]\ncompression = "lz77"\n')
    proc = run(binary, "validate", bad)
    assert proc.returncode == 2
    for key in ("latency_budget_ms:", "pipeline.workerz:", "sinks.zarr.compression:"):
        assert key in proc.stderr, proc.stderr
    assert "3 error(s)" in proc.stderr


def test_unwritable_output_fails_before_acquisition(binary, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = tmp_path / "c.toml"
    cfg.write_text(daemon_toml(blocker / "out", "e2ebad", None, sim_config(), zenoh_enabled=False))
    proc = run(binary, "run", "--config", cfg, timeout=60)
    # Found by the configuration's check (exit 2, with its key), before anything starts.
    assert proc.returncode == 2, proc.stderr
    assert "sinks.zarr.output" in proc.stderr and "is not a directory" in proc.stderr, proc.stderr
    assert "acquisition starting" not in proc.stderr, proc.stderr


def test_rerun_of_a_finished_plate_skips_it_and_overwrite_redoes_it(binary, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(daemon_toml(tmp_path / "out", "e2eow", None, sim_config(wells=("A1",), fields=2, size=128), zenoh_enabled=False))
    assert run(binary, "run", "--config", cfg).returncode == 0
    again = run(binary, "run", "--config", cfg)
    assert again.returncode == 0, again.stderr
    assert "fields acquired  0" in again.stdout, again.stdout
    redo = run(binary, "run", "--config", cfg, "--overwrite")
    assert redo.returncode == 0 and "fields acquired  2" in redo.stdout, redo.stdout


def test_sigterm_mid_plate_drains_and_exits_zero(binary, tmp_path):
    cfg = tmp_path / "c.toml"
    sim = sim_config(plate="stop", wells=("B2", "B3", "B4"), fields=4, size=512, rate=4.0)
    cfg.write_text(daemon_toml(tmp_path / "out", "e2estop", None, sim, zenoh_enabled=False))
    # Stopped once the first field is written, whatever the machine's speed: the simulated
    # microscope has 11 more to offer over the next 2.75 s.
    proc, lines = spawn_until(binary, cfg, "field done", timeout=120)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    err = "".join(lines) + err
    assert proc.returncode == 0, err[-3000:]
    assert "intake stopped early" in out, out
    acquired = int(out.split("fields acquired")[1].split()[0])
    done = int(out.split("fields           ")[1].split()[0])
    assert 0 < acquired < 12
    assert done == acquired, "every field that entered the pipeline is written"
    root = zarr.open_group(tmp_path / "out" / "stop.zarr", mode="r")
    listed = 0
    for w in root.attrs["ome"]["plate"]["wells"]:
        for img in root[w["path"]].attrs["ome"]["well"]["images"]:
            arr = zarr.open_array(tmp_path / "out" / "stop.zarr" / w["path"] / img["path"] / "0", mode="r")
            assert all(arr[c].max() > 0 for c in range(arr.shape[0])), "all channels written"
            listed += 1
    assert listed == acquired


def test_liveliness_status_and_summary_for_late_joiners(binary, tmp_path):
    port = free_port()
    session, sub, _ = zenoh_listener(port, "liveomics/e2estate/cells/**")
    statuses = []
    status_sub = session.declare_subscriber("liveomics/e2estate/status", lambda s: statuses.append(json.loads(s.payload.to_bytes())))
    cfg = tmp_path / "c.toml"
    sim = sim_config(plate="st", wells=("B2", "B3"), fields=3, size=256, rate=3.0)
    cfg.write_text(daemon_toml(tmp_path / "out", "e2estate", port, sim))
    proc = subprocess.Popen([str(binary), "run", "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    summary = None
    alive = []
    deadline = time.time() + 30
    while time.time() < deadline and summary is None:
        time.sleep(0.3)
        alive = [r for r in session.liveliness().get("liveomics/e2estate/alive") if r.ok is not None]
        replies = [r.ok for r in session.get("liveomics/e2estate/summary/st") if r.ok is not None]
        if replies:
            got = json.loads(replies[0].payload.to_bytes())
            if got["fields_done"] >= 1:
                summary = got
    out, err = proc.communicate(timeout=120)
    time.sleep(0.5)
    assert proc.returncode == 0, err[-3000:]
    assert alive, "the daemon's liveliness token is visible while it runs"
    assert summary is not None and summary["state"] == "running" and summary["wells"], summary
    assert statuses and statuses[-1]["state"] == "finished" and statuses[-1]["fields_done"] == 6, statuses[-3:]
    gone = [r for r in session.liveliness().get("liveomics/e2estate/alive") if r.ok is not None]
    assert not gone, "the token disappears with the daemon"
    status_sub.undeclare()
    sub.undeclare()
    session.close()


def test_the_run_accounts_for_its_processor_time(binary, tmp_path):
    """The summary's `cpu` line and `--cpu`'s table: every part of the pipeline with its
    core-seconds, the pools as the process's time beyond its parts, and the efficiency against
    what the cores allowed; the parts add up to the process."""
    import re

    cfg = tmp_path / "c.toml"
    cfg.write_text(daemon_toml(tmp_path / "out", "cpu", None, sim_config(wells=("A1", "A2"), fields=2, size=512),
                               zenoh_enabled=False, extra={"segmentation": {"method": "classical"}}))
    proc = run(binary, "run", "--config", cfg, "--cpu", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = re.search(r"cpu\s+([\d.]+) core-s of ([\d.]+) available \((\d+) cores\): efficiency (\d+)%", proc.stdout)
    assert line, proc.stdout
    process, available = float(line.group(1)), float(line.group(2))
    # Printed to 0.1 core-s: the percentage is checked to within the rounding.
    assert process > 0 and abs(int(line.group(4)) - 100 * process / available) <= 5, proc.stdout
    rows = dict(re.findall(r"^  (\S+(?: \(rayon, ORT\))?)\s+([\d.]+)\s+\d+%", proc.stdout, re.M))
    for part in ("stage-segment", "stage-measure", "worker", "sink-zarr", "source", "assembly", "tracker",
                 "pools (rayon, ORT)", "process"):
        assert part in rows, (part, proc.stdout)
    parts = sum(float(v) for k, v in rows.items() if k != "process")
    assert abs(parts - float(rows["process"])) < 0.05 + 0.02 * float(rows["process"]), proc.stdout
