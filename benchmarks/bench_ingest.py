"""Ingest throughput in one process: decode + validate + buffer (windows emitted), per encoding.

    python -m benchmarks.bench_ingest [--beds 200] [--seconds 60] [--chunk-s 0.25]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--beds", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--chunk-s", type=float, default=0.25)
    args = ap.parse_args()
    fs = 500.0
    n = int(args.seconds * fs)
    rng = np.random.default_rng(0)
    start = 1_795_000_000_000_000_000
    times = regular_times(n, fs, start)
    for encoding in ("json", "binary", "binary-int16"):
        messages = []
        for bed in range(args.beds):
            vals = rng.normal(0, 0.5, n)
            for c in chunks_of(f"bed-{bed}", times, vals, int(args.chunk_s * fs), fs=fs):
                messages.append((c.patient_id.encode(), encode(c, encoding)))
        # interleave beds the way a partition does
        order = np.argsort([i % (n // int(args.chunk_s * fs)) for i in range(len(messages))], kind="stable")
        messages = [messages[i] for i in order]
        settings = WindowSettings()
        stage = WindowStage(settings)
        now = time.time_ns()
        t0 = time.perf_counter()
        windows = 0
        for off, (key, value) in enumerate(messages):
            chunk = decode(key, value, settings, now)
            windows += len(stage.accept(0, off, chunk, 0.0).windows)
        dt = time.perf_counter() - t0
        samples = args.beds * n
        record(f"ingest {encoding}: decode+validate+buffer, {args.beds} beds, {args.chunk_s}s chunks",
               f"{samples / dt / 1e6:.2f} M samples/s, {len(messages) / dt:,.0f} msgs/s ({windows} windows)")


if __name__ == "__main__":
    main()
