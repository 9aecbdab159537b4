"""Several daemons on one plate, for tests/test_cluster.py and benches/scaleout_bench.py: a staged
simulated plate, a zenoh hub on a loopback port that publishes its frames, and daemon configs in
cluster mode (or alone, for the reference run)."""

import json
import time
from pathlib import Path

import numpy as np
import tifffile

from liveomics_testkit import ROOT, inference_config, merged, run, sim_toml

MODELS = ROOT / "models"

PLATE = "CL1"
INSTRUMENT = "scopeC"


def stage_plate(binary, dest: Path, wells, fields: int, size: int, seed=11) -> tuple[list[str], list[tuple]]:
    """`liveomics simulate` of the plate under `dest`: its channel names and its frames in
    acquisition order as `(well, field, channel, pixels)`."""
    sim = dest / "sim.toml"
    sim.write_text(sim_toml(plate=PLATE, wells=tuple(wells), fields=fields, size=size, seed=seed))
    r = run(binary, "simulate", "--config", sim, "--out", dest / "staged")
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((dest / "staged" / "manifest.json").read_text())
    channels = [c["name"] for c in manifest["channels"]]
    frames = [(f["well"], f["field"], f["channel"], tifffile.imread(dest / "staged" / f["path"]).astype("<u2"))
              for f in manifest["files"]]
    return channels, frames


def hub(port: int):
    """A zenoh router listening on `tcp/127.0.0.1:port`, where the daemons connect (as they would
    to a zenohd router on the network) and whose session publishes the frames: it routes the
    frames, the members' liveliness tokens and their done notices."""
    import zenoh

    conf = zenoh.Config()
    conf.insert_json5("mode", '"router"')
    conf.insert_json5("listen/endpoints", json.dumps([f"tcp/127.0.0.1:{port}"]))
    conf.insert_json5("scouting/multicast/enabled", "false")
    return zenoh.open(conf)


def publish(session, frames, fields_per_s: float = 0.0, on_field=None):
    """Publishes `frames` as the microscope would, field by field at `fields_per_s` (0: as fast as
    the daemons take them); `on_field(i)` is called after the i-th field is out."""
    import zenoh

    # A subscription declared downstream of the router takes a moment to reach it; frames put
    # before that reach nobody.
    probe = session.declare_publisher(f"liveomics/{INSTRUMENT}/frames/{PLATE}/{frames[0][0]}/0/{frames[0][2]}")
    deadline = time.monotonic() + 10
    while not probe.matching_status.matching and time.monotonic() < deadline:
        time.sleep(0.05)
    probe.undeclare()
    time.sleep(0.5)
    start = time.monotonic()
    i = 0
    last = None
    for well, field, channel, px in frames:
        if last is not None and (well, field) != last:
            i += 1
            if on_field:
                on_field(i)
            if fields_per_s > 0:
                time.sleep(max(0.0, start + i / fields_per_s - time.monotonic()))
        last = (well, field)
        header = json.dumps({"shape": list(px.shape), "dtype": "uint16", "timepoint": 0}).encode()
        session.put(f"liveomics/{INSTRUMENT}/frames/{PLATE}/{well}/{field}/{channel}", px.tobytes(),
                    attachment=header, congestion_control=zenoh.CongestionControl.BLOCK)
    if on_field:
        on_field(i + 1)


