"""Alarm suppression fails safe, on Apache Kafka, as an alarm system reading the episodes topic sees it:
every worker killed while an episode is open -> "not suppressed" within the lease; a takeover by a worker
whose clock runs an hour behind -> its close is honoured; a crash between writing a close into the state
and its acknowledgement -> the next owner still delivers the close."""

from __future__ import annotations

import asyncio
import signal
import time

import orjson
import pytest
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from streamer.client import SuppressionView, decode_episode
from streamer.kafka.clients import make_admin, read_records
from streamer.model.infer import ArtifactScorer
from streamer.offline.recordings import Recording, parse_start, regular_times
from streamer.offline.replay import Source, replay
from streamer.settings import ModelSettings
from streamer.state.changelog import parse_state_key
from streamer.state.patients import PatientState
from streamer.synthetic import generate
from streamer.runtime import Worker
from tests.kafka_utils import isolated_settings, read_topic, start_worker_process, wait_for_event, wait_until

pytestmark = pytest.mark.integration
T0 = parse_start("2026-11-22T07:00:00Z")


def _bed(pid: str, seconds: int = 31) -> Source:
    return Source(pid, Recording(regular_times(500 * seconds, 500, T0), generate(seconds, fs=500, seed=3).values,
                                 500.0))


def _settings(broker, **episodes):
    s = isolated_settings(broker.bootstrap, partitions=1)
    s.model.threshold = 0.0  # every scored window is artifact: the episode opens and stays open
    s.episodes.open_after = 1
    for name, value in episodes.items():
        setattr(s.episodes, name, value)
    return s


class Reader:
    """An alarm system: the episodes topic through streamer.client, by this process's clock."""

    def __init__(self, s, skew_s: float):
        self.s, self.view, self.seen = s, SuppressionView(skew_s=skew_s), 0

    def poll(self) -> list:
        records = asyncio.run(read_records(self.s.kafka, [self.s.kafka.episodes_topic], timeout_s=3, idle_polls=1))
        episodes = [decode_episode(r.value) for r in records]
        for e in episodes[self.seen:]:
            self.view.apply(e)
        self.seen = len(episodes)
        return episodes


def test_every_worker_killed_while_open_lapses_within_the_lease(broker, checkpoint, tmp_path):
    lease_s, skew_s = 6.0, 1.0
    s = _settings(broker, lease_s=lease_s, renew_every_s=1.5, skew_allowance_s=skew_s)
    s.model.checkpoint = checkpoint
    log = tmp_path / "worker.log"
    proc = start_worker_process(s, log)
    reader = Reader(s, skew_s)
    try:
        wait_for_event(log, "partition_assigned", proc=proc)
        asyncio.run(replay(s.kafka, [_bed("bed-lease")], speed=None, chunk_s=0.5))
        wait_until(lambda: reader.poll() and reader.view.suppressed("bed-lease"), 90, "suppression on", proc=proc)
        # renewed while the worker lives: still suppressed two leases later, data or not
        opened = time.monotonic()
        while time.monotonic() - opened < 2 * lease_s:
            reader.poll()
            assert reader.view.suppressed("bed-lease"), "the lease lapsed under a live owner"
            time.sleep(0.5)
        renewals = [e for e in reader.poll() if e.renewal]
        assert len(renewals) >= 4, renewals
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    killed, killed_ns = time.monotonic(), time.time_ns()
    wait_until(lambda: reader.poll() is not None and reader.view.status("bed-lease") == "lapsed",
               lease_s + skew_s + 10, "the lease to lapse after every worker died", interval_s=0.2)
    observed = time.monotonic() - killed
    lease_end = (reader.view.lease_end_ns("bed-lease") - killed_ns) / 1e9
    print(f"suppression lapsed {lease_end:.1f} s after kill -9 by the reader's lease (seen {observed:.1f} s after, "
          f"polling the topic); lease {lease_s} s + skew {skew_s} s")
    assert lease_end <= lease_s + skew_s + 0.5, "the last renewal cannot reach past lease + skew"
    assert observed <= lease_s + skew_s + 4.0  # plus the reader's own polling


