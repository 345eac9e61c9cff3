"""Model-based test of the worker's core without Kafka (hypothesis stateful testing).

The real parts (WindowStage, StateStore, OffsetsLedger, Checkpointer.prepare, EpisodeTracker) run against
an in-memory log: input partitions shared by several patients, a compacted state changelog and committed
offsets. Hypothesis chunks, duplicates, swaps, loses and dates records (leading holes, outliers), and
interleaves delivery, publishing, checkpoints, crashes (kill -9: everything in memory is lost),
revoke/reassign, monitors whose clock froze (one chunk resent again and again), offsets reset far behind
the state (a replay of everything) and wall time passing (idle beds evicted, their partial windows reported
truncated, then their backlog arriving; with at-least-once, a crash right after such a window's state was
written ahead), worker clocks hours ahead or behind, patient states lost, and with transactions a record the
broker refuses and a stop while a commit is in flight, at random. Invariants:
- every window holding any delivered sample is reported at least once, always with the same content (a
  patient whose state was lost excepted: what it had reported is forgotten);
- a committed offset never passes a record whose samples feed a window not yet reported;
- each patient's last episode message equals the hysteresis over its de-duplicated flags (lost states
  excepted), and its episode `seq` never goes backwards, whatever the clocks (readers drop a lower one);
- buffered bytes stay bounded.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from dataclasses import dataclass

import numpy as np
import pytest
import orjson
from aiokafka import TopicPartition
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from tests.budget import examples

from streamer.checkpointing import Checkpointer, OffsetsLedger
from streamer.delivery import AtLeastOnceDelivery, ExactlyOnceDelivery, TransactionFailed
from streamer.ingest.contract import Chunk
from streamer.kafka.partitioning import OutputRouting
from streamer.metrics import Metrics
from streamer.model.decision import Verdict
from streamer.publish.episodes import EpisodeTracker
from streamer.delivery.event_time import EventTime
from streamer.partitions import OwnedPartitions
from streamer.publish.publisher import Publisher
from streamer.runtime.ownership import PartitionOwnership
from streamer.settings import EpisodeSettings, KafkaSettings, WindowSettings
from streamer.state.patients import PatientState
from streamer.state.store import StateStore
from streamer.windows.buffer import SCORABLE
from streamer.windows.grid import NS, WindowGrid, as_rate
from streamer.windows.stage import WindowStage
from tests.model.memory_kafka import Killed, MemoryConsumer, MemoryProducer, MemoryReader, MemoryTxnProducer

FS = 50  # small windows (500 samples) keep the model fast
START = 1_795_000_000_000_000_000
PATIENTS = 3
PARTITIONS = 2
WINDOW = WindowSettings(min_rate_hz=10, new_timeline_chunks=4, idle_evict_s=5.0)  # replay horizon 17 s
EPISODES = EpisodeSettings(open_after=2, close_after=2, stale_after_s=1e9)
K = KafkaSettings(flags_topic="flags", episodes_topic="episodes", state_topic="state")


@dataclass
class Record:
    offset: int
    patient: str
    chunk: Chunk
    outlier: bool


def _grid(anchor: int) -> WindowGrid:
    return WindowGrid(anchor, as_rate(FS), 10 * NS, 10 * NS)


def _verdict_of(f: dict) -> Verdict:
    """The verdict a published flag message carries (the reference tracker reads the flags topic)."""
    return Verdict(f["patient_id"], f["window_start_ns"], f["window_end_ns"], f["status"], f["reason"],
                   f["probability"], f["artifact"], f["threshold"], f["model"], f["fs"], f["missing_samples"],
                   f["interpolated_samples"], f["produced_at_ns"], f["latency_ms"])


def _content(flag: dict) -> tuple:
    return flag["status"], flag["reason"], flag["probability"], flag["missing_samples"], flag["interpolated_samples"]


def _probability(w) -> float | None:
    if w.status != SCORABLE:
        return None
    digest = hashlib.sha256(np.ascontiguousarray(w.samples).tobytes()).digest()
    return 0.9 if digest[0] % 3 == 0 else 0.1  # deterministic in the window's content


class Log:
    """What Kafka would hold: input partitions, committed offsets, the compacted state changelog, outputs."""

    def __init__(self, records: dict[int, list[Record]]):
        self.partitions = records
        self.committed: dict[int, int] = {}
        self.changelog: dict[int, dict[bytes, bytes]] = {p: {} for p in records}
        self.flags: list[dict] = []
        self.episodes: list[dict] = []
        # (partition, offset) of records dead-lettered as no_timeline: a new patient's stream that went
        # silent before its first records agreed reports no window; those records are in the dead-letter
        # topic with that reason (issue 45), which accounts for their samples
        self.dead: set[tuple[int, int]] = set()
        # per partition, how far any worker has read: the records produced so far (the high watermark);
        # those after it are still to come (a backlog arriving after an eviction)
        self.high: dict[int, int] = {p: 0 for p in records}


class Core:
    """The worker's loops, with its real glue: poll -> windows -> Publisher.flags (flags, write-ahead,
    episodes, holds released when a flag counts) -> Checkpointer.checkpoint, through AtLeastOnceDelivery
    on one event loop, against the log through the in-memory clients of memory_kafka.py. Partitions are
    taken and given back by the real PartitionOwnership (assign: committed offsets, restore, admit, resume;
    revoke: checkpoint, one close) over the worker's OwnedPartitions, with its two seams set: the state
    topic's check answers from the model, and a revocation does not wait on the wall clock for what is in
    flight (the model drains first, or revokes undrained on purpose)."""
    probability = staticmethod(_probability)  # the model's stand-in for the network

    def __init__(self, log: Log, loop: asyncio.AbstractEventLoop):
        self.log, self.loop = log, loop
        self.partitions = OwnedPartitions()  # each partition's pieces hang on its object there
        self.store = StateStore(owned=self.partitions)
        self.stage = WindowStage(WINDOW, self.store)
        self.tracker = OffsetsLedger(self.partitions)
        self.producer = MemoryProducer(self._land)
        self.consumer = MemoryConsumer(log.committed, _number)
        self.delivery = self._make_delivery()
        self.checkpointer = Checkpointer(self.tracker, self.stage, self.store, self.consumer, self.delivery,
                                         K.state_topic, "g")
        self.episodes = EpisodeTracker(EPISODES, "m")
        self.publisher = Publisher(K, self.delivery, self.tracker, self.store, self.episodes, _metrics(),
                                   asyncio.Event(), persist=self.checkpointer.persist, clock=lambda: self.clock_s,
                                   on_failure=self._background_failed)
        self.ownership = PartitionOwnership(
            kafka=K, partitions=self.partitions, stage=self.stage, store=self.store,
            event_time=self.delivery.event_time, metrics=_metrics(), settled=asyncio.Event(), delivery=self.delivery,
            consumer=self.consumer, state_reader=MemoryReader(self._records), dead_letters=None,
            publisher=self.publisher, routing=OutputRouting({K.episodes_topic: 1}, "murmur2"),
            checkpoint=self._revoking_checkpoint, failed=lambda: False, clock=lambda: self.clock_s,
            check_state_topic=_state_topic_fine, drain_timeout_s=0.0)
        self.pending: list = []  # emitted windows, in order, not yet published
        self.position: dict[int, int] = {}
        self.now = 0.0  # wall time: moves only in the time_passes rule
        self.clock_s = 1_790_000_000.0  # the worker's wall clock, as episodes number and stamp by it

    def _make_delivery(self):
        return AtLeastOnceDelivery(self.producer, event_time=EventTime(owned=self.partitions))

    def _land(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None) -> None:
        """A record the producer sent, now in the log."""
        if topic == K.flags_topic:
            self.log.flags.append(orjson.loads(value))
        elif topic == K.episodes_topic:
            self.log.episodes.append(orjson.loads(value))
        else:
            assert topic == K.state_topic and partition is not None, (topic, partition)
            if value is None:
                self.log.changelog[partition].pop(key, None)  # a tombstone, compacted at once
            else:
                self.log.changelog[partition][key] = value

    def _records(self, topic: str, partition: int) -> list[tuple[bytes | None, bytes | None]]:
        """What a reader finds in the log (the state topic compacted; every episode message in partition 0)."""
        if topic == K.state_topic:
            return list(self.log.changelog[partition].items())
        return [(m["patient_id"].encode(), orjson.dumps(m)) for m in self.log.episodes] if partition == 0 else []

    def _background_failed(self, exc: BaseException) -> None:
        raise AssertionError(f"a background send failed: {exc!r}")

    def run(self, coro):
        """One step of the worker on the machine's loop, with what it spawned in the background (a resend
        of written-ahead flags, of pending episodes) run to its end too."""
        out = self.loop.run_until_complete(coro)
        while self.publisher.background.tasks:
            self.loop.run_until_complete(asyncio.gather(*self.publisher.background.tasks))
        return out

    def assign(self, p: int) -> None:
        """The real assignment (the model writes only readable states: no dead letter of one is needed);
        flags a previous owner wrote ahead and pending episodes are sent again in the background."""
        tp = TopicPartition("in", p)
        self.run(self.ownership.assign({tp}))
        self.position[p] = self.partitions.get(tp).offsets.committed or 0

    async def _revoking_checkpoint(self, partitions) -> None:
        await self.checkpointer.checkpoint(partitions)

    def poll(self, p: int, n: int) -> None:
        if p not in self.position:
            return
        tp = TopicPartition("in", p)
        records = self.log.partitions[p]
        for r in records[self.position[p]:self.position[p] + n]:
            self.tracker.consumed(tp, r.offset)
            result = self.stage.accept(tp, r.offset, r.chunk, now=self.now, ref=r)
            self.dead_letters((tp, ref, reason) for ref, reason, _ in result.dead_letters)
            for w in result.windows:
                self.submit(w)
            self.position[p] = r.offset + 1
        self.log.high[p] = max(self.log.high[p], self.position[p])

    def flowing(self, partitions, now: float) -> None:
        self.stage.flowing([TopicPartition("in", p) for p in partitions], now)

    def submit(self, w) -> None:
        w.hold = self.tracker.hold(w.partition, w.min_offset)
        self.pending.append(w)

    def dead_letters(self, refused) -> None:
        """The worker's dead letters (Intake, Upkeep.every_second): only no_timeline ones account for a
        record's samples here; anything else refused stays owed a window."""
        for tp, ref, reason in refused:
            if reason == "no_timeline":
                self.log.dead.add((_number(tp), ref.offset))

    def evict(self) -> None:
        for w in self.stage.evict(self.now):
            self.submit(w)
        self.dead_letters((tp, ref, reason) for tp, ref, reason, _ in self.stage.take_rejected())

    def take(self, n: int, only: int | None = None) -> list:
        """The next n pending windows (of one partition with `only`), taken off the pending list."""
        keep, batch = [], []
        for w in self.pending:
            if n <= 0 or (only is not None and _number(w.partition) != only):
                keep.append(w)
                continue
            n -= 1
            batch.append(w)
        self.pending = keep
        return batch

    def publish(self, n: int, only: int | None = None) -> None:
        """One batch through the real Publisher: at least once, a flag counts once acknowledged, then its
        state and episode follow; a window the wall clock closed has its state written ahead first; one
        handed on before a revocation is dropped (its partition's owner redoes it)."""
        batch = self.take(n, only)
        if batch:
            self.run(self.publisher.flags(batch, [self.probability(w) for w in batch], 0.5, "m"))

    def publish_killed_at_flags(self, n: int) -> None:
        """Publish the next n windows, the process killed (kill -9) at its first flag send: whatever was
        written ahead before it landed, nothing after it does."""
        self.producer.kill_at = K.flags_topic
        batch = self.take(n)
        try:
            self.run(self.publisher.flags(batch, [self.probability(w) for w in batch], 0.5, "m"))
        except Killed:
            pass  # else every flag of the batch was dropped (revoked meanwhile): killed all the same
        self.kill()

    def kill(self) -> None:
        """Nothing of this process runs again: its unfinished tasks are cancelled."""
        self.producer.killed = True
        tasks = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))

    def checkpoint(self, partitions=None) -> dict[int, int]:
        partitions = set(self.position) if partitions is None else partitions
        self.consumer.last = {}
        self.run(self.checkpointer.checkpoint({TopicPartition("in", p) for p in partitions}))
        return {_number(tp): off for tp, off in self.consumer.last.items()}

    def checkpoint_write_fails(self) -> None:
        """A checkpoint whose state records the broker does not acknowledge: nothing is committed and the
        states are written again by the next one."""
        before, failed = dict(self.log.committed), self.producer.failed
        self.producer.fail.add(K.state_topic)
        try:
            points = self.checkpoint()
        finally:
            self.producer.fail.discard(K.state_topic)
        if self.producer.failed > failed:  # a state record was sent and refused: no offset moved
            assert not points and self.log.committed == before, points

    def revoke(self, p: int, drain: bool = True) -> None:
        """The real revocation: checkpoint, then one close. Drained first, as on_revoked waits for what is
        in flight, or not (`drain=False`: the wait ran out)."""
        tp = TopicPartition("in", p)
        if drain:
            self.publish(len(self.pending), only=p)
        self.consumer.last = {}
        self.run(self.ownership.revoke({tp}))
        assert self.partitions.held(tp) is None
        self.position.pop(p, None)

    def close_all(self) -> None:
        for w in self.stage.close_all(now=0.0):
            self.submit(w)


