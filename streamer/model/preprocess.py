"""Batched window -> 224x224 image, exactly as docs/preprocessing.md's offline path (steps 1-9).

Everything runs on one device for a whole batch. Pillow's bilinear resize is reproduced in int32 with its
own fixed-point weights, its two taps per output pixel and its two 8-bit roundings (horizontal pass, then
vertical), the arithmetic of Pillow's ImagingResampleHorizontal/Vertical_8bpc: the same integers, so the
same image, bit for bit, on the CPU and on a GPU (`pillow_resize_u8`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from streamer.spec import MODEL_SAMPLES  # 10 s at 500 Hz
N_FFT = 256
HOP = 64
DB_FLOOR_POWER = 1e-10
DB_MIN = -100.0
DB_MAX = 87.12892150878906
IMAGE_SIZE = 224
SPEC_BINS = N_FFT // 2 + 1  # 129
SPEC_FRAMES = MODEL_SAMPLES // HOP + 1  # 79

# Pillow's fixed-point precision for 8-bit images (libImaging/Resample.c: PRECISION_BITS = 32 - 8 - 2).
_PRECISION_BITS = 22


def pillow_bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's integer bilinear weights as an (out_size, in_size) matrix.

    Follows ImagingResample's precompute_coeffs + normalize_coeffs_8bpc for the whole image (no box):
    the same double arithmetic in the same order, then rounding to 22-bit fixed point.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the bilinear filter's support is 1
    weights = np.zeros((out_size, in_size), dtype=np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        ss = 1.0 / filterscale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        taps = []
        for x in range(xmax):
            t = abs((x + xmin - center + 0.5) * ss)
            taps.append(1.0 - t if t < 1.0 else 0.0)
        total = sum(taps)  # summed left to right, as the C loop does
        for x, w in enumerate(taps):
            w = w / total if total != 0.0 else w
            fixed = int(-0.5 + w * (1 << _PRECISION_BITS)) if w < 0 else int(0.5 + w * (1 << _PRECISION_BITS))
            weights[xx, xmin + x] = fixed
    return weights


_HALF = 1 << (_PRECISION_BITS - 1)  # Pillow's accumulators start at one half, so the shift rounds
_U8_MAX = 255
_INT32_MAX = (1 << 31) - 1
_CPU_RESIZE_CHUNK = 8  # windows a CPU resizes at a time


class TwoTaps(NamedTuple):
    """One upscaling pass of Pillow's bilinear filter: output i = (in[first[i]] * first_weight[i]
    + in[second[i]] * second_weight[i] + 2**21) >> 22, along dimension -2 of the input.

    Indices are int64 of shape (out,), weights int32 of shape (out, 1), all on the resize's device.
    Built only by `two_taps`, which checks the int32 bound below.
    """

    first: torch.Tensor
    second: torch.Tensor
    first_weight: torch.Tensor
    second_weight: torch.Tensor


def two_taps(in_size: int, out_size: int, device: torch.device | str = "cpu") -> TwoTaps:
    """Pillow's bilinear weights for an upscale (in_size <= out_size) as two adjacent taps per output.

    Upscaling, the bilinear filter's support is one input pixel on each side of the output's centre, so at
    most two adjacent input pixels get a non-zero weight (one where the centre falls on a pixel's centre:
    its neighbour then weighs 0). Anything else (a downscale) is refused: it needs more taps.

    The int32 bound, checked here for the weights actually used: every weight is >= 0 and a pair sums to
    at most 2**22 + 1 (each is int(0.5 + w * 2**22) of float weights that sum to 1, so each rounds up by at
    most one half). An accumulator is 2**21 + p0 * w0 + p1 * w1 with 8-bit pixels p <= 255, all terms >= 0,
    so every partial sum is at most 2**21 + 255 * (2**22 + 1) = 1,071,644,927 < 2**31 - 1: int32 never
    overflows (Pillow's own C accumulator is an int too). The same bound keeps the shifted result in
    0..255: it is >= 0 because every term is, and <= 255 because 2**21 + 255 * (2**22 + 1) < 256 * 2**22.
    So Pillow's clip to 8 bits never changes a value here, and the resize skips it.
    """
    if not 0 < in_size <= out_size:
        raise ValueError(f"two taps reproduce Pillow's bilinear upscale only, not {in_size} -> {out_size}")
    weights = pillow_bilinear_weights(in_size, out_size)
    if (weights < 0).any():
        raise ValueError("Pillow's bilinear weights are never negative; these are")
    rows = np.arange(out_size)
    nonzero = weights != 0
    first = nonzero.argmax(axis=1)
    second = np.minimum(first + 1, in_size - 1)
    w_first = weights[rows, first]
    w_second = np.where(second != first, weights[rows, second], 0)
    if not (nonzero.any(axis=1).all() and (w_first + w_second == weights.sum(axis=1)).all()):
        raise ValueError(f"{in_size} -> {out_size}: an output pixel has taps beyond two adjacent ones")

    def index(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64)).to(device)

    def weight(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int32)).reshape(-1, 1).to(device)

    taps = TwoTaps(index(first), index(second), weight(w_first), weight(w_second))
    largest = largest_accumulator(taps)
    if largest > _INT32_MAX or largest >> _PRECISION_BITS > _U8_MAX:
        raise ValueError(f"{in_size} -> {out_size}: a sum of {largest} would leave int32 or 8 bits")
    return taps


def largest_accumulator(taps: TwoTaps) -> int:
    """The largest sum a pass with these taps reaches (every pixel 255, since no weight is negative)."""
    pairs = taps.first_weight.to(torch.int64) + taps.second_weight.to(torch.int64)
    return _HALF + _U8_MAX * int(pairs.max())


def _two_tap_pass(img: torch.Tensor, taps: TwoTaps) -> torch.Tensor:
    # Gathers whole rows (contiguous copies, the fast gather on a CPU) then works in place on them.
    acc = img.index_select(-2, taps.first).mul_(taps.first_weight)
    acc.add_(img.index_select(-2, taps.second).mul_(taps.second_weight))
    return acc.add_(_HALF).bitwise_right_shift_(_PRECISION_BITS)  # in 0..255 by two_taps' bound: no clip


def pillow_resize_u8(img: torch.Tensor, cols: TwoTaps, rows: TwoTaps) -> torch.Tensor:
    """(B, H, W) int32 8-bit values -> (B, rows_out, cols_out) int32 8-bit values, Pillow-exact.

    Pillow's `Image.resize(size, BILINEAR)` on a mode "L" image: the horizontal pass (W -> cols_out, 8-bit
    rounding) then the vertical one. Integer tensors only, so the same code gives the same bits on any
    device. The input is not modified. The horizontal pass runs on the transposed image so that both passes
    gather rows. (int64 images with int64 taps take the same steps: the tests' overflow-free reference.)
    """
    if img.dtype not in (torch.int32, torch.int64) or img.ndim != 3:
        raise ValueError(f"expected (B, H, W) int32 8-bit values, got {tuple(img.shape)} {img.dtype}")
    horizontal_t = _two_tap_pass(img.transpose(-1, -2).contiguous(), cols)  # (B, cols_out, H)
    return _two_tap_pass(horizontal_t.transpose(-1, -2).contiguous(), rows)  # (B, rows_out, cols_out)


class Preprocessor:
    """window batch (B, 5000) float32 -> model input (B, 1, 224, 224) float32 on `device`."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float32, device=self.device)
        self.cols = two_taps(SPEC_FRAMES, IMAGE_SIZE, self.device)
        self.rows = two_taps(SPEC_BINS, IMAGE_SIZE, self.device)

    def spectrogram_u8(self, x: torch.Tensor) -> torch.Tensor:
        """Steps 1-6: (B, 5000) float32 -> (B, 129, 79) 8-bit values held in int32."""
        if x.ndim != 2 or x.shape[1] != MODEL_SAMPLES:
            raise ValueError(f"expected windows of shape (B, {MODEL_SAMPLES}), got {tuple(x.shape)}")
        x = x.to(self.device, torch.float32)
        spec = torch.stft(x, n_fft=N_FFT, hop_length=HOP, win_length=N_FFT, window=self.window,
                          center=True, pad_mode="reflect", normalized=False, onesided=True,
                          return_complex=True)
        power = spec.abs().pow(2.0)
        db = 10.0 * torch.log10(torch.clamp(power, min=DB_FLOOR_POWER))
        norm = torch.clamp((db - DB_MIN) / (DB_MAX - DB_MIN), 0.0, 1.0)
        return (norm * 255.0).to(torch.uint8).to(torch.int32)  # uint8 cast truncates toward zero

    def resize_u8(self, img: torch.Tensor) -> torch.Tensor:
        """Step 7: (B, 129, 79) 8-bit values (any dtype holding them exactly) -> (B, 224, 224) int32,
        Pillow-exact."""
        img = img.to(self.device, torch.int32)
        if self.device.type != "cpu" or len(img) <= _CPU_RESIZE_CHUNK:
            return pillow_resize_u8(img, self.cols, self.rows)
        # On a CPU, a few windows at a time keep the temporaries in cache (and off fresh pages): at batch
        # 64, 145 instead of 190-300 us a window; the same integers either way.
        out = torch.empty((len(img), IMAGE_SIZE, IMAGE_SIZE), dtype=torch.int32)
        for i in range(0, len(img), _CPU_RESIZE_CHUNK):
            out[i:i + _CPU_RESIZE_CHUNK] = pillow_resize_u8(img[i:i + _CPU_RESIZE_CHUNK], self.cols, self.rows)
        return out

    def __call__(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        img = self.resize_u8(self.spectrogram_u8(x))
        # Step 8-9: /255; one channel (the stem conv folds the 3-channel repeat, see network.py).
        return img.to(torch.float32).div_(255.0).unsqueeze(1)
