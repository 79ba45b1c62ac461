"""A request's ROI (GeoJSON in level-0 px) as a geometry an analysis can use, or a 422 saying why not."""

from __future__ import annotations

import re
from typing import Any

import shapely
from shapely.errors import ShapelyError
from shapely.geometry import box, shape
from shapely.geometry.base import BaseGeometry

from bridge.qupath_geojson import scan_coordinates
from bridge.service.messages import clipped
from bridge.service.schemas import MAX_COORDINATE_PX
from inference import RoiError


def parse_roi(roi: dict[str, Any] | None, *, image_size_px: tuple[int, int] | None) -> BaseGeometry | None:
    """The request's ROI as a geometry; one no analysis could use is refused now (422), not as a job that fails.

    Unreadable, empty or invalid (self-intersecting, ...) is refused, and outside the image when the request
    says the image's size (else the endpoint checks it against the file's header: :func:`refuse_outside`).
    """
    if roi is None:
        return None
    kind = roi.get("type")
    whole = "or omit roi to analyse the whole tissue"
    if "coordinates" not in roi:  # shape() would say only "('coordinates')"
        raise RoiError(
            f"roi is a GeoJSON {kind} without 'coordinates'; expected rings of at least 4 [x, y] vertices in "
            f"level-0 px under 'coordinates', the first repeated last: send the annotation's outline as QuPath "
            f"gives it, {whole}"
        )
    scan = scan_coordinates(roi["coordinates"])
    depth = scan.depth
    if depth > 4:  # shapely recursed into it: a RecursionError, a 500
        expected = "3 (rings of [x, y] vertices)" if kind == "Polygon" else "4 (polygons of rings of [x, y] vertices)"
        raise RoiError(
            f"roi's coordinates are nested {depth} lists deep; a GeoJSON {kind} nests {expected}: "
            f"send the annotation's outline as QuPath gives it, {whole}"
        )
    try:
        geometry = shape(roi)
    except (ShapelyError, ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise RoiError(
            f"roi is not a readable GeoJSON {kind} ({clipped(str(err))}); expected rings of at least 4 [x, y] "
            "vertices in level-0 px, the first repeated last: send the annotation's outline as QuPath gives it, "
            f"{whole}"
        ) from err
    if scan.stray is not None:  # shapely took ["0", "0"] as the numbers: a client that sends text may send others
        raise RoiError(
            f"roi is not a readable GeoJSON {kind} (a vertex holds text, {scan.stray}); expected rings of [x, y] "
            f"vertices as JSON numbers in level-0 px: send the annotation's outline as QuPath gives it, {whole}"
        )
    if geometry.is_empty:
        raise RoiError(f"roi is an empty {kind} (no vertices); send the annotation's outline in level-0 px, {whole}")
    if max(abs(v) for v in geometry.bounds) > MAX_COORDINATE_PX:
        # Queued, it failed with the vertex printed as a 300-digit number; no slide is 2^31 px across.
        bounds = ", ".join(f"{v:.4g}" for v in geometry.bounds)
        raise RoiError(
            f"roi has a vertex beyond {MAX_COORDINATE_PX:,.0f} px (bounds {bounds}); "
            f"expected level-0 px of this image, as QuPath's annotations are: send the annotation's outline, {whole}"
        )
    if not geometry.is_valid:
        # shapely says "Self-intersection[250 250]": where, as the (x, y) a user can find in QuPath.
        reason = re.sub(r"\[(\S+) (\S+)\]$", r" at (\1, \2)", shapely.is_valid_reason(geometry))
        if reason.startswith("Too few points"):  # a ring of fewer than 3 distinct vertices: nothing to redraw
            raise RoiError(
                f"roi is not a valid {kind} ({reason}): a ring has fewer than 3 distinct vertices, so it encloses "
                "no area; expected rings of at least 4 [x, y] vertices in level-0 px, the first repeated last: send "
                f"the annotation's outline as QuPath gives it, {whole}"
            )
        raise RoiError(
            f"roi is not a valid {kind} ({reason}); expected an outline that does not cross or touch itself: "
            f"redraw the annotation in QuPath, {whole}"
        )
    if image_size_px is not None:
        refuse_outside(geometry, image_size_px, size_from="image_size_px")
    return geometry


def refuse_outside(geometry: BaseGeometry, image_size_px: tuple[int, int], *, size_from: str) -> None:
    """Refuse (422) an ROI that lies wholly outside an image of ``image_size_px`` (width, height), ``size_from``
    saying where that size came from (the request's ``image_size_px``, or the file's header); one that overhangs
    the image is fine (the analysis clips it, as QuPath's own ROIs may overhang)."""
    width, height = image_size_px
    if geometry.intersection(box(0, 0, width, height)).area <= 0:
        x0, y0, x1, y1 = (round(v) for v in geometry.bounds)
        raise RoiError(
            f"roi ({x0}, {y0})-({x1}, {y1}) lies outside the image of {width} x {height} px ({size_from}); "
            "expected level-0 px of this image, as QuPath's annotations are: send the ROI of an annotation "
            "on this image, or omit roi to analyse the whole tissue"
        )
