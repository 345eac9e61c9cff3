"""Per-patient state against the embedded broker: clock steps beside a healthy neighbour, an episode
handed from one worker to another, an oversized record, a leading hole across kill -9."""

from __future__ import annotations

import asyncio
import signal

import numpy as np
import orjson
import pytest

from streamer.ingest.deadletter import headers_dict, reason_of
from streamer.kafka.clients import make_producer
from streamer.offline.recordings import Recording, parse_start, regular_times
from streamer.offline.replay import Source, replay
from streamer.synthetic import generate
from streamer.runtime import Worker
from tests.kafka_utils import (expected_windows, flags_of, isolated_settings, read_topic, scored_ids,
                               start_worker_process, until_true, wait_for_event)

pytestmark = pytest.mark.integration
T0 = parse_start("2026-11-22T05:00:00Z")


def test_clock_step_keeps_the_neighbour_and_the_commit_moving(broker, scorer):
    s = isolated_settings(broker.bootstrap, partitions=1)  # both beds share the partition
    s.windows.idle_evict_s = 5.0  # once the stream ends, the last partial windows go out and free the commit
    healthy = Source("healthy", Recording(regular_times(500 * 61, 500, T0), generate(61, fs=500, seed=1).values, 500.0))
    n1, n2 = 500 * 25, 500 * 41
    times = np.concatenate([regular_times(n1, 500, T0), regular_times(n2, 500, T0 + 25 * 10**9 + 7200 * 10**9)])
    stepped = Source("stepped", Recording(times, generate(66, fs=500, seed=2).values, 500.0))  # RTC fixed: +2 h
    new_timeline_start = int(times[n1])

    async def main():
        worker = Worker(s, scorer=scorer)
        task = asyncio.create_task(worker.run())
        try:
            await until_true(lambda: asyncio.sleep(0, bool(worker.core.partitions)), 60, "assignment")
            await replay(s.kafka, [healthy, stepped], speed=None, chunk_s=0.25)

            async def flagged():
                flags = flags_of(await read_topic(s.kafka, s.kafka.flags_topic, timeout_s=2))
                new = [f for f in flags if f["patient_id"] == "stepped" and f["window_start_ns"] >= new_timeline_start]
                return len(new) >= 3 and expected_windows([healthy]) <= set(scored_ids(flags))

            await until_true(flagged, 90, "flags of both beds")
            tp = next(iter(worker.core.partitions))
            end = worker.parts.consumer.highwater(tp)
            await until_true(lambda: asyncio.sleep(0, worker.core.ledger.committed.get(tp, 0) == end), 60,
                         "the commit to reach the end of the partition (nothing pinned by the stepped bed)")
            return flags_of(await read_topic(s.kafka, s.kafka.flags_topic, timeout_s=5)), \
                worker.core.metrics.dead_letters.labels("timestamp_jump")._value.get()
        finally:
            worker.stop()
            assert await asyncio.wait_for(task, 60) == 0

    flags, jumps = asyncio.run(main())
    stepped_flags = [f for f in flags if f["patient_id"] == "stepped"]
    old = [f for f in stepped_flags if f["window_start_ns"] < new_timeline_start]
    new = [f for f in stepped_flags if f["window_start_ns"] >= new_timeline_start]
    assert [f["status"] for f in old] == ["scored", "scored", "insufficient_data"]  # last one truncated
    assert [f["status"] for f in new[:3]] == ["scored"] * 3, "flagged again on its new timeline"
    assert jumps == s.windows.new_timeline_chunks - 1, "only the records that waited for confirmation"


