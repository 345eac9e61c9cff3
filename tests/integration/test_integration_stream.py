"""The worker end to end against the embedded broker: flags equal `streamer score`; bad input dead-letters."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import orjson
import pandas as pd
import pytest

from streamer.ingest.contract import Chunk, encode_binary
from streamer.ingest.deadletter import (ERROR_MESSAGE, SOURCE_OFFSET, SOURCE_PARTITION, SOURCE_TOPIC,
                                        headers_dict, reason_of)
from streamer.offline.recordings import Recording, load_recording, regular_times
from streamer.offline.replay import Source, replay
from streamer.offline.score import score_recording
from streamer.synthetic import generate
from streamer.runtime import Worker
from tests.kafka_utils import flags_of, isolated_settings, read_topic

pytestmark = pytest.mark.integration


async def run_worker_until(settings, scorer, produce, done, timeout_s=90.0):
    """Start a worker, run `produce()`, wait until `done()` is true, stop the worker; returns its exit code."""
    worker = Worker(settings, scorer=scorer)
    task = asyncio.create_task(worker.run())
    try:
        await produce()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not await done():
            assert asyncio.get_running_loop().time() < deadline, "timed out waiting for the worker"
            assert not task.done(), "worker exited early"
            await asyncio.sleep(0.5)
    finally:
        worker.stop()
        code = await asyncio.wait_for(task, 60)
    return code, worker


@pytest.mark.parametrize("fs,encoding,gaps", [(360, "json", False), (500, "binary", False), (360, "json", True)])
def test_replayed_recording_flags_equal_offline_score(broker, scorer, tmp_path, fs, encoding, gaps):
    """Stream and offline give the same windows the same numbers; with `gaps` (issue 33, case 3) the
    recording misses 3 samples in window 1 (both fill them and score) and 50 in window 3 (both report it
    insufficient_data, gap_too_long)."""
    s = isolated_settings(broker.bootstrap)
    ecg = generate(65.0, fs=fs, seed=11)
    values = ecg.values.astype(np.float32).astype(np.float64) if encoding == "binary" else ecg.values
    if gaps:
        values = values.copy()
        values[int(1.5 * 10 * fs):int(1.5 * 10 * fs) + 3] = np.nan
        values[int(3.5 * 10 * fs):int(3.5 * 10 * fs) + 50] = np.nan
    path = tmp_path / "rec.csv"
    pd.DataFrame({"II": values}).to_csv(path, index=False, float_format="%.17g")
    rec = load_recording(path, fs=fs, start="2026-11-22T08:00:00Z")
    everything = score_recording(rec, scorer)
    assert len(everything) == 6
    offline = everything[everything["status"] == "scored"]
    assert len(offline) == (5 if gaps else 6)

    async def main():
        async def produce():
            await replay(s.kafka, [Source("bed-1", rec)], speed=None, chunk_s=0.2, encoding=encoding)

        async def done():
            return len(await read_topic(s.kafka, s.kafka.flags_topic, until=lambda r: len(r) >= 6,
                                        timeout_s=1)) >= 6

        code, _ = await run_worker_until(s, scorer, produce, done)
        return code, flags_of(await read_topic(s.kafka, s.kafka.flags_topic, until=lambda r: len(r) >= 6))

    code, flags = asyncio.run(main())
    assert code == 0
    scored = sorted((f for f in flags if f["status"] == "scored"), key=lambda f: f["window_start_ns"])
    assert [f["window_start_ns"] for f in scored] == offline["window_start_ns"].tolist()
    dp = np.abs(np.array([f["probability"] for f in scored]) - offline["probability"].to_numpy())
    assert dp.max() <= 1e-5
    unscored = everything[everything["status"] != "scored"]
    stream_unscored = {f["window_start_ns"]: f["reason"] for f in flags if f["status"] != "scored"}
    assert {k: stream_unscored.get(k) for k in unscored["window_start_ns"]} == dict(
        zip(unscored["window_start_ns"], unscored["reason"]))
    assert [f["artifact"] for f in scored] == offline["artifact"].tolist()
    f0 = scored[0]
    assert f0["model"] == scorer.info.model_id and f0["threshold"] == scorer.threshold
    assert f0["window_end_ns"] - f0["window_start_ns"] == 10**10
    # latency is from the arrival of the completing record, not from the (hours old) window time
    assert all(f["latency_ms"] < 30_000 for f in scored) and any(f["latency_ms"] > 0 for f in scored)


# the gateway's own record timestamp: recent, as a live gateway's is (a year-old one lets the broker's
# retention check delete the records before the worker reads them)
SENT_AT_MS = (time.time_ns() // 1_000_000 - 60_000) // 1000 * 1000 + 123
BAD_INPUTS = {
    "malformed_json": b'{"patient_id": "bad", "t0_ns": ',
    "invalid_field": orjson.dumps({"patient_id": "bad", "t0_ns": "yesterday", "fs": 500, "samples": [1.0]}),
    "non_finite": encode_binary(Chunk("bad", "II", 1795000000000000000, 500.0, np.array([1.0, np.nan]))),
    "bad_rate": orjson.dumps({"patient_id": "bad", "lead": "II", "t0_ns": 1795000000000000000, "fs": -5,
                              "samples": [1.0]}),
    "bad_timestamp": orjson.dumps({"patient_id": "bad", "lead": "II", "t0_ns": 5, "fs": 500, "samples": [1.0]}),
    "oversized": orjson.dumps({"patient_id": "bad", "lead": "II", "t0_ns": 1795000000000000000, "fs": 500,
                               "samples": [0.0] * 6000}),
    "wrong_lead": orjson.dumps({"patient_id": "bad", "lead": "V1", "t0_ns": 1795000000000000000, "fs": 500,
                                "samples": [1.0]}),
    "malformed_binary": b"ECG1" + b"\x01\x01" + b"\x00" * 30,
}


def test_bad_input_goes_to_dead_letter_while_healthy_patient_continues(broker, scorer):
    s = isolated_settings(broker.bootstrap, partitions=1)  # one partition: bad and healthy interleave
    ecg = generate(32.0, fs=500, seed=5)
    rec = Recording(regular_times(len(ecg.values), 500, 1_795_000_000_000_000_000), ecg.values, 500.0)

    async def main():
        from streamer.kafka.clients import make_producer

        async def produce():
            producer = make_producer(s.kafka)
            await producer.start()
            for reason, value in BAD_INPUTS.items():
                key = b"\xff\xfe" if reason == "malformed_binary" else b"bad"
                await producer.send_and_wait(s.kafka.input_topics[0], value, key=key, timestamp_ms=SENT_AT_MS,
                                             headers=[("gateway", b"gw-7"), ("traceparent", b"00-ab-cd-01")])
            await producer.stop()
            await replay(s.kafka, [Source("healthy", rec)], speed=None, chunk_s=0.5)

        async def done():
            return len(await read_topic(s.kafka, s.kafka.flags_topic, until=lambda r: len(r) >= 3, timeout_s=1)) >= 3

        await run_worker_until(s, scorer, produce, done)
        dead = await read_topic(s.kafka, s.kafka.dead_letter_topic, until=lambda r: len(r) >= len(BAD_INPUTS))
        flags = flags_of(await read_topic(s.kafka, s.kafka.flags_topic, until=lambda r: len(r) >= 3))
        return dead, flags

    dead, flags = asyncio.run(main())
    reasons = sorted(reason_of(r.headers) for r in dead)
    assert reasons == sorted(BAD_INPUTS)
    by_reason = {reason_of(r.headers): r for r in dead}
    assert by_reason["malformed_json"].value == BAD_INPUTS["malformed_json"]  # original bytes kept
    assert headers_dict(by_reason["oversized"].headers)[SOURCE_OFFSET] == "5"
    for r in dead:  # the original headers and timestamp travel with it, then the error in KIP-1034's names
        h = headers_dict(r.headers)
        assert (h["gateway"], h["traceparent"]) == ("gw-7", "00-ab-cd-01") and r.timestamp == SENT_AT_MS
        assert (h[SOURCE_TOPIC], h[SOURCE_PARTITION]) == (s.kafka.input_topics[0], "0")
        assert h[ERROR_MESSAGE], "the error message says what was wrong"
    assert [f["status"] for f in flags if f["patient_id"] == "healthy"] == ["scored"] * 3


def test_a_record_on_another_partition_than_its_key_is_dead_lettered(broker, scorer):
    """One patient, one owner: a gateway that pins a bed's record to another partition (another
    partitioner) gets it dead-lettered as wrong_partition; the bed's records on its own partition and the
    other beds are scored."""
    from streamer.kafka.partitioning import home_partition
    from streamer.kafka.clients import make_producer

    s = isolated_settings(broker.bootstrap, partitions=2)
    t0 = 1_795_000_000_000_000_000
    rec = Recording(regular_times(5500, 500.0, t0), generate(11.0, fs=500.0, seed=5).values[:5500], 500.0)
    home = home_partition(b"bed-astray", 2)
    astray = orjson.dumps({"patient_id": "bed-astray", "lead": "II", "t0_ns": t0, "fs": 500.0,
                           "samples": [0.1] * 250})

    async def main():
        async def produce():
            producer = make_producer(s.kafka)
            await producer.start()
            await producer.send_and_wait(s.kafka.input_topics[0], astray, key=b"bed-astray", partition=1 - home)
            await producer.stop()
            await replay(s.kafka, [Source("bed-astray", rec), Source("bed-home", rec)], speed=None, chunk_s=0.5)

        async def done():
            flags = await read_topic(s.kafka, s.kafka.flags_topic, until=lambda r: len(r) >= 2, timeout_s=1)
            return len(flags) >= 2

        await run_worker_until(s, scorer, produce, done)
        dead = await read_topic(s.kafka, s.kafka.dead_letter_topic, until=lambda r: len(r) >= 1)
        flags = flags_of(await read_topic(s.kafka, s.kafka.flags_topic, until=lambda r: len(r) >= 2))
        return dead, flags

    dead, flags = asyncio.run(main())
    assert [reason_of(r.headers) for r in dead] == ["wrong_partition"]
    assert headers_dict(dead[0].headers)[SOURCE_PARTITION] == str(1 - home) and dead[0].value == astray
    assert sorted((f["patient_id"], f["status"]) for f in flags) == [("bed-astray", "scored"), ("bed-home", "scored")]
