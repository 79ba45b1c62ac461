"""Pseudo-labels: an ensemble's confident pixels on unlabelled slides as extra, down-weighted targets.

The semi-supervised step of USSLNet, with the product's own ensemble as the teacher: it runs on a slide
nobody labelled (the sliding window of :mod:`inference.analysis.segment`, mean softmax and mutual
information); inside tissue, a pixel whose mean positive probability is at least ``1 - margin`` becomes a
positive target, one at most ``margin`` a negative target, provided the members agree there (mutual
information below ``mi_limit``); every other pixel is :data:`~inference.training.labels.IGNORE_LABEL`.
Training weighs these targets by ``weight`` (below the labels' 1).

:func:`pseudo_label_target` is the rule on arrays; :func:`pseudo_label_slides` runs the teacher on slides
and puts the targets on the grid a segmentation trainer reads the slide at. This module imports no torch
at import time (its results cross into ``bridge``, which prints their counts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from inference.advice import SettingWords, library_setting
from inference.analysis.regions import resample_nearest
from inference.training.labels import IGNORE_LABEL

if TYPE_CHECKING:
    from inference.slides.slide import MppAdvice


@dataclass(frozen=True)
class PseudoLabelRule:
    """Which pixels of the teacher's maps become targets, and how much they count.

    ``margin``: a pixel is positive where the mean probability is ``>= 1 - margin`` and negative where it
    is ``<= margin``; ``mi_limit``: and only where the mutual information (nats) is below it; ``weight``:
    the loss weight of a pseudo-labelled pixel (a labelled pixel weighs 1).
    """

    margin: float = 0.1
    mi_limit: float = 0.05
    weight: float = 0.3

    def __post_init__(self) -> None:
        if not 0 < self.margin < 0.5:
            raise ValueError(f"the pseudo-label margin must lie in (0, 0.5), got {self.margin}")
        if not self.mi_limit > 0:
            raise ValueError(f"the pseudo-label mutual information limit must be positive, got {self.mi_limit}")
        if not 0 < self.weight <= 1:
            raise ValueError(f"the pseudo-label weight must lie in (0, 1], got {self.weight}")


@dataclass(frozen=True)
class PseudoTarget:
    """A pseudo-label target and what it kept.

    ``target`` is uint8 (H, W): 1 positive, 0 negative, :data:`IGNORE_LABEL` elsewhere. Of the
    ``tissue_px`` eligible pixels, ``positive_px`` and ``negative_px`` became targets; ``uncertain_px``
    had a mean probability between the margins, ``disagreement_px`` one beyond them but mutual
    information at or above the limit (left out both).
    """

    target: np.ndarray
    tissue_px: int
    positive_px: int
    negative_px: int
    uncertain_px: int
    disagreement_px: int

    @property
    def left_out_px(self) -> int:
        """Tissue pixels left out as not confident (by probability or by the members' disagreement)."""
        return self.uncertain_px + self.disagreement_px


def pseudo_label_target(
    prob: np.ndarray,
    mutual_information: np.ndarray,
    *,
    tissue: np.ndarray,
    margin: float,
    mi_limit: float,
) -> PseudoTarget:
    """The confident tissue pixels of an ensemble's maps as a segmentation target.

    Parameters
    ----------
    prob
        float (H, W): the ensemble's mean probability of the positive class.
    mutual_information
        float (H, W): mutual information of the members (nats), on the same grid.
    tissue
        bool (H, W): the pixels that may become targets (tissue the ensemble predicted on).
    margin
        Positive where ``prob >= 1 - margin``, negative where ``prob <= margin``; in (0, 0.5).
    mi_limit
        Only where ``mutual_information < mi_limit``.

    Examples
    --------
    >>> prob = np.array([[0.99, 0.95, 0.5], [0.02, 0.01, 0.99]])
    >>> mi = np.array([[0.0, 0.0, 0.0], [0.0, 0.2, 0.0]])
    >>> tissue = np.array([[True, True, True], [True, True, False]])
    >>> t = pseudo_label_target(prob, mi, tissue=tissue, margin=0.05, mi_limit=0.1)
    >>> t.target.tolist()
    [[1, 1, 255], [0, 255, 255]]
    >>> (t.tissue_px, t.positive_px, t.negative_px, t.uncertain_px, t.disagreement_px, t.left_out_px)
    (5, 2, 1, 1, 1, 2)
    """
    prob = np.asarray(prob)
    mutual_information = np.asarray(mutual_information)
    tissue = np.asarray(tissue, dtype=bool)
    if not (prob.shape == mutual_information.shape == tissue.shape) or prob.ndim != 2:
        raise ValueError(
            "prob, mutual_information and tissue must be 2-D arrays of one shape, got "
            f"{prob.shape}, {mutual_information.shape} and {tissue.shape}"
        )
    if not 0 < margin < 0.5:
        raise ValueError(f"margin must lie in (0, 0.5), got {margin}")
    if not mi_limit > 0:
        raise ValueError(f"mi_limit must be positive, got {mi_limit}")
    if not (np.isfinite(prob[tissue]).all() and np.isfinite(mutual_information[tissue]).all()):
        raise ValueError("prob and mutual_information must be finite in tissue")
    positive = tissue & (prob >= 1 - margin)
    negative = tissue & (prob <= margin)
    agree = mutual_information < mi_limit
    target = np.full(prob.shape, IGNORE_LABEL, np.uint8)
    target[negative & agree] = 0
    target[positive & agree] = 1
    confident = positive | negative
    return PseudoTarget(
        target=target,
        tissue_px=int(tissue.sum()),
        positive_px=int((positive & agree).sum()),
        negative_px=int((negative & agree).sum()),
        uncertain_px=int((tissue & ~confident).sum()),
        disagreement_px=int((confident & ~agree).sum()),
    )


@dataclass(frozen=True)
class UnlabeledSlide:
    """A slide to pseudo-label: its file, and what the caller knows of it (a QuPath entry's calibration
    and image type); ``None``: the file's own µm/px, and the stain told from the colour."""

    path: str
    mpp: float | None = None
    stain: str | None = None
    name: str = ""  # how the user named it (entry ID or image name), for messages

    @property
    def label(self) -> str:
        return self.name or self.path


@dataclass(frozen=True)
class PseudoLabels:
    """One slide's pseudo-label target on the grid a trainer reads it at (``input_mpp``, the whole image
    from (0, 0): :meth:`inference.Slide.whole_at_mpp`), with the counts of :class:`PseudoTarget`
    (pixels of the teacher's maps, at ``counts_mpp``)."""

    slide: UnlabeledSlide
    target: np.ndarray  # uint8 (H, W): 1, 0, IGNORE_LABEL
    input_mpp: float
    counts: PseudoTarget  # its target is the teacher's grid
    counts_mpp: float  # µm/px of the teacher's grid (its input MPP)
    stain: str
    stain_source: str

    def summary(self) -> dict:
        """What the manifest records for this slide."""
        c = self.counts
        return {
            "slide": self.slide.path,
            "name": self.slide.name,
            "stain": self.stain,
            "stain_source": self.stain_source,
            "counts_mpp": self.counts_mpp,
            "tissue_px": c.tissue_px,
            "positive_px": c.positive_px,
            "negative_px": c.negative_px,
            "left_out_uncertain_px": c.uncertain_px,
            "left_out_disagreement_px": c.disagreement_px,
        }


def pseudo_label_slides(
    model_dir: str | Path,
    slides: Sequence[UnlabeledSlide],
    *,
    rule: PseudoLabelRule,
    input_mpp: float,
    device: str = "cpu",
    tissue_mpp: float = 8.0,
    on_progress: Callable[[int, int], None] | None = None,
    mpp_advice: MppAdvice | None = None,
    setting: SettingWords = library_setting,
    leave_out: Callable[[UnlabeledSlide], str] | None = None,
) -> list[PseudoLabels]:
    """Run the segmentation ensemble in ``model_dir`` over the tissue of each slide and keep its confident
    pixels (:func:`pseudo_label_target`), placed on the slide's grid at ``input_mpp``.

    Raises (before any slide is segmented; every slide's error, all in one, :func:`~inference.errors.raise_together`)
    :class:`~inference.errors.SlideNotFoundError`,
    :class:`~inference.errors.SlideFormatError` or :class:`~inference.errors.MissingMppError` for a
    slide that cannot be opened or states no pixel size, :class:`~inference.errors.StainError` for one
    not of the ensemble's stain, :class:`~inference.errors.ResolutionError` for one too coarse. Their advice
    is the caller's user's: ``mpp_advice`` how to give a slide's µm/px (:func:`~inference.slides.slide.open_slide`'s;
    by default an :class:`UnlabeledSlide`'s ``mpp``), ``setting`` how to name ``slides`` (to leave one out), and
    ``leave_out`` how to leave out a slide the caller added otherwise (``pdl1 train seg --pseudo-label-rest``'s
    labelled slides; by default: "leave it out of ``setting('slides')``").
    """
    from inference.analysis.segment import SegmentConfig, segment_slide
    from inference.errors import (
        MissingMppError,
        Pdl1Error,
        SlideFormatError,
        SlideNotFoundError,
        StainError,
        raise_together,
    )
    from inference.models.ensemble import Ensemble
    from inference.slides.slide import open_slide
    from inference.slides.stain_detect import detect_slide_stain
    from inference.slides.tissue import TISSUE_METHOD_OF_STAIN, tissue_mask_for_slide

    ensemble = Ensemble.load(model_dir, task="segmentation", device=device)
    manifest = ensemble.manifest
    reader = f"the pseudo-labelling ensemble {manifest.name!r}"
    checked: list[tuple[UnlabeledSlide, str, str]] = []
    errors: list[Pdl1Error] = []
    for item in slides:  # every slide checked before the first is segmented, all refused ones named together
        leave = leave_out(item) if leave_out is not None else f"leave it out of {setting('slides')}"
        try:
            try:
                slide = open_slide(item.path, mpp=item.mpp, mpp_source="QuPath project", mpp_advice=mpp_advice)
            except (SlideNotFoundError, SlideFormatError) as err:
                raise type(err)(f"unlabelled slide {item.label}: {err}; {leave} or fix the file") from err
            except MissingMppError as err:
                raise MissingMppError(f"unlabelled slide {item.label}: {err}") from err
            with slide:
                slide.require_resolution(manifest.input_mpp, reader=reader)
                slide.require_resolution(input_mpp, reader="segmentation training")
                if item.stain is not None:
                    stain, source = item.stain, "QuPath's image type"
                else:
                    colour = detect_slide_stain(slide, mpp=tissue_mpp)
                    stain, source = colour.stain, f"its colour ({colour.reason})"
            if stain != manifest.stain:
                raise StainError(
                    f"unlabelled slide {item.label} is {stain} ({source}), but {reader} was trained on "
                    f"{manifest.stain} and pseudo-labels only slides of that stain: {leave}; if it is "
                    f"{manifest.stain}, set its image type in QuPath (Image tab: Image type) and give it as a "
                    "project entry"
                )
            checked.append((item, stain, source))
        except Pdl1Error as err:
            errors.append(err)
    raise_together(errors, f"{len(errors)} of {len(slides)} unlabelled slides cannot be pseudo-labelled, so none was:")
    out = []
    for i, (item, stain, source) in enumerate(checked):
        with open_slide(item.path, mpp=item.mpp, mpp_source="QuPath project") as slide:
            tissue = tissue_mask_for_slide(slide, mpp=tissue_mpp, method=TISSUE_METHOD_OF_STAIN[stain])
            # At the ensemble's own resolution (map_downsample 1), over the tissue's tiles.
            maps = segment_slide(slide, ensemble, tissue=tissue, config=SegmentConfig(map_downsample=1))
            width, height = slide.dimensions
            student_ds = input_mpp / slide.mpp.mean
        in_tissue = resample_nearest(
            tissue.mask,
            downsample=tissue.downsample,
            origin_xy=(0.0, 0.0),
            shape_hw=maps.shape,
            out_downsample=maps.downsample,
            out_origin_xy=maps.origin_xy,
            fill=False,
        )
        counts = pseudo_label_target(
            np.asarray(maps.prob),
            np.asarray(maps.mutual_information),
            tissue=in_tissue & np.asarray(maps.covered),
            margin=rule.margin,
            mi_limit=rule.mi_limit,
        )
        shape_hw = (max(1, round(height / student_ds)), max(1, round(width / student_ds)))
        target = resample_nearest(
            counts.target,
            downsample=maps.downsample,
            origin_xy=maps.origin_xy,
            shape_hw=shape_hw,
            out_downsample=student_ds,
            fill=IGNORE_LABEL,
        )
        out.append(PseudoLabels(item, target, input_mpp, counts, maps.mpp, stain, source))
        if on_progress is not None:
            on_progress(i + 1, len(checked))
    return out
