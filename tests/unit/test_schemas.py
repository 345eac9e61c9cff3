"""schemas/ and streamer.client: what producers send and what the worker writes, as published files."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from streamer.client import (FlagDeduplicator, MessageError, SuppressionView, decode_episode, decode_flag)
from streamer.ingest.contract import Chunk, InvalidMessage, decode_json, encode_json
from streamer.publish.episodes import EpisodeTracker
from streamer.model.decision import decide
from streamer.publish.messages import dumps, episode_bytes, episode_doc, flag_doc
from streamer.settings import EpisodeSettings, WindowSettings
from streamer.windows.buffer import INSUFFICIENT, SCORABLE, EmittedWindow
from tests.kafka_utils import schema_validator

T0 = 1_795_316_700_000_000_000
MODEL = "test-model@sha256:0123456789abcdef"


def _window(status: str, reason: str | None, start_ns: int = T0) -> EmittedWindow:
    return EmittedWindow(patient_id="bed-1", partition=0, start_ns=start_ns, end_ns=start_ns + 10**10, fs=500.0,
                         status=status, reason=reason, samples=None, missing=0 if reason is None else 5000,
                         interpolated=0, min_offset=None, completed_at=0.0)


def _errors(name: str, doc) -> list[str]:
    return [e.message for e in schema_validator(name).iter_errors(doc)]


@pytest.mark.parametrize("chunk", [
    Chunk("bed-1", "II", T0, 500.0, np.linspace(-1, 1, 125)),
    Chunk("bed-2", "MLII", T0, 360.0, np.zeros(90), seq=7, segment_start_ns=T0 - 10**9),
])
def test_the_project_json_producer_matches_the_input_schema(chunk):
    assert _errors("ecg-chunk.v1.schema.json", orjson.loads(encode_json(chunk))) == []


@pytest.mark.parametrize("doc", [
    {"patient_id": "b", "t0_ns": T0, "fs": 500, "samples": [0.1]},  # no lead
    {"patient_id": "b", "lead": "II", "t0_ns": T0, "fs": 500, "samples": [0.1], "counts": [1], "gain": 200},
    {"patient_id": "b", "lead": "II", "t0_ns": T0, "fs": 500, "counts": [1]},  # counts without gain
    {"patient_id": "b", "lead": "II", "t0_ns": T0, "fs": 500, "counts": [1], "gain": 200, "units": "uV"},
    {"patient_id": "b", "lead": "II", "t0_ns": T0, "fs": 500, "samples": [0.1], "extra": 1},
    {"patient_id": "b", "lead": "II", "t0_ns": "now", "fs": 500, "samples": [0.1]},
    {"patient_id": "", "lead": "II", "t0_ns": T0, "fs": 500, "samples": [0.1]},
])
def test_what_the_schema_refuses_the_worker_refuses(doc):
    assert _errors("ecg-chunk.v1.schema.json", doc), "the schema must refuse it"
    with pytest.raises(InvalidMessage):
        decode_json(orjson.dumps(doc), WindowSettings())


def test_counts_with_gain_match_the_schema_and_decode():
    doc = {"patient_id": "b", "lead": "II", "t0_ns": T0, "fs": 500, "counts": [100, 200], "gain": 200,
           "baseline": 0}
    assert _errors("ecg-chunk.v1.schema.json", doc) == []
    assert decode_json(orjson.dumps(doc), WindowSettings()).samples.tolist() == [0.5, 1.0]


@pytest.mark.parametrize("status,reason,p", [
    (SCORABLE, None, 0.91), (SCORABLE, None, 0.0), (INSUFFICIENT, "no_data", None),
    (INSUFFICIENT, "gap_too_long", None), (INSUFFICIENT, "implausible_amplitude", None),
])
def test_every_kind_of_flag_matches_the_schema_and_decodes(status, reason, p):
    msg = flag_doc(decide(_window(status, reason), p, 0.208, MODEL))
    assert _errors("artifact-flag.v1.schema.json", msg) == []
    flag = decode_flag(dumps(msg))
    assert flag.window_id == f"bed-1:{T0}" and flag.scored == (status == SCORABLE)
    assert flag.artifact == (None if p is None else p >= 0.208)


def test_a_flag_that_breaks_its_rules_fails_the_schema():
    msg = flag_doc(decide(_window(SCORABLE, None), 0.5, 0.208, MODEL))
    assert _errors("artifact-flag.v1.schema.json", {**msg, "probability": None})  # scored without a score
    assert _errors("artifact-flag.v1.schema.json", {**msg, "status": "maybe"})
    assert _errors("artifact-flag.v1.schema.json", {**msg, "schema": 2})
    with pytest.raises(MessageError, match="scored window needs"):
        decode_flag(dumps({**msg, "probability": None}))
    with pytest.raises(MessageError, match="schema 2"):
        decode_flag(dumps({**msg, "schema": 2}))
    with pytest.raises(MessageError, match="latency_ms"):
        decode_flag(dumps({**msg, "latency_ms": "fast"}))


def test_a_field_added_later_keeps_the_version_for_readers_but_not_for_the_worker():
    """The published output schemas allow fields they do not list (a reader validating with them keeps
    working when one is added), the client ignores them, and the suite's strict copy refuses them."""
    import json

    from jsonschema import Draft202012Validator

    from tests.kafka_utils import SCHEMAS

    msg = {**flag_doc(decide(_window(SCORABLE, None), 0.5, 0.208, MODEL)), "ward": "ICU-3"}
    for name in ("artifact-flag.v1.schema.json", "artifact-episode.v2.schema.json"):
        published = json.loads((SCHEMAS / name).read_text())
        assert published["additionalProperties"] is True, name
    assert not list(Draft202012Validator(json.loads((SCHEMAS / "artifact-flag.v1.schema.json").read_text()))
                    .iter_errors(msg))
    assert decode_flag(dumps(msg)).window_id == f"bed-1:{T0}"
    assert _errors("artifact-flag.v1.schema.json", msg)  # the worker must not write an unlisted field
    inputs = json.loads((SCHEMAS / "ecg-chunk.v1.schema.json").read_text())
    assert inputs["additionalProperties"] is False  # the worker refuses unknown input fields


