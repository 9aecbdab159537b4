"""The OME-Zarr output in full: pyramids, labels, tables, validators, crash-safe resume."""

import json
import random
import signal
import subprocess
import time
import warnings
from pathlib import Path

import anndata
import numpy as np
import pytest
import tensorstore as ts
import tifffile
import yaozarrs
import zarr

from liveomics_testkit import daemon_toml, run, sim_config

LEVELS = 3


def down_mean(a: np.ndarray) -> np.ndarray:
    """2x2 mean with rounding, odd edges repeated: the definition the daemon implements."""
    h, w = a.shape
    p = np.pad(a.astype(np.uint32), ((0, h % 2), (0, w % 2)), mode="edge")
    s = p[0::2, 0::2] + p[1::2, 0::2] + p[0::2, 1::2] + p[1::2, 1::2]
    return ((s + 2) // 4).astype(np.uint16)


@pytest.fixture(scope="module")
def plate(binary, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("out")
    cfg = tmp / "c.toml"
    sim = sim_config(plate="full", wells=("A1", "H12"), fields=2, size=300, seed=3)
    cfg.write_text(daemon_toml(tmp / "out", "outtest", None, sim, zenoh_enabled=False))
    proc = run(binary, "run", "--config", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run(binary, "simulate", "--config", cfg, "--out", tmp / "truth").returncode == 0
    return tmp / "out" / "full.zarr", tmp / "truth"


def images(plate: Path):
    root = zarr.open_group(plate, mode="r")
    for w in root.attrs["ome"]["plate"]["wells"]:
        for img in root[w["path"]].attrs["ome"]["well"]["images"]:
            yield w["path"], img["path"], plate / w["path"] / img["path"]


def test_every_level_pixel_exact_with_zarr_python_and_tensorstore(plate):
    plate, truth = plate
    manifest = json.loads((truth / "manifest.json").read_text())
    seen = 0
    for well, field, path in images(plate):
        attrs = zarr.open_group(path, mode="r").attrs["ome"]
        datasets = attrs["multiscales"][0]["datasets"]
        assert [d["path"] for d in datasets] == [str(k) for k in range(LEVELS)]
        scales = [d["coordinateTransformations"][0]["scale"][-1] for d in datasets]
        assert scales == pytest.approx([0.65 * 2**k for k in range(LEVELS)])
        for c, ch in enumerate(manifest["channels"]):
            expected = tifffile.imread(truth / "images" / f"{well.replace('/', '')}_f{field}_t0_{ch['name']}.tif")
            for k in range(LEVELS):
                z = zarr.open_array(path / str(k), mode="r")[c]
                t = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / str(k))}}).result()[c].read().result()
                np.testing.assert_array_equal(z, expected)
                np.testing.assert_array_equal(t, expected)
                expected = down_mean(expected)
        for name in ("nuclei", "cells"):
            lab = [zarr.open_array(path / "labels" / name / str(k), mode="r")[0] for k in range(LEVELS)]
            for k in range(1, LEVELS):
                np.testing.assert_array_equal(lab[k], lab[k - 1][0::2, 0::2])
                t = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / "labels" / name / str(k))}}).result()
                np.testing.assert_array_equal(t[0].read().result(), lab[k])
        seen += 1
    assert seen == 4


def test_validators_pass(plate):
    from ome_zarr_models.v05.hcs import HCS

    plate, _ = plate
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HCS.from_zarr(zarr.open_group(plate, mode="r"))
    yaozarrs.validate_zarr_store(str(plate))


def test_labels_carry_colours_and_properties(plate):
    plate, _ = plate
    for _, _, path in images(plate):
        cells = zarr.open_array(path / "labels" / "cells" / "0", mode="r")[0]
        meta = zarr.open_group(path / "labels" / "cells", mode="r").attrs["ome"]["image-label"]
        ids = set(np.unique(cells[cells > 0]).tolist())
        assert {p["label-value"] for p in meta["properties"]} == ids
        assert {c["label-value"] for c in meta["colors"]} == ids
        areas = {p["label-value"]: p["area_px"] for p in meta["properties"]}
        for label in list(ids)[:5]:
            assert areas[label] == int((cells == label).sum())


