"""The integer resize (model/preprocess.py, `pillow_resize_u8`) is Pillow's bilinear resize bit for bit.

Each image is compared three ways: the int32 path the worker runs, the float64 matrix products it ran
before (tests/resize_float64.py) and Pillow itself (`Image.resize((224, 224), BILINEAR)` on a mode "L"
image). Hypothesis draws synthetic images (uniform noise in any range, constants, checkerboards, stripes,
single bright pixels, saturated binary noise, gradients) and real-like ones (the 8-bit spectrograms of
synthetic ECG windows with every artifact kind, at every source rate, at amplitudes from microvolts to
volts); the int32 bound is checked on the worst-case image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from tests.budget import examples
from PIL import Image

from streamer.model.preprocess import (
    IMAGE_SIZE,
    SPEC_BINS,
    SPEC_FRAMES,
    Preprocessor,
    TwoTaps,
    largest_accumulator,
    pillow_resize_u8,
    two_taps,
)
from streamer.synthetic import ARTIFACT_KINDS, generate, inject
from streamer.windows.resample import to_model_samples
from tests.resize_float64 import Float64Resize

PRE = Preprocessor("cpu")
FLOAT64 = Float64Resize("cpu")
SHAPE = (SPEC_BINS, SPEC_FRAMES)  # (129, 79): rows = frequency bins, columns = frames


def pillow(img: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(img, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))


def assert_exact(imgs: np.ndarray) -> None:
    """(B, 129, 79) uint8: the int32 resize equals the float64 one and Pillow's, every pixel."""
    assert imgs.dtype == np.uint8 and imgs.shape[1:] == SHAPE
    ours = PRE.resize_u8(torch.from_numpy(imgs.astype(np.int32)))
    assert ours.dtype == torch.int32 and ours.shape == (len(imgs), IMAGE_SIZE, IMAGE_SIZE)
    got = ours.numpy()
    np.testing.assert_array_equal(got, FLOAT64(torch.from_numpy(imgs.astype(np.float64))).numpy())
    for i, (img, out) in enumerate(zip(imgs, got)):
        np.testing.assert_array_equal(out, pillow(img), err_msg=f"image {i}")


# -- synthetic images ---------------------------------------------------------------------------------
levels = st.integers(0, 255)


