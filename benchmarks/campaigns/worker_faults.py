"""Campaigns that hurt the worker: SIGKILL (crash), SIGSTOP past its session timeout (zombie), a second
worker joining and leaving (rebalance)."""

from __future__ import annotations

import asyncio
import random
import signal
import tempfile
import time
from pathlib import Path

from benchmarks.campaigns.common import (campaign_settings, collect_flags, episode_consistency, feed_in_background,
                                         log_events_named, seq_regressions, state_regressions, stop_worker, tally,
                                         worker_and_feed, worker_process)
from streamer.kafka.clients import read_records
from streamer.offline.recordings import parse_start
from streamer.offline.replay import synthetic_fleet
from tests.kafka_utils import expected_windows, log_events, wait_for_event, wait_until


def crash_campaign(bootstrap: str, beds: int, kills: int, seconds: float, speed: float, checkpoint: str | None,
                   seed: int = 0, workdir: Path | None = None) -> dict:
    """SIGKILL the worker at random moments `kills` times while beds stream; count lost windows."""
    s, expected, proc, log, feeder = worker_and_feed(bootstrap, beds, seconds, speed, checkpoint, seed,
                                                     "2026-11-22T09:00:00Z", workdir or Path(tempfile.mkdtemp(prefix="crash-")))
    rng = random.Random(seed)
    span = seconds / speed
    try:
        for _ in range(kills):
            time.sleep(rng.uniform(0.3, 2.0) * span / kills)
            proc.kill()
            proc.wait(10)
            proc = worker_process(s, log)
        feeder.join(span + 300)
        flags = asyncio.run(collect_flags(s.kafka, expected, timeout_s=span + 300))
    finally:
        stop_worker(proc)
    return {"kills": kills, **tally(expected, flags), **episode_consistency(s.kafka),
            "seq_regressions": seq_regressions(s.kafka)}


def zombie_campaign(bootstrap: str, beds: int, seconds: float, speed: float, checkpoint: str | None,
                    seed: int = 0, workdir: Path | None = None, takeovers: int = 1) -> dict:
    """The owner is SIGSTOPped past its session timeout, a second worker takes its partitions, then the
    first resumes: nothing it writes after the takeover may become visible (exactly once fences it)."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="zombie-"))
    s = campaign_settings(bootstrap, checkpoint=checkpoint)
    fleet = [src for src, _ in synthetic_fleet(beds, seconds, parse_start("2026-11-22T07:00:00Z"), seed=seed)]
    expected = expected_windows(fleet)
    logs = [workdir / "worker-a.log", workdir / "worker-b.log"]
    procs = [worker_process(s, logs[0])]
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
            successor = worker_process(s, successor_log)
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
    s, expected, proc, log, feeder = worker_and_feed(bootstrap, beds, seconds, speed, checkpoint, seed,
                                                     "2026-11-22T11:00:00Z", workdir)
    rng = random.Random(seed)
    span = seconds / speed
    codes = []
    try:
        for i in range(moves):
            time.sleep(rng.uniform(0.5, 1.0) * span / (moves + 1))
            other_log = workdir / f"worker-{i}.log"
            other = worker_process(s, other_log)
            wait_for_event(other_log, "partition_assigned", proc=other, timeout_s=120)
            time.sleep(rng.uniform(1.0, 3.0))
            codes.append(stop_worker(other))
        feeder.join(span + 300)
        flags = asyncio.run(collect_flags(s.kafka, expected, timeout_s=span + 300))
    finally:
        codes.append(stop_worker(proc))
    return {"moves": moves, **tally(expected, flags), "exit_codes": codes,
            "state_regressions": state_regressions(s.kafka), "seq_regressions": seq_regressions(s.kafka)}
