"""Exactly once. One transactional producer per owned input partition, its transactional id
`<prefix>-<topic>-<partition>`: a new owner's InitProducerId fences the old owner (a zombie that resumes
cannot write any more) and aborts its open transaction. Everything a partition's records produce between
two checkpoints, its state records and its consumer offsets form one transaction: read_committed readers
see all of it or nothing. An output counts once it is in the open transaction (the commit that moves the
offsets carries it): `counted` runs as it is sent, under the partition's lock, and `durable_first` is not
needed (the transaction carries the state). A fenced transaction (a newer epoch of its id: another owner
took it, or the broker aborted it after kafka.transaction_timeout_ms, e.g. while a broker failover held a
commit) loses the partition: every output of it is then dropped (`owned` is False, `commit` commits
nothing) and `on_fenced` tells the worker, which rejoins the group; whoever owns the partition next
restores it from its last commit. Any other failure of the transaction is fatal for the worker, whose
in-memory state then no longer matches what readers will see.

aiokafka (0.14) sends EndTxn(COMMIT) even when the broker refused one of the transaction's batches (it only
fails that batch's futures), unlike the Java producer: so every record's delivery is confirmed here before
the offsets join the transaction and before it commits; one refused record aborts the whole transaction
(nothing of it visible, the offsets unmoved) and stops the worker."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import AsyncIterator, Awaitable, Callable, Hashable

from aiokafka import AIOKafkaProducer
from aiokafka.errors import IllegalOperation, InvalidProducerEpoch, KafkaError, ProducerFenced

from streamer.delivery.base import AwaitingCommit, CheckpointPlan, Counted, Stamped, TransactionFailed, run_counted
from streamer.delivery.event_time import EventTime
from streamer.kafka.clients import committed_offsets, transaction_end
from streamer.kafka.partitioning import OutputRouting
from streamer.logs import get_logger
from streamer.settings import KafkaSettings

log = get_logger("streamer.delivery")

# What a transaction's consumer-offset commit carries as metadata: the transactional id prefix, so that a
# worker taking the partition can tell that the previous owner used another one (fencing would not work).
TXN_METADATA_PREFIX = "txn-prefix="
# What aiokafka raises when the transactional id has a newer epoch (it maps InvalidProducerEpoch to
# ProducerFenced in most places, not all).
FENCED = (ProducerFenced, InvalidProducerEpoch)


class _Txn:
    def __init__(self, producer: AIOKafkaProducer):
        self.producer = producer
        self.lock = asyncio.Lock()
        self.has_writes = False  # anything in the open transaction (records or offsets)
        self.failed: BaseException | None = None
        self.fenced = False  # a newer epoch of the id exists: the partition is lost, its outputs dropped
        self.sent: list[tuple[str, asyncio.Future]] = []  # (topic, delivery) of each record in the transaction


def prefix_of(committed_metadata: str | None) -> str | None:
    """The transactional id prefix a partition's last exactly-once commit was made with (None: unknown)."""
    if not committed_metadata or not committed_metadata.startswith(TXN_METADATA_PREFIX):
        return None
    return committed_metadata[len(TXN_METADATA_PREFIX):]


def refused_prefix(k: KafkaSettings, committed_metadata: str | None, partition) -> str | None:
    """Why this worker must not take `partition` (None: it may). Fencing a previous owner works only through
    the transactional id `<prefix>-<topic>-<partition>`, and aiokafka's offset commits carry no group
    generation: a worker with another prefix (a per-pod value) would neither fence a zombie nor be fenced.
    The last commit's metadata names the prefix it was made with; another one is refused, except
    kafka.previous_transactional_id_prefix during a planned change (that id is fenced first: `open`)."""
    theirs = prefix_of(committed_metadata)
    if theirs is None or theirs in (k.transactional_id_prefix, k.previous_transactional_id_prefix):
        return None
    name = f"{getattr(partition, 'topic', partition)}:{getattr(partition, 'partition', '')}"
    return (f"kafka.transactional_id_prefix is {k.transactional_id_prefix!r} but the group's last commit on "
            f"{name} was made with {theirs!r}: every worker of a group must use one prefix, else a zombie is "
            f"never fenced (leave it unset: the group id). To change it, stop every worker, then start them "
            f"with kafka.previous_transactional_id_prefix = {theirs!r}")


