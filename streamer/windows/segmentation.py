"""docs/preprocessing.md's offline segmentation, literally, on an array of sample timestamps.

Used by `streamer score`; the stream (windows/buffer.py) must give the same windows on replays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamer.spec import MIN_WINDOW_SAMPLES
from streamer.windows.grid import NS

MIN_SAMPLES = MIN_WINDOW_SAMPLES  # windows of 10 samples or fewer are dropped


@dataclass(frozen=True)
class OfflineWindow:
    start_ns: int
    end_ns: int
    first: int  # sample index range [first, stop)
    stop: int


def _nearest(times: np.ndarray, t: int) -> int:
    """Index of the timestamp nearest to t; on a tie the lower index (argmin semantics)."""
    j = int(np.searchsorted(times, t, side="left"))
    if j == 0:
        return 0
    if j >= len(times):
        return len(times) - 1
    return j - 1 if (t - times[j - 1]) <= (times[j] - t) else j


def segment(times_ns: np.ndarray, window_s: float = 10.0, overlap_s: float = 0.0) -> list[OfflineWindow]:
    """Complete windows of a recording whose sample timestamps (int64 ns, increasing) are given."""
    times = np.asarray(times_ns, dtype=np.int64)
    if len(times) == 0:
        return []
    window_ns = round(window_s * NS)
    step_ns = round((window_s - overlap_s) * NS)
    if step_ns <= 0:
        raise ValueError("overlap must be smaller than the window")
    out = []
    start, last = int(times[0]), int(times[-1])
    k = 0
    while start + k * step_ns + window_ns <= last:
        s = start + k * step_ns
        first, stop = _nearest(times, s), _nearest(times, s + window_ns)
        if stop - first > MIN_SAMPLES - 1:
            out.append(OfflineWindow(s, s + window_ns, first, stop))
        k += 1
    return out
