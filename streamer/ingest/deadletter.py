"""Dead-letter records: the original key and bytes, with the reason and source position in headers."""

from __future__ import annotations

import asyncio

from aiokafka.errors import KafkaError

from streamer.checkpointing.outputs import BackgroundSends
from streamer.kafka.clients import retriable
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
    ledger until it is published (acknowledged, or in its partition's open transaction), so a crash before
    that re-reads it instead of losing it."""

    def __init__(self, topic: str, outputs, ledger, metrics, settled: asyncio.Event):
        self.topic, self.outputs, self.ledger, self.metrics, self.settled = topic, outputs, ledger, metrics, settled
        self.background = BackgroundSends()
        self.max_bytes = 900_000  # under the producer's max_request_size (1 MiB) with room for the batch

    def send(self, tp, record, reason: str, detail: str, held: bool = True) -> None:
        """Dead-letter `record` on behalf of input partition `tp`. `held`: the record is one of tp's own, so
        tp's commit waits for it; a record of another topic (an unreadable state record) is not."""
        hold = self.ledger.hold(tp, record.offset) if held else None
        key = record.key.decode("utf-8", "replace") if record.key else None
        log.warning("dead_letter", reason=reason, detail=detail[:200], patient=patient_ref(key) if key else None,
                    topic=record.topic, partition=record.partition, offset=record.offset)
        self.background.spawn(self._send(tp, record, reason, detail, hold))

    async def _send(self, tp, record, reason: str, detail: str, hold) -> None:
        headers = dead_letter_headers(reason, detail, record.topic, record.partition, record.offset)
        if self.outputs.exactly_once:
            await self._send_in_transaction(tp, record, headers, hold)
        else:
            await self._send_acknowledged(tp, record, reason, headers)
            self.ledger.release(hold)
        self.settled.set()
        self.metrics.dead_letters.labels(reason).inc()

    async def _send_acknowledged(self, tp, record, reason: str, headers) -> None:
        async def attempt(value, hdrs):
            await self.outputs.send_acknowledged(tp, self.topic, value, key=record.key, headers=hdrs)

        try:
            await attempt(record.value or b"", headers)
        except KafkaError as exc:
            if retriable(exc):
                raise
            # e.g. the record plus headers is over the producer's size limit: a small dead letter that
            # still identifies it, so the partition moves on
            log.warning("dead_letter_replaced", error=repr(exc)[:200], topic=tp.topic,
                        partition=tp.partition, offset=record.offset)
            try:
                await attempt(*oversized_dead_letter(record, headers, repr(exc)))
            except KafkaError as again:
                if retriable(again):
                    raise
                # the topic refuses even the stand-in (its size limit, a policy): released with an error and
                # a metric, so one bad record never stops its partition's other patients (a crash loop would)
                log.error("dead_letter_failed", reason=reason, error=repr(again)[:200], topic=record.topic,
                          partition=record.partition, offset=record.offset)
                self.metrics.dead_letters_failed.labels(reason).inc()

    async def _send_in_transaction(self, tp, record, headers, hold) -> None:
        value = record.value or b""
        if len(value) + len(record.key or b"") + sum(len(k) + len(v) for k, v in headers) > self.max_bytes:
            # a refused record would fail the whole transaction: send the small stand-in at once
            log.warning("dead_letter_replaced", error="over the producer's max request size", topic=tp.topic,
                        partition=tp.partition, offset=record.offset)
            value, headers = oversized_dead_letter(record, headers, "record too large for a dead letter")
        async with self.outputs.gate(tp) as owned:
            if not owned or (hold is not None and not self.ledger.is_current(hold)):
                return  # revoked meanwhile: the partition's owner reads the record again
            fut = await self.outputs.send(tp, self.topic, value, key=record.key, headers=headers)
            self.ledger.release(hold)
        await fut
