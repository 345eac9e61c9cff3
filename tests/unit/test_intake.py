"""Issue 45, item 1: no record can stop its partition. The real per-record path of the worker
(runtime/intake.py: decode, the partition check, the window stage) meets arbitrary JSON values, raw bytes and
damaged binary frames; each record must end accepted, dropped by policy or dead-lettered with a reason, the
call never raises, and the beds around it go on being windowed. Also the patient cap (item 2) through the
same path: ids beyond windows.max_patients are dead letters, the beds already streaming keep streaming."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from aiokafka.structs import ConsumerRecord, TopicPartition
from hypothesis import HealthCheck, given, settings, strategies as st
from tests.budget import examples
from streamer_client.frames import HEADER

from streamer.checkpointing import OffsetsLedger
from streamer.ingest.contract import Chunk, encode_binary, encode_json
from streamer.ingest.partitioning import PartitionerWatch
from streamer.metrics import IngestCounts, Metrics
from streamer.runtime.intake import Intake, Outcome
from streamer.settings import Settings
from streamer.partitions import OwnedPartitions
from streamer.state.store import StateStore
from streamer.synthetic import generate
from streamer.windows.stage import WindowStage

TP = TopicPartition("ecg.lead2", 0)
START = 1_795_000_000_000_000_000
FS = 500


class Path:
    """The worker's per-record path, built as Worker builds it, with the dead letters and windows kept."""

    def __init__(self, **windows):
        self.settings = Settings(windows=windows) if windows else Settings()
        metrics = Metrics()
        owned = OwnedPartitions()  # the worker's registry: TP assigned
        owned.open(TP)
        self.stage = WindowStage(self.settings.windows, StateStore(owned=owned))
        self.ledger = OffsetsLedger(owned)
        self.dead: list[tuple[object, str, str]] = []
        self.windows = []
        self.intake = Intake(self.settings, self.ledger, self.stage, IngestCounts(metrics), metrics,
                             PartitionerWatch("murmur2", [TP.topic], metrics.partitioner_mismatch),
                             lambda tp, record, reason, detail: self.dead.append((record, reason, detail)),
                             self.windows.append)
        self.offset = 0

    def feed(self, key: bytes | None, value: bytes | None, now: float = 0.0) -> tuple[ConsumerRecord, Outcome]:
        record = ConsumerRecord(TP.topic, TP.partition, self.offset, 0, 0, key, value, None, 0,
                                len(value or b""), ())
        self.offset += 1
        outcome = self.intake.ingest(TP, record, now, 1)  # one partition: every key's home, the check runs
        return record, outcome

    def dead_reasons(self, record) -> list[str]:
        return [reason for r, reason, _ in self.dead if r is record]


def _healthy(pid: str, seconds: float, encode=encode_json):
    values = generate(seconds, fs=FS, seed=7).values
    for i in range(0, len(values), FS // 2):
        chunk = Chunk(pid, "II", START + i * 10**9 // FS, float(FS), values[i:i + FS // 2], None, START)
        yield pid.encode(), encode(chunk)


def _deep(depth: int) -> bytes:
    return b'{"patient_id": "p", "lead": "II", "t0_ns": %d, "fs": 500, "samples": [1, %s2%s]}' % (
        START, b"[" * depth, b"]" * depth)


REPRODUCED = {  # the two records: each killed the consume task (ValueError from np.array)
    "ragged": b'{"patient_id": "bed-x", "lead": "II", "t0_ns": %d, "fs": 500, "samples": [1,[2]]}' % START,
    "nested 65": _deep(65),
    "nested 1999": _deep(1999),
}


@pytest.mark.parametrize("name", sorted(REPRODUCED))
def test_the_records_that_stopped_a_partition_are_dead_letters_and_the_beds_go_on(name):
    path = Path()
    healthy = list(_healthy("bed-1", 21.0))
    for key, value in healthy[:4]:
        path.feed(key, value)
    key = b"bed-x" if name == "ragged" else b"p"
    record, outcome = path.feed(key, REPRODUCED[name])
    assert outcome is Outcome.DEAD_LETTER
    assert path.dead_reasons(record) in (["invalid_field"], ["malformed_json"], ["undecodable"])
    for key, value in healthy[4:]:
        path.feed(key, value)
    assert [w.k for w in path.windows] == [0, 1], "the bed next to it is windowed as before"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=40)
FIELDS = ("patient_id", "lead", "t0_ns", "fs", "samples", "counts", "gain", "baseline", "units", "seq",
          "segment_start_ns")


@st.composite
def hostile_values(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "message", "binary", "deep"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "json":
        try:
            return orjson.dumps(draw(JSON), option=orjson.OPT_NON_STR_KEYS)
        except (orjson.JSONEncodeError, TypeError):
            return b"null"
    if kind == "deep":
        return _deep(draw(st.integers(1, 3000)))
    if kind == "message":  # a plausible message with some fields replaced by anything
        doc = {"patient_id": "p", "lead": "II", "t0_ns": START, "fs": 500, "samples": [0.1, 0.2, 0.3]}
        for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
            doc[name] = draw(JSON)
        try:
            return orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS)
        except (orjson.JSONEncodeError, TypeError):  # integers past 64 bits: as text, which orjson refuses
            return repr(doc).encode()
    # a binary frame: a valid one, then header fields overwritten with anything
    frame = bytearray(encode_binary(Chunk("p", "II", START, 500.0, np.linspace(-1, 1, 50)),
                                    counts_gain=draw(st.sampled_from([None, 200.0]))))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(frame) - 1))
        frame[at:at + 8] = draw(st.binary(min_size=1, max_size=8))
    if draw(st.booleans()):
        frame = frame[:draw(st.integers(0, len(frame)))]
    return bytes(frame)


