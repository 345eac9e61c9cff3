"""Logs never carry a raw patient id (when hashed) or a waveform sample, at any level and from any library
(issue 34, item 4): aiokafka's debug lines hold whole requests, message keys and values included."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import orjson
import pytest

from streamer.offline.recordings import parse_start
from streamer.offline.replay import synthetic_fleet
from tests.kafka_utils import (expected_windows, flags_of, isolated_settings, read_topic, settings_env,
                               start_worker_process, wait_for_event)

pytestmark = pytest.mark.integration
START = "2026-11-22T16:00:00Z"
PRIVATE = {"STREAMER_LOG_LEVEL": "debug", "STREAMER_PATIENT_ID_IN_LOGS": "hashed",
           "STREAMER_PATIENT_ID_LOG_KEY": "test-log-key-0123456789"}


def test_debug_logs_of_worker_and_replay_hold_no_patient_id_and_no_sample(broker, checkpoint, tmp_path):
    s = isolated_settings(broker.bootstrap, partitions=2)
    s.model.checkpoint = checkpoint
    fleet = [src for src, _ in synthetic_fleet(2, 21.0, parse_start(START), seed=31)]
    want = expected_windows(fleet)
    worker_log = tmp_path / "worker.log"
    proc = start_worker_process(s, worker_log, **PRIVATE)
    try:
        wait_for_event(worker_log, "partition_assigned", proc=proc)
        replayed = subprocess.run([sys.executable, "-m", "streamer", "replay", "--synthetic", "2", "--duration", "21",
                                   "--seed", "31", "--start", START, "--speed", "max", "--quiet"],
                                  env=settings_env(s, **PRIVATE), capture_output=True, text=True, timeout=120)
        assert replayed.returncode == 0, replayed.stderr[-2000:]
        # one malformed record of a known patient: its dead_letter event names the patient, hashed
        from streamer.kafka.clients import make_producer

        async def send_bad() -> None:
            producer = make_producer(s.kafka)
            await producer.start()
            try:
                await producer.send_and_wait(s.kafka.input_topics[0], b"{not json", key=b"bed-0000")
            finally:
                await producer.stop()

        asyncio.run(send_bad())
        records = asyncio.run(read_topic(s.kafka, s.kafka.flags_topic, timeout_s=120, until=lambda rs: {
            (f["patient_id"], f["window_start_ns"]) for f in flags_of(rs)} >= want))
        assert {(f["patient_id"], f["window_start_ns"]) for f in flags_of(records)} == want
        wait_for_event(worker_log, "dead_letter", timeout_s=60, proc=proc)
    finally:
        proc.terminate()
        assert proc.wait(60) == 0, worker_log.read_text()[-3000:]
    text = worker_log.read_text() + replayed.stderr + replayed.stdout
    assert '"level": "debug"' in text or '"level":"debug"' in text, "the test must run at debug level"
    for src in fleet:
        assert src.patient_id not in text, f"raw patient id {src.patient_id} in the logs"
        samples = [orjson.dumps(float(v)).decode() for v in src.recording.values[:400] if abs(v) > 0.01]
        leaked = [v for v in samples if len(v) > 8 and v in text]
        assert not leaked, f"waveform samples in the logs: {leaked[:5]}"
    assert '"samples"' not in text


def test_the_worker_process_leaves_its_startup_objects_out_of_full_collections(broker, checkpoint, tmp_path):
    """`streamer run` freezes what startup left (torch, the model, the clients: ~375k objects) out of the
    garbage collector's scans: a full collection of them held the GIL 0.1-0.2 s, a latency spike each
    time (bench_e2e, 700 beds pinned: p99 1484 -> 337 ms)."""
    s = isolated_settings(broker.bootstrap, partitions=1)
    s.model.checkpoint = checkpoint
    log = tmp_path / "worker.log"
    proc = start_worker_process(s, log)
    try:
        started = wait_for_event(log, "worker_started", proc=proc)
    finally:
        proc.terminate()
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    assert started["objects_frozen"] > 100_000, started
