"""The typed verdict (issue 46): `decide` is the one decision, messages only encode, and nothing the worker
publishes or keeps in its state changed shape. The expected bytes below were written by the code before
verdicts were typed: the flag encoder is a frozen copy of its `flag_message`; the episode messages and the
state records are literals that code printed for the same inputs (its tracker, its PatientState.to_bytes)."""

from __future__ import annotations

import math
import time
from dataclasses import fields, replace

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.budget import examples

from streamer.model.decision import Verdict, _positional_constructor, decide, is_artifact
from streamer.publish.episodes import EpisodeTracker
from streamer.publish.messages import episode_bytes, flag_bytes, flag_doc
from streamer.settings import EpisodeSettings
from streamer.spec import FlagStatus, NoScoreReason
from streamer.state.patients import EpisodeState, FlagAhead, PatientState
from streamer.windows.buffer import INSUFFICIENT, SCORABLE, EmittedWindow

T0 = 1_800_000_000_000_000_000
P = T0 + 12 * 10**9  # produced_at_ns
NOW = 1_800_000_100.5


def _old_flag_message(w, probability, threshold, model_id, produced_at_ns=None) -> dict:
    """streamer.publish.messages.flag_message as it was before verdicts were typed (commit 6d73482)."""
    produced = produced_at_ns or time.time_ns()
    scored = w.status == SCORABLE and probability is not None
    return dict(
        schema=1,
        window_id=f"{w.patient_id}:{w.start_ns}",
        patient_id=w.patient_id,
        window_start_ns=w.start_ns,
        window_end_ns=w.end_ns,
        status=FlagStatus.SCORED if scored else FlagStatus(w.status),
        reason=w.reason,
        probability=float(probability) if scored else None,
        artifact=bool(probability >= threshold) if scored else None,
        threshold=threshold,
        model=model_id,
        fs=w.fs,
        missing_samples=w.missing,
        interpolated_samples=w.interpolated,
        produced_at_ns=produced,
        latency_ms=round(max(produced / 1e9 - w.completed_at, 0.0) * 1000, 3),
    )


def _win(k: int, status=SCORABLE, reason=None, pid: str = "bed-7", fs: float = 500.0,
         completed_after_s: float = 10.5) -> EmittedWindow:
    start = T0 + k * 10**10
    return EmittedWindow(pid, 0, start, start + 10**10, fs, status, reason, None, 3, 2, 0,
                         start / 1e9 + completed_after_s)


THR = 0.2080211
CASES = [
    (SCORABLE, None, THR),  # exactly at the threshold: artifact
    (SCORABLE, None, math.nextafter(THR, 0.0)),  # the float just below: not
    (SCORABLE, None, math.nextafter(THR, 1.0)),
    (SCORABLE, None, np.float32(THR)),  # the model's own dtype
    (SCORABLE, None, 0.0), (SCORABLE, None, 1.0),
    (SCORABLE, None, None),
    *[(INSUFFICIENT, r, None) for r in NoScoreReason if r is not NoScoreReason.SCORE_NOT_FINITE],
    (INSUFFICIENT, NoScoreReason.TRUNCATED, 0.9),  # a probability for an unscorable window is ignored
]


@pytest.mark.parametrize("status,reason,p", CASES)
def test_a_verdict_encodes_to_the_flag_the_old_encoder_made(status, reason, p):
    w = _win(3, status, reason)
    if status == SCORABLE and p is None:  # the old encoder raised for this (no FlagStatus "scorable")
        with pytest.raises(ValueError):
            _old_flag_message(w, p, THR, "m1", P)
        with pytest.raises(ValueError):
            decide(w, p, THR, "m1", P)
        return
    v = decide(w, p, THR, "m1", P)
    assert flag_bytes(v) == orjson.dumps(_old_flag_message(w, p, THR, "m1", P))
    assert (v.probability is None) == (v.artifact is None) or (v.status == FlagStatus.SCORED and p != p)
    assert v.window_id == f"bed-7:{w.start_ns}"


@settings(max_examples=examples(300), deadline=None)
@given(p=st.one_of(st.none(), st.floats(0, 1), st.just(float("nan"))), thr=st.floats(0, 1),
       completed=st.floats(-5.0, 30.0), fs=st.sampled_from([500.0, 250.0, 1001 / 2]),
       status=st.sampled_from([SCORABLE, INSUFFICIENT]))
