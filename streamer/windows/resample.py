"""Any source rate -> the model's 5000 samples (docs/preprocessing.md: FFT method, scipy.signal.resample).

scipy.signal.resample's real-input path, step for step, on scipy.fft: the same rfft, the same handling of
the unpaired bin, the same irfft, so the result is bit-identical (tests/integration/test_signals.py checks it against
the installed scipy.signal). Importing scipy.signal costs about a second at every start (it pulls
scipy.stats in); scipy.fft a quarter of that.
"""

from __future__ import annotations

import numpy as np
from scipy import fft as sp_fft

from streamer.spec import MODEL_SAMPLES


def fft_resample(x: np.ndarray, num: int) -> np.ndarray:
    """scipy.signal.resample(x, num, axis=-1) for real float64 input (no window, time domain)."""
    n_x = x.shape[-1]
    s_fac = n_x / num  # scaling factor: the sample interval's dilatation
    m = min(num, n_x)  # relevant frequency bins
    m2 = m // 2 + 1  # of a one-sided FFT
    spectrum = sp_fft.rfft(x)[..., :m2]
    if m % 2 == 0 and num != n_x:  # the unpaired bin at m // 2
        spectrum[..., m // 2] *= 2 if num < n_x else 0.5
    return sp_fft.irfft(spectrum / s_fac, n=num, overwrite_x=True)


def to_model_samples(window: np.ndarray) -> np.ndarray:
    """(n,) or (B, n) float64 -> (..., 5000) float32. Resampled in float64 before the float32 cast."""
    window = np.asarray(window, dtype=np.float64)
    if window.shape[-1] != MODEL_SAMPLES:
        window = fft_resample(window, MODEL_SAMPLES)
    return window.astype(np.float32)
