"""Where outputs go and when they count: the two delivery modes, behind one narrow interface.

Every output (flag, episode message, dead letter, state record) derives from one input partition and is
sent through `Outputs.send(partition, ...)` while that partition's `gate` is held.

- `AtLeastOnceOutputs`: one idempotent producer (when the broker can), plain consumer-group commits. An
  output counts once the broker acknowledged it; a crash before the commit re-sends (same window_id).
- `TransactionalOutputs`: exactly once. One transactional producer per owned input partition, its
  transactional id `<prefix>-<topic>-<partition>`: a new owner's InitProducerId fences the old owner (a
  zombie that resumes cannot write any more) and aborts its open transaction. Everything a partition's
  records produce between two checkpoints, its state records and its consumer offsets form one
  transaction: read_committed readers see all of it or nothing. An output counts once it is in the open
  transaction (the commit that moves the offsets carries it); any failure of the transaction is fatal for
  the worker, whose in-memory state then no longer matches what readers will see.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Hashable

from aiokafka import AIOKafkaProducer
from aiokafka.errors import IllegalOperation, KafkaError

from streamer.kafka.clients import retry_kafka
from streamer.logs import get_logger
from streamer.settings import KafkaSettings

log = get_logger("streamer.outputs")


class TransactionFailed(RuntimeError):
    """The partition's transaction cannot commit (fenced by a new owner, timed out, a refused write): the
    worker must stop; the next owner resumes from the last committed transaction."""


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


class AtLeastOnceOutputs:
    exactly_once = False

    def __init__(self, producer: AIOKafkaProducer):
        self.producer = producer

    @contextlib.asynccontextmanager
    async def gate(self, partition: Hashable) -> AsyncIterator[bool]:
        yield True

    async def send(self, partition: Hashable, topic: str, value: bytes, key: bytes | None = None,
                   headers=None, out_partition: int | None = None, timestamp_ms: int | None = None) -> asyncio.Future:
        """Enqueue one record; the future resolves when the broker acknowledged it."""
        return await self.producer.send(topic, value, key=key, headers=headers, partition=out_partition,
                                        timestamp_ms=timestamp_ms)

    async def send_acknowledged(self, partition: Hashable, topic: str, value: bytes, key: bytes | None = None,
                                headers=None, out_partition: int | None = None,
                                timestamp_ms: int | None = None) -> None:
        """One record, sent until the broker acknowledges it (retriable errors only; others are raised)."""
        async def attempt():
            await (await self.send(partition, topic, value, key=key, headers=headers, out_partition=out_partition,
                                   timestamp_ms=timestamp_ms))

        await retry_kafka(attempt, lambda exc, delay: log.warning(
            "publish_retry", topic=topic, error=repr(exc), retry_in_s=delay))

    async def open(self, partition: Hashable) -> None:
        pass

    async def close(self, partition: Hashable) -> None:
        pass

    async def stop(self) -> None:
        pass


class _Txn:
    def __init__(self, producer: AIOKafkaProducer):
        self.producer = producer
        self.lock = asyncio.Lock()
        self.has_writes = False  # anything in the open transaction (records or offsets)
        self.failed: BaseException | None = None


class TransactionalOutputs:
    exactly_once = True

    def __init__(self, k: KafkaSettings, make_producer):
        self.k = k
        self._make_producer = make_producer  # (transactional_id) -> AIOKafkaProducer
        self._txns: dict[Hashable, _Txn] = {}

    def transactional_id(self, partition) -> str:
        return f"{self.k.transactional_id_prefix}-{partition.topic}-{partition.partition}"

    async def open(self, partition) -> None:
        """Take the partition's transactional id (fencing any earlier owner, aborting its open transaction)
        and begin a transaction. Before the partition's states and offsets are read."""
        if partition in self._txns:
            return
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

    async def close(self, partition) -> None:
        """Drop the partition (after its last checkpoint): what its open transaction holds is aborted."""
        txn = self._txns.pop(partition, None)
        if txn is None:
            return
        async with txn.lock:
            if txn.failed is None and txn.has_writes:
                with contextlib.suppress(KafkaError, Exception):
                    await asyncio.wait_for(txn.producer.abort_transaction(), 10)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(txn.producer.stop(), 10)

    async def stop(self) -> None:
        for partition in list(self._txns):
            await self.close(partition)

    @contextlib.asynccontextmanager
    async def gate(self, partition) -> AsyncIterator[bool]:
        """Hold the partition's transaction open while outputs and the state changes they imply are made
        together; yields False when the partition is no longer owned (the outputs must be dropped)."""
        txn = self._txns.get(partition)
        if txn is None:
            yield False
            return
        async with txn.lock:
            if txn.failed is not None:
                raise TransactionFailed(f"{self.transactional_id(partition)}: {txn.failed!r}")
            yield self._txns.get(partition) is txn

    async def send(self, partition, topic: str, value: bytes, key: bytes | None = None, headers=None,
                   out_partition: int | None = None, timestamp_ms: int | None = None) -> asyncio.Future:
        """Enqueue one record into the partition's open transaction (call under `gate`)."""
        txn = self._txns[partition]
        try:
            fut = await txn.producer.send(topic, value, key=key, headers=headers, partition=out_partition,
                                          timestamp_ms=timestamp_ms)
        except (KafkaError, IllegalOperation) as exc:
            raise await self._failed(partition, txn, exc) from exc
        txn.has_writes = True
        return fut

    async def _failed(self, partition, txn: _Txn, exc: BaseException) -> TransactionFailed:
        """Mark the transaction failed, naming its own error: once a write was refused (e.g. an ACL), aiokafka
        only says "not in transaction" to later sends; committing raises the stored cause."""
        if isinstance(exc, IllegalOperation):
            try:
                await asyncio.wait_for(txn.producer.commit_transaction(), 5)
            except Exception as cause:  # noqa: BLE001 (the cause is what we are after)
                exc = cause
        txn.failed = exc
        return TransactionFailed(f"{self.transactional_id(partition)}: {exc!r}")

    async def commit(self, partition, group_id: str, prepare) -> int | None:
        """Commit the partition's open transaction and begin the next. `prepare()`, called under the gate so
        that no output slips between it and the commit, returns (consumer offset or None, records: (topic,
        key, value, out partition)); both join the transaction. Returns the committed offset (None if none
        or if the partition is no longer owned)."""
        from aiokafka.structs import OffsetAndMetadata

        txn = self._txns.get(partition)
        if txn is None:
            return None
        async with txn.lock:
            if txn.failed is not None:
                raise TransactionFailed(f"{self.transactional_id(partition)}: {txn.failed!r}")
            offset, records = prepare()
            try:
                for topic, key, value, out_partition in records:
                    await txn.producer.send(topic, value, key=key, partition=out_partition)
                    txn.has_writes = True
                if offset is not None:
                    await txn.producer.send_offsets_to_transaction(
                        {partition: OffsetAndMetadata(offset, "")}, group_id)
                    txn.has_writes = True
                if txn.has_writes:
                    await txn.producer.commit_transaction()
                    await txn.producer.begin_transaction()
                    txn.has_writes = False
            except (KafkaError, IllegalOperation) as exc:
                raise await self._failed(partition, txn, exc) from exc
        return offset


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

