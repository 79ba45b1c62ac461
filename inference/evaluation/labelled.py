"""Scores against a lab's own labels (validation slides held out of training, by slide)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely

from inference.analysis.nuclei import NucleiConfig, detect_nuclei
from inference.analysis.points import detection_scores
from inference.analysis.segment import SegmentConfig, segment_slide
from inference.models.ensemble import Ensemble
from inference.slides.slide import open_slide
from inference.training.labels import IGNORE_LABEL, SlideLabels, region_target


@dataclass(frozen=True)
class LabelledNucleiScore:
    """Detection within ``radius_um`` of a slide's marked nuclei, inside its exhaustively marked regions."""

    slide: str
    n_labelled: int
    n_predicted: int
    n_matched: int
    precision: float
    recall: float
    f1: float


def score_nuclei_on_labels(
    model_dir: str | Path,
    labels: Sequence[SlideLabels],
    *,
    radius_um: float = 3.0,
    config: NucleiConfig | None = None,
    device: str = "cpu",
) -> list[LabelledNucleiScore]:
    """Per slide: the nuclei model's class-agnostic detection F1 against the labels' points.

    Only inside training regions whose nuclei are all marked (``exhaustive``): elsewhere an unmarked
    nucleus says nothing, so a detection there could not be called wrong. Points under ``Ignore*``
    were left out of the labels; predictions there are left out too.
    """
    ensemble = Ensemble.load(model_dir, task="nuclei", device=device)
    out = []
    for lab in labels:
        regions = [r for r, e in zip(lab.training_regions, lab.exhaustive, strict=True) if e]
        if not regions:
            raise ValueError(
                f"{lab.source or lab.slide}: validation needs a training region with every nucleus marked "
                "(its name containing 'all nuclei marked'); this slide has none"
            )
        area = shapely.union_all(regions).difference(lab.ignore)
        with open_slide(lab.slide) as slide:
            nuclei = detect_nuclei(slide, ensemble, roi=area, config=config)
            mpp = slide.mpp.mean
        pred = nuclei.xy  # detect_nuclei keeps only nuclei inside the ROI
        truth = lab.points_xy[shapely.contains_xy(area, lab.points_xy[:, 0], lab.points_xy[:, 1])]
        zeros_p, zeros_t = np.zeros(len(pred), np.int64), np.zeros(len(truth), np.int64)
        s, _ = detection_scores(pred, zeros_p, truth, zeros_t, radius=radius_um / mpp, n_classes=1)
        out.append(LabelledNucleiScore(lab.slide, len(truth), len(pred), s.tp, s.precision, s.recall, s.f1))
    return out


@dataclass(frozen=True)
class LabelledRegionScore:
    """A segmentation ensemble against a slide's region labels, over its labelled map pixels only."""

    slide: str
    labelled_px: int  # map pixels (the ensemble's input MPP) that are labels
    positive_px: int  # of those, labelled positive
    predicted_px: int  # of those, predicted positive (mean probability at the ensemble's threshold)
    dice: float  # NaN when neither labels nor prediction hold a positive pixel


def score_regions_on_labels(
    model_dir: str | Path, labels: Sequence[SlideLabels], *, device: str = "cpu"
) -> list[LabelledRegionScore]:
    """Per slide: Dice of the ensemble's thresholded mean probability against the region labels.

    Only over labelled pixels (inside training regions, drawn areas; not ``Ignore*``): elsewhere a
    prediction can be neither right nor wrong. The ensemble runs only over the labels' bounds.
    """
    ensemble = Ensemble.load(model_dir, task="segmentation", device=device)
    threshold = ensemble.manifest.thresholds.get("segmentation", 0.5)
    out = []
    for lab in labels:
        labelled = shapely.union_all([*lab.training_regions, lab.positive, lab.negative])
        if labelled.is_empty:
            raise ValueError(f"{lab.source or lab.slide}: validation needs region labels; this slide has none")
        with open_slide(lab.slide) as slide:
            # Maps at the ensemble's own resolution (map_downsample 1), the grid it was trained on.
            maps = segment_slide(
                slide, ensemble, roi=shapely.box(*labelled.bounds), config=SegmentConfig(map_downsample=1)
            )
        target = region_target(lab, shape_hw=maps.shape, downsample=maps.downsample, origin_xy=maps.origin_xy)
        known = (target != IGNORE_LABEL) & np.asarray(maps.covered)
        truth = target[known] == 1
        pred = np.asarray(maps.prob)[known] >= threshold
        denom = int(truth.sum() + pred.sum())
        dice = 2 * int((truth & pred).sum()) / denom if denom else float("nan")
        out.append(LabelledRegionScore(lab.slide, int(known.sum()), int(truth.sum()), int(pred.sum()), dice))
    return out
