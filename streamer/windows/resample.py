"""Any source rate -> the model's 5000 samples (docs/preprocessing.md: FFT method, scipy.signal.resample)."""

from __future__ import annotations

import numpy as np
from scipy.signal import resample

from streamer.spec import MODEL_SAMPLES


def to_model_samples(window: np.ndarray) -> np.ndarray:
    """(n,) or (B, n) float64 -> (..., 5000) float32. Resampled in float64 before the float32 cast."""
    window = np.asarray(window, dtype=np.float64)
    if window.shape[-1] != MODEL_SAMPLES:
        window = resample(window, MODEL_SAMPLES, axis=-1)
    return window.astype(np.float32)
