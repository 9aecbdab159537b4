"""The closed loop with the real Micro-Manager device layer (pymmcore-plus + mm-test-adapters,
DemoCamera): the bridge runs a small plate, frames reach the daemon over zenoh, a rule fires, the
follow-up request (valid useq-schema MDAEvents) is executed by pymmcore-plus, and its frames come
back tagged with the follow-up id and are written as another field of the well (numbered from
`closed_loop.followup_field_base`, 1000)."""

import json
import re
import threading
import time
import urllib.request

import pytest
import useq
import zarr
import zenoh

from liveomics_testkit import demo_core, free_port, loopback_hub, start_zenoh_daemon, wait_for

pytest.importorskip("pymmcore_plus")
pytest.importorskip("mm_test_adapters")
from liveomics_bridge import Bridge, FollowupLimits, session_config  # noqa: E402
from zenoh_tls import make_pki  # noqa: E402


def zconf(port):
    conf = zenoh.Config()
    conf.insert_json5("mode", '"peer"')
    conf.insert_json5("connect/endpoints", json.dumps([f"tcp/127.0.0.1:{port}"]))
    conf.insert_json5("scouting/multicast/enabled", "false")
    return conf


def start_daemon(binary, tmp_path, port, extra=None, scheme="tcp", zenoh_file=""):
    return start_zenoh_daemon(binary, tmp_path, f"{scheme}/127.0.0.1:{port}", zenoh_file=zenoh_file, extra=extra)


RULE = {"closed_loop": {
    "enabled": True,
    "max_followups_per_plate": 1,
    "request_timeout_ms": 20000,
    "rules": [{
        "name": "more", "metric": "cells", "scope": "field", "comparison": ">=", "threshold": 0,
        "wells": ["A1"], "action": {"kind": "more_fields", "fields": 1, "spacing_um": 300.0},
    }],
}}


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls+acl"])
def test_rule_fires_and_the_followup_is_acquired_and_written(binary, tmp_path, tls):
    """Also over TLS with the access-control examples of config/zenoh (docs/SECURITY.md): the
    daemon, the bridge and a read-only watcher each hold their own certificate."""
    port = free_port()
    if tls:
        pki = make_pki(tmp_path / "pki")
        ep, bridge_ep = f"tls/127.0.0.1:{port}", f"tls/127.0.0.1:{free_port()}"
        proc, head = start_daemon(binary, tmp_path, port, RULE, scheme="tls",
                                  zenoh_file=pki.example("daemon-tls-acl.json5", tmp_path / "d.json5"))
        # Peers do not forward for each other: the watcher hears the acks from the bridge itself.
        watcher_conf = pki.client("reader", [ep, bridge_ep])
        bridge_conf = session_config(connect=[ep], listen=[bridge_ep],
                                     config_file=pki.example("bridge-tls-acl.json5", tmp_path / "b.json5"))
    else:
        # The plate page too: its state must show the request and how far the bridge took it.
        page_port = free_port()
        proc, head = start_daemon(binary, tmp_path, port, {**RULE, "telemetry": {"http_listen": f"127.0.0.1:{page_port}"}})
        watcher_conf, bridge_conf = zconf(port), zconf(port)
    core = demo_core()
    bridge = Bridge(core, "mm", "MM1", bridge_conf, idle_s=4.0)
    # The acks come from the bridge itself: the watcher opens once the bridge is up, and the plate
    # starts once the two are connected (its subscriptions go with the connection).
    requests, acks = [], []
    watcher = zenoh.open(watcher_conf)
    watcher.declare_subscriber("liveomics/mm/followup/MM1", lambda s: requests.append(json.loads(s.payload.to_bytes())))
    watcher.declare_subscriber("liveomics/mm/followup/MM1/ack", lambda s: acks.append(json.loads(s.payload.to_bytes())))
    bridge_zid = str(bridge.session.info.zid())
    wait_for(lambda: bridge_zid in {str(z) for z in watcher.info.peers_zid()}, "the watcher to reach the bridge")
    assert bridge.wait_for_daemon()
    plan = useq.WellPlatePlan(plate=96, a1_center_xy=(0, 0), selected_wells=([0, 0], [0, 1]),
                              well_points_plan=useq.GridRowsColumns(rows=1, columns=2))
    # The page's state is read until the daemon exits, not once after the bridge closes: the
    # daemon exits idle_exit_ms after the last frame, however long the bridge takes to close.
    seen = {}

    def watch_page():
        while proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{page_port}/api/state", timeout=10) as r:
                    seen["page"] = json.loads(r.read())
            except OSError:
                pass
            time.sleep(0.2)

    watcher_thread = threading.Thread(target=watch_page)
    if not tls:
        watcher_thread.start()
    try:
        stats = bridge.run(useq.MDASequence(stage_positions=plan, channels=["DAPI", "FITC"]))
    finally:
        bridge.close()
    out, err = proc.communicate(timeout=120)
    watcher.close()
    if watcher_thread.is_alive():
        watcher_thread.join(30)
    page = seen.get("page")
    assert tls or page is not None, "the plate page never answered"
    assert proc.returncode == 0, err[-3000:]
    if page is not None:
        followups = page["wells"]["A1"]["followups"]
        assert len(followups) == 1 and followups[0]["rule"] == "more", followups
        # Acks are taken when the next field is written: the follow-up field itself came after
        # `started`.
        assert followups[0]["state"] in ("started", "done"), followups
    # The request: one, from the rule, with valid useq events at a new field of A1.
    assert len(requests) == 1, requests
    req = requests[0]
    assert req["rule"] == "more" and req["well"] == "A1" and req["fields"] == [1000]
    events = [useq.MDAEvent(**e) for e in req["events"]]
    assert [e.channel.config for e in events] == ["DAPI", "FITC"]
    assert all(e.metadata["liveomics"]["followup_id"] == req["id"] for e in events)
    assert events[0].x_pos == pytest.approx(req["events"][0]["x_pos"])
    # Executed by pymmcore-plus, acknowledged, and written as field 2 of A1.
    assert [a["state"] for a in acks if a["id"] == req["id"]] == ["scheduled", "started", "done"]
    assert stats.frames == 2 * 2 * 2 + 2 and stats.requests == 1 and len(stats.reaction_ms) == 1
    assert "follow-up acknowledged" in err and "follow-up field received" in err
    plate = zarr.open_group(tmp_path / "out" / "MM1.zarr", mode="r")
    a1 = [img["path"] for img in plate["A/1"].attrs["ome"]["well"]["images"]]
    assert sorted(a1) == ["0", "1", "1000"]
    assert zarr.open_array(tmp_path / "out" / "MM1.zarr" / "A" / "1" / "1000" / "0", mode="r").shape[-2:] == (512, 512)
    a2 = [img["path"] for img in plate["A/2"].attrs["ome"]["well"]["images"]]
    assert sorted(a2) == ["0", "1"]


