"""Spatial uncertainty aggregation (SUA) for false-negative candidates.

After Pocevičiūtė, Eilertsen, Lundström (J. Med. Imaging 2024): pixels whose ensemble-mean
probability lies in ``[lower, upper)`` (``upper`` is the segmentation threshold, so none of
them is predicted positive) form negative prediction regions (NPRs, 8-connected). A pixel
uncertainty map is aggregated over each NPR (mean or 90th percentile) and an NPR whose
aggregate exceeds ``threshold`` is a false-negative candidate for the pathologist to review.

The baseline of the paper thresholds the pixel uncertainty over the same pixels.
Calibration picks the threshold (and lower bound) maximising F0.5 for "this NPR is a false
negative" on validation slides with truth, in pixels (the unit SUA and the baseline are
compared in) or counting each NPR once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from shapely.ops import unary_union
from skimage.measure import label as sk_label

from inference.analysis.regions import label_means, region_from
from inference.analysis.vectorize import mask_to_polygons
from inference.results import RegionStats, UncertaintyMaps

UNCERTAINTY_MAPS = ("predictive_entropy", "mutual_information", "prob_std")
AGGREGATIONS = ("mean", "p90")
CALIBRATION_OBJECTIVES = ("pixels", "regions")


@dataclass(frozen=True)
class SuaParams:
    """The numbers SUA runs on (calibrated into the manifest, overridable)."""

    lower: float = 0.2
    upper: float = 0.5
    threshold: float = 0.4
    uncertainty: str = "predictive_entropy"
    aggregation: str = "mean"
    min_area_um2: float = 200.0

    def __post_init__(self) -> None:
        if not 0 <= self.lower < self.upper <= 1:
            raise ValueError(f"need 0 <= lower < upper <= 1, got lower={self.lower}, upper={self.upper}")
        if self.uncertainty not in UNCERTAINTY_MAPS:
            raise ValueError(f"uncertainty must be one of {UNCERTAINTY_MAPS}, got {self.uncertainty!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")


def negative_prediction_regions(
    prob: np.ndarray, *, lower: float, upper: float, valid: np.ndarray | None = None
) -> tuple[np.ndarray, int]:
    """8-connected components of pixels with ``lower <= prob < upper`` (inside ``valid``).

    Returns the int32 label image (0 = not in an NPR) and the number of NPRs.

    Diagonal neighbours join (connectivity 2); ``lower`` is inclusive, ``upper`` exclusive:

    >>> p = np.array([[0.3, 0, 0, 0], [0, 0.25, 0, 0.4], [0, 0, 0, 0.45], [0.2, 0, 0, 0.5]])
    >>> labels, n = negative_prediction_regions(p, lower=0.25, upper=0.5)
    >>> n, labels.tolist()
    (2, [[1, 0, 0, 0], [0, 1, 0, 2], [0, 0, 0, 2], [0, 0, 0, 0]])
    """
    inside = (prob >= lower) & (prob < upper)
    if valid is not None:
        inside &= valid
    labels, n = sk_label(inside, connectivity=2, return_num=True)
    return labels.astype(np.int32), int(n)


def aggregate(values: np.ndarray, labels: np.ndarray, n: int, *, method: str = "mean") -> np.ndarray:
    """Per-region aggregate (mean or 90th percentile) of ``values`` over each label 1..n.

    >>> labels = np.array([[1, 1, 2], [1, 0, 2]])
    >>> values = np.array([[0.1, 0.2, 0.5], [0.3, 9.0, 0.7]])
    >>> aggregate(values, labels, 2, method="mean").round(3).tolist()
    [0.2, 0.6]
    """
    flat_labels = labels.ravel()
    flat = np.asarray(values, np.float64).ravel()
    if method == "mean":
        counts = np.bincount(flat_labels, minlength=n + 1)[1:]
        sums = np.bincount(flat_labels, weights=flat, minlength=n + 1)[1:]
        return sums / np.maximum(counts, 1)
    if method == "p90":
        in_region = flat_labels > 0
        order = np.lexsort((flat[in_region], flat_labels[in_region]))
        lab, val = flat_labels[in_region][order], flat[in_region][order]
        starts = np.searchsorted(lab, np.arange(1, n + 1))
        ends = np.searchsorted(lab, np.arange(1, n + 1), side="right")
        out = np.zeros(n)
        for k, (s, e) in enumerate(zip(starts, ends, strict=True)):
            if e > s:
                out[k] = np.percentile(val[s:e], 90)
        return out
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {method!r}")


def region_scores(maps: UncertaintyMaps, params: SuaParams, *, valid: np.ndarray | None = None):
    """NPR labels, their count and their SUA scores (aggregated uncertainty)."""
    covered = np.asarray(maps.covered) if valid is None else np.asarray(maps.covered) & valid
    labels, n = negative_prediction_regions(
        np.asarray(maps.prob), lower=params.lower, upper=params.upper, valid=covered
    )
    scores = aggregate(np.asarray(getattr(maps, params.uncertainty)), labels, n, method=params.aggregation)
    return labels, n, scores


def find_candidates(
    maps: UncertaintyMaps, params: SuaParams, *, valid: np.ndarray | None = None
) -> tuple[tuple[RegionStats, ...], np.ndarray]:
    """SUA false-negative candidates, highest score first, and the bool mask of their pixels.

    Candidates smaller than ``params.min_area_um2`` are left out.
    """
    labels, n, scores = region_scores(maps, params, valid=valid)
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    min_px = params.min_area_um2 / maps.mpp**2
    flagged = np.flatnonzero((scores > params.threshold) & (counts >= min_px)) + 1
    mask = np.isin(labels, flagged)
    means = label_means(maps, labels, n)
    candidates = []
    for k in flagged[np.argsort(-scores[flagged - 1], kind="stable")]:
        rows, cols = np.nonzero(labels == k)
        r0, c0 = rows.min(), cols.min()
        crop = labels[r0 : rows.max() + 1, c0 : cols.max() + 1] == k
        origin = (maps.origin_xy[0] + c0 * maps.downsample, maps.origin_xy[1] + r0 * maps.downsample)
        polys, _ = mask_to_polygons(crop, downsample=maps.downsample, origin_xy=origin, simplify_px=0.5)
        candidates.append(region_from(unary_union(polys), means, int(k), maps, sua_score=float(scores[k - 1])))
    return tuple(candidates), mask


def pixel_baseline(
    maps: UncertaintyMaps,
    *,
    lower: float,
    upper: float,
    threshold: float,
    uncertainty: str,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """The paper's baseline: flag NPR pixels whose own uncertainty exceeds ``threshold`` (bool mask)."""
    prob = np.asarray(maps.prob)
    mask = (prob >= lower) & (prob < upper) & np.asarray(maps.covered)
    if valid is not None:
        mask &= valid
    return mask & (np.asarray(getattr(maps, uncertainty)) > threshold)


