"""Print flags and episodes as they arrive (demo, and a quick look at a live deployment).

Every record is read with the client's decoders (their type and range checks): one that fails them is said
in one line naming its topic, partition and offset, and watching goes on. A producer on the flags or
episodes topic cannot stop it or make it print a field it did not check."""

from __future__ import annotations

import asyncio
import time

from streamer.client import (DEFAULT_MAX_LEASE_S, DEFAULT_SKEW_S, Episode, Flag, MessageError, SuppressionView,
                             decode_episode, decode_flag)
from streamer.kafka.clients import check_connection, make_consumer, require_topics
from streamer.logs import printable
from streamer.settings import KafkaSettings


def _clock(ns: int) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(ns / 1e9))


def format_flag(f: Flag) -> str:
    if f.scored:
        mark = "ARTIFACT" if f.artifact else "clean   "
        return printable(f"flag    {f.patient_id:<10} {_clock(f.window_start_ns)}+10s  {mark} p={f.probability:.3f}  "
                      f"latency={f.latency_ms:.0f}ms")
    return printable(f"flag    {f.patient_id:<10} {_clock(f.window_start_ns)}+10s  {f.status} ({f.reason})")


def format_episode(e: Episode) -> str | None:
    """One line per opening and closing (None for a lease renewal: nothing changes for a reader)."""
    line = _episode_line(e)
    return None if line is None else printable(line)


def _episode_line(e: Episode) -> str | None:
    if e.renewal:
        return None
    if e.is_open and e.start_ns is None:
        return f"EPISODE {e.patient_id:<10} opened (start not given): suppress ECG alarms while its lease lasts"
    if e.reason == "state_lost" or e.start_ns is None:
        return f"EPISODE {e.patient_id:<10} closed: its stored state was lost (conservative close)"
    peak = f"{e.peak_probability:.3f}" if e.peak_probability is not None else "?"
    if e.is_open:
        return (f"EPISODE {e.patient_id:<10} opened at {_clock(e.start_ns)}, peak p={peak}: suppress ECG alarms "
                f"(lease {(e.lease_ns or 0) / 1e9:.0f} s, renewed while it lasts)")
    end = _clock(e.end_ns) if e.end_ns is not None else "?"
    why = " (stale: no scored window lately, or one the model could not score)" if e.reason == "stale" else ""
    return f"EPISODE {e.patient_id:<10} closed: {_clock(e.start_ns)} -> {end}, peak p={peak}{why}"


def lapsed_line(patient_id: str) -> str:
    return printable(f"EPISODE {patient_id:<10} lease lapsed with no renewal: feed silent, alarms NOT suppressed")


def unreadable_line(r, exc: Exception) -> str:
    """One line for a record the decoders refused: where it is and why (the reason is the decoder's, cut)."""
    return printable(f"unreadable record at {r.topic}[{r.partition}]@{r.offset}: {str(exc)[:200]}")


async def watch(k: KafkaSettings, seconds: float | None = None, from_beginning: bool = False, sink=print,
                skew_s: float = DEFAULT_SKEW_S, max_lease_s: float = DEFAULT_MAX_LEASE_S) -> int:
    # no group: watching never commits offsets or takes partitions from anyone
    await check_connection(k)
    await require_topics(k, [k.flags_topic, k.episodes_topic])
    consumer = make_consumer(k, group_id=None, auto_offset_reset="earliest" if from_beginning else "latest")
    await consumer.start()
    consumer.subscribe([k.flags_topic, k.episodes_topic])
    deadline = time.monotonic() + seconds if seconds else None
    view = SuppressionView(skew_s=skew_s, max_lease_s=max_lease_s)
    suppressing: set[str] = set()  # patients shown suppressed: each lapse is said once
    try:
        while deadline is None or time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for tp, records in batch.items():
                for r in records:
                    try:
                        if tp.topic == k.flags_topic:
                            sink(format_flag(decode_flag(r.value)))
                            continue
                        episode = decode_episode(r.value)
                    except MessageError as exc:  # a null value (a tombstone) too
                        sink(unreadable_line(r, exc))
                        continue
                    if view.apply(episode) and (line := format_episode(episode)) is not None:
                        sink(line)
                    if view.suppressed(episode.patient_id):
                        suppressing.add(episode.patient_id)
            for pid in list(suppressing):
                if not view.suppressed(pid):
                    suppressing.discard(pid)
                    if view.status(pid) == "lapsed":
                        sink(lapsed_line(pid))
    except asyncio.CancelledError:
        pass
    finally:
        await consumer.stop()
    return 0
