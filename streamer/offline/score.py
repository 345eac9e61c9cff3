"""Offline scoring of a recording: docs/preprocessing.md segmentation, then the stream's batched model path."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from streamer.model.infer import ArtifactScorer
from streamer.offline.recordings import Recording, load_recording
from streamer.settings import ModelSettings
from streamer.windows.resample import to_model_samples
from streamer.windows.segmentation import segment

COLUMNS = ["window_start_ns", "window_end_ns", "window_start", "n_samples", "probability", "artifact",
           "threshold", "model"]


def score_recording(rec: Recording, scorer: ArtifactScorer, window_s: float = 10.0, overlap_s: float = 0.0,
                    batch_size: int = 64, progress: bool = False) -> pd.DataFrame:
    windows = segment(rec.times_ns, window_s, overlap_s)
    probs = np.empty(len(windows), dtype=np.float64)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(windows), unit="win", desc="scoring")

    def prepare(part) -> torch.Tensor:  # resampling and images: the same functions as the stream's
        with torch.inference_mode():
            return scorer.images(np.stack([to_model_samples(rec.values[w.first:w.stop]) for w in part]))

    # The next batch is resampled and turned into images on a second thread while the network scores this
    # one (both release the GIL in their kernels): the same numbers, about 5 % sooner on 2 cores.
    parts = [(i, windows[i:i + batch_size]) for i in range(0, len(windows), batch_size)]
    with ThreadPoolExecutor(1, thread_name_prefix="prepare") as ahead:
        pending = ahead.submit(prepare, parts[0][1]) if parts else None
        for j, (i, part) in enumerate(parts):
            images = pending.result()
            if j + 1 < len(parts):
                pending = ahead.submit(prepare, parts[j + 1][1])
            probs[i:i + len(part)] = scorer.probabilities_of_images(images)
            if bar is not None:
                bar.update(len(part))
    if bar is not None:
        bar.close()
    starts = np.array([w.start_ns for w in windows], dtype=np.int64)
    return pd.DataFrame({
        "window_start_ns": starts,
        "window_end_ns": np.array([w.end_ns for w in windows], dtype=np.int64),
        "window_start": pd.to_datetime(starts, utc=True),
        "n_samples": np.array([w.stop - w.first for w in windows], dtype=np.int64),
        "probability": probs,
        "artifact": probs >= scorer.threshold,
        "threshold": scorer.threshold,
        "model": scorer.info.model_id,
    }, columns=COLUMNS)


def score_series(series: pd.Series, checkpoint: str | Path | None = None, threshold: float | None = None,
                 overlap_s: float = 0.0, batch_size: int = 64, scorer: ArtifactScorer | None = None,
                 device: str = "auto") -> pd.DataFrame:
    """Score a lead-II series (mV) indexed by a DatetimeIndex; one row per 10-second window.

    >>> flags = score_series(ecg_series, checkpoint="cnn-efficientnet_b0-...pth")
    """
    if not isinstance(series.index, pd.DatetimeIndex):
        raise TypeError("series needs a DatetimeIndex (the time of each sample)")
    idx = series.index if series.index.tz is not None else series.index.tz_localize("UTC")
    if scorer is None:
        opts = {"checkpoint": checkpoint, "device": device}
        if threshold is not None:
            opts["threshold"] = threshold
        scorer = ArtifactScorer(ModelSettings(**opts))
    rec = Recording(idx.asi8.astype(np.int64), series.to_numpy(dtype=np.float64), None)
    return score_recording(rec, scorer, overlap_s=overlap_s, batch_size=batch_size)


def score_file(path: str | Path, settings: ModelSettings, fs: float | None = None, start: str | None = None,
               channel: str | None = None, overlap_s: float = 0.0, batch_size: int = 64,
               progress: bool = True, time_unit: str | None = None) -> pd.DataFrame:
    rec = load_recording(path, fs=fs, start=start, channel=channel, time_unit=time_unit)
    return score_recording(rec, ArtifactScorer(settings), overlap_s=overlap_s, batch_size=batch_size,
                           progress=progress)