async def _state_topic_fine(kafka) -> tuple[None, int]:
    return None, PARTITIONS


@functools.cache
def _metrics() -> Metrics:
    """One set of counters for every core (each Metrics() reads the package's metadata: slow)."""
    return Metrics()


def _number(tp) -> int:
    return tp.partition if isinstance(tp, TopicPartition) else tp


@st.composite
def recordings(draw):
    """Per patient: a chunked recording with losses, a leading hole, duplicates, local swaps, outliers."""
    per_patient = []
    for i in range(PATIENTS):
        seconds = draw(st.integers(25, 55))
        anchor = START + i * 1_234_567_891
        n = seconds * FS
        values = np.random.default_rng(i).normal(0, 0.3, n)
        cuts, pos = [], 0
        while pos < n:
            size = draw(st.integers(5, 60))
            cuts.append((pos, min(pos + size, n)))
            pos += size
        lead = draw(st.integers(0, 3))  # leading chunks never sent
        chunks = []
        for j, (a, b) in enumerate(cuts):
            if j < lead or draw(st.integers(0, 30)) == 0:
                continue  # lost
            c = Chunk(f"p{i}", "II", anchor + a * NS // FS, float(FS), values[a:b], j, anchor)
            chunks.append((c, False))
            if draw(st.integers(0, 15)) == 0:
                chunks.append((c, False))  # duplicate
            if draw(st.integers(0, 25)) == 0:  # an outlier dated +30 min, before or after its chunk: also
                # a new bed's first record (its provisional stream holds it until records agree). Each is
                # 5 s further out than the last, so outliers never agree with each other: several that do are
                # a second timeline, which the window stage may rightly follow (tests/unit/test_windows.py)
                shift = (1800 + 5 * j) * NS
                outlier = (Chunk(c.patient_id, "II", c.t0_ns + shift, float(FS), c.samples, j, anchor), True)
                chunks.insert(len(chunks) - 1 if draw(st.booleans()) else len(chunks), outlier)
        for j in range(len(chunks) - 1):
            if draw(st.integers(0, 8)) == 0:
                chunks[j], chunks[j + 1] = chunks[j + 1], chunks[j]  # reordered within tolerance
        if chunks and draw(st.integers(0, 3)) == 0:  # the monitor's clock froze: its last chunk again and again
            chunks += [chunks[-1]] * draw(st.integers(3, 20))
        per_patient.append(chunks)
    # interleave patients by time; patient i on partition i % PARTITIONS
    merged = sorted(((c.t0_ns if not o else c.t0_ns - (1800 + 5 * c.seq) * NS, k, i, c, o)
                     for i, chunks in enumerate(per_patient) for k, (c, o) in enumerate(chunks)),
                    key=lambda t: (t[0], t[2], t[1]))
    parts: dict[int, list[Record]] = {p: [] for p in range(PARTITIONS)}
    for _, _, i, c, o in merged:
        p = i % PARTITIONS
        parts[p].append(Record(len(parts[p]), c.patient_id, c, o))
    return parts


class DeliveryModel(RuleBasedStateMachine):
    log_class, core_class = Log, Core
    loses_states = True  # the state_lost rule (at least once: duplicates of a lost patient are allowed)

    @initialize(records=recordings())
    def setup(self, records):
        self.loop = asyncio.new_event_loop()  # the machine's: every core of it runs there, one after another
        self.log = self.log_class(records)
        self.core = self.core_class(self.log, self.loop)
        for p in range(PARTITIONS):
            self.core.assign(p)
        self.crashes = 0
        self.zombie = None
        self.lost: set[str] = set()  # patients whose state was lost at some point
        self.clock_skew_s = 0.0

    def restart(self):
        """A new worker process: nothing in memory survives, its clock is the host's (skewed or not)."""
        if self.core is not self.zombie:  # else it lives on (zombie_takeover)
            self.core.kill()
        self.core = self.core_class(self.log, self.loop)
        self.core.clock_s += self.clock_skew_s
        for p in range(PARTITIONS):
            self.core.assign(p)

    @rule(skew_s=st.sampled_from([0.0, 7200.0, -1800.0, -86400.0]))
    def host_clock_set(self, skew_s):
        """The host clock is (re)set hours ahead, behind, or right (a bad RTC, a snapshot resumed, NTP
        fixing it), then the worker restarts."""
        self.clock_skew_s = skew_s
        self.crashes += 1
        self.restart()

    @precondition(lambda self: type(self).loses_states)
    @rule(p=st.integers(0, PARTITIONS - 1))
    def states_lost(self, p):
        """Every patient state of partition p is lost (unreadable records, a recreated state topic) and the
        worker restarts: numbering continues above what readers saw all the same (episodes read back)."""
        for raw in self.log.changelog[p].values():
            self.lost.add(PatientState.from_bytes(raw)[1].patient_id)
        self.lost |= {f"p{i}" for i in range(PATIENTS) if i % PARTITIONS == p}
        self.log.changelog[p].clear()
        self.crashes += 1
        self.restart()

    @invariant()
    def episode_seq_never_goes_backwards(self):
        if not hasattr(self, "log"):
            return
        last: dict[str, dict] = {}
        for m in self.log.episodes:
            before = last.get(m["patient_id"])
            assert before is None or m["seq"] > before["seq"] or (
                m["seq"] == before["seq"] and m["state"] == before["state"]
                and m["episode_id"] == before["episode_id"]), \
                f"{m['patient_id']}: seq {m['seq']} ({m['state']}) after {before['seq']} ({before['state']})"
            last[m["patient_id"]] = m

    @rule(p=st.integers(0, PARTITIONS - 1), n=st.integers(1, 40))
    def deliver(self, p, n):
        self.core.poll(p, n)

    @rule(n=st.integers(1, 10))
    def publish(self, n):
        self.core.publish(n)

    @rule()
    def checkpoint(self):
        points = self.core.checkpoint()
        self._check_commits(points)

    @rule()
    def crash(self):
        """kill -9: buffers, pending windows and unflushed state are gone; restart from the log."""
        self.crashes += 1
        self.restart()

    @precondition(lambda self: hasattr(self, "core") and any(w.by_clock for w in self.core.pending))
    @rule()
    def crash_after_write_ahead(self):
        """kill -9 after the states of a batch holding a wall-clock-closed window were written ahead, before
        its flags were sent."""
        pending = self.core.pending
        first = next(i for i, w in enumerate(pending) if w.by_clock)
        self.core.publish_killed_at_flags(first + 1)
        self.crash()

    @rule()
    def checkpoint_write_fails(self):
        """The broker does not acknowledge a checkpoint's state records: its offsets are not committed,
        its states are written again by the next checkpoint."""
        self.core.checkpoint_write_fails()

    @rule(seconds=st.sampled_from([1.0, 30.0, 61.0, 300.0]))
    def time_passes(self, seconds):
        """Wall time passes with the partitions fetched and caught up: beds silent for idle_evict_s are
        evicted, their partial windows reported truncated; a later backlog, a crash or a replay must never
        report such a window again with other content."""
        core = self.core
        core.now += seconds
        # silence counts on partitions read up to their high watermark (the worker's _caught_up): one
        # still replaying after a restart evicts nobody
        caught_up = [p for p, pos in core.position.items() if pos >= self.log.high[p]]
        core.flowing(caught_up, core.now)
        core.evict()

    @rule()
    def crash_after_eviction_acknowledged(self):
        """Idle beds evicted, every pending flag (their truncated windows too) acknowledged, then kill -9
        before any checkpoint: the backlog still to come must not complete those windows a second time."""
        self.time_passes(30.0)
        self.core.publish(10**9)
        self.crash()

    @rule(p=st.integers(0, PARTITIONS - 1))
    def offsets_reset_far_behind(self, p):
        """An operator resets the group's offsets of one partition to its start (reprocessing, an expired
        commit) and the workers restart: everything is replayed behind what the state says was reported."""
        self.log.committed[p] = 0
        self.crash()

    @rule(p=st.integers(0, PARTITIONS - 1), new_owner=st.booleans())
    def revoke_and_reassign(self, p, new_owner):
        self.core.revoke(p)
        self._check_commits({p: self.log.committed.get(p, 0)})
        if new_owner:  # the partition moves to a worker that never saw it (fresh memory)
            for q in list(self.core.position):
                self.core.revoke(q)
            self.restart()
        else:
            self.core.assign(p)

    @rule(p=st.integers(0, PARTITIONS - 1))
    def revoke_before_drained_and_get_back(self, p):
        """The revocation deadline passed with windows still in inference; the partition comes back to
        this worker and the old windows are acknowledged later: they must not release the new holds."""
        self.core.revoke(p, drain=False)
        self._check_commits({p: self.log.committed.get(p, 0)})
        self.core.assign(p)

    @invariant()
    def buffers_bounded(self):
        if hasattr(self, "core"):
            # at most a few open windows per patient (reorder tolerance), 9 bytes a sample
            assert self.core.stage.nbytes <= PATIENTS * 4 * 10 * FS * 9

    def _check_commits(self, points):
        reported = {f["window_id"] for f in self.log.flags}
        for p, committed in points.items():
            for r in self.log.partitions[p][:committed]:
                if r.outlier or (p, r.offset) in self.log.dead:
                    continue
                for wid in _windows_of(r.chunk):
                    assert wid in reported or _never_needed(r, wid, self.log), \
                        f"commit {committed} on partition {p} passed record {r.offset} of unreported {wid}"

    def teardown(self):
        if not hasattr(self, "core"):
            return
        try:
            self._check_the_end()
        finally:
            self.core.kill()
            self.loop.close()

    def _check_the_end(self):
        core = self.core
        for p in range(PARTITIONS):
            core.poll(p, 10**9)
        core.close_all()  # the end of every stream: partial windows reported as truncated
        core.publish(10**9)
        core.checkpoint()
        flags = self.log.flags
        by_id: dict[str, tuple] = {}
        for f in flags:
            assert by_id.setdefault(f["window_id"], _content(f)) == _content(f) or f["patient_id"] in self.lost, \
                f"{f['window_id']} reported twice with different content"
        expected = set()
        for p, records in self.log.partitions.items():
            for r in records:
                if not r.outlier and (p, r.offset) not in self.log.dead:
                    expected |= set(_windows_of(r.chunk))
        missing = expected - set(by_id)
        assert not missing, f"windows never reported: {sorted(missing)[:5]} ({self.crashes} crashes)"
        # no clock ever stepped here (an outlier is a single record): every window is on its segment's grid,
        # none re-anchored from replayed records, so no stretch of signal is reported under two ids
        anchors = {r.patient: r.chunk.segment_start_ns for rs in self.log.partitions.values() for r in rs}
        shifted = [f["window_id"] for f in flags if (f["window_start_ns"] - anchors[f["patient_id"]]) % (10 * NS)]
        assert not shifted, f"windows reported on a shifted grid: {shifted[:3]}"
        # episodes: the last message per patient equals the hysteresis over the de-duplicated flags
        reference = EpisodeTracker(EPISODES, "m")
        seen, want = set(), {}
        for f in sorted(flags, key=lambda f: f["window_start_ns"]):
            if f["window_id"] in seen:
                continue
            seen.add(f["window_id"])
            msg = reference.update(_verdict_of(f))
            if msg is not None:
                want[f["patient_id"]] = (msg.state, msg.episode_id)
        got = {}
        for m in self.log.episodes:
            got[m["patient_id"]] = (m["state"], m["episode_id"])
        for pid in self.lost:  # its episode history restarted with its state (the worker closes it state_lost)
            got.pop(pid, None)
            want.pop(pid, None)
        assert got == want


def _windows_of(chunk: Chunk) -> list[str]:
    """Ids of the grid windows holding a sample of this chunk."""
    g = _grid(chunk.segment_start_ns)
    a = g.sample_index(chunk.t0_ns)
    b = a + len(chunk.samples)
    return [f"{chunk.patient_id}:{g.start_ns(k)}" for k in range(g.first_window_ending_after(a),
                                                                  g.last_window_starting_at_or_before(b - 1) + 1)]


def _never_needed(r: Record, wid: str, log: Log) -> bool:
    """A record may be passed while its window is unreported only if its samples were not needed: an
    earlier record of the same partition carried the same samples (a duplicate)."""
    p = int(r.patient[1:]) % PARTITIONS
    return any(o.offset < r.offset and not o.outlier and o.patient == r.patient and o.chunk.t0_ns == r.chunk.t0_ns
               and len(o.chunk.samples) == len(r.chunk.samples) for o in log.partitions[p])


TestDeliveryModel = DeliveryModel.TestCase
TestDeliveryModel.settings = settings(max_examples=examples(150), stateful_step_count=40, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- exactly once: transactions per input partition, fencing, zombies -------------------------------------
class TxnLog(Log):
    """The same log with Kafka transactions: what a transaction wrote becomes visible (to read_committed
    readers, to a restore) only when it commits; a new owner's InitProducerId bumps the partition's epoch,
    which aborts the open transaction and fences every later commit of the previous owner."""

    def __init__(self, records):
        super().__init__(records)
        self.epoch: dict[int, int] = {p: 0 for p in records}
        self.state_history: list[tuple[bytes, bytes]] = []  # committed state writes, in order

    def fence(self, p: int) -> int:
        self.epoch[p] += 1
        return self.epoch[p]

    def commit(self, p: int, epoch: int, txn: dict) -> bool:
        if self.epoch[p] != epoch:
            return False  # fenced: the transaction is aborted
        assert not txn.get("refused"), "a transaction committed over a record the broker refused"
        self.flags.extend(txn["flags"])
        self.episodes.extend(txn["episodes"])
        for key, raw in txn["states"].items():
            self.changelog[p][key] = raw
            self.state_history.append((key, raw))
        if txn["offset"] is not None:
            self.committed[p] = txn["offset"]
        return True


class TxnCore(Core):
    """The worker with the real ExactlyOnceDelivery, one MemoryTxnProducer per owned partition (memory_kafka.py):
    outputs and state changes join the partition's open transaction together (publisher.py), the
    checkpoint commits states and offsets with them (checkpoint.py). Taking a partition takes its
    transactional id's next epoch, which fences the previous owner. A fenced commit closes the partition
    dirty (as FenceWatch does) and marks the worker fenced: a zombie stops for good (zombie_acts); a worker
    that still owns the partition rejoins the group (transaction_times_out). A refused record fails the
    transaction: it is aborted and the worker stops (a TransactionFailed)."""

    def __init__(self, log: TxnLog, loop: asyncio.AbstractEventLoop):
        self.producers: dict[int, MemoryTxnProducer] = {}
        super().__init__(log, loop)
        self.fenced = False
        self.stopped = False  # a refused record aborted a transaction: the worker exits 1

    def _make_delivery(self):
        return ExactlyOnceDelivery(K, self._txn_producer, on_fenced=self._on_fenced,
                                   event_time=EventTime(owned=self.partitions))

    def _txn_producer(self, transactional_id: str) -> MemoryTxnProducer:
        p = int(transactional_id.rsplit("-", 1)[1])
        producer = self.producers[p] = MemoryTxnProducer(
            self.log, p, {K.flags_topic: "flags", K.episodes_topic: "episodes", K.state_topic: "states"})
        return producer

    def _on_fenced(self, tp) -> None:
        self.partitions.close_dirty(tp)  # what FenceWatch does; the worker then rejoins (or, a zombie, stops)
        self.fenced = True

    def owned(self) -> list[int]:
        """The partitions this worker holds, fenced or not (what its next revocation gives back)."""
        return sorted(p for p in self.position if self.partitions.held(TopicPartition("in", p)) is not None)

    def refuse_next(self, p: int) -> None:
        self.producers[p].refuse = True

    def publish(self, n: int, only: int | None = None) -> None:
        try:
            super().publish(n, only)
        except TransactionFailed:
            self.stopped = True

    def publish_killed_at_flags(self, n: int) -> None:
        pass  # the transaction that holds the flags holds the states: nothing to write ahead

    def checkpoint(self, partitions=None) -> dict[int, int]:
        """The offsets this checkpoint's transactions committed."""
        before = dict(self.log.committed)
        try:
            Core.checkpoint(self, partitions)
        except TransactionFailed:
            self.stopped = True
        return {p: off for p, off in self.log.committed.items() if before.get(p) != off}

    def checkpoint_write_fails(self) -> None:
        pass  # a transaction's failed write is a_record_is_refused

    async def _revoking_checkpoint(self, partitions) -> None:
        await self.checkpointer.checkpoint(partitions)


class TransactionalDeliveryModel(DeliveryModel):
    """DeliveryModel on transactions, with zombies: an owner that lost its partitions without knowing keeps
    publishing and checkpointing. Invariants besides the base ones: committed flags hold each window
    exactly once (no duplicate window_id at all), and no committed state record moves a grid backwards."""

    log_class, core_class = TxnLog, TxnCore
    loses_states = False  # a lost state may report a window twice: not what this model's invariant is about

    @rule(p=st.integers(0, PARTITIONS - 1))
    def a_record_is_refused(self, p):
        """The broker refuses one record of p's open transaction (too large for the topic, a timestamp out
        of range): its checkpoint aborts the transaction and the worker stops; the next one redoes it."""
        if p not in self.core.owned():
            return
        self.core.publish(len(self.core.pending), only=p)  # flags join the transaction; their states change
        self.core.refuse_next(p)
        self.core.checkpoint()  # the changed states join the transaction: the first of them is refused
        if self.core.producers[p].refused:
            assert self.core.stopped, "a transaction was committed over a refused record"
            self.crash()
        else:
            self.core.producers[p].refuse = False  # nothing was sent: nothing to refuse

    @rule(p=st.integers(0, PARTITIONS - 1))
    def transaction_times_out(self, p):
        """A broker failover holds p's commit past kafka.transaction_timeout_ms: the broker aborts p's open
        transaction with a newer epoch. The worker's next commit of p is fenced (exactly_once.py): p is lost, the
        worker is not; it rejoins the group (Worker._fenced): every partition revoked, p without a commit,
        then assigned again (fence, restore from the last commit)."""
        if p not in self.core.owned() or not self.core.producers[p].has_writes():
            return  # an empty transaction is not ongoing at the coordinator: nothing times out
        self.log.fence(p)
        self.core.checkpoint()
        assert self.core.fenced
        owned = self.core.owned()
        for q in owned:
            self.core.revoke(q)
        for q in owned:
            self.core.assign(q)
        self.core.fenced = False

    @rule()
    def stop_while_committing(self):
        """SIGTERM while a checkpoint's EndTxn is in flight: the shutdown awaits that commit, then makes the
        final checkpoint and exits; the next worker starts from what both committed."""
        self.core.checkpoint()
        self.core.checkpoint()
        assert not self.core.fenced and not self.core.stopped
        self.restart()

    @rule()
    def zombie_takeover(self):
        """The owner stalls past its session timeout; a new worker takes every partition; the old one
        resumes later (zombie_acts) believing it still owns them."""
        self.zombie = self.core
        self.restart()

    @precondition(lambda self: getattr(self, "zombie", None) is not None)
    @rule(p=st.integers(0, PARTITIONS - 1), n=st.integers(1, 20))
    def zombie_acts(self, p, n):
        z = self.zombie
        before = (len(self.log.flags), len(self.log.episodes), dict(self.log.committed), len(self.log.state_history))
        z.poll(p, n)
        z.publish(n)
        z.checkpoint()
        after = (len(self.log.flags), len(self.log.episodes), dict(self.log.committed), len(self.log.state_history))
        assert after == before, "a fenced owner's checkpoint went through"

    @rule()
    def checkpoint(self):
        points = self.core.checkpoint()
        assert not self.core.fenced
        self._check_commits(points)

    @invariant()
    def committed_flags_unique(self):
        if hasattr(self, "log"):
            ids = [f["window_id"] for f in self.log.flags]
            assert len(ids) == len(set(ids)), "a window committed twice"

    @invariant()
    def committed_states_never_regress(self):
        if not hasattr(self, "log"):
            return
        last: dict = {}
        for key, raw in self.log.state_history:
            _, stt = PatientState.from_bytes(raw)
            for seg in stt.segments:
                k = (key, seg.anchor_ns, seg.fs)
                assert seg.next_k >= last.get(k, -1), f"{key!r}: next_k went back to {seg.next_k}"
                last[k] = seg.next_k


TestTransactionalDeliveryModel = TransactionalDeliveryModel.TestCase
TestTransactionalDeliveryModel.settings = settings(max_examples=examples(100), stateful_step_count=40, deadline=None,
                                                   suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.data_too_large])


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_a_truncated_window_acknowledged_then_kill_9_is_not_completed_by_the_replay(loop):
    """Issue 24, sequence 6, at least once: a bed goes silent mid-window, is evicted and its partial window
    published as truncated; kill -9 before the next checkpoint; its backlog then arrives. The replay must
    not complete that window and publish it again as scored."""
    values = np.random.default_rng(0).normal(0, 0.3, 20 * FS)
    chunks = [Chunk("p0", "II", START + j * NS, float(FS), values[j * FS:(j + 1) * FS], j, START) for j in range(20)]
    log = Log({0: [Record(j, "p0", c, False) for j, c in enumerate(chunks)], 1: []})
    core = Core(log, loop)
    core.assign(0)
    core.poll(0, 5)  # half of the first window, then silence
    core.now += 30.0
    core.flowing([0], core.now)
    for w in core.stage.evict(core.now):
        core.submit(w)
    core.publish(10)
    assert [f["reason"] for f in log.flags] == ["truncated"]
    core.kill()
    core = Core(log, loop)  # kill -9: no checkpoint ran
    core.assign(0)
    core.poll(0, 20)  # the replay, and the rest of the bed's records
    core.close_all()
    core.publish(10)
    first = [f for f in log.flags if f["window_id"] == log.flags[0]["window_id"]]
    assert {_content(f) for f in first} == {_content(log.flags[0])}, "one window_id, two contents"
    assert len({f["window_id"] for f in log.flags}) == 2  # the second window is reported once, scored


def test_after_a_state_loss_a_clock_half_an_hour_behind_numbers_episodes_above_what_readers_saw(loop):
    """Issue 32, sequence 6: a bed's episode opens and is published; its state is lost; the worker that
    restarts has its clock 30 minutes behind. Its messages must be numbered above the ones readers saw
    (read back from the episodes topic), not from its clock, or SuppressionView ignores them all."""
    class Noisy(Core):
        probability = staticmethod(lambda w: 0.9)  # every window an artifact: the episode opens

    values = np.random.default_rng(1).normal(0, 0.3, 60 * FS)
    chunks = [Chunk("p0", "II", START + j * NS, float(FS), values[j * FS:(j + 1) * FS], j, START) for j in range(60)]
    log = Log({0: [Record(j, "p0", c, False) for j, c in enumerate(chunks)], 1: []})
    core = Noisy(log, loop)
    core.assign(0)
    core.poll(0, 25)
    core.publish(10)
    core.checkpoint()
    assert [m["state"] for m in log.episodes] == ["open"]
    log.changelog[0].clear()  # the state is lost
    core.kill()
    core = Noisy(log, loop)
    core.clock_s -= 1800
    core.assign(0)
    core.poll(0, 60)
    core.close_all()
    core.publish(10)
    seqs = [m["seq"] for m in log.episodes]
    assert len(seqs) >= 2 and seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
