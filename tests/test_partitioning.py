"""The partition a patient belongs to, as the producers compute it."""

from __future__ import annotations

import zlib

import pytest

from streamer.ingest.partitioning import home_partition

# Kafka's own test vectors for Utils.murmur2 (signed 32-bit), which the Java producer's default uses.
KAFKA_MURMUR2 = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
                 b"a-little-bit-longer-string": -1486304829}


@pytest.mark.parametrize("key, signed", KAFKA_MURMUR2.items())
def test_murmur2_partitions_as_the_java_producer(key, signed):
    for n in (1, 3, 8, 24, 1000):
        assert home_partition(key, n) == (signed & 0x7FFFFFFF) % n


def test_crc32_partitions_as_librdkafkas_default():
    assert zlib.crc32(b"123456789") == 0xCBF43926  # the CRC-32 check value librdkafka's rd_crc32 also has
    for key in (b"bed-1", b"MRN-0012345", "Zoë-7".encode()):
        assert home_partition(key, 12, "crc32") == zlib.crc32(key) % 12
    assert {home_partition(f"bed-{i}".encode(), 8, "crc32") for i in range(200)} == set(range(8))
