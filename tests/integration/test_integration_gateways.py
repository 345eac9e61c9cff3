"""Gateways on the standard clients' defaults (issue 34, item 5). librdkafka (C, Go, .NET, confluent-kafka)
partitions keyed records with crc32 by default, the Java client with murmur2. A worker expecting murmur2
refuses crc32-keyed records one by one (a patient on two partitions would have two owners), and says so
within seconds, naming kafka.input_partitioner and the value that fits; with that value every bed is flagged."""

from __future__ import annotations

import asyncio

import pytest

from streamer.ingest.producer import chunks_of, encode
from streamer.offline.recordings import parse_start
from streamer.offline.replay import synthetic_fleet
from tests.kafka_utils import (expected_windows, flags_of, isolated_settings, log_events, read_topic,
                               start_worker_process, wait_for_event)

pytestmark = pytest.mark.integration
START = "2026-11-22T15:00:00Z"


def _librdkafka_gateway(bootstrap: str, topic: str, fleet) -> int:
    """Every chunk through confluent-kafka's Producer on its defaults (partitioner consistent_random: crc32)."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap})
    errors: list = []
    sent = 0
    for src in fleet:
        rec = src.recording
        for chunk in chunks_of(src.patient_id, rec.times_ns, rec.values, 250, fs=rec.fs):
            producer.produce(topic, encode(chunk), key=src.patient_id.encode(),
                             on_delivery=lambda err, _msg: err and errors.append(err))
            producer.poll(0)
            sent += 1
    assert producer.flush(60) == 0 and not errors, errors
    return sent


def _worker_fed_by_gateways(s, checkpoint, log, fleet, until):
    """A worker process, the fleet sent through librdkafka once it has its partitions, `until(proc)`'s
    result; the worker then stops with exit 0."""
    s.model.checkpoint = checkpoint
    proc = start_worker_process(s, log)
    try:
        wait_for_event(log, "partition_assigned", proc=proc)
        _librdkafka_gateway(s.kafka.bootstrap_servers, s.kafka.input_topics[0], fleet)
        return until(proc)
    finally:
        proc.terminate()
        assert proc.wait(60) == 0, log.read_text()[-3000:]


def _fleet():
    return [src for src, _ in synthetic_fleet(8, 21.0, parse_start(START), seed=21)]


def test_a_crc32_gateway_fleet_is_named_within_seconds_and_works_once_configured(broker, checkpoint, tmp_path):
    fleet = _fleet()
    want = expected_windows(fleet)
    from streamer.kafka.partitioning import home_partition

    moved = {src.patient_id for src in fleet
             if home_partition(src.patient_id.encode(), 4, "crc32") != home_partition(src.patient_id.encode(), 4)}
    assert moved, "the test needs beds the two partitioners place apart"

    # 1. the worker on its default (murmur2): told at the first refused record, with the setting that fits
    s = isolated_settings(broker.bootstrap, partitions=4, patient_id_in_logs="plain")  # ids read from the log
    log = tmp_path / "murmur2.log"
    told = _worker_fed_by_gateways(s, checkpoint, log, fleet, lambda proc: wait_for_event(
        log, "input_partitioner_mismatch", timeout_s=60, proc=proc))
    assert told["fits"] == "crc32" and told["setting"] == "kafka.input_partitioner", told
    assert "STREAMER_KAFKA__INPUT_PARTITIONER=crc32" in told["hint"]
    assert len([e for e in log_events(log) if e.get("event") == "input_partitioner_mismatch"]) == 1
    refused = {e["patient"] for e in log_events(log) if e.get("event") == "dead_letter"
               and e.get("reason") == "wrong_partition"}
    assert refused <= moved, refused - moved  # never a bed on its right partition

    # 2. the same gateways, the worker told crc32: every window of every bed, nothing dead-lettered
    s = isolated_settings(broker.bootstrap, partitions=4, kafka={"input_partitioner": "crc32"})
    log = tmp_path / "crc32.log"
    records = _worker_fed_by_gateways(s, checkpoint, log, fleet, lambda proc: asyncio.run(read_topic(
        s.kafka, s.kafka.flags_topic, timeout_s=120,
        until=lambda rs: {(f["patient_id"], f["window_start_ns"]) for f in flags_of(rs)} >= want)))
    assert {(f["patient_id"], f["window_start_ns"]) for f in flags_of(records)} == want
    assert not [e for e in log_events(log) if e.get("event") in ("dead_letter", "input_partitioner_mismatch")]
