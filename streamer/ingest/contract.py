"""The input message contract: one chunk of lead-II samples of one patient, in JSON or binary.

Kafka key = patient id (UTF-8). The value is detected per message: a binary frame starts with b"ECG1",
anything else is parsed as JSON. See docs/messages.md, "Input messages".
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
# The binary frame's layout is the light client's: gateways write frames with it, without this package.
# HEADER: magic, version, dtype, reserved, fs, t0_ns, segment_start_ns, seq, gain, baseline, n_samples, lead, id_len
from streamer_client.frames import DTYPE_FLOAT32_MV, DTYPE_INT16_COUNTS, FORMAT_VERSION, MAGIC, NO_VALUE
from streamer_client.frames import HEADER as _HEADER
from streamer_client.frames import frame_header

from streamer.settings import WindowSettings

HEADER_SIZE = _HEADER.size
_SAMPLE_WIDTH = {DTYPE_FLOAT32_MV: 4, DTYPE_INT16_COUNTS: 2}  # bytes per sample of each type
MIN_TIMESTAMP_NS = 946_684_800 * 10**9  # 2000-01-01: anything earlier is a broken clock
MAX_PATIENT_ID = 128


class InvalidMessage(ValueError):
    """A message that cannot be accepted; `reason` is a stable, short, machine-readable code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_largest = np.maximum.reduce  # what ndarray.max() calls, without its Python wrapper (once a record)


@dataclass(slots=True)  # not frozen: that sets each field through object.__setattr__, 0.5 us a record
class Chunk:
    patient_id: str
    lead: str
    t0_ns: int  # timestamp of the first sample, epoch ns
    fs: float  # samples per second
    samples: np.ndarray  # float64 millivolts
    seq: int | None = None
    segment_start_ns: int | None = None  # first sample of the continuous recording segment
    # the largest |sample| (NaN if one is NaN, 0 without samples): the finite check and the plausibility
    # check both read it, without a pass over the samples each
    peak_mv: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        samples = self.samples
        self.peak_mv = float(_largest(np.abs(samples))) if len(samples) else 0.0


def _chunk_with_peak(patient_id: str, lead: str, t0_ns: int, fs: float, samples: np.ndarray, seq: int | None,
                     segment_start_ns: int | None, peak_mv: float) -> Chunk:
    """A Chunk whose peak was found for the whole fetch at once (decode_many): the same fields as
    Chunk(...), without __post_init__'s pass over the samples."""
    chunk = object.__new__(Chunk)
    chunk.patient_id, chunk.lead, chunk.t0_ns, chunk.fs = patient_id, lead, t0_ns, fs
    chunk.samples, chunk.seq, chunk.segment_start_ns, chunk.peak_mv = samples, seq, segment_start_ns, peak_mv
    return chunk


