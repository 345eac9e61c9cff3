"""Batched preprocessing equals the independent per-window reference (tests/reference_impl.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from streamer.model.preprocess import Preprocessor, pillow_bilinear_weights
from streamer.windows.resample import to_model_samples
from tests import reference_impl as ref


def test_resize_is_pillow_exact_on_random_images():
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 256, (64, 129, 79), dtype=np.uint8)
    imgs[:8] = 0
    imgs[8:16] = 255
    ours = Preprocessor().resize_u8(torch.from_numpy(imgs.astype(np.float64))).numpy().astype(np.uint8)
    for img, got in zip(imgs, ours):
        want = np.asarray(Image.fromarray(img, mode="L").resize((224, 224), Image.BILINEAR))
        np.testing.assert_array_equal(got, want)


def test_pillow_weights_sum_to_one_in_fixed_point():
    for n_in in (79, 129):
        w = pillow_bilinear_weights(n_in, 224)
        assert (np.abs(w.sum(1) - (1 << 22)) <= 2).all()


def test_resampling_follows_scipy():
    rng = np.random.default_rng(1)
    for n in (2500, 3600, 10000, 5000):
        x = rng.normal(size=n)
        np.testing.assert_array_equal(to_model_samples(x), ref.resample_5000(x).astype(np.float32))


def _float64_magnitude(x5000: np.ndarray) -> np.ndarray:
    padded = np.pad(np.asarray(x5000, np.float64), 128, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(256) / 256)
    frames = np.stack([padded[f * 64:f * 64 + 256] * window for f in range(79)])
    return np.abs(np.fft.rfft(frames, axis=1)).T  # (129, 79)


def test_batched_images_equal_reference(windows_by_kind):
    """Every pixel identical, or the difference is explained.

    Two explanations, both from float32 arithmetic (torch's FFT here, scipy's in the reference):
    - a truncation flip: the float64 value sits within 0.01 of an 8-bit step;
    - the float32 noise floor: the bin's float64 magnitude is below 1e-4 of its frame's largest bin,
      where any float32 FFT returns rounding noise (e.g. above 125 Hz in a window resampled from 250 Hz).
    Images must be identical whenever the 8-bit spectrograms are. The stream and `streamer score` share
    this code, so online and offline images are identical bit for bit.
    """
    pre = Preprocessor()
    names, raw = zip(*[(k, w) for k, ws in windows_by_kind.items() for w in ws])
    x = np.stack([to_model_samples(w) for w in raw])
    spec_u8 = pre.spectrogram_u8(torch.from_numpy(x)).numpy()
    images = pre(x).numpy()[:, 0]
    differing_pixels = 0
    for name, xi, su8, img in zip(names, x, spec_u8, images):
        want_u8 = ref.spectrogram_scaled(xi).astype(np.uint8)
        diff = su8.astype(np.uint8) != want_u8
        if not diff.any():
            np.testing.assert_array_equal(img, ref.image(xi)[0], err_msg=name)
            continue
        differing_pixels += int(diff.sum())
        exact = ref.spectrogram_scaled(xi, dtype=np.float64)
        at_step = np.abs(exact - np.round(exact)) < 0.01
        mag = _float64_magnitude(xi)
        noise_floor = mag < 1e-4 * mag.max(axis=0, keepdims=True)
        unexplained = diff & ~at_step & ~noise_floor
        assert not unexplained.any(), f"{name}: {int(unexplained.sum())} unexplained pixel differences"
    assert differing_pixels <= 0.01 * spec_u8.size, "differences must stay rare"


def test_zero_and_huge_windows_clamp(windows_by_kind):
    pre = Preprocessor()
    zero = pre(np.zeros((1, 5000), np.float32)).numpy()
    assert (zero == 0).all()  # -100 dB everywhere
    huge = pre(to_model_samples(windows_by_kind["huge"][0])[None]).numpy()
    assert huge.max() == 1.0


def test_batched_images_identical_to_per_window_torch_stft_and_pillow(windows_by_kind):
    """With the released path's FFT (torch.stft per window) every pixel of every window is identical."""
    raw = [w for ws in windows_by_kind.values() for w in ws]
    x = np.stack([to_model_samples(w) for w in raw])
    images = Preprocessor()(x).numpy()[:, 0]
    for xi, img in zip(x, images):
        np.testing.assert_array_equal(img, ref.image(xi, fft="torch")[0])


@pytest.mark.parametrize("n", [3600, 3601, 2500, 1000, 10000, 10001, 5000 * 3 + 1, 7, 8])
def test_fft_resample_is_scipy_signal_resample_bit_for_bit(n):
    """to_model_samples' resampling is scipy.signal.resample's real path on scipy.fft: identical bits."""
    from scipy.signal import resample

    from streamer.windows.resample import fft_resample

    x = np.random.default_rng(n).normal(0, 1, (3, n))
    for num in (5000, 4999, n * 2, max(n // 3, 1)):
        assert np.array_equal(fft_resample(x, num), resample(x, num, axis=-1)), (n, num)
        assert np.array_equal(fft_resample(x[0], num), resample(x[0], num)), (n, num)
