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
    assert any("streamer acls --role worker --principal User:streamer" in str(e.get("fix")) for e in failed), failed


def test_a_wrong_password_stops_the_worker_within_seconds(secure_cluster, checkpoint, tmp_path):
    admin, _ = _settings(secure_cluster)
    wrong = admin.model_copy(update={"kafka": _as(secure_cluster, admin, "streamer", password="not-it")})
    wrong.model.checkpoint = checkpoint
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "streamer", "run"], env=settings_env(wrong), capture_output=True,
                         text=True, timeout=120)
    took = time.monotonic() - t0
    assert out.returncode == 1, out.stderr[-2000:]
    # the startup error itself names the cause (an alert keyed on startup_failed), not "broker unreachable"
    failed = [e for e in map(_json_or_none, (out.stdout + out.stderr).splitlines()) if e and e.get("event") ==
              "startup_failed"]
    assert failed and "authentication failed" in failed[0]["error"], (out.stdout + out.stderr)[-2000:]
    assert "unreachable" not in failed[0]["error"] and "streamer" in failed[0]["error"], failed
    assert "not-it" not in out.stdout + out.stderr
    assert took < 60, f"took {took:.0f}s"


def _json_or_none(line: str):
    import json

    try:
        return json.loads(line) if line.startswith("{") else None
    except ValueError:
        return None


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


# -- issue 34: from zero to a secured deployment with what ships -----------------------------------------
def _cli(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamer", *args], env={**env, "STREAMER_LOG_FORMAT": "console"},
                          capture_output=True, text=True, timeout=timeout)


