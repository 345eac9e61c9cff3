"""Campaigns of load: inference slower than arrivals (slow), beds in real time for a long run (soak)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from benchmarks.campaigns.common import (campaign_settings, collect_flags, cpu_s, feed_in_background, interval_quantile,
                                         metric_delta, pin_threads, rss_kb, scrape_metrics, stop_worker, tally,
                                         wait_ready)
from streamer.kafka.broker import EmbeddedBroker
from streamer.offline.recordings import parse_start
from streamer.offline.replay import replay, synthetic_fleet
from tests.kafka_utils import expected_windows, settings_env


# -- slow inference -------------------------------------------------------------------------------------
def slow_campaign(bootstrap: str, beds: int, seconds: float, delay_s: float, slow_for_s: float,
                  checkpoint: str | None) -> dict:
    """Inference slowed below the arrival rate (a SlowScorer injected) for slow_for_s, then recovered: backpressure,
    bounded memory, catch-up time, lost windows."""
    from streamer.model.infer import ArtifactScorer
    from streamer.runtime import Worker
    from tests.slow_scorer import SlowScorer

    s = campaign_settings(bootstrap, partitions=4, checkpoint=checkpoint)
    s.batching.max_pending_windows = 64
    s.batching.max_batch = 4  # with +delay_s per batch, capacity 4/delay_s windows/s: below beds/10 arriving
    s.model.device_batch = 4
    fleet = [src for src, _ in synthetic_fleet(beds, seconds, parse_start("2026-11-22T17:00:00Z"), seed=7)]
    expected = expected_windows(fleet)

    async def main() -> dict:
        slow = SlowScorer(ArtifactScorer(s.model).warm_up(), delay_s)
        worker = Worker(s, scorer=slow)
        task = asyncio.create_task(worker.run())
        while not worker.core.partitions:
            await asyncio.sleep(0.2)
        feed = asyncio.create_task(replay(s.kafka, fleet, speed=1.0, chunk_s=0.5))
        t0 = time.monotonic()
        peak_pending = peak_bytes = paused_s = 0.0
        while time.monotonic() - t0 < slow_for_s:
            peak_pending = max(peak_pending, worker.core.ledger.in_flight())
            peak_bytes = max(peak_bytes, worker.core.stage.nbytes)
            paused_s += 0.1 if worker.paused else 0.0
            await asyncio.sleep(0.1)
        slow.delay_s = 0.0
        recovered = time.monotonic()
        while (worker.paused or worker.core.ledger.in_flight() > 8) and time.monotonic() - recovered < 300:
            await asyncio.sleep(0.1)
        catch_up = time.monotonic() - recovered
        await feed
        flags = await collect_flags(s.kafka, expected, timeout_s=seconds + 120)
        worker.stop()
        code = await task
        return {"peak_pending": int(peak_pending), "peak_buffer_mb": round(peak_bytes / 2**20, 1),
                "paused_s": round(paused_s, 1), "catch_up_s": round(catch_up, 1), "exit_code": code,
                **tally(expected, flags)}

    return asyncio.run(main())


def soak_campaign(broker: EmbeddedBroker, beds: int, seconds: float, checkpoint: str | None,
                  warmup_s: float = 60.0, interval_s: float = 30.0, pin: bool = False,
                  fetch: tuple[int, int] | None = None, workdir: Path | None = None) -> dict:
    """Beds in real time for `seconds`, sampled every `interval_s`: RSS and CPU of worker and broker,
    latency quantiles of that interval only, inference time per window, pending windows, lag.

    pin: the worker gets the last CPU to itself (one inference thread), the broker and the replayer the
    others, so the test broker's own slowdown (Tansu's memory engine costs more per request as its log
    grows) cannot pass itself off as the worker's: as with a dedicated worker host in production.
    """
    from streamer.kafka.broker import free_port

    workdir = workdir or Path(tempfile.mkdtemp(prefix="soak-"))
    s = campaign_settings(broker.bootstrap, partitions=8, checkpoint=checkpoint)
    if fetch:
        s.kafka.fetch_min_bytes, s.kafka.fetch_max_wait_ms = fetch
    port = free_port()
    env = settings_env(s, STREAMER_METRICS_PORT=str(port))
    worker_cpus = None
    if pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise SystemExit("--pin needs at least 2 CPUs")
        worker_cpus, others = {cpus[-1]}, set(cpus[:-1])
        pin_threads(broker.process.pid, others)
        pin_threads(os.getpid(), others)
        env["STREAMER_MODEL__CPU_THREADS"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "streamer", "run"], env=env,
                            stdout=open(workdir / "worker.log", "ab"), stderr=subprocess.STDOUT,
                            preexec_fn=(lambda: os.sched_setaffinity(0, worker_cpus)) if pin else None)
    wait_ready(port, proc)
    fleet = [src for src, _ in synthetic_fleet(beds, seconds, time.time_ns(), seed=6)]
    pids = {"worker": proc.pid, "broker": broker.process.pid, "replayer": os.getpid()}
    t0 = time.monotonic()
    feeder = feed_in_background(s.kafka, fleet, speed=1.0)
    rows = []
    prev_t, prev_cpu, prev_m = t0, {n: cpu_s(p) for n, p in pids.items()}, scrape_metrics(port)
    try:
        while feeder.is_alive():
            feeder.join(interval_s)
            t, cpu, m = time.monotonic(), {n: cpu_s(p) for n, p in pids.items()}, scrape_metrics(port)
            windows = metric_delta(prev_m, m, "streamer_windows_total")
            batches = metric_delta(prev_m, m, "streamer_inference_seconds_count")
            row = {"t_s": round(t - t0), "windows": int(windows),
                   "p50_s": interval_quantile(prev_m, m, "streamer_flag_latency_seconds", 0.5),
                   "p99_s": interval_quantile(prev_m, m, "streamer_flag_latency_seconds", 0.99),
                   "infer_ms_per_window": round(1000 * metric_delta(prev_m, m, "streamer_inference_seconds_sum")
                                                / max(metric_delta(prev_m, m, "streamer_batch_size_windows_sum"), 1), 1),
                   "batch_mean": round(metric_delta(prev_m, m, "streamer_batch_size_windows_sum") / max(batches, 1), 1),
                   "pending": int(m[("streamer_pending_windows",)]),
                   "lag": int(sum(v for k, v in m.items() if k[0] == "streamer_consumer_lag_records")),
                   "patients": int(m[("streamer_buffered_patients",)]),
                   "worker_rss_mb": round(rss_kb(proc.pid) / 1024), "broker_rss_mb": round(rss_kb(pids["broker"]) / 1024),
                   **{f"{n}_cores": round((cpu[n] - prev_cpu[n]) / (t - prev_t), 2) for n in pids}}
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
            prev_t, prev_cpu, prev_m = t, cpu, m
    finally:
        code = stop_worker(proc)
    (workdir / "soak.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    after = [r for r in rows if r["t_s"] >= warmup_s]
    first, last = after[0], after[-1]
    p99s = [r["p99_s"] for r in after]
    return {"beds": beds, "seconds": seconds, "exit_code": code, "timeline": str(workdir / "soak.jsonl"), "pinned": pin,
            "rss_mb_after_warmup": first["worker_rss_mb"], "rss_mb_end": last["worker_rss_mb"],
            "rss_growth_pct": round(100 * (last["worker_rss_mb"] - first["worker_rss_mb"]) / first["worker_rss_mb"], 2),
            "broker_rss_mb": (first["broker_rss_mb"], last["broker_rss_mb"]),
            "patients_buffered": (first["patients"], max(r["patients"] for r in after)),
            "interval_p99_s": (min(p99s), max(p99s)), "max_pending": max(r["pending"] for r in after),
            "cores_used": {n: round(sum(r[f"{n}_cores"] for r in after) / len(after), 2) for n in pids}}
