#!/usr/bin/env python3
"""Train the SYNTHETIC demo checkpoint in the released format, reproducibly from a seed.

NOT FOR CLINICAL USE. Random EfficientNet-B0 features with BatchNorm calibrated on synthetic spectrograms,
and the released head (Linear-ReLU-Dropout-Linear) fitted on their pooled features, so that the demo shows
flags that follow injected artifacts. Saved in fp16 to keep the repository small.

    python -m tools.make_demo_checkpoint [--seed 2026] [--out streamer/assets/...pth]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from streamer.offline.evaluation import auroc
from streamer.model.infer import DEMO_CHECKPOINT_FILE, ArtifactScorer
from tools.training import (calibrate_batchnorm, fit_head, images_of, pooled_features,
                                     random_network, save_checkpoint)
from streamer.settings import ModelSettings
from streamer.synthetic import generate
from streamer.windows.resample import to_model_samples

RATES = (250.0, 360.0, 500.0, 1000.0)


def labelled_windows(patients: range, seconds: float, seed: int):
    xs, ys = [], []
    for p in patients:
        fs = RATES[p % len(RATES)]
        ecg = generate(seconds, fs=fs, seed=seed * 7919 + p, artifact_fraction=0.35)
        n = int(10 * fs)
        labels = ecg.window_labels(n)
        for k, y in enumerate(labels):
            xs.append(to_model_samples(ecg.values[k * n:(k + 1) * n]))
            ys.append(int(y))
    return np.stack(xs), np.array(ys)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--train-patients", type=int, default=48)
    ap.add_argument("--test-patients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=120.0)
    assets = Path(__file__).resolve().parent.parent / "streamer" / "assets"
    ap.add_argument("--out", default=str(assets / DEMO_CHECKPOINT_FILE))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    t0 = time.time()
    x_train, y_train = labelled_windows(range(args.train_patients), args.seconds, args.seed)
    x_test, y_test = labelled_windows(range(10_000, 10_000 + args.test_patients), args.seconds, args.seed)
    print(f"train windows {len(y_train)} ({y_train.mean():.0%} artifact), test {len(y_test)} ({y_test.mean():.0%})")
    net = random_network(args.seed)
    images = images_of(x_train)
    calibrate_batchnorm(net, images[torch.randperm(len(images))[:256]])
    fit_head(net, pooled_features(net, images), y_train, seed=args.seed)
    path = save_checkpoint(net, args.out, half=True)
    scorer = ArtifactScorer(ModelSettings(checkpoint=path))
    p = scorer.probabilities(x_test)
    print(f"held-out synthetic patients: AU-ROC {auroc(y_test, p):.3f}, "
          f"flag rate at threshold {scorer.threshold:.3f}: {np.mean(p >= scorer.threshold):.2f}; "
          f"{path} ({path.stat().st_size / 1e6:.1f} MB, {time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