class RecordRefused(KafkaError):
    """The broker refused a record of the open transaction (too large, invalid timestamp, not authorized):
    the transaction is aborted, never committed over it."""


class TransactionBlock:
    """Exactly once, what `deliver` yields (under the transaction's lock): each record joins the open
    transaction as it is sent and counts at once (`counted` runs then); the block's end awaits their
    deliveries. `durable_first` needs nothing: the transaction carries the states with the outputs.
    `holders`: the delivery's map of what holds each partition's outputs now (its transaction, per
    partition; its share of the worker's transaction, per worker: exactly_once_group.py), each with a
    `fenced` flag; `transactional_id`: what a refusal names."""

    def __init__(self, delivery, partition, owned: bool, holders: dict, transactional_id: str):
        self._delivery, self.partition, self.owned = delivery, partition, owned
        self._holders, self._transactional_id = holders, transactional_id
        self._txn = holders.get(partition)
        self.sent: list[tuple[str, asyncio.Future]] = []

    async def send(self, topic: str, value: bytes | None, key: bytes | None = None, headers=None,
                   out_partition: int | None = None, timestamp_ms: int | None = None,
                   counted: Counted | None = None, urgent: bool = False) -> None:
        """`urgent`: readers wait for this record (a flag): its transaction is committed soon (AwaitingCommit)."""
        self.sent.append((topic, await self._delivery.send(self.partition, topic, value, key=key, headers=headers,
                                                          out_partition=out_partition, timestamp_ms=timestamp_ms)))
        if urgent:
            self._delivery.awaiting.add(self.partition, time.time())
        await run_counted(counted)

    def durable_first(self, write: Callable[[], Awaitable[None]]) -> None:
        pass

    def stands(self) -> bool:
        """Whether the block's outputs are still in their transaction (the partition not revoked, not fenced,
        not lost with the transaction)."""
        return self._txn is not None and self._holders.get(self.partition) is self._txn and not self._txn.fenced

    async def confirmed(self) -> None:
        """Every record of the block delivered to its broker (a fence resolves them to None: dropped with the
        partition); a refused one fails the transaction: TransactionFailed, naming the record's topic."""
        results = await asyncio.gather(*(fut for _, fut in self.sent), return_exceptions=True)
        for (topic, _), result in zip(self.sent, results):
            if isinstance(result, BaseException):
                raise TransactionFailed(f"{self._transactional_id}: a record on {topic} was refused: "
                                        f"{result!r}") from result