def test_episode_opened_under_one_worker_is_closed_by_its_successor(broker, scorer):
    s = isolated_settings(broker.bootstrap, partitions=1)
    s.model.threshold = 0.0  # every scored window is artifact: the episode opens and stays open
    s.episodes.open_after, s.episodes.stale_after_s = 1, 3.0
    bed = Source("bed-ep", Recording(regular_times(500 * 31, 500, T0), generate(31, fs=500, seed=3).values, 500.0))

    async def main():
        a = Worker(s, scorer=scorer)
        s_a = a.settings.model_copy(deep=True)
        s_a.episodes.stale_after_s = 3600.0  # a does not close it: the bed is still "recent" for a
        a.settings = s_a
        ta = asyncio.create_task(a.run())
        await until_true(lambda: asyncio.sleep(0, bool(a.core.partitions)), 60, "assignment of a")
        await replay(s.kafka, [bed], speed=None, chunk_s=0.5)

        async def opened():
            eps = [orjson.loads(r.value) for r in await read_topic(s.kafka, s.kafka.episodes_topic, timeout_s=2)]
            return any(e["state"] == "open" for e in eps)

        await until_true(opened, 60, "the episode to open under a")
        a.stop()
        assert await asyncio.wait_for(ta, 60) == 0
        b = Worker(s, scorer=scorer)  # takes the partition, restores the bed's state, sees no more flags
        tb = asyncio.create_task(b.run())
        try:
            async def closed():
                eps = [orjson.loads(r.value) for r in await read_topic(s.kafka, s.kafka.episodes_topic, timeout_s=2)]
                return eps and eps[-1]["state"] == "closed"

            await until_true(closed, 60, "the successor to close the stale episode")
        finally:
            b.stop()
            assert await asyncio.wait_for(tb, 60) == 0
        return [e for e in (orjson.loads(r.value) for r in await read_topic(s.kafka, s.kafka.episodes_topic,
                                                                             timeout_s=5)) if not e["renewal"]]

    episodes = asyncio.run(main())
    assert [(e["state"], e["reason"]) for e in episodes] == [("open", None), ("closed", "stale")]
    assert episodes[0]["episode_id"] == episodes[1]["episode_id"]


async def _bad_record_then_a_healthy_bed(s, worker, bad: bytes, key: bytes, bed, headers=None) -> None:
    """Once `worker` owns the partition: one bad record, then a healthy bed; returns when the bed is
    flagged and the commit passed the bad record (offset 0)."""
    await until_true(lambda: asyncio.sleep(0, bool(worker.core.partitions)), 60, "assignment")
    producer = make_producer(s.kafka, max_request_size=4 << 20)
    await producer.start()
    await producer.send_and_wait(s.kafka.input_topics[0], bad, key=key, headers=headers)
    await producer.stop()
    await replay(s.kafka, [bed], speed=None, chunk_s=0.5)

    async def done():
        flags = flags_of(await read_topic(s.kafka, s.kafka.flags_topic, timeout_s=2))
        return expected_windows([bed]) <= set(scored_ids(flags))

    await until_true(done, 60, "the healthy bed's flags")
    tp = next(iter(worker.core.partitions))
    await until_true(lambda: asyncio.sleep(0, worker.core.ledger.committed.get(tp, 0) >= 1), 30,
                 "the commit to pass the bad record")


def _dead_letters_of_a_bad_record(s, scorer, bad: bytes, key: bytes, headers=None) -> list:
    """A worker runs while one bad record and then a healthy bed come in (`_bad_record_then_a_healthy_bed`);
    returns the dead-letter topic's records once it has one. The worker must not have failed, and must
    stop cleanly (never hang on the dead letter)."""
    bed = Source("bed-ok", Recording(regular_times(500 * 21, 500, T0), generate(21, fs=500, seed=4).values, 500.0))

    async def main():
        worker = Worker(s, scorer=scorer)
        task = asyncio.create_task(worker.run())
        try:
            await _bad_record_then_a_healthy_bed(s, worker, bad, key, bed, headers=headers)
            assert worker.fatal is None, worker.fatal
            return worker.parts.delivery.exactly_once, await read_topic(s.kafka, s.kafka.dead_letter_topic,
                                                                        until=lambda r: len(r) >= 1)
        finally:
            worker.stop()
            assert await asyncio.wait_for(task, 30) == 0, "shutdown must not hang on the dead letter"

    exactly_once, dead = asyncio.run(main())
    assert exactly_once, "these cases are about exactly once, where a refused dead letter stops the worker"
    return dead


def test_an_oversized_record_is_dead_lettered_small_and_the_partition_moves_on(broker, scorer):
    s = isolated_settings(broker.bootstrap, partitions=1)
    big = orjson.dumps({"patient_id": "bed-big", "lead": "II", "t0_ns": T0, "fs": 500, "samples": [0.0] * 1000,
                        "pad": "x" * (1024 * 1024 - 200)})[:1024 * 1024 - 100]  # just under 1 MiB, broken JSON
    dead = _dead_letters_of_a_bad_record(s, scorer, big, b"bed-big")
    h = headers_dict(dead[0].headers)
    assert reason_of(dead[0].headers) == "malformed_json" and h["value_omitted"] == "too_large"
    summary = orjson.loads(dead[0].value)
    assert summary["value_size"] == len(big) and len(summary["value_sha256"]) == 64


