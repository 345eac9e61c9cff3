"""The running worker: `Worker` (worker.py) runs the four loops and the shutdown order and nothing else;
assembly.py builds what it runs with (`Core`, `Parts`) and closes it, startup.py checks the brokers and
chooses the delivery, ownership.py takes and gives back partitions on a rebalance, upkeep.py does the
once-a-second work beside the fetches, intake.py takes each record."""

from streamer.runtime.startup import StartupError
from streamer.runtime.worker import Worker

__all__ = ["StartupError", "Worker"]
