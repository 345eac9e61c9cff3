"""The per-record and per-window helpers the profile found hot, rewritten for speed: each must give what the
plain version gave. And the latency split and the stage profile the benchmarks report."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.budget import examples

from benchmarks.bench_e2e import histogram_quantile
from benchmarks.profile_stages import IDLE, fold, stage_of, table
from streamer.delivery.event_time import ClockOffset
from streamer.delivery import AwaitingCommit
from streamer.metrics import FLAG_STEPS, IngestCounts, Metrics
from streamer.windows.buffer import AcceptResult


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@settings(max_examples=examples(200), deadline=None)
@given(st.lists(st.tuples(st.floats(0, 30), st.integers(-5_000, 5_000)), min_size=1, max_size=60),
       st.floats(1, 60))
def test_clock_offset_is_the_minimum_over_its_window(steps, window_s):
    """A sliding-window minimum kept in O(1) per fetch equals the plain min over the window's samples."""
    mono, wall = _Clock(), _Clock()
    offsets = ClockOffset(warn_s=1e9, window_s=window_s, clock=wall, monotonic=mono)
    seen: list[tuple[float, float]] = []
    for advance, lag_ms in steps:
        mono.t += advance
        wall.t = 1_800_000_000.0 + mono.t
        newest_ms = int(wall.t * 1000) - lag_ms
        offsets.observe(newest_ms)
        seen.append((mono.t, wall.t - newest_ms / 1000))
        expected = min(o for t, o in seen if t >= mono.t - window_s)
        assert offsets.offset_s == expected


def test_flag_steps_are_exported_from_the_start_and_committed_only_once():
    m = Metrics()
    text = m.render().decode()
    for step in FLAG_STEPS:
        assert f'streamer_flag_step_seconds_count{{step="{step}"}} 0.0' in text
    steps = m.flag_steps
    awaiting = AwaitingCommit(on_committed=steps.committed)  # the outputs' record of flags in open transactions
    awaiting.add("p0", 10.0)
    awaiting.add("p0", 10.0)
    awaiting.add("p1", 10.0)
    assert awaiting.event.is_set() and awaiting.take_partitions() == {"p0", "p1"} and not awaiting.event.is_set()
    joined = awaiting.take("p0")
    assert joined == [10.0, 10.0] and awaiting.take("p0") == []
    steps.committed(joined, 10.125)
    awaiting.forget("p1")  # dropped with its partition: never observed
    assert awaiting.take("p1") == []
    text = m.render().decode()
    assert 'streamer_flag_step_seconds_count{step="committed"} 2.0' in text
    assert 'streamer_flag_step_seconds_bucket{le="0.1",step="committed"} 0.0' in text
    assert 'streamer_flag_step_seconds_bucket{le="0.15",step="committed"} 2.0' in text


def test_ingest_counts_reach_their_counters_at_each_flush_and_only_then():
    m = Metrics()
    counts = IngestCounts(m)
    for result in (AcceptResult([], new_samples=125), AcceptResult([], duplicate_samples=125),
                   AcceptResult([], new_samples=100, late_samples=25, implausible_samples=3)):
        counts.messages += 1
        counts.accepted(result)
    counts.messages += 1  # a record refused before the window stage: counted, no samples
    assert "streamer_messages_total 0.0" in m.render().decode()
    counts.flush()
    counts.flush()  # nothing new: nothing added twice
    text = m.render().decode()
    for line in ("streamer_messages_total 4.0", "streamer_samples_total 225.0",
                 "streamer_duplicate_samples_total 125.0", "streamer_late_samples_total 25.0",
                 "streamer_implausible_samples_total 3.0"):
        assert line in text


def test_histogram_quantile_interpolates_within_a_bucket_as_prometheus_does():
    buckets = [(0.1, 0.0), (0.2, 50.0), (0.4, 100.0), (float("inf"), 100.0)]
    assert histogram_quantile(0.5, buckets) == 0.2
    assert abs(histogram_quantile(0.75, buckets) - 0.3) < 1e-9
    assert abs(histogram_quantile(0.25, buckets) - 0.15) < 1e-9
    assert histogram_quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None
    assert histogram_quantile(0.99, [(0.1, 0.0), (float("inf"), 4.0)]) == 0.1  # beyond the last bound


def test_stage_profile_charges_a_stack_to_its_most_specific_stage():
    model = ["_inference_loop (streamer/runtime/worker.py:1)", "__call__ (streamer/model/scoring.py:2)",
             "run (streamer/model/backends.py:3)"]
    assert stage_of(model) == "model"
    send = ["commit (streamer/delivery/exactly_once.py:1)", "send (aiokafka/producer/producer.py:2)"]
    assert stage_of(send) == "transactions and commits"
    assert stage_of(["_consume_loop (streamer/runtime/worker.py:1)", "decode (streamer/ingest/contract.py:5)"]) \
        == "decode"
    assert stage_of(["_run_once (asyncio/base_events.py:1)", "_process_events (selectors.py:1)"]) == "event loop"
    waiting = ["cmd_run (streamer/cli.py:116)", "_run_once (asyncio/base_events.py:1)",
               "EpollSelector.select (selectors.py:468)"]
    assert stage_of(waiting) == IDLE
    raw = ";".join(model) + " 7\n" + ";".join(send) + " 3\n" + ";".join(waiting) + " 5\nbroken line\n"
    assert fold(raw) == {"model": 7, "transactions and commits": 3, IDLE: 5}


