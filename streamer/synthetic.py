"""Seedable synthetic lead-II ECG with labelled ICU-style artifacts, at any sample rate.

Beats: P, Q, R, S, T waves as Gaussians (the ECGSYN morphology idea), RR intervals with respiratory
and low-frequency variability, occasional premature ventricular beats (wide QRS, no P, compensatory pause).
Artifacts, each marking its samples in `artifact_mask`: electrode motion, muscle (EMG) noise, baseline
wander, power-line interference, lead-off flat line, amplifier saturation (clipping) and abrupt steps.

Ground truth per window: artifact when at least `ARTIFACT_SHARE` of its samples are corrupted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import butter, sosfiltfilt

ARTIFACT_KINDS = ("motion", "emg", "baseline", "powerline", "flatline", "saturation", "step")
ARTIFACT_SHARE = 0.2

# (offset from R in s, width s, amplitude mV) for a normal sinus beat
_WAVES = [(-0.20, 0.025, 0.15), (-0.035, 0.010, -0.12), (0.0, 0.012, 1.2), (0.035, 0.010, -0.25),
          (0.28, 0.045, 0.30)]
_PVC = [(0.0, 0.035, 1.6), (0.07, 0.04, -0.7), (0.32, 0.06, -0.4)]


@dataclass
class SyntheticECG:
    fs: float
    values: np.ndarray  # mV
    artifact_mask: np.ndarray  # bool per sample
    episodes: list[tuple[str, int, int]]  # (kind, first sample, stop sample)

    def window_labels(self, window_samples: int, step: int | None = None) -> np.ndarray:
        step = step or window_samples
        n = (len(self.values) - window_samples) // step + 1
        return np.array([self.artifact_mask[i * step:i * step + window_samples].mean() >= ARTIFACT_SHARE
                         for i in range(max(n, 0))])


def clean_ecg(duration_s: float, fs: float, rng: np.random.Generator, heart_rate: float | None = None,
              pvc_rate: float = 0.03) -> np.ndarray:
    n = int(round(duration_s * fs))
    t = np.arange(n) / fs
    hr = heart_rate or rng.uniform(55, 110)
    mean_rr = 60.0 / hr
    x = np.zeros(n)
    beat_t = rng.uniform(0, mean_rr)
    resp_f, resp_phase = rng.uniform(0.15, 0.35), rng.uniform(0, 2 * np.pi)
    amp = rng.uniform(0.6, 1.4)
    while beat_t < duration_s + 0.5:
        pvc = rng.random() < pvc_rate
        waves = _PVC if pvc else _WAVES
        for off, width, a in waves:
            c = beat_t + off * (mean_rr / 0.85) ** 0.5 if off > 0.1 else beat_t + off
            lo, hi = np.searchsorted(t, [c - 5 * width, c + 5 * width])
            x[lo:hi] += amp * a * np.exp(-0.5 * ((t[lo:hi] - c) / width) ** 2)
        rr = mean_rr * (1 + 0.05 * np.sin(2 * np.pi * resp_f * beat_t + resp_phase) + rng.normal(0, 0.02))
        beat_t += rr * (1.4 if pvc else 1.0) * (0.75 if rng.random() < pvc_rate else 1.0)
    return x + rng.normal(0, 0.01, n)


def _band_noise(n: int, fs: float, lo: float, hi: float, rng: np.random.Generator) -> np.ndarray:
    hi = min(hi, 0.45 * fs)
    sos = butter(2, [lo, hi], btype="band", fs=fs, output="sos")
    z = sosfiltfilt(sos, rng.normal(0, 1, n + 64))[32:32 + n]
    return z / (z.std() + 1e-12)


def inject(x: np.ndarray, fs: float, kind: str, first: int, stop: int, rng: np.random.Generator) -> None:
    """Corrupt x[first:stop] in place with one artifact kind."""
    n = stop - first
    seg = x[first:stop]
    if kind == "motion":
        seg += rng.uniform(0.8, 3.0) * _band_noise(n, fs, 0.5, 8.0, rng)
    elif kind == "emg":
        seg += rng.uniform(0.2, 0.8) * _band_noise(n, fs, 20.0, 150.0, rng)
    elif kind == "baseline":
        t = np.arange(n) / fs
        seg += rng.uniform(1.5, 4.0) * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * t + rng.uniform(0, 6.3))
    elif kind == "powerline":
        t = np.arange(n) / fs
        f = 50.0 if rng.random() < 0.5 else 60.0
        seg += rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * f * t)
    elif kind == "flatline":
        seg[:] = rng.uniform(-0.05, 0.05) + rng.normal(0, 0.002, n)
    elif kind == "saturation":
        seg += rng.uniform(1.0, 3.0) * _band_noise(n, fs, 0.5, 5.0, rng)
        rail = rng.uniform(1.0, 2.0)
        np.clip(seg * 3, -rail, rail, out=seg)
    elif kind == "step":
        k = max(n // int(rng.integers(2, 5)), 1)
        for j in range(0, n, k):
            seg[j:] += rng.uniform(-2.5, 2.5)
    else:
        raise ValueError(f"unknown artifact kind {kind!r}")


def generate(duration_s: float, fs: float = 500.0, seed: int = 0, artifact_fraction: float = 0.3,
             kinds: tuple[str, ...] = ARTIFACT_KINDS, episode_s: tuple[float, float] = (6.0, 30.0)) -> SyntheticECG:
    """One patient's lead-II recording with artifact episodes covering about `artifact_fraction` of it."""
    rng = np.random.default_rng(seed)
    x = clean_ecg(duration_s, fs, rng)
    n = len(x)
    mask = np.zeros(n, bool)
    episodes = []
    target = artifact_fraction * n
    tries = 0
    while mask.sum() < target and tries < 1000:
        tries += 1
        length = int(rng.uniform(*episode_s) * fs)
        if length >= n:
            break
        first = int(rng.integers(0, n - length))
        if mask[max(first - int(fs), 0):first + length + int(fs)].any():
            continue  # keep episodes apart so that window labels stay clear
        kind = str(rng.choice(kinds))
        inject(x, fs, kind, first, first + length, rng)
        mask[first:first + length] = True
        episodes.append((kind, first, first + length))
    return SyntheticECG(fs, x, mask, sorted(episodes, key=lambda e: e[1]))
