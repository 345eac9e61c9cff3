"""`streamer view`: a live web page of every bed's lead II, artifact flags and episodes.

A plain reader (no consumer group: it never takes partitions from the workers or commits offsets) of the
input, flags and episodes topics. Memory is bounded per bed (a fixed strip of samples, a fixed number of
flags) and in beds (`max_beds`, least recently heard of dropped first). The browser gets one snapshot,
then server-sent events at most `push_interval_s` apart carrying only what changed, so 400 beds stay
smooth. The page and its drawing code are served from the package: it works with no network.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from streamer.client import DEFAULT_SKEW_S, Episode, SuppressionView, decode_episode
from streamer.ingest.contract import InvalidMessage, decode
from streamer.logs import get_logger
from streamer.settings import KafkaSettings, WindowSettings

log = get_logger(__name__)

PAGE = Path(__file__).resolve().parent.parent / "assets" / "view.html"
STRIP_HZ = 125  # display rate of the strip: enough to see QRS complexes and noise, 4x less than 500 Hz


SLOT_NS = 10**9 // STRIP_HZ


@dataclass
class BedView:
    strip_s: float
    history: int
    # The strip: one value (mV, 2 decimals) per 1/STRIP_HZ slot of time that had a sample; a missing slot is
    # a gap. Sent as runs of consecutive slots, [first_slot, [mV, ...]]: no per-sample timestamps.
    slots: deque = field(default_factory=deque)
    values: deque = field(default_factory=deque)
    flags: deque = field(default_factory=deque)  # newest last, at most `history`
    episode: dict | None = None
    heard_at: float = 0.0
    last_slot: int = -1
    # what the next push carries
    new_slots: list = field(default_factory=list)
    new_values: list = field(default_factory=list)
    new_flags: list = field(default_factory=list)
    episode_changed: bool = False

    def add_samples(self, t0_ns: int, fs: float, samples: np.ndarray) -> None:
        # The first sample in each slot, across chunk boundaries and at any source rate.
        slots = (t0_ns + (np.arange(len(samples)) * (1e9 / fs)).astype(np.int64)) // SLOT_NS
        keep = np.empty(len(slots), dtype=bool)
        keep[0] = slots[0] > self.last_slot
        keep[1:] = slots[1:] != slots[:-1]
        keep &= slots > self.last_slot  # late or repeated samples are not redrawn
        if not keep.any():
            return
        new_slots, new_values = slots[keep].tolist(), np.round(samples[keep], 2).tolist()
        self.last_slot = new_slots[-1]
        self.slots.extend(new_slots)
        self.values.extend(new_values)
        self.new_slots.extend(new_slots)
        self.new_values.extend(new_values)
        horizon = self.last_slot - int(self.strip_s * STRIP_HZ)
        while self.slots and self.slots[0] < horizon:
            self.slots.popleft()
            self.values.popleft()
        if len(self.new_slots) > len(self.slots):  # pushes not taken for a while: the strip, not more
            self.new_slots, self.new_values = list(self.slots), list(self.values)

    def add_flag(self, flag: dict) -> None:
        slim = {k: flag.get(k) for k in ("window_id", "window_start_ns", "window_end_ns", "status", "reason",
                                           "probability", "artifact", "threshold", "latency_ms")}
        if self.flags and any(f["window_id"] == slim["window_id"] for f in list(self.flags)[-8:]):
            return  # a re-published copy (same window id, same content)
        self.flags.append(slim)
        while len(self.flags) > self.history:
            self.flags.popleft()
        self.new_flags.append(slim)
        del self.new_flags[:-self.history]

    def set_episode(self, episode: Episode, status: str) -> None:
        """The episode the ward's SuppressionView shows for this bed, with its status there: "open" while
        the lease holds, "lapsed" once it ran out with no renewal (the feed is silent), "closed"."""
        state = {"suppressed": "open", "lapsed": "lapsed"}.get(status, "closed")
        if self.episode is not None and (self.episode["episode_id"], self.episode["state"]) == \
                (episode.episode_id, state):
            return  # a renewal: nothing on the page changes
        self.episode = {"episode_id": episode.episode_id, "state": state, "reason": episode.reason,
                        "start_ns": episode.start_ns, "end_ns": episode.end_ns,
                        "peak_probability": episode.peak_probability, "flagged_windows": episode.flagged_windows,
                        "seq": episode.seq}
        self.episode_changed = True

    def recent_flags(self) -> list[dict]:
        """The flags the strip shows (the page asks for the whole history of one bed when clicked)."""
        since = (self.last_slot - int(self.strip_s * STRIP_HZ)) * SLOT_NS
        return [f for f in self.flags if f["window_end_ns"] > since][-int(self.strip_s // 10 + 2):]

    def summary(self, full: bool) -> dict:
        """The bed for the page: its strip and recent flags (`full`), or what changed since the last push."""
        out = {"strip": _runs(self.slots if full else self.new_slots, self.values if full else self.new_values),
               "flags": self.recent_flags() if full else self.new_flags,
               "episode": self.episode if (full or self.episode_changed) else None,
               "latency_ms": self.flags[-1]["latency_ms"] if self.flags else None}
        if not full:
            self.new_slots, self.new_values, self.new_flags, self.episode_changed = [], [], [], False
        return out


def _runs(slots, values) -> list:
    """[[first_slot, [v, ...]], ...]: one run per stretch of consecutive slots."""
    runs: list = []
    prev = None
    for slot, v in zip(slots, values):
        if prev is None or slot != prev + 1:
            runs.append([slot, []])
        runs[-1][1].append(v)
        prev = slot
    return runs


class Ward:
    """Every bed's view, bounded: `max_beds` beds, each `strip_s` of samples and `history` flags."""

    def __init__(self, strip_s: float = 60.0, history: int = 360, max_beds: int = 1000,
                 skew_s: float = DEFAULT_SKEW_S):
        self.strip_s, self.history, self.max_beds = strip_s, history, max_beds
        self.beds: OrderedDict[str, BedView] = OrderedDict()
        self.model: str | None = None
        self.changed: set[str] = set()
        self.suppression = SuppressionView(skew_s)  # episodes by seq, bounded by their lease, as alarm systems do

    def bed(self, patient_id: str) -> BedView:
        b = self.beds.get(patient_id)
        if b is None:
            b = self.beds[patient_id] = BedView(self.strip_s, self.history)
            while len(self.beds) > self.max_beds:
                gone, _ = self.beds.popitem(last=False)
                self.changed.discard(gone)
        self.beds.move_to_end(patient_id)
        b.heard_at = time.time()
        self.changed.add(patient_id)
        return b

    def on_input(self, key: bytes | None, value: bytes | None, settings: WindowSettings) -> None:
        try:
            chunk = decode(key, value, settings)
        except InvalidMessage:
            return  # the worker dead-letters it; the view only draws what the worker would read
        self.bed(chunk.patient_id).add_samples(chunk.t0_ns, chunk.fs, chunk.samples)

    def on_flag(self, value: bytes) -> None:
        flag = orjson.loads(value)
        self.model = flag.get("model", self.model)
        self.bed(flag["patient_id"]).add_flag(flag)

    def on_episode(self, value: bytes) -> None:
        episode = decode_episode(value)  # MessageError (a ValueError) for what it cannot read
        if self.suppression.apply(episode):
            self.bed(episode.patient_id).set_episode(episode, self.suppression.status(episode.patient_id))
        elif episode.patient_id in self.beds:  # a renewal may bring a lapsed lease back
            self._refresh(episode.patient_id)

    def expire(self, now_ns: int | None = None) -> None:
        """Beds whose suppression lease lapsed since the last call are shown so (the feed is silent)."""
        for pid, b in self.beds.items():
            if b.episode is not None and b.episode["state"] == "open":
                self._refresh(pid, now_ns)

    def _refresh(self, patient_id: str, now_ns: int | None = None) -> None:
        episode = self.suppression.episode(patient_id)
        b = self.beds[patient_id]
        before = b.episode_changed
        b.set_episode(episode, self.suppression.status(patient_id, now_ns))
        if b.episode_changed and not before:
            self.changed.add(patient_id)

    def snapshot(self) -> dict:
        return {"model": self.model, "strip_s": self.strip_s, "slot_ns": SLOT_NS,
                "beds": {pid: b.summary(full=True) for pid, b in self.beds.items()}}

    def delta(self) -> dict | None:
        if not self.changed:
            return None
        beds = {pid: self.beds[pid].summary(full=False) for pid in self.changed if pid in self.beds}
        self.changed.clear()
        return {"model": self.model, "beds": beds}


