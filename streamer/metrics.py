"""Prometheus metrics and the /metrics, /healthz, /readyz endpoints (a tiny asyncio HTTP server)."""

from __future__ import annotations

import asyncio

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.messages = Counter("streamer_messages_total", "input records consumed", registry=r)
        self.samples = Counter("streamer_samples_total", "samples accepted into buffers", registry=r)
        self.duplicate_samples = Counter("streamer_duplicate_samples_total", "samples ignored as duplicates", registry=r)
        self.late_samples = Counter("streamer_late_samples_total", "samples older than the open windows", registry=r)
        self.dead_letters = Counter("streamer_dead_letters_total", "records dead-lettered", ["reason"], registry=r)
        self.dropped = Counter("streamer_dropped_total", "records dropped by policy", ["reason"], registry=r)
        self.windows = Counter("streamer_windows_total", "windows published", ["status"], registry=r)
        self.episodes = Counter("streamer_episodes_total", "episode transitions published", ["state"], registry=r)
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
    """GET /metrics, /healthz (alive), /readyz (assigned, model loaded, broker reachable)."""

    def __init__(self, metrics: Metrics, ready, host: str = "127.0.0.1", port: int = 0):
        self.metrics, self.ready, self.host, self.port = metrics, ready, host, port
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            path = line.split()[1].decode() if len(line.split()) > 1 else "/"
            if path == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, self.metrics.render()
            elif path == "/healthz":
                status, ctype, body = "200 OK", "text/plain", b"ok\n"
            elif path == "/readyz":
                ok, why = self.ready()
                status, ctype, body = ("200 OK" if ok else "503 Service Unavailable"), "text/plain", (why + "\n").encode()
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
