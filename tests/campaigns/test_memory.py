"""The window stage's memory under a stream of patients arriving and leaving (a campaign, not a unit test:
a minute and a half of the inner loop's time; tests/unit/test_windows.py has the rules it rests on)."""

from __future__ import annotations

import numpy as np

from streamer.ingest.contract import Chunk
from streamer.settings import WindowSettings
from streamer.windows.stage import WindowStage

START = 1_795_000_000_000_000_000  # as tests/unit/test_windows.py


def test_ten_thousand_patients_memory_bounded_and_evicted():
    settings = WindowSettings(idle_evict_s=5.0, max_buffer_bytes=20 << 20)
    stage = WindowStage(settings)
    for partition in range(8):  # assigned
        stage.owned.open(partition)
    peak = 0
    emitted = 0
    rng = np.random.default_rng(0)
    for i in range(10_000):
        now = i * 0.01  # 100 new patients per simulated second, each sending 3 s then going silent
        for j in range(3):
            c = Chunk(f"bed-{i}", "II", START + j * 10**9, 500.0, rng.normal(size=500), j, START)
            stage.accept(i % 8, i * 3 + j, c, now)
        emitted += len(stage.evict(now))
        peak = max(peak, stage.nbytes)
    assert peak <= 20 << 20
    assert len(stage.streams) <= 600
    emitted += len(stage.close_all(1e9))
    assert emitted == 10_000  # each patient's partial window is reported, none is silently lost
