"""Issue 48, item 3: a fetch decoded in bulk. `decode_many` converts the samples of a fetch's binary frames in
one numpy pass per sample type and finds their peaks in one reduction (JSON messages stay record by record:
in bulk they measured no faster); `Intake.ingest_batch` settles the records one by one in offset order.
Both must be indistinguishable from the per-record path: the same Chunks bit for bit (float64 samples,
peaks, timestamps), the same refusals with the same reason and detail, the same outcomes, dead letters,
windows and counts, in the same order; random mixes of valid, damaged and hostile records drive the real
path (Intake -> decode_many -> WindowStage)."""

from __future__ import annotations

import math

import numpy as np
import orjson
from aiokafka.structs import ConsumerRecord
from hypothesis import HealthCheck, given, settings, strategies as st
from tests.budget import examples
from streamer_client.frames import HEADER

from streamer.ingest.contract import Chunk, InvalidMessage, decode, decode_many, encode_binary
from tests.unit.test_intake import START, TP, Path, _healthy, hostile_values

NOW_NS = START + 3_600 * 10**9
PIDS = ("bed-1", "bed-2", "bed-3")


def _one(key, value, ws, now_ns=NOW_NS):
    try:
        return decode(key, value, ws, now_ns)
    except InvalidMessage as exc:
        return exc


