"""Helpers for integration tests against the embedded broker (real TCP, real consumer groups)."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import uuid
from pathlib import Path

import orjson

from streamer.client import decode_episode, decode_flag
from streamer.kafka.clients import ensure_topics, read_records
from streamer.settings import KafkaSettings, Settings, settings_to_env

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


def isolated_settings(bootstrap: str, kafka: dict | None = None, **overrides) -> Settings:
    """Settings with topics and group unique to one test, so tests never see each other's records.
    `kafka`: more KafkaSettings fields (TLS, SASL)."""
    tag = uuid.uuid4().hex[:8]
    replication = overrides.pop("replication", 1)
    fields = dict(bootstrap_servers=bootstrap, input_topics=[f"in-{tag}"], flags_topic=f"flags-{tag}",
                  episodes_topic=f"episodes-{tag}", dead_letter_topic=f"dlq-{tag}", group_id=f"g-{tag}",
                  state_topic=f"state-{tag}", replication_factor=replication, min_insync_replicas=1,
                  input_partitions=overrides.pop("partitions", 4), create_topics=True,
                  commit_interval_s=0.3, session_timeout_ms=6000, heartbeat_interval_ms=1000)
    if os.environ.get("STREAMER_KAFKA__TRANSACTIONS"):  # the exactly-once suite run on either mode
        fields["transactions"] = os.environ["STREAMER_KAFKA__TRANSACTIONS"]
    kafka = KafkaSettings(**{**fields, **(kafka or {})})
    s = Settings(kafka=kafka, log_format="console", **overrides)
    asyncio.run(ensure_topics(s.kafka))  # tests call this outside any event loop
    return s


@functools.cache
def schema_validator(name: str):
    """A JSON Schema validator for one of the files in schemas/ (with format checks), strict: no field the
    file does not list."""
    from jsonschema import Draft202012Validator

    schema = json.loads((SCHEMAS / name).read_text())
    Draft202012Validator.check_schema(schema)
    # The output schemas let readers meet fields added later; the worker itself must write only listed ones.
    schema["additionalProperties"] = False
    return Draft202012Validator(schema)


def check_output_messages(k: KafkaSettings, topic: str, records) -> None:
    """Every flag and episode a worker produced must match its published schema and decode with the
    downstream client: each integration test that reads them checks this on the way."""
    if topic == k.flags_topic:
        validator, decode = schema_validator("artifact-flag.v1.schema.json"), decode_flag
    elif topic == k.episodes_topic:
        validator, decode = schema_validator("artifact-episode.v2.schema.json"), decode_episode
    else:
        return
    for r in records:
        doc = orjson.loads(r.value)
        errors = sorted(validator.iter_errors(doc), key=str)
        assert not errors, f"{topic} offset {r.offset} breaks its schema: {errors[0].message}"
        decode(r.value)
        assert r.key.decode() == doc["patient_id"]


async def read_topic(k: KafkaSettings, topic: str, until=None, timeout_s: float = 60.0) -> list:
    """All records of a topic from the beginning, until `until(records)` is true or the timeout."""
    records = await read_records(k, [topic], until=until, timeout_s=timeout_s, idle_polls=1)
    check_output_messages(k, topic, records)
    return records


def flags_of(records) -> list[dict]:
    return [orjson.loads(r.value) for r in records]


def settings_env(s: Settings, **extra: str) -> dict[str, str]:
    """The environment of a `streamer run` subprocess that reproduces `s` (JSON logs; the tests ask for the
    demo model when `s` names no checkpoint)."""
    import os

    env = dict(os.environ)
    env.update(settings_to_env(s), STREAMER_LOG_FORMAT="json")
    if s.model.checkpoint is None:
        env["STREAMER_MODEL__ALLOW_DEMO"] = "true"
    env.update(extra)
    return env


async def until_true(condition, timeout_s: float, what: str, interval_s: float = 0.3):
    """In a test's event loop: await `condition()` until it is truthy, and return that; fail after
    `timeout_s`."""
    import time

    deadline = time.monotonic() + timeout_s
    while not (value := await condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(interval_s)
    return value


async def poll_until(consumers, done, what: str, timeout_s: float = 60.0) -> None:
    """Poll every consumer (heartbeats, joins, rejoins) until done() holds; fail after `timeout_s`."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        await asyncio.gather(*(c.getmany(timeout_ms=200) for c in consumers))
        if done():
            return
    raise AssertionError(f"timed out waiting for {what}")


