"""The cost of a checkpoint's transactions on Apache Kafka (issue 48 item 4), before and after a partition's
first output names its state partition too (`ask_for_partitions`): AddPartitionsToTxn and all requests a
transaction, the event loop's CPU a transaction (this process's main thread: aiokafka runs in it) and the
wall time of a checkpoint. The two variants alternate round by round in one process on one broker, so they
share the same minutes; "before" is the delivery with the call made a no-op.

Each round: every partition publishes one flag through `ExactlyOnceDelivery.deliver`, then one checkpoint
commits every partition (its flag, one state record and its offset: a transaction each, side by side).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
import uuid

from aiokafka import TopicPartition

from benchmarks.common import record
from streamer.delivery import CheckpointPlan, ExactlyOnceDelivery
from streamer.delivery.base import Stamped
from streamer.kafka.clients import ensure_topics, make_producer
from streamer.settings import KafkaSettings

ADD_PARTITIONS = 24


def counting_requests(make, counts: dict):
    """A producer factory like `make` whose producers count the requests their client sends, by API key
    into `counts` (24 AddPartitionsToTxn, 0 Produce, 25 AddOffsetsToTxn, 28 TxnOffsetCommit, 26 EndTxn)."""
    def counted_producer(*args, **kwargs):
        producer = make(*args, **kwargs)
        send = producer.client.send

        async def counted(node_id, request, *more, **named):
            counts[request.API_KEY] = counts.get(request.API_KEY, 0) + 1
            return await send(node_id, request, *more, **named)

        producer.client.send = counted
        return producer
    return counted_producer


async def one_variant(k: KafkaSettings, partitions: int, rounds: int, name_state: bool) -> dict:
    """`rounds` checkpoints over `partitions` partitions with one delivery; the per-transaction figures."""
    counts: dict = {}
    delivery = ExactlyOnceDelivery(k, counting_requests(lambda tid: make_producer(k, transactional_id=tid), counts))
    tps = [TopicPartition(k.input_topics[0], p) for p in range(partitions)]
    real = Stamped._with_its_state_partition
    if not name_state:
        Stamped._with_its_state_partition = lambda *_: None
    try:
        for tp in tps:
            await delivery.open(tp)
        await _round(k, delivery, tps, 0)  # warm: metadata, connections
        counts.clear()
        cpu0, walls = time.thread_time(), []
        for r in range(1, rounds + 1):
            t0 = time.perf_counter()
            await _round(k, delivery, tps, r)
            walls.append(time.perf_counter() - t0)
        cpu = time.thread_time() - cpu0
    finally:
        Stamped._with_its_state_partition = real
        await delivery.stop()
    txns = rounds * partitions
    return {"add_partitions": counts.get(ADD_PARTITIONS, 0) / txns, "requests": sum(counts.values()) / txns,
            "cpu_ms": cpu * 1000 / txns, "wall_ms": statistics.median(walls) * 1000}


async def _round(k: KafkaSettings, delivery: ExactlyOnceDelivery, tps: list, r: int) -> None:
    for tp in tps:
        async with delivery.deliver(tp) as block:
            await block.send(k.flags_topic, b'{"flag": %d}' % r, key=b"bed-%d" % tp.partition, urgent=True)
    plan = CheckpointPlan({tp: r + 1 for tp in tps},
                          lambda tp: [(k.state_topic, b"bed-%d" % tp.partition, b"state %d" % r, tp.partition)])
    committed = await delivery.checkpoint(set(tps), lambda _: plan, None, k.group_id)
    assert committed == {tp: r + 1 for tp in tps}, committed


async def main_async(args) -> None:
    from tools.kafka_cluster import KafkaCluster

    cluster = KafkaCluster(tempfile.mkdtemp(prefix="bench-txn-")).start()
    try:
        tag = uuid.uuid4().hex[:8]
        k = KafkaSettings(bootstrap_servers=cluster.bootstrap, input_topics=[f"in-{tag}"], flags_topic=f"flags-{tag}",
                          episodes_topic=f"episodes-{tag}", dead_letter_topic=f"dlq-{tag}", group_id=f"g-{tag}",
                          state_topic=f"state-{tag}", replication_factor=1, min_insync_replicas=1,
                          input_partitions=args.partitions, create_topics=True)
        await ensure_topics(k)
        results: dict[bool, list[dict]] = {True: [], False: []}
        for i in range(args.pairs * 2):
            name_state = i % 2 == 0 if args.after_first else i % 2 == 1
            results[name_state].append(await one_variant(k, args.partitions, args.rounds, name_state))
    finally:
        with contextlib.suppress(Exception):
            cluster.stop()

    def summary(runs: list[dict]) -> str:
        med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        cpus = ", ".join(f"{r['cpu_ms']:.2f}" for r in runs)
        return (f"{med['add_partitions']:.2f} AddPartitionsToTxn and {med['requests']:.2f} requests a transaction, "
                f"event loop {med['cpu_ms']:.2f} ms CPU a transaction (runs: {cpus}), a checkpoint of "
                f"{args.partitions} transactions {med['wall_ms']:.0f} ms wall (median)")

    before, after = summary(results[False]), summary(results[True])
    cpu_before = statistics.median(r["cpu_ms"] for r in results[False])
    ratio = cpu_before / statistics.median(r["cpu_ms"] for r in results[True])
    record(f"exactly-once transactions on Apache Kafka 4.4.0 (per_partition, {args.partitions} partitions, "
           f"{args.rounds} checkpoints a run, {args.pairs} runs of each variant alternating): a flag then the "
           f"checkpoint's state record and offset per transaction; before = the state partition asked for "
           f"when its record comes, after = named with the first flag (ask_for_partitions)",
           f"before: {before}; after: {after}", baseline=f"{cpu_before:.2f} ms",
           ratio=f"{ratio:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=100, help="checkpoints a run")
    ap.add_argument("--pairs", type=int, default=3, help="runs of each variant, alternating")
    ap.add_argument("--after-first", action="store_true", help="start with the 'after' variant")
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