def assert_same_outcome(a, b) -> None:
    """A per-record outcome `a` (decode) and a bulk one `b` (decode_many) are the same, bit for bit."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, InvalidMessage):
        assert (a.reason, a.detail) == (b.reason, b.detail)
        return
    assert (a.patient_id, a.lead, a.t0_ns, a.fs, a.seq, a.segment_start_ns) == (
        b.patient_id, b.lead, b.t0_ns, b.fs, b.seq, b.segment_start_ns)
    assert (type(a.t0_ns), type(a.fs)) == (type(b.t0_ns), type(b.fs))
    assert a.samples.dtype == b.samples.dtype == np.float64
    assert a.samples.shape == b.samples.shape and a.samples.tobytes() == b.samples.tobytes()
    assert a.peak_mv == b.peak_mv or (math.isnan(a.peak_mv) and math.isnan(b.peak_mv))
    assert b.samples.flags.owndata, "a held chunk must keep only its own samples alive, not the fetch's"


# -- the records -------------------------------------------------------------------------------------------
SAMPLE_SPOILERS = ["text", None, [1.0], True, 2**63 + 12345, 2**64 + 1, -(2**63) - 1, 2**53 + 1, 1e308, -0.0]


@st.composite
def samples_of(draw, n: int) -> np.ndarray:
    values = np.random.default_rng(draw(st.integers(0, 2**32))).normal(0, 0.5, n) * draw(
        st.sampled_from([1.0, 1.0, 1000.0, 1e40]))  # 1e40: past float32 (inf), implausible amplitudes
    if n and draw(st.integers(0, 5)) == 0:
        values[draw(st.integers(0, n - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 40.0]))
    return values


@st.composite
def frame_records(draw, pid: str, t0: int, n: int) -> bytes:
    chunk = Chunk(pid, draw(st.sampled_from(["II", "II", "II", "V1"])), t0, draw(
        st.sampled_from([500.0, 500.0, 250.0, 0.5, math.nan])), draw(samples_of(n)),
        draw(st.none() | st.integers(0, 10**6)), draw(st.sampled_from([None, START, START - 10**9, 0])))
    with np.errstate(all="ignore"):
        if draw(st.booleans()):
            return encode_binary(chunk)
        gain = draw(st.sampled_from([200.0, 200.0, 1000.0, -200.0, 0.0, math.nan, math.inf, 1e-300, 1e9]))
        baseline = draw(st.sampled_from([0.0, 0.0, 3.5, -12.0, math.nan, math.inf]))
        frame = bytearray(encode_binary(chunk, counts_gain=200.0, baseline=0.0))
    fields = list(HEADER.unpack_from(frame))
    fields[8], fields[9] = gain, baseline
    frame[:HEADER.size] = HEADER.pack(*fields)
    return bytes(frame)


def damaged(frame: bytes, how: str, draw) -> bytes:
    fields = list(HEADER.unpack_from(frame))
    if how == "truncated":
        return frame[:draw(st.integers(0, len(frame) - 1))]
    if how == "magic":
        return b"ECG2" + frame[4:]
    if how == "length":
        fields[10] = max(0, fields[10] + draw(st.sampled_from([-3, -1, 1, 7])))
    elif how == "huge":
        fields[10] = 2**32 - 1
    elif how == "version":
        fields[1] = 2
    elif how == "dtype":
        fields[2] = 9
    elif how == "id":
        return frame[:HEADER.size] + b"\xff" + frame[HEADER.size + 1:]
    return HEADER.pack(*fields) + frame[HEADER.size:]


@st.composite
def json_record(draw, pid: str, t0: int, n: int) -> bytes:
    samples = draw(samples_of(n))
    doc: dict = {"patient_id": pid, "lead": draw(st.sampled_from(["II", "II", "II", "aVR"])), "t0_ns": t0,
                 "fs": draw(st.sampled_from([500, 500.0, 250, 10**6]))}
    shape = draw(st.sampled_from(["floats", "floats", "ints", "spoiled", "counts", "uV", "extra"]))
    if shape == "ints":
        doc["samples"] = [int(x) for x in np.nan_to_num(samples * 1000, posinf=1e18, neginf=-1e18)]
    else:
        doc["samples"] = [float(x) if math.isfinite(x) else 0.0 for x in samples]
    if shape == "spoiled" and n:
        doc["samples"][draw(st.integers(0, n - 1))] = draw(st.sampled_from(SAMPLE_SPOILERS))
    elif shape == "counts":
        doc["counts"] = [int(x) for x in np.clip(np.nan_to_num(samples * 200), -32768, 32767)]
        del doc["samples"]
        doc["gain"] = draw(st.sampled_from([200, 200.0, 0, 1e-300]))
    elif shape == "uV":
        doc["units"] = draw(st.sampled_from(["uV", "mV", "V"]))
    elif shape == "extra":
        doc["note"] = "x"
    if draw(st.booleans()):
        doc["seq"] = draw(st.integers(0, 2**40))
    if draw(st.booleans()):
        doc["segment_start_ns"] = START
    try:
        return orjson.dumps(doc)
    except orjson.JSONEncodeError:  # integers past 64 bits: written as JSON text by hand
        return repr(doc).replace("'", '"').replace("None", "null").replace("True", "true").encode()


@st.composite
def one_record(draw) -> tuple[bytes | None, bytes | None]:
    pid = draw(st.sampled_from(PIDS))
    t0 = draw(st.sampled_from([START + draw(st.integers(0, 80)) * 250_000_000, 0, NOW_NS + 10**15]))
    n = draw(st.sampled_from([0, 1, 125, 125, 125, draw(st.integers(0, 400)), 60_000]))
    kind = draw(st.sampled_from(["frame", "frame", "frame", "json", "json", "damaged", "hostile", "none"]))
    if kind == "frame":
        value = draw(frame_records(pid, t0, n))
    elif kind == "json":
        value = draw(json_record(pid, t0, n))
    elif kind == "damaged":
        how = draw(st.sampled_from(["truncated", "magic", "length", "huge", "version", "dtype", "id"]))
        value = damaged(draw(frame_records(pid, t0, max(n, 2))), how, draw)
    elif kind == "hostile":
        value = draw(hostile_values())
    else:
        value = None
    key = draw(st.sampled_from([pid.encode()] * 6 + [None, b"bed-9", b"\xff\xfe", pid.encode() + b" "]))
    return key, value


RECORDS = st.lists(one_record(), min_size=1, max_size=30)


# -- decode_many is decode, record by record ---------------------------------------------------------------
@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.data_too_large])
@given(records=RECORDS)
def test_decode_many_gives_each_record_what_decode_gives_it(records):
    ws = Path().settings.windows
    bulk = decode_many(records, ws, NOW_NS)
    assert len(bulk) == len(records)
    for (key, value), b in zip(records, bulk):
        assert_same_outcome(_one(key, value, ws), b)


def test_the_usual_fetch_takes_the_bulk_path_and_equals_decode():
    """A partition's fetch as monitors send it (three beds, float32, int16 and JSON interleaved): every
    record a Chunk, each equal to decode's bit for bit and owning its samples."""
    ws = Path().settings.windows
    encoders = [lambda c: encode_binary(c), lambda c: encode_binary(c, counts_gain=200.0, baseline=2.0),
                lambda c: orjson.dumps({"patient_id": c.patient_id, "lead": "II", "t0_ns": c.t0_ns, "fs": 500,
                                        "samples": c.samples.tolist(), "seq": 3})]
    streams = [list(_healthy(pid, 5.0, encode=encoders[i])) for i, pid in enumerate(PIDS)]
    records = [r for group in zip(*streams) for r in group]
    bulk = decode_many(records, ws, NOW_NS)
    assert all(type(b) is Chunk for b in bulk)
    for (key, value), b in zip(records, bulk):
        assert_same_outcome(_one(key, value, ws), b)


def test_one_spoiled_json_list_leaves_every_record_its_own_outcome():
    """A sample list numpy does not hold as plain numbers (text, nested, null, past 64 bits) goes to JsonChunk
    as alone, and is refused as alone; the messages around it stay Chunks as alone."""
    ws = Path().settings.windows
    good = [orjson.dumps({"patient_id": "p", "lead": "II", "t0_ns": START, "fs": 500, "samples": [0.1, 2, 0.3]})]
    for spoiler in (b'[1, [2]]', b'["1.5"]', b"[null]", b"[18446744073709551617]", b"[[1.0], [2.0]]"):
        value = b'{"patient_id": "p", "lead": "II", "t0_ns": %d, "fs": 500, "samples": %s}' % (START, spoiler)
        records = [(b"p", good[0]), (b"p", value), (b"p", good[0])]
        bulk = decode_many(records, ws, NOW_NS)
        for (key, v), b in zip(records, bulk):
            assert_same_outcome(_one(key, v, ws), b)
        assert type(bulk[0]) is Chunk and type(bulk[2]) is Chunk


