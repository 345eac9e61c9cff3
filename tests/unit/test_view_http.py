"""The ward view's HTTP side against real sockets on loopback: who may reach it (Host allow-list, token,
TLS for any other bind), the headers every answer carries, and what many or non-reading event clients
can cost (issue 45, item 3). The server runs over a ward fed in the test, in a thread with its own loop,
as `streamer view` runs it; `test_cli_view_*` run the command itself against Apache Kafka."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np
import orjson
import pytest

from streamer.commands.view import WRITE_SLICE, Access, ViewServer, Ward
from streamer.errors import SettingsError
from streamer.ingest.contract import Chunk, encode_binary
from streamer.settings import WindowSettings
from tests.kafka_utils import wait_until

T0 = 1_795_316_700_000_000_000


def flag_bytes(pid: str, start: int, p: float | None = 0.5, **over) -> bytes:
    """A flag as the worker publishes it (publish/messages.py), with fields replaced by `over`."""
    doc = {"schema": 1, "window_id": f"{pid}:{start}", "patient_id": pid, "window_start_ns": start,
           "window_end_ns": start + 10**10, "status": "scored" if p is not None else "insufficient_data",
           "reason": None if p is not None else "no_data", "probability": p,
           "artifact": None if p is None else p >= 0.2, "threshold": 0.2, "model": "m@sha256:0123456789abcdef",
           "fs": 500.0, "missing_samples": 0, "interpolated_samples": 0, "produced_at_ns": start + 10**10 + 10**8,
           "latency_ms": 120.0}
    doc.update(over)
    return orjson.dumps(doc)


def fill(ward: Ward, beds: int, seconds: float, fs: float = 500.0) -> None:
    s, n = WindowSettings(), int(fs)
    rng = np.random.default_rng(0)
    for b in range(beds):
        pid = f"bed-{b:03d}"
        for i in range(int(seconds)):
            ward.on_input(pid.encode(), encode_binary(Chunk(pid, "II", T0 + i * 10**9, fs, rng.normal(0, 1, n))), s)
        ward.on_flag(flag_bytes(pid, T0, 0.3))


@contextmanager
def serving(ward: Ward | None = None, **kw):
    """A ViewServer on a free loopback port, its loop in a thread; stopped and joined on exit."""
    loop = asyncio.new_event_loop()
    server = ViewServer(None, port=0, ward=ward or Ward(), **kw)
    ready = threading.Event()

    def main():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.serve())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(server.close())
        loop.close()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    assert ready.wait(30), "the view did not start"
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        assert not thread.is_alive()


def get(server: ViewServer, path: str, host: str | None = None, token: str | None = "bearer", timeout: float = 30,
        headers: dict | None = None):
    """(status, headers, body) of one GET; `token`: "bearer" (the server's), None, or a literal query."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    h = {"Host": f"127.0.0.1:{server.port}" if host is None else host, **(headers or {})}
    if token == "bearer":
        h["Authorization"] = f"Bearer {server.access.token}"
    elif token is not None:
        path += f"?token={token}"
    try:
        conn.request("GET", path, headers=h)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


# -- who may reach it ---------------------------------------------------------------------------------
def test_a_foreign_host_header_is_refused_and_loopback_names_are_not():
    """DNS rebinding: a page on ward.attacker.example whose name now resolves to 127.0.0.1 sends its own
    name as Host. Refused before the token is even looked at."""
    with serving() as server:
        p = server.port
        for host in (f"ward.attacker.example:{p}", "ward.attacker.example", f"127.0.0.1:{p + 1}",
                     f"127.0.0.1.nip.io:{p}", f"localhost.attacker.example:{p}", f"[::2]:{p}", "127.0.0.1", ""):
            status, _, _ = get(server, "/api/ward", host=host)
            assert status == 421, (host, status)
        for host in (f"127.0.0.1:{p}", f"localhost:{p}", f"LOCALHOST:{p}", f"[::1]:{p}"):
            assert get(server, "/api/ward", host=host)[0] == 200, host
        assert server.refused["host"] == 8


def test_configured_names_are_allowed():
    with serving(access=Access.configure("127.0.0.1", allow_hosts=("ward-3.icu.example",))) as server:
        assert get(server, "/api/ward", host=f"ward-3.icu.example:{server.port}")[0] == 200
        assert get(server, "/api/ward", host=f"ward-4.icu.example:{server.port}")[0] == 421


def test_every_endpoint_needs_the_token_and_the_printed_link_sets_a_strict_cookie():
    ward = Ward()
    fill(ward, 1, 2)
    with serving(ward) as server:
        token = server.access.token
        assert len(token) >= 32 and server.url.endswith(f"?token={token}")
        for path in ("/", "/view.js", "/view.css", "/api/ward", "/api/bed/bed-000", "/events"):
            assert get(server, path, token=None)[0] == 401, path
            assert get(server, path, token="x" * len(token))[0] == 401, path
            # one character off (never the token itself: a random token ends in "A" one time in 16)
            near = token[:-1] + ("B" if token[-1] == "A" else "A")
            assert get(server, path, token=None, headers={"Cookie": f"{server.cookie}={near}"})[0] == 401
        # the link a person opens: the token becomes a cookie and leaves the address bar
        status, headers, _ = get(server, "/", token=token)
        assert status == 303 and headers["location"] == "/"
        cookie = headers["set-cookie"]
        assert cookie.startswith(f"{server.cookie}={token};") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        for path in ("/", "/view.js", "/api/ward", "/api/bed/bed-000"):
            assert get(server, path, token=None, headers={"Cookie": f"{server.cookie}={token}"})[0] == 200, path
        assert server.refused["token"] == 18


def test_security_headers_on_every_answer_and_no_inline_code_in_the_page():
    with serving() as server:
        for path, token in (("/", "bearer"), ("/api/ward", "bearer"), ("/view.js", "bearer"), ("/api/ward", None),
                            ("/nowhere", "bearer")):
            status, h, _ = get(server, path, token=token)
            assert h["content-security-policy"].startswith("default-src 'self'; frame-ancestors 'none'"), path
            assert h["x-content-type-options"] == "nosniff" and h["referrer-policy"] == "no-referrer", path
            assert h["cache-control"] == "no-store", path
        page = get(server, "/")[2].decode()
        # default-src 'self' blocks inline code: the page must carry none, or it would not run at all
        assert "<script>" not in page and "<style>" not in page and " on" not in page.replace("\n", " ").lower()
        assert '<script src="view.js"' in page and '<link rel="stylesheet" href="view.css">' in page
        script = get(server, "/view.js")[2].decode()
        assert "innerHTML" not in script and "insertAdjacentHTML" not in script and "document.write" not in script


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "ward.icu.example"])
def test_a_bind_beyond_loopback_needs_tls_and_a_configured_token(host, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cr3t-ward-token-0123456789\n")
    with pytest.raises(SettingsError, match="--tls-cert"):
        Access.configure(host)
    with pytest.raises(SettingsError, match="--tls-cert"):
        Access.configure(host, token_file=str(token), allow_hosts=("ward",))
    with pytest.raises(SettingsError, match="--tls-cert"):
        Access.configure(host, tls_cert="c.pem", tls_key="k.pem", allow_hosts=("ward",))  # no token


def test_tls_and_token_allow_a_network_bind_and_the_token_stays_unprinted(tmp_path, capsys):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    token = tmp_path / "token"
    token.write_text("s3cr3t-ward-token-0123456789\n")
    with pytest.raises(SettingsError, match="--allow-host"):  # every address, and no name to answer to
        Access.configure("0.0.0.0", token_file=str(token), tls_cert=str(cert), tls_key=str(key))
    with pytest.raises(SettingsError, match="at least 16"):
        short = tmp_path / "short"
        short.write_text("hunter2")
        Access.configure("127.0.0.1", token_file=str(short))
    access = Access.configure("0.0.0.0", token_file=str(token), tls_cert=str(cert), tls_key=str(key),
                              allow_hosts=("localhost",))
    assert access.token == "s3cr3t-ward-token-0123456789" and access.tls is not None
    # served on loopback here (tests bind loopback only), with the network bind's access
    with serving(access=access) as server:
        out = capsys.readouterr()
        assert "s3cr3t" not in out.out + out.err  # a configured token is the operator's: never printed
        import ssl

        ctx = ssl.create_default_context(cafile=str(cert))
        conn = http.client.HTTPSConnection("localhost", server.port, context=ctx, timeout=30)
        conn.request("GET", "/api/ward", headers={"Authorization": "Bearer s3cr3t-ward-token-0123456789"})
        assert conn.getresponse().status == 200
        conn.close()


def test_cli_refuses_a_network_bind_with_one_line():
    r = subprocess.run([sys.executable, "-m", "streamer", "view", "--host", "0.0.0.0", "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    said = [ln for ln in r.stderr.splitlines() if ln.startswith("streamer view:")]
    assert len(said) == 1 and "--tls-cert" in said[0] and "0.0.0.0" in said[0], r.stderr
    assert "Traceback" not in r.stderr and not r.stdout  # and no address, no token


# -- records --------------------------------------------------------------------------------------------
def test_the_snapshot_is_shared_gzipped_and_the_same_json():
    ward = Ward()
    fill(ward, 3, 5)
    with serving(ward) as server:
        status, h, body = get(server, "/api/ward", headers={"Accept-Encoding": "gzip"})
        assert status == 200 and h["content-encoding"] == "gzip"
        plain = get(server, "/api/ward")[2]
        assert orjson.loads(gzip.decompress(body)) == orjson.loads(plain) == orjson.loads(orjson.dumps(ward.snapshot()))


# -- many clients, and clients that never read --------------------------------------------------------------
def _open_event_stream(server: ViewServer) -> socket.socket:
    """An /events request on a socket that reads the status line and then nothing more (a 4 KiB receive
    buffer, so the server's writes back up at once)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                 f"Authorization: Bearer {server.access.token}\r\n\r\n".encode())
    return sock


def _status(sock: socket.socket) -> int:
    head = b""
    while b"\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, "closed before a status line"
        head += chunk
    return int(head.split()[1])


def test_event_clients_are_capped_and_non_readers_dropped_while_the_api_answers():
    """100 /events clients that never read took the view from 289 MB to 2.3 GB and held another client's
    request 21 s. Now: at most `max_event_clients` are served (the rest get 503), the snapshot they all
    receive is one shared object, /api/ward answers while they hang, and each is dropped once it has taken
    nothing for `stall_s`."""
    ward = Ward()
    fill(ward, 60, 60)  # a snapshot of ~2.5 MB: far more than a non-reader's buffers take
    cap, stall_s = 8, 2.0
    with serving(ward, max_event_clients=cap, stall_s=stall_s, push_interval_s=0.2) as server:
        assert len(orjson.dumps(ward.snapshot())) > 2_000_000
        socks = [_open_event_stream(server) for _ in range(30)]
        try:
            statuses = [_status(s) for s in socks]
            assert statuses.count(200) == cap and statuses.count(503) == 30 - cap, statuses  # (a) capped
            assert server.refused["busy"] == 30 - cap
            # what the server holds for them stays bounded: a slice and aiohttp's high-water mark, not a snapshot
            unsent = wait_until(lambda: (u := server.unsent_bytes()) and len(u) == cap and min(u) > 0 and u, 30,
                                "the served clients' buffers backed up")
            assert max(unsent) <= WRITE_SLICE + 2**16, unsent
            # (b) a normal request answers while the served ones hang on a full buffer
            started = time.monotonic()
            status, _, body = get(server, "/api/ward", timeout=30)
            took = time.monotonic() - started
            assert status == 200 and len(orjson.loads(body)["beds"]) == 60
            assert took < 5.0, f"/api/ward took {took:.1f} s beside {cap} non-reading event clients"
            # (c) each non-reader is dropped once it took nothing for stall_s, and its place is free again
            wait_until(lambda: server.dropped >= cap and not server.clients, 60, "non-reading clients dropped")
            again = _open_event_stream(server)
            socks.append(again)
            assert _status(again) == 200
        finally:
            for s in socks:
                s.close()
        print(f"/api/ward beside {cap} stuck event clients: {took * 1000:.0f} ms; dropped {server.dropped}")


def test_a_reading_event_client_gets_the_snapshot_then_deltas():
    ward = Ward()
    fill(ward, 2, 3)
    with serving(ward, push_interval_s=0.1) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("GET", "/events", headers={"Authorization": f"Bearer {server.access.token}"})
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("Content-Type") == "text/event-stream"
        assert r.readline() == b"event: snapshot\n"
        snap = orjson.loads(r.readline().removeprefix(b"data: "))
        assert set(snap["beds"]) == {"bed-000", "bed-001"}
        # a flag arriving now is pushed as a delta (the ward is changed on the server's own loop)
        asyncio.run_coroutine_threadsafe(_async(lambda: ward.on_flag(flag_bytes("bed-001", T0 + 10**10, 0.9))),
                                         server._pusher.get_loop()).result(10)
        pushed = []
        while not any(f["probability"] == 0.9 for f in pushed):
            while (line := r.readline()) != b"event: delta\n":
                assert line, "stream ended"
            delta = orjson.loads(r.readline().removeprefix(b"data: "))
            pushed += delta["beds"].get("bed-001", {}).get("flags", [])
        assert [f["window_start_ns"] for f in pushed][-1] == T0 + 10**10
        conn.close()


async def _async(fn):
    return fn()
