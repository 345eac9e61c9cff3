"""The float64 resize the worker used before the integer one (commit 95ef304), kept as a reference.

Pillow's fixed-point weights as two dense matrix products in float64, where every partial sum is an
integer below 2**53 and so exact, then Pillow's rounding pass (add one half, exact power-of-two multiply,
floor, clip). tests/unit/test_resize_exact.py proves the integer resize equal to it and to Pillow itself, and
benchmarks/bench_resize.py times the two side by side.
"""

from __future__ import annotations

import numpy as np
import torch

from streamer.model.preprocess import IMAGE_SIZE, SPEC_BINS, SPEC_FRAMES, pillow_bilinear_weights

_PRECISION_BITS = 22


class Float64Resize:
    """(B, 129, 79) 8-bit values (float64) -> (B, 224, 224) 8-bit values (float64), Pillow-exact."""

    def __init__(self, device: torch.device | str = "cpu"):
        cols = pillow_bilinear_weights(SPEC_FRAMES, IMAGE_SIZE).T.astype(np.float64)
        rows = pillow_bilinear_weights(SPEC_BINS, IMAGE_SIZE).astype(np.float64)
        self.w_cols = torch.from_numpy(cols).to(device)
        self.w_rows = torch.from_numpy(rows).to(device)
        self._half = float(1 << (_PRECISION_BITS - 1))
        self._unscale = 1.0 / float(1 << _PRECISION_BITS)

    def _pass(self, acc: torch.Tensor) -> torch.Tensor:
        return acc.add_(self._half).mul_(self._unscale).floor_().clamp_(0.0, 255.0)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        horizontal = self._pass(img @ self.w_cols)  # (B, 129, 224)
        return self._pass(self.w_rows @ horizontal)  # (B, 224, 224)
