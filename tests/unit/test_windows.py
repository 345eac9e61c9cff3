"""Stream windows equal docs/preprocessing.md's offline segmentation, whatever the chunking, duplication or order."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from tests.budget import examples

from streamer.ingest.contract import Chunk
from streamer.ingest.producer import chunks_of
from streamer.offline.recordings import regular_times
from streamer.settings import WindowSettings
from streamer.synthetic import generate
from streamer.windows.buffer import INSUFFICIENT, SCORABLE, PatientStream, fill_gaps
from streamer.windows.grid import WindowGrid, as_rate, nearest_index
from streamer.windows.segmentation import segment
from streamer.windows.stage import WindowStage

START = 1_795_000_000_000_000_000


def run_stream(chunks, settings=None, offsets=None):
    stream = PatientStream("p1", 0, settings or WindowSettings())
    out = []
    for i, c in enumerate(chunks):
        out.extend(stream.accept(c, offsets[i] if offsets else i, now=float(i)).windows)
    return out, stream


def recording(fs, seconds, seed=0):
    rec = generate(seconds, fs=fs, seed=seed)
    return regular_times(len(rec.values), fs, START), rec.values


def offline(times, values, overlap_s=0.0):
    return [(w.start_ns, values[w.first:w.stop]) for w in segment(times, 10.0, overlap_s)]


@pytest.mark.parametrize("fs", [500, 360, 250, 1000, 128.5])
@pytest.mark.parametrize("overlap_s", [0.0, 2.5])
def test_stream_equals_offline_segmentation(fs, overlap_s):
    times, values = recording(fs, 63.3)
    want = offline(times, values, overlap_s)
    got, _ = run_stream(chunks_of("p1", times, values, chunk_samples=int(fs * 0.25), fs=fs),
                        WindowSettings(overlap_s=overlap_s))
    assert [w.start_ns for w in got] == [s for s, _ in want]
    for w, (_, x) in zip(got, want):
        assert w.status == SCORABLE
        np.testing.assert_array_equal(w.samples, x)
    assert len(want) == (6 if overlap_s == 0 else 8)  # starts every 7.5 s up to 52.5 s


def test_360hz_window_has_3600_samples_and_5000_after_resampling():
    from streamer.windows.resample import to_model_samples

    times, values = recording(360, 21)
    got, _ = run_stream(chunks_of("p1", times, values, 90, fs=360))
    assert [len(w.samples) for w in got] == [3600, 3600]
    assert to_model_samples(got[0].samples).shape == (5000,)


@st.composite
def chunkings(draw):
    """Chunks of 1 sample to 1 s, some sent twice, shuffled within groups of 3 (late by at most 2 s)."""
    fs = draw(st.sampled_from([250, 360, 500]))
    n = int(fs * 31.7)
    lengths = draw(st.lists(st.integers(1, fs), min_size=1, max_size=200))
    bounds = [0]
    while bounds[-1] < n:
        bounds.append(min(n, bounds[-1] + lengths[len(bounds) % len(lengths)]))
    pieces = list(zip(bounds, bounds[1:]))
    dups = draw(st.lists(st.integers(0, len(pieces) - 1), max_size=10))
    order = sorted(list(range(len(pieces))) + dups)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    for g in range(0, len(order), 3):
        group = order[g:g + 3]
        rng.shuffle(group)
        order[g:g + 3] = group
    return fs, n, pieces, order


@hsettings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunkings())
def test_any_chunking_duplication_and_local_reordering_gives_identical_windows(case):
    fs, n, pieces, order = case
    times = regular_times(n, fs, START)
    values = np.random.default_rng(n).normal(size=n)
    settings = WindowSettings(reorder_tolerance_s=5.0)
    chunks = [Chunk("p1", "II", int(times[a]), float(fs), values[a:b], None, START) for a, b in pieces]
    got, _ = run_stream([chunks[i] for i in order], settings)
    want = offline(times, values)
    assert [(w.start_ns, w.status) for w in got] == [(s, SCORABLE) for s, _ in want]
    for w, (_, x) in zip(got, want):
        np.testing.assert_array_equal(w.samples, x)


def test_small_gap_is_interpolated_and_large_gap_is_insufficient():
    fs = 500
    times, values = recording(fs, 42)
    chunks = list(chunks_of("p1", times, values, 100, fs=fs))
    # window 0: drop 3 samples -> interpolated; window 1: drop a whole 100-sample chunk -> gap too long;
    chunks[5] = Chunk("p1", "II", chunks[5].t0_ns, fs, chunks[5].samples[:97], 5, START)
    del chunks[60]
    got, _ = run_stream(chunks)
    assert [w.status for w in got] == [SCORABLE, INSUFFICIENT, SCORABLE, SCORABLE]
    assert got[0].interpolated == 3 and got[1].reason == "gap_too_long" and got[1].missing == 100
    np.testing.assert_allclose(got[0].samples[597:600], np.interp([597, 598, 599], [596, 600],
                                                                  [values[596], values[600]]))


def test_lead_off_gap_emits_insufficient_windows_for_the_whole_gap():
    fs = 250
    times, values = recording(fs, 80)
    chunks = [c for c in chunks_of("p1", times, values, 250, fs=fs) if not 12 <= (c.t0_ns - START) / 1e9 < 47]
    got, _ = run_stream(chunks)
    assert [w.status for w in got] == [SCORABLE, INSUFFICIENT, INSUFFICIENT, INSUFFICIENT, INSUFFICIENT,
                                       SCORABLE, SCORABLE]
    assert got[2].reason == "no_data"


def test_late_data_beyond_tolerance_is_reported():
    fs = 500
    times, values = recording(fs, 30)
    chunks = list(chunks_of("p1", times, values, 500, fs=fs))
    stream = PatientStream("p1", 0, WindowSettings(reorder_tolerance_s=1.0))
    for i, c in enumerate(chunks[1:], start=1):
        stream.accept(c, i, 0.0)
    res = stream.accept(chunks[0], 99, 0.0)
    assert res.rejected == "late" and res.late_samples == 500


def test_duplicates_are_counted_and_ignored():
    fs = 500
    times, values = recording(fs, 12)
    chunks = list(chunks_of("p1", times, values, 500, fs=fs))
    stream = PatientStream("p1", 0, WindowSettings())
    for i in range(3):  # the provisional records that set the timeline
        stream.accept(chunks[i], i, 0.0)
    res = stream.accept(chunks[1], 3, 0.0)
    assert res.duplicate_samples == 500 and res.new_samples == 0 and not res.activity
    held = PatientStream("p1", 0, WindowSettings())
    held.accept(chunks[0], 0, 0.0)
    again = held.accept(chunks[0], 1, 0.0)  # a repeat while the stream is provisional: held, not activity
    assert again.held_samples == 0 and not again.activity and not again.dead_letters


def test_rate_change_starts_a_new_segment():
    times, values = recording(500, 25)
    first = list(chunks_of("p1", times, values, 500, fs=500))
    t2 = regular_times(360 * 25, 360, int(times[-1]) + 2_000_000)
    v2 = generate(25, fs=360, seed=3).values
    second = list(chunks_of("p1", t2, v2, 360, fs=360))
    got, _ = run_stream(first + second)
    assert [w.fs for w in got] == [500.0, 500.0, 500.0, 360.0, 360.0]
    assert got[2].status == INSUFFICIENT and got[2].reason == "truncated"
    assert got[3].start_ns == int(t2[0])


def test_restart_resumes_at_the_first_window_the_state_has_not_reported():
    """The replay starts before the state's first unreported window (the commit rule guarantees it):
    windows already reported are not reported again, their replayed samples are not 'late'."""
    from streamer.state.patients import PatientState

    fs = 500
    times, values = recording(fs, 40)
    chunks = list(chunks_of("p1", times, values, 300, fs=fs, segment_start_ns=START))
    state = PatientState("p1")
    state.reported(START, START, as_rate(fs), 1)  # windows 0 and 1 were reported before the restart
    stream = PatientStream("p1", 0, WindowSettings(), state)
    results = [stream.accept(c, i, 0.0) for i, c in enumerate(chunks[30:], start=30)]  # from 18 s
    got = [w for r in results for w in r.windows]
    assert [w.start_ns for w in got] == [s for s, _ in offline(times, values)[2:]]
    assert got[0].status == SCORABLE
    np.testing.assert_array_equal(got[0].samples, offline(times, values)[2][1])
    assert not any(r.rejected or r.late_samples for r in results)


@pytest.mark.parametrize("anchor", [START, None])
def test_a_restart_far_behind_the_state_reports_nothing_twice(anchor):
    """Offsets reset 20 minutes behind what the state says was reported (an operator's reprocessing, an
    expired commit): the replayed records are duplicates at any distance, never 'late', and never start a
    shifted grid; the first unreported window comes next, on the grid it always had."""
    from streamer.state.patients import PatientState

    fs, step = 500, 10 * 10**9
    chunks = _timeline(fs, 1300, START, anchor, chunk=250)
    natural = anchor or 0
    state = PatientState("p1")
    reported_k = (START - natural) // step + 119  # windows up to 20 minutes in were reported
    state.reported(natural, natural, as_rate(fs), reported_k)
    stream = PatientStream("p1", 0, WindowSettings(new_timeline_chunks=4), state)
    results = [stream.accept(c, i, 0.0) for i, c in enumerate(chunks)]
    got = [w for r in results for w in r.windows]
    assert not [r.rejected for r in results if r.rejected], "replayed records are not late"
    assert got and got[0].start_ns == natural + (reported_k + 1) * step, "nothing reported twice"
    assert all((w.start_ns - natural) % step == 0 for w in got), "the grid it always had"
    assert sum(r.duplicate_samples for r in results) == 1200 * fs


def test_leading_hole_is_reported_the_same_with_or_without_a_restart():
    """A monitor that joined mid-window, or whose first chunk was lost: the first window is reported
    (here with too many samples missing), never silently skipped."""
    from streamer.state.patients import PatientState

    fs = 500
    times, values = recording(fs, 31)
    chunks = list(chunks_of("p1", times, values, 250, fs=fs, segment_start_ns=START))[8:]  # first 4 s lost
    fresh, _ = run_stream(chunks)
    restarted = PatientStream("p1", 0, WindowSettings(), PatientState("p1"))
    again = [w for i, c in enumerate(chunks) for w in restarted.accept(c, i, 0.0).windows]
    assert [(w.start_ns, w.status, w.reason) for w in fresh] == [(w.start_ns, w.status, w.reason) for w in again]
    assert (fresh[0].start_ns, fresh[0].status, fresh[0].reason) == (START, INSUFFICIENT, "too_many_missing")
    assert [w.status for w in fresh[1:]] == [SCORABLE, SCORABLE]


def _timeline(fs, seconds, t_start, anchor, chunk=250, seed=0):
    t = regular_times(int(seconds * fs), fs, t_start)
    v = generate(seconds, fs=fs, seed=seed).values
    chunks = list(chunks_of("p1", t, v, chunk, fs=fs, segment_start_ns=anchor))
    if anchor is None:  # a gateway that does not send segment_start_ns
        chunks = [dataclasses.replace(c, segment_start_ns=None) for c in chunks]
    return chunks


@pytest.mark.parametrize("step_s", [7200, -3600])
def test_clock_step_starts_a_new_timeline_after_consistent_records(step_s):
    s = WindowSettings(new_timeline_chunks=4)
    before = _timeline(500, 25, START, START)
    t_step = START + 25 * 10**9 + step_s * 10**9
    after = _timeline(500, 35, t_step, START, seed=1)
    stream = PatientStream("p1", 0, s)
    results = [stream.accept(c, i, 0.0) for i, c in enumerate(before + after)]
    rejected = [r.rejected for r in results if r.rejected]
    assert rejected == ["timestamp_jump" if step_s > 0 else "late"] * 3, "three outliers, then the new timeline"
    got = [w for r in results for w in r.windows]
    old = [w for w in got if w.start_ns < START + 30 * 10**9 and w.anchor_ns == START]
    assert [(w.status, w.reason) for w in old] == [(SCORABLE, None), (SCORABLE, None), (INSUFFICIENT, "truncated")]
    new = [w for w in got if w.anchor_ns != START]
    assert new and all(w.anchor_ns == after[3].t0_ns for w in new)  # re-anchored at the confirming record
    assert [w.status for w in new] == [SCORABLE, SCORABLE, SCORABLE]
    assert not {w.start_ns for w in new} & {w.start_ns for w in old}


def test_a_lone_outlier_never_moves_the_grid():
    chunks = _timeline(500, 41, START, START)
    outlier = Chunk("p1", "II", START + 1800 * 10**9, 500.0, np.zeros(250), None, START)  # dated +30 min
    stream = PatientStream("p1", 0, WindowSettings())
    results = [stream.accept(c, i, 0.0) for i, c in enumerate(chunks[:40])]
    bad = stream.accept(outlier, 40, 0.0)
    results += [stream.accept(c, i, 0.0) for i, c in enumerate(chunks[40:], start=41)]
    assert bad.rejected == "timestamp_jump" and not bad.windows
    got = [w for r in results for w in r.windows]
    assert [w.status for w in got] == [SCORABLE] * 4
    assert not any(r.rejected for r in results)


def test_unresolved_off_timeline_records_hold_the_commit():
    chunks = _timeline(500, 12, START, START)
    stream = PatientStream("p1", 0, WindowSettings(new_timeline_chunks=4))
    for i, c in enumerate(chunks[:10]):
        stream.accept(c, 100 + i, 0.0)
    stream.accept(Chunk("p1", "II", START + 7200 * 10**9, 500.0, np.zeros(250), None, START), 7, 0.0)
    assert stream.min_open_offset() == 7  # the candidate must be re-read after a restart
    stream.accept(chunks[10], 110, 0.0)  # the old timeline goes on: one record is a tie, not yet a majority
    assert stream.min_open_offset() == 7
    stream.accept(chunks[11], 111, 0.0)  # two: the candidate is the minority, an outlier
    assert stream.min_open_offset() == 100


def test_a_minority_timeline_interleaved_from_the_first_records_is_left_for_the_majority():
    """Found by the delivery model: a new bed whose first records hold three contiguous copies dated +30 min
    (a second source, or a gateway re-dating some records) between its real ones, one real record repeated.
    The provisional group can only pick the copies; the real records that follow, most of the stream,
    must take the bed back instead of being dead-lettered `late` until the copies stop (30 min unmonitored)."""
    real = _timeline(500, 40, START, START, chunk=50)
    ahead = [dataclasses.replace(c, t0_ns=c.t0_ns + 1800 * 10**9) for c in real]
    arrivals = [real[0], ahead[0], real[0], real[1], ahead[1], ahead[2]]  # copies agree first: 3 to 2
    # 2.4 s lost, then a copy after every third real record: never four real records in a row
    arrivals += [x for i in range(26, len(real)) for x in ([real[i], ahead[i]] if i % 3 == 1 else [real[i]])]
    stream = PatientStream("p1", 0, WindowSettings())
    results = [stream.accept(c, i, 0.0) for i, c in enumerate(arrivals)]
    ahead_from = START + 1800 * 10**9
    real_scored = [k for k, r in enumerate(results) for w in r.windows
                   if w.status == SCORABLE and w.start_ns < ahead_from]
    assert len(real_scored) >= 2, [(w.start_ns - START, w.status) for r in results for w in r.windows]  # 10-40 s
    # once back, the copies (a quarter of the records) never take the bed again
    after = [w for r in results[real_scored[0]:] for w in r.windows]
    assert all(w.start_ns < ahead_from for w in after) and all(w.start_ns < ahead_from for w in stream.close(0.0))
    refused = [c for c, r in zip(arrivals[real_scored[0]:], results[real_scored[0]:]) if r.rejected]
    assert refused and all(c.t0_ns >= ahead_from for c in refused)  # the copies, dead-lettered (timestamp_jump)


def test_an_even_interleave_of_two_timelines_never_moves_the_grid():
    """Two sources for one bed, record by record (found by review: with a bare majority each side won in
    turn, 66 grid switches and no window scored). The stream keeps the timeline it had; the copies are
    dead-lettered, and its candidates stay bounded (4 x new_timeline_chunks)."""
    real = _timeline(500, 48, START, START, chunk=50)
    ahead = [dataclasses.replace(c, t0_ns=c.t0_ns + 1800 * 10**9) for c in real]
    arrivals = real[:10] + [x for i in range(10, len(real)) for x in (real[i], ahead[i])]
    stream = PatientStream("p1", 0, WindowSettings())
    results = [stream.accept(c, i, 0.0) for i, c in enumerate(arrivals)]
    windows = [w for r in results for w in r.windows]
    assert all(w.start_ns < START + 1800 * 10**9 for w in windows)
    assert sum(w.status == SCORABLE for w in windows) >= 3 and not any(w.reason == "truncated" for w in windows)
    assert all(r.rejected for c, r in zip(arrivals, results) if c.t0_ns >= START + 1800 * 10**9)
    assert len(stream.candidates) <= 4 * WindowSettings().new_timeline_chunks


@pytest.mark.parametrize("case", ["dropped_segment_start", "earlier_segment"])
def test_segment_changes_that_look_stale_start_a_segment_once_consistent(case):
    before = _timeline(500, 15, START, START)
    t1 = START + 15 * 10**9
    after = _timeline(500, 25, t1, None if case == "dropped_segment_start" else START - 10**9, seed=2)
    stream = PatientStream("p1", 0, WindowSettings(new_timeline_chunks=4))
    results = [stream.accept(c, i, 0.0) for i, c in enumerate(before + after)]
    assert [r.rejected for r in results if r.rejected] == ["stale_segment"] * 3
    got = [w for r in results for w in r.windows]
    old = [w for w in got if w.natural_anchor_ns == START]
    new = [w for w in got if w.natural_anchor_ns != START]
    assert [(w.status, w.reason) for w in old] == [(SCORABLE, None), (INSUFFICIENT, "truncated")]
    assert new[0].start_ns >= old[-1].end_ns, "reported time is never covered twice (no window id reused)"
    assert [w.status for w in new] == [SCORABLE] * len(new) and len(new) >= 1


def test_buffers_grow_with_the_samples_not_a_window_per_new_id():
    stage = _stage(WindowSettings(max_rate_hz=10000))
    for i in range(1200):
        stage.accept(0, i, Chunk(f"id-{i}", "II", START, 10000.0, np.zeros(1), None, START), now=0.0)
    assert stage.nbytes <= 1200 * 256 * 9, stage.nbytes  # not 1200 x 100,000 samples x 9 bytes


def test_grid_arithmetic_matches_fractions():
    g = WindowGrid(START, as_rate(360), 10 * 10**9, 10 * 10**9)
    assert g.start_index(3) == 3 * 3600 and g.end_index(3) == 4 * 3600 and g.complete_index(3) == 4 * 3600
    g2 = WindowGrid(START, as_rate(128.5), 10 * 10**9, 10 * 10**9)
    assert g2.complete_index(0) == 1285 and g2.complete_index(1) == 2570  # ceil of 1285.0, 2570.0
    assert nearest_index(5, 2) == 2 and nearest_index(7, 2) == 3  # halves go down
    for i in (0, 1, 3599, 3600, 3601, 100000):
        k = g.first_window_ending_after(i)
        assert g.end_index(k) > i and (k == 0 or g.end_index(k - 1) <= i)


@hsettings(max_examples=examples(300), deadline=None)
@given(st.sampled_from([128.5, 250.0, 256.0, 360.0, 500.0, 500.001, 1000.0, 999.9]),
       st.integers(-10**12, 10**12), st.integers(0, 10**7), st.integers(0, 500),
       st.sampled_from([10 * 10**9, 5 * 10**9, 2_500_000_000, 7 * 10**9 + 1]))
def test_grid_indices_are_the_exact_rounding_of_times(fs, t_offset_ns, i, k, step_ns):
    """The grid's integer shortcuts (its rate taken apart once) against the plain Fraction arithmetic of
    the definition: sample index = round((t - anchor) * fs), halves down; a window exists once the first
    sample at or after its end does; the closed forms find the first and last windows an index touches,
    with and without overlap."""
    g = WindowGrid(START, as_rate(fs), 10 * 10**9, step_ns)
    rate = as_rate(fs)

    def nearest(t_ns: int) -> int:
        x = Fraction(t_ns - START, 10**9) * rate
        lower = math.floor(x)
        return lower if x - lower <= Fraction(1, 2) else lower + 1

    assert g.sample_index(START + t_offset_ns) == nearest(START + t_offset_ns)
    assert g.start_index(k) == nearest(START + k * g.step_ns)
    assert g.end_index(k) == nearest(START + k * g.step_ns + g.window_ns)
    assert g.complete_index(k) == math.ceil(Fraction(k * g.step_ns + g.window_ns, 10**9) * rate)
    assert g.fs_hz == float(rate)
    # a random index, and those beside window k's edges (where a rounding slip would show)
    for j in (i, *(edge + d for edge in (g.start_index(k), g.end_index(k)) for d in (-1, 0, 1) if edge + d >= 0)):
        first = g.first_window_ending_after(j)
        assert g.end_index(first) > j and (first == 0 or g.end_index(first - 1) <= j)
        last = g.last_window_starting_at_or_before(j)
        assert (last == -1 or g.start_index(last) <= j) and g.start_index(last + 1) > j


def test_fill_gaps_limits():
    mask = np.ones(100, bool)
    mask[10:20] = False
    assert fill_gaps(np.zeros(100), mask, 5, 0.5) == "gap_too_long"
    assert fill_gaps(np.zeros(100), mask, 10, 0.05) == "too_many_missing"


def test_an_outage_of_the_whole_partition_does_not_evict_patients():
    """A broker stall silences every patient at once: that is not patients leaving."""
    stage = _stage(WindowSettings(idle_evict_s=60.0))
    times, values = recording(500, 15)
    for i, c in enumerate(chunks_of("p1", times, values, 500, fs=500)):
        if i < 5:
            stage.accept(0, i, c, now=float(i))
    assert stage.evict(now=500.0) == []  # nothing arrived on partition 0 for 495 s
    assert ("p1" in {k[1] for k in stage.streams})


def test_a_patient_silent_while_its_partition_flows_is_evicted():
    stage = _stage(WindowSettings(idle_evict_s=60.0))
    times, values = recording(500, 15)
    chunks = list(chunks_of("p1", times, values, 500, fs=500))
    other = list(chunks_of("p2", times, values, 500, fs=500))
    for i, c in enumerate(chunks[:3]):  # provisional_records (3) agreeing records set its timeline
        stage.accept(0, i, c, now=0.0)
    for i, c in enumerate(other[:15]):
        stage.accept(0, 3 + i, c, now=5.0 * (i + 1))  # p2 keeps partition 0 flowing until t = 75 s
    out = stage.evict(now=75.0)
    assert [(w.patient_id, w.reason) for w in out] == [("p1", "truncated")]


def test_a_bed_whose_records_are_all_rejected_goes_idle_and_frees_the_commit():
    stage = _stage(WindowSettings(idle_evict_s=60.0))
    times, values = recording(500, 200)
    p1 = list(chunks_of("p1", times, values, 500, fs=500, segment_start_ns=START))
    p2 = list(chunks_of("p2", times, values, 500, fs=500, segment_start_ns=START))
    stage.accept(0, 0, p1[0], now=0.0)
    stage.accept(0, 1, p1[1], now=1.0)
    late = Chunk("p1", "II", START - 3600 * 10**9, 500.0, np.zeros(500), None, START - 3600 * 10**9)
    for i in range(100):
        stage.accept(0, 2 + 2 * i, late, now=2.0 + i)  # an earlier segment, every second: rejected
        stage.accept(0, 3 + 2 * i, p2[i], now=2.0 + i)
    out = stage.evict(now=102.0)
    assert ("p1", "truncated") in [(w.patient_id, w.reason) for w in out]
    assert stage.min_open_offsets()[0] > 1


def test_open_offsets_of_some_partitions_are_those_of_all_restricted_to_them():
    stage = _stage(WindowSettings())
    times, values = recording(500, 30)
    for partition in range(3):
        for i, c in enumerate(chunks_of(f"p{partition}", times, values, 700, fs=500, segment_start_ns=START)):
            stage.accept(partition, 10 * partition + i, c, now=float(i))
    every = stage.min_open_offsets()
    assert set(every) == {0, 1, 2}
    assert stage.min_open_offsets({1}) == {1: every[1]}
    assert stage.min_open_offsets({0, 2}) == {0: every[0], 2: every[2]}
    assert stage.min_open_offsets(set()) == {}


def test_a_patient_alone_on_a_caught_up_partition_is_evicted():
    stage = _stage(WindowSettings(idle_evict_s=60.0))
    times, values = recording(500, 15)
    for i, c in enumerate(chunks_of("p1", times, values, 500, fs=500)):
        if i < 5:
            stage.accept(0, i, c, now=float(i))
    for t in range(5, 80):
        stage.flowing([0], now=float(t))  # fetched and caught up: nothing more exists
    assert [(w.patient_id, w.reason) for w in stage.evict(now=80.0)] == [("p1", "truncated")]


def test_right_after_an_outage_a_patient_whose_backlog_comes_later_is_kept():
    """Found by the 120 s broker-stall campaign: the first backlog record of a partition must not make
    the patients whose records follow a moment later look 120 s idle."""
    stage = _stage(WindowSettings(idle_evict_s=60.0))
    times, values = recording(500, 200)
    p1 = list(chunks_of("p1", times, values, 500, fs=500))
    p2 = list(chunks_of("p2", times, values, 500, fs=500))
    for i in range(10):  # both stream for 10 s
        stage.accept(0, 2 * i, p1[i], now=float(i))
        stage.accept(0, 2 * i + 1, p2[i], now=float(i))
    stage.accept(0, 100, p2[10], now=130.0)  # the broker was frozen for 120 s; p2's backlog comes first
    assert stage.evict(now=131.0) == []
    stage.accept(0, 101, p1[10], now=131.5)
    assert {k[1] for k in stage.streams} == {"p1", "p2"}


def test_a_monitor_whose_clock_froze_goes_idle_and_frees_the_commit():
    """The same t0 again and again adds no samples: not activity. The bed is evicted like a silent one,
    its window reported (truncated) and the commit no longer held at its first record."""
    stage = _stage(WindowSettings(idle_evict_s=60.0))
    times, values = recording(500, 200)
    p1 = list(chunks_of("p1", times, values, 500, fs=500, segment_start_ns=START))
    p2 = list(chunks_of("p2", times, values, 500, fs=500, segment_start_ns=START))
    stage.accept(0, 0, p1[0], now=0.0)
    emitted = []
    for i in range(100):
        assert not stage.accept(0, 1 + 2 * i, p1[1], now=1.0 + i).windows  # frozen: chunk 1 for ever
        stage.accept(0, 2 + 2 * i, p2[i], now=1.0 + i)
        emitted += stage.evict(now=1.0 + i)
    assert [(w.patient_id, w.reason) for w in emitted if w.patient_id == "p1"] == [("p1", "truncated")]
    assert stage.min_open_offsets()[0] > 1, "the commit moved past the frozen bed's records"


def test_a_backlog_after_an_eviction_never_reopens_a_window_still_in_flight():
    """A bed evicted as silent (its partial window reported truncated, the flag not yet acknowledged) whose
    delayed chunks then arrive: the window is not reported a second time with other content; the bed
    goes on with the next window."""
    stage = _stage(WindowSettings(idle_evict_s=60.0))
    times, values = recording(500, 200)
    p1 = list(chunks_of("p1", times, values, 500, fs=500, segment_start_ns=START))
    p2 = list(chunks_of("p2", times, values, 500, fs=500, segment_start_ns=START))
    for i in range(5):  # p1: 5 s of its first window, then its gateway stalls
        stage.accept(0, i, p1[i], now=float(i))
    emitted = []
    for i in range(80):  # p2 keeps the partition flowing
        emitted += stage.accept(0, 100 + i, p2[i], now=5.0 + i).windows + stage.evict(now=5.0 + i)
    evicted = [w for w in emitted if w.patient_id == "p1"]
    assert [(w.start_ns, w.reason) for w in evicted] == [(START, "truncated")]  # in flight: not acknowledged
    later = []
    for i in range(5, 30):  # the gateway's backlog: the rest of window 0, then windows 1 and 2
        later += stage.accept(0, 200 + i, p1[i], now=90.0 + i).windows
    assert START not in [w.start_ns for w in later], "window 0 was already reported"
    assert [w.start_ns for w in later][:1] == [START + 10 * 10**9]


@pytest.mark.parametrize("segment_start", [True, False])
def test_an_outlier_first_record_with_swapped_neighbours_does_not_black_the_bed_out(segment_start):
    """Issue 24, sequence 5: a new bed's first record is dated +10 min, and its gateway swaps neighbouring
    chunks. The provisional stream holds its first records until three agree: only the outlier is
    dead-lettered, every window is scored on the bed's own grid."""
    fs = 500
    times, values = recording(fs, 61)
    chunks = list(chunks_of("p1", times, values, 250, fs=fs, segment_start_ns=None if segment_start else 0))
    if not segment_start:
        chunks = [dataclasses.replace(c, segment_start_ns=None) for c in chunks]
    outlier = dataclasses.replace(chunks[0], t0_ns=chunks[0].t0_ns + 600 * 10**9)
    swapped = [c for pair in zip(chunks[1::2], chunks[0::2]) for c in pair]  # 1, 0, 3, 2, ...
    stream = PatientStream("p1", 0, WindowSettings())
    dead, windows = [], []
    for i, c in enumerate([outlier, *swapped]):
        res = stream.accept(c, i, 0.0, ref=i)
        dead += [(ref, reason) for ref, reason, _ in res.dead_letters]
        windows += res.windows
    assert dead == [(0, "timestamp_jump")], "the outlier alone is refused"
    step = 10 * 10**9
    origin = int(times[0]) if segment_start else 0
    assert [w.status for w in windows] == [SCORABLE] * 6
    assert all((w.start_ns - origin) % step == 0 for w in windows), "on the bed's own grid"
    assert windows[0].start_ns <= int(times[0]) < windows[0].end_ns


