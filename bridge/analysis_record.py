"""The record of what one analysis by ``pdl1_analyze.groovy`` wrote into QuPath, so that ``pdl1 train --from-review``
can tell a pathologist's review from the tool's output (``bridge.labels.WrittenObjects``).

The service builds it (``GET /v1/jobs/{id}/record``: :func:`analysis_record`), in the image's level-0 px (an upload's
results mapped back as its result pages are); the script saves it verbatim, once it has put the job's results under
the analysed parent, as ``<project>/pdl1/<entry ID>/qupath_analyses/<parent ID>.json`` (:func:`record_path`; the
parent's QuPath ID, so a re-analysis of the parent replaces its record). It holds when it was written (UTC), the
analysed area (the parent's outline), the FN candidates (polygons), the bounds of the positive regions (to tell
whether the analysis's output is still in the image) and the nuclei as QuPath got them (arrays, as
:data:`~bridge.targets.TARGET_REGIONS_FILE` keeps them: a TMA core's cells as GeoJSON features would make it ten
times larger).

It also holds the analysis's scores (``scores``, :func:`record_scores`): what ``pdl1 run`` writes of one target in
a summary (TPS, CPS, areas, details with the review reasons and the domain, the models) and the target's row (its
name as the script logs it, as ``summary.json``'s ``targets`` lists them), so ``pdl1 report`` and
``pdl1 review-queue`` take an entry's records as a ``pdl1 run`` of its targets (``bridge.record_summary``). Records
written before the scores were kept (version 1 all the same) have none: ``--from-review`` reads them as before.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely import affinity
from shapely.errors import ShapelyError
from shapely.geometry import box, mapping, shape
from shapely.geometry.base import BaseGeometry

from bridge.targets import NUCLEI_XY_DECIMALS, WHOLE_IMAGE, TargetNuclei, analysed_row, rows_to_json

#: ``TargetRow.target_type`` of an analysed annotation (``bridge.run`` names it so).
ANNOTATION = "annotation"

#: The folder of an entry's records, in its sidecar folder ``<project>/pdl1/<entry ID>``.
QUPATH_ANALYSES = "qupath_analyses"
#: What a record says it is (``format``), and the version of its layout (``version``) this code reads and writes.
RECORD_FORMAT = "pdl1-bridge analysis record"
RECORD_VERSION = 1


def record_path(sidecar: Path, parent_id: str) -> Path:
    """Where ``pdl1_analyze.groovy`` saves the record of its analysis of a parent (its QuPath ID) of the entry whose
    sidecar folder (``<project>/pdl1/<entry ID>``) is given."""
    return sidecar / QUPATH_ANALYSES / f"{parent_id}.json"


def entry_records(sidecar: Path) -> list[Path]:
    """The records of an entry's analyses by ``pdl1_analyze.groovy`` (none where it left none), by name: not the
    ``.part`` files of a save that was interrupted."""
    folder = sidecar / QUPATH_ANALYSES
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


@dataclass(frozen=True)
class AnalysisRecord:
    """What one analysis wrote into QuPath under its parent, all in level-0 px.

    ``written_at``: when (timezone-aware, UTC); ``outline``: the analysed area (the parent's ROI; the image for a
    whole-image analysis); ``candidates``: the FN candidate polygons; ``region_bounds``: (R, 4) float64, each
    positive region's x0, y0, x1, y1; ``nuclei``: positions and the classes QuPath got; ``scores``: the analysis's
    scores (:func:`record_scores`; checked by ``bridge.record_summary``, which reads them), None where the file
    holds none (``pdl1 train --from-review`` needs none; ``pdl1 report`` names such a record as not reading).
    """

    written_at: datetime
    run_id: str | None
    outline: BaseGeometry
    candidates: tuple[BaseGeometry, ...]
    region_bounds: np.ndarray
    nuclei: TargetNuclei
    scores: dict[str, Any] | None = None


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
) -> dict[str, Any]:
    """The record of a job's result as its result pages hand it to QuPath (:func:`bridge.objects.feature_page`): the
    candidates where ``outputs`` name ``sua``, the regions where they name ``regions``, the nuclei where the pages
    carry them (``nuclei`` named, or a PD-L1 IHC's cells).

    ``area``: what the analysis covered in the analysed image's px (a path job's ROI; an upload's ROI pixels'
    outline); None: all of it. ``scale`` and ``origin_xy`` map an upload's px to the image's level-0 px
    (``x * scale + origin_x``), as its result pages are mapped. ``written_at`` must be timezone-aware.
    ``target`` and ``target_type``: the analysed parent's name as the script logs it and what it is
    (:func:`record_scores`).
    """
    from bridge.run import written_nuclei  # bridge.run imports much; the record is asked for once per job

    if written_at.tzinfo is None:
        raise ValueError("written_at must be timezone-aware (UTC)")
    matrix = [scale, 0.0, 0.0, scale, *origin_xy]

    def level0(geometry: BaseGeometry) -> BaseGeometry:
        return affinity.affine_transform(geometry, matrix) if (scale, *origin_xy) != (1.0, 0.0, 0.0) else geometry

    outline = level0(area if area is not None else box(0, 0, result.image_width_px, result.image_height_px))
    candidates = [_rounded(level0(c.polygon)) for c in result.candidates] if "sua" in outputs else []
    regions = [level0(r.polygon).bounds for r in result.regions] if "regions" in outputs else []
    with_nuclei = result.nuclei is not None and ("nuclei" in outputs or result.stain == "H-DAB")
    nuclei = written_nuclei(result) if with_nuclei else TargetNuclei.none()
    nuclei = TargetNuclei(nuclei.xy * scale + np.asarray(origin_xy, np.float64), nuclei.class_index, nuclei.class_names)
    bounds = np.round(np.asarray(regions, np.float64).reshape(-1, 4), NUCLEI_XY_DECIMALS)
    return {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "written_at": written_at.isoformat(),
        "run_id": result.run_id,
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
    from bridge.run import metadata_counts, model_provenance, result_scores

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


def _geometry(value: Any, what: str) -> BaseGeometry:
    try:
        geometry = shape(value)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError, ShapelyError) as err:
        raise ValueError(f"{what} is not a GeoJSON geometry ({err!r:.120})") from err
    if geometry.is_empty:
        raise ValueError(f"{what} is an empty geometry")
    return geometry


def read_analysis_record(path: Path) -> AnalysisRecord:
    """Read a record; one that does not read (not JSON, another format, a field of the wrong shape) raises
    ValueError saying what is wrong (an OSError where the file cannot be read)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 text ({err.reason} at byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON ({err})") from err
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
        said = data.get("format") if isinstance(data, dict) else None
        raise ValueError(f"not a {RECORD_FORMAT!r} (its 'format' is {said!r})")
    if data.get("version") != RECORD_VERSION:
        raise ValueError(
            f"version {data.get('version')!r}, this pdl1-bridge reads version {RECORD_VERSION} (a newer one wrote it?)"
        )
    try:
        written_at = datetime.fromisoformat(str(data["written_at"]))
    except (KeyError, ValueError) as err:
        raise ValueError(f"'written_at' is not an ISO time ({data.get('written_at')!r:.60})") from err
    if written_at.tzinfo is None:
        raise ValueError(f"'written_at' ({data['written_at']}) has no time zone; a record's time is UTC")
    candidates = data.get("candidates")
    if not isinstance(candidates, list):
        raise ValueError(f"'candidates' is not a list of geometries: {candidates!r:.80}")
    try:
        bounds = np.asarray(data.get("region_bounds"), np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"'region_bounds' is not a list of [x0, y0, x1, y1] ({err})") from err
    if bounds.size == 0:
        bounds = bounds.reshape(0, 4)
    if bounds.ndim != 2 or bounds.shape[1] != 4 or not np.isfinite(bounds).all():
        raise ValueError(f"'region_bounds' is not a list of [x0, y0, x1, y1] (shape {bounds.shape})")
    run_id = data.get("run_id")
    scores = data.get("scores")
    if scores is not None and not isinstance(scores, dict):
        raise ValueError(f"'scores' is not a JSON object: {scores!r:.80}")
    return AnalysisRecord(
        written_at=written_at,
        run_id=None if run_id is None else str(run_id),
        outline=_geometry(data.get("outline"), "'outline'"),
        candidates=tuple(_geometry(c, f"candidate {i + 1}") for i, c in enumerate(candidates)),
        region_bounds=bounds,
        nuclei=TargetNuclei.from_json(data.get("nuclei")),
        scores=scores,
    )
