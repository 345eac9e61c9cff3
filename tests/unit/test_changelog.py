"""Reading the patient-state changelog back: the latest record of a key wins, tombstones remove a state,
and an unreadable record is reported (its patient's state is lost) instead of being skipped."""

from __future__ import annotations

from fractions import Fraction
from types import SimpleNamespace

import orjson
from aiokafka import TopicPartition

from streamer.state.changelog import _apply, parse_state_key, state_key
from streamer.model.decision import decide
from streamer.spec import NoScoreReason, WindowStatus
from streamer.state.patients import FlagAhead, PatientState
from streamer.windows.buffer import EmittedWindow

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


def _doc(**changes) -> bytes:
    st = PatientState("a")
    st.reported(0, 0, Fraction(500), 3)
    st.episode.open_start_ns, st.episode.updated_at_s, st.episode.last_window = 5, 1.5e9, (0, 5)
    doc = orjson.loads(st.to_bytes("in"))
    for path, value in changes.items():
        target = doc
        *parents, leaf = path.split("__")
        for p in parents:
            target = target[p] if not p.isdigit() else target[int(p)]
        target[leaf] = value
    return orjson.dumps(doc)


def test_a_state_with_wrong_field_types_is_lost_not_a_crash_later():
    """The values an adversarial review put in readable records (issue 24): each makes the state
    unreadable at restore (a state_lost close and a dead letter) instead of an exception in a loop."""
    assert _read([_rec(0, state_key("in", "a"), _doc())])[0]["a"].episode.open_start_ns == 5
    for bad in (dict(episode__updated_at_s=None), dict(episode__last_window=[0, "x"]),
                dict(segments__0__next_k="3"), dict(topic=["in"]), dict(patient_id=["a"]),
                dict(episode__open_start_ns=True), dict(episode__surprise=1), dict(segments__0__fs="0"),
                dict(episode__pending="close"), dict(segments="none")):
        states, lost = _read([_rec(0, state_key("in", "a"), _doc(**bad))])
        assert states == {} and set(lost) == {"a"}, bad


def test_flags_written_ahead_survive_the_changelog_and_bad_ones_lose_the_state():
    """Version 4: the flags a wall-clock close wrote ahead are read back as written; a malformed list
    (another patient's flag, no grid, not a list) makes the state unreadable, never a crash later."""
    w = EmittedWindow("a", 0, 0, 10**10, 500.0, WindowStatus.INSUFFICIENT, NoScoreReason.TRUNCATED, None, 0, 0,
                      None, 0.0)
    verdict = decide(w, None, 0.5, "m", produced_at_ns=1)
    flag = orjson.loads(PatientState("a", flags_ahead=[FlagAhead(0, verdict)]).to_bytes("in"))["flags_ahead"][0]["flag"]
    raw = _doc(flags_ahead=[{"grid": 0, "flag": flag}], v=4)
    states, lost = _read([_rec(0, state_key("in", "a"), raw)])
    assert states["a"].flags_ahead == [FlagAhead(0, verdict)] and not lost
    written = orjson.loads(states["a"].to_bytes("in"))
    assert written["flags_ahead"] == [{"grid": 0, "flag": flag}] and written["v"] == 4
    plain = orjson.loads(PatientState("b").to_bytes("in"))
    assert "flags_ahead" not in plain and plain["v"] == 3, "nothing ahead: the version the last release reads"
    for bad in ([{"grid": 0, "flag": {**flag, "patient_id": "b"}}], [{"flag": flag}], [flag], "none",
                [{"grid": "0", "flag": flag}], [{"grid": 0, "flag": flag}] * 257):
        states, lost = _read([_rec(0, state_key("in", "a"), _doc(flags_ahead=bad))])
        assert states == {} and set(lost) == {"a"}, str(bad)[:80]


class _Reader:
    """A reader of the state topic (the read_states interface) that serves `records` at `every_s` apart and
    reports `end` as the partition's end: a broker that answers slowly, or stops answering."""

    def __init__(self, records, end: int, every_s: float):
        self.records, self.end, self.every_s, self.pos = list(records), end, every_s, 0

    def assign(self, tps):
        pass

    async def seek_to_beginning(self, *tps):
        self.pos = 0

    async def getmany(self, *tps, timeout_ms):
        import asyncio

        await asyncio.sleep(self.every_s)
        if self.pos < len(self.records):
            self.pos += 1
            return {tps[0]: [self.records[self.pos - 1]]}
        return {}

    def last_stable_offset(self, tp):
        return self.end

    def highwater(self, tp):
        return self.end

    async def position(self, tp):
        return self.pos


def test_a_restore_that_progresses_slowly_finishes_and_one_that_stalls_fails_naming_the_partition():
    """The deadline follows progress: records every 0.1 s over 1 s finish under a 0.3 s idle timeout;
    a partition whose end is never reached fails after the idle timeout, naming it (the worker then
    exits 1, restore_failed, instead of leaving the partition unassigned)."""
    import asyncio

    import pytest

    from streamer.state.changelog import read_states

    records = [_rec(i, state_key("in", f"p{i}"), _state(f"p{i}", 1)) for i in range(10)]
    done = asyncio.run(read_states(_Reader(records, end=10, every_s=0.1), "state", [TP], idle_timeout_s=0.3))
    assert len(done.states[TP]) == 10 and done.records == 10
    with pytest.raises(TimeoutError, match="no record read for 0.3s from state:0"):
        asyncio.run(read_states(_Reader(records[:3], end=10, every_s=0.05), "state", [TP], idle_timeout_s=0.3))
