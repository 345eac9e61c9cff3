"""The worker moved to streamer.runtime (worker, startup, ownership, upkeep); this name stays importable."""

from streamer.runtime import StartupError, Worker

__all__ = ["StartupError", "Worker"]