def test_episode_open_and_close_match_the_schema_and_drive_suppression():
    tracker = EpisodeTracker(EpisodeSettings(open_after=2, close_after=2), MODEL)
    view = SuppressionView()
    events = []
    for i, p in enumerate([0.9, 0.95, 0.1, 0.05]):
        msg = tracker.update(decide(_window(SCORABLE, None, T0 + i * 10**10), p, 0.208, MODEL))
        if msg is not None:
            assert _errors("artifact-episode.v2.schema.json", episode_doc(msg)) == []
            ep = decode_episode(episode_bytes(msg))
            assert view.apply(ep)
            events.append((ep.state, view.suppressed("bed-1")))
    assert events == [("open", True), ("closed", False)]
    assert view.open_episodes() == []


def test_an_older_copy_of_an_episode_never_wins():
    tracker = EpisodeTracker(EpisodeSettings(open_after=1, close_after=1), MODEL)
    opened = decode_episode(episode_bytes(tracker.update(decide(_window(SCORABLE, None), 0.9, 0.2, MODEL))))
    closed = decode_episode(episode_bytes(tracker.update(decide(_window(SCORABLE, None, T0 + 10**10), 0.1, 0.2,
                                                                MODEL))))
    view = SuppressionView()
    assert view.apply(closed) and not view.suppressed("bed-1")
    assert not view.apply(opened), "a re-published open from before the close must not turn suppression on"
    assert not view.suppressed("bed-1")


NOW_S = 1_795_000_000.0
SECOND = 10**9


def _open_at(publisher_s: float, seq_from: int = 0, lease_s: float = 30.0) -> tuple:
    """An opened episode as published by a worker whose clock reads `publisher_s`; returns the tracker,
    its state and the decoded message."""
    t = EpisodeTracker(EpisodeSettings(open_after=1, close_after=1, lease_s=lease_s, renew_every_s=lease_s / 3),
                       MODEL)
    from streamer.state.patients import EpisodeState
    st = EpisodeState(seq=seq_from)
    msg = t.update(decide(_window(SCORABLE, None), 0.9, 0.2, MODEL), st, publisher_s)
    return t, st, decode_episode(episode_bytes(msg))


