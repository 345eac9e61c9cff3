"""Labelled synthetic recordings on disk (`streamer synth`): CSV per patient, window labels, intervals."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from streamer.offline.recordings import parse_start, regular_times
from streamer.synthetic import ARTIFACT_SHARE, generate
from streamer.windows.segmentation import segment


def write_dataset(out: Path, patients: int, duration_s: float, fs: float, seed: int, start: str,
                  artifact_fraction: float = 0.3) -> dict:
    """CSV recordings (timestamp_ns, II) plus window labels and artifact intervals, per patient."""
    out.mkdir(parents=True, exist_ok=True)
    start_ns = parse_start(start)
    recordings, windows, intervals = [], [], []
    for i in range(patients):
        pid = f"synth-{i:03d}"
        ecg = generate(duration_s, fs=fs, seed=seed * 100_003 + i, artifact_fraction=artifact_fraction)
        times = regular_times(len(ecg.values), fs, start_ns)
        path = out / f"{pid}.csv"
        pd.DataFrame({"timestamp_ns": times, "II": ecg.values}).to_csv(path, index=False, float_format="%.17g")
        recordings.append(path)
        for w in segment(times):
            windows.append((pid, w.start_ns, int(ecg.artifact_mask[w.first:w.stop].mean() >= ARTIFACT_SHARE)))
        for kind, a, b in ecg.episodes:
            intervals.append((pid, int(times[a]), int(times[b - 1]) + round(1e9 / fs), kind))
    labels = pd.DataFrame(windows, columns=["patient_id", "window_start_ns", "label"])
    labels.to_csv(out / "window_labels.csv", index=False)
    pd.DataFrame(intervals, columns=["patient_id", "start_ns", "end_ns", "kind"]).to_csv(out / "intervals.csv",
                                                                                         index=False)
    return {"recordings": recordings, "window_labels": out / "window_labels.csv", "intervals": out / "intervals.csv"}
