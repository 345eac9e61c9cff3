"""Effect of half precision on probabilities: max |dp| and flag disagreements against fp32.

On CUDA this measures the deployed setting (model.precision = bf16 / fp16). On a CPU-only machine it
measures bf16 on the CPU as a proxy (CPU fp16 convolutions are not a deployment option).

    python -m benchmarks.bench_precision [--windows 256]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks.common import record
from streamer.model.infer import ArtifactScorer
from streamer.settings import ModelSettings
from streamer.synthetic import generate
from streamer.windows.resample import to_model_samples


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=256)
    args = ap.parse_args()
    g = generate(10.0 * args.windows, fs=360, seed=4)
    x = np.stack([to_model_samples(w) for w in g.values.reshape(args.windows, 3600)])
    ref = ArtifactScorer(ModelSettings(precision="fp32", backend="torch"))
    p32 = ref.probabilities(x)
    cuda = torch.cuda.is_available()
    for precision in (("bf16", "fp16") if cuda else ("bf16",)):
        half = ArtifactScorer(ModelSettings(precision=precision, backend="torch"))
        if not cuda:  # proxy: bf16 weights and activations on the CPU
            half.runner.dtype = torch.bfloat16
            half.runner.net = half.net.to(torch.bfloat16)
        ph = half.probabilities(x)
        dp = np.abs(ph - p32)
        flips = int(((ph >= ref.threshold) != (p32 >= ref.threshold)).sum())
        where = "CUDA" if cuda else "CPU proxy"
        record(f"{precision} vs fp32 ({where}), demo checkpoint, {args.windows} windows at 360 Hz",
               f"max abs dp {dp.max():.2e}, mean abs dp {dp.mean():.2e}, flag disagreements {flips}")


if __name__ == "__main__":
    main()