@settings(max_examples=examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=st.lists(st.tuples(st.sampled_from([None, b"p", b"bed-1", b"\xff\xfe", "p" * 200]), hostile_values()),
                        min_size=1, max_size=12))
def test_any_record_is_accepted_dropped_or_a_dead_letter_never_a_crash(records):
    """The real path (Intake -> decode -> WindowStage): whatever a record holds, `ingest` returns, and a
    record it refuses is a dead letter with a reason; a healthy bed around the hostile records is windowed."""
    path = Path()
    healthy = list(_healthy("bed-1", 21.0, encode=encode_binary))
    stream = iter(healthy)
    for key, value in records:
        key = key.encode() if isinstance(key, str) else key
        record, outcome = path.feed(key, value)
        reasons = path.dead_reasons(record)
        if outcome is Outcome.DEAD_LETTER:
            assert reasons and all(isinstance(r, str) and r for r in reasons)
            assert "internal_error" not in reasons, "decode refused it with a reason of its own, not as a bug"
        else:
            assert outcome in (Outcome.ACCEPTED, Outcome.DROPPED) and not reasons
        for key2, value2 in [next(stream, (None, None))]:
            if value2 is not None:
                path.feed(key2, value2)
    for key2, value2 in stream:
        path.feed(key2, value2)
    bed = [w for w in path.windows if w.patient_id == "bed-1"]
    assert [w.k for w in bed] == [0, 1], "hostile records around it change nothing for the healthy bed"


def test_binary_header_with_huge_counts_is_refused_before_any_allocation():
    """A frame whose header claims 2**32-1 samples is refused on its length, not allocated."""
    frame = bytearray(encode_binary(Chunk("p", "II", START, 500.0, np.zeros(10))))
    fields = list(HEADER.unpack_from(frame))
    fields[10] = 2**32 - 1  # n_samples
    frame[:HEADER.size] = HEADER.pack(*fields)
    record, outcome = Path().feed(b"p", bytes(frame))
    assert outcome is Outcome.DEAD_LETTER


# -- the patient cap (item 2) ----------------------------------------------------------------------------
def test_ids_beyond_the_patient_cap_are_dead_letters_and_streaming_beds_keep_streaming():
    path = Path(max_patients=3)
    beds = {pid: list(_healthy(pid, 21.0)) for pid in ("bed-1", "bed-2")}
    for i in range(3):
        for pid in beds:
            path.feed(*beds[pid][i])
    refused = []
    for n in range(50):  # a flood of new ids: one fits under the cap, the rest are refused
        record, outcome = path.feed(f"flood-{n}".encode(), encode_json(Chunk(
            f"flood-{n}", "II", START, 500.0, np.zeros(50), None, START)))
        if outcome is Outcome.DEAD_LETTER:
            refused.append(path.dead_reasons(record))
    assert refused == [["too_many_patients"]] * 49
    assert path.stage.patients() == 3
    for i in range(3, len(beds["bed-1"])):
        for pid in beds:
            path.feed(*beds[pid][i])
    assert sorted((w.patient_id, w.k) for w in path.windows) == [("bed-1", 0), ("bed-1", 1), ("bed-2", 0),
                                                                   ("bed-2", 1)]
    assert path.stage.patients() == 3, "the provisional flood stream still holds its place until it goes idle"


