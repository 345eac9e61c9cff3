"""One IHE PCD-01 `ORU^R01` message (Waveform Content Module) into lead-II waves, or a refusal with a reason.
Pure: no I/O, no clock but the `now_ns` it is given, no state across messages (hl7_in keeps the segments).

Invariants:
- `parse_pcd01(raw, ...)` returns a `Pcd01` or raises `Refusal` (`code` AR/AE, a stable `reason`, a short
  `detail` that never quotes sample values), and nothing else, whatever the bytes hold.
- A wave's rate, resolution and INOP come only from attribute OBXs of its own OBX-4 group: a dotted child of
  its sub-id (`1.1.1.1002.1` belongs to `1.1.1.1002`), the same sub-id, or, when no OBX carries a sub-id, the
  attributes that follow it before the next wave. Never another wave's.
- Sample i of a wave lies at exactly t0_ns + round(i * 1e9 / fs): t0 is the wave's OBX-14 (else its OBR-7)
  parsed to integer nanoseconds, with the offset it carries (else MSH-7's, else `naive_times` decides).
- Values are strict HL7 NM (sign, digits, one point; no exponent, no NaN, no "inf"): anything else refuses
  the message. Lead II is found through LEAD_II_ALIASES; other waves are ignored.
"""

from __future__ import annotations

import calendar
import math
import re
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

MIN_TIME_NS = 946_684_800 * 10**9  # 2000-01-01 (streamer.ingest.contract.MIN_TIMESTAMP_NS)
MAX_SAMPLES_PER_MESSAGE = 2_000_000  # a safety net under --max-message-bytes: values are >= 2 bytes each
MAX_SEGMENTS = 20_000  # segments (OBX, OBR, ...) one message may hold
MAX_ID_CHARS = 128  # streamer.ingest.contract.MAX_PATIENT_ID

# Lead II, as monitors and central stations name it (OBX-3). The MDC code 131330 is
# MDC_ECG_ELEC_POTL_II (partition 2, term 258); a code 0 or none means "name only".
LEAD_II_CODE = "131330"
LEAD_II_ALIASES = frozenset({"MDC_ECG_ELEC_POTL_II", "MDC_ECG_LEAD_II", "ECG_II", "ECG II", "ECG-II", "II",
                             "LEAD II", "LEAD_II", "MLII"})
# Attributes of a wave (OBX-3 identifier names; their numeric codes differ between vendors, so the name
# decides: 0^MDC_ATTR_SAMP_RATE, 2327^MDC_ATTR_NU_MSMT_RES and 67917^MDC_ATTR_NU_MSMT_RES all occur).
SAMP_RATE = "MDC_ATTR_SAMP_RATE"
MSMT_RES = "MDC_ATTR_NU_MSMT_RES"
EVT_INOP = "MDC_EVT_INOP"
EVT_INOP_CODE = "196660"  # partition 3 (events), term 52
# Units (OBX-6): MDC_DIM_X_VOLT is 4256 in partition 4 (262144); milli adds 18, micro 19.
MILLIVOLT_PER_UNIT = {"266418": 1.0, "MDC_DIM_MILLI_VOLT": 1.0, "mV": 1.0,
                      "266419": 1e-3, "MDC_DIM_MICRO_VOLT": 1e-3, "uV": 1e-3, "UV": 1e-3,
                      "266400": 1e3, "MDC_DIM_X_VOLT": 1e3, "V": 1e3}
DIMLESS = frozenset({"262656", "MDC_DIM_DIMLESS", "1", "{counts}"})
RATE_UNITS = frozenset({"264608", "MDC_DIM_PER_SEC", "264640", "MDC_DIM_HZ", "Hz", "/s", "s-1"})
# OBX-11 result status: these carry usable values; X (cannot be obtained), W (wrong), D (deleted), N (not
# asked) and anything unknown mark the wave invalid (a gap), as an INOP does.
VALID_STATUSES = frozenset({"", "F", "R", "C", "P", "A", "S", "U"})

_NM = r"[+-]?(?:\d+\.?\d*|\.\d+)"
_NUMBER = re.compile(_NM)
_DTM = re.compile(r"(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})(?:\.(\d{1,9}))?(?:([+-])(\d{2})(\d{2}))?")
_OFFSET = re.compile(r"\d{4,14}(?:\.\d{1,9})?([+-])(\d{2})(\d{2})")


