"""Who can reach the daemon and the microscope bridge over zenoh (docs/SECURITY.md).

- With the default configuration the daemon's sockets are bound to loopback only (read from the
  process's own sockets in /proc) and it does not scout by multicast.
- With the repo's TLS + access-control examples (config/zenoh/*.json5), a zenoh session without a
  certificate from the plate's CA cannot connect, one with a CA certificate under another name is
  connected but cannot get a frame or a follow-up request accepted, and the bridge's and the
  daemon's own identities can.
"""

import ipaddress
import json
import os
import socket
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
import zenoh

from liveomics_testkit import (NO_FIXED_PORTS, demo_core, free_port, http_get, loopback_hub, merged, sim_config, spawn_until,
                               start_zenoh_daemon, toml_text, wait_for)
from zenoh_tls import make_pki

pytest.importorskip("pymmcore_plus")
pytest.importorskip("mm_test_adapters")
from liveomics_bridge import Bridge, FollowupLimits, session_config  # noqa: E402


def _sockets(pid: int) -> list[tuple[str, str, str]]:
    """(protocol, local address, state) of every inet socket the process holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[9] not in inodes:
                continue
            hexaddr, hexport = cols[1].split(":")
            raw = bytes.fromhex(hexaddr)
            # /proc prints the address as 32-bit words in host (little-endian) order.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.append((proto, f"{ipaddress.ip_address(raw)}:{int(hexport, 16)}", cols[3]))
    return found


def test_default_config_binds_only_loopback(binary, tmp_path):
    for port, what in ((7447, "the default zenoh endpoint"), (9464, "the default metrics endpoint")):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                pytest.skip(f"port {port} ({what}) is taken on this host")
    cfg = tmp_path / "run.toml"
    # Only the plate and the output change: [zenoh] and [telemetry] are the embedded defaults.
    sim = sim_config(plate="sec", wells=("A1",), fields=6, size=128, rate=2.0)
    for section in NO_FIXED_PORTS:
        del sim[section]
    cfg.write_text(toml_text(merged(sim, {"sinks": {"zarr": {"output": tmp_path / "out"}}})))
    proc, lines = spawn_until(binary, cfg, "acquisition starting")
    try:
        socks = _sockets(proc.pid)
        # A client on this host reaches it through the documented endpoint.
        reader = zenoh.open(session_config())
        seen = []
        reader.declare_subscriber("liveomics/scope1/cells/sec/**", lambda s: seen.append(str(s.key_expr)))
        out, err = proc.communicate(timeout=60)
        reader.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    listening = [s for s in socks if s[2] == "0A" or s[0].startswith("udp")]
    assert any(addr == "127.0.0.1:7447" for _, addr, _ in listening), socks
    for proto, addr, _ in socks:
        host = addr.rsplit(":", 1)[0]
        assert ipaddress.ip_address(host).is_loopback, f"{proto} socket on {addr}: {socks}"
    assert not any(p.startswith("udp") for p, _, _ in socks), f"multicast scouting socket: {socks}"
    assert "zenoh is reachable from the network" not in "".join(lines) + err
    assert seen, "a local client on tcp/127.0.0.1:7447 heard nothing"


def test_an_exposed_session_without_security_is_warned_about(binary, tmp_path):
    cfg = tmp_path / "run.toml"
    port = free_port()
    cfg.write_text(toml_text(merged(sim_config(plate="exp", wells=("A1",), fields=1, size=128), {
        "sinks": {"zarr": {"output": tmp_path / "out"}},
        "zenoh": {"listen": [f"tcp/0.0.0.0:{port}"]},
        "telemetry": {"http_listen": ""},
    })))
    p = subprocess.run([str(binary), "run", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "zenoh is reachable from the network without TLS" in p.stderr


def test_a_zenoh_file_that_sets_the_endpoints_is_refused_with_its_key(binary, tmp_path):
    f = tmp_path / "z.json5"
    f.write_text('{ listen: { endpoints: ["tcp/0.0.0.0:7447"] } }')
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[zenoh]\nconfig_file = "{f}"\n[sinks.zenoh]\nlisten = []\n')
    p = subprocess.run([str(binary), "validate", str(cfg)], capture_output=True, text=True)
    assert p.returncode == 2
    assert "zenoh.config_file" in p.stderr and "listen/endpoints" in p.stderr and "zenoh.listen" in p.stderr
    assert "sinks.zenoh.listen: moved to zenoh.listen" in p.stderr
    from liveomics_bridge import SessionConfigError

    with pytest.raises(SessionConfigError, match="listen/endpoints"):
        session_config(config_file=f)
    # Restating what the bridge sets is not a collision.
    same = tmp_path / "same.json5"
    same.write_text('{ mode: "peer", scouting: { multicast: { enabled: false } } }')
    assert session_config(config_file=same).get_json("mode") == '"peer"'


def test_the_bridge_warns_when_it_is_reachable_unprotected(caplog):
    session_config(listen=["tcp/0.0.0.0:7448"])
    assert "reachable from the network (tcp/0.0.0.0:7448)" in caplog.text
    caplog.clear()
    session_config()
    assert "reachable from the network" not in caplog.text


def _header(h=512, w=512):
    return json.dumps({"shape": [h, w], "dtype": "uint16", "timepoint": 0}).encode()


def _put_field(session, well, field=0):
    px = np.full((512, 512), 300, "<u2").tobytes()
    for ch in ("DAPI", "FITC"):
        session.put(f"liveomics/sec/frames/S1/{well}/{field}/{ch}", px, attachment=_header(),
                    congestion_control=zenoh.CongestionControl.BLOCK)


def _request(rid, well="B1", field=1000, plate="S1"):
    events = [{"channel": {"config": ch, "group": "Channel"}, "x_pos": 10.0, "y_pos": 10.0,
               "index": {"p": 0, "c": i}, "metadata": {"liveomics": {"followup_id": rid, "plate": plate,
                                                                    "well": well, "field": field}}}
              for i, ch in enumerate(("DAPI", "FITC"))]
    return json.dumps({"id": rid, "rule": "t", "plate": plate, "well": well, "trigger": {"field": 0},
                       "fields": [field], "events": events}).encode()


def _open(conf):
    """A session, or None when zenoh refuses to open it (e.g. the TLS handshake fails)."""
    try:
        return zenoh.open(conf)
    except Exception:
        return None


def _without_acl(path):
    path.write_text(path.read_text().replace("enabled: true", "enabled: false"))
    return path


@pytest.mark.parametrize("acl", [True, False], ids=["tls+acl", "tls-only"])
def test_tls_and_acl_let_only_the_right_identities_in(binary, tmp_path, acl):
    """With access control off (the control case) the intruder's frame and request get in,
    which shows that it is the access control, not the test, that keeps them out."""
    pki = make_pki(tmp_path / "pki")
    port, bport = free_port(), free_port()
    daemon_ep, bridge_ep = f"tls/127.0.0.1:{port}", f"tls/127.0.0.1:{bport}"
    zfile = pki.example("daemon-tls-acl.json5", tmp_path / "daemon.json5")
    bfile = pki.example("bridge-tls-acl.json5", tmp_path / "bridge.json5")
    if not acl:
        _without_acl(zfile)
        _without_acl(bfile)
    proc, _ = start_zenoh_daemon(binary, tmp_path, daemon_ep, instrument="sec", plate="S1", idle_exit_ms=12000,
                                 zenoh_file=zfile)

    bconf = session_config(connect=[daemon_ep], listen=[bridge_ep], config_file=bfile)
    acks = []
    bridge = Bridge(demo_core(), "sec", "S1", bconf, idle_s=2.0,
                    limits=FollowupLimits(stage_um=(-1e4, 1e4, -1e4, 1e4)))
    time.sleep(1.0)
    try:
        # A certificate from another CA: the TLS handshake fails, nothing gets through.
        stranger = _open(pki.client("stranger", [daemon_ep, bridge_ep]))
        # The plate's CA, another name: connected, but access control drops what it publishes.
        intruder = zenoh.open(pki.client("intruder", [daemon_ep, bridge_ep]))
        # The daemon's own identity, connected to the bridge directly.
        # A read-only client's certificate: it may watch, not publish frames or requests.
        reader = zenoh.open(pki.client("reader", [daemon_ep, bridge_ep]))
        as_daemon = zenoh.open(pki.client("daemon", [bridge_ep]))
        as_daemon.declare_subscriber("liveomics/sec/followup/S1/ack",
                                     lambda s: acks.append(json.loads(s.payload.to_bytes())))
        time.sleep(1.0)
        if stranger is not None:
            _put_field(stranger, "A1")
            stranger.put("liveomics/sec/followup/S1", _request("stranger-1"))
        _put_field(intruder, "A2")
        intruder.put("liveomics/sec/followup/S1", _request("intruder-1", field=1001))
        _put_field(reader, "A3")
        reader.put("liveomics/sec/followup/S1", _request("reader-1", field=1002))
        time.sleep(1.0)
        as_daemon.put("liveomics/sec/followup/S1", _request("daemon-1"))
        wait_for(lambda: any(a["id"] == "daemon-1" for a in acks), "the daemon identity's request")
        assert bridge.stats.requests == (1 if acl else 3), "a foreign identity's request was executed"
        # The bridge's identity: a real plate position on the demo camera, then the follow-up.
        import useq

        stats = bridge.run(useq.MDASequence(stage_positions=[useq.Position(x=0, y=0, name="B1_0000")],
                                            channels=["DAPI", "FITC"]))
    finally:
        bridge.close()
    out, err = proc.communicate(timeout=60)
    for s in (stranger, intruder, reader, as_daemon):
        if s is not None:
            s.close()
    assert proc.returncode == 0, err[-3000:]
    assert stats.requests == (1 if acl else 3) and stats.rejected_requests == 0
    assert [a["state"] for a in acks if a["id"] == "daemon-1"] == ["scheduled", "started", "done"]
    assert not any(a["id"] == "stranger-1" for a in acks)
    assert any(a["id"] == "intruder-1" for a in acks) != acl
    assert any(a["id"] == "reader-1" for a in acks) != acl
    plate = zarr.open_group(tmp_path / "out" / "S1.zarr", mode="r")
    wells = sorted(w["path"] for w in plate.attrs.get("ome", {}).get("plate", {}).get("wells", []))
    assert wells == (["B/1"] if acl else ["A/2", "A/3", "B/1"]), err[-6000:]
    fields = ["0", "1000"] if acl else ["0", "1000", "1001", "1002"]
    assert sorted(i["path"] for i in plate["B/1"].attrs["ome"]["well"]["images"]) == fields


def test_bridge_rejects_requests_outside_its_limits_and_says_why(tmp_path):
    port = free_port()
    hub = loopback_hub(port)
    acks = []
    hub.declare_subscriber("liveomics/lim/followup/L1/ack", lambda s: acks.append(json.loads(s.payload.to_bytes())))
    bridge = Bridge(demo_core(), "lim", "L1", session_config(connect=[f"tcp/127.0.0.1:{port}"]), idle_s=1.0,
                    limits=FollowupLimits(stage_um=(0, 100, 0, 100), max_requests=2, max_per_minute=100))
    time.sleep(0.5)
    key = "liveomics/lim/followup/L1"
    try:
        hub.put(key, _request("other-plate", plate="L2"))
        far = json.loads(_request("far", plate="L1"))
        for e in far["events"]:
            e["x_pos"] = 5000.0
        hub.put(key, json.dumps(far).encode())
        def variant(rid, change):
            req = json.loads(_request(rid, plate="L1"))
            change(req)
            hub.put(key, json.dumps(req).encode())

        # Keys the daemon never sends could move hardware past every check: refused.
        variant("props", lambda r: r["events"][0].update(properties=[["XY", "Position", [1e6, 1e6]]]))
        variant("objective", lambda r: r["events"][0].update(channel={"config": "10X", "group": "Objective"}))
        variant("deep", lambda r: r["events"][0].update(z_pos=1e5))
        variant("nan", lambda r: r["events"][0].update(x_pos=float("nan")))
        variant("planned", lambda r: r["events"][0]["metadata"]["liveomics"].update(field=0))
        variant("later", lambda r: r.update(not_before_unix_ns=str(time.time_ns() + int(1e9 * 86400 * 365))))
        hub.put(key, _request("ok-1", plate="L1"))
        hub.put(key, _request("ok-2", plate="L1"))
        hub.put(key, _request("too-many", plate="L1"))
        # A repeat of a live id is ignored, not answered: a `rejected` would close the real one.
        hub.put(key, b'{"id": "ok-1", "plate": "L1", "events": "broken"}')
        wait_for(lambda: len(acks) >= 11, "an ack of every request")
        import useq

        stats = bridge.run(useq.MDASequence(stage_positions=[useq.Position(x=10, y=10, name="A1_0000")],
                                            channels=["DAPI"]))
    finally:
        bridge.close()
    hub.close()
    by_id = {}
    for a in acks:
        by_id.setdefault(a["id"], []).append(a)
    assert [a["reason"] for a in by_id["other-plate"]] == ["plate"]
    assert [a["reason"] for a in by_id["far"]] == ["stage"]
    assert [a["reason"] for a in by_id["too-many"]] == ["count"]
    assert [a["reason"] for a in by_id["props"]] == ["events"]
    assert [a["reason"] for a in by_id["objective"]] == ["channel"]
    assert [a["reason"] for a in by_id["deep"]] == ["stage"]
    assert [a["reason"] for a in by_id["nan"]] == ["stage"]
    assert [a["reason"] for a in by_id["planned"]] == ["field"]
    assert [a["reason"] for a in by_id["later"]] == ["delay"]
    assert [a["state"] for a in by_id["ok-1"]] == ["scheduled", "started", "done"]
    assert stats.requests == 2 and stats.rejected_by_reason == {
        "plate": 1, "stage": 3, "count": 1, "events": 1, "channel": 1, "field": 1, "delay": 1}


# The tests that name a fixed port, and why none of them can collide with a developer's daemon.
FIXED_PORT_ALLOWED = {
    ("test_security.py", "test_default_config_binds_only_loopback"):
        "checks the embedded defaults themselves; skips when either port is taken",
    ("test_security.py", "test_a_zenoh_file_that_sets_the_endpoints_is_refused_with_its_key"):
        "validate only: the config is refused before anything listens",
    ("test_security.py", "test_the_bridge_warns_when_it_is_reachable_unprotected"):
        "builds a session config and opens no session",
}
FIXED_PORT = re.compile(r"(?:127\.0\.0\.1|0\.0\.0\.0|localhost|tcp/[^:\"']*):[1-9]\d{1,4}\b|\b(?:7447|9464)\b")


def test_no_test_binds_a_fixed_port():
    """Every port a test listens on is 0 or taken from free_port(): a developer's machine may run a
    daemon on the defaults. A test that names a fixed port must be in FIXED_PORT_ALLOWED with why."""
    import ast

    found = set()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and FIXED_PORT.search(ast.get_source_segment(f.read_text(), node) or ""):
                found.add((f.name, node.name))
    # Helpers that build configs for many tests must hold no fixed port at all.
    helpers = {k for k in found if not k[1].startswith("test_")}
    assert not helpers, helpers
    assert found <= set(FIXED_PORT_ALLOWED), sorted(found - set(FIXED_PORT_ALLOWED))
    assert ("test_security.py", "test_default_config_binds_only_loopback") in found  # the scan sees ports


def test_the_store_serves_only_regular_files_inside_the_plate(binary, tmp_path):
    """A symlink inside the plate (a shared output folder is writable by others) leads nowhere;
    names the filesystem refuses are 404, not 500; a suffix range longer than the file gets the
    whole file (RFC 9110), and a timepoint the plate does not have is 404, not t=0."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml_text(merged(sim_config(plate="sym", wells=("A1",), fields=1, size=128),
                                    {"segmentation": {"method": "classical"},
                                     "sinks": {"zarr": {"output": tmp_path / "out"}, "zenoh": {"enabled": False}}})))
    assert subprocess.run([str(binary), "run", "--config", str(cfg)], capture_output=True, timeout=120).returncode == 0
    plate = tmp_path / "out" / "sym.zarr"
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the network")
    (plate / "A" / "1" / "leak.txt").symlink_to(secret)
    (plate / "A" / "up").symlink_to(tmp_path)
    port = free_port()
    proc = subprocess.Popen([str(binary), "serve", str(plate), "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving" in proc.stdout.readline()
        status, _, body = http_get(port, "/zarr/sym.zarr/A/1/0/zarr.json")
        assert status == 200 and b"multiscales" in body
        for path in ("/zarr/sym.zarr/A/1/leak.txt", "/zarr/sym.zarr/A/up/secret.txt",
                     "/zarr/sym.zarr/A/1/%6Ceak.txt",
                     f"/zarr/sym.zarr/A/{'x' * 300}/zarr.json", "/zarr/sym.zarr/A/1"):
            status, _, body = http_get(port, path)
            assert status == 404 and b"not for the network" not in body, (path, status)
        whole = (plate / "zarr.json").read_bytes()
        status, headers, body = http_get(port, "/zarr/sym.zarr/zarr.json", {"Range": f"bytes=-{len(whole) + 100}"})
        assert status == 200 and body == whole, (status, headers)
        status, _, body = http_get(port, "/zarr/sym.zarr/zarr.json", {"Range": "bytes=-10"})
        assert status == 206 and body == whole[-10:]
        assert http_get(port, "/api/thumb/A/1/0/0.png")[0] == 200
        assert http_get(port, "/api/thumb/A/1/0/0.png?t=99999")[0] == 404
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_slow_readers_cannot_take_the_server_down(binary, tmp_path):
    """48 connections that ask for a 16 MB file and never read it hold every slot; each new
    request still gets its answer (it takes the slot of the oldest connection of the busiest
    address), so the page and /metrics stay up."""
    import socket

    cfg = tmp_path / "c.toml"
    cfg.write_text(toml_text(merged(sim_config(plate="slow", wells=("A1",), fields=1, size=128),
                                    {"segmentation": {"method": "classical"},
                                     "sinks": {"zarr": {"output": tmp_path / "out"}, "zenoh": {"enabled": False}}})))
    assert subprocess.run([str(binary), "run", "--config", str(cfg)], capture_output=True, timeout=120).returncode == 0
    plate = tmp_path / "out" / "slow.zarr"
    (plate / "A" / "1" / "big.bin").write_bytes(bytes(16 * 1024 * 1024))
    port = free_port()
    proc = subprocess.Popen([str(binary), "serve", str(plate), "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    readers = []
    try:
        assert "serving" in proc.stdout.readline()
        for _ in range(48):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /zarr/slow.zarr/A/1/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            readers.append(s)
        time.sleep(0.5)
        answered = 0
        for _ in range(10):
            status, _, body = http_get(port, "/api/state")
            answered += status == 200
        assert answered == 10, f"{answered} of 10 answered with 48 slow readers connected"
    finally:
        for s in readers:
            s.close()
        proc.terminate()
        proc.wait(timeout=10)
