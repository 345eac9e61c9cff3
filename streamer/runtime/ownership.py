"""Taking and giving back input partitions on a rebalance: the only place partitions change hands.

revoke: publish what is in flight for the partitions, checkpoint them, then close their outputs and drop
their buffers, states and offsets. assign: check the state topic, refuse a partition whose last commit used
another transactional id prefix, take its transactional id (fencing a previous owner), restore its patient
states and episode numbers, then let its records in (never before: `assigned` gates the consume loop)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from aiokafka import ConsumerRebalanceListener, TopicPartition

from streamer.checkpointing import OffsetsLedger
from streamer.delivery.event_time import EventTime
from streamer.delivery import Delivery
from streamer.ingest.deadletter import DeadLetters
from streamer.kafka.clients import committed_offsets
from streamer.kafka.partitioning import OutputRouting
from streamer.logs import get_logger
from streamer.metrics import Metrics
from streamer.publish.publisher import Publisher
from streamer.runtime.startup import state_topic_problem
from streamer.settings import KafkaSettings
from streamer.state.changelog import read_episode_seqs, read_states
from streamer.state.store import StateStore
from streamer.windows.stage import WindowStage

log = get_logger("streamer.worker")


@dataclass
class PartitionOwnership:
    kafka: KafkaSettings
    assigned: set[TopicPartition]  # the worker's: what the consume loop lets in
    ledger: OffsetsLedger
    stage: WindowStage
    store: StateStore
    event_time: EventTime
    metrics: Metrics
    settled: asyncio.Event  # set whenever an output is acknowledged
    delivery: Delivery
    consumer: object  # AIOKafkaConsumer of the group
    state_reader: object  # AIOKafkaConsumer without a group: reads states back
    dead_letters: DeadLetters
    publisher: Publisher
    routing: OutputRouting | None
    checkpoint: Callable[[set[TopicPartition]], Awaitable[None]]
    failed: Callable[[], bool]  # the worker has failed: nothing more is committed
    clock: Callable[[], float] = time.time
    joined: bool = False  # a group generation assigned this worker its partitions (none, for a standby)

    def listener(self, fail: Callable[[BaseException], None]) -> ConsumerRebalanceListener:
        """The consumer's rebalance listener: revoke, then assign; a failure of either stops the worker
        through `fail` (aiokafka would log and swallow it: a silent stall, the partitions unread)."""
        return _Rebalance(self, fail)

    async def revoke(self, revoked: set[TopicPartition]) -> None:
        """Publish what is in flight for these partitions, checkpoint, then drop their buffers and states."""
        deadline = time.monotonic() + self.kafka.session_timeout_ms / 2000
        # a fenced partition's outputs are dropped, never acknowledged: nothing to wait for
        while any(self.ledger.in_flight(tp) for tp in revoked if not self.delivery.lost(tp)):
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("revoke_before_drained", pending=sum(self.ledger.in_flight(tp) for tp in revoked))
                break
            self.settled.clear()
            try:
                await asyncio.wait_for(self.settled.wait(), left)
            except asyncio.TimeoutError:
                pass
        if not self.failed():
            await self.checkpoint(revoked)
        for tp in revoked:
            await self.delivery.close(tp)
            self.event_time.drop(tp)
            dropped = self.stage.drop_partition(tp)
            self.ledger.drop_partition(tp)
            self.assigned.discard(tp)
            log.info("partition_revoked", topic=tp.topic, partition=tp.partition, patients_dropped=dropped)

    async def assign(self, assigned: set[TopicPartition]) -> None:
        """Take the partitions' transactional ids (exactly once: fencing a previous owner), restore their
        patient states, then let their records in (never before)."""
        new = sorted(assigned - self.assigned)
        if new:
            problem, state_partitions = await state_topic_problem(self.kafka)  # the topics may have changed
            if problem is None and max(tp.partition for tp in new) >= state_partitions:
                problem = f"{self.kafka.state_topic} has no partition {max(tp.partition for tp in new)}"
            if problem is not None:
                raise RuntimeError(problem)
        committed = await committed_offsets(self.consumer, new)
        for tp in new:  # all checked before any is taken
            problem = self.delivery.takeover_refusal(tp, committed[tp][1])
            if problem is not None:
                raise RuntimeError(problem)
        for tp in new:
            await self.delivery.open(tp)
        for tp in new:
            self.ledger.start_partition(tp, committed[tp][0])
        self.metrics.restoring.inc(len(new))
        try:
            with self.metrics.restore_s.time():
                restored = await read_states(self.state_reader, self.kafka.state_topic, new,
                                             idle_timeout_s=self.kafka.restore_idle_timeout_s)
                seqs = await read_episode_seqs(self.state_reader, self.kafka.episodes_topic,
                                               self._episode_partitions(new),
                                               idle_timeout_s=self.kafka.restore_idle_timeout_s)
        finally:
            self.metrics.restoring.dec(len(new))
        self.metrics.restore_records.inc(restored.records)
        now = self.clock()
        for tp in new:
            states = restored.states[tp]
            self.event_time.observe(tp, restored.newest_timestamp_ms.get(tp))
            self.store.load(tp, states, seqs)
            bad = [u for u in restored.unreadable if u.partition == tp]
            for u in bad:
                self.dead_letters.send(tp, u.record, "state_unreadable", u.reason, held=False)
            self.publisher.resume(tp, [u.patient_id for u in bad if u.patient_id is not None], now)
            self.assigned.add(tp)
            log.info("partition_assigned", topic=tp.topic, partition=tp.partition,
                     committed=self.ledger.committed.get(tp), patients_restored=len(states),
                     states_unreadable=len(bad))

    def _episode_partitions(self, partitions) -> list[int]:
        """The episodes topic's partitions that hold these input partitions' patients' messages: the same
        numbers when the topics line up (OutputRouting), else all of them."""
        k = self.kafka
        n_out = self.routing.counts.get(k.episodes_topic, 0) if self.routing else 0
        aligned = [self.routing.partition(tp, k.episodes_topic, None) for tp in partitions] if self.routing else []
        if aligned and all(p is not None for p in aligned):
            return sorted(set(aligned))
        return list(range(n_out))


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, ownership: PartitionOwnership, fail: Callable[[BaseException], None]):
        self.ownership, self.fail = ownership, fail

    async def on_partitions_revoked(self, revoked) -> None:
        try:
            await self.ownership.revoke(set(revoked))
        except Exception as exc:  # noqa: BLE001 (see PartitionOwnership.listener)
            self.fail(exc)

    async def on_partitions_assigned(self, assigned) -> None:
        try:
            await self.ownership.assign(set(assigned))
            self.ownership.joined = True
        except Exception as exc:  # noqa: BLE001 (see PartitionOwnership.listener)
            log.error("restore_failed", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned),
                      error=repr(exc))
            self.fail(exc)
