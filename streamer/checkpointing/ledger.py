"""The offsets ledger: the one owner of what each input partition consumed and what is still in flight.

Per input partition, the committed offset never passes a record that still holds a sample of a window
not yet published and acknowledged: commit = min(oldest record feeding an open window, oldest record
feeding an in-flight output, last consumed + 1). Outputs are windows (flags) and dead letters; every one
of them is held from the moment it is handed on until the broker acknowledges it, also when it depends on
no record (a window of a gap), so the ledger alone says how much is in flight.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Collection, Hashable


@dataclass(frozen=True, slots=True)
class Hold:
    """An output on its way to the broker; `release` it when acknowledged."""
    partition: Hashable
    generation: int
    offset: int | None  # the record it depends on, if any


class OffsetsLedger:
    def __init__(self) -> None:
        self.next_offset: dict[Hashable, int] = {}  # last consumed + 1
        self.committed: dict[Hashable, int] = {}
        self._held: dict[Hashable, Counter] = {}  # partition -> offset (or None) -> outputs in flight
        # The same, counted per partition: in_flight() runs on every consume-loop pass (backpressure), so
        # it must not walk every held offset.
        self._count: Counter = Counter()
        # Bumped at every assignment and revocation: an acknowledgement from an earlier assignment of a
        # partition must not release a hold taken by the current one.
        self.generation: dict[Hashable, int] = {}

    # -- the way in ------------------------------------------------------------------------------
    def consumed(self, partition: Hashable, offset: int) -> bool:
        """Record `offset` was read. Refuses to go backwards (False): a position never moves back within
        an assignment, so a stale or repeated record cannot move the commit point."""
        if offset + 1 <= self.next_offset.get(partition, -1):
            return False
        self.next_offset[partition] = offset + 1
        return True

    def hold(self, partition: Hashable, offset: int | None) -> Hold:
        hold = Hold(partition, self.generation.get(partition, 0), offset)
        self._held.setdefault(partition, Counter())[offset] += 1
        self._count[partition] += 1
        return hold

    def release(self, hold: Hold | None) -> bool:
        """The output was acknowledged. False (nothing changes) for a hold of an earlier assignment."""
        if hold is None:
            return False
        held = self._held.get(hold.partition)
        if hold.generation != self.generation.get(hold.partition, 0) or held is None or held[hold.offset] <= 0:
            return False
        held[hold.offset] -= 1
        if held[hold.offset] == 0:
            del held[hold.offset]
        self._count[hold.partition] -= 1
        return True

    def is_current(self, hold: Hold | None) -> bool:
        """Whether the output was handed on during the partition's current assignment. One from an earlier
        assignment is redone from the committed offset by this one (exactly once: never publish both)."""
        return hold is not None and hold.generation == self.generation.get(hold.partition, 0)

    # -- what it says ----------------------------------------------------------------------------
    def position(self, partition: Hashable) -> int:
        """Next offset to consume, as far as this worker knows (the committed one before any record)."""
        return self.next_offset.get(partition, self.committed.get(partition, 0))

    def in_flight(self, partition: Hashable | None = None) -> int:
        """Outputs not yet acknowledged, of one partition or of all."""
        return self._count[partition] if partition is not None else self._count.total()

    def commit_points(self, open_offsets: dict[Hashable, int],
                      partitions: Collection[Hashable] | None = None) -> dict[Hashable, int]:
        """Offsets safe to commit now (of `partitions`, else of all; `open_offsets` must cover them), only
        those that moved forward since the last commit."""
        out = {}
        for partition, nxt in self.next_offset.items():
            if partitions is not None and partition not in partitions:
                continue
            point = nxt
            if partition in open_offsets:
                point = min(point, open_offsets[partition])
            held = [o for o in self._held.get(partition, ()) if o is not None]
            if held:
                point = min(point, min(held))
            if point > self.committed.get(partition, -1):
                out[partition] = point
        return out

    def mark_committed(self, points: dict[Hashable, int]) -> None:
        for p, off in points.items():
            self.committed[p] = max(off, self.committed.get(p, -1))

    # -- assignment ------------------------------------------------------------------------------
    def start_partition(self, partition: Hashable, committed: int | None) -> None:
        self._reset(partition)
        if committed is not None:
            self.committed[partition] = committed

    def drop_partition(self, partition: Hashable) -> None:
        self._reset(partition)

    def _reset(self, partition: Hashable) -> None:
        self.generation[partition] = self.generation.get(partition, 0) + 1
        self.next_offset.pop(partition, None)
        self._held.pop(partition, None)
        self._count.pop(partition, None)
        self.committed.pop(partition, None)
