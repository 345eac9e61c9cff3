"""For downstream consumers (alarm systems, dashboards): typed flags and episodes, de-duplicated.

Standard library and orjson only, so an alarm system can import it without torch. The messages are
specified in `schemas/` (artifact-flag.v1, artifact-episode.v1); this module reads schema version 1.

    from streamer.client import FlagDeduplicator, decode_flag
    dedupe = FlagDeduplicator()
    async for record in consumer:                  # aiokafka, topic ecg.artifact.flags
        flag = decode_flag(record.value)
        if dedupe.first_time(flag) and flag.artifact:
            suppress_ecg_alarms(flag.patient_id, until_ns=flag.window_end_ns)
"""

from __future__ import annotations

import functools
import typing
from collections import OrderedDict
from dataclasses import dataclass

import orjson

SCHEMA_VERSION = 1


class MessageError(ValueError):
    """A flags or episodes value that is not a version-1 message."""


@dataclass(frozen=True, slots=True)
class Flag:
    window_id: str
    patient_id: str
    window_start_ns: int
    window_end_ns: int
    status: str  # "scored" or "insufficient_data"
    reason: str | None  # why a window has no score
    probability: float | None
    artifact: bool | None  # None when the window could not be scored: treat as unknown, not clean
    threshold: float
    model: str
    fs: float
    missing_samples: int
    interpolated_samples: int
    produced_at_ns: int
    latency_ms: float

    @property
    def scored(self) -> bool:
        return self.status == "scored"


@dataclass(frozen=True, slots=True)
class Episode:
    episode_id: str
    patient_id: str
    state: str  # "open" (suppression on) or "closed"
    reason: str | None  # when closed: "clean" or "stale"
    start_ns: int
    end_ns: int | None
    last_flagged_end_ns: int
    peak_probability: float
    flagged_windows: int
    model: str
    updated_at_ns: int

    @property
    def is_open(self) -> bool:
        return self.state == "open"


@functools.cache
def _field_types(record) -> dict[str, tuple[type, bool]]:
    """name -> (type, may be null), read off the record's own annotations: one list of fields."""
    out = {}
    for name, hint in typing.get_type_hints(record).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        out[name] = (args[0] if args else hint, bool(typing.get_args(hint)))
    return out


def _fields(value: bytes, what: str, record) -> dict:
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise MessageError(f"{what}: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise MessageError(f"{what}: not a JSON object")
    if doc.get("schema") != SCHEMA_VERSION:
        raise MessageError(f"{what}: schema {doc.get('schema')!r}, this reader knows {SCHEMA_VERSION}")
    out = {}
    for name, (kind, nullable) in _field_types(record).items():
        v = doc.get(name)
        if v is None and nullable:
            out[name] = None
            continue
        # JSON has one number type: an integral float field may arrive as 1; a bool is never a number.
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool)) if kind is float else \
             (isinstance(v, int) and not isinstance(v, bool)) if kind is int else isinstance(v, kind)
        if not ok:
            raise MessageError(f"{what}: field {name!r} must be {kind.__name__}, got {v!r}"[:200])
        out[name] = float(v) if kind is float else v
    return out


def decode_flag(value: bytes) -> Flag:
    f = _fields(value, "flag", Flag)
    if f["status"] not in ("scored", "insufficient_data"):
        raise MessageError(f"flag: unknown status {f['status']!r}"[:200])
    if f["status"] == "scored" and (f["probability"] is None or f["artifact"] is None):
        raise MessageError("flag: a scored window needs probability and artifact")
    return Flag(**f)


def decode_episode(value: bytes) -> Episode:
    e = _fields(value, "episode", Episode)
    if e["state"] not in ("open", "closed"):
        raise MessageError(f"episode: unknown state {e['state']!r}"[:200])
    return Episode(**e)


class FlagDeduplicator:
    """Delivery is at least once: after a worker crash or a rebalance a window's flag can arrive again
    (same window_id, same content). `first_time` is True once per window_id among the last `capacity`
    distinct windows seen (default: one hour of 400 beds)."""

    def __init__(self, capacity: int = 400 * 360):
        self.capacity = capacity
        self._seen: OrderedDict[str, None] = OrderedDict()

    def first_time(self, flag: Flag) -> bool:
        if flag.window_id in self._seen:
            self._seen.move_to_end(flag.window_id)
            return False
        self._seen[flag.window_id] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return True


class SuppressionView:
    """Each patient's latest episode, by updated_at_ns (a re-published older copy never wins)."""

    def __init__(self) -> None:
        self._latest: dict[str, Episode] = {}

    def apply(self, episode: Episode) -> bool:
        """True if this episode changed the patient's state."""
        current = self._latest.get(episode.patient_id)
        if current is not None and current.updated_at_ns >= episode.updated_at_ns:
            return False
        self._latest[episode.patient_id] = episode
        return current is None or (current.episode_id, current.state) != (episode.episode_id, episode.state)

    def suppressed(self, patient_id: str) -> bool:
        e = self._latest.get(patient_id)
        return e is not None and e.is_open

    def open_episodes(self) -> list[Episode]:
        return [e for e in self._latest.values() if e.is_open]
