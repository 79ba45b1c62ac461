"""The domain guard: how far an image lies from what a model was trained on.

A model's manifest keeps statistics of its training domain (``extra["domain"]``, :class:`DomainStats`):

* its network's own view: for every training tile, the mean and standard deviation of each channel of
  member 0's feature layers (every U-Net encoder stage; the nuclei FCN's full-resolution stem, its
  stride-2 stage and its residual blocks): 240 numbers per tile for the demo segmentation U-Net, 160
  for the nuclei FCN. They are standardised channel by channel and summarised by probabilistic PCA
  (Tipping and Bishop): the top :data:`N_COMPONENTS` principal directions with their variances, and
  one variance for everything outside them, so a direction the training tiles never varied in still
  counts (an image that lights up a channel silent in training lies far away);
* the stains: each training slide's haematoxylin and second-stain optical density (OD) vectors
  (Macenko's extremes, :mod:`inference.slides.stain_detect`) and the median summed OD of its tissue.

An analysed image gets two distances (:func:`assess_domain`): the *out-of-domain score*, the median
over its tiles of the Mahalanobis distance (under that model) of the tile's features from the training
mean, divided by the same median over the training tiles (so about 1 for tiles like the training
tiles), and the *stain distance*, the larger of the angles between its stain vectors and the training
slides' mean vectors. Each is a review reason at or above its limit, calibrated on in-domain slides the
statistics never saw (:func:`calibrate_limits`). The median: a slide's edge tiles (mostly glass) or a
fold should not decide; a whole slide of unfamiliar tissue does.

Numpy only; the features come from :mod:`inference.models.features`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

# Bumped when what is stored changes meaning; a manifest with another version is "not measured".
DOMAIN_STATS_VERSION = 1
# Principal directions kept (at most; fewer with fewer training tiles).
N_COMPONENTS = 32
# The limits are this factor above the highest score of the in-domain calibration slides: room for
# in-domain variation the few calibration slides did not show.
LIMIT_MARGIN = 1.25
# Pixels whose summed OD exceeds this are tissue for the OD summary (stain_detect's TISSUE_OD).
TISSUE_OD = 0.25
# The model whose training domain an image of each stain is judged against: the one that makes the call (the
# segmentation ensemble on H&E, the IHC nuclei ensemble on H-DAB). Statistics in any other model are never read.
GUARDED_TASK_OF_STAIN = {"H&E": "segmentation", "H-DAB": "nuclei"}


def guarded(task: str, stain: str) -> bool:
    """Whether the domain guard reads the statistics of a ``task`` model trained on ``stain``."""
    return GUARDED_TASK_OF_STAIN.get(stain) == task


@dataclass(frozen=True)
class SlideStain:
    """The stain of one image: unit OD vectors (red, green, blue) and the median summed OD of its tissue."""

    haematoxylin_od: tuple[float, float, float]
    second_od: tuple[float, float, float]
    od_median: float

    @property
    def measured(self) -> bool:
        return all(math.isfinite(v) for v in (*self.haematoxylin_od, *self.second_od))


@dataclass(frozen=True)
class FeatureModel:
    """Probabilistic PCA of standardised tile features (see the module docstring).

    ``mean`` and ``scale`` (D,) standardise a feature vector; ``components`` (K, D) are orthonormal
    principal directions with ``variances`` (K,); ``residual_variance`` is the variance of every other
    direction (the mean of the remaining eigenvalues).
    """

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    residual_variance: float

    @property
    def dim(self) -> int:
        return len(self.mean)

    @property
    def fitted_on_too_little(self) -> bool:
        """Fewer principal directions than the guard keeps (:data:`N_COMPONENTS`) where the features have more: too
        few tiles to fit them (3 tiles gave 2 of 240 directions and a limit that flagged nothing)."""
        return len(self.components) < min(N_COMPONENTS, self.dim - 1)


@dataclass(frozen=True)
class DomainStats:
    """A model's training domain (see the module docstring); stored as ``manifest.extra["domain"]``.

    ``features`` models the training tiles' features; ``train_median_distance`` is their own median
    distance under it (the score's unit). ``haematoxylin_od`` and ``second_od`` are the training slides'
    mean unit stain vectors, ``od_range`` the lowest and highest median tissue OD of a training slide.
    ``feature_limit`` and ``stain_limit_deg`` are the review limits (None: not calibrated),
    ``calibration`` says on what; ``slides`` lists each training slide's tiles and stain.
    """

    features: FeatureModel
    train_median_distance: float
    train_tiles: int
    haematoxylin_od: tuple[float, float, float]
    second_od: tuple[float, float, float]
    od_range: tuple[float, float]
    feature_limit: float | None = None
    stain_limit_deg: float | None = None
    slides: tuple[dict[str, Any], ...] = ()
    calibration: dict[str, Any] = field(default_factory=dict)
    feature_layers: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; the model's arrays rounded to 6 significant digits."""
        f = self.features
        return {
            "version": DOMAIN_STATS_VERSION,
            "feature_layers": self.feature_layers,
            "feature_mean": _round(f.mean),
            "feature_scale": _round(f.scale),
            "components": _round(f.components),
            "component_variances": _round(f.variances),
            "residual_variance": float(f"{f.residual_variance:.6g}"),
            "train_median_distance": self.train_median_distance,
            "train_tiles": self.train_tiles,
            "haematoxylin_od": list(self.haematoxylin_od),
            "second_od": list(self.second_od),
            "od_range": list(self.od_range),
            "feature_limit": self.feature_limit,
            "stain_limit_deg": self.stain_limit_deg,
            "slides": list(self.slides),
            "calibration": self.calibration,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DomainStats:
        """The stats a manifest stores; ``ValueError`` saying what is wrong when they do not fit."""
        if raw.get("version") != DOMAIN_STATS_VERSION:
            raise ValueError(
                f"domain statistics of version {raw.get('version')!r}, this pdl1-bridge reads version "
                f"{DOMAIN_STATS_VERSION}: recompute them with `pdl1 domain-stats`"
            )
        mean = np.asarray(raw["feature_mean"], np.float64)
        scale = np.asarray(raw["feature_scale"], np.float64)
        comps = np.asarray(raw["components"], np.float64).reshape(-1, len(mean))
        variances = np.asarray(raw["component_variances"], np.float64)
        if mean.ndim != 1 or scale.shape != mean.shape or len(variances) != len(comps):
            raise ValueError(
                f"feature_mean {mean.shape}, feature_scale {scale.shape}, components {comps.shape} and "
                f"component_variances {variances.shape} do not fit together"
            )
        model = FeatureModel(mean, scale, comps, variances, float(raw["residual_variance"]))
        return cls(
            features=model,
            train_median_distance=float(raw["train_median_distance"]),
            train_tiles=int(raw["train_tiles"]),
            haematoxylin_od=tuple(raw["haematoxylin_od"]),
            second_od=tuple(raw["second_od"]),
            od_range=tuple(raw["od_range"]),
            feature_limit=raw.get("feature_limit"),
            stain_limit_deg=raw.get("stain_limit_deg"),
            slides=tuple(raw.get("slides", ())),
            calibration=dict(raw.get("calibration", {})),
            feature_layers=raw.get("feature_layers", ""),
        )


@dataclass(frozen=True)
class DomainAssessment:
    """How far one analysed image lies from a model's training domain.

    ``score`` is the out-of-domain score (1 ≈ a typical training tile), ``stain_distance_deg`` the stain
    distance; either is None when not measured (``why_not`` says why: no statistics in the manifest, no
    tiles, no tissue to estimate stains on). ``reasons`` are the review reasons (value over its limit).
    ``od_median`` beside the training slides' ``od_range`` is for information only: no review reason (no limit
    is calibrated for it), as the README's domain guard section says.
    """

    model: str
    score: float | None
    limit: float | None
    stain_distance_deg: float | None
    stain_limit_deg: float | None
    tiles: int
    od_median: float | None
    od_range: tuple[float, float] | None
    why_not: str = ""
    reasons: tuple[dict[str, Any], ...] = ()

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "out_of_domain_score": self.score,
            "limit": self.limit,
            "stain_distance_deg": self.stain_distance_deg,
            "stain_limit_deg": self.stain_limit_deg,
            "tiles": self.tiles,
            "od_median": self.od_median,
            "training_od_range": None if self.od_range is None else list(self.od_range),
            "measured": self.score is not None,
            "why_not": self.why_not,
        }


def _round(a: np.ndarray) -> list:
    return np.vectorize(lambda v: float(f"{v:.6g}"), otypes=[float])(np.asarray(a)).tolist()


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def angle_deg(a: Sequence[float], b: Sequence[float]) -> float:
    """Angle between two vectors in degrees.

    >>> round(angle_deg([1, 0, 0], [1, 1, 0]), 3)
    45.0
    """
    cos = float(_unit(np.asarray(a, float)) @ _unit(np.asarray(b, float)))
    return math.degrees(math.acos(min(1.0, max(-1.0, cos))))


def fit_feature_model(x: np.ndarray, *, n_components: int = N_COMPONENTS) -> FeatureModel:
    """Probabilistic PCA of tile features ``x`` (N, D), each channel standardised first.

    A channel's scale is floored at a thousandth of the largest (a channel that never varied in
    training gets a small finite scale, so any change there is far). At most N - 1 components.

    >>> x = np.array([[0.0, 0.0, 1.0], [2.0, 0.0, 1.0], [0.0, 2.0, 1.0], [2.0, 2.0, 1.0]])
    >>> m = fit_feature_model(x, n_components=1)
    >>> m.components.shape, round(float(m.variances[0]), 3), round(m.residual_variance, 3)
    ((1, 3), 1.0, 0.5)
    """
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"expected features of at least 2 tiles as (N, D), got shape {x.shape}")
    n, d = x.shape
    mean = x.mean(axis=0)
    sd = x.std(axis=0)
    scale = np.maximum(sd, 1e-3 * float(sd.max()) + 1e-9)
    z = (x - mean) / scale
    _, sing, vt = np.linalg.svd(z, full_matrices=False)
    eig = np.zeros(d)
    eig[: len(sing)] = sing**2 / n
    k = max(1, min(n_components, n - 1, d - 1))
    rest = eig[k:]
    residual = float(rest.mean()) if len(rest) else 0.0
    # Nothing left outside the components (or all of it constant): a floor keeps distances finite.
    residual = max(residual, 1e-6 * float(eig[0]) + 1e-12)
    return FeatureModel(mean, scale, vt[:k], np.maximum(eig[:k], residual), residual)


