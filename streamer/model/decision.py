"""The clinical decision: a scored window is artifact when its probability reaches the threshold.

`decide` is the one place the worker turns a window and its probability into a `Verdict`; `is_artifact` is
the same comparison for arrays (`streamer score`, validation's confusion matrices and strip plots), so
online and offline decide alike. `>=`: the released operating point (spec.RELEASED_THRESHOLD) was chosen
with probability >= threshold meaning artifact (REFERENCE.md).

A Verdict is what the rest of the worker passes around: the episode tracker consumes it, the patient state
keeps the ones written ahead (in its own format, state.patients), and publish.messages encodes it as a flag
message. None of them decides again."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from streamer.spec import FlagStatus, NoScoreReason, WindowStatus

if TYPE_CHECKING:  # at run time only the spec: the patient state (which windows/ imports) imports Verdict
    from streamer.windows.buffer import EmittedWindow


def is_artifact(probability, threshold: float):
    """True where `probability` (a float or a numpy array) is at or above `threshold`."""
    return probability >= threshold


def window_id(patient_id: str, start_ns: int) -> str:
    """The idempotent identity of a window: re-published copies carry the same id."""
    return f"{patient_id}:{start_ns}"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the worker concluded about one window (patient_id, start_ns, end_ns).

    Invariants, kept by `decide` (and checked where a verdict is read back from a state record):
    `probability` and `artifact` are None unless `status` is SCORED; a scored verdict's `artifact` is
    `is_artifact(probability, threshold)` as decided, and its probability is finite: a scorable window the
    model gave a NaN or an infinity is not scored (reason score_not_finite), so it is never reported clean,
    and its flag keeps the schema (a scored flag carries a number; a state record written before this rule
    may hold a scored verdict with a null probability: it loads and republishes as written). `reason` says
    why an unscored window has no score. `produced_at_ns` is when it was decided and `latency_ms` how long after
    the window's last sample arrived."""
    patient_id: str
    start_ns: int
    end_ns: int
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

    @property
    def window_id(self) -> str:
        return window_id(self.patient_id, self.start_ns)


def _positional_constructor(kind):
    """`kind(*values)` for a frozen slotted dataclass, without its generated __init__'s object.__setattr__
    call per field (2 us of a window's 4 on the publish path): each slot set once through its descriptor.
    tests/unit/test_verdict.py checks it builds what `kind(...)` builds."""
    names = [f.name for f in fields(kind)]
    setters = {f"_set_{n}": getattr(kind, n).__set__ for n in names}
    body = "".join(f"    _set_{n}(v, {n})\n" for n in names)
    scope = {"_new": object.__new__, "_kind": kind, **setters}
    exec(f"def build({', '.join(names)}):\n    v = _new(_kind)\n{body}    return v\n", scope)  # noqa: S102
    return scope["build"]


_verdict = _positional_constructor(Verdict)
_SCORED, _SCORABLE = FlagStatus.SCORED, WindowStatus.SCORABLE  # enum member lookups are slow in 3.11
_UNSCORED, _NOT_FINITE = FlagStatus.INSUFFICIENT, NoScoreReason.SCORE_NOT_FINITE


def decide(w: EmittedWindow, probability: float | None, threshold: float, model_id: str,
           produced_at_ns: int | None = None) -> Verdict:
    """The verdict on window `w`: scored when the window was scorable and the model gave a probability."""
    produced = produced_at_ns or time.time_ns()
    scored = w.status == _SCORABLE and probability is not None
    if scored and not math.isfinite(probability):
        return _verdict(w.patient_id, w.start_ns, w.end_ns, _UNSCORED, _NOT_FINITE, None, None, threshold,
                        model_id, w.fs, w.missing, w.interpolated, produced,
                        round(max(produced / 1e9 - w.completed_at, 0.0) * 1000, 3))
    return _verdict(
        w.patient_id, w.start_ns, w.end_ns,
        _SCORED if scored else FlagStatus(w.status),
        w.reason,
        float(probability) if scored else None,
        bool(is_artifact(probability, threshold)) if scored else None,
        threshold, model_id, w.fs, w.missing, w.interpolated, produced,
        round(max(produced / 1e9 - w.completed_at, 0.0) * 1000, 3),
    )