def fbeta(tp: float, fp: float, fn: float, *, beta: float = 0.5) -> float:
    """F-beta from counts; 0 when nothing is right.

    >>> round(fbeta(2, 1, 1, beta=0.5), 4)
    0.6667
    """
    b2 = beta * beta
    denom = (1 + b2) * tp + b2 * fn + fp
    return float((1 + b2) * tp / denom) if denom > 0 else 0.0


def npr_is_false_negative(labels: np.ndarray, n: int, truth: np.ndarray, *, min_fraction: float = 0.9) -> np.ndarray:
    """bool (n,): an NPR is a false negative when at least ``min_fraction`` of its pixels are truly positive."""
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    positive = np.bincount(labels.ravel(), weights=truth.ravel().astype(np.float64), minlength=n + 1)[1:]
    return positive >= min_fraction * np.maximum(counts, 1)


@dataclass(frozen=True)
class Calibration:
    params: SuaParams
    f05: float
    n_regions: int
    n_false_negative: int
    pixel_threshold: float
    pixel_f05: float
    objective: str = "pixels"


def calibrate(
    slides: Sequence[tuple[UncertaintyMaps, np.ndarray, np.ndarray]],
    *,
    upper: float,
    lowers: Sequence[float] = (0.05, 0.1, 0.2, 0.3),
    uncertainty: str = "predictive_entropy",
    aggregation: str = "mean",
    min_fraction: float = 0.9,
    min_area_um2: float = 200.0,
    objective: str = "pixels",
) -> Calibration:
    """Choose ``lower`` and the SUA threshold maximising F0.5 for "this NPR is a false negative".

    ``slides`` holds (maps, truth bool mask on the maps' grid, valid bool mask) per slide.

    ``objective="pixels"`` (default) scores a flagged NPR by its pixels: its truly positive
    pixels are recovered false negatives, the rest false alarms, and every false-negative pixel
    of the slides counts towards recall. This is the unit in which SUA is compared with the
    pixel baseline, and a large missed nest outweighs a speck. ``"regions"`` counts every NPR
    once, as a false negative when at least ``min_fraction`` of its pixels are truly positive.

    The pixel baseline's threshold is chosen on pixel-level F0.5 the same way, so both methods
    are compared at their best. Ties keep the first ``lower``.
    """
    if objective not in CALIBRATION_OBJECTIVES:
        raise ValueError(f"objective must be one of {CALIBRATION_OBJECTIVES}, got {objective!r}")
    best: tuple[float, float, float] | None = None
    best_stats = (0, 0)
    total_fn_px = sum(int((truth & (np.asarray(maps.prob) < upper) & valid).sum()) for maps, truth, valid in slides)
    for lower in lowers:
        if lower >= upper:
            continue
        params = SuaParams(
            lower=lower, upper=upper, uncertainty=uncertainty, aggregation=aggregation, min_area_um2=min_area_um2
        )
        all_scores, all_fn, all_area, all_pos = [], [], [], []
        for maps, truth, valid in slides:
            labels, n, scores = region_scores(maps, params, valid=valid)
            counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
            positive = np.bincount(labels.ravel(), weights=truth.ravel().astype(np.float64), minlength=n + 1)[1:]
            big = counts >= min_area_um2 / maps.mpp**2
            all_scores.append(scores[big])
            all_fn.append(npr_is_false_negative(labels, n, truth, min_fraction=min_fraction)[big])
            all_area.append(counts[big])
            all_pos.append(positive[big])
        scores = np.concatenate(all_scores)
        is_fn = np.concatenate(all_fn)
        if objective == "pixels":
            threshold, f = _best_threshold(
                scores, np.concatenate(all_pos), flag_weights=np.concatenate(all_area), total_positive=total_fn_px
            )
        else:
            threshold, f = _best_threshold(scores, is_fn.astype(np.float64))
        if best is None or f > best[2]:
            best = (lower, threshold, f)
            best_stats = (len(scores), int(is_fn.sum()))
    if best is None:
        raise ValueError(f"no lower bound below upper={upper} among {list(lowers)}")
    lower, threshold, f = best
    pix_thr, pix_f = calibrate_pixel_baseline(slides, lower=lower, upper=upper, uncertainty=uncertainty)
    return Calibration(
        SuaParams(
            lower=lower,
            upper=upper,
            threshold=threshold,
            uncertainty=uncertainty,
            aggregation=aggregation,
            min_area_um2=min_area_um2,
        ),
        f,
        best_stats[0],
        best_stats[1],
        pix_thr,
        pix_f,
        objective,
    )


