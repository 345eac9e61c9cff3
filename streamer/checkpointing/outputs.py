"""Where outputs go and when they count: the two delivery modes, behind one narrow interface.

Every output (flag, episode message, dead letter, state record) derives from one input partition. The
publisher and the dead letters send through one interface whatever the mode:

    async with outputs.deliver(partition) as d:   # d.owned: False once the partition is not this worker's
        d.durable_first(write)                    # what must be durable before these outputs may be seen
        await d.send(topic, value, key=..., counted=callback, urgent=...)
    # here every output of the block counts (d.stands(): unless the partition was lost meanwhile)

and the checkpoint commits through `outputs.checkpoint(...)`. The modes differ in when an output counts,
which is when `counted` runs (the state changes an output implies are made there):

- `AtLeastOnceOutputs`: one idempotent producer (when the broker can), plain consumer-group commits. An
  output counts once the broker acknowledged it (sends are retried until then); what `durable_first`
  names is written before the block's records are sent; a crash before the commit re-sends (same
  window_id). A callback's own outputs are sent (and count) before the next record's callback runs.
- `TransactionalOutputs`: exactly once. One transactional producer per owned input partition, its
  transactional id `<prefix>-<topic>-<partition>`: a new owner's InitProducerId fences the old owner (a
  zombie that resumes cannot write any more) and aborts its open transaction. Everything a partition's
  records produce between two checkpoints, its state records and its consumer offsets form one
  transaction: read_committed readers see all of it or nothing. An output counts once it is in the open
  transaction (the commit that moves the offsets carries it): `counted` runs as it is sent, under the
  partition's lock, and `durable_first` is not needed (the transaction carries the state). A fenced
  transaction (a newer epoch of its id: another owner took it, or the broker aborted it after
  kafka.transaction_timeout_ms, e.g. while a broker failover held a commit) loses the partition: every
  output of it is then dropped (`owned` is False, `commit` commits nothing) and `on_fenced` tells the
  worker, which rejoins the group; whoever
  owns the partition next restores it from its last commit. Any other failure of the transaction is
  fatal for the worker, whose in-memory state then no longer matches what readers will see.
  aiokafka (0.14) sends EndTxn(COMMIT) even when the broker refused one of the transaction's batches (it
  only fails that batch's futures), unlike the Java producer: so every record's delivery is confirmed
  here before the offsets join the transaction and before it commits; one refused record aborts the
  whole transaction (nothing of it visible, the offsets unmoved) and stops the worker.

Both modes stamp every output with the worker's clock capped by its input partition's event time
(event_time.py: never further ahead of the brokers than a record they accepted), and route flags, episodes
and dead letters to the output partition of the same number as their
input partition (`OutputRouting`): one input partition's transaction then blocks read_committed readers of
that one output partition only, whatever partitioner the monitors' producers use.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Hashable, Iterable

from aiokafka import AIOKafkaProducer
from aiokafka.errors import IllegalOperation, InvalidProducerEpoch, KafkaError, ProducerFenced

from streamer.checkpointing.event_time import EventTime
from streamer.ingest.partitioning import home_partition
from streamer.kafka.clients import retry_kafka
from streamer.logs import get_logger
from streamer.settings import KafkaSettings

log = get_logger("streamer.outputs")

# What a transaction's consumer-offset commit carries as metadata: the transactional id prefix, so that a
# worker taking the partition can tell that the previous owner used another one (fencing would not work).
TXN_METADATA_PREFIX = "txn-prefix="
# What aiokafka raises when the transactional id has a newer epoch (it maps InvalidProducerEpoch to
# ProducerFenced in most places, not all).
FENCED = (ProducerFenced, InvalidProducerEpoch)


class OutputRouting:
    """Which output partition a record of input partition `tp` goes to. Output topics with as many partitions
    as the input: the same number (a patient's outputs beside its input, whatever the monitors'
    partitioner). Otherwise the key under the input's partitioner (kafka.input_partitioner), so one
    patient's outputs still stay in one partition; without a key, the producer's choice."""

    def __init__(self, counts: dict[str, int], partitioner: str):
        self.counts, self.partitioner = counts, partitioner

    def partition(self, tp, topic: str, key: bytes | None) -> int | None:
        n_out = self.counts.get(topic)
        n_in = self.counts.get(getattr(tp, "topic", None))
        if not n_out:
            return None
        if n_in == n_out and isinstance(getattr(tp, "partition", None), int):
            return tp.partition
        return home_partition(key, n_out, self.partitioner) if key else None


class TransactionFailed(RuntimeError):
    """The partition's transaction cannot commit (a refused write, an error the producer cannot recover
    from): the worker must stop; the next owner resumes from the last committed transaction."""


class BackgroundSends:
    """Outputs sent beside the data path (dead letters, stale closes): the worker waits for them at shutdown
    and is told when one fails for good (`on_failure`), which it treats as fatal."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task] = set()
        self.on_failure = None

    def spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self.on_failure is not None:
            self.on_failure(task.exception())


