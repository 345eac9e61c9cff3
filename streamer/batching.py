"""Micro-batcher: windows from all patients -> batches, flushed at `max_batch` or after `max_wait_ms`.

It adapts to load by itself: while inference runs, windows queue up, so the next batch is as large as the
backlog (up to max_batch); when idle, a lone window waits at most max_wait_ms.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from streamer.windows.buffer import EmittedWindow


class MicroBatcher:
    def __init__(self, max_batch: int, max_wait_ms: float):
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.queue: deque[tuple[float, EmittedWindow]] = deque()
        self._arrived = asyncio.Event()
        self.closed = False

    def put(self, window: EmittedWindow) -> None:
        self.queue.append((time.monotonic(), window))
        self._arrived.set()

    def __len__(self) -> int:
        return len(self.queue)

    def close(self) -> None:
        """No more windows: the remaining ones are flushed at once."""
        self.closed = True
        self._arrived.set()

    async def next_batch(self) -> list[EmittedWindow] | None:
        """The next batch, or None once closed and empty."""
        while not self.queue:
            if self.closed:
                return None
            self._arrived.clear()
            await self._arrived.wait()
        while len(self.queue) < self.max_batch and not self.closed:
            wait = self.queue[0][0] + self.max_wait - time.monotonic()
            if wait <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), wait)
            except asyncio.TimeoutError:
                break
        n = min(self.max_batch, len(self.queue))
        return [self.queue.popleft()[1] for _ in range(n)]
