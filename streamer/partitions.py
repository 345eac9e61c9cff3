"""Owned partitions: one object per input partition for the span of one assignment to this worker (Kafka
Streams' StreamTask, quix-streams' StorePartition), and the registry of those the worker holds now.

Invariants:
- `OwnedPartition.mine` is True from the assignment until `close` (a revocation: what was in flight was
  drained and checkpointed first) or `close_dirty` (a fence: another owner holds the partition; nothing of
  it may count or be committed any more), and never True again. "Is this partition still mine?" has this one
  answer.
- A later assignment of the same topic-partition is a new object. A hold or a send captured under one
  assignment therefore can never count under the next (no generation numbers to compare), and what an
  owner hangs on the object (its offsets, here) goes with it.
- Each part that keeps something per partition registers how to release it (`on_close`) when it takes the
  partition; `close` runs those once, newest first, so a revocation releases every part in one call and no
  part is forgotten.
- The registry holds only partitions that are `mine`: a closed one, clean or dirty, leaves it at once, so
  the consume loop, the checkpoint schedule and the lag gauges never see it again. A fenced one stays
  `held` (its parts' pieces readable) until the revocation releases it.
- What each part keeps of the partition lives on the object (`offsets`, `windows`, `states`,
  `event_lead_ms`), set by that part and released by its closer: no part keeps a map by partition of its
  own. Global concerns (the memory and patient caps' LRU order, the micro-batcher) keep indexes of patients
  only, emptied by the same closers.
"""

from __future__ import annotations

from collections import Counter
from inspect import isawaitable
from typing import Any, Awaitable, Callable, Hashable, Iterator

Closer = Callable[[], Awaitable[None] | object]


class PartitionOffsets:
    """What the offsets ledger (checkpointing/ledger.py) keeps of one partition for one assignment."""
    __slots__ = ("next_offset", "committed", "held", "count")

    def __init__(self, committed: int | None) -> None:
        self.next_offset: int | None = None  # last consumed + 1
        self.committed = committed
        self.held: Counter = Counter()  # offset (or None) -> outputs in flight
        self.count = 0  # the same, summed: asked on every consume-loop pass (backpressure)


class OwnedPartition:
    """One assignment of one input partition, and what every part keeps of it (each set by its part; the
    types of the higher layers' pieces are named, not imported: this module sits below them)."""
    __slots__ = ("tp", "mine", "fenced", "offsets", "windows", "states", "event_lead_ms", "_closers")

    def __init__(self, tp: Hashable, committed: int | None = None) -> None:
        self.tp = tp
        self.mine = True
        self.fenced = False  # closed dirty: lost to another owner
        self.offsets = PartitionOffsets(committed)  # checkpointing/ledger.py
        self.windows: Any = None  # windows/stage.py PartitionWindows: its patients' streams, its flow clock
        self.states: Any = None  # state/store.py PartitionStates: its patients' states, changed and expired
        self.event_lead_ms: int | None = None  # delivery/event_time.py: its input's newest timestamp, ahead
        self._closers: list[Closer] = []

    def on_close(self, closer: Closer) -> None:
        """`closer()` (sync or async) releases one part's piece of this partition; run once at close."""
        self._closers.append(closer)

    async def close(self) -> None:
        """Release every part's piece, newest first. A closer that fails does not keep the others from
        running; the first failure is raised after all ran."""
        self.mine = False
        closers, self._closers = self._closers[::-1], []
        first: BaseException | None = None
        for closer in closers:
            try:
                result = closer()
                if isawaitable(result):  # an async part's release; what a sync one returns is not used
                    await result
            except Exception as exc:  # noqa: BLE001 (raised below, once every part was released)
                first = first or exc
        if first is not None:
            raise first

    def __repr__(self) -> str:
        state = "mine" if self.mine else "fenced" if self.fenced else "closed"
        return f"OwnedPartition({self.tp!r}, {state})"


CLOSED = OwnedPartition("closed")  # what a hold of a partition not held belongs to: it never counts
CLOSED.mine = False


class OwnedPartitions:
    """The partitions this worker holds now: iterates their topic-partitions, `get` gives the object."""

    def __init__(self) -> None:
        self._by_tp: dict[Hashable, OwnedPartition] = {}
        self._fenced: dict[Hashable, OwnedPartition] = {}  # closed dirty, their parts not yet released

    def open(self, tp: Hashable, committed: int | None = None) -> OwnedPartition:
        """A new assignment of `tp`, held at once (`admit` of a new OwnedPartition)."""
        return self.admit(OwnedPartition(tp, committed))

    def admit(self, task: OwnedPartition) -> OwnedPartition:
        """Hold `task` from now on: the consume loop lets its records in. One object per partition: the
        previous assignment must be closed first."""
        if task.tp in self._by_tp or task.tp in self._fenced:
            raise RuntimeError(f"{task.tp!r} is already held: close it before it is assigned again")
        if not task.mine:
            raise RuntimeError(f"{task!r} was closed: a new assignment is a new object")
        self._by_tp[task.tp] = task
        return task

    async def close(self, tp: Hashable) -> OwnedPartition | None:
        """A revocation: its parts released (after its drain and checkpoint, if it was still mine; a fenced
        one has neither). None if `tp` is not held."""
        task = self._by_tp.pop(tp, None) or self._fenced.pop(tp, None)
        if task is not None:
            await task.close()
        return task

    def close_dirty(self, tp: Hashable) -> OwnedPartition | None:
        """A fence: the partition stops counting at once (no record let in, no output counted, nothing
        committed) and leaves the registry; its parts are released by the revocation that follows (`close`:
        no drain, no checkpoint)."""
        task = self._by_tp.pop(tp, None)
        if task is not None:
            task.mine, task.fenced = False, True
            self._fenced[tp] = task
        return task

    def forget(self, tp: Hashable) -> None:
        """End `tp`'s assignment where no part keeps anything of it (a ledger of its own). Refused while a
        part does (windows, states or a closer): those are released by `close`, never dropped unreleased
        (the stage's patient indexes would keep streams of an ended assignment)."""
        task = self._by_tp.get(tp) or self._fenced.get(tp)
        if task is None:
            return
        if task.windows is not None or task.states is not None or task._closers:
            raise RuntimeError(f"{task!r} holds the parts' pieces: close it, do not forget it")
        self._by_tp.pop(tp, None)
        self._fenced.pop(tp, None)
        task.mine = False

    def held(self, tp: Hashable) -> OwnedPartition | None:
        """The object of `tp`, mine or fenced and not yet released (what a revocation closes)."""
        return self._by_tp.get(tp) or self._fenced.get(tp)

    def every_held(self) -> list[OwnedPartition]:
        """Every object not yet released, mine or fenced: what the parts' pieces are found on."""
        return [*self._by_tp.values(), *self._fenced.values()]

    def get(self, tp: Hashable) -> OwnedPartition | None:
        return self._by_tp.get(tp)

    def tps(self) -> set:
        """A snapshot of the topic-partitions held (safe to iterate across awaits)."""
        return set(self._by_tp)

    def __contains__(self, tp: object) -> bool:
        return tp in self._by_tp

    def __iter__(self) -> Iterator[Hashable]:
        """The topic-partitions held, as a snapshot (as a dict iterates its keys)."""
        return iter(list(self._by_tp))

    def values(self) -> list[OwnedPartition]:
        return list(self._by_tp.values())

    def __len__(self) -> int:
        return len(self._by_tp)

    def __bool__(self) -> bool:
        return bool(self._by_tp)
