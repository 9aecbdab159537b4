"""The bridge: frames out, follow-up requests in."""

from __future__ import annotations

import collections
import json
import logging
import queue
import re
import secrets
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import useq
import zenoh

from .session import session_config as default_session_config

log = logging.getLogger("liveomics_bridge")

NAME = re.compile(r"^[A-Za-z0-9]+$")
_STOP = object()
_WAKE = object()


def well_and_field(event: useq.MDAEvent) -> tuple[str, int]:
    """The `{well}` and `{field}` key chunks of an event: from `metadata["liveomics"]` for
    follow-ups, else from useq's position name (`A1_0000`), else position index."""
    lo = (event.metadata or {}).get("liveomics")
    if lo:
        return str(lo["well"]), int(lo["field"])
    name = event.pos_name or ""
    m = re.match(r"^([A-Za-z]+[0-9]+)_(\d+)$", name)
    if m:
        return m.group(1), int(m.group(2))
    if NAME.match(name):
        return name, int(event.index.get("g", 0))
    return "A1", int(event.index.get("p", 0))


def frame_key(instrument: str, plate: str, event: useq.MDAEvent) -> str:
    well, fld = well_and_field(event)
    channel = event.channel.config if event.channel else "Default"
    for chunk in (instrument, plate, well, channel):
        if not NAME.match(chunk):
            raise ValueError(f"{chunk!r} is not a key chunk (^[A-Za-z0-9]+$)")
    return f"liveomics/{instrument}/frames/{plate}/{well}/{fld}/{channel}"


@dataclass
class _Request:
    id: str
    events: int
    trigger: tuple[str, int]
    received_ns: int
    requested_ns: int = 0
    started_ns: int | None = None
    acquired: int = 0


@dataclass
class FollowupLimits:
    """What the bridge agrees to execute. A request outside these is acknowledged as rejected.

    `stage_um` is `(x_min, x_max, y_min, y_max)` in stage µm; `None` takes the plate's extent
    from the sequence being run (a `WellPlatePlan`: every well's centre, half a well pitch
    around; other plans: their positions' bounding box, `margin_um` around). Until a sequence
    runs and with no limits given, no request with a position is executed."""

    stage_um: tuple[float, float, float, float] | None = None
    margin_um: float = 1000.0
    #: `(z_min, z_max)` in µm; `None`: the sequence's Z positions (or the stage's Z when the
    #: run starts), `max_dz_um` around.
    z_um: tuple[float, float] | None = None
    max_dz_um: float = 50.0
    max_requests: int = 100
    max_per_minute: float = 30.0
    max_events_per_request: int = 64
    #: A revisit may wait, but not for ever: a request that asks to start later is rejected.
    max_delay_s: float = 6 * 3600.0
    #: Follow-up fields are numbered from here (the daemon's `closed_loop.followup_field_base`),
    #: so that a request can never write over a planned field.
    min_field: int = 1000


#: The only event keys a follow-up may carry: what the daemon sends. Anything else useq
#: accepts (device properties, actions, exposure, timing, ROI, SLM images) could move hardware
#: outside the checks below.
EVENT_KEYS = frozenset({"index", "channel", "pos_name", "metadata", "x_pos", "y_pos", "z_pos"})


def plate_extent_um(sequence: useq.MDASequence, margin_um: float) -> tuple[float, float, float, float] | None:
    """The stage area a sequence may visit: a plate's wells, or its positions, with a margin."""
    plan = sequence.stage_positions
    if isinstance(plan, useq.WellPlatePlan):
        wells = plan.all_well_positions
        xs = [p.x for p in wells]
        ys = [p.y for p in wells]
        pad = max(plan.plate.well_spacing) * 1000.0 / 2
    else:
        pts = [(e.x_pos, e.y_pos) for e in sequence if e.x_pos is not None and e.y_pos is not None]
        xs = [x for x, _ in pts]
        ys = [y for _, y in pts]
        pad = margin_um
    if not xs:
        return None
    return (min(xs) - pad, max(xs) + pad, min(ys) - pad, max(ys) + pad)


