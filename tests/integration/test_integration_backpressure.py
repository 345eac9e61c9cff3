"""Slow inference: fetching pauses, pending windows stay bounded, the worker catches up, nothing is lost.
Also scrapes /metrics, /healthz and /readyz during the run."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest

from streamer.offline.recordings import parse_start
from streamer.offline.replay import replay, synthetic_fleet
from streamer.runtime import Worker
from tests.slow_scorer import SlowScorer
from tests.kafka_utils import expected_windows, flags_of, isolated_settings, read_topic, scored_ids

pytestmark = pytest.mark.integration


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def test_slow_inference_pauses_fetching_then_catches_up(broker, scorer):
    s = isolated_settings(broker.bootstrap, partitions=2, metrics_port=0)
    s.kafka.max_poll_records = 40
    s.batching.max_batch, s.batching.max_pending_windows = 4, 8
    fleet = [src for src, _ in synthetic_fleet(16, 41.0, parse_start("2026-11-22T12:00:00Z"), seed=8)]
    expected = expected_windows(fleet)

    async def main():
        slow = SlowScorer(scorer, delay_s=0.7)
        worker = Worker(s, scorer=slow)
        task = asyncio.create_task(worker.run())
        peak_pending, paused_seen, scrapes = 0, False, []
        try:
            while not worker.core.partitions:
                await asyncio.sleep(0.1)
            port = worker.parts.health.port
            await replay(s.kafka, fleet, speed=None, chunk_s=0.5)
            t_paused = None  # slow until fetching has paused, then 3 s more of it
            deadline = time.monotonic() + 90
            while t_paused is None or time.monotonic() < t_paused + 3:
                assert time.monotonic() < deadline, "fetching never paused"
                peak_pending = max(peak_pending, worker.core.ledger.in_flight())
                if worker.paused and not paused_seen:
                    paused_seen, t_paused = True, time.monotonic()
                    scrapes.append(await asyncio.to_thread(_get, port, "/metrics"))  # while paused
                await asyncio.sleep(0.05)
            slow.delay_s = 0.0  # inference recovers
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                flags = flags_of(await read_topic(s.kafka, s.kafka.flags_topic, timeout_s=2))
                if expected <= set(scored_ids(flags)):
                    break
            messages = sum(-(-len(src.recording.values) // 250) for src in fleet)
            deadline = time.monotonic() + 30
            while True:  # until the gauges and counters caught up with everything
                after = await asyncio.to_thread(_get, port, "/metrics")
                if (_metric(after[1], "streamer_messages_total") == messages
                        and _metric(after[1], "streamer_pending_windows") == 0) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            scrapes.append(after)
            scrapes.append(await asyncio.to_thread(_get, port, "/healthz"))
            scrapes.append(await asyncio.to_thread(_get, port, "/readyz"))
        finally:
            worker.stop()
            code = await asyncio.wait_for(task, 60)
        return code, flags, peak_pending, paused_seen, scrapes

    code, flags, peak_pending, paused_seen, scrapes = asyncio.run(main())
    assert code == 0
    assert paused_seen, "fetching must pause while inference is slower than arrivals"
    assert peak_pending <= 8 + 40 * 2, f"pending windows must stay bounded, saw {peak_pending}"
    assert expected <= set(scored_ids(flags)), "nothing may be lost"
    (st1, during), (st2, after), (st3, health), (st4, ready) = scrapes
    assert st1 == st2 == 200 and _metric(during, "streamer_fetch_paused") == 1.0
    assert _metric(after, 'streamer_windows_total{status="scored"}') >= len(expected)
    assert _metric(after, "streamer_messages_total") == sum(-(-len(src.recording.values) // 250) for src in fleet)
    assert _metric(after, "streamer_flag_latency_seconds_count") >= len(expected)
    assert 'streamer_model_info{' in after and "model_id=" in after
    assert st3 == 200 and health.strip() == "ok"
    assert st4 == 200 and ready.startswith("ready")


def test_a_micro_batch_is_one_network_call_at_most(broker, scorer):
    """batching.max_batch above the model's device batch: batches are cut at the device batch (their flags
    go out together, so the first call's flags never wait for a second call); below it, max_batch holds."""
    async def limit(s) -> int:
        worker = Worker(s, scorer=scorer)
        task = asyncio.create_task(worker.run())
        try:
            while not worker.core.partitions and not task.done():  # started: its partition assigned
                await asyncio.sleep(0.05)
            return worker.core.batcher.max_batch
        finally:
            worker.stop()
            await asyncio.wait_for(task, 60)

    for max_batch, expected in ((scorer.device_batch * 4, scorer.device_batch), (1, 1)):
        s = isolated_settings(broker.bootstrap, partitions=1)  # topics made here, outside the event loop
        s.batching.max_batch = max_batch
        assert asyncio.run(limit(s)) == expected