class Refusal(Exception):
    """A message the gateway cannot use. `code`: AR (rejected: not a message it takes) or AE (an error in
    its content); `reason`: a stable short code; `detail`: one line for the peer and the log (no values)."""

    def __init__(self, code: str, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.code, self.reason, self.detail = code, reason, detail[:200]


@dataclass(slots=True)
class Header:
    """What the ACK echoes (MSH-3..6, MSH-10..12), as the message escaped them; empty when unreadable."""

    sending_app: str = ""
    sending_facility: str = ""
    receiving_app: str = ""
    receiving_facility: str = ""
    control_id: str = ""
    processing_id: str = "P"
    version: str = "2.6"


@dataclass(slots=True)
class Wave:
    """One lead-II wave of the message: `samples_mv` None when it is marked invalid (INOP, OBX-11)."""

    t0_ns: int
    fs: float
    samples_mv: np.ndarray | None
    why_invalid: str | None = None


@dataclass(slots=True)
class Pcd01:
    header: Header
    key: str  # patient id (PID-3) or bed (PV1-3)
    key_source: str  # "PID-3" or "PV1-3"
    waves: list[Wave] = field(default_factory=list)  # lead II only, by t0
    other_waves: int = 0  # NA waves of other leads, ignored


def read_header(raw: bytes) -> Header:
    """MSH's fields for the ACK, read without trusting the rest of the message (never raises): an ACK
    names the control id even of a message that cannot be parsed."""
    h = Header()
    try:
        first = raw[:4096].split(b"\r", 1)[0].split(b"\n", 1)[0]
        if not first.startswith(b"MSH") or len(first) < 8:
            return h
        sep = first[3:4]
        f = first.decode("utf-8", "replace").split(sep.decode("latin-1"))

        def get(i: int) -> str:  # MSH-1 is the separator itself: MSH-n is f[n - 1]
            return _echo(f[i - 1]) if len(f) >= i else ""

        h.sending_app, h.sending_facility = get(3), get(4)
        h.receiving_app, h.receiving_facility = get(5), get(6)
        h.control_id = get(10)
        h.processing_id = get(11) or "P"
        h.version = get(12) or "2.6"
    except Exception:  # noqa: BLE001 - a header it cannot read gives an ACK without echoes
        return Header()
    return h


def _echo(text: str) -> str:
    """A field echoed into an ACK: printable, no segment break, no field or repetition separator, bounded."""
    return "".join(c for c in text if c.isprintable() and c not in "|~")[:180]


def parse_pcd01(raw: bytes, key_by: str = "patient", now_ns: int = 0, max_future_s: float = 86400.0,
                min_rate_hz: float = 50.0, max_rate_hz: float = 10000.0, naive_times: str = "refuse") -> Pcd01:
    """The lead-II waves of one PCD-01 message (see the module's invariants); Refusal otherwise."""
    try:
        return _parse(raw, key_by, now_ns, max_future_s, min_rate_hz, max_rate_hz, naive_times)
    except Refusal:
        raise
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError, ArithmeticError,
            RecursionError, MemoryError, UnicodeError, AssertionError) as exc:
        # AssertionError: python-hl7's parser asserts on an MSH that repeats a separator (|^^~\&)
        # the type only: its text may quote the message (ids, values) into logs and ACKs
        raise Refusal("AE", "unparseable", f"{type(exc).__name__} while parsing") from None


def holds_patient_data(raw: bytes) -> bool:
    """A PID segment or an OBX (values): such a refused message goes to the dead-letter topic."""
    return b"PID" in raw or b"OBX" in raw