def feature_distance(features: np.ndarray, model: FeatureModel) -> np.ndarray:
    """Mahalanobis distance of each row of ``features`` (N, D) under the probabilistic PCA ``model``.

    >>> m = FeatureModel(np.zeros(2), np.ones(2), np.array([[1.0, 0.0]]), np.array([4.0]), 1.0)
    >>> feature_distance(np.array([[4.0, 0.0], [0.0, 3.0]]), m).tolist()
    [2.0, 3.0]
    """
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[1] != model.dim:
        raise ValueError(
            f"expected tile features (N, {model.dim}) as the domain statistics were computed, got shape "
            f"{features.shape}: the model's feature layers differ from the statistics'; recompute them with "
            "`pdl1 domain-stats`"
        )
    z = (features - model.mean) / model.scale
    proj = z @ model.components.T
    inside = (proj**2 / model.variances).sum(axis=1)
    outside = np.clip((z**2).sum(axis=1) - (proj**2).sum(axis=1), 0, None) / model.residual_variance
    return np.sqrt(inside + outside)


def tissue_od_median(rgb: np.ndarray) -> float:
    """Median summed optical density (R + G + B) of the tissue pixels of a uint8 RGB thumbnail.

    Glass is the brightest 1 % of pixels (per channel median), as :mod:`inference.slides.stain_detect`
    takes it; tissue is where the summed OD exceeds :data:`TISSUE_OD`. NaN when there is none.

    >>> rgb = np.full((10, 10, 3), 240, np.uint8); rgb[:5] = (120, 60, 150)
    >>> round(tissue_od_median(rgb), 3)
    2.53
    """
    # float32 and in place: a whole slide's thumbnail took about 70 bytes per pixel here in float64.
    px = np.asarray(rgb).reshape(-1, 3).astype(np.float32)
    if px.size == 0:
        return math.nan
    brightness = px.mean(axis=1)
    background = np.median(px[brightness >= np.quantile(brightness, 0.99)], axis=0)
    del brightness
    od = px  # -log((px + 1) / (background + 1)), clipped at 0, summed over R, G, B
    od += 1
    od /= background + 1
    np.log(od, out=od)
    np.negative(od, out=od)
    np.clip(od, 0, None, out=od)
    od = od.sum(axis=1, dtype=np.float64)
    tissue = od[od > TISSUE_OD]
    return float(np.median(tissue)) if len(tissue) else math.nan