def test_integers_past_int64_beside_floats_decode_as_alone():
    """[2**63 + k] is uint64 to numpy (JsonChunk's path), [0.5, 2**53 + 1] float64 (the plain path): in one
    fetch each keeps its own path and values."""
    ws = Path().settings.windows
    records = [(b"p", b'{"patient_id": "p", "lead": "II", "t0_ns": %d, "fs": 500, "samples": [%d, %d]}'
                % (START, 2**63 + 12345, 2**64 - 1)),
               (b"p", b'{"patient_id": "p", "lead": "II", "t0_ns": %d, "fs": 500, "samples": [0.5, 9007199254740993]}'
                % START)]
    bulk = decode_many(records, ws, NOW_NS)
    for (key, value), b in zip(records, bulk):
        assert_same_outcome(_one(key, value, ws), b)


# -- Intake.ingest_batch is Intake.ingest, record by record -------------------------------------------------
def _consumer_records(pairs, first_offset: int = 0) -> list[ConsumerRecord]:
    return [ConsumerRecord(TP.topic, TP.partition, first_offset + i, 0, 0, key, value, None, 0,
                           len(value or b""), ()) for i, (key, value) in enumerate(pairs)]


def _run(pairs, cuts: list[int] | None, partitions: int, **windows):
    """Every record through a fresh worker path: one by one (cuts None) or as fetches cut at `cuts`."""
    path = Path(**windows)
    records = _consumer_records(pairs)
    outcomes = []
    if cuts is None:
        for record in records:
            outcomes.append(path.intake.ingest(TP, record, 0.0, partitions))
    else:
        for a, b in zip([0, *cuts], [*cuts, len(records)]):
            outcomes.extend(path.intake.ingest_batch(TP, records[a:b], 0.0, partitions))
    counts = path.intake.counts
    dropped = path.intake.metrics.dropped.labels("wrong_lead")._value.get()
    windows = [(w.patient_id, w.k, w.status, w.reason, None if w.samples is None else w.samples.tobytes(),
                w.missing, w.interpolated, w.min_offset) for w in path.windows]
    return {"outcomes": outcomes, "dead": [(r.offset, reason, detail) for r, reason, detail in path.dead],
            "windows": windows, "dropped": dropped, "patients": path.stage.patients(),
            "counts": (counts.messages, counts.samples, counts.duplicate, counts.late, counts.implausible)}


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.data_too_large])
@given(records=RECORDS, data=st.data())
def test_a_batch_ends_every_record_as_one_by_one(records, data):
    """Drawn records among two healthy beds (binary and JSON, so windows complete), cut into fetches:
    outcomes, dead letters (reason, detail, order), windows, drops and counts equal the per-record path's."""
    bed1 = list(_healthy("calm-2", 21.0, encode=encode_binary))  # calm-2, calm-3: home 0 of 1 or 2 partitions
    bed2 = list(_healthy("calm-3", 21.0))
    stream = [r for pair in zip(bed1, bed2) for r in pair]
    for key, value in records:
        stream.insert(data.draw(st.integers(0, len(stream))), (key, value))
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=6))))
    partitions = data.draw(st.sampled_from([1, 1, 2]))  # 2: bed-3's home is partition 1 (murmur2)
    windows = data.draw(st.sampled_from([{}, {"unknown_lead": "drop"}]))
    one_by_one = _run(stream, None, partitions, **windows)
    batched = _run(stream, cuts, partitions, **windows)
    assert batched == one_by_one
    # the healthy beds' home is partition 0 either way: the drawn records around them change nothing for them
    assert [w[:2] for w in batched["windows"] if w[0].startswith("calm")] == [
        ("calm-2", 0), ("calm-3", 0), ("calm-2", 1), ("calm-3", 1)]


def test_a_tombstone_a_wrong_lead_and_a_wrong_partition_in_one_fetch():
    """The named rules, each record settled as alone: tombstone `empty`, wrong lead dropped by policy,
    a key of another partition `wrong_partition` (bed-3's home of 2 is 1, murmur2), the records around them
    accepted."""
    healthy = list(_healthy("bed-1", 1.0, encode=encode_binary))
    wrong_lead = encode_binary(Chunk("bed-1", "V1", START, 500.0, np.zeros(125)))
    elsewhere = next(_healthy("bed-3", 1.0, encode=encode_binary))
    pairs = [healthy[0], (b"bed-1", None), (b"bed-1", wrong_lead), healthy[1], elsewhere]
    one_by_one = _run(pairs, None, 2, unknown_lead="drop")
    batched = _run(pairs, [], 2, unknown_lead="drop")
    assert batched == one_by_one
    assert [o.value for o in batched["outcomes"]] == ["accepted", "dead_letter", "dropped", "accepted", "dead_letter"]
    assert [reason for _, reason, _ in batched["dead"]] == ["empty", "wrong_partition"]
    assert batched["dropped"] == 1
