"""Which partition a key belongs to, as the producers that write it decide (kafka.input_partitioner), and
where the worker's outputs go.

murmur2: Kafka's default partitioner (the Java client; librdkafka with partitioner=murmur2_random).
crc32: librdkafka's default (consistent_random), for a fleet of gateways that all use it.
"""

from __future__ import annotations

import functools
import zlib

from aiokafka.partitioner import murmur2

PARTITIONERS = ("murmur2", "crc32")


@functools.lru_cache(maxsize=1 << 16)  # one entry per patient and partition count: hashing once, not per record
def home_partition(key: bytes, partitions: int, partitioner: str = "murmur2") -> int:
    if partitioner == "crc32":
        return zlib.crc32(key) % partitions
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class OutputRouting:
    """Which output partition a record of input partition `tp` goes to. Output topics with as many partitions
    as the input: the same number (a patient's outputs beside its input, whatever the monitors'
    partitioner). Otherwise the key under the input's partitioner (kafka.input_partitioner), so one
    patient's outputs still stay in one partition; without a key, the producer's choice."""

    def __init__(self, counts: dict[str, int], partitioner: str):
        self.counts, self.partitioner = counts, partitioner

    def partition(self, tp, topic: str, key: bytes | None) -> int | None:
        n_out = self.counts.get(topic)
        n_in = self.counts.get(getattr(tp, "topic", None))
        if not n_out:
            return None
        if n_in == n_out and isinstance(getattr(tp, "partition", None), int):
            return tp.partition
        return home_partition(key, n_out, self.partitioner) if key else None
