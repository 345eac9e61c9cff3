"""Model-based test of exactly once with one transaction per worker (kafka.transactions = "per_worker",
KIP-447), in the style of test_delivery_model.py's per_partition model and on its rules.

The real ExactlyOnceGroupDelivery (delivery/exactly_once_group.py) runs under the real Publisher, Checkpointer
and PartitionOwnership (wired as runtime/assembly.py wires them: the ownership reads committed offsets
through `delivery.read_committed`, the delivery reads the group membership with kip447.group_metadata off
the consumer) against an in-memory log with Kafka's transactions and a group coordinator:
- one transactional id per worker (`<prefix>-worker-<worker id>`), an epoch per id: taking an id aborts what
  its previous holder left open and fences that holder (memory_kafka.MemoryGroupTxnProducer);
- one open transaction per worker spanning every partition it owns: records, states and the offsets of
  all of them become visible together at its commit, or never;
- the group coordinator's current generation and member: offsets sent with any other are refused
  (GroupFenced, the transaction abortable), as TxnOffsetCommit v3 is.
Invariants, besides the base model's (every window reported, no commit passing an unreported window,
episodes): committed flags hold each window exactly once; committed states never move a grid backwards;
`on_fenced` is told once per lost transaction (no partition twice), with every partition it cost; a
stale generation's commit (a zombie's) never becomes visible; each partition's per-partition transactional
id is taken before its offsets are read.
"""

from __future__ import annotations

import asyncio

import orjson
from aiokafka import TopicPartition
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import invariant, precondition, rule
from tests.budget import examples

from streamer.delivery.event_time import EventTime
from streamer.delivery.exactly_once_group import ExactlyOnceGroupDelivery
from streamer.kafka.kip447 import ILLEGAL_GENERATION, UNKNOWN_MEMBER_ID, GroupMetadata, group_metadata
from tests.model.memory_kafka import MemoryGroupConsumer, MemoryGroupTxnProducer
from tests.model.test_delivery_model import (K, PARTITIONS, Core, TransactionalDeliveryModel, TxnCore, TxnLog,
                                             _number)

GROUP = "g"  # the Checkpointer's group id in Core
KW = K.model_copy(update={"transactions": "per_worker"})
TOPICS = {K.flags_topic: "flags", K.episodes_topic: "episodes", K.state_topic: "states"}


def _input_partition(topic: str, key: bytes | None, value: bytes | None, partition: int | None) -> int:
    """The input partition a record of the worker's transaction belongs to: a state record's partition is its
    input partition's number; a flag's or an episode's patient `p<i>` is on partition i % PARTITIONS."""
    if topic == K.state_topic:
        return partition
    return int(orjson.loads(value)["patient_id"][1:]) % PARTITIONS


class GroupTxnLog(TxnLog):
    """The log with per-worker transactions and a group coordinator: `ids` holds each transactional id's
    epoch (taken by InitProducerId, bumped by the brokers when they abort a transaction that timed out),
    `generation`/`member` the group's current round. `commit_worker` makes one worker transaction visible:
    its records of every partition, its states and its offsets together."""

    def __init__(self, records):
        super().__init__(records)
        self.ids: dict[str, int] = {}
        self.generation = 0
        self.member: str | None = None
        self.members = 0
        self.next_worker = "w0"  # the worker id the next worker process starts with (kafka.worker_id)
        self.metadata: dict[int, str] = {}  # each committed offset's metadata (the prefix it was made with)
        self.commits = 0
        # the partitions whose per-partition id was taken since their offsets were last read
        self.fenced_before_read: set[int] = set()

    def take_id(self, transactional_id: str) -> int:
        self.ids[transactional_id] = self.ids.get(transactional_id, 0) + 1
        head, _, number = transactional_id.rpartition("-")
        if head == f"{K.transactional_id_prefix}-in":
            self.fenced_before_read.add(int(number))
        return self.ids[transactional_id]

    def new_member(self) -> str:
        self.members += 1
        return f"m{self.members}"

    def join(self, member: str) -> int:
        """A rebalance (eager: every member rejoins): `member` is the group's one member, in a new generation."""
        self.generation += 1
        self.member = member
        return self.generation

    def refuses(self, group: GroupMetadata) -> int | None:
        """The coordinator's check of TxnOffsetCommit v3: the error code, or None when it accepts."""
        if group.group_id != GROUP or group.member_id != self.member:
            return UNKNOWN_MEMBER_ID
        if group.generation_id != self.generation:
            return ILLEGAL_GENERATION
        return None

    def commit_worker(self, transactional_id: str, epoch: int, txn: dict) -> None:
        assert self.ids[transactional_id] == epoch, "a fenced producer committed"
        assert not txn["refused"], "a transaction committed over a record the broker refused"
        assert txn["group_fenced"] is None, "a transaction committed over offsets the coordinator refused"
        for p, where, (key, value) in txn["records"]:
            if where != "states":
                getattr(self, where).append(orjson.loads(value))
            elif value is None:
                self.changelog[p].pop(key, None)
            else:
                self.changelog[p][key] = value
                self.state_history.append((key, value))
        for p, (offset, metadata) in txn["offsets"].items():
            self.committed[p] = offset
            self.metadata[p] = metadata
        self.commits += 1

    def visible(self) -> tuple:
        """What readers can see: compare before and after a step that must commit nothing."""
        return (self.commits, len(self.flags), len(self.episodes), dict(self.committed), len(self.state_history))


