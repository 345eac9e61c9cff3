"""`streamer score` against okekeclean 1.1.0 (the published offline path), paired in one run.

Whole processes, as users run them, median of --runs, on a short and a long synthetic recording at
360 Hz (29 and 299 windows) with the same checkpoint (a probe: random weights, calibrated BatchNorm).
The marginal rate (extra windows / extra seconds) is the scoring path without the fixed start; the start
is the short run's wall time. Also the fidelity of each backend against okekeclean on the long recording.

okekeclean is not a dependency of this project (it needs Python >= 3.12, torchaudio and huggingface-hub):
give an interpreter that imports it with --okekeclean-python, or a folder to put on its PYTHONPATH with
--okekeclean-path (see docs/reliability-and-performance.md, Performance). Without either, only streamer is measured.

    python -m benchmarks.bench_vs_okekeclean [--okekeclean-path DIR] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import record
from streamer.spec import RELEASED_THRESHOLD

HERE = Path(__file__).resolve().parent
DEFAULT_SIDECAR = Path.home() / ".cache" / "streamer" / "okekeclean-1.1.0"


def _wall(cmd: list[str], env: dict, runs: int) -> float:
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls)


def _probe_checkpoint(path: Path) -> Path:
    from streamer.synthetic import generate
    from streamer.windows.resample import to_model_samples
    from tools.training import calibrated_checkpoint

    g = generate(160, fs=360, seed=2)
    return calibrated_checkpoint(path, np.stack([to_model_samples(w) for w in g.values.reshape(16, 3600)]), seed=7)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--okekeclean-python", default=None, help="an interpreter that imports okekeclean")
    ap.add_argument("--okekeclean-path", default=str(DEFAULT_SIDECAR) if DEFAULT_SIDECAR.is_dir() else None,
                    help="a folder holding okekeclean (pip install --target), put on PYTHONPATH")
    args = ap.parse_args()
    exe = [sys.executable, "-m", "streamer"]
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        env = {**os.environ, "STREAMER_LOG_LEVEL": "warning", "XDG_CACHE_HOME": str(cache)}
        ckpt = _probe_checkpoint(Path(tmp) / "probe.pth")
        recs = {}
        for name, seconds in (("short", 300), ("long", 3000)):
            subprocess.run([*exe, "synth", "--patients", "1", "--duration", str(seconds), "--fs", "360", "--seed", "3",
                            "--out", f"{tmp}/{name}"], env=env, check=True, stdout=subprocess.DEVNULL)
            recs[name] = [f"{tmp}/{name}/synth-000.csv", 0]  # windows: counted from the first output
        record("`streamer --help`, fresh process, median of 5", f"{_wall([*exe, '--help'], env, 5):.2f} s")
        runners = {}
        for backend in ("auto", "torch"):
            e = {**env, "STREAMER_MODEL__BACKEND": backend}
            runners[f"streamer score (backend {backend})"] = (
                lambda rec, out, e=e: ([*exe, "score", rec, "--checkpoint", str(ckpt), "--quiet", "--out", out], e))
        oke_py = args.okekeclean_python or (sys.executable if args.okekeclean_path else None)
        if oke_py:
            oe = {**env, "PYTHONPATH": args.okekeclean_path or ""}
            runners["okekeclean 1.1.0 detect_artifacts"] = (
                lambda rec, out: ([oke_py, str(HERE / "okekeclean_score.py"), rec, str(ckpt), out], oe))
        # one untimed start each: the backend choice is measured and cached once per machine and checkpoint
        for make in runners.values():
            cmd, e = make(recs["short"][0], f"{tmp}/warm.csv")
            subprocess.run(cmd, env=e, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        marginal, probs = {}, {}
        # Interleaved: each round runs every tool on the short and then the long recording, so a slow spell
        # of this VM (its rates drift by +/-15 %) lands on both recordings and on every tool alike, instead
        # of on one tool's short runs (which would inflate its marginal rate).
        samples: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.runs):
            for label, make in runners.items():
                for name, (rec, _) in recs.items():
                    out = f"{tmp}/{label.split()[0]}-{label.split()[-1].strip(')')}-{name}.csv"
                    samples.setdefault((label, name), []).append(_wall(*make(rec, out), 1))
                    df = pd.read_csv(out)
                    recs[name][1] = recs[name][1] or len(df)
                    if name == "long":
                        key = "window_start_ns" if "window_start_ns" in df else "start_ns"
                        probs[label] = df.set_index(key)["probability"]
        for label in runners:
            walls = {name: statistics.median(samples[(label, name)]) for name in recs}
            n_short, n_long = recs["short"][1], recs["long"][1]
            marginal[label] = (n_long - n_short) / (walls["long"] - walls["short"])
            fixed = walls["short"] - n_short / marginal[label]  # the wall time with the scoring taken out
            record(f"{label}: {n_short} / {n_long} windows at 360 Hz, probe checkpoint, "
                   f"median of {args.runs} interleaved runs",
                   f"{walls['short']:.2f} s / {walls['long']:.2f} s wall, marginal {marginal[label]:.1f} windows/s, "
                   f"fixed start {fixed:.2f} s")
        oke = "okekeclean 1.1.0 detect_artifacts"
        if oke in marginal:
            for label in runners:
                if label == oke:
                    continue
                ratio = marginal[label] / marginal[oke]
                p, q = probs[label].align(probs[oke], join="inner")
                flips = int(((p >= RELEASED_THRESHOLD) != (q >= RELEASED_THRESHOLD)).sum())
                record(f"{label} vs okekeclean 1.1.0, same run: marginal rate; fidelity over {len(p)} windows",
                       f"{marginal[label]:.1f} vs {marginal[oke]:.1f} windows/s; max abs dp {np.abs(p - q).max():.1e}, "
                       f"flips at the released threshold {flips}", f"{marginal[oke]:.1f}", f"{ratio:.2f}")


if __name__ == "__main__":
    main()