@st.composite
def synthetic_images(draw) -> np.ndarray:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["uniform", "constant", "checkerboard", "stripes", "bright_pixel",
                                 "binary_noise", "gradient"]))
    rows, cols = np.indices(SHAPE)
    if kind == "uniform":
        lo = draw(levels)
        hi = draw(st.integers(lo, 255))
        return rng.integers(lo, hi + 1, SHAPE, dtype=np.uint8)
    if kind == "constant":
        return np.full(SHAPE, draw(st.sampled_from([0, 255]) | levels), np.uint8)
    a, b = draw(st.sampled_from([(0, 255), (255, 0)]) | st.tuples(levels, levels))
    if kind == "checkerboard":
        ph, pw = draw(st.integers(1, 9)), draw(st.integers(1, 9))
        dr, dc = draw(st.integers(0, 8)), draw(st.integers(0, 8))
        return np.where(((rows + dr) // ph + (cols + dc) // pw) % 2 == 0, a, b).astype(np.uint8)
    if kind == "stripes":
        period, along_rows = draw(st.integers(1, 12)), draw(st.booleans())
        return np.where(((rows if along_rows else cols) // period) % 2 == 0, a, b).astype(np.uint8)
    if kind == "bright_pixel":
        img = np.full(SHAPE, a, np.uint8)
        for _ in range(draw(st.integers(1, 3))):
            img[draw(st.integers(0, SHAPE[0] - 1)), draw(st.integers(0, SHAPE[1] - 1))] = b
        return img
    if kind == "binary_noise":
        return np.where(rng.random(SHAPE) < draw(st.floats(0, 1)), a, b).astype(np.uint8)
    ramp = cols / (SHAPE[1] - 1) if draw(st.booleans()) else rows / (SHAPE[0] - 1)
    return np.round(a + (b - a) * ramp).astype(np.uint8)


@settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(synthetic_images(), min_size=1, max_size=4))
def test_synthetic_images_are_pillow_exact(images):
    assert_exact(np.stack(images))


# -- real-like images: the spectrograms of synthetic ECG windows, as the worker makes them -------------
@st.composite
def ecg_windows(draw) -> np.ndarray:
    fs = draw(st.sampled_from([250, 360, 500, 1000]))
    seed = draw(st.integers(0, 2**31 - 1))
    x = generate(10.0, fs=fs, seed=seed, artifact_fraction=0.0).values.copy()
    kind = draw(st.sampled_from(("none", *ARTIFACT_KINDS)))
    if kind != "none":
        first = draw(st.integers(0, len(x) - 2))
        inject(x, fs, kind, first, draw(st.integers(first + 1, len(x))), np.random.default_rng(seed))
    return to_model_samples(x * 10.0 ** draw(st.floats(-3, 3))).astype(np.float32)


@settings(max_examples=examples(80), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ecg_windows(), min_size=1, max_size=3))
def test_real_like_spectrograms_are_pillow_exact(windows):
    spectrograms = PRE.spectrogram_u8(torch.from_numpy(np.stack(windows))).numpy()
    assert_exact(spectrograms.astype(np.uint8))


def test_the_suites_varied_windows_are_pillow_exact(windows_by_kind):
    x = np.stack([to_model_samples(w) for ws in windows_by_kind.values() for w in ws]).astype(np.float32)
    assert_exact(PRE.spectrogram_u8(torch.from_numpy(x)).numpy().astype(np.uint8))


def test_every_single_bright_pixel_position_is_pillow_exact():
    """A 255 pixel on black, and a black one on white, at each of the 129 x 79 positions."""
    for value, background in ((255, 0), (0, 255)):
        imgs = np.full((SHAPE[0] * SHAPE[1], *SHAPE), background, np.uint8)
        imgs.reshape(len(imgs), -1)[np.arange(len(imgs)), np.arange(len(imgs))] = value
        for chunk in np.array_split(imgs, 40):
            got = PRE.resize_u8(torch.from_numpy(chunk.astype(np.int32))).numpy()
            want = np.stack([pillow(img) for img in chunk])
            assert np.array_equal(got, want), np.argwhere((got != want).any(axis=(1, 2)))[:5]


def test_extreme_images_are_pillow_exact():
    rows, cols = np.indices(SHAPE)
    assert_exact(np.stack([np.zeros(SHAPE, np.uint8), np.full(SHAPE, 255, np.uint8),
                           np.where((rows + cols) % 2 == 0, 255, 0).astype(np.uint8),
                           np.where((rows + cols) % 2 == 0, 0, 255).astype(np.uint8)]))


# -- the int32 bound ----------------------------------------------------------------------------------
def _int64(taps: TwoTaps) -> TwoTaps:
    return taps._replace(first_weight=taps.first_weight.to(torch.int64),
                         second_weight=taps.second_weight.to(torch.int64))


def test_worst_case_sum_stays_below_int32():
    """The all-255 image reaches the largest sum (no weight is negative): 2**21 + 255 * 2**22 here,
    as the docstring of two_taps argues, and int32 gives the same image as int64 arithmetic."""
    for taps in (PRE.cols, PRE.rows):
        assert (taps.first_weight >= 0).all() and (taps.second_weight >= 0).all()
        assert largest_accumulator(taps) == (1 << 21) + 255 * (1 << 22) == 1_071_644_672 < 2**31 - 1
        # the sum itself, in int64, over every output of the all-255 input
        pairs = taps.first_weight.to(torch.int64) + taps.second_weight.to(torch.int64)
        assert int(((1 << 21) + 255 * pairs).max()) == largest_accumulator(taps)
    worst = np.full((1, *SHAPE), 255, np.uint8)
    assert_exact(worst)
    as32 = pillow_resize_u8(torch.from_numpy(worst.astype(np.int32)), PRE.cols, PRE.rows)
    as64 = pillow_resize_u8_int64(torch.from_numpy(worst.astype(np.int64)))
    assert torch.equal(as32.to(torch.int64), as64) and int(as64.max()) == 255


def pillow_resize_u8_int64(img: torch.Tensor) -> torch.Tensor:
    """The same passes in int64, where no sum of 8-bit pixels and 22-bit weights can overflow."""
    return pillow_resize_u8(img.to(torch.int64), _int64(PRE.cols), _int64(PRE.rows))


def test_int32_equals_int64_arithmetic_on_random_images():
    imgs = np.random.default_rng(5).integers(0, 256, (32, *SHAPE), dtype=np.uint8)
    as32 = PRE.resize_u8(torch.from_numpy(imgs.astype(np.int32)))
    assert torch.equal(as32.to(torch.int64), pillow_resize_u8_int64(torch.from_numpy(imgs.astype(np.int64))))


def test_two_taps_refuses_what_it_cannot_reproduce():
    for in_size, out_size in ((IMAGE_SIZE, SPEC_FRAMES), (0, IMAGE_SIZE), (300, 224)):
        with pytest.raises(ValueError):
            two_taps(in_size, out_size)
    with pytest.raises(ValueError, match="int32"):
        pillow_resize_u8(torch.zeros((1, *SHAPE), dtype=torch.float64), PRE.cols, PRE.rows)


def test_the_resize_is_integer_only_and_leaves_its_input_alone():
    img = torch.from_numpy(np.random.default_rng(6).integers(0, 256, (3, *SHAPE), dtype=np.int32))
    before = img.clone()
    out = pillow_resize_u8(img, PRE.cols, PRE.rows)
    assert out.dtype == torch.int32 and torch.equal(img, before)
    assert all(not t.is_floating_point() for taps in (PRE.cols, PRE.rows) for t in taps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_same_code_on_cuda_gives_the_same_bits():
    imgs = torch.from_numpy(np.random.default_rng(7).integers(0, 256, (64, *SHAPE), dtype=np.int32))
    gpu = Preprocessor("cuda")
    assert torch.equal(gpu.resize_u8(imgs.cuda()).cpu(), PRE.resize_u8(imgs))
