"""Producer helper for integrators: recordings -> chunks -> Kafka records in the input contract."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Iterator, Literal

import numpy as np
from aiokafka import AIOKafkaProducer
from aiokafka.errors import InvalidProducerIdMapping, KafkaError, OutOfOrderSequenceNumber, UnknownProducerId

from streamer.ingest.contract import Chunk, encode_binary, encode_json
from streamer.kafka.clients import retriable, retry_kafka
from streamer.logs import get_logger

log = get_logger("streamer.producer")

Encoding = Literal["json", "binary", "binary-int16"]


def chunks_of(patient_id: str, times_ns: np.ndarray, values: np.ndarray, chunk_samples: int,
              lead: str = "II", fs: float | None = None, segment_start_ns: int | None = None,
              first_seq: int = 0) -> Iterator[Chunk]:
    """Consecutive chunks of a regularly sampled recording; every chunk names its segment start. Missing
    samples (NaN) are not sent: a chunk holding some is cut around them, so the stream sees a hole exactly
    where the recording has one (and offline scoring, which fills the same holes, agrees with it)."""
    times_ns = np.asarray(times_ns, dtype=np.int64)
    values = np.asarray(values)
    if fs is None:
        fs = 1e9 / float(np.median(np.diff(times_ns)))
    seg = int(times_ns[0]) if segment_start_ns is None else segment_start_ns
    seq = first_seq
    for i in range(0, len(values), chunk_samples):
        part = values[i:i + chunk_samples]
        present = np.isfinite(part)
        if present.all():
            runs = [(0, len(part))]
        else:
            edges = np.flatnonzero(np.diff(np.r_[0, present.astype(np.int8), 0]))
            runs = list(zip(edges[::2], edges[1::2]))
        for a, b in runs:
            yield Chunk(patient_id, lead, int(times_ns[i + a]), float(fs), part[a:b], seq, seg)
            seq += 1


def encode(chunk: Chunk, encoding: Encoding = "json", counts_gain: float = 200.0) -> bytes:
    if encoding == "json":
        return encode_json(chunk)
    if encoding == "binary":
        return encode_binary(chunk)
    return encode_binary(chunk, counts_gain=counts_gain)


class ChunkProducer:
    """Sends chunks keyed by patient id. `async with ChunkProducer(producer, topic) as p: await p.send(c)`.
    It resends nothing: a feed that must keep each bed's order through broker stalls uses OrderedSender."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, encoding: Encoding = "json"):
        self.producer = producer
        self.topic = topic
        self.encoding = encoding

    async def send(self, chunk: Chunk):
        """Queue one chunk; returns a future resolved when the broker acknowledges it."""
        return await self.producer.send(self.topic, encode(chunk, self.encoding),
                                        key=chunk.patient_id.encode("utf-8"))

    async def __aenter__(self) -> "ChunkProducer":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.producer.flush()


# An idempotent producer's partition whose sequence broke (a batch failed, the broker lost its state): the
# broker refuses the partition's later batches from it, so a fresh producer can resend them in order.
_SEQUENCE_BROKEN = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerIdMapping)


def resend_plan(settled: list[tuple[Chunk, BaseException | None]]) -> tuple[list[Chunk], list[Chunk]]:
    """After every delivery settled (in the order the chunks were sent, with their error or None): the
    failed chunks to resend, in that order, and those dropped. A failed chunk is resent unless a newer chunk
    of its bed was confirmed: the resend would land behind it (the worker drops such a record as late), so
    it is dropped and counted instead. With an idempotent producer a bed's confirmed chunks always come
    before its failed ones (the broker refuses a gap), so nothing is dropped."""
    newest_ok: dict[str, int] = {}
    for i, (chunk, error) in enumerate(settled):
        if error is None:
            newest_ok[chunk.patient_id] = i
    resend, dropped = [], []
    for i, (chunk, error) in enumerate(settled):
        if error is not None:
            (dropped if i < newest_ok.get(chunk.patient_id, -1) else resend).append(chunk)
    return resend, dropped


