"""The patient-state changelog: a compacted topic, partition p holding the states of input partition p.

Key = "<input topic>:<patient id>" (several input topics may share partition numbers), value = the state
(state/patients.py). Written at every checkpoint before offsets are committed; read back whole for a
partition before any of its records is processed.
"""

from __future__ import annotations

import asyncio
import time

from aiokafka import TopicPartition

from streamer.state.patients import PatientState


def state_key(topic: str, patient_id: str) -> bytes:
    return f"{topic}:{patient_id}".encode()


async def read_states(reader, state_topic: str, partitions: list[TopicPartition],
                      timeout_s: float = 60.0) -> dict[TopicPartition, dict[str, PatientState]]:
    """Every state of `partitions` (input partitions), read from the changelog up to its end.

    `reader` is a started read_committed consumer without a group. The end is the last stable offset the
    fetches report (the high watermark where a broker reports none): committed states only, so a fenced
    zombie's aborted writes are never restored."""
    wanted = {tp: {} for tp in partitions}
    sources = sorted({TopicPartition(state_topic, tp.partition) for tp in partitions})
    if not sources:
        return wanted
    reader.assign(sources)
    await reader.seek_to_beginning(*sources)
    remaining = set(sources)
    deadline = time.monotonic() + timeout_s
    while remaining:
        if time.monotonic() > deadline:
            raise TimeoutError(f"patient states not read within {timeout_s}s from {sorted(remaining)}")
        batch = await reader.getmany(*remaining, timeout_ms=200)
        for stp, records in batch.items():
            for r in records:
                if r.value is None:
                    continue  # a tombstone
                try:
                    topic, st = PatientState.from_bytes(r.value)
                except ValueError:
                    continue  # written by another version: that patient starts from its records
                tp = TopicPartition(topic, stp.partition)
                if tp in wanted:
                    wanted[tp][st.patient_id] = st
        for stp in list(remaining):
            end = reader.last_stable_offset(stp)
            if end is None or end < 0:
                end = reader.highwater(stp)
            if end is not None and await reader.position(stp) >= end:
                remaining.discard(stp)
        await asyncio.sleep(0)
    return wanted
