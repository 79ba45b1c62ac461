"""Evaluate models on phantom slides against the truth written beside them."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from inference.analysis.domain import feature_score, slide_stain, stain_distance_deg, stats_of_manifest
from inference.analysis.ihc import IMMUNE_POSITIVE, combined_positive_score
from inference.analysis.nuclei import NucleiConfig, detect_nuclei, pdl1_from_maps
from inference.analysis.points import (
    DetectionScores,
    detection_scores,
    match_points,
    tps_category,
    tps_member_disagreement,
    tumour_proportion_score,
)
from inference.analysis.regions import mask_on_maps, positive_off_tumour_pct, unsettled_positive_area_pct
from inference.analysis.registration import register_slides
from inference.analysis.segment import SegmentConfig, segment_slide
from inference.analysis.sua import (
    Calibration,
    ConversionScores,
    SuaParams,
    calibrate,
    conversion_scores,
    find_candidates,
    npr_is_false_negative,
    pixel_baseline,
    region_scores,
)
from inference.errors import (
    Pdl1Error,
    SlideNotFoundError,
    StainError,
    TruthFormatError,
    TruthNotFoundError,
    raise_together,
)
from inference.evaluation.metrics import auprc, auroc, brier, dice, ece, fbeta_score, iou
from inference.evaluation.review import (
    FLAG_AT_OR_BELOW,
    TARGET_CATCH,
    TARGET_FALSE_ALARM,
    ReviewFit,
    fit_review_limits,
    scores_at_limit,
    slide_review_scores,
)
from inference.models.ensemble import Ensemble
from inference.models.features import capture_tile_features
from inference.models.manifest import Manifest
from inference.phantom.ihc import ihc_to_he_points
from inference.phantom.truth import PhantomTruthData, load_truth, require_summary
from inference.phantom.truth_tissue import truth_tissue_mask
from inference.pipeline import PipelineConfig, review_rule_for, sua_params_for
from inference.results import Cps, Nuclei, Tps, UncertaintyMaps
from inference.slides.slide import MppAdvice, header_mpp, open_slide, require_resolution
from inference.slides.stain_detect import detect_slide_stain
from inference.slides.tissue import TISSUE_METHOD_OF_STAIN, TissueMask, tissue_mask_for_slide


@dataclass(frozen=True)
class SegEvaluation:
    """Pixel-level results of one slide, over the truth's tissue.

    Scored over the tissue the truth holds, not the tissue the product found: tissue the product's
    detector dropped was never analysed, and counts as predicted negative with zero uncertainty
    (``tissue_recall`` says how much of the truth's tissue was analysed, ``tissue_precision`` how
    much of the analysed area was tissue).
    """

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
    # Two baselines any uncertainty must beat to be worth its compute (as the ValUES framework asks): how
    # well errors are found by the mean probability's closeness to the threshold (no ensemble needed), and
    # by the distance to the predicted boundary (no model output at all: errors sit on edges).
    auroc_prob_margin_error: float
    auroc_boundary_distance_error: float
    # (2 |pred & truth|, |pred| + |truth|) of the ensemble and of each member, for pooled Dice.
    dice_terms_ensemble: tuple[int, int]
    dice_terms_members: tuple[tuple[int, int], ...]
    tissue_recall: float = float("nan")
    tissue_precision: float = float("nan")


def _dice_terms(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    return int(2 * np.count_nonzero(pred & truth)), int(np.count_nonzero(pred) + np.count_nonzero(truth))


def pooled_dice(evaluations: list[SegEvaluation]) -> tuple[float, tuple[float, ...]]:
    """Dice of the ensemble and of each member over the tissue pixels of all slides together.

    Each slide weighs by its pixels, as if the slides were one image; the mean of per-slide
    Dice instead weighs every slide the same.
    """

    def ratio(terms: list[tuple[int, int]]) -> float:
        num, den = sum(t[0] for t in terms), sum(t[1] for t in terms)
        return 1.0 if den == 0 else num / den

    n_members = min(len(e.dice_terms_members) for e in evaluations)
    members = tuple(ratio([e.dice_terms_members[i] for e in evaluations]) for i in range(n_members))
    return ratio([e.dice_terms_ensemble for e in evaluations]), members


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
    member_preds = [] if maps.member_prob is None else [np.asarray(m)[region] >= threshold for m in maps.member_prob]
    members = tuple(dice(mp, t) for mp in member_preds)

    def mean(a: np.ndarray) -> float:
        return float(a.mean()) if a.size else float("nan")

    full = np.asarray(maps.prob) >= threshold
    # px to the nearest pixel of the other side of the predicted boundary, on the whole grid.
    boundary_px = np.where(full, ndi.distance_transform_edt(full), ndi.distance_transform_edt(~full))[region]
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
        auroc_prob_margin_error=auroc(-np.abs(prob - threshold), wrong),
        auroc_boundary_distance_error=auroc(-boundary_px, wrong),
        dice_terms_ensemble=_dice_terms(pred, t),
        dice_terms_members=tuple(_dice_terms(mp, t) for mp in member_preds),
    )


def truth_stain(truth: PhantomTruthData) -> str:
    """The stain of the phantom a truth belongs to (``truth.json``'s ``stain``; older truth is H&E's)."""
    return str(truth.summary.get("stain", "H&E"))


def check_truth_stain(slide_path: str | Path, truth: PhantomTruthData, manifest: Manifest, role: str) -> None:
    """Refuse to score a model of one stain against a phantom of another: it runs, and scores nonsense silently."""
    stain = truth_stain(truth)
    if manifest.stain != stain:
        if role == "PD-L1 IHC nuclei":  # a role of one stain: "give one trained on H&E" advised what cannot be
            advice = f"give {manifest.stain} phantoms (`pdl1 phantom --ihc` writes PD-L1 IHC ones)"
        else:
            advice = f"score that model on {manifest.stain} phantoms, or give a {role} model trained on {stain}"
        raise StainError(
            f"{slide_path}: the phantom is {stain} (its truth.json's stain), but the {role} model "
            f"{manifest.name!r} was trained on {manifest.stain}: {advice}"
        )


def check_truths(
    slides: Sequence[str | Path],
    models_by_stain: Mapping[str, Sequence[tuple[str, Manifest]]],
    *,
    needs: Sequence[str] = (),
    mpp_advice: MppAdvice | None = None,
) -> list[PhantomTruthData]:
    """Load every slide's truth and check its stain against the models that will score it, and the slide's pixel
    size, before any model runs.

    ``models_by_stain`` maps each phantom stain the evaluation takes to the (role, manifest) of the models that
    score those slides; ``needs``, the truth.json fields the evaluation reads (keys of
    :data:`inference.phantom.truth.SUMMARY_FIELDS`). A bad slide (no truth, damaged truth, another stain, a
    file that states no plausible pixel size: its header alone is read, :func:`~inference.slides.slide.header_mpp`,
    whose message ends with ``mpp_advice``, or one too coarse for a model that scores it, "the <role> model" as
    ``pdl1 run`` names it: :func:`~inference.slides.slide.require_resolution`) does not end a batch half-way: all
    are named in one error (of their common class, else :class:`Pdl1Error`), so they can be fixed together.
    """
    truths, errors = [], []
    for slide in slides:
        try:
            truth = load_truth(slide)
            require_summary(slide, truth, needs)
            stain = truth_stain(truth)
            if stain not in models_by_stain:
                for role, manifest in (m for models in models_by_stain.values() for m in models):
                    check_truth_stain(slide, truth, manifest, role)  # a model of another stain: says which
                raise StainError(
                    f"{slide}: the phantom is {stain} (its truth.json's stain), but this evaluation takes "
                    f"{' or '.join(models_by_stain)} phantoms; give those (`pdl1 phantom --ihc` writes PD-L1 IHC ones)"
                )
            for role, manifest in models_by_stain[stain]:
                check_truth_stain(slide, truth, manifest, role)
            # Found when the slide's turn came, after minutes of work on those before it.
            stated = header_mpp(slide, mpp_advice=mpp_advice)
            _check_truth_mpp(slide, truth, stated.mean)
            # Else scored enlarged, or refused when its turn came; the finest-reading model first, so the message
            # names the largest enlargement (the segmentation's 2.25x came before the nuclei model's 4.5x).
            for role, manifest in sorted(models_by_stain[stain], key=lambda rm: rm[1].input_mpp):
                reader = f"the {role} model"  # pdl1 run's words
                require_resolution(stated, manifest.input_mpp, reader=reader, path=slide, mpp_advice=mpp_advice)
            truths.append(truth)
        except Pdl1Error as err:
            errors.append(err)
    raise_together(errors, f"{len(errors)} of {len(slides)} slides cannot be evaluated, so none was:")
    return truths


def _check_truth_mpp(slide: str | Path, truth: PhantomTruthData, mpp_um: float) -> None:
    """The pixel size ``slide`` states is the one its phantom was written at (truth.json's spec): a header edited or
    a truth mixed up was scored at another scale, or failed on a grid error that named neither ("the model's tile
    size 256 is not a multiple of map_downsample 36" for a phantom of 0.5 µm/px stating 9)."""
    spec = truth.summary.get("spec")
    written = spec.get("mpp") if isinstance(spec, dict) else None
    if not isinstance(written, int | float) or isinstance(written, bool) or not written > 0:
        return  # an older truth states none: nothing to compare
    if abs(mpp_um - written) > 0.01 * written:
        raise TruthFormatError(
            f"{slide}: its file states {mpp_um:g} µm/px, but its truth.json describes a phantom written at "
            f"{written:g} µm/px, so its truth would be scored at another scale; write the phantom again with "
            "`pdl1 phantom ... --overwrite` (its file then states the --mpp it is written at)"
        )


def truth_map_downsample(truth_mpp: float, input_mpp: float) -> int:
    """Model px per map px for scoring against a truth of ``truth_mpp`` µm/px.

    The truth's own grid when a truth pixel is a whole number of model pixels, otherwise the
    coarsest grid finer than the truth's (the model's own when the truth is finer than the model).

    Scoring coarser maps samples one truth pixel out of several, off the map pixel's centre (an
    8 µm map over a 4 µm truth reads the truth 2 µm right of and below each centre), which
    moves every boundary by a fraction of a pixel and makes Dice depend on the grid.
    """
    return max(1, int(truth_mpp / input_mpp + 1e-6))


def evaluate_segmentation(
    slide_path: str | Path,
    ensemble: Ensemble,
    *,
    config: SegmentConfig | None = None,
    threshold: float | None = None,
    mpp: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    mpp_advice: MppAdvice | None = None,
) -> tuple[SegEvaluation, UncertaintyMaps]:
    """Segment a phantom slide's tissue with per-member maps and score it against its truth.

    Without a ``config`` the maps are made on the truth's own grid (:func:`truth_map_downsample`),
    so every map pixel is scored against the one truth pixel it covers. ``mpp_advice``: how the caller's user
    gives the slide a pixel size, for the messages of one it has none for (:func:`~inference.open_slide`'s).
    """
    scored = _segment_against_truth(
        slide_path,
        ensemble,
        config=config,
        threshold=threshold,
        mpp=mpp,
        on_progress=on_progress,
        mpp_advice=mpp_advice,
    )
    return scored.seg, scored.maps


@dataclass(frozen=True)
class _ScoredSlide:
    """One phantom slide segmented and scored, with what the suite and calibration reuse."""

    seg: SegEvaluation
    maps: UncertaintyMaps
    truth_data: PhantomTruthData
    truth: np.ndarray  # bool, the positive mask on the maps' grid
    region: np.ndarray  # bool, the truth's tissue on the maps' grid: what is scored
    analysed: np.ndarray  # bool, the tissue the product found and analysed, on the maps' grid
    out_of_domain_score: float = float("nan")  # the domain guard's, NaN where the model has no statistics
    stain_distance_deg: float = float("nan")
    out_of_domain: bool = False  # either score at its limit: pdl1 run's domain reasons, part of its review flag
    tissue: TissueMask | None = None  # what the product's tissue detection found (the nuclei are sought there)


def _segment_against_truth(
    slide_path: str | Path,
    ensemble: Ensemble,
    *,
    config: SegmentConfig | None,
    threshold: float | None,
    mpp: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    mpp_advice: MppAdvice | None = None,
) -> _ScoredSlide:
    truth_data = load_truth(slide_path)  # fail early, before inference, without truth
    check_truth_stain(slide_path, truth_data, ensemble.manifest, "segmentation")
    with open_slide(slide_path, mpp=mpp, mpp_advice=mpp_advice) as slide:
        if config is None:
            truth_mpp = truth_data.mask_downsample * slide.mpp.mean
            config = SegmentConfig(map_downsample=truth_map_downsample(truth_mpp, ensemble.manifest.input_mpp))
        if not config.member_maps:
            config = replace(config, member_maps=True)
        tissue = tissue_mask_for_slide(slide, method=TISSUE_METHOD_OF_STAIN[ensemble.manifest.stain])
        stats, _ = stats_of_manifest(ensemble.manifest.extra)
        with capture_tile_features(ensemble) if stats is not None else nullcontext() as captured:
            maps = segment_slide(slide, ensemble, tissue=tissue, config=config, on_progress=on_progress)
        ood = stain_deg = math.nan
        if stats is not None:  # the domain guard's two scores, as pdl1 run computes them
            score = feature_score(captured.array(), stats)
            ood = math.nan if score is None else score
            colour = detect_slide_stain(slide)
            deg = stain_distance_deg(slide_stain(colour, slide.thumbnail(mpp=8.0)), stats)
            stain_deg = math.nan if deg is None else deg
    analysed = mask_on_maps(tissue.mask, tissue.downsample, maps) & np.asarray(maps.covered)
    region = mask_on_maps(truth_tissue_mask(truth_data), truth_data.mask_downsample, maps)
    thr = threshold if threshold is not None else ensemble.manifest.thresholds.get("segmentation", 0.5)
    truth = mask_on_maps(truth_data.positive_mask.astype(bool), truth_data.mask_downsample, maps) & region
    seg = evaluate_segmentation_maps(maps, truth, region, threshold=thr, slide=Path(slide_path).name)
    overlap = np.count_nonzero(analysed & region)
    seg = replace(
        seg,
        tissue_recall=overlap / max(np.count_nonzero(region), 1),
        tissue_precision=overlap / max(np.count_nonzero(analysed), 1),
    )
    return _ScoredSlide(
        seg=seg,
        maps=maps,
        truth_data=truth_data,
        truth=truth,
        region=region,
        analysed=analysed,
        out_of_domain_score=ood,
        stain_distance_deg=stain_deg,
        tissue=tissue,
        out_of_domain=stats is not None
        and (
            (stats.feature_limit is not None and ood >= stats.feature_limit)
            or (stats.stain_limit_deg is not None and stain_deg >= stats.stain_limit_deg)
        ),
    )


# An IHC slide whose TPS is off by more than this many points is a failure the review must catch, as is one whose
# TPS falls in the wrong category (#31 asks every slide to be within 5 points).
IHC_FAILED_TPS_ERROR = 5.0


@dataclass(frozen=True)
class NucleiEvaluation:
    """Detection, TPS (and on an IHC slide CPS and intensity) results of one slide.

    ``intensity_agreement`` is the share of matched true positive tumour cells whose grade
    (1+/2+/3+) the prediction gives too; ``nuclei_entropy_mean`` the mean ensemble entropy of the
    detected nuclei (None for a single model).
    """

    slide: str
    radius_um: float
    overall: DetectionScores
    per_class: tuple[DetectionScores, ...]
    class_names: tuple[str, ...]
    tps_pred: Tps
    tps_truth: Tps
    stain: str = "H&E"
    cps_pred: Cps | None = None
    cps_truth: Cps | None = None
    intensity_agreement: float | None = None
    nuclei_entropy_mean: float | None = None

    @property
    def tps_abs_error(self) -> float | None:
        if self.tps_pred.percent is None or self.tps_truth.percent is None:
            return None
        return abs(self.tps_pred.percent - self.tps_truth.percent)

    @property
    def cps_abs_error(self) -> float | None:
        if self.cps_pred is None or self.cps_truth is None or None in (self.cps_pred.percent, self.cps_truth.percent):
            return None
        return abs(self.cps_pred.percent - self.cps_truth.percent)

    @property
    def category_right(self) -> bool:
        return self.tps_pred.category == self.tps_truth.category

    def failed(self, *, max_tps_error: float = IHC_FAILED_TPS_ERROR) -> bool:
        """The slide's TPS is wrong (#32 on the IHC, where the TPS is the result): in another category than the
        truth's, or off by more than ``max_tps_error`` points (#31's bound for every slide)."""
        error = self.tps_abs_error
        return not self.category_right or (error is not None and error > max_tps_error)


def evaluate_nuclei(
    slide_path: str | Path,
    ensemble: Ensemble,
    *,
    radius_um: float = 3.0,
    config: NucleiConfig | None = None,
    mpp: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    mpp_advice: MppAdvice | None = None,
) -> NucleiEvaluation:
    """Detect nuclei in a phantom slide's tissue and score them against the truth points.

    The truth's classes are matched to the model's by name, so a model of the other stain (H&E
    classes against an IHC truth) is refused with both lists. ``mpp_advice`` as :func:`evaluate_segmentation`'s.
    """
    truth = load_truth(slide_path)
    check_truth_stain(slide_path, truth, ensemble.manifest, "nuclei")
    _check_truth_classes(
        slide_path,
        truth,
        tuple(ensemble.manifest.class_names),
        f"the model {ensemble.manifest.name!r} ({ensemble.manifest.stain})",
    )
    nuclei, mpp_um = nuclei_in_tissue(
        slide_path, ensemble, config=config, mpp=mpp, on_progress=on_progress, mpp_advice=mpp_advice
    )
    return score_nuclei_on_truth(slide_path, nuclei, mpp_um=mpp_um, radius_um=radius_um)


def nuclei_in_tissue(
    slide_path: str | Path,
    ensemble: Ensemble,
    *,
    config: NucleiConfig | None = None,
    mpp: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    mpp_advice: MppAdvice | None = None,
) -> tuple[Nuclei, float]:
    """The nuclei ``ensemble`` finds in the tissue the pipeline analyses for its stain, and the slide's µm/px: what
    :func:`evaluate_nuclei` scores (not checked against a truth: a benchmark that changes the calls scores them)."""
    with open_slide(slide_path, mpp=mpp, mpp_advice=mpp_advice) as slide:
        tissue = tissue_mask_for_slide(slide, method=TISSUE_METHOD_OF_STAIN[ensemble.manifest.stain])
        nuclei = detect_nuclei(slide, ensemble, tissue=tissue, config=config, on_progress=on_progress)
        return nuclei, slide.mpp.mean


def _check_truth_classes(slide_path: str | Path, truth: PhantomTruthData, names: tuple[str, ...], what: str) -> None:
    missing = [n for n in truth.class_names if n not in names]
    if missing:
        raise StainError(
            f"{slide_path}: the truth has classes {list(truth.class_names)} but {what} knows {list(names)}: "
            f"evaluate an {truth.summary.get('stain', 'H&E')} slide with a model trained on that stain"
        )


def score_nuclei_on_truth(
    slide_path: str | Path, nuclei: Nuclei, *, mpp_um: float, radius_um: float = 3.0
) -> NucleiEvaluation:
    """Score nuclei already detected on a phantom slide (``detect_nuclei``, or ``SlideResult.nuclei`` of
    ``analyse_slide`` on the whole slide) against its truth points; ``mpp_um`` is the slide's µm/px."""
    truth = load_truth(slide_path)
    names = tuple(nuclei.class_names)
    _check_truth_classes(slide_path, truth, names, "the detections' model")
    radius_px = radius_um / mpp_um
    truth_cls = np.array([names.index(truth.class_names[c]) for c in truth.nuclei_class], np.int64)
    overall, per_class = detection_scores(
        nuclei.xy, nuclei.cls, truth.nuclei_xy, truth_cls, radius=radius_px, n_classes=len(names)
    )
    pos, neg = names.index("Tumor: Positive"), names.index("Tumor: Negative")
    t_pos, t_neg = int((truth_cls == pos).sum()), int((truth_cls == neg).sum())
    cps_pred = cps_truth = agreement = None
    if IMMUNE_POSITIVE in names:
        immune = names.index(IMMUNE_POSITIVE)
        p_pos, p_neg = nuclei.count(names[pos]), nuclei.count(names[neg])
        cps_pred = combined_positive_score(p_pos, nuclei.count(IMMUNE_POSITIVE), p_pos + p_neg)
        cps_truth = combined_positive_score(t_pos, int((truth_cls == immune).sum()), t_pos + t_neg)
        if nuclei.intensity is not None:
            match = match_points(nuclei.xy, truth.nuclei_xy, radius=radius_px)
            both = (truth_cls[match.truth_index] == pos) & (nuclei.cls[match.pred_index] == pos)
            if both.any():
                graded = nuclei.intensity[match.pred_index[both]] == truth.nuclei_intensity[match.truth_index[both]]
                agreement = float(graded.mean())
    return NucleiEvaluation(
        slide=Path(slide_path).name,
        radius_um=radius_um,
        overall=overall,
        per_class=tuple(per_class),
        class_names=names,
        tps_pred=tumour_proportion_score(nuclei.count(names[pos]), nuclei.count(names[neg])),
        tps_truth=tumour_proportion_score(t_pos, t_neg),
        stain=truth.summary.get("stain", "H&E"),
        cps_pred=cps_pred,
        cps_truth=cps_truth,
        intensity_agreement=agreement,
        nuclei_entropy_mean=None if nuclei.entropy is None or not len(nuclei) else float(nuclei.entropy.mean()),
    )


@dataclass(frozen=True)
class RegistrationEvaluation:
    """How far the registration of a phantom IHC onto its H&E lands from the true section transform.

    Errors are measured at the IHC's true cell centres mapped both ways (µm on the H&E).
    """

    he_slide: str
    ihc_slide: str
    error_median_um: float
    error_p90_um: float
    error_max_um: float
    estimated_error_um: float  # the registration's own, truth-free estimate
    angle_deg: float
    ok: bool
    reason: str
    registered_mpp: float  # µm/px registered at: finer than asked for small images (register_slides)


def evaluate_registration(
    ihc_slide_path: str | Path, *, mpp: float = 8.0, mpp_advice: MppAdvice | None = None
) -> RegistrationEvaluation:
    """Register a phantom IHC (``pdl1 phantom --ihc``) onto the H&E it was written with and score it.

    ``mpp`` is the resolution registered at; ``mpp_advice`` how the caller's user gives either slide a pixel size,
    for the messages of one it has none for (:func:`~inference.open_slide`'s).
    """
    ihc_path = Path(ihc_slide_path)
    truth = load_truth(ihc_path)
    partner = truth.summary.get("paired_with")
    if partner is None:
        raise TruthNotFoundError(
            f"{ihc_path}: its truth names no paired H&E; pass an IHC phantom written with its H&E (`pdl1 phantom "
            "--ihc`, or write_ihc_phantom's paired_with)"
        )
    he_path = ihc_path.with_name(partner)
    if not he_path.is_file():
        raise SlideNotFoundError(
            f"{he_path}: the H&E that {ihc_path.name} was written with (its truth's paired_with) is not beside it; "
            "keep the pair in one folder under the names `pdl1 phantom --ihc` gave them, or write them again"
        )
    with (
        open_slide(he_path, mpp_advice=mpp_advice) as he_slide,
        open_slide(ihc_path, mpp_advice=mpp_advice) as ihc_slide,
    ):
        registration = register_slides(he_slide, ihc_slide, mpp=mpp)
        mpp_he = he_slide.mpp.mean
    xy = truth.nuclei_xy
    error_um = np.hypot(*(registration.apply(xy) - ihc_to_he_points(truth.summary, xy)).T) * mpp_he
    return RegistrationEvaluation(
        he_slide=he_path.name,
        ihc_slide=ihc_path.name,
        error_median_um=float(np.median(error_um)),
        error_p90_um=float(np.percentile(error_um, 90)),
        error_max_um=float(error_um.max()),
        estimated_error_um=float(registration.error_um),
        angle_deg=float(registration.angle_deg),
        ok=bool(registration.ok),
        reason=registration.reason,
        registered_mpp=float(registration.registered_mpp),
    )


def _predicted_tps(
    slide_path: str | Path,
    scored: _ScoredSlide,
    nuclei_model: Ensemble,
    *,
    threshold: float,
    mpp_advice: MppAdvice | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[float | None, float, float | None]:
    """The H&E's predicted TPS as ``pdl1 run`` makes it (tumour nuclei of the nuclei model in the product's
    tissue, PD-L1 from the segmentation maps at their position, :func:`pdl1_from_maps`), the share of the
    predicted positive area away from tumour cells (:func:`positive_off_tumour_pct`), and the share of the
    members whose own TPS is in another category (:func:`tps_member_disagreement`; the maps hold each
    member's, :func:`_segment_against_truth`)."""
    check_truth_stain(slide_path, scored.truth_data, nuclei_model.manifest, "nuclei")
    with open_slide(slide_path, mpp_advice=mpp_advice) as slide:
        nuclei = detect_nuclei(slide, nuclei_model, tissue=scored.tissue, on_progress=on_progress)
        mpp = slide.mpp.mean
    nuclei = pdl1_from_maps(nuclei, scored.maps, threshold=threshold)
    tps = tumour_proportion_score(nuclei.count("Tumor: Positive"), nuclei.count("Tumor: Negative")).percent
    positive = (np.asarray(scored.maps.prob) >= threshold) & scored.analysed
    off_tumour = positive_off_tumour_pct(positive, nuclei.tumour_xy(), scored.maps, level0_mpp=mpp)
    return tps, off_tumour, tps_member_disagreement(tps, nuclei.member_tps())


def _truth_tps(scored: _ScoredSlide) -> float:
    """The phantom's realised TPS (its truth's positive / all tumour nuclei)."""
    return float(scored.truth_data.summary["tps_percent"])


# A slide whose predicted positive area is off by more than this share of the true one is a failure the
# review must catch (#32's target: catch >= 90 % of them at <= 20 % false alarms on the others).
FAILED_AREA_ERROR = 0.25
# A true positive area smaller than this share of the truth's tissue is a few cells: the error is taken over this
# floor, so a TPS-0 slide with a speck called positive does not fail by an infinite relative error. (The review's
# unsettled share keeps one map pixel as its floor: measured, that catches weakly positive slides called negative,
# README, "Truly negative slides".)
POSITIVE_AREA_FLOOR_PCT = 1.0


def area_error(predicted: float, true: float, *, floor: float = 0.0) -> float:
    """|predicted - true| / max(true, floor); 0 when both are 0, inf when only the truth is empty and there is no
    floor. ``floor``: :data:`POSITIVE_AREA_FLOOR_PCT` of the truth's tissue, in the
    same unit, so a truth of a few cells (a TPS-0 slide's none) is not failed by a speck called positive.

    >>> area_error(125.0, 100.0), area_error(5.0, 0.0), area_error(5.0, 0.0, floor=100.0)
    (0.25, inf, 0.05)
    """
    if max(true, floor) > 0:
        return abs(predicted - true) / max(true, floor)
    return 0.0 if predicted == 0 else math.inf


def area_error_floor(region: np.ndarray, px_area: float = 1.0) -> float:
    """The floor :func:`area_error` takes: :data:`POSITIVE_AREA_FLOOR_PCT` of the
    truth's tissue (``region``), in ``px_area`` units."""
    return POSITIVE_AREA_FLOOR_PCT / 100 * int(np.count_nonzero(region)) * px_area


@dataclass(frozen=True)
class SlideEvaluation:
    """Everything the evaluation suite measures on one slide, with the arrays its plots need."""

    slide: str
    shift: float
    seg: SegEvaluation
    iou: float
    f1: float
    ece: float
    brier: float
    auprc_entropy_error: float
    mean_entropy: float
    sua: ConversionScores
    baseline: ConversionScores
    npr_scores: np.ndarray  # aggregated uncertainty per NPR
    npr_is_fn: np.ndarray  # truth label per NPR
    candidates: int
    needs_review: bool
    maps: UncertaintyMaps
    truth: np.ndarray
    region: np.ndarray
    candidate_mask: np.ndarray
    mean_mi: float = float("nan")  # over the analysed tissue, as mean_entropy
    candidate_area_pct: float = float("nan")  # SUA candidates' area per analysed tissue area
    positive_area_um2: float = float("nan")  # predicted positive, over the truth's tissue
    truth_positive_area_um2: float = float("nan")
    out_of_domain_score: float = float("nan")  # the domain guard's scores (NaN: the model has no statistics)
    stain_distance_deg: float = float("nan")
    tps_predicted: float | None = None  # with a nuclei model: pdl1 run's predicted TPS (H&E), % ...
    tps_truth: float | None = None  # ... and the phantom's
    positive_off_tumour_pct: float | None = None  # with a nuclei model: positive area away from tumour cells
    tps_member_disagreement: float | None = None  # with a nuclei model: members' TPS in another category, share
    unsettled_positive_area_pct: float | None = None  # probability within 0.2 of the threshold, % of the positive

    @property
    def tps_category_wrong(self) -> bool:
        """The predicted TPS falls in another category (< 1 %, 1-49 %, >= 50 %) than the truth's; False unmeasured."""
        if self.tps_predicted is None or self.tps_truth is None:
            return False
        return tps_category(self.tps_predicted) != tps_category(self.tps_truth)

    @property
    def positive_area_error(self) -> float:
        """|predicted - true| positive area over the true one, or over the floor where the truth is smaller (see
        :func:`area_error`)."""
        floor = area_error_floor(self.region, self.maps.mpp**2)
        return area_error(self.positive_area_um2, self.truth_positive_area_um2, floor=floor)

    def failed(self, *, max_area_error: float = FAILED_AREA_ERROR) -> bool:
        """The slide's result is wrong (#32): its TPS category is wrong (where the nuclei were run) or its
        positive area is off by more than ``max_area_error`` of the truth's."""
        return self.tps_category_wrong or self.positive_area_error > max_area_error


def evaluate_slide_suite(
    slide_path: str | Path,
    ensemble: Ensemble,
    *,
    sua: SuaParams,
    pixel_threshold: float,
    review: dict[str, float],
    min_fraction: float = 0.9,
    config: SegmentConfig | None = None,
    nuclei_model: Ensemble | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    mpp_advice: MppAdvice | None = None,
) -> SlideEvaluation:
    """Segmentation, calibration, uncertainty ranking and SUA vs the pixel baseline on one phantom slide.

    Scored on the maps ``pdl1 run`` makes (``config``, by default :class:`SegmentConfig`'s grid),
    since that is where SUA's calibrated thresholds are applied. With ``nuclei_model``, also the
    predicted TPS as ``pdl1 run`` makes it, so a wrong TPS category counts as a failure. ``mpp_advice`` as
    :func:`evaluate_segmentation`'s.
    """
    scored = _segment_against_truth(
        slide_path,
        ensemble,
        config=config or SegmentConfig(),
        threshold=sua.upper,
        on_progress=on_progress,
        mpp_advice=mpp_advice,
    )
    seg, maps, truth, region, analysed = scored.seg, scored.maps, scored.truth, scored.region, scored.analysed
    prob = np.asarray(maps.prob)
    pred = prob >= sua.upper
    # Candidates can only lie where the product looked; what they are scored against is all the
    # truth's tissue the product calls negative, unanalysed tissue included.
    candidates, cand_mask = find_candidates(maps, sua, valid=analysed)
    base_mask = pixel_baseline(
        maps, lower=sua.lower, upper=sua.upper, threshold=pixel_threshold, uncertainty=sua.uncertainty, valid=analysed
    )
    predicted_negative = ~pred & region
    labels, n, scores = region_scores(maps, sua, valid=analysed)
    wrong = (pred != truth)[region]
    pe = np.asarray(maps.predictive_entropy)
    mean_pe = float(pe[analysed].mean()) if analysed.any() else 0.0  # what pdl1 run's review sees
    mi = np.asarray(maps.mutual_information)
    mean_mi = float(mi[analysed].mean()) if analysed.any() else 0.0
    cand_area = sum(c.area_um2 for c in candidates)
    analysed_um2 = float(analysed.sum() * maps.mpp**2)
    positive_pct = _positive_pct(pred, analysed)
    unsettled = unsettled_positive_area_pct(prob, analysed, threshold=sua.upper)
    tps_predicted = off_tumour = disagreement = None
    if nuclei_model is not None:
        tps_predicted, off_tumour, disagreement = _predicted_tps(
            slide_path, scored, nuclei_model, threshold=sua.upper, mpp_advice=mpp_advice
        )
    qc_scores = slide_review_scores(
        mean_entropy=mean_pe,
        candidate_area_pct=100 * cand_area / max(analysed_um2, 1e-9),
        positive_area_pct=positive_pct,
        positive_off_tumour_pct=off_tumour,
        tps_member_disagreement=disagreement,
        unsettled_positive_area_pct=unsettled,
    )
    return SlideEvaluation(
        slide=Path(slide_path).name,
        shift=float(scored.truth_data.summary["spec"]["shift"]),
        seg=seg,
        iou=iou(pred[region], truth[region]),
        f1=fbeta_score(pred[region], truth[region], beta=1.0),
        ece=ece(prob[region], truth[region]),
        brier=brier(prob[region], truth[region]),
        auprc_entropy_error=auprc(pe[region], wrong),
        mean_entropy=mean_pe,
        sua=conversion_scores(cand_mask, truth, predicted_negative),
        baseline=conversion_scores(base_mask, truth, predicted_negative),
        npr_scores=scores,
        npr_is_fn=npr_is_false_negative(labels, n, truth, min_fraction=min_fraction),
        candidates=len(candidates),
        # As pdl1 run flags the slide: the domain guard's reasons, or a QC score at its limit.
        needs_review=scored.out_of_domain or bool(scores_at_limit(qc_scores, review)),
        maps=maps,
        truth=truth,
        region=region,
        candidate_mask=cand_mask,
        mean_mi=mean_mi,
        candidate_area_pct=100 * cand_area / max(analysed_um2, 1e-9),
        positive_area_um2=float(np.count_nonzero(pred & region) * maps.mpp**2),
        truth_positive_area_um2=float(np.count_nonzero(truth) * maps.mpp**2),
        out_of_domain_score=scored.out_of_domain_score,
        stain_distance_deg=scored.stain_distance_deg,
        tps_predicted=tps_predicted,
        tps_truth=None if nuclei_model is None else _truth_tps(scored),
        positive_off_tumour_pct=off_tumour,
        tps_member_disagreement=disagreement,
        unsettled_positive_area_pct=unsettled,
    )


def _positive_pct(pred: np.ndarray, analysed: np.ndarray) -> float:
    """The predicted positive area as a % of the analysed tissue, as ``pdl1 run``'s review sees it."""
    n = int(np.count_nonzero(analysed))
    return 100 * int(np.count_nonzero(pred & analysed)) / n if n else 0.0


def sua_fitted(cal: Calibration) -> bool:
    """Whether SUA's calibration found anything to fit: validation NPRs that are false negatives, some caught.

    Without them every threshold scores F0.5 0 and the first candidate wins by default, so the model's SUA
    thresholds should stay, as the review limits stay without failed slides (:class:`ReviewCalibration`).
    """
    return cal.n_false_negative > 0 and cal.f05 > 0


@dataclass(frozen=True)
class ReviewCalibration:
    """The "needs review" limits fitted on validation slides (:func:`fit_review_limits`), or why not.

    ``limits`` is None when the slides hold no failure or no correct slide (nothing to fit on); the
    manifest's limits then stay. ``slides`` holds per slide (name, mean entropy, SUA candidate area %,
    positive-area error, failed, predicted positive area %, out of the domain guard's limits, the members'
    disagreement on the TPS category at its limit, the unsettled share of the positive area at its limit, the
    predicted TPS, the truth's TPS, whether their categories differ; the three TPS fields None, None, False
    without a nuclei model, the predicted one None where no tumour nucleus was found).
    """

    limits: dict[str, float] | None
    fit: ReviewFit | None
    note: str
    slides: tuple[tuple[str, float, float, float, bool, float, bool, bool, bool, float | None, float | None, bool], ...]


# A limit no slide reaches: a QC score the fitted rule does not use (JSON has no infinity) ...
REVIEW_NEVER = 1e9
# ... and for a score that flags at or below its limit (a share of the tissue is never below 0).
NEVER_BELOW = -1.0


def calibrate_ensemble(
    slides: list[str | Path],
    ensemble: Ensemble,
    *,
    lowers: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3),
    uncertainty: str = "predictive_entropy",
    aggregation: str = "mean",
    min_fraction: float = 0.9,
    objective: str = "pixels",
    max_area_error: float = FAILED_AREA_ERROR,
    nuclei_model: Ensemble | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    mpp_advice: MppAdvice | None = None,
    on_slide: Callable[[int, int, str, str], None] | None = None,
) -> tuple[Calibration, ReviewCalibration]:
    """Calibrate SUA (F0.5 on validation NPRs), then the slide "needs review" limits to #32's target.

    A validation slide failed when its predicted positive area (over the truth's tissue) is off by
    more than ``max_area_error`` of the true one, or, with ``nuclei_model``, when its predicted TPS
    (as ``pdl1 run`` makes it) falls in another category than the truth's. The review flags a slide whose
    mean predictive entropy or SUA candidate area (with the SUA just calibrated, or the model's own where there was
    nothing to fit: the SUA pdl1 run will use) reaches its limit, or whose predicted
    positive area (% of the analysed tissue) falls to its limit, besides the slides the domain guard flags
    (its limits are set on in-domain slides, ``pdl1 domain-stats``, and taken as they are); the limits catch
    as many failures as they can with false alarms on at most 20 % of the correct slides. So do the slides
    whose unsettled share of the positive area is at the rule's limit (``review_unsettled_positive_area_pct``,
    not fitted: its limit is the failure's own 25 % either way), and, with ``nuclei_model``, the slides whose
    ensemble members disagree on the TPS category at the rule's limit (``review_tps_member_disagreement``, not
    fitted: it says the category is unsettled).

    Every slide's truth and pixel size are checked before the first is segmented (:func:`check_truths`);
    ``mpp_advice`` is how the caller's user gives a slide a pixel size, for the messages of one it has none for.
    ``on_progress(done, total)`` counts the tiles of each slide's pass, ``on_slide(i, n, name, part)`` says which
    before it: slide ``i`` of ``n``, ``part`` "segmentation" (every slide first), then "nuclei" (with
    ``nuclei_model``, the predicted TPS of every slide).
    """
    upper = ensemble.manifest.thresholds.get("segmentation", 0.5)
    # The limits taken as the manifest states them (pdl1 run's rule), not fitted here.
    unfitted = {
        key: value
        for key, value in review_rule_for(ensemble.manifest).items()
        if key in ("review_tps_member_disagreement", "review_unsettled_positive_area_pct")
    }
    scorers = [("segmentation", ensemble.manifest)]
    if nuclei_model is not None:
        scorers.append(("nuclei", nuclei_model.manifest))
    # Every slide, before the first is segmented; the true TPS is read when the nuclei model predicts one.
    needs = ("spec",) if nuclei_model is None else ("spec", "tps_percent")
    check_truths(slides, {ensemble.manifest.stain: scorers}, needs=needs, mpp_advice=mpp_advice)
    scored = []
    for i, path in enumerate(slides, start=1):
        if on_slide is not None:
            on_slide(i, len(slides), Path(path).name, "segmentation")
        # On the pipeline's grid, where the thresholds will be applied (not the truth's finer one).
        scored.append(
            _segment_against_truth(
                path,
                ensemble,
                config=SegmentConfig(),
                threshold=upper,
                on_progress=on_progress,
                mpp_advice=mpp_advice,
            )
        )
    cal = calibrate(
        [(s.maps, s.truth, s.analysed) for s in scored],
        upper=upper,
        lowers=lowers,
        uncertainty=uncertainty,
        aggregation=aggregation,
        min_fraction=min_fraction,
        objective=objective,
    )
    # The SUA pdl1 run will use: the one just fitted, else the model's own, kept (the limits were fitted
    # on the candidate areas of the first threshold tried, which scored F0.5 0 and is never written).
    sua = cal.params if sua_fitted(cal) else sua_params_for(ensemble.manifest, PipelineConfig(), upper=cal.params.upper)
    rows = []
    for i, (path, s) in enumerate(zip(slides, scored, strict=True), start=1):
        analysed = s.analysed
        mean_pe = float(np.asarray(s.maps.predictive_entropy)[analysed].mean()) if analysed.any() else 0.0
        candidates, _ = find_candidates(s.maps, sua, valid=analysed)
        analysed_um2 = float(analysed.sum() * s.maps.mpp**2)
        cand_pct = 100 * sum(c.area_um2 for c in candidates) / max(analysed_um2, 1e-9)
        pred = np.asarray(s.maps.prob) >= upper
        error = area_error(
            float(np.count_nonzero(pred & s.region)), float(np.count_nonzero(s.truth)), floor=area_error_floor(s.region)
        )
        wrong_category, disagreement, tps, truth_tps = False, None, None, None
        if nuclei_model is not None:
            if on_slide is not None:  # a pass over every slide again: it said nothing, after the tiles' bar ended
                on_slide(i, len(slides), Path(path).name, "nuclei")
            tps, _, disagreement = _predicted_tps(
                path, s, nuclei_model, threshold=upper, mpp_advice=mpp_advice, on_progress=on_progress
            )
            truth_tps = _truth_tps(s)
            # No tumour nucleus found: no TPS to judge, as the suite counts it (SlideEvaluation.tps_category_wrong).
            wrong_category = tps is not None and tps_category(tps) != tps_category(truth_tps)
        # The two unfitted scores, as pdl1 run computes them and flags at their limits.
        at_limit = scores_at_limit(
            slide_review_scores(
                mean_entropy=mean_pe,
                candidate_area_pct=cand_pct,
                positive_area_pct=None,
                positive_off_tumour_pct=None,
                tps_member_disagreement=disagreement,
                unsettled_positive_area_pct=unsettled_positive_area_pct(s.maps.prob, analysed, threshold=upper),
            ),
            unfitted,
        )
        rows.append(
            (
                Path(path).name,
                mean_pe,
                cand_pct,
                error,
                error > max_area_error or wrong_category,
                _positive_pct(pred, analysed),
                s.out_of_domain,
                "review_tps_member_disagreement" in at_limit,
                "review_unsettled_positive_area_pct" in at_limit,
                tps,
                truth_tps,
                wrong_category,
            )
        )
    failed = np.array([r[4] for r in rows], bool)
    if failed.all() or not failed.any():
        what = "TPS category wrong or " if nuclei_model is not None else ""
        note = (
            f"{int(failed.sum())} of {len(rows)} validation slides failed ({what}positive area off by more than "
            f"{max_area_error:.0%}): the review limits need both failed and correct slides, so the model's "
            "limits stay; add slides with stain shifts beyond training, weak expression or extreme TPS"
        )
        return cal, ReviewCalibration(limits=None, fit=None, note=note, slides=tuple(rows))
    already = np.array([r[6] or r[7] or r[8] for r in rows], bool)
    fit = fit_review_limits(
        {
            "review_entropy": np.array([r[1] for r in rows]),
            "review_candidate_area_pct": np.array([r[2] for r in rows]),
            "review_positive_area_pct": np.array([r[5] for r in rows]),
        },
        failed,
        already=already,
    )
    limits = {k: max(v, NEVER_BELOW) if k in FLAG_AT_OR_BELOW else min(v, REVIEW_NEVER) for k, v in fit.limits.items()}
    note = (
        f"caught {fit.catch:.0%} of {fit.failures} failed slides with false alarms on {fit.false_alarm:.0%} of "
        f"{fit.successes} others (target: at least {TARGET_CATCH:.0%} at most {TARGET_FALSE_ALARM:.0%}: "
        f"{'met' if fit.met else 'NOT met'}), on the slides it was fitted on"
    )
    alarms_anyway = int((already & ~failed).sum())
    if alarms_anyway > TARGET_FALSE_ALARM * fit.successes:
        note += (
            f"; the rules not fitted here (domain guard, members' disagreement, unsettled positive area) flag "
            f"{alarms_anyway} of the {fit.successes} correct slides whatever these limits say, above the "
            f"{TARGET_FALSE_ALARM:.0%} allowed: these slides are far from the model's training (its domain "
            "statistics, `pdl1 domain-stats`), or the model needs training on slides like them"
        )
    note += _negatives_note(rows, limits["review_positive_area_pct"])
    return cal, ReviewCalibration(limits=limits, fit=fit, note=note, slides=tuple(rows))


def _negatives_note(rows: list[tuple], positive_area_limit: float) -> str:
    """What a fitted predicted-positive-area limit does to slides rightly called negative, where the validation
    slides hold few of them: it flags every one. Fitted on 60 phantoms of TPS 0.5-90 %, it flagged 34 of 34 correct
    TPS-0 phantoms (README, `pdl1 calibrate`); with 20 TPS-0 slides among the validation slides the fit left it out."""
    if positive_area_limit <= NEVER_BELOW:
        return ""
    negatives = sum(1 for r in rows if not r[4] and r[5] <= positive_area_limit)
    return (
        f"; the predicted positive area limit ({positive_area_limit:.3g} % of the tissue) flags every slide called "
        f"negative, correct ones too, and {negatives} of the {len(rows)} validation slides are such: where many of "
        "a lab's cases are negative, calibrate with negative slides among them (python -m benchmarks.review_phantoms "
        "DIR --seeds FIRST-LAST --tps 0 writes TPS-0 phantoms)"
    )
