"""The ward view's state, without a broker or a browser: bounded per bed and in beds, de-duplicated,
and a delta carries exactly what changed since the last push."""

from __future__ import annotations

import time

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.budget import examples

from streamer.ingest.contract import Chunk, encode_json
from streamer.model.decision import decide
from streamer.publish.episodes import EpisodeTracker
from streamer.publish.messages import episode_doc
from streamer.settings import EpisodeSettings, WindowSettings
from streamer.spec import WindowStatus
from streamer.state.patients import EpisodeState
from streamer.windows.buffer import EmittedWindow
from streamer.commands.view import STRIP_HZ, Ward
from tests.unit.test_view_http import flag_bytes

T0 = 1_795_316_700_000_000_000
S = WindowSettings()


def _feed(ward: Ward, pid: str, seconds: float, fs: float = 500.0, t0: int = T0) -> None:
    n = int(fs * 0.5)
    for i in range(int(seconds / 0.5)):
        ward.on_input(pid.encode(), encode_json(Chunk(pid, "II", t0 + int(i * 0.5e9), fs, np.zeros(n))), S)


def _flag(pid: str, start: int, p: float | None, **over) -> bytes:
    return flag_bytes(pid, start, p, **over)


def test_strip_keeps_only_its_seconds_at_display_rate():
    ward = Ward(strip_s=20.0)
    _feed(ward, "bed-1", 90.0, fs=500.0)
    b = ward.beds["bed-1"]
    assert 20 * STRIP_HZ - 1 <= len(b.slots) <= 20 * STRIP_HZ + 1
    assert b.slots[-1] - b.slots[0] <= 20 * STRIP_HZ
    _feed(ward, "bed-2", 30.0, fs=360.0)  # any source rate is drawn at STRIP_HZ
    assert 20 * STRIP_HZ - 2 <= len(ward.beds["bed-2"].slots) <= 20 * STRIP_HZ + 1
    runs = ward.snapshot()["beds"]["bed-2"]["strip"]
    assert len(runs) == 1 and len(runs[0][1]) == len(ward.beds["bed-2"].slots), "no gap: one run"


def test_flags_bounded_and_republished_copies_dropped():
    ward = Ward(history=5)
    for i in range(8):
        ward.on_flag(_flag("bed-1", T0 + i * 10**10, 0.5))
    ward.on_flag(_flag("bed-1", T0 + 7 * 10**10, 0.5))  # the same window again
    flags = ward.beds["bed-1"].flags
    assert len(flags) == 5 and flags[-1]["window_start_ns"] == T0 + 7 * 10**10
    assert len({f["window_id"] for f in flags}) == 5


def test_beds_bounded_least_recent_dropped_and_the_page_told():
    ward = Ward(max_beds=3)
    for pid in ("a", "b", "c", "d"):
        ward.on_flag(_flag(pid, T0, 0.1))
    assert list(ward.beds) == ["b", "c", "d"]
    first = ward.delta()
    assert first["gone"] == ["a"] and "a" not in first["beds"]
    ward.on_flag(_flag("b", T0 + 10**10, 0.1))  # b heard of again: c is the oldest now
    ward.on_flag(_flag("a", T0 + 10**10, 0.1))  # a back: c goes
    second = ward.delta()
    assert second["gone"] == ["c"] and set(second["beds"]) == {"a", "b"}
    assert ward.delta() is None
    ward.on_flag(_flag("c", T0 + 2 * 10**10, 0.1))  # c back: d goes...
    for pid in ("x", "y", "z"):  # ...then three new beds push b, a and c out...
        ward.on_flag(_flag(pid, T0, 0.1))
    ward.on_flag(_flag("c", T0 + 3 * 10**10, 0.1))  # ...and c comes back, all within one push
    third = ward.delta()
    # the page forgets c's old card (gone) before it takes the new one (beds)
    assert "c" in third["gone"] and "c" in third["beds"]


