"""Per-patient stream buffers: chunks in, complete 10-second windows out, in window order.

Rules (docs/windows-and-delivery.md):
- The grid of a recording segment is anchored at the chunk's `segment_start_ns`, which every chunk of the
  segment carries, so any owner, after any restart, cuts the same windows as `streamer score` does from the
  recording's first sample. Chunks without it use a fixed epoch grid (window starts at multiples of the
  step since 1970). A new segment (a later anchor, or a new rate) ends the previous one.
- A window is emitted once a sample at or after its end time has arrived and it has every sample; one with
  holes waits `reorder_tolerance_s` for late chunks, then holes of at most `max_interpolated_gap_samples`
  are filled linearly; anything worse is emitted as `insufficient_data`.
- Duplicate samples are ignored (first write wins); samples older than the oldest open window are late.
- What was already reported is the patient's state (state/patients.py), not a guess: a stream opened
  after a restart, rebalance or eviction starts at the state's first unreported window of its grid.
- Clock events: a record off the current timeline (far ahead, wholly late, an earlier segment) is rejected
  and remembered; once `new_timeline_chunks` mutually consistent records follow the new timeline (a
  repeat counts once) and they are at least twice the records that kept to the old one meanwhile, the old
  segment is closed and the new one starts (re-anchored at that record if it kept the same
  segment_start_ns). A lone outlier never moves the grid, nor does a timeline interleaved evenly with the
  current one, or fewer.
- A new or reopened stream is provisional: its first records are held until `provisional_records` of them
  agree (same segment and rate, times within `reorder_tolerance_s` of each other); that group, in time
  order, sets the timeline, and the others are judged against it. An outlier first record (+10 min) cannot
  define a bed's timeline, nor can neighbouring chunks that arrive swapped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Hashable, Iterator

import numpy as np

from streamer.ingest.contract import Chunk
from streamer.logs import get_logger, patient_ref
from streamer.settings import WindowSettings
from streamer.spec import MIN_WINDOW_SAMPLES, NoScoreReason, WindowStatus
from streamer.state.patients import PatientState
from streamer.windows.grid import NS, WindowGrid, as_rate

log = get_logger("streamer.windows")

SCORABLE = WindowStatus.SCORABLE
INSUFFICIENT = WindowStatus.INSUFFICIENT
_NEW_SEGMENT = "new_segment"
_MIN_BLOCK = 256  # samples: buffers grow with the chunks that arrive, from this size up to a window


@dataclass(slots=True)
class EmittedWindow:
    patient_id: str
    partition: Hashable  # the input TopicPartition (any hashable in tests)
    start_ns: int
    end_ns: int
    fs: float
    status: WindowStatus
    reason: NoScoreReason | None
    samples: np.ndarray | None  # float64 source-rate samples (gaps filled) when SCORABLE
    missing: int
    interpolated: int
    min_offset: int | None  # smallest input offset holding one of its samples
    completed_at: float  # wall time (s) the sample that completed it arrived
    k: int = 0  # index on its grid
    anchor_ns: int = 0  # its grid (with rate and natural anchor: what the patient state records)
    natural_anchor_ns: int = 0
    rate: Fraction = Fraction(500)
    hold: object = None  # its offsets-ledger Hold while it is in flight
    # closed by the wall clock (idle eviction, the memory cap), not by its records: a replay could decide
    # otherwise, so at least once its flag is written ahead in the patient state (state.patients)
    by_clock: bool = False


@dataclass(slots=True)
class _Open:
    length: int  # samples of the complete window
    values: np.ndarray  # grown on demand up to `length`
    mask: np.ndarray
    filled: int = 0
    min_offset: int | None = None
    implausible: bool = False  # holds a sample beyond windows.max_abs_mv
    # the filled samples are exactly [0, filled): `mask` is not kept up to date (the usual case, samples
    # in order, then needs no mask work); sparse() writes it out once anything else arrives
    dense: bool = True

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.mask.nbytes

    def reserve(self, upto: int) -> int:
        """Room for samples [0, upto); returns the bytes added."""
        have = len(self.values)
        if upto <= have:
            return 0
        size = min(self.length, max(upto, 2 * have, _MIN_BLOCK))
        before = self.nbytes
        values = np.empty(size, np.float64)
        values[:have] = self.values
        mask = np.zeros(size, bool)
        mask[:have] = self.mask
        self.values, self.mask = values, mask
        return self.nbytes - before

    def sparse(self) -> np.ndarray:
        """The mask, made exact: from here on every sample added marks it."""
        if self.dense:
            self.mask[:self.filled] = True
            self.dense = False
        return self.mask

    def full(self) -> tuple[np.ndarray, np.ndarray]:
        self.reserve(self.length)
        return self.values, self.sparse()


@dataclass
class _Segment:
    grid: WindowGrid
    natural_anchor_ns: int
    next_k: int
    reported_floor: int | None = None  # sample index below which windows were reported (state)
    watermark: int = 0  # one past the largest sample index received
    open: dict[int, _Open] = field(default_factory=dict)


@dataclass(slots=True)
class _Candidate:
    """A record off the current timeline, kept (offset held) until the timeline is confirmed or refuted."""
    natural_anchor_ns: int
    rate: Fraction
    t0_ns: int
    end_ns: int
    offset: int


@dataclass(slots=True)
class _Held:
    """One of a provisional stream's first records, kept (offset held) until its timeline is set."""
    chunk: Chunk
    natural_anchor_ns: int
    rate: Fraction
    end_ns: int
    offset: int
    ref: object  # what the caller gave with it (the Kafka record): dead-lettered through it if refused


