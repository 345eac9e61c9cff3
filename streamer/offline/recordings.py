"""Recorded lead-II signals from CSV, NumPy (.npy/.npz), Parquet, WFDB, EDF/EDF+/BDF and VitalDB (.vital),
as (timestamps ns, mV; NaN where a sample is missing). Every reading is explicit or checked: time units,
voltage units (from the header, else --units), missing samples.

A recording file is hostile until checked (it may be damaged, or made to hurt): whatever goes wrong while
reading it is a RecordingError, one line naming the file, never another exception. A rate outside the
stream's accepted range (windows.min_rate_hz .. max_rate_hz) is refused, and so is a length beyond the
RecordingLimits; every length a header declares (.npy/.npz array headers and zip sizes, Parquet row counts,
WFDB and EDF headers, the size a .vital file inflates to) is checked against the limits and against the
file's size before any data is read, so a small file cannot make the reader allocate gigabytes."""

from __future__ import annotations

import gzip
import io
import re
import zipfile
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from streamer.settings import WindowSettings
from streamer.windows.grid import NS, as_rate

DEFAULT_START = "2000-01-01T00:00:00Z"  # for recordings with relative time and no --start
_TIME_NAMES = ("time", "timestamp", "t", "datetime", "time_ns", "timestamp_ns")
_VALUE_NAMES = ("II", "MLII", "ii", "lead_ii", "ecg", "value", "mv", "signal")


_MAX_MESSAGE = 400  # characters: a hostile file's names or text must not flood the terminal


class RecordingError(ValueError):
    """Why a recording cannot be read: always one line (whitespace collapsed, control characters dropped)
    of bounded length, whatever the file put in it."""

    def __init__(self, message: str):
        text = " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", str(message)).split())
        super().__init__(text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE - 3] + "...")


# The default bound on one recording: 48 h (a two-day Holter), and never more samples than 48 h at 1 kHz
# (the highest rate of clinical Holter and bedside ECG). Timestamps and values take 16 bytes a sample, so
# the default admits 172.8 M samples, about 2.8 GB, where a 1.6 MB .npz could otherwise claim billions.
# Longer or faster recordings are read with --max-recording-hours.
DEFAULT_MAX_RECORDING_HOURS = 48.0
_SAMPLES_PER_HOUR = 3600 * 1000


@dataclass(frozen=True)
class RecordingLimits:
    """What a recording may hold: at most `max_hours` of signal and `max_hours` x 3.6 M samples, at a
    declared rate within the stream's accepted range [min_rate_hz, max_rate_hz] (windows settings: the
    offline commands refuse what the worker would dead-letter as bad_rate)."""

    max_hours: float = DEFAULT_MAX_RECORDING_HOURS
    min_rate_hz: float = WindowSettings.model_fields["min_rate_hz"].default
    max_rate_hz: float = WindowSettings.model_fields["max_rate_hz"].default

    @classmethod
    def of(cls, windows: WindowSettings | None = None, max_hours: float | None = None) -> RecordingLimits:
        w = windows or WindowSettings()
        return cls(DEFAULT_MAX_RECORDING_HOURS if max_hours is None else max_hours, w.min_rate_hz, w.max_rate_hz)

    @property
    def max_samples(self) -> int:
        return int(self.max_hours * _SAMPLES_PER_HOUR)

    def check_rate(self, fs: float, what: str) -> float:
        fs = float(fs)
        if not (np.isfinite(fs) and self.min_rate_hz <= fs <= self.max_rate_hz):
            raise RecordingError(f"{what} rate {fs:g} Hz is outside the [{self.min_rate_hz:g}, "
                                 f"{self.max_rate_hz:g}] Hz the stream accepts (windows.min_rate_hz, max_rate_hz)")
        return fs

    def check_length(self, n: int, fs: float | None, what: str) -> None:
        """n samples (declared or counted) at fs (None: unknown yet), before they are read."""
        n = int(n)
        if n > self.max_samples:
            raise RecordingError(f"{what} holds {n:,} samples, more than the {self.max_samples:,} "
                                 f"--max-recording-hours {self.max_hours:g} allows (at 1 kHz); raise it to read it")
        if fs is not None and n / fs > self.max_hours * 3600:
            self.check_span(n / fs, what)

    def check_span(self, seconds: float, what: str) -> None:
        if not seconds <= self.max_hours * 3600:
            raise RecordingError(f"{what} spans {seconds / 3600:.4g} h, more than --max-recording-hours "
                                 f"{self.max_hours:g}; raise it to read it")


@contextmanager
def _reading(kind: str):
    """Any failure of a parser on the file's bytes is the file's: one line naming the kind and the cause."""
    try:
        yield
    except RecordingError:
        raise
    except Exception as exc:  # the libraries raise ValueError, OSError, KeyError, struct.error... on bad bytes
        raise RecordingError(f"not a readable {kind} file ({type(exc).__name__}: {exc})") from exc


@dataclass
class Recording:
    times_ns: np.ndarray  # int64, increasing
    values: np.ndarray  # float64 mV; NaN where a sample is missing
    fs: float | None  # nominal rate when known
    lead: str = "II"

    @property
    def start_ns(self) -> int:
        return int(self.times_ns[0])


def parse_start(start: str | None) -> int:
    ts = pd.Timestamp(start or DEFAULT_START)
    if ts.tzinfo is None:
        ts = ts.tz_localize("UTC")
    return int(ts.value)


