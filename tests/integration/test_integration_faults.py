"""No window is lost: kill -9 and restart, a worker leaving the group, SIGTERM mid-stream."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import pytest

from benchmarks.campaigns.worker_faults import crash_campaign
from streamer.offline.recordings import parse_start
from streamer.offline.replay import replay, synthetic_fleet
from streamer.runtime import Worker
from tests.kafka_utils import (expected_windows, flags_of, isolated_settings, read_topic, scored_ids,
                               start_worker_process, wait_for_event)

pytestmark = pytest.mark.integration


def _all_flagged(s, expected, timeout_s):
    def until(records):
        return expected <= set(scored_ids(flags_of(records)))

    return flags_of(asyncio.run(read_topic(s.kafka, s.kafka.flags_topic, until=until, timeout_s=timeout_s)))


def test_kill_9_at_random_moments_loses_no_window(broker, checkpoint, tmp_path, record_property):
    """50 beds streaming at 8x real time; the worker is SIGKILLed 4 times at random and restarted. On Apache
    Kafka (exactly-once checkpoints) a read_committed reader sees every window exactly once."""
    r = crash_campaign(broker.bootstrap, beds=50, kills=4, seconds=41.0, speed=8.0, checkpoint=checkpoint,
                       seed=42, workdir=tmp_path)
    print(f"kill -9 x{r['kills']}: expected {r['expected']}, flagged {r['flagged']}, lost {r['lost']}, "
          f"duplicates {r['duplicates']}")
    record_property("duplicates", r["duplicates"])
    assert r["expected"] == 200
    assert r["lost"] == 0
    assert r["duplicate_ids"] == 0, r
    # the crash window between an episode transition's checkpoint and its message: never apart
    assert r["episodes_on_topic"] > 0 and r["episode_mismatches"] == 0, r


def test_worker_leaving_the_group_hands_over_without_loss(broker, scorer):
    s = isolated_settings(broker.bootstrap, partitions=4)
    fleet = [src for src, _ in synthetic_fleet(12, 51.0, parse_start("2026-11-22T10:00:00Z"), seed=4)]
    expected = expected_windows(fleet)

    async def main():
        a, b = Worker(s, scorer=scorer), Worker(s, scorer=scorer)
        ta, tb = asyncio.create_task(a.run()), asyncio.create_task(b.run())
        try:
            deadline = time.monotonic() + 45
            while not (a.core.partitions and b.core.partitions) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert a.core.partitions and b.core.partitions, "both workers must own partitions"
            assert not a.core.partitions.tps() & b.core.partitions.tps()
            feed = asyncio.create_task(replay(s.kafka, fleet, speed=10.0, chunk_s=0.5))
            deadline = time.monotonic() + 60
            while not a.core.ledger.next_offset:  # a has consumed records of its partitions
                assert time.monotonic() < deadline, "worker a never consumed"
                await asyncio.sleep(0.05)
            assert not feed.done(), "the stream must still be running when a leaves"
            a.stop()  # mid-stream
            assert await asyncio.wait_for(ta, 60) == 0
            await feed
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                flags = flags_of(await read_topic(s.kafka, s.kafka.flags_topic, timeout_s=2))
                if expected <= set(scored_ids(flags)):
                    break
                await asyncio.sleep(1)
            assert len(b.core.partitions) == 4, "the remaining worker must own every partition"
        finally:
            a.stop()
            b.stop()
            await asyncio.wait_for(asyncio.gather(ta, tb, return_exceptions=True), 60)
        assert tb.result() == 0
        return flags_of(await read_topic(s.kafka, s.kafka.flags_topic, timeout_s=5))

    flags = asyncio.run(main())
    assert expected <= set(scored_ids(flags))


def test_sigterm_mid_stream_exits_0_and_loses_nothing(broker, checkpoint, tmp_path):
    s = isolated_settings(broker.bootstrap, partitions=2)
    s.model.checkpoint = checkpoint
    fleet = [src for src, _ in synthetic_fleet(8, 61.0, parse_start("2026-11-22T11:00:00Z"), seed=5)]
    expected = expected_windows(fleet)
    log = tmp_path / "worker.log"
    proc = start_worker_process(s, log)
    wait_for_event(log, "partition_assigned", proc=proc)
    feeder = threading.Thread(target=lambda: asyncio.run(replay(s.kafka, fleet, speed=4.0, chunk_s=0.5)))
    feeder.start()
    # mid-stream: the first flags are out and the beds are still sending
    asyncio.run(read_topic(s.kafka, s.kafka.flags_topic, until=lambda r: len(r) >= 1, timeout_s=120))
    assert feeder.is_alive(), "the stream must still be running when SIGTERM arrives"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, log.read_text()[-3000:]
    assert '"worker_stopped"' in log.read_text()
    feeder.join(120)
    proc = start_worker_process(s, log)
    try:
        flags = _all_flagged(s, expected, timeout_s=120)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert expected <= set(scored_ids(flags))
