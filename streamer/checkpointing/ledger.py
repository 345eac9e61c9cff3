"""The offsets ledger: the one owner of what each input partition consumed and what is still in flight.

Per input partition, the committed offset never passes a record that still holds a sample of a window
not yet published and acknowledged: commit = min(oldest record feeding an open window, oldest record
feeding an in-flight output, last consumed + 1). Outputs are windows (flags) and dead letters; every one
of them is held from the moment it is handed on until the broker acknowledges it, also when it depends on
no record (a window of a gap), so the ledger alone says how much is in flight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Hashable

from streamer.partitions import CLOSED, OwnedPartition, OwnedPartitions


@dataclass(frozen=True, slots=True)
class Hold:
    """An output on its way to the broker; `release` it when acknowledged. It belongs to one assignment of
    its partition (`owner`): released after that one closed, it changes nothing."""
    owner: OwnedPartition
    offset: int | None  # the record it depends on, if any

    @property
    def partition(self) -> Hashable:
        return self.owner.tp


class OffsetsLedger:
    """Reads and writes each owned partition's `offsets` (partitions.PartitionOffsets); `partitions` is the
    worker's registry (a registry of its own when the ledger is used alone, as in tests)."""

    def __init__(self, partitions: OwnedPartitions | None = None) -> None:
        self.partitions = partitions if partitions is not None else OwnedPartitions()

    def _offsets(self, partition: Hashable):
        task = self.partitions.get(partition)
        return task.offsets if task is not None else None

    # -- the way in ------------------------------------------------------------------------------
    def consumed(self, partition: Hashable, offset: int) -> bool:
        """Record `offset` was read. Refuses to go backwards (False): a position never moves back within
        an assignment, so a stale or repeated record cannot move the commit point. False for a partition
        not held."""
        o = self._offsets(partition)
        if o is None or (o.next_offset is not None and offset + 1 <= o.next_offset):
            return False
        o.next_offset = offset + 1
        return True

    def hold(self, partition: Hashable, offset: int | None) -> Hold:
        """An output of `partition` handed on; of a partition not held (revoked meanwhile), a hold that
        never counts: whoever owns the partition now redoes that output."""
        task = self.partitions.get(partition)
        if task is None:
            return Hold(CLOSED, offset)
        task.offsets.held[offset] += 1
        task.offsets.count += 1
        return Hold(task, offset)

    def release(self, hold: Hold | None) -> bool:
        """The output was acknowledged. False (nothing changes) for a hold of a closed assignment."""
        if hold is None or not hold.owner.mine:
            return False
        o = hold.owner.offsets
        if o.held[hold.offset] <= 0:
            return False
        o.held[hold.offset] -= 1
        if o.held[hold.offset] == 0:
            del o.held[hold.offset]
        o.count -= 1
        return True

    @staticmethod
    def is_current(hold: Hold | None) -> bool:
        """Whether the output was handed on during the partition's current assignment. One from an earlier
        assignment is redone from the committed offset by this one (exactly once: never publish both)."""
        return hold is not None and hold.owner.mine

    # -- what it says ----------------------------------------------------------------------------
    def position(self, partition: Hashable) -> int:
        """Next offset to consume, as far as this worker knows (the committed one before any record)."""
        o = self._offsets(partition)
        if o is None:
            return 0
        return o.next_offset if o.next_offset is not None else (o.committed or 0)

    def in_flight(self, partition: Hashable | None = None) -> int:
        """Outputs not yet acknowledged, of one partition or of all held."""
        if partition is not None:
            o = self._offsets(partition)
            return o.count if o is not None else 0
        return sum(task.offsets.count for task in self.partitions.values())

    @property
    def committed(self) -> dict[Hashable, int]:
        """The last committed offset of each held partition that has one."""
        return {t.tp: t.offsets.committed for t in self.partitions.values() if t.offsets.committed is not None}

    @property
    def next_offset(self) -> dict[Hashable, int]:
        """Last consumed + 1 of each held partition that consumed a record."""
        return {t.tp: t.offsets.next_offset for t in self.partitions.values() if t.offsets.next_offset is not None}

    def commit_points(self, open_offsets: dict[Hashable, int],
                      partitions: Collection[Hashable] | None = None) -> dict[Hashable, int]:
        """Offsets safe to commit now (of `partitions`, else of all held; `open_offsets` must cover them),
        only those that moved forward since the last commit."""
        out = {}
        tasks = self.partitions.values() if partitions is None else filter(None, map(self.partitions.get, partitions))
        for task in tasks:
            o = task.offsets
            if o.next_offset is None:
                continue
            point = o.next_offset
            if task.tp in open_offsets:
                point = min(point, open_offsets[task.tp])
            held = [off for off in o.held if off is not None]
            if held:
                point = min(point, min(held))
            if point > (o.committed if o.committed is not None else -1):
                out[task.tp] = point
        return out

    def mark_committed(self, points: dict[Hashable, int]) -> None:
        for p, off in points.items():
            o = self._offsets(p)
            if o is not None:
                o.committed = max(off, o.committed if o.committed is not None else -1)

    # -- assignment, for a ledger used alone (the worker's ownership opens and closes its partitions) ------
    def start_partition(self, partition: Hashable, committed: int | None) -> OwnedPartition:
        """A new assignment of `partition`, its offsets starting at `committed` (any earlier one ended)."""
        self.partitions.forget(partition)
        return self.partitions.open(partition, committed)

    def drop_partition(self, partition: Hashable) -> None:
        """The assignment ends: its holds count no more."""
        self.partitions.forget(partition)
