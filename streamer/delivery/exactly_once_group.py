"""Exactly once with one transaction per worker (kafka.transactions = "per_worker", KIP-447): one
transactional producer, its id `<prefix>-worker-<worker id>` stable across the worker's restarts (its
InitProducerId at start aborts what the previous incarnation left open). Everything every owned partition
produces between two checkpoints, their state records and their consumer offsets form one transaction. The
offsets are committed with TxnOffsetCommit v3 (kafka/kip447.py), which carries the group generation the
partitions were assigned in: the group coordinator refuses the offsets of a generation that is over, so a
zombie (a worker the group gave up on) cannot commit, and its transaction is aborted.

Invariants (those of exactly_once.py, for one transaction instead of one per partition):
- Where the generation lives: each partition's `GroupMetadata` is captured when it is opened (in the
  rebalance listener's assignment, `open`) and kept with the partition here until it is closed; a commit
  uses those copies, never a fresh read (that would adopt a newer generation for work done under the old).
- Every record is confirmed before the offsets join the transaction and before it commits; one refused
  record aborts the whole transaction (nothing visible, no offset moved) and stops the worker.
- An output counts once it is in the open transaction; a checkpoint commits every partition with writes in
  it (its records, states and offsets together), whichever partitions it was asked for: a partition's
  records never become visible without its offsets.
- The worker loses every partition at once when its transaction is lost: GroupFenced (the coordinator
  refused the generation: abort, the producer stays usable) or a fence of its producer id (another process
  with the same worker id, or the brokers aborted the transaction after kafka.transaction_timeout_ms, e.g.
  while the worker was stopped: the producer is replaced at the next assignment). Every partition's outputs
  are then dropped, `on_fenced(partitions)` is told once (it closes them dirty and rejoins) and whoever owns
  them next redoes them from their last commit. Any other failure is fatal, as in exactly_once.py.
- A partition that leaves with writes in the open transaction (no checkpoint came first) aborts it: the
  other partitions with writes in it lose them, so they are lost too (`on_fenced`).
- Offsets are read back with OffsetFetch v7 require_stable (`read_committed`: it waits for a transaction
  holding the group's offsets) and the consumer is sought there: aiokafka's own fetch does not wait.
- Fencing a worker of the other mode: `read_committed` first takes the partition's per-partition id
  `<prefix>-<topic>-<partition>` once, aborting what a per_partition owner left open and refusing its
  further writes (its offset commits carry no generation). The prefix check of exactly_once.py applies
  unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import AsyncIterator, Awaitable, Callable, Hashable

from aiokafka.errors import IllegalOperation, KafkaError

from streamer.delivery.base import CheckpointPlan, Stamped, TransactionFailed, AwaitingCommit
from streamer.delivery.event_time import EventTime
from streamer.delivery.exactly_once import (TXN_METADATA_PREFIX, RecordRefused, TransactionBlock, _resolved,
                                           confirm_sent, failure_cause, fence_behind, for_caller, refused_prefix)
from streamer.kafka.kip447 import GroupFenced, GroupMetadata, committed_offsets_stable
from streamer.kafka.partitioning import OutputRouting
from streamer.logs import get_logger
from streamer.settings import KafkaSettings

log = get_logger("streamer.delivery")


def worker_transactional_id(k: KafkaSettings) -> str:
    """`<prefix>-worker-<worker id>`: kafka.worker_id, else `<host name>-<process id>` (one per process on a
    host; stable across restarts in a container, where the process id is 1)."""
    worker = k.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    return f"{k.transactional_id_prefix}-worker-{worker}"


class _Owned:
    """One assignment of a partition as this delivery holds it: the generation it was assigned in."""
    __slots__ = ("group", "fenced")

    def __init__(self, group: GroupMetadata):
        self.group = group
        self.fenced = False  # lost with the worker's transaction: its outputs are dropped


class _WorkerTxn:
    """The worker's one open transaction."""

    def __init__(self) -> None:
        self.open = False  # begun (begin_transaction) and not yet ended
        self.has_writes = False  # anything in it (records or offsets)
        self.dirty: set = set()  # the partitions with records in it
        self.failed: BaseException | None = None  # fatal: the worker stops
        self.sent: list[tuple[str, asyncio.Future]] = []  # (topic, delivery) of each record in it


