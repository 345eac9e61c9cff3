"""The runtime's parts without a Worker (streamer/runtime/): startup's choices, partition ownership's
revocation, the once-a-second upkeep and backpressure, each with real ledgers, stages and stores."""

from __future__ import annotations

import asyncio
import time

from aiokafka import TopicPartition

from streamer.checkpointing import OffsetsLedger
from streamer.delivery.event_time import EventTime
from streamer.delivery import AtLeastOnceDelivery, ExactlyOnceDelivery
from streamer.checkpointing.schedule import CheckpointSchedule
from streamer.metrics import Metrics
from streamer.ingest.producer import chunks_of
from streamer.offline.recordings import regular_times
from streamer.partitions import OwnedPartition, OwnedPartitions
from streamer.runtime.ownership import PartitionOwnership
from streamer.runtime.startup import choose_delivery
from streamer.runtime.upkeep import Backpressure, Upkeep
from streamer.settings import KafkaSettings, Settings, WindowSettings
from streamer.synthetic import generate
from streamer.state.store import StateStore
from streamer.windows.stage import WindowStage

TP0, TP1 = TopicPartition("ecg", 0), TopicPartition("ecg", 1)


class _Consumer:
    def __init__(self, assignment=(), high=None, polled_ms=None):
        self._assignment, self.paused_tps = set(assignment), set()
        self.high, self.polled_ms = high or {}, polled_ms or {}

    def assignment(self):
        return self._assignment

    def pause(self, *tps):
        self.paused_tps |= set(tps)

    def resume(self, *tps):
        self.paused_tps -= set(tps)

    def highwater(self, tp):
        return self.high.get(tp)

    def last_poll_timestamp(self, tp):
        return self.polled_ms.get(tp)


def test_at_least_once_is_chosen_without_a_probe_and_brings_its_one_producer():
    async def main():
        k = KafkaSettings(bootstrap_servers="127.0.0.1:1", delivery="at_least_once")
        delivery, producer = await choose_delivery(k, EventTime(), None, on_fenced=None)
        assert isinstance(delivery, AtLeastOnceDelivery) and delivery.producer is producer
        assert not isinstance(delivery, ExactlyOnceDelivery)
        await producer.stop()  # never started: nothing to flush

    asyncio.run(main())


def test_revocation_checkpoints_then_drops_the_partition_unless_the_worker_failed():
    async def main(failed: bool):
        s = Settings()
        partitions = OwnedPartitions()
        ledger, store, metrics = OffsetsLedger(partitions), StateStore(owned=partitions), Metrics()
        stage = WindowStage(s.windows, store)
        closed = []
        for tp in (TP0, TP1):
            partitions.open(tp, 10).on_close(lambda tp=tp: closed.append(tp))
            ledger.consumed(tp, 10)
        revoked = partitions.get(TP1)
        checkpoints: list[set] = []

        async def checkpoint(partitions):
            checkpoints.append(set(partitions))

        own = PartitionOwnership(kafka=s.kafka, partitions=partitions, stage=stage, store=store,
                                 event_time=EventTime(), metrics=metrics, settled=asyncio.Event(),
                                 delivery=AtLeastOnceDelivery(producer=None), consumer=None, state_reader=None,
                                 dead_letters=None, publisher=None, routing=None, checkpoint=checkpoint,
                                 failed=lambda: failed)
        await own.revoke({TP1})
        return set(partitions), checkpoints, ledger, revoked, closed

    held, checkpoints, ledger, revoked, closed = asyncio.run(main(failed=False))
    assert held == {TP0} and checkpoints == [{TP1}] and closed == [TP1]
    assert ledger.in_flight(TP1) == 0 and not revoked.mine  # one close: every part released, "mine" no more
    held, checkpoints, _, revoked, closed = asyncio.run(main(failed=True))
    assert held == {TP0} and checkpoints == [] and closed == [TP1]  # a failed worker commits nothing more


def test_backpressure_pauses_the_whole_assignment_and_resumes_at_half():
    ledger, metrics = OffsetsLedger(), Metrics()
    ledger.start_partition(TP0, None)
    bp = Backpressure(4, ledger, metrics)
    consumer = _Consumer({TP0, TP1})
    holds = [ledger.hold(TP0, i) for i in range(5)]
    assert bp.apply(consumer) and consumer.paused_tps == {TP0, TP1}
    ledger.release(holds[0])
    ledger.release(holds[1])
    assert bp.apply(consumer) and consumer.paused_tps == {TP0, TP1}  # 3 in flight: above half the limit
    ledger.release(holds[2])
    assert not bp.apply(consumer) and consumer.paused_tps == set()  # 2: at half, fetching resumes


