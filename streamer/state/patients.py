"""What the worker knows of one patient beyond its open windows, kept durable in a compacted changelog.

"Which windows were already reported" is state, not an inference from the first sample a new owner
happens to see: samples can be missing and clocks can step. Each segment grid a patient used recently is
remembered with the first window not yet reported (`next_k`); after a restart, rebalance or takeover the
new owner reports every window from there on and none before it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from typing import NamedTuple

import orjson

from streamer.model.decision import Verdict, window_id
from streamer.spec import FlagStatus, NoScoreReason

# 2 added the episode's seq, pending message and renewal time; 3 the wall time the patient was last seen
# (state.ttl_s); 4 the flags written ahead of a wall-clock close. Versions 1 to 3 are read too.
STATE_VERSION = 4
MAX_SEGMENTS = 4  # grids remembered per patient: the current one and the last few before clock events
MAX_FLAGS_AHEAD = 256  # a closed stream emits its due and open windows: a handful, bounded by the tolerance


@dataclass
class SegmentState:
    natural_anchor_ns: int  # the segment_start_ns its records carry (0: the epoch grid)
    anchor_ns: int  # where its grid starts: the natural anchor, or a re-anchoring after a clock step
    fs: str  # exact rate, as a fraction ("500", "1001/2")
    next_k: int  # first window of this grid not yet reported


@dataclass(frozen=True, slots=True)
class EpisodeTransition:
    """An episode message as the tracker makes it (publish.episodes) and the state holds it until it is
    published (`EpisodeState.pending`); publish.messages encodes it. `start_ns` None: the conservative
    close of a patient whose state was lost (no episode id then). `end_ns` only on a close; `valid_until_ns`
    and `lease_ns` only on an open or renewal."""
    patient_id: str
    seq: int
    state: str  # "open" | "closed"
    renewal: bool
    reason: str | None
    start_ns: int | None
    end_ns: int | None
    last_flagged_end_ns: int | None
    peak_probability: float | None
    flagged_windows: int
    model: str
    updated_at_ns: int
    valid_until_ns: int | None
    lease_ns: int | None

    @property
    def episode_id(self) -> str | None:
        return None if self.start_ns is None else window_id(self.patient_id, self.start_ns)


class FlagAhead(NamedTuple):
    """A verdict written ahead of its flag's publication, with its window's grid anchor (for the tracker)."""
    grid: int
    verdict: Verdict


@dataclass
class EpisodeState:
    """Hysteresis over one patient's scored flags (see publish.episodes)."""
    flagged_streak: int = 0
    clean_streak: int = 0
    streak_start_ns: int = 0
    streak_peak: float = 0.0
    open_start_ns: int | None = None
    last_flagged_end_ns: int = 0
    peak: float = 0.0
    flagged_windows: int = 0
    updated_at_s: float = 0.0  # wall time of the last scored flag applied (staleness)
    last_window: tuple[int, int] | None = None  # (grid anchor, window start) of the last flag applied
    # The patient's episode messages are numbered; consumers apply the highest number (no wall clocks).
    # It survives every close and hand-over; 0 until the first message (see publish.episodes.next_seq).
    seq: int = 0
    # The last episode message not yet known to be published: written to the changelog before it is
    # sent, cleared once acknowledged, so a new owner re-sends it (a close is never lost).
    pending: EpisodeTransition | None = None
    renewed_at_s: float = 0.0  # wall time the open episode's lease was last sent (in memory it matters)


