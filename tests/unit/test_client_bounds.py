"""The downstream client refuses what no worker writes and no record stretches a suppression (issue 45,
item 5): a forged open episode with lease_ns = 1e18 kept a bed suppressed for 32 years, and with seq =
2**63-1 the worker's own later messages never replaced it. The decoders' range checks, the reader's cap on
every lease, and a hypothesis test over forged records interleaved with a worker's real ones, through the
real EpisodeTracker, decode_episode and SuppressionView."""

from __future__ import annotations

import json
import math

import orjson
import pytest
from hypothesis import given, settings, strategies as st
from tests.budget import examples

from streamer.client import (DEFAULT_MAX_LEASE_S, MAX_LEASE_NS, MAX_SEQ, SEQ_LEAD_NS, MessageError, SuppressionView,
                             decode_episode, decode_flag)
from streamer.publish.episodes import EpisodeTracker
from streamer.model.decision import Verdict, decide
from streamer.publish.messages import episode_bytes, episode_doc, flag_doc
from streamer.settings import EpisodeSettings
from streamer.state.patients import EpisodeState
from streamer.windows.buffer import SCORABLE, EmittedWindow

NS = 10**9
NOW_S = 1_795_000_000.0
NOW = int(NOW_S * NS)
MODEL = "test-model@sha256:0123456789abcdef"
MAX_LEASE = int(DEFAULT_MAX_LEASE_S * NS)


def _verdict(start_ns: int, p: float | None, pid: str = "bed-1") -> Verdict:
    w = EmittedWindow(patient_id=pid, partition=0, start_ns=start_ns, end_ns=start_ns + 10 * NS, fs=500.0,
                      status=SCORABLE if p is not None else "insufficient_data",
                      reason=None if p is not None else "no_data", samples=None, missing=0, interpolated=0,
                      min_offset=None, completed_at=0.0)
    return decide(w, p, 0.2, MODEL, produced_at_ns=start_ns + 11 * NS)


def _flag_doc(start_ns: int, p: float | None, pid: str = "bed-1") -> dict:
    return dict(flag_doc(_verdict(start_ns, p, pid)))


def _opened(now_s: float = NOW_S, seq: int = 0) -> tuple[EpisodeTracker, EpisodeState, dict]:
    tracker, st_ = EpisodeTracker(EpisodeSettings(open_after=1), MODEL), EpisodeState(seq=seq)
    return tracker, st_, episode_doc(tracker.update(_verdict(NOW - 20 * NS, 0.9), st_, now_s))


def _dec(doc: dict, now_ns: int = NOW) -> object:
    return decode_episode(orjson.dumps(doc), now_ns=now_ns)


# -- the reproduction ---------------------------------------------------------------------------------------
def test_a_forged_lease_cannot_outlast_the_readers_maximum():
    _, _, opened = _opened()
    view = SuppressionView()
    # in range by the decoder's bounds: the longest lease a worker may write, valid that long
    long_lease = {**opened, "lease_ns": MAX_LEASE_NS, "valid_until_ns": opened["updated_at_ns"] + MAX_LEASE_NS}
    view.apply(_dec(long_lease), received_ns=NOW)
    assert view.suppressed("bed-1", NOW + MAX_LEASE) and not view.suppressed("bed-1", NOW + MAX_LEASE + 1)
    assert view.lease_end_ns("bed-1") == NOW + MAX_LEASE
    # out of range: what kept a bed suppressed for 32 years is refused, never applied
    for forged in ({**opened, "lease_ns": 10**18, "valid_until_ns": opened["updated_at_ns"] + 10**18},
                   {**opened, "valid_until_ns": 2**62}, {**opened, "seq": 2**63 - 1}, {**opened, "lease_ns": 0},
                   {**opened, "valid_until_ns": opened["updated_at_ns"]}, {**opened, "lease_ns": None},
                   {**opened, "state": "closed", "reason": "clean"}, {**opened, "seq": 0},
                   {**opened, "peak_probability": 7.0}, {**opened, "flagged_windows": -1},
                   {**opened, "updated_at_ns": 2**63}, {**opened, "seq": MAX_SEQ + 1}):
        with pytest.raises(MessageError):
            _dec(forged)


