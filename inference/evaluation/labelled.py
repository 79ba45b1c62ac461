"""Scores against a lab's own labels (validation slides held out of training, by slide)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import shapely

from inference.analysis.nuclei import NucleiConfig, detect_nuclei
from inference.analysis.points import DetectionScores, detection_scores, tumour_proportion_score
from inference.analysis.segment import SegmentConfig, segment_slide
from inference.models.ensemble import Ensemble
from inference.models.manifest import read_manifest
from inference.training.labels import IGNORE_LABEL, SlideLabels, open_labelled_slide, region_target


def _rank(ensemble: float, members: Sequence[float]) -> int:
    """1 + the members scoring above the ensemble; 0 without members or an undefined (NaN) score."""
    if not members or ensemble != ensemble:
        return 0
    return 1 + sum(m > ensemble for m in members)


@dataclass(frozen=True)
class LabelledNucleiScore:
    """Detection within ``radius_um`` of a slide's marked nuclei, inside its exhaustively marked regions, and the
    classes the ensemble gives them."""

    slide: str
    n_labelled: int
    n_predicted: int
    n_matched: int
    precision: float
    recall: float
    f1: float
    f1_members: tuple[float, ...] = ()  # each member alone (its own heatmap peaks), same regions and radius
    # Over the matched nuclei: the share the ensemble gives the marked class (NaN: none matched or no classes).
    class_agreement: float = float("nan")
    # Tumor: Positive over Tumor: Positive and Negative (%), of the marked nuclei and of those found: an IHC
    # slide's TPS as the marks and the model give it, inside the marked regions (None: no tumour cell).
    tps_marked_percent: float | None = None
    tps_found_percent: float | None = None

    @property
    def rank(self) -> int:
        """The ensemble's place among its members by F1 (1: no member better); 0 when not measured."""
        return _rank(self.f1, self.f1_members)


@dataclass(frozen=True)
class LabelledNuclei:
    """One slide's nuclei found inside its exhaustively marked regions, with their peak scores, and its marks.

    Found once at a low peak threshold (``floor``): detection at any higher threshold is the subset scoring
    at least that (the peaks and their suppression do not depend on it), so thresholds can be compared
    without running the model again.
    """

    slide: str
    truth_xy: np.ndarray  # (N, 2) marked nuclei inside the regions, level-0 px
    pred_xy: np.ndarray  # (P, 2) the ensemble's nuclei there
    pred_score: np.ndarray  # (P,) their peak scores
    member_pred: tuple[tuple[np.ndarray, np.ndarray], ...]  # each member alone: (xy, score)
    radius_px: float  # the matching radius in level-0 px
    floor: float
    truth_cls: np.ndarray | None = None  # (N,) the marks' classes, indexing class_names
    pred_cls: np.ndarray | None = None  # (P,) the ensemble's classes
    class_names: tuple[str, ...] = ()


def _tps_percent(cls: np.ndarray, class_names: Sequence[str]) -> float | None:
    """Tumor: Positive over Tumor: Positive and Tumor: Negative, in %; None without either class or tumour cell.

    >>> _tps_percent(np.array([0, 1, 1, 1, 2]), ("Tumor: Positive", "Tumor: Negative", "Other"))
    25.0
    """
    if "Tumor: Positive" not in class_names or "Tumor: Negative" not in class_names:
        return None
    pos = int((cls == class_names.index("Tumor: Positive")).sum())
    neg = int((cls == class_names.index("Tumor: Negative")).sum())
    return tumour_proportion_score(pos, neg).percent  # reported below the 100 cells its category needs too