class ExactlyOnceDelivery(Stamped):
    exactly_once = True  # the mode, for logs and tests: nothing branches on it (the methods differ)
    # a task that failed may have left part of a window's outputs in an open transaction: it must never
    # commit; the partition's next owner redoes it from the last commit
    task_failure_is_fatal = True

    def __init__(self, k: KafkaSettings, make_producer, event_time: EventTime | None = None,
                 routing: OutputRouting | None = None, on_fenced=None,
                 on_committed: Callable[[list[float], float], None] | None = None):
        self.kafka = k
        self._make_producer = make_producer  # (transactional_id) -> AIOKafkaProducer
        self._txns: dict[Hashable, _Txn] = {}
        self._stopped = False  # `stop` began: a partition assigned meanwhile gets no producer
        self.event_time = event_time or EventTime()
        self.routing = routing
        self.on_fenced = on_fenced  # (partition) -> None, called once per fenced transaction
        self.awaiting = AwaitingCommit(on_committed)

    @contextlib.asynccontextmanager
    async def deliver(self, partition) -> AsyncIterator[TransactionBlock]:
        """Outputs of `partition` that count together (module docstring): the block runs under the
        partition's gate; its end awaits the records' deliveries."""
        async with self.gate(partition) as owned:
            delivery = TransactionBlock(self, partition, owned, self._txns, self.transactional_id(partition))
            yield delivery
        await delivery.confirmed()

    def takeover_refusal(self, partition, committed_metadata: str | None) -> str | None:
        """Why this worker must not take `partition` (None: it may): refused_prefix."""
        return refused_prefix(self.kafka, committed_metadata, partition)

    async def read_committed(self, consumer, partitions) -> dict:
        """Where new partitions resume: the group's committed offsets as the coordinator has them (each
        partition's transaction commits its own; `open` fences the partition's id next)."""
        return await committed_offsets(consumer, partitions)

    async def checkpoint(self, partitions, plan_for: Callable[[set], CheckpointPlan], consumer,
                         group_id: str) -> dict:
        """One transaction per partition, side by side (one producer each): the plan's offset and records
        join it and it commits (`commit`). Returns the offsets committed; a failure is raised (fatal)."""
        committed: dict = {}

        async def one(tp) -> None:
            def prepare():  # under the partition's gate: nothing is published between this and the commit
                plan = plan_for({tp})
                return plan.offsets.get(tp), list(plan.records(tp))

            offset = await self.commit(tp, group_id, prepare)
            if offset is not None:
                committed[tp] = offset

        await asyncio.gather(*(one(tp) for tp in sorted(partitions)))
        return committed

    def transactional_id(self, partition) -> str:
        return f"{self.kafka.transactional_id_prefix}-{partition.topic}-{partition.partition}"

    async def open(self, partition) -> None:
        """Take the partition's transactional id (fencing any earlier owner, aborting its open transaction)
        and begin a transaction. Before the partition's states and offsets are read. After `stop` began
        (an assignment racing the shutdown) nothing is opened: its outputs are dropped, as for a partition
        no longer owned, and no producer outlives the delivery."""
        if partition in self._txns or self._stopped:
            return
        previous = self.kafka.previous_transactional_id_prefix
        if previous and previous != self.kafka.transactional_id_prefix:
            await self._fence(f"{previous}-{partition.topic}-{partition.partition}")
        producer = self._make_producer(self.transactional_id(partition))
        try:
            await producer.start()
            await producer.begin_transaction()
        except BaseException:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise
        if self._stopped:  # stop began while this one started: it never saw it
            with contextlib.suppress(Exception):
                await producer.stop()
            return
        self._txns[partition] = _Txn(producer)
        log.info("transaction_opened", transactional_id=self.transactional_id(partition))

    async def _fence(self, transactional_id: str) -> None:
        """Take an id of the previous prefix once (InitProducerId): its owner, should it still run, can no
        longer write, and its open transaction is aborted."""
        producer = self._make_producer(transactional_id)
        try:
            await producer.start()
            log.info("previous_transactional_id_fenced", transactional_id=transactional_id)
        finally:
            with contextlib.suppress(Exception):
                await producer.stop()

    async def close(self, partition) -> None:
        """Drop the partition (after its last checkpoint): what its open transaction holds is aborted."""
        self.awaiting.forget(partition)
        txn = self._txns.pop(partition, None)
        if txn is None:
            return
        async with txn.lock:
            if txn.failed is None and txn.has_writes:
                with contextlib.suppress(KafkaError, Exception):
                    await asyncio.wait_for(txn.producer.abort_transaction(), 10)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(txn.producer.stop(), 10)

    async def stop(self, timeout_s: float = 20.0) -> None:
        """Close every partition's producer (aborting what its open transaction holds), side by side, within
        `timeout_s`: a producer that cannot close in time is left (its transaction is aborted by the next
        owner's fencing or the transaction timeout)."""
        self._stopped = True
        closing = [asyncio.ensure_future(self.close(partition)) for partition in list(self._txns)]
        if closing:
            await asyncio.wait(closing, timeout=timeout_s)

    @contextlib.asynccontextmanager
    async def gate(self, partition) -> AsyncIterator[bool]:
        """Hold the partition's transaction open while outputs and the state changes they imply are made
        together; yields False when the partition is no longer owned (the outputs must be dropped)."""
        txn = self._txns.get(partition)
        if txn is None:
            yield False
            return
        async with txn.lock:
            if txn.fenced:
                yield False  # lost: whoever owns it next redoes these outputs from its last commit
                return
            if txn.failed is not None:
                raise TransactionFailed(f"{self.transactional_id(partition)}: {txn.failed!r}")
            yield self._txns.get(partition) is txn

    async def send(self, partition, topic: str, value: bytes, key: bytes | None = None, headers=None,
                   out_partition: int | None = None, timestamp_ms: int | None = None) -> asyncio.Future:
        """Enqueue one record into the partition's open transaction (call under `gate`). Its delivery is
        confirmed before the transaction commits (`commit`); the future is the caller's to await too (it
        resolves to None, never raises, once the transaction is fenced: the record is dropped with it)."""
        txn = self._txns[partition]
        if txn.fenced:
            return _resolved()
        out_partition, timestamp_ms = self._placed(partition, topic, key, out_partition, timestamp_ms)
        first = not txn.has_writes
        try:
            fut = await txn.producer.send(topic, value, key=key, headers=headers, partition=out_partition,
                                          timestamp_ms=timestamp_ms)
        except (KafkaError, IllegalOperation) as exc:
            failure = await self._failed(partition, txn, exc)
            if txn.fenced:
                return _resolved()
            raise failure from exc
        if first:  # after the send, before anything yields: both are pending when aiokafka's sender asks
            self._with_its_state_partition(txn.producer, partition, topic)
        txn.sent.append((topic, fut))
        txn.has_writes = True
        return for_caller(fut, lambda exc: self._mark_fenced(partition, txn, exc))

    async def _failed(self, partition, txn: _Txn, exc: BaseException) -> TransactionFailed:
        """Mark the transaction failed, naming its own error (`failure_cause`); a fence behind it marks the
        partition lost."""
        exc = await failure_cause(txn.producer, exc)
        txn.failed = txn.failed or exc
        fence = fence_behind(exc, txn.producer, txn.sent)
        if fence is not None:
            self._mark_fenced(partition, txn, fence)
        return TransactionFailed(f"{self.transactional_id(partition)}: {exc!r}")

    def _mark_fenced(self, partition, txn: _Txn, exc: BaseException) -> None:
        if txn.fenced:
            return
        txn.fenced, txn.failed, txn.has_writes = True, exc, False
        for _, f in txn.sent:  # dropped with the partition: their errors are this one, already handled
            f.add_done_callback(lambda f: f.cancelled() or f.exception())
        log.error("transaction_fenced", transactional_id=self.transactional_id(partition), error=repr(exc),
                  action="the partition is dropped and the group rejoined; its next owner restores its last commit")
        if self.on_fenced is not None and self._txns.get(partition) is txn:
            self.on_fenced(partition)

    async def commit(self, partition, group_id: str, prepare) -> int | None:
        """Commit the partition's open transaction and begin the next. `prepare()`, called under the gate so
        that no output slips between it and the commit, returns (consumer offset or None, records: (topic,
        key, value, out partition)); both join the transaction. Returns the committed offset (None if none
        or if the partition is no longer owned, or lost to a fence)."""
        from aiokafka.structs import OffsetAndMetadata

        txn = self._txns.get(partition)
        if txn is None:
            return None
        async with txn.lock:
            if txn.fenced:
                return None
            if txn.failed is not None:
                raise TransactionFailed(f"{self.transactional_id(partition)}: {txn.failed!r}")
            offset, records = prepare()
            joined = self.awaiting.take(partition)
            try:
                stamp = self.event_time.stamp(partition)
                for topic, key, value, out_partition in records:
                    txn.sent.append((topic, await txn.producer.send(topic, value, key=key, partition=out_partition,
                                                                    timestamp_ms=stamp)))
                    txn.has_writes = True
                # before the offsets join it: a refused record must leave the offsets where they were
                await confirm_sent(txn)
                if offset is not None:
                    metadata = f"{TXN_METADATA_PREFIX}{self.kafka.transactional_id_prefix}"
                    await txn.producer.send_offsets_to_transaction(
                        {partition: OffsetAndMetadata(offset, metadata)}, group_id)
                    txn.has_writes = True
                if txn.has_writes:
                    await txn.producer.commit_transaction()
                    await txn.producer.begin_transaction()
                    txn.has_writes = False
            except (KafkaError, IllegalOperation) as exc:
                failure = await self._failed(partition, txn, exc)
                if txn.fenced:
                    return None  # nothing of it commits; the partition's next owner redoes it
                if isinstance(exc, RecordRefused):
                    await self._abort(partition, txn)
                raise failure from exc
        self.awaiting.committed(joined)
        return offset

    async def _abort(self, partition, txn: _Txn) -> None:
        """Abort a failed transaction at once (readers are not blocked until its timeout; its records never
        become visible); if even that fails, the broker aborts it after the transaction timeout."""
        try:
            await asyncio.wait_for(txn.producer.abort_transaction(), 10)
            log.error("transaction_aborted", transactional_id=self.transactional_id(partition), error=repr(txn.failed))
        except Exception as exc:  # noqa: BLE001 (the worker stops either way; the first cause is kept)
            log.error("transaction_abort_failed", transactional_id=self.transactional_id(partition),
                      error=repr(exc))
        txn.has_writes = False


