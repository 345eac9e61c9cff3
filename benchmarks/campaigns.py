"""Reliability campaigns on loopback (bounded in time, stop by themselves); Apache Kafka by default
(`--broker embedded` for the demo broker; broker-crash and `--storage s3` use the embedded one).

    python -m benchmarks.campaigns crash --beds 100 --kills 10 --seconds 240 --speed 2
    python -m benchmarks.campaigns zombie --beds 50 --takeovers 3
    python -m benchmarks.campaigns failover --beds 50 --kills 5            # 3 brokers, RF 3
    python -m benchmarks.campaigns stall --stalls 5,30,120 --beds 50
    python -m benchmarks.campaigns fuzz --messages 10000 --beds 10
    python -m benchmarks.campaigns slow --beds 50 --delay 2 --slow-for 45
    python -m benchmarks.campaigns soak --beds 200 --seconds 600
    python -m benchmarks.campaigns clock --beds 50 --kills 3
    python -m benchmarks.campaigns rebalance --beds 50 --moves 4
    python -m benchmarks.campaigns crash --clock +2h ...    # any worker campaign, its clock skewed (faketime)
    python -m benchmarks.campaigns broker-crash --beds 50 --kills 5      # durable (S3) storage
    python -m benchmarks.campaigns soak --beds 100 --seconds 600 --storage s3

Each prints its figures and appends them to benchmarks/RESULTS.md. tests/test_campaigns.py runs short
versions of the same functions in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import orjson

from streamer.ingest.producer import chunks_of
from streamer.ingest.contract import HEADER_SIZE, MAGIC, Chunk, encode_binary
from streamer.ingest.deadletter import reason_of
from streamer.kafka.broker import EmbeddedBroker
from streamer.kafka.clients import ensure_topics, make_producer, read_records
from streamer.offline.recordings import Recording, parse_start
from streamer.offline.replay import Source, replay, synthetic_fleet
from streamer.settings import KafkaSettings, Settings
from streamer.windows.segmentation import segment
from tests.kafka_utils import (expected_windows, faketime_env, log_events, settings_env, start_worker_process,
                               wait_for_event, wait_until)


# -- shared ------------------------------------------------------------------------------------------
# The workers' wall clock in every campaign: None (the host's), or a libfaketime offset ("+2h", "-30m")
WORKER_CLOCK: str | None = None


def clock_skew_s(offset: str | None) -> float:
    """Seconds of a libfaketime relative offset ("+2h", "-30m", "+90s", "-1d"); 0 for None."""
    if not offset:
        return 0.0
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    unit = offset[-1] if offset[-1] in units else "s"
    return float(offset.rstrip("smhd")) * units[unit]


def _worker(s: Settings, log: Path) -> subprocess.Popen:
    """A `streamer run` process, its clock skewed by WORKER_CLOCK."""
    return start_worker_process(s, log, **faketime_env(WORKER_CLOCK))


def seq_regressions(k: KafkaSettings) -> int:
    """Episode messages (read_committed, in log order per partition) whose seq is below one already seen
    for their patient: a reader applying the highest seq would ignore them."""
    highest: dict[str, int] = {}
    regressions = 0
    records = asyncio.run(read_records(k, [k.episodes_topic], timeout_s=30))
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        e = orjson.loads(r.value)
        if e["seq"] < highest.get(e["patient_id"], -1):
            regressions += 1
        highest[e["patient_id"]] = max(e["seq"], highest.get(e["patient_id"], -1))
    return regressions


def campaign_settings(bootstrap: str, partitions: int = 4, checkpoint: str | None = None,
                      replication: int = 1, min_insync: int = 1) -> Settings:
    tag = uuid.uuid4().hex[:8]
    k = KafkaSettings(bootstrap_servers=bootstrap, input_topics=[f"in-{tag}"], flags_topic=f"flags-{tag}",
                      episodes_topic=f"episodes-{tag}", dead_letter_topic=f"dlq-{tag}", group_id=f"g-{tag}", state_topic=f"state-{tag}",
                      replication_factor=replication, min_insync_replicas=min_insync,
                      input_partitions=partitions, commit_interval_s=0.5, session_timeout_ms=6000,
                      heartbeat_interval_ms=1000)
    asyncio.run(ensure_topics(k))
    s = Settings(kafka=k)
    s.model.checkpoint = checkpoint
    return s


def stop_worker(p: subprocess.Popen) -> int:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            return p.wait(90)
        except subprocess.TimeoutExpired:
            p.kill()
            return p.wait(10)
    return p.returncode


async def collect_flags(k: KafkaSettings, expected: set, timeout_s: float, reported: frozenset = frozenset()) -> list[dict]:
    """Flags from the beginning until every `expected` window has a scored flag and every `reported` one
    a flag of any status, or the timeout."""
    seen: set = set()
    seen_any: set = set()
    parsed = 0

    def all_scored(records) -> bool:
        nonlocal parsed
        for r in records[parsed:]:
            f = orjson.loads(r.value)
            seen_any.add((f["patient_id"], f["window_start_ns"]))
            if f["status"] == "scored":
                seen.add((f["patient_id"], f["window_start_ns"]))
        parsed = len(records)
        return expected <= seen and reported <= seen_any

    records = await read_records(k, [k.flags_topic], until=all_scored, timeout_s=timeout_s)
    return [orjson.loads(r.value) for r in records]


def feed_in_background(k: KafkaSettings, fleet, speed: float | None) -> threading.Thread:
    t = threading.Thread(target=lambda: asyncio.run(replay(k, fleet, speed=speed, chunk_s=0.5)), daemon=True)
    t.start()
    return t


def tally(expected: set, flags: list[dict]) -> dict:
    """Lost: expected windows without a scored flag. duplicates: scored flags seen more than once;
    duplicate_ids: flags of any status sharing a window_id (0 under exactly-once, read_committed)."""
    got = [(f["patient_id"], f["window_start_ns"]) for f in flags if f["status"] == "scored"]
    counts = collections.Counter(got)
    ids = collections.Counter(f["window_id"] for f in flags)
    return {"expected": len(expected), "flagged": len(expected & set(got)), "lost": len(expected - set(got)),
            "duplicates": sum(c - 1 for c in counts.values()),
            "duplicate_ids": sum(c - 1 for c in ids.values())}


def record(figure: str, value: str) -> None:
    from benchmarks.common import record as _record

    _record(figure, value)


# -- crash ---------------------------------------------------------------------------------------------
def _worker_and_feed(bootstrap: str, beds: int, seconds: float, speed: float, checkpoint: str | None, seed: int,
                     start: str, workdir: Path):
    """A worker process with its partitions assigned, and a synthetic fleet streaming to it."""
    s = campaign_settings(bootstrap, checkpoint=checkpoint)
    fleet = [src for src, _ in synthetic_fleet(beds, seconds, parse_start(start), seed=seed)]
    log = workdir / "worker.log"
    proc = _worker(s, log)
    wait_for_event(log, "partition_assigned", proc=proc)
    return s, expected_windows(fleet), proc, log, feed_in_background(s.kafka, fleet, speed)


def crash_campaign(bootstrap: str, beds: int, kills: int, seconds: float, speed: float, checkpoint: str | None,
                   seed: int = 0, workdir: Path | None = None) -> dict:
    """SIGKILL the worker at random moments `kills` times while beds stream; count lost windows."""
    s, expected, proc, log, feeder = _worker_and_feed(bootstrap, beds, seconds, speed, checkpoint, seed,
                                                      "2026-11-22T09:00:00Z", workdir or Path(tempfile.mkdtemp(prefix="crash-")))
    rng = random.Random(seed)
    span = seconds / speed
    try:
        for _ in range(kills):
            time.sleep(rng.uniform(0.3, 2.0) * span / kills)
            proc.kill()
            proc.wait(10)
            proc = _worker(s, log)
        feeder.join(span + 300)
        flags = asyncio.run(collect_flags(s.kafka, expected, timeout_s=span + 300))
    finally:
        stop_worker(proc)
    return {"kills": kills, **tally(expected, flags), **episode_consistency(s.kafka),
            "seq_regressions": seq_regressions(s.kafka)}


def episode_consistency(k: KafkaSettings) -> dict:
    """After the worker stopped: per patient, does the last episode message (read_committed) agree with
    the episode in the last committed patient state? A transition whose state was checkpointed but whose
    message never reached the topic would leave them apart (suppression on with nobody to lift it). The
    last message is the one with the highest seq, as consumers apply them; a state still holding a
    pending message after a clean stop counts as a mismatch too."""
    from streamer.state.patients import PatientState

    states: dict = {}
    for r in sorted(asyncio.run(read_records(k, [k.state_topic], timeout_s=30)), key=lambda r: (r.partition, r.offset)):
        if r.value is not None:
            _, st = PatientState.from_bytes(r.value)
            states[st.patient_id] = st.episode
    last: dict = {}
    for r in asyncio.run(read_records(k, [k.episodes_topic], timeout_s=30)):
        e = orjson.loads(r.value)
        if e["patient_id"] not in last or e["seq"] > last[e["patient_id"]]["seq"]:
            last[e["patient_id"]] = e
    mismatches = sum(ep.pending is not None for ep in states.values())
    for patient, ep in states.items():
        msg = last.get(patient)
        open_in_state = ep.open_start_ns is not None
        open_on_topic = msg is not None and msg["state"] == "open"
        if open_in_state != open_on_topic or (open_in_state and msg["start_ns"] != ep.open_start_ns):
            mismatches += 1
    return {"episode_patients": len(states), "episodes_on_topic": len(last), "episode_mismatches": mismatches}


# -- zombie owner ----------------------------------------------------------------------------------------
def state_regressions(k: KafkaSettings) -> int:
    """Committed state records (read_committed, in log order) whose next_k of a grid went backwards."""
    from streamer.state.patients import PatientState

    records = asyncio.run(read_records(k, [k.state_topic], timeout_s=30))
    last: dict = {}
    regressions = 0
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        if r.value is None:
            continue
        _, st = PatientState.from_bytes(r.value)
        for seg in st.segments:
            key = (r.key, seg.anchor_ns, seg.fs)
            if seg.next_k < last.get(key, -1):
                regressions += 1
            last[key] = max(seg.next_k, last.get(key, -1))
    return regressions


def zombie_campaign(bootstrap: str, beds: int, seconds: float, speed: float, checkpoint: str | None,
                    seed: int = 0, workdir: Path | None = None, takeovers: int = 1) -> dict:
    """The owner is SIGSTOPped past its session timeout, a second worker takes its partitions, then the
    first resumes: nothing it writes after the takeover may become visible (exactly once fences it)."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="zombie-"))
    s = campaign_settings(bootstrap, checkpoint=checkpoint)
    fleet = [src for src, _ in synthetic_fleet(beds, seconds, parse_start("2026-11-22T07:00:00Z"), seed=seed)]
    expected = expected_windows(fleet)
    logs = [workdir / "worker-a.log", workdir / "worker-b.log"]
    procs = [_worker(s, logs[0])]
    wait_for_event(logs[0], "partition_assigned", proc=procs[0])
    feeder = feed_in_background(s.kafka, fleet, speed)
    zombie_codes = []
    try:
        for i in range(takeovers):
            owner = procs[-1]
            asyncio.run(read_records(s.kafka, [s.kafka.flags_topic], until=lambda r: len(r) >= 1, timeout_s=120))
            owner.send_signal(signal.SIGSTOP)
            successor_log = logs[(i + 1) % 2]
            mark = len(log_events_named(successor_log, "partition_assigned"))
            successor = _worker(s, successor_log)
            procs.append(successor)
            # the successor owns every partition: the zombie's session expired
            wait_until(lambda: len(log_events_named(successor_log, "partition_assigned")) >= mark + 4, 120,  # noqa: B023 (polled within this iteration)
                       "the takeover", proc=successor)
            time.sleep(2.0)  # the successor publishes and checkpoints on its own meanwhile
            revoked = len(log_events_named(logs[i % 2], "partition_revoked"))
            owner.send_signal(signal.SIGCONT)
            # the zombie resumes: fenced or told by its heartbeat that it left the group, it drops its
            # partitions and rejoins as a new member (None), or it stops (its exit code)
            wait_until(lambda: owner.poll() is not None  # noqa: B023 (polled within this iteration)
                       or len(log_events_named(logs[i % 2], "partition_revoked")) > revoked, 60,  # noqa: B023
                       "the zombie dropping its partitions")
            zombie_codes.append(owner.poll())
        feeder.join(seconds / speed + 300)
        flags = asyncio.run(collect_flags(s.kafka, expected, timeout_s=seconds / speed + 300))
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
        codes = [stop_worker(p) for p in procs]
    fenced = sum(1 for e in log_events(logs[0]) + log_events(logs[1])
                 if e.get("event") == "transaction_fenced" or (
                     e.get("event") in ("worker_failed", "task_failed", "restore_failed")
                     and "Fenced" in str(e.get("error", "")) + str(e.get("exception", ""))))
    return {"takeovers": takeovers, **tally(expected, flags), "zombie_exit_codes": zombie_codes,
            "fenced_failures_logged": fenced, "state_regressions": state_regressions(s.kafka),
            "seq_regressions": seq_regressions(s.kafka), "exit_codes": codes}


