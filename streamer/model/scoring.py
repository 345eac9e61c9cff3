"""A batch of emitted windows -> probabilities, in the inference thread: resampled to the model's 5000
samples, preprocessed and scored at once, with device failures retried and, if allowed, the CPU as a
last resort."""

from __future__ import annotations

import time

import numpy as np

from streamer.logs import get_logger
from streamer.metrics import Metrics
from streamer.windows.buffer import SCORABLE, EmittedWindow
from streamer.windows.resample import to_model_samples

log = get_logger("streamer.model")


class WindowScorer:
    """The inference stage's scorer of windows: a batch of EmittedWindows -> one probability each (None
    for a window that is not scorable, or whose batch failed every attempt), retrying a failed batch and
    falling back to the CPU; it hands the samples, as arrays, to ArtifactScorer (model/infer.py)."""

    def __init__(self, scorer, cpu_fallback: bool, metrics: Metrics, attempts: int = 3):
        self.scorer, self.cpu_fallback, self.metrics, self.attempts = scorer, cpu_fallback, metrics, attempts

    def __call__(self, batch: list[EmittedWindow]) -> list[float | None]:
        """None for windows that are not scorable (the flag says why)."""
        t0 = time.perf_counter()
        idx = [i for i, w in enumerate(batch) if w.status == SCORABLE]
        probs: list[float | None] = [None] * len(batch)
        if idx:
            x = np.stack([to_model_samples(batch[i].samples) for i in idx])
            scores = self._score(x)
            for i, p in zip(idx, scores):
                probs[i] = float(p)
            if not_finite := int(np.count_nonzero(~np.isfinite(scores))):  # decide() reports them unscored
                self.metrics.scores_not_finite.inc(not_finite)
                log.error("scores_not_finite", windows=not_finite, batch=len(idx),
                          device=str(self.scorer.info.device), action="reported unscored (reason "
                          "score_not_finite), never as clean")
            self.metrics.batch_size.observe(len(idx))
            self.metrics.inference_s.observe(time.perf_counter() - t0)
        return probs

    def _score(self, x: np.ndarray) -> np.ndarray:
        """Retry device failures; after `attempts`, continue on the CPU if model.cpu_fallback allows it,
        else raise (the worker exits non-zero; commits guarantee the next owner loses nothing)."""
        for attempt in range(1, self.attempts + 1):
            try:
                return self.scorer.probabilities(x)
            except RuntimeError as exc:
                log.error("inference_failed", attempt=attempt, device=self.scorer.info.device, error=repr(exc)[:300])
                if attempt < self.attempts:
                    continue
                if self.cpu_fallback and self.scorer.device.type != "cpu":
                    self.scorer.fall_back_to_cpu()
                    self.metrics.device_fallback.set(1)
                    return self.scorer.probabilities(x)
                raise
        raise AssertionError("unreachable")
