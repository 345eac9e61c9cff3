"""Ingest throughput in one process: decode + validate + buffer (windows emitted), per encoding.

Each encoding is timed `--rounds` times over the same records, rounds interleaved across encodings (a slow
spell of the machine then hits every encoding alike); the best round is reported, with the cost per record.

    python -m benchmarks.bench_ingest [--beds 200] [--seconds 60] [--chunk-s 0.25] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import record
from streamer.ingest.contract import decode
from streamer.ingest.producer import chunks_of, encode
from streamer.offline.recordings import regular_times
from streamer.settings import WindowSettings
from streamer.windows.stage import WindowStage

ENCODINGS = ("json", "binary", "binary-int16")


def partition_records(beds: int, seconds: float, chunk_s: float, encoding: str, fs: float = 500.0,
                      seed: int = 0) -> list[tuple[bytes, bytes]]:
    """(key, value) of every bed's chunks, interleaved the way one partition holds them."""
    n = int(seconds * fs)
    size = int(chunk_s * fs)
    rng = np.random.default_rng(seed)
    times = regular_times(n, fs, 1_795_000_000_000_000_000)
    per_bed = []
    for bed in range(beds):
        per_bed.append([(c.patient_id.encode(), encode(c, encoding))
                        for c in chunks_of(f"bed-{bed}", times, rng.normal(0, 0.5, n), size, fs=fs)])
    return [bed[i] for i in range(len(per_bed[0])) for bed in per_bed]


def ingest(records: list[tuple[bytes, bytes]]) -> tuple[float, int]:
    """Seconds to decode, validate and buffer every record in a fresh window stage; windows emitted."""
    settings = WindowSettings()
    stage = WindowStage(settings)
    now = time.time_ns()
    windows = 0
    t0 = time.perf_counter()
    for offset, (key, value) in enumerate(records):
        windows += len(stage.accept(0, offset, decode(key, value, settings, now), 0.0).windows)
    return time.perf_counter() - t0, windows


def measure(beds: int, seconds: float, chunk_s: float, rounds: int) -> dict[str, dict]:
    """{encoding: records, windows, best seconds, records/s, us per record, samples/s}."""
    records = {e: partition_records(beds, seconds, chunk_s, e) for e in ENCODINGS}
    best: dict[str, float] = {}
    windows: dict[str, int] = {}
    for _ in range(rounds):
        for e in ENCODINGS:
            dt, windows[e] = ingest(records[e])
            best[e] = min(best.get(e, dt), dt)
    samples = beds * int(seconds * 500.0)
    return {e: {"records": len(records[e]), "windows": windows[e], "seconds": best[e],
                "records_per_s": len(records[e]) / best[e], "us_per_record": best[e] / len(records[e]) * 1e6,
                "samples_per_s": samples / best[e]} for e in ENCODINGS}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--beds", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--chunk-s", type=float, default=0.25)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    for e, r in measure(args.beds, args.seconds, args.chunk_s, args.rounds).items():
        record(f"ingest {e}: decode+validate+buffer, {args.beds} beds, {args.chunk_s}s chunks, best of {args.rounds}",
               f"{r['samples_per_s'] / 1e6:.2f} M samples/s, {r['records_per_s']:,.0f} msgs/s, "
               f"{r['us_per_record']:.1f} us per record ({r['windows']} windows)")


if __name__ == "__main__":
    main()
