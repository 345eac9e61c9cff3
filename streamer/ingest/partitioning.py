"""Which input partition a patient's records belong to. A record elsewhere would give one patient two owners,
each publishing its own flags for the same window ids: the worker dead-letters it (wrong_partition) instead.

murmur2: Kafka's default partitioner (the Java client; librdkafka with partitioner=murmur2_random).
crc32: librdkafka's default (consistent_random), for a fleet of gateways that all use it.
"""

from __future__ import annotations

import functools
import zlib

from aiokafka.partitioner import murmur2


@functools.lru_cache(maxsize=1 << 16)  # one entry per patient and partition count: hashing once, not per record
def home_partition(key: bytes, partitions: int, partitioner: str = "murmur2") -> int:
    if partitioner == "crc32":
        return zlib.crc32(key) % partitions
    return (murmur2(key) & 0x7FFFFFFF) % partitions
