"""When to checkpoint which partitions: every owned partition each `interval_s`; and, where flags wait in
open transactions (exactly once with kafka.commit_after_flags), those partitions as soon as there are any,
so a flag becomes visible to read_committed readers after one commit instead of at the next period.

One checkpoint runs at a time (the caller awaits it before asking again), so flags published during one
wait for the next: the commit rate follows the commit's own speed. A checkpoint for flags also begins no
sooner than kafka.flag_commit_spacing_ms after the previous one: every transaction costs the worker
several requests per partition whatever it holds, so under load more flags per transaction buy back CPU
(bench_e2e, 800 beds on one core: 11.6 -> 10.5 ms of worker CPU a window, p99 1339 -> 779 ms). For the
same reason the period leaves out the partitions a checkpoint for flags took in its last half: under load
those commit several times a period anyway (600 beds, 8 partitions: ~89 transactions/s before, 67-81
after).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Callable


class CheckpointSchedule:
    def __init__(self, interval_s: float, ending: asyncio.Event, flagged: asyncio.Event | None = None,
                 take_flagged: Callable[[], set] = set, clock: Callable[[], float] = time.monotonic,
                 spacing_s: float = 0.0):
        """`ending`: set at shutdown (no further checkpoint); `flagged`: set while partitions hold flags in
        open transactions, `take_flagged()` names them and clears it (None: periodic checkpoints only);
        `spacing_s`: the least time from one checkpoint's start to the next's for flags."""
        self.interval_s, self.ending, self.flagged, self.take_flagged = interval_s, ending, flagged, take_flagged
        self.clock, self.spacing_s = clock, spacing_s
        self._next_full = clock() + interval_s
        self._last = -float("inf")  # when the last checkpoint was handed out
        self._taken: dict = {}  # partition -> when a checkpoint last took it

    async def next(self, owned: set) -> set | None:
        """The partitions to checkpoint now (empty: nothing of `owned` is due), or None once ending."""
        if self.ending.is_set():
            return None
        wakers = {asyncio.ensure_future(self.ending.wait())}
        if self.flagged is not None:
            wakers.add(asyncio.ensure_future(self.flagged.wait()))
        try:
            await asyncio.wait(wakers, timeout=max(self._next_full - self.clock(), 0.0),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waker in wakers:
                waker.cancel()
        if self.ending.is_set():
            return None
        spaced = self._last + self.spacing_s - self.clock()
        if spaced > 0 and self.clock() < self._next_full:  # flags only: let more join this transaction
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.ending.wait(), min(spaced, self._next_full - self.clock()))
            if self.ending.is_set():
                return None
        now = self._last = self.clock()
        due = self.take_flagged() & owned
        if now >= self._next_full:
            self._next_full = now + self.interval_s
            # a partition checkpointed for flags in the last half period is left out (so each is taken at
            # least every 1.5 periods): under load flags commit every partition several times a period
            due |= {p for p in owned if now - self._taken.get(p, -float("inf")) >= self.interval_s / 2}
        for p in due:
            self._taken[p] = now
        return due
