"""The ward view's server side at 400 beds: memory stays bounded, every push is cheap and small.

Feeds `streamer.commands.view.Ward` directly (no broker: what is measured is the view, not Kafka) with what 400
monitors and a worker send: 0.25-s binary chunks at 500 Hz, one flag per bed per 10 s, an episode now
and then; builds and encodes one server-sent-event delta per simulated second, as the server pushes.

    python -m benchmarks.bench_view [--beds 400] [--minutes 15]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import orjson

from benchmarks.common import record
from streamer.ingest.contract import Chunk, encode_binary
from streamer.settings import WindowSettings
from streamer.commands.view import Ward

FS, CHUNK_S, T0 = 500.0, 0.25, 1_795_316_700_000_000_000


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--beds", type=int, default=400)
    ap.add_argument("--minutes", type=float, default=15.0)
    args = ap.parse_args()
    ward, settings = Ward(), WindowSettings()
    rng = np.random.default_rng(0)
    wave = (np.sin(np.linspace(0, 2 * np.pi * 1.2, int(FS * CHUNK_S))) + rng.normal(0, 0.05, int(FS * CHUNK_S)))
    seconds = int(args.minutes * 60)
    push_ms, push_bytes, rss = [], [], {}
    busy = 0.0
    for sec in range(seconds):
        t_sec = time.perf_counter()
        for q in range(int(1 / CHUNK_S)):
            t_ns = T0 + int((sec + q * CHUNK_S) * 1e9)
            for b in range(args.beds):
                pid = f"bed-{b:03d}"
                ward.on_input(pid.encode(), encode_binary(Chunk(pid, "II", t_ns, FS, wave)), settings)
        if sec % 10 == 9:
            for b in range(args.beds):
                start = T0 + (sec - 9) * 10**9
                p = float(rng.random())
                ward.on_flag(orjson.dumps({"schema": 1, "window_id": f"bed-{b:03d}:{start}", "patient_id": f"bed-{b:03d}",
                                           "window_start_ns": start, "window_end_ns": start + 10**10,
                                           "status": "scored", "reason": None, "probability": p, "artifact": p >= 0.2,
                                           "threshold": 0.2, "model": "m@sha256:0123456789abcdef",
                                           "fs": FS, "missing_samples": 0, "interpolated_samples": 0,
                                           "produced_at_ns": start + 10**10, "latency_ms": 200.0}))
                if b % 50 == 0:
                    ward.on_episode(orjson.dumps({
                        "schema": 2, "patient_id": f"bed-{b:03d}", "episode_id": f"bed-{b:03d}:{start}", "seq": sec,
                        "state": "open", "renewal": False, "reason": None, "start_ns": start, "end_ns": None,
                        "last_flagged_end_ns": start + 10**10, "peak_probability": p, "flagged_windows": 1,
                        "model": "m@sha256:0123456789abcdef", "updated_at_ns": start, "valid_until_ns": start + 30 * 10**9,
                        "lease_ns": 30 * 10**9}))
        t0 = time.perf_counter()
        delta = ward.delta()
        body = orjson.dumps(delta)
        push_ms.append((time.perf_counter() - t0) * 1000)
        push_bytes.append(len(body))
        busy += time.perf_counter() - t_sec
        if sec + 1 in (60, seconds):
            rss[sec + 1] = rss_mb()
    snapshot = len(orjson.dumps(ward.snapshot()))
    kept = sum(len(b.slots) for b in ward.beds.values()) / len(ward.beds)
    record(f"ward view server, {args.beds} beds x {args.minutes:g} min simulated (500 Hz chunks, flags, episodes), "
           "in process",
           f"RSS {rss[60]:.0f} MB at 1 min -> {rss[seconds]:.0f} MB at {args.minutes:g} min; samples kept per bed "
           f"{kept:.0f} (60 s at 125 Hz); push (delta + JSON) p50 {np.percentile(push_ms, 50):.1f} ms, max "
           f"{max(push_ms):.1f} ms, {np.mean(push_bytes) / 1024:.0f} KiB/s to each browser; snapshot "
           f"{snapshot / 1024:.0f} KiB; ingest+push {busy / seconds * 100:.0f}% of one core")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