def labelled_nuclei(
    model_dir: str | Path,
    labels: Sequence[SlideLabels],
    *,
    radius_um: float = 3.0,
    config: NucleiConfig | None = None,
    floor: float = 0.1,
    device: str = "cpu",
    on_progress: Callable[[int, int], None] | None = None,
) -> list[LabelledNuclei]:
    """Per slide: the ensemble's (and each member's) nuclei at peak threshold ``floor`` against the marked points.

    Only inside training regions whose nuclei are all marked (``exhaustive``): elsewhere an unmarked
    nucleus says nothing, so a detection there could not be called wrong. Points under ``Ignore*``
    were left out of the labels; predictions there are left out too. ``on_progress(done, total)`` counts the slides.
    """
    ensemble = Ensemble.load(model_dir, task="nuclei", device=device)
    singles = [ensemble.member(i) for i in range(len(ensemble.members))] if len(ensemble.members) > 1 else []
    low = replace(config or NucleiConfig(), min_score=floor)
    out = []
    if on_progress is not None:
        on_progress(0, len(labels))
    for lab in labels:
        regions = [r for r, e in zip(lab.training_regions, lab.exhaustive, strict=True) if e]
        if not regions:
            raise ValueError(
                f"{lab.source or lab.slide}: validation needs a training region with every nucleus marked "
                "(its name containing 'all nuclei marked'); this slide has none"
            )
        area = shapely.union_all(regions).difference(lab.ignore)
        inside = shapely.contains_xy(area, lab.points_xy[:, 0], lab.points_xy[:, 1])
        truth = lab.points_xy[inside]
        names = tuple(ensemble.manifest.class_names)
        # The marks' classes by name (the labels were read with the model's classes, in its order or another).
        truth_cls = np.array(
            [names.index(lab.class_names[c]) if lab.class_names[c] in names else -1 for c in lab.points_class[inside]],
            np.int64,
        )
        with open_labelled_slide(lab) as slide:
            found = [detect_nuclei(slide, model, roi=area, config=low) for model in (ensemble, *singles)]
            radius_px = radius_um / slide.mpp.mean
        out.append(
            LabelledNuclei(
                lab.slide,
                truth,
                found[0].xy,
                found[0].score,
                tuple((n.xy, n.score) for n in found[1:]),
                radius_px,
                floor,
                truth_cls,
                found[0].cls,
                names,
            )
        )
        if on_progress is not None:
            on_progress(len(out), len(labels))
    return out


def _match(
    xy: np.ndarray,
    score: np.ndarray,
    truth_xy: np.ndarray,
    radius_px: float,
    min_score: float,
    classes: tuple[np.ndarray, np.ndarray, int] | None = None,
) -> tuple[np.ndarray, DetectionScores, list[DetectionScores]]:
    """The classes of the nuclei found at ``min_score`` (all 0 without ``classes``), their detection scores, and
    per class; ``classes``: the found nuclei's and the marks' classes, and how many classes there are."""
    keep = score >= min_score
    pred = xy[keep]
    pred_cls, truth_cls, n_classes = classes or (np.zeros(len(xy), np.int64), np.zeros(len(truth_xy), np.int64), 1)
    found_cls = pred_cls[keep]
    overall, per_class = detection_scores(pred, found_cls, truth_xy, truth_cls, radius=radius_px, n_classes=n_classes)
    return found_cls, overall, per_class


def score_labelled_nuclei(nuclei: Sequence[LabelledNuclei], *, min_score: float) -> list[LabelledNucleiScore]:
    """Class-agnostic detection F1 at peak threshold ``min_score``, the ensemble's and each member's, per slide."""
    out = []
    for n in nuclei:
        if min_score < n.floor:
            raise ValueError(f"nuclei were found at peak threshold {n.floor:g} and up; {min_score:g} lies below")
        classed = n.truth_cls is not None and n.pred_cls is not None
        classes = (n.pred_cls, n.truth_cls, len(n.class_names)) if classed else None
        found_cls, s, per_class = _match(n.pred_xy, n.pred_score, n.truth_xy, n.radius_px, min_score, classes)
        members = tuple(_match(xy, sc, n.truth_xy, n.radius_px, min_score)[1].f1 for xy, sc in n.member_pred)
        agreement, tps_marked, tps_found = float("nan"), None, None
        if classed:
            if s.tp:  # a match of the marked class counts for that class (a mark of no model class for none)
                agreement = sum(c.tp for c in per_class) / s.tp
            tps_marked = _tps_percent(n.truth_cls, n.class_names)
            tps_found = _tps_percent(found_cls, n.class_names)
        out.append(
            LabelledNucleiScore(
                n.slide,
                len(n.truth_xy),
                len(found_cls),
                s.tp,
                s.precision,
                s.recall,
                s.f1,
                members,
                agreement,
                tps_marked,
                tps_found,
            )
        )
    return out


