"""Dead-letter records: the original key, bytes, headers and timestamp, with the error and the source position in
the headers Kafka Streams' dead-letter queue writes (KIP-1034), so existing DLQ tooling reads them."""

from __future__ import annotations

import asyncio
import collections
import functools
import time

from aiokafka.errors import KafkaError

from streamer.delivery import BackgroundSends, Delivery
from streamer.kafka.clients import retriable
from streamer.logs import get_logger, patient_ref

log = get_logger("streamer.deadletter")


ERROR_CLASS = "__streams.errors.exception"  # the reason code, e.g. timestamp_jump (docs/messages.md lists them)
ERROR_MESSAGE = "__streams.errors.message"
SOURCE_TOPIC = "__streams.errors.topic"
SOURCE_PARTITION = "__streams.errors.partition"
SOURCE_OFFSET = "__streams.errors.offset"
_OURS = (ERROR_CLASS, ERROR_MESSAGE, SOURCE_TOPIC, SOURCE_PARTITION, SOURCE_OFFSET)
# The largest dead letter written as the record itself: a batch holding it alone (its value, key, headers
# and every framing byte, as aiokafka's batch builder bounds it), under the producer's max_request_size
# (1 MiB); a larger one goes as its small stand-in
MAX_DEAD_LETTER_BYTES = 900_000
# Margin kept under the dead-letter topic's max.message.bytes, beyond aiokafka's own bound
DEAD_LETTER_FRAMING_BYTES = 1_024
# A record key kept in a stand-in at most this long (a patient id is at most 128 characters); a longer one
# is named by its size and SHA-256 instead
STAND_IN_KEY_BYTES = 1_024
# The largest stand-in: its summary, our headers (the error message capped at 1,000 bytes, a topic name
# at most 249) and a key of STAND_IN_KEY_BYTES, with their batch. A dead-letter topic must take this much
# (runtime/startup.py refuses an exactly-once start below it)
STAND_IN_MAX_BYTES = 4_096


def batch_bytes(key: bytes | None, value: bytes | None, headers) -> int:
    """An upper bound on the bytes of a record batch holding this record alone (header keys as UTF-8,
    null header values, each field's varint framing), as aiokafka's batch builder bounds it."""
    from aiokafka.record.default_records import DefaultRecordBatchBuilder

    return DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers))


def dead_letter_headers(reason: str, detail: str, topic: str, partition: int, offset: int,
                        original=()) -> list[tuple[str, bytes]]:
    """The record's own headers (those not named like ours), then the error and where the record was."""
    kept = [(k, v) for k, v in (original or ()) if k not in _OURS]
    return [
        *kept,
        (ERROR_CLASS, reason.encode()),
        (ERROR_MESSAGE, detail.encode("utf-8", "replace")[:1000]),
        (SOURCE_TOPIC, topic.encode()),
        (SOURCE_PARTITION, str(partition).encode()),
        (SOURCE_OFFSET, str(offset).encode()),
    ]


def headers_dict(headers) -> dict[str, str]:
    return {k: (v or b"").decode("utf-8", "replace") for k, v in (headers or [])}


def reason_of(headers) -> str | None:
    return headers_dict(headers).get(ERROR_CLASS)


def oversized_dead_letter(record, headers: list[tuple[str, bytes]],
                          error: str) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    """A dead letter too large for the producer or the topic: (key, value, headers) of a small one in its
    place that identifies the original (size and SHA-256 of its value, and of its key when that is longer
    than STAND_IN_KEY_BYTES, its position and our headers). At most STAND_IN_MAX_BYTES in a batch."""
    import hashlib

    import orjson

    value = record.value or b""
    summary = {
        "value_omitted": "too_large",
        "value_size": len(value),
        "value_sha256": hashlib.sha256(value).hexdigest(),
        "error": error[:200],
    }
    key = record.key
    if key is not None and len(key) > STAND_IN_KEY_BYTES:
        summary.update(key_omitted="too_large", key_size=len(key), key_sha256=hashlib.sha256(key).hexdigest())
        key = None
    # the original headers may be what made it too large: only ours are kept
    return key, orjson.dumps(summary), [(k, v) for k, v in headers if k in _OURS] + [("value_omitted", b"too_large")]


