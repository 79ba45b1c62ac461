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