def rebalance_campaign(bootstrap: str, beds: int, moves: int, seconds: float, speed: float, checkpoint: str | None,
                       seed: int = 0, workdir: Path | None = None) -> dict:
    """A second worker joins the group and leaves it again (SIGTERM) `moves` times while beds stream: the
    partitions move back and forth (revoke: drain, checkpoint; assign: fence, restore)."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="rebalance-"))
    s, expected, proc, log, feeder = _worker_and_feed(bootstrap, beds, seconds, speed, checkpoint, seed,
                                                      "2026-11-22T11:00:00Z", workdir)
    rng = random.Random(seed)
    span = seconds / speed
    codes = []
    try:
        for i in range(moves):
            time.sleep(rng.uniform(0.5, 1.0) * span / (moves + 1))
            other_log = workdir / f"worker-{i}.log"
            other = _worker(s, other_log)
            wait_for_event(other_log, "partition_assigned", proc=other, timeout_s=120)
            time.sleep(rng.uniform(1.0, 3.0))
            codes.append(stop_worker(other))
        feeder.join(span + 300)
        flags = asyncio.run(collect_flags(s.kafka, expected, timeout_s=span + 300))
    finally:
        codes.append(stop_worker(proc))
    return {"moves": moves, **tally(expected, flags), "exit_codes": codes,
            "state_regressions": state_regressions(s.kafka), "seq_regressions": seq_regressions(s.kafka)}


def log_events_named(path: Path, event: str) -> list[dict]:
    return [e for e in log_events(path) if e.get("event") == event]


# -- broker failover (Apache Kafka cluster) -------------------------------------------------------------
def partition_leader(k: KafkaSettings, topic: str, partition: int) -> int | None:
    from streamer.kafka.clients import make_admin

    async def leader():
        admin = make_admin(k)
        await admin.start()
        try:
            for t in await admin.describe_topics([topic]):
                for p in t["partitions"]:
                    if p["partition"] == partition:
                        return p["leader"]
        finally:
            await admin.close()
        return None

    return asyncio.run(leader())


def failover_campaign(cluster, beds: int, kills: int, seconds: float, speed: float, checkpoint: str | None,
                      seed: int = 0, workdir: Path | None = None, down_s: float = 5.0) -> dict:
    """A 3-broker cluster (RF 3, min.insync 2): SIGKILL the leader of an input and a flags partition
    `kills` times, restarting it each time; count lost and duplicate windows, and measure how long flags
    pause (the longest gap between two flags reaching a read_committed reader, around each kill)."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="failover-"))
    s = campaign_settings(cluster.bootstrap, checkpoint=checkpoint, replication=3, min_insync=2)
    fleet = [src for src, _ in synthetic_fleet(beds, seconds, parse_start("2026-11-22T06:00:00Z"), seed=seed)]
    expected = expected_windows(fleet)
    log = workdir / "worker.log"
    proc = _worker(s, log)
    wait_for_event(log, "partition_assigned", proc=proc)
    arrivals: list[float] = []
    stop_tail = threading.Event()
    tail = threading.Thread(target=lambda: asyncio.run(_tail_arrivals(s.kafka, arrivals, stop_tail)), daemon=True)
    tail.start()
    feeder = feed_in_background(s.kafka, fleet, speed)
    span = seconds / speed
    kill_times = []
    rng = random.Random(seed)
    try:
        for i in range(kills):
            time.sleep(rng.uniform(0.5, 1.0) * span / (kills + 1))
            topic = s.kafka.input_topics[0] if i % 2 == 0 else s.kafka.flags_topic
            node = partition_leader(s.kafka, topic, 0)
            if node is None:
                continue
            kill_times.append(time.time())
            cluster.kill(node)
            time.sleep(down_s)
            cluster.start_node(node)
            cluster.wait_ready(120)
        feeder.join(span + 300)
        flags = asyncio.run(collect_flags(s.kafka, expected, timeout_s=span + 300))
    finally:
        stop_tail.set()
        code = stop_worker(proc)
    pauses = []
    for t0 in kill_times:
        around = [t for t in arrivals if t0 - 1 <= t <= t0 + down_s + 60]
        gaps = [b - a for a, b in zip(around, around[1:])]
        pauses.append(round(max(gaps), 1) if gaps else None)
    return {"kills": len(kill_times), **tally(expected, flags), "flag_pause_s": pauses, "exit_code": code,
            "worker_alive": code == 0, "seq_regressions": seq_regressions(s.kafka)}