def test_a_provisional_stream_that_closes_early_reports_nothing_and_leaves_no_state():
    """Issue 45: two records and silence (eviction): a stream that never set its timeline (fewer than
    provisional_records agreeing records) reports no window and keeps no state; every record it held, the
    outlier of another segment too, comes back to be dead-lettered (no_timeline, stage.take_rejected). One
    record per id of a flood of ids costs dead letters, never flags or states."""
    fs = 500
    times, values = recording(fs, 4)
    chunks = list(chunks_of("p1", times, values, 500, fs=fs))
    stage = _stage(WindowSettings(idle_evict_s=5.0))
    stray = dataclasses.replace(chunks[0], segment_start_ns=chunks[0].segment_start_ns - 3600 * 10**9,
                                t0_ns=chunks[0].t0_ns - 3600 * 10**9)
    for i, c in enumerate([chunks[0], stray, chunks[1]]):
        res = stage.accept(0, i, c, now=float(i), ref=f"r{i}")
        assert not res.windows and not res.dead_letters and res.activity
    assert stage.min_open_offsets() == {0: 0}, "held records keep the commit"
    stage.flowing([0], 10.0)
    stage.flowing([0], 20.0)
    assert stage.patients() == 1 and stage.store.count() == 0, "a provisional stream holds no state"
    out = stage.evict(20.0)
    assert out == []
    assert sorted((ref, reason) for _, ref, reason, _ in stage.take_rejected()) == [
        ("r0", "no_timeline"), ("r1", "no_timeline"), ("r2", "no_timeline")]
    assert stage.min_open_offsets() == {}
    assert stage.patients() == 0 and stage.store.count() == 0 and not stage.streams and stage.nbytes == 0