def fit_min_score(
    nuclei: Sequence[LabelledNuclei],
    *,
    current: float,
    candidates: Sequence[float] = tuple(np.round(np.arange(0.1, 0.851, 0.05), 3)),
    min_gain: float = 0.005,
) -> ThresholdFit:
    """The nuclei model's peak threshold with the best detection F1 pooled over every slide's marked nuclei.

    Adopted only when it beats ``current`` by at least ``min_gain``; among equal scores the candidate
    nearest ``current`` wins.
    """

    def pooled(t: float) -> float:
        matched = (_match(n.pred_xy, n.pred_score, n.truth_xy, n.radius_px, t)[1] for n in nuclei)
        s = sum(matched, DetectionScores(0, 0, 0))
        return s.f1 if s.tp + s.fp + s.fn else -1.0

    floor = max((n.floor for n in nuclei), default=0.0)
    labelled = sum(len(n.truth_xy) for n in nuclei)
    return _best_threshold(pooled, current, [t for t in candidates if t >= floor], min_gain, labelled, "F1")


def _best_threshold(score, current: float, candidates, min_gain: float, labelled: int, metric: str) -> ThresholdFit:
    """The candidate with the best ``score(t)`` (ties: the nearest ``current``), adopted if it gains ``min_gain``."""
    before = score(current)
    best, _, t_best = max((score(t), -abs(t - current), t) for t in candidates)
    adopted = best >= before + min_gain
    return ThresholdFit(
        before=current,
        after=float(t_best) if adopted else current,
        score_before=before,
        score_after=best if adopted else before,
        labelled=labelled,
        adopted=adopted,
        metric=metric,
    )


def score_nuclei_on_labels(
    model_dir: str | Path,
    labels: Sequence[SlideLabels],
    *,
    radius_um: float = 3.0,
    config: NucleiConfig | None = None,
    device: str = "cpu",
) -> list[LabelledNucleiScore]:
    """Per slide: the nuclei model's class-agnostic detection F1 against the labels' points, the ensemble's
    and each member's (``f1_members``), at the config's peak threshold or else the model's.

    See :func:`labelled_nuclei` for where it is scored.
    """
    min_score = (config or NucleiConfig()).min_score_for(read_manifest(model_dir, task="nuclei", verify=False))
    found = labelled_nuclei(
        model_dir, labels, radius_um=radius_um, config=config, floor=min(min_score, 0.1), device=device
    )
    return score_labelled_nuclei(found, min_score=min_score)


@dataclass(frozen=True)
class LabelledRegionScore:
    """A segmentation ensemble against a slide's region labels, over its labelled map pixels only."""

    slide: str
    labelled_px: int  # map pixels (the ensemble's input MPP) that are labels
    positive_px: int  # of those, labelled positive
    predicted_px: int  # of those, predicted positive (mean probability at the threshold)
    dice: float  # NaN when neither labels nor prediction hold a positive pixel
    dice_members: tuple[float, ...] = ()  # each member's own map at the same threshold
    threshold: float = 0.5

    @property
    def rank(self) -> int:
        """The ensemble's place among its members by Dice (1: no member better); 0 when not measured."""
        return _rank(self.dice, self.dice_members)


@dataclass(frozen=True)
class LabelledPixels:
    """One slide's labelled map pixels: the label, the ensemble's mean probability and each member's."""

    slide: str
    truth: np.ndarray  # bool (N,): labelled positive
    prob: np.ndarray  # float32 (N,)
    member_prob: np.ndarray  # float32 (M, N)


@dataclass(frozen=True)
class ThresholdFit:
    """A threshold chosen on labelled validation slides: the segmentation's on its mean probability (pooled
    Dice over the labelled pixels) or the nuclei model's peak threshold (pooled F1 over the marked nuclei)."""

    before: float
    after: float
    score_before: float  # the pooled metric at ``before`` ...
    score_after: float  # ... and at ``after``
    labelled: int  # labelled pixels, or marked nuclei
    adopted: bool  # False: the gain was under ``min_gain``, so the threshold stays
    metric: str = "Dice"