async def joined_consumer(k: KafkaSettings, name: str, partitions: int | None = None):
    """A started consumer of the group, subscribed to the input topics; with `partitions`, polled until it
    holds that many."""
    from streamer.kafka.clients import make_consumer

    consumer = make_consumer(k, client_id=name)
    await consumer.start()
    consumer.subscribe(k.input_topics)
    if partitions is not None:
        await poll_until([consumer], lambda: len(consumer.assignment()) == partitions, f"{name} assigned")
    return consumer


async def set_topic_config(k: KafkaSettings, topic: str, **configs: str) -> None:
    """AlterConfigs on one topic (it replaces the topic's whole configuration: name every setting kept)."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from streamer.kafka.clients import make_admin

    admin = make_admin(k)
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs=configs)])
    finally:
        await admin.close()
    for name, value in configs.items():
        await topic_config_described(k, topic, name, value)


async def topic_config_described(k: KafkaSettings, topic: str, name: str, value: str, timeout_s: float = 30.0):
    """Until the brokers describe `name` of `topic` as `value`: Apache Kafka 4.4 answers a DescribeConfigs
    right after AlterConfigs with the old value for a moment."""
    from streamer.kafka.clients import topic_config

    async def described():
        return await topic_config(k, topic, name) == value

    await until_true(described, timeout_s, f"{topic} described with {name}={value}", interval_s=0.2)


def faketime_env(offset: str | None) -> dict[str, str]:
    """The environment that runs a worker with its wall clock moved by `offset` ("+2h", "-30m") under
    libfaketime (Debian's faketime package, which scripts/test installs); {} for None. Only the wall
    clock: asyncio and aiokafka time their waits with the monotonic one."""
    import os

    if not offset:
        return {}
    lib = next((p for p in ("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
                            "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
                            "/usr/lib/faketime/libfaketime.so.1") if os.path.exists(p)), None)
    if lib is None:
        raise RuntimeError("libfaketime is missing: apt-get install faketime (scripts/test does)")
    return {"LD_PRELOAD": lib, "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME_DONT_RESET": "1"}


def start_worker_process(s: Settings, log_path, **extra: str):
    import subprocess
    import sys

    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "streamer", "run"], env=settings_env(s, **extra),
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def expected_windows(sources) -> set[tuple[str, int]]:
    from streamer.windows.segmentation import segment

    return {(src.patient_id, w.start_ns) for src in sources for w in segment(src.recording.times_ns)}


def scored_ids(flags: list[dict]) -> list[tuple[str, int]]:
    return [(f["patient_id"], f["window_start_ns"]) for f in flags if f["status"] == "scored"]


def wait_until(condition, timeout_s: float, what: str, interval_s: float = 0.05, proc=None):
    """Poll `condition()` until it returns something truthy (returned); fail after `timeout_s`.

    `proc`: a worker process that must stay alive meanwhile (its early exit fails at once)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def log_events(log_path) -> list[dict]:
    """The JSON events of a worker's log (lines that are not JSON are skipped)."""
    out = []
    try:
        text = open(log_path, "rb").read().decode("utf-8", "replace")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                pass  # a line being written
    return out


def wait_for_event(log_path, event: str, timeout_s: float = 120.0, proc=None) -> dict:
    """The first log event named `event` once it is written."""
    def found():
        return next((e for e in log_events(log_path) if e.get("event") == event), None)

    return wait_until(found, timeout_s, f"log event {event!r}", proc=proc)
