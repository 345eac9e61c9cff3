"""When input offsets may move: the offsets ledger (what was consumed, what outputs still depend on which
records), the checkpoint (offsets, then patient states, then the commit) and its schedule."""

from streamer.checkpointing.checkpoint import Checkpointer
from streamer.checkpointing.ledger import OffsetsLedger

__all__ = ["Checkpointer", "OffsetsLedger"]
