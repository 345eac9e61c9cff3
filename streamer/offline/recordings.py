"""Recorded lead-II signals from CSV, NumPy (.npy/.npz), Parquet and WFDB, as (timestamps ns, mV)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from streamer.windows.grid import NS, as_rate

DEFAULT_START = "2000-01-01T00:00:00Z"  # for recordings with relative time and no --start
_TIME_NAMES = ("time", "timestamp", "t", "datetime", "time_ns", "timestamp_ns")
_VALUE_NAMES = ("II", "MLII", "ii", "lead_ii", "ecg", "value", "mv", "signal")


class RecordingError(ValueError):
    pass


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
    if time_unit is None:
        step = float(np.median(np.diff(v))) if len(v) > 1 else float("nan")
        time_unit = infer_time_unit(step)
        if time_unit is None:
            raise RecordingError(f"cannot tell the unit of time column {col.name!r} (median step {step:g} is no "
                                 "ECG sample interval in s, ms, us or ns): give --time-unit s|ms|us|ns")
    unit_ns = TIME_UNITS[time_unit]
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
    values = df[value_col].to_numpy(dtype=np.float64)
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
                   channel: str | None = None, time_unit: str | None = None) -> Recording:
    """`time_unit` (s, ms, us, ns) of a numeric time column: inferred from its step when unambiguous.
    Numeric times are epoch times when they lie after 1980 in that unit, else offsets from `start`."""
    path = Path(path)
    if time_unit is not None and time_unit not in TIME_UNITS:
        raise RecordingError(f"time unit {time_unit!r} is not one of {', '.join(TIME_UNITS)}")
    start_ns = parse_start(start)
    suffix = path.suffix.lower()
    if suffix in (".hea", ".dat") or (not path.exists() and path.with_suffix(".hea").exists()):
        return _from_wfdb(path.with_suffix(""), fs, start, channel)
    if not path.exists():
        raise RecordingError(f"recording not found: {path}")
    if suffix == ".csv":
        return _from_frame(pd.read_csv(path), fs, start_ns, channel, time_unit)
    if suffix == ".parquet":
        return _from_frame(pd.read_parquet(path), fs, start_ns, channel, time_unit)
    if suffix == ".npy":
        values = np.load(path, allow_pickle=False)
        if values.ndim != 1 or fs is None:
            raise RecordingError(".npy recordings are one 1-D array of mV and need --fs")
        return _validated(regular_times(len(values), fs, start_ns), values, fs)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            key = channel or next((k for k in ("signal", "values", "ecg", "II", "MLII") if k in z), None)
            if key is None or key not in z:
                raise RecordingError(f".npz needs a 'signal' (or --channel) array; it has {list(z.keys())}")
            values = z[key]
            if "times_ns" in z:
                return _validated(z["times_ns"], values, fs)
            rate = fs if fs is not None else (float(z["fs"]) if "fs" in z else None)
            if rate is None:
                raise RecordingError(".npz without 'fs' or 'times_ns' needs --fs")
            return _validated(regular_times(len(values), rate, start_ns), values, rate)
    raise RecordingError(f"unsupported recording format {suffix!r}: use .csv, .npy, .npz, .parquet or WFDB (.hea)")


def _from_wfdb(record: Path, fs: float | None, start: str | None, channel: str | None) -> Recording:
    import wfdb

    rec = wfdb.rdrecord(str(record))
    names = list(rec.sig_name)
    wanted = [channel] if channel else ["II", "MLII"]
    idx = next((names.index(n) for n in wanted if n in names), None)
    if idx is None:
        raise RecordingError(f"WFDB record {record} has no lead {wanted}; leads are {names} (use --channel)")
    rate = fs or float(rec.fs)
    if start is None and rec.base_datetime is not None:
        start = rec.base_datetime.isoformat()
    unit = str((rec.units or [None] * len(names))[idx] or "").strip()
    scale = _MV_PER_UNIT.get(unit.lower().replace("µ", "u").replace("μ", "u"))
    if scale is None:
        raise RecordingError(f"WFDB record {record}: lead {names[idx]} is in {unit or 'no unit'!r}, not a voltage "
                             f"unit streamer reads ({', '.join(sorted(_MV_PER_UNIT))})")
    values = rec.p_signal[:, idx].astype(np.float64) * scale  # the header's unit, to mV
    return _validated(regular_times(len(values), rate, parse_start(start)), values, rate, names[idx])


# Voltage units as WFDB headers spell them, in mV each (lower case, micro written u)
_MV_PER_UNIT = {"v": 1000.0, "volt": 1000.0, "volts": 1000.0, "mv": 1.0, "millivolt": 1.0, "millivolts": 1.0,
                "uv": 1e-3, "microvolt": 1e-3, "microvolts": 1e-3, "nv": 1e-6}
