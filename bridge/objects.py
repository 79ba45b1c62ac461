"""SlideResult -> QuPath objects, per the object contract (DESIGN.md §3).

Pure data in, :class:`~bridge.qupath_geojson.QuPathObject` out; the same objects go to paquo
or to GeoJSON. Every object this tool creates is recognisable by its class (or, for tiles,
by its name), so a re-run can replace them and leave everything else alone.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from shapely import affinity
from shapely.geometry import Point, box

from bridge.classes import (
    IMMUNE_NEGATIVE,
    IMMUNE_POSITIVE,
    INTENSITY_CLASSES,
    OTHER,
    PDL1_ANALYSIS,
    PDL1_FN_CANDIDATE,
    PDL1_POSITIVE,
    TUMOR_NEGATIVE,
    TUMOR_POSITIVE,
)
from bridge.qupath_geojson import QuPathObject, point_features, to_feature
from inference import Nuclei, RegionStats, SlideResult, UncertaintyTile

TILE_NAME = "PD-L1 uncertainty"
# The TPS of an H&E is a prediction (from morphology, by the nuclei ensemble); the TPS of a PD-L1 IHC is
# the measured score. Their measurement names say which.
PREDICTED_TPS = "PD-L1: Predicted TPS % (H&E)"
PREDICTED_TPS_LOW = "PD-L1: Predicted TPS low % (H&E)"
PREDICTED_TPS_HIGH = "PD-L1: Predicted TPS high % (H&E)"
# How far the image lies from the training domain of the model that analysed it (inference.analysis.domain).
OUT_OF_DOMAIN_SCORE = "PD-L1: Out of domain score"
STAIN_DISTANCE = "PD-L1: Stain distance deg"
OWN_ANNOTATION_CLASSES = frozenset({PDL1_POSITIVE.name, PDL1_FN_CANDIDATE.name})
OWN_DETECTION_CLASSES = frozenset(
    c.name for c in (TUMOR_POSITIVE, TUMOR_NEGATIVE, OTHER, *INTENSITY_CLASSES, IMMUNE_POSITIVE, IMMUNE_NEGATIVE)
)


# Signature measurements: objects carrying them were written by this tool. A pathologist's own
# "PD-L1 positive" annotation or QuPath's own cell detections never have them, so a re-run can
# replace exactly what an earlier run wrote.
OWN_ANNOTATION_SIGNATURE = "PD-L1 probability mean"
OWN_DETECTION_SIGNATURE = "PD-L1 positive probability"


def is_own_object(object_type: str, classification: str | None, name: str | None, measurement_names) -> bool:
    """True for objects an earlier run of this tool created (and a re-run replaces).

    >>> is_own_object("annotation", "PD-L1 positive", None, ["Area µm^2", "PD-L1 probability mean"])
    True
    >>> is_own_object("annotation", "PD-L1 positive", "drawn by hand", [])
    False
    >>> is_own_object("detection", "Tumor: Positive", None, ["Nucleus: Area"])
    False
    """
    names = set(measurement_names)
    if object_type == "tile":
        return name == TILE_NAME
    if object_type == "annotation":
        return classification in OWN_ANNOTATION_CLASSES and OWN_ANNOTATION_SIGNATURE in names
    if object_type in ("detection", "cell"):
        return classification in OWN_DETECTION_CLASSES and OWN_DETECTION_SIGNATURE in names
    return False


# Every measurement this tool puts on the analysed parent starts so (DESIGN.md §3); a re-run owns them all.
PARENT_MEASUREMENT_PREFIX = "PD-L1: "
# Every analysed parent carries this measurement (parent_measurements): how a re-run tells another analysed
# annotation, whose results are its own, from an annotation of yours that holds some of this tool's objects.
ANALYSED_SIGNATURE = "PD-L1: Uncertainty flag"


def stale_parent_measurements(names: Iterable[str], fresh: Mapping[str, float]) -> list[str]:
    """The parent's measurements an earlier run wrote that this run's ``fresh`` ones do not replace.

    Left in place, a re-run without nuclei (or after the stain was corrected, or with a model without
    domain statistics) kept the earlier run's TPS beside the new run's results. Others' measurements
    stay.

    >>> stale_parent_measurements(["Area µm^2", "PD-L1: TPS %", "PD-L1: Uncertainty flag"],
    ...                           {"PD-L1: Uncertainty flag": 0.0})
    ['PD-L1: TPS %']
    """
    return [n for n in names if n.startswith(PARENT_MEASUREMENT_PREFIX) and n not in fresh]


def region_measurements(region: RegionStats) -> dict[str, float]:
    out = {
        "Area µm^2": region.area_um2,
        "PD-L1 probability mean": region.prob_mean,
        "Predictive entropy mean": region.predictive_entropy_mean,
        "Expected entropy mean": region.expected_entropy_mean,
        "Mutual information mean": region.mutual_information_mean,
        "Probability std mean": region.prob_std_mean,
    }
    if region.sua_score is not None:
        out["SUA score"] = region.sua_score
    return out


def parent_measurements(result: SlideResult) -> dict[str, float]:
    """Summary measurements for the analysed parent annotation."""
    analysed = result.analysed_area_um2
    out: dict[str, float] = {}
    nuclei = result.nuclei
    if nuclei is not None:
        for name in nuclei.class_names:
            out[f"PD-L1: Num {name}"] = float(nuclei.count(name))
        if nuclei.intensity is not None:
            for grade, spec in enumerate(INTENSITY_CLASSES, start=1):
                out[f"PD-L1: Num {spec.name}"] = float((nuclei.intensity == grade).sum())
    if result.tps is not None and result.tps.percent is not None:
        if result.stain == "H-DAB":
            out["PD-L1: TPS %"] = result.tps.percent
        else:
            # Predicted from H&E: named so nobody takes it for the score of a PD-L1 immunostain.
            out[PREDICTED_TPS] = result.tps.percent
            for key, name in (("tps_low", PREDICTED_TPS_LOW), ("tps_high", PREDICTED_TPS_HIGH)):
                if result.summary.get(key) is not None:
                    out[name] = result.summary[key]
    if result.cps is not None and result.cps.percent is not None:
        out["PD-L1: CPS"] = result.cps.percent
    if result.summary.get("h_score") is not None:
        out["PD-L1: H-score"] = result.summary["h_score"]
    if result.maps is not None:
        out["PD-L1: SUA candidates"] = float(len(result.candidates))
    out |= {
        ANALYSED_SIGNATURE: 1.0 if result.uncertainty_flag else 0.0,
        "PD-L1: Positive area µm^2": result.positive_area_um2,
        "PD-L1: Positive area %": 100 * result.positive_area_um2 / analysed if analysed > 0 else float("nan"),
    }
    domain = result.summary.get("domain") or {}
    # Left out when not measured (a model without domain statistics): QuPath shows it as missing.
    for key, name in (("out_of_domain_score", OUT_OF_DOMAIN_SCORE), ("stain_distance_deg", STAIN_DISTANCE)):
        if domain.get(key) is not None:
            out[name] = float(domain[key])
    for key, name in (
        ("predictive_entropy_mean", "PD-L1: Predictive entropy mean"),
        ("mutual_information_mean", "PD-L1: Mutual information mean"),
        ("nuclei_entropy_mean", "PD-L1: Nuclei entropy mean"),
    ):
        value = result.summary.get(key)
        if value is not None:
            out[name] = value
    return out


def region_object(region: RegionStats) -> QuPathObject:
    return QuPathObject(region.polygon, "annotation", PDL1_POSITIVE.name, region_measurements(region))


def candidate_object(candidate: RegionStats) -> QuPathObject:
    return QuPathObject(candidate.polygon, "annotation", PDL1_FN_CANDIDATE.name, region_measurements(candidate))


def tile_object(t: UncertaintyTile) -> QuPathObject:
    """The tile detection of one uncertainty grid cell: its box, or its outline trimmed to the analysed ROI."""
    return QuPathObject(
        t.outline if t.outline is not None else box(t.x, t.y, t.x + t.width, t.y + t.height),
        "tile",
        None,
        {
            "PD-L1 probability": t.prob,
            "Predictive entropy": t.predictive_entropy,
            "Expected entropy": t.expected_entropy,
            "Mutual information": t.mutual_information,
            "Probability std": t.prob_std,
            "Tissue fraction": t.tissue_fraction,
        },
        name=TILE_NAME,
    )


def _nucleus_measurements(nuclei: Nuclei) -> dict[str, np.ndarray]:
    columns = {"Class probability": nuclei.class_prob, "PD-L1 positive probability": nuclei.positive_prob}
    if nuclei.entropy is not None:
        columns["Predictive entropy"] = nuclei.entropy
    if nuclei.membrane_dab_od is not None:
        # The ring's 75th percentile, which grades the cell (it was named "mean", which it never was).
        columns["DAB membrane OD 75th percentile"] = nuclei.membrane_dab_od
    if nuclei.pdl1_entropy is not None:
        columns["PD-L1 predictive entropy"] = nuclei.pdl1_entropy  # NaN (left out) where no call was made
    return columns


def qupath_classes(nuclei: Nuclei) -> tuple[tuple[str, ...], np.ndarray]:
    """The QuPath class names and each nucleus's index into them.

    An IHC result's positive tumour cells take QuPath's graded classes ``Tumor: 1+``/``2+``/``3+`` by
    their membrane intensity; every other nucleus keeps its model class.
    """
    if nuclei.intensity is None:
        return nuclei.class_names, nuclei.cls
    names = (*nuclei.class_names, *(c.name for c in INTENSITY_CLASSES))
    positive = nuclei.cls == nuclei.class_names.index(TUMOR_POSITIVE.name)
    graded = len(nuclei.class_names) - 1 + np.clip(nuclei.intensity, 1, 3)
    return names, np.where(positive, graded, nuclei.cls)


def nucleus_object(nuclei: Nuclei, i: int) -> QuPathObject:
    """Nucleus ``i`` as a point detection with its class and scores."""
    return next(_nucleus_objects(nuclei, range(i, i + 1)))


def _nucleus_objects(nuclei: Nuclei, indices: Iterable[int]) -> Iterator[QuPathObject]:
    # The classes and columns are worked out once for all nuclei, not once per nucleus (an IHC result's
    # graded classes are arrays over every nucleus).
    names, cls = qupath_classes(nuclei)
    columns = _nucleus_measurements(nuclei)
    for i in indices:
        x, y = nuclei.xy[i]
        measurements = {name: float(column[i]) for name, column in columns.items()}
        yield QuPathObject(Point(float(x), float(y)), "detection", names[int(cls[i])], measurements)


def nucleus_features(
    nuclei: Nuclei,
    start: int = 0,
    stop: int | None = None,
    *,
    scale: float = 1.0,
    origin_xy: tuple[float, float] = (0.0, 0.0),
) -> Iterator[dict[str, Any]]:
    """GeoJSON features of nuclei ``start:stop``, as ``to_feature(nucleus_object(...))`` gives them, from the arrays.

    ``scale`` and ``origin_xy`` map the points to level-0 px (``x * scale + origin_x``) when
    the result is of an uploaded region.
    """
    keep = slice(start, stop)
    names, cls = qupath_classes(nuclei)
    return point_features(
        nuclei.xy[keep] * scale + np.asarray(origin_xy, np.float64),
        names,
        cls[keep],
        {name: column[keep] for name, column in _nucleus_measurements(nuclei).items()},
    )


def region_objects(result: SlideResult) -> Iterator[QuPathObject]:
    return map(region_object, result.regions)


def candidate_objects(result: SlideResult) -> Iterator[QuPathObject]:
    return map(candidate_object, result.candidates)


def tile_objects(result: SlideResult) -> Iterator[QuPathObject]:
    return map(tile_object, result.tiles)


def nucleus_objects(result: SlideResult) -> Iterator[QuPathObject]:
    """Nuclei as point detections with their class and scores."""
    nuclei = result.nuclei
    if nuclei is None:
        return iter(())
    return _nucleus_objects(nuclei, range(len(nuclei)))


def feature_page(
    result: SlideResult,
    outputs: Collection[str],
    offset: int,
    limit: int,
    *,
    scale: float = 1.0,
    origin_xy: tuple[float, float] = (0.0, 0.0),
) -> tuple[list[dict[str, Any]], int]:
    """GeoJSON features ``offset`` to ``offset + limit`` of the chosen outputs, and their total.

    The order is regions, SUA candidates, uncertainty tiles, nuclei. Only the page's features
    are built: a whole slide has hundreds of thousands of nuclei, and building them all for
    each page made fetching a result quadratic in its size. ``scale`` and ``origin_xy`` map
    the geometry of an uploaded region's result to the image's level-0 px.

    A PD-L1 IHC result's cells come whether or not ``outputs`` names ``nuclei``: they are what its
    TPS, CPS and counts on the parent were measured from (QuPath's own ``Positive %`` counts them),
    and ``pdl1 run`` writes them likewise (:func:`result_objects`).
    """

    def feature(obj: QuPathObject) -> dict[str, Any]:
        if (scale, *origin_xy) != (1.0, 0.0, 0.0):
            obj = dataclasses.replace(
                obj, geometry=affinity.affine_transform(obj.geometry, [scale, 0, 0, scale, *origin_xy])
            )
        return to_feature(obj)

    nuclei = result.nuclei
    kinds: list[tuple[int, Callable[[int, int], Iterator[dict[str, Any]]]]] = []
    for name, items, build in (
        ("regions", result.regions, region_object),
        ("sua", result.candidates, candidate_object),
        ("uncertainty_tiles", result.tiles, tile_object),
    ):
        if name in outputs:
            kinds.append((len(items), lambda a, b, items=items, build=build: (feature(build(x)) for x in items[a:b])))
    if nuclei is not None and ("nuclei" in outputs or result.stain == "H-DAB"):
        kinds.append((len(nuclei), lambda a, b: nucleus_features(nuclei, a, b, scale=scale, origin_xy=origin_xy)))
    page: list[dict[str, Any]] = []
    start, stop = offset, offset + limit  # in the running index over all kinds
    for count, build_range in kinds:
        if max(start, 0) < min(stop, count):
            page += build_range(max(start, 0), min(stop, count))
        start, stop = start - count, stop - count
    return page, sum(count for count, _ in kinds)


def result_features(
    result: SlideResult, *, include_tiles: bool = True, parent: QuPathObject | None = None
) -> Iterator[dict[str, Any]]:
    """The GeoJSON of one result, streamed: the ``PD-L1 analysis`` parent first (or ``parent``, what stands for the
    annotation or TMA core analysed), then its children."""
    objects = itertools.chain(
        (analysis_annotation(result) if parent is None else parent,),
        region_objects(result),
        candidate_objects(result),
        tile_objects(result) if include_tiles else (),
    )
    features = map(to_feature, objects)
    if result.nuclei is None:
        return features
    return itertools.chain(features, nucleus_features(result.nuclei))


def analysis_annotation(result: SlideResult) -> QuPathObject:
    """The ``PD-L1 analysis`` parent created when the pathologist drew no ROI: the whole image."""
    geometry = box(0, 0, result.image_width_px, result.image_height_px)
    return QuPathObject(geometry, "annotation", PDL1_ANALYSIS.name, parent_measurements(result), name="PD-L1 analysis")


def result_objects(result: SlideResult, *, include_tiles: bool = True) -> Iterator[QuPathObject]:
    """All child objects of one result, in the order QuPath should add them."""
    yield from region_objects(result)
    yield from candidate_objects(result)
    if include_tiles:
        yield from tile_objects(result)
    yield from nucleus_objects(result)
