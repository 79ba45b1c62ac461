"""Segmentation and uncertainty metrics on numpy arrays (hand-checkable; see tests)."""

from __future__ import annotations

import numpy as np


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two bool masks; 1.0 when both are empty.

    >>> dice(np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool))
    0.5
    """
    pred, truth = pred.astype(bool), truth.astype(bool)
    denom = pred.sum() + truth.sum()
    return 1.0 if denom == 0 else float(2 * (pred & truth).sum() / denom)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two bool masks; 1.0 when both are empty."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    union = (pred | truth).sum()
    return 1.0 if union == 0 else float((pred & truth).sum() / union)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); NaN when a class is absent.

    >>> auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    0.75
    """
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels, bool).ravel()
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), np.float64)
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2 + 1
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fbeta_score(pred: np.ndarray, truth: np.ndarray, *, beta: float = 1.0) -> float:
    """F-beta of two bool masks; 1.0 when both are empty.

    >>> round(fbeta_score(np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool), beta=0.5), 4)
    0.5
    """
    pred, truth = pred.astype(bool), truth.astype(bool)
    tp = (pred & truth).sum()
    fp = (pred & ~truth).sum()
    fn = (~pred & truth).sum()
    b2 = beta * beta
    denom = (1 + b2) * tp + b2 * fn + fp
    return 1.0 if denom == 0 else float((1 + b2) * tp / denom)


def brier(prob: np.ndarray, truth: np.ndarray) -> float:
    """Mean squared difference between probability and outcome.

    >>> brier(np.array([1.0, 0.0, 0.5]), np.array([1, 0, 1]))
    0.08333333333333333
    """
    return float(np.mean((np.asarray(prob, np.float64) - np.asarray(truth, np.float64)) ** 2))


def reliability(prob: np.ndarray, truth: np.ndarray, *, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin: mean predicted probability, observed frequency, and count (empty bins NaN)."""
    prob = np.asarray(prob, np.float64).ravel()
    truth = np.asarray(truth, np.float64).ravel()
    idx = np.clip((prob * bins).astype(int), 0, bins - 1)
    counts = np.bincount(idx, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(idx, weights=prob, minlength=bins) / counts
        freq = np.bincount(idx, weights=truth, minlength=bins) / counts
    return conf, freq, counts


def ece(prob: np.ndarray, truth: np.ndarray, *, bins: int = 10) -> float:
    """Expected calibration error of the positive-class probability (equal-width bins).

    >>> round(ece(np.array([0.9, 0.9, 0.1, 0.1]), np.array([1, 1, 0, 0])), 6)
    0.1
    """
    conf, freq, counts = reliability(prob, truth, bins=bins)
    ok = counts > 0
    return float(np.sum(counts[ok] * np.abs(conf[ok] - freq[ok])) / counts.sum()) if counts.sum() else float("nan")


def auprc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve (average precision); NaN without positives.

    >>> auprc(np.array([0.9, 0.8, 0.3, 0.1]), np.array([1, 0, 1, 0]))
    0.8333333333333333
    """
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels, bool).ravel()
    n_pos = labels.sum()
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    hits = labels[order]
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    return float(precision[hits].sum() / n_pos)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (NaN for fewer than 3 pairs)."""
    from scipy.stats import spearmanr

    if len(x) < 3:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def risk_coverage(scores: np.ndarray, failures: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Selective risk at each coverage when cases are accepted from the lowest score (most trusted) up.

    ``scores``: a QC score per case, higher meaning less trusted; ``failures``: bool per case. Returns
    (coverage, risk): after accepting the k most trusted cases, coverage k/n and the share of failures
    among them. Tied scores are accepted together (a rule cannot split them), so ties cost their mean.

    >>> cov, risk = risk_coverage(np.array([0.1, 0.2, 0.9]), np.array([False, False, True]))
    >>> risk.round(3).tolist()
    [0.0, 0.0, 0.333]
    """
    scores = np.asarray(scores, np.float64)
    failures = np.asarray(failures, bool)
    if scores.shape != failures.shape or scores.ndim != 1:
        raise ValueError(f"expected two 1-D arrays of one length, got {scores.shape} and {failures.shape}")
    n = scores.size
    if n == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(scores, kind="stable")
    s, f = scores[order], failures[order].astype(np.float64)
    cum = np.cumsum(f)
    # Within a run of tied scores every prefix gets the run's mean failure rate added in proportion.
    _, start, counts = np.unique(s, return_index=True, return_counts=True)
    for i, c in zip(start, counts, strict=True):
        if c > 1:
            before = cum[i - 1] if i > 0 else 0.0
            cum[i : i + c] = before + (cum[i + c - 1] - before) * np.arange(1, c + 1) / c
    k = np.arange(1, n + 1)
    return k / n, cum / k


def aurc(scores: np.ndarray, failures: np.ndarray) -> float:
    """Area under the risk-coverage curve (mean selective risk over coverages 1/n..1); lower is better.

    As the ValUES framework scores failure detection: a QC score that ranks every failure last gets
    the optimal AURC (:func:`e_aurc` subtracts it); a random one about the failure rate.

    >>> round(aurc(np.array([0.1, 0.2, 0.9]), np.array([False, False, True])), 4)
    0.1111
    """
    _, risk = risk_coverage(scores, failures)
    return float(risk.mean()) if risk.size else float("nan")


def e_aurc(scores: np.ndarray, failures: np.ndarray) -> float:
    """Excess AURC: :func:`aurc` minus that of a score ranking every failure after every success (0 is perfect).

    >>> e_aurc(np.array([0.1, 0.2, 0.9]), np.array([False, False, True]))
    0.0
    """
    failures = np.asarray(failures, bool)
    if failures.size == 0:
        return float("nan")
    optimal = aurc(failures.astype(np.float64), failures)
    return aurc(scores, failures) - optimal
