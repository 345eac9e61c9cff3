"""Preprocessing + model throughput (windows/s) by batch size, next to the per-window Pillow path.

Baseline (measured in the same run): a Pillow image per window (torch.stft per window, numpy dB, Pillow
resize), 3-channel input, plain fp32 NCHW model, batch 128. Ours: batched preprocessing (Pillow-exact
matmuls), folded stem, channels_last.

    python -m benchmarks.bench_model [--batches 16,32,64,128] [--windows 256] [--skip-score]

Then `streamer score` as a user runs it (a fresh process per run, the backend cache warm), on a 29- and a
299-window recording at 360 Hz: wall time, marginal windows/s between the two, and its ratio to the
per-window path measured above; and `streamer --help`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from benchmarks.common import record
from streamer.model.weights import build_network, load_state_dict
from streamer.model.infer import ArtifactScorer, demo_checkpoint_path
from streamer.model.preprocess import Preprocessor
from streamer.settings import ModelSettings
from streamer.synthetic import generate
from tests.reference_impl import image as pillow_image


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
    ap.add_argument("--backend", default="torch", choices=["auto", "torch", "onnxruntime"])
    ap.add_argument("--skip-score", action="store_true", help="only the in-process batch sizes")
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
        p = rate(lambda xb=xb: pre(xb).cpu(), b, repeat=3)
        record(f"batched preprocessing only, batch {b} ({dev}, {scorer.info.precision})", f"{p:.0f} windows/s")

        scorer.device_batch = b  # measure this batch size as such

        def ours(b=b):
            for i in range(0, args.windows, b):
                scorer.probabilities(x[i:i + b])

        r = rate(ours, args.windows, repeat=1)
        record(f"batched preprocessing+model, batch {b} ({dev}, {scorer.info.precision}, {args.backend})",
               f"{r:.1f} windows/s",
               f"{base:.1f}", f"{r / base:.2f}")
    if not args.skip_score:
        score_cli(base)


def _wall(cmd: list[str], env: dict[str, str], runs: int = 2) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - t0)
    return best


def score_cli(per_window_rate: float) -> None:
    """`streamer score` end to end in fresh processes, per backend, next to the per-window path."""
    exe = [sys.executable, "-m", "streamer"]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "XDG_CACHE_HOME": tmp, "STREAMER_LOG_LEVEL": "warning"}
        recs = {}
        for name, seconds in (("short", 290), ("long", 2990)):
            out = f"{tmp}/{name}"
            subprocess.run([*exe, "synth", "--patients", "1", "--duration", str(seconds), "--fs", "360",
                            "--out", out], env=env, check=True, stdout=subprocess.DEVNULL)
            recs[name] = (f"{out}/synth-000.csv", int(seconds // 10))
        record("`streamer --help`, fresh process", f"{_wall([*exe, '--help'], env, runs=3):.2f} s")
        for backend in ("auto", "torch", "onnxruntime"):
            e = {**env, "STREAMER_MODEL__BACKEND": backend}
            cmd = [*exe, "score", "--demo", "--quiet", "--out", f"{tmp}/flags.csv"]
            if backend == "auto":  # the first start on a machine measures and stores the choice
                cold = _wall([*cmd, recs["short"][0]], e, runs=1)
                record("`streamer score`, 29 windows, first start (backend auto measures)", f"{cold:.2f} s wall")
            walls = {name: _wall([*cmd, path], e) for name, (path, _) in recs.items()}
            marginal = (recs["long"][1] - recs["short"][1]) / (walls["long"] - walls["short"])
            record(f"`streamer score`, backend {backend}: 29 / 299 windows at 360 Hz",
                   f"{walls['short']:.2f} s / {walls['long']:.2f} s wall, marginal {marginal:.1f} windows/s",
                   f"{per_window_rate:.1f}", f"{marginal / per_window_rate:.2f}")


if __name__ == "__main__":
    main()
