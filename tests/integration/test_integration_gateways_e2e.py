"""Issue 47, end to end: monitors -> gateways -> Apache Kafka -> a real worker -> flags, equal to `streamer
score` on exactly the samples the monitors sent (stream == offline).

- A simulated SDC monitor (sdc11073's own provider classes, tests/sdc_provider.py) streams a synthetic ECG
  with artifact into `streamer gateway sdc`; a central station (python-hl7's MLLP client) sends hl7apy-built
  PCD-01 messages, one per bed per second of signal, into `streamer gateway hl7`: one bed as counts with a
  resolution, one as mV floats. Both gateways run as the commands, in their own processes.
- The HL7 gateway is killed (SIGKILL) mid-stream and started again on the same port; the station resends
  what was not ACKed, as central stations do. Every ACKed sample must be on the input topic, and the flags
  must still be `streamer score`'s: the restarted gateway resumes each bed's segment from the input's tail
  and a resent copy keeps its segment, so the worker's window grid never shifts.

The offline side is built from what the monitors sent, not from what reached Kafka: the SDC provider's
reports (float32, as the gateway's binary frames carry them) on the times the gateway gave them, the HL7
values as the gateway converts them (counts x resolution in float64; mV text parsed as float64).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from streamer.ingest.contract import decode
from streamer.offline.recordings import Recording, regular_times
from streamer.offline.score import score_recording
from streamer.synthetic import generate
from tests.hl7_fixtures import lead_ii_message
from tests.kafka_utils import flags_of, isolated_settings, read_topic, settings_env
from tests.integration.test_integration_stream import run_worker_until

pytestmark = pytest.mark.integration

FS = 500.0
SECONDS = 61  # six complete 10 s windows per bed, and a sample past the sixth's end to close it
PROBABILITY_TOLERANCE = 1e-5  # the other stream == offline tests' (float32 model math in both paths)


# -- the monitors -----------------------------------------------------------------------------------
def hl7_bed(patient: str, shape: str, t0_ns: int, seed: int) -> tuple[list[bytes], list[int], Recording]:
    """A central station's messages for one bed (one per second of signal), their t0s, and the recording
    of exactly the values the gateway must deliver (what `streamer score` is given)."""
    ecg = generate(float(SECONDS), fs=FS, seed=seed, artifact_fraction=0.3)
    per = int(FS)
    messages, t0s, values = [], [], []
    for i in range(SECONDS):
        t = t0_ns + i * 10**9
        raw, expected = lead_ii_message(f"{patient}-{i}", t, ecg.values[i * per:(i + 1) * per], shape=shape,
                                        patient=patient)
        messages.append(raw)
        t0s.append(t)
        values.append(expected)
    samples = np.concatenate(values)
    return messages, t0s, Recording(regular_times(len(samples), FS, t0_ns), samples, FS)


def _hl7_gateway(s, tmp_path, port: int = 0):
    """`streamer gateway hl7` as a process; returns it and the port it listens on."""
    log = open(tmp_path / "gateway-hl7.log", "a")
    proc = subprocess.Popen([sys.executable, "-m", "streamer", "gateway", "hl7", "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=log, env=settings_env(s), text=True)
    line = proc.stdout.readline()
    assert line.startswith("listening="), (line, (tmp_path / "gateway-hl7.log").read_text()[-2000:])
    return proc, int(line.strip().rsplit(":", 1)[1])


class CentralStation:
    """Sends each bed's messages in order over its own MLLP connection, one at a time, and resends a
    message until it is ACKed AA (a lost connection or a missing ACK: reconnect and send it again), as a
    central station does. `acked[(patient, t0)]` holds the ACKed messages."""

    def __init__(self, port: int):
        self.port = port
        self.acked: dict[tuple[str, int], bytes] = {}
        self.resent = 0
        self.sends = 0

    async def send_bed(self, patient: str, messages: list[bytes], t0s: list[int], deadline: float) -> None:
        from hl7.mllp import open_hl7_connection

        conn = None
        for raw, t0 in zip(messages, t0s):
            tries = 0
            while (patient, t0) not in self.acked:
                assert time.monotonic() < deadline, f"{patient}: message at {t0} never ACKed"
                tries += 1
                try:
                    if conn is None:
                        conn = await asyncio.wait_for(open_hl7_connection("127.0.0.1", self.port, encoding="utf-8"),
                                                      5)
                    reader, writer = conn
                    writer.writeblock(raw)
                    await writer.drain()
                    self.sends += 1
                    ack = await asyncio.wait_for(reader.readmessage(), 15)
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                    if conn is not None:
                        conn[1].close()
                    conn = None
                    await asyncio.sleep(0.1)  # the gateway is restarting: try again shortly
                    continue
                code = str(ack.segment("MSA")[1])
                assert code == "AA", f"{patient}: {ack}"
                self.acked[(patient, t0)] = raw
            self.resent += tries - 1
        if conn is not None:
            conn[1].close()


# -- stream == offline --------------------------------------------------------------------------------
def compare(flags: list[dict], offline: dict) -> int:
    """The flags of every offline window equal its offline row (status, reason, probability within the
    tolerance, artifact decision); no scored flag is outside the offline windows. Returns windows compared."""
    by_id: dict[tuple[str, int], dict] = {}
    for f in flags:
        key = (f["patient_id"], f["window_start_ns"])
        assert key not in by_id or by_id[key] == f, f"window {key} reported twice, differently"
        by_id[key] = f
    compared = 0
    for patient, df in offline.items():
        assert len(df) == 6 and (df["status"] == "scored").all(), df  # the signal makes six scorable windows
        for row in df.itertuples():
            f = by_id.get((patient, int(row.window_start_ns)))
            assert f is not None, f"{patient}: window {row.window_start_ns} was not flagged " \
                                  f"(stream: {sorted(k[1] for k in by_id if k[0] == patient)})"
            assert f["status"] == row.status, (patient, row.window_start_ns, f)
            assert abs(f["probability"] - row.probability) <= PROBABILITY_TOLERANCE, (f, row.probability)
            assert f["artifact"] == bool(row.artifact), (f, row.artifact)
            compared += 1
    expected = {(p, int(w)) for p, df in offline.items() for w in df["window_start_ns"]}
    extra = [k for k, f in by_id.items() if f["status"] == "scored" and k not in expected]
    assert not extra, f"scored windows offline scoring does not have: {extra}"
    return compared


def flags_cover(s, offline: dict):
    """A `done()` for run_worker_until: every bed has a flag of its last complete window on whatever grid
    the stream cut (one ending less than a window before the last offline one's end); compare() then says
    which windows differ, if any."""
    last_end = {p: int(df["window_end_ns"].max()) for p, df in offline.items()}

    async def done():
        records = await read_topic(s.kafka, s.kafka.flags_topic, timeout_s=1)
        reached: dict[str, int] = {}
        for f in flags_of(records):
            reached[f["patient_id"]] = max(reached.get(f["patient_id"], 0), f["window_end_ns"])
        return all(reached.get(p, 0) > end - 10**10 for p, end in last_end.items())
    return done


def input_chunks(s):
    records = asyncio.run(read_topic(s.kafka, s.kafka.input_topics[0], timeout_s=10))
    return [decode(r.key, r.value, s.windows) for r in records]


def test_sdc_monitor_and_hl7_station_through_the_gateways_flag_as_offline_scoring(broker, scorer, tmp_path):
    from tests.sdc_provider import EcgProvider

    started = time.monotonic()
    s = isolated_settings(broker.bootstrap, partitions=2)
    t0 = (time.time_ns() - 300 * 10**9) // 10**6 * 10**6  # recent past, on the 1 ms a DTM carries
    beds = {"MRN-H1": hl7_bed("MRN-H1", "counts", t0, seed=1), "MRN-H2": hl7_bed("MRN-H2", "mv", t0 + 3_217_000_000, 2)}
    sdc_signal = generate(float(SECONDS + 5), fs=FS, seed=3, artifact_fraction=0.3).values
    # five times real time: 50 samples every 20 ms; the device's clock starts 200 s back so its samples
    # (61 s of them in about 12 s) stay in the past
    provider = EcgProvider(sdc_signal, fs=FS, interval_s=0.02, patient="MRN-S1")
    provider._next_t_s = time.time() - 200.0
    hl7_proc, port = _hl7_gateway(s, tmp_path)
    sdc_log = open(tmp_path / "gateway-sdc.log", "ab")
    sdc_proc = None
    try:
        provider.start()
        sdc_proc = subprocess.Popen([sys.executable, "-m", "streamer", "gateway", "sdc", "--device", provider.url],
                                    env=settings_env(s), stdout=sdc_log, stderr=subprocess.STDOUT)
        station = CentralStation(port)

        async def wait_sdc_sent():
            # stop the device's waveform (its server stays up, so every report sent is delivered) once its
            # samples since the first one the gateway stored reach SECONDS
            async def covered():
                chunks = await sdc_chunks(s)
                return chunks and sum(len(r.values) for r in sent_since(provider, chunks)) >= SECONDS * FS
            deadline = time.monotonic() + 120
            t_wait = time.monotonic()
            while not await covered():
                assert time.monotonic() < deadline, "the SDC gateway stored too little"
                assert sdc_proc.poll() is None, (tmp_path / "gateway-sdc.log").read_text()[-3000:]
                await asyncio.sleep(0.3)
            print(f"SDC: {SECONDS} s of signal stored in {time.monotonic() - t_wait:.1f} s")
            provider._stop.set()  # the waveform stops; the device stays reachable
            await asyncio.to_thread(provider._thread.join, 10)
            # every report sent reaches the topic
            while len(chunks := await sdc_chunks(s)) < len(sent_since(provider, chunks)):
                assert time.monotonic() < deadline, "a report the device sent never reached the topic"
                await asyncio.sleep(0.3)

        async def main():
            offline = {p: score_recording(rec, scorer) for p, (_, _, rec) in beds.items()}

            async def produce():
                deadline = time.monotonic() + 120
                await asyncio.gather(wait_sdc_sent(),
                                     *(station.send_bed(p, m, t, deadline) for p, (m, t, _) in beds.items()))
                offline["MRN-S1"] = sdc_offline(await sdc_chunks(s), provider, scorer)

            code, _ = await run_worker_until(s, scorer, produce, flags_cover(s, offline), timeout_s=120)
            flags = flags_of(await read_topic(s.kafka, s.kafka.flags_topic, timeout_s=5))
            return code, flags, offline

        code, flags, offline = asyncio.run(main())
    finally:
        if sdc_proc is not None:
            sdc_proc.send_signal(signal.SIGTERM)
        hl7_proc.send_signal(signal.SIGTERM)
        provider.stop()
    assert code == 0
    assert hl7_proc.wait(30) == 0 and (sdc_proc is None or sdc_proc.wait(60) == 0)
    assert station.resent == 0 and len(station.acked) == 2 * SECONDS
    compared = compare(flags, offline)
    assert compared == 18
    print(f"stream == offline: {compared} windows of 3 beds (1 SDC, 2 HL7) in {time.monotonic() - started:.1f} s")


async def sdc_chunks(s) -> list:
    records = await read_topic(s.kafka, s.kafka.input_topics[0], timeout_s=2)
    return [c for c in (decode(r.key, r.value, s.windows) for r in records) if c.patient_id == "MRN-S1"]


def sent_since(provider, chunks) -> list:
    """The reports the device sent from the first one the gateway stored (the gateway subscribes after the
    device has begun)."""
    start_ns = min(c.segment_start_ns for c in chunks)
    return provider.sent_where(lambda r: r.t0_s * 1e9 >= start_ns - 1e6)


def sdc_offline(chunks, provider, scorer):
    """`streamer score` on what the SDC device sent: its reports' samples as float32 (the gateway's binary
    frames), on the sample grid of the segment the gateway started at the first stored report. The topic's
    records must be exactly those reports: the gateway added, dropped and reordered nothing."""
    chunks = sorted(chunks, key=lambda c: c.t0_ns)
    assert len({c.segment_start_ns for c in chunks}) == 1, "one contiguous stream made several segments"
    start_ns = chunks[0].segment_start_ns
    sent = sent_since(provider, chunks)
    assert len(sent) == len(chunks) and all(r.valid for r in sent)
    for c, r in zip(chunks, sent):
        assert abs(c.t0_ns - r.t0_s * 1e9) <= 1e6  # a pm:Timestamp has 1 ms steps
        np.testing.assert_array_equal(c.samples, r.values.astype(np.float32).astype(np.float64))
    values = np.concatenate([r.values for r in sent]).astype(np.float32).astype(np.float64)
    return score_recording(Recording(regular_times(len(values), FS, start_ns), values, FS), scorer)


def test_hl7_gateway_killed_mid_stream_loses_no_acked_sample_and_flags_stay_offline_equal(broker, scorer, tmp_path):
    started = time.monotonic()
    s = isolated_settings(broker.bootstrap, partitions=2)
    t0 = (time.time_ns() - 300 * 10**9) // 10**6 * 10**6
    beds = {"MRN-K1": hl7_bed("MRN-K1", "counts", t0, seed=4), "MRN-K2": hl7_bed("MRN-K2", "mv", t0 + 1_500_000_000, 5)}
    proc, port = _hl7_gateway(s, tmp_path)
    station = CentralStation(port)
    killed_after: list[int] = []
    procs = [proc]

    async def kill_and_restart():
        # mid-stream: some ACKs in, the messages in flight unanswered
        while len(station.acked) < 25:
            await asyncio.sleep(0.01)
        os.kill(procs[-1].pid, signal.SIGKILL)
        killed_after.append(len(station.acked))
        assert await asyncio.to_thread(procs[-1].wait, 10) == -signal.SIGKILL
        again, again_port = await asyncio.to_thread(_hl7_gateway, s, tmp_path, port)
        assert again_port == port
        procs.append(again)

    async def main():
        offline = {p: score_recording(rec, scorer) for p, (_, _, rec) in beds.items()}

        async def produce():
            deadline = time.monotonic() + 120
            await asyncio.gather(kill_and_restart(),
                                 *(station.send_bed(p, m, t, deadline) for p, (m, t, _) in beds.items()))

        code, _ = await run_worker_until(s, scorer, produce, flags_cover(s, offline), timeout_s=120)
        flags = flags_of(await read_topic(s.kafka, s.kafka.flags_topic, timeout_s=5))
        return code, flags, offline

    try:
        code, flags, offline = asyncio.run(main())
    finally:
        procs[-1].send_signal(signal.SIGTERM)
    assert procs[-1].wait(30) == 0 and code == 0
    assert len(station.acked) == 2 * SECONDS and station.resent >= 1, "the kill met no message in flight"

    # every sample of every ACKed message is on the input topic, exactly
    chunks = input_chunks(s)
    stored: dict[tuple[str, int], list[np.ndarray]] = {}
    for c in chunks:
        stored.setdefault((c.patient_id, c.t0_ns), []).append(c.samples)
    for patient, (_, t0s, rec) in beds.items():
        for i, t in enumerate(t0s):
            assert (patient, t) in stored, f"ACKed message {patient} {t} is not on the topic"
            for samples in stored[(patient, t)]:
                np.testing.assert_array_equal(samples, rec.values[i * int(FS):(i + 1) * int(FS)])
    duplicated = sum(len(v) - 1 for v in stored.values())
    segments = {p: sorted({c.segment_start_ns for c in chunks if c.patient_id == p}) for p in beds}

    for p, segs in segments.items():
        base = beds[p][1][0]
        print(p, "segment starts (s from t0):", [(x - base) / 1e9 for x in segs])
        print(p, "flags:", [((f["window_start_ns"] - base) / 1e9, f["status"], f.get("reason"))
                            for f in sorted(flags, key=lambda f: f["window_start_ns"]) if f["patient_id"] == p])
        print(p, "duplicates at (s):", [(k[1] - base) / 1e9 for k, v in stored.items() if k[0] == p and len(v) > 1])
    compared = compare(flags, offline)
    print(f"killed after {killed_after[0]} ACKs; {station.resent} resends, {duplicated} duplicated records, "
          f"segments per bed {[len(v) for v in segments.values()]}; stream == offline: {compared} windows in "
          f"{time.monotonic() - started:.1f} s")


def test_a_resent_message_keeps_its_beds_segment():
    """A central station resends a message whose ACK it missed (the gateway had stored it): the copy must
    stay in the bed's segment, and so must the message after it. Before issue 47's fix Segments opened a
    new one at the copy's t0 (it is not where the next sample is due), and the worker then closed the bed's
    segment there and cut later windows on a grid `streamer score` does not have (the kill test above)."""
    from streamer.gateways.hl7_in import Segments
    from streamer.gateways.pcd01 import parse_pcd01

    t0 = 1_790_000_000_000_000_000
    messages, _, _ = hl7_bed("MRN-R1", "mv", t0, seed=6)
    segments = Segments(10)

    def chunk(raw):
        (c,) = segments.chunks(parse_pcd01(raw, now_ns=t0 + 3600 * 10**9))
        return c

    first, second = chunk(messages[0]), chunk(messages[1])
    again = chunk(messages[1])  # the resend
    third = chunk(messages[2])
    assert first.segment_start_ns == second.segment_start_ns == t0
    assert again.segment_start_ns == t0, "a resent message opened a new segment"
    assert third.segment_start_ns == t0