Counted = Callable[[], "Awaitable[None] | None"]  # what an output implies, done when it counts


async def _run(callback: Counted | None) -> None:
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


class _Stamped:
    """Event-time stamps and output routing, shared by both modes."""
    event_time: EventTime
    routing: OutputRouting | None

    def _placed(self, partition, topic: str, key, out_partition, timestamp_ms) -> tuple[int | None, int | None]:
        if out_partition is None and self.routing is not None:
            out_partition = self.routing.partition(partition, topic, key)
        if timestamp_ms is None:
            timestamp_ms = self.event_time.stamp(partition)
        return out_partition, timestamp_ms


class _Acknowledged:
    """At least once, what `deliver` yields: the block's records are sent as it ends (after what
    `durable_first` names is written), until the broker acknowledged them; then each one's `counted` runs,
    in send order, and what a callback sends is delivered the same way before the next callback runs."""
    owned = True

    def __init__(self, outputs: "AtLeastOnceOutputs", partition):
        self._outputs, self.partition = outputs, partition
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
                await _run(counted)
                await self.flush()  # what counting it sent, before the next one counts

    async def _acknowledged(self, sends) -> None:
        async def attempt():  # all of them, in order
            futures = [await self._outputs.send(self.partition, *args, **kwargs) for args, kwargs, _ in sends]
            await asyncio.gather(*futures)

        topics = sorted({args[0] for args, _, _ in sends})
        await retry_kafka(attempt, lambda exc, delay: log.warning(
            "publish_retry", topics=topics, records=len(sends), error=repr(exc), retry_in_s=delay))


class AtLeastOnceOutputs(_Stamped):
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
    async def deliver(self, partition: Hashable) -> AsyncIterator[_Acknowledged]:
        """Outputs of `partition` that count together (module docstring)."""
        delivery = _Acknowledged(self, partition)
        yield delivery
        await delivery.flush()

    def lost(self, partition: Hashable) -> bool:
        return False

    def takeover_refusal(self, partition: Hashable, committed_metadata: str | None) -> str | None:
        """Why this worker must not take `partition` (None: it may). At least once, nothing to fence."""
        return None

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


class _InTransaction:
    """Exactly once, what `deliver` yields (under the partition's lock): each record joins the open
    transaction as it is sent and counts at once (`counted` runs then); the block's end awaits their
    deliveries. `durable_first` needs nothing: the transaction carries the states with the outputs."""

    def __init__(self, outputs: "TransactionalOutputs", partition, owned: bool):
        self._outputs, self.partition, self.owned = outputs, partition, owned
        self._txn = outputs._txns.get(partition)
        self.sent: list[tuple[str, asyncio.Future]] = []

    async def send(self, topic: str, value: bytes | None, key: bytes | None = None, headers=None,
                   out_partition: int | None = None, timestamp_ms: int | None = None,
                   counted: Counted | None = None, urgent: bool = False) -> None:
        """`urgent`: readers wait for this record (a flag): its transaction is committed soon (AwaitingCommit)."""
        self.sent.append((topic, await self._outputs.send(self.partition, topic, value, key=key, headers=headers,
                                                          out_partition=out_partition, timestamp_ms=timestamp_ms)))
        if urgent:
            self._outputs.awaiting.add(self.partition, time.time())
        await _run(counted)

    def durable_first(self, write: Callable[[], Awaitable[None]]) -> None:
        pass

    def stands(self) -> bool:
        """Whether the block's outputs are still in the partition's transaction (not revoked, not fenced)."""
        return self._txn is not None and self._outputs._txns.get(self.partition) is self._txn \
            and not self._txn.fenced

    async def confirmed(self) -> None:
        """Every record of the block delivered to its broker (a fence resolves them to None: dropped with the
        partition); a refused one fails the transaction: TransactionFailed, naming the record's topic."""
        results = await asyncio.gather(*(fut for _, fut in self.sent), return_exceptions=True)
        for (topic, _), result in zip(self.sent, results):
            if isinstance(result, BaseException):
                raise TransactionFailed(f"{self._outputs.transactional_id(self.partition)}: a record on {topic} "
                                        f"was refused: {result!r}") from result


