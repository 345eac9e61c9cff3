"""The clinical decision: a scored window is artifact when its probability reaches the threshold.

One function, used wherever a probability becomes a flag (the flags the worker publishes, `streamer score`,
validation's confusion matrices), so online and offline decide alike. `>=`: the released operating point
(spec.RELEASED_THRESHOLD) was chosen with probability >= threshold meaning artifact (REFERENCE.md)."""

from __future__ import annotations


def is_artifact(probability, threshold: float):
    """True where `probability` (a float or a numpy array) is at or above `threshold`."""
    return probability >= threshold
