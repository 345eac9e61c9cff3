"""Output message building: one flag per window (schemas/artifact-flag.v1.schema.json)."""

from __future__ import annotations

import time
from typing import TypedDict

import orjson

from streamer.model.decision import is_artifact
from streamer.spec import FlagStatus, NoScoreReason
from streamer.windows.buffer import SCORABLE, EmittedWindow

SCHEMA_VERSION = 1


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


def window_id(patient_id: str, start_ns: int) -> str:
    """The idempotent identity of a window: re-published copies carry the same id."""
    return f"{patient_id}:{start_ns}"


def flag_message(w: EmittedWindow, probability: float | None, threshold: float, model_id: str,
                 produced_at_ns: int | None = None) -> FlagDoc:
    produced = produced_at_ns or time.time_ns()
    scored = w.status == SCORABLE and probability is not None
    return FlagDoc(
        schema=SCHEMA_VERSION,
        window_id=window_id(w.patient_id, w.start_ns),
        patient_id=w.patient_id,
        window_start_ns=w.start_ns,
        window_end_ns=w.end_ns,
        status=FlagStatus.SCORED if scored else FlagStatus(w.status),
        reason=w.reason,
        probability=float(probability) if scored else None,
        artifact=bool(is_artifact(probability, threshold)) if scored else None,
        threshold=threshold,
        model=model_id,
        fs=w.fs,
        missing_samples=w.missing,
        interpolated_samples=w.interpolated,
        produced_at_ns=produced,
        latency_ms=round(max(produced / 1e9 - w.completed_at, 0.0) * 1000, 3),
    )


def dumps(doc: dict) -> bytes:
    return orjson.dumps(doc)