def test_anndata_tables_match_labels(plate):
    plate, _ = plate
    for well, field, path in images(plate):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = anndata.read_zarr(path / "tables" / "table")
        cells = zarr.open_array(path / "labels" / "cells" / "0", mode="r")[0]
        ids = np.unique(cells[cells > 0])
        assert a.n_obs == len(ids)
        assert sorted(a.obs["label"].tolist()) == ids.tolist()
        assert set(a.obs["well"]) == {well.replace("/", "")}
        assert set(a.obs["field"]) == {int(field)}
        assert {"centroid_x_px", "area_px", "mean_dapi", "mean_tomm20"} <= set(a.obs.columns)
        assert a.obs.index.is_unique
        keys = {"region": "cells", "region_key": "region", "instance_key": "label"}
        assert a.uns["spatialdata_attrs"] == keys
        attrs = zarr.open_group(path / "tables" / "table", mode="r").attrs
        assert {k: attrs[k] for k in keys} == keys
        assert attrs["spatialdata-encoding-type"] == "ngff:regions_table" and attrs["version"] == "0.2"


def test_ngff_zarr_strict_schemas_pass(plate):
    """ngff-zarr's strict schemas: the SHOULDs of the spec as requirements (a pyramid's `type` and
    `metadata` among them) on the plate, every well, every image and every label image."""
    from ngff_zarr.validate import validate

    plate, _ = plate
    ome = lambda p: {"ome": zarr.open_group(p, mode="r").attrs["ome"]}  # noqa: E731
    validate(ome(plate), version="0.5", model="plate", strict=True)
    seen = 0
    for well, _, path in images(plate):
        validate(ome(plate / well), version="0.5", model="well", strict=True)
        validate(ome(path), version="0.5", model="image", strict=True)
        assert ome(path)["ome"]["multiscales"][0]["type"] == "mean"
        for name in ("nuclei", "cells"):
            label = ome(path / "labels" / name)
            validate(label, version="0.5", model="label", strict=True)
            validate(label, version="0.5", model="image", strict=True)
            assert label["ome"]["multiscales"][0]["type"] == "nearest"
            assert label["ome"]["multiscales"][0]["metadata"]["method"].endswith("downsample2x_nearest")
        seen += 1
    assert seen == 4


