"""Run every benchmark that fits this machine, appending to benchmarks/RESULTS.md.

    python -m benchmarks.run_all [--quick]   (from the repository root; `python benchmarks/run_all.py` works too)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes)")
    args = ap.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    runs = [
        ["bench_ingest.py"] + (["--beds", "50"] if args.quick else []),
        ["bench_model.py"] + (["--windows", "128", "--batches", "16,64"] if args.quick else
                              (["--batches", "64,256,1024,4096", "--windows", "8192"] if gpu else [])),
        ["bench_precision.py"] + (["--windows", "64"] if args.quick else []),
        ["bench_e2e.py", "--beds", "50" if args.quick else "5000", "--seconds", "60"] if gpu else
        ["bench_e2e.py", "--beds", "50" if args.quick else "400", "--seconds", "60",
         "--backend", "onnxruntime", "--cpu-threads", "1"],  # the fastest CPU setup measured here
    ]
    for run in runs:
        module = "benchmarks." + run[0].removesuffix(".py")
        print(f"$ python -m {module} " + " ".join(run[1:]), flush=True)
        subprocess.run([sys.executable, "-m", module, *run[1:]], check=True, cwd=HERE.parent)
    print((HERE / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