def fit_domain_stats(
    features_by_slide: Sequence[np.ndarray],
    stains: Sequence[SlideStain],
    *,
    slide_names: Sequence[str] = (),
    feature_layers: str = "",
    n_components: int = N_COMPONENTS,
) -> DomainStats:
    """Training-domain statistics from each training slide's tile features (N_i, D) and stain.

    Raises ``ValueError`` when fewer than 2 tiles or no measured stain come.
    """
    parts = [np.asarray(f, np.float64) for f in features_by_slide if len(f)]
    if not parts:
        raise ValueError("no tile features: the training slides gave no tissue tiles")
    feats = np.concatenate(parts)
    model = fit_feature_model(feats, n_components=n_components)
    distances = feature_distance(feats, model)
    measured = [s for s in stains if s.measured]
    if not measured:
        raise ValueError("no training slide had tissue to estimate its stain vectors on")
    names = list(slide_names) or [f"slide {i}" for i in range(len(features_by_slide))]
    per_slide = [
        {
            "slide": name,
            "tiles": len(f),
            "haematoxylin_od": [round(float(v), 4) for v in s.haematoxylin_od],
            "second_od": [round(float(v), 4) for v in s.second_od],
            "od_median": round(float(s.od_median), 4),
        }
        for name, f, s in zip(names, features_by_slide, stains, strict=True)
    ]
    ods = [s.od_median for s in measured if math.isfinite(s.od_median)]
    return DomainStats(
        features=model,
        train_median_distance=float(np.median(distances)),
        train_tiles=len(feats),
        haematoxylin_od=tuple(float(v) for v in _unit(np.mean([s.haematoxylin_od for s in measured], axis=0))),
        second_od=tuple(float(v) for v in _unit(np.mean([s.second_od for s in measured], axis=0))),
        od_range=(min(ods), max(ods)) if ods else (math.nan, math.nan),
        slides=tuple(per_slide),
        feature_layers=feature_layers,
    )


