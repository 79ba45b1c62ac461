"""Masks to polygons: connected components traced along pixel edges, with holes."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from shapely import affinity
from shapely.geometry import MultiPolygon, Polygon
from skimage import measure


def _ring(contour_rc: np.ndarray) -> np.ndarray:
    # find_contours works on pixel centres (index i = centre); +0.5 moves to pixel-edge coordinates.
    return np.column_stack([contour_rc[:, 1] + 0.5, contour_rc[:, 0] + 0.5])


def _component_polygon(component: np.ndarray) -> Polygon | MultiPolygon:
    padded = np.pad(component, 1)
    filled = ndi.binary_fill_holes(padded)
    outer = max(measure.find_contours(filled.astype(np.float32), 0.5), key=len)
    shell = Polygon(_ring(outer) - 1)
    holes_mask, n_holes = ndi.label(filled & ~padded)
    holes = []
    for i in range(1, n_holes + 1):
        hole = np.pad(holes_mask[1:-1, 1:-1] == i, 1)
        ring = max(measure.find_contours(hole.astype(np.float32), 0.5), key=len)
        holes.append(Polygon(_ring(ring) - 1))
    poly = shell
    for hole in holes:
        poly = poly.difference(hole)
    return poly if poly.is_valid else poly.buffer(0)


def mask_to_polygons(
    mask: np.ndarray,
    *,
    downsample: float = 1.0,
    origin_xy: tuple[float, float] = (0.0, 0.0),
    min_area_px: float = 0.0,
    simplify_px: float = 0.0,
) -> tuple[list[Polygon | MultiPolygon], np.ndarray]:
    """Polygons (with holes) of the 4-connected components of a bool mask.

    Parameters
    ----------
    mask
        bool (height, width).
    downsample, origin_xy
        Map pixel (r, c) spans level-0 x in ``origin_x + [c, c + 1) * downsample``.
    min_area_px
        Components with fewer mask pixels are dropped (islands).
    simplify_px
        Douglas-Peucker tolerance in mask pixels (topology preserved).

    Returns
    -------
    polygons, labels
        Level-0 polygons in component order, and the int32 label image whose label ``i + 1``
        is ``polygons[i]`` (dropped islands are 0), for per-region statistics.

    Examples
    --------
    >>> m = np.zeros((5, 5), bool); m[1:4, 1:4] = True; m[2, 2] = False
    >>> polys, labels = mask_to_polygons(m)
    >>> len(polys), len(polys[0].interiors), int(labels.max())
    (1, 1, 1)
    """
    labels, _n = ndi.label(mask.astype(bool))
    out_labels = np.zeros(labels.shape, np.int32)
    polygons: list[Polygon | MultiPolygon] = []
    for index, slc in enumerate(ndi.find_objects(labels), start=1):
        if slc is None:
            continue
        component = labels[slc] == index
        if component.sum() < min_area_px:
            continue
        poly = _component_polygon(component)
        if simplify_px > 0:
            poly = poly.simplify(simplify_px, preserve_topology=True)
        if poly.is_empty:
            continue
        poly = affinity.translate(poly, slc[1].start, slc[0].start)
        poly = affinity.affine_transform(poly, [downsample, 0, 0, downsample, origin_xy[0], origin_xy[1]])
        polygons.append(poly)
        out_labels[slc][component] = len(polygons)
    return polygons, out_labels
