"""Issue 47, item 5: `streamer replay` keeps each bed's order through broker stalls.

Apache Kafka is frozen (SIGSTOP) while a replay of several beds runs, long enough for produce requests to
time out, then resumed. Read back, every bed's records follow each other in time on its partition (a
resend never lands behind a newer record of its bed), and a worker that reads them scores every window
as `streamer score` does on the same samples.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from streamer.offline.replay import replay, synthetic_fleet
from streamer.offline.score import score_recording
from tests.kafka_utils import flags_of, isolated_settings, read_topic
from tests.integration.test_integration_stream import run_worker_until

pytestmark = pytest.mark.integration

REQUEST_TIMEOUT_MS = 1500  # the replay producer's: a stalled request fails within seconds, not 30 s
FREEZE_S = 3 * REQUEST_TIMEOUT_MS / 1000  # the fault: every request in flight meanwhile times out


class _Timeouts(logging.Handler):
    """Counts aiokafka's produce requests that failed (the stall reached the replay's sends)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "produce" in record.getMessage().lower():
            self.count += 1


async def _records_in(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> int:
    return sum((await consumer.end_offsets(tps)).values())


def out_of_order(records) -> list[tuple[str, int, int]]:
    """(bed, offset, t0_ns) of every input record that landed behind a newer record of its bed on its
    partition: a record whose t0_ns is below the greatest t0_ns before it."""
    newest: dict[tuple[int, bytes], int] = {}
    found = []
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        t0 = orjson.loads(r.value)["t0_ns"]
        key = (r.partition, r.key)
        if t0 < newest.get(key, t0):
            found.append((r.key.decode(), r.offset, t0))
        newest[key] = max(newest.get(key, t0), t0)
    return found


@pytest.mark.parametrize("acks", ["all", "1"])  # all: the idempotent producer; 1: a plain one (no producer id)
def test_replay_keeps_each_beds_order_through_a_broker_freeze(broker, scorer, acks):
    beds, seconds, speed = 8, 65.0, 10.0
    s = isolated_settings(broker.bootstrap, partitions=2,
                          kafka={"acks": acks, "delivery": "auto" if acks == "all" else "at_least_once",
                                 "producer_options": {"request_timeout_ms": REQUEST_TIMEOUT_MS}})
    fleet = synthetic_fleet(beds, seconds, time.time_ns() - 3_600_000_000_000, seed=47, stagger_s=2.0)
    sources = [src for src, _ in fleet]
    topic = s.kafka.input_topics[0]
    timeouts = _Timeouts()
    sender_log = logging.getLogger("aiokafka.producer.sender")
    sender_log.addHandler(timeouts)

    async def replay_through_a_freeze():
        consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka.bootstrap_servers)
        await consumer.start()
        tps = [TopicPartition(topic, p) for p in range(2)]
        sending = asyncio.create_task(replay(s.kafka, sources, speed=speed, chunk_s=0.25))
        try:
            deadline = time.monotonic() + 60
            while await _records_in(consumer, tps) < 200:  # the replay is under way: freeze in its midst
                assert not sending.done(), "the replay ended before the freeze"
                assert time.monotonic() < deadline, "the replay wrote nothing"
                await asyncio.sleep(0.05)
            await consumer.stop()
            broker.freeze()
            before = timeouts.count
            await asyncio.sleep(FREEZE_S)  # the fault's length, not a wait for a result
            broker.thaw()
            stalled = timeouts.count - before
            assert not sending.done(), "the freeze did not meet the replay's sends"
            sent = await asyncio.wait_for(sending, 120)
            return sent, stalled
        finally:
            broker.thaw()
            sender_log.removeHandler(timeouts)
            if not sending.done():
                sending.cancel()

    t_start = time.monotonic()
    sent, stalled = asyncio.run(replay_through_a_freeze())
    took = time.monotonic() - t_start
    print(f"acks={acks}: {sent} chunks through a {FREEZE_S:.1f} s freeze in {took:.1f} s; "
          f"{stalled} produce requests failed during the freeze")
    assert stalled >= 1, "no produce request timed out: the freeze did not stall the replay"

    async def read_back():
        return await read_topic(s.kafka, topic, until=lambda r: len({(x.key, orjson.loads(x.value)["seq"])
                                                                    for x in r}) >= sent, timeout_s=60)

    records = asyncio.run(read_back())
    chunks = {(r.key, orjson.loads(r.value)["seq"]) for r in records}
    assert len(chunks) == sent, "a chunk never reached the topic"
    late = out_of_order(records)
    assert not late, f"{len(late)} records landed behind newer records of their bed, e.g. {late[:3]}"

    if acks != "all":
        return  # the worker's side once: the order is the same claim for both producers
    offline = {src.patient_id: score_recording(src.recording, scorer) for src in sources}
    expected = {(pid, int(row.window_start_ns)): row.probability
                for pid, df in offline.items() for row in df.itertuples() if row.status == "scored"}
    assert len(expected) == beds * 6

    async def score_stream():
        async def produce():
            pass  # already on the topic

        async def done():
            flags = flags_of(await read_topic(s.kafka, s.kafka.flags_topic, timeout_s=1,
                                              until=lambda r: len(r) >= len(expected)))
            return sum(f["status"] == "scored" for f in flags) >= len(expected)

        code, _ = await run_worker_until(s, scorer, produce, done, timeout_s=120)
        return code, flags_of(await read_topic(s.kafka, s.kafka.flags_topic, until=lambda r: len(r) >= len(expected)))

    code, flags = asyncio.run(score_stream())
    assert code == 0
    scored = {(f["patient_id"], f["window_start_ns"]): f["probability"] for f in flags if f["status"] == "scored"}
    assert sorted(scored) == sorted(expected), "stream and offline scored other windows"
    dp = np.abs(np.array([scored[k] for k in sorted(expected)]) - np.array([expected[k] for k in sorted(expected)]))
    assert dp.max() <= 1e-5
    assert not any(f["status"] != "scored" and (f["patient_id"], f["window_start_ns"]) in expected for f in flags)



