"""Reading the patient-state changelog back: the latest record of a key wins, tombstones remove a state,
and an unreadable record is reported (its patient's state is lost) instead of being skipped."""

from __future__ import annotations

from types import SimpleNamespace

from aiokafka import TopicPartition

from streamer.state.changelog import _apply, parse_state_key, state_key
from streamer.state.patients import PatientState

TP = TopicPartition("in", 0)


def _rec(offset: int, key: bytes | None, value: bytes | None):
    return SimpleNamespace(topic="state", partition=0, offset=offset, key=key, value=value)


def _read(records):
    wanted, lost = {TP: {}}, {}  # input topic "other" shares partition numbers but is not ours
    for r in records:
        _apply(r, 0, wanted, lost)
    return wanted[TP], {k[1]: u for k, u in lost.items()}


def _state(pid: str, seq: int, topic: str = "in") -> bytes:
    st = PatientState(pid)
    st.episode.seq = seq
    return st.to_bytes(topic)


def test_latest_record_wins_and_a_tombstone_removes_the_state():
    states, lost = _read([_rec(0, state_key("in", "a"), _state("a", 1)), _rec(1, state_key("in", "a"), _state("a", 2)),
                          _rec(2, state_key("in", "b"), _state("b", 1)), _rec(3, state_key("in", "b"), None)])
    assert {pid: st.episode.seq for pid, st in states.items()} == {"a": 2} and lost == {}


def test_an_unreadable_latest_record_loses_the_state_and_a_later_good_one_recovers_it():
    states, lost = _read([_rec(0, state_key("in", "a"), _state("a", 1)), _rec(1, state_key("in", "a"), b"\x00garbage"),
                          _rec(2, state_key("in", "b"), b'{"v": 99}'), _rec(3, state_key("in", "b"), _state("b", 3))])
    assert set(states) == {"b"} and set(lost) == {"a"}
    assert lost["a"].record.offset == 1 and "unreadable" in lost["a"].reason


def test_a_record_whose_key_and_value_disagree_is_not_trusted():
    states, lost = _read([_rec(0, state_key("in", "a"), _state("b", 1))])
    assert states == {} and set(lost) == {"a"}


def test_other_topics_are_ignored_and_an_unreadable_key_is_reported_without_a_patient():
    states, lost = _read([_rec(0, state_key("other", "a"), b"junk"), _rec(1, b"\xff\xfe", b"junk"),
                          _rec(2, state_key("other", "z"), _state("z", 1, topic="other"))])
    assert states == {} and list(lost) == [None]
    assert parse_state_key(b"in:bed:7") == ("in", "bed:7") and parse_state_key(b"nocolon") is None