def test_a_flood_of_one_record_ids_leaves_no_state_and_no_flag_when_it_goes_idle():
    """Each id of a flood sends one record and goes silent: its stream never sets a timeline. Idle
    eviction drops it with its record as a dead letter (no_timeline): no window is reported, no state kept."""
    path = Path(idle_evict_s=5.0)
    for n in range(200):
        path.feed(f"flood-{n}".encode(), encode_json(Chunk(f"flood-{n}", "II", START, 500.0, np.zeros(50))))
    assert path.stage.patients() == 200 and path.stage.store.count() == 0
    path.stage.flowing([TP], 10.0)
    assert path.stage.evict(10.0) == []
    rejected = path.stage.take_rejected()
    assert len(rejected) == 200 and {reason for _, _, reason, _ in rejected} == {"no_timeline"}
    assert path.stage.patients() == 0 and path.stage.store.count() == 0 and not path.stage.streams


def test_at_the_cap_idle_states_are_forgotten_early_but_never_a_streaming_bed_or_an_open_episode():
    store = StateStore(clock=lambda: 1000.0)
    store.owned.open(0)
    for pid in ("idle-old", "idle-new", "open", "busy"):
        store.patient(0, pid).seen_at_s = {"idle-old": 100.0, "idle-new": 900.0}.get(pid, 50.0)
    store.states_of(0)["open"].episode.open_start_ns = START
    gone = store.reclaim(10, now=1000.0, min_idle_s=60.0, busy=lambda p, pid: pid == "busy")
    assert gone == [(0, "idle-old"), (0, "idle-new")]
    assert sorted(store.states_of(0)) == ["busy", "open"]
    assert store.take_expired([0]) == {0: ["idle-new", "idle-old"]}, "their tombstones go out"



def test_a_state_forgotten_early_leaves_its_episode_number_as_the_floor():
    """Review of issue 45: a state reclaimed (or expired) and made again must number its episode messages
    above every one readers saw, or they would ignore the bed's next open and close."""
    store = StateStore(clock=lambda: 1000.0)
    store.load(store.owned.open(0), {}, {"bed-1": 500})
    st = store.patient(0, "bed-1")
    st.episode.seq += 40  # messages 501..540 published
    st.seen_at_s = 100.0
    assert store.reclaim(1, now=1000.0, min_idle_s=60.0, busy=lambda p, pid: False) == [(0, "bed-1")]
    assert store.patient(0, "bed-1").episode.seq == 540
    store.states_of(0)["bed-1"].episode.seq = 560
    store.states_of(0)["bed-1"].seen_at_s = 0.0
    assert store.expire_idle(0, now=1000.0, ttl_s=60.0, busy=lambda pid: False) == ["bed-1"]
    assert store.patient(0, "bed-1").episode.seq == 560


def test_provisional_streams_of_new_ids_never_make_a_paused_beds_state_go():
    """At the cap because of a flood of one-record ids, the upkeep forgets no state: a bed silent for a
    minute (lead off) keeps its state and is not refused when it comes back."""
    from streamer.runtime.upkeep import Upkeep

    path = Path(max_patients=20, idle_evict_s=60.0)
    for key, value in list(_healthy("bed-1", 4.0))[:3]:  # a timeline, so a state; then it pauses
        path.feed(key, value, now=0.0)
    for t in range(5, 66, 5):  # fetched and caught up: silence there is time passing
        path.stage.flowing([TP], float(t))
    path.stage.evict(65.0)  # silent a minute while its partition flowed: its stream is closed, its state kept
    assert (TP, "bed-1") not in path.stage.streams and path.stage.store.lookup(TP, "bed-1") is not None
    path.stage.store.patient(TP, "bed-1").seen_at_s = 0.0  # changed long ago
    for n in range(40):
        path.feed(f"flood-{n}".encode(), encode_json(Chunk(f"flood-{n}", "II", START, 500.0, np.zeros(50))),
                  now=66.0)
    assert path.stage.patients() == 20
    upkeep = Upkeep(path.settings, {TP}, path.stage, path.ledger, path.stage.store, Metrics(), None, None, None,
                    submit=path.windows.append, paused=lambda: False, clock=lambda: 10_000.0)
    upkeep.make_room()
    assert path.stage.store.lookup(TP, "bed-1") is not None, "the paused bed's state is kept"
    path.stage.forget_acknowledged()
    for key, value in list(_healthy("bed-1", 4.0))[3:5]:
        record, outcome = path.feed(key, value, now=67.0)
        assert outcome is Outcome.ACCEPTED, path.dead_reasons(record)