def test_malformed_requests_are_rejected_and_the_bridge_goes_on(tmp_path):
    port = free_port()
    hub = loopback_hub(port)
    frames = []
    hub.declare_subscriber("liveomics/mm/frames/**", lambda s: frames.append(str(s.key_expr)))
    bridge = Bridge(demo_core(), "mm", "MM2", zconf(port), idle_s=1.0)
    assert bridge.wait_for_daemon()
    requests = hub.declare_publisher("liveomics/mm/followup/MM2")
    wait_for(lambda: requests.matching_status.matching, "the bridge's follow-up subscription")
    for bad in (b"not json", b'{"id": "x"}', json.dumps({"id": "y", "well": "A1", "trigger": {"field": 0},
                                                           "events": [{"x_pos": "far"}]}).encode()):
        requests.put(bad)
    wait_for(lambda: bridge.stats.rejected_requests == 3, "the three bad requests to be rejected")
    seq = useq.MDASequence(stage_positions=[useq.Position(x=0, y=0, name="B3_0000")], channels=["DAPI"])
    try:
        stats = bridge.run(seq)
    finally:
        bridge.close()
    hub.close()
    assert stats.rejected_requests == 3 and stats.requests == 0
    assert frames == ["liveomics/mm/frames/MM2/B3/0/DAPI"]


def test_bridge_leaving_mid_plate_is_reported_and_resumed(binary, tmp_path):
    """The bridge goes away after the first field and a new one comes back for the second: the
    daemon says the bridge was lost, keeps waiting, takes the rest, and warns at the end that the
    bridge left again (the plate may be incomplete). Nothing acquired is lost."""
    port = free_port()
    proc, _ = start_daemon(binary, tmp_path, port)
    for field in (0, 1):
        bridge = Bridge(demo_core(), "mm", "MM1", zconf(port), idle_s=0.3)
        assert bridge.wait_for_daemon()
        seq = useq.MDASequence(stage_positions=[useq.Position(x=field * 100.0, y=0, name=f"A1_{field:04d}")],
                               channels=["DAPI", "FITC"])
        try:
            assert bridge.run(seq).frames == 2
        finally:
            bridge.close()
        time.sleep(1.0)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert err.count("acquisition bridge connected") == 2, err[-3000:]
    assert err.count("acquisition bridge lost") == 2
    assert "did not come back" in err
    plate = zarr.open_group(tmp_path / "out" / "MM1.zarr", mode="r")
    assert sorted(img["path"] for img in plate["A/1"].attrs["ome"]["well"]["images"]) == ["0", "1"]


def test_a_request_the_bridge_refuses_is_acknowledged_rejected_and_closed(binary, tmp_path):
    """The bridge is started with no follow-ups allowed: the daemon's request comes back
    `rejected` with the bridge's reason, the daemon logs it, and does not count it as still
    open at the end of the run."""
    port = free_port()
    proc, _ = start_daemon(binary, tmp_path, port, RULE)
    acks = []
    watcher = zenoh.open(zconf(port))
    watcher.declare_subscriber("liveomics/mm/followup/MM1/ack", lambda s: acks.append(json.loads(s.payload.to_bytes())))
    bridge = Bridge(demo_core(), "mm", "MM1", zconf(port), idle_s=2.0, limits=FollowupLimits(max_requests=0))
    assert bridge.wait_for_daemon()
    try:
        stats = bridge.run(useq.MDASequence(stage_positions=[useq.Position(x=0, y=0, name="A1_0000")],
                                            channels=["DAPI", "FITC"]))
    finally:
        bridge.close()
    out, err = proc.communicate(timeout=60)
    watcher.close()
    assert proc.returncode == 0, err[-3000:]
    assert stats.requests == 0 and stats.rejected_by_reason == {"count": 1}
    assert [(a["state"], a["reason"]) for a in acks] == [("rejected", "count")]
    assert "follow-up rejected by the bridge" in err and 'reason="count"' in err, err[-3000:]
    assert "not done when the run ended" not in err


