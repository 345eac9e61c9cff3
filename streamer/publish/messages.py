"""Output message encoding: a Verdict as a flag message (schemas/artifact-flag.v1.schema.json), an episode
transition as an episode message (schemas/artifact-episode.v2.schema.json).

Only encoding happens here: the decision is model.decision's, the episode logic publish.episodes', and the
patient state keeps verdicts and transitions in its own format (state.patients). A change to a message
touches this module, its schema and the client (`streamer.client`, client/)."""

from __future__ import annotations

from typing import TypedDict

import orjson

from streamer.model.decision import Verdict, window_id
from streamer.spec import FlagStatus, NoScoreReason
from streamer.state.patients import EpisodeTransition

SCHEMA_VERSION = 1
EPISODE_SCHEMA_VERSION = 2

__all__ = ["EPISODE_SCHEMA_VERSION", "SCHEMA_VERSION", "FlagDoc", "dumps", "episode_bytes", "episode_doc",
           "flag_bytes", "flag_doc", "window_id"]


class FlagDoc(TypedDict):
    """A flag message as built here and published as JSON (schemas/artifact-flag.v1.schema.json);
    `streamer.client.Flag` is the same record on the consumer's side."""
    schema: int
    window_id: str
    patient_id: str
    window_start_ns: int
    window_end_ns: int
    status: FlagStatus
    reason: NoScoreReason | None
    probability: float | None
    artifact: bool | None
    threshold: float
    model: str
    fs: float
    missing_samples: int
    interpolated_samples: int
    produced_at_ns: int
    latency_ms: float


def flag_doc(v: Verdict) -> FlagDoc:
    """The flag message of verdict `v` (a dict literal, the window id inlined: this runs once per window)."""
    return {"schema": SCHEMA_VERSION, "window_id": f"{v.patient_id}:{v.start_ns}", "patient_id": v.patient_id,
            "window_start_ns": v.start_ns, "window_end_ns": v.end_ns, "status": v.status, "reason": v.reason,
            "probability": v.probability, "artifact": v.artifact, "threshold": v.threshold, "model": v.model,
            "fs": v.fs, "missing_samples": v.missing_samples, "interpolated_samples": v.interpolated_samples,
            "produced_at_ns": v.produced_at_ns, "latency_ms": v.latency_ms}


def flag_bytes(v: Verdict) -> bytes:
    return orjson.dumps(flag_doc(v))


def episode_doc(t: EpisodeTransition) -> dict:
    """The episode message of transition `t`."""
    return {"schema": EPISODE_SCHEMA_VERSION, "patient_id": t.patient_id, "episode_id": t.episode_id,
            "seq": t.seq, "state": t.state, "renewal": t.renewal, "reason": t.reason, "start_ns": t.start_ns,
            "end_ns": t.end_ns, "last_flagged_end_ns": t.last_flagged_end_ns,
            "peak_probability": t.peak_probability, "flagged_windows": t.flagged_windows, "model": t.model,
            "updated_at_ns": t.updated_at_ns, "valid_until_ns": t.valid_until_ns, "lease_ns": t.lease_ns}


def episode_bytes(t: EpisodeTransition) -> bytes:
    return orjson.dumps(episode_doc(t))


def dumps(doc: dict) -> bytes:
    return orjson.dumps(doc)
