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
    values: np.ndarray  # float64 mV
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


def _times_from_column(col: pd.Series, start_ns: int) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(col):
        v = col.to_numpy()
        if np.nanmax(np.abs(v)) > 1e17:  # already epoch ns
            return v.astype(np.int64)
        return start_ns + np.round(v.astype(np.float64) * NS).astype(np.int64)  # seconds from start
    ts = pd.to_datetime(col, utc=True)
    return ts.astype("int64").to_numpy() if hasattr(ts, "astype") else np.asarray(ts.asi8)


def _from_frame(df: pd.DataFrame, fs: float | None, start_ns: int, channel: str | None) -> Recording:
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
        times = _times_from_column(df[time_cols[0]], start_ns)
        nominal = None
    elif fs is not None:
        times, nominal = regular_times(len(values), fs, start_ns), fs
    elif len(cols) >= 2:
        times, nominal = _times_from_column(df[cols[0]], start_ns), None
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
    if not np.isfinite(values).all():
        raise RecordingError("recording holds NaN or infinite samples")
    if fs is None and len(times) > 1:
        fs = float(round(NS / np.median(np.diff(times)), 6))
    return Recording(times, values, fs, lead)


def load_recording(path: str | Path, fs: float | None = None, start: str | None = None,
                   channel: str | None = None) -> Recording:
    path = Path(path)
    start_ns = parse_start(start)
    suffix = path.suffix.lower()
    if suffix in (".hea", ".dat") or (not path.exists() and path.with_suffix(".hea").exists()):
        return _from_wfdb(path.with_suffix(""), fs, start, channel)
    if not path.exists():
        raise RecordingError(f"recording not found: {path}")
    if suffix == ".csv":
        return _from_frame(pd.read_csv(path), fs, start_ns, channel)
    if suffix == ".parquet":
        return _from_frame(pd.read_parquet(path), fs, start_ns, channel)
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
    values = rec.p_signal[:, idx].astype(np.float64)
    return _validated(regular_times(len(values), rate, parse_start(start)), values, rate, names[idx])
