"""The patient-state changelog: a compacted topic, partition p holding the states of input partition p.

Key = "<input topic>:<patient id>" (several input topics may share partition numbers), value = the state
(state/patients.py). Written at every checkpoint before offsets are committed; read back whole for a
partition before any of its records is processed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from aiokafka import TopicPartition

from streamer.state.patients import PatientState


def state_key(topic: str, patient_id: str) -> bytes:
    return f"{topic}:{patient_id}".encode()


def parse_state_key(key: bytes | None) -> tuple[str, str] | None:
    """(input topic, patient id) of a changelog key, or None when it is not one (topic names hold no ':')."""
    try:
        topic, sep, patient_id = (key or b"").decode().partition(":")
    except UnicodeDecodeError:
        return None
    return (topic, patient_id) if sep and topic and patient_id else None


@dataclass
class Unreadable:
    """A changelog record that could not be read: its patient's state is lost (None: the key is unreadable
    too); the worker closes that patient's episode conservatively and dead-letters the record."""
    partition: TopicPartition  # the input partition it belongs to
    patient_id: str | None
    record: object  # the changelog ConsumerRecord
    reason: str


@dataclass
class Restored:
    states: dict[TopicPartition, dict[str, PatientState]] = field(default_factory=dict)
    unreadable: list[Unreadable] = field(default_factory=list)  # the latest record of each such key
    records: int = 0  # changelog records read


async def read_states(reader, state_topic: str, partitions: list[TopicPartition],
                      idle_timeout_s: float = 60.0) -> Restored:
    """Every state of `partitions` (input partitions), read from the changelog up to its end.

    `reader` is a started read_committed consumer without a group. The end is the last stable offset the
    fetches report (the high watermark where a broker reports none): committed states only, so a fenced
    zombie's aborted writes are never restored. The latest record of a key wins: a tombstone removes the
    state, an unreadable record (another version, corrupt) replaces it with an `Unreadable`.

    It fails (TimeoutError, naming the partitions) only after `idle_timeout_s` without a record read while
    some partition is short of its end: a large changelog takes as long as it takes while it progresses."""
    out = Restored({tp: {} for tp in partitions})
    wanted = out.states
    lost: dict[tuple, Unreadable] = {}
    sources = sorted({TopicPartition(state_topic, tp.partition) for tp in partitions})
    if not sources:
        return out
    reader.assign(sources)
    await reader.seek_to_beginning(*sources)
    remaining = set(sources)
    deadline = time.monotonic() + idle_timeout_s
    while remaining:
        if time.monotonic() > deadline:
            raise TimeoutError(f"patient states: no record read for {idle_timeout_s}s from "
                               f"{', '.join(f'{t.topic}:{t.partition}' for t in sorted(remaining))}")
        batch = await reader.getmany(*remaining, timeout_ms=200)
        for stp, records in batch.items():
            for r in records:
                _apply(r, stp.partition, wanted, lost)
            out.records += len(records)
            deadline = time.monotonic() + idle_timeout_s  # progress: the deadline follows it
        for stp in list(remaining):
            end = reader.last_stable_offset(stp)
            if end is None or end < 0:
                end = reader.highwater(stp)
            if end is not None and await reader.position(stp) >= end:
                remaining.discard(stp)
        await asyncio.sleep(0)
    out.unreadable = list(lost.values())
    return out


def _apply(r, partition: int, wanted: dict, lost: dict) -> None:
    key = parse_state_key(r.key)
    tp = TopicPartition(key[0], partition) if key is not None else None
    if key is not None and tp not in wanted:
        return  # another input topic's partition of the same number
    if r.value is None:  # a tombstone
        if key is not None:
            wanted[tp].pop(key[1], None)
            lost.pop((tp, key[1]), None)
        return
    try:
        topic, st = PatientState.from_bytes(r.value)
        if key is not None and (topic, st.patient_id) != key:
            raise ValueError(f"the record is of {topic}:{st.patient_id}, its key says otherwise")
    except ValueError as exc:
        if key is None:  # whose it is cannot be known: dead-lettered, nobody's state replaced
            owner = next((t for t in wanted if t.partition == partition), None)
            if owner is not None:
                lost[(owner, None, r.offset)] = Unreadable(owner, None, r, f"unreadable key: {exc}")
            return
        wanted[tp].pop(key[1], None)
        lost[(tp, key[1])] = Unreadable(tp, key[1], r, str(exc))
        return
    if key is None:
        tp = TopicPartition(topic, partition)
        if tp not in wanted:
            return
    wanted[tp][st.patient_id] = st
    lost.pop((tp, st.patient_id), None)