class JsonChunk(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    patient_id: str = Field(min_length=1, max_length=MAX_PATIENT_ID)
    lead: str = Field(max_length=8)  # required: a default would hide a monitor sending another lead
    t0_ns: int
    fs: float | int
    samples: list[float | int] | None = None
    counts: list[int] | None = None
    gain: float | int | None = None  # counts per mV
    baseline: float | int = 0
    units: str | None = None  # of `samples`: mV (default) or uV; an error with `counts`
    seq: int | None = None
    segment_start_ns: int | None = None


def _check(chunk: Chunk, key: bytes | None, s: WindowSettings, now_ns: int) -> Chunk:
    # The key decides the partition: without it one patient is spread over partitions and two workers
    # could publish different flags under one window_id.
    if key is None:
        raise InvalidMessage("missing_key", "records must be keyed by patient id")
    try:
        key_id = key.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidMessage("bad_key", "message key is not UTF-8") from None
    if key_id != chunk.patient_id:
        raise InvalidMessage("key_mismatch", "message key differs from the patient id in the value")
    if not chunk.patient_id or len(chunk.patient_id) > MAX_PATIENT_ID or not chunk.patient_id.isprintable():
        raise InvalidMessage("bad_patient_id", "patient id must be 1-128 printable characters")
    if not (math.isfinite(chunk.fs) and s.min_rate_hz <= chunk.fs <= s.max_rate_hz):
        raise InvalidMessage("bad_rate", f"sample rate {chunk.fs!r} outside [{s.min_rate_hz}, {s.max_rate_hz}] Hz")
    latest_ns = now_ns + int(s.max_clock_skew_s * 1e9)
    if not MIN_TIMESTAMP_NS <= chunk.t0_ns <= latest_ns:
        raise InvalidMessage("bad_timestamp", f"t0_ns {chunk.t0_ns} before 2000 or too far in the future")
    # A segment start after t0 is not refused here: after a clock stepped back (NTP, DST) a monitor goes on
    # sending the segment start it took under the old clock; the window stage handles that timeline.
    if chunk.segment_start_ns is not None and not MIN_TIMESTAMP_NS <= chunk.segment_start_ns <= latest_ns:
        raise InvalidMessage("bad_segment_start", "segment_start_ns before 2000 or too far in the future")
    if chunk.lead not in s.accepted_leads:
        raise InvalidMessage("wrong_lead", f"lead {chunk.lead!r} is not one of {s.accepted_leads}"[:200])
    n = len(chunk.samples)
    if n == 0:
        raise InvalidMessage("empty", "no samples")
    if n > s.max_chunk_s * chunk.fs:
        raise InvalidMessage("oversized", f"{n} samples is more than {s.max_chunk_s} s at {chunk.fs} Hz")
    if not math.isfinite(chunk.peak_mv):
        raise InvalidMessage("non_finite", "samples hold NaN or infinity")
    return chunk


def check_gain(gain: float, s: WindowSettings | None) -> None:
    """Counts need a finite gain inside the plausible range (a gain of 1e-300 turns counts into nonsense)."""
    if not (math.isfinite(gain) and gain != 0):  # a float (struct or float()): math's is numpy's, 20x cheaper
        raise InvalidMessage("bad_gain", "counts need a finite non-zero gain (counts per mV)")
    if s is not None and not s.min_gain <= abs(gain) <= s.max_gain:
        raise InvalidMessage("bad_gain", f"gain {gain!r} counts/mV outside [{s.min_gain}, {s.max_gain}]")


_PLAIN_FIELDS = frozenset(("patient_id", "lead", "t0_ns", "fs", "samples", "seq", "segment_start_ns"))


def _plain_json(raw: dict, value: bytes) -> Chunk | None:
    """The usual message (mV samples, nothing optional but seq and segment start) checked without pydantic,
    by exactly JsonChunk's rules; None hands anything else to JsonChunk, which decides it and words the
    error. pydantic costs a third of a JSON record's decoding."""
    if not raw.keys() <= _PLAIN_FIELDS or b"u" in value or value.find(b"f", value.find(b"f") + 1) >= 0:
        # perhaps a boolean (strict fields refuse one where numpy would take it as 1 or 0): `true` holds
        # the only "u" and `false` the only "f" but that of "fs" these fields' names and numbers can have;
        # one byte searched for, not a word (a fifth of the cost); a patient id with either goes to JsonChunk
        return None
    pid, lead, t0_ns, fs = raw.get("patient_id"), raw.get("lead"), raw.get("t0_ns"), raw.get("fs")
    seq, seg, samples = raw.get("seq"), raw.get("segment_start_ns"), raw.get("samples")
    if (type(pid) is not str or not 1 <= len(pid) <= MAX_PATIENT_ID or type(lead) is not str or len(lead) > 8
            or type(t0_ns) is not int or type(fs) not in (float, int) or type(samples) is not list
            or (seq is not None and type(seq) is not int) or (seg is not None and type(seg) is not int)):
        return None
    try:
        array = np.array(samples)
    except (ValueError, TypeError, OverflowError):
        return None  # ragged or too deeply nested lists: JsonChunk words the error
    if array.ndim != 1 or array.dtype.kind not in "fi":
        return None  # null, text, nested lists, integers past 64 bits
    return Chunk(pid, lead, t0_ns, float(fs), array.astype(np.float64, copy=False), seq, seg)


def decode_json(value: bytes, s: WindowSettings | None = None) -> Chunk:
    try:
        raw = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage("malformed_json", str(exc)[:200]) from None
    if not isinstance(raw, dict):
        raise InvalidMessage("malformed_json", "the value must be a JSON object")
    plain = _plain_json(raw, value)
    if plain is not None:
        return plain
    try:
        msg = JsonChunk.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidMessage("invalid_field", f"{where}: {first['msg']}"[:200]) from None
    if (msg.samples is None) == (msg.counts is None):
        raise InvalidMessage("invalid_field", "exactly one of samples (mV) or counts (+ gain) is required")
    if msg.samples is not None:
        if msg.units not in (None, "mV", "uV"):
            raise InvalidMessage("invalid_field", f"units must be mV or uV, not {msg.units!r}"[:200])
        samples = np.asarray(msg.samples, dtype=np.float64)
        if msg.units == "uV":
            samples = samples / 1000.0
    else:
        if msg.units is not None:
            raise InvalidMessage("invalid_field", "units apply to samples; counts are scaled by gain (counts per mV)")
        if msg.gain is None:
            raise InvalidMessage("invalid_field", "counts need a gain (counts per mV)")
        check_gain(float(msg.gain), s)
        if not np.isfinite(msg.baseline):
            raise InvalidMessage("invalid_field", "baseline must be finite")
        samples = (np.asarray(msg.counts, dtype=np.float64) - msg.baseline) / msg.gain
    return Chunk(msg.patient_id, msg.lead, msg.t0_ns, float(msg.fs), samples, msg.seq, msg.segment_start_ns)


def _binary_header(value: bytes, s: WindowSettings | None) -> tuple:
    """A frame's header, checked: (sample type, fs, t0_ns, segment start, seq, gain, baseline, n, patient
    id, lead, where the samples start); raises InvalidMessage. The frame is exactly header + id + samples."""
    if len(value) < HEADER_SIZE:
        raise InvalidMessage("malformed_binary", f"{len(value)} bytes is shorter than the {HEADER_SIZE}-byte header")
    (magic, version, dtype, _reserved, fs, t0_ns, seg, seq, gain, baseline, n, lead,
     id_len) = _HEADER.unpack_from(value)
    if version != FORMAT_VERSION:
        raise InvalidMessage("malformed_binary", f"unknown format version {version}")
    width = _SAMPLE_WIDTH.get(dtype)
    if width is None:
        raise InvalidMessage("malformed_binary", f"unknown sample type {dtype}")
    expected = HEADER_SIZE + id_len + n * width
    if len(value) != expected:
        raise InvalidMessage("malformed_binary", f"header says {expected} bytes, message has {len(value)}")
    try:
        patient_id = value[HEADER_SIZE:HEADER_SIZE + id_len].decode("utf-8")
        lead_s = lead.rstrip(b"\0").decode("ascii")
    except UnicodeDecodeError:
        raise InvalidMessage("malformed_binary", "patient id or lead is not valid text") from None
    if dtype == DTYPE_INT16_COUNTS:
        if not math.isfinite(baseline):  # a float from the header: math's is numpy's
            raise InvalidMessage("malformed_binary", "int16 counts need a finite baseline")
        check_gain(gain, s)
    return (dtype, fs, t0_ns, None if seg == NO_VALUE else seg, None if seq == NO_VALUE else seq, gain, baseline,
            n, patient_id, lead_s, HEADER_SIZE + id_len)


def decode_binary(value: bytes, s: WindowSettings | None = None) -> Chunk:
    dtype, fs, t0_ns, seg, seq, gain, baseline, n, patient_id, lead, body = _binary_header(value, s)
    # the samples are read in place (from `body`), not copied out first
    if dtype == DTYPE_FLOAT32_MV:
        samples = np.frombuffer(value, dtype="<f4", count=n, offset=body).astype(np.float64)
    else:
        samples = (np.frombuffer(value, dtype="<i2", count=n, offset=body).astype(np.float64) - baseline) / gain
    return Chunk(patient_id, lead, t0_ns, fs, samples, seq, seg)


# what numpy, pydantic or struct may raise on a shape nobody foresaw: `undecodable`, never a raise
_FOREIGN = (ValueError, TypeError, OverflowError, ArithmeticError, RecursionError, MemoryError)


def _undecodable(exc: BaseException) -> InvalidMessage:
    # the exception's type only: its text may quote the record (samples, ids) into logs and headers
    return InvalidMessage("undecodable", f"{type(exc).__name__} while decoding")


def decode(key: bytes | None, value: bytes | None, settings: WindowSettings, now_ns: int | None = None) -> Chunk:
    """Decode and validate one Kafka record; raises InvalidMessage with a reason, and nothing else.

    Whatever the bytes hold, the outcome is a checked Chunk or InvalidMessage: a failure this module did not
    foresee (numpy or pydantic refusing a shape, an overflow) is `undecodable`, so the caller's one handler
    turns it into a dead letter. A record must never be able to stop its partition."""
    if value is None:
        raise InvalidMessage("empty", "record has no value (tombstone)")
    try:
        chunk = decode_binary(value, settings) if value[:4] == MAGIC else decode_json(value, settings)
        return _check(chunk, key, settings, now_ns if now_ns is not None else time.time_ns())
    except InvalidMessage:
        raise
    except _FOREIGN as exc:
        raise _undecodable(exc) from None


def _decoded(key: bytes | None, value: bytes | None, settings: WindowSettings, now_ns: int) -> Chunk | InvalidMessage:
    try:
        return decode(key, value, settings, now_ns)
    except InvalidMessage as exc:
        return exc


def decode_many(records: Sequence[tuple[bytes | None, bytes | None]], settings: WindowSettings,
                now_ns: int | None = None) -> list[Chunk | InvalidMessage]:
    """Decode and validate one fetch: for each (key, value), in order, the Chunk `decode` returns or the
    InvalidMessage it raises, with the same reason and detail, all judged at one `now_ns`.

    Binary frames: the samples of all float32 frames are converted in one numpy pass, those of all int16
    frames in another (each scaled by its own baseline and gain, the same float64 operations as
    `decode_binary`), and the largest |sample| of each in one reduction; headers and `_check` stay per
    record, through `decode`'s own functions. JSON messages and tombstones go through `decode` record by
    record: orjson and numpy's per-element conversion are their cost, and one array conversion of a
    fetch's lists (or one peak reduction) measured no faster (benchmarks/RESULTS.md, issue 48 item 3).

    Invariant: each Chunk owns its samples (a copy, not a view of the fetch's array), so a record the
    window stage holds keeps only its own bytes alive, as its memory accounting assumes."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    out: list = [None] * len(records)
    # per sample type: (index, key, checked header) and the frame's sample bytes
    floats, counts = [], []
    float_bytes, count_bytes = [], []
    for i, (key, value) in enumerate(records):
        if value is None or value[:4] != MAGIC:
            out[i] = _decoded(key, value, settings, now_ns)
            continue
        try:
            header = _binary_header(value, settings)
        except InvalidMessage as exc:
            out[i] = exc
            continue
        except _FOREIGN as exc:
            out[i] = _undecodable(exc)
            continue
        # the frame is exactly header + id + samples: its tail is the samples
        if header[0] == DTYPE_FLOAT32_MV:
            floats.append((i, key, header))
            float_bytes.append(value[header[10]:])
        else:
            counts.append((i, key, header))
            count_bytes.append(value[header[10]:])
    if floats:
        samples = np.frombuffer(b"".join(float_bytes), dtype="<f4").astype(np.float64)
        _binary_chunks(floats, samples, settings, now_ns, out)
    if counts:
        ns = np.array([h[7] for _, _, h in counts], dtype=np.intp)
        baselines = np.repeat(np.array([h[6] for _, _, h in counts], dtype=np.float64), ns)
        gains = np.repeat(np.array([h[5] for _, _, h in counts], dtype=np.float64), ns)
        samples = (np.frombuffer(b"".join(count_bytes), dtype="<i2").astype(np.float64) - baselines) / gains
        _binary_chunks(counts, samples, settings, now_ns, out)
    return out


def _checked(chunk: Chunk, key: bytes | None, settings: WindowSettings, now_ns: int) -> Chunk | InvalidMessage:
    """`decode`'s outcome for a decoded chunk: checked, or the InvalidMessage it is refused with."""
    try:
        return _check(chunk, key, settings, now_ns)
    except InvalidMessage as exc:
        return exc
    except _FOREIGN as exc:
        return _undecodable(exc)


def _pieces(samples: np.ndarray, sizes: list[int]) -> tuple[list[np.ndarray], list[float]]:
    """`samples` cut into records of `sizes`, each piece its own copy, and each piece's largest |sample|
    (NaN if one is NaN, 0 when empty: Chunk.peak_mv), in one reduction for all."""
    ends = np.cumsum(sizes, dtype=np.intp)
    starts = (ends - np.asarray(sizes, dtype=np.intp)).tolist()
    filled = [a for a, n in zip(starts, sizes) if n]
    peaks = iter(np.maximum.reduceat(np.abs(samples), filled).tolist() if filled else ())
    pieces = [samples[a:a + n].copy() for a, n in zip(starts, sizes)]
    return pieces, [next(peaks) if n else 0.0 for n in sizes]


def _binary_chunks(frames: list, samples: np.ndarray, settings: WindowSettings, now_ns: int, out: list) -> None:
    pieces, peaks = _pieces(samples, [h[7] for _, _, h in frames])
    for (i, key, h), piece, peak in zip(frames, pieces, peaks):
        _, fs, t0_ns, seg, seq, _, _, _, patient_id, lead, _ = h
        chunk = _chunk_with_peak(patient_id, lead, t0_ns, fs, piece, seq, seg, peak)
        out[i] = _checked(chunk, key, settings, now_ns)


def encode_json(chunk: Chunk) -> bytes:
    doc = {"patient_id": chunk.patient_id, "lead": chunk.lead, "t0_ns": chunk.t0_ns, "fs": chunk.fs,
           "samples": np.asarray(chunk.samples, dtype=np.float64)}
    if chunk.seq is not None:
        doc["seq"] = chunk.seq
    if chunk.segment_start_ns is not None:
        doc["segment_start_ns"] = chunk.segment_start_ns
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def encode_binary(chunk: Chunk, counts_gain: float | None = None, baseline: float = 0.0) -> bytes:
    """float32 mV by default; with `counts_gain`, int16 counts = round(mV * gain + baseline)."""
    pid = chunk.patient_id.encode("utf-8")
    lead = chunk.lead.encode("ascii")[:8]
    if counts_gain is None:
        body = np.asarray(chunk.samples, dtype="<f4").tobytes()
        dtype, gain = DTYPE_FLOAT32_MV, 1.0
    else:
        counts = np.round(np.asarray(chunk.samples) * counts_gain + baseline)
        body = np.clip(counts, -32768, 32767).astype("<i2").tobytes()
        dtype, gain = DTYPE_INT16_COUNTS, counts_gain
    header = frame_header(pid, lead, chunk.t0_ns, chunk.fs, len(chunk.samples), dtype, gain, baseline, chunk.seq,
                          chunk.segment_start_ns)
    return header + pid + body
