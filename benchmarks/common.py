"""Shared by the benchmarks: machine description and RESULTS.md rows."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = ("| date | machine | commit | command | figure | value | baseline | ratio |\n"
          "|---|---|---|---|---|---|---|---|\n")


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores {cpu}; {gpu}; torch {torch.__version__}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=RESULTS.parent).stdout.strip() or "?"
    except OSError:
        return "?"


def record(figure: str, value: str, baseline: str = "", ratio: str = "", command: str | None = None,
           where: tuple[str, str, str] | None = None) -> None:
    """Append one row. `where`: (date, machine, commit) of a measurement made elsewhere (the GPU machine's
    device check, recorded here from the JSON it brought back); by default this run's."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    # `python -m benchmarks.campaigns` runs the package's __main__: the command is the package's name
    how = (f"-m {spec.name.removesuffix('.__main__')}" if spec is not None
           else Path(sys.argv[0]).as_posix().split("/main/")[-1])
    cmd = command or "python " + " ".join([how, *sys.argv[1:]])
    date, host, at = where or (str(datetime.date.today()), machine(), commit())
    row = f"| {date} | {host} | {at} | `{cmd}` | {figure} | {value} | {baseline} | {ratio} |\n"
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nRows are appended by the benchmark scripts; newest last.\n\n"
                           + HEADER)
    with open(RESULTS, "a") as f:
        f.write(row)
    print(row, end="")
