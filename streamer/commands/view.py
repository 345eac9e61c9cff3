"""`streamer view`: a live web page of every bed's lead II, artifact flags and episodes.

A plain reader (no consumer group: it never takes partitions from the workers or commits offsets) of the
input, flags and episodes topics. Memory is bounded per bed (a fixed strip of samples, a fixed number of
flags) and in beds (`max_beds`, least recently heard of dropped first). The browser gets one snapshot,
then server-sent events at most `push_interval_s` apart carrying only what changed, so 400 beds stay
smooth. The page and its drawing code are served from the package: it works with no network.

The page shows patient data, so who may reach it is checked on every request (docs/security.md):
- the Host header names this server (loopback names, the bind address, `--allow-host` names): a page on
  another site that rebinds its DNS name to 127.0.0.1 gets 421;
- an access token, random per start (printed once, in the URL a person opens, as Jupyter does) or read
  from `--token-file`; the page keeps it in an HttpOnly, SameSite=Strict cookie. Anything else gets 401;
- a bind beyond loopback needs TLS and a configured token, else the command refuses to start (exit 2);
- every response forbids framing, inline script and sniffing, and the API is never cached.
Records are checked with the client's own decoders (`decode_flag`, `decode_episode`: the range checks an
alarm system relies on); one that fails is skipped and counted, never shown. Event streams are capped, and
all of them share one serialized snapshot per push, built off the event loop.
"""

from __future__ import annotations

import asyncio
import gzip
import hmac
import ipaddress
import secrets
import socket
import ssl
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from streamer.client import (DEFAULT_MAX_LEASE_S, DEFAULT_SKEW_S, Episode, SuppressionView, decode_episode,
                             decode_flag)
from streamer.errors import SettingsError
from streamer.ingest.contract import decode
from streamer.netaddr import is_loopback
from streamer.logs import get_logger
from streamer.settings import KafkaSettings, WindowSettings

log = get_logger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
PAGE = ASSETS / "view.html"
# The page's script and style are files of their own so that the CSP can forbid inline code.
STATIC = {"view.js": "text/javascript", "view.css": "text/css"}
STRIP_HZ = 125  # display rate of the strip: enough to see QRS complexes and noise, 4x less than 500 Hz


SLOT_NS = 10**9 // STRIP_HZ

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
MIN_TOKEN_CHARS = 16
# A message is written in slices: a client's unsent bytes stay under one slice plus aiohttp's 64 KiB
# high-water mark, whatever the ward's size, and a client that takes no slice for `stall_s` is dropped.
WRITE_SLICE = 256 * 1024
EVENT_SNDBUF = 256 * 1024  # the kernel's send buffer of an event stream, bounded too
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


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
        """`flag`: what `slim_flag` keeps of a flag `decode_flag` accepted. Never mutated once added (a
        snapshot serializes it in another thread)."""
        if self.flags and any(f["window_id"] == flag["window_id"] for f in list(self.flags)[-8:]):
            return  # a re-published copy (same window id, same content)
        self.flags.append(flag)
        while len(self.flags) > self.history:
            self.flags.popleft()
        self.new_flags.append(flag)
        del self.new_flags[:-self.history]

    def set_episode(self, episode: Episode, status: str) -> None:
        """The episode the ward's SuppressionView shows for this bed, with its status there: "open" while
        the lease holds, "lapsed" once it ran out with no renewal (the feed is silent), "closed"."""
        state = {"suppressed": "open", "lapsed": "lapsed"}.get(status, "closed")
        if self.episode is not None and (self.episode["episode_id"], self.episode["state"]) == \
                (episode.episode_id, state):
            return  # a renewal: nothing on the page changes
        # a new dict each time, never mutated: a snapshot may be serializing the previous one
        self.episode = {"episode_id": episode.episode_id, "state": state, "reason": episode.reason,
                        "start_ns": episode.start_ns, "end_ns": episode.end_ns,
                        "peak_probability": episode.peak_probability, "flagged_windows": episode.flagged_windows,
                        "seq": episode.seq}
        self.episode_changed = True

    def recent_flags(self) -> list[dict]:
        """The flags the strip shows (the page asks for the whole history of one bed when clicked)."""
        return _recent(list(self.flags), self.last_slot, self.strip_s)

    def frozen(self) -> tuple:
        """Copies of what a snapshot shows (C-level copies, cheap on the event loop); `_full_summary` turns
        them into the page's form in another thread while the consumer keeps changing the bed."""
        return (list(self.slots), list(self.values), list(self.flags), self.last_slot, self.episode,
                self.flags[-1]["latency_ms"] if self.flags else None)

    def summary(self, full: bool) -> dict:
        """The bed for the page: its strip and recent flags (`full`), or what changed since the last push."""
        if full:
            return _full_summary(self.frozen(), self.strip_s)
        out = {"strip": _runs(self.new_slots, self.new_values), "flags": self.new_flags,
               "episode": self.episode if self.episode_changed else None,
               "latency_ms": self.flags[-1]["latency_ms"] if self.flags else None}
        self.new_slots, self.new_values, self.new_flags, self.episode_changed = [], [], [], False
        return out


