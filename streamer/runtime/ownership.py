"""Taking and giving back input partitions on a rebalance: the only place partitions change hands.

Each assignment of a partition is one `OwnedPartition` (streamer/partitions.py). assign: check the state
topic, refuse a partition whose last commit used another transactional id prefix, take its transactional id
(fencing a previous owner), restore its patient states and episode numbers, register how each part releases
the partition, then admit it (never before: the registry gates the consume loop). revoke: publish what is
in flight for the partitions still mine, checkpoint them, then one `close` each (a fenced one, closed dirty
already, skips the drain and the checkpoint)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from aiokafka import ConsumerRebalanceListener, TopicPartition

from streamer.delivery.event_time import EventTime
from streamer.delivery import Delivery
from streamer.ingest.deadletter import DeadLetters
from streamer.kafka.clients import committed_offsets
from streamer.kafka.partitioning import OutputRouting
from streamer.logs import get_logger
from streamer.metrics import Metrics
from streamer.partitions import OwnedPartition, OwnedPartitions
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
    partitions: OwnedPartitions  # the worker's: what the consume loop lets in
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
    # seams (the delivery model drives this class over in-memory clients): the state topic's check, and how
    # long a revocation waits for what is in flight (None: half the session timeout)
    check_state_topic: Callable[[KafkaSettings], Awaitable[tuple[str | None, int]]] = state_topic_problem
    drain_timeout_s: float | None = None
    joined: bool = False  # a group generation assigned this worker its partitions (none, for a standby)
    # (consumer, partitions) -> {tp: (offset, metadata)}: where the new partitions resume (per_worker: read
    # stable, waiting for a transaction that holds the group's offsets, and sought there)
    read_committed: Callable[..., Awaitable[dict]] = committed_offsets

    def listener(self, fail: Callable[[BaseException], None]) -> ConsumerRebalanceListener:
        """The consumer's rebalance listener: revoke, then assign; a failure of either stops the worker
        through `fail` (aiokafka would log and swallow it: a silent stall, the partitions unread)."""
        return _Rebalance(self, fail)

    async def revoke(self, revoked: set[TopicPartition]) -> None:
        """Publish what is in flight for these partitions, checkpoint, then close each (its buffers, states,
        offsets and outputs released)."""
        tasks = [t for t in map(self.partitions.held, sorted(revoked)) if t is not None]
        wait_s = self.kafka.session_timeout_ms / 2000 if self.drain_timeout_s is None else self.drain_timeout_s
        deadline = time.monotonic() + wait_s
        # a fenced partition's outputs (fenced before or during the wait) are dropped, never acknowledged:
        # nothing to wait for
        while pending := sum(t.offsets.count for t in tasks if t.mine):
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("revoke_before_drained", pending=pending)
                break
            self.settled.clear()
            try:
                await asyncio.wait_for(self.settled.wait(), left)
            except asyncio.TimeoutError:
                pass
        mine = {t.tp for t in tasks if t.mine}
        if mine and not self.failed():
            await self.checkpoint(mine)
        for t in tasks:
            patients = len(t.windows.streams) if t.windows is not None else 0
            await self.partitions.close(t.tp)
            log.info("partition_revoked", topic=t.tp.topic, partition=t.tp.partition, patients_dropped=patients,
                     fenced=t.fenced)

    async def assign(self, assigned: set[TopicPartition]) -> None:
        """Take the partitions' transactional ids (exactly once: fencing a previous owner), restore their
        patient states, then let their records in (never before)."""
        for tp in sorted(assigned):
            held = self.partitions.held(tp)
            if held is not None and not held.mine:  # fenced, and no revocation came (never with eager rebalances)
                await self.partitions.close(tp)
        new = sorted(tp for tp in assigned if self.partitions.held(tp) is None)
        if new:
            problem, state_partitions = await self.check_state_topic(self.kafka)  # the topics may have changed
            if problem is None and max(tp.partition for tp in new) >= state_partitions:
                problem = f"{self.kafka.state_topic} has no partition {max(tp.partition for tp in new)}"
            if problem is not None:
                raise RuntimeError(problem)
        committed = await self.read_committed(self.consumer, new)
        for tp in new:  # all checked before any is taken
            problem = self.delivery.takeover_refusal(tp, committed[tp][1])
            if problem is not None:
                raise RuntimeError(problem)
        tasks: dict[TopicPartition, OwnedPartition] = {}
        for tp in new:
            await self.delivery.open(tp)
            task = tasks[tp] = OwnedPartition(tp, committed[tp][0])
            self.release_at_close(task)
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
            self.event_time.restore(tasks[tp], restored.newest_timestamp_ms.get(tp))
            self.store.load(tasks[tp], states, seqs)
            bad = [u for u in restored.unreadable if u.partition == tp]
            for u in bad:
                self.dead_letters.send(tp, u.record, "state_unreadable", u.reason, held=False)
            self.partitions.admit(tasks[tp])
            self.publisher.resume(tp, [u.patient_id for u in bad if u.patient_id is not None], now)
            log.info("partition_assigned", topic=tp.topic, partition=tp.partition,
                     committed=committed[tp][0], patients_restored=len(states), states_unreadable=len(bad))

    def release_at_close(self, task: OwnedPartition) -> None:
        """What each part keeps of the partition, released at its close (newest first: the windows, the
        states, then the outputs, whose open transaction is aborted). Its offsets and event time are fields
        of the object alone: they go with it."""
        tp = task.tp
        task.on_close(lambda: self.delivery.close(tp))
        task.on_close(lambda: self.store.release(task))
        task.on_close(lambda: self.stage.release(task))

    def _episode_partitions(self, partitions) -> list[int]:
        """The episodes topic's partitions that hold these input partitions' patients' messages: the same
        numbers when the topics line up (OutputRouting), else all of them."""
        k = self.kafka
        if self.routing is None:  # never guess: an empty list would restore no episode numbers at all
            raise RuntimeError("the episodes topic's partitions are unknown (no output routing)")
        n_out = self.routing.counts.get(k.episodes_topic, 0)
        aligned = [self.routing.partition(tp, k.episodes_topic, None) for tp in partitions]
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