def test_a_daemon_that_stops_reading_for_10_s_loses_nothing(binary, tmp_path):
    """The daemon is frozen (SIGSTOP) for 10 s mid-plate, so the bridge's puts block: longer than
    zenoh's default 5 s, after which the bridge's session used to be closed and its queued frames
    lost without a word. The bridge now waits (its `block_s`), every frame is numbered, and the
    daemon finds no gap, or asks for what it misses and gets it: every field arrives complete.
    (A frozen process sends no keepalives either: both sessions take a 30 s lease, so the bridge
    does not count the daemon gone after zenoh's default 10 s; a daemon that is only slow keeps
    sending them.)"""
    import signal

    port = free_port()
    lease = tmp_path / "lease.json5"
    lease.write_text('{"transport": {"link": {"tx": {"lease": 30000}}}}')
    # The freeze stops the daemon's clocks too: a field it held half-assembled must not time out
    # the moment it thaws, before the frames waiting in the link are read.
    extra = {"source": {"zenoh": {"width_px": 2048, "height_px": 2048}}, "pipeline": {"assembly_timeout_ms": 60000}}
    proc, _ = start_daemon(binary, tmp_path, port, extra, zenoh_file=lease)
    # Plain bytes over TCP (no shared memory) and 8 MB frames, so the frames fill the link's
    # buffers and the bridge's puts block for as long as the daemon is frozen.
    core = demo_core()
    core.setProperty("Camera", "OnCameraCCDXSize", 2048)
    core.setProperty("Camera", "OnCameraCCDYSize", 2048)
    bridge_conf = zconf(port)
    bridge_conf.insert_json5("transport/link/tx/lease", "30000")
    bridge = Bridge(core, "mm", "MM1", bridge_conf, idle_s=1.0, shm_bytes=0)
    assert bridge.wait_for_daemon()
    positions = [useq.Position(x=i * 100.0, y=0, name=f"A1_{i:04d}") for i in range(10)]
    seq = useq.MDASequence(stage_positions=positions, channels=["DAPI", "FITC"])

    def freeze():
        wait_for(lambda: bridge.stats.frames >= 2, "the first frames out")
        proc.send_signal(signal.SIGSTOP)
        time.sleep(10.0)
        proc.send_signal(signal.SIGCONT)

    t = threading.Thread(target=freeze)
    t.start()
    try:
        stats = bridge.run(seq)
    finally:
        t.join()
        bridge.close()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert stats.frames == 20
    # Nothing lost, or every loss seen and made good: a frame the daemon found missing was asked
    # for and sent again by the bridge.
    lost = re.search(r"frames lost\s+(\d+) in transport.*?(\d+) of them sent again", out)
    assert lost is None or lost.group(1) == lost.group(2) == str(stats.resent), out
    assert "10 done" in out and "0 incomplete" in out, out


class _Lossy:
    """The bridge's zenoh session with two frames lost on their first way out (as a link that
    dropped them would), everything else passed through."""

    def __init__(self, session, drop):
        self.session, self.drop, self.dropped = session, set(drop), []

    def put(self, key, payload, attachment=None, **kw):
        if "/frames/" in key and attachment is not None:
            seq = json.loads(attachment)["seq"]
            if seq in self.drop and seq not in self.dropped:
                self.dropped.append(seq)
                return None
        return self.session.put(key, payload, attachment=attachment, **kw)

    def __getattr__(self, name):
        return getattr(self.session, name)


def test_frames_lost_on_the_way_are_asked_for_and_sent_again(binary, tmp_path):
    """Two of the bridge's frames never reach the daemon: it sees the gaps in their numbers, asks
    the bridge, which sends them again from what it keeps; every field arrives complete."""
    port = free_port()
    proc, _ = start_daemon(binary, tmp_path, port)
    bridge = Bridge(demo_core(), "mm", "MM1", zconf(port), idle_s=1.0)
    assert bridge.wait_for_daemon()
    bridge.session = _Lossy(bridge.session, {3, 6})
    positions = [useq.Position(x=i * 100.0, y=0, name=f"A1_{i:04d}") for i in range(5)]
    try:
        stats = bridge.run(useq.MDASequence(stage_positions=positions, channels=["DAPI", "FITC"]))
    finally:
        bridge.close()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert bridge.session.dropped == [3, 6] and stats.resent == 2 and stats.resend_gone == 0, stats
    assert "frames lost      2 in transport" in out and "2 of them sent again" in out, out
    assert "5 done" in out and "0 incomplete" in out, out