def test_a_known_patients_reopened_stream_that_closes_early_still_reports_its_window():
    """Only a new id's stream is dropped without a timeline (no_timeline): a patient with a state (a stream
    reopened after an eviction or a restart) closes as before, its held records setting the timeline and
    its window reported truncated."""
    fs = 500
    times, values = recording(fs, 4)
    chunks = list(chunks_of("p1", times, values, 500, fs=fs))
    stage = _stage(WindowSettings(idle_evict_s=5.0))
    stage.store.patient(0, "p1")  # known: restored from the changelog
    for i, c in enumerate(chunks[:2]):
        stage.accept(0, i, c, now=float(i), ref=f"r{i}")
    stage.flowing([0], 10.0)
    stage.flowing([0], 20.0)
    out = stage.evict(20.0)
    assert [(w.status, w.reason) for w in out] == [(INSUFFICIENT, "truncated")]
    assert stage.take_rejected() == []


def test_a_window_that_outlives_its_maximum_life_is_reported_and_frees_the_commit():
    """Issue 24: a monitor clock that crawls (each record adds a few new samples, so the bed stays active)
    holds its window open for ever; after max_window_life_s of partition flow it is reported truncated and
    the commit moves on. A broker outage counts at most FLOW_GAP_CAP_S (10 s), not its wall time."""
    fs = 500
    stage = _stage(WindowSettings(max_window_life_s=30.0, idle_evict_s=60.0, provisional_records=1))
    values = generate(2, fs=fs, seed=1).values
    closed_at, now = None, 0.0
    for i in range(40):  # a record a second, each 10 new samples (20 ms of signal): the window needs 500 s
        c = Chunk("crawl", "II", START + i * 20_000_000, float(fs), values[i * 10:i * 10 + 10], i, START)
        res = stage.accept(0, i, c, now=now)
        assert res.activity or closed_at is not None, "each record adds samples: the bed is active"
        assert stage.min_open_offsets() == ({0: 0} if closed_at is None else {})
        out = stage.evict(now)
        if out and closed_at is None:
            closed_at = i
            assert [(w.status, w.reason, w.by_clock) for w in out] == [(INSUFFICIENT, "truncated", True)]
        if i == 5:
            now += 600.0  # an outage: ten minutes without a record
        now += 1.0
    # flow: 1 s per record, the outage 10 s (capped) instead of 1 s: 30 s at record 21 (wall time: record 6)
    assert closed_at == 21
    assert stage.expired_windows == 1