def test_stage_table_leaves_the_idle_event_loop_out(tmp_path):
    raw = tmp_path / "profile.raw"
    raw.write_text("run (streamer/model/backends.py:3) 300\nEpollSelector.select (selectors.py:468) 700\n"
                   "decode (streamer/ingest/contract.py:5) 100\n")
    rows = table(raw, rate_hz=100, windows=10, records=400)
    assert [r[0] for r in rows] == ["model", "decode"]
    stage, ms_window, us_record, share = rows[0]
    assert (ms_window, us_record) == (300.0, 7500.0) and abs(share - 0.75) < 1e-9


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                     st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=3))
_NUMBERS = st.one_of(st.integers(-2**65, 2**65), st.floats(allow_nan=False, allow_infinity=False))


def _decoded(value: bytes, plain: bool):
    """What decode_json makes of `value`: the chunk's fields, or the refusal (reason and detail)."""
    import streamer.ingest.contract as contract

    skip = contract._plain_json
    if not plain:
        contract._plain_json = lambda raw, value: None
    try:
        c = contract.decode_json(value)
        return (c.patient_id, c.lead, c.t0_ns, c.fs, c.samples.dtype.str, c.samples.tolist(), c.seq,
                c.segment_start_ns)
    except contract.InvalidMessage as exc:
        return exc.reason, exc.detail
    finally:
        contract._plain_json = skip


@settings(max_examples=examples(600), deadline=None)
@given(st.fixed_dictionaries(
    {"patient_id": st.one_of(st.text("abcdeghij-0123456789", max_size=130), st.text(max_size=130), _SCALARS),
     "lead": st.one_of(st.sampled_from(["II", "", "123456789"]), _SCALARS),
     "t0_ns": st.one_of(st.integers(0, 2**64), _SCALARS), "fs": st.one_of(st.integers(-5, 1000), _SCALARS),
     "samples": st.one_of(st.lists(_NUMBERS, max_size=6), st.lists(_SCALARS, max_size=4),
                          st.lists(st.lists(st.integers(), max_size=2), max_size=2), _SCALARS)},
    optional={"seq": st.one_of(st.integers(-2**65, 2**65), _SCALARS), "segment_start_ns": _SCALARS,
              "units": _SCALARS, "counts": _SCALARS, "other": _SCALARS}))
def test_the_plain_json_path_decides_exactly_as_the_json_model(doc):
    """decode_json checks the usual message without pydantic (a third of its cost): on any message, valid
    or not, it must accept the same chunks and refuse with the same reason and words as JsonChunk."""
    import json

    value = json.dumps(doc).encode()  # the standard library: integers past 64 bits too
    assert _decoded(value, plain=True) == _decoded(value, plain=False), doc


def test_the_usual_json_message_takes_the_plain_path_and_a_boolean_does_not():
    import orjson

    from streamer.ingest.contract import _plain_json

    doc = {"patient_id": "bed-7", "lead": "II", "t0_ns": 1_795_000_000_000_000_000, "fs": 500.0,
           "samples": [0.1, -0.25, 1], "seq": 3}
    value = orjson.dumps(doc)
    chunk = _plain_json(orjson.loads(value), value)
    assert chunk is not None and chunk.samples.tolist() == [0.1, -0.25, 1.0] and chunk.peak_mv == 1.0
    for odd in ({"samples": [0.1, True]}, {"samples": [0.1, False]}, {"patient_id": "bed-fu"},
                {"units": "uV"}, {"samples": [0.1, None]}):
        value = orjson.dumps({**doc, **odd})
        assert _plain_json(orjson.loads(value), value) is None, odd  # JsonChunk decides those


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("at", [0, 61, 124])
def test_one_non_finite_sample_anywhere_is_refused_through_the_single_peak_pass(bad, at):
    """The finite check reads Chunk.peak_mv (numpy's abs then max): that must carry a NaN or an infinity
    from any position, first, middle or last, as np.isfinite(...).all() did."""
    import time

    from streamer.ingest.contract import Chunk, InvalidMessage, decode, encode_binary
    from streamer.settings import WindowSettings

    samples = np.linspace(-1.0, 1.0, 125)
    assert Chunk("bed-1", "II", 1, 500.0, samples).peak_mv == 1.0
    samples[at] = bad
    frame = encode_binary(Chunk("bed-1", "II", time.time_ns(), 500.0, samples))
    with pytest.raises(InvalidMessage) as refused:
        decode(b"bed-1", frame, WindowSettings())
    assert refused.value.reason == "non_finite"
