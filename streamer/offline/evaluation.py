"""Classification metrics for validation, written out so their edge cases are explicit and tested."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import rankdata


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


@dataclass
class Confusion:
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def sensitivity(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def ppv(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def npv(self) -> float:
        return _ratio(self.tn, self.tn + self.fn)

    @property
    def accuracy(self) -> float:
        return _ratio(self.tp + self.tn, self.tp + self.tn + self.fp + self.fn)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(sensitivity=self.sensitivity, specificity=self.specificity, ppv=self.ppv, npv=self.npv,
                 accuracy=self.accuracy)
        return d


def confusion(labels: np.ndarray, predicted: np.ndarray) -> Confusion:
    y = np.asarray(labels, bool)
    p = np.asarray(predicted, bool)
    return Confusion(int((y & p).sum()), int((~y & p).sum()), int((~y & ~p).sum()), int((y & ~p).sum()))


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half); NaN with a single class."""
    y = np.asarray(labels, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(np.asarray(scores, float))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auprc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (step-wise area under precision-recall); NaN without positives."""
    y = np.asarray(labels, bool)
    if y.sum() == 0:
        return math.nan
    order = np.argsort(-np.asarray(scores, float), kind="mergesort")
    s = np.asarray(scores, float)[order]
    yy = y[order]
    # evaluate at distinct thresholds only
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(yy)[last]
    fp = (last + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), thresholds descending: inf, then each distinct
    score; a window counts as positive at threshold t when its score >= t. One sort and cumulative sums:
    O(n log n) (10 M windows, a month of 400 beds, in seconds)."""
    y = np.asarray(labels, bool)
    s = np.asarray(scores, float)
    order = np.argsort(-s, kind="mergesort")
    ranked, hits = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1] if len(ranked) else np.array([], int)
    tp = np.r_[0, np.cumsum(hits)[last]]  # positives scoring >= each threshold
    fp = np.r_[0, last + 1] - tp
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    tpr = tp / n_pos if n_pos else np.full(len(tp), math.nan)
    fpr = fp / n_neg if n_neg else np.full(len(fp), math.nan)
    return fpr, tpr, np.r_[np.inf, ranked[last]]


def bootstrap_ci(fn, labels: np.ndarray, scores: np.ndarray, n: int = 1000, seed: int = 0,
                 level: float = 0.95, groups: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of fn(labels, scores). With `groups` (a patient id per window) and
    more than one group, whole groups are resampled with replacement (a cluster bootstrap): a patient's
    10-second windows are correlated, so the patient is the unit of independence; resampling windows
    would make the interval too narrow. Without groups (or with one), windows are resampled."""
    rng = np.random.default_rng(seed)
    y, s = np.asarray(labels), np.asarray(scores)
    members = None
    if groups is not None:
        _, inverse = np.unique(np.asarray(groups), return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        members = np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)
        if len(members) < 2:
            members = None
    values = []
    for _ in range(n):
        if members is None:
            idx = rng.integers(0, len(y), len(y))
        else:
            idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        v = fn(y[idx], s[idx])
        if not math.isnan(v):
            values.append(v)
    if not values:
        return math.nan, math.nan
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


class ClusteredBootstrap:
    """Sensitivity, specificity (at `threshold`) and AU-ROC over bootstrap resamples of patients (one
    patient: of windows), all three per resample. A resample gives each patient a multiplicity and each
    window its patient's weight, so the scores are sorted once, up front: a resample is then a few weighted
    counts, O(n) with no sort (1,000 resamples of 1 M windows in seconds; bootstrap_ci re-ranks each)."""

    METRICS = ("sensitivity", "specificity", "auroc")

    def __init__(self, labels: np.ndarray, scores: np.ndarray, groups: np.ndarray, threshold: float):
        y = np.asarray(labels, bool)
        s = np.asarray(scores, float)
        _, g = np.unique(np.asarray(groups), return_inverse=True)
        if g.max(initial=0) == 0:  # one patient: windows are the units resampled
            g = np.arange(len(y))
        self.units = int(g.max(initial=-1)) + 1
        hit = s >= threshold
        self.pos = np.bincount(g, weights=y, minlength=self.units)
        self.tp = np.bincount(g, weights=y & hit, minlength=self.units)
        self.neg = np.bincount(g, weights=~y, minlength=self.units)
        self.tn = np.bincount(g, weights=~y & ~hit, minlength=self.units)
        order = np.argsort(s, kind="stable")
        ranked = s[order]
        self.run = np.cumsum(np.r_[True, np.diff(ranked) != 0]) - 1 if len(s) else np.array([], int)
        self.g_sorted, self.y_sorted = g[order], y[order]

    def sample(self, m: np.ndarray) -> tuple[float, float, float]:
        """The three metrics with unit i counted m[i] times."""
        pos, neg = float(m @ self.pos), float(m @ self.neg)
        sens = float(m @ self.tp) / pos if pos else math.nan
        spec = float(m @ self.tn) / neg if neg else math.nan
        if not pos or not neg:
            return sens, spec, math.nan
        w = m[self.g_sorted].astype(float)
        runs = int(self.run[-1]) + 1
        pos_run = np.bincount(self.run, weights=w * self.y_sorted, minlength=runs)
        neg_run = np.bincount(self.run, weights=w * ~self.y_sorted, minlength=runs)
        below = np.cumsum(neg_run) - neg_run  # negatives scoring strictly lower; ties count half
        return sens, spec, float(pos_run @ (below + 0.5 * neg_run)) / (pos * neg)

    def intervals(self, n: int, seed: int = 0, level: float = 0.95, progress=None) -> dict[str, tuple[float, float]]:
        rng = np.random.default_rng(seed)
        values = np.empty((n, 3))
        for i in range(n):
            values[i] = self.sample(np.bincount(rng.integers(0, self.units, self.units), minlength=self.units))
            if progress is not None:
                progress(1)
        alpha = (1 - level) / 2
        out = {}
        for j, name in enumerate(self.METRICS):
            v = values[:, j][~np.isnan(values[:, j])]
            out[name] = (float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))) if len(v) else (math.nan,
                                                                                                       math.nan)
        return out


def bootstrap_method(groups: np.ndarray | None) -> str:
    """What bootstrap_ci resamples for these groups, in words for a report."""
    n = len(np.unique(np.asarray(groups))) if groups is not None else 0
    if n >= 2:
        return f"patients resampled with replacement ({n} patients; cluster bootstrap)"
    return ("windows resampled with replacement (one patient: the interval describes this recording, not "
            "a population of patients)")


def threshold_for_sensitivity(labels: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity (p >= threshold) reaches `target`."""
    pos = np.sort(np.asarray(scores, float)[np.asarray(labels, bool)])[::-1]
    if len(pos) == 0:
        raise ValueError("no positive windows: sensitivity is undefined")
    k = max(math.ceil(target * len(pos)), 1)
    return float(pos[k - 1])


def threshold_for_specificity(labels: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The lowest threshold whose specificity (p < threshold for negatives) reaches `target`."""
    neg = np.sort(np.asarray(scores, float)[~np.asarray(labels, bool)])
    if len(neg) == 0:
        raise ValueError("no negative windows: specificity is undefined")
    k = max(math.ceil(target * len(neg)), 1)
    return float(np.nextafter(neg[k - 1], np.inf))
