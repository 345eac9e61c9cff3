"""The synthetic generator: labels match the injected artifacts, seeds reproduce, any rate works."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.synthetic import ARTIFACT_KINDS, ARTIFACT_SHARE, generate


@pytest.mark.parametrize("fs", [250, 360, 500, 1000, 128.5])
def test_any_rate(fs):
    g = generate(60, fs=fs, seed=1)
    assert len(g.values) == round(60 * fs) and np.isfinite(g.values).all()


def test_seed_reproduces_and_differs():
    a, b, c = generate(60, seed=3), generate(60, seed=3), generate(60, seed=4)
    np.testing.assert_array_equal(a.values, b.values)
    assert not np.array_equal(a.values, c.values)


def test_mask_matches_episodes_and_only_there_the_signal_changes():
    g = generate(120, fs=500, seed=9, artifact_fraction=0.3)
    mask = np.zeros_like(g.artifact_mask)
    for _, a, b in g.episodes:
        mask[a:b] = True
    np.testing.assert_array_equal(mask, g.artifact_mask)
    clean = generate(120, fs=500, seed=9, artifact_fraction=0.0)
    np.testing.assert_array_equal(clean.values[~g.artifact_mask], g.values[~g.artifact_mask])
    assert 0.2 <= g.artifact_mask.mean() <= 0.45


@pytest.mark.parametrize("kind", ARTIFACT_KINDS)
def test_each_kind_changes_its_samples(kind):
    g = generate(120, fs=500, seed=2, kinds=(kind,))
    clean = generate(120, fs=500, seed=2, artifact_fraction=0.0)
    changed = g.values != clean.values
    assert g.episodes and all(k == kind for k, _, _ in g.episodes)
    assert changed[g.artifact_mask].mean() > 0.9


def test_window_labels_follow_the_share_rule():
    g = generate(100, fs=500, seed=5)
    labels = g.window_labels(5000)
    want = [g.artifact_mask[i * 5000:(i + 1) * 5000].mean() >= ARTIFACT_SHARE for i in range(10)]
    assert list(labels) == want