class OrderedSender:
    """Sends chunks so that no chunk lands behind a newer one of its bed on its partition, and each one is
    confirmed by the brokers once `flush()` returns: through broker stalls, timed-out requests and resends.

    - Idempotent producer (the brokers grant a producer id): chunks flow freely. aiokafka retries a batch
      that timed out itself, ahead of its partition's newer ones, and the broker writes it once. A delivery
      that fails anyway (a partition without a leader past request_timeout_ms, a broker that lost the
      producer's state) breaks its partition's sequence, so the broker refuses every later batch of that
      partition from this producer: the sender lets every delivery settle, starts a fresh producer and
      resends each bed's unconfirmed chunks in their order before anything newer.
    - Plain producer (no producer id: the embedded broker, acks=1): a batch that timed out fails while the
      newer ones of its partition go on, so a bed has at most one chunk unconfirmed: its next chunk waits
      for that one's acknowledgement, resending it as often as it fails.

    A refusal retrying cannot fix (no WRITE on the topic, a record too large) is raised. `open_producer()`
    returns a started producer and why it is not idempotent (None if it is): kafka.clients'
    start_ordered_producer.
    """

    def __init__(self, open_producer: Callable[[], Awaitable[tuple[AIOKafkaProducer, str | None]]], topic: str,
                 encoding: Encoding = "json", max_unconfirmed: int = 1000):
        self._open = open_producer
        self.topic = topic
        self.encoding = encoding
        self.max_unconfirmed = max_unconfirmed
        self.out: ChunkProducer | None = None
        self.idempotent = False
        self.resent = 0
        self.dropped = 0
        self._pending: list[tuple[Chunk, asyncio.Future]] = []  # idempotent: in the order sent
        self._last: dict[str, tuple[Chunk, asyncio.Future]] = {}  # plain: each bed's one unconfirmed chunk
        self._failed = False  # idempotent: a delivery failed since the last confirmation

    async def start(self) -> "OrderedSender":
        producer, why_not = await self._open()
        self.out = ChunkProducer(producer, self.topic, self.encoding)
        self.idempotent = why_not is None
        if why_not is not None:
            log.warning("producer_not_idempotent", reason=why_not,
                        effect="each bed waits for its previous chunk's acknowledgement")
        return self

    async def send(self, chunk: Chunk) -> None:
        """Hand one chunk over, after every older chunk of its bed that could still land after it."""
        if self.idempotent:
            if self._failed or len(self._pending) >= self.max_unconfirmed:
                await self._confirm_pending()
        else:
            previous = self._last.pop(chunk.patient_id, None)
            if previous is not None:
                await self._settle(*previous)
        await self._hand_over(chunk)

    async def flush(self) -> None:
        """Return once every chunk sent is confirmed (resent as needed)."""
        await self._confirm_pending()
        while self._last:
            await self._settle(*self._last.popitem()[1])

    def unconfirmed(self) -> list[asyncio.Future] | None:
        """Idempotent producer with no delivery failed: the deliveries handed over and not yet confirmed, in
        the order sent, to await without holding up newer sends (`confirmed_head` then); None where only
        `flush()` may confirm (a plain producer, or a failure that needs the resend path)."""
        if not self.idempotent or self._failed:
            return None
        return [fut for _, fut in self._pending]

    def confirmed_head(self, futures: list[asyncio.Future]) -> bool:
        """Forget `futures` (from `unconfirmed()`) as confirmed if they are still the oldest deliveries and
        every one succeeded; False otherwise, and nothing changes: `flush()` settles them, resending as
        needed. Call it with no send in progress (the caller's lock), like send and flush."""
        head = self._pending[:len(futures)]
        if len(head) != len(futures) or any(fut is not mine for (_, fut), mine in zip(head, futures)):
            return False
        if any(not fut.done() or fut.cancelled() or fut.exception() is not None for fut in futures):
            return False
        del self._pending[:len(futures)]
        return True

    async def stop(self) -> None:
        """Flush what the producer holds and close it (call flush() first to have every chunk confirmed)."""
        if self.out is not None:
            await self.out.producer.stop()

    async def _hand_over(self, chunk: Chunk) -> None:
        # a send that times out (the producer's buffer is full behind a stalled broker) added nothing: the
        # same chunk is tried again before any newer one
        fut = await retry_kafka(lambda: self.out.send(chunk))
        if self.idempotent:
            self._pending.append((chunk, fut))
            fut.add_done_callback(self._note_failure)
        else:
            self._last[chunk.patient_id] = (chunk, fut)

    def _note_failure(self, fut: asyncio.Future) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            self._failed = True

    async def _settle(self, chunk: Chunk, fut: asyncio.Future) -> None:
        """Plain producer: wait for one chunk's acknowledgement, resending it until it comes; nothing newer
        of its bed is out meanwhile."""
        while True:
            try:
                await fut
                return
            except KafkaError as exc:
                if not retriable(exc):
                    raise
                self.resent += 1
                log.warning("chunk_resend", error=repr(exc))
                fut = await retry_kafka(lambda: self.out.send(chunk))

    async def _confirm_pending(self) -> None:
        """Idempotent producer: wait for every delivery; after a failure, resend with a fresh producer."""
        while self._pending:
            settled, self._pending = self._pending, []
            self._failed = False
            results = await asyncio.gather(*(fut for _, fut in settled), return_exceptions=True)
            errors = [r if isinstance(r, BaseException) else None for r in results]
            refused = next((e for e in errors if e is not None and not (
                isinstance(e, _SEQUENCE_BROKEN) or (isinstance(e, KafkaError) and retriable(e)))), None)
            if refused is not None:
                raise refused
            if not any(errors):
                return
            resend, dropped = resend_plan([(chunk, e) for (chunk, _), e in zip(settled, errors)])
            log.warning("chunks_resend", chunks=len(resend), error=repr(next(e for e in errors if e)),
                        effect="a fresh producer resends each bed's unconfirmed chunks before anything newer")
            if dropped:  # never expected of an idempotent producer; counted rather than sent out of order
                self.dropped += len(dropped)
                log.error("chunks_dropped_out_of_order", chunks=len(dropped),
                          beds=len({c.patient_id for c in dropped}))
            await self._renew()
            self.resent += len(resend)
            for chunk in resend:
                if self.idempotent:
                    await self._hand_over(chunk)
                else:  # the brokers gave the fresh producer no id: one chunk per bed at a time
                    await self.send(chunk)

    async def _renew(self) -> None:
        """A fresh producer (a new producer id and sequences); the old one holds nothing unsettled."""
        old = self.out.producer
        try:
            await asyncio.wait_for(old.stop(), 10.0)
        except (KafkaError, asyncio.TimeoutError, OSError) as exc:
            log.warning("producer_stop_failed", error=repr(exc))
        await self.start()
