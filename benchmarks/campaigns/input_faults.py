"""Campaigns of bad input: hostile records (fuzz), monitors whose clocks step or send outliers (clock)."""

from __future__ import annotations

import asyncio
import collections
import random
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import orjson

from benchmarks.campaigns.common import (campaign_settings, collect_flags, feed_in_background, rss_kb,
                                         scrape_metrics, stop_worker, tally, wait_ready, worker_process)
from streamer.ingest.producer import chunks_of
from streamer.ingest.contract import HEADER_SIZE, MAGIC, Chunk, encode_binary
from streamer.ingest.deadletter import reason_of
from streamer.kafka.clients import make_producer, read_records
from streamer.offline.recordings import Recording, parse_start
from streamer.offline.replay import Source, synthetic_fleet
from streamer.settings import KafkaSettings
from streamer.windows.segmentation import segment
from tests.kafka_utils import expected_windows, start_worker_process, wait_for_event


# -- hostile input -------------------------------------------------------------------------------------
def hostile_messages(n: int, healthy_ids: list[str], seed: int = 0) -> list[tuple[bytes | None, bytes, str]]:
    """(key, value, kind) of n malformed or hostile records, each certain to be rejected."""
    rng = random.Random(seed)
    now = time.time_ns()
    out = []

    def js(doc) -> bytes:
        return orjson.dumps(doc)

    for i in range(n):
        pid = rng.choice(healthy_ids + [f"fuzz-{i}"])
        key = pid.encode()
        base = {"patient_id": pid, "lead": "II", "t0_ns": now, "fs": 500, "samples": [0.1] * 50}
        kind = rng.choice(["broken_json", "wrong_type", "nan_inf", "huge", "bad_rate", "past", "future",
                           "non_utf8_key", "wrong_lead", "lying_header", "random_bytes", "not_object",
                           "missing_field", "key_mismatch", "empty_samples", "bad_units", "missing_key",
                           "missing_lead", "bad_gain", "units_with_counts"])
        if kind == "broken_json":
            raw = js(base)
            value = raw[: rng.randrange(1, len(raw) - 1)]
        elif kind == "wrong_type":
            field = rng.choice(["t0_ns", "fs", "samples", "patient_id"])
            value = js({**base, field: rng.choice(["x", {"a": 1}, True, None])})  # invalid for every field
        elif kind == "nan_inf":
            samples = np.full(50, rng.choice([np.nan, np.inf, -np.inf]))
            value = encode_binary(Chunk(pid, "II", now, 500.0, samples))
        elif kind == "huge":
            value = encode_binary(Chunk(pid, "II", now, 500.0, np.zeros(rng.randrange(5_001, 200_000))))
        elif kind == "bad_rate":
            value = js({**base, "fs": rng.choice([-500, 0, 1e9, 3])})
        elif kind == "past":
            value = js({**base, "t0_ns": rng.randrange(-10**18, 946_684_800 * 10**9)})
        elif kind == "future":
            value = js({**base, "t0_ns": now + rng.randrange(2 * 86400 * 10**9, 10**18)})
        elif kind == "non_utf8_key":
            key = bytes(rng.randrange(128, 256) for _ in range(8))
            value = js(base)
        elif kind == "wrong_lead":
            value = js({**base, "lead": rng.choice(["V1", "I", "aVR", "III"])})
        elif kind == "lying_header":
            frame = bytearray(encode_binary(Chunk(pid, "II", now, 500.0, np.zeros(100))))
            frame[HEADER_SIZE - 6:HEADER_SIZE - 2] = rng.randrange(101, 2**32).to_bytes(4, "little")  # n_samples
            value = bytes(frame)
        elif kind == "random_bytes":
            value = MAGIC * rng.randrange(0, 2) + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        elif kind == "not_object":
            value = js(rng.choice([[1, 2, 3], "text", 42, None]))
        elif kind == "missing_field":
            doc = dict(base)
            doc.pop(rng.choice(["t0_ns", "fs", "patient_id"]))
            value = js(doc)
        elif kind == "key_mismatch":
            key = b"someone-else"
            value = js(base)
        elif kind == "empty_samples":
            value = js({**base, "samples": []})
        elif kind == "missing_key":
            key, value = None, js(base)
        elif kind == "missing_lead":
            value = js({k: v for k, v in base.items() if k != "lead"})
        elif kind == "bad_gain":
            gain = rng.choice([1e-300, 1e-9, 1e12, 0.0])
            if rng.random() < 0.5:
                value = js({**{k: v for k, v in base.items() if k != "samples"}, "counts": [100] * 50, "gain": gain})
            else:
                frame = bytearray(encode_binary(Chunk(pid, "II", now, 500.0, np.zeros(50)), counts_gain=200.0))
                frame[40:48] = np.float64(gain).tobytes()  # the gain field of the header
                value = bytes(frame)
        elif kind == "units_with_counts":
            value = js({**{k: v for k, v in base.items() if k != "samples"}, "counts": [100] * 50, "gain": 200,
                        "units": rng.choice(["mV", "uV"])})
        else:
            value = js({**base, "units": "V"})
        out.append((key, value, kind))
    return out


