"""Timestamps for what the worker writes, bounded by the input rather than trusted to the worker's clock.

Brokers refuse a record stamped further ahead of their own clock than `log.message.timestamp.after.max.ms`
(1 h on Kafka 4): a worker whose clock runs ahead (a bad RTC, a VM resumed from a snapshot) would see every
output refused. As Kafka Streams bases its output timestamps on the input's, each output here is stamped
with the smaller of the worker's clock and its input partition's *event time*: the newest timestamp among
the records consumed from that partition (which the brokers accepted, or set with LogAppendTime), advanced
by the monotonic time elapsed since it was seen. Such a stamp is never further ahead of the brokers' clock
than a record they accepted, so it is accepted too; with a correct clock it is simply the clock's reading.
Before any record of a partition was consumed (outputs re-sent at its assignment), the newest timestamp of
its restored state records stands in; with neither, the producer stamps its own clock.

The worker's clock is still compared with the input's: `ClockOffset` estimates how far apart they are from
the freshest records of caught-up partitions and says so (log `clock_offset`, gauge
`streamer_clock_offset_seconds`) when they are further apart than `kafka.clock_offset_warn_s`.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Hashable

from streamer.logs import get_logger
from streamer.partitions import OwnedPartition, OwnedPartitions

log = get_logger("streamer.event_time")


class EventTime:
    """Per owned input partition, a bound on its outputs' timestamps (ms since 1970) from its input's. What
    it keeps of a partition (`OwnedPartition.event_lead_ms`: the newest timestamp seen minus the monotonic
    ms it was seen at) lives and ends with the assignment. `owned`: the worker's registry (one of its own
    when used alone: then nothing is held and the producer stamps every output)."""

    def __init__(self, clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 owned: OwnedPartitions | None = None):
        self.clock, self.monotonic = clock, monotonic
        self.owned = owned if owned is not None else OwnedPartitions()

    def observe(self, partition: Hashable, timestamp_ms: int | None) -> None:
        task = self.owned.held(partition)
        if task is not None:
            self.restore(task, timestamp_ms)

    def restore(self, task: OwnedPartition, timestamp_ms: int | None) -> None:
        """`timestamp_ms` seen of `task`'s input (at its assignment: its newest restored state record's,
        before the registry admits it)."""
        if timestamp_ms is None or timestamp_ms < 0:
            return
        lead = timestamp_ms - int(self.monotonic() * 1000)
        if task.event_lead_ms is None or lead > task.event_lead_ms:
            task.event_lead_ms = lead

    def stamp(self, partition: Hashable) -> int | None:
        """The timestamp for an output of `partition` (None: nothing seen, the producer stamps it)."""
        task = self.owned.held(partition)
        if task is None or task.event_lead_ms is None:
            return None
        return min(int(self.clock() * 1000), task.event_lead_ms + int(self.monotonic() * 1000))


class ClockOffset:
    """How far the worker's clock is from the input's: over the last `window_s`, the smallest (wall now -
    newest record timestamp) of caught-up partitions. Transit delay only adds to it, so the smallest sample
    is the closest to the clocks' true difference; a backlog is excluded by sampling caught-up partitions
    only. Positive: the worker's clock is ahead."""

    def __init__(self, warn_s: float, gauge=None, window_s: float = 60.0, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        self.warn_s, self.gauge, self.window_s, self.clock, self.monotonic = warn_s, gauge, window_s, clock, monotonic
        # (monotonic time, offset s), offsets increasing: a sample with a smaller or equal offset after an older one
        # ends that one's chance to be the minimum, so the front is always the window's minimum (O(1) per fetch;
        # a min over every sample of the window cost a third of the worker's CPU at 400 beds)
        self._samples: deque[tuple[float, float]] = deque()
        self._next_log = 0.0
        self.offset_s: float | None = None

    def observe(self, newest_timestamp_ms: int | None) -> None:
        if newest_timestamp_ms is None or newest_timestamp_ms < 0:
            return
        now = self.monotonic()
        offset = self.clock() - newest_timestamp_ms / 1000
        samples = self._samples
        while samples and samples[-1][1] >= offset:
            samples.pop()
        samples.append((now, offset))
        while samples[0][0] < now - self.window_s:
            samples.popleft()
        self.offset_s = samples[0][1]
        if self.gauge is not None:
            self.gauge.set(self.offset_s)
        if abs(self.offset_s) > self.warn_s and now >= self._next_log:
            self._next_log = now + 60.0  # once a minute while it lasts
            log.error("clock_offset", offset_s=round(self.offset_s, 3), warn_s=self.warn_s,
                      meaning="the worker's clock is " + ("ahead of" if self.offset_s > 0 else "behind")
                      + " the input's timestamps: output timestamps stay capped by the input's event time; fix the "
                      "host's clock (episode leases are stamped by it)")