def test_a_bad_record_with_a_null_header_value_is_dead_lettered_with_it(broker, scorer):
    """Kafka allows a header without a value (null): such a malformed record is a dead letter keeping that
    header, and the exactly-once worker goes on (its size count once raised TypeError on the null, which
    failed the dead-letter task: the worker stopped, and again on every restart)."""
    s = isolated_settings(broker.bootstrap, partitions=1)
    dead = _dead_letters_of_a_bad_record(s, scorer, b"{not json", b"bed-bad",
                                         headers=[("trace", None), ("source", b"monitor-7")])
    assert reason_of(dead[0].headers) == "malformed_json" and dead[0].value == b"{not json"
    assert list(dead[0].headers)[:2] == [("trace", None), ("source", b"monitor-7")]


def test_a_dead_letter_over_the_topic_limit_goes_as_its_stand_in_under_exactly_once(broker, scorer):
    """The dead-letter topic takes 20,000 bytes and a malformed 50 kB record (with a 30 kB key) comes in: the
    exactly-once worker, sized to the topic's limit at start, writes the small stand-in naming the record's
    size and SHA-256 (and its key's), never the record, which the topic would refuse (a refusal fails the
    transaction: the worker stopped, on every restart); the healthy bed is flagged and the worker goes on."""
    from tests.kafka_utils import set_topic_config

    s = isolated_settings(broker.bootstrap, partitions=1)
    asyncio.run(set_topic_config(s.kafka, s.kafka.dead_letter_topic, **{"max.message.bytes": "20000"}))
    big, key = b"{" + b"x" * 50_000, b"k" * 30_000
    dead = _dead_letters_of_a_bad_record(s, scorer, big, key)
    assert headers_dict(dead[0].headers)["value_omitted"] == "too_large" and dead[0].key is None
    summary = orjson.loads(dead[0].value)
    assert (summary["value_size"], summary["key_size"]) == (len(big), len(key))


def test_a_leading_hole_is_reported_across_kill_9(broker, checkpoint, tmp_path):
    """A monitor that joined 4 s into its segment: the first window is reported (insufficient data) whether
    or not the worker is killed and restarted around it."""
    s = isolated_settings(broker.bootstrap, partitions=1)
    s.model.checkpoint = checkpoint
    n = 500 * 41
    values = generate(41, fs=500, seed=5).values
    times = regular_times(n, 500, T0)
    # samples from 4 s on, but every chunk names the segment's true start (T0)
    rec = Recording(times[2000:], values[2000:], 500.0)
    log = tmp_path / "worker.log"
    proc = start_worker_process(s, log)
    try:
        wait_for_event(log, "partition_assigned", proc=proc)

        async def send():
            from streamer.ingest.contract import Chunk
            from streamer.ingest.producer import ChunkProducer

            producer = make_producer(s.kafka)
            await producer.start()
            out = ChunkProducer(producer, s.kafka.input_topics[0], "json")
            for i in range(0, len(rec.values), 250):
                await (await out.send(Chunk("bed-hole", "II", int(rec.times_ns[i]), 500.0, rec.values[i:i + 250],
                                            i, T0)))
            await producer.stop()

        asyncio.run(send())
        asyncio.run(read_topic(s.kafka, s.kafka.flags_topic, until=lambda r: len(r) >= 1, timeout_s=60))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc = start_worker_process(s, log)
        flags = flags_of(asyncio.run(read_topic(s.kafka, s.kafka.flags_topic, until=lambda r: len(r) >= 4,
                                                timeout_s=90)))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    by_start = {f["window_start_ns"]: f for f in flags}
    starts = [T0 + k * 10**10 for k in range(4)]
    assert set(starts) <= set(by_start), "every window, the leading one included, is reported"
    assert (by_start[T0]["status"], by_start[T0]["reason"]) == ("insufficient_data", "too_many_missing")
    assert all(by_start[t]["status"] == "scored" for t in starts[1:])


