"""For downstream consumers (alarm systems, dashboards): typed flags and episodes, de-duplicated.

Its own small distribution, `streamer-client` (client/ in the streamer repository): the standard library
and orjson only, so an alarm system installs it without torch, numpy or pydantic. The worker's package
re-exports it as `streamer.client`. The messages are specified in `schemas/` (artifact-flag.v1,
artifact-episode.v2).

    from streamer_client import SuppressionView, decode_episode
    view = SuppressionView()                       # skew allowance: 5 s
    async for record in consumer:                  # aiokafka, read_committed, topic ecg.artifact.episodes
        view.apply(decode_episode(record.value))
    ...
    if view.suppressed(patient_id):                # by this process's clock, now
        hold_ecg_alarm(patient_id)

Suppression is a lease: an episode suppresses only until its last open or renewal message lapses, so a
stopped worker, a stopped broker or a stopped consumer loop ends it by itself.
"""

from __future__ import annotations

import functools
import time
import typing
from collections import OrderedDict
from dataclasses import dataclass

import orjson

__version__ = "0.1.0"
__all__ = ["DEFAULT_SKEW_S", "EPISODE_SCHEMA_VERSION", "FLAG_SCHEMA_VERSION", "Episode", "Flag", "FlagDeduplicator",
           "MessageError", "SuppressionView", "decode_episode", "decode_flag"]

FLAG_SCHEMA_VERSION = 1
EPISODE_SCHEMA_VERSION = 2
DEFAULT_SKEW_S = 5.0  # the clock difference tolerated between the workers and this process


class MessageError(ValueError):
    """A flags or episodes value this reader cannot read (flag schema 1, episode schema 2)."""


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
    patient_id: str
    episode_id: str | None  # None only in a state_lost close (the episode it closes is unknown)
    seq: int  # per patient, increasing: the highest one seen is the patient's state
    state: str  # "open" (suppression on, until the lease lapses) or "closed"
    renewal: bool  # an open message that only extends the lease
    reason: str | None  # when closed: "clean", "stale" or "state_lost"
    start_ns: int | None
    end_ns: int | None
    last_flagged_end_ns: int | None
    peak_probability: float | None
    flagged_windows: int
    model: str
    updated_at_ns: int  # the publishing worker's clock: informative, never used for order
    valid_until_ns: int | None  # open: the lease's end by the publishing worker's clock
    lease_ns: int | None  # open: the lease's length

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


def _fields(value: bytes, what: str, record, version: int) -> dict:
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise MessageError(f"{what}: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise MessageError(f"{what}: not a JSON object")
    if doc.get("schema") != version:
        hint = (" (published by a worker older than the lease: upgrade the workers, docs/messages.md "
                "'Episode schema 2')") if what == "episode" and doc.get("schema") == 1 else ""
        raise MessageError(f"{what}: schema {doc.get('schema')!r}, this reader knows {version}{hint}")
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
    f = _fields(value, "flag", Flag, FLAG_SCHEMA_VERSION)
    if f["status"] not in ("scored", "insufficient_data"):
        raise MessageError(f"flag: unknown status {f['status']!r}"[:200])
    if f["status"] == "scored" and (f["probability"] is None or f["artifact"] is None):
        raise MessageError("flag: a scored window needs probability and artifact")
    return Flag(**f)


def decode_episode(value: bytes) -> Episode:
    e = _fields(value, "episode", Episode, EPISODE_SCHEMA_VERSION)
    if e["state"] not in ("open", "closed"):
        raise MessageError(f"episode: unknown state {e['state']!r}"[:200])
    if e["state"] == "open" and (e["valid_until_ns"] is None or e["lease_ns"] is None or e["episode_id"] is None):
        raise MessageError("episode: an open episode needs episode_id, valid_until_ns and lease_ns")
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
    """Each patient's suppression state from the episodes topic, ordered by `seq`, bounded by the lease.

    - Order: the highest `seq` seen wins; a re-delivered or older copy never does. Conservative ties: a
      close is applied at an equal or lower `seq` when it closes the episode shown open (same episode id)
      or says the state was lost.
    - Lease: an open episode suppresses until min(valid_until_ns, arrival + lease_ns) + skew, by this
      process's clock: a worker clock running ahead cannot stretch it past one lease after arrival, one
      running behind by more than the skew makes it lapse early (alarms sound: the safe side).
    - `status`: "suppressed", "off" (closed or never opened), "lapsed" (the lease ran out with no renewal:
      the feed is silent, do not suppress), None for a patient never seen.
    """

    def __init__(self, skew_s: float = DEFAULT_SKEW_S, clock=time.time_ns):
        self.skew_ns = int(skew_s * 1e9)
        self.clock = clock
        self._shown: dict[str, tuple[Episode, int | None]] = {}  # patient -> (episode, lease end by our clock)
        self._seq: dict[str, int] = {}  # patient -> highest seq seen

    def apply(self, episode: Episode, received_ns: int | None = None) -> bool:
        """Take one message; True if the patient's shown episode changed (id or open/closed)."""
        pid = episode.patient_id
        current = self._shown.get(pid)
        seen = self._seq.get(pid)
        shown_open = current is not None and current[0].is_open
        newer = seen is None or episode.seq > seen
        closes_shown = shown_open and not episode.is_open and (
            episode.seq == current[0].seq or episode.episode_id == current[0].episode_id
            or episode.reason == "state_lost")
        self._seq[pid] = episode.seq if seen is None else max(seen, episode.seq)
        if not (newer or closes_shown):
            return False
        until = None
        if episode.is_open:
            arrived = self.clock() if received_ns is None else received_ns
            until = min(episode.valid_until_ns, arrived + episode.lease_ns) + self.skew_ns
        self._shown[pid] = (episode, until)
        return current is None or (current[0].episode_id, current[0].state) != (episode.episode_id, episode.state)

    def status(self, patient_id: str, now_ns: int | None = None) -> str | None:
        shown = self._shown.get(patient_id)
        if shown is None:
            return None
        episode, until = shown
        if not episode.is_open:
            return "off"
        now = self.clock() if now_ns is None else now_ns
        return "suppressed" if now <= until else "lapsed"

    def suppressed(self, patient_id: str, now_ns: int | None = None) -> bool:
        return self.status(patient_id, now_ns) == "suppressed"

    def episode(self, patient_id: str) -> Episode | None:
        """The patient's shown episode (open, lapsed or closed)."""
        shown = self._shown.get(patient_id)
        return shown[0] if shown is not None else None

    def lease_end_ns(self, patient_id: str) -> int | None:
        """When the patient's suppression lapses by this process's clock (skew included); None if closed."""
        shown = self._shown.get(patient_id)
        return shown[1] if shown is not None else None

    def open_episodes(self, now_ns: int | None = None) -> list[Episode]:
        """Episodes suppressing now (lapsed leases excluded)."""
        now = self.clock() if now_ns is None else now_ns
        return [e for e, until in self._shown.values() if e.is_open and now <= until]
