"""SIGTERM/SIGINT are honoured at any moment of `streamer run`: while starting (settings, imports, model
load and warm-up) the worker exits 0 at once without joining the group; afterwards it drains and commits
(tests/integration/test_integration_faults.py: test_sigterm_mid_stream_exits_0_and_loses_nothing)."""

from __future__ import annotations

import signal
import time

import pytest

from tests.kafka_utils import isolated_settings, log_events, start_worker_process, wait_for_event

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("event,sig", [
    ("worker_starting", signal.SIGTERM),  # settings loaded, torch still importing
    ("model_loading", signal.SIGTERM),    # checkpoint load and warm-up under way in the inference thread
    ("model_loading", signal.SIGINT),
])
def test_stop_signal_while_starting_exits_0_promptly(broker, checkpoint, tmp_path, event, sig):
    s = isolated_settings(broker.bootstrap, partitions=1)
    s.model.checkpoint = checkpoint
    log = tmp_path / "worker.log"
    proc = start_worker_process(s, log)
    try:
        wait_for_event(log, event, timeout_s=120, proc=proc)
        sent = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code == 0, text[-3000:]
    events = [e.get("event") for e in log_events(log)]
    assert "worker_stopped" in events, text[-3000:]
    assert "partition_assigned" not in events, "a worker stopped while starting must not join the group"
    print(f"{sig.name} after {event}: exit 0 in {took:.2f} s")


def test_second_signal_during_drain_does_not_kill_the_worker(broker, checkpoint, tmp_path):
    """A rolling update may send SIGTERM twice: the second must not cut the drain short."""
    s = isolated_settings(broker.bootstrap, partitions=1)
    s.model.checkpoint = checkpoint
    log = tmp_path / "worker.log"
    proc = start_worker_process(s, log)
    try:
        wait_for_event(log, "partition_assigned", timeout_s=120, proc=proc)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, log.read_text()[-3000:]
    assert "worker_stopped" in [e.get("event") for e in log_events(log)]


class _FailingScorer:
    """The real scorer, whose network call fails with an error no retry can fix (a bug, not a device fault)."""

    def __init__(self, scorer):
        self._scorer = scorer
        self.info = scorer.info
        self.device = scorer.device

    def probabilities(self, x):
        raise ValueError("injected: inference bug")


def test_failed_inference_ends_shutdown_without_waiting_the_deadline(broker, scorer):
    import asyncio

    from streamer.offline.recordings import parse_start
    from streamer.offline.replay import replay, synthetic_fleet
    from streamer.runtime import Worker

    s = isolated_settings(broker.bootstrap, partitions=1, shutdown_deadline_s=120)
    fleet = [src for src, _ in synthetic_fleet(2, 21.0, parse_start("2026-11-22T07:00:00Z"), seed=3)]

    async def main():
        worker = Worker(s, scorer=_FailingScorer(scorer))
        task = asyncio.create_task(worker.run())
        await replay(s.kafka, fleet, speed=None, chunk_s=0.5)
        done, _ = await asyncio.wait({task}, timeout=90)  # far below the 120 s deadline
        assert done, "shutdown after a failed inference task waited for the deadline"
        return task.result(), worker

    code, worker = asyncio.run(main())
    assert code == 1
    # nothing was published, so no commit may have passed the first record
    assert all(offset == 0 for offset in worker.core.ledger.committed.values()), worker.core.ledger.committed
