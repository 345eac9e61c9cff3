"""Producer helper for integrators: recordings -> chunks -> Kafka records in the input contract."""

from __future__ import annotations

from typing import Iterator, Literal

import numpy as np
from aiokafka import AIOKafkaProducer

from streamer.ingest.contract import Chunk, encode_binary, encode_json

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
    """Sends chunks keyed by patient id. `async with ChunkProducer(producer, topic) as p: await p.send(c)`."""

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