def test_verdicts_encode_as_the_old_flags_for_any_probability_and_threshold(p, thr, completed, fs, status):
    w = _win(1, status, None if status == SCORABLE else NoScoreReason.NO_DATA, fs=fs, completed_after_s=completed)
    if status == SCORABLE and p is None:
        return  # covered above: both raise
    v = decide(w, p, thr, "m1", P)
    if status == SCORABLE and p != p:  # the old encoder published it scored and clean, with a null score
        assert v.status == FlagStatus.INSUFFICIENT and v.reason == NoScoreReason.SCORE_NOT_FINITE
        return
    assert flag_bytes(v) == orjson.dumps(_old_flag_message(w, p, thr, "m1", P))
    if v.status == FlagStatus.SCORED:
        assert v.artifact == bool(is_artifact(p, thr))  # the one decision, and the vectorised form agree


@pytest.mark.parametrize("p", [float("nan"), float("inf"), -float("inf"), np.float32("nan")])
def test_a_score_that_is_not_finite_leaves_its_window_unscored_never_clean(p):
    """The model gave a NaN or an infinity (an fp16 overflow, a broken checkpoint): the window is reported
    unscored with its reason, never scored clean (it was before: status scored, artifact false, probability
    null, which its own schema and client refused). Alarm systems treat it as any unscored window."""
    from jsonschema import Draft202012Validator

    from streamer.client import decode_flag
    from tests.kafka_utils import schema_validator

    v = decide(_win(4), p, THR, "m@sha256:0123456789abcdef", P)
    assert (v.status, v.reason, v.probability, v.artifact) == (FlagStatus.INSUFFICIENT,
                                                                NoScoreReason.SCORE_NOT_FINITE, None, None)
    doc = flag_doc(v)
    validator: Draft202012Validator = schema_validator("artifact-flag.v1.schema.json")
    assert not list(validator.iter_errors(doc))
    flag = decode_flag(flag_bytes(v))
    assert not flag.scored and flag.reason == "score_not_finite" and flag.artifact is None


def test_the_fast_constructor_builds_what_the_dataclass_builds():
    values = ("bed-7", 1, 2, FlagStatus.SCORED, None, 0.25, False, 0.5, "m1", 500.0, 3, 4, 5, 6.5)
    fast = _positional_constructor(Verdict)(*values)
    assert fast == Verdict(*values) and type(fast) is Verdict
    assert [getattr(fast, f.name) for f in fields(Verdict)] == list(values)


def test_a_verdict_is_frozen_and_slotted():
    v = decide(_win(0), 0.5, 0.5, "m1", P)
    with pytest.raises(AttributeError):
        v.artifact = False  # type: ignore[misc]
    assert not hasattr(v, "__dict__") and isinstance(v, Verdict)