@dataclass
class PatientState:
    patient_id: str
    segments: list[SegmentState] = field(default_factory=list)  # oldest first
    episode: EpisodeState = field(default_factory=EpisodeState)
    # wall time (s) of its last change (a window reported, an episode message): after state.ttl_s without one
    # the state is tombstoned. None: restored from a version without it (its clock starts at the restore).
    seen_at_s: float | None = None
    # Flags of windows a wall-clock decision closed (idle eviction, the memory cap), not yet known to be
    # published. At least once they are written here, with the windows marked reported, before they are
    # sent, and cleared once acknowledged: a crash in between makes the next owner send these same flags,
    # never complete the windows from a replay and report them with other content. Stored as
    # {"grid": the window's grid anchor, "flag": the verdict} (see _verdict_doc).
    flags_ahead: list[FlagAhead] = field(default_factory=list)

    def grid(self, anchor_ns: int, fs: Fraction) -> SegmentState | None:
        """The remembered grid starting at anchor_ns with this rate, if any."""
        rate = str(fs)
        return next((seg for seg in self.segments if seg.anchor_ns == anchor_ns and seg.fs == rate), None)

    def reported(self, natural_anchor_ns: int, anchor_ns: int, fs: Fraction, k: int) -> bool:
        """Record that window k of this grid was reported (its flag acknowledged). True if it moved."""
        seg = self.grid(anchor_ns, fs)
        if seg is not None:
            if k + 1 <= seg.next_k:
                return False
            seg.next_k = k + 1
            self.segments.remove(seg)
            self.segments.append(seg)  # most recently reported last
            return True
        self.segments.append(SegmentState(natural_anchor_ns, anchor_ns, str(fs), k + 1))
        del self.segments[:-MAX_SEGMENTS]
        return True

    def to_bytes(self, source_topic: str) -> bytes:
        # version 3 while nothing is written ahead (almost always): a worker one release older still reads it
        episode = asdict(self.episode)
        if self.episode.pending is not None:
            episode["pending"] = _transition_doc(self.episode.pending)
        doc = {"v": STATE_VERSION if self.flags_ahead else 3, "topic": source_topic, "patient_id": self.patient_id,
               "segments": [asdict(s) for s in self.segments], "episode": episode, "seen_at_s": self.seen_at_s}
        if self.flags_ahead:
            doc["flags_ahead"] = [{"grid": e.grid, "flag": _verdict_doc(e.verdict)} for e in self.flags_ahead]
        return orjson.dumps(doc)

    @classmethod
    def from_bytes(cls, raw: bytes) -> tuple[str, "PatientState"]:
        """(source topic, state); raises ValueError for a record this version cannot read, including one
        whose fields have the wrong types (a null time, a string count): such a state is lost, and its
        patient handled conservatively (changelog.py), rather than crashing a loop later."""
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"unreadable patient state: {exc}") from None
        if not isinstance(doc, dict) or doc.get("v") not in (1, 2, 3, STATE_VERSION):  # newer fields defaulted
            raise ValueError(f"unreadable patient state: version {doc.get('v') if isinstance(doc, dict) else doc!r}")
        topic, patient_id = doc.get("topic"), doc.get("patient_id")
        if not isinstance(topic, str) or not topic or not isinstance(patient_id, str) or not patient_id:
            raise ValueError("unreadable patient state: topic and patient_id must be non-empty strings")
        segments = doc.get("segments")
        if not isinstance(segments, list) or len(segments) > MAX_SEGMENTS:
            raise ValueError(f"unreadable patient state: segments must be a list of at most {MAX_SEGMENTS}")
        try:
            segs = [_typed(SegmentState, s, "segment") for s in segments]
            for seg in segs:
                if Fraction(seg.fs) <= 0 or seg.next_k < 0:
                    raise ValueError(f"segment rate {seg.fs!r} / next_k {seg.next_k}")
            episode = doc.get("episode") or {}
            if isinstance(episode, dict) and episode.get("last_window") is not None:
                lw = episode["last_window"]
                if not (isinstance(lw, list) and len(lw) == 2 and all(_is_int(v) for v in lw)):
                    raise ValueError(f"episode last_window {lw!r}"[:120])
                episode = {**episode, "last_window": tuple(lw)}
            if isinstance(episode, dict) and episode.get("pending") is not None:
                episode = {**episode, "pending": _transition_from(episode["pending"], patient_id)}
            ep = _typed(EpisodeState, episode, "episode")
            seen = doc.get("seen_at_s")
            if seen is not None and not (isinstance(seen, (int, float)) and not isinstance(seen, bool)
                                         and seen == seen):
                raise ValueError(f"seen_at_s {seen!r}"[:120])
            ahead = doc.get("flags_ahead", [])
            if not (isinstance(ahead, list) and len(ahead) <= MAX_FLAGS_AHEAD
                    and all(isinstance(e, dict) and set(e) == {"grid", "flag"} and _is_int(e["grid"]) for e in ahead)):
                raise ValueError("flags_ahead must hold this patient's flag messages with their grids")
            ahead = [FlagAhead(e["grid"], _verdict_from(e["flag"], patient_id)) for e in ahead]
            extra = set(doc) - {"v", "topic", "patient_id", "segments", "episode", "seen_at_s", "flags_ahead"}
            if extra:
                raise ValueError(f"unknown fields {sorted(extra)[:3]}")
        except (ValueError, ZeroDivisionError) as exc:
            raise ValueError(f"unreadable patient state: {exc}"[:300]) from None
        return topic, cls(patient_id, segs, ep, None if seen is None else float(seen), ahead)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _typed(kind, doc, what: str):
    """`kind(**doc)` after checking every field's JSON type against the dataclass's annotation."""
    if not isinstance(doc, dict):
        raise ValueError(f"{what} must be an object")
    known = {f.name: f.type for f in fields(kind)}
    unknown = set(doc) - set(known)
    if unknown:
        raise ValueError(f"{what} has unknown fields {sorted(unknown)[:3]}")
    for name, value in doc.items():
        hint = known[name].replace(" ", "")
        nullable = hint.endswith("|None")
        base = hint.removesuffix("|None")
        if value is None:
            ok = nullable
        elif base == "int":
            ok = _is_int(value)
        elif base == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
        elif base == "str":
            ok = isinstance(value, str)
        elif base == "dict":
            ok = isinstance(value, dict)
        else:  # tuple[int, int]: checked by the caller
            ok = True
        if not ok:
            raise ValueError(f"{what} field {name} = {value!r}"[:120])
    return kind(**doc)


