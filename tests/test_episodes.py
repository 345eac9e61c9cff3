"""Episode hysteresis on flags derived from known artifact stretches."""

from __future__ import annotations

from streamer.publish.episodes import EpisodeTracker
from streamer.settings import EpisodeSettings

W = 10**10


def flag(k: int, artifact: bool | None, p: float | None = None, patient: str = "p1") -> dict:
    status = "scored" if artifact is not None else "insufficient_data"
    return {"patient_id": patient, "window_start_ns": k * W, "window_end_ns": (k + 1) * W, "status": status,
            "artifact": artifact, "probability": p if p is not None else (0.9 if artifact else 0.05)}


def run(pattern: str, open_after=2, close_after=2):
    """pattern: A = artifact, . = clean, ? = insufficient data."""
    t = EpisodeTracker(EpisodeSettings(open_after=open_after, close_after=close_after), "m")
    out = []
    for k, c in enumerate(pattern):
        msg = t.update(flag(k, {"A": True, ".": False, "?": None}[c]))
        if msg:
            out.append((msg["state"], msg["start_ns"] // W, None if msg["end_ns"] is None else msg["end_ns"] // W))
    return out


def test_known_stretches_give_expected_episodes():
    # artifact stretches at windows 2-5 and 10-11; a lone artifact at 8 does not open an episode
    assert run("..AAAA..A.AA...") == [("open", 2, None), ("closed", 2, 6), ("open", 10, None), ("closed", 10, 12)]


def test_a_single_clean_window_does_not_close():
    assert run("AA.AA..") == [("open", 0, None), ("closed", 0, 5)]


def test_insufficient_data_neither_opens_nor_closes():
    assert run("A?A?..") == [("open", 0, None), ("closed", 0, 3)]


def test_open_after_one_and_peak_probability():
    t = EpisodeTracker(EpisodeSettings(open_after=1, close_after=1), "m")
    assert t.update(flag(0, True, 0.7))["state"] == "open"
    assert t.update(flag(1, True, 0.95)) is None
    closed = t.update(flag(2, False))
    assert closed["peak_probability"] == 0.95 and closed["flagged_windows"] == 2
    assert closed["episode_id"] == "p1:0"


def test_patients_are_independent():
    t = EpisodeTracker(EpisodeSettings(open_after=2, close_after=1), "m")
    assert t.update(flag(0, True, patient="a")) is None
    assert t.update(flag(0, True, patient="b")) is None
    assert t.update(flag(1, True, patient="a"))["patient_id"] == "a"
