"""End to end through a broker (Apache Kafka, exactly-once checkpoints, by default; or the embedded one):
N synthetic beds replayed in real time into one worker; flags read read_committed.

Latency per window = the flag received by a reader - the moment the window's last sample was due to be
sent (real-time schedule). It includes producer, broker, worker, inference, publish and fetch. It is split
by step two ways: per window from the flag itself (its `produced_at_ns` and `latency_ms`: arrival = due ->
the worker read the completing sample; worker = -> the flag built; delivery = -> the reader got it, which
holds the send, the commit and the reader's fetch), and inside the worker from its
streamer_flag_step_seconds histogram (queued, inference, to_publisher, sent, committed).

    python -m benchmarks.bench_e2e --beds 100 --seconds 60 [--commit-interval 0.25] [--broker embedded]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import orjson

from benchmarks.campaigns.common import cpu_s, pin_threads, thread_cpu_s, wait_ready
from benchmarks.common import record
from streamer.kafka.broker import EmbeddedBroker, free_port
from streamer.kafka.clients import ensure_topics, make_consumer
from streamer.model.backends import CPU_BATCH_CANDIDATES
from streamer.offline.replay import replay, synthetic_fleet
from streamer.settings import BatchSettings, KafkaSettings
from streamer.windows.segmentation import segment


def _broker(kind: str):
    if kind == "embedded":
        return EmbeddedBroker()
    import tempfile

    from tools.kafka_cluster import KafkaCluster

    return KafkaCluster(tempfile.mkdtemp(prefix="bench-kafka-"))


async def run(beds: int, seconds: float, max_batch: int, max_wait_ms: float, encoding: str, backend: str,
              cpu_threads: int | None = None, broker_kind: str = "apache", commit_interval_s: float = 0.25,
              profile: Path | None = None, broker=None, warmup_s: float = 0.0, pin: bool = False,
              device_batch: int | None = None) -> dict:
    """One run; `broker`: a running one to use (the suite's), else one of `broker_kind` is started.

    warmup_s: the beds stream that long before the measured `seconds`; latencies, cores and the profile
    count windows due after it only (a broker started just now spends its first seconds of transactions
    compiling them: 0.9 of a core for ~15 s on the 2-core box, which starves the model; a production
    broker is long warm). Every window of the whole run must still be flagged.
    pin: the broker, the replayer and the reader on CPU 0, the worker alone on CPU 1."""
    with contextlib.nullcontext(broker) if broker is not None else _broker(broker_kind) as broker:
        tag = uuid.uuid4().hex[:8]  # topics of this run alone: a shared broker may hold others
        k = KafkaSettings(bootstrap_servers=broker.bootstrap, input_partitions=8, create_topics=True,
                          input_topics=[f"ecg.lead2.{tag}"], flags_topic=f"flags.{tag}",
                          episodes_topic=f"episodes.{tag}", dead_letter_topic=f"deadletter.{tag}",
                          group_id=f"bench-{tag}", replication_factor=1, min_insync_replicas=1)
        await ensure_topics(k)
        env = dict(os.environ, STREAMER_MODEL__ALLOW_DEMO="true",
                   STREAMER_KAFKA__BOOTSTRAP_SERVERS=broker.bootstrap, STREAMER_KAFKA__GROUP_ID=k.group_id,
                   STREAMER_KAFKA__INPUT_TOPICS=orjson.dumps(k.input_topics).decode(),
                   STREAMER_KAFKA__FLAGS_TOPIC=k.flags_topic, STREAMER_KAFKA__EPISODES_TOPIC=k.episodes_topic,
                   STREAMER_KAFKA__DEAD_LETTER_TOPIC=k.dead_letter_topic,
                   STREAMER_KAFKA__COMMIT_INTERVAL_S=str(commit_interval_s),
                   STREAMER_BATCHING__MAX_BATCH=str(max_batch), STREAMER_BATCHING__MAX_WAIT_MS=str(max_wait_ms),
                   STREAMER_LOG_FORMAT="json", STREAMER_LOG_LEVEL="warning", STREAMER_MODEL__BACKEND=backend)
        if cpu_threads:
            env["STREAMER_MODEL__CPU_THREADS"] = str(cpu_threads)
        if device_batch:
            env["STREAMER_MODEL__DEVICE_BATCH"] = str(device_batch)
        env["STREAMER_METRICS_PORT"] = str(metrics_port := free_port())
        log = open(Path(os.environ.get("TMPDIR", "/tmp")) / "bench_e2e_worker.log", "wb")
        worker = subprocess.Popen([sys.executable, "-m", "streamer", "run"], env=env, stdout=log,
                                  stderr=subprocess.STDOUT)  # its own process, as deployed
        if pin:  # before the model loads: the threads it starts inherit the worker's CPU
            pin_threads(worker.pid, {1})
            pin_threads(_broker_pid(broker), {0})
            os.sched_setaffinity(0, {0})
        await asyncio.to_thread(wait_ready, metrics_port, worker)  # model loaded, partitions assigned
        start_ns = time.time_ns()
        fleet = [src for src, _ in synthetic_fleet(beds, warmup_s + seconds, start_ns, seed=1)]
        expected = {(src.patient_id, w.start_ns): w.end_ns for src in fleet for w in segment(src.recording.times_ns)}
        t_first = min(int(src.recording.times_ns[0]) for src in fleet)  # replay's time zero (replay.py)
        latencies: dict = {}
        # an alarm system's reader on the clients' defaults: answered as soon as a flag is visible
        reader = make_consumer(k, group_id=None, auto_offset_reset="earliest", fetch_min_bytes=1, fetch_max_wait_ms=500)
        await reader.start()
        reader.subscribe([k.flags_topic])
        wall0, wall0_wall = time.monotonic(), time.time()
        split: dict = {}  # window -> (arrival, worker, delivery) seconds

        async def read():
            while len(latencies) < len(expected):
                batch = await reader.getmany(timeout_ms=100)
                now, now_wall = time.monotonic(), time.time()
                for recs in batch.values():
                    for r in recs:
                        f = orjson.loads(r.value)
                        key = (f["patient_id"], f["window_start_ns"])
                        if key in expected and key not in latencies:
                            # the sample at the window end completes it (REFERENCE: s + 10 s <= last); replay
                            # sends its 0.25-s chunk once the chunk's last sample is due, counted from t_first
                            due = (expected[key] - t_first) / 1e9 + 0.25
                            latencies[key] = now - (wall0 + due)
                            produced = f["produced_at_ns"] / 1e9
                            completed = produced - f["latency_ms"] / 1000
                            split[key] = (completed - (wall0_wall + due), produced - completed, now_wall - produced)

        reading = asyncio.create_task(read())
        sampling = (asyncio.create_task(asyncio.to_thread(sample_worker, worker.pid, seconds, profile, warmup_s))
                    if profile is not None else None)
        pids = {"worker": worker.pid, "broker": _broker_pid(broker), "replay and reader": os.getpid()}
        using = asyncio.create_task(asyncio.to_thread(cores_used, {n: p for n, p in pids.items() if p}, seconds,
                                                      warmup_s))
        await replay(k, fleet, speed=1.0, chunk_s=0.25, encoding=encoding)
        try:
            await asyncio.wait_for(reading, 60)
        except asyncio.TimeoutError:
            pass
        await reader.stop()
        steps = await asyncio.to_thread(worker_steps, metrics_port)
        sampled_s = await sampling if sampling is not None else None
        cores = await using
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
        if pin:
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        steady = [key for key in latencies if (expected[key] - t_first) / 1e9 >= warmup_s]
        lat = np.array([latencies[key] for key in steady])
        parts = np.array([split[key] for key in steady]).reshape(-1, 3)
        flag_split = {name: (float(np.percentile(parts[:, i], 50)), float(np.percentile(parts[:, i], 99)))
                      for i, name in enumerate(("arrival", "worker", "delivery"))}
        return {"expected": len(expected), "flagged": len(latencies), "measured": len(steady),
                "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)), "max": float(lat.max()),
                "p99_all": float(np.percentile(np.array(list(latencies.values())), 99)), "split": flag_split,
                "steps": steps, "sampled_s": sampled_s, "cores": cores,
                "timeline": sorted(((expected[key] - t_first) / 1e9, latency) for key, latency in latencies.items())}


PROFILE_RATE_HZ = 200


def _broker_pid(broker) -> int | None:
    """The broker's process: Apache Kafka's first node, or the embedded broker's."""
    procs = getattr(broker, "processes", None)
    if procs:
        return next(iter(procs.values())).pid
    process = getattr(broker, "process", None)
    return process.pid if process is not None else None


def cores_used(pids: dict[str, int], seconds: float, warmup_s: float = 0.0) -> dict[str, float]:
    """Cores each process used (user + system CPU / wall time) over the steady part of the run (the span
    the profile samples): the CPU a window costs, idle waits excluded, which a sampled stack cannot tell.
    The worker's is split too, as "worker event loop" (its main thread: Kafka, ingest, windows, publishing,
    checkpoints) and "worker other threads" (the model's inference thread; nothing else runs there with
    one inference thread): exact where a sampling profiler counts a preempted thread as busy."""
    time.sleep(warmup_s + min(10.0, seconds / 4))
    worker = pids.get("worker")
    before, t0 = {n: cpu_s(p) for n, p in pids.items()}, time.monotonic()
    threads_before = thread_cpu_s(worker) if worker else {}
    time.sleep(max(seconds - 20, 1))
    wall = time.monotonic() - t0
    out = {n: round((cpu_s(p) - before[n]) / wall, 3) for n, p in pids.items()}
    if worker:
        used = {tid: cpu - threads_before.get(tid, 0.0) for tid, cpu in thread_cpu_s(worker).items()}
        out["worker event loop"] = round(used.pop(worker, 0.0) / wall, 3)
        out["worker other threads"] = round(sum(used.values()) / wall, 3)
    return out


def sample_worker(pid: int, seconds: float, out: Path, warmup_s: float = 0.0) -> float:
    """py-spy on the worker through the steady part of the run (after the warm-up and 10 s, until 10 s
    before the end), without pausing it; returns how many seconds were sampled."""
    import shutil

    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    duration = max(int(seconds) - 20, 1)
    time.sleep(warmup_s + min(10.0, seconds / 4))
    subprocess.run([spy, "record", "--pid", str(pid), "--duration", str(duration), "--rate", str(PROFILE_RATE_HZ),
                    "--format", "raw", "--nonblocking", "--output", str(out)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return float(duration)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) pairs: linear within a bucket."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = upper, count
    return lower


def worker_steps(port: int) -> dict[str, tuple[float, float] | None]:
    """{step: (p50, p99) in s} from the worker's streamer_flag_step_seconds (None: the step never ran)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    buckets: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "streamer_flag_step_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                buckets.setdefault(sample.labels["step"], []).append((float(sample.labels["le"]), sample.value))
    out = {}
    for step, bs in buckets.items():
        p50, p99 = histogram_quantile(0.5, bs), histogram_quantile(0.99, bs)
        out[step] = None if p50 is None else (p50, p99)
    return out


def describe_split(r: dict) -> str:
    """The latency split as one line: per window from the flags, then the worker's own steps."""
    ms = lambda q: f"{q[0] * 1000:.0f}/{q[1] * 1000:.0f}"  # noqa: E731
    flags = ", ".join(f"{name} {ms(q)}" for name, q in r["split"].items())
    inside = ", ".join(f"{name} {ms(q)}" for name, q in r["steps"].items() if q is not None)
    return f"split p50/p99 ms: {flags}; in the worker: {inside}"


def describe_setup(args, beds: int) -> tuple[str, str]:
    on = ("Apache Kafka 4.4.0, exactly-once" if args.broker == "apache" else "embedded broker, at-least-once")
    on += f", checkpoint every {args.commit_interval:g} s" + (", worker pinned to CPU 1, the rest to CPU 0"
                                                             if args.pin or args.capacity else "")
    setup = (f"{beds} beds real time, {args.seconds:.0f}s measured after {args.warmup:.0f}s, {args.encoding}, "
             f"batch<={args.max_batch}, {args.backend}"
             + (f", {args.cpu_threads} inference thread(s)" if args.cpu_threads else "")
             + (f", device batch {args.device_batch}" if args.device_batch else "")
             + (f", {args.event_loop} event loop" if args.event_loop else "")
             + (f", transactions {args.transactions}" if args.transactions else ""))
    return on, setup


def describe_run(r: dict, beds: int) -> str:
    return (f"flagged {r['flagged']}/{r['expected']}, latency p50 {r['p50'] * 1000:.0f} ms, p99 "
            f"{r['p99'] * 1000:.0f} ms, max {r['max'] * 1000:.0f} ms (with the warm-up's windows: p99 "
            f"{r['p99_all'] * 1000:.0f} ms); {describe_split(r)}; cores used {r['cores']}, worker "
            f"{r['cores']['worker'] * 10_000 / beds:.1f} ms CPU per window{describe_threads(r['cores'], beds)}")


def describe_threads(cores: dict, beds: int) -> str:
    """The worker's CPU per window by thread: what the model's thread leaves to everything else."""
    if "worker event loop" not in cores:
        return ""
    per_window = lambda c: c * 10_000 / beds  # noqa: E731 (a bed completes a window every 10 s)
    loop, other = per_window(cores["worker event loop"]), per_window(cores["worker other threads"])
    share = other / (loop + other) if loop + other else 0.0
    return f" ({loop:.1f} in the event loop, {other:.1f} in the inference thread: {share:.0%} of it)"


# a neighbour that keeps another core copying 200 MB arrays: the memory traffic the broker, replayer and
# reader make beside the worker, without their CPU on the worker's core
MEMORY_NEIGHBOUR = ("import numpy as np\na = np.random.rand(25_000_000)\nb = np.empty_like(a)\n"
                    "while True:\n    np.copyto(b, a)\n")


def model_alone(backend: str, batch: int, cpu: int = 1, windows: int = 256,
                device_batches: tuple[int, ...] = CPU_BATCH_CANDIDATES,
                neighbour_cpu: int | None = None) -> tuple[float, int]:
    """(windows/s, device batch): the most the model (preprocessing included) scores alone on one core, one
    thread, batches of `batch`, over the network batch sizes backend auto chooses from: what the worker's
    core could do with no Kafka, windows or publishing around it. The other cores idle, or with
    `neighbour_cpu`, that one copying memory (MEMORY_NEIGHBOUR): cache and memory bandwidth are shared."""
    from streamer.model.infer import ArtifactScorer
    from streamer.settings import ModelSettings
    from streamer.synthetic import generate

    everything = os.sched_getaffinity(0)
    neighbour = None
    try:
        if neighbour_cpu is not None:
            neighbour = subprocess.Popen([sys.executable, "-c", MEMORY_NEIGHBOUR])
            os.sched_setaffinity(neighbour.pid, {neighbour_cpu})
        os.sched_setaffinity(0, {cpu})
        x = generate(10.0 * windows, fs=500, seed=0).values.reshape(windows, 5000).astype(np.float32)
        best, best_batch = 0.0, device_batches[0]
        for device_batch in device_batches:
            scorer = ArtifactScorer(ModelSettings(backend=backend, cpu_threads=1, device_batch=device_batch)).warm_up()
            for _ in range(3):
                t0 = time.perf_counter()
                for i in range(0, windows, batch):
                    scorer.probabilities(x[i:i + batch])
                rate = windows / (time.perf_counter() - t0)
                if rate > best:
                    best, best_batch = rate, device_batch
        return best, best_batch
    finally:
        os.sched_setaffinity(0, everything)
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()


def capacity(args, beds_list: list[int]) -> None:
    """Pinned runs at growing bed counts until p99 passes 1 s; a row each, then the capacity row."""
    alone, alone_batch = model_alone(args.backend, args.max_batch)
    crowded, crowded_batch = model_alone(args.backend, args.max_batch, neighbour_cpu=0)
    # the worker scores at the network batch the baseline found best, as backend auto chooses one at start
    # (a fixed 16 cost it 8.4 ms a window near saturation against 6.8-7.0 at 4: 850 -> 900 beds, 09b8717)
    args.device_batch = args.device_batch or alone_batch
    best = None
    for beds in beds_list:
        r = asyncio.run(run(beds, args.seconds, args.max_batch, args.max_wait_ms, args.encoding, args.backend,
                            args.cpu_threads, args.broker, args.commit_interval, warmup_s=args.warmup, pin=True,
                            device_batch=args.device_batch))
        on, setup = describe_setup(args, beds)
        record(f"end to end ({on}), {setup}", describe_run(r, beds))
        if r["flagged"] < r["expected"] or r["p99"] > 1.0:
            break
        best = beds
    on, setup = describe_setup(args, 0)
    rate = (best or 0) / 10
    record(f"capacity ({on}): the most beds of {beds_list} at p99 <= 1 s, every window flagged; "
           f"{setup.split(', ', 1)[1]}",
           f"{best or 0} beds = {rate:g} windows/s; the model alone on that core, one thread, batch "
           f"{args.max_batch}, best device batch ({alone_batch}): {alone:.1f} windows/s with CPU 0 idle; "
           f"{crowded:.1f} (device batch {crowded_batch}) with CPU 0 copying memory, as the broker's side loads it: "
           f"{rate / crowded:.2f} of that", baseline=f"{alone:.1f}", ratio=f"{rate / alone:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--beds", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-wait-ms", type=float, default=BatchSettings().max_wait_ms)
    ap.add_argument("--encoding", default="binary")
    ap.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"])
    ap.add_argument("--cpu-threads", type=int, default=None, help="model.cpu_threads for the worker")
    ap.add_argument("--device-batch", type=int, default=None, help="model.device_batch for the worker")
    ap.add_argument("--broker", choices=["apache", "embedded"], default="apache")
    ap.add_argument("--commit-interval", type=float, default=0.25, help="kafka.commit_interval_s (checkpoints)")
    ap.add_argument("--event-loop", choices=["asyncio", "uvloop"], default=None,
                    help="the worker's event_loop setting (default: the setting's default)")
    ap.add_argument("--transactions", choices=["per_partition", "per_worker"], default=None,
                    help="the worker's kafka.transactions (default: the setting's default)")
    ap.add_argument("--profile", action="store_true", help="sample the worker with py-spy; a row per stage")
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds streamed before the measured ones")
    ap.add_argument("--pin", action="store_true", help="broker, replayer and reader on CPU 0, the worker on CPU 1")
    ap.add_argument("--capacity", default=None, metavar="BEDS,BEDS,...",
                    help="pinned runs at these bed counts, in order, until p99 > 1 s; the most beds within it "
                         "as a ratio to the model alone on the worker's core (at the device batch the "
                         "model alone does best with, unless --device-batch)")
    args = ap.parse_args()
    if args.event_loop:
        os.environ["STREAMER_EVENT_LOOP"] = args.event_loop  # the worker's environment is this one's
    if args.transactions:
        os.environ["STREAMER_KAFKA__TRANSACTIONS"] = args.transactions
    if args.capacity:
        return capacity(args, [int(b) for b in args.capacity.split(",")])
    raw = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_e2e_worker_{args.beds}.pyspy" if args.profile else None
    r = asyncio.run(run(args.beds, args.seconds, args.max_batch, args.max_wait_ms, args.encoding, args.backend,
                        args.cpu_threads, args.broker, args.commit_interval, raw, warmup_s=args.warmup,
                        pin=args.pin, device_batch=args.device_batch))
    on, setup = describe_setup(args, args.beds)
    record(f"end to end ({on}), {setup}", describe_run(r, args.beds))
    if raw is not None:
        from benchmarks.profile_stages import table

        sampled = r["sampled_s"]
        windows, records = args.beds / 10 * sampled, args.beds / 0.25 * sampled  # steady: 10 s windows, 0.25 s chunks
        for stage, ms_window, us_record, share in table(raw, PROFILE_RATE_HZ, int(windows), int(records)):
            record(f"worker CPU by stage (py-spy {PROFILE_RATE_HZ} Hz, {sampled:.0f} s steady; {on}), {setup}: "
                   f"{stage}", f"{ms_window:.2f} ms per window, {us_record:.1f} us per record, {share:.1%}")


if __name__ == "__main__":
    main()
