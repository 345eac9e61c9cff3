"""Print flags and episodes as they arrive (demo, and a quick look at a live deployment)."""

from __future__ import annotations

import asyncio
import time

import orjson

from streamer.kafka.clients import check_tls, make_consumer
from streamer.settings import KafkaSettings


def format_flag(f: dict) -> str:
    t = time.strftime("%H:%M:%S", time.gmtime(f["window_start_ns"] / 1e9))
    if f["status"] == "scored":
        mark = "ARTIFACT" if f["artifact"] else "clean   "
        return f"flag    {f['patient_id']:<10} {t}+10s  {mark} p={f['probability']:.3f}  latency={f['latency_ms']:.0f}ms"
    return f"flag    {f['patient_id']:<10} {t}+10s  {f['status']} ({f['reason']})"


def format_episode(e: dict) -> str:
    t0 = time.strftime("%H:%M:%S", time.gmtime(e["start_ns"] / 1e9))
    if e["state"] == "open":
        return f"EPISODE {e['patient_id']:<10} opened at {t0}, peak p={e['peak_probability']:.3f}: suppress ECG alarms"
    t1 = time.strftime("%H:%M:%S", time.gmtime(e["end_ns"] / 1e9))
    why = " (stale: no scored window lately)" if e.get("reason") == "stale" else ""
    return f"EPISODE {e['patient_id']:<10} closed: {t0} -> {t1}, peak p={e['peak_probability']:.3f}{why}"


async def watch(k: KafkaSettings, seconds: float | None = None, from_beginning: bool = False, sink=print) -> int:
    # no group: watching never commits offsets or takes partitions from anyone
    await check_tls(k)
    consumer = make_consumer(k, group_id=None, auto_offset_reset="earliest" if from_beginning else "latest")
    await consumer.start()
    consumer.subscribe([k.flags_topic, k.episodes_topic])
    deadline = time.monotonic() + seconds if seconds else None
    try:
        while deadline is None or time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for tp, records in batch.items():
                for r in records:
                    doc = orjson.loads(r.value)
                    sink(format_flag(doc) if tp.topic == k.flags_topic else format_episode(doc))
    except asyncio.CancelledError:
        pass
    finally:
        await consumer.stop()
    return 0