def for_caller(fut: asyncio.Future, on_fence: Callable[[BaseException], None]) -> asyncio.Future:
    """A record's delivery `fut` as the caller sees it: a fence resolves it to None, after `on_fence(exc)`
    (the partition is lost, the record dropped with it); any other outcome passes through."""
    out = asyncio.get_running_loop().create_future()

    def settle(f: asyncio.Future) -> None:
        if out.done():
            return
        if f.cancelled():
            out.cancel()
        elif isinstance(f.exception(), FENCED):
            on_fence(f.exception())
            out.set_result(None)
        elif f.exception() is not None:
            out.set_exception(f.exception())
        else:
            out.set_result(f.result())

    fut.add_done_callback(settle)
    return out


async def confirm_sent(txn) -> None:
    """Every record of the open transaction (`txn.sent`, then emptied) acknowledged by its broker; a fence is
    raised as itself (the partitions are lost, not refused), else RecordRefused names the first refused one
    (its topic and the broker's error)."""
    sent, txn.sent = txn.sent, []
    if not sent:
        return
    results = await asyncio.gather(*(fut for _, fut in sent), return_exceptions=True)
    fence = next((r for r in results if isinstance(r, FENCED)), None)
    if fence is not None:
        raise fence
    refused = [(topic, r) for (topic, _), r in zip(sent, results) if isinstance(r, BaseException)]
    if refused:
        topic, exc = refused[0]
        raise RecordRefused(f"{len(refused)} of {len(sent)} records of the transaction refused; first on "
                            f"{topic}: {exc!r}") from exc


