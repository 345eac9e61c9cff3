"""Publish recordings (or a synthetic fleet of beds) to the input topic, paced like live monitors."""

from __future__ import annotations

import asyncio
import heapq
import time
from dataclasses import dataclass

import numpy as np

from streamer.ingest.producer import Encoding, OrderedSender, chunks_of
from streamer.kafka.clients import check_connection, start_ordered_producer
from streamer.logs import get_logger
from streamer.offline.recordings import Recording, regular_times
from streamer.settings import KafkaSettings
from streamer.synthetic import generate

log = get_logger("streamer.replay")


@dataclass
class Source:
    patient_id: str
    recording: Recording


def synthetic_fleet(beds: int, duration_s: float, start_ns: int, seed: int = 0,
                    rates: tuple[float, ...] = (500.0,), artifact_fraction: float = 0.3,
                    stagger_s: float = 10.0) -> list[tuple[Source, object]]:
    """N beds of synthetic lead-II (rates cycle through `rates`); returns (source, SyntheticECG) pairs.

    Monitors are not phase-aligned: each bed starts at a seeded random offset within `stagger_s`, so
    windows complete spread over time as on a real ward, not in one burst.
    """
    out = []
    offsets = np.random.default_rng(seed).uniform(0, stagger_s, beds)
    for bed in range(beds):
        fs = rates[bed % len(rates)]
        ecg = generate(duration_s, fs=fs, seed=seed * 100_003 + bed, artifact_fraction=artifact_fraction)
        rec = Recording(regular_times(len(ecg.values), fs, start_ns + int(offsets[bed] * 1e9)), ecg.values, fs)
        out.append((Source(f"bed-{bed:04d}", rec), ecg))
    return out


async def replay(kafka: KafkaSettings, sources: list[Source], speed: float | None = 1.0, chunk_s: float = 0.25,
                 encoding: Encoding = "json", progress: bool = False, topic: str | None = None) -> int:
    """Send every source's chunks in timestamp order; speed None = as fast as possible. Returns chunks sent."""
    await check_connection(kafka)
    # each bed's chunks land in their order through broker stalls: a resend never behind a newer chunk
    out = await OrderedSender(lambda: start_ordered_producer(kafka, linger_ms=10, compression_type=None),
                              topic or kafka.input_topics[0], encoding).start()
    sent = 0
    bar = None
    try:
        streams, total = [], 0
        for src in sources:
            rec = src.recording
            fs = rec.fs or 1e9 / float(np.median(np.diff(rec.times_ns)))
            size = max(int(round(chunk_s * fs)), 1)
            streams.append(chunks_of(src.patient_id, rec.times_ns, rec.values, size, fs=fs))
            total += -(-len(rec.values) // size)
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="chunk", desc="replay")
        t_first = min(int(s.recording.times_ns[0]) for s in sources)
        heap: list = []

        def push_next(i: int) -> None:  # ordered by when the chunk's last sample exists
            c = next(streams[i], None)
            if c is not None:
                heapq.heappush(heap, (c.t0_ns + int(len(c.samples) / c.fs * 1e9), i, c))

        for i in range(len(streams)):
            push_next(i)
        wall0 = time.monotonic()
        while heap:
            due_ns, i, chunk = heapq.heappop(heap)
            if speed is not None:
                wait = wall0 + (due_ns - t_first) / 1e9 / speed - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            await out.send(chunk)
            sent += 1
            if bar is not None:
                bar.update(1)
            push_next(i)
        await out.flush()
        if out.resent or out.dropped:
            log.info("replay_resends", chunks_resent=out.resent, chunks_dropped=out.dropped)
    finally:
        if bar is not None:
            bar.close()
        await out.stop()
    return sent
