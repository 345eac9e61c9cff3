"""Print flags and episodes as they arrive (demo, and a quick look at a live deployment)."""

from __future__ import annotations

import asyncio
import time

import orjson

from streamer.client import DEFAULT_SKEW_S, MessageError, SuppressionView, decode_episode
from streamer.kafka.clients import check_connection, make_consumer, require_topics
from streamer.settings import KafkaSettings


def format_flag(f: dict) -> str:
    t = time.strftime("%H:%M:%S", time.gmtime(f["window_start_ns"] / 1e9))
    if f["status"] == "scored":
        mark = "ARTIFACT" if f["artifact"] else "clean   "
        return (f"flag    {f['patient_id']:<10} {t}+10s  {mark} p={f['probability']:.3f}  "
                f"latency={f['latency_ms']:.0f}ms")
    return f"flag    {f['patient_id']:<10} {t}+10s  {f['status']} ({f['reason']})"


def format_episode(e: dict) -> str | None:
    """One line per opening and closing (None for a lease renewal: nothing changes for a reader)."""
    if e.get("renewal"):
        return None
    if e.get("reason") == "state_lost":
        return f"EPISODE {e['patient_id']:<10} closed: its stored state was lost (conservative close)"
    t0 = time.strftime("%H:%M:%S", time.gmtime(e["start_ns"] / 1e9))
    if e["state"] == "open":
        lease = (e.get("lease_ns") or 0) / 1e9
        return (f"EPISODE {e['patient_id']:<10} opened at {t0}, peak p={e['peak_probability']:.3f}: suppress ECG "
                f"alarms (lease {lease:.0f} s, renewed while it lasts)")
    t1 = time.strftime("%H:%M:%S", time.gmtime(e["end_ns"] / 1e9))
    why = " (stale: no scored window lately)" if e.get("reason") == "stale" else ""
    return f"EPISODE {e['patient_id']:<10} closed: {t0} -> {t1}, peak p={e['peak_probability']:.3f}{why}"


def lapsed_line(patient_id: str) -> str:
    return f"EPISODE {patient_id:<10} lease lapsed with no renewal: feed silent, alarms NOT suppressed"


async def watch(k: KafkaSettings, seconds: float | None = None, from_beginning: bool = False, sink=print,
                skew_s: float = DEFAULT_SKEW_S) -> int:
    # no group: watching never commits offsets or takes partitions from anyone
    await check_connection(k)
    await require_topics(k, [k.flags_topic, k.episodes_topic])
    consumer = make_consumer(k, group_id=None, auto_offset_reset="earliest" if from_beginning else "latest")
    await consumer.start()
    consumer.subscribe([k.flags_topic, k.episodes_topic])
    deadline = time.monotonic() + seconds if seconds else None
    view = SuppressionView(skew_s=skew_s)
    suppressing: set[str] = set()  # patients shown suppressed: each lapse is said once
    try:
        while deadline is None or time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for tp, records in batch.items():
                for r in records:
                    if tp.topic == k.flags_topic:
                        sink(format_flag(orjson.loads(r.value)))
                        continue
                    try:
                        episode = decode_episode(r.value)
                    except MessageError as exc:
                        sink(f"EPISODE unreadable at offset {r.offset}: {exc}")
                        continue
                    if view.apply(episode) and (line := format_episode(orjson.loads(r.value))) is not None:
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
