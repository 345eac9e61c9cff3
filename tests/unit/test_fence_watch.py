"""FenceWatch (runtime/assembly.py): a fence that costs several partitions at once (kafka.transactions =
per_worker loses the worker's one transaction) is one fence: each partition closed dirty, one count, one
rejoin; the tolerance counts such fences, not partitions."""

from __future__ import annotations

from aiokafka import TopicPartition

from streamer.metrics import Metrics
from streamer.partitions import OwnedPartitions
from streamer.runtime.assembly import FenceWatch


def _watch(n: int, tolerated: int = 2):
    partitions = OwnedPartitions()
    tps = [TopicPartition("in", p) for p in range(n)]
    for tp in tps:
        partitions.open(tp)
    rejoins, failures = [], []
    metrics = Metrics()
    watch = FenceWatch(metrics, partitions, lambda: rejoins.append(1), failures.append, tolerated=tolerated,
                       clock=lambda: 0.0)
    return watch, partitions, tps, metrics, rejoins, failures


def test_a_fence_of_every_partition_at_once_counts_once_and_rejoins_once():
    watch, partitions, tps, metrics, rejoins, failures = _watch(8)
    watch.together(tps)
    assert not partitions and all(partitions.held(tp).fenced for tp in tps)
    assert metrics.registry.get_sample_value("streamer_transactions_fenced_total") == 1
    assert rejoins == [1] and failures == []


def test_the_tolerance_counts_fences_not_partitions():
    watch, partitions, tps, metrics, rejoins, failures = _watch(8, tolerated=2)
    for _ in range(2):
        watch.together(tps)
    assert failures == [] and len(rejoins) == 2
    watch.together(tps[:1])
    assert len(failures) == 1 and "fenced 3 times" in str(failures[0])