def _best_threshold(
    scores: np.ndarray,
    hits: np.ndarray,
    *,
    candidates: np.ndarray | None = None,
    total_positive: float | None = None,
    flag_weights: np.ndarray | None = None,
) -> tuple[float, float]:
    """Threshold t (flag = score > t) maximising F0.5.

    Flagging item i finds ``hits[i]`` positives (1/0 for a yes/no item, a pixel count for a
    region) at the cost of ``flag_weights[i]`` flagged units (default 1), so the false alarms are
    ``flag_weights[i] - hits[i]``. ``total_positive`` (default: the sum of ``hits``) counts
    positives the scores never reach, which stay missed. ``candidates`` default to the midpoints
    of the sorted scores.
    """
    if len(scores) == 0:
        return float("inf"), 0.0
    fallback = float("inf")  # flags nothing when no threshold finds a positive
    if candidates is None:
        values = np.unique(scores)
        candidates = np.concatenate([[values[0] - 1e-9], (values[:-1] + values[1:]) / 2, [values[-1]]])
        fallback = float(candidates[-1])  # the highest score: flags nothing, and stays finite in the manifest
    hits = np.asarray(hits, np.float64)
    cost = np.ones(len(scores)) if flag_weights is None else np.asarray(flag_weights, np.float64)
    total = float(hits.sum()) if total_positive is None else float(total_positive)
    best_t, best_f = fallback, 0.0
    for t in candidates:
        flag = scores > t
        tp = float(hits[flag].sum())
        f = fbeta(tp, float(cost[flag].sum()) - tp, total - tp)
        if f > best_f:
            best_t, best_f = float(t), f
    return best_t, best_f


def calibrate_pixel_baseline(slides, *, lower: float, upper: float, uncertainty: str) -> tuple[float, float]:
    """Pixel threshold maximising pixel-level F0.5 of the baseline (at most 64 quantile candidates)."""
    values, fn_px = [], []
    for maps, truth, valid in slides:
        prob = np.asarray(maps.prob)
        m = (prob >= lower) & (prob < upper) & np.asarray(maps.covered) & valid
        values.append(np.asarray(getattr(maps, uncertainty))[m])
        fn_px.append(truth[m])
    v = np.concatenate(values)
    if len(v) == 0:
        return float("inf"), 0.0
    total_fn = sum(int((truth & (np.asarray(maps.prob) < upper) & valid).sum()) for maps, truth, valid in slides)
    candidates = np.unique(np.quantile(v, np.linspace(0, 1, 65)[:-1]))
    return _best_threshold(v, np.concatenate(fn_px), candidates=candidates, total_positive=total_fn)


@dataclass(frozen=True)
class ConversionScores:
    """How well a set of converted (flagged) pixels recovers the false-negative pixels."""

    converted_px: int
    true_positive_px: int
    false_negative_px: int

    @property
    def fncr(self) -> float:
        """Fraction of converted pixels that were truly positive."""
        return self.true_positive_px / self.converted_px if self.converted_px else float("nan")

    @property
    def recall(self) -> float:
        return self.true_positive_px / self.false_negative_px if self.false_negative_px else float("nan")

    @property
    def f05(self) -> float:
        tp = self.true_positive_px
        return fbeta(tp, self.converted_px - tp, self.false_negative_px - tp)


def conversion_scores(converted: np.ndarray, truth: np.ndarray, predicted_negative: np.ndarray) -> ConversionScores:
    """Score converted pixels against the false negatives (truly positive, predicted negative)."""
    fn = truth & predicted_negative
    return ConversionScores(int(converted.sum()), int((converted & truth).sum()), int(fn.sum()))