def _timestamp(record) -> int | None:
    """The original record's timestamp (a state record built here may have none)."""
    ts = getattr(record, "timestamp", None)
    return ts if isinstance(ts, int) and ts >= 0 else None


class LogLimit:
    """At most `per_minute` log lines a minute for each reason; the rest are counted and said in one
    `dead_letters_not_logged` line with the first dead letter after that minute. A producer writing 100,000
    bad records must not write 35 MB of the worker's log: every dead letter is in its topic and in
    streamer_dead_letters_total."""

    def __init__(self, clock=time.monotonic, per_minute: int = 20):
        self.clock, self.per_minute = clock, per_minute
        self.minute_end = 0.0
        self.logged: collections.Counter = collections.Counter()
        self.skipped: collections.Counter = collections.Counter()

    def allow(self, reason: str) -> bool:
        now = self.clock()
        if now >= self.minute_end:
            if self.skipped:
                log.warning("dead_letters_not_logged", by_reason=dict(self.skipped), per_minute=self.per_minute)
            self.minute_end = now + 60.0
            self.logged.clear()
            self.skipped.clear()
        if self.logged[reason] < self.per_minute:
            self.logged[reason] += 1
            return True
        self.skipped[reason] += 1
        return False


class DeadLetters:
    """Sends rejected records to the dead-letter topic in the background; each stays held in the offsets
    ledger until it is published (acknowledged, or in its partition's open transaction), so a crash before
    that re-reads it instead of losing it."""

    def __init__(self, topic: str, delivery: Delivery, ledger, metrics, settled: asyncio.Event, clock=time.monotonic,
                 on_failure=None):
        self.topic, self.delivery, self.ledger, self.metrics, self.settled = topic, delivery, ledger, metrics, settled
        self.background = BackgroundSends(on_failure)  # a dead letter that fails for good is fatal
        self.max_bytes = MAX_DEAD_LETTER_BYTES  # lowered to the topic's own limit at start (`fit_to`)
        self.log_limit = LogLimit(clock)
        # per input partition, the dead letters waiting for their partition's sending task: a fetch's worth
        # goes in one delivery block (one task, one gate, one acknowledgement wait), so a flood of bad records
        # costs the other beds of the partition little more than reading them
        self._queued: dict = {}

    def fit_to(self, topic_max_message_bytes: int | None) -> None:
        """The dead-letter topic's max.message.bytes, read at start: a larger dead letter goes as its
        stand-in at once instead of being refused first (exactly once a refusal stops the worker). Never
        below STAND_IN_MAX_BYTES: a topic that small cannot take a stand-in either (startup.py)."""
        if topic_max_message_bytes is not None:
            self.max_bytes = max(STAND_IN_MAX_BYTES, min(MAX_DEAD_LETTER_BYTES,
                                                         topic_max_message_bytes - DEAD_LETTER_FRAMING_BYTES))

    def send(self, tp, record, reason: str, detail: str, held: bool = True) -> None:
        """Dead-letter `record` on behalf of input partition `tp`. `held`: the record is one of tp's own, so
        tp's commit waits for it; a record of another topic (an unreadable state record) is not."""
        hold = self.ledger.hold(tp, record.offset) if held else None
        if self.log_limit.allow(reason):
            key = record.key.decode("utf-8", "replace") if record.key else None
            log.warning("dead_letter", reason=reason, detail=detail[:200], patient=patient_ref(key) if key else None,
                        topic=record.topic, partition=record.partition, offset=record.offset)
        queue = self._queued.get(tp)
        if queue is None:
            queue = self._queued[tp] = []
            self.background.spawn(self._send_queued(tp))
        queue.append((record, reason, detail, hold))

    async def _send_queued(self, tp) -> None:
        """The dead letters `send` queued for `tp` until this task ran, in one delivery block. If a broker
        refuses the block, each goes again on its own, where a refused record is replaced by its stand-in
        (none of them counted yet: at least once counts a block only once all of it is acknowledged)."""
        items = self._queued.pop(tp)
        prepared = [(record, reason, *self._sized(tp, record, reason, detail), hold)
                    for record, reason, detail, hold in items]
        try:
            async with self.delivery.deliver(tp) as block:
                if block.owned:  # else revoked meanwhile: the partition's owner reads the records again
                    for record, _, key, value, headers, hold in prepared:
                        if hold is None or self.ledger.is_current(hold):
                            await block.send(self.topic, value, key=key, headers=headers,
                                         timestamp_ms=_timestamp(record),
                                         counted=functools.partial(self.ledger.release, hold))
        except KafkaError as exc:
            if retriable(exc):
                raise
            for record, reason, detail, hold in items:
                await self._send(tp, record, reason, detail, hold)
            return
        self.settled.set()
        for reason, n in collections.Counter(reason for _, reason, _, _ in items).items():
            self.metrics.dead_letters.labels(reason).inc(n)

    def _sized(self, tp, record, reason: str, detail: str) -> tuple[bytes | None, bytes, list]:
        """The dead letter's key, value and headers: the record's own, or its small stand-in when the
        producer or the topic would refuse it (exactly once that would fail the whole transaction)."""
        headers = dead_letter_headers(reason, detail, record.topic, record.partition, record.offset,
                                      record.headers)
        value = record.value or b""
        # counted as the broker counts it: a header key is UTF-8, a header value may be null (a hostile
        # record's 300,000 empty headers weigh about a megabyte, not 300 kB)
        if batch_bytes(record.key, value, headers) > self.max_bytes:
            log.warning("dead_letter_replaced", error=f"over {self.max_bytes} bytes", topic=tp.topic,
                        partition=tp.partition, offset=record.offset)
            return oversized_dead_letter(record, headers, "record too large for a dead letter")
        return record.key, value, headers

    async def _send(self, tp, record, reason: str, detail: str, hold) -> None:
        key, value, headers = self._sized(tp, record, reason, detail)
        try:
            await self._deliver(tp, record, key, value, headers, hold)
        except KafkaError as exc:  # the broker refused it (exactly once a refusal is TransactionFailed, fatal)
            if retriable(exc):
                raise
            # e.g. the topic's own size limit: a small dead letter that still identifies it, so the partition
            # moves on
            log.warning("dead_letter_replaced", error=repr(exc)[:200], topic=tp.topic,
                        partition=tp.partition, offset=record.offset)
            try:
                await self._deliver(tp, record, *oversized_dead_letter(record, headers, repr(exc)), hold)
            except KafkaError as again:
                if retriable(again):
                    raise
                # the topic refuses even the stand-in (its size limit, a policy): released with an error and
                # a metric, so one bad record never stops its partition's other patients (a crash loop would)
                log.error("dead_letter_failed", reason=reason, error=repr(again)[:200], topic=record.topic,
                          partition=record.partition, offset=record.offset)
                self.metrics.dead_letters_failed.labels(reason).inc()
                self.ledger.release(hold)
        self.settled.set()
        self.metrics.dead_letters.labels(reason).inc()

    async def _deliver(self, tp, record, key: bytes | None, value: bytes, headers, hold) -> None:
        async with self.delivery.deliver(tp) as block:
            if not block.owned or (hold is not None and not self.ledger.is_current(hold)):
                return  # revoked meanwhile: the partition's owner reads the record again
            await block.send(self.topic, value, key=key, headers=headers, timestamp_ms=_timestamp(record),
                         counted=functools.partial(self.ledger.release, hold))