def test_a_dead_letter_the_topic_refuses_is_released_with_an_error_not_a_stalled_partition(broker, scorer):
    """At least once. The dead-letter topic refuses every record over 64 bytes (max.message.bytes), so a
    malformed record cannot be dead-lettered even as its small stand-in: it is released with an error log
    and a metric, the worker keeps running, the healthy bed is flagged and the commit passes the record."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from streamer.kafka.clients import make_admin

    s = isolated_settings(broker.bootstrap, partitions=1)
    s.kafka.delivery = "at_least_once"
    bed = Source("bed-ok", Recording(regular_times(500 * 21, 500, T0), generate(21, fs=500, seed=4).values, 500.0))

    async def main():
        admin = make_admin(s.kafka)
        await admin.start()
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, s.kafka.dead_letter_topic,
                                                  configs={"max.message.bytes": "64"})])
        await admin.close()
        worker = Worker(s, scorer=scorer)
        task = asyncio.create_task(worker.run())
        try:
            await _bad_record_then_a_healthy_bed(s, worker, b"{not json at all", b"bed-bad", bed)
            failed = worker.core.metrics.dead_letters_failed.labels("malformed_json")._value.get()
            assert worker.fatal is None and failed == 1
        finally:
            worker.stop()
            assert await asyncio.wait_for(task, 30) == 0

    asyncio.run(main())


def test_a_patient_unchanged_past_the_ttl_is_tombstoned_and_not_restored(broker, scorer):
    """state.ttl_s: a bed that stopped is forgotten once its state has not changed for that long; its
    tombstone is in the state topic, and the next owner restores only the bed still streaming."""
    from streamer.kafka.clients import read_records
    from streamer.state.changelog import parse_state_key

    s = isolated_settings(broker.bootstrap, partitions=1)
    s.windows.idle_evict_s, s.state.ttl_s = 2.0, 4.0
    gone = Source("bed-gone", Recording(regular_times(500 * 11, 500, T0), generate(11, fs=500, seed=4).values, 500.0))
    kept = Recording(regular_times(500 * 120, 500, T0), generate(120, fs=500, seed=5).values, 500.0)

    async def main():
        worker = Worker(s, scorer=scorer)
        task = asyncio.create_task(worker.run())
        try:
            await until_true(lambda: asyncio.sleep(0, bool(worker.core.partitions)), 60, "assignment")
            await replay(s.kafka, [gone], speed=None, chunk_s=0.5)
            # the other bed keeps streaming in real time: its state changes every window and stays
            feed = asyncio.create_task(replay(s.kafka, [Source("bed-kept", kept)], speed=1.0, chunk_s=0.5))

            async def tombstoned():
                records = await read_records(s.kafka, [s.kafka.state_topic], timeout_s=2, idle_polls=1)
                return any(parse_state_key(r.key) == (s.kafka.input_topics[0], "bed-gone") and r.value is None
                           for r in records)

            await until_true(tombstoned, 60, "the stopped bed's tombstone")

            async def kept_reported():  # so its state is in the topic too
                flags = flags_of(await read_topic(s.kafka, s.kafka.flags_topic, timeout_s=2))
                return any(f["patient_id"] == "bed-kept" for f in flags)

            await until_true(kept_reported, 60, "a window of the bed still streaming")
            tp = next(iter(worker.core.partitions))
            held = set(worker.core.store.states_of(tp))
            expired = worker.core.metrics.states_expired._value.get()
            feed.cancel()
            return held, expired
        finally:
            worker.stop()
            assert await asyncio.wait_for(task, 60) == 0

    held, expired = asyncio.run(main())
    assert held == {"bed-kept"} and expired == 1

    async def restore():
        from streamer.kafka.clients import make_consumer
        from streamer.state.changelog import read_states
        from aiokafka import TopicPartition

        reader = make_consumer(s.kafka, group_id=None)
        await reader.start()
        try:
            return await read_states(reader, s.kafka.state_topic, [TopicPartition(s.kafka.input_topics[0], 0)])
        finally:
            await reader.stop()

    restored = asyncio.run(restore())
    assert set(next(iter(restored.states.values()))) == {"bed-kept"}


def test_a_truncated_flag_acknowledged_before_kill_9_is_not_redone_from_the_backlog(broker, checkpoint, tmp_path):
    """Issue 24, sequence 6, at least once on Apache Kafka: a bed falls silent 5 s into a window and is
    evicted, its partial window published `truncated`; the worker is killed before any checkpoint (the
    commit interval is an hour); then the bed's backlog arrives. The next worker must not complete that
    window from the replay and publish the same window_id as `scored`: the state was written ahead."""
    s = isolated_settings(broker.bootstrap, partitions=1)
    s.kafka.delivery = "at_least_once"
    s.kafka.commit_interval_s = 3600.0
    s.windows.idle_evict_s = 3.0
    s.model.checkpoint = checkpoint
    values = generate(25, fs=500, seed=9).values
    rec = Recording(regular_times(len(values), 500, T0), values, 500.0)
    first, rest = 500 * 5, 500 * 25

    async def send(a: int, b: int):
        from streamer.ingest.contract import Chunk
        from streamer.ingest.producer import ChunkProducer

        producer = make_producer(s.kafka)
        await producer.start()
        out = ChunkProducer(producer, s.kafka.input_topics[0], "json")
        for i in range(a, b, 250):
            await (await out.send(Chunk("bed-gone", "II", int(rec.times_ns[i]), 500.0, rec.values[i:i + 250], i, T0)))
        await producer.stop()

    log = tmp_path / "worker.log"
    proc = start_worker_process(s, log)
    try:
        wait_for_event(log, "partition_assigned", proc=proc)
        asyncio.run(send(0, first))
        truncated = flags_of(asyncio.run(read_topic(s.kafka, s.kafka.flags_topic, until=lambda r: len(r) >= 1,
                                                    timeout_s=60)))
        assert [(f["window_start_ns"], f["reason"]) for f in truncated] == [(T0, "truncated")]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        asyncio.run(send(first, rest))  # the backlog, while no worker runs
        s.kafka.commit_interval_s = 0.3
        proc = start_worker_process(s, log)
        flags = flags_of(asyncio.run(read_topic(
            s.kafka, s.kafka.flags_topic, timeout_s=90,
            until=lambda r: any(f["window_start_ns"] == T0 + 10**10 for f in flags_of(r)))))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    first_window = [(f["status"], f["reason"]) for f in flags if f["window_start_ns"] == T0]
    assert set(first_window) == {("insufficient_data", "truncated")}, f"one window_id, two contents: {first_window}"
    assert [f["status"] for f in flags if f["window_start_ns"] == T0 + 10**10] == ["scored"]


def test_a_new_bed_whose_first_record_is_an_outlier_loses_only_that_record(broker, scorer):
    """Issue 24, sequence 5, through Kafka: the first record of a new bed is dated +10 min and its gateway
    swaps neighbouring chunks. The outlier alone is dead-lettered (with its own bytes and offset), every
    window of the bed is scored on its own grid, and the commit reaches the end of the partition."""
    s = isolated_settings(broker.bootstrap, partitions=1)
    s.windows.idle_evict_s = 5.0
    values = generate(41, fs=500, seed=4).values
    rec = Recording(regular_times(len(values), 500, T0), values, 500.0)

    async def main():
        from streamer.ingest.contract import Chunk
        from streamer.ingest.producer import ChunkProducer

        chunks = [Chunk("bed-outlier", "II", int(rec.times_ns[i]), 500.0, rec.values[i:i + 250], i, T0)
                  for i in range(0, len(values), 250)]
        outlier = Chunk("bed-outlier", "II", chunks[0].t0_ns + 600 * 10**9, 500.0, chunks[0].samples, 0, T0)
        swapped = [c for pair in zip(chunks[1::2], chunks[0::2]) for c in pair]
        worker = Worker(s, scorer=scorer)
        task = asyncio.create_task(worker.run())
        try:
            await until_true(lambda: asyncio.sleep(0, bool(worker.core.partitions)), 60, "assignment")
            producer = make_producer(s.kafka)
            await producer.start()
            out = ChunkProducer(producer, s.kafka.input_topics[0], "json")
            for c in [outlier, *swapped]:
                await (await out.send(c))
            await producer.stop()

            async def scored():
                flags = flags_of(await read_topic(s.kafka, s.kafka.flags_topic, timeout_s=2))
                return sum(f["status"] == "scored" for f in flags) >= 4

            await until_true(scored, 90, "the bed's windows")
            tp = next(iter(worker.core.partitions))
            end = worker.parts.consumer.highwater(tp)
            await until_true(lambda: asyncio.sleep(0, worker.core.ledger.committed.get(tp, 0) == end), 60,
                         "the commit to reach the end of the partition")
        finally:
            worker.stop()
            await asyncio.wait_for(task, 60)
        dead = await read_topic(s.kafka, s.kafka.dead_letter_topic, until=lambda r: len(r) >= 1, timeout_s=10)
        flags = flags_of(await read_topic(s.kafka, s.kafka.flags_topic, timeout_s=5))
        return dead, flags

    dead, flags = asyncio.run(main())
    assert [(reason_of(r.headers), headers_dict(r.headers)["__streams.errors.offset"]) for r in dead] == \
        [("timestamp_jump", "0")]
    assert orjson.loads(dead[0].value)["t0_ns"] == T0 + 600 * 10**9, "the outlier's own bytes"
    scored = sorted(f["window_start_ns"] for f in flags if f["status"] == "scored")
    assert scored[:4] == [T0 + k * 10**10 for k in range(4)], "every window on the bed's own grid"