# What the tracker made before verdicts were typed, for the sequence in _episode_run (literal output).
OLD_EPISODES = [
    None,
    b'{"schema":2,"patient_id":"bed-7","episode_id":"bed-7:1800000000000000000","seq":42,"state":"open","renewal":false,"reason":null,"start_ns":1800000000000000000,"end_ns":null,"last_flagged_end_ns":1800000020000000000,"peak_probability":0.95,"flagged_windows":2,"model":"m1","updated_at_ns":1800000101500000000,"valid_until_ns":1800000131500000000,"lease_ns":30000000000}',  # noqa: E501
    None,
    b'{"schema":2,"patient_id":"bed-7","episode_id":"bed-7:1800000000000000000","seq":43,"state":"open","renewal":true,"reason":null,"start_ns":1800000000000000000,"end_ns":null,"last_flagged_end_ns":1800000020000000000,"peak_probability":0.95,"flagged_windows":2,"model":"m1","updated_at_ns":1800000115500000000,"valid_until_ns":1800000145500000000,"lease_ns":30000000000}',  # noqa: E501
    b'{"schema":2,"patient_id":"bed-7","episode_id":"bed-7:1800000000000000000","seq":44,"state":"closed","renewal":false,"reason":"clean","start_ns":1800000000000000000,"end_ns":1800000020000000000,"last_flagged_end_ns":1800000020000000000,"peak_probability":0.95,"flagged_windows":2,"model":"m1","updated_at_ns":1800000120500000000,"valid_until_ns":null,"lease_ns":null}',  # noqa: E501
    None,
    b'{"schema":2,"patient_id":"bed-7","episode_id":"bed-7:1800000040000000000","seq":45,"state":"open","renewal":false,"reason":null,"start_ns":1800000040000000000,"end_ns":null,"last_flagged_end_ns":1800000060000000000,"peak_probability":0.7,"flagged_windows":2,"model":"m1","updated_at_ns":1800000131500000000,"valid_until_ns":1800000161500000000,"lease_ns":30000000000}',  # noqa: E501
    b'{"schema":2,"patient_id":"bed-7","episode_id":"bed-7:1800000040000000000","seq":46,"state":"closed","renewal":false,"reason":"stale","start_ns":1800000040000000000,"end_ns":1800000060000000000,"last_flagged_end_ns":1800000060000000000,"peak_probability":0.7,"flagged_windows":2,"model":"m1","updated_at_ns":1800000200500000000,"valid_until_ns":null,"lease_ns":null}',  # noqa: E501
    b'{"schema":2,"patient_id":"bed-7","episode_id":null,"seq":1800000300750001,"state":"closed","renewal":false,"reason":"state_lost","start_ns":null,"end_ns":null,"last_flagged_end_ns":null,"peak_probability":null,"flagged_windows":0,"model":"m1","updated_at_ns":1800000300750000128,"valid_until_ns":null,"lease_ns":null}',  # noqa: E501
]
# PatientState.to_bytes of the old code: after the second open above, with three flags written ahead (an
# artifact at the threshold, a NaN, a truncated window); and a lost patient's fresh state with its close.
OLD_STATE = b'{"v":4,"topic":"in","patient_id":"bed-7","segments":[],"episode":{"flagged_streak":0,"clean_streak":0,"streak_start_ns":1800000040000000000,"streak_peak":0.7,"open_start_ns":1800000040000000000,"last_flagged_end_ns":1800000060000000000,"peak":0.7,"flagged_windows":2,"updated_at_s":1800000131.5,"last_window":[0,1800000050000000000],"seq":45,"pending":{"schema":2,"patient_id":"bed-7","episode_id":"bed-7:1800000040000000000","seq":45,"state":"open","renewal":false,"reason":null,"start_ns":1800000040000000000,"end_ns":null,"last_flagged_end_ns":1800000060000000000,"peak_probability":0.7,"flagged_windows":2,"model":"m1","updated_at_ns":1800000131500000000,"valid_until_ns":1800000161500000000,"lease_ns":30000000000},"renewed_at_s":1800000131.5},"seen_at_s":null,"flags_ahead":[{"grid":0,"flag":{"schema":1,"window_id":"bed-7:1800000060000000000","patient_id":"bed-7","window_start_ns":1800000060000000000,"window_end_ns":1800000070000000000,"status":"scored","reason":null,"probability":0.5,"artifact":true,"threshold":0.5,"model":"m1","fs":500.0,"missing_samples":3,"interpolated_samples":2,"produced_at_ns":1800000012000000000,"latency_ms":0.0}},{"grid":0,"flag":{"schema":1,"window_id":"bed-7:1800000070000000000","patient_id":"bed-7","window_start_ns":1800000070000000000,"window_end_ns":1800000080000000000,"status":"scored","reason":null,"probability":null,"artifact":false,"threshold":0.5,"model":"m1","fs":500.0,"missing_samples":3,"interpolated_samples":2,"produced_at_ns":1800000012000000000,"latency_ms":0.0}},{"grid":0,"flag":{"schema":1,"window_id":"bed-7:1800000080000000000","patient_id":"bed-7","window_start_ns":1800000080000000000,"window_end_ns":1800000090000000000,"status":"insufficient_data","reason":"truncated","probability":null,"artifact":null,"threshold":0.5,"model":"m1","fs":500.0,"missing_samples":3,"interpolated_samples":2,"produced_at_ns":1800000012000000000,"latency_ms":0.0}}]}'  # noqa: E501
OLD_LOST_STATE = b'{"v":3,"topic":"in","patient_id":"bed-7","segments":[],"episode":{"flagged_streak":0,"clean_streak":0,"streak_start_ns":0,"streak_peak":0.0,"open_start_ns":null,"last_flagged_end_ns":0,"peak":0.0,"flagged_windows":0,"updated_at_s":0.0,"last_window":null,"seq":1800000300750001,"pending":{"schema":2,"patient_id":"bed-7","episode_id":null,"seq":1800000300750001,"state":"closed","renewal":false,"reason":"state_lost","start_ns":null,"end_ns":null,"last_flagged_end_ns":null,"peak_probability":null,"flagged_windows":0,"model":"m1","updated_at_ns":1800000300750000128,"valid_until_ns":null,"lease_ns":null},"renewed_at_s":0.0},"seen_at_s":1800000300.75}'  # noqa: E501


