"""The metrics server (/metrics, /healthz, /readyz) under one hostile peer: no peer can starve the health
probe, hold slots with idle or half-sent requests, or take more than its share of the worker's event loop
(the server runs on it). Real server, real sockets on loopback; peers told apart by source address (Linux
routes all of 127.0.0.0/8 to lo): the hostile client binds 127.0.0.2 and up, the prober 127.0.0.1."""

from __future__ import annotations

import asyncio
import selectors
import socket
import threading
import time

import pytest

from streamer.metrics import HealthServer, Metrics

PROBE = b"GET /healthz HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n"


def _connect(source: str, port: int, timeout: float = 2.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _read_all(sock: socket.socket, deadline: float) -> bytes:
    """Everything the server sends until it closes (or the deadline: then what came so far)."""
    chunks = []
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def _probe(port: int, source: str = "127.0.0.1", timeout: float = 2.0) -> bytes:
    """One liveness probe as an orchestrator sends it: a new connection, a 2 s budget for the whole answer."""
    deadline = time.monotonic() + timeout
    try:
        with _connect(source, port, timeout) as sock:
            sock.sendall(PROBE)
            return _read_all(sock, deadline)
    except OSError as exc:
        return repr(exc).encode()


def _healthy(answer: bytes) -> bool:
    return answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok\n")


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class Hoarder(threading.Thread):
    """Opens as many idle connections as it can from `sources` (each address in turn) and re-opens every one
    the server closes, as fast as it can, until stopped (or 60 s). `saturated` is set once the server has
    closed one of them: it holds as many as the server lets it. `payload` is sent on each (a slowloris: half
    a request line), or nothing."""

    def __init__(self, port: int, sources: list[str], per_source: int, payload: bytes = b""):
        super().__init__(daemon=True)
        self.port, self.sources, self.per_source, self.payload = port, sources, per_source, payload
        self.stop = threading.Event()
        self.saturated = threading.Event()
        self.closed_by_server = 0
        self.opened = 0

    def _open(self, source: str, selector: selectors.BaseSelector) -> None:
        try:
            sock = _connect(source, self.port)
            if self.payload:
                sock.sendall(self.payload)
        except OSError:
            self.closed_by_server += 1
            self.saturated.set()
            return
        self.opened += 1
        selector.register(sock, selectors.EVENT_READ, source)

    def run(self) -> None:
        selector = selectors.DefaultSelector()
        try:
            for _ in range(self.per_source):
                for source in self.sources:
                    self._open(source, selector)
            deadline = time.monotonic() + 60
            while not self.stop.is_set() and time.monotonic() < deadline:
                for key, _ in selector.select(timeout=0.05):
                    if _closed_by_server(key.fileobj):
                        selector.unregister(key.fileobj)
                        key.fileobj.close()
                        self.closed_by_server += 1
                        self.saturated.set()
                        self._open(key.data, selector)
        finally:
            for key in list(selector.get_map().values()):
                key.fileobj.close()
            selector.close()


async def _serving(**limits) -> HealthServer:
    server = HealthServer(Metrics(), lambda: (True, "ready"), "127.0.0.1", 0, **limits)
    await server.start()
    return server


async def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("hostile_addresses", [1, 16], ids=["one_peer", "sixteen_peers"])
def test_a_client_hoarding_connections_cannot_starve_the_liveness_probe(hostile_addresses):
    """The issue's reproduction: a client holding every idle connection it can, and re-opening each one the
    server closes, made 24 of 30 /healthz probes fail. Every probe must answer within its 2 s. With sixteen
    addresses the hoarder alone could fill the global cap: the prober still gets in (the heaviest peer makes
    room)."""
    sources = [f"127.0.0.{2 + i}" for i in range(hostile_addresses)]

    async def main():
        server = await _serving()
        hoarder = Hoarder(server.port, sources, per_source=200 // hostile_addresses)
        hoarder.start()
        try:
            saturated = await asyncio.to_thread(hoarder.saturated.wait, 30)
            assert saturated, "the hoarder never filled what the server allows"
            answers = []
            for _ in range(15):
                answers.append(await asyncio.to_thread(_probe, server.port))
            return answers, hoarder.opened
        finally:
            hoarder.stop.set()
            await asyncio.to_thread(hoarder.join, 10)
            await server.stop()

    answers, opened = asyncio.run(main())
    failed = [a[:60] for a in answers if not _healthy(a)]
    assert failed == [], f"{len(failed)} of {len(answers)} probes failed ({opened} hostile connections): {failed}"


def test_one_peer_gets_at_most_its_quota_and_the_others_still_get_in():
    async def main():
        server = await _serving(max_connections=64, max_connections_per_peer=4)
        held = []
        try:
            for _ in range(4):
                held.append(await asyncio.to_thread(_connect, "127.0.0.2", server.port))
            await _wait_for(lambda: server.connections_of("127.0.0.2") == 4, 10, "4 connections held")
            excess = await asyncio.to_thread(_probe, server.port, "127.0.0.2")
            other = await asyncio.to_thread(_probe, server.port, "127.0.0.1")
            # the quota's connections themselves still serve (the excess was refused, not one of them)
            held[0].sendall(PROBE)
            own = await asyncio.to_thread(_read_all, held[0], time.monotonic() + 2)
            return excess, other, own, server.refused
        finally:
            for sock in held:
                sock.close()
            await server.stop()

    excess, other, own, refused = asyncio.run(main())
    assert not excess.startswith(b"HTTP"), f"the peer's connection over its quota was answered: {excess[:80]}"
    assert refused >= 1
    assert _healthy(other), other[:80]
    assert _healthy(own), own[:80]


def test_half_sent_requests_lose_their_slot_within_the_idle_timeout():
    """A slowloris sends half a request line and then nothing: its connections are closed after
    `idle_timeout_s`, so a peer cannot keep its slots (nor the server its memory) by sending slowly."""
    async def main():
        server = await _serving(max_connections_per_peer=4, idle_timeout_s=0.5)
        try:
            started = time.monotonic()
            slow = [await asyncio.to_thread(_connect, "127.0.0.2", server.port, 10.0) for _ in range(4)]
            for sock in slow:
                sock.sendall(b"GET /heal")
            answers = [await asyncio.to_thread(_read_all, sock, started + 10) for sock in slow]
            held_s = time.monotonic() - started
            for sock in slow:
                sock.close()
            await _wait_for(lambda: server.connections_of("127.0.0.2") == 0, 10, "the slots freed")
            again = await asyncio.to_thread(_probe, server.port, "127.0.0.2")
            return answers, held_s, again
        finally:
            await server.stop()

    answers, held_s, again = asyncio.run(main())
    assert all(not a.startswith(b"HTTP/1.1 200") for a in answers), answers
    assert held_s < 5, f"half-sent requests held their slots {held_s:.1f} s"
    assert _healthy(again), again[:80]


def test_pipelined_flood_from_one_peer_is_paced_and_the_probe_still_answers():
    """One peer pipelining requests as fast as it can gets at most `requests_per_peer_s` a second (after a
    burst): the rest wait, so its share of the worker's event loop (the server runs on it) is bounded; another
    peer's probe is answered meanwhile."""
    rate, burst, sent = 50.0, 10, 100

    async def main():
        server = await _serving(requests_per_peer_s=rate, request_burst=burst)
        try:
            flood = await asyncio.to_thread(_connect, "127.0.0.2", server.port, 30.0)
            request = b"GET /healthz HTTP/1.1\r\nHost: worker\r\n\r\n"
            started = time.monotonic()
            flood.sendall(request * (sent - 1) + PROBE)
            reading = asyncio.create_task(asyncio.to_thread(_read_all, flood, started + 30))
            probes = [await asyncio.to_thread(_probe, server.port) for _ in range(5)]
            answered = await reading
            elapsed = time.monotonic() - started
            flood.close()
            return probes, answered, elapsed
        finally:
            await server.stop()

    probes, answered, elapsed = asyncio.run(main())
    assert answered.count(b"HTTP/1.1 200") == sent, "every paced request is still answered"
    assert elapsed >= (sent - burst) / rate * 0.9, f"{sent} requests answered in {elapsed:.2f} s: not paced"
    assert all(_healthy(p) for p in probes), [p[:60] for p in probes]


def test_scrape_floods_cannot_spend_more_than_a_tenth_of_the_loop_rendering():
    """/metrics renders on the worker's event loop (and walks every patient, `watch_episodes`): renders are
    spaced so that they take at most `render_share` of it, whoever asks. Each answer is a fresh render."""
    renders: list[tuple[float, float]] = []

    def open_episodes():
        began = time.perf_counter()
        while time.perf_counter() - began < 0.02:  # a scrape over many patients: 20 ms of CPU
            pass
        renders.append((began, time.perf_counter()))
        return len(renders), 0.0

    async def main():
        metrics = Metrics()
        metrics.watch_episodes(open_episodes)
        server = HealthServer(metrics, lambda: (True, "ready"), "127.0.0.1", 0, render_share=0.1)
        await server.start()
        try:
            def scrape(source: str) -> bytes:
                with _connect(source, server.port, 30.0) as sock:
                    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n")
                    return _read_all(sock, time.monotonic() + 30)

            started = time.perf_counter()
            scrapes = await asyncio.gather(*(asyncio.to_thread(scrape, f"127.0.0.{2 + i % 4}") for i in range(12)))
            probe = await asyncio.to_thread(_probe, server.port)
            return scrapes, time.perf_counter() - started, probe
        finally:
            await server.stop()

    scrapes, elapsed, probe = asyncio.run(main())
    assert all(s.startswith(b"HTTP/1.1 200") for s in scrapes)
    counts = sorted(int(s.split(b"\nstreamer_open_episodes ")[1].split(b"\n")[0].split(b".")[0]) for s in scrapes)
    assert counts == list(range(1, 13)), "each scrape is a fresh render"
    busy = sum(end - began for began, end in renders)
    assert busy <= 0.1 * elapsed + 0.03, f"renders took {busy:.2f} s of {elapsed:.2f} s"
    assert _healthy(probe), probe[:60]


def test_peers_are_counted_by_address_and_ipv6_by_its_64():
    from streamer.metrics import _peer_key

    assert _peer_key("127.0.0.2") != _peer_key("127.0.0.1")
    # one IPv6 host commonly holds a whole /64: every address in it is one peer, another /64 another
    assert _peer_key("2001:db8:1:2::1") == _peer_key("2001:db8:1:2:ffff:ffff:ffff:fffe")
    assert _peer_key("2001:db8:1:2::1") != _peer_key("2001:db8:1:3::1")
    assert _peer_key("fe80::1%eth0") == _peer_key("fe80::2")
    assert _peer_key("::ffff:10.0.0.7") == _peer_key("10.0.0.7")
    assert _peer_key("") == ""  # no address (a Unix socket): one peer
