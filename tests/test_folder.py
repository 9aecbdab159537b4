"""Instrument folders: watch files appear (some written slowly in pieces), replay finished plates."""

import json
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import anndata
import numpy as np
import pytest
import tifffile
import zarr

from liveomics_testkit import merged, run, sim_config, toml_text

CHANNELS = ["DAPI", "Microtubules", "ER", "TOMM20"]


def folder_toml(watch_dir: Path, out: Path, layout: str, plate: str, polling=False, extra="") -> str:
    return f"""
instrument = "folders"
[source]
kind = "folder"
[source.folder]
path = "{watch_dir}"
layout = "{layout}"
plate = "{plate}"
channels = {json.dumps(CHANNELS)}
width_px = 256
height_px = 256
pixel_size_um = 0.65
polling = {str(polling).lower()}
poll_interval_ms = 100
stable_ms = 300
stuck_timeout_ms = 4000
idle_exit_ms = 2500
{extra}
[pipeline]
assembly_timeout_ms = 2000
[sinks.zarr]
output = "{out}"
[sinks.zenoh]
enabled = false
[telemetry]
http_listen = ""
"""


def stage(binary, tmp: Path, layout: str) -> tuple[Path, dict]:
    cfg = tmp / "sim.toml"
    cfg.write_text(toml_text(sim_config(plate="P1", wells=("B2", "C5"), fields=2, size=256, seed=5)))
    staged = tmp / "staged"
    assert run(binary, "simulate", "--config", cfg, "--out", staged, "--layout", layout).returncode == 0
    return staged, json.loads((staged / "manifest.json").read_text())


