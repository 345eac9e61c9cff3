"""The partition a patient belongs to, as the producers compute it."""

from __future__ import annotations

import zlib

import pytest

from streamer.kafka.partitioning import home_partition

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


class _Tp:
    def __init__(self, topic: str, partition: int):
        self.topic, self.partition = topic, partition


def _key_where(rule: str, other: str, n: int, want_other_fits: bool, start: int = 0) -> tuple[bytes, int]:
    """A key and a partition it is on under `other` (or under neither), never its `rule` home."""
    for i in range(start, 10_000):
        key = f"bed-{i}".encode()
        home, there = home_partition(key, n, rule), home_partition(key, n, other)
        if home == there:
            continue
        if want_other_fits:
            return key, there
        nowhere = next(p for p in range(n) if p not in (home, there))
        return key, nowhere
    raise AssertionError("no such key")


def test_partitioner_watch_names_the_partitioner_that_fits_once_a_minute(capsys):
    from prometheus_client import CollectorRegistry, Counter

    from streamer.ingest.partitioning import PartitionerWatch
    from streamer.logs import configure_logging

    configure_logging("json", "info")
    counter = Counter("mismatch_total", "test", ["topic", "fits"], registry=CollectorRegistry())
    watch = PartitionerWatch("murmur2", ["ecg"], counter, every_s=60.0)
    assert counter.labels("ecg", "crc32")._value.get() == 0  # exported from the start
    key, partition = _key_where("murmur2", "crc32", 8, want_other_fits=True)
    assert watch.mismatch(_Tp("ecg", partition), key, 8, now=0.0) == "crc32"
    for t in range(1, 30):
        watch.mismatch(_Tp("ecg", partition), key, 8, now=float(t))
    lost_key, nowhere = _key_where("murmur2", "crc32", 8, want_other_fits=False)
    assert watch.mismatch(_Tp("ecg", nowhere), lost_key, 8, now=30.0) == "neither"
    assert counter.labels("ecg", "crc32")._value.get() == 30 and counter.labels("ecg", "neither")._value.get() == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if "input_partitioner_mismatch" in line]
    assert len(lines) == 1, lines  # one error at the first record, not one per record
    assert '"fits": "crc32"' in lines[0] and "kafka.input_partitioner" in lines[0]
    watch.mismatch(_Tp("ecg", partition), key, 8, now=61.0)
    again = [line for line in capsys.readouterr().err.splitlines() if "input_partitioner_mismatch" in line]
    assert len(again) == 1 and '"ecg:crc32": 30' in again[0] and '"ecg:neither": 1' in again[0], again
