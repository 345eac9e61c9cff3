"""End to end through a broker (Apache Kafka, exactly-once checkpoints, by default; or the embedded one):
N synthetic beds replayed in real time into one worker; flags read read_committed.

Latency per window = the flag received by a reader - the moment the window's last sample was due to be
sent (real-time schedule). It includes producer, broker, worker, inference, publish and fetch.

    python -m benchmarks.bench_e2e --beds 100 --seconds 60 [--commit-interval 0.25] [--broker embedded]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson

from benchmarks.campaigns import wait_ready
from benchmarks.common import record
from streamer.kafka.broker import EmbeddedBroker, free_port
from streamer.kafka.clients import ensure_topics, make_consumer
from streamer.offline.replay import replay, synthetic_fleet
from streamer.settings import KafkaSettings
from streamer.windows.segmentation import segment


def _broker(kind: str):
    if kind == "embedded":
        return EmbeddedBroker()
    import tempfile

    from tools.kafka_cluster import KafkaCluster

    return KafkaCluster(tempfile.mkdtemp(prefix="bench-kafka-"))


async def run(beds: int, seconds: float, max_batch: int, max_wait_ms: float, encoding: str, backend: str,
              cpu_threads: int | None = None, broker_kind: str = "apache", commit_interval_s: float = 0.25) -> dict:
    with _broker(broker_kind) as broker:
        k = KafkaSettings(bootstrap_servers=broker.bootstrap, input_partitions=8, create_topics=True,
                          group_id=f"bench-{os.getpid()}", replication_factor=1, min_insync_replicas=1)
        await ensure_topics(k)
        env = dict(os.environ, STREAMER_MODEL__ALLOW_DEMO="true",
                   STREAMER_KAFKA__BOOTSTRAP_SERVERS=broker.bootstrap, STREAMER_KAFKA__GROUP_ID=k.group_id,
                   STREAMER_KAFKA__COMMIT_INTERVAL_S=str(commit_interval_s),
                   STREAMER_BATCHING__MAX_BATCH=str(max_batch), STREAMER_BATCHING__MAX_WAIT_MS=str(max_wait_ms),
                   STREAMER_LOG_FORMAT="json", STREAMER_LOG_LEVEL="warning", STREAMER_MODEL__BACKEND=backend)
        if cpu_threads:
            env["STREAMER_MODEL__CPU_THREADS"] = str(cpu_threads)
        env["STREAMER_METRICS_PORT"] = str(metrics_port := free_port())
        log = open(Path(os.environ.get("TMPDIR", "/tmp")) / "bench_e2e_worker.log", "wb")
        worker = subprocess.Popen([sys.executable, "-m", "streamer", "run"], env=env, stdout=log,
                                  stderr=subprocess.STDOUT)  # its own process, as deployed
        await asyncio.to_thread(wait_ready, metrics_port, worker)  # model loaded, partitions assigned
        start_ns = time.time_ns()
        fleet = [src for src, _ in synthetic_fleet(beds, seconds, start_ns, seed=1)]
        expected = {(src.patient_id, w.start_ns): w.end_ns for src in fleet for w in segment(src.recording.times_ns)}
        t_first = min(int(src.recording.times_ns[0]) for src in fleet)  # replay's time zero (replay.py)
        latencies: dict = {}
        reader = make_consumer(k, group_id=None, auto_offset_reset="earliest")
        await reader.start()
        reader.subscribe([k.flags_topic])
        wall0 = time.monotonic()

        async def read():
            while len(latencies) < len(expected):
                batch = await reader.getmany(timeout_ms=100)
                now = time.monotonic()
                for recs in batch.values():
                    for r in recs:
                        f = orjson.loads(r.value)
                        key = (f["patient_id"], f["window_start_ns"])
                        if key in expected and key not in latencies:
                            # the sample at the window end completes it (REFERENCE: s + 10 s <= last); replay
                            # sends its 0.25-s chunk once the chunk's last sample is due, counted from t_first
                            due = wall0 + (expected[key] - t_first) / 1e9 + 0.25
                            latencies[key] = now - due

        reading = asyncio.create_task(read())
        await replay(k, fleet, speed=1.0, chunk_s=0.25, encoding=encoding)
        try:
            await asyncio.wait_for(reading, 60)
        except asyncio.TimeoutError:
            pass
        await reader.stop()
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
        lat = np.array(list(latencies.values()))
        return {"expected": len(expected), "flagged": len(latencies), "p50": float(np.percentile(lat, 50)),
                "p99": float(np.percentile(lat, 99)), "max": float(lat.max())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--beds", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-wait-ms", type=float, default=200.0)
    ap.add_argument("--encoding", default="binary")
    ap.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"])
    ap.add_argument("--cpu-threads", type=int, default=None, help="model.cpu_threads for the worker")
    ap.add_argument("--broker", choices=["apache", "embedded"], default="apache")
    ap.add_argument("--commit-interval", type=float, default=0.25, help="kafka.commit_interval_s (checkpoints)")
    args = ap.parse_args()
    r = asyncio.run(run(args.beds, args.seconds, args.max_batch, args.max_wait_ms, args.encoding, args.backend,
                        args.cpu_threads, args.broker, args.commit_interval))
    on = ("Apache Kafka 4.4.0, exactly-once" if args.broker == "apache" else "embedded broker, at-least-once")
    record(f"end to end ({on}, checkpoint every {args.commit_interval:g} s), {args.beds} beds real time, "
           f"{args.seconds:.0f}s, {args.encoding}, batch<={args.max_batch}, "
           f"{args.backend}" + (f", {args.cpu_threads} inference thread(s)" if args.cpu_threads else ""),
           f"flagged {r['flagged']}/{r['expected']}, latency p50 {r['p50'] * 1000:.0f} ms, "
           f"p99 {r['p99'] * 1000:.0f} ms, "
           f"max {r['max'] * 1000:.0f} ms")


if __name__ == "__main__":
    main()