def test_a_held_record_that_breaks_the_stream_costs_only_itself(monkeypatch):
    """A bug met while a provisional stream releases its held records dead-letters that record
    (internal_error) and still feeds the others: none is dropped without a dead letter."""
    fs = 500
    times, values = recording(fs, 12)
    chunks = list(chunks_of("p1", times, values, 500, fs=fs))
    stream = PatientStream("p1", 0, WindowSettings())
    real = stream._accept

    def flaky(chunk, offset, now, confirmed=False):
        if offset == 1:
            raise RuntimeError("boom")
        return real(chunk, offset, now, confirmed)

    monkeypatch.setattr(stream, "_accept", flaky)
    stream.accept(chunks[0], 0, 0.0, ref="r0")
    stream.accept(chunks[1], 1, 0.0, ref="r1")
    res = stream.accept(chunks[2], 2, 0.0, ref="r2")
    assert [(ref, reason) for ref, reason, _ in res.dead_letters] == [("r1", "internal_error")]
    assert res.new_samples == 1000 and stream.min_open_offset() == 0


def test_provisional_records_agree_across_a_gateways_rate_noise():
    """500.0 and 500.001 Hz from one gateway (within rate_tolerance) are one timeline: three records open
    the stream, as with one exact rate."""
    fs = 500
    times, values = recording(fs, 4)
    chunks = [dataclasses.replace(c, fs=500.001 if i % 2 else 500.0)
              for i, c in enumerate(chunks_of("p1", times, values, 500, fs=fs))]
    stream = PatientStream("p1", 0, WindowSettings())
    results = [stream.accept(c, i, 0.0) for i, c in enumerate(chunks[:3])]
    assert [r.new_samples for r in results] == [0, 0, 1500] and stream.segment is not None
    assert not stream.held and not any(r.dead_letters for r in results)