def test_a_reader_configured_for_a_longer_lease_honours_it():
    tracker = EpisodeTracker(EpisodeSettings(open_after=1, lease_s=120, renew_every_s=30), MODEL)
    opened = _dec(episode_doc(tracker.update(_verdict(NOW - 20 * NS, 0.9), EpisodeState(), NOW_S)))
    default, raised = SuppressionView(), SuppressionView(max_lease_s=125)
    for view in (default, raised):
        view.apply(opened, received_ns=NOW)
    assert not default.suppressed("bed-1", NOW + 60 * NS), "the default reader caps at 35 s: it fails safe"
    assert raised.suppressed("bed-1", NOW + 120 * NS) and not raised.suppressed("bed-1", NOW + 126 * NS)
    with pytest.raises(ValueError):
        SuppressionView(max_lease_s=math.inf)


def test_seq_bound_is_by_the_readers_clock_and_never_refuses_a_real_number():
    # a patient first numbered from a worker clock an hour ahead, then a year of messages every 10 s
    tracker, st_, opened = _opened(NOW_S + 3600)
    assert _dec(opened).seq == int((NOW_S + 3600) * 1e6) + 1
    st_.seq += 365 * 8640
    renewal = episode_doc(tracker.renew("bed-1", st_, NOW_S + 3600 + 10))
    assert _dec(renewal).seq == opened["seq"] + 365 * 8640 + 1
    # the most a day-ahead clock gives is in range; a day and a second is not
    lead_seq = (NOW + SEQ_LEAD_NS) // 1000
    assert _dec({**opened, "seq": lead_seq}).seq == lead_seq
    with pytest.raises(MessageError, match="seq"):
        _dec({**opened, "seq": lead_seq + 10**6})


def test_a_forged_number_ahead_is_passed_by_the_worker_at_its_next_assignment():
    """A forged open at the highest seq the reader accepts lapses within the cap; the worker's own later
    messages are hidden only until it reads the number back (state.changelog.read_episode_seqs at
    assignment) and continues above it: then its messages are applied again."""
    tracker, st_, opened = _opened()
    view = SuppressionView()
    view.apply(_dec(opened), received_ns=NOW)
    forged = {**opened, "seq": (NOW + SEQ_LEAD_NS) // 1000, "episode_id": "bed-1:forged"}
    view.apply(_dec(forged), received_ns=NOW + NS)
    assert not view.suppressed("bed-1", NOW + NS + MAX_LEASE + 1), "the forged lease lapses by itself"
    close = tracker.update(_verdict(NOW - 10 * NS, 0.1), st_, NOW_S + 60)  # close_after 2: not yet
    close = close or tracker.update(_verdict(NOW, 0.1), st_, NOW_S + 60)
    assert close is not None and not view.apply(_dec(episode_doc(close), NOW + 60 * NS), received_ns=NOW + 60 * NS)
    # the worker's next assignment: its counter starts at the highest number the topic holds
    restarted = EpisodeState(seq=max(st_.seq, forged["seq"]))
    tracker2 = EpisodeTracker(EpisodeSettings(open_after=1), MODEL)
    reopened = episode_doc(tracker2.update(_verdict(NOW + 100 * NS, 0.9), restarted, NOW_S + 120))
    later = NOW + 120 * NS
    assert view.apply(_dec(reopened, later), received_ns=later) and view.suppressed("bed-1", later)


# -- flags ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change", [
    {"probability": 1.5}, {"probability": -0.1}, {"threshold": 2.0}, {"fs": 0}, {"fs": -500.0},
    {"window_end_ns": None}, {"window_end_ns": "later"}, {"reason": 7}, {"artifact": "yes"}, {"fs": 10**400},
    {"probability": True}, {"missing_samples": -1}, {"latency_ms": -5.0}, {"window_start_ns": 2**64},
    {"status": "insufficient_data"}, {"patient_id": ""}, {"reason": "no_data"},
])
def test_a_flag_out_of_range_or_of_the_wrong_type_is_refused(change):
    doc = {**_flag_doc(NOW, 0.9), **change}
    if "window_end_ns" in change and isinstance(change["window_end_ns"], int):
        doc["window_end_ns"] = doc["window_start_ns"]
    with pytest.raises(MessageError):
        decode_flag(json.dumps(doc).encode())  # the standard library writes integers of any size


