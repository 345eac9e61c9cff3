"""Recorded lead-II signals from CSV, NumPy (.npy/.npz), Parquet, WFDB and EDF/EDF+/BDF, as (timestamps ns,
mV; NaN where a sample is missing). Every reading is explicit or checked: time units, voltage units (from
the header, else --units), missing samples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from streamer.settings import WindowSettings
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
                   channel: str | None = None, time_unit: str | None = None, units: str | None = None) -> Recording:
    """`time_unit` (s, ms, us, ns) of a numeric time column: inferred from its step when unambiguous.
    Numeric times are epoch times when they lie after 1980 in that unit, else offsets from `start`.
    `units` (V, mV, uV): the samples' unit for files whose header names none (CSV, NumPy, Parquet: mV by
    default); a file whose header names one must agree with it. A recording whose amplitude cannot be lead-II
    ECG in the declared unit is refused, naming --units."""
    rec = _load(Path(path), fs, start, channel, time_unit, units)
    return _plausible(rec, path, units)


def _load(path: Path, fs, start, channel, time_unit, units) -> Recording:
    if time_unit is not None and time_unit not in TIME_UNITS:
        raise RecordingError(f"time unit {time_unit!r} is not one of {', '.join(TIME_UNITS)}")
    if units is not None and _mv_per(units) is None:
        known = ", ".join(sorted(_MV_PER_UNIT))
        raise RecordingError(f"--units {units!r} is not a voltage unit streamer reads ({known})")
    start_ns = parse_start(start)
    suffix = path.suffix.lower()
    if suffix in (".hea", ".dat") or (not path.exists() and path.with_suffix(".hea").exists()):
        return _from_wfdb(path.with_suffix(""), fs, start, channel, units)
    if not path.exists():
        raise RecordingError(f"recording not found: {path}")
    if suffix in (".edf", ".bdf"):
        return _from_edf(path, fs, start, channel, units)
    return _scaled(_from_file(path, suffix, fs, start_ns, channel, time_unit), units)


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


def _from_file(path: Path, suffix: str, fs, start_ns: int, channel, time_unit) -> Recording:
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
    raise RecordingError(f"unsupported recording format {suffix!r}: use .csv, .npy, .npz, .parquet, WFDB (.hea) "
                         "or EDF/EDF+/BDF (.edf, .bdf)")


def _from_wfdb(record: Path, fs: float | None, start: str | None, channel: str | None,
               units: str | None = None) -> Recording:
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
    scale = _header_scale(f"WFDB record {record}", names[idx], unit, units)
    values = rec.p_signal[:, idx].astype(np.float64) * scale  # the header's unit, to mV
    return _validated(regular_times(len(values), rate, parse_start(start)), values, rate, names[idx])


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


def _from_edf(path: Path, fs: float | None, start: str | None, channel: str | None, units: str | None) -> Recording:
    """EDF, EDF+ (continuous or discontinuous) and BDF through edfio: the lead by label (II, MLII, ECG II,
    EKG-II, Lead II...; --channel for another), the unit from its physical dimension, the start from the
    header (EDF has no time zone: UTC unless --start). In an EDF+D file each data record is placed at its
    own onset on the lead's sample grid; the samples between records are missing (NaN)."""
    edf = _read_edf(path)
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
    rate = float(sig.sampling_frequency)
    if fs is not None and abs(fs - rate) > 1e-9 * rate:
        raise RecordingError(f"{path}: lead {sig.label} is sampled at {rate:g} Hz by its header, not --fs {fs:g}")
    data = np.asarray(sig.data, dtype=np.float64) * scale
    if start is None:
        start = edf.startdatetime.isoformat()
    per_record = sig.samples_per_data_record
    onsets = _record_onsets(edf)
    if onsets is not None and len(onsets) == len(data) // per_record:
        index = np.round(np.asarray(onsets, dtype=np.float64) * rate).astype(np.int64)
        if np.any(np.diff(index) < per_record):
            raise RecordingError(f"{path}: its data records overlap in time")
        grid = np.full(int(index[-1]) + per_record, np.nan)
        for j, first in enumerate(index):
            grid[first:first + per_record] = data[j * per_record:(j + 1) * per_record]
        data = grid
    return _validated(regular_times(len(data), rate, parse_start(start)), data, rate, sig.label.strip())


def _read_edf(path: Path):
    import edfio

    try:
        return edfio.read_bdf(path) if path.suffix.lower() == ".bdf" else edfio.read_edf(path)
    except Exception as exc:  # edfio raises ValueError and others on a damaged header
        raise RecordingError(f"{path}: not a readable EDF/BDF file ({exc})") from exc


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
    edf = _read_edf(Path(path))
    t0 = parse_start(edf.startdatetime.isoformat())
    rows = [{"start_ns": t0 + round(a.onset * NS), "end_ns": t0 + round((a.onset + a.duration) * NS),
             "kind": a.text} for a in edf.annotations if a.duration]
    return pd.DataFrame(rows, columns=["start_ns", "end_ns", "kind"])