class ViewServer:
    def __init__(self, k: KafkaSettings, host: str = "127.0.0.1", port: int = 8765, push_interval_s: float = 1.0,
                 from_beginning: bool = False, ward: Ward | None = None):
        self.kafka, self.host, self.port = k, host, port
        self.push_interval_s = push_interval_s
        self.from_beginning = from_beginning
        self.ward = ward or Ward()
        self.window_settings = WindowSettings()
        self.clients: set[asyncio.Queue] = set()
        self.runner = None

    async def run(self, stop: asyncio.Event) -> None:
        from streamer.kafka.clients import check_connection, make_consumer, require_topics

        await check_connection(self.kafka)
        topics = [*self.kafka.input_topics, self.kafka.flags_topic, self.kafka.episodes_topic]
        await require_topics(self.kafka, topics)
        consumer = make_consumer(self.kafka, group_id=None, client_id=f"{self.kafka.client_id}-view",
                                 auto_offset_reset="earliest" if self.from_beginning else "latest")
        await consumer.start()
        consumer.subscribe(topics)
        await self._serve()
        pusher = asyncio.create_task(self._push_loop())
        try:
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=200, max_records=5000)
                for tp, records in batch.items():
                    for r in records:
                        try:
                            if tp.topic == self.kafka.flags_topic:
                                self.ward.on_flag(r.value)
                            elif tp.topic == self.kafka.episodes_topic:
                                self.ward.on_episode(r.value)
                            else:
                                self.ward.on_input(r.key, r.value, self.window_settings)
                        except (ValueError, KeyError, TypeError):
                            continue  # not ours to judge: the view shows what it can read
        finally:
            pusher.cancel()
            await consumer.stop()
            if self.runner is not None:
                await self.runner.cleanup()

    async def _serve(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/api/ward", self._snapshot)
        app.router.add_get("/api/bed/{patient_id}", self._bed)
        app.router.add_get("/events", self._events)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        log.info("view_listening", url=f"http://{self.host}:{self.port}/")

    async def _page(self, request):
        from aiohttp import web

        return web.Response(body=PAGE.read_bytes(), content_type="text/html")

    async def _snapshot(self, request):
        from aiohttp import web

        resp = web.Response(body=orjson.dumps(self.ward.snapshot()), content_type="application/json")
        resp.enable_compression()
        return resp

    async def _bed(self, request):
        from aiohttp import web

        bed = self.ward.beds.get(request.match_info["patient_id"])
        if bed is None:
            raise web.HTTPNotFound(text="no such bed in view")
        return web.Response(body=orjson.dumps({"flags": list(bed.flags), "episode": bed.episode}),
                            content_type="application/json")

    async def _events(self, request):
        from aiohttp import web

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        queue: asyncio.Queue = asyncio.Queue(maxsize=4)
        self.clients.add(queue)
        try:
            await resp.write(b"event: snapshot\ndata: " + orjson.dumps(self.ward.snapshot()) + b"\n\n")
            while True:
                msg = await queue.get()
                await resp.write(msg)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.clients.discard(queue)
        return resp

    async def _push_loop(self) -> None:
        while True:
            await asyncio.sleep(self.push_interval_s)
            self.ward.expire()
            delta = self.ward.delta()
            if delta is None:
                continue
            msg = b"event: delta\ndata: " + orjson.dumps(delta) + b"\n\n"
            for q in list(self.clients):
                if q.full():  # a client too slow for the pushes: drop what it missed, it reloads the snapshot
                    while not q.empty():
                        q.get_nowait()
                    q.put_nowait(b"event: reload\ndata: {}\n\n")
                else:
                    q.put_nowait(msg)