def test_a_broken_sequence_is_resent_in_order_by_a_fresh_producer(broker):
    """The idempotent path's rare failure, on real Kafka: a gap in one partition's sequence (what a batch
    that failed for good leaves; made here by moving the producer's sequence on). The broker refuses every
    later batch of that partition from that producer (OutOfOrderSequenceNumber), so nothing lands behind
    the gap; the sender starts a fresh producer and resends those chunks in their order: every chunk once,
    each bed in order."""
    from streamer.kafka.partitioning import home_partition
    from streamer.ingest.producer import OrderedSender, chunks_of
    from streamer.kafka.clients import start_ordered_producer

    s = isolated_settings(broker.bootstrap, partitions=2)
    topic = s.kafka.input_topics[0]
    t0 = time.time_ns() - 3_600_000_000_000
    streams = [list(chunks_of(f"bed-{b}", t0 + np.arange(2500) * 2_000_000, np.zeros(2500), 125, fs=500.0))
               for b in range(4)]
    producers = []

    async def open_producer():
        producer, why_not = await start_ordered_producer(s.kafka, linger_ms=10)
        producers.append(producer)
        return producer, why_not

    async def main():
        sender = await OrderedSender(open_producer, topic).start()
        assert sender.idempotent
        try:
            for i in range(20):
                for stream in streams:
                    await sender.send(stream[i])
                if i == 5:
                    await sender.flush()
                    broken = TopicPartition(topic, home_partition(b"bed-0", 2))
                    producers[0]._txn_manager.increment_sequence_number(broken, 7)
            await sender.flush()
        finally:
            await sender.stop()
        return sender

    sender = asyncio.run(main())
    assert len(producers) == 2 and sender.resent > 0 and sender.dropped == 0
    records = asyncio.run(read_topic(s.kafka, topic, until=lambda r: len(r) >= 80, timeout_s=30))
    sent = [(r.key.decode(), orjson.loads(r.value)["seq"]) for r in records]
    assert sorted(sent) == sorted((f"bed-{b}", i) for b in range(4) for i in range(20)), "lost or duplicated"
    assert not out_of_order(records)


def test_resend_plan_never_puts_a_chunk_behind_a_confirmed_newer_one():
    from streamer.ingest.contract import Chunk
    from streamer.ingest.producer import resend_plan

    def chunk(bed, seq):
        return Chunk(bed, "II", 1_795_000_000_000_000_000 + seq * 250_000_000, 500.0, np.zeros(125), seq)

    failed = TimeoutError()
    settled = [(chunk("a", 0), None), (chunk("b", 0), failed), (chunk("a", 1), failed), (chunk("b", 1), failed),
               (chunk("a", 2), None), (chunk("c", 0), failed), (chunk("a", 3), failed)]
    resend, dropped = resend_plan(settled)
    assert [(c.patient_id, c.seq) for c in resend] == [("b", 0), ("b", 1), ("c", 0), ("a", 3)]
    assert [(c.patient_id, c.seq) for c in dropped] == [("a", 1)]  # a:2 was confirmed after it
    assert resend_plan([(chunk("a", 0), None)]) == ([], [])