def feature_score(features: np.ndarray, stats: DomainStats) -> float | None:
    """The out-of-domain score of an image's tile features (N, D); None without tiles.

    >>> m = FeatureModel(np.zeros(2), np.ones(2), np.array([[1.0, 0.0]]), np.array([1.0]), 1.0)
    >>> stats = DomainStats(m, 2.0, 10, (1, 0, 0), (0, 1, 0), (1.0, 2.0))
    >>> feature_score(np.array([[2.0, 0.0], [0.0, 4.0], [6.0, 8.0]]), stats)
    2.0
    """
    if len(features) == 0:
        return None
    d = feature_distance(features, stats.features)
    return float(np.median(d)) / max(stats.train_median_distance, 1e-12)


def stain_distance_deg(stain: SlideStain, stats: DomainStats) -> float | None:
    """The larger of the angles between an image's stain vectors and the training mean's; None unmeasured.

    >>> m = FeatureModel(np.zeros(2), np.ones(2), np.array([[1.0, 0.0]]), np.array([1.0]), 1.0)
    >>> stats = DomainStats(m, 1.0, 1, (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (1.0, 2.0))
    >>> round(stain_distance_deg(SlideStain((1.0, 0.0, 0.0), (0.0, 1.0, 1.0), 1.5), stats), 6)
    45.0
    """
    if not stain.measured:
        return None
    return max(angle_deg(stain.haematoxylin_od, stats.haematoxylin_od), angle_deg(stain.second_od, stats.second_od))


