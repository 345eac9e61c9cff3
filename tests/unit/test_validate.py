"""`streamer validate` reports only what the labels support (issue 33, case 5)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from streamer.cli import main
from streamer.spec import WINDOW_NS

T0 = 1_764_000_000_000_000_000


def _flags(tmp_path, patients: int, windows: int = 11):
    rng = np.random.default_rng(0)
    rows = [{"patient_id": f"p{i}", "window_start_ns": T0 + k * WINDOW_NS, "window_end_ns": T0 + (k + 1) * WINDOW_NS,
             "probability": float(rng.uniform()), "threshold": 0.5, "model": "m"}
            for i in range(patients) for k in range(windows)]
    path = tmp_path / "flags.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _overall(report) -> dict:
    lines = report.read_text().splitlines()
    header = next(line for line in lines if line.startswith("| group |"))
    row = next(line for line in lines if line.startswith("| overall |"))
    return dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))


def test_patients_without_labels_are_left_out_and_named(tmp_path, capsys):
    """Flags of 4 patients, artifact intervals of 2: the metrics cover the 2 (22 windows, not 44), the
    other 2 are named on stderr and in the report; --unlabelled-clean counts them as clean."""
    flags = _flags(tmp_path, patients=4)
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"patient_id": ["p0", "p1"], "start_ns": [T0, T0 + 3 * WINDOW_NS],
                  "end_ns": [T0 + 2 * WINDOW_NS, T0 + 5 * WINDOW_NS], "kind": ["motion", "electrode"]}).to_csv(
        labels, index=False)
    report = tmp_path / "r" / "v.md"
    args = ["validate", "--flags", str(flags), "--labels", str(labels), "--bootstrap-samples", "50",
            "--report", str(report)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "2 patient(s) with flags but no labels left out: p2, p3" in err
    text = report.read_text()
    assert _overall(report)["windows"] == "22"
    assert "Left out, flags without any label (2): p2, p3" in text
    assert "patients resampled with replacement (2 patients; cluster bootstrap)" in text
    assert "| motion | 2 | 1 |" in text and "| electrode | 2 | 1 |" in text, "sensitivity per kind"
    assert main([*args, "--unlabelled-clean"]) == 0
    assert _overall(report)["windows"] == "44"
    assert "counted as clean" in report.read_text()


def test_the_validate_benchmark_runs_at_a_tiny_size():
    """benchmarks/bench_validate.py cannot rot: two tiny sizes, every step timed, nothing recorded."""
    from benchmarks.bench_validate import run

    small, large = run(2_000, 20), run(6_000, 20)
    assert small["patients"] == 1 and large["patients"] == 3
    assert all(r["command_s"] > 0 for r in (small, large))
