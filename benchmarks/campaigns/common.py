"""What every campaign shares: the worker processes (their clock skewed by WORKER_CLOCK), the topics of
one campaign, the feed, collecting and tallying flags, the consistency checks of the committed outputs
(episodes, states, seq), and reading a worker's metrics and log."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import orjson

from streamer.kafka.clients import ensure_topics, read_records
from streamer.offline.recordings import parse_start
from streamer.offline.replay import replay, synthetic_fleet
from streamer.settings import KafkaSettings, Settings
from tests.kafka_utils import expected_windows, faketime_env, log_events, start_worker_process, wait_for_event


# The workers' wall clock in every campaign: None (the host's), or a libfaketime offset ("+2h", "-30m")
WORKER_CLOCK: str | None = None


def clock_skew_s(offset: str | None) -> float:
    """Seconds of a libfaketime relative offset ("+2h", "-30m", "+90s", "-1d"); 0 for None."""
    if not offset:
        return 0.0
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    unit = offset[-1] if offset[-1] in units else "s"
    return float(offset.rstrip("smhd")) * units[unit]


def worker_process(s: Settings, log: Path) -> subprocess.Popen:
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
                      heartbeat_interval_ms=1000,
                      # the exactly-once campaigns run on either mode (tests/kafka_utils.py does the same)
                      transactions=os.environ.get("STREAMER_KAFKA__TRANSACTIONS") or "per_partition")
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


def worker_and_feed(bootstrap: str, beds: int, seconds: float, speed: float, checkpoint: str | None, seed: int,
                     start: str, workdir: Path):
    """A worker process with its partitions assigned, and a synthetic fleet streaming to it."""
    s = campaign_settings(bootstrap, checkpoint=checkpoint)
    fleet = [src for src, _ in synthetic_fleet(beds, seconds, parse_start(start), seed=seed)]
    log = workdir / "worker.log"
    proc = worker_process(s, log)
    wait_for_event(log, "partition_assigned", proc=proc)
    return s, expected_windows(fleet), proc, log, feed_in_background(s.kafka, fleet, speed)


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


def log_events_named(path: Path, event: str) -> list[dict]:
    return [e for e in log_events(path) if e.get("event") == event]


def rss_kb(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def first_flag_after(log: Path, t_monotonic: float) -> float | None:
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


# -- soak -----------------------------------------------------------------------------------------------
def _stat_cpu_s(stat_path: str) -> float:
    """User + system CPU seconds from a /proc stat file (a process's or one of its threads')."""
    fields = open(stat_path).read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    try:
        return _stat_cpu_s(f"/proc/{pid}/stat")
    except OSError:
        return 0.0


def thread_cpu_s(pid: int) -> dict[int, float]:
    """User + system CPU seconds of each of a process's threads so far, by thread id (the main thread's
    id is the process id)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else ():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            out[int(tid)] = _stat_cpu_s(f"/proc/{pid}/task/{tid}/stat")
    return out


def scrape_metrics(port: int) -> dict:
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


def interval_quantile(before: dict, after: dict, name: str, q: float) -> float:
    """Upper bound of the histogram bucket holding quantile q of what was observed between two scrapes."""
    buckets = sorted((float(k[1][1]), after[k] - before.get(k, 0.0)) for k in after
                     if k[0] == name + "_bucket")
    if not buckets or buckets[-1][1] <= 0:
        return float("nan")
    return next(le for le, count in buckets if count >= q * buckets[-1][1])


def metric_delta(before: dict, after: dict, name: str) -> float:
    return sum(v - before.get(k, 0.0) for k, v in after.items() if k[0] == name)


def pin_threads(pid: int, cpus: set[int]) -> None:
    """Every thread of a running process onto `cpus` (sched_setaffinity alone moves one thread)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)
