"""The record of a job's result that ``GET /v1/jobs/{id}/record`` gives ``pdl1_analyze.groovy`` to save: what its
result pages put into QuPath, in the image's level-0 px, and its scores. The format, its reading and what orders it
against ``pdl1 run``'s output are :mod:`bridge.analysis_record`'s; building one from a ``SlideResult`` needs
``bridge.run``'s summary parts, which read the records in turn, so it lives here, beside the endpoint."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

import numpy as np
import shapely
from shapely import affinity
from shapely.geometry import box, mapping
from shapely.geometry.base import BaseGeometry

from bridge.analysis_record import ANNOTATION, NO_RUN, RECORD_FORMAT, RECORD_VERSION
from bridge.run import metadata_counts, model_provenance, result_scores, written_nuclei
from bridge.targets import NUCLEI_XY_DECIMALS, WHOLE_IMAGE, TargetNuclei, analysed_row, rows_to_json


def _rounded(geometry: BaseGeometry) -> BaseGeometry:
    return shapely.transform(geometry, lambda xy: np.round(xy, NUCLEI_XY_DECIMALS))


def analysis_record(
    result: Any,
    *,
    outputs: tuple[str, ...] | list[str],
    area: BaseGeometry | None,
    written_at: datetime,
    scale: float = 1.0,
    origin_xy: tuple[float, float] = (0.0, 0.0),
    target: str | None = None,
    target_type: str | None = None,
    after_run: str | None = None,
) -> dict[str, Any]:
    """The record of a job's result as its result pages hand it to QuPath (:func:`bridge.objects.feature_page`): the
    candidates where ``outputs`` name ``sua``, the regions where they name ``regions``, the nuclei where the pages
    carry them (``nuclei`` named, or a PD-L1 IHC's cells).

    ``area``: what the analysis covered in the analysed image's px (a path job's ROI; an upload's ROI pixels'
    outline); None: all of it. ``scale`` and ``origin_xy`` map an upload's px to the image's level-0 px
    (``x * scale + origin_x``), as its result pages are mapped. ``written_at`` must be timezone-aware.
    ``target`` and ``target_type``: the analysed parent's name as the script logs it and what it is
    (:func:`record_scores`). ``after_run``: the ``run_id`` of the ``summary.json`` the script found in the entry's
    folder, or :data:`NO_RUN` where it found none (the record's ``after_run`` null); None where it did not say (an
    earlier script): the record then has no ``after_run`` (module docstring).
    """
    if written_at.tzinfo is None:
        raise ValueError("written_at must be timezone-aware (UTC)")
    matrix = [scale, 0.0, 0.0, scale, *origin_xy]

    def level0(geometry: BaseGeometry) -> BaseGeometry:
        return affinity.affine_transform(geometry, matrix) if (scale, *origin_xy) != (1.0, 0.0, 0.0) else geometry

    image = box(0, 0, result.image_width_px, result.image_height_px)
    outline = level0(image if area is None else _within(area, image))
    candidates = [_rounded(level0(c.polygon)) for c in result.candidates] if "sua" in outputs else []
    regions = [level0(r.polygon).bounds for r in result.regions] if "regions" in outputs else []
    with_nuclei = result.nuclei is not None and ("nuclei" in outputs or result.stain == "H-DAB")
    nuclei = written_nuclei(result) if with_nuclei else TargetNuclei.none()
    nuclei = TargetNuclei(nuclei.xy * scale + np.asarray(origin_xy, np.float64), nuclei.class_index, nuclei.class_names)
    bounds = np.round(np.asarray(regions, np.float64).reshape(-1, 4), NUCLEI_XY_DECIMALS)
    said = {} if after_run is None else {"after_run": None if after_run == NO_RUN else after_run}
    return {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "written_at": written_at.isoformat(),
        "run_id": result.run_id,
        **said,
        "outline": mapping(outline),
        "candidates": [mapping(c) for c in candidates],
        "region_bounds": bounds.tolist(),
        "nuclei": nuclei.to_json(),
        "scores": record_scores(
            result,
            written_at=written_at,
            scale=scale,
            whole=(scale, *origin_xy) == (1.0, 0.0, 0.0),
            target=target,
            target_type=target_type or (WHOLE_IMAGE if area is None else None),
        ),
    }


def record_scores(
    result: Any,
    *,
    written_at: datetime,
    scale: float = 1.0,
    whole: bool = True,
    target: str | None = None,
    target_type: str | None = None,
) -> dict[str, Any]:
    """A record's ``scores``: ``summary``, what ``pdl1 run``'s summary holds of the result
    (:func:`bridge.run.result_scores`, its ``provenance`` the models and ``written_at``; ``mpp`` the image's level-0
    µm/px, the upload's over ``scale``; ``image_size_px`` None where ``whole`` is False: an upload's pixels are not
    the image); ``metadata_counts``, the cells its scores come from (to sum several records' TPS); ``target``, the
    target's row (:func:`bridge.targets.analysed_row`, as ``summary.json``'s ``targets`` keep it; ``target`` None
    where the script did not say the name: the reader names it by the parent's ID, ``target_type`` "annotation"
    where not said). Numbers that are not finite are left out (None), as JSON has none."""
    summary = result_scores(result)
    summary["mpp"] = float(result.mpp) / scale
    if not whole:
        summary["image_size_px"] = None
    summary["provenance"] = model_provenance(result, analysed_at=written_at)
    row = rows_to_json([analysed_row("", None, target or "", target_type or ANNOTATION, result)])[0]
    row["target"] = target
    del row["outline"]  # the record's own
    return _finite({"summary": summary, "metadata_counts": metadata_counts(result), "target": row})


def _finite(value: Any) -> Any:
    """``value`` with every float that is not finite as None (JSON has no NaN; numpy numbers as Python's)."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _within(area: BaseGeometry, image: BaseGeometry) -> BaseGeometry:
    """``area``'s polygons within the image: the analysis clips an ROI over the image's edge to it, and the record's
    outline (which `pdl1 report` draws) kept the part outside."""
    polygons = [g for g in shapely.get_parts(area.intersection(image)) if g.geom_type == "Polygon" and g.area > 0]
    if not polygons:
        return area
    return polygons[0] if len(polygons) == 1 else shapely.MultiPolygon(polygons)
