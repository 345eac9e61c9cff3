"""Patient states of the partitions this worker owns, and which changed since the last checkpoint."""

from __future__ import annotations

from typing import Hashable

from streamer.state.patients import PatientState


class StateStore:
    def __init__(self) -> None:
        self.partitions: dict[Hashable, dict[str, PatientState]] = {}
        self.dirty: dict[Hashable, set[str]] = {}

    def load(self, partition: Hashable, states: dict[str, PatientState]) -> None:
        """The partition's states as restored from the changelog, before any of its records is processed."""
        self.partitions[partition] = states
        self.dirty[partition] = set()

    def owns(self, partition: Hashable) -> bool:
        return partition in self.partitions

    def patient(self, partition: Hashable, patient_id: str) -> PatientState:
        states = self.partitions.setdefault(partition, {})
        st = states.get(patient_id)
        if st is None:
            st = states[patient_id] = PatientState(patient_id)
        return st

    def reported(self, w) -> None:
        """Window `w` (an EmittedWindow) was published and acknowledged."""
        states = self.partitions.get(w.partition)
        if states is None:
            return  # revoked meanwhile: the new owner restores from the changelog and reports it again
        st = self.patient(w.partition, w.patient_id)
        if st.reported(w.natural_anchor_ns, w.anchor_ns, w.rate, w.k):
            self.dirty.setdefault(w.partition, set()).add(w.patient_id)

    def changed(self, partition: Hashable, patient_id: str) -> None:
        if partition in self.partitions:
            self.dirty.setdefault(partition, set()).add(patient_id)

    def take_dirty(self, partitions) -> dict[Hashable, list[PatientState]]:
        """The changed states of `partitions`, no longer marked (put them back with `changed` on failure)."""
        out = {}
        for p in partitions:
            names = self.dirty.get(p)
            if names:
                states = self.partitions.get(p, {})
                out[p] = [states[n] for n in names if n in states]
                self.dirty[p] = set()
        return out

    def drop(self, partition: Hashable) -> None:
        self.partitions.pop(partition, None)
        self.dirty.pop(partition, None)

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