def _parse(raw, key_by, now_ns, max_future_s, min_rate_hz, max_rate_hz, naive_times) -> Pcd01:
    import hl7  # the gateways extra

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Refusal("AR", "not_utf8", "the message is not UTF-8 (MSH-18 other than UNICODE UTF-8 is not "
                      "supported)") from None
    text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    if not text.startswith("MSH") or len(text) < 8:
        raise Refusal("AR", "not_hl7", "the message does not start with an MSH segment")
    if text.count("\r") >= MAX_SEGMENTS:
        raise Refusal("AR", "too_many_segments", f"more than {MAX_SEGMENTS} segments")
    sep = text[3]
    if sep.isalnum() or sep in "\r ":
        raise Refusal("AR", "not_hl7", "MSH-1 is not a field separator")
    if any(len(s) < 3 or not s[:3].isalnum() for s in text.split("\r")):
        raise Refusal("AR", "not_hl7", "a segment without a three-character name")
    # python-hl7 makes an object of every component: the waves' values (most of the message) are kept
    # aside as text and parsed in one pass each (numpy), the rest goes through hl7.parse
    text, wave_values = _set_values_aside(text, sep)
    msg = hl7.parse(text)
    header = read_header(raw)
    comp = msg.separators[3] if len(msg.separators) > 3 else "^"
    msh = msg.segment("MSH")
    mtype = _components(msh, 9, comp)
    if mtype[:2] != ["ORU", "R01"]:
        raise Refusal("AR", "unsupported_message", f"message type {_echo('^'.join(mtype))[:40]!r} is not "
                      "ORU^R01 (IHE PCD-01)")
    default_offset = _offset_of(_field(msh, 7))
    key, key_source = _key(msg, key_by, comp)

    waves: list[tuple[int, list]] = []  # (index in OBX order, OBX fields)
    attrs: list[tuple[int, list]] = []
    obr_time = ""
    wave_obr_time: dict[int, str] = {}
    obx_index = 0
    for seg in msg:
        name = str(seg[0])
        if name == "OBR":
            obr_time = _field(seg, 7)
        elif name == "OBX":
            obx_index += 1
            fields = [_field(seg, i) for i in range(min(len(seg), 15))]
            fields += [""] * (15 - len(fields))
            if obx_index in wave_values:
                fields[5] = wave_values[obx_index]
                waves.append((obx_index, fields))
                wave_obr_time[obx_index] = obr_time
            else:
                attrs.append((obx_index, fields))

    pcd = Pcd01(header, key, key_source)
    no_subids = all(not f[4] for _, f in waves + attrs)
    total = 0
    for n, (index, f) in enumerate(waves):
        code, name = _identifier(f[3], comp)
        if not _is_lead_ii(code, name):
            pcd.other_waves += 1
            continue
        following = waves[n + 1][0] if n + 1 < len(waves) else math.inf
        if no_subids:
            mine = [a for i, a in attrs if index < i < following]
        else:
            mine = [a for _, a in attrs if _belongs(a[4], f[4], [w[4] for _, w in waves])]
        wave = _wave(f, mine, comp, wave_obr_time[index], default_offset, naive_times, now_ns, max_future_s,
                     min_rate_hz, max_rate_hz)
        total += 0 if wave.samples_mv is None else len(wave.samples_mv)
        if total > MAX_SAMPLES_PER_MESSAGE:
            raise Refusal("AE", "too_many_samples", f"more than {MAX_SAMPLES_PER_MESSAGE} lead-II samples")
        pcd.waves.append(wave)
    pcd.waves.sort(key=lambda w: w.t0_ns)
    return pcd


def _set_values_aside(text: str, sep: str) -> tuple[str, dict[int, str]]:
    """The text with every NA OBX's OBX-5 emptied, and those values by the OBX's position (1-based)."""
    lines = text.split("\r")
    values: dict[int, str] = {}
    n = 0
    for i, line in enumerate(lines):
        if line.startswith("OBX"):
            n += 1
            f = line.split(sep, 6)
            if len(f) > 5 and f[2].strip().upper() == "NA":
                values[n] = f[5]
                f[5] = ""
                lines[i] = sep.join(f)
    return "\r".join(lines), values


def _field(seg, i: int) -> str:
    return str(seg[i]) if len(seg) > i else ""


def _components(seg, i: int, comp: str) -> list[str]:
    return _field(seg, i).split("~")[0].split(comp)


def _identifier(text: str, comp: str) -> tuple[str, str]:
    parts = text.split(comp)
    return parts[0].strip(), (parts[1].strip() if len(parts) > 1 else "")


def _is_lead_ii(code: str, name: str) -> bool:
    """Code 131330 or an alias name; a code and a name that disagree refuse the message (which lead?)."""
    named = name.upper() in LEAD_II_ALIASES or (not name and code.upper() in LEAD_II_ALIASES)
    coded = code == LEAD_II_CODE
    if coded and name and not named:
        raise Refusal("AE", "ambiguous_lead", f"OBX-3 code {LEAD_II_CODE} (lead II) named {_echo(name)[:40]!r}")
    if named and code not in ("", "0", LEAD_II_CODE) and code.isdigit():
        raise Refusal("AE", "ambiguous_lead", f"OBX-3 names lead II with code {_echo(code)[:12]!r}")
    return coded or named