def slim_flag(value: bytes) -> dict:
    """What the page shows of one flag, from a value the client's `decode_flag` accepts (its schema, types
    and range checks): MessageError otherwise. Only these fields, each of the type the page expects."""
    flag = decode_flag(value)
    return {"window_id": flag.window_id, "window_start_ns": flag.window_start_ns, "window_end_ns": flag.window_end_ns,
            "status": flag.status, "reason": flag.reason, "probability": flag.probability, "artifact": flag.artifact,
            "threshold": flag.threshold, "latency_ms": flag.latency_ms, "patient_id": flag.patient_id,
            "model": flag.model}


def _recent(flags: list[dict], last_slot: int, strip_s: float) -> list[dict]:
    since = (last_slot - int(strip_s * STRIP_HZ)) * SLOT_NS
    return [f for f in flags if f["window_end_ns"] > since][-int(strip_s // 10 + 2):]


def _full_summary(frozen: tuple, strip_s: float) -> dict:
    slots, values, flags, last_slot, episode, latency_ms = frozen
    return {"strip": _runs(slots, values), "flags": _recent(flags, last_slot, strip_s), "episode": episode,
            "latency_ms": latency_ms}


def _runs(slots, values) -> list:
    """[[first_slot, [v, ...]], ...]: one run per stretch of consecutive slots."""
    if not len(slots):
        return []
    s = np.asarray(slots, dtype=np.int64)
    cuts = (np.flatnonzero(np.diff(s) != 1) + 1).tolist()
    values = list(values)
    return [[int(s[a]), values[a:b]] for a, b in zip([0, *cuts], [*cuts, len(s)])]


class Ward:
    """Every bed's view, bounded: `max_beds` beds, each `strip_s` of samples and `history` flags."""

    def __init__(self, strip_s: float = 60.0, history: int = 360, max_beds: int = 1000,
                 skew_s: float = DEFAULT_SKEW_S, max_lease_s: float = DEFAULT_MAX_LEASE_S):
        self.strip_s, self.history, self.max_beds = strip_s, history, max_beds
        self.beds: OrderedDict[str, BedView] = OrderedDict()
        self.model: str | None = None
        self.changed: set[str] = set()
        self.gone: set[str] = set()  # beds dropped (max_beds) since the last delta: the page forgets them
        # episodes by seq, bounded by their lease and at most max_lease_s after arrival, as alarm systems do
        self.suppression = SuppressionView(skew_s, max_lease_s=max_lease_s)
        self.skipped: Counter[str] = Counter()  # records not shown, by topic kind ("input", "flag", "episode")

    def bed(self, patient_id: str) -> BedView:
        b = self.beds.get(patient_id)
        if b is None:
            b = self.beds[patient_id] = BedView(self.strip_s, self.history)
            # a bed dropped and back within one push stays in `gone`: the page forgets the old card before
            # it takes this one; and it starts with the episode the ward's suppression holds for it (a new
            # bed without it would show no suppression while one is on, and expire() would never lapse it)
            episode = self.suppression.episode(patient_id)
            if episode is not None:
                b.set_episode(episode, self.suppression.status(patient_id))
            while len(self.beds) > self.max_beds:
                gone, _ = self.beds.popitem(last=False)
                self.changed.discard(gone)
                self.gone.add(gone)
        self.beds.move_to_end(patient_id)
        b.heard_at = time.time()
        self.changed.add(patient_id)
        return b

    def on_input(self, key: bytes | None, value: bytes | None, settings: WindowSettings) -> None:
        """InvalidMessage for what the worker would dead-letter: the view only draws what the worker reads."""
        chunk = decode(key, value, settings)
        self.bed(chunk.patient_id).add_samples(chunk.t0_ns, chunk.fs, chunk.samples)

    def on_flag(self, value: bytes) -> None:
        """MessageError (a ValueError) for a flag the client's decoder refuses: nothing of it is kept."""
        flag = slim_flag(value)
        self.model = flag.pop("model")
        self.bed(flag.pop("patient_id")).add_flag(flag)

    def on_episode(self, value: bytes) -> None:
        episode = decode_episode(value)  # MessageError (a ValueError) for what it cannot read
        if self.suppression.apply(episode):
            self.bed(episode.patient_id).set_episode(episode, self.suppression.status(episode.patient_id))
        elif episode.patient_id in self.beds:  # a renewal may bring a lapsed lease back
            self._refresh(episode.patient_id)

    def on_record(self, kind: str, key: bytes | None, value: bytes | None, settings: WindowSettings) -> bool:
        """One record of `kind` ("input", "flag", "episode"), or False and counted when anything about it
        fails: one record never stops the view, and nothing unchecked reaches the page."""
        try:
            if kind == "flag":
                self.on_flag(value)
            elif kind == "episode":
                self.on_episode(value)
            else:
                self.on_input(key, value, settings)
            return True
        except Exception:  # noqa: BLE001 - any failure of one record skips that record, counted
            self.skipped[kind] += 1
            return False

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

    def frozen(self) -> dict:
        """What `build_snapshot` needs, copied on the event loop; the building is left to another thread."""
        return {"model": self.model, "strip_s": self.strip_s, "skipped": sum(self.skipped.values()),
                "beds": {pid: b.frozen() for pid, b in self.beds.items()}}

    def snapshot(self) -> dict:
        return build_snapshot(self.frozen())

    def delta(self) -> dict | None:
        """What changed since the last delta: the beds that changed, and `gone`, the beds dropped (a page
        forgets them: nothing would ever update their last state again)."""
        if not self.changed and not self.gone:
            return None
        beds = {pid: self.beds[pid].summary(full=False) for pid in self.changed if pid in self.beds}
        gone = sorted(self.gone)
        self.changed.clear()
        self.gone.clear()
        return {"model": self.model, "skipped": sum(self.skipped.values()), "beds": beds, "gone": gone}


def build_snapshot(frozen: dict) -> dict:
    strip_s = frozen["strip_s"]
    return {"model": frozen["model"], "strip_s": strip_s, "slot_ns": SLOT_NS, "skipped": frozen["skipped"],
            "beds": {pid: _full_summary(bed, strip_s) for pid, bed in frozen["beds"].items()}}


def _serialize_snapshot(frozen: dict) -> bytes:
    return orjson.dumps(build_snapshot(frozen))


# -- who may reach the page -------------------------------------------------------------------------
def _host_name(name: str) -> str:
    """A host as a Host header writes it: lower case, an IPv6 address in brackets, no trailing dot."""
    name = name.strip().lower().rstrip(".")
    try:
        if ipaddress.ip_address(name.strip("[]")).version == 6:
            return f"[{name.strip('[]')}]"
    except ValueError:
        pass
    return name


@dataclass(frozen=True)
class Access:
    """Who may reach the view: the Host names it answers to, its token (configured or random per start)
    and its TLS context (None: plain HTTP, only on loopback)."""

    token: str
    token_configured: bool
    allowed_hosts: frozenset[str]
    tls: ssl.SSLContext | None = None

    @classmethod
    def configure(cls, host: str = "127.0.0.1", token_file: str | None = None, allow_hosts: tuple[str, ...] = (),
                  tls_cert: str | None = None, tls_key: str | None = None) -> Access:
        """SettingsError (exit 2, one line) for a bind beyond loopback without TLS and a configured token, an
        unreadable or short token file, a certificate that does not load."""
        if bool(tls_cert) != bool(tls_key):
            raise SettingsError("--tls-cert and --tls-key go together")
        token = None
        if token_file:
            try:
                token = Path(token_file).read_text(encoding="ascii").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise SettingsError(f"--token-file {token_file}: cannot read it ({type(exc).__name__})") from None
            # never echoed: only its length is judged
            if len(token) < MIN_TOKEN_CHARS or not all(33 <= ord(c) < 127 and c not in ';,"\\' for c in token):
                raise SettingsError(f"--token-file {token_file}: the token must be at least {MIN_TOKEN_CHARS} "
                                    "printable ASCII characters without spaces, quotes, commas or semicolons")
        wildcard = host in ("0.0.0.0", "::", "")
        if not is_loopback(host) and not (tls_cert and token):
            raise SettingsError(f"--host {host} serves patient data beyond this machine: it needs --tls-cert, "
                                "--tls-key and --token-file (or serve on 127.0.0.1 and tunnel to it)")
        if wildcard and not allow_hosts:
            raise SettingsError(f"--host {host} listens on every address: name the host names clients use "
                                "with --allow-host (any other Host header is refused)")
        tls = None
        if tls_cert:
            try:
                tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                tls.minimum_version = ssl.TLSVersion.TLSv1_2
                tls.load_cert_chain(tls_cert, tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise SettingsError(f"--tls-cert/--tls-key do not load: {exc}") from None
        names = {*LOOPBACK_NAMES, *(_host_name(h) for h in allow_hosts)}
        if not wildcard:
            names.add(_host_name(host))
        return cls(token or secrets.token_urlsafe(32), token is not None, frozenset(names), tls)


class ViewServer:
    """The view's HTTP side and its Kafka reader. `serve()` alone runs the HTTP side over `ward` (tests,
    a crafted ward); `run()` also reads the topics into it.

    Event streams: at most `max_event_clients` at once (one more gets 503). Each push builds one delta and,
    when anyone asks, one snapshot, serialized once in a worker thread and shared by every client. Every
    message goes out in slices of WRITE_SLICE bytes, each waiting for the client to take the previous, so a
    client's unsent bytes stay bounded; one that takes no slice for `stall_s` is dropped (`dropped`)."""

    def __init__(self, k: KafkaSettings | None, host: str = "127.0.0.1", port: int = 8765,
                 push_interval_s: float = 1.0, from_beginning: bool = False, ward: Ward | None = None,
                 access: Access | None = None, max_event_clients: int = 16, stall_s: float = 15.0):
        self.kafka, self.host, self.port = k, host, port
        self.push_interval_s = push_interval_s
        self.from_beginning = from_beginning
        self.ward = ward or Ward()
        self.access = access or Access.configure(host)
        self.max_event_clients, self.stall_s = max_event_clients, stall_s
        self.window_settings = WindowSettings()
        self.clients: dict[asyncio.Queue, asyncio.Transport | None] = {}  # each event stream's queue -> transport
        self.refused: Counter[str] = Counter()  # requests refused, by why ("host", "token", "busy")
        self.dropped = 0  # event clients dropped for not taking what they were sent
        self.runner = None
        self._pusher: asyncio.Task | None = None
        self._generation = 0  # pushes so far: a snapshot is shared by every request until the next one
        self._snapshot: tuple[int, asyncio.Future] | None = None
        self._gzipped: tuple[int, asyncio.Future] | None = None

    @property
    def cookie(self) -> str:
        return f"streamer-view-{self.port}"  # cookies ignore ports: two views on one machine keep their own

    @property
    def origin(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else _host_name(self.host)
        return f"{'https' if self.access.tls else 'http'}://{host}:{self.port}/"

    @property
    def url(self) -> str:
        """The address a person opens: with the token when it is this start's own (a configured one is
        the operator's to hand out, so it stays out of the output)."""
        return self.origin if self.access.token_configured else f"{self.origin}?token={self.access.token}"

    async def run(self, stop: asyncio.Event) -> None:
        from streamer.kafka.clients import check_connection, make_consumer, require_topics

        await check_connection(self.kafka)
        topics = [*self.kafka.input_topics, self.kafka.flags_topic, self.kafka.episodes_topic]
        await require_topics(self.kafka, topics)
        consumer = make_consumer(self.kafka, group_id=None, client_id=f"{self.kafka.client_id}-view",
                                 auto_offset_reset="earliest" if self.from_beginning else "latest")
        await consumer.start()
        consumer.subscribe(topics)
        kinds = {self.kafka.flags_topic: "flag", self.kafka.episodes_topic: "episode"}
        try:
            await self.serve()
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=200, max_records=5000)
                for tp, records in batch.items():
                    kind = kinds.get(tp.topic, "input")
                    for r in records:
                        if not self.ward.on_record(kind, r.key, r.value, self.window_settings):
                            self._skipped(kind, tp, r.offset)
                await asyncio.sleep(0)  # the HTTP side gets its turn between batches
        finally:
            await self.close()
            await consumer.stop()

    def _skipped(self, kind: str, tp, offset: int) -> None:
        n = self.ward.skipped[kind]
        if n <= 10 or n % 1000 == 0:  # a flood of bad records is a few lines, not one per record
            log.warning("view_record_skipped", kind=kind, topic=tp.topic, partition=tp.partition, offset=offset,
                        skipped=n)

    async def serve(self) -> None:
        """Listen and push: the HTTP side, until `close()`."""
        from aiohttp import web

        @web.middleware
        async def gate(request, handler):
            return await self._gate(request, handler)

        app = web.Application(middlewares=[gate], client_max_size=4096)
        app.on_response_prepare.append(self._security_headers)
        app.router.add_get("/", self._page)
        for name in STATIC:
            app.router.add_get(f"/{name}", self._static)
        app.router.add_get("/api/ward", self._snapshot_handler)
        app.router.add_get("/api/bed/{patient_id}", self._bed)
        app.router.add_get("/events", self._events)
        # shutdown_timeout: event streams never end by themselves; a stop cancels them after a second
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, max_line_size=8190,
                                    max_field_size=8190, max_headers=32, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, ssl_context=self.access.tls)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self._pusher = asyncio.create_task(self._push_loop())
        # The log line carries no token: logs are collected and kept. The one line with it goes to stdout,
        # for the person who started the view (a configured token is never printed).
        log.info("view_listening", url=self.origin, token="configured" if self.access.token_configured else "printed",
                 allowed_hosts=sorted(self.access.allowed_hosts), tls=self.access.tls is not None)
        print(f"ward view: {self.url}", flush=True)

    async def close(self) -> None:
        if self._pusher is not None:
            self._pusher.cancel()
        if self.runner is not None:
            await self.runner.cleanup()

    # -- every request ------------------------------------------------------------------------------
    def _host_allowed(self, header: str | None) -> bool:
        if not header:
            return False
        name, sep, port = header.rpartition(":") if not header.endswith("]") else (header, "", "")
        if not sep:
            name, port = header, ""
        if port:
            if port != str(self.port):
                return False
        elif self.port != (443 if self.access.tls else 80):
            return False
        return _host_name(name) in self.access.allowed_hosts

    def _token_of(self, request) -> tuple[str | None, bool]:
        """The token a request presents, and whether it came in the URL (a person opening the printed link)."""
        if "token" in request.query:
            return request.query["token"], True
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return auth[7:].strip(), False
        return request.cookies.get(self.cookie), False

    def _token_ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode("utf-8", "replace"),
                                                         self.access.token.encode())

    @staticmethod
    def _text(status: int, text: str):
        from aiohttp import web

        return web.Response(status=status, text=text + "\n")

    async def _gate(self, request, handler):
        """Middleware: a foreign Host gets 421, a missing or wrong token 401, before any handler runs. The
        printed link's token becomes a cookie, and the page is reloaded without it in the address bar."""
        from aiohttp import web

        if not self._host_allowed(request.headers.get("Host")):
            self.refused["host"] += 1
            return self._text(421, "this server does not answer to that host name")
        given, in_url = self._token_of(request)
        if not self._token_ok(given):
            self.refused["token"] += 1
            return self._text(401, "the ward view needs its token: open the address streamer view printed at "
                                   "start (http://...?token=...)")
        if in_url and request.path == "/":
            resp = web.Response(status=303, headers={"Location": "/"})
            resp.set_cookie(self.cookie, self.access.token, httponly=True, samesite="Strict", path="/",
                            secure=self.access.tls is not None)
            return resp
        return await handler(request)

    async def _security_headers(self, request, response) -> None:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)

    # -- handlers -----------------------------------------------------------------------------------
    async def _page(self, request):
        from aiohttp import web

        return web.Response(body=PAGE.read_bytes(), content_type="text/html", charset="utf-8")

    async def _static(self, request):
        from aiohttp import web

        name = request.path.lstrip("/")
        return web.Response(body=(ASSETS / name).read_bytes(), content_type=STATIC[name])

    async def _bed(self, request):
        from aiohttp import web

        bed = self.ward.beds.get(request.match_info["patient_id"])
        if bed is None:
            return self._text(404, "no such bed in view")
        return web.Response(body=orjson.dumps({"flags": list(bed.flags), "episode": bed.episode}),
                            content_type="application/json")

    async def snapshot_json(self) -> bytes:
        """This push's snapshot, serialized once (in a worker thread) whoever asks for it first."""
        if self._snapshot is None or self._snapshot[0] != self._generation:
            frozen = self.ward.frozen()
            self._snapshot = (self._generation, asyncio.ensure_future(asyncio.to_thread(_serialize_snapshot, frozen)))
        return await asyncio.shield(self._snapshot[1])

    async def _snapshot_gzip(self) -> bytes:
        body = await self.snapshot_json()
        if self._gzipped is None or self._gzipped[0] != self._generation:
            self._gzipped = (self._generation,
                             asyncio.ensure_future(asyncio.to_thread(gzip.compress, body, 5, mtime=0)))
        return await asyncio.shield(self._gzipped[1])

    async def _snapshot_handler(self, request):
        from aiohttp import web

        gzipped = "gzip" in request.headers.get("Accept-Encoding", "")
        body = await (self._snapshot_gzip() if gzipped else self.snapshot_json())
        resp = web.StreamResponse(headers={"Content-Type": "application/json", "Vary": "Accept-Encoding",
                                           **({"Content-Encoding": "gzip"} if gzipped else {})})
        resp.content_length = len(body)
        await resp.prepare(request)
        if await self._send(request, resp, body):
            await resp.write_eof()
        return resp

    async def _send(self, request, resp, *parts: bytes) -> bool:
        """Write `parts` in slices, each within `stall_s`; False when the client was dropped for not taking one."""
        try:
            for part in parts:
                view = memoryview(part)
                for start in range(0, len(view), WRITE_SLICE):
                    async with asyncio.timeout(self.stall_s):
                        await resp.write(view[start:start + WRITE_SLICE])
            return True
        except TimeoutError:
            self.dropped += 1
            log.warning("view_client_dropped", path=request.path, stalled_s=self.stall_s, dropped=self.dropped)
            if request.transport is not None:
                request.transport.abort()
            return False

    async def _events(self, request):
        from aiohttp import web

        if len(self.clients) >= self.max_event_clients:
            self.refused["busy"] += 1
            resp = self._text(503, f"{self.max_event_clients} live pages already: close one")
            resp.headers["Retry-After"] = "10"
            return resp
        queue: asyncio.Queue = asyncio.Queue(maxsize=4)
        self.clients[queue] = request.transport
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            sock = request.transport.get_extra_info("socket") if request.transport is not None else None
            if sock is not None:  # what the kernel holds for a client that does not read is bounded too
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, EVENT_SNDBUF)
            await resp.prepare(request)
            ok = await self._send(request, resp, b"event: snapshot\ndata: ", await self.snapshot_json(), b"\n\n")
            while ok:
                ok = await self._send(request, resp, await queue.get())
        except (ConnectionResetError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.clients.pop(queue, None)
        return resp

    def unsent_bytes(self) -> list[int]:
        """What each event stream's transport holds unsent (bounded by WRITE_SLICE plus aiohttp's 64 KiB)."""
        return [t.get_write_buffer_size() for t in list(self.clients.values()) if t is not None]

    async def _push_loop(self) -> None:
        while True:
            await asyncio.sleep(self.push_interval_s)
            self.ward.expire()
            delta = self.ward.delta()
            self._generation += 1  # from here on a new snapshot (the old one plus this delta, or newer)
            if delta is None:
                continue
            msg = b"event: delta\ndata: " + await asyncio.to_thread(orjson.dumps, delta) + b"\n\n"
            for q in list(self.clients):
                if q.full():  # a client too slow for the pushes: drop what it missed, it reloads the snapshot
                    while not q.empty():
                        q.get_nowait()
                    q.put_nowait(b"event: reload\ndata: {}\n\n")
                else:
                    q.put_nowait(msg)
