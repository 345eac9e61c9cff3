"""Issue 45 on Apache Kafka: records that stopped a partition for good (a ragged sample list, samples nested
65 to 1,999 deep) are dead-lettered with a reason, the other beds of the partition keep being flagged and
the committed offset moves past them; a forged episode number in the episodes topic is never taken as a
patient's floor when a worker restores."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from aiokafka import TopicPartition

from streamer.client import decode_episode
from streamer.ingest.deadletter import SOURCE_OFFSET, headers_dict, reason_of
from streamer.kafka.clients import make_consumer, make_producer
from streamer.offline.recordings import Recording, regular_times
from streamer.offline.replay import Source, replay
from streamer.runtime import Worker
from streamer.state.changelog import read_episode_seqs
from streamer.synthetic import generate
from tests.kafka_utils import flags_of, isolated_settings, read_topic, until_true

pytestmark = pytest.mark.integration

START = 1_795_000_000_000_000_000
HOSTILE = {
    "ragged": b'{"patient_id": "bed-x", "lead": "II", "t0_ns": %d, "fs": 500, "samples": [1,[2]]}' % START,
    "nested 65": b'{"patient_id": "bed-x", "lead": "II", "t0_ns": %d, "fs": 500, "samples": [1, %s2%s]}' % (
        START, b"[" * 65, b"]" * 65),
    "nested 1999": b'{"patient_id": "bed-x", "lead": "II", "t0_ns": %d, "fs": 500, "samples": [%s2%s]}' % (
        START, b"[" * 1999, b"]" * 1999),
}


def test_records_that_killed_the_consume_task_are_dead_letters_and_offsets_move_past_them(broker, scorer):
    s = isolated_settings(broker.bootstrap, partitions=1)  # one partition: hostile and healthy interleave
    beds = [Source(f"bed-{i}", Recording(regular_times(16_000, 500, START), generate(32.0, fs=500, seed=i).values,
                                         500.0)) for i in (1, 2)]

    async def main():
        worker = Worker(s, scorer=scorer)
        task = asyncio.create_task(worker.run())
        try:
            producer = make_producer(s.kafka)
            await producer.start()
            hostile_offsets = []
            for value in HOSTILE.values():
                meta = await producer.send_and_wait(s.kafka.input_topics[0], value, key=b"bed-x")
                hostile_offsets.append(meta.offset)
            await producer.stop()
            await replay(s.kafka, beds, speed=None, chunk_s=0.5)

            async def flagged():
                assert not task.done(), f"the worker exited: {task.result() if not task.cancelled() else ''}"
                flags = flags_of(await read_topic(s.kafka, s.kafka.flags_topic, timeout_s=1))
                return {(f["patient_id"], f["window_start_ns"]) for f in flags} >= {
                    (b.patient_id, START + k * 10**10) for b in beds for k in range(3)}

            await until_true(flagged, 120, "both beds flagged past the hostile records")

            async def committed_past():
                consumer = make_consumer(s.kafka)  # the worker's group: its committed offset, nothing fetched
                await consumer.start()
                try:
                    tp = TopicPartition(s.kafka.input_topics[0], 0)
                    return (await consumer.committed(tp) or 0) > max(hostile_offsets)
                finally:
                    await consumer.stop()

            await until_true(committed_past, 60, "the group's committed offset past the hostile records")
            dead = await read_topic(s.kafka, s.kafka.dead_letter_topic, until=lambda r: len(r) >= len(HOSTILE))
        finally:
            worker.stop()
            code = await asyncio.wait_for(task, 60)
        return code, dead, hostile_offsets

    code, dead, offsets = asyncio.run(main())
    assert code == 0
    by_offset = {int(headers_dict(r.headers)[SOURCE_OFFSET]): r for r in dead}
    assert sorted(by_offset) == offsets, "each hostile record is one dead letter"
    for offset, value in zip(offsets, HOSTILE.values()):
        assert by_offset[offset].value == value, "the original bytes are kept"
        assert reason_of(by_offset[offset].headers) in ("invalid_field", "malformed_json", "undecodable")


def test_a_forged_episode_number_is_never_a_patients_floor(broker):
    """A producer with WRITE on the episodes topic (ACLs are the first defence) writes seq 2**63-1 for a bed:
    read back at assignment as that bed's floor, every later real message would be numbered above what any
    reader accepts, and the bed could never be suppressed again. The restore skips what readers refuse."""
    s = isolated_settings(broker.bootstrap, partitions=1)
    now_us = time.time_ns() // 1000
    real = {"schema": 2, "patient_id": "bed-1", "episode_id": f"bed-1:{START}", "seq": now_us, "state": "closed",
            "renewal": False, "reason": "clean", "start_ns": START, "end_ns": START + 20 * 10**9,
            "last_flagged_end_ns": START + 20 * 10**9, "peak_probability": 0.9, "flagged_windows": 2,
            "model": "m", "updated_at_ns": START + 30 * 10**9, "valid_until_ns": None, "lease_ns": None}
    assert decode_episode(orjson.dumps(real)).seq == now_us, "the real message is one readers accept"

    async def main():
        producer = make_producer(s.kafka)
        await producer.start()
        for doc in (real, {**real, "seq": 2**63 - 1}, {**real, "patient_id": "bed-2", "seq": 2**62}):
            await producer.send_and_wait(s.kafka.episodes_topic, orjson.dumps(doc), key=doc["patient_id"].encode())
        await producer.stop()
        reader = make_consumer(s.kafka, group_id=None, client_id="restore-test")
        await reader.start()
        try:
            return await read_episode_seqs(reader, s.kafka.episodes_topic, [0], idle_timeout_s=30)
        finally:
            await reader.stop()

    seqs = asyncio.run(main())
    assert seqs == {"bed-1": now_us}
