"""Restore time of patient states with 100,000 patients on Apache Kafka, before and after state.ttl_s.

1. 100,000 realistic patient states (each bed's grids and a closed episode, as a worker writes them) go to a
   compacted state topic of 8 partitions; a worker's restore (`read_states`, the code a new owner runs at
   assignment) reads every partition back: seconds, records per second, memory of the states held.
2. 90,000 of them are tombstoned, as state.ttl_s does for beds gone idle; once the broker's log cleaner
   has compacted the topic (segments rolled every second here, tombstones kept 1 s), the restore reads
   only the 10,000 active beds.

    python -m benchmarks.bench_restore [--patients 100000] [--record]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from aiokafka import TopicPartition
from aiokafka.admin import NewTopic

from streamer.kafka.clients import make_admin, make_consumer, make_producer
from streamer.settings import KafkaSettings
from streamer.state.changelog import read_states, state_key
from streamer.state.patients import EpisodeState, PatientState, SegmentState

PARTITIONS = 8
INPUT = "ecg.lead2"
STATE = "bench-restore.state"
COMPACT_FAST = {"cleanup.policy": "compact", "segment.ms": "1000", "min.cleanable.dirty.ratio": "0.01",
                "delete.retention.ms": "1000", "min.compaction.lag.ms": "0", "max.compaction.lag.ms": "2000"}


def state_of(i: int) -> PatientState:
    start = 1_795_000_000_000_000_000 + i * 977
    return PatientState(f"bed-{i:06d}", [SegmentState(start, start, "500", 8640 + i % 97),
                                         SegmentState(0, 0, "500", 179_500_000 + i % 13)],
                        EpisodeState(clean_streak=3, last_flagged_end_ns=start + 7 * 10**10, peak=0.73,
                                     flagged_windows=12, updated_at_s=1_764_000_000.0 + i,
                                     last_window=(start, start + 8630 * 10**10), seq=1_764_000_000_000_000 + 9),
                        seen_at_s=1_764_000_000.0 + i)


def partition_of(i: int) -> int:
    return i % PARTITIONS


async def write(k: KafkaSettings, patients: range, tombstone: bool) -> None:
    producer = make_producer(k, linger_ms=50, compression_type="lz4")
    await producer.start()
    try:
        futures = []
        for i in patients:
            st = state_of(i)
            value = None if tombstone else st.to_bytes(INPUT)
            futures.append(await producer.send(STATE, value, key=state_key(INPUT, st.patient_id),
                                               partition=partition_of(i)))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def restore(k: KafkaSettings, trace: bool = False) -> tuple[float, int, int, int]:
    """(seconds, records read, states restored, bytes the restored states hold: measured only with `trace`,
    which slows the restore itself several times)."""
    reader = make_consumer(k, group_id=None)
    await reader.start()
    try:
        gc.collect()
        if trace:
            tracemalloc.start()
        t0 = time.perf_counter()
        restored = await read_states(reader, STATE, [TopicPartition(INPUT, p) for p in range(PARTITIONS)])
        took = time.perf_counter() - t0
        held = tracemalloc.get_traced_memory()[0] if trace else 0
        tracemalloc.stop()
        return took, restored.records, sum(len(s) for s in restored.states.values()), held
    finally:
        await reader.stop()


async def roll_segments(k: KafkaSettings) -> None:
    """One small record per partition: the active segment (never compacted) rolls once segment.ms passed."""
    producer = make_producer(k)
    await producer.start()
    try:
        for p in range(PARTITIONS):
            await producer.send_and_wait(STATE, PatientState(f"roll-{p}").to_bytes(INPUT),
                                         key=state_key(INPUT, f"roll-{p}"), partition=p)
    finally:
        await producer.stop()


async def main(bootstrap: str, n: int, keep: int, record: bool) -> None:
    k = KafkaSettings(bootstrap_servers=bootstrap)
    admin = make_admin(k)
    await admin.start()
    await admin.create_topics([NewTopic(STATE, PARTITIONS, 1, topic_configs=COMPACT_FAST)])
    await admin.close()
    t0 = time.perf_counter()
    await write(k, range(n), tombstone=False)
    print(f"wrote {n} states in {time.perf_counter() - t0:.1f} s")
    took, records, states, _ = await restore(k)
    *_, held = await restore(k, trace=True)
    full = f"{states} states from {records} records in {took:.2f} s ({records / took:,.0f} records/s), " \
           f"{held / states:.0f} B per restored state"
    print("before ttl:", full)
    await write(k, range(keep, n), tombstone=True)  # what state.ttl_s writes for the beds gone idle
    deadline = time.monotonic() + 300
    while True:
        await asyncio.sleep(3)
        await roll_segments(k)
        took2, records2, states2, _ = await restore(k)
        print(f"  after tombstones: {records2} records, {states2} states, {took2:.2f} s")
        if records2 <= keep + 8 * 20 or time.monotonic() > deadline:
            break
    after = f"{states2} states from {records2} records in {took2:.2f} s ({records2 / took2:,.0f} records/s)"
    print("after ttl, compacted:", after)
    if record:
        from benchmarks.common import record as add_row

        add_row(f"restore of {n:,} patient states, 8 partitions, Apache Kafka 1 node (loopback)", full)
        add_row(f"restore after {n - keep:,} of them tombstoned (state.ttl_s) and compacted", after,
                baseline=f"{took:.2f} s", ratio=f"{took / took2:.1f}x faster")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=100_000)
    ap.add_argument("--keep", type=int, default=10_000, help="patients still active after the ttl")
    ap.add_argument("--bootstrap", help="an existing Apache Kafka (default: a node started here)")
    ap.add_argument("--record", action="store_true", help="append the figures to benchmarks/RESULTS.md")
    a = ap.parse_args()
    if a.bootstrap:
        asyncio.run(main(a.bootstrap, a.patients, a.keep, a.record))
        sys.exit(0)
    from tools.kafka_cluster import KafkaCluster

    with tempfile.TemporaryDirectory() as tmp:
        cluster = KafkaCluster(Path(tmp) / "kafka", extra_config={"log.cleaner.backoff.ms": "1000"}).start()
        try:
            asyncio.run(main(cluster.bootstrap, a.patients, a.keep, a.record))
        finally:
            cluster.stop()
