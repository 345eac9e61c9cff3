"""The commit rule, in one place.

Per input partition, the committed offset never passes a record that still holds a sample of a window
not yet published and acknowledged: commit = min(oldest record feeding an open window, oldest record
feeding an in-flight window, oldest dead-letter record not yet acknowledged, last consumed + 1).
"""

from __future__ import annotations

from collections import Counter
from typing import Hashable


class CommitTracker:
    def __init__(self) -> None:
        self.next_offset: dict[Hashable, int] = {}  # last consumed + 1
        self.inflight: dict[Hashable, Counter[int]] = {}  # partition -> offsets held by unacked outputs
        self.committed: dict[Hashable, int] = {}
        # Bumped at every assignment and revocation: an acknowledgement from an earlier assignment of a
        # partition must not release a hold taken by the current one.
        self.generation: dict[Hashable, int] = {}

    def consumed(self, partition: Hashable, offset: int) -> None:
        if offset + 1 > self.next_offset.get(partition, -1):
            self.next_offset[partition] = offset + 1

    def hold(self, partition: Hashable, offset: int | None) -> tuple | None:
        """An output (window or dead letter) that depends on `offset` is on its way to the broker.
        Returns the token to release it with."""
        if offset is None:
            return None
        self.inflight.setdefault(partition, Counter())[offset] += 1
        return (partition, self.generation.get(partition, 0), offset)

    def release(self, token: tuple | None) -> None:
        """That output was acknowledged by the broker."""
        if token is None:
            return
        partition, generation, offset = token
        held = self.inflight.get(partition)
        if generation != self.generation.get(partition, 0) or held is None or held[offset] <= 0:
            return  # taken under an earlier assignment of the partition
        held[offset] -= 1
        if held[offset] == 0:
            del held[offset]

    def in_flight(self, partition: Hashable) -> int:
        return sum(self.inflight.get(partition, Counter()).values())

    def commit_points(self, open_offsets: dict[Hashable, int]) -> dict[Hashable, int]:
        """Offsets safe to commit now, only those that moved forward since the last commit."""
        out = {}
        for partition, nxt in self.next_offset.items():
            point = nxt
            if partition in open_offsets:
                point = min(point, open_offsets[partition])
            held = self.inflight.get(partition)
            if held:
                point = min(point, min(held))
            if point > self.committed.get(partition, -1):
                out[partition] = point
        return out

    def mark_committed(self, points: dict[Hashable, int]) -> None:
        for p, off in points.items():
            self.committed[p] = max(off, self.committed.get(p, -1))

    def start_partition(self, partition: Hashable, committed: int | None) -> None:
        self.generation[partition] = self.generation.get(partition, 0) + 1
        self.next_offset.pop(partition, None)
        self.inflight.pop(partition, None)
        if committed is not None:
            self.committed[partition] = committed
        else:
            self.committed.pop(partition, None)

    def drop_partition(self, partition: Hashable) -> None:
        self.generation[partition] = self.generation.get(partition, 0) + 1
        self.next_offset.pop(partition, None)
        self.inflight.pop(partition, None)
        self.committed.pop(partition, None)

    def pending(self) -> int:
        return sum(sum(c.values()) for c in self.inflight.values())