def test_suppression_lapses_with_the_lease_by_the_readers_clock():
    t, st, opened = _open_at(NOW_S)
    now = int(NOW_S * SECOND)
    view = SuppressionView(skew_s=5, clock=lambda: now)
    view.apply(opened)
    assert view.status("bed-1", now + 34 * SECOND) == "suppressed"
    assert view.status("bed-1", now + 36 * SECOND) == "lapsed", "lease 30 s + skew 5 s, then the feed is silent"
    assert view.open_episodes(now + 36 * SECOND) == []
    renewal = decode_episode(episode_bytes(t.renew("bed-1", st, NOW_S + 20)))
    view.apply(renewal, received_ns=now + 20 * SECOND)
    assert view.status("bed-1", now + 54 * SECOND) == "suppressed"
    assert view.status("bed-1", now + 56 * SECOND) == "lapsed"


def test_a_publisher_clock_ahead_cannot_stretch_the_lease_and_one_behind_fails_safe():
    now = int(NOW_S * SECOND)
    _, _, ahead = _open_at(NOW_S + 3600)
    view = SuppressionView(skew_s=5)
    view.apply(ahead, received_ns=now)
    assert view.suppressed("bed-1", now + 34 * SECOND) and not view.suppressed("bed-1", now + 36 * SECOND)
    _, _, behind = _open_at(NOW_S - 3600)
    view = SuppressionView(skew_s=5)
    view.apply(behind, received_ns=now)
    assert view.status("bed-1", now) == "lapsed", "its lease already ended by this clock: alarms not suppressed"


def test_order_is_by_seq_not_by_clock_and_ties_fail_safe():
    t, st, opened = _open_at(NOW_S)
    closed = decode_episode(episode_bytes(t.update(decide(_window(SCORABLE, None, T0 + 10**10), 0.1, 0.2, MODEL), st,
                                           NOW_S - 3600)))  # stamped an hour before the open: still newer
    assert closed.updated_at_ns < opened.updated_at_ns and closed.seq > opened.seq
    now = int(NOW_S * SECOND)
    for order in ([opened, closed], [closed, opened], [opened, closed, opened, closed]):
        view = SuppressionView()
        for e in order:
            view.apply(e, received_ns=now)
        assert view.status("bed-1", now) == "off", order
    # a close at the same number as the open shown (two owners numbered alike): the close wins
    t2, st2, opened = _open_at(NOW_S)
    twin = decode_episode(dumps({**episode_doc(t2.stale("bed-1", st2, NOW_S + 3600)), "seq": opened.seq}))
    view = SuppressionView()
    view.apply(opened, received_ns=now)
    assert view.apply(twin, received_ns=now) and view.status("bed-1", now) == "off"


def test_state_lost_close_ends_the_open_episode_whatever_its_number():
    # numbered above what a lost state restarts from (an earlier owner's clock ran an hour ahead)
    tracker, _, opened = _open_at(NOW_S, seq_from=int((NOW_S + 3600) * 1_000_000))
    from streamer.state.patients import EpisodeState
    lost = decode_episode(episode_bytes(tracker.lost("bed-1", EpisodeState(), NOW_S)))
    assert lost.seq < opened.seq
    now = int(NOW_S * SECOND)
    view = SuppressionView()
    view.apply(opened, received_ns=now)
    assert view.apply(lost, received_ns=now) and view.status("bed-1", now) == "off"
    lost = orjson.loads(episode_bytes(tracker.lost("x", EpisodeState(), NOW_S)))
    assert _errors("artifact-episode.v2.schema.json", lost) == []


def test_a_version_1_episode_is_refused_with_the_upgrade_hint():
    v1 = {"schema": 1, "patient_id": "b", "episode_id": "b:1", "state": "open", "reason": None, "start_ns": 1,
          "end_ns": None, "last_flagged_end_ns": 2, "peak_probability": 0.9, "flagged_windows": 2, "model": MODEL,
          "updated_at_ns": 3}
    assert _errors("artifact-episode.v1.schema.json", v1) == []
    assert _errors("artifact-episode.v2.schema.json", v1)
    with pytest.raises(MessageError, match="upgrade the workers"):
        decode_episode(dumps(v1))


def test_deduplicator_passes_each_window_once_within_its_capacity():
    flags = [decode_flag(dumps(flag_doc(decide(_window(SCORABLE, None, T0 + i * 10**10), 0.5, 0.2, MODEL))))
             for i in range(5)]
    d = FlagDeduplicator(capacity=3)
    assert [d.first_time(f) for f in flags[:3]] == [True] * 3
    assert [d.first_time(f) for f in flags[:3]] == [False] * 3  # re-published copies
    assert d.first_time(flags[3]) and d.first_time(flags[4])
    assert d.first_time(flags[0]), "forgotten beyond its capacity"