def test_only_partitions_read_to_their_end_count_as_silent():
    import time

    s = Settings()
    ledger, store = OffsetsLedger(), StateStore()
    now_ms = time.time() * 1000
    for tp in (TP0, TP1):
        ledger.start_partition(tp, 0)
        for off in range(5):
            ledger.consumed(tp, off)
    consumer = _Consumer(high={TP0: 5, TP1: 9}, polled_ms={TP0: now_ms, TP1: now_ms})
    paused = [False]
    upkeep = Upkeep(s, {TP0, TP1}, WindowStage(s.windows, store), ledger, store, Metrics(), consumer,
                    publisher=None, dead_letters=None, submit=lambda w: None, paused=lambda: paused[0])
    assert upkeep.caught_up() == [TP0]  # TP1 has 4 records unread: its beds' silence is not theirs
    paused[0] = True
    assert upkeep.caught_up() == []  # paused fetching says nothing about the beds


def test_checkpoint_schedule_commits_flagged_partitions_at_once_and_every_partition_each_period():
    """Without a Worker: flags in open transactions get their partitions checkpointed at once (only those
    owned), every owned partition is checkpointed when the period is due, and shutdown ends the schedule."""
    class Clock:
        t = 0.0

        def __call__(self) -> float:
            return self.t

    async def main():
        clock, ending, flagged = Clock(), asyncio.Event(), asyncio.Event()
        pending: set = set()

        def take() -> set:
            taken = set(pending)
            pending.clear()
            flagged.clear()
            return taken

        schedule = CheckpointSchedule(3600.0, ending, flagged, take, clock=clock)
        pending.update({"p1", "p9"})
        flagged.set()
        assert await schedule.next({"p0", "p1"}) == {"p1"}  # p9 is no longer owned
        clock.t = 3600.0  # the period is due: the next call does not wait
        assert await schedule.next({"p0", "p1"}) == {"p0", "p1"}
        waiting = asyncio.ensure_future(schedule.next({"p0"}))
        await asyncio.sleep(0)
        assert not waiting.done(), "nothing flagged and the period not due: it waits"
        ending.set()
        assert await waiting is None
        assert await schedule.next({"p0"}) is None

        periodic = CheckpointSchedule(0.0, asyncio.Event())  # at least once: periodic only
        assert await periodic.next({"p0"}) == {"p0"}

    asyncio.run(main())


def test_the_period_leaves_out_partitions_checkpointed_for_flags_in_its_last_half():
    """Under load flags commit every partition several times a period: the periodic checkpoint takes only
    those no checkpoint took for half a period, so each is still taken at least every 1.5 periods."""
    class Clock:
        t = 0.0

        def __call__(self):
            return self.t

    async def main():
        clock, flagged, pending = Clock(), asyncio.Event(), set()

        def take() -> set:
            taken = set(pending)
            pending.clear()
            flagged.clear()
            return taken

        schedule = CheckpointSchedule(1.0, asyncio.Event(), flagged, take, clock=clock)
        owned = {"p0", "p1", "p2"}
        clock.t = 0.7
        pending.add("p1")
        flagged.set()
        assert await schedule.next(owned) == {"p1"}
        clock.t = 1.0  # the period: p1 was taken 0.3 s ago
        pending.add("p2")
        flagged.set()
        assert await schedule.next(owned) == {"p0", "p2"}, "flags are never left out; p1 is"
        clock.t = 2.0  # p1 last taken 1.3 s ago: due
        assert await schedule.next(owned) == owned
        clock.t = 2.4
        pending.add("p0")
        flagged.set()
        assert await schedule.next(owned) == {"p0"}
        clock.t = 3.0  # p0 was taken 0.6 s ago, over half a period: taken again
        assert await schedule.next(owned) == owned

    asyncio.run(main())


def test_checkpoints_for_flags_are_spaced_and_the_end_cuts_the_spacing_short():
    """kafka.flag_commit_spacing_ms: a checkpoint for flags waits until that long after the previous one
    began (more flags per transaction); the period is never delayed; shutdown ends the wait at once."""
    async def main():
        ending, flagged = asyncio.Event(), asyncio.Event()

        def take() -> set:
            flagged.clear()
            return {"p0"}

        schedule = CheckpointSchedule(3600.0, ending, flagged, take, spacing_s=0.3)
        flagged.set()
        t0 = time.monotonic()
        assert await schedule.next({"p0"}) == {"p0"}  # the first one: nothing to space it from
        flagged.set()
        assert await schedule.next({"p0"}) == {"p0"}
        assert time.monotonic() - t0 >= 0.3, "a second checkpoint for flags came before the spacing"
        flagged.set()
        waiting = asyncio.ensure_future(schedule.next({"p0"}))
        await asyncio.wait({waiting}, timeout=0.05)
        assert not waiting.done(), "it waits out the spacing"
        ending.set()
        assert await asyncio.wait_for(waiting, 1.0) is None

        periodic = CheckpointSchedule(0.0, asyncio.Event(), asyncio.Event(), set, spacing_s=3600.0)
        assert await periodic.next({"p0"}) == {"p0"}  # the period is due: no spacing
        assert await asyncio.wait_for(periodic.next({"p0"}), 1.0) == {"p0"}

    asyncio.run(main())


