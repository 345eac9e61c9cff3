"""The image step's resize side by side: the float64 matrix products (tests/resize_float64.py, the path
before issue 48) against the int32 two-tap resize (streamer/model/preprocess.py), same process, same
minutes, interleaved, best of 5.

    python -m benchmarks.bench_resize [--threads 1] [--record]

Inputs are the 8-bit spectrograms of real-shaped windows (synthetic ECG with artifact at 360 Hz,
resampled to 5000 samples as the worker does); both resizes must give identical images before anything
is timed. Reports microseconds a window, wall clock and the thread's CPU time (this box is shared: CPU
time is what the resize costs, wall what it took beside the neighbours), for the resize alone at batch 1,
16 and 64, and for the whole preprocessing (spectrogram, resize, /255) at batch 1 and 16.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from streamer.model.preprocess import Preprocessor
from streamer.synthetic import generate
from streamer.windows.resample import to_model_samples
from tests.resize_float64 import Float64Resize

ROUNDS = 5


def real_shaped_windows(n: int, seed: int = 4) -> torch.Tensor:
    g = generate(10.0 * n, fs=360, seed=seed)
    return torch.from_numpy(np.stack([to_model_samples(w) for w in g.values[:n * 3600].reshape(n, 3600)])
                            .astype(np.float32))


def best_of(fns: dict, windows: int, calls: int) -> dict[str, tuple[float, float]]:
    """name -> (wall, thread CPU) microseconds a window: the best of ROUNDS rounds, the candidates taking
    turns within each round so that both see the same minutes."""
    best = {name: (float("inf"), float("inf")) for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(calls):
                fn()
            c1, w1 = time.thread_time(), time.perf_counter()
            scale = 1e6 / (calls * windows)
            best[name] = (min(best[name][0], (w1 - w0) * scale), min(best[name][1], (c1 - c0) * scale))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the worker's inference thread: 1)")
    ap.add_argument("--record", action="store_true", help="append one row to benchmarks/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pre, float64 = Preprocessor("cpu"), Float64Resize("cpu")
    x = real_shaped_windows(64)
    spec = pre.spectrogram_u8(x)  # (64, 129, 79) int32
    spec64 = spec.to(torch.float64)
    if not torch.equal(pre.resize_u8(spec), float64(spec64).to(torch.int32)):
        raise SystemExit("bench_resize: the two resizes differ; nothing timed")

    def old_whole(xb):  # the preprocessing before: the float64 resize of the same 8-bit spectrogram
        return float64(pre.spectrogram_u8(xb).to(torch.float64)).to(torch.float32).div_(255.0).unsqueeze(1)

    if not torch.equal(pre(x), old_whole(x)):
        raise SystemExit("bench_resize: the two preprocessings differ; nothing timed")
    parts = []
    ratios = {}
    for b in (1, 16, 64):
        s32, s64 = spec[:b].contiguous(), spec64[:b].contiguous()
        r = best_of({"float64": lambda s64=s64: float64(s64), "int32": lambda s32=s32: pre.resize_u8(s32)},
                    b, max(1, 64 // b))
        ratios[b] = r["float64"][1] / r["int32"][1]
        if b == 16:
            baseline = f"{r['float64'][1]:.0f} us a window (float64 resize, batch 16, CPU)"
        parts.append(f"resize batch {b}: float64 {r['float64'][0]:.0f} / int32 {r['int32'][0]:.0f} us a window "
                     f"wall, CPU {r['float64'][1]:.0f} / {r['int32'][1]:.0f} ({ratios[b]:.1f}x)")
    for b in (1, 16):
        xb = x[:b].contiguous()
        r = best_of({"float64": lambda xb=xb: old_whole(xb), "int32": lambda xb=xb: pre(xb)}, b, max(1, 64 // b))
        parts.append(f"whole preprocessing batch {b}: {r['float64'][0]:.0f} / {r['int32'][0]:.0f} us a window "
                     f"wall, CPU {r['float64'][1]:.0f} / {r['int32'][1]:.0f} "
                     f"({r['float64'][1] / r['int32'][1]:.1f}x)")
    figure = (f"image resize 129x79 -> 224x224, float64 matmuls vs int32 two taps (identical images), "
              f"{args.threads} thread(s), best of {ROUNDS}, interleaved")
    value = "; ".join(parts)
    print(f"{figure}: {value}")
    if args.record:
        from benchmarks.common import record

        record(figure, value, baseline, f"{ratios[16]:.1f}")


if __name__ == "__main__":
    main()
