"""In-memory stand-ins for the Kafka clients the worker's glue talks to, over a model's log.

What the real parts await (AtLeastOnceDelivery: `producer.send`; ExactlyOnceDelivery: a transactional
producer per partition; Checkpointer through the delivery: `consumer.commit`; the restore:
`committed_offsets(consumer, ...)`, `read_states` and `read_episode_seqs` over a group-less reader) is
answered from plain Python structures that a hypothesis model owns, so the models drive the real
Publisher, delivery, ownership and checkpoint instead of a copy of their glue. Nothing here decides what
the worker does: each fake only stores or returns records, in Kafka's shapes.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Callable

import orjson
from aiokafka.errors import KafkaConnectionError, ProducerFenced, RecordTooLargeError


class Killed(Exception):
    """The process was killed (kill -9) while sending: nothing after this send happens."""


class MemoryProducer:
    """aiokafka's `producer.send` as AtLeastOnceDelivery uses it: the record lands through `land(topic, key,
    value, partition)` and its future is resolved at once. `fail` names topics whose sends fail (a
    retriable KafkaError on the future, as a broker's timeout); `kill_at` a topic whose first send kills the
    process (raises Killed, then every later send does too)."""

    def __init__(self, land: Callable[[str, bytes | None, bytes | None, int | None], None]):
        self.land = land
        self.fail: set[str] = set()
        self.kill_at: str | None = None
        self.killed = False
        self.failed = 0  # sends failed so far

    async def send(self, topic, value, key=None, headers=None, partition=None, timestamp_ms=None):
        if self.killed or topic == self.kill_at:
            self.killed = True
            raise Killed(topic)
        fut = asyncio.get_running_loop().create_future()
        if topic in self.fail:
            self.failed += 1
            fut.set_exception(KafkaConnectionError(f"{topic}: injected failure"))
        else:
            self.land(topic, key, value, partition)
            fut.set_result(None)
        return fut


class MemoryTxnProducer:
    """aiokafka's transactional producer as ExactlyOnceDelivery drives it, over a log with transactions
    (`fence(p)` -> a newer epoch of p's transactional id, `commit(p, epoch, txn)` -> False when fenced):
    - start() is InitProducerId: this producer takes the next epoch of its id, which aborts the previous
      holder's open transaction and fences its later commits;
    - records and the consumer offset join the open transaction; nothing is visible before
      commit_transaction, which raises ProducerFenced when a newer epoch exists (the transaction aborted);
    - `refuse`: the next record's delivery fails as a broker refusal (RecordTooLarge), as a topic with a
      smaller max.message.bytes would; `topics` tells which key of the open transaction a topic fills."""

    def __init__(self, log, partition: int, topics: dict[str, str]):
        self.log, self.p, self.topics = log, partition, topics
        self.epoch: int | None = None
        self.txn: dict | None = None
        self.refuse = False
        self.refused = 0  # records refused so far

    def has_writes(self) -> bool:
        """Whether the open transaction holds records (only such a transaction is ongoing at the
        coordinator, so only it can time out)."""
        return self.txn is not None and any(self.txn[k] for k in ("flags", "episodes", "states"))

    async def start(self) -> None:
        self.epoch = self.log.fence(self.p)

    async def stop(self) -> None:
        self.txn = None

    async def begin_transaction(self) -> None:
        self.txn = {"flags": [], "episodes": [], "states": {}, "offset": None}

    async def send(self, topic, value, key=None, headers=None, partition=None, timestamp_ms=None):
        fut = asyncio.get_running_loop().create_future()
        if self.refuse:
            self.refuse, self.refused = False, self.refused + 1
            self.txn["refused"] = True
            fut.set_exception(RecordTooLargeError(f"{topic}: injected refusal"))
            return fut
        where = self.topics[topic]
        if where == "states":
            self.txn["states"][key] = value
        else:
            self.txn[where].append(orjson.loads(value))
        fut.set_result(None)
        return fut

    async def send_offsets_to_transaction(self, offsets: dict, group_id: str) -> None:
        for _, meta in offsets.items():
            self.txn["offset"] = meta.offset

    async def commit_transaction(self) -> None:
        txn, self.txn = self.txn, None
        if not self.log.commit(self.p, self.epoch, txn):
            raise ProducerFenced()

    async def abort_transaction(self) -> None:
        self.txn = {"flags": [], "episodes": [], "states": {}, "offset": None}


class MemoryConsumer:
    """The group consumer's side the worker uses: `commit(offsets)` (the checkpoint) and the group
    coordinator's `fetch_committed_offsets` that streamer.kafka.clients.committed_offsets awaits."""

    def __init__(self, committed: dict, number: Callable[[object], int]):
        self.committed = committed  # the model's committed offsets, by partition number
        self.number = number
        self.last: dict = {}  # the offsets of the latest commit
        self._coordinator = SimpleNamespace(fetch_committed_offsets=self._fetch)

    async def commit(self, offsets: dict) -> None:
        for tp, offset in offsets.items():
            self.committed[self.number(tp)] = offset
        self.last = dict(offsets)

    async def _fetch(self, partitions: list) -> dict:
        out = {}
        for tp in partitions:
            offset = self.committed.get(self.number(tp))
            if offset is not None:
                out[tp] = SimpleNamespace(offset=offset, metadata="")
        return out


class MemoryReader:
    """A read_committed consumer without a group, as streamer.state.changelog.read_to_end drives it:
    `records(topic, partition)` gives the records in the log now (the high watermark is their count)."""

    def __init__(self, records: Callable[[str, int], list[tuple[bytes | None, bytes | None]]]):
        self.records = records
        self._positions: dict = {}
        self._logs: dict = {}

    def assign(self, sources) -> None:
        self._positions = {tp: 0 for tp in sources}
        self._logs = {tp: [SimpleNamespace(topic=tp.topic, partition=tp.partition, offset=i, key=k, value=v,
                                           timestamp=None)
                           for i, (k, v) in enumerate(self.records(tp.topic, tp.partition))] for tp in sources}

    async def seek_to_beginning(self, *sources) -> None:
        for tp in sources:
            self._positions[tp] = 0

    async def getmany(self, *sources, timeout_ms: int = 0) -> dict:
        out = {}
        for tp in sources:
            batch = self._logs[tp][self._positions[tp]:]
            if batch:
                out[tp] = batch
                self._positions[tp] += len(batch)
        return out

    def highwater(self, tp) -> int:
        return len(self._logs[tp])

    def last_stable_offset(self, tp) -> int:
        return len(self._logs[tp])

    async def position(self, tp) -> int:
        return self._positions[tp]
