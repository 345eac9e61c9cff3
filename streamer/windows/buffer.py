"""Per-patient stream buffers: chunks in, complete 10-second windows out, in window order.

Rules (README "Windows"):
- The grid of a recording segment is anchored at the chunk's `segment_start_ns`, which every chunk of the
  segment carries, so any owner, after any restart, cuts the same windows as `streamer score` does from the
  recording's first sample. Chunks without it use a fixed epoch grid (window starts at multiples of the
  step since 1970). A new segment (new anchor or new rate) ends the previous one.
- A window is emitted once a sample at or after its end time has arrived and it has every sample; one with
  holes waits `reorder_tolerance_s` for late chunks, then holes of at most `max_interpolated_gap_samples`
  are filled linearly; anything worse is emitted as `insufficient_data`.
- Duplicate samples are ignored (first write wins); samples older than the oldest open window are late.
- After a (re)start a patient's windows that begin before its first sample seen are emitted only if complete:
  their earlier samples were in records before the committed offset, so they were already published.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from streamer.ingest.contract import Chunk
from streamer.settings import WindowSettings
from streamer.windows.grid import NS, WindowGrid, as_rate

SCORABLE = "scorable"
INSUFFICIENT = "insufficient_data"


@dataclass(slots=True)
class EmittedWindow:
    patient_id: str
    partition: int
    start_ns: int
    end_ns: int
    fs: float
    status: str  # SCORABLE or INSUFFICIENT
    reason: str | None
    samples: np.ndarray | None  # float64 source-rate samples (gaps filled) when SCORABLE
    missing: int
    interpolated: int
    min_offset: int | None  # smallest input offset holding one of its samples
    completed_at: float  # wall time (s) the sample that completed it arrived


@dataclass(slots=True)
class _Open:
    values: np.ndarray
    mask: np.ndarray
    filled: int = 0
    min_offset: int | None = None
    implausible: bool = False  # holds a sample beyond windows.max_abs_mv

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.mask.nbytes


@dataclass
class _Segment:
    grid: WindowGrid
    next_k: int
    first_seen: int  # smallest sample index seen in this segment since (re)start
    watermark: int = 0  # one past the largest sample index received
    open: dict[int, _Open] = field(default_factory=dict)


@dataclass
class AcceptResult:
    windows: list[EmittedWindow]
    new_samples: int = 0
    duplicate_samples: int = 0
    late_samples: int = 0
    implausible_samples: int = 0
    rejected: str | None = None  # reason when the whole chunk is refused


class PatientStream:
    """The open windows of one patient on one input partition."""

    def __init__(self, patient_id: str, partition: int, settings: WindowSettings):
        self.patient_id = patient_id
        self.partition = partition
        self.s = settings
        self.window_ns = round(settings.window_s * NS)
        self.step_ns = round((settings.window_s - settings.overlap_s) * NS)
        self.segment: _Segment | None = None
        self.last_activity = 0.0
        self.nbytes = 0

    # -- chunk in -------------------------------------------------------------------------------
    def accept(self, chunk: Chunk, offset: int, now: float) -> AcceptResult:
        anchor = chunk.segment_start_ns if chunk.segment_start_ns is not None else 0
        fs = as_rate(chunk.fs)
        out: list[EmittedWindow] = []
        seg = self.segment
        if seg is not None and fs != seg.grid.fs and abs(fs - seg.grid.fs) <= self.s.rate_tolerance * seg.grid.fs:
            fs = seg.grid.fs  # float noise from a gateway (500.0 / 500.001), not a new rate
        if seg is not None and (seg.grid.anchor_ns != anchor or seg.grid.fs != fs):
            if anchor < seg.grid.anchor_ns:
                return AcceptResult([], late_samples=len(chunk.samples), rejected="stale_segment")
            out.extend(self.close(now))  # a new recording segment (or rate) starts cleanly
            seg = None
        grid = seg.grid if seg is not None else WindowGrid(anchor, fs, self.window_ns, self.step_ns)
        a = grid.sample_index(chunk.t0_ns)
        n = len(chunk.samples)
        b = a + n
        if a < 0:
            return AcceptResult(out, late_samples=n, rejected="before_segment_start")
        if seg is None:
            seg = self.segment = _Segment(grid, next_k=grid.first_window_ending_after(a), first_seen=a, watermark=a)
        elif a - seg.watermark > self.s.max_forward_jump_s * float(fs):
            return AcceptResult(out, late_samples=n, rejected="timestamp_jump")
        seg.first_seen = min(seg.first_seen, a)

        result = AcceptResult(out)
        oldest = grid.start_index(seg.next_k)
        result.late_samples = min(max(oldest - a, 0), n)
        if result.late_samples == n:
            result.rejected = "late"
            return result
        magnitude = np.abs(chunk.samples)
        over = magnitude > self.s.max_abs_mv if magnitude.max() > self.s.max_abs_mv else None
        first_k = max(seg.next_k, grid.first_window_ending_after(max(a, oldest)))
        for k in range(first_k, grid.last_window_starting_at_or_before(b - 1) + 1):
            s0, e0 = grid.start_index(k), grid.end_index(k)
            lo, hi = max(a, s0), min(b, e0)
            if lo >= hi:
                continue
            w = seg.open.get(k)
            if w is None:
                w = seg.open[k] = _Open(np.empty(e0 - s0, np.float64), np.zeros(e0 - s0, bool))
                self.nbytes += w.nbytes
            span = w.mask[lo - s0:hi - s0]
            fresh = ~span
            added = int(fresh.sum())
            if added:
                w.values[lo - s0:hi - s0][fresh] = chunk.samples[lo - a:hi - a][fresh]
                span[fresh] = True
                w.filled += added
                w.min_offset = offset if w.min_offset is None else min(w.min_offset, offset)
                if over is not None:
                    bad = int(over[lo - a:hi - a][fresh].sum())
                    w.implausible |= bad > 0
                    result.implausible_samples += bad
            result.new_samples += added
            result.duplicate_samples += (hi - lo) - added
        seg.watermark = max(seg.watermark, b)
        self.last_activity = now
        out.extend(self._due(seg, now, flush=False))
        return result

    # -- windows out ---------------------------------------------------------------------------
    def _due(self, seg: _Segment, now: float, flush: bool) -> Iterator[EmittedWindow]:
        grid = seg.grid
        tolerance = round(self.s.reorder_tolerance_s * float(grid.fs))
        while True:
            k = seg.next_k
            ready_at = grid.complete_index(k)
            if seg.watermark <= ready_at:
                return
            w = seg.open.get(k)
            n = grid.end_index(k) - grid.start_index(k)
            complete = w is not None and w.filled == n
            if not complete and not flush and seg.watermark <= ready_at + tolerance:
                return
            seg.next_k += 1
            if w is not None:
                del seg.open[k]
                self.nbytes -= w.nbytes
            if not complete and grid.start_index(k) < seg.first_seen:
                continue  # published before the restart, see module docstring
            yield self._emit(grid, k, w, n, now)

    def _emit(self, grid: WindowGrid, k: int, w: _Open | None, n: int, now: float,
              reason: str | None = None) -> EmittedWindow:
        start_ns = grid.start_ns(k)
        base = dict(patient_id=self.patient_id, partition=self.partition, start_ns=start_ns,
                    end_ns=start_ns + grid.window_ns, fs=float(grid.fs), completed_at=now,
                    min_offset=w.min_offset if w else None)
        if w is None:
            return EmittedWindow(**base, status=INSUFFICIENT, reason=reason or "no_data", samples=None,
                                 missing=n, interpolated=0)
        missing = n - w.filled
        if reason is None and w.implausible:
            reason = "implausible_amplitude"
        if reason is None and missing:
            reason = fill_gaps(w.values, w.mask, self.s.max_interpolated_gap_samples, self.s.max_missing_fraction)
        if reason is not None or n <= 10:
            return EmittedWindow(**base, status=INSUFFICIENT, reason=reason or "too_short", samples=None,
                                 missing=missing, interpolated=0)
        return EmittedWindow(**base, status=SCORABLE, reason=None, samples=w.values, missing=0,
                             interpolated=missing)

    def close(self, now: float) -> list[EmittedWindow]:
        """End the segment: emit every due window, then the unfinished ones as insufficient (truncated)."""
        seg = self.segment
        if seg is None:
            return []
        out = list(self._due(seg, now, flush=True))
        for k in sorted(seg.open):
            w = seg.open.pop(k)
            self.nbytes -= w.nbytes
            if seg.grid.start_index(k) >= seg.first_seen:
                n = seg.grid.end_index(k) - seg.grid.start_index(k)
                out.append(self._emit(seg.grid, k, w, n, now, reason="truncated"))
        self.segment = None
        return out

    def min_open_offset(self) -> int | None:
        if self.segment is None:
            return None
        offsets = [w.min_offset for w in self.segment.open.values() if w.min_offset is not None]
        return min(offsets) if offsets else None


def fill_gaps(values: np.ndarray, mask: np.ndarray, max_gap: int, max_fraction: float) -> str | None:
    """Linearly interpolate short holes in place; returns the reason the window is unusable, or None."""
    missing = np.flatnonzero(~mask)
    if len(missing) == 0:
        return None
    if len(missing) > max_fraction * len(mask):
        return "too_many_missing"
    # runs of consecutive missing indices
    breaks = np.flatnonzero(np.diff(missing) != 1)
    run_lengths = np.diff(np.concatenate(([0], breaks + 1, [len(missing)])))
    if run_lengths.max() > max_gap:
        return "gap_too_long"
    present = np.flatnonzero(mask)
    values[missing] = np.interp(missing, present, values[present])
    return None


__all__ = ["PatientStream", "EmittedWindow", "AcceptResult", "fill_gaps"]
