"""The one interface every output goes through, whatever the delivery mode (streamer/delivery/__init__.py).

`Delivery` is what the publisher, the dead letters and the checkpoint hold; `Block` is what
`delivery.deliver(partition)` yields: the outputs of one input partition that count together.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from dataclasses import dataclass, field
from typing import AsyncContextManager, Awaitable, Callable, Hashable, Iterable, Protocol

from aiokafka.structs import TopicPartition

from streamer.delivery.event_time import EventTime
from streamer.kafka.clients import ask_for_partitions
from streamer.kafka.partitioning import OutputRouting

class TransactionFailed(RuntimeError):
    """The partition's transaction cannot commit (a refused write, an error the producer cannot recover
    from): the worker must stop; the next owner resumes from the last committed transaction."""


class BackgroundSends:
    """Outputs sent beside the data path (dead letters, stale closes): the worker waits for them at shutdown
    and is told when one fails for good (`on_failure`), which it treats as fatal."""

    def __init__(self, on_failure: Callable[[BaseException], None] | None = None) -> None:
        self.tasks: set[asyncio.Task] = set()
        self.on_failure = on_failure

    def spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self.on_failure is not None:
            self.on_failure(task.exception())


Counted = Callable[[], "Awaitable[None] | None"]  # what an output implies, done when it counts


async def run_counted(callback: Counted | None) -> None:
    if callback is not None:
        result = callback()
        if inspect.isawaitable(result):
            await result


class AwaitingCommit:
    """Input partitions whose open transactions hold records readers wait for (flags), with the times they
    joined: the checkpoint schedule commits those partitions at once (`event`, `take_partitions`), and each
    commit hands their wait to `on_committed(joined_times, at)` (the `committed` step of
    streamer_flag_step_seconds). At least once nothing waits for a commit: it stays empty."""

    def __init__(self, on_committed: Callable[[list[float], float], None] | None = None):
        self.on_committed = on_committed
        self.event = asyncio.Event()
        self._joined: dict = {}

    def add(self, partition, at: float) -> None:
        self._joined.setdefault(partition, []).append(at)
        self.event.set()

    def take_partitions(self) -> set:
        """The partitions waiting now (their times stay until their commit takes them); clears `event`."""
        self.event.clear()
        return set(self._joined)

    def take(self, partition) -> list[float]:
        return self._joined.pop(partition, [])

    def committed(self, joined: list[float]) -> None:
        if joined and self.on_committed is not None:
            self.on_committed(joined, time.time())

    def forget(self, partition) -> None:
        """The partition was dropped: its open transaction's records never commit here."""
        self._joined.pop(partition, None)


@dataclass
class CheckpointPlan:
    """What one checkpoint commits (checkpoint.py decides it): per input partition the offset safe to
    commit and the records that must land with it (state records, tombstones: `records(tp)` serializes
    each as it is taken), and `retry_later()`, which marks those states to be written again (at least once:
    when they could not be, the next checkpoint tries again)."""
    offsets: dict
    records: Callable[[Hashable], Iterable[tuple[str, bytes, bytes | None, int]]]
    partitions: set = field(default_factory=set)  # the partitions with records
    retry_later: Callable[[], None] = lambda: None


class Stamped:
    """Event-time stamps and output routing, shared by both modes."""
    kafka: object  # KafkaSettings
    event_time: EventTime
    routing: OutputRouting | None

    def _placed(self, partition, topic: str, key, out_partition, timestamp_ms) -> tuple[int | None, int | None]:
        if out_partition is None and self.routing is not None:
            out_partition = self.routing.partition(partition, topic, key)
        if timestamp_ms is None:
            timestamp_ms = self.event_time.stamp(partition)
        return out_partition, timestamp_ms

    def _state_partition(self, partition) -> TopicPartition | None:
        """Where `partition`'s state records go: the state topic's partition of the same number
        (checkpointing/checkpoint.py), whatever their keys."""
        state_topic = getattr(self.kafka, "state_topic", None)
        number = getattr(partition, "partition", None)
        return TopicPartition(state_topic, number) if state_topic and isinstance(number, int) else None

    def _with_its_state_partition(self, producer, partition, topic: str) -> None:
        """Right after a partition's first output of a transaction is sent (nothing yielded since): its state
        partition is asked for with it, in one AddPartitionsToTxn (a flag changes its patient's state, whose
        record joins at the checkpoint)."""
        state = self._state_partition(partition)
        if state is not None and topic != state.topic:
            ask_for_partitions(producer, [state])


class Block(Protocol):
    """The outputs of one input partition that count together (one `async with delivery.deliver(tp)`).

    `owned`: False once the partition is no longer this worker's (what is sent then is dropped).
    `send(...)`: one output; `counted` runs once it counts (the state changes it implies are made there);
    `urgent`: readers wait for it (a flag), so its transaction is committed soon.
    `durable_first(write)`: what must be durable before these outputs may be seen (at least once).
    `stands()`: after the block, whether its outputs count (not revoked, not fenced meanwhile)."""
    owned: bool

    async def send(self, topic: str, value: bytes | None, key: bytes | None = None, headers=None,
                   out_partition: int | None = None, timestamp_ms: int | None = None,
                   counted: Counted | None = None, urgent: bool = False) -> None: ...

    def durable_first(self, write: Callable[[], Awaitable[None]]) -> None: ...

    def stands(self) -> bool: ...


class Delivery(Protocol):
    """Where outputs go and when they count: AtLeastOnceDelivery or ExactlyOnceDelivery (chosen once, at
    start: runtime/startup.py; nothing else asks which)."""
    exactly_once: bool
    task_failure_is_fatal: bool
    event_time: EventTime
    awaiting: AwaitingCommit

    def deliver(self, partition: Hashable) -> AsyncContextManager[Block]: ...

    async def send(self, partition: Hashable, topic: str, value: bytes, key: bytes | None = None, headers=None,
                   out_partition: int | None = None, timestamp_ms: int | None = None) -> asyncio.Future: ...

    async def checkpoint(self, partitions, plan_for: Callable[[set], CheckpointPlan], consumer,
                         group_id: str) -> dict | None: ...

    def takeover_refusal(self, partition: Hashable, committed_metadata: str | None) -> str | None: ...

    async def read_committed(self, consumer, partitions) -> dict:
        """{partition: (committed offset or None, metadata)}: where newly assigned partitions resume."""
        ...

    async def open(self, partition: Hashable) -> None: ...

    async def close(self, partition: Hashable) -> None: ...

    async def stop(self, timeout_s: float = 20.0) -> None: ...