# -- the state's own record of verdicts and episode messages ---------------------------------------------
# Both are stored in the shape the flag (v1) and episode (v2) messages had when version 4 was written, field
# for field and in that order, so every state record written before verdicts were typed still loads, and a
# republished verdict or message is the same bytes. The messages may change (publish.messages); this shape
# changes only with STATE_VERSION.

_VERDICT_FIELDS = ("schema", "window_id", "patient_id", "window_start_ns", "window_end_ns", "status", "reason",
                   "probability", "artifact", "threshold", "model", "fs", "missing_samples",
                   "interpolated_samples", "produced_at_ns", "latency_ms")
_TRANSITION_FIELDS = ("schema", "patient_id", "episode_id", "seq", "state", "renewal", "reason", "start_ns",
                      "end_ns", "last_flagged_end_ns", "peak_probability", "flagged_windows", "model",
                      "updated_at_ns", "valid_until_ns", "lease_ns")
_STATUSES = frozenset(FlagStatus)
_REASONS = frozenset(NoScoreReason)


def _verdict_doc(v: Verdict) -> dict:
    return {"schema": 1, "window_id": v.window_id, "patient_id": v.patient_id, "window_start_ns": v.start_ns,
            "window_end_ns": v.end_ns, "status": v.status, "reason": v.reason, "probability": v.probability,
            "artifact": v.artifact, "threshold": v.threshold, "model": v.model, "fs": v.fs,
            "missing_samples": v.missing_samples, "interpolated_samples": v.interpolated_samples,
            "produced_at_ns": v.produced_at_ns, "latency_ms": v.latency_ms}


