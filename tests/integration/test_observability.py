"""What an operator's monitoring reads: metric names with units, the standard process metrics, the build
it runs, and a liveness probe that fails when inference hangs (the event loop answering is not enough)."""

from __future__ import annotations

import asyncio
import re
import threading

import aiohttp
import pytest

from streamer.metrics import InferenceWatch, Metrics
from streamer.offline.recordings import parse_start
from streamer.offline.replay import replay, synthetic_fleet
from streamer.settings import ModelSettings
from streamer.runtime import Worker
from tests.kafka_utils import isolated_settings

UNITS = ("_seconds", "_bytes", "_records", "_windows", "_patients", "_partitions", "_episodes", "_total", "_info")
STATES = {"streamer_fetch_paused", "streamer_device_fallback", "streamer_ready"}  # 0 or 1


def _families(text: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (\S+) (\S+)", text, re.M))


def test_every_metric_names_its_unit_and_the_process_metrics_are_there():
    text = Metrics().render().decode()
    families = _families(text)
    ours = [n for n in families if n.startswith("streamer_")]
    assert ours and [n for n in ours if not n.endswith(UNITS) and n not in STATES] == []
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
            "python_info"} <= set(families)
    assert not [n for n in families if n.endswith("_created")], "no _created series beside each counter"
    build = re.search(r'^streamer_build_info\{(.*)\} 1\.0$', text, re.M)
    import importlib.metadata

    assert build and f'version="{importlib.metadata.version("streamer")}"' in build.group(1)
    assert 'torch="2.14.1"' in build.group(1)


def test_inference_watch_turns_liveness_off_while_one_batch_hangs():
    now = [100.0]
    watch = InferenceWatch(stall_s=30, clock=lambda: now[0])
    assert watch.alive() == (True, "ok") and watch.busy_s() == 0
    watch.begin(64)
    now[0] += 29
    assert watch.alive()[0]
    now[0] += 2
    ok, why = watch.alive()
    assert not ok and "64 windows" in why and "31 s" in why
    watch.end()
    assert watch.alive()[0]


class _HungScorer:
    """The real scorer, but every batch waits for `release` (a hung driver or deadlocked thread)."""

    def __init__(self, scorer, release: threading.Event):
        self.scorer, self.release = scorer, release

    def probabilities(self, windows):
        self.release.wait(120)
        return self.scorer.probabilities(windows)

    def __getattr__(self, name):
        return getattr(self.scorer, name)


@pytest.mark.integration
def test_healthz_fails_while_inference_hangs_and_recovers(broker, scorer):
    s = isolated_settings(broker.bootstrap, partitions=1, metrics_port=0,
                          model=ModelSettings(inference_stall_s=1.0, allow_demo=True))
    release = threading.Event()

    async def status(session, port: int) -> tuple[int, str]:
        async with session.get(f"http://127.0.0.1:{port}/healthz") as r:
            return r.status, await r.text()

    async def until(session, port: int, want: int, timeout_s: float = 60) -> str:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            code, text = await status(session, port)
            if code == want:
                return text
            assert asyncio.get_running_loop().time() < deadline, f"/healthz stayed {code}: {text}"
            await asyncio.sleep(0.2)

    async def main():
        worker = Worker(s, scorer=_HungScorer(scorer, release))
        task = asyncio.create_task(worker.run())
        try:
            fleet = [src for src, _ in synthetic_fleet(1, 11, parse_start("2026-11-22T08:00:00Z"), seed=3)]
            await replay(s.kafka, fleet, speed=None, chunk_s=0.5)
            async with aiohttp.ClientSession() as session:
                while worker.parts is None or worker.parts.health is None or not worker.parts.health.port:
                    assert not task.done(), "worker exited early"
                    await asyncio.sleep(0.1)
                port = worker.parts.health.port
                stalled = await until(session, port, 503)
                metrics = await (await session.get(f"http://127.0.0.1:{port}/metrics")).text()
                release.set()
                await until(session, port, 200)
        finally:
            release.set()
            worker.stop()
            code = await asyncio.wait_for(task, 60)
        return stalled, metrics, code

    stalled, metrics, code = asyncio.run(main())
    assert "inference stalled" in stalled and code == 0
    busy = float(re.search(r"^streamer_inference_busy_seconds (\S+)$", metrics, re.M).group(1))
    assert busy > 1.0


def test_readiness_is_membership_so_a_standby_without_partitions_is_ready():
    """Replicas may exceed input partitions: a standby has joined its group and holds none, and a rollout
    must not wait on partitions it can never get. Not ready: the model not loaded, or not yet a member."""
    from types import SimpleNamespace

    from aiokafka import TopicPartition

    from streamer.settings import Settings

    w = Worker(Settings())

    def gauge() -> float:
        return float(re.search(r"^streamer_ready (\S+)$", w.core.metrics.render().decode(), re.M).group(1))

    assert w.ready() == (False, "model not loaded") and gauge() == 0.0
    w.scorer = object()
    assert w.ready() == (False, "not yet a member of the consumer group") and gauge() == 0.0
    w.parts = SimpleNamespace(ownership=SimpleNamespace(joined=False))  # started, the group not yet joined
    assert w.ready() == (False, "not yet a member of the consumer group") and gauge() == 0.0
    w.parts.ownership.joined = True  # the assignment listener ran with an empty assignment
    ok, why = w.ready()
    assert ok and "standby" in why and gauge() == 1.0
    for tp in (TopicPartition("ecg.lead2", 0), TopicPartition("ecg.lead2", 1)):
        w.core.partitions.open(tp)
    assert w.ready() == (True, "ready: 2 partitions")
