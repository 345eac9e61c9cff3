"""The ward view's state, without a broker or a browser: bounded per bed and in beds, de-duplicated,
and a delta carries exactly what changed since the last push."""

from __future__ import annotations

import time

import numpy as np
import orjson
import pytest

from streamer.ingest.contract import Chunk, encode_json
from streamer.publish.episodes import EpisodeTracker
from streamer.settings import EpisodeSettings, WindowSettings
from streamer.state.patients import EpisodeState
from streamer.commands.view import STRIP_HZ, Ward

T0 = 1_795_316_700_000_000_000
S = WindowSettings()


def _feed(ward: Ward, pid: str, seconds: float, fs: float = 500.0, t0: int = T0) -> None:
    n = int(fs * 0.5)
    for i in range(int(seconds / 0.5)):
        ward.on_input(pid.encode(), encode_json(Chunk(pid, "II", t0 + int(i * 0.5e9), fs, np.zeros(n))), S)


def _flag(pid: str, start: int, p: float | None) -> bytes:
    return orjson.dumps({"window_id": f"{pid}:{start}", "patient_id": pid, "window_start_ns": start,
                         "window_end_ns": start + 10**10, "status": "scored" if p is not None else "insufficient_data",
                         "reason": None if p is not None else "no_data", "probability": p,
                         "artifact": None if p is None else p >= 0.2, "threshold": 0.2, "model": "m@sha256:x",
                         "latency_ms": 120.0})


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


def test_beds_bounded_least_recent_dropped():
    ward = Ward(max_beds=3)
    for pid in ("a", "b", "c", "d"):
        ward.on_flag(_flag(pid, T0, 0.1))
    assert list(ward.beds) == ["b", "c", "d"]


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
    msg = t.update({"patient_id": "bed-1", "window_start_ns": T0, "window_end_ns": T0 + 10**10,
                    "status": "scored", "artifact": True, "probability": 0.9}, st, now_ns / 1e9)
    if state == "closed":
        msg = t.stale("bed-1", st, now_ns / 1e9 + 1e6)
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
    ward.on_input(b"bed-9", b"{not json", S)  # the worker dead-letters it; the view just skips it
    assert "bed-9" not in ward.beds
