"""SIGTERM/SIGINT from the first instant of `streamer run`.

Before the worker's event loop owns the signals (settings, importing torch, loading the model) a stop
request must end the process promptly with exit 0: nothing has been consumed, so nothing can be lost.
`install_early_stop` records the request and interrupts the main thread; once the loop is running,
the worker's own handler takes over and the documented drain-and-commit path applies.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class EarlyStop(BaseException):
    """Raised in the main thread when a stop signal arrives before the worker consumes anything.

    A BaseException, so no `except Exception` on the way (an import, settings validation) swallows it."""


stop_requested = threading.Event()


def _early_handler(signum, frame) -> None:
    stop_requested.set()
    raise EarlyStop(signal.Signals(signum).name)


def install_early_stop() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _early_handler)


def ignore_further_stops() -> None:
    """After the first request: record later ones without interrupting the clean exit under way."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: stop_requested.set())


def stop_on_signals(loop, stop) -> None:
    """Once an asyncio loop runs: SIGINT and SIGTERM call `stop()` in it (every long-running command's
    clean stop: finish what is in flight, then exit 0)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
