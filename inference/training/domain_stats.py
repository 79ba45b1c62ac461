"""A model's training-domain statistics (:mod:`inference.analysis.domain`), computed from its training slides.

Each slide goes through the same sliding window an analysis runs (the segmentation ensemble's, or the
nuclei detector's for a nuclei model) with member 0 only, whose bottleneck the guard reads; its
stain is estimated on the same 8 µm/px thumbnail the pipeline uses. The review limits are calibrated
on in-domain slides the statistics did not see: held-out slides when given, else each training
slide scored against the statistics of the others (leave one slide out).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from inference.advice import SettingWords, library_setting
from inference.analysis.domain import (
    GUARDED_TASK_OF_STAIN,
    DomainStats,
    SlideStain,
    calibrate_limits,
    feature_score,
    fit_domain_stats,
    guarded,
    slide_stain,
    stain_distance_deg,
)
from inference.analysis.nuclei import detect_nuclei
from inference.analysis.segment import segment_slide
from inference.errors import MissingMppError, ResolutionError, StainError, raise_together
from inference.models.ensemble import Ensemble
from inference.models.features import capture_tile_features, feature_layers
from inference.models.manifest import Manifest, read_manifest, write_manifest
from inference.slides.slide import MppAdvice, header_mpp, open_slide, require_resolution
from inference.slides.stain_detect import detect_slide_stain
from inference.slides.tissue import TISSUE_METHOD_OF_STAIN, tissue_mask_for_slide
from inference.values import is_finite_number

log = logging.getLogger(__name__)

# The thumbnail's µm/px for stain and tissue, as PipelineConfig.tissue_mpp.
TISSUE_MPP = 8.0


def domain_sample(
    path: str | Path,
    ensemble: Ensemble,
    *,
    tissue_mpp: float = TISSUE_MPP,
    mpp: float | None = None,
    mpp_advice: MppAdvice | None = None,
) -> tuple[np.ndarray, SlideStain]:
    """One slide's tile features (N, D) from ``ensemble``'s member 0 and its stain, as an analysis sees them.

    ``mpp``: the slide's µm/px as its QuPath project states it, instead of the file's own (None: the file's).
    ``mpp_advice``: how the caller's user gives the µm/px of a slide that states none (:func:`open_slide`).
    """
    manifest = ensemble.manifest
    first = Ensemble(manifest, ensemble.members[:1], folder=ensemble.folder, device=ensemble.device)
    with open_slide(path, mpp=mpp, mpp_source="QuPath project", mpp_advice=mpp_advice) as slide:
        tissue = tissue_mask_for_slide(slide, mpp=tissue_mpp, method=TISSUE_METHOD_OF_STAIN[manifest.stain])
        with capture_tile_features(first) as captured:
            if manifest.task == "segmentation":
                segment_slide(slide, first, tissue=tissue)
            else:
                detect_nuclei(slide, first, tissue=tissue)
        stain = slide_stain(detect_slide_stain(slide, mpp=tissue_mpp), slide.thumbnail(mpp=tissue_mpp))
    return captured.array(), stain


def recorded_slide_mpp(manifest: Manifest, slides: Sequence[str | Path]) -> dict[str, float]:
    """The µm/px ``manifest``'s training recorded for those of ``slides`` it names (``training.config.slide_mpp``:
    the pixel size a QuPath project stated for a slide, which training read it at instead of its file's own),
    keyed by the slides as given (``str``), for :func:`compute_domain_stats`'s ``slide_mpp``.

    A slide is matched by its resolved path, so one given by another path to the same file counts; a slide not
    named there is not in the result (its file's own pixel size applies). Raises ``ValueError`` where the
    record is not a mapping of slide path to a positive number.

    >>> from inference.models.manifest import Manifest
    >>> m = Manifest(name="m", version="1", task="segmentation", architecture="a", architecture_kwargs={},
    ...              input_mpp=2.0, tile_size_px=64, normalization={}, class_names=("bg", "pos"), members=(),
    ...              training={"config": {"slide_mpp": {"/data/a.png": 0.5}}})
    >>> recorded_slide_mpp(m, ["/data/a.png", "/data/b.svs"])
    {'/data/a.png': 0.5}
    """
    config = manifest.training.get("config") if isinstance(manifest.training, dict) else None
    recorded = config.get("slide_mpp") if isinstance(config, dict) else None
    if recorded is None:
        return {}
    if not isinstance(recorded, dict) or not all(
        isinstance(k, str) and is_finite_number(v) and v > 0 for k, v in recorded.items()
    ):
        raise ValueError(
            f"the manifest's training.config.slide_mpp is {str(recorded)[:120]}; expected a mapping of slide path to "
            "µm/px (a positive number), as training writes it: correct it, or remove it to read every slide at "
            "its file's own pixel size"
        )
    by_file = {Path(path).resolve(): mpp for path, mpp in recorded.items()}
    return {str(s): by_file[Path(s).resolve()] for s in slides if Path(s).resolve() in by_file}


def compute_domain_stats(
    model_dir: str | Path,
    train_slides: Sequence[str | Path],
    *,
    held_out: Sequence[str | Path] = (),
    device: str = "cpu",
    on_progress: Callable[[int, int], None] | None = None,
    slide_mpp: Mapping[str, float] | None = None,
    mpp_advice: MppAdvice | None = None,
    setting: SettingWords = library_setting,
) -> DomainStats:
    """The statistics of ``model_dir``'s training domain from ``train_slides``, with calibrated limits.

    With ``held_out`` (in-domain slides not among ``train_slides``) the limits come from their scores;
    without, from each training slide scored against the other training slides' statistics (one
    training slide alone: no limits, so the guard measures but never flags). ``slide_mpp``: µm/px by slide
    path (as given) that replace those files' own, the pixel size their QuPath project states (as training
    read them, :func:`recorded_slide_mpp`); a slide not in it is read at its file's own, and one whose file states
    none (or one outside the plausible range) raises :class:`~inference.errors.MissingMppError`, its message ending
    with ``mpp_advice`` (how the caller's user gives one): every slide's is checked, from its header alone, before
    any slide is read, and all such slides are named in one error. A warning of too few slides to calibrate on
    names ``held_out`` in ``setting``'s words.
    """
    slide_mpp = dict(slide_mpp or {})
    manifest = read_manifest(model_dir)
    if not guarded(manifest.task, manifest.stain):
        judged = GUARDED_TASK_OF_STAIN.get(manifest.stain)
        by = f"its {judged} model's training domain" if judged else "no model's training domain"
        raise ValueError(
            f"{model_dir} is an {manifest.stain} {manifest.task} model, and the domain guard judges {manifest.stain} "
            f"images against {by}, so statistics stored here would never be read; compute them for the "
            f"{judged or 'analysing'} model of that stain instead"
        )
    ensemble = Ensemble.load(model_dir, task=manifest.task, device=device)
    train_slides = list(dict.fromkeys(str(p) for p in train_slides))  # a slide listed twice counts once
    held_out = [str(p) for p in held_out]
    if not train_slides:
        raise ValueError("domain statistics need the model's training slides; none were given")
    overlap = {Path(p).resolve() for p in train_slides} & {Path(p).resolve() for p in held_out}
    if overlap:
        raise ValueError(
            f"{sorted(str(p) for p in overlap)} are both training and held-out slides; the limits must be "
            "calibrated on slides the statistics did not see"
        )
    total = len(train_slides) + len(held_out)
    if on_progress is not None:  # before the checks, which read every slide's stain, and the first slide's tiles
        on_progress(0, total)
    _check_pixel_sizes([*train_slides, *held_out], slide_mpp, manifest, mpp_advice)
    for path in [*train_slides, *held_out]:
        _check_stain(path, manifest.stain, model_dir, mpp=slide_mpp.get(path), mpp_advice=mpp_advice)
    layers = ", ".join(name for name, _ in feature_layers(ensemble.members[0]))
    samples = []
    for i, path in enumerate([*train_slides, *held_out]):
        samples.append(domain_sample(path, ensemble, mpp=slide_mpp.get(path), mpp_advice=mpp_advice))
        log.info("%s: %d tiles", path, len(samples[-1][0]))
        if on_progress is not None:
            on_progress(i + 1, total)
    train, held = samples[: len(train_slides)], samples[len(train_slides) :]
    names = [Path(p).name for p in train_slides]
    _check_tiles(names, [len(f) for f, _ in train], leave_one_out=not held_out, model=manifest)
    calibrated_on = len(held_out) if held_out else len(train)
    # One held-out slide sets the limits alone; one training slide without held-out ones sets none (warned below).
    if calibrated_on < MIN_CALIBRATION_SLIDES and (held_out or calibrated_on > 1):
        log.warning(
            "the domain limits rest on %d slide%s: one odd slide sets them (limits of 100 and more were seen with "
            "two); give at least %d held-out slides (%s)",
            calibrated_on,
            "" if calibrated_on == 1 else "s",
            MIN_CALIBRATION_SLIDES,
            setting("held_out"),
        )
    stats = fit_domain_stats([f for f, _ in train], [s for _, s in train], slide_names=names, feature_layers=layers)
    if not held_out and len(train) < 2:
        log.warning(
            "one training slide and no held-out slides: the domain limits are not calibrated, so the domain guard "
            "will measure images against this slide but never flag one as out of domain; give held-out in-domain "
            "slides (%s), or train on two slides or more",
            setting("held_out"),
        )
        return stats
    if held_out:
        scored = [(Path(p).name, f, s, stats) for p, (f, s) in zip(held_out, held, strict=True)]
        how = "held-out in-domain slides"
    else:
        scored = []
        for i, name in enumerate(names):
            rest = [x for j, x in enumerate(train) if j != i]
            others = fit_domain_stats([f for f, _ in rest], [s for _, s in rest])
            scored.append((name, train[i][0], train[i][1], others))
        how = "each training slide against the other training slides' statistics (leave one slide out)"
    scores = [feature_score(f, st) for _, f, _, st in scored]
    stains = [stain_distance_deg(s, st) for _, _, s, st in scored]
    return calibrate_limits(
        stats,
        scores,
        stains,
        slide_names=[n for n, *_ in scored],
        how=how,
    )


# Fewer slides than this to calibrate the limits on draw a warning.
MIN_CALIBRATION_SLIDES = 3
# A colour call this clear against the model's stain refuses a slide that has no phantom truth to say its stain.
STAIN_REFUSAL_MARGIN_DEG = 10.0


def _check_pixel_sizes(
    paths: Sequence[str], slide_mpp: Mapping[str, float], manifest: Manifest, mpp_advice: MppAdvice | None
) -> None:
    """Refuse, before any slide is read, every slide that states no plausible pixel size, or one too coarse for
    ``manifest``'s model (its header alone read): one was found when its turn came, after minutes of work on those
    before it, and the next on the run after; a slide too coarse was read enlarged into detail the model never saw,
    where `pdl1 run` refuses it."""
    errors = []
    for path in paths:
        try:
            mpp = header_mpp(path, mpp=slide_mpp.get(path), mpp_source="QuPath project", mpp_advice=mpp_advice)
            require_resolution(
                mpp, manifest.input_mpp, reader=f"the model {manifest.name!r}", path=path, mpp_advice=mpp_advice
            )
        except (MissingMppError, ResolutionError) as err:
            errors.append(err)
    coarse = "" if all(isinstance(err, MissingMppError) for err in errors) else " or one too coarse for the model"
    raise_together(errors, f"{len(errors)} of {len(paths)} slides have no usable pixel size{coarse}, so none was read:")


def _check_stain(
    path: str | Path,
    stain: str,
    model_dir: str | Path,
    *,
    mpp: float | None = None,
    mpp_advice: MppAdvice | None = None,
) -> None:
    """Refuse a slide of another stain than the model's: its statistics would make the guard wave anything
    through (an H&E model given IHC slides set its limit at 252 against 2.6). A phantom's truth says its stain;
    another slide is judged by its colour, refused only on a clear call."""
    truth = Path(path).with_suffix(".truth") / "truth.json"
    found, how = None, ""
    if truth.is_file():
        try:
            found, how = json.loads(truth.read_text(encoding="utf-8")).get("stain"), f"its truth ({truth})"
        except (OSError, ValueError, AttributeError):
            found = None  # a damaged truth: the colour decides, as for any slide
    if found is None:
        with open_slide(path, mpp=mpp, mpp_source="QuPath project", mpp_advice=mpp_advice) as slide:
            colour = detect_slide_stain(slide, mpp=TISSUE_MPP)
        if colour.margin_deg >= STAIN_REFUSAL_MARGIN_DEG:
            found, how = colour.stain, f"its colour ({colour.reason})"
    if found is not None and found != stain:
        raise StainError(
            f"{path}: {how} says {found}, but {model_dir} is a model of {stain} slides; its domain statistics "
            f"must come from {stain} slides it was trained on (and held-out ones of that stain)"
        )


def _check_tiles(names: Sequence[str], tiles: Sequence[int], *, leave_one_out: bool, model: Manifest) -> None:
    """Enough tiles to fit statistics on: in all, and, leaving one slide out, in the others."""
    short = sum(tiles) < 2 or (leave_one_out and len(tiles) > 1 and any(sum(tiles) - n < 2 for n in tiles))
    if short:
        counts = ", ".join(f"{n}: {t}" for n, t in zip(names, tiles, strict=True))
        raise ValueError(
            f"too few tiles for domain statistics ({counts} tiles of {model.tile_size_px} px at {model.input_mpp:g} "
            "µm/px over tissue); give larger slides or more of them"
        )


def with_domain_stats(manifest: Manifest, stats: DomainStats) -> Manifest:
    """The manifest with ``stats`` under ``extra["domain"]``; members and checksums unchanged."""
    return replace(manifest, extra={**manifest.extra, "domain": stats.to_dict()})


def write_domain_stats(model_dir: str | Path, stats: DomainStats) -> Path:
    """Store ``stats`` in ``model_dir``'s manifest (rewritten whole; the weights are not touched)."""
    manifest = read_manifest(model_dir, verify=False)
    return write_manifest(model_dir, with_domain_stats(manifest, stats))


def write_training_domain_stats(
    model_dir: str | Path,
    slides: Sequence[str | Path],
    *,
    held_out: Sequence[str | Path] = (),
    device: str = "cpu",
    slide_mpp: Mapping[str, float] | None = None,
    setting: SettingWords = library_setting,
    on_progress: Callable[[int, int], None] | None = None,
) -> Manifest:
    """After training: the statistics of the training slides in the manifest, their limits calibrated on the
    ``held_out`` validation slides (in-domain, not trained on), or without them by leaving one slide out;
    each slide read at the pixel size training read it at (``slide_mpp``, see :func:`compute_domain_stats`);
    ``setting``: the words of :func:`compute_domain_stats`' advice; ``on_progress(done, total)``: its slides.

    Training never fails for them: where they cannot be computed (slides too small for two tiles), the
    manifest stays without (the guard then says "not measured") and a warning says why. A model the guard never
    reads (an H&E nuclei model: H&E is judged by the segmentation ensemble) gets none, and costs no pass.
    """
    manifest = read_manifest(model_dir, verify=False)
    if not guarded(manifest.task, manifest.stain):
        return manifest
    try:
        try:
            stats = compute_domain_stats(
                model_dir,
                slides,
                held_out=held_out,
                device=device,
                slide_mpp=slide_mpp,
                setting=setting,
                on_progress=on_progress,
            )
        except ValueError as err:
            if not held_out:
                raise
            log.warning("%s: domain limits not set on the validation slides (%s); leaving one out", model_dir, err)
            stats = compute_domain_stats(
                model_dir, slides, device=device, slide_mpp=slide_mpp, setting=setting, on_progress=on_progress
            )
    except ValueError as err:
        # `pdl1 domain-stats` on the same slides would refuse them for the same reason: the advice says so.
        log.warning(
            "%s: no domain statistics (%s); mend that, then compute them with `pdl1 domain-stats` (on the same slides "
            "it refuses them again)",
            model_dir,
            err,
        )
        return read_manifest(model_dir, verify=False)
    return read_manifest(write_domain_stats(model_dir, stats).parent, verify=False)