class ExactlyOnceGroupDelivery(Stamped):
    exactly_once = True
    task_failure_is_fatal = True  # as exactly_once.py: a failed task may have left part of a window's outputs

    def __init__(self, k: KafkaSettings, make_producer, group_member: Callable[[], GroupMetadata],
                 event_time: EventTime | None = None, routing: OutputRouting | None = None,
                 on_fenced: Callable[[list], None] | None = None,
                 on_committed: Callable[[list[float], float], None] | None = None,
                 read_stable: Callable[..., Awaitable[dict]] = committed_offsets_stable):
        self.kafka = k
        # (consumer, partitions, timeout_s) -> {tp: (offset, metadata)}: OffsetFetch v7 require_stable on a
        # broker; the delivery model's in-memory group coordinator in tests/model
        self._read_stable = read_stable
        # (transactional_id, kip447) -> producer: a Kip447Producer when kip447, else a plain one (fencing ids)
        self._make_producer = make_producer
        self._group_member = group_member  # the consumer's membership now: read only in `open`
        self.worker_id = worker_transactional_id(k)
        self._producer = None  # started by `start`; replaced after a fence of its id
        self._txn = _WorkerTxn()
        self._lock = asyncio.Lock()  # one transaction: outputs of every partition and the commit exclude each other
        self._owned: dict[Hashable, _Owned] = {}
        self._stopped = False  # `stop` began: no partition opens, no producer starts
        self.event_time = event_time or EventTime()
        self.routing = routing
        self.on_fenced = on_fenced  # (partitions) -> None, once per lost transaction
        self.awaiting = AwaitingCommit(on_committed)
        self.lost_transactions = 0  # transactions lost with every partition in them (each partition redoes)

    def transactional_id(self, partition=None) -> str:
        """The one id every partition's outputs are written under."""
        return self.worker_id

    async def start(self) -> None:
        """Take the worker's id (aborting what a previous incarnation left open); Kip447Unsupported when a
        broker lacks TxnOffsetCommit v3 / OffsetFetch v7."""
        if self._producer is not None:
            return
        producer = self._make_producer(self.worker_id, True)
        await producer.start()  # Kip447Producer.start stops it itself when it refuses the brokers
        self._producer = producer
        self._txn = _WorkerTxn()
        log.info("worker_transactions_started", transactional_id=self.worker_id)

    @contextlib.asynccontextmanager
    async def deliver(self, partition) -> AsyncIterator[TransactionBlock]:
        async with self.gate(partition) as owned:
            block = TransactionBlock(self, partition, owned, self._owned, self.worker_id)
            yield block
        await block.confirmed()

    def takeover_refusal(self, partition, committed_metadata: str | None) -> str | None:
        """As exactly_once.py: a partition last committed under another prefix is refused."""
        return refused_prefix(self.kafka, committed_metadata, partition)

    async def read_committed(self, consumer, partitions) -> dict:
        """{partition: (committed offset or None, metadata)} read stable (waiting for an open transaction
        that holds the group's offsets, a zombie's or a crashed worker's, to end: at most the transaction
        timeout), and the consumer sought to each offset: what it reads next is what that commit left."""
        partitions = list(partitions)
        if not partitions:
            return {}
        # first: a per_partition owner could still commit between the read and a fence
        await asyncio.gather(*(self._fence_per_partition_ids(tp) for tp in partitions))
        wait_s = 2 * self.kafka.transaction_timeout_ms / 1000 + 10
        found = await self._read_stable(consumer, partitions, timeout_s=wait_s)
        for tp, (offset, _) in found.items():
            if offset is not None:
                consumer.seek(tp, offset)
        return found

    async def _fence_per_partition_ids(self, partition) -> None:
        """Take the partition's per-partition ids once (this prefix's and the previous one's): a per_partition
        owner's open transaction is aborted and its later writes and offset commits (unfenced by generation)
        refused."""
        k = self.kafka
        for prefix in sorted({k.transactional_id_prefix, k.previous_transactional_id_prefix} - {None}):
            await self._fence(f"{prefix}-{partition.topic}-{partition.partition}")

    async def open(self, partition) -> None:
        """Keep the generation the partition is assigned in and make sure the worker's transaction is open
        (its per-partition ids were fenced by `read_committed`, just before)."""
        if partition in self._owned or self._stopped:
            return
        group = self._group_member()  # UnfencedGroupMetadata between generations: loud
        async with self._lock:
            if self._stopped:  # an assignment racing the shutdown: its outputs are dropped, nothing starts
                return
            if self._txn.failed is not None:
                raise TransactionFailed(f"{self.worker_id}: {self._txn.failed!r}")
            if self._producer is None:
                await self.start()
            if not self._txn.open:
                await self._producer.begin_transaction()
                self._txn.open = True
            self._owned[partition] = _Owned(group)
        log.info("partition_joined_worker_transaction", transactional_id=self.worker_id, topic=partition.topic,
                 partition=partition.partition, generation=group.generation_id)

    async def _fence(self, transactional_id: str) -> None:
        producer = self._make_producer(transactional_id, False)
        try:
            await producer.start()
        finally:
            with contextlib.suppress(Exception):
                await producer.stop()

    async def close(self, partition) -> None:
        """Drop the partition (after its last checkpoint). Writes of it still in the open transaction abort
        the transaction: the other partitions with writes in it are lost too, the rest go on in a new one."""
        self.awaiting.forget(partition)
        owned = self._owned.pop(partition, None)
        if owned is None:
            return
        async with self._lock:
            if owned.fenced or partition not in self._txn.dirty or self._txn.failed is not None:
                self._txn.dirty.discard(partition)
                return
            others = self._txn.dirty - {partition}
            await self._abort("partition_closed_uncommitted")
            # only the partitions with writes in it lost anything (eager rebalances revoke them all anyway)
            self._lose_all(RuntimeError(f"{partition} left with uncommitted writes"), aborted=True, only=others)
            if self._producer is not None and any(not o.fenced for o in self._owned.values()):
                await self._producer.begin_transaction()  # for the partitions that lost nothing
                self._txn.open = True

    async def stop(self, timeout_s: float = 20.0) -> None:
        """Abort what the transaction holds and close the producer. A commit in flight ends first (the lock,
        as exactly_once.py's close), for at most half of `timeout_s`: it never finds its partitions or its
        producer taken from under it. Past that its partitions are marked lost (their outputs dropped) and
        the producer is stopped under it within the rest (past that it is left: the next incarnation's
        InitProducerId or the transaction timeout aborts it). No partition opens after this."""
        self._stopped = True

        async def ending() -> None:
            async with self._lock:
                self._owned.clear()
                producer = self._producer
                if producer is None:
                    return
                if self._txn.open and self._txn.has_writes and self._txn.failed is None:
                    with contextlib.suppress(Exception):
                        await producer.abort_transaction()
                self._producer = None
                with contextlib.suppress(Exception):
                    await producer.stop()

        try:
            await asyncio.wait_for(ending(), timeout_s / 2)
        except asyncio.TimeoutError:
            for owned in self._owned.values():  # the commit holding the lock keeps them, lost
                owned.fenced = True
            producer, self._producer = self._producer, None
            if producer is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(producer.stop(), timeout_s / 2)

    @contextlib.asynccontextmanager
    async def gate(self, partition) -> AsyncIterator[bool]:
        """Hold the worker's transaction open while outputs and the state changes they imply are made
        together; yields False when the partition is no longer owned (the outputs must be dropped)."""
        owned = self._owned.get(partition)
        if owned is None:
            yield False
            return
        async with self._lock:
            if owned.fenced:
                yield False
                return
            if self._txn.failed is not None:
                raise TransactionFailed(f"{self.worker_id}: {self._txn.failed!r}")
            yield self._owned.get(partition) is owned

    async def send(self, partition, topic: str, value: bytes, key: bytes | None = None, headers=None,
                   out_partition: int | None = None, timestamp_ms: int | None = None) -> asyncio.Future:
        """Enqueue one record into the worker's transaction (call under `gate`); the future resolves to None,
        never raises, once the transaction is lost (the record is dropped with it)."""
        owned = self._owned.get(partition)
        if owned is None or owned.fenced or self._producer is None:
            return _resolved()
        txn = self._txn
        out_partition, timestamp_ms = self._placed(partition, topic, key, out_partition, timestamp_ms)
        first = partition not in txn.dirty
        try:
            fut = await self._producer.send(topic, value, key=key, headers=headers, partition=out_partition,
                                            timestamp_ms=timestamp_ms)
        except (KafkaError, IllegalOperation) as exc:
            failure = await self._failed(exc)
            if owned.fenced:
                return _resolved()
            raise failure from exc
        if first:  # after the send, before anything yields: both are pending when aiokafka's sender asks
            self._with_its_state_partition(self._producer, partition, topic)
        txn.sent.append((topic, fut))
        txn.has_writes = True
        txn.dirty.add(partition)
        return for_caller(fut, self._fenced_while_current(txn))

    async def checkpoint(self, partitions, plan_for: Callable[[set], CheckpointPlan], consumer,
                         group_id: str) -> dict:
        """One commit of the worker's transaction: the partitions asked for and every partition with writes
        in it (their records must not be seen without their offsets), their state records and offsets.
        Returns the offsets committed ({} when the transaction was lost: every partition is redone by its
        next owner); a failure is raised (fatal)."""
        from aiokafka.structs import OffsetAndMetadata

        async with self._lock:
            txn = self._txn
            if txn.failed is not None:
                raise TransactionFailed(f"{self.worker_id}: {txn.failed!r}")
            producer = self._producer  # the one this commit runs on, even if `stop` detaches it
            if producer is None or not txn.open:
                return {}
            together = sorted(tp for tp in set(partitions) | txn.dirty
                              if tp in self._owned and not self._owned[tp].fenced)
            if not together:
                return {}
            plan = plan_for(set(together))  # under the lock: nothing is published between this and the commit
            joined = {tp: self.awaiting.take(tp) for tp in together}
            committed: dict = {}
            try:
                for tp in together:
                    stamp = self.event_time.stamp(tp)
                    for topic, key, value, out_partition in plan.records(tp):
                        txn.sent.append((topic, await producer.send(
                            topic, value, key=key, partition=out_partition, timestamp_ms=stamp)))
                        txn.has_writes = True
                # before the offsets join it: a refused record must leave every offset where it was
                await confirm_sent(txn)
                metadata = f"{TXN_METADATA_PREFIX}{self.kafka.transactional_id_prefix}"
                by_member: dict[GroupMetadata, dict] = {}
                for tp in together:
                    offset = plan.offsets.get(tp)
                    if offset is not None:
                        by_member.setdefault(self._owned[tp].group, {})[tp] = OffsetAndMetadata(offset, metadata)
                        committed[tp] = offset
                # one generation in practice (eager rebalances reassign every partition at once); an older
                # one is refused (GroupFenced) and the whole transaction with it
                for member, offsets in sorted(by_member.items(), key=lambda m: m[0].generation_id):
                    await producer.send_offsets_to_transaction(offsets, member)
                    txn.has_writes = True
                if txn.has_writes:
                    await producer.commit_transaction()
                    txn.has_writes = False
                    txn.dirty.clear()
                    await producer.begin_transaction()
            except GroupFenced as exc:
                await self._abort("group_fenced")
                self._lose_all(exc, aborted=True)
                return {}
            except (KafkaError, IllegalOperation) as exc:
                failure = await self._failed(exc)
                if txn is not self._txn:
                    return {}  # lost with the producer's fence: nothing of it commits
                if isinstance(exc, RecordRefused):
                    await self._abort("record_refused")
                raise failure from exc
        for tp in together:
            self.awaiting.committed(joined[tp])
        return committed

    async def _failed(self, exc: BaseException) -> TransactionFailed:
        """As exactly_once.py: the transaction failed with its own error (`failure_cause`); a fence of the
        producer's id loses every partition instead (`_producer_fenced`), and leaves `failed` unset (not
        fatal)."""
        exc = await failure_cause(self._producer, exc)
        fence = fence_behind(exc, self._producer, self._txn.sent)
        if fence is not None:
            self._producer_fenced(fence)
        else:
            self._txn.failed = self._txn.failed or exc
        return TransactionFailed(f"{self.worker_id}: {exc!r}")

    def _fenced_while_current(self, txn: _WorkerTxn) -> Callable[[BaseException], None]:
        """What a fenced delivery does: loses every partition, unless its transaction already ended."""
        def fenced(exc: BaseException) -> None:
            if txn is self._txn:
                self._producer_fenced(exc)
        return fenced

    def _producer_fenced(self, exc: BaseException) -> None:
        """A newer epoch of the worker's id: its producer is unusable; a new one takes the id at the next
        assignment (if another live process holds the id, the two keep fencing each other: FenceWatch's
        count fails one)."""
        producer, self._producer = self._producer, None
        if producer is not None:
            asyncio.ensure_future(_quietly_stopped(producer))
        self._lose_all(exc, aborted=False)

    def _lose_all(self, exc: BaseException, aborted: bool, only: set | None = None) -> None:
        """Every partition's outputs dropped with the transaction (`only`: just those partitions'); the
        transaction is over; `on_fenced` told once."""
        lost = sorted(tp for tp, owned in self._owned.items() if not owned.fenced and (only is None or tp in only))
        for tp in lost:
            self._owned[tp].fenced = True
        for _, f in self._txn.sent:  # dropped with the transaction: their errors are this one, handled here
            f.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._txn = _WorkerTxn()  # ended: aborted here, or by the fence of the id (no producer left)
        for tp in lost:
            self.awaiting.forget(tp)
        if not lost:
            return
        self.lost_transactions += 1
        log.error("worker_transaction_lost", transactional_id=self.worker_id, error=repr(exc),
                  partitions_redone=len(lost), lost_transactions=self.lost_transactions, aborted=aborted,
                  action="every partition is dropped and the group rejoined; their next owners restore their "
                         "last commit")
        if self.on_fenced is not None:
            self.on_fenced(lost)

    async def _abort(self, why: str) -> None:
        """Abort the open transaction at once (nothing of it visible, readers not blocked until its timeout);
        if even that fails, the broker aborts it after the transaction timeout."""
        if self._producer is None:
            return
        try:
            await asyncio.wait_for(self._producer.abort_transaction(), 10)
            log.error("transaction_aborted", transactional_id=self.worker_id, reason=why,
                      error=repr(self._txn.failed))
        except Exception as exc:  # noqa: BLE001 (the first cause is kept)
            log.error("transaction_abort_failed", transactional_id=self.worker_id, reason=why, error=repr(exc))
        self._txn.open = False
        self._txn.has_writes = False


async def _quietly_stopped(producer) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(producer.stop(), 10)
