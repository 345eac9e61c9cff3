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
from aiokafka.errors import IllegalOperation


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


class MemoryGroupConsumer(MemoryConsumer):
    """The group consumer as kafka.transactions = per_worker reads it: its membership where aiokafka keeps it
    (`_coordinator.group_id/generation/member_id/_group_instance_id`, what kip447.group_metadata reads) and
    `seek`, where read_committed puts it after the stable read (`sought`: the latest seek per partition)."""

    def __init__(self, committed: dict, number: Callable[[object], int], group_id: str, member_id: str):
        super().__init__(committed, number)
        self._coordinator.group_id = group_id
        self._coordinator.member_id = member_id
        self._coordinator.generation = -1  # not in the group until it joins
        self._coordinator._group_instance_id = None
        self.sought: dict = {}

    def joined(self, generation: int) -> None:
        """The group coordinator assigned this member `generation` (a JoinGroup/SyncGroup round)."""
        self._coordinator.generation = generation

    def seek(self, tp, offset: int) -> None:
        self.sought[tp] = offset


class MemoryGroupTxnProducer:
    """A Kip447Producer (or, `kip447` False, a plain transactional one: only started and stopped, to fence
    its id) as ExactlyOnceGroupDelivery drives it, over a log with one transaction per worker:
    - start() is InitProducerId: `log.take_id(id)` gives the id's next epoch, which aborts what the previous
      holder left open and fences it: every later call of that holder fails with ProducerFenced (a send's
      future, or the call itself), as the brokers answer a stale epoch;
    - records of every partition and the offsets join the one open transaction; nothing is visible before
      commit_transaction, which hands it to `log.commit_worker(id, epoch, txn)`;
    - send_offsets_to_transaction(offsets, GroupMetadata) asks `log.refuses(member)` (the group coordinator's
      generation check, TxnOffsetCommit v3): a stale generation raises GroupFenced and leaves the transaction
      in the abortable state (commit raises it again; only abort_transaction ends it);
    - `refuse`: the next record's delivery fails as a broker refusal (RecordTooLarge), and the transaction
      cannot commit over it;
    - `in_flight`: each call yields to the loop once before it acts (an EndTxn on the wire), so a stop can
      come in between; an abort while the commit is on its way is refused (IllegalOperation), as aiokafka does.
    `topics` tells which part of the transaction a topic fills; `partition_of(topic, key, value, partition)`
    names the input partition a record belongs to (what the log checks each commit against)."""

    def __init__(self, log, transactional_id: str, kip447: bool, topics: dict[str, str],
                 partition_of: Callable[[str, bytes | None, bytes | None, int | None], int]):
        self.log, self.transactional_id, self.kip447 = log, transactional_id, kip447
        self.topics, self.partition_of = topics, partition_of
        self.epoch: int | None = None
        self.txn: dict | None = None
        self.committing = False
        self.refuse = False
        self.refused = 0  # records refused so far
        self.aborted = 0  # transactions aborted so far
        self.generation_refused = 0  # offsets the group coordinator refused so far (GroupFenced)
        self.in_flight = False
        self.stopped = False

    def fenced(self) -> bool:
        return self.epoch is not None and self.log.ids[self.transactional_id] != self.epoch

    def has_writes(self) -> bool:
        """Whether the open transaction holds records (only such a transaction is ongoing at the coordinator,
        so only it can time out)."""
        return self.txn is not None and bool(self.txn["records"])

    def partitions_with_writes(self) -> set[int]:
        return set() if self.txn is None else {p for p, _, _ in self.txn["records"]}

    async def _step(self) -> None:
        if self.in_flight:
            await asyncio.sleep(0)

    def _check(self) -> None:
        if self.fenced():
            raise ProducerFenced()
        if self.txn is None:
            raise IllegalOperation("No transaction in progress")

    async def start(self) -> None:
        self.epoch = self.log.take_id(self.transactional_id)

    async def stop(self) -> None:
        self.stopped = True  # an open transaction stays open: the next InitProducerId or the timeout ends it

    async def begin_transaction(self) -> None:
        if self.fenced():
            raise ProducerFenced()
        if self.txn is not None:
            raise IllegalOperation("a transaction is already in progress")
        self.txn = {"records": [], "offsets": {}, "refused": False, "group_fenced": None}

    async def send(self, topic, value, key=None, headers=None, partition=None, timestamp_ms=None):
        if self.txn is None:
            raise IllegalOperation("Can't send messages while not in transaction")
        fut = asyncio.get_running_loop().create_future()
        if self.fenced():  # the brokers answer the record's batch with the stale epoch
            fut.set_exception(ProducerFenced())
        elif self.refuse:
            self.refuse, self.refused = False, self.refused + 1
            self.txn["refused"] = True
            fut.set_exception(RecordTooLargeError(f"{topic}: injected refusal"))
        else:
            self.txn["records"].append((self.partition_of(topic, key, value, partition), self.topics[topic],
                                        (key, value)))
            fut.set_result(None)
        return fut

    async def send_offsets_to_transaction(self, offsets: dict, group_metadata) -> None:
        from streamer.kafka.kip447 import GroupFenced, GroupMetadata

        if not isinstance(group_metadata, GroupMetadata):
            raise TypeError("send_offsets_to_transaction needs GroupMetadata")
        await self._step()
        self._check()
        code = self.log.refuses(group_metadata)
        if code is not None:
            self.generation_refused += 1
            self.txn["group_fenced"] = GroupFenced(code, group_metadata)
            raise self.txn["group_fenced"]
        for tp, meta in offsets.items():
            self.txn["offsets"][tp.partition] = (meta.offset, meta.metadata)

    async def commit_transaction(self) -> None:
        self._check()
        txn = self.txn
        if txn["group_fenced"] is not None:
            raise txn["group_fenced"]  # abortable: only an abort ends it
        if txn["refused"]:
            raise RecordTooLargeError("a record of the transaction was refused")
        self.committing = True
        try:
            await self._step()
            if self.fenced():
                raise ProducerFenced()
            self.log.commit_worker(self.transactional_id, self.epoch, txn)
            self.txn = None
        finally:
            self.committing = False

    async def abort_transaction(self) -> None:
        await self._step()
        if self.committing:
            raise IllegalOperation("the transaction is committing")
        self._check()
        self.txn = None
        self.aborted += 1
