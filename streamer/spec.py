"""The released model's fixed facts, in one place (docs/preprocessing.md says where each comes from),
and the names of window statuses and reasons that flags carry.

Every stage imports these from here, so no stage imports a later one for a number.
"""

from __future__ import annotations

from enum import StrEnum

WINDOW_S = 10.0  # seconds per window
MODEL_FS = 500  # Hz the model's input is resampled to
MODEL_SAMPLES = int(WINDOW_S * MODEL_FS)  # 5000
MIN_WINDOW_SAMPLES = 11  # the offline path drops windows of 10 samples or fewer
RELEASED_THRESHOLD = 0.20802117884159088  # probability >= threshold -> artifact
WINDOW_NS = int(WINDOW_S * 10**9)


class WindowStatus(StrEnum):
    """Inside the worker: what the window stage hands on."""
    SCORABLE = "scorable"
    INSUFFICIENT = "insufficient_data"


class FlagStatus(StrEnum):
    """In a flag message."""
    SCORED = "scored"
    INSUFFICIENT = "insufficient_data"


class NoScoreReason(StrEnum):
    """Why a window was reported without a score (a flag's `reason`)."""
    GAP_TOO_LONG = "gap_too_long"
    TOO_MANY_MISSING = "too_many_missing"
    NO_DATA = "no_data"
    TRUNCATED = "truncated"
    TOO_SHORT = "too_short"
    IMPLAUSIBLE_AMPLITUDE = "implausible_amplitude"
    # the model gave no finite probability (an fp16 overflow, a broken checkpoint): unscored, never "clean"
    SCORE_NOT_FINITE = "score_not_finite"