def assess_domain(
    features: np.ndarray | None, stain: SlideStain | None, stats: DomainStats | None, *, model: str
) -> DomainAssessment:
    """Score one image against a model's training domain and list the review reasons over the limits.

    ``features`` (N, D) are its tiles' features (None: not captured), ``stain`` its stain (None: not
    estimated), ``stats`` the model's (None: its manifest has none, so nothing is measured).
    """
    if stats is None:
        return DomainAssessment(
            model, None, None, None, None, 0, None, None, why_not="the model's manifest has no domain statistics"
        )
    if features is not None and len(features) and features.shape[1] != stats.features.dim:
        why = (
            f"the network gives {features.shape[1]} features per tile, the statistics hold {stats.features.dim}: "
            "they were computed for another model; recompute them with `pdl1 domain-stats`"
        )
        return DomainAssessment(model, None, None, None, None, len(features), None, None, why_not=why)
    n_tiles = 0 if features is None else len(features)
    score = None if features is None else feature_score(features, stats)
    stain_deg = None if stain is None else stain_distance_deg(stain, stats)
    why = []
    if score is None:
        why.append("no tiles analysed" if features is not None else "the network's features were not captured")
    if stain_deg is None:
        why.append("no tissue to estimate the stain vectors on")
    reasons = []
    if score is not None and stats.feature_limit is not None and score >= stats.feature_limit:
        reasons.append(
            {
                "reason": f"out of the training domain of {model}: network features",
                "value": score,
                "limit": stats.feature_limit,
            }
        )
    if stain_deg is not None and stats.stain_limit_deg is not None and stain_deg >= stats.stain_limit_deg:
        reasons.append(
            {
                "reason": f"out of the training domain of {model}: stain vectors (degrees)",
                "value": stain_deg,
                "limit": stats.stain_limit_deg,
            }
        )
    od = None if stain is None or not math.isfinite(stain.od_median) else stain.od_median
    return DomainAssessment(
        model=model,
        score=score,
        limit=stats.feature_limit,
        stain_distance_deg=stain_deg,
        stain_limit_deg=stats.stain_limit_deg,
        tiles=n_tiles,
        od_median=od,
        od_range=stats.od_range,
        why_not="; ".join(why),
        reasons=tuple(reasons),
    )


def calibrate_limits(
    stats: DomainStats,
    scores: Sequence[float | None],
    stain_distances: Sequence[float | None],
    *,
    slide_names: Sequence[str],
    how: str,
    margin: float = LIMIT_MARGIN,
) -> DomainStats:
    """``stats`` with limits ``margin`` x the highest score and stain distance of in-domain slides.

    ``scores`` and ``stain_distances`` are those slides' (unseen by ``stats``; None where not measured),
    in the order of ``slide_names``; ``how`` says how the slides were chosen (recorded with the limits).

    >>> m = FeatureModel(np.zeros(1), np.ones(1), np.ones((1, 1)), np.ones(1), 1.0)
    >>> s = DomainStats(m, 1.0, 1, (1, 0, 0), (0, 1, 0), (1.0, 2.0))
    >>> c = calibrate_limits(s, [1.0, 1.2], [3.0, 4.0], slide_names=["a", "b"], how="held out", margin=1.25)
    >>> c.feature_limit, c.stain_limit_deg
    (1.5, 5.0)
    """
    if not len(scores) == len(stain_distances) == len(slide_names):
        raise ValueError(
            f"one score and stain distance per slide expected, got {len(scores)} and {len(stain_distances)} "
            f"for {len(slide_names)} slides"
        )
    measured = [v for v in scores if v is not None]
    measured_deg = [v for v in stain_distances if v is not None]
    if not measured or not measured_deg:
        raise ValueError("calibrating the domain limits needs at least one in-domain slide with tiles and tissue")
    if margin < 1:
        raise ValueError(f"margin must be >= 1 (the limit lies above the in-domain slides), got {margin}")
    return replace(
        stats,
        feature_limit=float(margin * max(measured)),
        stain_limit_deg=float(margin * max(measured_deg)),
        calibration={
            "how": how,
            "margin": margin,
            "slides": [
                {
                    "slide": name,
                    "score": None if v is None else round(float(v), 4),
                    "stain_distance_deg": None if d is None else round(float(d), 3),
                }
                for name, v, d in zip(slide_names, scores, stain_distances, strict=True)
            ],
        },
    )


def slide_stain(estimate: Any, thumbnail_rgb: np.ndarray) -> SlideStain:
    """An image's :class:`SlideStain` from its stain estimate (``haematoxylin_od`` and ``second_od``, as
    :class:`inference.slides.stain_detect.StainEstimate` has them) and the thumbnail it was made on."""
    return SlideStain(
        haematoxylin_od=tuple(float(v) for v in estimate.haematoxylin_od),
        second_od=tuple(float(v) for v in estimate.second_od),
        od_median=tissue_od_median(thumbnail_rgb),
    )


def stats_of_manifest(extra: dict[str, Any]) -> tuple[DomainStats | None, str]:
    """A manifest's domain statistics (its ``extra``) and, when there are none it can use, why not."""
    raw = extra.get("domain")
    if raw is None:
        return None, "the model's manifest has no domain statistics (compute them with `pdl1 domain-stats`)"
    try:
        return DomainStats.from_dict(raw), ""
    except (KeyError, TypeError, ValueError) as err:
        return None, f"the model's domain statistics are unusable ({err})"
