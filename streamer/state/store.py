"""Patient states of the partitions this worker owns, and which changed since the last checkpoint.

Each partition's states live on its `OwnedPartition` (`states`, a `PartitionStates`), found through the
worker's registry of owned partitions: the store keeps no map by partition of its own. A partition's states
are made by `load` (its restore, at assignment, before the registry admits it) or by the first state
adopted, and dropped by `release`, one of the partition's closers.
"""

from __future__ import annotations

import time
from typing import Hashable, Iterator

from streamer.partitions import OwnedPartition, OwnedPartitions
from streamer.state.patients import FlagAhead, PatientState


class PartitionStates:
    """What the store keeps of one owned partition."""
    __slots__ = ("by_patient", "dirty", "expired", "seq_floors")

    def __init__(self, by_patient: dict[str, PatientState] | None = None,
                 seq_floors: dict[str, int] | None = None) -> None:
        self.by_patient: dict[str, PatientState] = by_patient if by_patient is not None else {}
        self.dirty: set[str] = set()  # changed since the last checkpoint took them
        self.expired: set[str] = set()  # tombstones to write at the next checkpoint
        # the highest episode seq readers have seen of each patient (the episodes topic, read at assignment):
        # a state made or restored here never numbers its messages below it
        self.seq_floors: dict[str, int] = seq_floors if seq_floors is not None else {}


