"""Metrics on hand-computed cases, including one-class edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamer.offline.evaluation import (auprc, auroc, bootstrap_ci, confusion, threshold_for_sensitivity,
                                         threshold_for_specificity)


def test_confusion_by_hand():
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    p = [1, 0, 1, 0, 1, 0, 0, 1]
    c = confusion(np.array(y), np.array(p))
    assert (c.tp, c.fp, c.tn, c.fn) == (3, 1, 3, 1)
    assert c.sensitivity == 0.75 and c.specificity == 0.75 and c.ppv == 0.75 and c.npv == 0.75
    assert c.accuracy == 0.75


def test_auroc_by_hand_with_ties():
    # pairs (pos, neg): 0.8>0.1, 0.8>0.4, 0.4=0.4 (half), 0.4>0.1 -> 3.5 / 4
    assert auroc(np.array([1, 1, 0, 0]), np.array([0.8, 0.4, 0.4, 0.1])) == pytest.approx(0.875)
    assert auroc(np.array([1, 0]), np.array([0.9, 0.1])) == 1.0
    assert auroc(np.array([1, 0]), np.array([0.1, 0.9])) == 0.0


def test_auprc_by_hand():
    # ranked: pos(0.9), neg(0.8), pos(0.7): AP = 1*0.5 + (2/3)*0.5
    assert auprc(np.array([1, 0, 1]), np.array([0.9, 0.8, 0.7])) == pytest.approx(0.5 + 1 / 3)


def test_all_one_class():
    y = np.ones(5, bool)
    p = np.linspace(0, 1, 5)
    assert math.isnan(auroc(y, p))
    c = confusion(y, p >= 0.5)
    assert math.isnan(c.specificity) and c.npv == 0.0 and c.sensitivity == 0.6  # tn = 0 of tn + fn = 2
    assert math.isnan(auprc(np.zeros(5, bool), p))
    with pytest.raises(ValueError, match="no negative"):
        threshold_for_specificity(y, p, 0.9)


def test_threshold_for_targets():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.6, 0.3, 0.5, 0.2, 0.1, 0.05])
    t = threshold_for_sensitivity(y, p, 0.75)
    assert t == 0.6 and confusion(y, p >= t).sensitivity == 0.75
    t = threshold_for_specificity(y, p, 1.0)
    assert confusion(y, p >= t).specificity == 1.0 and t > 0.5


def test_bootstrap_interval_contains_point_and_is_reproducible():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    p = np.clip(y * 0.4 + rng.random(300) * 0.6, 0, 1)
    lo, hi = bootstrap_ci(auroc, y, p, n=300, seed=1)
    assert lo < auroc(y, p) < hi
    assert (lo, hi) == bootstrap_ci(auroc, y, p, n=300, seed=1)


def _roc_brute_force(y, s):
    """The definition, one threshold at a time (the former quadratic implementation)."""
    thresholds = np.r_[np.inf, np.unique(s)[::-1]]
    tpr = np.array([(s[y] >= t).mean() if y.any() else math.nan for t in thresholds])
    fpr = np.array([(s[~y] >= t).mean() if (~y).any() else math.nan for t in thresholds])
    return fpr, tpr, thresholds


def _auroc_brute_force(y, s):
    pos, neg = s[y], s[~y]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


from hypothesis import given, settings, strategies as st  # noqa: E402
from tests.budget import examples  # noqa: E402


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.5, 0.75, 1.0])
                          | st.floats(0, 1, allow_nan=False)), min_size=1, max_size=60))
def test_roc_and_auroc_equal_their_definitions(pairs):
    """Issue 33, case 6: the O(n log n) ROC (one sort, cumulative sums) equals the per-threshold definition
    on random inputs with ties and one-class cases; AU-ROC equals the all-pairs Mann-Whitney count."""
    from streamer.offline.evaluation import roc_curve

    y = np.array([p[0] for p in pairs], bool)
    s = np.array([p[1] for p in pairs], float)
    got, want = roc_curve(y, s), _roc_brute_force(y, s)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    if y.any() and (~y).any():
        assert auroc(y, s) == pytest.approx(_auroc_brute_force(y, s))


def test_a_cluster_bootstrap_resamples_patients_and_widens_the_interval():
    """Windows of one patient are correlated: resampling patients (the unit of independence) must give a
    wider interval than resampling windows when patients differ, and each resample holds whole patients."""
    rng = np.random.default_rng(3)
    groups = np.repeat([f"p{i}" for i in range(8)], 200)
    sens = np.repeat(rng.uniform(0.3, 1.0, 8), 200)  # each patient its own sensitivity
    y = np.ones(len(groups), bool)
    hit = rng.uniform(size=len(groups)) < sens
    scores = hit.astype(float)
    fn = lambda a, b: float((b >= 0.5).mean())  # noqa: E731 (sensitivity, all windows positive)
    lo_w, hi_w = bootstrap_ci(fn, y, scores, n=400, seed=1)
    lo_p, hi_p = bootstrap_ci(fn, y, scores, n=400, seed=1, groups=groups)
    assert hi_p - lo_p > 3 * (hi_w - lo_w), ((lo_w, hi_w), (lo_p, hi_p))
    sizes = set()
    bootstrap_ci(lambda a, b: sizes.add(len(a)) or 0.0, y, scores, n=20, seed=2, groups=groups)
    assert sizes == {1600}, "every resample holds 8 whole patients"


@settings(max_examples=examples(100), deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from([0.1, 0.3, 0.3, 0.6, 0.9]), st.integers(0, 3)),
                min_size=2, max_size=40), st.lists(st.integers(0, 3), min_size=4, max_size=4))
def test_the_weighted_bootstrap_sample_equals_the_metrics_of_the_resampled_windows(rows, picks):
    """ClusteredBootstrap.sample(multiplicities) must equal sensitivity, specificity and AU-ROC computed on
    the windows of the resampled patients, repeated (what bootstrap_ci computes by re-ranking)."""
    from streamer.offline.evaluation import ClusteredBootstrap

    y = np.array([r[0] for r in rows], bool)
    s = np.array([r[1] for r in rows], float)
    g = np.array([f"p{r[2]}" for r in rows])
    names = np.unique(g)
    if len(names) < 2:
        return
    boot = ClusteredBootstrap(y, s, g, 0.5)
    m = np.bincount(np.array(picks) % len(names), minlength=len(names))
    idx = np.concatenate([np.flatnonzero(g == names[i]) for i in range(len(names)) for _ in range(m[i])])
    c = confusion(y[idx], s[idx] >= 0.5)
    got = boot.sample(m)
    want = (c.sensitivity, c.specificity, auroc(y[idx], s[idx]))
    for a, b in zip(got, want):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b)
