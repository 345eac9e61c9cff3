"""Apache Kafka as the production target: scripts/kafka, the delivery mode chosen at start, exactly-once
checkpoints that fence a zombie, the state topic checked at start, and the embedded demo broker's path."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from benchmarks.campaigns.worker_faults import zombie_campaign
from streamer.kafka.clients import make_admin
from streamer.runtime import StartupError, Worker
from tests.kafka_utils import isolated_settings

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_scripts_kafka_start_prints_bootstrap_and_stop_ends_it(tmp_path):
    folder = tmp_path / "cluster"
    started = subprocess.run([str(ROOT / "scripts" / "kafka"), "start", "--dir", str(folder)],
                             capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        lines = started.stdout.splitlines()
        assert len(lines) == 1 and lines[0].startswith("bootstrap=127.0.0.1:"), started.stdout
        bootstrap = lines[0].split("=", 1)[1]
        port = int(bootstrap.rsplit(":", 1)[1])
        info = json.loads((folder / "cluster.json").read_text())
        assert (folder / "logs" / "broker-1.log").is_file()

        s = isolated_settings(bootstrap)  # the cluster answers metadata requests as soon as start returns

        async def topics():
            admin = make_admin(s.kafka)
            await admin.start()
            try:
                return await admin.list_topics()
            finally:
                await admin.close()

        assert any(t.startswith("in-") for t in asyncio.run(topics()))
        again = subprocess.run([str(ROOT / "scripts" / "kafka"), "start", "--dir", str(folder)],
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "already runs" in again.stderr
    finally:
        stopped = subprocess.run([str(ROOT / "scripts" / "kafka"), "stop", "--dir", str(folder)],
                                 capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    pid = info["nodes"]["1"]["pid"]
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]
    assert not _listening(port)


def _start_worker(s, scorer) -> Worker:
    async def start():
        w = Worker(s, scorer=scorer)
        try:
            await w.start()
        finally:
            if w.parts is not None:
                await w.parts.close()
        return w

    return asyncio.run(start())


def test_delivery_is_exactly_once_on_apache_kafka(broker, scorer, caplog):
    w = _start_worker(isolated_settings(broker.bootstrap), scorer)
    assert w.parts.delivery.exactly_once


def test_delivery_falls_back_to_at_least_once_without_transactions(embedded_broker, scorer):
    s = isolated_settings(embedded_broker.bootstrap)
    w = _start_worker(s, scorer)
    assert not w.parts.delivery.exactly_once
    s.kafka.delivery = "exactly_once"
    with pytest.raises(StartupError, match="refused a transaction"):
        _start_worker(s, scorer)


def test_a_state_topic_that_is_not_compacted_stops_the_worker(broker, scorer, tmp_path):
    from aiokafka.admin import NewTopic

    s = isolated_settings(broker.bootstrap)
    s.kafka.state_topic = f"{s.kafka.group_id}.plain-state"

    async def create():
        admin = make_admin(s.kafka)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(s.kafka.state_topic, 4, 1)])  # cleanup.policy=delete
            for _ in range(100):  # until every broker's metadata has it
                described = await admin.describe_topics([s.kafka.state_topic])
                if described and described[0]["error_code"] == 0 and len(described[0]["partitions"]) == 4:
                    break
                await asyncio.sleep(0.1)
        finally:
            await admin.close()

    asyncio.run(create())
    with pytest.raises(StartupError, match="cleanup.policy=delete.*compacted") as refused:
        _start_worker(s, scorer)
    # the fix it prints runs as printed
    from streamer.kafka.clients import topic_config

    _run_as_printed(str(refused.value).split("compacted: ", 1)[1], tmp_path)
    assert asyncio.run(topic_config(s.kafka, s.kafka.state_topic, "cleanup.policy")) == "compact"


def _run_as_printed(fix: str, folder: Path) -> None:
    """A fix the worker printed, run as printed with Kafka's own kafka-configs.sh (an admin.properties beside
    it)."""
    from tools.kafka_cluster import tools_bin

    assert fix.startswith("kafka-configs.sh --bootstrap-server "), fix
    (folder / "admin.properties").write_text("")  # a plaintext broker: an admin needs no settings
    done = subprocess.run(["bash", "-c", fix], cwd=folder, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": f"{tools_bin()}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_dead_letter_topic_too_small_for_a_stand_in_stops_an_exactly_once_worker_at_start(broker, scorer,
                                                                                               tmp_path):
    """Exactly once, a dead letter the topic refuses fails its transaction and stops the worker, and the
    record is read again after every restart: one hostile record would stop its partition for good. A dead
    letter larger than the topic takes goes as its small stand-in (test_integration_state.py), so only a
    topic too small for even that is refused at start; the fix printed runs as printed, and then the worker
    starts. (At least once the worker runs: a refused dead letter is released with an error.)"""
    from streamer.runtime.startup import KAFKA_DEFAULT_MAX_MESSAGE_BYTES
    from tests.kafka_utils import set_topic_config, topic_config_described

    s = isolated_settings(broker.bootstrap)
    asyncio.run(set_topic_config(s.kafka, s.kafka.dead_letter_topic, **{"max.message.bytes": "200"}))
    with pytest.raises(StartupError, match=f"{s.kafka.dead_letter_topic} has max.message.bytes=200") as refused:
        _start_worker(s, scorer)
    _run_as_printed(str(refused.value).rsplit("): ", 1)[1], tmp_path)
    asyncio.run(topic_config_described(s.kafka, s.kafka.dead_letter_topic, "max.message.bytes",
                                       str(KAFKA_DEFAULT_MAX_MESSAGE_BYTES)))
    assert _start_worker(s, scorer).parts.delivery.exactly_once


def test_aiokafka_tells_a_standby_member_its_empty_assignment(broker):
    """/readyz counts a worker ready once its rebalance listener saw an assignment, an empty one included
    (a standby: more workers than partitions). That rests on aiokafka calling on_partitions_assigned with
    an empty set, proven here with two members of one group on a one-partition topic."""
    from aiokafka import ConsumerRebalanceListener

    from streamer.kafka.clients import make_consumer

    s = isolated_settings(broker.bootstrap, partitions=1)

    class Seen(ConsumerRebalanceListener):
        def __init__(self):
            self.assigned: list[set] = []

        async def on_partitions_revoked(self, revoked):
            pass

        async def on_partitions_assigned(self, assigned):
            self.assigned.append(set(assigned))

    async def main():
        members = [make_consumer(s.kafka, client_id=f"member-{i}") for i in range(2)]
        seen = [Seen(), Seen()]
        for consumer, listener in zip(members, seen):
            await consumer.start()
            consumer.subscribe(s.kafka.input_topics, listener=listener)
        try:
            deadline = asyncio.get_running_loop().time() + 60
            while asyncio.get_running_loop().time() < deadline:
                await asyncio.gather(*(c.getmany(timeout_ms=200) for c in members))
                latest = [listener.assigned[-1] if listener.assigned else None for listener in seen]
                if None not in latest and sorted(len(a) for a in latest) == [0, 1]:
                    return latest
            raise AssertionError(f"no standby assignment seen: {[listener.assigned for listener in seen]}")
        finally:
            for consumer in members:
                await consumer.stop()

    latest = asyncio.run(main())
    assert sorted(len(a) for a in latest) == [0, 1]


def test_the_state_topic_name_derives_from_the_group():
    from streamer.settings import KafkaSettings

    assert KafkaSettings(group_id="ward-7").state_topic == "ward-7.state"
    assert KafkaSettings(group_id="ward-7").transactional_id_prefix == "ward-7"
    assert KafkaSettings(group_id="a").state_topic != KafkaSettings(group_id="b").state_topic


@pytest.mark.slow
def test_a_zombie_owner_is_fenced_and_nothing_it_writes_is_seen(broker, checkpoint, tmp_path):
    """SIGSTOP the owner past its session timeout, let a successor take over, resume the owner: a
    read_committed reader sees every window exactly once, and no state record goes backwards."""
    r = zombie_campaign(broker.bootstrap, beds=12, seconds=60.0, speed=2.0, checkpoint=checkpoint, seed=3,
                        workdir=tmp_path)
    print(r)
    assert r["lost"] == 0, r
    assert r["duplicate_ids"] == 0, r
    assert r["state_regressions"] == 0, r
    # a zombie with writes in its open transaction is fenced (transaction_fenced logged), drops its
    # partitions and rejoins as a new member; one whose transaction was empty learns from its heartbeat
    # that it left the group and rejoins too. Either way nothing it wrote meanwhile is seen, and it lives on
    assert r["zombie_exit_codes"] == [None], r
    assert all(code == 0 for code in r["exit_codes"]), r


def test_the_demo_path_on_the_embedded_broker(embedded_broker, scorer):
    """Smoke test of the embedded broker the demo uses: at-least-once delivery, every window flagged, and
    the read_committed readers the project ships read it."""
    from streamer.offline.recordings import parse_start
    from streamer.offline.replay import replay, synthetic_fleet
    from tests.kafka_utils import expected_windows, flags_of, read_topic, scored_ids

    s = isolated_settings(embedded_broker.bootstrap, partitions=2)
    fleet = [src for src, _ in synthetic_fleet(3, 31.0, parse_start("2026-11-22T05:00:00Z"), seed=9)]
    expected = expected_windows(fleet)

    async def main():
        worker = Worker(s, scorer=scorer)
        task = asyncio.create_task(worker.run())
        try:
            await replay(s.kafka, fleet, speed=None, chunk_s=0.5)
            records = await read_topic(s.kafka, s.kafka.flags_topic, timeout_s=90,
                                       until=lambda rs: expected <= set(scored_ids(flags_of(rs))))
        finally:
            worker.stop()
            code = await asyncio.wait_for(task, 60)
        return worker, code, flags_of(records)

    worker, code, flags = asyncio.run(main())
    assert code == 0
    assert not worker.parts.delivery.exactly_once
    assert expected <= set(scored_ids(flags))


@pytest.mark.slow
def test_broker_failover_short(checkpoint, tmp_path):
    """3 brokers, RF 3, min.insync 2: the leader of an input, then of a flags partition, is SIGKILLed and
    restarted while beds stream; nothing is lost or duplicated and the worker rides it out."""
    from benchmarks.campaigns.broker_faults import failover_campaign
    from tools.kafka_cluster import KafkaCluster

    with KafkaCluster(tmp_path / "cluster", brokers=3) as cluster:
        r = failover_campaign(cluster, beds=10, kills=2, seconds=61.0, speed=1.0, checkpoint=checkpoint, seed=5,
                              workdir=tmp_path)
    print(r)
    assert r["kills"] == 2
    assert r["lost"] == 0 and r["duplicate_ids"] == 0, r
    assert r["worker_alive"], r


def test_streamer_acls_prints_a_kafka_acls_command_per_grant():
    import sys

    from streamer.kafka.acls import worker_acls
    from streamer.settings import KafkaSettings

    # a process of its own: the CLI configures logging on the stdout it is given
    out = subprocess.run([sys.executable, "-m", "streamer", "acls", "--principal", "User:icu-streamer"],
                         env={**os.environ, "STREAMER_KAFKA__GROUP_ID": "ward-7"}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == len(worker_acls(KafkaSettings(group_id="ward-7")))
    assert all(line.startswith("kafka-acls.sh ") and "--allow-principal User:icu-streamer" in line for line in lines)
    assert any("--topic ward-7.state" in line and "--operation DescribeConfigs" in line for line in lines)
    assert any("--transactional-id ward-7 --resource-pattern-type prefixed" in line for line in lines)


def test_producer_settings_reach_the_wire(broker):
    """kafka.compression_type, linger_ms and a passed-through producer option are what the
    producer uses: zstd batches written to Apache Kafka read back intact."""

    from streamer.kafka.clients import make_producer, read_records

    s = isolated_settings(broker.bootstrap)
    k = s.kafka.model_copy(update={"compression_type": "zstd", "linger_ms": 20,
                                   "producer_options": {"request_timeout_ms": 20000}})
    async def send():
        producer = make_producer(k)
        assert producer._compression_type == "zstd" and producer.client._request_timeout_ms == 20000
        await producer.start()
        try:
            for i in range(50):
                await producer.send(k.dead_letter_topic, b"x" * 1000 + bytes([i]), key=b"bed-1")
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(send())
    got = asyncio.run(read_records(k, [k.dead_letter_topic], until=lambda rs: len(rs) >= 50, timeout_s=60))
    assert sorted(r.value[-1] for r in got) == list(range(50))