def _belongs(attr_subid: str, wave_subid: str, all_wave_subids: list[str]) -> bool:
    if not wave_subid:
        return False
    if attr_subid.startswith(wave_subid + ".") and "." not in attr_subid[len(wave_subid) + 1:]:
        return True
    return attr_subid == wave_subid and all_wave_subids.count(wave_subid) == 1


def _key(msg, key_by: str, comp: str) -> tuple[str, str]:
    pid = _first_segment(msg, "PID")
    patient = _unescape(msg, _components(pid, 3, comp)[0]).strip() if pid is not None else ""
    if patient:
        return _checked_id(patient, "PID-3"), "PID-3"
    if key_by == "bed":
        pv1 = _first_segment(msg, "PV1")
        if pv1 is not None:
            parts = [_unescape(msg, p).strip() for p in _components(pv1, 3, comp)[:3]]
            bed = "/".join(p for p in parts if p)
            if bed:
                return _checked_id(bed, "PV1-3"), "PV1-3"
        raise Refusal("AR", "no_patient_or_bed", "neither PID-3 (patient id) nor PV1-3 (bed) is given")
    raise Refusal("AR", "no_patient", "PID-3 (patient id) is empty or missing (--key-by bed falls back to PV1-3)")


def _first_segment(msg, name: str):
    for seg in msg:
        if str(seg[0]) == name:
            return seg
    return None


def _unescape(msg, text: str) -> str:
    return msg.unescape(text) if msg.esc in text else text


def _checked_id(text: str, where: str) -> str:
    if len(text) > MAX_ID_CHARS or not text.isprintable():
        raise Refusal("AE", "bad_patient_id", f"{where} must be 1-{MAX_ID_CHARS} printable characters")
    return text


def _wave(f, attrs, comp, obr_time, default_offset, naive_times, now_ns, max_future_s, min_rate_hz,
          max_rate_hz) -> Wave:
    rate_text = resolution_text = resolution_unit = None
    inop = False
    for a in attrs:
        code, name = _identifier(a[3], comp)
        label = (name or code).upper()
        if label == SAMP_RATE:
            if rate_text is not None:
                raise Refusal("AE", "bad_rate", "two MDC_ATTR_SAMP_RATE OBXs for one wave")
            rate_text = a[5]
            unit = _identifier(a[6], comp)
            if (unit[0] or unit[1]) and not ({unit[0], unit[1]} & RATE_UNITS):
                raise Refusal("AE", "bad_rate", "MDC_ATTR_SAMP_RATE's unit is not per second")
        elif label == MSMT_RES:
            if resolution_text is not None:
                raise Refusal("AE", "bad_resolution", "two MDC_ATTR_NU_MSMT_RES OBXs for one wave")
            resolution_text, resolution_unit = a[5], _identifier(a[6], comp)
        elif label == EVT_INOP or (not name and code == EVT_INOP_CODE):
            inop = True
    t0_text = f[14] or obr_time
    if not t0_text:
        raise Refusal("AE", "no_time", "the wave has no OBX-14 (nor OBR-7): the time of its first sample")
    t0_ns = parse_dtm(t0_text, default_offset, naive_times)
    if not MIN_TIME_NS <= t0_ns <= now_ns + int(max_future_s * 1e9):
        raise Refusal("AE", "bad_timestamp", "the first sample's time is before 2000 or too far in the future")
    if rate_text is None:
        raise Refusal("AE", "no_rate", "lead II has no MDC_ATTR_SAMP_RATE OBX in its OBX-4 group")
    fs = _number(rate_text, "bad_rate", "MDC_ATTR_SAMP_RATE")
    if not min_rate_hz <= fs <= max_rate_hz:
        raise Refusal("AE", "bad_rate", f"sample rate {fs:g} Hz outside [{min_rate_hz:g}, {max_rate_hz:g}]")
    status = f[11].strip().upper()
    if inop or status not in VALID_STATUSES:
        return Wave(t0_ns, fs, None, "inop" if inop else f"status {_echo(status)[:4]}")

    wave_unit = _identifier(f[6], comp)
    if resolution_text is not None:
        resolution = _number(resolution_text, "bad_resolution", "MDC_ATTR_NU_MSMT_RES")
        # the resolution carries the unit of one count; one without a unit takes the wave's
        per_count = _millivolts_per(resolution_unit if any(resolution_unit) else wave_unit)
        if any(wave_unit) and not set(wave_unit) & DIMLESS and _millivolts_per(wave_unit) != per_count:
            raise Refusal("AE", "unknown_unit", "the wave's unit and its resolution's unit disagree")
        scale = resolution * per_count
    else:
        scale = _millivolts_per(wave_unit)
    values = f[5]
    if not values:
        raise Refusal("AE", "empty_wave", "lead II has no values")
    samples = _values(values, comp) * scale
    if not np.isfinite(samples).all():
        raise Refusal("AE", "non_finite", "a value times the resolution is not finite")
    return Wave(t0_ns, fs, samples)


