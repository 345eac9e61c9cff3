"""Owned partitions (streamer/partitions.py): one object per assignment, `mine` its one answer, a clean
close that releases every part once, newest first, and a dirty close (a fence) that stops it counting at
once and is released by the revocation that follows."""

from __future__ import annotations

import asyncio

import pytest

from streamer.checkpointing import OffsetsLedger
from streamer.partitions import OwnedPartition, OwnedPartitions

TP = ("in", 3)


def test_a_clean_close_releases_every_part_once_newest_first_even_past_a_failing_one():
    parts = OwnedPartitions()
    task = parts.open(TP, 7)
    released: list[str] = []

    async def outputs():
        released.append("outputs")

    def windows():
        released.append("windows")
        raise ValueError("a bug in one part")

    task.on_close(outputs)
    task.on_close(windows)
    task.on_close(lambda: released.append("event time"))
    with pytest.raises(ValueError):
        asyncio.run(parts.close(TP))
    assert released == ["event time", "windows", "outputs"]  # the failure did not keep the outputs open
    assert not task.mine and TP not in parts and parts.get(TP) is None
    assert asyncio.run(parts.close(TP)) is None and released == ["event time", "windows", "outputs"]


def test_a_fence_stops_the_partition_at_once_and_the_revocation_releases_it():
    parts = OwnedPartitions()
    ledger = OffsetsLedger(parts)
    task = parts.open(TP, 0)
    released = []
    task.on_close(lambda: released.append(TP))
    ledger.consumed(TP, 0)
    hold = ledger.hold(TP, 0)
    assert parts.close_dirty(TP) is task
    assert not task.mine and task.fenced and TP not in parts and list(parts) == []
    assert not ledger.consumed(TP, 1), "no record of a fenced partition is let in"
    assert not ledger.release(hold) and not ledger.is_current(hold), "nothing of it counts"
    assert ledger.commit_points({}) == {}, "nothing of it is committed"
    assert released == [] and parts.held(TP) is task
    with pytest.raises(RuntimeError):
        parts.open(TP, 0)  # never two objects for one partition: the fenced one is released first
    asyncio.run(parts.close(TP))
    assert released == [TP] and parts.held(TP) is None
    again = parts.open(TP, 0)
    assert again is not task and again.mine and not ledger.release(hold), "an old hold never counts again"


def test_an_assignment_is_admitted_once_and_a_closed_object_never_again():
    parts = OwnedPartitions()
    task = OwnedPartition(TP, 5)
    assert TP not in parts  # restoring: the consume loop does not let its records in yet
    parts.admit(task)
    assert parts.get(TP) is task and parts.tps() == {TP} and len(parts) == 1
    with pytest.raises(RuntimeError):
        parts.admit(OwnedPartition(TP))
    asyncio.run(parts.close(TP))
    with pytest.raises(RuntimeError):
        parts.admit(task)


def test_a_hold_taken_after_the_partition_left_never_counts():
    parts = OwnedPartitions()
    ledger = OffsetsLedger(parts)
    hold = ledger.hold(TP, 4)  # a window of a revoked partition, emitted late (shutdown, eviction)
    assert not ledger.is_current(hold) and not ledger.release(hold) and ledger.in_flight() == 0
