"""Episode hysteresis on verdicts derived from known artifact stretches."""

from __future__ import annotations

import orjson

from streamer.model.decision import Verdict, decide
from streamer.publish.episodes import EpisodeTracker
from streamer.settings import EpisodeSettings
from streamer.spec import NoScoreReason, WindowStatus
from streamer.state.patients import EpisodeState, PatientState
from streamer.windows.buffer import EmittedWindow

W = 10**10


def flag(k: int, artifact: bool | None, p: float | None = None, patient: str = "p1") -> Verdict:
    """Window k's verdict, decided (threshold 0.5) from `p` or a probability on the side `artifact` says."""
    status = WindowStatus.SCORABLE if artifact is not None else WindowStatus.INSUFFICIENT
    reason = None if artifact is not None else NoScoreReason.NO_DATA
    w = EmittedWindow(patient, 0, k * W, (k + 1) * W, 500.0, status, reason, None, 0, 0, None, 0.0)
    v = decide(w, p if p is not None else (0.9 if artifact else 0.05), 0.5, "m", produced_at_ns=1)
    assert v.artifact is artifact
    return v


def run(pattern: str, open_after=2, close_after=2):
    """pattern: A = artifact, . = clean, ? = insufficient data."""
    t = EpisodeTracker(EpisodeSettings(open_after=open_after, close_after=close_after), "m")
    out = []
    for k, c in enumerate(pattern):
        msg = t.update(flag(k, {"A": True, ".": False, "?": None}[c]))
        if msg:
            out.append((msg.state, msg.start_ns // W, None if msg.end_ns is None else msg.end_ns // W))
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
    assert t.update(flag(0, True, 0.7)).state == "open"
    assert t.update(flag(1, True, 0.95)) is None
    closed = t.update(flag(2, False))
    assert closed.peak_probability == 0.95 and closed.flagged_windows == 2
    assert closed.episode_id == "p1:0"


def test_patients_are_independent():
    t = EpisodeTracker(EpisodeSettings(open_after=2, close_after=1), "m")
    assert t.update(flag(0, True, patient="a")) is None
    assert t.update(flag(0, True, patient="b")) is None
    assert t.update(flag(1, True, patient="a")).patient_id == "a"


# -- leases, sequence numbers, pending messages ------------------------------------------------------
LEASE = EpisodeSettings(open_after=1, close_after=1, stale_after_s=60, lease_s=30, renew_every_s=10)
NOW = 1_795_000_000.0


def test_every_message_is_numbered_and_the_number_survives_closes():
    t = EpisodeTracker(LEASE, "m")
    st = EpisodeState()
    opened = t.update(flag(0, True), st, NOW)
    assert opened.seq == int(NOW * 1_000_000) + 1, "a patient's first number comes from the clock (us)"
    closed = t.update(flag(1, False), st, NOW + 10)
    again = t.update(flag(2, True), st, NOW - 3600)  # the clock stepped back an hour: order does not care
    assert [opened.seq, closed.seq, again.seq] == [opened.seq, opened.seq + 1, opened.seq + 2]
    assert st.seq == again.seq and st.pending is again


def test_an_open_episode_is_a_lease_renewed_while_it_lasts():
    t = EpisodeTracker(LEASE, "m")
    st = EpisodeState()
    opened = t.update(flag(0, True), st, NOW)
    assert opened.valid_until_ns == int((NOW + 30) * 1e9) and opened.lease_ns == 30 * 10**9
    assert not opened.renewal
    assert t.renew("p1", st, NOW + 9.9) is None and not t.due(st, NOW + 9.9)
    assert t.due(st, NOW + 10)
    renewal = t.renew("p1", st, NOW + 10)
    assert renewal.renewal and renewal.state == "open" and renewal.episode_id == opened.episode_id
    assert renewal.seq == opened.seq + 1 and renewal.valid_until_ns == int((NOW + 40) * 1e9)
    # a clock that went back renews at once rather than waiting for its own clock to catch up
    assert t.renew("p1", st, NOW - 3600).renewal
    closed = t.update(flag(1, False), st, NOW + 11)
    assert closed.valid_until_ns is None and closed.lease_ns is None
    assert t.renew("p1", st, NOW + 100) is None and not t.due(st, NOW + 100), "a closed episode has no lease"


def test_stale_close_counts_from_now_when_the_clock_is_behind_the_state():
    t = EpisodeTracker(LEASE, "m")
    st = EpisodeState()
    t.update(flag(0, True), st, NOW)
    behind = NOW - 3600  # a new owner whose clock runs an hour behind the one that stamped the state
    assert t.stale("p1", st, behind) is None
    assert t.stale("p1", st, behind + 59) is None
    assert t.stale("p1", st, behind + 60).reason == "stale", "at most stale_after_s late, never an hour"


def test_state_lost_close_is_a_close_of_whatever_was_open():
    t = EpisodeTracker(LEASE, "m")
    st = EpisodeState()
    msg = t.lost("p1", st, NOW)
    assert (msg.state, msg.reason, msg.episode_id, msg.start_ns) == ("closed", "state_lost", None, None)
    assert st.pending is msg and msg.seq == int(NOW * 1_000_000) + 1


def test_state_round_trip_keeps_seq_and_pending_and_reads_version_1():
    t = EpisodeTracker(LEASE, "m")
    st = PatientState("p1")
    t.update(flag(0, True), st.episode, NOW)
    topic, back = PatientState.from_bytes(st.to_bytes("in"))
    assert topic == "in" and back.episode.seq == st.episode.seq and back.episode.pending == st.episode.pending
    v1 = orjson.dumps({"v": 1, "topic": "in", "patient_id": "p1", "segments": [],
                       "episode": {"open_start_ns": 5, "updated_at_s": NOW, "last_window": [0, 5]}})
    _, old = PatientState.from_bytes(v1)
    assert (old.episode.open_start_ns, old.episode.seq, old.episode.pending) == (5, 0, None)


def _not_finite(k: int, patient: str = "p1") -> Verdict:
    """Window k's verdict when the model gave it a NaN (an fp16 overflow, a broken checkpoint)."""
    w = EmittedWindow(patient, 0, k * W, (k + 1) * W, 500.0, WindowStatus.SCORABLE, None, None, 0, 0, None, 0.0)
    v = decide(w, float("nan"), 0.5, "m", produced_at_ns=1)
    assert v.reason == NoScoreReason.SCORE_NOT_FINITE
    return v


def test_a_model_failure_ends_an_open_suppression_at_once():
    """A window the model gave no finite score says nothing about the ECG: an open episode closes on it at
    once (reason stale, as when no score comes), not stale_after_s later while renewals go on; with nothing
    open it does nothing, no episode opens across it, and a re-published copy is ignored."""
    t = EpisodeTracker(EpisodeSettings(open_after=2, close_after=2), "m")
    st = EpisodeState()
    assert t.update(_not_finite(0), st, 100.0) is None
    assert t.update(flag(1, True), st, 101.0) is None
    assert t.update(flag(2, True), st, 102.0).state == "open"
    closed = t.update(_not_finite(3), st, 103.0)
    assert (closed.state, closed.reason, closed.start_ns, closed.end_ns) == ("closed", "stale", 1 * W, 3 * W)
    assert st.open_start_ns is None and t.update(_not_finite(3), st, 104.0) is None
    # artifact, failure, artifact: not two consecutive artifact windows, so nothing opens
    assert [t.update(v, st, 105.0) for v in (flag(4, True), _not_finite(5), flag(6, True))] == [None] * 3
    assert t.update(flag(7, True), st, 106.0).state == "open"
    # a failed window from before this episode began (late, from an older grid) says nothing about it
    assert t.update(_not_finite(2), st, 107.0, grid=1) is None and st.open_start_ns == 6 * W
