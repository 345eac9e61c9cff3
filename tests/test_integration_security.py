"""Security on Apache Kafka itself: its own TLS listener (a CA made by tools/kafka_cluster.py), SASL/
SCRAM-SHA-512 over TLS (SASL_SSL) and ACLs under StandardAuthorizer. The worker with exactly the ACLs of
streamer.kafka.acls works end to end; without WRITE on the flags topic, or with a wrong password, it
stops with exit 1 within seconds, naming the cause."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from streamer.kafka.acls import worker_acls
from streamer.offline.recordings import parse_start
from streamer.offline.replay import replay, synthetic_fleet
from streamer.settings import KafkaSettings
from tests.kafka_utils import (expected_windows, flags_of, isolated_settings, log_events, read_topic,
                               settings_env, start_worker_process, wait_for_event)

pytestmark = pytest.mark.integration
START = "2026-11-22T13:00:00Z"


@pytest.fixture(scope="module")
def secure_cluster(tmp_path_factory):
    from tools.kafka_cluster import KafkaCluster

    cluster = KafkaCluster(tmp_path_factory.mktemp("secure-kafka"), tls=True, sasl=True).start()
    yield cluster
    cluster.stop()


def _as(cluster, s, user: str, password: str | None = None) -> KafkaSettings:
    creds = cluster.client_settings(user)
    if password is not None:
        creds["sasl_password"] = password
    return KafkaSettings(**{**s.kafka.model_dump(), **creds, "create_topics": False})


def _grant(cluster, k: KafkaSettings, user: str, instead: dict | None = None) -> None:
    """The worker's ACLs; `instead`: {(resource type, name): operations} to grant in their place."""
    instead = instead or {}
    cluster.acls([(f"User:{user}", rtype, pattern, name, instead.get((rtype, name), ops))
                  for rtype, pattern, name, ops in worker_acls(k)])


def _settings(cluster):
    """Topics made by the admin user; the worker's settings as the `streamer` user."""
    admin = isolated_settings(cluster.bootstrap, kafka=cluster.client_settings("admin"), partitions=2)
    worker = admin.model_copy(update={"kafka": _as(cluster, admin, "streamer")})
    return admin, worker


def _feed(k: KafkaSettings, beds: int = 2, seconds: float = 21.0):
    fleet = [src for src, _ in synthetic_fleet(beds, seconds, parse_start(START), seed=11)]
    asyncio.run(replay(k, fleet, speed=None, chunk_s=0.5))
    return expected_windows(fleet)


def test_worker_with_the_minimal_acls_over_sasl_ssl(secure_cluster, checkpoint, tmp_path):
    admin, worker = _settings(secure_cluster)
    worker.model.checkpoint = checkpoint
    _grant(secure_cluster, worker.kafka, "streamer")
    log = tmp_path / "worker.log"
    proc = start_worker_process(worker, log)
    try:
        wait_for_event(log, "partition_assigned", proc=proc)
        mode = next(e for e in log_events(log) if e.get("event") == "delivery_mode")
        assert mode["mode"] == "exactly_once"
        want = _feed(admin.kafka)
        records = asyncio.run(read_topic(admin.kafka, admin.kafka.flags_topic, timeout_s=120, until=lambda rs: {
            (f["patient_id"], f["window_start_ns"]) for f in flags_of(rs)} >= want))
        assert {(f["patient_id"], f["window_start_ns"]) for f in flags_of(records)} == want
    finally:
        proc.terminate()
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert secure_cluster.client_settings("streamer")["sasl_password"] not in text