def labelled_region_pixels(
    model_dir: str | Path,
    labels: Sequence[SlideLabels],
    *,
    device: str = "cpu",
    on_progress: Callable[[int, int], None] | None = None,
) -> list[LabelledPixels]:
    """Per slide: the ensemble's mean and per-member probabilities on the region labels' pixels.

    Only labelled pixels (inside training regions, drawn areas; not ``Ignore*``) that a tile
    covered: elsewhere a prediction can be neither right nor wrong. The ensemble runs only over the
    labels' bounds, at its own resolution (the grid it was trained on). ``on_progress(done, total)`` counts the
    slides.
    """
    ensemble = Ensemble.load(model_dir, task="segmentation", device=device)
    out = []
    if on_progress is not None:
        on_progress(0, len(labels))
    for lab in labels:
        labelled = shapely.union_all([*lab.training_regions, lab.positive, lab.negative])
        if labelled.is_empty:
            raise ValueError(f"{lab.source or lab.slide}: validation needs region labels; this slide has none")
        with open_labelled_slide(lab) as slide:
            maps = segment_slide(
                slide,
                ensemble,
                roi=shapely.box(*labelled.bounds),
                config=SegmentConfig(map_downsample=1, member_maps=True),
            )
        target = region_target(lab, shape_hw=maps.shape, downsample=maps.downsample, origin_xy=maps.origin_xy)
        known = (target != IGNORE_LABEL) & np.asarray(maps.covered)
        members = [] if maps.member_prob is None else list(maps.member_prob)
        member_prob = [np.asarray(m)[known].astype(np.float32) for m in members]
        out.append(
            LabelledPixels(
                lab.slide,
                target[known] == 1,
                np.asarray(maps.prob)[known].astype(np.float32),
                np.stack(member_prob) if member_prob else np.zeros((0, int(known.sum())), np.float32),
            )
        )
        if on_progress is not None:
            on_progress(len(out), len(labels))
    return out


def _dice(truth: np.ndarray, pred: np.ndarray) -> float:
    denom = int(truth.sum() + pred.sum())
    return 2 * int((truth & pred).sum()) / denom if denom else float("nan")


def score_labelled_pixels(pixels: Sequence[LabelledPixels], *, threshold: float) -> list[LabelledRegionScore]:
    """Dice of the thresholded mean probability, and of each member's (none for a one-member model), per slide.

    >>> px = LabelledPixels("s", np.array([True, True, False]), np.array([0.9, 0.4, 0.2]),
    ...                     np.array([[0.9, 0.6, 0.1], [0.8, 0.2, 0.3]]))
    >>> s, = score_labelled_pixels([px], threshold=0.5)
    >>> round(s.dice, 3), tuple(round(d, 3) for d in s.dice_members), s.rank
    (0.667, (1.0, 0.667), 2)
    """
    out = []
    for px in pixels:
        pred = px.prob >= threshold
        out.append(
            LabelledRegionScore(
                px.slide,
                int(px.truth.size),
                int(px.truth.sum()),
                int(pred.sum()),
                _dice(px.truth, pred),
                # One member is the ensemble itself: nothing to set beside it (empty, rank 0), as for nuclei.
                tuple(_dice(px.truth, m >= threshold) for m in px.member_prob) if len(px.member_prob) > 1 else (),
                threshold,
            )
        )
    return out


def fit_threshold(
    pixels: Sequence[LabelledPixels],
    *,
    current: float,
    candidates: Sequence[float] = tuple(np.round(np.arange(0.05, 0.951, 0.025), 3)),
    min_gain: float = 0.005,
) -> ThresholdFit:
    """The threshold on the mean probability with the best Dice pooled over every slide's labelled pixels.

    Adopted only when it beats ``current`` by at least ``min_gain``: a few validation slides should not
    move a threshold for noise. Pooled, so a slide with more labelled pixels weighs more; among equal
    scores the candidate nearest ``current`` wins.

    >>> px = LabelledPixels("s", np.array([True, True, False, False]), np.array([0.45, 0.42, 0.1, 0.3]),
    ...                     np.zeros((0, 4), np.float32))
    >>> f = fit_threshold([px], current=0.5)
    >>> f.adopted, f.after, round(f.score_before, 2), f.score_after
    (True, 0.4, 0.0, 1.0)
    """
    truth = np.concatenate([p.truth for p in pixels]) if pixels else np.zeros(0, bool)
    prob = np.concatenate([p.prob for p in pixels]) if pixels else np.zeros(0, np.float32)

    def pooled(t: float) -> float:
        d = _dice(truth, prob >= t)
        return -1.0 if d != d else d

    return _best_threshold(pooled, current, candidates, min_gain, int(truth.size), "Dice")


def score_regions_on_labels(
    model_dir: str | Path, labels: Sequence[SlideLabels], *, device: str = "cpu"
) -> list[LabelledRegionScore]:
    """Per slide: Dice of the ensemble's thresholded mean probability (and each member's) against the labels.

    Only over labelled pixels, see :func:`labelled_region_pixels`; at the manifest's threshold.
    """
    threshold = read_manifest(model_dir, task="segmentation", verify=False).thresholds.get("segmentation", 0.5)
    return score_labelled_pixels(labelled_region_pixels(model_dir, labels, device=device), threshold=threshold)
