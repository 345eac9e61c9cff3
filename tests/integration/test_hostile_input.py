"""Hostile and implausible input (issue 14): amplitudes, gains, keys, JSON defaults, float-noise rates,
keyed patient hashes, the metrics endpoint's limits and the checkpoint read once."""

from __future__ import annotations

import asyncio
import hashlib
import socket

import numpy as np
import orjson
import pytest

from streamer.ingest.contract import Chunk, InvalidMessage, decode, encode_binary, encode_json
from streamer.ingest.producer import chunks_of
from streamer.offline.recordings import regular_times
from streamer.settings import Settings, WindowSettings, load_settings
from streamer.synthetic import generate
from streamer.windows.buffer import INSUFFICIENT, SCORABLE, PatientStream

START = 1_795_000_000_000_000_000
NOW = START + 3600 * 10**9


def _stream(chunks, settings=None):
    stream = PatientStream("p1", 0, settings or WindowSettings())
    out = []
    for i, c in enumerate(chunks):
        out.extend(stream.accept(c, i, now=float(i)).windows)
    return out


def _ecg(seconds=31.0, fs=500):
    values = generate(seconds, fs=fs, seed=3).values
    return regular_times(len(values), fs, START), values


# -- amplitude and gain -------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1000.0, 1e39 / 5])  # microvolts sent as millivolts; beyond float32
def test_implausible_amplitude_is_reported_never_scored(scale):
    times, values = _ecg()
    got = _stream(chunks_of("p1", times, values * scale, 125, fs=500, segment_start_ns=START))
    assert len(got) == 3
    assert all(w.status == INSUFFICIENT and w.reason == "implausible_amplitude" for w in got)


def test_one_implausible_spike_costs_only_its_window():
    times, values = _ecg()
    values = values.copy()
    values[7000] = 500.0  # in the second window
    got = _stream(chunks_of("p1", times, values, 125, fs=500, segment_start_ns=START))
    assert [(w.status, w.reason) for w in got] == [(SCORABLE, None), (INSUFFICIENT, "implausible_amplitude"),
                                                   (SCORABLE, None)]


def test_plausible_ecg_and_saturation_artifacts_are_scored():
    from streamer.synthetic import inject

    times, values = _ecg()
    values = values.copy()
    inject(values, 500, "saturation", 5000, 10000, np.random.default_rng(0))
    got = _stream(chunks_of("p1", times, values, 125, fs=500, segment_start_ns=START))
    assert [w.status for w in got] == [SCORABLE] * 3


@pytest.mark.parametrize("gain", [1e-300, 1e-9, 1e12, 0.0, float("inf")])
def test_implausible_gain_is_dead_lettered_json_and_binary(gain):
    s = WindowSettings()
    if np.isfinite(gain):  # JSON has no infinity
        doc = {"patient_id": "p1", "lead": "II", "t0_ns": START, "fs": 500, "counts": [100] * 50, "gain": gain}
        with pytest.raises(InvalidMessage) as e:
            decode(b"p1", orjson.dumps(doc), s, now_ns=NOW)
        assert e.value.reason == "bad_gain"
    frame = bytearray(encode_binary(Chunk("p1", "II", START, 500.0, np.zeros(50)), counts_gain=200.0))
    frame[40:48] = np.float64(gain).tobytes()  # the header's gain field
    with pytest.raises(InvalidMessage) as e:
        decode(b"p1", bytes(frame), s, now_ns=NOW)
    assert e.value.reason == "bad_gain"


def test_plausible_gain_is_accepted():
    frame = encode_binary(Chunk("p1", "II", START, 500.0, np.full(50, 0.5)), counts_gain=200.0)
    chunk = decode(b"p1", frame, WindowSettings(), now_ns=NOW)
    np.testing.assert_allclose(chunk.samples, 0.5)


# -- keys and JSON defaults -----------------------------------------------------------------------------
def test_records_without_a_key_are_dead_lettered():
    value = encode_json(Chunk("p1", "II", START, 500.0, np.zeros(50)))
    with pytest.raises(InvalidMessage) as e:
        decode(None, value, WindowSettings(), now_ns=NOW)
    assert e.value.reason == "missing_key"


def test_json_lead_is_required():
    doc = {"patient_id": "p1", "t0_ns": START, "fs": 500, "samples": [0.1] * 50}
    with pytest.raises(InvalidMessage) as e:
        decode(b"p1", orjson.dumps(doc), WindowSettings(), now_ns=NOW)
    assert e.value.reason == "invalid_field" and "lead" in e.value.detail


