"""All patients' buffers: routing, idle eviction and the memory cap."""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

from streamer.ingest.contract import Chunk
from streamer.settings import WindowSettings
from streamer.windows.buffer import AcceptResult, EmittedWindow, PatientStream


class WindowStage:
    def __init__(self, settings: WindowSettings):
        self.s = settings
        # least recently active first, so eviction and the memory cap look at the front only
        self.streams: OrderedDict[tuple[Hashable, str], PatientStream] = OrderedDict()
        self.nbytes = 0  # bytes held by open windows, kept up to date on every change

    def accept(self, partition: Hashable, offset: int, chunk: Chunk, now: float) -> AcceptResult:
        key = (partition, chunk.patient_id)
        stream = self.streams.get(key)
        if stream is None:
            stream = self.streams[key] = PatientStream(chunk.patient_id, partition, self.s)
        else:
            self.streams.move_to_end(key)
        before = stream.nbytes
        result = stream.accept(chunk, offset, now)
        self.nbytes += stream.nbytes - before
        if stream.segment is None and not stream.nbytes:
            self.streams.pop(key, None)
        return result

    def evict(self, now: float) -> list[EmittedWindow]:
        """Close patients silent for idle_evict_s, and the least recently active ones above the memory cap."""
        out: list[EmittedWindow] = []
        while self.streams:
            key, stream = next(iter(self.streams.items()))
            if now - stream.last_activity < self.s.idle_evict_s and self.nbytes <= self.s.max_buffer_bytes:
                break
            self.nbytes -= stream.nbytes
            out.extend(stream.close(now))
            del self.streams[key]
        return out

    def min_open_offsets(self) -> dict[Hashable, int]:
        """Per partition, the smallest input offset that an open (unemitted) window still needs."""
        out: dict[Hashable, int] = {}
        for (partition, _), stream in self.streams.items():
            off = stream.min_open_offset()
            if off is not None and (partition not in out or off < out[partition]):
                out[partition] = off
        return out

    def drop_partition(self, partition: Hashable) -> int:
        """Forget a revoked partition's buffers; its new owner rebuilds them from the committed offset."""
        keys = [k for k in self.streams if k[0] == partition]
        for k in keys:
            self.nbytes -= self.streams.pop(k).nbytes
        return len(keys)

    def close_all(self, now: float) -> list[EmittedWindow]:
        out: list[EmittedWindow] = []
        for stream in self.streams.values():
            out.extend(stream.close(now))
        self.streams.clear()
        self.nbytes = 0
        return out