def test_a_takeover_by_a_worker_an_hour_behind_is_honoured(broker, scorer, checkpoint):
    """Worker a opens the episode; b, whose clock runs 1 h behind, takes over and closes it on clean windows:
    its close is stamped an hour before the open, yet every reader applies it (order by seq)."""
    # in-process workers score with their scorer's threshold: the test model's windows (p ~ 0.49) are all
    # artifact at the released threshold, and all clean at threshold 1
    s = _settings(broker, stale_after_s=3600.0)
    behind = 3600.0

    async def main():
        a = Worker(s, scorer=scorer)
        ta = asyncio.create_task(a.run())
        await _until(lambda: bool(a.core.partitions), 60, "assignment of a")
        await replay(s.kafka, [_bed("bed-skew", 21)], speed=None, chunk_s=0.5)
        await _until(lambda: _states(s, "open"), 60, "the episode to open under a", slow=True)
        a.stop()
        assert await asyncio.wait_for(ta, 60) == 0
        # b scores every window clean (threshold 1): the episode closes after close_after windows
        clean = await asyncio.to_thread(ArtifactScorer, ModelSettings(checkpoint=checkpoint, threshold=1.0))
        b = Worker(s, scorer=clean, clock=lambda: time.time() - behind)
        tb = asyncio.create_task(b.run())
        try:
            await _until(lambda: bool(b.core.partitions), 60, "assignment of b")
            later = Source("bed-skew", Recording(regular_times(500 * 30, 500, T0 + 21 * 10**9),
                                                 generate(30, fs=500, seed=4).values, 500.0))
            await replay(s.kafka, [later], speed=None, chunk_s=0.5)
            await _until(lambda: _states(s, "closed"), 90, "b's close", slow=True)
        finally:
            b.stop()
            assert await asyncio.wait_for(tb, 60) == 0

    asyncio.run(main())
    episodes = [e for e in _episodes(s) if not e.renewal]
    opened, closed = episodes[0], episodes[-1]
    assert (opened.state, closed.state, closed.reason) == ("open", "closed", "clean")
    assert closed.updated_at_ns < opened.updated_at_ns - 3000 * 10**9, "b's clock ran an hour behind"
    assert closed.seq > opened.seq
    view = SuppressionView()
    for e in sorted(_episodes(s), key=lambda e: e.updated_at_ns):  # even in the order of the wall clocks
        view.apply(e)
    assert view.status("bed-skew") == "off"


def test_a_close_left_pending_by_a_crash_reaches_the_topic_through_the_next_owner(broker, checkpoint, tmp_path):
    """At least once. The episodes topic refuses the stale close (its max.message.bytes shrunk: a non-retriable
    send error), so the worker dies after writing the close into the state and before any acknowledgement.
    The next owner, which would never close the episode by itself (stale_after_s 1 h), re-sends it."""
    s = _settings(broker, stale_after_s=3.0, lease_s=600.0, renew_every_s=300.0)
    s.kafka.delivery = "at_least_once"
    s.model.checkpoint = checkpoint
    log = tmp_path / "worker.log"
    proc = start_worker_process(s, log)
    try:
        wait_for_event(log, "partition_assigned", proc=proc)
        asyncio.run(replay(s.kafka, [_bed("bed-pending", 21)], speed=None, chunk_s=0.5))
        wait_until(lambda: [e for e in _episodes(s) if e.state == "open"], 90, "the open", proc=proc)
        asyncio.run(_set_topic_config(s, s.kafka.episodes_topic, {"max.message.bytes": "64"}))
        proc.wait(60)  # the stale close comes 3 s after the last window and is refused
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 1, "a non-retriable send error ends the worker"
    pending = _states(s, "pending")
    assert pending and pending.reason == "stale", "the close is in the durable state, not on the topic"
    assert [e.state for e in _episodes(s)] == ["open"]
    asyncio.run(_set_topic_config(s, s.kafka.episodes_topic, {"max.message.bytes": "1048588"}))
    s.episodes.stale_after_s = 3600.0
    proc = start_worker_process(s, log)
    try:
        closes = wait_until(lambda: [e for e in _episodes(s) if e.state == "closed"], 90, "the re-sent close",
                            proc=proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert (closes[0].reason, closes[0].seq) == ("stale", pending.seq)
    assert _states(s, "pending") is None, "cleared once acknowledged"
    view = SuppressionView()
    for e in _episodes(s):
        view.apply(e)
    assert view.status("bed-pending") == "off"


# -- helpers ------------------------------------------------------------------------------------------
async def _until(condition, timeout_s: float, what: str, slow: bool = False):
    deadline = time.monotonic() + timeout_s
    while not (await asyncio.to_thread(condition) if slow else condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.3)


def _episodes(s) -> list:
    return [decode_episode(r.value) for r in asyncio.run(read_topic(s.kafka, s.kafka.episodes_topic, timeout_s=3))]


def _states(s, what: str):
    """From the state topic (latest record per key): whether an episode is open / closed, or the pending
    message of the one patient."""
    latest = {}
    for r in asyncio.run(read_records(s.kafka, [s.kafka.state_topic], timeout_s=3, idle_polls=1)):
        if parse_state_key(r.key) is not None:
            latest[r.key] = r.value
    episodes = [PatientState.from_bytes(v)[1].episode for v in latest.values() if v is not None]
    if what == "pending":
        return next((e.pending for e in episodes if e.pending is not None), None)
    return any((e.open_start_ns is not None) == (what == "open") and e.seq > 0 for e in episodes)


async def _set_topic_config(s, topic: str, configs: dict) -> None:
    admin = make_admin(s.kafka)
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs=configs)])
    finally:
        await admin.close()
    await asyncio.sleep(0)
    print(orjson.dumps({"topic": topic, **configs}).decode())
