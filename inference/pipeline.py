"""The pipeline call: one image (and optional ROI) in, one :class:`SlideResult` out.

This and the result dataclasses are all that ``bridge`` uses of ``inference``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry

from inference.advice import SettingWords, library_setting
from inference.analysis.domain import DomainAssessment, assess_domain, slide_stain, stats_of_manifest
from inference.analysis.ihc import IMMUNE_POSITIVE, combined_positive_score, h_score
from inference.analysis.nuclei import (
    NucleiConfig,
    detect_nuclei,
    intensity_limits_od,
    pdl1_from_maps,
    plan_nuclei_tiles,
)
from inference.analysis.pairs import IHC_CELL_RADIUS_UM, cells_area
from inference.analysis.points import (
    INSUFFICIENT,
    MIN_TUMOUR_NUCLEI,
    tps_member_disagreement,
    tumour_proportion_score,
)
from inference.analysis.regions import (
    UNSETTLED_PROB_BAND,
    mask_on_maps,
    positive_off_tumour_pct,
    positive_regions,
    uncertainty_tiles,
    unsettled_positive_area_pct,
)
from inference.analysis.segment import SegmentConfig, segment_slide
from inference.analysis.sua import SuaParams, find_candidates
from inference.analysis.tiling import validate_roi
from inference.errors import SlideFormatError, StainError
from inference.evaluation.review import scores_at_limit, slide_review_scores
from inference.models.ensemble import Ensemble, demo_model_dir
from inference.models.features import capture_tile_features
from inference.models.manifest import STAINS, Manifest
from inference.results import ModelInfo, SlideResult
from inference.slides.slide import MppAdvice, Slide, open_slide
from inference.slides.stain_detect import MIN_TISSUE_PX, StainEstimate, detect_slide_stain
from inference.slides.tissue import TISSUE_METHOD_OF_STAIN, TissueMask, tissue_mask_for_slide, tissue_review_reasons

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineConfig:
    """Options of one analysis; built at the edges (CLI, service, batch) and passed down.

    Attributes
    ----------
    seg_model_dir, nuclei_model_dir
        H&E model folders; the shipped demos when None.
    ihc_model_dir
        The PD-L1 IHC nuclei model folder (cells of an H-DAB image); the shipped demo when None.
    run_nuclei
        Detect and classify nuclei (and so compute TPS) on H&E; an IHC image is always scored by its cells.
    device
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    mpp
        Overrides the slide's microns per pixel (required for slides that state none); not an image passed
        to :func:`analyse_slide` opened, which keeps its own.
    use_tissue
        Analyse only detected tissue inside the ROI.
    tissue_mpp
        µm/px of the low-resolution whole image on which the tissue and the stain are found.
    threshold
        Segmentation threshold on the ensemble-mean probability; the manifest's when None.
    min_region_area_um2
        Positive islands smaller than this are dropped.
    uncertainty_tile_um
        Edge of the uncertainty grid tiles.
    run_sua, sua_lower, sua_threshold, sua_uncertainty, sua_aggregation
        SUA false-negative candidates; None takes the manifest's calibrated value.
    refine_with_sua
        Also report the positive area with the candidates merged in (beside, not instead of, the plain one).
    detect_stain
        Tell the stain from the image's colour: it decides the analysis where the caller states none, and a
        stated stain the colour clearly contradicts is a review reason.
    domain_guard
        Score the image against the training domain of the model that analyses it (the segmentation
        ensemble on H&E, the IHC nuclei ensemble on H-DAB; :mod:`inference.analysis.domain`): out of the
        domain is a review reason. A model whose manifest has no domain statistics is "not measured".
    segment, nuclei
        How the segmentation ensemble and the nuclei models run (:class:`SegmentConfig`, :class:`NucleiConfig`:
        batch, read-ahead, precision, runtime, ...).
    openslide_only
        Read every pixel of a slide this opens through OpenSlide, not decoding SVS / tiled TIFF tiles directly
        (``open_slide``'s ``openslide_only``; ``pdl1`` reads ``PDL1_OPENSLIDE_ONLY``). A slide passed in opened is
        read as it was opened.
    openvino_cache_dir
        Where OpenVINO conversions of members go when their model folder cannot be written (runtime
        ``openvino``); None: beside the model only. The CLI and the service give the user's cache folder.
        Not part of :meth:`digest`: where a conversion is cached changes no result.
    """

    seg_model_dir: str | None = None
    nuclei_model_dir: str | None = None
    ihc_model_dir: str | None = None
    run_nuclei: bool = True
    device: str = "auto"
    mpp: float | None = None
    use_tissue: bool = True
    tissue_mpp: float = 8.0
    threshold: float | None = None
    min_region_area_um2: float = 200.0
    uncertainty_tile_um: float = 64.0
    run_sua: bool = True
    sua_lower: float | None = None
    sua_threshold: float | None = None
    sua_uncertainty: str | None = None
    sua_aggregation: str | None = None
    refine_with_sua: bool = False
    detect_stain: bool = True
    domain_guard: bool = True
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    nuclei: NucleiConfig = field(default_factory=NucleiConfig)
    openslide_only: bool = False
    openvino_cache_dir: str | None = None

    def digest(self) -> str:
        """Short hash of the configuration, recorded with every result (the cache folder left out: it is this
        machine's, and changes no result)."""
        settings = asdict(self)
        del settings["openvino_cache_dir"]
        payload = json.dumps(settings, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# review_positive_area_pct flags at or below its limit (a share never below 0: -1 is "never"); the others at or above.
# review_positive_off_tumour_pct: the share of the predicted positive area farther than OFF_TUMOUR_UM from every
# tumour nucleus, which the predicted TPS does not see. Not fitted (phantoms cannot fail this way: their
# positive areas are tumour); half the positive area, where 32 phantoms of shift 0-1 with >= 1 % positive area
# reach 0-29 % and the real CMU H&E, called positive over its stroma, 87 %.
# review_tps_member_disagreement: the share of ensemble members whose own TPS falls in another category (< 1 %,
# 1-49 %, >= 50 %) than the ensemble's; at 0.4, two of five members. Not fitted: it says the category a pathologist
# reads is not settled, which is a reason to look whatever a phantom set scores (one member of five across a
# cut-off is common on correct slides near 1 %: 2 of 15 correct validation phantoms c1600-c1629).
# review_unsettled_positive_area_pct: the analysed area whose mean probability is within 0.2 of the threshold, as a
# % of the predicted positive area (unsettled_positive_area_pct). Not fitted: at 50 % the positive area could be a
# quarter larger or smaller, the error #32 counts as a failure.
DEFAULT_REVIEW_RULE = {
    "review_entropy": 0.45,
    "review_candidate_area_pct": 2.0,
    "review_positive_area_pct": -1.0,
    "review_positive_off_tumour_pct": 50.0,
    "review_tps_member_disagreement": 0.4,
    "review_unsettled_positive_area_pct": 50.0,
}

# What each score of DEFAULT_REVIEW_RULE says when it is at its limit (a slide's review reason).
REVIEW_REASONS = {
    "review_entropy": "segmentation uncertainty",
    "review_candidate_area_pct": "SUA candidate area %",
    "review_positive_area_pct": "small predicted positive area % (at or below the limit)",
    "review_positive_off_tumour_pct": "predicted positive area away from tumour cells % (the TPS does not see it)",
    "review_tps_member_disagreement": "ensemble members disagree on the TPS category (share of members)",
    "review_unsettled_positive_area_pct": f"unsettled positive area (probability within {UNSETTLED_PROB_BAND:g} of the "
    "threshold), % of the predicted positive area",
}
# An IHC slide is flagged for review when its cells' mean ensemble entropy (nats, of the class distribution)
# reaches this, unless the model's manifest states a calibrated limit.
DEFAULT_IHC_REVIEW_ENTROPY = 0.35
# A stated stain (QuPath's image type, --stain) the colour contradicts by at least this margin (degrees of
# the detector's deciding angle) is a review reason; weaker calls are not worth a pathologist's look.
STAIN_DISAGREEMENT_MARGIN_DEG = 10.0
# A pixel size the caller gives (QuPath's calibration) that differs from the file's own by more than this ratio either
# way is a review reason: cell sizes, counts and areas follow it (a 4x wrong one found 8 times the tumour cells), and
# scanners' own statements of one objective differ by a few per cent.
MPP_DISAGREEMENT_RATIO = 1.1
# A stain told from the colour alone by less than this margin is a review reason: held-out phantoms at shift
# 0.4-0.8 were told right by 0.1-1.4° (benchmarks/stain_detect.py); state the stain in QuPath to be sure.
WEAK_STAIN_MARGIN_DEG = 5.0


def sua_params_for(manifest: Manifest, config: PipelineConfig, *, upper: float) -> SuaParams:
    """SUA numbers: the config's overrides, else the manifest's calibration, else the defaults; ``upper`` is the
    caller's segmentation threshold (SUA's candidates lie under it), never the manifest's ``sua_upper``."""
    t = manifest.thresholds
    saved = manifest.extra.get("sua", {})
    defaults = SuaParams(upper=upper)
    return SuaParams(
        lower=config.sua_lower if config.sua_lower is not None else t.get("sua_lower", defaults.lower),
        upper=upper,
        threshold=config.sua_threshold
        if config.sua_threshold is not None
        else t.get("sua_threshold", defaults.threshold),
        uncertainty=config.sua_uncertainty or saved.get("uncertainty", defaults.uncertainty),
        aggregation=config.sua_aggregation or saved.get("aggregation", defaults.aggregation),
        min_area_um2=config.min_region_area_um2,
    )


def review_rule_for(manifest: Manifest) -> dict[str, float]:
    """The slide-level "needs review" rule: the six limits of :data:`DEFAULT_REVIEW_RULE`, each the manifest's
    calibrated value where it states one. A slide is flagged when a score reaches its limit: at or above it for
    mean predictive entropy, SUA candidate area, positive area away from tumour cells, members' disagreement on
    the TPS category and unsettled positive area; at or below it for the predicted positive area (% of the
    analysed tissue)."""
    return {key: float(manifest.thresholds.get(key, value)) for key, value in DEFAULT_REVIEW_RULE.items()}


def _folder_state(folder: str | Path) -> tuple:
    """What a model folder's files are, by name, size and modification time: a change means it may load now."""
    root = Path(folder)
    try:
        return tuple(
            sorted((str(p.relative_to(root)), st.st_size, st.st_mtime_ns) for p in root.rglob("*") if (st := p.stat()))
        )
    except OSError:  # missing, or changing under us: compared as such
        return ("unreadable", str(root))


class Models:
    """Models loaded once and reused across images (the service keeps one).

    Each loads (and is checked) on first use, so a broken model fails only the images that need it, with its
    own message, and the others of a batch still finish: the segmentation and H&E nuclei models on the first
    H&E image (:attr:`seg`, :attr:`nuclei`), the PD-L1 IHC nuclei model on the first IHC image (:meth:`ihc`).
    A model that fails to load is remembered: later images that need it get the same error without the
    folder being read and hashed again, until a file in the folder changes (a service need not be restarted
    once the folder is mended; a stat of its files is all each later image costs). ``setting``: how the caller's
    user sets a run's settings, for the advice of what the models' runtime refuses during a run (a conversion to
    OpenVINO that fails: :class:`~inference.models.ensemble.Ensemble`'s ``setting``; by default the library's
    config fields, ``runtime='torch'``).
    """

    def __init__(self, config: PipelineConfig, *, setting: SettingWords = library_setting):
        self._seg_folder = config.seg_model_dir or demo_model_dir("seg")
        self._nuclei_folder = (config.nuclei_model_dir or demo_model_dir("nuclei")) if config.run_nuclei else None
        self._ihc_folder = config.ihc_model_dir or demo_model_dir("nuclei-ihc")
        self._device = config.device
        self._openvino_cache_dir = None if config.openvino_cache_dir is None else Path(config.openvino_cache_dir)
        self._setting = setting
        self._failed: dict[str, tuple[Exception, tuple]] = {}

    def _load(self, key: str, folder: str | Path, task: str) -> Ensemble:
        """Load a model folder once; a failure is kept and raised again while the folder's files stay as they were."""
        failed = self._failed.get(key)
        state = _folder_state(folder)
        if failed is not None and failed[1] == state:
            # The traceback of the first failure is enough; re-raising would keep adding frames to it.
            raise failed[0].with_traceback(None)
        try:
            return Ensemble.load(
                folder,
                task=task,
                device=self._device,
                openvino_cache_dir=self._openvino_cache_dir,
                setting=self._setting,
            )
        except Exception as err:
            self._failed[key] = (err, state)
            raise

    @cached_property
    def seg(self) -> Ensemble:
        """The H&E segmentation ensemble, loaded (and checked) on first use."""
        return self._load("seg", self._seg_folder, "segmentation")

    @cached_property
    def nuclei(self) -> Ensemble | None:
        """The H&E nuclei ensemble, loaded (and checked) on first use; None when loaded without nuclei."""
        if self._nuclei_folder is None:
            return None
        return self._load("nuclei", self._nuclei_folder, "nuclei")

    def load_he(self) -> None:
        """Load the H&E models now rather than on the first H&E image (the service checks them at start-up)."""
        _ = self.seg, self.nuclei

    def ihc(self) -> Ensemble:
        """The PD-L1 IHC nuclei ensemble, loaded (and checked) on first use."""
        return self._ihc

    @cached_property
    def _ihc(self) -> Ensemble:
        return self._load("ihc", self._ihc_folder, "nuclei")

    @staticmethod
    def info(ensemble: Ensemble) -> ModelInfo:
        m = ensemble.manifest
        return ModelInfo(m.name, m.version, m.checksum, len(m.members))

    @property
    def seg_info(self) -> ModelInfo:
        return self.info(self.seg)


def analysis_grid_um(models: Models, config: PipelineConfig) -> float:
    """The µm between the lines of the coarsest grid an analysis lays from its image's level-0 corner: the
    segmentation maps' cells (``input_mpp`` x ``map_downsample``, 8 µm with the shipped model), of which the
    positive regions and uncertainty tiles are made. The segmentation's tiles start every ``map_downsample``
    model px (8 µm with the shipped model), the nuclei models' every 2 model px (2 µm with the shipped ones):
    this grid's lines lie on both of theirs.

    A region analysed apart from its image (an upload) whose corner lies on this grid is analysed on the
    image's own grids."""
    return models.seg.manifest.input_mpp * config.segment.map_downsample


# How an image's stain is stated, in the messages that refuse one: analyse_slide's default stain_advice. The
# programs that call it know their users' words (an option, an image type) and pass them instead.
STAIN_ADVICE = "pass its stain (H&E or H-DAB) as image_stain"


def analyse_slide(
    image: str | Path | Slide,
    *,
    models: Models,
    config: PipelineConfig,
    roi: BaseGeometry | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    image_size_px: tuple[int, int] | None = None,
    image_mpp: float | None = None,
    image_stain: str | None = None,
    image_stain_source: str = "QuPath's image type",
    stain_advice: str = STAIN_ADVICE,
    mpp_advice: MppAdvice | None = None,
    config_mpp_source: str = "PipelineConfig.mpp",
) -> SlideResult:
    """Analyse the ROI (level-0 polygon; the whole tissue when None) of one image.

    ``image_size_px`` is the (width, height) at which the caller (QuPath) shows the image: ROIs and results
    are in that frame, so a file that opens at another size is refused rather than analysed in the wrong one.
    ``image_mpp`` is the µm/px the caller has for the image (QuPath's calibration, which a user may have
    set); it is used instead of the file's own value, and ``config.mpp`` instead of both (neither for an
    image passed opened, a :class:`Slide`, which keeps the µm/px it was opened with).
    ``image_stain`` is the stain the caller knows the image to have ("H&E", "H-DAB" or "other", from
    ``image_stain_source``); None: not known, and then the image's colour decides (``config.detect_stain``;
    else it is analysed as H&E). An H-DAB image is scored by its cells with the IHC nuclei model, an H&E
    image by the segmentation ensemble and the nuclei model; a model trained on another stain never runs.
    ``stain_advice`` is how the caller's user states an image's stain, for the messages that refuse one
    (default: :data:`STAIN_ADVICE`; a caller passes its own users' words). ``mpp_advice`` is how they give an
    image's µm/px and ``config_mpp_source`` what they call ``config.mpp``, for the messages of an image this opens
    (``open_slide``'s ``mpp_advice`` and ``mpp_source``; an image passed opened has its own).
    """
    name = image.path if isinstance(image, Slide) else image
    stain, stain_source = image_stain, image_stain_source
    if stain is not None:
        _check_stain(name or "image", stain, stain_source, models=models, config=config, advice=stain_advice)
    if isinstance(image, Slide):
        slide = image
    elif config.mpp is not None:
        slide = open_slide(
            image,
            mpp=config.mpp,
            mpp_source=config_mpp_source,
            mpp_advice=mpp_advice,
            openslide_only=config.openslide_only,
        )
    else:
        slide = open_slide(
            image,
            mpp=image_mpp,
            mpp_source="QuPath project",
            mpp_advice=mpp_advice,
            openslide_only=config.openslide_only,
        )
    try:
        if image_size_px is not None and tuple(image_size_px) != slide.dimensions:
            w, h = image_size_px
            raise SlideFormatError(
                f"{slide.path or 'image'}: QuPath shows this image at {w} x {h} px, but the file opens here at "
                f"{slide.dimensions[0]} x {slide.dimensions[1]} px, so results would not line up. Either the file "
                "is not the one QuPath opened (replaced since it was added, or another file of that name found "
                "elsewhere: point the entry at the right file with File > Project... > Check project URIs), or "
                "QuPath shows another series or scene of a multi-image file (pdl1 reads a file's first image): "
                "export it from QuPath as OME-TIFF (File > Export images...) and analyse that file"
            )
        # Before anything reads pixels: an image too coarse for a model is refused, never enlarged whole.
        if stain is not None:
            _require_resolution(slide, stain, models=models, config=config)
        colour = detect_slide_stain(slide, mpp=config.tissue_mpp) if config.detect_stain else None
        if stain is None:
            if colour is not None:
                stain, stain_source = _stain_from_colour(name or "image", colour, advice=stain_advice)
                _check_stain(name or "image", stain, stain_source, models=models, config=config, advice=stain_advice)
            _require_resolution(slide, stain, models=models, config=config)
        analyse = _analyse_ihc if stain == "H-DAB" else _analyse
        # The model whose training domain the image is judged against: the one that makes the call
        # (inference.analysis.domain.GUARDED_TASK_OF_STAIN).
        guarded = (models.ihc() if stain == "H-DAB" else models.seg) if config.domain_guard else None
        # Features are captured only for a model with domain statistics: any other is "not measured"
        # (its network may have no layers the guard knows, e.g. an imported nnU-Net), and costs nothing.
        capture = guarded is not None and stats_of_manifest(guarded.manifest.extra)[0] is not None
        with capture_tile_features(guarded) if capture else nullcontext() as captured:
            result = analyse(
                slide, models=models, config=config, roi=roi, on_progress=on_progress, should_cancel=should_cancel
            )
        domain = None
        if guarded is not None:
            features = captured.array() if capture else None
            domain = _assess_domain(slide, guarded, features, colour, tissue_mpp=config.tissue_mpp)
    finally:
        if not isinstance(image, Slide):
            slide.close()
    summary = dict(result.summary)
    reasons = list(summary.get("review_reasons", []))
    if colour is not None:
        summary["stain_from_colour"] = {
            "stain": colour.stain,
            "margin_deg": colour.margin_deg,
            "reason": colour.reason,
        }
        if (
            image_stain is not None
            and colour.stain in STAINS
            and colour.stain != image_stain
            and colour.margin_deg >= STAIN_DISAGREEMENT_MARGIN_DEG
        ):
            reasons.append(
                {
                    "reason": f"stain: {image_stain_source} says {image_stain}, the colour says {colour.stain}",
                    "value": colour.margin_deg,
                    "limit": STAIN_DISAGREEMENT_MARGIN_DEG,
                }
            )
        if image_stain is None and colour.stain in STAINS and colour.margin_deg < WEAK_STAIN_MARGIN_DEG:
            reasons.append(
                {
                    "reason": f"stain told from the colour ({colour.stain}) by a weak margin: state it in QuPath",
                    "value": colour.margin_deg,
                    "limit": WEAK_STAIN_MARGIN_DEG,
                }
            )
    if isinstance(image, Slide) or config.mpp is None:  # not against an explicit --mpp (config.mpp), which is meant
        reasons += _mpp_disagreement(slide)
    if domain is not None:
        summary["domain"] = domain.summary()
        reasons.extend(domain.reasons)
    summary["review_reasons"] = reasons
    return replace(
        result,
        stain=stain or "H&E",
        stain_source=stain_source if stain else "",
        summary=summary,
        uncertainty_flag=result.uncertainty_flag or bool(reasons),
    )


def _mpp_disagreement(slide: Slide) -> list[dict]:
    """A review reason where the pixel size the image was analysed at (its caller's: QuPath's, a service request's)
    and the one its file states differ by more than :data:`MPP_DISAGREEMENT_RATIO` either way; none where the file
    states none or the image was opened at its own (:attr:`Slide.file_mpp` is None)."""
    own = slide.file_mpp
    if own is None:
        return []
    ratio = max(slide.mpp.mean, own.mean) / min(slide.mpp.mean, own.mean)
    if ratio <= MPP_DISAGREEMENT_RATIO:
        return []
    return [
        {
            "reason": f"pixel size: {slide.mpp.source} says {slide.mpp.mean:g} µm/px, the file says {own.mean:g} "
            f"({own.source}); cell sizes, counts and areas follow the first: check it in QuPath (Image tab)",
            "value": ratio,
            "limit": MPP_DISAGREEMENT_RATIO,
        }
    ]


def _assess_domain(
    slide: Slide, ensemble: Ensemble, features: np.ndarray | None, colour: StainEstimate | None, *, tissue_mpp: float
) -> DomainAssessment:
    """The image against ``ensemble``'s training domain: its tiles' features (captured during the analysis)
    and its stain on the whole-image thumbnail the stain and tissue were found on (cached, no new read)."""
    manifest = ensemble.manifest
    stats, why_not = stats_of_manifest(manifest.extra)
    if stats is None:
        return replace(assess_domain(None, None, None, model=manifest.name), why_not=why_not)
    if colour is None:  # the colour was not looked at for the stain: for the guard it is
        colour = detect_slide_stain(slide, mpp=tissue_mpp)
    stain = slide_stain(colour, slide.thumbnail(mpp=tissue_mpp))
    fill = _mostly_fill(slide, manifest)
    if fill is None or features is None:
        return assess_domain(features, stain, stats, model=manifest.name)
    # Not scored: the tiles' features would be mostly the fill's (read as white glass), not the tissue's.
    assessment = assess_domain(None, stain, stats, model=manifest.name)
    why = [fill] + (["no tissue to estimate the stain vectors on"] if assessment.stain_distance_deg is None else [])
    return replace(assessment, tiles=len(features), why_not="; ".join(why))


# An image whose pixels are less than this share of one of the guarded model's tiles, the rest fill (an upload's
# transparent surround, read as white), is not scored on its features: a 100 µm annotation of the real HGSC tile
# sent amid transparent pixels scored 0.99 (in the domain) on its one 512 µm tile, the same area read from its file
# 3.25 (out of it), its tile full of the tissue around it. An upload's context counts (Slide.opaque holds it): sent
# with the tissue around it to a tile's reach (pdl1_analyze.groovy), that square scores 3.25 too.
MIN_IMAGE_SHARE_OF_TILE = 0.5


def _mostly_fill(slide: Slide, manifest: Manifest) -> str | None:
    """Why ``slide``'s tiles are mostly fill for the guard of ``manifest``'s model, else None."""
    if slide.opaque is None:
        return None
    image_um2 = float(np.count_nonzero(slide.opaque)) * slide.mpp.mean**2
    tile_um2 = (manifest.tile_size_px * manifest.input_mpp) ** 2
    if image_um2 >= MIN_IMAGE_SHARE_OF_TILE * tile_um2:
        return None
    return (
        f"the region's {image_um2:.0f} µm² of pixels fill less than {MIN_IMAGE_SHARE_OF_TILE:.0%} of one of "
        f"{manifest.name}'s tiles ({tile_um2:.0f} µm²): the network's features would be mostly the transparent "
        "surround's; send the tissue around the region as context (pdl1_analyze.groovy does), or analyse a larger "
        "region, to have it scored"
    )


def _require_resolution(slide: Slide, stain: str | None, *, models: Models, config: PipelineConfig) -> None:
    """Refuse an image too coarse for a model of the analysis its stain takes (None: H&E)."""
    if stain == "H-DAB":
        slide.require_resolution(models.ihc().manifest.input_mpp, reader="the PD-L1 IHC nuclei model")
        return
    slide.require_resolution(models.seg.manifest.input_mpp, reader="the segmentation model")
    nuclei_model = _nuclei_model(models, config)
    if nuclei_model is not None:
        slide.require_resolution(nuclei_model.manifest.input_mpp, reader="the nuclei model")


def _stain_from_colour(name, colour: StainEstimate, *, advice: str = STAIN_ADVICE) -> tuple[str, str]:
    """The stain to analyse an image as when nobody stated it: the colour's, if it found one."""
    if colour.stain in STAINS:
        return colour.stain, f"its colour ({colour.reason}; margin {colour.margin_deg:.0f}°)"
    if colour.tissue_px < MIN_TISSUE_PX and not colour.dark_background:  # a dark image was taken for empty glass
        # Nothing to analyse either way: the H&E analysis finds no tissue and says so in its numbers.
        return "H&E", "the default (no tissue to tell a stain by)"
    raise StainError(
        f"{name}: its colour is not a brightfield H&E or haematoxylin-DAB stain ({colour.reason}); pdl1-bridge "
        f"analyses only those. If the image is one, say which: {advice}"
    )


def _nuclei_model(models: Models, config: PipelineConfig) -> Ensemble | None:
    """The nuclei ensemble this analysis runs: Models hold one when loaded for it, and a job may still
    leave nuclei out (``config.run_nuclei``; the service loads both models once)."""
    return models.nuclei if config.run_nuclei else None


def _check_stain(
    name, stain: str | None, source: str, *, models: Models, config: PipelineConfig, advice: str = STAIN_ADVICE
) -> None:
    """Refuse an image whose known stain is not the one each model to run was trained on.

    An H-DAB image runs the IHC nuclei model, an H&E image the segmentation and nuclei models;
    an image of any other stain runs none.
    """
    if stain is None:
        return
    if stain not in STAINS:
        raise StainError(
            f"{name}: the image is {stain} ({source}); pdl1-bridge analyses H&E (the segmentation ensemble and "
            "a predicted TPS) and PD-L1 IHC (H-DAB: TPS and CPS from its cells), nothing else. If the image is "
            f"one of those, {advice}"
        )
    if stain == "H-DAB":
        used = [("PD-L1 IHC nuclei", models.ihc())]
    else:
        used = [("segmentation", models.seg)]
        nuclei_model = _nuclei_model(models, config)
        if nuclei_model is not None:
            used.append(("nuclei", nuclei_model))
    for task, ensemble in used:
        trained_on = ensemble.manifest.stain
        if stain != trained_on:
            raise StainError(
                f"{name}: the image is {stain} ({source}), but the {task} model {ensemble.manifest.name!r} was "
                f"trained on {trained_on} and runs on nothing else. If the image is {trained_on}, {advice}; "
                f"otherwise it needs a model trained on {stain}"
            )


def _analyse(slide, *, models, config, roi, on_progress, should_cancel) -> SlideResult:
    width, height = slide.dimensions
    if roi is not None:
        roi = validate_roi(roi, image_size_wh=(width, height))
    nuclei_model = _nuclei_model(models, config)
    tissue: TissueMask | None = None
    if config.use_tissue:
        tissue = tissue_mask_for_slide(slide, mpp=config.tissue_mpp, method=TISSUE_METHOD_OF_STAIN["H&E"])
    seg_tiles = nuclei_tiles = 0
    nuclei_grid = None
    if nuclei_model is not None:
        # Counted before the segmentation: its total alone made the bar (and a service job's progress) reach 100 %
        # at the segmentation's end, then fall back when the nuclei began ('running 100% (9/9 tiles)', then
        # '22% (9/41 tiles)' in QuPath's log).
        nuclei_grid = plan_nuclei_tiles(slide, nuclei_model, roi=roi, tissue=tissue, config=config.nuclei)
        nuclei_tiles = len(nuclei_grid)

    def progress(part: str) -> Callable[[int, int], None] | None:
        # One bar over both models: segmentation tiles first, then nuclei tiles.
        if on_progress is None:
            return None

        def report(done: int, total: int) -> None:
            nonlocal seg_tiles, nuclei_tiles
            if part == "seg":
                seg_tiles = total
                on_progress(done, total + nuclei_tiles)
            else:
                nuclei_tiles = total
                on_progress(seg_tiles + done, seg_tiles + total)

        return report

    # With nuclei, each member's map is kept: the members' own calls at the nuclei give the TPS its spread.
    segment_config = replace(config.segment, member_maps=True) if nuclei_model is not None else config.segment
    maps = segment_slide(
        slide,
        models.seg,
        roi=roi,
        tissue=tissue,
        config=segment_config,
        on_progress=progress("seg"),
        should_cancel=should_cancel,
    )
    nuclei = None
    tps = None
    if nuclei_model is not None:
        nuclei = detect_nuclei(
            slide,
            nuclei_model,
            roi=roi,
            tissue=tissue,
            config=config.nuclei,
            on_progress=progress("nuclei"),
            should_cancel=should_cancel,
            grid=nuclei_grid,
        )
    manifest = models.seg.manifest
    threshold = config.threshold if config.threshold is not None else manifest.thresholds.get("segmentation", 0.5)
    if nuclei is not None:
        # What H&E shows (tumour or other) from the nuclei model; PD-L1 from the ensemble's maps.
        nuclei = pdl1_from_maps(nuclei, maps, threshold=threshold)
        tps = tumour_proportion_score(nuclei.count("Tumor: Positive"), nuclei.count("Tumor: Negative"))
    member_tps = [] if nuclei is None else [t for t in nuclei.member_tps() if t is not None]
    if maps.member_prob is not None and not config.segment.member_maps:
        maps = replace(maps, member_prob=None)  # kept for the nuclei only
    if tissue is not None:
        tissue_on_map = mask_on_maps(tissue.mask, tissue.downsample, maps)
    else:
        tissue_on_map = np.ones(maps.shape, bool)
    analysed = tissue_on_map & maps.covered
    regions = positive_regions(maps, threshold=threshold, min_area_um2=config.min_region_area_um2)
    # Of an analysed ROI, the tiles are trimmed to it (QuPath's Create tiles, Trim to ROI): tiles over its outline
    # would leave it in QuPath's Resolve hierarchy, and lie in a neighbouring analysed ROI.
    tiles = uncertainty_tiles(
        maps, tissue_on_map, tile_um=config.uncertainty_tile_um, image_size_wh=(width, height), roi=roi
    )
    px_area_um2 = maps.mpp**2
    positive = (np.asarray(maps.prob) >= threshold) & analysed
    analysed_area = float(analysed.sum() * px_area_um2)
    area = roi if roi is not None else box(0, 0, width, height)
    sua = sua_params_for(manifest, config, upper=threshold)
    candidates, candidate_mask = find_candidates(maps, sua, valid=analysed) if config.run_sua else ((), None)
    mean_pe = float(np.asarray(maps.predictive_entropy)[analysed].mean()) if analysed.any() else None
    review = review_rule_for(manifest)
    candidate_area = float(sum(c.area_um2 for c in candidates))
    candidate_pct = 100 * candidate_area / analysed_area if analysed_area > 0 else 0.0
    reasons = tissue_reasons(tissue, roi)
    if nuclei is not None and tps is not None and tps.category == INSUFFICIENT:
        reasons.append({"reason": "fewer than 100 tumour cells", "value": tps.tumour, "limit": MIN_TUMOUR_NUCLEI})
    positive_pct = 100 * float(positive.sum() * px_area_um2) / analysed_area if analysed_area > 0 else None
    off_tumour_pct = None
    if nuclei is not None:
        # The positive area the predicted TPS does not see: the maps call it positive, the nuclei model finds no
        # tumour cell there (stroma or immune cells called PD-L1 positive, or tumour the nuclei model missed).
        off_tumour_pct = positive_off_tumour_pct(positive, nuclei.tumour_xy(), maps, level0_mpp=slide.mpp.mean)
    # How far the positive area could move with calls near the threshold (a quarter either way at 50 %).
    unsettled_pct = unsettled_positive_area_pct(maps.prob, analysed, threshold=threshold)
    scores = slide_review_scores(
        mean_entropy=mean_pe,
        candidate_area_pct=candidate_pct,
        positive_area_pct=positive_pct,
        positive_off_tumour_pct=off_tumour_pct,
        tps_member_disagreement=None if tps is None else tps_member_disagreement(tps.percent, member_tps),
        unsettled_positive_area_pct=unsettled_pct,
    )
    reasons += [
        {"reason": REVIEW_REASONS[key], "value": scores[key], "limit": review[key]}
        for key in scores_at_limit(scores, review)
    ]
    flag = bool(reasons)
    summary = {
        "review_reasons": reasons,
        "positive_off_tumour_pct": off_tumour_pct,
        "unsettled_positive_area_pct": unsettled_pct,
        # On H&E the TPS is predicted (tumour nuclei called by the ensemble's maps); each member's own map
        # gives its own TPS, their spread.
        "tps_members": member_tps,
        "tps_low": min(member_tps) if member_tps else None,
        "tps_high": max(member_tps) if member_tps else None,
        "sua": asdict(sua),
        "review_rule": review,
        "candidate_area_um2": candidate_area,
        "threshold": threshold,
        "predictive_entropy_mean": mean_pe,
        "mutual_information_mean": float(np.asarray(maps.mutual_information)[analysed].mean())
        if analysed.any()
        else None,
        "roi_area_um2": float(area.area * (maps.mpp / maps.downsample) ** 2),
        "tissue_fraction": float(tissue.fraction) if tissue is not None else None,
    }
    if nuclei_model is not None:
        summary.update(_nuclei_tta_record(config, nuclei_model.manifest))
    if config.refine_with_sua and candidate_mask is not None:
        # Reported beside the unrefined numbers, never instead of them.
        summary["positive_area_refined_um2"] = float(((positive | candidate_mask) & analysed).sum() * px_area_um2)
    return SlideResult(
        **_identity(slide, config),
        seg_model=models.seg_info,
        maps=maps,
        regions=regions,
        tiles=tiles,
        positive_area_um2=float(positive.sum() * px_area_um2),
        analysed_area_um2=analysed_area,
        nuclei=nuclei,
        nuclei_model=None if nuclei_model is None else models.info(nuclei_model),
        tps=tps,
        candidates=candidates,
        uncertainty_flag=flag,
        summary=summary,
    )


def _analyse_ihc(slide, *, models, config, roi, on_progress, should_cancel) -> SlideResult:
    """A PD-L1 IHC image: its cells found and classed by the IHC nuclei ensemble; TPS, CPS and intensity."""
    width, height = slide.dimensions
    if roi is not None:
        roi = validate_roi(roi, image_size_wh=(width, height))
    ensemble = models.ihc()
    manifest = ensemble.manifest
    tissue: TissueMask | None = None
    if config.use_tissue:  # by optical density: a pale counterstain has little saturation
        tissue = tissue_mask_for_slide(slide, mpp=config.tissue_mpp, method=TISSUE_METHOD_OF_STAIN["H-DAB"])
    nuclei = detect_nuclei(
        slide,
        ensemble,
        roi=roi,
        tissue=tissue,
        config=config.nuclei,
        on_progress=on_progress,
        should_cancel=should_cancel,
    )
    positive, negative = nuclei.count("Tumor: Positive"), nuclei.count("Tumor: Negative")
    tps = tumour_proportion_score(positive, negative)
    immune_positive = nuclei.count(IMMUNE_POSITIVE) if IMMUNE_POSITIVE in nuclei.class_names else 0
    cps = combined_positive_score(positive, immune_positive, positive + negative)
    area = roi if roi is not None else box(0, 0, width, height)
    px_um2 = slide.mpp.mean**2
    analysed_px = tissue_area_px(tissue, area) if tissue is not None else float(area.area)
    analysed_area = analysed_px * px_um2
    pos_xy = nuclei.xy[nuclei.cls == nuclei.class_names.index("Tumor: Positive")]
    cells = cells_area(pos_xy, radius_px=IHC_CELL_RADIUS_UM / slide.mpp.mean)
    positive_area = float(cells.intersection(area).area) * px_um2
    tumour_cells = np.isin(nuclei.cls, [nuclei.class_names.index(n) for n in ("Tumor: Positive", "Tumor: Negative")])
    grades = nuclei.intensity[tumour_cells] if nuclei.intensity is not None else np.zeros(0)
    mean_entropy = float(nuclei.entropy.mean()) if nuclei.entropy is not None and len(nuclei) else None
    limit = float(manifest.thresholds.get("review_nuclei_entropy", DEFAULT_IHC_REVIEW_ENTROPY))
    reasons = tissue_reasons(tissue, roi)
    if tps.category == INSUFFICIENT:
        reasons.append({"reason": "fewer than 100 tumour cells", "value": tps.tumour, "limit": MIN_TUMOUR_NUCLEI})
    if mean_entropy is not None and mean_entropy >= limit:
        reasons.append({"reason": "nuclei uncertainty", "value": mean_entropy, "limit": limit})
    member_tps = [t for t in nuclei.member_tps() if t is not None]
    disagreement = tps_member_disagreement(tps.percent, member_tps)
    # The H&E rule's score and limit, applied as there (scores_at_limit).
    key = "review_tps_member_disagreement"
    rule = {key: float(manifest.thresholds.get(key, DEFAULT_REVIEW_RULE[key]))}
    scores = {} if disagreement is None else {key: disagreement}
    reasons += [
        {"reason": REVIEW_REASONS[k], "value": scores[k], "limit": rule[k]} for k in scores_at_limit(scores, rule)
    ]
    summary = {
        "nuclei_entropy_mean": mean_entropy,
        "tps_members": member_tps,
        "tps_low": min(member_tps) if member_tps else None,
        "tps_high": max(member_tps) if member_tps else None,
        "review_reasons": reasons,
        "h_score": h_score(grades),
        "intensity_counts": {f"{g}+": int((grades == g).sum()) for g in (1, 2, 3)},
        "intensity_limits_od": list(intensity_limits_od(manifest)),
        "positive_area_source": f"positive tumour cells, {IHC_CELL_RADIUS_UM:g} µm around each",
        "roi_area_um2": float(area.area) * px_um2,
        "tissue_fraction": float(tissue.fraction) if tissue is not None else None,
        **_nuclei_tta_record(config, manifest),
    }
    return SlideResult(
        **_identity(slide, config),
        seg_model=None,
        maps=None,
        regions=(),
        tiles=(),
        positive_area_um2=positive_area,
        analysed_area_um2=analysed_area,
        nuclei=nuclei,
        nuclei_model=models.info(ensemble),
        tps=tps,
        cps=cps,
        uncertainty_flag=bool(reasons),
        summary=summary,
    )


def _nuclei_tta_record(config: PipelineConfig, manifest: Manifest) -> dict[str, bool | str]:
    """Whether the nuclei model ran with test-time augmentation, and what decided it (the run's option, else
    the model's manifest): the config alone holds None when the manifest decides."""
    return {
        "nuclei_tta": config.nuclei.tta_for(manifest),
        "nuclei_tta_source": "run option" if config.nuclei.tta is not None else "model manifest",
    }


def _identity(slide: Slide, config: PipelineConfig) -> dict:
    """The fields every SlideResult of this slide and configuration starts with; a new run id each time."""
    width, height = slide.dimensions
    return {
        "image_path": str(slide.path) if slide.path else "",
        "image_width_px": width,
        "image_height_px": height,
        "mpp": slide.mpp.mean,
        "run_id": str(uuid.uuid4()),
        "config_hash": config.digest(),
    }


def tissue_area_px(tissue: TissueMask, area: BaseGeometry) -> float:
    """Level-0 px² of detected tissue inside ``area`` (tissue pixels whose centre lies in it)."""
    return float((tissue.mask & area_on_tissue_grid(tissue, area)).sum()) * tissue.downsample**2


def area_on_tissue_grid(tissue: TissueMask, area: BaseGeometry) -> np.ndarray:
    """bool, the tissue mask's grid: the pixels whose centre lies in ``area``.

    Only the pixels within the area's bounds are tested: a whole slide's mask has tens of millions.
    """
    ds = tissue.downsample
    x0, y0, x1, y1 = area.bounds
    r0, c0 = max(int(y0 // ds), 0), max(int(x0 // ds), 0)
    r1, c1 = min(int(y1 // ds) + 1, tissue.mask.shape[0]), min(int(x1 // ds) + 1, tissue.mask.shape[1])
    within = np.zeros(tissue.mask.shape, bool)
    if r1 > r0 and c1 > c0:
        rows, cols = np.mgrid[r0:r1, c0:c1]
        within[r0:r1, c0:c1] = shapely.contains_xy(area, (cols + 0.5) * ds, (rows + 0.5) * ds)
    return within


def tissue_reasons(tissue: TissueMask | None, roi: BaseGeometry | None) -> list[dict]:
    """The suspect-tissue review reasons of the analysed area (the ROI's mask pixels, else all of them)."""
    if tissue is None:
        return []
    return tissue_review_reasons(tissue, within=None if roi is None else area_on_tissue_grid(tissue, roi))