def _millivolts_per(unit: tuple[str, str]) -> float:
    code, name = unit
    if not code and not name:
        raise Refusal("AE", "unknown_unit", "lead II has no unit (OBX-6): mV or uV expected")
    if code in DIMLESS or name in DIMLESS:
        raise Refusal("AE", "unknown_unit", "counts (MDC_DIM_DIMLESS) need an MDC_ATTR_NU_MSMT_RES in mV")
    known = [MILLIVOLT_PER_UNIT.get(u) for u in (code, name) if u and u != "0"]
    if not known or None in known or len(set(known)) != 1:
        raise Refusal("AE", "unknown_unit", f"unit {_echo(code)[:12]!r}^{_echo(name)[:30]!r} is not mV or uV")
    return known[0]


def _number(text: str, reason: str, what: str) -> float:
    text = text.strip()
    if not _NUMBER.fullmatch(text) or len(text) > 40:
        raise Refusal("AE", reason, f"{what} is not a number")
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise Refusal("AE", reason, f"{what} must be positive")
    return value


_VALUES = re.compile(rf"{_NM}(?:\^{_NM})*")


def _values(text: str, comp: str) -> np.ndarray:
    if comp != "^":
        text = text.replace("^", "\x00").replace(comp, "^")  # validated below: a stray "^" fails
    if not _VALUES.fullmatch(text):
        raise Refusal("AE", "bad_value", "a waveform value is not an HL7 number (sign, digits, one point)")
    if text.count("^") >= MAX_SAMPLES_PER_MESSAGE:
        raise Refusal("AE", "too_many_samples", f"more than {MAX_SAMPLES_PER_MESSAGE} values in one wave")
    return np.array(text.split("^"), dtype=np.float64)


def _offset_of(text: str) -> int | None:
    m = _OFFSET.fullmatch(text.strip())
    if not m:
        return None
    return _offset_seconds(m.group(1), m.group(2), m.group(3))


def _offset_seconds(sign: str, hh: str, mm: str) -> int:
    if int(hh) > 14 or int(mm) >= 60:
        raise Refusal("AE", "bad_time", "a UTC offset beyond +-14:00")
    return (1 if sign == "+" else -1) * (int(hh) * 3600 + int(mm) * 60)


def parse_dtm(text: str, default_offset: int | None = None, naive_times: str = "refuse") -> int:
    """HL7 DTM `YYYYMMDDHHMMSS[.S...][+/-ZZZZ]` to integer epoch nanoseconds, exactly (no float). Seconds are
    required (a wave's time to the minute is no time). Without an offset: MSH-7's (`default_offset`
    seconds east of UTC); without that, `naive_times` "utc" reads it as UTC, "refuse" refuses it."""
    m = _DTM.fullmatch(text.strip())
    if not m:
        raise Refusal("AE", "bad_time", "not an HL7 DTM with seconds (YYYYMMDDHHMMSS[.SSSS][+/-ZZZZ])")
    y, mo, d, hh, mi, ss = (int(g) for g in m.groups()[:6])
    try:
        datetime(y, mo, d, hh, mi, ss)  # a real calendar time (no month 13, no leap second 60)
    except ValueError:
        raise Refusal("AE", "bad_time", "not a calendar date and time") from None
    if m.group(8):
        offset = _offset_seconds(m.group(8), m.group(9), m.group(10))
    elif default_offset is not None:
        offset = default_offset
    elif naive_times == "utc":
        offset = 0
    else:
        raise Refusal("AE", "time_without_offset", "the time carries no UTC offset (nor does MSH-7); send "
                      "+ZZZZ, or start the gateway with --naive-times utc")
    frac = (m.group(7) or "").ljust(9, "0")
    seconds = calendar.timegm((y, mo, d, hh, mi, ss, 0, 0, 0)) - offset
    return seconds * 10**9 + int(frac)


def sample_times_ns(t0_ns: int, fs: float, n: int) -> np.ndarray:
    """Exact times of a wave's samples: t0 + round(i * 1e9 / fs)."""
    return t0_ns + np.round(np.arange(n) * (1e9 / fs)).astype(np.int64)
