"""Three workers in one group split the partitions; one is killed; its patients continue on the others."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import threading
import time

import pytest

from streamer.offline.recordings import parse_start
from streamer.offline.replay import replay, synthetic_fleet
from tests.kafka_utils import (expected_windows, flags_of, isolated_settings, read_topic, scored_ids,
                               start_worker_process)

pytestmark = pytest.mark.integration


def _assigned(log_path) -> set[int]:
    """Partitions currently assigned according to a worker's JSON log."""
    owned: set[int] = set()
    for line in log_path.read_text().splitlines():
        m = re.search(r'"partition": (\d+)', line)
        if m and '"partition_assigned"' in line:
            owned.add(int(m.group(1)))
        elif m and '"partition_revoked"' in line:
            owned.discard(int(m.group(1)))
    return owned


def test_three_workers_share_partitions_and_survive_a_kill(broker, checkpoint, tmp_path):
    s = isolated_settings(broker.bootstrap, partitions=6)
    s.model.checkpoint = checkpoint
    logs = [tmp_path / f"w{i}.log" for i in range(3)]
    procs = [start_worker_process(s, log) for log in logs]
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not all(_assigned(log) for log in logs):
            time.sleep(0.5)
        owned = [_assigned(log) for log in logs]
        assert all(owned), f"every worker must own partitions: {owned}"
        assert set().union(*owned) == set(range(6)) and sum(map(len, owned)) == 6
        fleet = [src for src, _ in synthetic_fleet(30, 41.0, parse_start("2026-11-22T13:00:00Z"), seed=9)]
        expected = expected_windows(fleet)
        feeder = threading.Thread(target=lambda: asyncio.run(replay(s.kafka, fleet, speed=8.0, chunk_s=0.5)))
        feeder.start()
        asyncio.run(read_topic(s.kafka, s.kafka.flags_topic, until=lambda r: len(r) >= 1, timeout_s=120))
        assert feeder.is_alive(), "the stream must still be running at the kill"
        procs[0].kill()  # SIGKILL mid-stream
        procs[0].wait(10)
        feeder.join(120)

        def until(records):
            return expected <= set(scored_ids(flags_of(records)))

        flags = flags_of(asyncio.run(read_topic(s.kafka, s.kafka.flags_topic, until=until, timeout_s=180)))
        assert expected <= set(scored_ids(flags)), "the killed worker's patients must continue elsewhere"
        survivors = _assigned(logs[1]) | _assigned(logs[2])
        assert survivors == set(range(6))
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
