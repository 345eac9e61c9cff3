"""`streamer validate` at the size of a hospital's month: time against the number of windows.

Synthetic flags and window labels for N windows spread over patients of 2,500 windows each (about 7 hours
of one bed), scores that separate the labels imperfectly; then the command's own steps, timed apart:
loading and joining, the metrics with their patient-clustered bootstrap (1,000 resamples by default,
overall and per patient), ROC and plots. The time must grow no faster than n log n.

    python -m benchmarks.bench_validate [--windows 100000 1000000] [--bootstrap 1000] [--record]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pandas as pd

from streamer.spec import WINDOW_NS

WINDOWS_PER_PATIENT = 2500
T0 = 1_764_000_000_000_000_000


def write_inputs(folder: Path, windows: int, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    patients = max(1, math.ceil(windows / WINDOWS_PER_PATIENT))
    pid = np.repeat([f"bed-{i:04d}" for i in range(patients)], WINDOWS_PER_PATIENT)[:windows]
    k = np.tile(np.arange(WINDOWS_PER_PATIENT), patients)[:windows]
    label = rng.uniform(size=windows) < 0.2
    prob = np.clip(rng.normal(np.where(label, 0.65, 0.25), 0.18), 0, 1).round(6)
    start = T0 + k.astype(np.int64) * WINDOW_NS
    flags, labels = folder / "flags.csv", folder / "labels.csv"
    pd.DataFrame({"patient_id": pid, "window_start_ns": start, "window_end_ns": start + WINDOW_NS,
                  "probability": prob, "threshold": 0.5, "model": "bench"}).to_csv(flags, index=False)
    pd.DataFrame({"patient_id": pid, "window_start_ns": start, "label": label.astype(int)}).to_csv(labels, index=False)
    return flags, labels


def run(windows: int, bootstrap: int) -> dict:
    from streamer.commands import validate

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        flags, labels = write_inputs(folder, windows)
        t0 = time.perf_counter()
        df, _ = validate.attach_labels(validate.load_flags(str(flags)), str(labels))
        t1 = time.perf_counter()
        validate.metrics_table(df, 0.5, bootstrap, 0)
        t2 = time.perf_counter()
        args = Namespace(flags=[str(flags)], labels=str(labels), patient="recording", offline=None,
                         target_sensitivity=None, target_specificity=None, bootstrap_samples=bootstrap, seed=0,
                         report=str(folder / "report" / "v.md"), config_out=None, recording=None,
                         unlabelled_clean=False, quiet=True)
        t3 = time.perf_counter()
        assert validate.main(args) == 0
        t4 = time.perf_counter()
    return {"windows": windows, "patients": df["patient_id"].nunique(), "load_join_s": t1 - t0,
            "metrics_bootstrap_s": t2 - t1, "command_s": t4 - t3}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--record", action="store_true", help="append the rows to benchmarks/RESULTS.md")
    a = ap.parse_args(argv)
    results = [run(n, a.bootstrap) for n in a.windows]
    for r in results:
        print(r)
    if len(results) > 1:
        lo, hi = results[0], results[-1]
        n_log_n = hi["windows"] * math.log(hi["windows"]) / (lo["windows"] * math.log(lo["windows"]))
        growth = hi["command_s"] / lo["command_s"]
        print(f"time x{growth:.2f} for windows x{hi['windows'] / lo['windows']:g} (n log n: x{n_log_n:.2f})")
    if a.record:
        from benchmarks.common import record

        for r in results:
            record(f"`streamer validate`, {r['windows']:,} windows of {r['patients']} patients, {a.bootstrap} "
                   "patient-clustered bootstrap resamples (overall and per patient)",
                   f"{r['command_s']:.1f} s for the command (load+join {r['load_join_s']:.1f} s, metrics with "
                   f"bootstrap {r['metrics_bootstrap_s']:.1f} s)")
        if len(results) > 1:
            record(f"`streamer validate` growth {lo['windows']:,} -> {hi['windows']:,} windows",
                   f"time x{growth:.2f} (n log n would be x{n_log_n:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
