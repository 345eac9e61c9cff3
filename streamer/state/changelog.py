"""The patient-state changelog: a compacted topic, partition p holding the states of input partition p.

Key = "<input topic>:<patient id>" (several input topics may share partition numbers), value = the state
(state/patients.py). Written at every checkpoint before offsets are committed; read back whole for a
partition before any of its records is processed, to the end it had then even past another owner's open
transaction on the same partition (`read_to_end`).
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
    newest_timestamp_ms: dict[TopicPartition, int] = field(default_factory=dict)  # per input partition


async def read_to_end(reader, sources: list[TopicPartition], on_records, idle_timeout_s: float = 60.0,
                      what: str = "patient states") -> int:
    """Every committed record of `sources`, from the beginning to the end each had when the reading began,
    handed to `on_records(partition, records)`; returns how many.

    The end is the high watermark of the first fetch, which comes after this owner's fencing (exactly once:
    its transactional ids were taken first). A read_committed fetch stops at the last stable offset, which
    another owner's open transaction on the same partition holds back (several input topics share state
    and output partitions): reading waits until that transaction ends (it commits within a checkpoint, or
    the brokers abort it after kafka.transaction_timeout_ms) rather than stop short of this partition's own
    latest records. It fails (TimeoutError, naming the partitions and what holds them) only after
    `idle_timeout_s` without progress: a large topic takes as long as it takes while it progresses."""
    if not sources:
        return 0
    reader.assign(sources)
    await reader.seek_to_beginning(*sources)
    remaining, ends, positions, count = set(sources), {}, {}, 0
    deadline = time.monotonic() + idle_timeout_s
    while remaining:
        if time.monotonic() > deadline:
            held = {f"{t.topic}:{t.partition}": reader.last_stable_offset(t) for t in sorted(remaining)}
            raise TimeoutError(f"{what}: no record read for {idle_timeout_s}s from "
                               f"{', '.join(f'{t.topic}:{t.partition}' for t in sorted(remaining))} (ends "
                               f"{ {f'{t.topic}:{t.partition}': ends.get(t) for t in sorted(remaining)} }, last "
                               f"stable offsets {held}: below its end, another owner's open transaction holds it)")
        batch = await reader.getmany(*remaining, timeout_ms=200)
        for stp, records in batch.items():
            on_records(stp, records)
            count += len(records)
            deadline = time.monotonic() + idle_timeout_s  # progress: the deadline follows it
        for stp in list(remaining):
            high = reader.highwater(stp)
            if high is None or high < 0:
                continue  # no fetch answered yet
            end = ends.setdefault(stp, high)
            position = await reader.position(stp)
            if position >= end:
                remaining.discard(stp)
            elif position > positions.get(stp, -1):
                positions[stp] = position
                deadline = time.monotonic() + idle_timeout_s  # control records and aborted data move it too
        await asyncio.sleep(0)
    return count


async def read_states(reader, state_topic: str, partitions: list[TopicPartition],
                      idle_timeout_s: float = 60.0) -> Restored:
    """Every state of `partitions` (input partitions), read from the changelog to its end (`read_to_end`).

    `reader` is a started read_committed consumer without a group: committed states only, so a fenced
    zombie's aborted writes are never restored. The latest record of a key wins: a tombstone removes the
    state, an unreadable record (another version, corrupt) replaces it with an `Unreadable`."""
    out = Restored({tp: {} for tp in partitions})
    wanted = out.states
    lost: dict[tuple, Unreadable] = {}
    sources = sorted({TopicPartition(state_topic, tp.partition) for tp in partitions})

    def apply(stp, records):
        for r in records:
            owner = _apply(r, stp.partition, wanted, lost)
            ts = getattr(r, "timestamp", None)
            if owner is not None and isinstance(ts, int) and ts > out.newest_timestamp_ms.get(owner, -1):
                out.newest_timestamp_ms[owner] = ts

    out.records = await read_to_end(reader, sources, apply, idle_timeout_s)
    out.unreadable = list(lost.values())
    return out


async def read_episode_seqs(reader, episodes_topic: str, out_partitions: list[int],
                            idle_timeout_s: float = 60.0) -> dict[str, int]:
    """The highest episode `seq` each patient has in `out_partitions` of the episodes topic: what readers
    have seen. A patient's next number starts above it whatever became of its state (lost, expired, a
    recreated state topic), so message order never rests on a worker's clock. A value the readers' decoder
    refuses is skipped: no reader applied it, and a forged seq of 2**63-1 taken as the floor would number
    every later real message of the patient above what readers accept (its suppression lost for good)."""
    from streamer.client import MessageError, decode_episode

    seqs: dict[str, int] = {}

    def apply(_, records):
        now_ns = time.time_ns()
        for r in records:
            if r.value is None:
                continue
            try:
                episode = decode_episode(r.value, now_ns)
            except (MessageError, ValueError, TypeError):
                continue
            if episode.seq > seqs.get(episode.patient_id, 0):
                seqs[episode.patient_id] = episode.seq

    sources = [TopicPartition(episodes_topic, p) for p in sorted(set(out_partitions))]
    await read_to_end(reader, sources, apply, idle_timeout_s, what="episode numbers")
    return seqs


def _apply(r, partition: int, wanted: dict, lost: dict) -> TopicPartition | None:
    """Apply one changelog record; returns the input partition it belongs to (None: not one wanted)."""
    key = parse_state_key(r.key)
    tp = TopicPartition(key[0], partition) if key is not None else None
    if key is not None and tp not in wanted:
        return None  # another input topic's partition of the same number
    if r.value is None:  # a tombstone
        if key is not None:
            wanted[tp].pop(key[1], None)
            lost.pop((tp, key[1]), None)
        return tp
    try:
        topic, st = PatientState.from_bytes(r.value)
        if key is not None and (topic, st.patient_id) != key:
            raise ValueError(f"the record is of {topic}:{st.patient_id}, its key says otherwise")
    except ValueError as exc:
        if key is None:  # whose it is cannot be known: dead-lettered, nobody's state replaced
            owner = next((t for t in wanted if t.partition == partition), None)
            if owner is not None:
                lost[(owner, None, r.offset)] = Unreadable(owner, None, r, f"unreadable key: {exc}")
            return owner
        wanted[tp].pop(key[1], None)
        lost[(tp, key[1])] = Unreadable(tp, key[1], r, str(exc))
        return tp
    if key is None:
        tp = TopicPartition(topic, partition)
        if tp not in wanted:
            return None
    wanted[tp][st.patient_id] = st
    lost.pop((tp, st.patient_id), None)
    return tp