def regular_times(n: int, fs: float, start_ns: int) -> np.ndarray:
    """Timestamps of n samples at fs from start_ns, rounded to the nearest ns with exact integers."""
    rate = as_rate(fs)
    i = np.arange(n, dtype=np.int64)
    num = i * (2 * NS * rate.denominator) + rate.numerator
    return start_ns + num // (2 * rate.numerator)


TIME_UNITS = {"s": NS, "ms": 1_000_000, "us": 1_000, "ns": 1}
_EPOCH_AFTER_S = 315_532_800  # 1980-01-01: a numeric time this far from zero is an epoch time, not an offset
# The sample step of lead-II ECG (50 Hz .. 10 kHz) in each unit: the ranges do not overlap, so a numeric
# time column's unit is known from its median step; outside all of them it is ambiguous and refused.
_STEP_RANGE_S = (1e-4, 0.02)
_MAX_TIME_NS = 2.0**63 - 2.0**40  # below int64's end by more than float64 rounding of it


def infer_time_unit(step: float) -> str | None:
    lo, hi = _STEP_RANGE_S
    found = [unit for unit, ns in TIME_UNITS.items() if lo * NS / ns <= step <= hi * NS / ns]
    return found[0] if len(found) == 1 else None


def _times_from_column(col: pd.Series, start_ns: int, time_unit: str | None) -> np.ndarray:
    if not pd.api.types.is_numeric_dtype(col):
        if time_unit is not None:
            raise RecordingError(f"--time-unit applies to numeric times; column {col.name!r} holds dates")
        # pandas 3 parses text to datetime64 of the resolution it finds (us for ISO strings): the integers
        # are nanoseconds only once the unit is made ns, never by assumption
        ts = pd.to_datetime(col, utc=True).dt.as_unit("ns")
        return ts.astype("int64").to_numpy()
    v = col.to_numpy(dtype=np.float64)
    if not np.isfinite(v).all():
        raise RecordingError(f"time column {col.name!r} holds a missing or infinite time")
    if time_unit is None:
        step = float(np.median(np.diff(v))) if len(v) > 1 else float("nan")
        time_unit = infer_time_unit(step)
        if time_unit is None:
            raise RecordingError(f"cannot tell the unit of time column {col.name!r} (median step {step:g} is no "
                                 "ECG sample interval in s, ms, us or ns): give --time-unit s|ms|us|ns")
    unit_ns = TIME_UNITS[time_unit]
    if np.abs(v).max() * unit_ns >= _MAX_TIME_NS:  # int64 nanoseconds would wrap round silently
        raise RecordingError(f"time column {col.name!r} holds times beyond what int64 nanoseconds hold (year 2262)")
    if abs(v[0]) * unit_ns < _EPOCH_AFTER_S * NS:
        return start_ns + np.round(v * unit_ns).astype(np.int64)  # offsets from --start
    if time_unit == "ns":
        return col.to_numpy().astype(np.int64)  # exact: float64 cannot hold every epoch nanosecond
    # An epoch time in s, ms or us as float64 is exact to about 0.25 us: whole units and the fraction apart
    # (their product would lose 256 ns), rounded to the microsecond it can carry.
    whole = np.floor(v)
    us = np.round((v - whole) * (unit_ns // 1000)).astype(np.int64)
    return whole.astype(np.int64) * unit_ns + us * 1000


def _from_frame(df: pd.DataFrame, fs: float | None, start_ns: int, channel: str | None,
                time_unit: str | None = None) -> Recording:
    cols = list(df.columns)
    if channel is not None:
        if channel not in cols:
            raise RecordingError(f"column {channel!r} not found; columns are {cols}")
        value_col = channel
    else:
        named = [c for c in cols if str(c) in _VALUE_NAMES]
        value_col = named[0] if named else cols[-1]
    time_cols = [c for c in cols if str(c).lower() in _TIME_NAMES and c != value_col]
    values = _numbers(df[value_col])
    if time_cols and fs is None:
        times = _times_from_column(df[time_cols[0]], start_ns, time_unit)
        nominal = None
    elif fs is not None:
        times, nominal = regular_times(len(values), fs, start_ns), fs
    elif len(cols) >= 2:
        times, nominal = _times_from_column(df[cols[0]], start_ns, time_unit), None
    else:
        raise RecordingError("a single-column recording needs --fs")
    return _validated(times, values, nominal)


def _columns_read(cols: list, fs: float | None, channel: str | None) -> list:
    """The columns _from_frame uses of a frame with these columns, in their order: the value column, the
    named time columns and, without --fs, the first."""
    named = [c for c in cols if str(c) in _VALUE_NAMES]
    value = channel if channel is not None else (named or cols[-1:] or [None])[0]
    used = {c for c in cols if c == value or str(c).lower() in _TIME_NAMES or (fs is None and c == cols[0])}
    return [c for c in cols if c in used]


def _numbers(col: pd.Series) -> np.ndarray:
    """A sample column as float64 mV; a cell that is no number (text such as 'lead-off') is refused, naming
    its row, never read as NaN: a missing sample is an empty cell."""
    if not (pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_complex_dtype(col)):
        parsed = pd.to_numeric(col, errors="coerce")
        bad = np.flatnonzero(parsed.isna().to_numpy() & col.notna().to_numpy())
        if len(bad) or not pd.api.types.is_numeric_dtype(parsed):
            row = int(bad[0]) if len(bad) else 0
            raise RecordingError(f"column {col.name!r} holds {str(col.iloc[row])[:40]!r} at row {row}, not a number "
                                 "(a missing sample is an empty cell)")
        col = parsed
    return col.to_numpy(dtype=np.float64)


def _validated(times: np.ndarray, values: np.ndarray, fs: float | None, lead: str = "II") -> Recording:
    times = np.asarray(times, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        raise RecordingError("recording holds no samples")
    if len(times) != len(values):
        raise RecordingError("timestamps and samples differ in length")
    if np.any(np.diff(times) <= 0):
        raise RecordingError("timestamps must increase strictly")
    if np.isinf(values).any():
        raise RecordingError("recording holds infinite samples (missing samples are NaN)")
    if np.isnan(values).all():
        raise RecordingError("recording holds no sample (all NaN)")
    # NaN marks a missing sample: its windows are handled as the stream handles holes (offline/score.py)
    if fs is None and len(times) > 1:
        fs = float(round(NS / np.median(np.diff(times)), 6))
    return Recording(times, values, fs, lead)


def load_recording(path: str | Path, fs: float | None = None, start: str | None = None,
                   channel: str | None = None, time_unit: str | None = None, units: str | None = None,
                   limits: RecordingLimits | None = None) -> Recording:
    """`time_unit` (s, ms, us, ns) of a numeric time column: inferred from its step when unambiguous.
    Numeric times are epoch times when they lie after 1980 in that unit, else offsets from `start`.
    `units` (V, mV, uV): the samples' unit for files whose header names none (CSV, NumPy, Parquet: mV by
    default); a file whose header names one must agree with it. A recording whose amplitude cannot be lead-II
    ECG in the declared unit is refused, naming --units. `limits` (default RecordingLimits()): the rate range
    and the length bound. Every failure is a RecordingError whose one line names the file."""
    limits = limits or RecordingLimits()
    with _naming(path):
        rec = _load(Path(path), fs, start, channel, time_unit, units, limits)
        limits.check_length(len(rec.values), None, "the recording")
        # segmentation walks every window step from the first sample to the last: bound the span too
        limits.check_span((int(rec.times_ns[-1]) - int(rec.times_ns[0])) / NS, "the recording")
        return _plausible(rec, path, units)


@contextmanager
def _naming(path):
    """Every failure while reading `path` as a RecordingError whose line names it."""
    try:
        yield
    except RecordingError as exc:
        if str(path) in str(exc):
            raise
        raise RecordingError(f"{path}: {exc}") from exc.__cause__
    except Exception as exc:  # the file is hostile until read: whatever it makes fail is its fault, one line
        raise RecordingError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from exc


def _load(path: Path, fs, start, channel, time_unit, units, limits: RecordingLimits) -> Recording:
    if time_unit is not None and time_unit not in TIME_UNITS:
        raise RecordingError(f"time unit {time_unit!r} is not one of {', '.join(TIME_UNITS)}")
    if units is not None and _mv_per(units) is None:
        known = ", ".join(sorted(_MV_PER_UNIT))
        raise RecordingError(f"--units {units!r} is not a voltage unit streamer reads ({known})")
    if fs is not None:
        limits.check_rate(fs, "--fs")
    start_ns = parse_start(start)
    suffix = path.suffix.lower()
    if suffix in (".hea", ".dat") or (not path.exists() and path.with_suffix(".hea").exists()):
        return _from_wfdb(path.with_suffix(""), fs, start, channel, units, limits)
    _regular_file(path)
    if suffix in (".edf", ".bdf"):
        return _from_edf(path, fs, start, channel, units, limits)
    if suffix == ".vital":
        return _from_vital(path, fs, start, channel, units, limits)
    return _scaled(_from_file(path, suffix, fs, start_ns, channel, time_unit, limits), units)


def _regular_file(path: Path) -> None:
    """A regular file (after symbolic links): a directory is no recording, and a FIFO or device would block
    or never end."""
    if not path.exists():
        raise RecordingError(f"recording not found: {path}")
    if path.is_dir():
        raise RecordingError(f"{path} is a directory, not a recording file")
    if not path.is_file():
        raise RecordingError(f"{path} is not a regular file")


def _scaled(rec: Recording, units: str | None) -> Recording:
    if units is None:
        return rec
    return Recording(rec.times_ns, rec.values * _mv_per(units), rec.fs, rec.lead)


def _plausible(rec: Recording, path, units: str | None) -> Recording:
    """Lead-II ECG in mV stays within a few mV; a recording whose 99th percentile of |x| is beyond 100 mV was
    declared in the wrong unit (microvolts read as millivolts): refused, naming the option."""
    finite = np.abs(rec.values[np.isfinite(rec.values)])
    p99 = float(np.percentile(finite, 99)) if len(finite) else 0.0
    if p99 > _MAX_PLAUSIBLE_MV:
        declared = units or "mV (the default)"
        raise RecordingError(f"{path}: 99 % of |samples| reach {p99:.4g} mV read as {declared}, implausible for "
                             "lead-II ECG: give the file's unit with --units uV (or V, mV)")
    return rec


def _from_file(path: Path, suffix: str, fs, start_ns: int, channel, time_unit, limits: RecordingLimits
               ) -> Recording:
    if suffix == ".csv":
        with _reading("CSV"):
            df = pd.read_csv(path)
        limits.check_length(len(df), fs, "the CSV")  # its size bounds its rows: a CSV cannot inflate much
        return _from_frame(df, fs, start_ns, channel, time_unit)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        with _reading("Parquet"):  # the footer's row count and columns, before any column is decompressed
            footer = pq.ParquetFile(path)
            rows, schema = footer.metadata.num_rows, footer.schema_arrow
            index = {c for c in (schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)}
            names = [n for n in schema.names if n not in index]
        limits.check_length(rows, fs, "its Parquet footer")
        if channel is not None and channel not in names:
            raise RecordingError(f"column {channel!r} not found; columns are {names}")
        with _reading("Parquet"):  # only the columns _from_frame reads: a wide file cannot inflate either
            df = pd.read_parquet(path, columns=_columns_read(names, fs, channel))
        return _from_frame(df, fs, start_ns, channel, time_unit)
    if suffix == ".npy":
        with open(path, "rb") as f, _reading(".npy"):
            n = _npy_length(f, path.stat().st_size, ".npy", fs, limits)
            if fs is None:
                raise RecordingError(".npy recordings are one 1-D array of mV and need --fs")
            values = np.load(f, allow_pickle=False) if n else np.empty(0)
        return _validated(regular_times(len(values), fs, start_ns), values, fs)
    if suffix == ".npz":
        return _from_npz(path, fs, start_ns, channel, limits)
    raise RecordingError(f"unsupported recording format {suffix!r}: use .csv, .npy, .npz, .parquet, WFDB (.hea), "
                         "EDF/EDF+/BDF (.edf, .bdf) or VitalDB (.vital)")


def _npy_header(f, size: int, what: str) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype of the numeric array whose .npy header starts at f's position, read from the
    header alone; the array must fit in `size` bytes (the file's, or the zip member's declared uncompressed
    size, which zipfile enforces while inflating). f is put back where it was."""
    from numpy.lib import format as npformat

    at = f.tell()
    version = npformat.read_magic(f)
    shape, _, dtype = (npformat.read_array_header_1_0(f) if version == (1, 0)
                       else npformat.read_array_header_2_0(f))
    header = f.tell() - at
    f.seek(at)
    if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
        raise RecordingError(f"{what} holds {dtype} values, not numbers (object arrays are never unpickled)")
    count = int(np.prod(shape, dtype=object))
    if header + count * dtype.itemsize > size:
        raise RecordingError(f"{what} header claims {shape} {dtype} values, more than its {size:,} bytes hold")
    return shape, dtype


def _npy_length(f, size: int, what: str, fs: float | None, limits: RecordingLimits) -> int:
    """The length of a 1-D recording array from its .npy header, within the limits, before it is read."""
    shape, _ = _npy_header(f, size, what)
    if len(shape) != 1:
        raise RecordingError(f"{what} is an array of shape {shape}; a recording is one 1-D array")
    limits.check_length(shape[0], fs, what)
    return int(shape[0])


_NPZ_KEYS = ("signal", "values", "ecg", "II", "MLII")


def _from_npz(path: Path, fs, start_ns: int, channel, limits: RecordingLimits) -> Recording:
    """The arrays' zip entries and .npy headers are checked first: how much each claims to inflate to
    (the zip's uncompressed size, which zipfile then enforces) and its shape and dtype; only then is any
    array inflated."""
    with _reading(".npz"):
        zf = zipfile.ZipFile(path)
    with zf, _reading(".npz"):
        members = {name.removesuffix(".npy"): name for name in zf.namelist()}
        key = channel or next((k for k in _NPZ_KEYS if k in members), None)
        if key is None or key not in members:
            raise RecordingError(f".npz needs a 'signal' (or --channel) array; it has {sorted(members)[:20]}")

        def header(name: str) -> tuple[tuple[int, ...], np.dtype]:
            info = zf.getinfo(members[name])
            with zf.open(info) as f:
                return _npy_header(f, info.file_size, f"array {name!r}")

        def length(name: str, rate: float | None) -> int:
            info = zf.getinfo(members[name])
            with zf.open(info) as f:
                return _npy_length(f, info.file_size, f"array {name!r}", rate, limits)

        def read(name: str) -> np.ndarray:
            with zf.open(members[name]) as f:
                return np.lib.format.read_array(f, allow_pickle=False)

        if "times_ns" in members:
            if length("times_ns", fs) != length(key, fs):
                raise RecordingError("timestamps and samples differ in length")
            return _validated(read("times_ns"), read(key), fs)
        rate = fs
        if rate is None and "fs" in members:
            if int(np.prod(header("fs")[0], dtype=object)) != 1:
                raise RecordingError("array 'fs' must hold one rate")
            rate = limits.check_rate(float(read("fs").reshape(-1)[0]), "its 'fs'")
        if rate is None:
            raise RecordingError(".npz without 'fs' or 'times_ns' needs --fs")
        length(key, rate)
        values = read(key)
        return _validated(regular_times(len(values), rate, start_ns), values, rate)


def _from_wfdb(record: Path, fs: float | None, start: str | None, channel: str | None,
               units: str | None = None, limits: RecordingLimits | None = None) -> Recording:
    import wfdb

    rate = _checked_wfdb_header(record, fs, limits or RecordingLimits())
    with _reading("WFDB"):
        rec = wfdb.rdrecord(str(record))
    names = list(rec.sig_name)
    wanted = [channel] if channel else ["II", "MLII"]
    idx = next((names.index(n) for n in wanted if n in names), None)
    if idx is None:
        raise RecordingError(f"WFDB record {record} has no lead {wanted}; leads are {names} (use --channel)")
    if start is None and rec.base_datetime is not None:
        start = rec.base_datetime.isoformat()
    unit = str((rec.units or [None] * len(names))[idx] or "").strip()
    scale = _header_scale(f"WFDB record {record}", names[idx], unit, units)
    values = rec.p_signal[:, idx].astype(np.float64) * scale  # the header's unit, to mV
    return _validated(regular_times(len(values), rate, parse_start(start)), values, rate, names[idx])


def _checked_wfdb_header(record: Path, fs: float | None, limits: RecordingLimits, segment: bool = False) -> float:
    """The rate a WFDB record will be read at, after its header alone is checked: the rate within the
    stream's range, the length within the limits, every signal file a regular file inside the header's own
    folder (no absolute path, no '..', no symbolic link out of it: a header must not make streamer read
    another file), and each file large enough for the samples the header claims (compressed formats
    excepted: their length is bounded by the limits alone). A multi-segment record's segments are checked
    the same way."""
    import wfdb
    from wfdb.io._signal import BYTES_PER_SAMPLE

    hea = record.with_suffix(".hea")
    _regular_file(hea)
    if hea.stat().st_size > _MAX_WFDB_HEADER:
        raise RecordingError(f"{hea.name} is {hea.stat().st_size:,} bytes, too large for a WFDB header")
    folder = record.parent.resolve()
    # the file (or segment) each line names, as written: wfdb's own syntax refuses a path, but say why
    for line in hea.read_bytes().decode("latin-1").splitlines()[1:]:
        name = (line.split() or ["#"])[0]
        if not name.startswith("#") and ("/" in name or "\\" in name or name.startswith("..")):
            raise RecordingError(f"the header names {name!r}, outside its folder: refused")
    with _reading("WFDB header"):
        header = wfdb.rdheader(str(record))
    rate = limits.check_rate(fs or float(header.fs), f"WFDB record {record.name}'s" if fs is None else "--fs")
    if getattr(header, "seg_name", None) is not None:  # a multi-segment record: each segment is a record
        if segment:
            raise RecordingError(f"WFDB segment {record.name} is itself multi-segment")
        for name in header.seg_name:
            if name != "~":  # a gap
                _checked_wfdb_header(_inside(folder, f"{name}.hea", "segment").with_suffix(""), fs, limits,
                                     segment=True)
        limits.check_length(header.sig_len or 0, rate, f"WFDB record {record.name}")
        return rate
    n = int(header.sig_len or 0)
    limits.check_length(n, rate, f"WFDB record {record.name}")
    per_file: dict[str, float] = {}
    channels = len(header.file_name or [])
    for name, fmt, spf, offset in zip(*(getattr(header, field) or [None] * channels
                                        for field in ("file_name", "fmt", "samps_per_frame", "byte_offset"))):
        per_file.setdefault(name, float(offset or 0))
        per_file[name] += n * (spf or 1) * BYTES_PER_SAMPLE.get(str(fmt), 0)
    if not n and any(BYTES_PER_SAMPLE.get(str(f)) == 0 for f in header.fmt or []):
        # wfdb would count a FLAC file's samples by inflating it: only a declared length is bounded first
        raise RecordingError(f"WFDB record {record.name} is compressed (FLAC) but its header gives no length")
    for name, needed in per_file.items():
        path = _inside(folder, name, "signal file")
        if path.stat().st_size < int(needed):
            raise RecordingError(f"WFDB record {record.name} claims {n:,} samples, more than its signal file "
                                 f"{name!r} holds ({path.stat().st_size:,} bytes)")
    return rate


_MAX_WFDB_HEADER = 1 << 20  # bytes: a header of thousands of leads is a few hundred kB


def _inside(folder: Path, name: str, what: str) -> Path:
    """`name` from a header, as a regular file that resolves (symbolic links followed) inside `folder`."""
    path = (folder / name).resolve()
    if Path(name).is_absolute() or not path.is_relative_to(folder):
        raise RecordingError(f"the header names {what} {name!r}, outside its folder: refused")
    if not path.is_file():
        raise RecordingError(f"the header names {what} {name!r}, which is no regular file beside it")
    return path


def _header_scale(what: str, lead: str, unit: str, units: str | None) -> float:
    """mV per unit of a lead whose header names `unit` (maybe blank: then --units, else refused)."""
    if not unit:
        if units is None:
            raise RecordingError(f"{what}: lead {lead} names no unit: give it with --units (mV, uV or V)")
        return _mv_per(units)
    scale = _mv_per(unit)
    if scale is None:
        raise RecordingError(f"{what}: lead {lead} is in {unit!r}, not a voltage unit streamer reads "
                             f"({', '.join(sorted(_MV_PER_UNIT))})")
    if units is not None and _mv_per(units) != scale:
        raise RecordingError(f"{what}: lead {lead} is in {unit!r} by its header, not --units {units!r}")
    return scale


def _mv_per(unit: str) -> float | None:
    return _MV_PER_UNIT.get(unit.strip().lower().replace("µ", "u").replace("μ", "u"))


# Voltage units as WFDB and EDF headers spell them, in mV each (lower case, micro written u)
_MV_PER_UNIT = {"v": 1000.0, "volt": 1000.0, "volts": 1000.0, "mv": 1.0, "millivolt": 1.0, "millivolts": 1.0,
                "uv": 1e-3, "microvolt": 1e-3, "microvolts": 1e-3, "nv": 1e-6}
# the stream's own bound (windows.max_abs_mv's default): beyond it no sample can be lead-II ECG
_MAX_PLAUSIBLE_MV = WindowSettings.model_fields["max_abs_mv"].default
# EDF labels of lead II as clinical systems write them, once upper-cased and stripped of these words
_LEAD_II = {"II", "MLII", "2"}
_LABEL_NOISE = ("ECG", "EKG", "LEAD", "-", "_", " ", ":")


def _lead_name(label: str) -> str:
    name = label.upper()
    for word in _LABEL_NOISE:
        name = name.replace(word, "")
    return name


def _from_edf(path: Path, fs: float | None, start: str | None, channel: str | None, units: str | None,
              limits: RecordingLimits | None = None) -> Recording:
    """EDF, EDF+ (continuous or discontinuous) and BDF through edfio: the lead by label (II, MLII, ECG II,
    EKG-II, Lead II...; --channel for another), the unit from its physical dimension, the start from the
    header (EDF has no time zone: UTC unless --start). In an EDF+D file each data record is placed at its
    own onset on the lead's sample grid; the samples between records are missing (NaN)."""
    limits = limits or RecordingLimits()
    edf = _read_edf(path, limits)
    signals = list(edf.signals)
    labels = [sig.label for sig in signals]
    if channel is not None:
        found = [i for i, label in enumerate(labels) if label.strip() == channel.strip()]
    else:
        found = [i for i, label in enumerate(labels) if _lead_name(label) in _LEAD_II]
    if not found:
        raise RecordingError(f"{path} has no lead II (labels {labels}): name the lead with --channel")
    sig = signals[found[0]]
    scale = _header_scale(str(path), sig.label, sig.physical_dimension.strip(), units)
    with _reading("EDF/BDF"):
        rate = float(sig.sampling_frequency)
    limits.check_rate(rate, f"lead {sig.label.strip()!r}'s")
    if fs is not None and abs(fs - rate) > 1e-9 * rate:
        raise RecordingError(f"{path}: lead {sig.label} is sampled at {rate:g} Hz by its header, not --fs {fs:g}")
    with _reading("EDF/BDF"):
        data = np.asarray(sig.data, dtype=np.float64) * scale
    if start is None:
        start = edf.startdatetime.isoformat()
    per_record = sig.samples_per_data_record
    onsets = _record_onsets(edf)
    if onsets is not None and len(onsets) == len(data) // per_record:
        seconds = np.asarray(onsets, dtype=np.float64)
        # the grid spans the last onset: a hostile onset (negative, NaN, a century on) must not size it
        if not (np.isfinite(seconds).all() and seconds.min(initial=0.0) >= 0):
            raise RecordingError(f"{path}: a data record's onset is negative or not a number")
        limits.check_span(float(seconds.max(initial=0.0)), f"{path}: its data records' onsets")
        index = np.round(seconds * rate).astype(np.int64)
        if np.any(np.diff(index) < per_record):
            raise RecordingError(f"{path}: its data records overlap in time")
        limits.check_length(int(index[-1]) + per_record, rate, f"{path}: its data records' onsets")
        grid = np.full(int(index[-1]) + per_record, np.nan)
        for j, first in enumerate(index):
            grid[first:first + per_record] = data[j * per_record:(j + 1) * per_record]
        data = grid
    return _validated(regular_times(len(data), rate, parse_start(start)), data, rate, sig.label.strip())


def _read_edf(path: Path, limits: RecordingLimits | None = None):
    import edfio

    _check_edf_header(path, limits or RecordingLimits())
    try:
        return edfio.read_bdf(path) if path.suffix.lower() == ".bdf" else edfio.read_edf(path)
    except Exception as exc:  # edfio raises ValueError and others on a damaged header
        raise RecordingError(f"{path}: not a readable EDF/BDF file ({exc})") from exc


_EDF_FIXED = 256  # bytes of the fixed header, and of each signal's header
_EDF_SPR_AT = 216  # bytes of each signal's fields before its samples-per-record field, times the signal count


def _check_edf_header(path: Path, limits: RecordingLimits) -> None:
    """An EDF/BDF header against the file's size and the limits before edfio reads it: edfio trusts the
    size and rewrites a header that claims more data records than the file holds (a warning), so a header
    claiming 10 M records over 2.5 s of data would be read as 2.5 s. A header the data contradicts (more
    records claimed than held, or bytes left over) is refused; -1 records (an unfinished recording, which
    EDF allows) is counted from the size."""
    _regular_file(path)
    size = path.stat().st_size
    with open(path, "rb") as f, _reading("EDF/BDF header"):
        fixed = f.read(_EDF_FIXED)
        if len(fixed) < _EDF_FIXED:
            raise RecordingError(f"not an EDF/BDF file: {size} bytes, less than its fixed header")
        records, duration, ns = int(fixed[236:244].decode("ascii")), float(fixed[244:252].decode("ascii")), \
            int(fixed[252:256].decode("ascii"))
        if not 0 < ns <= (size - _EDF_FIXED) // _EDF_FIXED:
            raise RecordingError(f"its header names {ns} signals, which its {size:,} bytes cannot describe")
        f.seek(_EDF_FIXED + ns * _EDF_SPR_AT)
        spr = [int(f.read(8).decode("ascii")) for _ in range(ns)]
    if min(spr) < 0 or not (np.isfinite(duration) and duration >= 0):
        raise RecordingError("its header holds a negative sample count or an invalid record duration")
    width = 3 if path.suffix.lower() == ".bdf" else 2
    record_bytes = sum(spr) * width
    data = size - _EDF_FIXED * (ns + 1)
    if records == -1 and record_bytes:
        records = data // record_bytes
    if records < 0 or records * record_bytes != data:
        raise RecordingError(f"its header claims {records:,} data records of {record_bytes:,} bytes, but the file "
                             f"holds {data:,} bytes of data: damaged or forged")
    limits.check_length(records * max(spr), None, "its header")
    limits.check_span(records * duration, "its header")


def _record_onsets(edf) -> list | None:
    """Seconds from the start of each data record of an EDF+D file (None when continuous). edfio 0.4 says
    whether a file is continuous but keeps the onsets in its timekeeping signal: read with its own parser."""
    if edf.is_continuous:
        return None
    from edfio.edf_annotations import _get_data_record_onset

    keeper = edf._timekeeping_signal
    records = keeper.digital.reshape((-1, keeper._bytes_per_data_record))
    return [float(_get_data_record_onset(r)) for r in records]


def edf_annotations(path: str | Path) -> pd.DataFrame:
    """An EDF+ file's annotations as artifact intervals for `validate`: start_ns, end_ns, kind (the text).
    Annotations without a duration mark an instant, not an interval, and are left out."""
    with _naming(path):
        edf = _read_edf(Path(path))
        t0 = parse_start(edf.startdatetime.isoformat())
        rows = [{"start_ns": t0 + round(a.onset * NS), "end_ns": t0 + round((a.onset + a.duration) * NS),
                 "kind": a.text} for a in edf.annotations if a.duration]
    return pd.DataFrame(rows, columns=["start_ns", "end_ns", "kind"])


# -- VitalDB (.vital) -------------------------------------------------------------------------------
_VITAL_LEAD_II = "SNUADC/ECG_II"  # VitalDB's lead II: the track of its SNUADC acquisition device
_VITAL_WAVE = 1  # vitaldb's track type of a wave (its TYPE_WAV; 2 is a numeric, 5 a text)
# A .vital file may inflate to 16 bytes per sample the limits admit (what a Recording takes a sample), for
# all its tracks together: a VitalDB case holds several waves and numerics beside lead II.
_VITAL_INFLATE_PER_SAMPLE = 16
_VITAL_LISTED = 40  # track names a refusal lists at most


def choose_vital_track(tracks: dict[str, bool], channel: str | None) -> str | None:
    """The track to read among `tracks` (device/track name -> whether it is a wave track), None when none
    fits. --channel: the full name, else the track name without its device when exactly one track has it.
    By default SNUADC/ECG_II, then the first wave track whose own name is lead II (ECG_II, II, MLII, ECG
    II...; never ECG_III). The caller refuses a chosen track that is no wave."""
    if channel is not None:
        if channel in tracks:
            return channel
        named = [name for name in tracks if name.rsplit("/", 1)[-1] == channel]
        return named[0] if len(named) == 1 else None
    if tracks.get(_VITAL_LEAD_II):
        return _VITAL_LEAD_II
    return next((name for name, wave in tracks.items()
                 if wave and _lead_name(name.rsplit("/", 1)[-1]) in _LEAD_II), None)


def _from_vital(path: Path, fs: float | None, start: str | None, channel: str | None, units: str | None,
                limits: RecordingLimits | None = None) -> Recording:
    """VitalDB's .vital through VitalDB's own reader (vitaldb.VitalFile; the format is theirs). The lead is
    a wave track (choose_vital_track), its unit the track's, its samples the track's records as written:
    each record starts at its own dt (epoch seconds) and holds samples at the track's srate (integer
    formats through the track's gain and offset, vitaldb's gap marker read as missing). The records are
    placed on one grid of that rate from the first record's dt, each start rounded to the nearest sample,
    and the samples between records are missing (NaN), as EDF+D's data records are: never interpolated,
    never resampled (vitaldb's to_numpy would resample every track to one interval by its own rounding).
    Overlapping records are refused. --start, when given, replaces the first record's time, as it
    replaces a WFDB or EDF header's start; `streamer replay` always gives one."""
    limits = limits or RecordingLimits()
    _check_vital_inflation(path, limits)
    header = _read_vital(path, None)  # the tracks' descriptions, no sample kept
    tracks = {name: trk.type == _VITAL_WAVE for name, trk in header.trks.items()}
    name = choose_vital_track(tracks, channel)
    listed = list(tracks)[:_VITAL_LISTED]
    if name is None:
        wanted = f"track {channel!r}" if channel is not None else "lead-II wave track (SNUADC/ECG_II, ECG_II, II)"
        raise RecordingError(f"{path} has no {wanted}; its tracks are {listed}: name one with --channel")
    if not tracks[name]:
        raise RecordingError(f"{path}: track {name!r} is a numeric or text track, not a wave; its tracks are "
                             f"{listed}")
    described = header.trks[name]
    rate = limits.check_rate(described.srate, f"track {name!r}'s")
    if fs is not None and abs(fs - rate) > 1e-9 * rate:
        raise RecordingError(f"{path}: track {name} is sampled at {rate:g} Hz by the file, not --fs {fs:g}")
    scale = _header_scale(str(path), name, str(described.unit or "").strip(), units)
    trk = _read_vital(path, [name]).trks.get(name)
    recs = [r for r in (trk.recs if trk is not None else []) if len(r["val"])]
    if not recs:
        raise RecordingError(f"{path}: track {name!r} holds no samples")
    dts = np.array([r["dt"] for r in recs], dtype=np.float64)
    if not (np.isfinite(dts).all() and dts.min() >= 0 and dts.max() < _MAX_TIME_NS / NS):
        raise RecordingError(f"{path}: a record of track {name!r} starts at dt {_worst(dts):g}, no epoch time "
                             "in seconds (negative, not a number, or beyond the year 2262)")
    order = np.argsort(dts, kind="stable")
    lengths = np.array([len(recs[i]["val"]) for i in order], dtype=np.int64)
    limits.check_length(int(lengths.sum()), rate, f"{path}: track {name!r}")
    seconds = dts[order] - dts[order[0]]
    # the grid spans the last record: a record a century on must not size it
    limits.check_span(float(seconds[-1]) + int(lengths[-1]) / rate, f"{path}: track {name!r}'s records")
    first = np.round(seconds * rate).astype(np.int64)
    stop = first + lengths
    if np.any(first[1:] < stop[:-1]):
        raise RecordingError(f"{path}: records of track {name!r} overlap in time")
    grid = np.full(int(stop[-1]), np.nan)
    for i, at in zip(order, first):
        grid[at:at + len(recs[i]["val"])] = _vital_samples(trk, recs[i]["val"])
    grid *= scale
    start_ns = parse_start(start) if start is not None else _epoch_ns(float(dts[order[0]]))
    return _validated(regular_times(len(grid), rate, start_ns), grid, rate, name)


def _vital_samples(trk, raw) -> np.ndarray:
    """One record's samples in the track's unit: float formats as stored; integer formats (fmt 3..8) times
    gain plus offset, the format's gap marker (vitaldb's FMT_NAN, what its packed writer fills gaps with)
    missing."""
    from vitaldb.utils import FMT_NAN

    raw = np.asarray(raw)
    values = raw.astype(np.float64)
    if trk.fmt > 2:  # vitaldb's own rule (get_track_samples): gain and offset apply to integer formats only
        gain, offset = float(trk.gain), float(trk.offset)
        if not (np.isfinite(gain) and np.isfinite(offset) and gain != 0):
            raise RecordingError(f"track {trk.dtname!r} has gain {gain:g} and offset {offset:g}: no scale")
        values[raw == FMT_NAN.get(trk.fmt)] = np.nan
        values = values * gain + offset
    return values


def _worst(dts: np.ndarray) -> float:
    bad = dts[~(np.isfinite(dts) & (dts >= 0) & (dts < _MAX_TIME_NS / NS))]
    return float(bad[0]) if len(bad) else float("nan")


def _epoch_ns(seconds: float) -> int:
    """Epoch seconds (float64) as ns: whole seconds and the fraction apart, to the microsecond float64
    carries at today's epoch (as numeric time columns are read)."""
    whole = int(np.floor(seconds))
    return whole * NS + int(round((seconds - whole) * 1_000_000)) * 1000


def _check_vital_inflation(path: Path, limits: RecordingLimits) -> None:
    """The gzip stream of a .vital file inflated and counted (1 MiB at a time, nothing kept) before vitaldb
    reads it: vitaldb inflates all of it and reads a packed file's wave track as one packet of whatever
    size the packet claims, so a small gzip bomb would take gigabytes. A damaged or truncated stream is
    refused here, loudly: vitaldb takes a stream that ends early as the end of the file (a truncated
    recording read in silence) and prints, not raises, what else goes wrong."""
    bound = limits.max_samples * _VITAL_INFLATE_PER_SAMPLE
    total = 0
    with _reading(".vital (gzip)"), gzip.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            total += len(chunk)
            if total > bound:
                raise RecordingError(f"it inflates to more than {bound:,} bytes, more than --max-recording-hours "
                                     f"{limits.max_hours:g} allows ({_VITAL_INFLATE_PER_SAMPLE} bytes a sample of "
                                     "that many hours at 1 kHz, all tracks together); raise it to read it")
    if total == 0:
        raise RecordingError("not a .vital file: its gzip stream is empty")


def _read_vital(path: Path, track_names: list[str] | None):
    """vitaldb's reader on the file: every track described but no sample kept (track_names None), or the
    records of those tracks. vitaldb reports a file it cannot read by printing and returning False: its
    print is kept off stdout (where a command may write its output) and becomes the refusal."""
    import vitaldb

    said = io.StringIO()
    vf = vitaldb.VitalFile()  # an empty file, then its own loader, whose result says whether it could read
    with redirect_stdout(said), _reading(".vital"):
        # an absolute path: vitaldb opens a name that parses as a URL with urllib
        ok = vf.load_vital(str(path.resolve()), track_names=track_names, header_only=track_names is None)
    if not ok:
        raise RecordingError(f"not a readable .vital file ({said.getvalue().strip() or 'no VITA signature'})")
    return vf
