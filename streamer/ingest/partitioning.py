"""Records on the wrong input partition (the partitioners themselves: kafka/partitioning.py). A record
outside its patient's home partition would give one patient two owners, each publishing its own flags for
the same window ids: the worker dead-letters it (wrong_partition) instead.

murmur2: Kafka's default partitioner (the Java client; librdkafka with partitioner=murmur2_random).
crc32: librdkafka's default (consistent_random), for a fleet of gateways that all use it.
"""

from __future__ import annotations


from streamer.kafka.partitioning import PARTITIONERS, home_partition
from streamer.logs import get_logger

log = get_logger(__name__)


class PartitionerWatch:
    """Tells, within seconds and once a minute at most, that the gateways key records with another partitioner
    than kafka.input_partitioner (librdkafka's default is crc32, the Java client's murmur2): the records are
    still refused one by one (wrong_partition), but the log line names the setting and the value that fits.

    Counted in streamer_input_partitioner_mismatch_total{topic, fits} (alert StreamerInputPartitionerMismatch)."""

    def __init__(self, rule: str, topics: list[str], counter, every_s: float = 60.0):
        self.rule, self.counter, self.every_s = rule, counter, every_s
        self.others = [p for p in PARTITIONERS if p != rule]
        for topic in topics:  # exported at 0 from the start, so the first mismatch is an increase
            for fits in (*self.others, "neither"):
                counter.labels(topic, fits)
        self.since: dict[tuple[str, str], int] = {}
        self.next_log = 0.0

    def mismatch(self, tp, key: bytes, partitions: int, now: float) -> str:
        """A record of partition `tp` whose key maps elsewhere under `rule`: returns the partitioner it fits."""
        fits = next((p for p in self.others if home_partition(key, partitions, p) == tp.partition), "neither")
        self.counter.labels(tp.topic, fits).inc()
        self.since[(tp.topic, fits)] = self.since.get((tp.topic, fits), 0) + 1
        if now >= self.next_log:
            self.next_log = now + self.every_s
            counts = {f"{topic}:{f}": n for (topic, f), n in sorted(self.since.items())}
            self.since.clear()
            best = max(counts.items(), key=lambda kv: kv[1])[0].rsplit(":", 1)[1]
            hint = (f'set kafka.input_partitioner = "{best}" (STREAMER_KAFKA__INPUT_PARTITIONER={best}) if every '
                    "gateway uses it" if best != "neither" else
                    "the producers send patients to partitions of their own choosing: key each record by patient "
                    f"id with {self.rule}")
            log.error("input_partitioner_mismatch", setting="kafka.input_partitioner", configured=self.rule,
                      fits=best, records=counts, hint=hint)
        return fits
