"""Where a gateway's chunks go: one ordered, confirmed feed into the input topic.

Invariants:
- `deliver(chunks)` returns only once the brokers acknowledged every one of them (acks=all where the
  brokers allow it), so a gateway that answers its peer after `deliver` never acknowledges a sample Kafka
  could still lose; it raises `SinkFailed` when they could not be delivered, and the peer is answered with
  an error instead.
- No chunk lands behind a newer one of its bed (streamer.ingest.producer.OrderedSender does the resends).
- Every connection shares one sender and one confirmation: a confirmation covers every waiter that sent
  before it began (group commit), so many monitors cost one round trip, not one each. While it waits for
  the brokers, new chunks go on being sent (idempotent producer: the brokers keep each partition's order);
  only a failed delivery takes the sender to itself, for the ordered resend (OrderedSender.flush).
- Memory is bounded by the sender's `max_unconfirmed` chunks: `deliver` waits when they are out.
"""

from __future__ import annotations

import asyncio
from typing import Iterable

from aiokafka.errors import KafkaError

from streamer.ingest.contract import Chunk
from streamer.ingest.deadletter import dead_letter_headers
from streamer.ingest.producer import Encoding, OrderedSender
from streamer.kafka.clients import retry_kafka, start_ordered_producer
from streamer.logs import get_logger
from streamer.settings import KafkaSettings

log = get_logger("streamer.gateways")


class SinkFailed(RuntimeError):
    """The brokers refused the chunks for a reason retrying cannot fix (no WRITE ACL, a record too large):
    nothing handed to `deliver` since the last confirmation may be acknowledged."""


class ConfirmedSink:
    """The input topic as a gateway sees it. `async with ConfirmedSink.open(settings) as sink:
    await sink.deliver(chunks)`."""

    def __init__(self, sender: OrderedSender, dead_letter_topic: str):
        self.sender = sender
        self.dead_letter_topic = dead_letter_topic
        self.delivered_chunks = 0
        self.dead_letters = 0
        self._lock = asyncio.Lock()  # OrderedSender is driven by one task at a time
        self._sent = 0  # deliveries handed to the sender
        self._confirmed = 0  # deliveries the brokers acknowledged (all before it too)
        self._changed = asyncio.Condition()
        self._wake = asyncio.Event()
        self._failure: BaseException | None = None
        self._flusher: asyncio.Task | None = None

    @classmethod
    async def open(cls, k: KafkaSettings, encoding: Encoding = "binary", max_unconfirmed: int = 2000,
                   linger_ms: int = 5) -> "ConfirmedSink":
        sender = OrderedSender(lambda: start_ordered_producer(k, linger_ms=linger_ms),
                               k.input_topics[0], encoding, max_unconfirmed=max_unconfirmed)
        await sender.start()
        sink = cls(sender, k.dead_letter_topic)
        sink._flusher = asyncio.create_task(sink._confirm_loop(), name="sink-confirm")
        return sink

    async def __aenter__(self) -> "ConfirmedSink":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def deliver(self, chunks: Iterable[Chunk]) -> None:
        """Send the chunks (in order) and return once the brokers acknowledged them."""
        self._raise_if_failed()
        async with self._lock:
            self._raise_if_failed()
            count = 0
            try:
                for chunk in chunks:
                    await self.sender.send(chunk)
                    count += 1
            except KafkaError as exc:
                self._fail(exc)
                raise SinkFailed(f"the brokers refused a chunk: {exc!r}") from exc
            self._sent += 1
            mine = self._sent
        self._wake.set()
        async with self._changed:
            await self._changed.wait_for(lambda: self._confirmed >= mine or self._failure is not None)
        if self._confirmed < mine:
            self._raise_if_failed()
        self.delivered_chunks += count

    async def dead_letter(self, value: bytes, key: bytes | None, reason: str, detail: str, source: str) -> None:
        """A message a gateway could not use that holds patient data: to the dead-letter topic, with the
        reason in the headers Kafka Streams' dead-letter queue uses; `source` names the peer (never a
        secret). Raises SinkFailed when the brokers refuse it."""
        headers = dead_letter_headers(reason, detail, source, -1, -1)
        try:
            await retry_kafka(lambda: self.sender.out.producer.send_and_wait(
                self.dead_letter_topic, value, key=key, headers=headers))
        except KafkaError as exc:
            raise SinkFailed(f"the brokers refused a dead letter: {exc!r}") from exc
        self.dead_letters += 1

    async def close(self) -> None:
        """Confirm what is out, then stop the producer."""
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        try:
            if self._failure is None:
                async with self._lock:
                    await asyncio.wait_for(self.sender.flush(), 30.0)
        except (KafkaError, asyncio.TimeoutError) as exc:
            log.warning("sink_close_unconfirmed", error=repr(exc))
        finally:
            await self.sender.stop()

    @property
    def failed(self) -> BaseException | None:
        return self._failure

    async def _confirm_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            async with self._lock:
                target, waiting = self._sent, self.sender.unconfirmed()
            if waiting is not None:  # wait for the brokers without holding up newer sends
                await asyncio.gather(*waiting, return_exceptions=True)
            try:
                async with self._lock:
                    if waiting is None or not self.sender.confirmed_head(waiting):
                        await self.sender.flush()  # the ordered resend path, with no send beside it
            except KafkaError as exc:
                self._fail(exc)
                return
            async with self._changed:
                self._confirmed = target
                self._changed.notify_all()

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
            log.error("sink_failed", error=repr(exc), effect="no further message is acknowledged")
        self._wake.set()

        async def _notify() -> None:
            async with self._changed:
                self._changed.notify_all()
        asyncio.get_running_loop().create_task(_notify())

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise SinkFailed(f"the brokers refused a chunk: {self._failure!r}")