async def failure_cause(producer, exc: BaseException) -> BaseException:
    """The transaction's own error: once a write was refused (e.g. an ACL), aiokafka only says "not in
    transaction" (IllegalOperation) to later sends; committing raises the stored cause."""
    if isinstance(exc, IllegalOperation) and producer is not None:
        try:
            await asyncio.wait_for(producer.commit_transaction(), 5)
        except Exception as cause:  # noqa: BLE001 (the cause is what we are after)
            return cause
    return exc


def fence_behind(exc: BaseException, producer, sent: list[tuple[str, asyncio.Future]]) -> BaseException | None:
    """The fence of the transactional id behind a failure, if any: `exc` itself, a failed delivery's error,
    or the producer's own transaction-end future's (in a fatal state aiokafka 0.14 keeps the cause, e.g.
    ProducerFenced, only there, and answers every later call with an IllegalOperation or an
    AssertionError)."""
    if isinstance(exc, FENCED):
        return exc
    futures = [f for _, f in sent]
    end = transaction_end(producer) if producer is not None else None
    if end is not None:
        futures.append(end)
    # every failed future's exception is read (asyncio logs one never retrieved), then the first fence
    failures = [f.exception() for f in futures if f.done() and not f.cancelled() and f.exception() is not None]
    return next((e for e in failures if isinstance(e, FENCED)), None)


def _resolved(value=None) -> asyncio.Future:
    fut = asyncio.get_running_loop().create_future()
    fut.set_result(value)
    return fut


async def probe_transactions(k: KafkaSettings, make_producer, timeout_s: float = 15.0) -> str | None:
    """Whether the brokers run transactions: None if they do, else why not. An authorization failure is
    raised (the broker has them; the principal lacks the ACL), never taken as "no transactions"."""
    from aiokafka.errors import InvalidProducerEpoch, ProducerFenced, TransactionalIdAuthorizationFailed

    producer = make_producer(f"{k.transactional_id_prefix}-probe")
    try:
        await asyncio.wait_for(producer.start(), timeout_s)
        await producer.begin_transaction()
        await asyncio.wait_for(producer.commit_transaction(), timeout_s)  # empty: no request is sent
        return None
    except (ProducerFenced, InvalidProducerEpoch):
        return None  # another worker starting at the same moment took the probe id: transactions work
    except TransactionalIdAuthorizationFailed:
        raise
    except (KafkaError, asyncio.TimeoutError) as exc:
        return repr(exc)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.stop(), 5)