def test_a_bed_dropped_and_back_keeps_the_suppression_the_ward_holds():
    """A bed with an open episode dropped past max_beds and heard of again starts with that episode, not
    without one (the page would show no suppression while one is on, and expire() would never lapse it)."""
    ward = Ward(max_beds=1)
    now = time.time_ns()
    ward.on_episode(_episode(5, "open", now))
    assert ward.beds["bed-1"].episode["state"] == "open"
    ward.on_flag(_flag("other", T0, 0.1))  # bed-1 dropped
    assert "bed-1" not in ward.beds
    ward.on_flag(_flag("bed-1", T0 + 10**10, 0.1))  # back
    assert ward.beds["bed-1"].episode["state"] == "open"
    ward.expire(now_ns=now + 10**12)  # long past the lease: shown lapsed, as if it had never left
    assert ward.beds["bed-1"].episode["state"] == "lapsed"


def test_delta_has_only_what_changed_then_nothing():
    ward = Ward()
    _feed(ward, "bed-1", 2.0)
    ward.on_flag(_flag("bed-2", T0, None))
    first = ward.delta()
    assert set(first["beds"]) == {"bed-1", "bed-2"}
    assert sum(len(v) for _, v in first["beds"]["bed-1"]["strip"]) == 2 * STRIP_HZ
    assert first["beds"]["bed-2"]["flags"][0]["reason"] == "no_data"
    assert ward.delta() is None
    ward.on_flag(_flag("bed-1", T0, 0.9))
    second = ward.delta()
    assert set(second["beds"]) == {"bed-1"} and second["beds"]["bed-1"]["strip"] == []
    assert ward.snapshot()["beds"]["bed-1"]["strip"], "the snapshot still has the whole strip"


def test_a_gap_splits_the_strip_into_runs():
    ward = Ward()
    _feed(ward, "bed-1", 3.0)
    _feed(ward, "bed-1", 2.0, t0=T0 + 5 * 10**9)  # 2 s without samples
    runs = ward.snapshot()["beds"]["bed-1"]["strip"]
    assert [len(v) for _, v in runs] == [3 * STRIP_HZ, 2 * STRIP_HZ]
    assert runs[1][0] - (runs[0][0] + len(runs[0][1])) == 2 * STRIP_HZ


def _episode(seq: int, state: str, now_ns: int, lease_s: float = 30.0) -> bytes:
    t = EpisodeTracker(EpisodeSettings(open_after=1, lease_s=lease_s, renew_every_s=lease_s / 3), "m")
    st = EpisodeState(seq=seq - 1)
    w = EmittedWindow("bed-1", 0, T0, T0 + 10**10, 500.0, WindowStatus.SCORABLE, None, None, 0, 0, None, 0.0)
    msg = episode_doc(t.update(decide(w, 0.9, 0.5, "m"), st, now_ns / 1e9))
    if state == "closed":
        msg = episode_doc(t.stale("bed-1", st, now_ns / 1e9 + 1e6))
        msg["seq"] = seq
    return orjson.dumps(msg)


