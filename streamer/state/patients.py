"""What the worker knows of one patient beyond its open windows, kept durable in a compacted changelog.

"Which windows were already reported" is state, not an inference from the first sample a new owner
happens to see: samples can be missing and clocks can step. Each segment grid a patient used recently is
remembered with the first window not yet reported (`next_k`); after a restart, rebalance or takeover the
new owner reports every window from there on and none before it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction

import orjson

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
    pending: dict | None = None
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
    # never complete the windows from a replay and report them with other content. Each entry:
    # {"grid": the window's grid anchor (for the episode tracker), "flag": the flag message}.
    flags_ahead: list[dict] = field(default_factory=list)

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
        doc = {"v": STATE_VERSION if self.flags_ahead else 3, "topic": source_topic, "patient_id": self.patient_id,
               "segments": [asdict(s) for s in self.segments], "episode": asdict(self.episode),
               "seen_at_s": self.seen_at_s}
        if self.flags_ahead:
            doc["flags_ahead"] = self.flags_ahead
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
            ep = _typed(EpisodeState, episode, "episode")
            seen = doc.get("seen_at_s")
            if seen is not None and not (isinstance(seen, (int, float)) and not isinstance(seen, bool)
                                         and seen == seen):
                raise ValueError(f"seen_at_s {seen!r}"[:120])
            ahead = doc.get("flags_ahead", [])
            if not (isinstance(ahead, list) and len(ahead) <= MAX_FLAGS_AHEAD
                    and all(isinstance(e, dict) and set(e) == {"grid", "flag"} and _is_int(e["grid"])
                            and isinstance(f := e["flag"], dict) and isinstance(f.get("window_id"), str)
                            and f.get("patient_id") == patient_id for e in ahead)):
                raise ValueError("flags_ahead must hold this patient's flag messages with their grids")
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
