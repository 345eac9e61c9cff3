"""For downstream consumers (alarm systems, dashboards): typed flags and episodes, de-duplicated.

Its own small distribution, `streamer-client` (client/ in the streamer repository): the standard library
and orjson only, so an alarm system installs it without torch, numpy or pydantic. The worker's package
re-exports it as `streamer.client`. The messages are specified in `schemas/` (artifact-flag.v1,
artifact-episode.v2).

    from streamer_client import SuppressionView, decode_episode
    view = SuppressionView()                       # skew allowance 5 s, no lease longer than 35 s
    async for record in consumer:                  # aiokafka, read_committed, topic ecg.artifact.episodes
        view.apply(decode_episode(record.value))
    ...
    if view.suppressed(patient_id):                # by this process's clock, now
        hold_ecg_alarm(patient_id)

Suppression is a lease: an episode suppresses only until its last open or renewal message lapses, so a
stopped worker, a stopped broker or a stopped consumer loop ends it by itself. No record can stretch it:
the reader caps every lease at `max_lease_s` after the record arrived, whatever the record says, and the
decoders refuse values out of range (MessageError). ACLs on the flags and episodes topics are the first
defence against a forged record; these checks are the second.
"""

from __future__ import annotations

import functools
import math
import time
import typing
from collections import OrderedDict
from dataclasses import dataclass

import orjson

__version__ = "0.1.0"
__all__ = ["DEFAULT_MAX_LEASE_S", "DEFAULT_SKEW_S", "EPISODE_SCHEMA_VERSION", "FLAG_SCHEMA_VERSION", "MAX_LEASE_NS",
           "MAX_SEQ", "SEQ_LEAD_NS", "Episode", "Flag", "FlagDeduplicator", "MessageError", "SuppressionView",
           "decode_episode", "decode_flag", "seq_in_range"]

FLAG_SCHEMA_VERSION = 1
EPISODE_SCHEMA_VERSION = 2
DEFAULT_SKEW_S = 5.0  # the clock difference tolerated between the workers and this process
# The documented lease (episodes.lease_s, 30 s) plus the skew: no open record suppresses longer than this
# after it arrived. A deployment that raises episodes.lease_s raises this in every reader too.
DEFAULT_MAX_LEASE_S = 30.0 + DEFAULT_SKEW_S
# Bounds of what a worker can write (episodes.lease_s is at most 600 s; see docs/messages.md):
MAX_LEASE_NS = 600 * 10**9
# seq: the worker numbers a patient's messages from its clock in microseconds at the first one, then one by
# one (publish.episodes.next_seq), and a restart continues above the highest number in the topic. So a real
# seq is at most the highest worker clock ever seen, in us, plus a few messages: never more than a day
# ahead of this reader's clock (the stream refuses timestamps a day ahead too), and always below 2**53, the
# largest integer every JSON reader holds exactly (the microsecond clock reaches it in the year 2255).
SEQ_LEAD_NS = 86_400 * 10**9
MAX_SEQ = 2**53 - 1
_INT64 = 2**63  # every *_ns field is a signed 64-bit integer (the schema's consumers in Java, Go)


def seq_in_range(seq: int, now_ns: int) -> bool:
    """Whether `seq` is one a worker can have written by `now_ns` (this reader's clock): 1 <= seq <=
    min(MAX_SEQ, now in us + a day). A number beyond it would order out every later real message."""
    return 1 <= seq <= min(MAX_SEQ, (now_ns + SEQ_LEAD_NS) // 1000)


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
        if name not in doc:  # every field is required by the schema, null ones too
            raise MessageError(f"{what}: field {name!r} is missing")
        v = doc[name]
        if v is None and nullable:
            out[name] = None
            continue
        # JSON has one number type: an integral float field may arrive as 1; a bool is never a number.
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool)) if kind is float else \
             (isinstance(v, int) and not isinstance(v, bool)) if kind is int else isinstance(v, kind)
        if ok and kind is float:
            v = float(v)  # a huge JSON integer raises OverflowError here: refused below
            ok = math.isfinite(v)
        elif ok and kind is int:
            ok = -_INT64 <= v < _INT64
        if not ok:
            raise MessageError(f"{what}: field {name!r} must be a finite {kind.__name__}, got {v!r}"[:200])
        out[name] = v
    if not 1 <= len(out["patient_id"]) <= 128:
        raise MessageError(f"{what}: patient_id must have 1 to 128 characters")
    return out


def _unit(what: str, name: str, value: float | None) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise MessageError(f"{what}: {name} {value!r} outside [0, 1]")