class GroupTxnCore(TxnCore):
    """The worker with the real ExactlyOnceGroupDelivery as runtime/startup.py builds it (a Kip447 producer
    per worker id, plain producers to fence per-partition ids, `group_member` reading the consumer's
    membership, `on_fenced` told the partitions of a lost transaction), started at once as startup does
    (taking the worker's id fences a previous holder of it). The consumer joins the group when the worker
    starts and at each rebalance, which are eager: every partition revoked, a new generation, every partition
    assigned. `on_fenced` does what FenceWatch.together does (each partition closed dirty), and records the
    call: the model rejoins for it."""

    def __init__(self, log: GroupTxnLog, loop: asyncio.AbstractEventLoop):
        self.worker = log.next_worker
        self.member_id = log.new_member()
        self.worker_producer: MemoryGroupTxnProducer | None = None  # the latest producer of the worker's id
        self.fences: list[list[int]] = []  # each on_fenced call, since the last rejoin
        self.failing = False  # what PartitionOwnership.failed() answers
        Core.__init__(self, log, loop)  # not TxnCore's: no producer per partition
        self.fenced = False
        self.stopped = False
        self.consumer = MemoryGroupConsumer(log.committed, _number, GROUP, self.member_id)
        self.checkpointer.consumer = self.ownership.consumer = self.consumer
        self.ownership.read_committed = self.delivery.read_committed  # as assembly.py wires it
        self.ownership.failed = lambda: self.failing
        self.run(self.delivery.start())
        self.join()

    def _make_delivery(self):
        k = KW.model_copy(update={"worker_id": self.worker})
        return ExactlyOnceGroupDelivery(k, self._group_producer, lambda: group_metadata(self.consumer),
                                        event_time=EventTime(owned=self.partitions),
                                        on_fenced=self._on_fenced_together, read_stable=self._read_stable)

    def _group_producer(self, transactional_id: str, kip447: bool) -> MemoryGroupTxnProducer:
        producer = MemoryGroupTxnProducer(self.log, transactional_id, kip447, TOPICS, _input_partition)
        if kip447:
            assert transactional_id == f"{K.transactional_id_prefix}-worker-{self.worker}", transactional_id
            self.worker_producer = producer
        else:
            assert transactional_id.startswith(f"{K.transactional_id_prefix}-in-"), transactional_id
        return producer

    async def _read_stable(self, consumer, partitions, timeout_s: float) -> dict:
        """OffsetFetch v7 require_stable over the log: nothing holding the group's offsets is left open
        across steps here, so the committed offsets are stable at once."""
        found = {}
        for tp in partitions:
            assert tp.partition in self.log.fenced_before_read, \
                f"{tp}: offsets read before its per-partition transactional id was taken"
            self.log.fenced_before_read.discard(tp.partition)
            found[tp] = (self.log.committed.get(tp.partition), self.log.metadata.get(tp.partition))
        return found

    def _on_fenced_together(self, tps) -> None:
        self.fences.append(sorted(_number(tp) for tp in tps))
        for tp in tps:
            self.partitions.close_dirty(tp)
        self.fenced = True

    def join(self) -> None:
        self.consumer.joined(self.log.join(self.member_id))

    def assign(self, p: int) -> None:
        super().assign(p)
        committed = self.log.committed.get(p)
        if committed is not None:
            assert self.consumer.sought.get(TopicPartition("in", p)) == committed, "not sought to the commit"

    def revoke_all(self, undrained: int | None = None) -> None:
        """Eager: every partition held (mine or fenced) revoked in one go, what is in flight published first
        (as on_revoked waits for it) but `undrained`'s windows (the revocation's wait ran out)."""
        held = self.owned()
        for p in held:
            if p != undrained:
                self.publish(len(self.pending), only=p)
        self.run(self.ownership.revoke({TopicPartition("in", p) for p in held}))
        for p in held:
            assert self.partitions.held(TopicPartition("in", p)) is None
            self.position.pop(p, None)

    def rejoin(self, undrained: int | None = None) -> None:
        """What `on_fenced` asks for, and any rebalance: revoke everything, join the next generation, take
        every partition back (a fenced producer is replaced at the first assignment)."""
        self.revoke_all(undrained=undrained)
        self.join()
        for p in range(PARTITIONS):
            self.assign(p)
        self.fenced, self.fences = False, []

    def refuse_next(self, p: int) -> None:
        self.worker_producer.refuse = True


