"""The running worker: `Worker` (worker.py) owns the four loops and the shutdown order and nothing else;
startup.py checks and builds what it needs, ownership.py takes and gives back partitions on a rebalance,
upkeep.py does the once-a-second work beside the fetches."""

from streamer.runtime.startup import StartupError
from streamer.runtime.worker import Worker

__all__ = ["StartupError", "Worker"]