def test_spatialdata_reads_a_field_with_its_table_annotating_the_cells(plate):
    """A field's image, cell labels and table in one SpatialData object (spatialdata 0.8): the
    table is read by spatialdata's own reader and annotates the `cells` label element, id for id."""
    import dask.array as da
    import spatialdata as sd
    from spatialdata.models import Image2DModel, Labels2DModel
    from spatialdata.transformations import Scale

    plate, _ = plate
    _, _, path = next(images(plate))
    px = zarr.open_group(path, mode="r").attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"][-1]
    um = {"global": Scale([px, px], axes=("y", "x"))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = sd.read_zarr(path, selection=("tables",))["table"]
        cells = da.from_zarr(zarr.open_array(path / "labels" / "cells" / "0", mode="r"))[0]
        s = sd.SpatialData(
            images={"raw": Image2DModel.parse(da.from_zarr(zarr.open_array(path / "0", mode="r")),
                                              dims=("c", "y", "x"), transformations=um)},
            labels={"cells": Labels2DModel.parse(cells, dims=("y", "x"), transformations=um)},
            tables={"table": table},
        )
        assert sd.get_element_annotators(s, "cells") == {"table"}
        region, region_key, instance_key = sd.models.get_table_keys(s["table"])
        assert (region, region_key, instance_key) == ("cells", "region", "label")
        ids = np.unique(np.asarray(cells))
        ids = ids[ids > 0]
        assert sorted(s["table"].obs[instance_key].tolist()) == ids.tolist()
        # Indexed by the label ids of `cells`: each value belongs to the cell it is joined to.
        area = sd.get_values("area_px", sdata=s, element_name="cells", table_name="table")
    a = anndata.read_zarr(path / "tables" / "table")
    by_label = dict(zip(a.obs["label"].tolist(), a.obs["area_px"].tolist()))
    assert sorted(area.index.tolist()) == ids.tolist()
    assert [by_label[i] for i in area.index] == area["area_px"].tolist()
    counts = np.bincount(np.asarray(cells).ravel())
    np.testing.assert_array_equal(area["area_px"].to_numpy(), counts[area.index.to_numpy()])


def test_different_plate_in_output_is_refused_and_untouched(binary, tmp_path):
    cfg = tmp_path / "a.toml"
    cfg.write_text(daemon_toml(tmp_path / "out", "diff", None, sim_config(plate="same", wells=("A1",), fields=1, size=128), zenoh_enabled=False))
    assert run(binary, "run", "--config", cfg).returncode == 0
    before = (tmp_path / "out" / "same.zarr" / "zarr.json").read_bytes()
    other = tmp_path / "b.toml"
    other.write_text(daemon_toml(tmp_path / "out", "diff", None, sim_config(plate="same", wells=("A1",), fields=1, size=256), zenoh_enabled=False))
    proc = run(binary, "run", "--config", other)
    assert proc.returncode == 1
    assert "holds a different plate" in proc.stderr, proc.stderr
    assert "differing: " in proc.stderr and "width_px" in proc.stderr.split("differing: ")[1].split(";")[0], proc.stderr
    assert (tmp_path / "out" / "same.zarr" / "zarr.json").read_bytes() == before


def test_overwrite_never_deletes_a_directory_liveomics_did_not_write(binary, tmp_path):
    foreign = tmp_path / "out" / "mine.zarr"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("a user's data")
    cfg = tmp_path / "a.toml"
    cfg.write_text(daemon_toml(tmp_path / "out", "mine", None, sim_config(plate="mine", wells=("A1",), fields=1, size=128), zenoh_enabled=False))
    for extra in ([], ["--overwrite"]):
        proc = run(binary, "run", "--config", cfg, *extra)
        assert proc.returncode == 1, proc.stderr
        assert "is not a plate written by liveomics" in proc.stderr, proc.stderr
        assert (foreign / "notes.txt").read_text() == "a user's data"


def test_a_corrupted_plate_root_is_named_as_such_and_kept(binary, tmp_path):
    cfg = tmp_path / "a.toml"
    cfg.write_text(daemon_toml(tmp_path / "out", "bad", None, sim_config(plate="bad", wells=("A1",), fields=1, size=128), zenoh_enabled=False))
    assert run(binary, "run", "--config", cfg).returncode == 0
    root = tmp_path / "out" / "bad.zarr" / "zarr.json"
    root.write_text('{"zarr_format": 3, "node_type": "gro')
    for extra in ([], ["--overwrite"]):
        proc = run(binary, "run", "--config", cfg, *extra)
        assert proc.returncode == 1, proc.stderr
        assert "root metadata (zarr.json) is not readable JSON" in proc.stderr, proc.stderr
        assert "not a plate written by liveomics" not in proc.stderr
        assert root.read_text() == '{"zarr_format": 3, "node_type": "gro'
        assert (tmp_path / "out" / "bad.zarr" / "A" / "1" / "0" / "zarr.json").exists()


def check_complete_plate(plate: Path, truth: Path, wells, fields):
    from ome_zarr_models.v05.hcs import HCS

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HCS.from_zarr(zarr.open_group(plate, mode="r"))
    root = zarr.open_group(plate, mode="r")
    listed = sorted((w["path"], i["path"]) for w in root.attrs["ome"]["plate"]["wells"] for i in root[w["path"]].attrs["ome"]["well"]["images"])
    expected = sorted((f"{w[0]}/{w[1:]}", str(f)) for w in wells for f in range(fields))
    assert listed == expected, "every field exactly once"
    index = []
    for well, field, path in images(plate):
        raw = zarr.open_array(path / "0", mode="r")[0]
        np.testing.assert_array_equal(raw, tifffile.imread(truth / "images" / f"{well.replace('/', '')}_f{field}_t0_DAPI.tif"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = anndata.read_zarr(path / "tables" / "table")
        cells = zarr.open_array(path / "labels" / "cells" / "0", mode="r")[0]
        assert a.n_obs == len(np.unique(cells[cells > 0]))
        index.extend(a.obs.index)
    assert len(index) == len(set(index)), "no duplicate table rows"


def plate_state(plate: Path) -> tuple[int, int]:
    """(fields listed, image directories present but not listed) after a kill."""
    try:
        root = json.loads((plate / "zarr.json").read_text())["attributes"]
    except (FileNotFoundError, KeyError):
        return 0, 0
    listed = set()
    for w in root.get("ome", {}).get("plate", {}).get("wells", []):
        well = json.loads((plate / w["path"] / "zarr.json").read_text())["attributes"]["ome"]["well"]
        listed |= {f"{w['path']}/{i['path']}" for i in well["images"]}
    present = {str(p.relative_to(plate)) for p in plate.glob("*/*/*") if p.is_dir()}
    return len(listed), len(present - listed)


def crash_trial(binary: Path, tmp: Path, seed: int) -> tuple[int, int, int]:
    """Kills the daemon with SIGKILL at a random point, restarts it to completion, checks the plate.
    Returns (fields complete at the kill, partial fields at the kill, fields acquired on restart)."""
    rng = random.Random(seed)
    wells, fields = ("B2", "B3", "C2"), 3
    cfg = tmp / "c.toml"
    sim = sim_config(plate="crash", wells=wells, fields=fields, size=256, rate=20.0)
    cfg.write_text(daemon_toml(tmp / "out", "crash", None, sim, zenoh_enabled=False))
    proc = subprocess.Popen([str(binary), "run", "--config", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(0.05, 1.2))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    complete, partial = plate_state(tmp / "out" / "crash.zarr")
    again = run(binary, "run", "--config", cfg)
    assert again.returncode == 0, again.stderr[-3000:]
    truth = tmp / "truth"
    if not truth.exists():
        assert run(binary, "simulate", "--config", cfg, "--out", truth).returncode == 0
    check_complete_plate(tmp / "out" / "crash.zarr", truth, wells, fields)
    redone = int(again.stdout.split("fields acquired")[1].split()[0])
    assert complete + redone == len(wells) * fields, "complete fields are skipped, the rest redone"
    return complete, partial, redone


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_then_restart_gives_every_field_once(binary, tmp_path, seed):
    crash_trial(binary, tmp_path, seed)


def test_resume_verifies_what_it_skips(binary, tmp_path):
    """Six listed fields, each damaged after the run in one of the ways a disk, a copy or a person
    can: a truncated raw shard, a zeroed one, an invalid and a deleted field zarr.json, a deleted
    label shard, a deleted table. A restart finds each, says which and why, takes it off the
    listing and redoes it; the plate then equals the undamaged one."""
    import shutil
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from compare_plates import compare

    wells, fields = ("B2", "B3", "C2"), 2
    cfg = tmp_path / "c.toml"
    sim = sim_config(plate="verify", wells=wells, fields=fields, size=256)
    cfg.write_text(daemon_toml(tmp_path / "out", "verify", None, sim, zenoh_enabled=False))
    assert run(binary, "run", "--config", cfg).returncode == 0
    plate = tmp_path / "out" / "verify.zarr"
    shutil.copytree(plate, tmp_path / "reference.zarr")
    shard = plate / "B/2/0/0/c/0/0/0"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    zeroed = plate / "B/2/1/0/c/1/0/0"
    zeroed.write_bytes(bytes(zeroed.stat().st_size))
    (plate / "B/3/0/zarr.json").write_text('{"zarr_format": 3, "node_type"')
    (plate / "B/3/1/zarr.json").unlink()
    (plate / "C/2/0/labels/cells/0/c/0/0/0").unlink()
    shutil.rmtree(plate / "C/2/1/tables/table")
    again = run(binary, "run", "--config", cfg)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stderr
    for field, part, why in [
        ("B2/f0", "raw", "index fails its CRC32C"),
        ("B2/f1", "raw", "index fails its CRC32C"),
        ("B3/f0", "metadata", "not readable JSON"),
        ("B3/f1", "metadata", "missing"),
        ("C2/f0", "labels", "its shard is missing"),
        ("C2/f1", "table", "tables/table/zarr.json is missing"),
    ]:
        line = next((ln for ln in log.splitlines() if f"verify/{field}/t0" in ln and "failed verification" in ln), "")
        assert f'part="{part}"' in line and why in line, (field, log[-3000:])
    assert int(again.stdout.split("fields acquired")[1].split()[0]) == 6, again.stdout
    truth = tmp_path / "truth"
    assert run(binary, "simulate", "--config", cfg, "--out", truth).returncode == 0
    check_complete_plate(plate, truth, wells, fields)
    # Contrast windows follow the fields a run has seen; the rest must be equal.
    assert compare(tmp_path / "reference.zarr", plate, ignore=frozenset({"window"})) == []


def test_disk_full_stops_intake_and_keeps_complete_fields_valid(binary, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("skipped: cannot mount a small tmpfs here (needs root) to fill a disk")
    try:
        cfg = tmp_path / "c.toml"
        sim = sim_config(plate="full", wells=("A1", "A2", "A3", "A4"), fields=4, size=256)
        cfg.write_text(daemon_toml(mnt / "out", "diskfull", None, sim, zenoh_enabled=False))
        proc = run(binary, "run", "--config", cfg)
        assert proc.returncode == 3, (proc.returncode, proc.stderr[-2000:])
        assert "stopping intake" in proc.stderr and "No space left on device" in proc.stderr
        assert "intake stopped early" in proc.stdout
        plate = mnt / "out" / "full.zarr"
        root = zarr.open_group(plate, mode="r")
        if "ome" in root.attrs:
            from ome_zarr_models.v05.hcs import HCS

            with warnings.catch_warnings():
                warnings.simplefilter("error")
                HCS.from_zarr(root)
            assert run(binary, "simulate", "--config", cfg, "--out", tmp_path / "truth").returncode == 0
            listed = 0
            for well, field, path in images(plate):
                np.testing.assert_array_equal(
                    zarr.open_array(path / "0", mode="r")[0],
                    tifffile.imread(tmp_path / "truth" / "images" / f"{well.replace('/', '')}_f{field}_t0_DAPI.tif"),
                )
                listed += 1
            assert listed < 16
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_timepoints_get_a_time_axis(binary, tmp_path):
    from ome_zarr_models.v05.hcs import HCS

    cfg = tmp_path / "c.toml"
    sim = sim_config(plate="tl", wells=("C3",), fields=1, size=128, extra={"timepoints": 2})
    cfg.write_text(daemon_toml(tmp_path / "out", "time", None, sim, zenoh_enabled=False))
    proc = run(binary, "run", "--config", cfg)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert run(binary, "simulate", "--config", cfg, "--out", tmp_path / "truth").returncode == 0
    plate = tmp_path / "out" / "tl.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HCS.from_zarr(zarr.open_group(plate, mode="r"))
    image = plate / "C" / "3" / "0"
    axes = [a["name"] for a in zarr.open_group(image, mode="r").attrs["ome"]["multiscales"][0]["axes"]]
    assert axes == ["t", "c", "y", "x"]
    raw = zarr.open_array(image / "0", mode="r")
    assert raw.shape == (2, 4, 128, 128)
    for t in (0, 1):
        np.testing.assert_array_equal(raw[t, 0], tifffile.imread(tmp_path / "truth" / "images" / f"C3_f0_t{t}_DAPI.tif"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = anndata.read_zarr(image / f"t{t}" / "tables" / "table")
        assert set(table.obs["timepoint"]) == {t}
    assert zarr.open_array(image / "labels" / "cells" / "0", mode="r").shape == (2, 1, 128, 128)


@pytest.mark.parametrize("size", [1000, 1021])
def test_sizes_that_are_not_chunk_multiples(binary, tmp_path, size):
    cfg = tmp_path / "c.toml"
    cfg.write_text(daemon_toml(tmp_path / "out", "sizes", None, sim_config(plate="odd", wells=("A1",), fields=1, size=size), zenoh_enabled=False))
    proc = run(binary, "run", "--config", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run(binary, "simulate", "--config", cfg, "--out", tmp_path / "truth").returncode == 0
    plate = tmp_path / "out" / "odd.zarr"
    yaozarrs.validate_zarr_store(str(plate))
    expected = tifffile.imread(tmp_path / "truth" / "images" / "A1_f0_t0_DAPI.tif")
    for k in range(LEVELS):
        np.testing.assert_array_equal(zarr.open_array(plate / "A" / "1" / "0" / str(k), mode="r")[0], expected)
        expected = down_mean(expected)


def test_before_its_first_field_the_plate_is_a_marked_group(binary, tmp_path):
    """A run that has listed no field yet (a folder still empty): the root is a readable zarr
    group with the liveomics marker and no `ome.plate` (NGFF requires a plate to list a well)."""
    watch = tmp_path / "watch"
    watch.mkdir()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
instrument = "empty"
[source]
kind = "folder"
[source.folder]
path = "{watch}"
plate = "E1"
channels = ["DAPI", "ER"]
width_px = 64
height_px = 64
pixel_size_um = 0.65
[segmentation]
method = "classical"
[sinks.zarr]
output = "{tmp_path / 'out'}"
[sinks.zenoh]
enabled = false
[telemetry]
http_listen = ""
""")
    proc = subprocess.Popen([str(binary), "run", "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "acquisition starting" in line:
                break
        root = zarr.open_group(tmp_path / "out" / "E1.zarr", mode="r")
        assert "liveomics" in root.attrs and "plate" not in root.attrs.get("ome", {}), dict(root.attrs)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