def start_all(binary, cfgs: list[dict], dest: Path, timeout=60.0, env=None) -> list:
    """Starts a daemon per config at once (members wait for each other before they listen) and
    returns them (`liveomics_testkit.Daemon`) once each listens for frames."""
    import subprocess
    import threading

    from liveomics_testkit import Daemon, toml_text

    procs = []
    for i, cfg in enumerate(cfgs):
        path = dest / f"member{i}.toml"
        path.write_text(toml_text(cfg))
        procs.append(subprocess.Popen([str(binary), "run", "--config", str(path)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
    daemons = [Daemon(p, []) for p in procs]

    def until_listening(d):
        for line in d.proc.stderr:
            d.lines.append(line)
            if "listening for frames" in line:
                return

    threads = [threading.Thread(target=until_listening, args=(d,)) for d in daemons]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    for d in daemons:
        if not any("listening for frames" in x for x in d.lines):
            for x in daemons:
                x.proc.kill()
            raise RuntimeError("a member did not start: " + "".join(d.lines)[-3000:])
    return daemons


class S3Server:
    """moto's S3 server on a free loopback port with one bucket: a real HTTP endpoint speaking
    the S3 REST protocol (the same requests a MinIO, Ceph or AWS endpoint gets), in-process state
    only. `env` is what a daemon and the Python readers need to reach it."""

    def __init__(self, bucket="plates"):
        import os
        import subprocess
        import sys
        import urllib.request

        from liveomics_testkit import free_port

        self.bucket = bucket
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1)
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.proc.kill()
                    raise RuntimeError("moto's S3 server did not start")
                time.sleep(0.2)
        self.env = {**os.environ, "AWS_ENDPOINT_URL": self.endpoint, "AWS_ALLOW_HTTP": "true",
                    "AWS_ACCESS_KEY_ID": "liveomics", "AWS_SECRET_ACCESS_KEY": "liveomics",
                    "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
        self.fs().mkdir(bucket)

    def options(self) -> dict:
        """fsspec's (s3fs's) settings for the server."""
        return {"key": "liveomics", "secret": "liveomics", "client_kwargs": {"endpoint_url": self.endpoint}}

    def fs(self):
        """An s3fs filesystem on the server."""
        import s3fs

        return s3fs.S3FileSystem(**self.options(), skip_instance_cache=True)

    def group(self, path: str):
        """The zarr group at `s3://{bucket}/{path}`, read with zarr-python through s3fs."""
        import zarr

        store = zarr.storage.FsspecStore.from_url(f"s3://{self.bucket}/{path}", storage_options=self.options(),
                                                  read_only=True)
        return zarr.open_group(store, mode="r")

    def close(self):
        self.proc.kill()
        self.proc.wait()


def weight(member: str, plate: str, well: str) -> int:
    """`cluster::weight`: FNV-1a of `member/plate/well`, then splitmix64's finaliser."""
    m = (1 << 64) - 1
    h = 0xCBF29CE484222325
    for b in f"{member}/{plate}/{well}".encode():
        h = ((h ^ b) * 0x100000001B3) & m
    z = (h + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def owner(members, well: str) -> str:
    """The member a well goes to when all of `members` are live (rendezvous hashing)."""
    return max(members, key=lambda name: (weight(name, PLATE, well), name))


def killer(victim, frames, members, name: str, min_done: int = 1):
    """An `on_field` callback for `publish` that SIGKILLs `victim` (member `name` of `members`, a
    process whose log lines something appends to `victim.lines`) right after a field of one of
    its wells went out, once it has done `min_done` fields: it dies with that field in flight.
    Once more than `min_done` of its fields are out, the publisher waits (up to 120 s) for it to
    have done `min_done` rather than let the plate end without a kill on a slow machine. Its
    `killed_at` holds the time."""
    import signal

    order = []
    for well, field, _, _ in frames:
        if not order or order[-1] != (well, field):
            order.append((well, field))
    its = 0

    def done():
        return sum("field done" in x for x in list(victim.lines))

    def on_field(i):
        nonlocal its
        if victim.proc.poll() is not None or on_field.killed_at or i > len(order):
            return
        if owner(members, order[i - 1][0]) != name:
            return
        its += 1
        deadline = time.monotonic() + 120
        while its > min_done and done() < min_done and time.monotonic() < deadline:
            time.sleep(0.02)
        if done() >= min_done:
            victim.proc.send_signal(signal.SIGKILL)
            on_field.killed_at = time.time()

    on_field.killed_at = None
    return on_field


def daemon_config(out: Path, port: int, channels, size: int, member: str | None, members: int,
                  idle_exit_ms=5000, workers=1) -> dict:
    """A daemon fed by the hub's frames, classical segmentation and the reference well-omics
    model, writing the plate under `out`; in cluster mode as `member` of `members`."""
    cfg = merged({
        "instrument": INSTRUMENT,
        "latency_budget_ms": 10000,
        "source": {"kind": "zenoh", "zenoh": {
            "plate": PLATE, "channels": list(channels), "width_px": size, "height_px": size,
            "pixel_size_um": 0.65, "idle_exit_ms": idle_exit_ms, "queue_frames": 256,
        }},
        "segmentation": {"method": "classical"},
        "sinks": {"zarr": {"output": out}, "zenoh": {"enabled": False}},
        "zenoh": {"mode": "client", "listen": [], "connect": [f"tcp/127.0.0.1:{port}"]},
        "telemetry": {"http_listen": ""},
    }, inference_config(("wellomics", MODELS / "well_omics_mil"), workers=workers))
    if member:
        cfg["cluster"] = {"enabled": True, "member": member, "expect_members": members,
                          "startup_wait_ms": 30000, "finish_wait_ms": 60000}
    return cfg


def readouts(plate) -> dict:
    """`{well: values}` of the well-omics readout in each well's attributes of `plate` (a
    directory or an open zarr group)."""
    import zarr

    root = plate if isinstance(plate, zarr.Group) else zarr.open_group(plate, mode="r")
    out = {}
    for w in root.attrs["ome"]["plate"]["wells"]:
        bulk = root[w["path"]].attrs["liveomics"]["bulk"]["wellomics"]
        out[w["path"]] = (bulk["fields"], np.array(bulk["values"], dtype=np.float64))
    return out
