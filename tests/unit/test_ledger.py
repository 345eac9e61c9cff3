"""The offsets ledger alone: the commit point never passes a record an unacknowledged output depends on,
never moves back, and ignores acknowledgements from an earlier assignment."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from tests.budget import examples

from streamer.checkpointing import OffsetsLedger

P = ("in", 0)


def test_commit_point_is_the_oldest_of_next_open_and_held():
    ledger = OffsetsLedger()
    ledger.start_partition(P, None)
    for off in range(10):
        ledger.consumed(P, off)
    assert ledger.commit_points({}) == {P: 10}
    assert ledger.commit_points({P: 7}) == {P: 7}  # a window still open since offset 7
    h = ledger.hold(P, 4)
    assert ledger.commit_points({P: 7}) == {P: 4}
    assert ledger.release(h)
    assert ledger.commit_points({P: 7}) == {P: 7}


def test_outputs_without_a_record_count_in_flight_but_never_pin_the_commit():
    ledger = OffsetsLedger()
    ledger.start_partition(P, 5)
    ledger.consumed(P, 5)
    gap = ledger.hold(P, None)  # a window of a gap: no record holds its samples
    assert ledger.in_flight(P) == 1 and ledger.in_flight() == 1
    assert ledger.commit_points({}) == {P: 6}
    ledger.release(gap)
    assert ledger.in_flight() == 0


def test_position_never_goes_backwards():
    ledger = OffsetsLedger()
    ledger.start_partition(P, 3)
    assert ledger.position(P) == 3
    assert ledger.consumed(P, 8)
    assert not ledger.consumed(P, 5), "an older record must not move the position back"
    assert ledger.position(P) == 9


def test_commit_points_only_move_forward():
    ledger = OffsetsLedger()
    ledger.start_partition(P, 20)
    ledger.consumed(P, 20)
    ledger.mark_committed(ledger.commit_points({}))
    assert ledger.committed[P] == 21
    assert ledger.commit_points({P: 15}) == {}, "an open window behind the commit never moves it back"
    ledger.mark_committed({P: 10})
    assert ledger.committed[P] == 21


def test_a_release_from_an_earlier_assignment_changes_nothing():
    ledger = OffsetsLedger()
    ledger.start_partition(P, 0)
    ledger.consumed(P, 0)
    old = ledger.hold(P, 0)
    ledger.drop_partition(P)
    ledger.start_partition(P, 0)  # assigned again: a new hold on the same offset
    ledger.consumed(P, 0)
    new = ledger.hold(P, 0)
    assert not ledger.release(old)
    assert ledger.in_flight(P) == 1 and ledger.commit_points({}) == {}, "held at 0: nothing to commit"
    assert ledger.release(new)
    assert ledger.commit_points({}) == {P: 1}


@settings(max_examples=examples(200), deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["consume", "hold", "release", "commit"]), st.integers(0, 30)),
                max_size=60))
def test_never_commits_past_a_held_record(ops):
    """Model: whatever the order of consumes, holds, releases and commits, every commit point is at most
    the oldest offset still held and at most last consumed + 1, and commits never decrease."""
    ledger = OffsetsLedger()
    ledger.start_partition(P, 0)
    holds, consumed, last_commit = [], -1, -1
    for op, n in ops:
        if op == "consume":
            consumed = max(consumed, n)
            ledger.consumed(P, n)
        elif op == "hold" and consumed >= 0:
            holds.append(ledger.hold(P, min(n, consumed)))
        elif op == "release" and holds:
            ledger.release(holds.pop(n % len(holds)))
        elif op == "commit":
            points = ledger.commit_points({})
            if P in points:
                point = points[P]
                assert point <= consumed + 1
                assert all(point <= h.offset for h in holds)
                assert point > last_commit
                ledger.mark_committed(points)
                last_commit = point


@settings(max_examples=examples(100), deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 40), st.booleans()), max_size=40),
       st.sets(st.integers(0, 3)))
def test_commit_points_of_some_partitions_are_those_of_all_restricted_to_them(ops, asked):
    """A checkpoint of a few partitions (exactly once, one per partition) gets the same points as the
    checkpoint of all of them would give those partitions."""
    ledger = OffsetsLedger()
    for p in range(4):
        ledger.start_partition(("in", p), None)
    for p, off, hold in ops:
        ledger.consumed(("in", p), off)
        if hold:
            ledger.hold(("in", p), off)
    open_offsets = {("in", p): off for p, off, _ in ops[::3]}
    asked = {("in", p) for p in asked}
    every = ledger.commit_points(open_offsets)
    assert ledger.commit_points(open_offsets, asked) == {tp: v for tp, v in every.items() if tp in asked}
