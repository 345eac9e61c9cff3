"""Campaigns that hurt the brokers: leaders killed in a 3-broker cluster (failover), the embedded broker
killed over durable S3 storage (broker-crash), the broker frozen (stall)."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.campaigns.common import (campaign_settings, collect_flags, feed_in_background, first_flag_after, rss_kb,
                                         seq_regressions, stop_worker, tally, worker_and_feed, worker_process)
from streamer.kafka.broker import EmbeddedBroker
from streamer.offline.recordings import parse_start
from streamer.offline.replay import synthetic_fleet
from streamer.settings import KafkaSettings
from tests.kafka_utils import expected_windows, wait_for_event


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
    proc = worker_process(s, log)
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
    s, expected, proc, log, feeder = worker_and_feed(broker.bootstrap, beds, seconds, speed, checkpoint, seed,
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
    proc = worker_process(s, workdir / "worker.log")
    wait_for_event(workdir / "worker.log", "partition_assigned", proc=proc)
    feeder = feed_in_background(s.kafka, fleet, speed=1.0)
    peak_rss = 0
    try:
        time.sleep(10)
        broker.freeze()
        t_stall = time.monotonic()
        while time.monotonic() - t_stall < stall_s:
            peak_rss = max(peak_rss, rss_kb(proc.pid))
            time.sleep(0.5)
        broker.thaw()
        resumed = time.monotonic()
        feeder.join(seconds + 300)
        flags = asyncio.run(collect_flags(s.kafka, expected, timeout_s=seconds + 300))
        recovered = first_flag_after(workdir / "worker.log", resumed)
        alive = proc.poll() is None
    finally:
        broker.thaw()
        code = stop_worker(proc)
    return {"stall_s": stall_s, **tally(expected, flags), "worker_alive": alive, "exit_code": code,
            "recovery_s": recovered, "peak_rss_mb": round(peak_rss / 1024, 1),
            "seq_regressions": seq_regressions(s.kafka)}
