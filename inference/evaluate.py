"""Evaluate models on phantom slides against the truth written beside them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference.ensemble import Ensemble
from inference.metrics import auroc, dice
from inference.nuclei import NucleiConfig, detect_nuclei
from inference.phantom import NUCLEUS_CLASSES, load_truth
from inference.points import DetectionScores, Tps, detection_scores, tumour_proportion_score
from inference.regions import resample_mask
from inference.results import UncertaintyMaps
from inference.segment import SegmentConfig, segment_slide
from inference.slide import open_slide
from inference.tissue import tissue_mask_for_slide


@dataclass(frozen=True)
class SegEvaluation:
    """Pixel-level results of one slide, inside detected tissue."""

    slide: str
    threshold: float
    pixels: int
    truth_positive_fraction: float
    dice_ensemble: float
    dice_members: tuple[float, ...]
    auroc_entropy_error: float
    auroc_mi_error: float
    entropy_wrong_mean: float
    entropy_right_mean: float
    mi_wrong_mean: float
    mi_right_mean: float
    mi_min: float


def seg_truth_on_maps(slide_path: str | Path, maps: UncertaintyMaps) -> np.ndarray:
    """The phantom's positive mask sampled onto the maps' grid (bool)."""
    truth = load_truth(slide_path)
    return resample_mask(
        truth.positive_mask.astype(bool),
        truth.mask_downsample,
        shape_hw=maps.shape,
        origin_xy=maps.origin_xy,
        downsample=maps.downsample,
    )


def evaluate_segmentation_maps(
    maps: UncertaintyMaps, truth: np.ndarray, region: np.ndarray, *, threshold: float, slide: str = ""
) -> SegEvaluation:
    """Dice of the ensemble and of each member, and how well uncertainty finds the errors."""
    if not region.any():
        raise ValueError(f"{slide}: no analysed tissue pixels to evaluate")
    prob = np.asarray(maps.prob)[region]
    t = truth[region]
    pred = prob >= threshold
    wrong = pred != t
    pe = np.asarray(maps.predictive_entropy)[region]
    mi = np.asarray(maps.mutual_information)[region]
    members = (
        () if maps.member_prob is None else tuple(dice(np.asarray(m)[region] >= threshold, t) for m in maps.member_prob)
    )

    def mean(a: np.ndarray) -> float:
        return float(a.mean()) if a.size else float("nan")

    return SegEvaluation(
        slide=slide,
        threshold=threshold,
        pixels=int(region.sum()),
        truth_positive_fraction=float(t.mean()),
        dice_ensemble=dice(pred, t),
        dice_members=members,
        auroc_entropy_error=auroc(pe, wrong),
        auroc_mi_error=auroc(mi, wrong),
        entropy_wrong_mean=mean(pe[wrong]),
        entropy_right_mean=mean(pe[~wrong]),
        mi_wrong_mean=mean(mi[wrong]),
        mi_right_mean=mean(mi[~wrong]),
        mi_min=float(np.asarray(maps.mutual_information)[np.asarray(maps.covered)].min()),
    )


def evaluate_segmentation(
    slide_path: str | Path,
    ensemble: Ensemble,
    *,
    config: SegmentConfig | None = None,
    threshold: float | None = None,
    mpp: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[SegEvaluation, UncertaintyMaps]:
    """Segment a phantom slide's tissue with per-member maps and score it against its truth."""
    config = config or SegmentConfig()
    if not config.member_maps:
        from dataclasses import replace

        config = replace(config, member_maps=True)
    load_truth(slide_path)  # fail early, before inference, when there is no truth
    with open_slide(slide_path, mpp=mpp) as slide:
        tissue = tissue_mask_for_slide(slide)
        maps = segment_slide(slide, ensemble, tissue=tissue, config=config, on_progress=on_progress)
    tissue_on_map = resample_mask(
        tissue.mask, tissue.downsample, shape_hw=maps.shape, origin_xy=maps.origin_xy, downsample=maps.downsample
    )
    thr = threshold if threshold is not None else ensemble.manifest.thresholds.get("segmentation", 0.5)
    truth = seg_truth_on_maps(slide_path, maps)
    result = evaluate_segmentation_maps(
        maps, truth, tissue_on_map & maps.covered, threshold=thr, slide=Path(slide_path).name
    )
    return result, maps


@dataclass(frozen=True)
class NucleiEvaluation:
    """Detection and TPS results of one slide."""

    slide: str
    radius_um: float
    overall: DetectionScores
    per_class: tuple[DetectionScores, ...]
    class_names: tuple[str, ...]
    tps_pred: Tps
    tps_truth: Tps

    @property
    def tps_abs_error(self) -> float | None:
        if self.tps_pred.percent is None or self.tps_truth.percent is None:
            return None
        return abs(self.tps_pred.percent - self.tps_truth.percent)


def evaluate_nuclei(
    slide_path: str | Path,
    ensemble: Ensemble,
    *,
    radius_um: float = 3.0,
    config: NucleiConfig | None = None,
    mpp: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> NucleiEvaluation:
    """Detect nuclei in a phantom slide's tissue and score them against the truth points."""
    truth = load_truth(slide_path)
    with open_slide(slide_path, mpp=mpp) as slide:
        tissue = tissue_mask_for_slide(slide)
        nuclei = detect_nuclei(slide, ensemble, tissue=tissue, config=config, on_progress=on_progress)
        radius_px = radius_um / slide.mpp.mean
    names = nuclei.class_names
    truth_cls = np.array([names.index(NUCLEUS_CLASSES[c]) for c in truth.nuclei_class], np.int64)
    overall, per_class = detection_scores(
        nuclei.xy, nuclei.cls, truth.nuclei_xy, truth_cls, radius=radius_px, n_classes=len(names)
    )
    pos, neg = names.index("Tumor: Positive"), names.index("Tumor: Negative")
    return NucleiEvaluation(
        slide=Path(slide_path).name,
        radius_um=radius_um,
        overall=overall,
        per_class=tuple(per_class),
        class_names=names,
        tps_pred=tumour_proportion_score(nuclei.count(names[pos]), nuclei.count(names[neg])),
        tps_truth=tumour_proportion_score(int((truth_cls == pos).sum()), int((truth_cls == neg).sum())),
    )
