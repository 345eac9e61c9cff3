"""Preprocessing + model throughput (windows/s) by batch size, next to the per-window Pillow path.

Baseline (measured in the same run): a Pillow image per window (torch.stft per window, numpy dB, Pillow
resize), 3-channel input, plain fp32 NCHW model, batch 128. Ours: batched preprocessing (Pillow-exact
matmuls), folded stem, channels_last.

    python benchmarks/bench_model.py [--batches 16,32,64,128] [--windows 256]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import record  # noqa: E402
from streamer.model.checkpoint import build_network, load_state_dict  # noqa: E402
from streamer.model.infer import ArtifactScorer, demo_checkpoint_path  # noqa: E402
from streamer.model.preprocess import Preprocessor  # noqa: E402
from streamer.settings import ModelSettings  # noqa: E402
from streamer.synthetic import generate  # noqa: E402
from tests.reference_impl import image as pillow_image  # noqa: E402


def windows(n: int) -> np.ndarray:
    g = generate(10.0 * n, fs=500, seed=0)
    return g.values.reshape(n, 5000).astype(np.float32)


def rate(fn, n_windows: int, repeat: int = 2) -> float:
    fn()  # warm-up
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = max(best, n_windows / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="16,32,64,128")
    ap.add_argument("--windows", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"])
    args = ap.parse_args()
    x = windows(args.windows)
    scorer = ArtifactScorer(ModelSettings(device=args.device, precision=args.precision, backend=args.backend))
    dev = scorer.device

    # baseline: Pillow per window, plain NCHW fp32, batch 128
    state, _ = load_state_dict(demo_checkpoint_path())
    plain = build_network(state).to(dev)
    base_n = min(args.windows, 128)

    def baseline():
        with torch.inference_mode():
            imgs = torch.from_numpy(np.stack([pillow_image(w, fft="torch") for w in x[:base_n]])).to(dev)
            torch.softmax(plain(imgs), 1)[:, 1].cpu()

    base = rate(baseline, base_n, repeat=1)
    record("per-window Pillow path, batch 128, preprocessing+model", f"{base:.1f} windows/s")

    pre = Preprocessor(dev)
    for b in [int(v) for v in args.batches.split(",")]:
        xb = torch.from_numpy(x[:b])
        p = rate(lambda: pre(xb).cpu(), b, repeat=3)
        record(f"batched preprocessing only, batch {b} ({dev}, {scorer.info.precision})", f"{p:.0f} windows/s")

        scorer.device_batch = b  # measure this batch size as such

        def ours():
            for i in range(0, args.windows, b):
                scorer.probabilities(x[i:i + b])

        r = rate(ours, args.windows, repeat=1)
        record(f"batched preprocessing+model, batch {b} ({dev}, {scorer.info.precision}, {args.backend})", f"{r:.1f} windows/s",
               f"{base:.1f}", f"{r / base:.2f}")


if __name__ == "__main__":
    main()
