"""A real scorer made slower: for tests and campaigns of backpressure, injected through Worker(scorer=)."""

from __future__ import annotations

import time


class SlowScorer:
    """Every batch takes `delay_s` longer (set it to 0 to recover); everything else is the real scorer's."""

    def __init__(self, scorer, delay_s: float):
        self.scorer, self.delay_s = scorer, delay_s

    def probabilities(self, windows):
        time.sleep(self.delay_s)  # runs in the worker's inference thread, as the real scoring does
        return self.scorer.probabilities(windows)

    def __getattr__(self, name):
        return getattr(self.scorer, name)