def test_without_write_on_the_flags_topic_the_worker_stops_naming_it(secure_cluster, checkpoint, tmp_path):
    admin, worker = _settings(secure_cluster)
    worker.model.checkpoint = checkpoint
    _grant(secure_cluster, worker.kafka, "streamer", instead={("topic", worker.kafka.flags_topic): "DESCRIBE"})
    log = tmp_path / "worker.log"
    proc = start_worker_process(worker, log)
    try:
        wait_for_event(log, "partition_assigned", proc=proc)
        _feed(admin.kafka, beds=1, seconds=11.0)
        t0 = time.monotonic()
        code = proc.wait(60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 1, log.read_text()[-3000:]
    assert took < 30
    failed = [e for e in log_events(log) if e.get("event") in ("worker_failed", "task_failed")]
    assert failed and any("TopicAuthorizationFailed" in str(e.get("error")) for e in failed), failed


def test_a_wrong_password_stops_the_worker_within_seconds(secure_cluster, checkpoint, tmp_path):
    admin, _ = _settings(secure_cluster)
    wrong = admin.model_copy(update={"kafka": _as(secure_cluster, admin, "streamer", password="not-it")})
    wrong.model.checkpoint = checkpoint
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "streamer", "run"], env=settings_env(wrong), capture_output=True,
                         text=True, timeout=120)
    took = time.monotonic() - t0
    assert out.returncode == 1, out.stderr[-2000:]
    assert "authentication" in (out.stdout + out.stderr).lower(), (out.stdout + out.stderr)[-2000:]
    assert "not-it" not in out.stdout + out.stderr
    assert took < 60, f"took {took:.0f}s"


def test_oauthbearer_reads_its_token_from_a_file_at_each_login(secure_cluster, tmp_path):
    """SASL OAUTHBEARER with the token a platform keeps in a file: the token's subject is the principal
    (streamer's ACLs let it write, intruder's absence of ACLs refuses it), and an empty token file stops
    the client naming the file."""
    from aiokafka.errors import KafkaError

    from streamer.kafka.clients import CredentialError, make_producer, read_records

    admin, worker = _settings(secure_cluster)
    _grant(secure_cluster, worker.kafka, "streamer")
    token = tmp_path / "token"

    def as_oauth(user: str) -> KafkaSettings:
        fields = {**worker.kafka.model_dump(), "sasl_username": None, "sasl_password": None,
                  **secure_cluster.oauth_client_settings(user, token)}
        return KafkaSettings(**fields)

    async def send(k: KafkaSettings) -> None:
        producer = make_producer(k, request_timeout_ms=10000)
        try:
            await producer.start()
            await producer.send_and_wait(k.dead_letter_topic, b"through oauth", key=b"bed-1")
        finally:
            await producer.stop()

    asyncio.run(send(as_oauth("streamer")))
    got = asyncio.run(read_records(admin.kafka, [admin.kafka.dead_letter_topic], until=lambda rs: len(rs) >= 1,
                                   timeout_s=60))
    assert [r.value for r in got] == [b"through oauth"]
    with pytest.raises(KafkaError) as refused:
        asyncio.run(asyncio.wait_for(send(as_oauth("intruder")), 60))
    assert "Authorization" in repr(refused.value), repr(refused.value)
    k = as_oauth("streamer")
    token.write_text("")
    with pytest.raises(CredentialError, match=str(token)):
        asyncio.run(asyncio.wait_for(send(k), 60))


def test_replay_without_write_on_the_input_stops_naming_it(secure_cluster, tmp_path):
    """Issue 34, item 2: `streamer replay` as a principal without WRITE on the input topic retried
    TopicAuthorizationFailedError for ever, silently. It must stop with exit 1 within seconds, naming the
    refusal and the topic, without a traceback."""
    admin, worker = _settings(secure_cluster)
    _grant(secure_cluster, worker.kafka, "streamer")  # the worker's ACLs: READ on the input, no WRITE
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "streamer", "replay", "--synthetic", "1", "--duration", "10",
                          "--speed", "max", "--quiet"], env={**settings_env(worker), "STREAMER_LOG_FORMAT": "console"},
                         capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert out.returncode == 1, out.stderr[-2000:]
    assert "TopicAuthorizationFailed" in out.stderr and worker.kafka.input_topics[0] in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert took < 60, f"replay took {took:.0f} s to give up"
