"""At least once: one idempotent producer (when the brokers grant one), plain consumer-group commits. An
output counts once the brokers acknowledged it (sends are retried until then); what `durable_first` names
is written before the block's records are sent; a crash before the commit re-sends (same window_id). A
callback's own outputs are sent (and count) before the next record's callback runs."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Awaitable, Callable, Hashable

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from streamer.delivery.base import AwaitingCommit, CheckpointPlan, Counted, Stamped, run_counted
from streamer.delivery.event_time import EventTime
from streamer.kafka.clients import committed_offsets, retry_kafka
from streamer.kafka.partitioning import OutputRouting
from streamer.logs import get_logger

log = get_logger("streamer.delivery")


class AcknowledgedBlock:
    """At least once, what `deliver` yields: the block's records are sent as it ends (after what
    `durable_first` names is written), until the broker acknowledged them; then each one's `counted` runs,
    in send order, and what a callback sends is delivered the same way before the next callback runs."""
    owned = True

    def __init__(self, delivery: "AtLeastOnceDelivery", partition):
        self._delivery, self.partition = delivery, partition
        self._writes: list[Callable[[], Awaitable[None]]] = []
        self._sends: list[tuple[tuple, dict, Counted | None]] = []

    async def send(self, topic: str, value: bytes | None, key: bytes | None = None, headers=None,
                   out_partition: int | None = None, timestamp_ms: int | None = None,
                   counted: Counted | None = None, urgent: bool = False) -> None:
        """`urgent` (readers wait for it) changes nothing here: a record is visible once acknowledged."""
        self._sends.append(((topic, value), dict(key=key, headers=headers, out_partition=out_partition,
                                                 timestamp_ms=timestamp_ms), counted))

    def durable_first(self, write: Callable[[], Awaitable[None]]) -> None:
        self._writes.append(write)

    def stands(self) -> bool:
        return True

    async def flush(self) -> None:
        while self._sends or self._writes:
            writes, self._writes = self._writes, []
            sends, self._sends = self._sends, []
            await asyncio.gather(*(write() for write in writes))
            if sends:
                await self._acknowledged(sends)
            for _, _, counted in sends:
                await run_counted(counted)
                await self.flush()  # what counting it sent, before the next one counts

    async def _acknowledged(self, sends) -> None:
        async def attempt():  # all of them, in order
            futures = [await self._delivery.send(self.partition, *args, **kwargs) for args, kwargs, _ in sends]
            await asyncio.gather(*futures)

        topics = sorted({args[0] for args, _, _ in sends})
        await retry_kafka(attempt, lambda exc, delay: log.warning(
            "publish_retry", topics=topics, records=len(sends), error=repr(exc), retry_in_s=delay))


class AtLeastOnceDelivery(Stamped):
    exactly_once = False  # the mode, for logs and tests: nothing branches on it (the methods differ)
    # a task that failed left nothing half-counted: what was acknowledged counts, the offsets ledger holds
    # the rest, so the final checkpoint stays safe
    task_failure_is_fatal = False

    def __init__(self, producer: AIOKafkaProducer, event_time: EventTime | None = None,
                 routing: OutputRouting | None = None):
        self.producer = producer
        self.event_time = event_time or EventTime()
        self.routing = routing
        self.awaiting = AwaitingCommit()  # stays empty: nothing waits for a commit to be seen

    @contextlib.asynccontextmanager
    async def deliver(self, partition: Hashable) -> AsyncIterator[AcknowledgedBlock]:
        """Outputs of `partition` that count together (module docstring)."""
        delivery = AcknowledgedBlock(self, partition)
        yield delivery
        await delivery.flush()

    def takeover_refusal(self, partition: Hashable, committed_metadata: str | None) -> str | None:
        """Why this worker must not take `partition` (None: it may). At least once, nothing to fence."""
        return None

    async def read_committed(self, consumer, partitions) -> dict:
        """Where new partitions resume: the group's committed offsets as the coordinator has them."""
        return await committed_offsets(consumer, partitions)

    async def checkpoint(self, partitions, plan_for: Callable[[set], CheckpointPlan], consumer,
                         group_id: str) -> dict | None:
        """The plan's records acknowledged, then its offsets committed in one consumer-group commit. Returns
        the offsets committed, None if nothing could be (the next checkpoint tries again)."""
        plan = plan_for(partitions)
        try:
            futures = []
            for tp in sorted(plan.partitions):
                for topic, key, value, out_partition in plan.records(tp):  # no await between serializing
                    futures.append(await self.send(tp, topic, value, key=key, out_partition=out_partition))
            await asyncio.gather(*futures)
        except KafkaError as exc:
            plan.retry_later()
            log.warning("checkpoint_state_failed", error=repr(exc))
            return None
        if not plan.offsets:
            return {}
        try:
            await consumer.commit(plan.offsets)
        except KafkaError as exc:  # e.g. a rebalance is under way: the next checkpoint catches up
            log.warning("commit_failed", error=repr(exc))
            return None
        return dict(plan.offsets)

    async def send(self, partition: Hashable, topic: str, value: bytes, key: bytes | None = None,
                   headers=None, out_partition: int | None = None, timestamp_ms: int | None = None) -> asyncio.Future:
        """Enqueue one record; the future resolves when the broker acknowledged it."""
        out_partition, timestamp_ms = self._placed(partition, topic, key, out_partition, timestamp_ms)
        return await self.producer.send(topic, value, key=key, headers=headers, partition=out_partition,
                                        timestamp_ms=timestamp_ms)

    async def open(self, partition: Hashable) -> None:
        pass

    async def close(self, partition: Hashable) -> None:
        pass

    async def stop(self, timeout_s: float = 20.0) -> None:
        pass