class TransactionalOutputs(_Stamped):
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
        self.event_time = event_time or EventTime()
        self.routing = routing
        self.on_fenced = on_fenced  # (partition) -> None, called once per fenced transaction
        self.awaiting = AwaitingCommit(on_committed)

    @contextlib.asynccontextmanager
    async def deliver(self, partition) -> AsyncIterator[_InTransaction]:
        """Outputs of `partition` that count together (module docstring): the block runs under the
        partition's gate; its end awaits the records' deliveries."""
        async with self.gate(partition) as owned:
            delivery = _InTransaction(self, partition, owned)
            yield delivery
        await delivery.confirmed()

    def takeover_refusal(self, partition, committed_metadata: str | None) -> str | None:
        """Why this worker must not take `partition` (None: it may): refused_prefix."""
        return refused_prefix(self.kafka, committed_metadata, partition)

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

    def lost(self, partition) -> bool:
        """Whether the partition's transaction was fenced (it awaits its revocation; nothing of it counts)."""
        txn = self._txns.get(partition)
        return txn is not None and txn.fenced

    def transactional_id(self, partition) -> str:
        return f"{self.kafka.transactional_id_prefix}-{partition.topic}-{partition.partition}"

    async def open(self, partition) -> None:
        """Take the partition's transactional id (fencing any earlier owner, aborting its open transaction)
        and begin a transaction. Before the partition's states and offsets are read."""
        if partition in self._txns:
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
        try:
            fut = await txn.producer.send(topic, value, key=key, headers=headers, partition=out_partition,
                                          timestamp_ms=timestamp_ms)
        except (KafkaError, IllegalOperation) as exc:
            failure = await self._failed(partition, txn, exc)
            if txn.fenced:
                return _resolved()
            raise failure from exc
        txn.sent.append((topic, fut))
        txn.has_writes = True
        return self._for_caller(partition, txn, fut)

    def _for_caller(self, partition, txn: _Txn, fut: asyncio.Future) -> asyncio.Future:
        """`fut` as the caller sees it: a fence resolves it to None (and marks the partition lost)."""
        out = asyncio.get_running_loop().create_future()

        def settle(f: asyncio.Future) -> None:
            if out.done():
                return
            if f.cancelled():
                out.cancel()
            elif isinstance(f.exception(), FENCED):
                self._mark_fenced(partition, txn, f.exception())
                out.set_result(None)
            elif f.exception() is not None:
                out.set_exception(f.exception())
            else:
                out.set_result(f.result())

        fut.add_done_callback(settle)
        return out

    async def _confirm_sent(self, partition, txn: _Txn) -> None:
        """Every record of the open transaction acknowledged by its broker, or RecordRefused naming the first
        refused one (its topic and the broker's error)."""
        sent, txn.sent = txn.sent, []
        if not sent:
            return
        results = await asyncio.gather(*(fut for _, fut in sent), return_exceptions=True)
        fence = next((r for r in results if isinstance(r, FENCED)), None)
        if fence is not None:
            raise fence  # not a refusal: the partition is lost (commit)
        refused = [(topic, r) for (topic, _), r in zip(sent, results) if isinstance(r, BaseException)]
        if refused:
            topic, exc = refused[0]
            raise RecordRefused(f"{len(refused)} of {len(sent)} records of the transaction refused; first on "
                                f"{topic}: {exc!r}") from exc

    async def _failed(self, partition, txn: _Txn, exc: BaseException) -> TransactionFailed:
        """Mark the transaction failed, naming its own error: once a write was refused (e.g. an ACL), aiokafka
        only says "not in transaction" to later sends; committing raises the stored cause."""
        if isinstance(exc, IllegalOperation):
            try:
                await asyncio.wait_for(txn.producer.commit_transaction(), 5)
            except Exception as cause:  # noqa: BLE001 (the cause is what we are after)
                exc = cause
        txn.failed = txn.failed or exc
        fence = exc if isinstance(exc, FENCED) else next(
            (f.exception() for f in self._failed_futures(txn) if isinstance(f.exception(), FENCED)), None)
        if fence is not None:
            self._mark_fenced(partition, txn, fence)
        return TransactionFailed(f"{self.transactional_id(partition)}: {exc!r}")

    @staticmethod
    def _failed_futures(txn: _Txn) -> list[asyncio.Future]:
        """The transaction's failed deliveries, and the producer's own transaction-end future: in a fatal
        state aiokafka 0.14 keeps the cause (e.g. ProducerFenced) only there, and answers every later call
        with an IllegalOperation or an AssertionError."""
        futures = [f for _, f in txn.sent]
        end = getattr(getattr(txn.producer, "_txn_manager", None), "wait_for_transaction_end", None)
        if end is not None:
            futures.append(end())
        return [f for f in futures if f.done() and not f.cancelled() and f.exception() is not None]

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
                await self._confirm_sent(partition, txn)
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