def decode_flag(value: bytes) -> Flag:
    """A flag (schema 1), its types and ranges checked: probability and threshold in [0, 1], fs > 0, the
    window's end after its start, counts >= 0; anything else is a MessageError (never another exception)."""
    try:
        f = _fields(value, "flag", Flag, FLAG_SCHEMA_VERSION)
    except OverflowError:  # a JSON integer too large for a float field
        raise MessageError("flag: a number out of range") from None
    if f["status"] not in ("scored", "insufficient_data"):
        raise MessageError(f"flag: unknown status {f['status']!r}"[:200])
    if f["status"] == "scored" and (f["probability"] is None or f["artifact"] is None):
        raise MessageError("flag: a scored window needs probability and artifact")
    if f["status"] == "scored" and f["reason"] is not None:
        raise MessageError("flag: a scored window has no reason")
    if f["status"] == "insufficient_data" and (f["reason"] is None or f["probability"] is not None
                                               or f["artifact"] is not None):
        raise MessageError("flag: a window without a score needs a reason and no probability or artifact")
    _unit("flag", "probability", f["probability"])
    _unit("flag", "threshold", f["threshold"])
    if not f["fs"] > 0:
        raise MessageError(f"flag: fs {f['fs']!r} is not positive")
    if not f["window_end_ns"] > f["window_start_ns"]:
        raise MessageError("flag: window_end_ns is not after window_start_ns")
    if f["missing_samples"] < 0 or f["interpolated_samples"] < 0 or f["latency_ms"] < 0:
        raise MessageError("flag: a negative count or latency")
    return Flag(**f)


def decode_episode(value: bytes, now_ns: int | None = None) -> Episode:
    """An episode (schema 2), its types and ranges checked against what a worker writes; anything else is
    a MessageError. Bounds: an open one has 0 < lease_ns <= MAX_LEASE_NS and updated_at_ns < valid_until_ns
    <= updated_at_ns + lease_ns (the worker writes exactly the sum); a closed one neither; seq_in_range by
    this reader's clock (`now_ns`, default now): a number beyond it is refused, never applied."""
    try:
        e = _fields(value, "episode", Episode, EPISODE_SCHEMA_VERSION)
    except OverflowError:
        raise MessageError("episode: a number out of range") from None
    if e["state"] not in ("open", "closed"):
        raise MessageError(f"episode: unknown state {e['state']!r}"[:200])
    now_ns = time.time_ns() if now_ns is None else now_ns
    if not seq_in_range(e["seq"], now_ns):
        raise MessageError(f"episode: seq {e['seq']} out of range (1 to {min(MAX_SEQ, (now_ns + SEQ_LEAD_NS) // 1000)}"
                           " by this reader's clock)")
    _unit("episode", "peak_probability", e["peak_probability"])
    if e["flagged_windows"] < 0:
        raise MessageError("episode: flagged_windows is negative")
    if e["state"] == "open":
        if e["valid_until_ns"] is None or e["lease_ns"] is None or e["episode_id"] is None:
            raise MessageError("episode: an open episode needs episode_id, valid_until_ns and lease_ns")
        if not 0 < e["lease_ns"] <= MAX_LEASE_NS:
            raise MessageError(f"episode: lease_ns {e['lease_ns']} outside (0, {MAX_LEASE_NS}]")
        if not e["updated_at_ns"] < e["valid_until_ns"] <= e["updated_at_ns"] + e["lease_ns"]:
            raise MessageError("episode: valid_until_ns is not within lease_ns after updated_at_ns")
    elif e["valid_until_ns"] is not None or e["lease_ns"] is not None:
        raise MessageError("episode: a closed episode has no lease")
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
    - Lease: an open episode suppresses until min(valid_until_ns + skew, arrival + lease_ns + skew,
      arrival + max_lease), by this process's clock: a worker clock running ahead cannot stretch it past one
      lease after arrival, one running behind by more than the skew makes it lapse early (alarms sound: the
      safe side), and no record, whatever it says, suppresses longer than `max_lease_s` after it arrived.
      So suppression is never on later than max_lease_s after the last open record applied.
    - A forged record with a seq far ahead (decode_episode refuses more than a day ahead of this clock)
      hides the worker's own later messages from this view until the worker's numbers pass it (at its
      next assignment it continues above the highest number in the topic): while hidden the patient is
      not suppressed (its lease lapses), which is the safe side. ACLs on the episodes topic are the first
      defence against such a record.
    - `status`: "suppressed", "off" (closed or never opened), "lapsed" (the lease ran out with no renewal:
      the feed is silent, do not suppress), None for a patient never seen.
    """

    def __init__(self, skew_s: float = DEFAULT_SKEW_S, clock=time.time_ns, max_lease_s: float = DEFAULT_MAX_LEASE_S):
        if not (math.isfinite(skew_s) and skew_s >= 0 and math.isfinite(max_lease_s) and max_lease_s > 0):
            raise ValueError("skew_s must be >= 0 and max_lease_s > 0 (finite seconds)")
        self.skew_ns = int(skew_s * 1e9)
        self.max_lease_ns = int(max_lease_s * 1e9)
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
            until = min(min(episode.valid_until_ns, arrived + episode.lease_ns) + self.skew_ns,
                        arrived + self.max_lease_ns)
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