class GroupTransactionalDeliveryModel(TransactionalDeliveryModel):
    """TransactionalDeliveryModel on one transaction per worker. The rules whose meaning carries over run
    unchanged (deliver, publish, checkpoint, crash, clocks, evictions, offsets reset, zombie_acts' core);
    those built on a transaction per partition are adapted, each saying how."""

    log_class, core_class = GroupTxnLog, GroupTxnCore

    def _with_writes(self, n: int, only: int | None = None) -> None:
        """The next n records of each owned partition (or of `only`) read and every pending window published:
        the open transaction holds writes for the rule that follows (a rule left to wait for them would
        mostly find a transaction just committed or a worker just restarted)."""
        for p in self.core.owned():
            if only is None or p == only:
                self.core.poll(p, n)
        self.core.publish(len(self.core.pending), only=only)

    @invariant()
    def fenced_told_once(self):
        """Each lost transaction tells `on_fenced` once, with every partition it cost: none twice."""
        for core in (getattr(self, "core", None), getattr(self, "zombie", None)):
            if core is not None:
                told = [p for call in core.fences for p in call]
                assert all(core.fences) and len(told) == len(set(told)), f"on_fenced told {core.fences}"

    @rule(p=st.integers(0, PARTITIONS - 1), new_owner=st.booleans())
    def revoke_and_reassign(self, p, new_owner):
        """Adapted: rebalances are eager (per_worker commits one generation per transaction, exactly_once_
        group.py): every partition is revoked, each checkpointed first, then the group's next generation
        assigns them all to this worker again or (new_owner) to a worker that never saw them. `p` is kept
        for the base rule's shape."""
        self.core.revoke_all()
        self._check_commits({q: self.log.committed.get(q, 0) for q in range(PARTITIONS)})
        if new_owner:
            self.restart()
        else:
            self.core.join()
            for q in range(PARTITIONS):
                self.core.assign(q)

    @rule(p=st.integers(0, PARTITIONS - 1))
    def revoke_before_drained_and_get_back(self, p):
        """Adapted (eager): p's windows are still in inference when the revocation's wait runs out, every
        partition is revoked and comes back in the next generation; p's old windows are acknowledged later:
        they must not release the new holds nor join the new transaction as p's."""
        self.core.rejoin(undrained=p)
        self._check_commits({q: self.log.committed.get(q, 0) for q in range(PARTITIONS)})

    @rule(n=st.integers(5, 40))
    def a_record_is_refused(self, n):
        """Adapted: the broker refuses one record of the worker's one transaction (any partition's): the
        checkpoint aborts it (nothing of any partition visible, no offset moved) and the worker stops; the
        next one redoes every partition from its last commit."""
        core = self.core
        if not core.owned() or core.worker_producer is None:
            return
        self._with_writes(n)  # flags join the transaction; their states change
        producer, before = core.worker_producer, self.log.visible()
        refused, aborted = producer.refused, producer.aborted
        producer.refuse = True
        core.checkpoint()  # the changed states join the transaction: the first of them is refused
        if producer.refused == refused:
            producer.refuse = False  # nothing was sent: nothing to refuse
            return
        assert core.stopped, "a transaction was committed over a refused record"
        assert producer.aborted > aborted and producer.txn is None, "the refused transaction was not aborted"
        assert self.log.visible() == before, "a refused transaction became visible"
        self.crash()

    @rule(n=st.integers(5, 40))
    def transaction_times_out(self, n):
        """Adapted: the worker's commit is held past kafka.transaction_timeout_ms (a broker failover): the
        brokers abort its transaction with a newer epoch of the worker's id. The next checkpoint is fenced:
        every partition is lost at once, `on_fenced` told once with all of them, nothing of the transaction
        visible; the worker rejoins and takes them back with a new producer of its id."""
        core = self.core
        self._with_writes(n)
        producer = core.worker_producer
        if producer is None or not producer.has_writes():
            return  # an empty transaction is not ongoing at the coordinator: nothing times out
        owned, before = core.owned(), self.log.visible()
        self.log.take_id(producer.transactional_id)
        core.checkpoint()
        assert core.fences == [owned], f"on_fenced told {core.fences}, the worker owned {owned}"
        assert not core.stopped, "a fence of the worker's id stopped the worker"
        assert self.log.visible() == before, "a timed-out transaction became visible"
        core.rejoin()
        assert core.worker_producer is not producer, "the fenced producer was kept"

    @rule(p=st.integers(0, PARTITIONS - 1), others_too=st.booleans(), n=st.integers(5, 40))
    def revoked_with_uncommitted_writes(self, p, others_too, n):
        """New: p leaves with writes in the open transaction and no checkpoint first (PartitionOwnership
        skips the revocation's checkpoint once the worker has failed). Its close aborts the transaction:
        exactly the other partitions with writes in it are lost (`on_fenced` once, with them), those
        without go on in a new transaction; nothing of it is visible. Then the worker rejoins."""
        core = self.core
        producer = core.worker_producer
        if p not in core.owned() or producer is None:
            return
        self._with_writes(n, only=None if others_too else p)
        if p not in producer.partitions_with_writes():
            return
        others = sorted(producer.partitions_with_writes() - {p})
        before = self.log.visible()
        core.failing = True
        core.run(core.ownership.revoke({TopicPartition("in", p)}))
        core.position.pop(p, None)
        core.failing = False
        assert self.log.visible() == before, "an aborted transaction became visible"
        assert producer.txn is None or not producer.has_writes(), "the open transaction kept p's writes"
        assert core.fences == ([others] if others else []), f"on_fenced told {core.fences}, lost {others}"
        core.rejoin()
        self._check_commits({q: self.log.committed.get(q, 0) for q in range(PARTITIONS)})

    @rule(deadline_exceeded=st.booleans(), turns=st.integers(0, 6), n=st.integers(0, 40))
    def stop_while_committing(self, deadline_exceeded, turns, n):
        """Adapted: SIGTERM while the worker's commit is on the wire. Within the deadline (Worker._shutdown)
        the commit is awaited, the final checkpoint made, then delivery.stop, and the next worker starts from
        what both committed. Past it, delivery.stop comes `turns` loop turns into the commit (every producer
        call one turn on the wire) and waits for it (its lock) before it aborts and closes, and the process
        exits: the transaction is visible whole or not at all, and the commit is never broken midway."""
        core = self.core
        self._with_writes(n)
        producer = core.worker_producer
        if not deadline_exceeded or producer is None:
            core.checkpoint()
            core.checkpoint()
            assert not core.fenced and not core.stopped
            core.run(core.delivery.stop(1.0))
            self.restart()
            return
        before = self.log.visible()
        producer.in_flight = True
        commit = self.loop.create_task(core.checkpointer.checkpoint({TopicPartition("in", p) for p in core.owned()}))
        for _ in range(turns):
            self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.run_until_complete(core.delivery.stop(1.0))
        [outcome] = self.loop.run_until_complete(asyncio.gather(commit, return_exceptions=True))
        # stop waits for the commit on the wire (as per_partition's close does): the commit never finds its
        # partitions or its producer taken from under it
        assert not isinstance(outcome, (AttributeError, KeyError, TypeError)), f"stop broke the commit: {outcome!r}"
        assert self.log.commits - before[0] <= 1, "a stopped worker committed twice"
        self.crash()

    @rule(same_id=st.booleans())
    def zombie_takeover(self, same_id):
        """Adapted: the owner stalls past its session timeout; a new worker joins (the group's next
        generation) and takes every partition; the old one resumes later (zombie_acts) believing it still
        owns them. The new worker has the zombie's id (same_id: a restarted pod, whose InitProducerId
        fences the zombie's producer) or another (another pod: only the generation fences the zombie)."""
        self.zombie = self.core
        self.log.next_worker = self.core.worker if same_id else f"w{self.log.members + 1}"
        self.restart()

    @precondition(lambda self: getattr(self, "zombie", None) is not None)
    @rule(p=st.integers(0, PARTITIONS - 1), n=st.integers(1, 20))
    def zombie_acts(self, p, n):
        """The base rule (nothing of the zombie visible), and: once refused (its offsets by the group
        coordinator, or anything by the brokers for its id's stale epoch), the zombie has lost every partition
        it owned, `on_fenced` told once with all of them; until then, it holds no writes."""
        z = self.zombie
        owned = z.owned() if not z.fenced else []
        producer = z.worker_producer
        refused = producer.generation_refused if producer is not None else 0
        super().zombie_acts(p, n)
        if owned and (z.fenced or (producer is not None and producer.generation_refused > refused)):
            assert z.fences == [owned], f"the zombie was told {z.fences}, it owned {owned}"
        elif owned:
            assert z.worker_producer is None or not z.worker_producer.has_writes(), \
                "the zombie's checkpoint was not refused, yet it holds writes"


TestGroupTransactionalDeliveryModel = GroupTransactionalDeliveryModel.TestCase
TestGroupTransactionalDeliveryModel.settings = settings(
    max_examples=examples(100), stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