@dataclass(slots=True)  # one a record
class AcceptResult:
    windows: list[EmittedWindow]
    new_samples: int = 0
    duplicate_samples: int = 0
    late_samples: int = 0
    implausible_samples: int = 0
    rejected: str | None = None  # reason when the whole chunk is refused
    held_samples: int = 0  # new samples of a provisional stream's record, held until its timeline is set
    # (ref, reason, detail) of each record to dead-letter: this one, or records held earlier and refused now
    dead_letters: list[tuple[object, str, str]] = field(default_factory=list)

    @property
    def activity(self) -> bool:
        """Whether the record counts as the patient being alive: it added samples. Rejected records and
        records that only repeat what is held (a monitor whose clock froze resends the same t0) do not, so
        such a bed goes idle, its open window is reported and the commit moves on."""
        return self.rejected is None and (self.new_samples > 0 or self.held_samples > 0)

    def add(self, other: "AcceptResult") -> None:
        """Fold in the result of another record decided in the same call."""
        self.windows.extend(other.windows)
        self.new_samples += other.new_samples
        self.duplicate_samples += other.duplicate_samples
        self.late_samples += other.late_samples
        self.implausible_samples += other.implausible_samples
        self.dead_letters.extend(other.dead_letters)


class PatientStream:
    """The open windows of one patient on one input partition."""

    def __init__(self, patient_id: str, partition: Hashable, settings: WindowSettings,
                 state: PatientState | None = None):
        self.patient_id = patient_id
        self.partition = partition
        self.settings = settings
        self.state = state or PatientState(patient_id)  # read here; updated when flags are acknowledged
        self.window_ns = round(settings.window_s * NS)
        self.step_ns = round((settings.window_s - settings.overlap_s) * NS)
        # a replay after a restart starts at most this far before what the state says was reported
        self.replay_horizon_ns = round((settings.window_s + settings.reorder_tolerance_s + settings.idle_evict_s) * NS)
        self.segment: _Segment | None = None
        self.candidates: list[_Candidate] = []  # consistent records off the timeline, in time order
        self.interleaved = 0  # records on the current timeline since the first candidate
        self.held: list[_Held] = []  # a provisional stream's first records
        self.dead: list[tuple[object, str, str]] = []  # held records refused when the stream closed
        # end of the latest window reported for this patient (on any grid), from the state and since
        self.reported_until_ns = max((g.anchor_ns + (g.next_k - 1) * self.step_ns + self.window_ns
                                      for g in self.state.segments if g.next_k > 0), default=0)
        self.last_activity = 0.0
        self.nbytes = 0

    # -- chunk in -------------------------------------------------------------------------------
    def accept(self, chunk: Chunk, offset: int, now: float, ref: object = None) -> AcceptResult:
        """`ref` travels back in `dead_letters` if this record is refused, now or later."""
        if self.segment is None and self.settings.provisional_records > 1:
            return self._hold(chunk, offset, now, ref)
        result = self._accept(chunk, offset, now)
        _dead_letter_if_refused(result, ref, len(chunk.samples))
        return result

    # -- a provisional stream's first records ----------------------------------------------------
    def _hold(self, chunk: Chunk, offset: int, now: float, ref: object) -> AcceptResult:
        natural = chunk.segment_start_ns if chunk.segment_start_ns is not None else 0
        fs = as_rate(chunk.fs)
        n = len(chunk.samples)
        fresh = all(h.chunk.t0_ns != chunk.t0_ns or len(h.chunk.samples) != n for h in self.held)
        held = _Held(chunk, natural, fs, chunk.t0_ns + round(n * NS / fs), offset, ref)
        self.held.append(held)
        self.nbytes += chunk.samples.nbytes
        if fresh:
            self.last_activity = now
        group = next(g for g in self._agreeing_groups() if any(h is held for h in g))
        if _distinct(group) < self.settings.provisional_records:
            if len(self.held) < 2 * self.settings.provisional_records:
                return AcceptResult([], held_samples=n if fresh else 0)
            group = self._largest_group()  # no agreement among many
        return self._release(group, now)

    def _agreeing_groups(self) -> list[list[_Held]]:
        """The held records in groups that agree: same segment and rate, each within reorder_tolerance_s of
        the group's span (in any arrival order)."""
        tolerance = round(self.settings.reorder_tolerance_s * NS)
        groups: list[list[_Held]] = []
        for h in sorted(self.held, key=lambda h: (h.natural_anchor_ns, h.chunk.t0_ns)):
            last = groups[-1] if groups else None
            if (last is not None and last[0].natural_anchor_ns == h.natural_anchor_ns
                    and abs(last[0].rate - h.rate) <= self.settings.rate_tolerance * last[0].rate  # 500.0 / 500.001
                    and h.chunk.t0_ns <= max(x.end_ns for x in last) + tolerance):
                last.append(h)
            else:
                groups.append([h])
        return groups

    def _largest_group(self) -> list[_Held]:
        return max(self._agreeing_groups(), key=_distinct)

    def _release(self, group: list[_Held], now: float) -> AcceptResult:
        """Set the timeline from `group` (in time order), then judge the other held records against it.
        Held records of the group's segment and rate that lie before it, within max_forward_jump_s (records
        of the same recording that came before a loss, not a clock event), start it: they go first, so their
        windows are reported (with holes) instead of their samples being refused as late."""
        held, self.held = self.held, []
        self.nbytes -= sum(h.chunk.samples.nbytes for h in held)
        chosen = {id(h) for h in group}
        first = group[0]
        reach = round(self.settings.max_forward_jump_s * NS)
        earlier = sorted((h for h in held if id(h) not in chosen and h.natural_anchor_ns == first.natural_anchor_ns
                          and h.rate == first.rate and first.chunk.t0_ns - reach <= h.chunk.t0_ns < first.chunk.t0_ns),
                         key=lambda h: h.chunk.t0_ns)
        chosen |= {id(h) for h in earlier}
        out = AcceptResult([])
        for h in [*earlier, *group, *(h for h in held if id(h) not in chosen)]:
            try:
                r = self._accept(h.chunk, h.offset, now, confirmed=id(h) in chosen and len(group) > 1)
            except Exception as exc:  # a bug costs this record (dead-lettered), never the others held with it
                log.exception("held_record_failed", patient=patient_ref(self.patient_id), offset=h.offset)
                r = AcceptResult([], late_samples=len(h.chunk.samples))
                r.dead_letters.append((h.ref, "internal_error", repr(exc)[:200]))
                out.add(r)
                continue
            _dead_letter_if_refused(r, h.ref, len(h.chunk.samples),
                                    ": off the timeline its stream's first records set")
            out.add(r)
        return out

    def take_dead(self) -> list[tuple[object, str, str]]:
        out, self.dead = self.dead, []
        return out

    def abandon(self) -> list[tuple[object, str, str]]:
        """Close a stream that never set its timeline: its held records, as dead letters (no_timeline), and
        nothing emitted."""
        held, self.held = self.held, []
        self.nbytes -= sum(h.chunk.samples.nbytes for h in held)
        n = self.settings.provisional_records
        return [*self.take_dead(), *((h.ref, "no_timeline", f"its stream went silent before {n} of its records "
                                      "agreed on a timeline") for h in held)]

    # -- chunk in (the timeline set) -------------------------------------------------------------
    def _accept(self, chunk: Chunk, offset: int, now: float, confirmed: bool = False) -> AcceptResult:
        """`confirmed`: the record leads a group of agreeing records (no far-ahead check)."""
        natural = chunk.segment_start_ns if chunk.segment_start_ns is not None else 0
        fs = as_rate(chunk.fs)
        n = len(chunk.samples)
        out: list[EmittedWindow] = []
        seg = self.segment
        # as_rate is cached: the same rate is the same object, so `is` spares the Fraction comparison
        if (seg is not None and fs is not seg.grid.fs and fs != seg.grid.fs
                and abs(fs - seg.grid.fs) <= self.settings.rate_tolerance * seg.grid.fs):
            fs = seg.grid.fs  # float noise from a gateway (500.0 / 500.001), not a new rate
        stepped_from = None
        if seg is not None:
            off = self._off_timeline(seg, natural, fs, chunk)
            if off == _NEW_SEGMENT:
                out.extend(self.close(now))
                seg = None
            elif off is not None:
                if not self._confirms_new_timeline(natural, fs, chunk, offset):
                    return AcceptResult(out, late_samples=n, rejected=off)
                out.extend(self.close(now))  # a clock event: the old segment ends here
                seg, stepped_from = None, seg
        if seg is None and stepped_from is None and not confirmed and self._far_ahead_of_state(natural, fs,
                                                                                                chunk.t0_ns):
            # a (re)opened stream whose first record is far ahead of what the state reported: a patient
            # back after a long silence, or an outlier; only consistent records that follow tell which
            if not self._confirms_new_timeline(natural, fs, chunk, offset):
                return AcceptResult(out, late_samples=n, rejected="timestamp_jump")
        if seg is None:
            seg = self._open_segment(natural, fs, chunk.t0_ns, stepped_from)
            self._forget_candidates()
        elif self.candidates:
            self._interleave()
        result = self._fill(seg, chunk, offset, now)
        result.windows[:0] = out
        return result

    def _off_timeline(self, seg: _Segment, natural: int, fs: Fraction, chunk: Chunk) -> str | None:
        """None if the record continues the current segment; _NEW_SEGMENT for a clean new one; else the
        reason it does not fit (a clock event or an outlier)."""
        if natural != seg.natural_anchor_ns or (fs is not seg.grid.fs and fs != seg.grid.fs):
            return "stale_segment" if natural < seg.natural_anchor_ns else _NEW_SEGMENT
        a = seg.grid.sample_index(chunk.t0_ns)
        b = a + len(chunk.samples)
        if a < 0:
            return "late"  # before a re-anchored grid: the old timeline
        if a - seg.watermark > self.settings.max_forward_jump_s * seg.grid.fs_hz:
            return "timestamp_jump"
        oldest = seg.grid.start_index(seg.next_k)
        if b <= oldest and not self._already_reported(seg, b):
            return "late"
        return None

    def _already_reported(self, seg: _Segment, b: int) -> bool:
        """Samples replayed after a restart that belong to windows the state says were reported: duplicates
        at any distance (offsets reset hours back replay hours), never 'late' records that could confirm a
        shifted timeline and report the same time again under other window ids."""
        return seg.reported_floor is not None and b <= seg.reported_floor

    def _confirms_new_timeline(self, natural: int, fs: Fraction, chunk: Chunk, offset: int) -> bool:
        end_ns = chunk.t0_ns + round(len(chunk.samples) * NS / fs)
        c = _Candidate(natural, fs, chunk.t0_ns, end_ns, offset)
        tolerance = self.settings.reorder_tolerance_s * NS
        if any(x.t0_ns == c.t0_ns and x.end_ns == end_ns and x.natural_anchor_ns == natural and x.rate == fs
               for x in self.candidates):
            return False  # a redelivered candidate: no evidence either way, so it neither counts nor breaks the run
        last = self.candidates[-1] if self.candidates else None
        consistent = (last is not None and last.natural_anchor_ns == natural and last.rate == fs
                      and chunk.t0_ns > last.t0_ns and abs(chunk.t0_ns - last.end_ns) <= tolerance)
        if not consistent:
            self._forget_candidates()
        self.candidates.append(c)
        # two to one, not only a run: of two timelines interleaved in one stream (a second source, a gateway
        # re-dating some records) the stream goes to one that twice as many records follow, and an even
        # interleave never moves it (each switch would truncate a window); a clock that stepped (the old
        # timeline silent) switches after new_timeline_chunks, as a run always did
        n = len(self.candidates)
        return n >= self.settings.new_timeline_chunks and n >= 2 * self.interleaved

    def _interleave(self) -> None:
        """A record on the current timeline while candidates wait: it counts against them, and once they are
        the minority (a lone outlier after two records) or the two stay level for long (an even interleave:
        4 x new_timeline_chunks candidates), they are forgotten: memory stays bounded and their offsets no
        longer hold the commit."""
        self.interleaved += 1
        n = len(self.candidates)
        if self.interleaved > n or n > 4 * self.settings.new_timeline_chunks:
            self._forget_candidates()

    def _forget_candidates(self) -> None:
        self.candidates.clear()
        self.interleaved = 0

    def _open_segment(self, natural: int, fs: Fraction, t0_ns: int, stepped_from: _Segment | None) -> _Segment:
        """The grid a record starts (or resumes): the one the state remembers for it, else its natural
        grid; after a clock step that kept the segment_start_ns, a grid re-anchored at this record."""
        avoid = stepped_from.grid.anchor_ns if stepped_from is not None else None
        remembered = self._remembered_grid(natural, fs, t0_ns, avoid)
        if remembered is not None:
            anchor, next_k = remembered.anchor_ns, remembered.next_k
        elif stepped_from is not None and natural == stepped_from.natural_anchor_ns:
            anchor, next_k = t0_ns, 0
            if (anchor - natural) % self.step_ns == 0:
                anchor += 1  # never the window starts (ids) of the grid it stepped away from
        else:
            anchor, next_k = natural, 0
            natural_grid = self.state.grid(natural, fs)  # it may have been reported up to some window
            if natural_grid is not None:
                next_k = natural_grid.next_k
            if stepped_from is not None:  # an earlier segment or the epoch grid: never re-cover reported time
                next_k = max(next_k, -(-(self.reported_until_ns - anchor) // self.step_ns))
        grid = WindowGrid(anchor, fs, self.window_ns, self.step_ns)
        a = grid.sample_index(t0_ns)
        first = grid.first_window_ending_after(max(a, 0))
        seg = _Segment(grid, natural, next_k=max(first, next_k), watermark=max(a, 0))
        if next_k > 0:
            seg.reported_floor = grid.start_index(next_k)
        self.segment = seg
        return seg

    def _far_ahead_of_state(self, natural: int, fs: Fraction, t0_ns: int) -> bool:
        rate = str(fs)
        nexts = [g.anchor_ns + g.next_k * self.step_ns for g in self.state.segments
                 if g.natural_anchor_ns == natural and g.fs == rate]
        return bool(nexts) and t0_ns - max(nexts) > self.settings.max_forward_jump_s * NS

    def _remembered_grid(self, natural: int, fs: Fraction, t0_ns: int, avoid_anchor: int | None):
        """A grid of the state this record continues: same segment and rate, and the record near the
        grid's first unreported window (within the replay horizon)."""
        rate = str(fs)
        best, best_d = None, None
        for g in self.state.segments:
            if g.natural_anchor_ns != natural or g.fs != rate or g.anchor_ns > t0_ns or g.anchor_ns == avoid_anchor:
                continue
            d = abs(t0_ns - (g.anchor_ns + g.next_k * self.step_ns))
            if d <= self.replay_horizon_ns and (best_d is None or d < best_d):
                best, best_d = g, d
        return best

    def _fill(self, seg: _Segment, chunk: Chunk, offset: int, now: float) -> AcceptResult:
        grid = seg.grid
        a = grid.sample_index(chunk.t0_ns)
        n = len(chunk.samples)
        b = a + n
        result = AcceptResult([])
        if a < 0:
            result.late_samples, result.rejected = n, "before_segment_start"
            return result
        oldest = grid.start_index(seg.next_k)
        below = min(max(oldest - a, 0), n)
        if below and seg.reported_floor is not None and self._already_reported(seg, min(b, oldest)):
            result.duplicate_samples = below  # replayed after a restart: those windows were reported
            seg.watermark = max(seg.watermark, min(b, oldest))  # the replay moves on: no jump at its end
        else:
            result.late_samples = below
        if below == n:
            if result.late_samples:
                result.rejected = "late"
            return result
        limit = self.settings.max_abs_mv
        over = np.abs(chunk.samples) > limit if chunk.peak_mv > limit else None
        first_k = max(seg.next_k, grid.first_window_ending_after(max(a, oldest)))
        for k in range(first_k, grid.last_window_starting_at_or_before(b - 1) + 1):
            s0, e0 = grid.sample_range(k)
            lo, hi = max(a, s0), min(b, e0)
            if lo >= hi:
                continue
            w = seg.open.get(k)
            if w is None:
                w = seg.open[k] = _Open(e0 - s0, np.empty(0, np.float64), np.zeros(0, bool))
            self.nbytes += w.reserve(hi - s0)
            if w.dense and lo - s0 == w.filled:  # the usual case, the next samples in order: no mask work
                fresh, added = None, hi - lo
                w.values[lo - s0:hi - s0] = chunk.samples[lo - a:hi - a]
            elif not (span := w.sparse()[lo - s0:hi - s0]).any():  # samples not seen before: plain slices
                fresh, added = None, hi - lo
                w.values[lo - s0:hi - s0] = chunk.samples[lo - a:hi - a]
                span[:] = True
            else:  # a duplicate or an overlap: only the samples still missing are taken
                fresh = ~span
                added = int(fresh.sum())
                if added:
                    w.values[lo - s0:hi - s0][fresh] = chunk.samples[lo - a:hi - a][fresh]
                    span[fresh] = True
            if added:
                w.filled += added
                w.min_offset = offset if w.min_offset is None else min(w.min_offset, offset)
                if over is not None:
                    taken = over[lo - a:hi - a] if fresh is None else over[lo - a:hi - a][fresh]
                    bad = int(taken.sum())
                    w.implausible |= bad > 0
                    result.implausible_samples += bad
            result.new_samples += added
            result.duplicate_samples += (hi - lo) - added
        seg.watermark = max(seg.watermark, b)
        if result.new_samples:
            self.last_activity = now
        if seg.watermark > grid.complete_index(seg.next_k):  # else nothing is due (most records): no generator
            result.windows.extend(self._due(seg, now, flush=False))
        return result

    # -- windows out ---------------------------------------------------------------------------
    def _due(self, seg: _Segment, now: float, flush: bool) -> Iterator[EmittedWindow]:
        grid = seg.grid
        tolerance = round(self.settings.reorder_tolerance_s * grid.fs_hz)
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
            yield self._emit(seg, k, w, n, now)

    def _emit(self, seg: _Segment, k: int, w: _Open | None, n: int, now: float,
              reason: NoScoreReason | None = None) -> EmittedWindow:
        grid = seg.grid
        start_ns = grid.start_ns(k)
        self.reported_until_ns = max(self.reported_until_ns, start_ns + grid.window_ns)
        base = dict(patient_id=self.patient_id, partition=self.partition, start_ns=start_ns,
                    end_ns=start_ns + grid.window_ns, fs=grid.fs_hz, completed_at=now,
                    min_offset=w.min_offset if w else None, k=k, anchor_ns=grid.anchor_ns,
                    natural_anchor_ns=seg.natural_anchor_ns, rate=grid.fs)
        if w is None:
            return EmittedWindow(**base, status=INSUFFICIENT, reason=reason or NoScoreReason.NO_DATA, samples=None,
                                 missing=n, interpolated=0)
        missing = n - w.filled
        if reason is None and w.implausible:
            reason = NoScoreReason.IMPLAUSIBLE_AMPLITUDE
        values, mask = w.full()
        if reason is None and missing:
            reason = fill_gaps(values, mask, self.settings.max_interpolated_gap_samples,
                               self.settings.max_missing_fraction)
        if reason is not None or n < MIN_WINDOW_SAMPLES:
            return EmittedWindow(**base, status=INSUFFICIENT, reason=reason or NoScoreReason.TOO_SHORT, samples=None,
                                 missing=missing, interpolated=0)
        return EmittedWindow(**base, status=SCORABLE, reason=None, samples=values, missing=0,
                             interpolated=missing)

    def close(self, now: float) -> list[EmittedWindow]:
        """End the segment: emit every due window, then the unfinished ones as insufficient (truncated)."""
        if self.held:  # a provisional stream closing: its largest agreeing group sets the timeline
            released = self._release(self._largest_group(), now)
            self.dead.extend(released.dead_letters)
            early = released.windows
        else:
            early = []
        seg = self.segment
        self._forget_candidates()
        if seg is None:
            return early
        out = early + list(self._due(seg, now, flush=True))
        for k in sorted(seg.open):
            w = seg.open.pop(k)
            self.nbytes -= w.nbytes
            out.append(self._emit(seg, k, w, w.length, now, reason=NoScoreReason.TRUNCATED))
        self.segment = None
        return out

    def oldest_open(self) -> int | None:
        """The index of the oldest open window of the segment, if any."""
        seg = self.segment
        return min(seg.open) if seg is not None and seg.open else None

    def min_open_offset(self) -> int | None:
        """The smallest input offset an open window or an unresolved off-timeline record still needs."""
        low = None
        if self.segment is not None:  # the usual case first: asked of every stream at every checkpoint
            for w in self.segment.open.values():
                if w.min_offset is not None and (low is None or w.min_offset < low):
                    low = w.min_offset
        for pending in (self.candidates, self.held):
            for c in pending:
                if low is None or c.offset < low:
                    low = c.offset
        return low


def _dead_letter_if_refused(result: AcceptResult, ref: object, n: int, why: str = "") -> None:
    """The dead letter of a record `result` refused, whole or in part (n: its samples)."""
    if result.rejected:
        result.dead_letters.append((ref, result.rejected,
                                    f"{result.late_samples} samples not accepted ({result.rejected}){why}"))
    elif result.late_samples:
        result.dead_letters.append((ref, "partly_late", f"{result.late_samples} of {n} samples older than the "
                                                        "open windows"))


def _distinct(group: list[_Held]) -> int:
    """Records of a group that are not repeats of each other (a frozen clock resends one record)."""
    return len({(h.chunk.t0_ns, len(h.chunk.samples)) for h in group})


def fill_gaps(values: np.ndarray, mask: np.ndarray, max_gap: int, max_fraction: float) -> NoScoreReason | None:
    """Linearly interpolate short holes in place; returns the reason the window is unusable, or None."""
    missing = np.flatnonzero(~mask)
    if len(missing) == 0:
        return None
    if len(missing) > max_fraction * len(mask):
        return NoScoreReason.TOO_MANY_MISSING
    # runs of consecutive missing indices
    breaks = np.flatnonzero(np.diff(missing) != 1)
    run_lengths = np.diff(np.concatenate(([0], breaks + 1, [len(missing)])))
    if run_lengths.max() > max_gap:
        return NoScoreReason.GAP_TOO_LONG
    present = np.flatnonzero(mask)
    values[missing] = np.interp(missing, present, values[present])
    return None


__all__ = ["PatientStream", "EmittedWindow", "AcceptResult", "fill_gaps", "SCORABLE", "INSUFFICIENT"]
