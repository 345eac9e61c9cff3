"""An independent, per-window implementation of docs/preprocessing.md, written from the text, for parity tests.

Deliberately shares no code with streamer/: scipy FFTs on explicit frames, Pillow for the resize.
"""

from __future__ import annotations

import numpy as np
import scipy.fft
import scipy.signal
from PIL import Image

LO, HI = -100.0, 87.12892150878906


def resample_5000(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x if len(x) == 5000 else scipy.signal.resample(x, 5000)


def _torch_stft(x: np.ndarray) -> np.ndarray:
    import torch

    t = torch.from_numpy(np.asarray(x, np.float32))
    spec = torch.stft(t, 256, 64, 256, torch.hann_window(256), center=True, pad_mode="reflect",
                      return_complex=True)
    return spec.abs().pow(2).numpy()


def spectrogram_scaled(x5000: np.ndarray, dtype=np.float32, fft: str = "scipy") -> np.ndarray:
    """Steps 1-5 times 255, before the uint8 cast: (129, 79) in `dtype`.

    fft="scipy": explicit frames and scipy's FFT (independent of torch);
    fft="torch": one torch.stft call per window, as the released offline path computes it.
    """
    x = np.asarray(x5000, dtype=np.float32).astype(dtype)
    if fft == "torch":
        power = _torch_stft(x)
    else:
        n = np.arange(256)
        window = (0.5 - 0.5 * np.cos(2 * np.pi * n / 256)).astype(dtype)  # periodic Hann
        padded = np.pad(x, 128, mode="reflect")
        frames = np.stack([padded[f * 64:f * 64 + 256] * window for f in range(1 + len(x) // 64)])
        spec = scipy.fft.rfft(frames, axis=1).T  # (129, 79)
        power = np.abs(spec) ** 2
    db = 10 * np.log10(np.maximum(power, dtype(1e-10)))
    norm = np.clip((db - dtype(LO)) / dtype(HI - LO), 0, 1)
    return (norm * dtype(255)).astype(dtype)


def image(x5000: np.ndarray, fft: str = "scipy") -> np.ndarray:
    """Steps 1-9: (3, 224, 224) float32, Pillow doing the resize."""
    u8 = spectrogram_scaled(x5000, fft=fft).astype(np.uint8)
    resized = np.asarray(Image.fromarray(u8, mode="L").resize((224, 224), Image.BILINEAR))
    one = resized.astype(np.float32) / 255.0
    return np.stack([one, one, one])