def test_episodes_ordered_by_seq_their_lease_lapses_and_bad_input_is_ignored():
    ward = Ward()
    now = time.time_ns()
    ward.on_episode(_episode(5, "closed", now))
    ward.on_episode(_episode(4, "open", now))  # older: never wins
    assert ward.beds["bed-1"].episode["state"] == "closed"
    ward.on_episode(_episode(6, "open", now, lease_s=1.0))
    assert ward.beds["bed-1"].episode["state"] == "open"
    ward.expire(now + 10**9 // 2)
    assert ward.beds["bed-1"].episode["state"] == "open"
    ward.delta()
    ward.expire(now + 7 * 10**9)  # lease 1 s + 5 s skew allowance, no renewal: the feed is silent
    assert ward.beds["bed-1"].episode["state"] == "lapsed"
    assert ward.delta()["beds"]["bed-1"]["episode"]["state"] == "lapsed"
    with pytest.raises(ValueError):
        ward.on_episode(orjson.dumps({"patient_id": "bed-1", "state": "open", "schema": 1}))
    assert not ward.on_record("input", b"bed-9", b"{not json", S)  # the worker dead-letters it; the view skips it
    assert "bed-9" not in ward.beds and ward.skipped["input"] == 1


# -- records the page must never see (issue 45, item 3) ------------------------------------------------------
BAD_FLAGS = {
    "probability not a number": dict(probability="0.9<img src=x onerror=alert(1)>"),
    "artifact not a bool": dict(artifact="yes"),
    "reason not text": dict(status="insufficient_data", probability=None, artifact=None, reason={"html": "<b>"}),
    "window start not an int": dict(window_start_ns="soon"),
    "no patient": dict(patient_id=None),
    "unknown status": dict(status="<script>alert(1)</script>"),
    "scored without probability": dict(probability=None),
    "wrong schema": dict(schema=2),
}


@pytest.mark.parametrize("what", sorted(BAD_FLAGS))
def test_a_flag_the_client_decoder_refuses_is_skipped_and_counted_never_shown(what):
    ward = Ward()
    ward.on_flag(_flag("bed-1", T0, 0.1))
    ward.delta()
    assert not ward.on_record("flag", b"bed-1", _flag("bed-1", T0 + 10**10, 0.9, **BAD_FLAGS[what]), S)
    assert ward.skipped == {"flag": 1}
    assert [f["window_start_ns"] for f in ward.beds["bed-1"].flags] == [T0]
    assert ward.delta() is None
    assert ward.snapshot()["skipped"] == 1


def test_out_of_range_flags_are_skipped_once_the_client_checks_ranges():
    """The client's range checks (probability and threshold in [0, 1], fs > 0, the window ending after it
    starts) are the view's: whatever `decode_flag` refuses never reaches the page."""
    ward = Ward()
    for over in (dict(probability=1.5), dict(probability=-0.1), dict(threshold=-1.0), dict(fs=0.0),
                 dict(window_end_ns=T0 - 1)):
        assert not ward.on_record("flag", b"bed-1", _flag("bed-1", T0, 0.5, **over), S), over
    assert ward.skipped == {"flag": 5} and not ward.beds


def test_a_hostile_reason_is_kept_as_the_text_it_is():
    ward = Ward()
    hostile = '<img src=x onerror="window.__pwned=1">'
    assert ward.on_record("flag", b"bed-1", _flag("bed-1", T0, None, reason=hostile), S)
    assert ward.snapshot()["beds"]["bed-1"]["flags"][0]["reason"] == hostile  # the page writes it as text


def test_only_the_fields_the_page_shows_are_kept():
    ward = Ward()
    ward.on_flag(_flag("bed-1", T0, 0.4, extra="<script>", fs=250.0))
    assert set(ward.beds["bed-1"].flags[0]) == {"window_id", "window_start_ns", "window_end_ns", "status", "reason",
                                                  "probability", "artifact", "threshold", "latency_ms"}
    assert ward.model == "m@sha256:0123456789abcdef"


_scalar = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False) | st.text()
_json = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=4), max_leaves=20)
_flag_fields = st.fixed_dictionaries({}, optional={k: _json for k in (
    "schema", "window_id", "patient_id", "window_start_ns", "window_end_ns", "status", "reason", "probability",
    "artifact", "threshold", "model", "fs", "missing_samples", "interpolated_samples", "produced_at_ns", "latency_ms")})


@settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["flag", "episode", "input"]),
       value=st.one_of(st.binary(max_size=300), _json.map(orjson.dumps), st.integers().map(lambda i: str(i).encode()),
                       _flag_fields.map(lambda over: _flag("bed-1", T0, 0.5, **over))))
def test_fuzz_one_record_never_stops_the_view_and_what_is_kept_has_the_page_types(kind, value):
    ward = Ward()
    ok = ward.on_record(kind, b"bed-1", value, S)
    assert ok != bool(ward.skipped)
    snap = orjson.loads(orjson.dumps(ward.snapshot()))  # what the page gets
    for bed in snap["beds"].values():
        for f in bed["flags"]:
            assert isinstance(f["window_id"], str) and isinstance(f["status"], str)
            assert f["status"] in ("scored", "insufficient_data")
            assert isinstance(f["window_start_ns"], int) and isinstance(f["window_end_ns"], int)
            assert f["reason"] is None or isinstance(f["reason"], str)
            assert isinstance(f["threshold"], float) and isinstance(f["latency_ms"], float)
            if f["status"] == "scored":
                assert isinstance(f["probability"], float) and isinstance(f["artifact"], bool)
