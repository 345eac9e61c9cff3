"""Exact window-grid arithmetic in integers: no float drift over days of samples at any rate.

A segment is anchored at `anchor_ns` with sample rate `fs` (a Fraction). Sample i is at
anchor_ns + i / fs. Window k starts at anchor_ns + k * step_ns and holds the samples from the index
nearest to its start up to, not including, the index nearest to its end (docs/preprocessing.md). Ties go to the
lower index, as an argmin over |t - s| does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache

NS = 1_000_000_000


def nearest_index(numerator: int, denominator: int) -> int:
    """round(numerator / denominator) with exact halves going down (denominator > 0)."""
    return -((denominator - 2 * numerator) // (2 * denominator))


@lru_cache(maxsize=256)  # called per record with a handful of distinct rates; a Fraction is immutable
def as_rate(fs: float) -> Fraction:
    """A sample rate as an exact fraction (250, 360, 500.0, 128.5 ...)."""
    return Fraction(str(fs)).limit_denominator(1_000_000)


@dataclass(frozen=True)
class WindowGrid:
    anchor_ns: int
    fs: Fraction
    window_ns: int
    step_ns: int
    # fs as plain ints and a float, taken once: a Fraction's numerator and denominator are Python
    # properties, read ten times per input record (a sixth of the ingest cost)
    _rate_num: int = field(init=False, repr=False, compare=False)
    _per_ns_den: int = field(init=False, repr=False, compare=False)  # NS * fs.denominator
    fs_hz: float = field(init=False, repr=False, compare=False)
    # the sample ranges of the last few windows: a record asks for those of its window several times
    _ranges: dict[int, tuple[int, int]] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_rate_num", self.fs.numerator)
        object.__setattr__(self, "_per_ns_den", NS * self.fs.denominator)
        object.__setattr__(self, "fs_hz", float(self.fs))

    def sample_index(self, t_ns: int) -> int:
        """Index of the sample nearest to t_ns."""
        return nearest_index((t_ns - self.anchor_ns) * self._rate_num, self._per_ns_den)

    def start_ns(self, k: int) -> int:
        return self.anchor_ns + k * self.step_ns

    def sample_range(self, k: int) -> tuple[int, int]:
        """Window k's samples: [index nearest its start, index nearest its end)."""
        found = self._ranges.get(k)
        if found is None:
            if len(self._ranges) >= 16:
                self._ranges.clear()
            start = self.anchor_ns + k * self.step_ns
            found = self._ranges[k] = (self.sample_index(start), self.sample_index(start + self.window_ns))
        return found

    def start_index(self, k: int) -> int:
        return self.sample_range(k)[0]

    def end_index(self, k: int) -> int:
        return self.sample_range(k)[1]

    def complete_index(self, k: int) -> int:
        """Index of the first sample at or after window k's end time: the window exists once that sample
        does (REFERENCE: a window starting at s is made only if s + 10 s <= the last timestamp)."""
        num = (k * self.step_ns + self.window_ns) * self._rate_num
        return -(-num // self._per_ns_den)

    def first_window_ending_after(self, i: int) -> int:
        """Smallest k whose sample range ends after index i (the first window sample i can belong to).

        Closed form, no search (asked once per record): end_index(k) > i holds exactly when window k's end
        lies past half a sample after i, (k * step + window) * fs > i + 1/2, in integers."""
        over = (2 * i + 1) * self._per_ns_den - 2 * self.window_ns * self._rate_num
        return max(over // (2 * self.step_ns * self._rate_num) + 1, 0)

    def last_window_starting_at_or_before(self, i: int) -> int:
        """Largest k whose sample range starts at or before index i (-1 if none): start_index(k) <= i holds
        exactly when k * step * fs <= i + 1/2."""
        return max(((2 * i + 1) * self._per_ns_den) // (2 * self.step_ns * self._rate_num), -1)