def fuzz_campaign(bootstrap: str, messages: int, beds: int, checkpoint: str | None, seed: int = 0,
                  workdir: Path | None = None) -> dict:
    """Hostile records mixed into healthy traffic: crashes, dead letters with reasons, healthy windows lost."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="fuzz-"))
    s = campaign_settings(bootstrap, partitions=2, checkpoint=checkpoint)
    fleet = [src for src, _ in synthetic_fleet(beds, 41.0, parse_start("2026-11-22T15:00:00Z"), seed=seed)]
    expected = expected_windows(fleet)
    hostile = hostile_messages(messages, [src.patient_id for src in fleet], seed)
    # Accepted but not healthy: microvolts sent as millivolts (never to be scored), and a gateway whose
    # rate alternates 500.0 / 500.001 (float noise, to be scored as one stream).
    odd = [src for src, _ in synthetic_fleet(2, 41.0, parse_start("2026-11-22T15:00:00Z"), seed=seed + 1)]
    uv_as_mv = Source("fuzz-uv-as-mv", Recording(odd[0].recording.times_ns, odd[0].recording.values * 1000, 500.0))
    noisy = odd[1].recording
    noisy_chunks = [Chunk("fuzz-noisy-rate", "II", int(noisy.times_ns[i]), 500.0 if (i // 250) % 2 == 0 else 500.001,
                          noisy.values[i:i + 250], None, int(noisy.times_ns[0])) for i in range(0, len(noisy.values), 250)]
    implausible_ids = expected_windows([uv_as_mv])
    noisy_ids = expected_windows([Source("fuzz-noisy-rate", noisy)])
    proc = worker_process(s, workdir / "worker.log")
    wait_for_event(workdir / "worker.log", "partition_assigned", proc=proc)

    async def send_hostile():
        producer = make_producer(s.kafka, max_request_size=4 << 20)
        await producer.start()
        futs = [await producer.send(s.kafka.input_topics[0], v, key=k) for k, v, _ in hostile]
        futs += [await producer.send(s.kafka.input_topics[0], encode_binary(c), key=c.patient_id.encode())
                 for c in noisy_chunks]
        await asyncio.gather(*futs)
        await producer.stop()

    feeder = feed_in_background(s.kafka, [*fleet, uv_as_mv], speed=None)
    asyncio.run(send_hostile())
    feeder.join(300)
    try:
        flags = asyncio.run(collect_flags(s.kafka, expected | noisy_ids, timeout_s=300,
                                          reported=frozenset(implausible_ids)))
        dead = asyncio.run(_read_dead_letters(s.kafka, len(hostile), timeout_s=120))
        alive = proc.poll() is None
    finally:
        code = stop_worker(proc)
    reasons = collections.Counter(reason_of(h) or "?" for h in dead)
    by_window = collections.defaultdict(set)
    for f in flags:
        by_window[(f["patient_id"], f["window_start_ns"])].add(f["status"] if f["status"] == "scored" else f["reason"])
    return {"hostile": len(hostile), "dead_lettered": len(dead), "reasons": dict(reasons),
            "crashes": int(not alive or code != 0), **tally(expected, flags),
            "uv_as_mv_windows": len(implausible_ids),
            "uv_as_mv_reported_implausible": sum(by_window[w] == {"implausible_amplitude"} for w in implausible_ids),
            "uv_as_mv_scored": sum("scored" in by_window[w] for w in implausible_ids),
            "noisy_rate_windows": len(noisy_ids), "noisy_rate_scored": sum("scored" in by_window[w] for w in noisy_ids)}


async def _read_dead_letters(k: KafkaSettings, n: int, timeout_s: float) -> list:
    records = await read_records(k, [k.dead_letter_topic], until=lambda rs: len(rs) >= n, timeout_s=timeout_s)
    return [r.headers for r in records]


# -- clock events ------------------------------------------------------------------------------------------
def clock_campaign(bootstrap: str, beds: int, kills: int, checkpoint: str | None, seed: int = 0,
                   workdir: Path | None = None, stale_after_s: float = 10.0) -> dict:
    """Beds whose clocks step (+2 h, -1 h) mid-stream or that send a lone outlier chunk dated +30 min,
    beside healthy beds, while the worker is SIGKILLed `kills` times. Lost = a window of the old timeline
    not reported, a new-timeline window (after the confirming records) not reported, or a healthy window
    not scored. Also: episodes still open once stale_after_s has passed with no data."""
    from streamer.kafka.clients import read_records
    from streamer.offline.recordings import regular_times
    from streamer.synthetic import generate

    workdir = workdir or Path(tempfile.mkdtemp(prefix="clock-"))
    s = campaign_settings(bootstrap, checkpoint=checkpoint)
    s.episodes.stale_after_s = stale_after_s
    rng = random.Random(seed)
    t0 = parse_start("2026-11-22T03:00:00Z")
    fs, seconds, step_at = 500.0, 61.0, 25.0
    sources, expected_old, expected_new, healthy, outliers, unshifted = [], set(), {}, set(), [], []
    n, n1 = int(seconds * fs), int(step_at * fs)
    for bed in range(beds):
        pid = f"clk-{bed:03d}"
        kind = ("step_forward", "step_back", "outlier", "healthy", "healthy")[bed % 5]
        values = generate(seconds, fs=fs, seed=seed * 1000 + bed).values
        start = t0 + int(rng.uniform(0, 10) * 1e9)
        times = regular_times(n, fs, start)
        unshifted.append(times)
        if kind.startswith("step"):
            shift = (7200 if kind == "step_forward" else -3600) * 10**9
            times = np.concatenate([times[:n1], times[n1:] + shift])
            old = [w for w in segment(times[:n1])]
            expected_old |= {(pid, w.start_ns) for w in old}
            # the new timeline starts at its 4th chunk (0.5 s chunks): windows wholly after that
            confirm = int(times[n1 + 3 * int(0.5 * fs)])
            expected_new[pid] = sum(1 for w in segment(times[n1:]) if w.start_ns >= confirm) - 1
        else:
            ids = {(pid, w.start_ns) for w in segment(times)}
            healthy |= ids if kind == "healthy" else set()
            expected_old |= ids if kind == "outlier" else set()
            if kind == "outlier":
                outliers.append(Chunk(pid, "II", int(times[n // 2]) + 1800 * 10**9, fs, values[:250], None, start))
        sources.append(Source(pid, Recording(times, values, fs)))
    log = workdir / "worker.log"
    proc = worker_process(s, log)
    wait_for_event(log, "partition_assigned", proc=proc)

    # monitors send in their own order whatever their clocks say: arrival time = the unshifted time
    arrivals = sorted((int(arrival[i]), k, c) for k, (src, arrival) in enumerate(zip(sources, unshifted))
                      for i, c in zip(range(0, n, 250), chunks_of(src.patient_id, src.recording.times_ns,
                                                                  src.recording.values, 250, fs=fs)))
    outliers_at = arrivals[len(arrivals) // 2][0]
    arrivals += [(outliers_at, -1, c) for c in outliers]
    arrivals.sort(key=lambda a: (a[0], a[1]))

    async def feed(speed: float = 8.0):
        from streamer.ingest.producer import ChunkProducer

        producer = make_producer(s.kafka)
        await producer.start()
        out = ChunkProducer(producer, s.kafka.input_topics[0], "binary")
        wall0, first = time.monotonic(), arrivals[0][0]
        pending = []
        for due, _, c in arrivals:
            wait = wall0 + (due - first) / 1e9 / speed - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            pending.append(await out.send(c))
        await asyncio.gather(*pending)
        await producer.stop()

    feeder = threading.Thread(target=lambda: asyncio.run(feed()), daemon=True)
    feeder.start()
    try:
        for _ in range(kills):
            time.sleep(rng.uniform(0.5, 2.0))
            proc.kill()
            proc.wait(10)
            proc = worker_process(s, log)
        feeder.join(300)

        def done(records) -> bool:
            got = {(f["patient_id"], f["window_start_ns"]) for f in map(lambda r: orjson.loads(r.value), records)}
            return expected_old <= got and healthy <= got

        records = asyncio.run(read_records(s.kafka, [s.kafka.flags_topic], until=done, timeout_s=240))
        flags = [orjson.loads(r.value) for r in records]
        time.sleep(stale_after_s + 3)  # scenario: no more data; open episodes must close by themselves
        episodes = [orjson.loads(r.value) for r in asyncio.run(read_records(
            s.kafka, [s.kafka.episodes_topic], timeout_s=30, idle_polls=3))]
    finally:
        code = stop_worker(proc)
    reported = {(f["patient_id"], f["window_start_ns"]) for f in flags}
    scored = {(f["patient_id"], f["window_start_ns"]) for f in flags if f["status"] == "scored"}
    new_lost = 0
    for pid, want in expected_new.items():
        src = next(x for x in sources if x.patient_id == pid)
        step_ns = int(src.recording.times_ns[n1])
        got = {f["window_start_ns"] for f in flags if f["patient_id"] == pid and
               (f["window_start_ns"] >= step_ns if step_ns > src.recording.times_ns[0]
                else f["window_start_ns"] < src.recording.times_ns[0] and f["window_start_ns"] >= step_ns)}
        new_lost += max(want - len(got), 0)
    last: dict = {}
    for e in episodes:  # a patient's state is its highest seq, as consumers read it
        if e["patient_id"] not in last or e["seq"] > last[e["patient_id"]][0]:
            last[e["patient_id"]] = (e["seq"], e["state"])
    last = {pid: state for pid, (_, state) in last.items()}
    return {"beds": beds, "kills": kills, "old_timeline_windows": len(expected_old),
            "old_lost": len(expected_old - reported), "new_timeline_windows": sum(expected_new.values()),
            "new_lost": new_lost, "healthy_windows": len(healthy), "healthy_lost": len(healthy - scored),
            "lost": len(expected_old - reported) + new_lost + len(healthy - scored),
            "episodes_left_open": sum(v == "open" for v in last.values()), "exit_code": code}


# -- patient-id flood -----------------------------------------------------------------------------------
def flood_campaign(bootstrap: str, ids: int, beds: int, seconds: float, checkpoint: str | None, seed: int = 0,
                   workdir: Path | None = None, flood_at_s: float = 20.0, max_patients: int | None = None) -> dict:
    """Issue 45: `ids` distinct patient ids, one small record each, sent as fast as one producer can, beside
    `beds` real beds streaming in real time. The real beds' flags must keep arriving within the suppression
    lease (35 s), the worker's memory must stay bounded, and the flood must leave neither flags nor states:
    ids beyond windows.max_patients are dead letters (too_many_patients), the rest go when their provisional
    streams go idle (no_timeline). Lateness of a flag: when it was read (read_committed) minus when the
    sample that completed its window was sent."""
    from streamer.kafka.broker import free_port

    workdir = workdir or Path(tempfile.mkdtemp(prefix="flood-"))
    s = campaign_settings(bootstrap, partitions=4, checkpoint=checkpoint)
    if max_patients is not None:
        s.windows.max_patients = max_patients
    port = free_port()
    start_ns = time.time_ns() - int(60e9)  # recent event times: the broker's retention keeps them
    fleet = [src for src, _ in synthetic_fleet(beds, seconds, start_ns, seed=seed, stagger_s=1.0)]
    expected = expected_windows(fleet)
    t_first = min(int(src.recording.times_ns[0]) for src in fleet)
    log = workdir / "worker.log"
    proc = start_worker_process(s, log, STREAMER_METRICS_PORT=str(port))
    wait_ready(port, proc)
    wait_for_event(log, "partition_assigned", proc=proc)
    received: dict[tuple[str, int], float] = {}
    stop_reading = threading.Event()

    def read_flags() -> None:  # read_committed, as an alarm system reads them, stamped when read
        async def run():
            from streamer.kafka.clients import make_consumer

            consumer = make_consumer(s.kafka, group_id=None, client_id="flood-reader", auto_offset_reset="earliest")
            await consumer.start()
            consumer.subscribe([s.kafka.flags_topic])
            try:
                while not stop_reading.is_set():
                    batch = await consumer.getmany(timeout_ms=200)
                    now = time.time()
                    for records in batch.values():
                        for r in records:
                            f = orjson.loads(r.value)
                            received.setdefault((f["patient_id"], f["window_start_ns"]), now)
            finally:
                await consumer.stop()
        asyncio.run(run())

    reader = threading.Thread(target=read_flags, daemon=True)
    reader.start()
    rss: list[tuple[float, int]] = []
    wall0 = time.time()
    feeder = feed_in_background(s.kafka, fleet, speed=1.0)

    async def flood() -> float:
        producer = make_producer(s.kafka, linger_ms=20)
        await producer.start()
        t0 = time.monotonic()
        now = time.time_ns()
        futs = []
        for n in range(ids):
            pid = f"flood-{seed}-{n}"
            value = orjson.dumps({"patient_id": pid, "lead": "II", "t0_ns": now, "fs": 500, "samples": [0.1] * 50})
            futs.append(await producer.send(s.kafka.input_topics[0], value, key=pid.encode()))
            if len(futs) >= 5000:
                await asyncio.gather(*futs)
                futs = []
        await asyncio.gather(*futs)
        await producer.stop()
        return time.monotonic() - t0

    try:
        while time.time() - wall0 < flood_at_s:
            rss.append((time.time() - wall0, rss_kb(proc.pid)))
            time.sleep(1.0)
        before = scrape_metrics(port)
        rss_before = rss_kb(proc.pid)
        flood_s = asyncio.run(flood())
        while feeder.is_alive() or not expected <= set(received):
            rss.append((time.time() - wall0, rss_kb(proc.pid)))
            if time.time() - wall0 > seconds + 240 or proc.poll() is not None:
                break
            time.sleep(1.0)
        after = scrape_metrics(port)
        alive = proc.poll() is None
    finally:
        stop_reading.set()
        reader.join(30)
        code = stop_worker(proc)
    lateness = sorted(received[w] - (wall0 + (w[1] + 10**10 - t_first) / 1e9) for w in expected if w in received)
    flood_flags = sum(1 for pid, _ in received if pid.startswith("flood-"))

    def q(p):
        return round(lateness[min(len(lateness) - 1, int(p * len(lateness)))], 2) if lateness else float("nan")

    dead = {k[1][1]: after[k] - before.get(k, 0.0) for k in after if k[0] == "streamer_dead_letters_total"}
    return {"ids": ids, "beds": beds, "flood_send_s": round(flood_s, 1), "expected": len(expected),
            "flagged": len(expected & set(received)), "lost": len(expected - set(received)),
            "lateness_p50_s": q(0.5), "lateness_p99_s": q(0.99), "lateness_max_s": round(lateness[-1], 2) if lateness else None,
            "flood_flags": flood_flags, "dead_letters": {k: int(v) for k, v in dead.items() if v},
            "states_after": int(after.get(("streamer_state_patients",), -1)),
            "patients_after": int(after.get(("streamer_patients",), -1)),
            "rss_before_mb": round(rss_before / 1024), "rss_peak_mb": round(max(v for _, v in rss) / 1024),
            "crashes": int(not alive or code != 0), "exit_code": code}
