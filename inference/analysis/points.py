"""Point maths for nuclei: Gaussian targets, peak finding, radius NMS, matching, TPS.

Pure functions on numpy arrays; point arrays are (N, 2) in (x, y) order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

# INSUFFICIENT and MIN_TUMOUR_NUCLEI live in inference.analysis.tps (no SciPy there), which a CPS's category uses too.
from inference.analysis.tps import INSUFFICIENT, MIN_TUMOUR_NUCLEI, tps_category
from inference.results import Tps


def gaussian_targets(
    points_xy: np.ndarray, classes: np.ndarray, *, shape_hw: tuple[int, int], n_classes: int, sigma_px: float
) -> np.ndarray:
    """float32 (n_classes, H, W) heatmaps: the max of unit-peak Gaussians at each class's points.

    >>> t = gaussian_targets(np.array([[2.0, 1.0]]), np.array([1]), shape_hw=(3, 5), n_classes=2, sigma_px=1)
    >>> float(t[1, 1, 2]), float(t[0].max())
    (1.0, 0.0)
    """
    h, w = shape_hw
    out = np.zeros((n_classes, h, w), np.float32)
    reach = int(np.ceil(3 * sigma_px))
    for (x, y), c in zip(points_xy, classes, strict=True):
        cx, cy = round(x), round(y)
        x0, x1 = max(cx - reach, 0), min(cx + reach + 1, w)
        y0, y1 = max(cy - reach, 0), min(cy + reach + 1, h)
        if x0 >= x1 or y0 >= y1:
            continue
        gx = np.exp(-((np.arange(x0, x1) - x) ** 2) / (2 * sigma_px**2))
        gy = np.exp(-((np.arange(y0, y1) - y) ** 2) / (2 * sigma_px**2))
        np.maximum(out[c, y0:y1, x0:x1], np.outer(gy, gx), out=out[c, y0:y1, x0:x1])
    return out


def radius_nms(points_xy: np.ndarray, scores: np.ndarray, *, radius: float) -> np.ndarray:
    """Indices of points kept by greedy NMS: highest score first, neighbours within ``radius`` removed.

    Ties are broken by index (the first wins). Returns sorted indices.

    >>> radius_nms(np.array([[0, 0], [1, 0], [5, 0]]), np.array([0.5, 0.9, 0.7]), radius=2)
    array([1, 2])
    """
    n = len(points_xy)
    if n == 0:
        return np.zeros(0, np.int64)
    pairs = cKDTree(points_xy).query_pairs(radius, output_type="ndarray")
    if len(pairs) == 0:
        return np.arange(n)
    order = np.lexsort((np.arange(n), -np.asarray(scores)))
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    neighbours = sparse.coo_matrix(
        (np.ones(len(pairs) * 2, bool), (np.r_[pairs[:, 0], pairs[:, 1]], np.r_[pairs[:, 1], pairs[:, 0]])),
        shape=(n, n),
    ).tocsr()
    suppressed = np.zeros(n, bool)
    has_neighbours = np.diff(neighbours.indptr) > 0
    for i in order[has_neighbours[order]]:
        if suppressed[i]:
            continue
        row = neighbours.indices[neighbours.indptr[i] : neighbours.indptr[i + 1]]
        suppressed[row[rank[row] > rank[i]]] = True
    return np.flatnonzero(~suppressed)


@dataclass(frozen=True)
class Matching:
    """Optimal one-to-one matching of predicted to true points within a radius."""

    pred_index: np.ndarray
    truth_index: np.ndarray
    distance: np.ndarray


def match_points(pred_xy: np.ndarray, truth_xy: np.ndarray, *, radius: float) -> Matching:
    """Match predictions to truth one-to-one, never across more than ``radius``.

    Among the pairs closer than ``radius`` the matching has the most pairs, and of those the
    smallest total distance (Hungarian algorithm on each connected group of candidates).

    >>> m = match_points(np.array([[0.0, 0], [10, 0]]), np.array([[1.0, 0], [30, 0]]), radius=3)
    >>> m.pred_index.tolist(), m.truth_index.tolist()
    ([0], [0])
    """
    empty = Matching(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    if len(pred_xy) == 0 or len(truth_xy) == 0:
        return empty
    dist = cKDTree(pred_xy).sparse_distance_matrix(cKDTree(truth_xy), radius, output_type="coo_matrix")
    keep = dist.data <= radius
    rows, cols, d = dist.row[keep], dist.col[keep], dist.data[keep]
    if len(rows) == 0:
        return empty
    n_p = len(pred_xy)
    graph = sparse.coo_matrix((np.ones(len(rows)), (rows, cols + n_p)), shape=(n_p + len(truth_xy),) * 2)
    _, labels = connected_components(graph, directed=False)
    comp = labels[rows]
    out_p, out_t, out_d = [], [], []
    order = np.argsort(comp, kind="stable")
    rows, cols, d, comp = rows[order], cols[order], d[order], comp[order]
    bounds = np.flatnonzero(np.diff(comp)) + 1
    big = radius * 1e3 + 1.0  # any infeasible pair costs more than all feasible ones together
    for r, c, dd in zip(np.split(rows, bounds), np.split(cols, bounds), np.split(d, bounds), strict=True):
        ur, ri = np.unique(r, return_inverse=True)
        uc, ci = np.unique(c, return_inverse=True)
        if len(ur) == 1 or len(uc) == 1:
            best = int(np.argmin(dd))
            out_p.append([ur[ri[best]]]), out_t.append([uc[ci[best]]]), out_d.append([dd[best]])
            continue
        cost = np.full((len(ur), len(uc)), big * max(len(ur), len(uc)))
        cost[ri, ci] = dd
        a, b = linear_sum_assignment(cost)
        ok = cost[a, b] <= radius
        out_p.append(ur[a[ok]]), out_t.append(uc[b[ok]]), out_d.append(cost[a[ok], b[ok]])
    return Matching(
        np.concatenate(out_p).astype(np.int64), np.concatenate(out_t).astype(np.int64), np.concatenate(out_d)
    )


@dataclass(frozen=True)
class DetectionScores:
    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def f1(self) -> float:
        denom = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denom if denom else float("nan")

    def __add__(self, other: DetectionScores) -> DetectionScores:
        """Counts pooled over slides or regions: ``sum(scores, DetectionScores(0, 0, 0))``."""
        return DetectionScores(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)


def detection_scores(
    pred_xy: np.ndarray,
    pred_cls: np.ndarray,
    truth_xy: np.ndarray,
    truth_cls: np.ndarray,
    *,
    radius: float,
    n_classes: int,
) -> tuple[DetectionScores, list[DetectionScores]]:
    """Class-agnostic detection scores, and per class (a match counts for class c when both are c)."""
    m = match_points(pred_xy, truth_xy, radius=radius)
    overall = DetectionScores(len(m.pred_index), len(pred_xy) - len(m.pred_index), len(truth_xy) - len(m.truth_index))
    per_class = []
    for c in range(n_classes):
        tp = int(((pred_cls[m.pred_index] == c) & (truth_cls[m.truth_index] == c)).sum())
        per_class.append(DetectionScores(tp, int((pred_cls == c).sum()) - tp, int((truth_cls == c).sum()) - tp))
    return overall, per_class


def tps_member_disagreement(percent: float | None, member_percents: Sequence[float | None]) -> float | None:
    """The share of ensemble members whose own TPS falls in another category (:func:`tps_category`) than
    the ensemble's ``percent``: how far the members are from agreeing on the category a pathologist reads.

    None where there is nothing to compare (no TPS, or fewer than two members with a TPS of their own).

    >>> tps_member_disagreement(1.1, [0.6, 0.9, 1.2, 1.4, 1.3])
    0.4
    >>> tps_member_disagreement(30.0, [28.0, 31.0]), tps_member_disagreement(30.0, [28.0])
    (0.0, None)
    """
    members = [m for m in member_percents if m is not None]
    if percent is None or len(members) < 2:
        return None
    category = tps_category(percent)
    return sum(tps_category(m) != category for m in members) / len(members)


def tumour_proportion_score(positive: int, negative: int, *, min_tumour: int = MIN_TUMOUR_NUCLEI) -> Tps:
    """TPS = positive / (positive + negative) x 100; below ``min_tumour`` nuclei the category is
    ``"insufficient tumour cells"`` (and the percentage is still reported, never a guessed category).

    >>> tumour_proportion_score(30, 70).category
    '1-49%'
    >>> tumour_proportion_score(3, 7).category
    'insufficient tumour cells'
    """
    total = positive + negative
    percent = 100.0 * positive / total if total else None
    if total < min_tumour or percent is None:
        return Tps(positive, negative, percent, INSUFFICIENT)
    return Tps(positive, negative, percent, tps_category(percent))
