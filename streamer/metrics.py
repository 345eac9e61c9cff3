"""Prometheus metrics and the /metrics, /healthz, /readyz endpoints (aiohttp)."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import platform
import time

from prometheus_client import (CONTENT_TYPE_LATEST, GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR,
                               CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics,
                               generate_latest)

from streamer.logs import get_logger

disable_created_metrics()  # no <name>_created series beside every counter: half the scrape, no use here


def build_labels() -> dict[str, str]:
    """What this process runs: for streamer_build_info, so a dashboard can tell two deployments apart."""
    return dict(_build_labels())


@functools.cache
def _build_labels() -> dict[str, str]:
    # read once a process: importlib.metadata parses each distribution's METADATA file on every call
    # (2 ms a Metrics; the hypothesis models build a thousand of them)
    import importlib.metadata

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "none"

    from streamer._version import __version__

    return {"version": __version__, "python": platform.python_version(), "torch": version("torch"),
            "aiokafka": version("aiokafka"), "onnxruntime": version("onnxruntime")}


class Metrics:
    """Every name carries its unit (seconds, bytes, records, windows, patients) or is a _total count or a
    0/1 state; process_* (CPU, memory, open files), python_* (platform, GC) come from prometheus-client."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self._at_scrape: list = []  # gauges refreshed just before each render
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(standard)
        build = build_labels()
        self.build = Gauge("streamer_build_info", "1, labelled with the versions this process runs", list(build),
                           registry=r)
        self.build.labels(**build).set(1)
        self.messages = Counter("streamer_messages_total", "input records consumed", registry=r)
        self.samples = Counter("streamer_samples_total", "samples accepted into buffers", registry=r)
        self.duplicate_samples = Counter("streamer_duplicate_samples_total", "samples ignored as duplicates",
                                         registry=r)
        self.late_samples = Counter("streamer_late_samples_total", "samples older than the open windows", registry=r)
        self.implausible_samples = Counter("streamer_implausible_samples_total",
                                           "samples beyond windows.max_abs_mv (their windows are not scored)",
                                           registry=r)
        self.dead_letters = Counter("streamer_dead_letters_total", "records dead-lettered", ["reason"], registry=r)
        self.dead_letters_failed = Counter("streamer_dead_letters_failed_total", "records the dead-letter topic "
                                           "refused even as a small stand-in (released, logged dead_letter_failed)",
                                           ["reason"], registry=r)
        self.dropped = Counter("streamer_dropped_total", "records dropped by policy", ["reason"], registry=r)
        self.windows = Counter("streamer_windows_total", "windows published", ["status"], registry=r)
        self.episodes = Counter("streamer_episodes_total", "episode messages published (open, closed, renewed)",
                                ["state"], registry=r)
        self.scores_not_finite = Counter("streamer_scores_not_finite_total", "scorable windows the model gave a "
                                         "NaN or infinite probability (each reported unscored, reason "
                                         "score_not_finite: never clean)", registry=r)
        self.states_lost = Counter("streamer_states_lost_total", "patient states that could not be read back "
                                   "(each closed conservatively, reason state_lost)", registry=r)
        self.batch_size = Histogram("streamer_batch_size_windows", "windows per inference batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.inference_s = Histogram("streamer_inference_seconds", "time per inference batch", registry=r,
                                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.latency_s = Histogram("streamer_flag_latency_seconds",
                                   "last sample of a window received -> its flag acknowledged", registry=r,
                                   buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.flag_step_s = Histogram(
            "streamer_flag_step_seconds", "where a flag's latency goes, per window: queued (window complete -> "
            "its batch starts), inference (its batch scored), to_publisher (scored -> the publisher takes it), "
            "sent (-> acknowledged, at least once; in its open transaction, exactly once), committed (in the "
            "transaction -> the transaction committed: visible to read_committed readers)", ["step"], registry=r,
            buckets=STEP_BUCKETS)
        self.flag_steps = FlagSteps(self.flag_step_s)
        self.partitioner_mismatch = Counter(
            "streamer_input_partitioner_mismatch_total", "input records on a partition their key does not map to "
            "under kafka.input_partitioner; fits: the other partitioner maps them there (crc32, murmur2), or neither",
            ["topic", "fits"], registry=r)
        self.ready = Gauge("streamer_ready", "1 while /readyz answers 200 (model loaded, a member of the group)",
                           registry=r)
        self.lag = Gauge("streamer_consumer_lag_records", "records behind the partition's high watermark",
                         ["topic", "partition"], registry=r)
        self.patients = Gauge("streamer_buffered_patients", "patients with open windows", registry=r)
        self.dead_letters.labels("too_many_patients")  # exported at 0, so the alert sees the first refusal rise
        self.patients_held = Gauge("streamer_patients", "patients this worker holds (states and provisional "
                                   "streams): new ids are refused at windows.max_patients", registry=r)
        self.max_patients = Gauge("streamer_max_patients", "windows.max_patients", registry=r)
        self.clock_offset_s = Gauge("streamer_clock_offset_seconds", "this worker's clock minus the timestamps of "
                                    "the freshest input records (positive: ahead); outputs keep the input's "
                                    "event time either way", registry=r)
        self.open_episodes = Gauge("streamer_open_episodes", "artifact episodes open (alarms suppressed) on this "
                                   "worker's partitions", registry=r)
        self.longest_open_episode_s = Gauge("streamer_longest_open_episode_seconds", "signal time from the first "
                                            "to the last flagged window of the longest open episode on this "
                                            "worker's partitions (0: none open)", registry=r)
        self.restoring = Gauge("streamer_state_restoring_partitions", "partitions whose patient states are being "
                               "read back", registry=r)
        self.restore_s = Histogram("streamer_state_restore_seconds", "time to read back the patient states of "
                                   "one assignment", registry=r,
                                   buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.states_expired = Counter("streamer_states_expired_total", "patient states forgotten after state.ttl_s "
                                      "unchanged (tombstoned)", registry=r)
        self.patient_states = Gauge("streamer_state_patients", "patients whose state this worker holds (its "
                                    "partitions)", registry=r)
        self.fenced = Counter("streamer_transactions_fenced_total", "partitions whose transaction was fenced (a "
                              "newer owner, or the broker's transaction timeout): dropped and the group rejoined",
                              registry=r)
        self.restore_records = Counter("streamer_state_restore_records_total", "state records read back at "
                                       "assignments", registry=r)
        self.inference_busy_s = Gauge("streamer_inference_busy_seconds", "how long the batch now in inference has "
                                      "run (0: idle); /healthz fails past model.inference_stall_s", registry=r)
        self.buffer_bytes = Gauge("streamer_buffer_bytes", "bytes held by open windows", registry=r)
        self.pending = Gauge("streamer_pending_windows", "windows emitted, not yet acknowledged", registry=r)
        self.paused = Gauge("streamer_fetch_paused", "1 while fetching is paused for backpressure", registry=r)
        self.device_fallback = Gauge("streamer_device_fallback", "1 once inference fell back to the CPU", registry=r)
        self.model = Info("streamer_model", "the loaded model", registry=r)

    def render(self) -> bytes:
        for refresh in self._at_scrape:
            refresh()
        return generate_latest(self.registry)

    def watch_inference(self, watch: InferenceWatch) -> None:
        self.inference_busy_s.set_function(watch.busy_s)

    def watch_episodes(self, open_episodes) -> None:
        """`open_episodes()` -> (count, longest span in s): one pass over the patients at each scrape, for
        both gauges (not per record)."""
        def refresh() -> None:
            count, longest_s = open_episodes()
            self.open_episodes.set(count)
            self.longest_open_episode_s.set(longest_s)

        self._at_scrape.append(refresh)


# fine enough below a second to tell a 50 ms step from a 250 ms one in a quantile
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0,
                1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
FLAG_STEPS = ("queued", "inference", "to_publisher", "sent", "committed")


class IngestCounts:
    """The consume loop's per-record counts, added to their counters once per fetch: five Counter.inc
    calls a record (each takes a lock) were ~5 % of the event loop at 600 beds."""
    __slots__ = ("metrics", "messages", "samples", "duplicate", "late", "implausible")

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.messages = self.samples = self.duplicate = self.late = self.implausible = 0

    def accepted(self, result) -> None:
        """A record's samples, as the window stage took them (an AcceptResult)."""
        self.samples += result.new_samples
        self.duplicate += result.duplicate_samples
        self.late += result.late_samples
        self.implausible += result.implausible_samples

    def flush(self) -> None:
        m = self.metrics
        for counter, n in ((m.messages, self.messages), (m.samples, self.samples),
                           (m.duplicate_samples, self.duplicate), (m.late_samples, self.late),
                           (m.implausible_samples, self.implausible)):
            if n:
                counter.inc(n)
        self.messages = self.samples = self.duplicate = self.late = self.implausible = 0


class FlagSteps:
    """The per-step split of streamer_flag_latency_seconds, and (exactly once) the wait for the commit that
    makes a flag visible: the outputs note when each flag joined its partition's open transaction
    (delivery/'s AwaitingCommit) and hand those times to `committed` once it committed."""

    def __init__(self, histogram: Histogram):
        self._by_step = {step: histogram.labels(step) for step in FLAG_STEPS}  # exported at 0 from the start

    def observe(self, step: str, seconds: float, windows: int = 1) -> None:
        child = self._by_step[step]
        for _ in range(windows):
            child.observe(max(seconds, 0.0))

    def committed(self, joined: list[float], at: float) -> None:
        child = self._by_step["committed"]
        for t in joined:
            child.observe(max(at - t, 0.0))


class InferenceWatch:
    """Liveness of the inference stage: a batch in the model longer than `stall_s` (a hung driver, a
    deadlocked thread) makes /healthz fail, so the orchestrator restarts the worker; the event loop
    answering is not enough."""

    def __init__(self, stall_s: float, clock=time.monotonic):
        self.stall_s, self.clock = stall_s, clock
        self.started: float | None = None
        self.windows = 0

    def begin(self, windows: int) -> None:
        self.started, self.windows = self.clock(), windows

    def end(self) -> None:
        self.started, self.windows = None, 0

    def busy_s(self) -> float:
        return 0.0 if self.started is None else self.clock() - self.started

    def alive(self) -> tuple[bool, str]:
        busy = self.busy_s()
        if busy > self.stall_s:
            return False, f"inference stalled: one batch of {self.windows} windows for {busy:.0f} s"
        return True, "ok"


class HealthServer:
    """GET /metrics, /healthz (alive: 503 when inference is stalled), /readyz (model loaded and partitions
    assigned).

    Served by aiohttp (a maintained HTTP parser: request line and header fields at most 8 KB, at most 32
    headers, over-long or malformed requests answered 4xx), on 127.0.0.1 unless metrics_host says
    otherwise, on the worker's own event loop. So that no client, wherever it sits on the network, can
    starve the liveness probe (a failing one restarts the worker) or the worker itself:

    - at most `max_connections_per_peer` connections per peer address (an IPv6 peer: its /64) and
      `max_connections` in all; one over either is closed on accept, except that a peer holding fewer
      than the heaviest peer minus one closes that peer's oldest connection instead (max-min fair: a
      probe's one connection always gets in);
    - a connection without a request in progress (not yet sent, sent in part, or between keep-alive
      requests) is closed after `idle_timeout_s`;
    - each peer's requests are paced to `requests_per_peer_s` after a burst of `request_burst` (the rest
      wait; a connection's pipelined requests queue in aiohttp, which stops reading past its bound);
    - /metrics renders (which walk every patient) are spaced so that they take at most `render_share` of
      the event loop, whoever asks; each answer is still a fresh render.
    """

    def __init__(self, metrics: Metrics, ready, host: str = "127.0.0.1", port: int = 0, max_connections: int = 64,
                 alive=lambda: (True, "ok"), max_connections_per_peer: int = 8, idle_timeout_s: float = 2.0,
                 requests_per_peer_s: float = 10.0, request_burst: int = 20, render_share: float = 0.1):
        self.metrics, self.ready, self.alive, self.host, self.port = metrics, ready, alive, host, port
        self.max_connections, self.max_connections_per_peer = max_connections, max_connections_per_peer
        self.idle_timeout_s, self.render_share = idle_timeout_s, render_share
        self.requests_per_peer_s, self.request_burst = requests_per_peer_s, request_burst
        self.runner = None
        self.server: asyncio.base_events.Server | None = None
        self._by_peer: dict[str, dict[_Connection, None]] = {}  # each peer's open connections, oldest first
        self._open = 0
        self._pace: dict[str, list[float]] = {}  # peer -> [tokens, when counted]
        self._render_lock = asyncio.Lock()
        self._next_render_at = 0.0
        self.refused = self.evicted = 0  # connections closed on accept / to make room for a lighter peer
        self._reported_at = -_REPORT_EVERY_S

    async def start(self) -> int:
        from aiohttp import web

        @web.middleware
        async def paced(request, handler):
            return await self._paced(request, handler)

        app = web.Application(middlewares=[paced])
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        # aiohttp's keep-alive timer runs from accept too: a connection that sends no complete request (a
        # slowloris) is closed after it as well as an idle keep-alive one
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=self.idle_timeout_s,
                                    max_line_size=8190, max_field_size=8190, max_headers=32,
                                    logger=_QUIET)  # a bad request gets its 400, not a traceback in our logs
        await self.runner.setup()
        self.server = await asyncio.get_running_loop().create_server(lambda: _Connection(self), self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    def connections_of(self, host: str) -> int:
        """Open connections of the peer at `host` (an address as the server sees it)."""
        return len(self._by_peer.get(_peer_key(host), ()))

    def _admit(self, conn: _Connection) -> bool:
        mine = self._by_peer.get(conn.peer, {})
        if len(mine) >= self.max_connections_per_peer:
            return self._refuse(conn)
        if self._open >= self.max_connections:
            heaviest = max(self._by_peer.values(), key=len)
            if len(heaviest) <= len(mine) + 1:
                return self._refuse(conn)
            victim = next(iter(heaviest))
            self._release(victim)
            victim.transport.abort()
            self.evicted += 1
        self._by_peer.setdefault(conn.peer, {})[conn] = None
        self._open += 1
        return True

    def _refuse(self, conn: _Connection) -> bool:
        self.refused += 1
        now = time.monotonic()
        if now - self._reported_at >= _REPORT_EVERY_S:  # a flood is one line a minute, not one per connection
            self._reported_at = now
            log.warning("metrics_connections_refused", peer=conn.peer, refused=self.refused, evicted=self.evicted,
                        open=self._open, per_peer=self.max_connections_per_peer, total=self.max_connections)
        return False

    def _release(self, conn: _Connection) -> None:
        mine = self._by_peer.get(conn.peer)
        if mine is None or conn not in mine:
            return  # refused, or already released (evicted)
        del mine[conn]
        self._open -= 1
        if not mine:
            del self._by_peer[conn.peer]

    def _handler(self):
        return self.runner.server()  # aiohttp's RequestHandler for one connection

    async def _paced(self, request, handler):
        """Middleware: a token bucket per peer; a request over it waits for its token (its connection with
        it), so a flood costs the loop `requests_per_peer_s` requests a second, not as many as it sends."""
        from aiohttp import web

        transport = request.transport
        if transport is None:  # closed while queued
            raise web.HTTPServiceUnavailable()
        peer = _peer_key(_host_of(transport))
        now = time.monotonic()
        bucket = self._pace.get(peer)
        if bucket is None:
            if len(self._pace) >= _MAX_PACED_PEERS:
                self._forget_rested(now)
            bucket = self._pace[peer] = [float(self.request_burst), now]
        tokens = min(float(self.request_burst), bucket[0] + (now - bucket[1]) * self.requests_per_peer_s)
        bucket[0], bucket[1] = tokens - 1.0, now  # taken now, even if its turn comes later: queued ones line up
        if tokens < 1.0:
            await asyncio.sleep((1.0 - tokens) / self.requests_per_peer_s)
        return await handler(request)

    def _forget_rested(self, now: float) -> None:
        """Drops the buckets that have refilled (as good as new): the table stays bounded by the peers active
        in the last burst / rate seconds."""
        full = float(self.request_burst)
        for peer, (tokens, at) in list(self._pace.items()):
            if tokens + (now - at) * self.requests_per_peer_s >= full:
                del self._pace[peer]

    async def _metrics(self, request):
        from aiohttp import web

        loop = asyncio.get_running_loop()
        async with self._render_lock:
            wait = self._next_render_at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            began = loop.time()
            body = self.metrics.render()
            took = loop.time() - began
            self._next_render_at = loop.time() + took * (1.0 / self.render_share - 1.0)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request):
        from aiohttp import web

        ok, why = self.alive()
        return web.Response(text=why + "\n", status=200 if ok else 503)

    async def _readyz(self, request):
        from aiohttp import web

        ok, why = self.ready()
        return web.Response(text=why + "\n", status=200 if ok else 503)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()  # no new connections
        if self.runner is not None:
            await self.runner.cleanup()  # closes the open ones
        if self.server is not None:
            await self.server.wait_closed()


_REPORT_EVERY_S = 60.0
_MAX_PACED_PEERS = 4096


def _host_of(transport) -> str:
    peername = transport.get_extra_info("peername")
    return peername[0] if isinstance(peername, tuple) and peername else ""


def _peer_key(host: str) -> str:
    """Who a connection counts against: its IPv4 address; an IPv6 peer's /64 (one host commonly holds a whole
    /64, so a per-address limit would not hold it); a peer without an address (a Unix socket) is one peer."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


log = get_logger("streamer.metrics")
_QUIET = logging.getLogger("streamer.metrics.http")
_QUIET.setLevel(logging.CRITICAL)


class _Connection(asyncio.Protocol):
    """One accepted connection: admitted by the server's limits (its peer known only now), then handed to
    aiohttp's handler; closed at once when refused."""

    def __init__(self, server: HealthServer):
        self.server = server
        self.peer = ""
        self.transport = None
        self.handler = None

    def connection_made(self, transport) -> None:
        self.transport, self.peer = transport, _peer_key(_host_of(transport))
        if not self.server._admit(self):
            transport.close()
            return
        self.handler = self.server._handler()
        self.handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.handler is not None:
            self.handler.data_received(data)

    def eof_received(self):
        return self.handler.eof_received() if self.handler is not None else None

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.resume_writing()

    def connection_lost(self, exc) -> None:
        self.server._release(self)
        if self.handler is not None:
            self.handler.connection_lost(exc)