START = 1_795_000_000_000_000_000


def _chunks(pid: str, seconds: int = 30, fs: int = 500) -> list:
    rec = generate(seconds, fs=fs, seed=1)
    return list(chunks_of(pid, regular_times(len(rec.values), fs, START), rec.values, 250, fs=fs,
                          segment_start_ns=START))


def test_a_fenced_then_revoked_partition_leaves_nothing_and_its_next_assignment_starts_clean():
    """Review of the pieces moved onto OwnedPartition: a fence keeps them readable until the revocation,
    whose closers (registered by the real PartitionOwnership) release the windows, the stage's patient
    indexes, the states and the event time; the next assignment is a new object with none of them."""
    owned = OwnedPartitions()
    store = StateStore(clock=lambda: 1000.0, owned=owned)
    stage = WindowStage(WindowSettings(idle_evict_s=5.0, provisional_records=1), store)

    async def checkpoint(partitions):
        pass

    own = PartitionOwnership(kafka=Settings().kafka, partitions=owned, stage=stage, store=store,
                             event_time=EventTime(owned=owned), metrics=Metrics(), settled=asyncio.Event(),
                             delivery=AtLeastOnceDelivery(producer=None), consumer=None, state_reader=None,
                             dead_letters=None, publisher=None, routing=None, checkpoint=checkpoint,
                             failed=lambda: False, drain_timeout_s=0.0)

    def assign(floors: dict) -> OwnedPartition:  # PartitionOwnership.assign's steps, without the clients
        task = OwnedPartition(TP0, 0)
        own.release_at_close(task)
        own.event_time.restore(task, 1_795_000_000_000)
        store.load(task, {}, floors)
        return owned.admit(task)

    old = assign({"p1": 7})
    chunks = _chunks("p1")
    for i, c in enumerate(chunks[:30]):
        stage.accept(TP0, i, c, now=i * 0.5)
    stage.accept(TP0, 100, _chunks("p2")[0], now=15.0)
    stage.flowing([TP0], 40.0)
    assert stage.evict(40.0) and old.windows.emitted.get("p1")  # p1 closed, its windows' markers kept
    for i, c in enumerate(chunks[40:50]):  # p1 again: a new stream, after the markers
        stage.accept(TP0, 200 + i, c, now=41.0)
    assert (TP0, "p1") in stage.streams and stage.nbytes > 0
    owned.close_dirty(TP0)  # fenced: still held, its pieces readable until the revocation
    assert stage.windows_of(TP0) is old.windows and store.of(TP0) is old.states
    assert EventTime(owned=owned).stamp(TP0) is not None
    asyncio.run(own.revoke({TP0}))
    assert old.windows is None and old.states is None and not old.mine
    assert not stage.streams and stage.nbytes == 0 and not stage.unadopted
    assert not stage.patient_clock and not stage.oldest_since and store.count() == 0
    assert EventTime(owned=owned).stamp(TP0) is None
    new = assign({})
    assert new is not old and new.windows is None and store.lookup(TP0, "p1") is None
    stage.accept(TP0, 0, chunks[0], now=50.0)
    assert set(new.windows.streams) == {"p1"} and not new.windows.emitted
    assert new.states.seq_floors == {}, "the old assignment's floors must not leak"


def test_an_assignment_whose_parts_keep_pieces_is_closed_never_forgotten():
    """Review: `forget` (a ledger's own start/drop) would drop the windows without the stage's release, and
    the stage's patient indexes would keep streams of an ended assignment: it refuses."""
    owned = OwnedPartitions()
    ledger, stage = OffsetsLedger(owned), WindowStage(WindowSettings(provisional_records=1), StateStore(owned=owned))
    ledger.start_partition(TP0, None)
    stage.accept(TP0, 0, _chunks("p1")[0], now=0.0)
    try:
        ledger.start_partition(TP0, None)
    except RuntimeError as exc:
        assert "close it" in str(exc)
    else:
        raise AssertionError("an assignment holding windows was forgotten unreleased")
    assert (TP0, "p1") in stage.streams and stage.windows_of(TP0).streams.keys() == {"p1"}