def _run_printed(lines: list[str], tools: str) -> None:
    """Each printed command in a shell, exactly as printed, with Kafka's own tools on PATH."""
    import os

    for line in lines:
        done = subprocess.run(["bash", "-c", line], env={**os.environ, "PATH": f"{tools}:{os.environ['PATH']}"},
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{line}\n{done.stdout}{done.stderr}"


def _fresh_names(cluster, user: str) -> KafkaSettings:
    """Unique, not yet created topics and group, as `user`."""
    import uuid

    tag = uuid.uuid4().hex[:8]
    return KafkaSettings(**{**cluster.client_settings("admin"), "input_topics": [f"in-{tag}"],
                            "flags_topic": f"flags-{tag}", "episodes_topic": f"episodes-{tag}",
                            "dead_letter_topic": f"dlq-{tag}", "state_topic": f"state-{tag}", "group_id": f"g-{tag}",
                            "input_partitions": 2, "commit_interval_s": 0.3, "session_timeout_ms": 6000,
                            "heartbeat_interval_ms": 1000, "sasl_username": user, "sasl_password": f"{user}-secret"})


def _with_user(k: KafkaSettings, user: str) -> KafkaSettings:
    return KafkaSettings(**{**k.model_dump(), "sasl_username": user, "sasl_password": f"{user}-secret"})


def test_printed_topics_users_and_role_acls_are_enough_for_every_role(secure_cluster, checkpoint, tmp_path):
    """README's checklist with what ships: `streamer topics` and `streamer acls --role ...` print commands
    that Kafka's own kafka-topics.sh / kafka-acls.sh (scripts/kafka tools) run as printed; then a gateway
    (streamer replay), the worker, an alarm-system reader with its group and `streamer watch` each work with
    their role's ACLs alone, and nothing more: the reader cannot read the ECG input."""
    from aiokafka.errors import KafkaError

    from streamer.kafka.clients import make_consumer, topic_config
    from streamer.settings import Settings
    from tools.kafka_cluster import tools_bin

    tools = str(tools_bin())
    admin_props = str(secure_cluster.folder / "client.properties")
    users = {role: f"{role}-{uuid_tag()}" for role in ("worker", "gateway", "reader", "view")}
    # users of their own, made with Kafka's kafka-configs.sh (SCRAM credentials in KRaft)
    _run_printed([f"kafka-configs.sh --bootstrap-server {secure_cluster.bootstrap} --command-config {admin_props} "
                  f"--alter --entity-type users --entity-name {name} "
                  f"--add-config 'SCRAM-SHA-512=[iterations=4096,password={name}-secret]'" for name in users.values()],
                 tools)
    base = _fresh_names(secure_cluster, "admin")
    env = settings_env(Settings(kafka=base))
    printed = _cli("topics", "--partitions", "2", "--replication-factor", "1", "--min-insync-replicas", "1",
                   "--command-config", admin_props, env=env)
    assert printed.returncode == 0, printed.stderr
    _run_printed(printed.stdout.splitlines(), tools)
    assert asyncio.run(topic_config(base, base.state_topic, "cleanup.policy")) == "compact"
    assert asyncio.run(topic_config(base, base.input_topics[0], "retention.ms")) == "86400000"
    reader_group = f"alarms-{uuid_tag()}"
    for role, name in users.items():
        extra = ["--group", reader_group] if role == "reader" else []
        acls = _cli("acls", "--role", role, "--principal", f"User:{name}", "--command-config", admin_props, *extra,
                    env=env)
        assert acls.returncode == 0, acls.stderr
        _run_printed(acls.stdout.splitlines(), tools)

    def as_role(role: str) -> KafkaSettings:
        return _with_user(base, users[role])

    # the gateway writes the input (streamer replay)
    fleet = [src for src, _ in synthetic_fleet(2, 21.0, parse_start(START), seed=12)]
    want = expected_windows(fleet)
    gateway_env = settings_env(Settings(kafka=as_role("gateway")))
    sent = _cli("replay", "--synthetic", "2", "--duration", "21", "--seed", "12", "--start", START, "--speed", "max",
                "--chunk-s", "0.5", "--quiet", env=gateway_env)
    assert sent.returncode == 0, sent.stderr[-2000:]
    # the worker flags it
    worker = Settings(kafka=as_role("worker"))
    worker.model.checkpoint = checkpoint
    log = tmp_path / "worker.log"
    proc = start_worker_process(worker, log)
    try:
        records = asyncio.run(read_topic(base, base.flags_topic, timeout_s=120, until=lambda rs: {
            (f["patient_id"], f["window_start_ns"]) for f in flags_of(rs)} >= want))
        assert {(f["patient_id"], f["window_start_ns"]) for f in flags_of(records)} == want

        # the alarm system reads flags and episodes with its own group, and commits
        async def read_as_reader() -> int:
            consumer = make_consumer(as_role("reader"), group_id=reader_group, auto_offset_reset="earliest",
                                     client_id="alarm-reader")
            await consumer.start()
            try:
                consumer.subscribe([base.flags_topic, base.episodes_topic])
                got = 0
                deadline = time.monotonic() + 60
                while got < len(want) and time.monotonic() < deadline:
                    batch = await consumer.getmany(timeout_ms=500)
                    got += sum(len(rs) for tp, rs in batch.items() if tp.topic == base.flags_topic)
                await consumer.commit()
                return got
            finally:
                await consumer.stop()

        assert asyncio.run(read_as_reader()) >= len(want)

        # ...and not the ECG input: least privilege (a subscription to it would only log and read nothing)
        from streamer.kafka.clients import require_topics

        with pytest.raises(KafkaError, match="Authorization"):
            asyncio.run(require_topics(as_role("reader"), base.input_topics))
        asyncio.run(require_topics(as_role("reader"), [base.flags_topic, base.episodes_topic]))
        # streamer watch as the view role
        watched = _cli("watch", "--from-beginning", "--seconds", "8", env=settings_env(Settings(kafka=as_role("view"))))
        assert watched.returncode == 0, watched.stderr[-2000:]
        assert "FLAG" in watched.stdout or "flag" in watched.stdout.lower(), watched.stdout[-1000:]
    finally:
        proc.terminate()
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    # watch as a principal without READ on the outputs (the gateway): one clear line, exit 1
    refused = _cli("watch", "--seconds", "30", env=gateway_env)
    assert refused.returncode == 1, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "streamer watch:" in refused.stderr and "--role view" in refused.stderr, refused.stderr[-2000:]


def uuid_tag() -> str:
    import uuid

    return uuid.uuid4().hex[:6]
