"""Dead-letter records: the original key and bytes, with the reason and source position in headers."""

from __future__ import annotations

import asyncio

from aiokafka.errors import KafkaError

from streamer.kafka.clients import retriable, send_with_retry
from streamer.logs import get_logger, patient_ref

log = get_logger("streamer.deadletter")


def dead_letter_headers(reason: str, detail: str, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    return [
        ("reason", reason.encode()),
        ("detail", detail.encode("utf-8", "replace")[:1000]),
        ("source_topic", topic.encode()),
        ("source_partition", str(partition).encode()),
        ("source_offset", str(offset).encode()),
    ]


def headers_dict(headers) -> dict[str, str]:
    return {k: v.decode("utf-8", "replace") for k, v in (headers or [])}


def oversized_dead_letter(record, headers: list[tuple[str, bytes]], error: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A dead letter the producer refused (too large with its headers): a small one in its place that
    identifies the original (size and SHA-256 of its value, its position and original headers)."""
    import hashlib

    import orjson

    value = record.value or b""
    summary = {
        "value_omitted": "too_large",
        "value_size": len(value),
        "value_sha256": hashlib.sha256(value).hexdigest(),
        "original_headers": {k: v.decode("utf-8", "replace")[:200] for k, v in (record.headers or [])},
        "error": error[:200],
    }
    return orjson.dumps(summary), [*headers, ("value_omitted", b"too_large")]



class DeadLetters:
    """Sends rejected records to the dead-letter topic in the background; each stays held in the offsets
    ledger until the broker has it, so a crash before that re-reads it instead of losing it."""

    def __init__(self, topic: str, producer, ledger, metrics, settled: asyncio.Event):
        self.topic, self.producer, self.ledger, self.metrics, self.settled = topic, producer, ledger, metrics, settled
        self.tasks: set[asyncio.Task] = set()

    def send(self, tp, record, reason: str, detail: str) -> None:
        hold = self.ledger.hold(tp, record.offset)
        key = record.key.decode("utf-8", "replace") if record.key else None
        log.warning("dead_letter", reason=reason, detail=detail[:200], patient=patient_ref(key) if key else None,
                    topic=tp.topic, partition=tp.partition, offset=record.offset)
        task = asyncio.create_task(self._send(tp, record, reason, detail, hold))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, tp, record, reason: str, detail: str, hold) -> None:
        headers = dead_letter_headers(reason, detail, tp.topic, tp.partition, record.offset)
        try:
            await send_with_retry(self.producer, self.topic, record.key, record.value or b"", headers)
        except KafkaError as exc:
            if retriable(exc):
                raise
            # e.g. the record plus headers is over the producer's size limit: a small dead letter that
            # still identifies it, so the partition moves on
            log.warning("dead_letter_replaced", reason=reason, error=repr(exc)[:200], topic=tp.topic,
                        partition=tp.partition, offset=record.offset)
            value, small_headers = oversized_dead_letter(record, headers, repr(exc))
            await send_with_retry(self.producer, self.topic, record.key, value, small_headers)
        self.ledger.release(hold)
        self.settled.set()
        self.metrics.dead_letters.labels(reason).inc()