class Rejected(ValueError):
    """A follow-up request the bridge will not execute; `reason` is a short, fixed label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Stats:
    frames: int = 0
    blocked_s: float = 0.0
    requests: int = 0
    rejected_requests: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    reaction_ms: list[float] = field(default_factory=list)
    # The two parts of the reaction: the daemon deciding (trigger frame out -> request
    # published) and the acquisition getting to it (request received -> event started).
    decision_ms: list[float] = field(default_factory=list)
    queue_ms: list[float] = field(default_factory=list)
    # Frames the daemon reported missing (gaps in the numbers) and this bridge sent again, and
    # those it could not because they had left the resend buffer.
    resent: int = 0
    resend_gone: int = 0


class Bridge:
    """Runs MDAs on `core` and streams them to the daemon.

    `session_config` is a `zenoh.Config`; None connects to the daemon's default loopback
    endpoint with no multicast scouting (`liveomics_bridge.session.session_config`). `limits`
    bound what follow-up requests may ask for. `block_s` is how long a put may wait on a daemon
    that pushes back before zenoh gives the session up (its default, 5 s, loses frames).
    `resend_mb` bounds the frames kept for the daemon to ask for again (gaps in their numbers);
    `stats.resent` and `stats.resend_gone` say how that went."""

    def __init__(self, core, instrument: str, plate: str, session_config=None, queue_frames: int = 64,
                 idle_s: float = 3.0, shm_bytes: int = 256 * 1024 * 1024, limits: FollowupLimits | None = None,
                 block_s: float = 3600.0, resend_mb: float = 512.0):
        for chunk in (instrument, plate):
            if not NAME.match(chunk):
                raise ValueError(f"{chunk!r} must match ^[A-Za-z0-9]+$")
        self.core, self.instrument, self.plate = core, instrument, plate
        self.idle_s = idle_s
        self.limits = limits or FollowupLimits()
        self._stage_um = self.limits.stage_um
        self._z_um = self.limits.z_um
        self._channel_group = core.getChannelGroup() or "Channel"
        try:
            self._channel_configs = set(core.getAvailableConfigs(self._channel_group))
        except Exception:  # no such group in this configuration: the group check alone applies
            self._channel_configs = set()
        self._accepted_ns: collections.deque[int] = collections.deque()
        conf = session_config if session_config is not None else default_session_config()
        # A put that blocks (the daemon pushing back) must not make zenoh close the session after
        # its default 5 s: the frames queued in it would be lost and later puts go nowhere.
        conf.insert_json5("transport/link/tx/queue/congestion_control/block/wait_before_close",
                          str(int(block_s * 1_000_000)))
        self.session = zenoh.open(conf)
        # Every frame is numbered in this stream (a new id per bridge), so the daemon can count and
        # name any that never arrive.
        self.stream = secrets.token_hex(8)
        self._seq = 0
        # Frames are written into zenoh shared memory: a daemon on the same host maps them instead
        # of receiving a copy over the socket; zenoh copies them onto the network otherwise.
        self._shm = None
        if shm_bytes:
            try:
                from zenoh import shm

                self._shm = shm.ShmProvider.default_backend(shm_bytes)
                self._shm_policy = shm.BlockOn(shm.GarbageCollect())
            except Exception as e:  # no SHM in this zenoh build or platform: plain puts
                log.info("zenoh shared memory not available (%s): frames are sent as bytes", e)
        self.frames: queue.Queue = queue.Queue(maxsize=queue_frames)
        # Follow-ups go ahead of the plan's remaining events: the point is to react while the
        # sample is still under the objective.
        self.followups: queue.Queue = queue.Queue()
        self.stats = Stats()
        self._lock = threading.Lock()
        self._requests: dict[str, _Request] = {}
        self._last_frame_ns: dict[tuple[str, int], int] = {}
        # The last frames published, by number, for the daemon to ask for again when some never
        # arrived (a link that dropped); bounded in bytes, oldest out first.
        self._sent: collections.OrderedDict[int, tuple[str, bytes, bytes]] = collections.OrderedDict()
        self._sent_bytes = 0
        self._resend_bytes = int(resend_mb * 1024 * 1024)
        self._resends: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._publisher = threading.Thread(target=self._publish_loop, name="liveomics-publish", daemon=True)
        self._publisher.start()
        self._resend_sub = self.session.declare_subscriber(f"liveomics/{instrument}/bridge/{plate}/resend",
                                                           self._on_resend)
        base = f"liveomics/{instrument}/followup/{plate}"
        self._ack_key = f"{base}/ack"
        self._sub = self.session.declare_subscriber(base, self._on_request)
        # The daemon watches this token: when the bridge goes away mid-plate it says so and waits.
        self._token = self.session.liveliness().declare_token(f"liveomics/{instrument}/bridge/{plate}")
        core.mda.events.frameReady.connect(self._on_frame)
        core.mda.events.eventStarted.connect(self._on_event_started)

    # -- frames out -------------------------------------------------------------------------
    def _on_frame(self, img: np.ndarray, event: useq.MDAEvent, meta=None) -> None:
        """Acquisition thread: hand off and return; block (never drop) when the queue is full."""
        item = (np.ascontiguousarray(img), event, time.time_ns())
        try:
            self.frames.put_nowait(item)
        except queue.Full:
            log.warning("frame queue full (%d): acquisition waits for the publisher", self.frames.maxsize)
            t0 = time.perf_counter()
            self.frames.put(item)
            self.stats.blocked_s += time.perf_counter() - t0

    def _on_resend(self, sample) -> None:
        """zenoh thread: the daemon found numbers `[from, to)` of this stream missing; the publisher
        thread sends them again before its next frame."""
        try:
            req = json.loads(sample.payload.to_bytes())
            if req.get("stream") != self.stream:
                return
            first, end = int(req["from"]), int(req["to"])
        except (ValueError, KeyError, TypeError):
            log.warning("malformed resend request ignored")
            return
        for seq in range(first, min(end, first + 100_000)):
            self._resends.put(seq)
        try:  # wake the publisher if it waits for frames; a full queue means it is busy anyway
            self.frames.put_nowait(_WAKE)
        except queue.Full:
            pass

    def _resend(self, seq: int) -> None:
        with self._lock:
            kept = self._sent.get(seq)
        if kept is None:
            self.stats.resend_gone += 1
            log.warning("frame %d asked for again has left the resend buffer (%d MB): it is lost",
                        seq, self._resend_bytes // (1024 * 1024))
            return
        key, data, header = kept
        self.session.put(key, data, attachment=header, congestion_control=zenoh.CongestionControl.BLOCK)
        self.stats.resent += 1

    def _keep(self, seq: int, key: str, data: bytes, header: bytes) -> None:
        with self._lock:
            self._sent[seq] = (key, data, header)
            self._sent_bytes += len(data)
            while self._sent_bytes > self._resend_bytes and len(self._sent) > 1:
                _, (_, old, _) = self._sent.popitem(last=False)
                self._sent_bytes -= len(old)

    def _publish_loop(self) -> None:
        while True:
            item = self.frames.get()
            while not self._resends.empty():
                seq = self._resends.get()
                try:
                    self._resend(seq)
                except Exception:  # a failed resend must not stop the stream
                    log.exception("cannot resend frame %d", seq)
            if item is _STOP:
                return
            if item is _WAKE:
                continue
            img, event, acquired_ns = item
            try:
                self._publish(img, event, acquired_ns)
            except Exception:  # a bad frame must not stop the stream
                log.exception("cannot publish frame of %s", event)

    def _publish(self, img: np.ndarray, event: useq.MDAEvent, acquired_ns: int) -> None:
        key = frame_key(self.instrument, self.plate, event)
        if img.dtype not in (np.uint16, np.uint8):
            img = img.astype(np.uint16)
        lo = (event.metadata or {}).get("liveomics") or {}
        header = {
            "shape": list(img.shape[-2:]),
            "dtype": "uint16" if img.dtype == np.uint16 else "uint8",
            "timepoint": int(event.index.get("t", 0)),
            "acquired_unix_ns": acquired_ns,
            "stage_um": [event.x_pos or 0.0, event.y_pos or 0.0, event.z_pos or 0.0],
            "event_index": {str(k): int(v) for k, v in event.index.items()},
            "stream": self.stream,
            "seq": self._seq,
        }
        # Taken before the put: a frame whose put fails is a gap the daemon reports (and asks for).
        seq = self._seq
        self._seq += 1
        px = self.core.getPixelSizeUm()
        if px and px > 0:
            header["pixel_size_um"] = px
        if lo.get("followup_id"):
            header["followup_id"] = lo["followup_id"]
        data = img.astype(img.dtype.newbyteorder("<"), copy=False).tobytes()
        payload = data
        if self._shm is not None:
            buf = self._shm.alloc(len(data), policy=self._shm_policy)
            buf[:] = data
            payload = buf
        attachment = json.dumps(header).encode()
        if self._resend_bytes > 0:
            self._keep(seq, key, data, attachment)
        # BLOCK: when zenoh's queue is full the publisher waits; the default would drop the frame.
        self.session.put(key, payload, attachment=attachment, congestion_control=zenoh.CongestionControl.BLOCK)
        self.stats.frames += 1
        well, fld = well_and_field(event)
        with self._lock:
            self._last_frame_ns[(well, fld)] = time.time_ns()
            rid = lo.get("followup_id")
            if rid in self._requests:
                r = self._requests[rid]
                r.acquired += 1
                if r.acquired == r.events:
                    self._ack(rid, "done")

    # -- follow-ups in ----------------------------------------------------------------------
    def _ack(self, rid: str, state: str, **extra) -> None:
        self.session.put(self._ack_key, json.dumps({"id": rid, "state": state, **extra}).encode(),
                         congestion_control=zenoh.CongestionControl.BLOCK)

    def _reject(self, rid: str | None, reason: str, detail: str) -> None:
        """Logged, counted by reason, and acknowledged as rejected when the request has an id."""
        with self._lock:
            self.stats.rejected_requests += 1
            self.stats.rejected_by_reason[reason] = self.stats.rejected_by_reason.get(reason, 0) + 1
        log.warning("follow-up request %s rejected (%s): %s", rid or "without id", reason, detail)
        if rid is not None:
            self._ack(rid, "rejected", reason=reason, detail=detail[:200])

    def _events(self, rid: str, raw) -> list[useq.MDAEvent]:
        """The request's events, refused unless each carries only `EVENT_KEYS`, a channel of the
        sequence's channel group and a follow-up well and field; stamped with `rid` and this
        plate, so that the frames are counted against this request and no other."""
        lim = self.limits
        if not isinstance(raw, list) or not raw or len(raw) > lim.max_events_per_request:
            n = len(raw) if isinstance(raw, list) else "no list of"
            raise Rejected("events", f"{n} events (1..{lim.max_events_per_request} allowed)")
        events = []
        for e in raw:
            if not isinstance(e, dict):
                raise Rejected("events", "an event is not a JSON object")
            extra = sorted(set(e) - EVENT_KEYS)
            if extra:
                raise Rejected("events", f"event keys {extra} are not allowed (only {sorted(EVENT_KEYS)})")
            ch = e.get("channel")
            if not isinstance(ch, dict) or ch.get("group", self._channel_group) != self._channel_group:
                raise Rejected("channel", f"channel {ch!r} is not in the group {self._channel_group!r}")
            if self._channel_configs and ch.get("config") not in self._channel_configs:
                raise Rejected("channel", f"{ch.get('config')!r} is not a config of {self._channel_group!r}")
            lo = dict(((e.get("metadata") or {}).get("liveomics") or {}))
            well, fld = lo.get("well"), lo.get("field")
            if not (isinstance(well, str) and NAME.match(well)) or not isinstance(fld, int) or fld < lim.min_field:
                raise Rejected("field", f"well {well!r} field {fld!r}: follow-ups write fields >= {lim.min_field}")
            if lo.get("plate", self.plate) != self.plate:
                raise Rejected("plate", f"an event names plate {lo['plate']!r}")
            lo.update(followup_id=rid, plate=self.plate)
            try:
                events.append(useq.MDAEvent(**{**e, "metadata": {"liveomics": lo}}))
            except Exception as err:
                raise Rejected("malformed", str(err).splitlines()[0]) from err
        return events

    def _check(self, req: dict, events: list[useq.MDAEvent], delay_s: float) -> None:
        """Raises `Rejected` unless the request is for this plate, inside the stage limits and
        within the count, rate and delay caps. Called with the lock held."""
        lim = self.limits
        if not (0 <= delay_s <= lim.max_delay_s):
            raise Rejected("delay", f"starts in {delay_s:.0f} s (at most {lim.max_delay_s:g} s)")
        for e in events:
            if e.x_pos is not None or e.y_pos is not None:
                if self._stage_um is None:
                    raise Rejected("stage", "no stage limits known yet (no plate running, none configured)")
                x0, x1, y0, y1 = self._stage_um
                x = e.x_pos if e.x_pos is not None else x0
                y = e.y_pos if e.y_pos is not None else y0
                if not (x0 <= x <= x1 and y0 <= y <= y1):
                    raise Rejected("stage", f"position ({x}, {y}) µm outside x {x0}..{x1}, y {y0}..{y1}")
            if e.z_pos is not None:
                if self._z_um is None:
                    raise Rejected("stage", "no Z limits known yet (no plate running, none configured)")
                z0, z1 = self._z_um
                if not (z0 <= e.z_pos <= z1):
                    raise Rejected("stage", f"z {e.z_pos} µm outside {z0}..{z1}")
        if self.stats.requests >= lim.max_requests:
            raise Rejected("count", f"{lim.max_requests} requests already accepted for this plate")
        now = time.monotonic_ns()
        while self._accepted_ns and now - self._accepted_ns[0] > 60e9:
            self._accepted_ns.popleft()
        if len(self._accepted_ns) >= lim.max_per_minute:
            raise Rejected("rate", f"more than {lim.max_per_minute:g} requests in the last minute")

    def _on_request(self, sample) -> None:
        """zenoh thread: validate against the limits and with useq, queue the events, acknowledge."""
        rid = None
        try:
            req = json.loads(sample.payload.to_bytes())
            if not isinstance(req, dict):
                raise ValueError("not a JSON object")
            rid = str(req["id"])[:128] if isinstance(req.get("id"), str) and req["id"] else None
            if rid is None:
                raise ValueError("no string `id`")
            with self._lock:
                if rid in self._requests:
                    # Never answered: a `rejected` would close the live request of that id.
                    log.warning("duplicate follow-up request %s ignored", rid)
                    return
            if req.get("plate") != self.plate:
                raise Rejected("plate", f"names plate {req.get('plate')!r}, acquiring {self.plate!r}")
            events = self._events(rid, req.get("events"))
            trigger = (str(req["well"]), int(req["trigger"]["field"]))
            not_before = int(req.get("not_before_unix_ns") or 0)
            requested = int(req.get("requested_unix_ns") or 0)
        except Rejected as r:
            self._reject(rid, r.reason, r.detail)
            return
        except Exception as e:  # malformed request: say so, keep running
            self._reject(rid, "malformed", str(e).splitlines()[0] if str(e) else type(e).__name__)
            return
        delay = max(0.0, (not_before - time.time_ns()) / 1e9) if not_before else 0.0
        with self._lock:
            if rid in self._requests:
                log.warning("duplicate follow-up request %s ignored", rid)
                return
            try:
                self._check(req, events, delay)
            except Rejected as r:
                problem = r
            else:
                problem = None
                self._requests[rid] = _Request(rid, len(events), trigger, time.time_ns(), requested)
                self._accepted_ns.append(time.monotonic_ns())
                self.stats.requests += 1
        if problem is not None:
            self._reject(rid, problem.reason, problem.detail)
            return
        if delay > 0:
            threading.Timer(delay, lambda: [self.followups.put(e) for e in events]).start()
        else:
            for e in events:
                self.followups.put(e)
        self._ack(rid, "scheduled", events=len(events))
        log.info("follow-up %s scheduled: %d events", rid, len(events))

    def _on_event_started(self, event: useq.MDAEvent) -> None:
        rid = ((event.metadata or {}).get("liveomics") or {}).get("followup_id")
        if not rid:
            return
        with self._lock:
            r = self._requests.get(rid)
            if r is None or r.started_ns is not None:
                return
            r.started_ns = time.time_ns()
            last = self._last_frame_ns.get(r.trigger)
        if last is not None:
            # From the trigger field's last frame leaving the bridge to the follow-up starting.
            self.stats.reaction_ms.append((r.started_ns - last) / 1e6)
            if r.requested_ns:
                self.stats.decision_ms.append((r.requested_ns - last) / 1e6)
            self.stats.queue_ms.append((r.started_ns - r.received_ns) / 1e6)
        self._ack(rid, "started")

    def _outstanding(self) -> bool:
        with self._lock:
            return any(r.acquired < r.events for r in self._requests.values())

    # -- running ----------------------------------------------------------------------------
    def wait_for_daemon(self, timeout_s: float = 30.0) -> bool:
        """Waits until a subscriber to this plate's frames (the daemon) is reachable, so that an
        acquisition started right after does not publish its first frames to nobody: zenoh
        delivers a put only to subscriptions its session has heard of. False after `timeout_s`."""
        probe = self.session.declare_publisher(f"liveomics/{self.instrument}/frames/{self.plate}/probe/0/probe")
        try:
            deadline = time.monotonic() + timeout_s
            while not probe.matching_status.matching:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.02)
            return True
        finally:
            probe.undeclare()

    def run(self, sequence: useq.MDASequence) -> Stats:
        """Runs `sequence`, then whatever follow-ups arrive, until `idle_s` passes with no new
        event and no request outstanding. Follow-ups go ahead of the plan's remaining events, but
        only between positions: a field's channels are never split by a detour."""
        lim = self.limits
        extent = lim.stage_um if lim.stage_um is not None else plate_extent_um(sequence, lim.margin_um)
        z_range = lim.z_um
        if z_range is None:
            zs = [e.z_pos for e in sequence if e.z_pos is not None]
            if not zs:
                try:
                    zs = [float(self.core.getZPosition())]
                except Exception:  # no focus device: follow-ups may not ask for Z at all
                    zs = []
            z_range = (min(zs) - lim.max_dz_um, max(zs) + lim.max_dz_um) if zs else None
        with self._lock:
            self._stage_um, self._z_um = extent, z_range
        plan = collections.deque(sequence)

        def boundary(last) -> bool:
            if last is None or not plan:
                return True
            nxt = plan[0]
            return (nxt.index.get("p"), nxt.index.get("t"), nxt.index.get("g")) != (
                last.index.get("p"), last.index.get("t"), last.index.get("g"))

        def feed():
            last = None
            while True:
                if boundary(last):
                    try:
                        yield self.followups.get_nowait()
                        continue
                    except queue.Empty:
                        pass
                if plan:
                    last = plan.popleft()
                    yield last
                    continue
                try:
                    yield self.followups.get(timeout=self.idle_s)
                except queue.Empty:
                    if not self._outstanding():
                        return

        self.core.mda.run(feed())
        return self.stats

    def close(self) -> None:
        self.frames.put(_STOP)
        self._publisher.join(timeout=30)
        self._sub.undeclare()
        self._resend_sub.undeclare()
        self._token.undeclare()
        self.session.close()
