"""Frames in over zenoh from a real Python publisher: the plate is written from them, bad frames
are reported by key and counted, the rest go through."""

import json
import subprocess
import time
import warnings

import numpy as np
import tifffile
import zarr
import zenoh

from liveomics_testkit import free_port, run, sim_toml, wait_for

CHANNELS = ["DAPI", "Microtubules", "ER", "TOMM20"]


def publisher(port: int):
    """A zenoh peer of the daemon's loopback endpoint, as a microscope's publisher would be."""
    conf = zenoh.Config()
    conf.insert_json5("mode", '"peer"')
    conf.insert_json5("connect/endpoints", json.dumps([f"tcp/127.0.0.1:{port}"]))
    conf.insert_json5("scouting/multicast/enabled", "false")
    return zenoh.open(conf)


def test_frames_published_over_zenoh_become_the_plate(binary, tmp_path):
    sim = tmp_path / "sim.toml"
    sim.write_text(sim_toml(plate="Z1", wells=("B2", "C5"), fields=2, size=256, seed=4))
    assert run(binary, "simulate", "--config", sim, "--out", tmp_path / "staged").returncode == 0
    manifest = json.loads((tmp_path / "staged" / "manifest.json").read_text())
    port = free_port()
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f"""
instrument = "scopeZ"
[source]
kind = "zenoh"
[source.zenoh]
plate = "Z1"
channels = {json.dumps(CHANNELS)}
width_px = 256
height_px = 256
pixel_size_um = 0.65
idle_exit_ms = 2500
[sinks.zarr]
output = "{tmp_path / 'out'}"
[sinks.zenoh]
enabled = false
[zenoh]
listen = ["tcp/127.0.0.1:{port}"]
[telemetry]
http_listen = ""
"""
    )
    proc = subprocess.Popen([str(binary), "run", "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        line = proc.stderr.readline()
        if "listening for frames" in line:
            break
    session = publisher(port)
    probe = session.declare_publisher("liveomics/scopeZ/frames/Z1/B2/0/DAPI")
    wait_for(lambda: probe.matching_status.matching, "the daemon's frame subscription")
    def header(h, w, dtype="uint16"):
        return json.dumps({"shape": [h, w], "dtype": dtype, "timepoint": 0}).encode()
    for f in manifest["files"]:
        px = tifffile.imread(tmp_path / "staged" / f["path"])
        key = f"liveomics/scopeZ/frames/Z1/{f['well']}/{f['field']}/{f['channel']}"
        session.put(key, px.astype("<u2").tobytes(), attachment=header(*px.shape),
                    congestion_control=zenoh.CongestionControl.BLOCK)
    bad = np.zeros((256, 256), "<u2").tobytes()

    def put_bad(key, payload, attachment=None):
        # Blocking like the good frames: under load zenoh's default drops a put.
        session.put(f"liveomics/scopeZ/frames/Z1/{key}", payload, attachment=attachment,
                    congestion_control=zenoh.CongestionControl.BLOCK)

    put_bad("B2/0/DAPI", bad[:1000], header(256, 256))  # byte count
    put_bad("B2/0/GFP", bad, header(256, 256))  # channel
    put_bad("Z99/0/DAPI", bad, header(256, 256))  # well
    put_bad("B2/0/DAPI", bad)  # no header
    put_bad("B2/0/DAPI", bad, header(256, 256, "float64"))  # dtype
    out, err = proc.communicate(timeout=120)
    session.close()
    assert proc.returncode == 0, err[-3000:]
    assert "fields           4 done" in out, out
    assert "5 inputs skipped" in out, out
    for reason in ("bytes", "channel", "key", "header", "dtype"):
        assert f'reason="{reason}"' in err or f"reason={reason}" in err.replace('"', ""), reason
    from ome_zarr_models.v05.hcs import HCS

    plate = tmp_path / "out" / "Z1.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HCS.from_zarr(zarr.open_group(plate, mode="r"))
    for f in manifest["files"]:
        arr = zarr.open_array(plate / f["well"][0] / f["well"][1:] / str(f["field"]) / "0", mode="r")
        np.testing.assert_array_equal(arr[CHANNELS.index(f["channel"])], tifffile.imread(tmp_path / "staged" / f["path"]))


def test_oversized_frames_are_dropped_before_they_cost_memory(binary, tmp_path):
    """60 frames of 32 MB with a valid header but the wrong shape (a 4096x4096 camera sending to a
    256x256 plate) are rejected by size before they are queued or decoded: the daemon's peak RSS
    stays under 600 MB (it reached 1.98 GB when they were queued first), and a frame of the
    right size but the wrong shape is rejected before decoding too."""
    port = free_port()
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f"""
instrument = "scopeZ"
[source]
kind = "zenoh"
[source.zenoh]
plate = "Z1"
channels = {json.dumps(CHANNELS)}
width_px = 256
height_px = 256
pixel_size_um = 0.65
idle_exit_ms = 3000
queue_frames = 64
[segmentation]
method = "classical"
[sinks.zarr]
output = "{tmp_path / 'out'}"
[sinks.zenoh]
enabled = false
[zenoh]
listen = ["tcp/127.0.0.1:{port}"]
[telemetry]
http_listen = ""
"""
    )
    proc = subprocess.Popen([str(binary), "run", "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        if "listening for frames" in proc.stderr.readline():
            break
    session = publisher(port)
    key = "liveomics/scopeZ/frames/Z1/B2/0/DAPI"
    probe = session.declare_publisher(key)
    wait_for(lambda: probe.matching_status.matching, "the daemon's frame subscription")
    big = np.ones((4096, 4096), "<u2").tobytes()
    header = json.dumps({"shape": [4096, 4096], "dtype": "uint16", "timepoint": 0}).encode()
    peak = 0
    for _ in range(60):
        session.put(key, big, attachment=header, congestion_control=zenoh.CongestionControl.BLOCK)
        status = open(f"/proc/{proc.pid}/status").read()
        peak = max(peak, int(status.split("VmHWM:")[1].split()[0]))
    wrong = json.dumps({"shape": [128, 512], "dtype": "uint16", "timepoint": 0}).encode()
    session.put(key, np.ones((128, 512), "<u2").tobytes(), attachment=wrong,
                congestion_control=zenoh.CongestionControl.BLOCK)
    time.sleep(1.0)
    status = open(f"/proc/{proc.pid}/status").read()
    peak = max(peak, int(status.split("VmHWM:")[1].split()[0]))
    out, err = proc.communicate(timeout=120)
    session.close()
    assert proc.returncode == 0, err[-3000:]
    assert "61 inputs skipped" in out, out
    assert "dropped before it was queued" in err and "a 128x512 frame" in err, err[-3000:]
    print(f"daemon peak RSS {peak / 1024:.0f} MB over 60 frames of 32 MB")
    assert peak < 600 * 1024, f"peak RSS {peak / 1024:.0f} MB"


def test_gaps_in_the_publishers_numbers_are_counted_and_named(binary, tmp_path):
    """A publisher numbers its frames (`stream`, `seq`, as the bridge does); two numbers never
    arrive (dropped on purpose between publisher and daemon): the daemon counts 2 lost frames,
    names the gaps in its log and summary, and writes the rest."""
    sim = tmp_path / "sim.toml"
    sim.write_text(sim_toml(plate="Z1", wells=("B2",), fields=3, size=64, seed=4))
    assert run(binary, "simulate", "--config", sim, "--out", tmp_path / "staged").returncode == 0
    manifest = json.loads((tmp_path / "staged" / "manifest.json").read_text())
    port = free_port()
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f"""
instrument = "scopeZ"
[source]
kind = "zenoh"
[source.zenoh]
plate = "Z1"
channels = {json.dumps(CHANNELS)}
width_px = 64
height_px = 64
pixel_size_um = 0.65
idle_exit_ms = 2500
[segmentation]
method = "classical"
[pipeline]
assembly_timeout_ms = 1000
[sinks.zarr]
output = "{tmp_path / 'out'}"
[sinks.zenoh]
enabled = false
[zenoh]
listen = ["tcp/127.0.0.1:{port}"]
[telemetry]
http_listen = ""
"""
    )
    proc = subprocess.Popen([str(binary), "run", "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        if "listening for frames" in proc.stderr.readline():
            break
    session = publisher(port)
    probe = session.declare_publisher("liveomics/scopeZ/frames/Z1/B2/0/DAPI")
    wait_for(lambda: probe.matching_status.matching, "the daemon's frame subscription")
    files = sorted(manifest["files"], key=lambda f: (f["field"], CHANNELS.index(f["channel"])))
    dropped = {5, 9}  # field 1's second channel, field 2's second channel
    for seq, f in enumerate(files):
        if seq in dropped:
            continue
        px = tifffile.imread(tmp_path / "staged" / f["path"])
        header = {"shape": list(px.shape), "dtype": "uint16", "timepoint": 0, "stream": "bridge7", "seq": seq}
        session.put(f"liveomics/scopeZ/frames/Z1/{f['well']}/{f['field']}/{f['channel']}", px.astype("<u2").tobytes(),
                    attachment=json.dumps(header).encode(), congestion_control=zenoh.CongestionControl.BLOCK)
    out, err = proc.communicate(timeout=120)
    session.close()
    assert proc.returncode == 0, err[-3000:]
    assert "frames lost      2 in transport" in out, out
    assert "1 frames lost in transport (numbers 5..5" in err and "(numbers 9..9" in err, err[-3000:]
    assert "3 done" in out and "2 incomplete" in out, out
