"""Prometheus metrics and the /metrics, /healthz, /readyz endpoints (aiohttp)."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.messages = Counter("streamer_messages_total", "input records consumed", registry=r)
        self.samples = Counter("streamer_samples_total", "samples accepted into buffers", registry=r)
        self.duplicate_samples = Counter("streamer_duplicate_samples_total", "samples ignored as duplicates", registry=r)
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
        self.states_lost = Counter("streamer_states_lost_total", "patient states that could not be read back "
                                   "(each closed conservatively, reason state_lost)", registry=r)
        self.batch_size = Histogram("streamer_batch_size", "windows per inference batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.inference_s = Histogram("streamer_inference_seconds", "time per inference batch", registry=r,
                                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.latency_s = Histogram("streamer_flag_latency_seconds",
                                   "last sample of a window received -> its flag acknowledged", registry=r,
                                   buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.lag = Gauge("streamer_consumer_lag", "records behind the partition's high watermark",
                         ["topic", "partition"], registry=r)
        self.patients = Gauge("streamer_patients_buffered", "patients with open windows", registry=r)
        self.buffer_bytes = Gauge("streamer_buffer_bytes", "bytes held by open windows", registry=r)
        self.pending = Gauge("streamer_pending_windows", "windows emitted, not yet acknowledged", registry=r)
        self.paused = Gauge("streamer_fetch_paused", "1 while fetching is paused for backpressure", registry=r)
        self.device_fallback = Gauge("streamer_device_fallback", "1 once inference fell back to the CPU", registry=r)
        self.model = Info("streamer_model", "the loaded model", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HealthServer:
    """GET /metrics, /healthz (the process is alive), /readyz (model loaded and partitions assigned).

    Served by aiohttp (a maintained HTTP parser: request line and header fields at most 8 KB, at most 32
    headers, over-long or malformed requests answered 4xx), on 127.0.0.1 unless metrics_host says
    otherwise, with at most `max_connections` open at once (more are closed on accept) and idle
    keep-alive connections closed after 5 s, so a scraper cannot pin the worker's memory or sockets.
    """

    def __init__(self, metrics: Metrics, ready, host: str = "127.0.0.1", port: int = 0, max_connections: int = 64):
        self.metrics, self.ready, self.host, self.port = metrics, ready, host, port
        self.max_connections = max_connections
        self.runner = None
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=5.0,
                                    max_line_size=8190, max_field_size=8190, max_headers=32,
                                    logger=_QUIET)  # a bad request gets its 400, not a traceback in our logs
        await self.runner.setup()
        self.server = await asyncio.get_running_loop().create_server(self._protocol, self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    def _protocol(self):
        handlers = self.runner.server
        if len(handlers.connections) >= self.max_connections:
            return _Refuse()
        return handlers()

    async def _metrics(self, request):
        from aiohttp import web

        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request):
        from aiohttp import web

        return web.Response(text="ok\n")

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


_QUIET = logging.getLogger("streamer.metrics.http")
_QUIET.setLevel(logging.CRITICAL)


class _Refuse(asyncio.Protocol):
    """Closes a connection over the limit as soon as it is accepted."""

    def connection_made(self, transport) -> None:
        transport.close()