@pytest.mark.parametrize("units", ["mV", "uV"])
def test_units_with_counts_is_an_error(units):
    doc = {"patient_id": "p1", "lead": "II", "t0_ns": START, "fs": 500, "counts": [100] * 50, "gain": 200,
           "units": units}
    with pytest.raises(InvalidMessage) as e:
        decode(b"p1", orjson.dumps(doc), WindowSettings(), now_ns=NOW)
    assert e.value.reason == "invalid_field" and "units" in e.value.detail


def test_units_still_scale_samples():
    doc = {"patient_id": "p1", "lead": "II", "t0_ns": START, "fs": 500, "samples": [500.0] * 50, "units": "uV"}
    assert decode(b"p1", orjson.dumps(doc), WindowSettings(), now_ns=NOW).samples[0] == 0.5


# -- rates ---------------------------------------------------------------------------------------------
def test_float_noise_in_the_rate_is_one_stream():
    times, values = _ecg()
    chunks = [Chunk("p1", "II", int(times[i]), 500.0 if (i // 125) % 2 == 0 else 500.001, values[i:i + 125],
                    None, START) for i in range(0, len(values), 125)]
    got = _stream(chunks)
    assert [w.status for w in got] == [SCORABLE] * 3
    assert all(len(w.samples) == 5000 for w in got)


def test_a_real_rate_change_still_starts_a_new_segment():
    times, values = _ecg()
    chunks = [Chunk("p1", "II", int(times[i]), 500.0 if i < 7500 else 501.0, values[i:i + 125], None, START)
              for i in range(0, len(values), 125)]
    got = _stream(chunks)
    assert ("insufficient_data", "truncated") in [(w.status, w.reason) for w in got]


# -- identifiers in logs -------------------------------------------------------------------------------
def test_hashed_ids_are_keyed_and_need_a_key(tmp_path, monkeypatch):
    from streamer import logs

    assert load_settings(patient_id_in_logs="hashed").patient_log_key() is None  # then a random process key
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    s = load_settings(patient_id_in_logs="hashed", patient_id_log_key_file=str(key_file))
    try:
        logs.configure_logging("json", "info", "hashed", s.patient_log_key())
        ref = logs.patient_ref("MRN-0012345")
        assert ref != hashlib.sha256(b"MRN-0012345").hexdigest()[:16], "an unkeyed hash is reversible"
        assert "MRN" not in ref and len(ref) == 16
        assert logs.episode_ref("MRN-0012345", 17) == f"{ref}:17"
        logs.configure_logging("json", "info", "hashed", b"another-key")
        assert logs.patient_ref("MRN-0012345") != ref
        logs.configure_logging("json", "info", "omit")
        assert logs.patient_ref("MRN-0012345") is None and logs.episode_ref("MRN-0012345", 17) is None
    finally:
        logs.configure_logging("console", "info", "plain")


def test_log_key_is_never_printed(monkeypatch, capsys):
    from streamer.cli import main

    monkeypatch.setenv("STREAMER_PATIENT_ID_LOG_KEY", "top-secret-key")
    monkeypatch.setenv("STREAMER_LOG_LEVEL", "loud")
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert "log_level" in err and "top-secret-key" not in err


# -- metrics endpoint ----------------------------------------------------------------------------------
def _raw(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


def test_metrics_server_refuses_hostile_requests_and_keeps_serving():
    from streamer.metrics import HealthServer, Metrics

    async def main():
        server = HealthServer(Metrics(), lambda: (True, "ready"), "127.0.0.1", 0, max_connections=8)
        port = await server.start()
        try:
            results = {}
            results["long_line"] = await asyncio.to_thread(_raw, port, b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n")
            many = b"".join(b"X-%d: 1\r\n" % i for i in range(500))
            results["many_headers"] = await asyncio.to_thread(_raw, port, b"GET /metrics HTTP/1.1\r\n" + many + b"\r\n")
            results["garbage"] = await asyncio.to_thread(_raw, port, b"\x00\xff\r\n\r\n")
            # hold more idle connections than allowed: the extra ones are closed on accept
            held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(8)]
            await asyncio.sleep(0)  # let the server accept them
            for _ in range(100):
                if len(server.runner.server.connections) >= 8:
                    break
                await asyncio.sleep(0.02)
            extra = await asyncio.to_thread(_raw, port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            for s in held:
                s.close()
            for _ in range(100):
                if len(server.runner.server.connections) < 8:
                    break
                await asyncio.sleep(0.02)
            request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            results["after"] = await asyncio.to_thread(_raw, port, request)
            results["extra"] = extra
            return results
        finally:
            await server.stop()

    r = asyncio.run(main())
    import re

    client_error = re.compile(rb"HTTP/1\.[01] 4\d\d ")
    assert client_error.match(r["long_line"]), r["long_line"][:80]
    assert client_error.match(r["many_headers"]), r["many_headers"][:80]
    assert client_error.match(r["garbage"]) or r["garbage"] == b""
    assert r["extra"] == b"", "a connection over the limit must be closed without an answer"
    assert r["after"].startswith(b"HTTP/1.1 200") and r["after"].endswith(b"ok\n")


def test_metrics_bind_loopback_by_default():
    assert Settings().metrics_host == "127.0.0.1"


# -- checkpoint read once ------------------------------------------------------------------------------
def test_checkpoint_is_loaded_from_the_bytes_that_were_hashed(checkpoint, monkeypatch):
    import io as io_module
    from pathlib import Path

    from streamer.model.weights import load_state_dict

    opens = []
    real_open = io_module.open

    def counting_open(file, *args, **kwargs):
        if str(file) == str(Path(checkpoint)):
            opens.append(args[0] if args else kwargs.get("mode", "r"))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io_module, "open", counting_open)
    digest = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    opens.clear()
    state, got = load_state_dict(checkpoint, expected_sha256=digest)
    assert got == digest and state
    assert len(opens) == 1, f"the checkpoint was opened {len(opens)} times: a swap could slip in between"


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["hashed", "omit"])
def test_no_log_line_carries_a_clear_patient_id(broker, checkpoint, tmp_path, mode):
    """A whole worker run (windows, episodes, dead letters, start and stop) with ids kept out of the logs."""
    import signal

    from streamer.ingest.contract import encode_json as encode
    from streamer.kafka.clients import make_producer
    from streamer.offline.recordings import parse_start
    from streamer.offline.replay import Source, replay, synthetic_fleet
    from tests.kafka_utils import expected_windows, flags_of, isolated_settings, read_topic, start_worker_process
    from tests.kafka_utils import wait_for_event

    s = isolated_settings(broker.bootstrap, partitions=2, patient_id_in_logs=mode,
                          **({"patient_id_log_key": "test-key"} if mode == "hashed" else {}))
    s.model.checkpoint = checkpoint
    s.model.threshold = 0.0  # every scored window is artifact: episodes open and are logged
    s.episodes.open_after = 1
    ids = [f"MRN-{mode}-{i:07d}" for i in range(3)]
    fleet = [Source(pid, src.recording) for pid, (src, _) in
             zip(ids, synthetic_fleet(3, 21.0, parse_start("2026-11-22T06:00:00Z"), seed=6))]
    expected = expected_windows(fleet)
    log = tmp_path / "worker.log"
    proc = start_worker_process(s, log)
    try:
        wait_for_event(log, "partition_assigned", proc=proc)
        asyncio.run(replay(s.kafka, fleet, speed=None, chunk_s=0.5))

        async def send_bad():  # a dead letter (wrong lead) for each patient
            producer = make_producer(s.kafka)
            await producer.start()
            for pid in ids:
                await producer.send_and_wait(s.kafka.input_topics[0], encode(
                    Chunk(pid, "V1", int(fleet[0].recording.times_ns[0]), 500.0, np.zeros(10))), key=pid.encode())
            await producer.stop()

        asyncio.run(send_bad())
        flags = flags_of(asyncio.run(read_topic(s.kafka, s.kafka.flags_topic,
                                                until=lambda r: len(r) >= len(expected), timeout_s=120)))
        assert len(flags) >= len(expected)
        wait_for_event(log, "dead_letter", proc=proc)
        wait_for_event(log, "episode", proc=proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    text = log.read_text()
    assert '"event": "episode"' in text and '"event": "dead_letter"' in text
    for pid in ids:
        assert pid not in text, f"{pid} in clear in the log ({mode})"
    if mode == "hashed":
        assert '"patient": "' in text  # a reference is there, keyed