class StateStore:
    """`clock`: wall time, stamped on each state as it is taken for writing (its last change). `owned`: the
    worker's registry of owned partitions (a store used alone keeps one of its own)."""

    def __init__(self, clock=time.time, owned: OwnedPartitions | None = None) -> None:
        self.clock = clock
        self.owned = owned if owned is not None else OwnedPartitions()

    def load(self, task: OwnedPartition, states: dict[str, PatientState],
             seq_floors: dict[str, int] | None = None) -> None:
        """The partition's states as restored from the changelog, before any of its records is processed;
        `seq_floors`: the highest episode seq of each patient in the episodes topic."""
        now = self.clock()
        floors = seq_floors or {}
        for st in states.values():
            if st.seen_at_s is None:  # an older state version: its time to live starts now
                st.seen_at_s = now
            st.episode.seq = max(st.episode.seq, floors.get(st.patient_id, 0))
        task.states = PartitionStates(states, floors)  # one dict for every partition the restore read

    def release(self, task: OwnedPartition) -> None:
        """The partition's close: its states go with it (its next owner restores them from the changelog)."""
        task.states = None

    def of(self, partition: Hashable) -> PartitionStates | None:
        """The states of `partition` while it is held (mine, or fenced and not yet released)."""
        task = self.owned.held(partition)
        return task.states if task is not None else None

    def _of_held(self, partition: Hashable) -> PartitionStates:
        """As `of`, made on first use: a partition that restored nothing gets its states with its first
        patient. Raises for a partition not held (nothing may be kept of it)."""
        task = self.owned.held(partition)
        if task is None:
            raise KeyError(f"partition {partition!r} is not held: no state is kept of it")
        if task.states is None:
            task.states = PartitionStates()
        return task.states

    def states_of(self, partition: Hashable) -> dict[str, PatientState]:
        """The partition's states by patient ({} when none are held)."""
        ps = self.of(partition)
        return ps.by_patient if ps is not None else {}

    def patient(self, partition: Hashable, patient_id: str) -> PatientState:
        st = self.lookup(partition, patient_id)
        if st is None:
            st = self.adopt(partition, self.new_state(partition, patient_id))
        return st

    def lookup(self, partition: Hashable, patient_id: str) -> PatientState | None:
        ps = self.of(partition)
        return ps.by_patient.get(patient_id) if ps is not None else None

    def new_state(self, partition: Hashable, patient_id: str) -> PatientState:
        """A fresh state for a patient this store does not hold, not yet held (see `adopt`)."""
        st = PatientState(patient_id, seen_at_s=self.clock())
        ps = self.of(partition)
        st.episode.seq = ps.seq_floors.get(patient_id, 0) if ps is not None else 0
        return st

    def adopt(self, partition: Hashable, st: PatientState) -> PatientState:
        """Hold `st` (from `new_state`) from now on, unless a state of its patient came meanwhile."""
        ps = self._of_held(partition)
        held = ps.by_patient.setdefault(st.patient_id, st)
        if held is st:
            ps.expired.discard(st.patient_id)  # back before its tombstone was written
        return held

    def reported(self, w) -> None:
        """Window `w` (an EmittedWindow) was published and acknowledged."""
        if self.of(w.partition) is None:
            return  # revoked meanwhile: the new owner restores from the changelog and reports it again
        st = self.patient(w.partition, w.patient_id)
        if st.reported(w.natural_anchor_ns, w.anchor_ns, w.rate, w.k):
            self.changed(w.partition, w.patient_id)

    def write_ahead(self, batch) -> list[tuple[Hashable, PatientState]]:
        """A batch of (EmittedWindow, Verdict) about to be published at least once. For each patient with a
        window the wall clock closed in it, every one of its windows in the batch (those before it too: the
        state's "reported up to" would pass them) is marked reported and its flag kept in the state until
        `flag_published`. Returns the (partition, state) pairs the caller writes before it sends the flags.
        Patients of partitions no longer this worker's are skipped."""
        patients = {(w.partition, w.patient_id) for w, _ in batch
                    if w.by_clock and self.of(w.partition) is not None}
        out = {}
        for w, verdict in batch:
            key = (w.partition, w.patient_id)
            if key not in patients:
                continue
            st = self.patient(*key)
            st.reported(w.natural_anchor_ns, w.anchor_ns, w.rate, w.k)
            if all(e.verdict.window_id != verdict.window_id for e in st.flags_ahead):
                st.flags_ahead.append(FlagAhead(w.anchor_ns, verdict))
            self.changed(*key)
            out[key] = (w.partition, st)
        return list(out.values())

    def flag_published(self, partition: Hashable, patient_id: str, window_id: str) -> None:
        st = self.lookup(partition, patient_id)
        if st is not None and st.flags_ahead and any(e.verdict.window_id == window_id for e in st.flags_ahead):
            st.flags_ahead = [e for e in st.flags_ahead if e.verdict.window_id != window_id]
            self.changed(partition, patient_id)

    def changed(self, partition: Hashable, patient_id: str) -> None:
        ps = self.of(partition)
        if ps is not None:
            ps.dirty.add(patient_id)

    def take_dirty(self, partitions) -> dict[Hashable, list[PatientState]]:
        """The changed states of `partitions`, no longer marked (put them back with `changed` on failure),
        stamped with the time they were last seen."""
        out = {}
        now = self.clock()
        for p in partitions:
            ps = self.of(p)
            if ps is not None and ps.dirty:
                out[p] = [ps.by_patient[n] for n in ps.dirty if n in ps.by_patient]
                for st in out[p]:
                    st.seen_at_s = now
                ps.dirty = set()
        return out

    def expire_idle(self, partition: Hashable, now: float, ttl_s: float, busy) -> list[str]:
        """Forget the partition's patients unchanged for `ttl_s` (no window reported, no episode message):
        their tombstones go out with the next checkpoint, so memory and restores follow the active beds.
        Never a patient with an open or unpublished episode or flag, or one `busy(patient_id)` (open windows)."""
        ps = self.of(partition)
        if ps is None or not ps.by_patient:
            return []
        gone = [pid for pid, st in ps.by_patient.items()
                if st.seen_at_s is not None and now - st.seen_at_s > ttl_s and _settled(st)
                and pid not in ps.dirty and not busy(pid)]
        for pid in gone:
            _forget(ps, pid)
        return gone

    def reclaim(self, count: int, now: float, min_idle_s: float, busy) -> list[tuple[Hashable, str]]:
        """Forget up to `count` patients early, least recently changed first, when the patient cap is
        reached: expire_idle's rules (never an open or unpublished episode or flag, a dirty state, or one
        `busy(partition, patient_id)`), with `min_idle_s` in place of the time to live."""
        if count <= 0:
            return []
        idle = [(st.seen_at_s, task.tp, pid) for task in self._with_states()
                for pid, st in task.states.by_patient.items()
                if st.seen_at_s is not None and now - st.seen_at_s >= min_idle_s and _settled(st)
                and pid not in task.states.dirty and not busy(task.tp, pid)]
        idle.sort(key=lambda e: e[0])
        gone = [(p, pid) for _, p, pid in idle[:count]]
        for p, pid in gone:
            _forget(self._of_held(p), pid)
        return gone

    def take_expired(self, partitions) -> dict[Hashable, list[str]]:
        """Patients whose tombstones are due, no longer marked (put them back with `expire_again`)."""
        out = {}
        for p in partitions:
            ps = self.of(p)
            if ps is not None and ps.expired:
                out[p] = sorted(ps.expired)
                ps.expired = set()
        return out

    def expire_again(self, partition: Hashable, patient_ids) -> None:
        ps = self.of(partition)
        if ps is not None:
            ps.expired.update(p for p in patient_ids if p not in ps.by_patient)

    def count(self) -> int:
        return sum(len(task.states.by_patient) for task in self._with_states())

    def open_episodes(self) -> tuple[int, float]:
        """(episodes open, the longest one's span in signal seconds: its first to its last flagged window)."""
        count, longest = 0, 0
        for _, st in self:
            ep = st.episode
            if ep.open_start_ns is not None:
                count += 1
                longest = max(longest, ep.last_flagged_end_ns - ep.open_start_ns)
        return count, longest / 1e9

    def _with_states(self) -> list[OwnedPartition]:
        return [task for task in self.owned.every_held() if task.states is not None]

    def __iter__(self) -> Iterator[tuple[Hashable, PatientState]]:
        for task in self._with_states():
            for st in task.states.by_patient.values():
                yield task.tp, st


def _forget(ps: PartitionStates, patient_id: str) -> None:
    """Drop a state; its tombstone goes out with the next checkpoint. Its episode number stays as the
    patient's floor: a state made for it later numbers its messages above every one readers saw (one int,
    only for patients that had an episode message)."""
    st = ps.by_patient.pop(patient_id)
    if st.episode.seq > ps.seq_floors.get(patient_id, 0):
        ps.seq_floors[patient_id] = st.episode.seq
    ps.expired.add(patient_id)


def _settled(st: PatientState) -> bool:
    """Nothing of the patient is still owed to readers: no open episode, no unpublished episode message or
    flag. Only such a state may be forgotten (expired or reclaimed)."""
    return st.episode.open_start_ns is None and st.episode.pending is None and not st.flags_ahead