def test_a_flag_missing_a_field_or_with_its_end_before_its_start_is_refused():
    doc = _flag_doc(NOW, None)
    assert decode_flag(orjson.dumps(doc)).reason == "no_data"
    for name in doc:
        if name != "schema":
            with pytest.raises(MessageError, match=repr(name)):
                decode_flag(orjson.dumps({k: v for k, v in doc.items() if k != name}))
    with pytest.raises(MessageError, match="after"):
        decode_flag(orjson.dumps({**doc, "window_end_ns": doc["window_start_ns"]}))
    with pytest.raises(MessageError):
        decode_flag(b'{"schema": 1, "probability": NaN}')


@settings(max_examples=examples(300), deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(_flag_doc(NOW, 0.5))), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6)))
def test_any_flag_decodes_within_its_ranges_or_is_a_message_error(change):
    try:
        f = decode_flag(json.dumps({**_flag_doc(NOW, 0.5), **change}).encode())
    except MessageError:
        return
    assert f.probability is None or 0 <= f.probability <= 1
    assert 0 <= f.threshold <= 1 and math.isfinite(f.fs) and f.fs > 0 and f.window_end_ns > f.window_start_ns
    assert f.reason is None or isinstance(f.reason, str)


# -- suppression never outlasts the cap: forged records among a worker's own ---------------------------------
def _forged_episode(draw, last_seq: int, now_ns: int) -> bytes:
    seq = draw(st.sampled_from([1, last_seq - 1, last_seq, last_seq + 1, last_seq + 10**6,
                                (now_ns + SEQ_LEAD_NS) // 1000, MAX_SEQ, 2**63 - 1, 2**64]))
    lease = draw(st.sampled_from([1, 30 * NS, MAX_LEASE_NS, MAX_LEASE_NS + 1, 10**18, None]))
    updated = draw(st.sampled_from([now_ns, now_ns - 3600 * NS, now_ns + 365 * 86400 * NS, 0]))
    until = draw(st.sampled_from([None, updated + (lease or 1), 2**62, updated]))
    state = draw(st.sampled_from(["open", "closed"]))
    return json.dumps({"schema": 2, "patient_id": "bed-1", "episode_id": draw(st.sampled_from(["bed-1:1", None])),
                         "seq": seq, "state": state, "renewal": draw(st.booleans()),
                         "reason": None if state == "open" else draw(st.sampled_from(["clean", "state_lost"])),
                         "start_ns": 1, "end_ns": None, "last_flagged_end_ns": 2, "peak_probability": 0.9,
                         "flagged_windows": 1, "model": MODEL, "updated_at_ns": updated, "valid_until_ns": until,
                         "lease_ns": lease}).encode()


@settings(max_examples=examples(400), deadline=None)
@given(st.data())
def test_no_sequence_of_records_suppresses_past_the_cap_after_the_last_open_applied(data):
    """Forged records (any seq, lease, validity, state) interleaved with a real worker's opens, renewals and
    closes: suppressed() is never true later than max lease after the last open record the view applied,
    and once everything stops it ends within the cap."""
    tracker, st_ = EpisodeTracker(EpisodeSettings(open_after=1, close_after=1), MODEL), EpisodeState()
    view = SuppressionView()
    t = NOW
    last_open_applied = None
    for step in range(data.draw(st.integers(1, 25))):
        t += data.draw(st.sampled_from([0, NS, 10 * NS, 40 * NS]))
        kind = data.draw(st.sampled_from(["forged", "flag", "renew"]))
        if kind == "forged":
            value = _forged_episode(data.draw, st_.seq or int(t / 1000), t)
        else:
            msg = (tracker.update(_verdict(NOW + step * 10 * NS, data.draw(st.sampled_from([0.9, 0.1]))), st_,
                                  t / NS) if kind == "flag" else tracker.renew("bed-1", st_, t / NS))
            if msg is None:
                continue
            value = episode_bytes(msg)
        try:
            episode = decode_episode(value, now_ns=t)
        except MessageError:
            assert kind == "forged", "a real record was refused"
            continue
        view.apply(episode, received_ns=t)
        if episode.is_open and view.episode("bed-1") is episode:
            last_open_applied = t
        for probe in (t, t + MAX_LEASE, t + MAX_LEASE + 1, t + 10**18):
            if view.suppressed("bed-1", probe):
                assert last_open_applied is not None and probe <= last_open_applied + MAX_LEASE
    assert not view.suppressed("bed-1", t + MAX_LEASE + 1)