async def _tail_arrivals(k: KafkaSettings, arrivals: list[float], stop: threading.Event) -> None:
    from streamer.kafka.clients import make_consumer

    consumer = make_consumer(k, group_id=None, auto_offset_reset="earliest", client_id="failover-tail")
    await consumer.start()
    consumer.subscribe([k.flags_topic])
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200)
            now = time.time()
            arrivals.extend(now for records in batch.values() for _ in records)
    finally:
        await consumer.stop()


# -- durable storage, broker crashes --------------------------------------------------------------------
class ObjectStore:
    """An S3-compatible server on 127.0.0.1 (moto's), so the embedded broker keeps its log outside its own
    process and survives SIGKILL: Tansu 0.6 as shipped has no postgres or sqlite engine ("feature not
    enabled"), only memory and S3. moto comes with the `campaigns` extra (in requirements.lock)."""

    BUCKET = "tansu"

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ObjectStore":
        try:
            import moto  # noqa: F401  (only: is it installed?)
        except ImportError:
            raise SystemExit("[campaign] the S3-compatible store needs moto: pip install -e '.[campaigns]' "
                             "(scripts/test's environment has it)") from None
        from streamer.kafka.broker import free_port

        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=open(self.workdir / "s3.log", "ab"), stderr=subprocess.STDOUT)
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.endpoint, **self.credentials)
        deadline = time.monotonic() + 30
        while True:
            try:
                s3.create_bucket(Bucket=self.BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-2"})
                return self
            except Exception:  # not listening yet
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.__exit__()
                    raise
                time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    credentials = {"aws_access_key_id": "campaign", "aws_secret_access_key": "campaign", "region_name": "eu-west-2"}

    def broker(self, log_path: Path) -> EmbeddedBroker:
        env = {"AWS_ENDPOINT": self.endpoint, "AWS_ACCESS_KEY_ID": "campaign", "AWS_SECRET_ACCESS_KEY": "campaign",
               "AWS_DEFAULT_REGION": "eu-west-2", "AWS_ALLOW_HTTP": "true"}
        return EmbeddedBroker(storage=f"s3://{self.BUCKET}/", env=env, log_path=log_path)


def broker_crash_campaign(broker: EmbeddedBroker, beds: int, kills: int, seconds: float, speed: float,
                          checkpoint: str | None, down_s: tuple[float, float] = (1.0, 6.0), seed: int = 0,
                          workdir: Path | None = None) -> dict:
    """SIGKILL the broker `kills` times at random moments while beds stream, restart it after a random
    outage on the same port and storage; count lost windows. The worker and the replayer must ride it out."""
    s, expected, proc, log, feeder = _worker_and_feed(broker.bootstrap, beds, seconds, speed, checkpoint, seed,
                                                      "2026-11-22T16:00:00Z",
                                                      workdir or Path(tempfile.mkdtemp(prefix="broker-crash-")))
    rng = random.Random(seed)
    span = seconds / speed
    outages = []
    try:
        for _ in range(kills):
            time.sleep(rng.uniform(0.3, 1.5) * span / kills)
            broker.kill()
            down = rng.uniform(*down_s)
            time.sleep(down)
            broker.start()
            outages.append(round(down, 1))
        feeder.join(span + 300)
        flags = asyncio.run(collect_flags(s.kafka, expected, timeout_s=span + 300))
        alive = proc.poll() is None
    finally:
        code = stop_worker(proc)
    return {"kills": kills, "outages_s": outages, **tally(expected, flags), "worker_alive": alive, "exit_code": code,
            "worker_restarts_needed": 0 if alive else 1}


# -- broker stalls -------------------------------------------------------------------------------------
def stall_campaign(broker: EmbeddedBroker, stall_s: float, beds: int, checkpoint: str | None,
                   workdir: Path | None = None, seconds: float | None = None) -> dict:
    """Freeze the broker (SIGSTOP) for stall_s mid-stream (10 s in), resume; windows lost, recovery time,
    peak RSS. `seconds` of signal per bed: by default 30 s past the stall, at least 40."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="stall-"))
    s = campaign_settings(broker.bootstrap, checkpoint=checkpoint)
    seconds = seconds or max(40.0, stall_s + 30)
    fleet = [src for src, _ in synthetic_fleet(beds, seconds, parse_start("2026-11-22T14:00:00Z"), seed=2)]
    expected = expected_windows(fleet)
    proc = _worker(s, workdir / "worker.log")
    wait_for_event(workdir / "worker.log", "partition_assigned", proc=proc)
    feeder = feed_in_background(s.kafka, fleet, speed=1.0)
    peak_rss = 0
    try:
        time.sleep(10)
        broker.freeze()
        t_stall = time.monotonic()
        while time.monotonic() - t_stall < stall_s:
            peak_rss = max(peak_rss, _rss_kb(proc.pid))
            time.sleep(0.5)
        broker.thaw()
        resumed = time.monotonic()
        feeder.join(seconds + 300)
        flags = asyncio.run(collect_flags(s.kafka, expected, timeout_s=seconds + 300))
        recovered = _first_flag_after(workdir / "worker.log", resumed)
        alive = proc.poll() is None
    finally:
        broker.thaw()
        code = stop_worker(proc)
    return {"stall_s": stall_s, **tally(expected, flags), "worker_alive": alive, "exit_code": code,
            "recovery_s": recovered, "peak_rss_mb": round(peak_rss / 1024, 1),
            "seq_regressions": seq_regressions(s.kafka)}


def _rss_kb(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _first_flag_after(log: Path, t_monotonic: float) -> float | None:
    """Seconds from the broker's resume to the worker's next successful commit or publish, from its log."""
    # the log has wall-clock ISO timestamps (the worker's clock, WORKER_CLOCK included); convert the resume
    # moment to that clock
    resume_wall = time.time() + clock_skew_s(WORKER_CLOCK) - (time.monotonic() - t_monotonic)
    import datetime

    for line in log.read_text().splitlines():
        if '"timestamp"' not in line:
            continue
        doc = orjson.loads(line)
        ts = datetime.datetime.fromisoformat(doc["timestamp"].replace("Z", "+00:00")).timestamp()
        if ts > resume_wall and doc.get("event") in ("episode", "partition_assigned", "backpressure_resume"):
            return round(ts - resume_wall, 1)
    return None


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
        while not worker.assigned:
            await asyncio.sleep(0.2)
        feed = asyncio.create_task(replay(s.kafka, fleet, speed=1.0, chunk_s=0.5))
        t0 = time.monotonic()
        peak_pending = peak_bytes = paused_s = 0.0
        while time.monotonic() - t0 < slow_for_s:
            peak_pending = max(peak_pending, worker.ledger.in_flight())
            peak_bytes = max(peak_bytes, worker.stage.nbytes)
            paused_s += 0.1 if worker.paused else 0.0
            await asyncio.sleep(0.1)
        slow.delay_s = 0.0
        recovered = time.monotonic()
        while (worker.paused or worker.ledger.in_flight() > 8) and time.monotonic() - recovered < 300:
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


# -- soak -----------------------------------------------------------------------------------------------
def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def _scrape(port: int) -> dict:
    """The worker's /metrics as {(name, labels...): value}, histograms included."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return out


def wait_ready(port: int, proc: subprocess.Popen, timeout_s: float = 90.0) -> None:
    """Until the worker's /readyz answers 200 (model loaded and warmed up, partitions assigned)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode} before it was ready")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200:
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"worker not ready within {timeout_s}s")


def _interval_quantile(before: dict, after: dict, name: str, q: float) -> float:
    """Upper bound of the histogram bucket holding quantile q of what was observed between two scrapes."""
    buckets = sorted((float(k[1][1]), after[k] - before.get(k, 0.0)) for k in after
                     if k[0] == name + "_bucket")
    if not buckets or buckets[-1][1] <= 0:
        return float("nan")
    return next(le for le, count in buckets if count >= q * buckets[-1][1])


def _delta(before: dict, after: dict, name: str) -> float:
    return sum(v - before.get(k, 0.0) for k, v in after.items() if k[0] == name)


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of a running process onto `cpus` (sched_setaffinity alone moves one thread)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


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
        _pin(broker.process.pid, others)
        _pin(os.getpid(), others)
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
    prev_t, prev_cpu, prev_m = t0, {n: _cpu_s(p) for n, p in pids.items()}, _scrape(port)
    try:
        while feeder.is_alive():
            feeder.join(interval_s)
            t, cpu, m = time.monotonic(), {n: _cpu_s(p) for n, p in pids.items()}, _scrape(port)
            windows = _delta(prev_m, m, "streamer_windows_total")
            batches = _delta(prev_m, m, "streamer_inference_seconds_count")
            row = {"t_s": round(t - t0), "windows": int(windows),
                   "p50_s": _interval_quantile(prev_m, m, "streamer_flag_latency_seconds", 0.5),
                   "p99_s": _interval_quantile(prev_m, m, "streamer_flag_latency_seconds", 0.99),
                   "infer_ms_per_window": round(1000 * _delta(prev_m, m, "streamer_inference_seconds_sum")
                                                / max(_delta(prev_m, m, "streamer_batch_size_windows_sum"), 1), 1),
                   "batch_mean": round(_delta(prev_m, m, "streamer_batch_size_windows_sum") / max(batches, 1), 1),
                   "pending": int(m[("streamer_pending_windows",)]),
                   "lag": int(sum(v for k, v in m.items() if k[0] == "streamer_consumer_lag_records")),
                   "patients": int(m[("streamer_buffered_patients",)]),
                   "worker_rss_mb": round(_rss_kb(proc.pid) / 1024), "broker_rss_mb": round(_rss_kb(pids["broker"]) / 1024),
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
    proc = _worker(s, workdir / "worker.log")
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
    proc = _worker(s, log)
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
            proc = _worker(s, log)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="campaign", required=True)
    c = sub.add_parser("crash")
    c.add_argument("--beds", type=int, default=100)
    c.add_argument("--kills", type=int, default=20)
    c.add_argument("--seconds", type=float, default=240.0)
    c.add_argument("--speed", type=float, default=1.0)
    st = sub.add_parser("stall")
    st.add_argument("--stalls", default="5,30,120")
    st.add_argument("--beds", type=int, default=50)
    sl = sub.add_parser("slow")
    sl.add_argument("--beds", type=int, default=50)
    sl.add_argument("--seconds", type=float, default=120.0)
    sl.add_argument("--delay", type=float, default=2.0, help="added seconds per inference batch")
    sl.add_argument("--slow-for", type=float, default=45.0)
    so = sub.add_parser("soak")
    so.add_argument("--beds", type=int, default=200)
    so.add_argument("--seconds", type=float, default=600.0)
    so.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    so.add_argument("--pin", action="store_true", help="worker on its own CPU, broker and replayer on the rest")
    so.add_argument("--fetch", default=None, help="MIN_BYTES,MAX_WAIT_MS for the worker's fetches")
    so.add_argument("--storage", choices=["memory", "s3"], default="memory", help="s3: durable object storage")
    bc = sub.add_parser("broker-crash")
    bc.add_argument("--beds", type=int, default=50)
    bc.add_argument("--kills", type=int, default=5)
    bc.add_argument("--seconds", type=float, default=180.0)
    bc.add_argument("--speed", type=float, default=1.0)
    z = sub.add_parser("zombie", help="owner SIGSTOPped past its session timeout, a successor takes over, it resumes")
    z.add_argument("--beds", type=int, default=50)
    z.add_argument("--takeovers", type=int, default=3)
    z.add_argument("--seconds", type=float, default=180.0)
    z.add_argument("--speed", type=float, default=2.0)
    fo = sub.add_parser("failover", help="3 Apache Kafka brokers, RF 3: SIGKILL partition leaders")
    fo.add_argument("--beds", type=int, default=50)
    fo.add_argument("--kills", type=int, default=5)
    fo.add_argument("--seconds", type=float, default=240.0)
    fo.add_argument("--speed", type=float, default=1.0)
    rb = sub.add_parser("rebalance", help="a second worker joins and leaves the group, again and again")
    rb.add_argument("--beds", type=int, default=50)
    rb.add_argument("--moves", type=int, default=4)
    rb.add_argument("--seconds", type=float, default=180.0)
    rb.add_argument("--speed", type=float, default=2.0)
    ck = sub.add_parser("clock")
    ck.add_argument("--beds", type=int, default=50)
    ck.add_argument("--kills", type=int, default=3)
    f = sub.add_parser("fuzz")
    f.add_argument("--messages", type=int, default=10_000)
    f.add_argument("--beds", type=int, default=10)
    for p in (c, st, sl, so, f, ck, bc, z, fo, rb):
        p.add_argument("--checkpoint", default=None)
        p.add_argument("--clock", default=None, help="the workers' wall clock moved by this libfaketime offset "
                       "(e.g. +2h, -30m; Debian's faketime package)")
        p.add_argument("--broker", choices=["apache", "embedded"], default="apache",
                       help="Apache Kafka (default; fetched by tools/kafka_cluster.py) or the embedded demo broker")
    args = ap.parse_args()
    global WORKER_CLOCK
    WORKER_CLOCK = args.clock
    skew = f", worker clock {args.clock}" if args.clock else ""
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    durable = args.campaign == "broker-crash" or getattr(args, "storage", "memory") == "s3"
    with contextlib.ExitStack() as stack:
        if durable:
            workdir = Path(tempfile.mkdtemp(prefix="durable-"))
            broker = stack.enter_context(stack.enter_context(ObjectStore(workdir)).broker(workdir / "broker.log"))
        elif args.broker == "embedded":
            broker = stack.enter_context(EmbeddedBroker())
        else:
            from tools.kafka_cluster import KafkaCluster

            folder = Path(tempfile.mkdtemp(prefix="apache-kafka-"))
            broker = stack.enter_context(KafkaCluster(folder, brokers=3 if args.campaign == "failover" else 1))
        on = ("Apache Kafka 4.4.0" if not durable and args.broker == "apache" else "embedded broker") + skew
        if args.campaign == "zombie":
            r = zombie_campaign(broker.bootstrap, args.beds, args.seconds, args.speed, args.checkpoint,
                                takeovers=args.takeovers)
            record(f"zombie campaign ({on}): {args.beds} beds at {args.speed:g}x, owner SIGSTOPped past its session "
                   f"timeout, successor takes over, owner resumes; x{args.takeovers}",
                   f"windows expected {r['expected']}, flagged {r['flagged']}, lost {r['lost']}, duplicate window_ids "
                   f"{r['duplicate_ids']} (read_committed); zombie exit codes {r['zombie_exit_codes']}; state "
                   f"regressions {r['state_regressions']}, seq regressions {r['seq_regressions']}")
        elif args.campaign == "rebalance":
            r = rebalance_campaign(broker.bootstrap, args.beds, args.moves, args.seconds, args.speed, args.checkpoint)
            record(f"rebalance campaign ({on}): {args.beds} beds at {args.speed:g}x, a second worker joins and "
                   f"leaves x{args.moves}",
                   f"windows expected {r['expected']}, flagged {r['flagged']}, lost {r['lost']}, duplicate window_ids "
                   f"{r['duplicate_ids']} (read_committed); state regressions {r['state_regressions']}, seq "
                   f"regressions {r['seq_regressions']}; exit codes {r['exit_codes']}")
        elif args.campaign == "failover":
            r = failover_campaign(broker, args.beds, args.kills, args.seconds, args.speed, args.checkpoint)
            record(f"broker failover ({on}, 3 brokers, RF 3, min.insync 2): {args.beds} beds at {args.speed:g}x, "
                   f"SIGKILL the leader of an input / flags partition x{args.kills}, restarted after 5 s",
                   f"windows expected {r['expected']}, flagged {r['flagged']}, lost {r['lost']}, duplicate window_ids "
                   f"{r['duplicate_ids']}; flag pause per kill {r['flag_pause_s']} s; worker exit {r['exit_code']}; seq "
                   f"regressions {r['seq_regressions']}")
        elif args.campaign == "broker-crash":
            r = broker_crash_campaign(broker, args.beds, args.kills, args.seconds, args.speed, args.checkpoint)
            record(f"broker crash campaign: {args.beds} beds at {args.speed:g}x real time, broker SIGKILL x{args.kills} "
                   f"(outages {r['outages_s']} s), S3 storage",
                   f"windows expected {r['expected']}, flagged {r['flagged']}, lost {r['lost']}, duplicates "
                   f"{r['duplicates']}; worker alive {r['worker_alive']}, exit {r['exit_code']}")
        elif args.campaign == "crash":
            r = crash_campaign(broker.bootstrap, args.beds, args.kills, args.seconds, args.speed, args.checkpoint)
            record(f"crash campaign ({on}): {args.beds} beds at {args.speed:g}x real time, SIGKILL x{args.kills}",
                   f"windows expected {r['expected']}, flagged {r['flagged']}, lost {r['lost']}, duplicates "
                   f"{r['duplicates']}, duplicate window_ids {r['duplicate_ids']} (read_committed); last episode "
                   f"message vs restored state: {r['episode_mismatches']} mismatches over {r['episode_patients']} "
                   f"patients ({r['episodes_on_topic']} with episodes); seq regressions {r['seq_regressions']}")
        elif args.campaign == "stall":
            for stall in [float(v) for v in args.stalls.split(",")]:
                r = stall_campaign(broker, stall, args.beds, args.checkpoint)
                record(f"broker stall {stall:g}s (SIGSTOP), {args.beds} beds real time ({on})",
                       f"lost {r['lost']} of {r['expected']}, worker alive {r['worker_alive']}, exit {r['exit_code']}, "
                       f"recovery {r['recovery_s']}s, peak RSS {r['peak_rss_mb']} MB, duplicates {r['duplicates']}, "
                       f"duplicate window_ids {r['duplicate_ids']}, seq regressions {r['seq_regressions']}")
        elif args.campaign == "clock":
            r = clock_campaign(broker.bootstrap, args.beds, args.kills, args.checkpoint)
            record(f"clock campaign: {args.beds} beds (+2 h steps, -1 h steps, +30 min outliers, healthy), "
                   f"SIGKILL x{args.kills}",
                   f"lost {r['lost']} (old timeline {r['old_lost']} of {r['old_timeline_windows']}, new timeline "
                   f"{r['new_lost']} of {r['new_timeline_windows']}, healthy {r['healthy_lost']} of "
                   f"{r['healthy_windows']}); episodes left open past stale_after_s {r['episodes_left_open']}; "
                   f"exit {r['exit_code']}")
        elif args.campaign == "slow":
            r = slow_campaign(broker.bootstrap, args.beds, args.seconds, args.delay, args.slow_for, args.checkpoint)
            record(f"slow inference: +{args.delay:g}s per batch of <= 4 ({4 / args.delay:g} windows/s < {args.beds / 10:g} "
                   f"arriving) for {args.slow_for:g}s, {args.beds} beds real time",
                   f"fetch paused {r['paused_s']}s, peak pending windows {r['peak_pending']} (limit 64), peak buffers "
                   f"{r['peak_buffer_mb']} MB, caught up {r['catch_up_s']}s after recovery, lost {r['lost']} of "
                   f"{r['expected']}, exit {r['exit_code']}")
        elif args.campaign == "soak":
            r = soak_campaign(broker, args.beds, args.seconds, args.checkpoint, interval_s=args.interval, pin=args.pin,
                              fetch=tuple(map(int, args.fetch.split(","))) if args.fetch else None)
            record(f"soak: {args.beds} beds real time for {args.seconds:g}s (after 60 s warm-up)"
                   + (", S3 storage" if durable else "")
                   + (", worker pinned to its own CPU" if args.pin else "")
                   + (f", fetch min bytes,max wait ms {args.fetch}" if args.fetch else ""),
                   f"worker RSS {r['rss_mb_after_warmup']} -> {r['rss_mb_end']} MB ({r['rss_growth_pct']}%), broker RSS "
                   f"{r['broker_rss_mb'][0]} -> {r['broker_rss_mb'][1]} MB, patients buffered {r['patients_buffered'][0]} "
                   f"-> max {r['patients_buffered'][1]}, p99 per {args.interval:g} s interval {r['interval_p99_s'][0]}-"
                   f"{r['interval_p99_s'][1]} s, max pending {r['max_pending']}, exit {r['exit_code']}; "
                   f"cores used {r['cores_used']}")
        else:
            r = fuzz_campaign(broker.bootstrap, args.messages, args.beds, args.checkpoint)
            record(f"bad-input campaign: {r['hostile']} hostile records among {args.beds} healthy beds",
                   f"crashes {r['crashes']}, dead-lettered {r['dead_lettered']}/{r['hostile']}, "
                   f"healthy windows lost {r['lost']} of {r['expected']}; microvolts-as-millivolts windows "
                   f"reported implausible {r['uv_as_mv_reported_implausible']}/{r['uv_as_mv_windows']}, scored "
                   f"{r['uv_as_mv_scored']}; 500.0/500.001 Hz windows scored {r['noisy_rate_scored']}/"
                   f"{r['noisy_rate_windows']}; reasons {r['reasons']}")
        print(r)


if __name__ == "__main__":
    main()