def feed(files: list[Path], dest: Path, slow_every: int = 3):
    """Copies files into the watched folder over time; every `slow_every`-th one in three pieces
    with pauses longer than the daemon's stable_ms, as a slow network writer would."""
    for i, src in enumerate(files):
        data = src.read_bytes()
        target = dest / src.name
        if i % slow_every == 0:
            with open(target, "wb") as fh:
                for k in range(3):
                    fh.write(data[k * len(data) // 3 : (k + 1) * len(data) // 3])
                    fh.flush()
                    time.sleep(0.45)
        else:
            target.write_bytes(data)
            time.sleep(0.02)


def stage_without(binary, tmp: Path, prefix: str, channel: str):
    """Stages a Phenix plate and copies all but one file (the `channel` of field `prefix`) into a
    watched folder; returns (staged, manifest, watch, the file held back)."""
    staged, manifest = stage(binary, tmp, "phenix")
    watch = tmp / "watch"
    watch.mkdir()
    files = sorted((staged / "images").iterdir())
    held = next(p for p in files if p.name.startswith(prefix) and f"-{channel}" in p.name)
    for p in files:
        if p != held:
            shutil.copy(p, watch / p.name)
    return staged, manifest, watch, held


def check_plate(plate: Path, staged: Path, manifest: dict):
    from ome_zarr_models.v05.hcs import HCS

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HCS.from_zarr(zarr.open_group(plate, mode="r"))
    root = zarr.open_group(plate, mode="r")
    listed = sorted((w["path"], i["path"]) for w in root.attrs["ome"]["plate"]["wells"] for i in root[w["path"]].attrs["ome"]["well"]["images"])
    assert listed == [("B/2", "0"), ("B/2", "1"), ("C/5", "0"), ("C/5", "1")], "every field once"
    for f in manifest["files"]:
        well = f["well"]
        arr = zarr.open_array(plate / well[0] / well[1:] / str(f["field"]) / "0", mode="r")
        c = CHANNELS.index(f["channel"])
        np.testing.assert_array_equal(arr[c], tifffile.imread(staged / f["path"]), err_msg=f["path"])


@pytest.mark.parametrize("layout,polling", [("phenix", False), ("imagexpress", False), ("cellvoyager", True)])
def test_watched_folder_becomes_the_plate(binary, tmp_path, layout, polling):
    staged, manifest = stage(binary, tmp_path, layout)
    watch = tmp_path / "watch"
    watch.mkdir()
    cfg = tmp_path / "run.toml"
    cfg.write_text(folder_toml(watch, tmp_path / "out", layout, "P1", polling=polling))
    proc = subprocess.Popen([str(binary), "run", "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.8)
    files = sorted((staged / "images").iterdir(), key=lambda p: p.name)
    feed(files, watch)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "fields           4 done" in out and "frames rejected  0" in out, out
    assert "0 inputs skipped" in out, out
    check_plate(tmp_path / "out" / "P1.zarr", staged, manifest)


def test_bad_files_are_reported_by_name_and_the_rest_survives(binary, tmp_path):
    # One field loses a channel; one file is truncated for good; a stray file matches no layout.
    staged, manifest, watch, missing = stage_without(binary, tmp_path, "r03c05f02", "ch4")
    broken = watch / "r03c05f02p01-ch4sk1fk1fl1.tiff"
    broken.write_bytes(missing.read_bytes()[:5000])
    (watch / "notes.txt").write_text("operator notes")
    cfg = tmp_path / "run.toml"
    cfg.write_text(folder_toml(watch, tmp_path / "out", "phenix", "P1", extra="").replace("stuck_timeout_ms = 4000", "stuck_timeout_ms = 1500"))
    proc = run(binary, "run", "--config", cfg, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "r03c05f02p01-ch4sk1fk1fl1.tiff" in proc.stderr and "unreadable" in proc.stderr
    assert "notes.txt" in proc.stderr and "unmatched_name" in proc.stderr
    assert "2 inputs skipped" in proc.stdout, proc.stdout
    assert "fields           4 done" in proc.stdout and "1 incomplete" in proc.stdout, proc.stdout
    root = zarr.open_group(tmp_path / "out" / "P1.zarr", mode="r")
    images = root["C/5"].attrs["ome"]["well"]["images"]
    assert [i["path"] for i in images] == ["0", "1"], "the incomplete field is still written"


def test_replaying_the_plate_reproduces_the_cell_records(binary, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        toml_text(merged(sim_config(plate="orig", wells=("B2", "B3"), fields=2, size=256, seed=9), {
            "sinks": {"zarr": {"output": tmp_path / "a"}, "zenoh": {"enabled": False}},
            "telemetry": {"http_listen": ""},
        }))
    )
    assert run(binary, "run", "--config", cfg).returncode == 0
    proc = run(binary, "replay", tmp_path / "a" / "orig.zarr", "--config", cfg, "--output", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fields           4 done" in proc.stdout, proc.stdout
    for well, field in [("B/2", 0), ("B/2", 1), ("B/3", 0), ("B/3", 1)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = anndata.read_zarr(tmp_path / "a" / "orig.zarr" / well / str(field) / "tables" / "table").obs
            b = anndata.read_zarr(tmp_path / "b" / "orig.zarr" / well / str(field) / "tables" / "table").obs
        assert len(a) > 5
        for col in ("label", "area_px", "centroid_x_px", "centroid_y_px", "mean_dapi", "mean_tomm20"):
            np.testing.assert_array_equal(a[col].to_numpy(), b[col].to_numpy(), err_msg=f"{well}/{field} {col}")


def test_replay_of_a_vendor_folder_detects_its_layout(binary, tmp_path):
    staged, manifest = stage(binary, tmp_path, "imagexpress")
    proc = run(
        binary, "replay", staged / "images", "--channels", ",".join(CHANNELS), "--pixel-size-um", "0.65",
        "--output", tmp_path / "out",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_plate(tmp_path / "out" / "P1.zarr", staged, manifest)


def test_tiled_compressed_bigtiff_ome_files_are_read_with_their_pixel_size(binary, tmp_path):
    staged, manifest = stage(binary, tmp_path, "phenix")
    vendor = tmp_path / "vendor"
    vendor.mkdir()
    for f in (staged / "images").iterdir():
        tifffile.imwrite(
            vendor / f.name, tifffile.imread(f), tile=(128, 128), compression="zlib", bigtiff=True,
            ome=True, metadata={"PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "µm", "axes": "YX"},
        )
    proc = run(binary, "replay", vendor, "--channels", ",".join(CHANNELS), "--output", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plate = tmp_path / "out" / "plate.zarr"
    scale = zarr.open_group(plate / "B" / "2" / "0", mode="r").attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale[-1] == pytest.approx(0.5)
    for f in manifest["files"][:4]:
        arr = zarr.open_array(plate / f["well"][0] / f["well"][1:] / str(f["field"]) / "0", mode="r")
        np.testing.assert_array_equal(arr[CHANNELS.index(f["channel"])], tifffile.imread(staged / f["path"]))


def test_replay_refuses_to_write_into_its_own_input(binary, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml_text(merged(sim_config(plate="self", wells=("A1",), fields=1, size=128),
                                    {"sinks": {"zarr": {"output": tmp_path}, "zenoh": {"enabled": False}}})))
    assert run(binary, "run", "--config", cfg).returncode == 0
    before = (tmp_path / "self.zarr" / "zarr.json").read_bytes()
    proc = run(binary, "replay", tmp_path / "self.zarr", "--config", cfg, "--overwrite")
    assert proc.returncode == 2 and "plate it reads" in proc.stderr, proc.stderr
    assert (tmp_path / "self.zarr" / "zarr.json").read_bytes() == before


def test_an_incomplete_field_is_completed_when_its_file_arrives_later(binary, tmp_path):
    staged, manifest, watch, late = stage_without(binary, tmp_path, "r02c02f01", "ch3")
    cfg = tmp_path / "run.toml"
    cfg.write_text(folder_toml(watch, tmp_path / "out", "phenix", "P1"))
    first = run(binary, "run", "--config", cfg)
    assert first.returncode == 0 and "1 incomplete" in first.stdout, first.stdout
    well = json.loads((tmp_path / "out" / "P1.zarr" / "B" / "2" / "zarr.json").read_text())["attributes"]["liveomics"]
    assert well["incomplete"] == [[0, 0]]
    shutil.copy(late, watch / late.name)
    second = run(binary, "run", "--config", cfg)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "fields acquired  1" in second.stdout, second.stdout
    well = json.loads((tmp_path / "out" / "P1.zarr" / "B" / "2" / "zarr.json").read_text())["attributes"]
    assert well["liveomics"]["incomplete"] == [] and [i["path"] for i in well["ome"]["well"]["images"]] == ["0", "1"]
    check_plate(tmp_path / "out" / "P1.zarr", staged, manifest)


def test_watching_misses_nothing(binary, tmp_path):
    """Each way a watched folder used to lose a field silently: a directory moved in, a directory
    created with its files written at once, a preallocated file filled 2 s later, a writer pausing
    2 s between pieces (longer than stable_ms, and all together longer than stuck_timeout_ms); and
    the two that must be reported: an int16 file (at once, as `dtype`) and a file changed after it
    was read (`changed_after_read`)."""
    staged, manifest = stage(binary, tmp_path, "phenix")
    files = {p.name: p for p in (staged / "images").iterdir()}
    watch = tmp_path / "watch"
    watch.mkdir()
    cfg = tmp_path / "run.toml"
    # The slow writer's field takes 7 s to complete: assembly must wait for it.
    toml = folder_toml(watch, tmp_path / "out", "phenix", "P1", extra="rescan_ms = 500")
    cfg.write_text(toml.replace("assembly_timeout_ms = 2000", "assembly_timeout_ms = 20000"))
    proc = subprocess.Popen([str(binary), "run", "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.8)

    # B2 field 1 ("r02c02f01"): a directory moved in whole.
    outside = tmp_path / "outside" / "moved"
    outside.mkdir(parents=True)
    for name in [n for n in files if n.startswith("r02c02f01")]:
        shutil.copy(files[name], outside / name)
    outside.rename(watch / "moved")
    # B2 field 2: a directory created and filled at once.
    fresh = watch / "fresh"
    fresh.mkdir()
    for name in [n for n in files if n.startswith("r02c02f02")]:
        (fresh / name).write_bytes(files[name].read_bytes())
    # C5 field 1: channel 1 preallocated (full size, pixel data zero) and filled 2 s later, as
    # robocopy does; tifffile puts the directory before the pixels, as vendors' writers do.
    pre = "r03c05f01p01-ch1sk1fk1fl1.tiff"
    vendor = tmp_path / pre
    tifffile.imwrite(vendor, tifffile.imread(files[pre]))
    data = vendor.read_bytes()
    with open(watch / pre, "wb") as fh:
        fh.truncate(len(data))
        fh.write(data[:1024])
    # channel 2 by a slow writer: four pieces, 2 s apart (6 s in all, past stuck_timeout_ms).
    slow = "r03c05f01p01-ch2sk1fk1fl1.tiff"
    for name in ("r03c05f01p01-ch3sk1fk1fl1.tiff", "r03c05f01p01-ch4sk1fk1fl1.tiff"):
        shutil.copy(files[name], watch / name)
    # C5 field 2 whole, and a signed 16-bit image of a field that never completes.
    for name in [n for n in files if n.startswith("r03c05f02")]:
        shutil.copy(files[name], watch / name)
    tifffile.imwrite(watch / "r03c05f03p01-ch1sk1fk1fl1.tiff", np.zeros((256, 256), np.int16))
    piece = files[slow].read_bytes()
    with open(watch / slow, "wb") as fh:
        for k in range(4):
            fh.write(piece[k * len(piece) // 4 : (k + 1) * len(piece) // 4])
            fh.flush()
            if k == 0:
                time.sleep(1.0)
                with open(watch / pre, "r+b") as filler:
                    filler.write(data)
                time.sleep(1.0)
            elif k < 3:
                time.sleep(2.0)
    # A file already read, written again: reported, not ignored.
    time.sleep(1.0)
    replaced = watch / "r03c05f02p01-ch1sk1fk1fl1.tiff"
    replaced.write_bytes(files["r03c05f02p01-ch2sk1fk1fl1.tiff"].read_bytes())
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "fields           4 done" in out and "frames rejected  0" in out, out
    assert "; 0 incomplete" in out and "2 inputs skipped" in out, out
    assert "int16 pixels" in err and "dtype" in err, err[-3000:]
    assert "changed_after_read" in err and replaced.name in err, err[-3000:]
    assert "unreadable" not in err, err[-3000:]
    check_plate(tmp_path / "out" / "P1.zarr", staged, manifest)


def peak_rss_mb(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    """Runs `cmd`, sampling its peak resident memory (VmHWM) until it exits."""
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        try:
            status = open(f"/proc/{proc.pid}/status").read()
            peak = max(peak, int(status.split("VmHWM:")[1].split()[0]))
        except (FileNotFoundError, IndexError):
            pass
        time.sleep(0.02)
    out, err = proc.communicate()
    return peak / 1024, subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_deflate_bombs_are_refused_from_their_directory(binary, tmp_path):
    """Three 11000x11000 uint16 TIFFs of a few hundred KB each (zeros, deflated) named as fields of
    the plate: refused as `shape` from their directory, before a pixel is decoded. The replay's
    peak RSS is that of the same replay without them, within 100 MB (24 such files took 1.9 GB
    when they were decoded first; one decoded is 242 MB)."""
    staged, manifest = stage(binary, tmp_path, "phenix")
    args = ["--channels", ",".join(CHANNELS), "--pixel-size-um", "0.65"]
    clean, proc = peak_rss_mb([binary, "replay", staged / "images", *args, "--output", tmp_path / "clean"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    bomb = tmp_path / "bomb.tiff"
    tifffile.imwrite(bomb, np.zeros((11000, 11000), np.uint16), compression="zlib", rowsperstrip=11000)
    assert bomb.stat().st_size < 2_000_000
    for i in range(3):
        shutil.copy(bomb, staged / "images" / f"r04c04f0{i + 1}p01-ch1sk1fk1fl1.tiff")
    peak, proc = peak_rss_mb([binary, "replay", staged / "images", *args, "--output", tmp_path / "out"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("11000x11000 pixels, the plate's fields are 256x256") == 3, proc.stderr[-3000:]
    assert "fields           4 done" in proc.stdout and "fields acquired  4 " in proc.stdout, proc.stdout
    print(f"replay peak RSS {peak:.0f} MB with 3 deflate bombs, {clean:.0f} MB without")
    assert peak < clean + 100, f"peak RSS {peak:.0f} MB with the bombs, {clean:.0f} MB without"
