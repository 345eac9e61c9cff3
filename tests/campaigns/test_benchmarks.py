"""The benchmarks of issue 36 at tiny sizes, so that they cannot rot: each runs its real code path (the
ingest loop; a worker process on Apache Kafka with a reader) and must account for every window. The
figures they print at these sizes mean nothing; benchmarks/RESULTS.md holds the real runs."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from benchmarks.bench_e2e import describe_run, model_alone, run
from benchmarks.bench_ingest import ENCODINGS, measure


def test_bench_ingest_decodes_and_windows_every_encoding():
    results = measure(beds=3, seconds=21, chunk_s=0.25, rounds=1)
    assert set(results) == set(ENCODINGS)
    for r in results.values():
        assert r["records"] == 3 * 84 and r["windows"] == 3 * 2  # 21 s: two complete windows per bed
        assert r["records_per_s"] > 0 and r["us_per_record"] > 0


def test_bench_e2e_flags_every_window_and_splits_the_latency(broker):
    r = asyncio.run(run(beds=3, seconds=22, max_batch=8, max_wait_ms=10, encoding="binary", backend="torch",
                        broker=broker))
    assert r["flagged"] == r["expected"] == 3 * 2, r
    assert set(r["split"]) == {"arrival", "worker", "delivery"}
    assert {"queued", "inference", "sent", "committed"} <= {step for step, q in r["steps"].items() if q}
    assert set(r["cores"]) == {"worker", "broker", "replay and reader", "worker event loop", "worker other threads"}
    assert r["cores"]["worker"] > 0 and r["cores"]["worker event loop"] > 0  # 3 beds: the model may idle then
    # the threads' CPU is the process's, split (clock ticks of 10 ms over a 2 s span, each figure rounded)
    assert abs(r["cores"]["worker event loop"] + r["cores"]["worker other threads"] - r["cores"]["worker"]) <= 0.02
    assert "in the event loop" in describe_run(r, 3)
    assert 0 < r["p50"] <= r["p99"] <= r["max"]


def test_the_model_alone_baseline_is_its_best_device_batch():
    cpus = sorted(os.sched_getaffinity(0))
    rate, device_batch = model_alone("onnxruntime", batch=8, cpu=cpus[-1], windows=16, device_batches=(4, 8))
    assert rate > 0 and device_batch in (4, 8)
    if len(cpus) > 1:  # with a neighbour copying memory on another core, which is stopped afterwards
        crowded, device_batch = model_alone("onnxruntime", batch=8, cpu=cpus[-1], windows=16, device_batches=(8,),
                                            neighbour_cpu=cpus[0])
        assert crowded > 0 and device_batch == 8
        assert not _running(b"np.copyto(b, a)"), "the neighbour outlived it"


def _running(needle: bytes) -> list[Path]:
    """Processes whose command line holds `needle`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if needle in cmdline.read_bytes():
                found.append(cmdline)
        except OSError:  # ended meanwhile
            continue
    return found
