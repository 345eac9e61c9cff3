"""Delivery: where outputs go and when they count. Two modes behind one narrow interface (base.py).

Every output (flag, episode message, dead letter, state record) derives from one input partition. The
publisher and the dead letters send through one interface whatever the mode:

    async with delivery.deliver(partition) as block:  # block.owned: False once the partition is not ours
        block.durable_first(write)                    # what must be durable before these outputs may be seen
        await block.send(topic, value, key=..., counted=callback, urgent=...)
    # here every output of the block counts (block.stands(): unless the partition was lost meanwhile)

and the checkpoint commits through `delivery.checkpoint(...)`. The modes differ in when an output counts,
which is when `counted` runs (the state changes an output implies are made there):

- `AtLeastOnceDelivery` (at_least_once.py): an output counts once the brokers acknowledged it; offsets are
  committed by the consumer group after the states they need are written; a crash re-sends (same ids).
- `ExactlyOnceDelivery` (exactly_once.py): an output counts once it joined its partition's open
  transaction, which the checkpoint commits with the partition's states and offsets; a fence drops the
  partition (its next owner redoes it), any other failure of a transaction stops the worker.
- `ExactlyOnceGroupDelivery` (exactly_once_group.py, kafka.transactions = per_worker): the same, with one
  transaction for every partition of the worker, its offsets fenced by the group generation (KIP-447); a
  lost transaction loses every partition at once.

Both modes stamp every output with the worker's clock capped by its input partition's event time
(event_time.py: never further ahead of the brokers than a record they accepted), and route flags,
episodes and dead letters to the output partition of the same number as their input partition
(`OutputRouting`, kafka/partitioning.py): one input partition's transaction then blocks read_committed
readers of that one output partition only, whatever partitioner the monitors' producers use.

`BackgroundSends`, `AwaitingCommit` and `CheckpointPlan` (base.py) are shared by both modes.
"""

from streamer.delivery.at_least_once import AtLeastOnceDelivery
from streamer.delivery.base import (AwaitingCommit, BackgroundSends, Block, CheckpointPlan, Counted, Delivery,
                                    TransactionFailed)
from streamer.delivery.exactly_once import ExactlyOnceDelivery, probe_transactions
from streamer.delivery.exactly_once_group import ExactlyOnceGroupDelivery

__all__ = ["AtLeastOnceDelivery", "AwaitingCommit", "BackgroundSends", "Block", "CheckpointPlan", "Counted",
           "Delivery", "ExactlyOnceDelivery", "ExactlyOnceGroupDelivery", "TransactionFailed", "probe_transactions"]