def _episode_run():
    """Opens, a renewal, a clean close, a second open, the state then, its stale close, a lost patient."""
    t = EpisodeTracker(EpisodeSettings(open_after=2, close_after=2, stale_after_s=60, lease_s=30, renew_every_s=10),
                       "m1")
    st_ = PatientState("bed-7")
    st_.episode.seq = 41
    out = []

    def upd(k, p, now):
        out.append(t.update(decide(_win(k), p, 0.5, "m1", P), st_.episode, now))

    upd(0, 0.9, NOW)
    upd(1, 0.95, NOW + 1)
    upd(2, 0.1, NOW + 2)
    out.append(t.tend("bed-7", st_.episode, NOW + 15))
    upd(3, 0.1, NOW + 20)
    upd(4, 0.7, NOW + 30)
    upd(5, 0.5, NOW + 31)
    st_.flags_ahead = [FlagAhead(0, decide(_win(6), 0.5, 0.5, "m1", P)),
                       # a NaN scored the old way (decide now leaves it unscored): old records still load
                       FlagAhead(0, replace(decide(_win(7), 0.4, 0.5, "m1", P), probability=float("nan"))),
                       FlagAhead(0, decide(_win(8, INSUFFICIENT, NoScoreReason.TRUNCATED), None, 0.5, "m1", P))]
    state = st_.to_bytes("in")
    out.append(t.tend("bed-7", st_.episode, NOW + 100))
    lost = PatientState("bed-7", seen_at_s=NOW + 200.25)
    out.append(t.lost("bed-7", lost.episode, NOW + 200.25))
    return out, state, lost.to_bytes("in")


def test_the_tracker_makes_the_old_episode_messages_and_the_state_the_old_record():
    out, state, lost_state = _episode_run()
    assert [None if m is None else episode_bytes(m) for m in out] == OLD_EPISODES
    assert state == OLD_STATE
    assert lost_state == OLD_LOST_STATE


@pytest.mark.parametrize("raw", [OLD_STATE, OLD_LOST_STATE])
def test_a_state_record_written_before_verdicts_were_typed_loads_and_republishes_the_same_bytes(raw):
    topic, st_ = PatientState.from_bytes(raw)
    assert topic == "in" and st_.to_bytes("in") == raw, "the same record: a restart reads and rewrites it alike"
    doc = orjson.loads(raw)
    assert [flag_bytes(e.verdict) for e in st_.flags_ahead] == [orjson.dumps(e["flag"])
                                                                for e in doc.get("flags_ahead", [])]
    assert [e.grid for e in st_.flags_ahead] == [e["grid"] for e in doc.get("flags_ahead", [])]
    assert episode_bytes(st_.episode.pending) == orjson.dumps(doc["episode"]["pending"])


def test_a_restored_artifact_verdict_feeds_the_tracker_as_the_live_one_did():
    _, st_ = PatientState.from_bytes(OLD_STATE)
    live = decide(_win(6), 0.5, 0.5, "m1", P)
    assert st_.flags_ahead[0].verdict == live
    assert flag_doc(st_.flags_ahead[1].verdict)["probability"] is None  # the NaN, as published


def _with_flag(**change) -> bytes:
    doc = orjson.loads(OLD_STATE)
    doc["flags_ahead"][0]["flag"].update(change)
    return orjson.dumps(doc)


def _with_pending(**change) -> bytes:
    doc = orjson.loads(OLD_STATE)
    doc["episode"]["pending"].update(change)
    return orjson.dumps(doc)


@pytest.mark.parametrize("raw", [
    _with_flag(patient_id="bed-8"), _with_flag(window_id="bed-7:1"), _with_flag(status="scorable"),
    _with_flag(status=["scored"]), _with_flag(reason={"a": 1}), _with_flag(reason="because"),
    _with_flag(probability=None),  # an artifact without a probability: the tracker could not take its peak
    _with_flag(artifact=None), _with_flag(artifact=1), _with_flag(probability="0.5"), _with_flag(threshold=None),
    _with_flag(window_start_ns=1.5), _with_flag(missing_samples=True), _with_flag(schema=2), _with_flag(schema=True),
    _with_flag(model=None), _with_flag(extra=1),
    _with_pending(patient_id="bed-8"), _with_pending(episode_id="bed-7:1"), _with_pending(state="opened"),
    _with_pending(seq="45"), _with_pending(renewal=None), _with_pending(schema=1), _with_pending(lease_ns=1.5),
    _with_pending(peak_probability="high"), _with_pending(start_ns=None), _with_pending(extra=1),
])
def test_a_forged_verdict_or_pending_message_makes_the_state_unreadable(raw):
    """A state record is hostile bytes: what the worker would republish from it is checked field by field,
    and one it cannot trust is lost (its patient closed conservatively, state/changelog.py)."""
    with pytest.raises(ValueError, match="unreadable patient state"):
        PatientState.from_bytes(raw)


def test_a_fresh_episode_state_has_nothing_pending():
    assert EpisodeState().pending is None
