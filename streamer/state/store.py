"""Patient states of the partitions this worker owns, and which changed since the last checkpoint."""

from __future__ import annotations

import time
from typing import Hashable

from streamer.state.patients import FlagAhead, PatientState


class StateStore:
    """`clock`: wall time, stamped on each state as it is taken for writing (its last change)."""

    def __init__(self, clock=time.time) -> None:
        self.clock = clock
        self.partitions: dict[Hashable, dict[str, PatientState]] = {}
        self.dirty: dict[Hashable, set[str]] = {}
        self.expired: dict[Hashable, set[str]] = {}  # tombstones to write at the next checkpoint
        # per partition, the highest episode seq readers have seen of each patient (the episodes topic, read
        # at assignment): a state made or restored here never numbers its messages below it
        self.seq_floors: dict[Hashable, dict[str, int]] = {}

    def load(self, partition: Hashable, states: dict[str, PatientState],
             seq_floors: dict[str, int] | None = None) -> None:
        """The partition's states as restored from the changelog, before any of its records is processed;
        `seq_floors`: the highest episode seq of each patient in the episodes topic."""
        now = self.clock()
        floors = seq_floors or {}
        for st in states.values():
            if st.seen_at_s is None:  # an older state version: its time to live starts now
                st.seen_at_s = now
            st.episode.seq = max(st.episode.seq, floors.get(st.patient_id, 0))
        self.partitions[partition] = states
        self.seq_floors[partition] = floors
        self.dirty[partition] = set()
        self.expired[partition] = set()

    def patient(self, partition: Hashable, patient_id: str) -> PatientState:
        st = self.lookup(partition, patient_id)
        if st is None:
            st = self.adopt(partition, self.new_state(partition, patient_id))
        return st

    def lookup(self, partition: Hashable, patient_id: str) -> PatientState | None:
        states = self.partitions.get(partition)
        return states.get(patient_id) if states else None

    def new_state(self, partition: Hashable, patient_id: str) -> PatientState:
        """A fresh state for a patient this store does not hold, not yet held (see `adopt`)."""
        st = PatientState(patient_id, seen_at_s=self.clock())
        st.episode.seq = self.seq_floors.get(partition, {}).get(patient_id, 0)
        return st

    def adopt(self, partition: Hashable, st: PatientState) -> PatientState:
        """Hold `st` (from `new_state`) from now on, unless a state of its patient came meanwhile."""
        states = self.partitions.setdefault(partition, {})
        held = states.setdefault(st.patient_id, st)
        if held is st:
            self.expired.get(partition, set()).discard(st.patient_id)  # back before its tombstone was written
        return held

    def reported(self, w) -> None:
        """Window `w` (an EmittedWindow) was published and acknowledged."""
        states = self.partitions.get(w.partition)
        if states is None:
            return  # revoked meanwhile: the new owner restores from the changelog and reports it again
        st = self.patient(w.partition, w.patient_id)
        if st.reported(w.natural_anchor_ns, w.anchor_ns, w.rate, w.k):
            self.dirty.setdefault(w.partition, set()).add(w.patient_id)

    def write_ahead(self, batch) -> list[tuple[Hashable, PatientState]]:
        """A batch of (EmittedWindow, Verdict) about to be published at least once. For each patient with a
        window the wall clock closed in it, every one of its windows in the batch (those before it too: the
        state's "reported up to" would pass them) is marked reported and its flag kept in the state until
        `flag_published`. Returns the (partition, state) pairs the caller writes before it sends the flags.
        Patients of partitions no longer this worker's are skipped."""
        patients = {(w.partition, w.patient_id) for w, _ in batch
                    if w.by_clock and w.partition in self.partitions}
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
        st = self.partitions.get(partition, {}).get(patient_id)
        if st is not None and st.flags_ahead and any(e.verdict.window_id == window_id for e in st.flags_ahead):
            st.flags_ahead = [e for e in st.flags_ahead if e.verdict.window_id != window_id]
            self.changed(partition, patient_id)

    def changed(self, partition: Hashable, patient_id: str) -> None:
        if partition in self.partitions:
            self.dirty.setdefault(partition, set()).add(patient_id)

    def take_dirty(self, partitions) -> dict[Hashable, list[PatientState]]:
        """The changed states of `partitions`, no longer marked (put them back with `changed` on failure),
        stamped with the time they were last seen."""
        out = {}
        now = self.clock()
        for p in partitions:
            names = self.dirty.get(p)
            if names:
                states = self.partitions.get(p, {})
                out[p] = [states[n] for n in names if n in states]
                for st in out[p]:
                    st.seen_at_s = now
                self.dirty[p] = set()
        return out

    def expire_idle(self, partition: Hashable, now: float, ttl_s: float, busy) -> list[str]:
        """Forget the partition's patients unchanged for `ttl_s` (no window reported, no episode message):
        their tombstones go out with the next checkpoint, so memory and restores follow the active beds.
        Never a patient with an open or unpublished episode or flag, or one `busy(patient_id)` (open windows)."""
        states = self.partitions.get(partition)
        if not states:
            return []
        dirty = self.dirty.get(partition, ())
        gone = [pid for pid, st in states.items()
                if st.seen_at_s is not None and now - st.seen_at_s > ttl_s and _settled(st) and pid not in dirty
                and not busy(pid)]
        for pid in gone:
            self._forget(partition, pid)
        return gone

    def reclaim(self, count: int, now: float, min_idle_s: float, busy) -> list[tuple[Hashable, str]]:
        """Forget up to `count` patients early, least recently changed first, when the patient cap is
        reached: expire_idle's rules (never an open or unpublished episode or flag, a dirty state, or one
        `busy(partition, patient_id)`), with `min_idle_s` in place of the time to live."""
        if count <= 0:
            return []
        dirty = self.dirty
        idle = [(st.seen_at_s, p, pid) for p, states in self.partitions.items() for pid, st in states.items()
                if st.seen_at_s is not None and now - st.seen_at_s >= min_idle_s and _settled(st)
                and pid not in dirty.get(p, ()) and not busy(p, pid)]
        idle.sort(key=lambda e: e[0])
        gone = [(p, pid) for _, p, pid in idle[:count]]
        for p, pid in gone:
            self._forget(p, pid)
        return gone

    def _forget(self, partition: Hashable, patient_id: str) -> None:
        """Drop a state; its tombstone goes out with the next checkpoint. Its episode number stays as the
        patient's floor: a state made for it later numbers its messages above every one readers saw (one int,
        only for patients that had an episode message)."""
        st = self.partitions[partition].pop(patient_id)
        floors = self.seq_floors.setdefault(partition, {})
        if st.episode.seq > floors.get(patient_id, 0):
            floors[patient_id] = st.episode.seq
        self.expired.setdefault(partition, set()).add(patient_id)

    def take_expired(self, partitions) -> dict[Hashable, list[str]]:
        """Patients whose tombstones are due, no longer marked (put them back with `expire_again`)."""
        out = {}
        for p in partitions:
            names = self.expired.get(p)
            if names:
                out[p] = sorted(names)
                self.expired[p] = set()
        return out

    def expire_again(self, partition: Hashable, patient_ids) -> None:
        if partition in self.partitions:
            live = self.partitions[partition]
            self.expired.setdefault(partition, set()).update(p for p in patient_ids if p not in live)

    def count(self) -> int:
        return sum(len(states) for states in self.partitions.values())

    def drop(self, partition: Hashable) -> None:
        self.partitions.pop(partition, None)
        self.dirty.pop(partition, None)
        self.expired.pop(partition, None)
        self.seq_floors.pop(partition, None)

    def open_episodes(self) -> tuple[int, float]:
        """(episodes open, the longest one's span in signal seconds: its first to its last flagged window)."""
        count, longest = 0, 0
        for _, st in self:
            ep = st.episode
            if ep.open_start_ns is not None:
                count += 1
                longest = max(longest, ep.last_flagged_end_ns - ep.open_start_ns)
        return count, longest / 1e9

    def __iter__(self):
        for partition, states in self.partitions.items():
            for st in states.values():
                yield partition, st


def _settled(st: PatientState) -> bool:
    """Nothing of the patient is still owed to readers: no open episode, no unpublished episode message or
    flag. Only such a state may be forgotten (expired or reclaimed)."""
    return st.episode.open_start_ns is None and st.episode.pending is None and not st.flags_ahead