def _stage(settings: WindowSettings) -> WindowStage:
    """A stage alone, partitions 0, 1 and 2 assigned to it."""
    stage = WindowStage(settings)
    for partition in (0, 1, 2):
        stage.owned.open(partition)
    return stage


def _brute_min_open_offsets(stage: WindowStage) -> dict:
    out: dict = {}
    for (partition, _), stream in stage.streams.items():
        off = stream.min_open_offset()
        if off is not None:
            out[partition] = min(off, out.get(partition, off))
    return out


@hsettings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["accept", "accept", "accept", "evict", "drop"]),
                          st.integers(0, 2), st.integers(0, 3), st.integers(0, 30)), max_size=60))
def test_the_partition_index_follows_every_stream_opened_closed_or_dropped(ops):
    """min_open_offsets walks the streams by partition: through accepts (in order, late, repeated), idle
    evictions, the memory cap and revocations it must answer what a walk of every stream answers."""
    stage = _stage(WindowSettings(idle_evict_s=5.0, max_buffer_bytes=60_000))  # two beds' windows pass it
    times, values = recording(500, 40)
    chunks = {pid: list(chunks_of(f"p{pid}", times, values, 250, fs=500, segment_start_ns=START)) for pid in range(4)}
    offset, now = 0, 0.0
    for op, partition, pid, i in ops:
        now += 1.0
        if op == "accept":
            stage.accept(partition, offset, chunks[pid][i % len(chunks[pid])], now)
            offset += 1
        elif op == "evict":
            now += 6.0 * (i % 2)  # every other eviction after a silence: idle streams close
            stage.flowing([0, 1, 2], now)
            stage.evict(now)
        else:  # revoked, then assigned again: a new object, nothing of the old one
            task = stage.owned.held(partition)
            streams = sum(1 for p, _ in stage.streams if p == partition)
            assert stage.release(task) == streams and task.windows is None
            assert not any(p == partition for p, _ in stage.streams)
            stage.owned.forget(partition)
            stage.owned.open(partition)
        by_partition = {(t.tp, k): s for t in stage.owned.every_held() if t.windows
                        for k, s in t.windows.streams.items()}
        assert set(by_partition) == set(stage.streams)
        assert all(by_partition[key] is s for key, s in stage.streams.items())
        assert stage.min_open_offsets() == _brute_min_open_offsets(stage)
        assert stage.min_open_offsets({partition}) == {
            p: o for p, o in _brute_min_open_offsets(stage).items() if p == partition}
