"""Metrics on hand-computed cases, including one-class edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamer.evaluation import (auprc, auroc, bootstrap_ci, confusion, threshold_for_sensitivity,
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