def _one_of(v, names: frozenset) -> bool:
    return isinstance(v, str) and v in names


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _verdict_from(doc, patient_id: str) -> Verdict:
    """A verdict written ahead, checked field by field: this patient's, its id its own, and scored or not
    as `decide` makes them (an artifact verdict has a probability: the tracker takes its peak). Numbers keep
    their JSON type, so the verdict encodes to the bytes it was read from."""
    if not (isinstance(doc, dict) and tuple(doc) == _VERDICT_FIELDS and _is_int(doc["schema"])
            and doc["schema"] == 1):
        raise ValueError("a flag written ahead must have the version 1 flag's fields")
    d = doc
    ok = (d["patient_id"] == patient_id and _is_int(d["window_start_ns"]) and _is_int(d["window_end_ns"])
          and d["window_id"] == window_id(patient_id, d["window_start_ns"])
          and _one_of(d["status"], _STATUSES) and (d["reason"] is None or _one_of(d["reason"], _REASONS))
          and _is_number(d["threshold"]) and isinstance(d["model"], str) and _is_number(d["fs"])
          and _is_int(d["missing_samples"]) and _is_int(d["interpolated_samples"])
          and _is_int(d["produced_at_ns"]) and _is_number(d["latency_ms"]))
    if d["status"] == FlagStatus.SCORED:  # a NaN probability was written as null, and is no artifact
        ok = ok and isinstance(d["artifact"], bool) and (
            _is_number(d["probability"]) or (d["probability"] is None and not d["artifact"]))
    else:
        ok = ok and d["probability"] is None and d["artifact"] is None
    if not ok:
        raise ValueError(f"flag written ahead {d['window_id']!r}"[:120])
    return Verdict(patient_id, d["window_start_ns"], d["window_end_ns"], FlagStatus(d["status"]),
                   None if d["reason"] is None else NoScoreReason(d["reason"]), d["probability"], d["artifact"],
                   d["threshold"], d["model"], d["fs"], d["missing_samples"], d["interpolated_samples"],
                   d["produced_at_ns"], d["latency_ms"])


def _transition_doc(t: EpisodeTransition) -> dict:
    return {"schema": 2, "patient_id": t.patient_id, "episode_id": t.episode_id, "seq": t.seq, "state": t.state,
            "renewal": t.renewal, "reason": t.reason, "start_ns": t.start_ns, "end_ns": t.end_ns,
            "last_flagged_end_ns": t.last_flagged_end_ns, "peak_probability": t.peak_probability,
            "flagged_windows": t.flagged_windows, "model": t.model, "updated_at_ns": t.updated_at_ns,
            "valid_until_ns": t.valid_until_ns, "lease_ns": t.lease_ns}


def _transition_from(doc, patient_id: str) -> EpisodeTransition:
    """A pending episode message, checked field by field (this patient's, its episode id its own)."""
    if not (isinstance(doc, dict) and tuple(doc) == _TRANSITION_FIELDS and _is_int(doc["schema"])
            and doc["schema"] == 2):
        raise ValueError("a pending episode message must have the version 2 message's fields")
    d = doc
    start = d["start_ns"]
    ok = (d["patient_id"] == patient_id and _is_int(d["seq"]) and d["state"] in ("open", "closed")
          and isinstance(d["renewal"], bool) and (d["reason"] is None or isinstance(d["reason"], str))
          and (start is None or _is_int(start))
          and d["episode_id"] == (None if start is None else window_id(patient_id, start))
          and all(d[k] is None or _is_int(d[k]) for k in ("end_ns", "last_flagged_end_ns", "valid_until_ns",
                                                           "lease_ns"))
          and (d["peak_probability"] is None or _is_number(d["peak_probability"]))
          and _is_int(d["flagged_windows"]) and isinstance(d["model"], str) and _is_int(d["updated_at_ns"]))
    if not ok:
        raise ValueError(f"pending episode message seq {d['seq']!r}"[:120])
    return EpisodeTransition(patient_id, d["seq"], d["state"], d["renewal"], d["reason"], start, d["end_ns"],
                             d["last_flagged_end_ns"], d["peak_probability"], d["flagged_windows"], d["model"],
                             d["updated_at_ns"], d["valid_until_ns"], d["lease_ns"])
