"""From maps to things a pathologist sees: region polygons and uncertainty grid tiles."""

from __future__ import annotations

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

from inference.analysis.tiling import polygonal_part
from inference.analysis.vectorize import mask_to_polygons
from inference.results import RegionStats, UncertaintyMaps, UncertaintyTile

_MAP_FIELDS = ("prob", "predictive_entropy", "expected_entropy", "mutual_information", "prob_std")


def level0_mpp(maps: UncertaintyMaps) -> float:
    return maps.mpp / maps.downsample


def label_means(maps: UncertaintyMaps, labels: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Mean of every map over each label 0..n of ``labels`` (an int image on the maps' grid)."""
    flat = labels.ravel()
    counts = np.maximum(np.bincount(flat, minlength=n + 1).astype(np.float64), 1)
    return {
        name: np.bincount(flat, weights=np.asarray(getattr(maps, name)).ravel(), minlength=n + 1) / counts
        for name in _MAP_FIELDS
    }


def region_from(
    polygon, means: dict[str, np.ndarray], label: int, maps: UncertaintyMaps, *, sua_score: float | None = None
) -> RegionStats:
    """A :class:`RegionStats` for ``label`` with its level-0 polygon and map means."""
    return RegionStats(
        polygon=polygon,
        area_um2=float(polygon.area * level0_mpp(maps) ** 2),
        prob_mean=float(means["prob"][label]),
        predictive_entropy_mean=float(means["predictive_entropy"][label]),
        expected_entropy_mean=float(means["expected_entropy"][label]),
        mutual_information_mean=float(means["mutual_information"][label]),
        prob_std_mean=float(means["prob_std"][label]),
        sua_score=sua_score,
    )


def region_stats(
    maps: UncertaintyMaps, mask: np.ndarray, *, min_area_um2: float, simplify_px: float = 1.0
) -> tuple[RegionStats, ...]:
    """Vectorise ``mask`` (bool, on the maps' grid) into regions with the map means over each one.

    Islands under ``min_area_um2`` are dropped.
    """
    min_area_px = min_area_um2 / maps.mpp**2
    polygons, labels = mask_to_polygons(
        mask, downsample=maps.downsample, origin_xy=maps.origin_xy, min_area_px=min_area_px, simplify_px=simplify_px
    )
    if not polygons:
        return ()
    means = label_means(maps, labels, len(polygons))
    return tuple(region_from(poly, means, i, maps) for i, poly in enumerate(polygons, start=1))


def positive_regions(
    maps: UncertaintyMaps, *, threshold: float, min_area_um2: float = 200.0, simplify_px: float = 1.0
) -> tuple[RegionStats, ...]:
    """Regions where the ensemble-mean probability is at least ``threshold``."""
    return region_stats(
        maps, (np.asarray(maps.prob) >= threshold) & maps.covered, min_area_um2=min_area_um2, simplify_px=simplify_px
    )


def uncertainty_tiles(
    maps: UncertaintyMaps,
    tissue_on_map: np.ndarray,
    *,
    tile_um: float = 64.0,
    image_size_wh: tuple[int, int] | None = None,
    roi: BaseGeometry | None = None,
) -> tuple[UncertaintyTile, ...]:
    """Mean map values over square cells of ``tile_um`` (covered pixels only); cells without tissue are left out.

    ``tissue_on_map`` is a bool mask of tissue on the maps' grid. With ``image_size_wh`` (level-0 px) the
    cells are clipped to the image: the last ones of a row or column are cut at its edge, and map pixels
    whose centre lies outside it (the sliding window's last tiles hang over the edge) count for nothing.
    With ``roi`` (a level-0 (Multi)Polygon, the analysed ROI) the cells are trimmed to it as QuPath's
    *Create tiles* with *Trim to ROI*: a cell the ROI does not wholly hold gets the ``outline`` cell box ∩
    ROI (its polygonal part; a cell with no area in the ROI is left out), and map pixels whose centre lies
    outside the ROI count for nothing. ``x``, ``y``, ``width``, ``height`` stay the cell's box.

    ``tissue_fraction`` is the share of a tile's counted map pixels (centre in the image, and in the ROI)
    that are tissue: of the trimmed tile's area, to a map pixel.

    >>> from shapely.geometry import Polygon
    >>> from inference.results import UncertaintyMaps
    >>> z = np.zeros((4, 4), np.float32)
    >>> maps = UncertaintyMaps(z + 0.5, z, z, z, z, np.ones((4, 4), bool), (0.0, 0.0), 16.0, 8.0)
    >>> [(t.x, t.width, t.height) for t in uncertainty_tiles(maps, np.ones((4, 4), bool), tile_um=32.0,
    ...                                                        image_size_wh=(40, 64))]
    [(0.0, 40.0, 64.0)]

    A triangle over the first cell (64 x 64 level-0 px, 4 x 4 map px) holds 6 of its 16 pixel centres,
    3 of them tissue:

    >>> tissue = np.zeros((4, 4), bool); tissue[:, 0] = True
    >>> (t,) = uncertainty_tiles(maps, tissue, tile_um=32.0, roi=Polygon([(0, 0), (64, 0), (0, 64)]))
    >>> (t.x, t.width, t.outline.area, t.tissue_fraction)
    (0.0, 64.0, 2048.0, 0.5)
    """
    cell = max(1, round(tile_um / maps.mpp))
    h, w = maps.shape
    hc, wc = -(-h // cell), -(-w // cell)

    def block_sum(a: np.ndarray) -> np.ndarray:
        padded = np.zeros((hc * cell, wc * cell), np.float64)
        padded[:h, :w] = a
        return padded.reshape(hc, cell, wc, cell).sum(axis=(1, 3))

    covered = np.asarray(maps.covered)
    x0, y0 = maps.origin_xy
    ds = maps.downsample
    centres_x = x0 + (np.arange(w) + 0.5) * ds
    centres_y = y0 + (np.arange(h) + 0.5) * ds
    counted = None  # the map pixels that count: centre in the image and in the ROI
    if image_size_wh is not None:
        inside_x = (centres_x >= 0) & (centres_x < image_size_wh[0])
        inside_y = (centres_y >= 0) & (centres_y < image_size_wh[1])
        counted = np.broadcast_to(inside_y[:, None] & inside_x[None, :], (h, w))
    if roi is not None:
        shapely.prepare(roi)
        in_roi = shapely.contains_xy(roi, centres_x[None, :], centres_y[:, None])
        counted = in_roi if counted is None else counted & in_roi
    if counted is not None:
        covered = covered & counted
        in_area = block_sum(counted)
    else:
        in_area = np.full((hc, wc), float(cell * cell))
    n_cov = block_sum(covered)
    tissue = block_sum(tissue_on_map & covered)
    sums = {name: block_sum(np.where(covered, getattr(maps, name), 0.0)) for name in _MAP_FIELDS}
    size0 = cell * ds
    rows, cols = np.nonzero(tissue > 0)
    left, top = x0 + cols * size0, y0 + rows * size0
    right, bottom = left + size0, top + size0
    if image_size_wh is not None:
        left, top = np.maximum(left, 0.0), np.maximum(top, 0.0)
        right, bottom = np.minimum(right, float(image_size_wh[0])), np.minimum(bottom, float(image_size_wh[1]))
    outlines: list[Polygon | MultiPolygon | None] = [None] * len(rows)
    if roi is not None and len(rows):
        boxes = shapely.box(left, top, right, bottom)
        cut = np.flatnonzero(~shapely.covers(roi, boxes))
        for i, trimmed in zip(cut, shapely.intersection(boxes[cut], roi), strict=True):
            outlines[i] = polygonal_part(trimmed)
    out = []
    for i, (r, c) in enumerate(zip(rows, cols, strict=True)):
        outline = outlines[i]
        if outline is not None and not outline.area > 0:
            continue  # touches the ROI only along its outline
        k = n_cov[r, c]
        out.append(
            UncertaintyTile(
                x=float(left[i]),
                y=float(top[i]),
                width=float(right[i] - left[i]),
                height=float(bottom[i] - top[i]),
                prob=float(sums["prob"][r, c] / k),
                predictive_entropy=float(sums["predictive_entropy"][r, c] / k),
                expected_entropy=float(sums["expected_entropy"][r, c] / k),
                mutual_information=float(sums["mutual_information"][r, c] / k),
                prob_std=float(sums["prob_std"][r, c] / k),
                tissue_fraction=float(tissue[r, c] / in_area[r, c]),
                outline=outline,
            )
        )
    return tuple(out)


def resample_nearest(
    values: np.ndarray,
    *,
    downsample: float,
    origin_xy: tuple[float, float],
    shape_hw: tuple[int, int],
    out_downsample: float,
    out_origin_xy: tuple[float, float] = (0.0, 0.0),
    fill: int | float | bool,
) -> np.ndarray:
    """``values`` (a grid of ``downsample`` level-0 px per pixel starting at ``origin_xy``) read at the pixel
    centres of a grid of ``shape_hw`` pixels of ``out_downsample`` level-0 px starting at ``out_origin_xy``;
    ``fill`` where those centres lie outside ``values``. Nearest neighbour: labels stay labels.

    >>> resample_nearest(np.array([[1, 2], [3, 4]]), downsample=2, origin_xy=(2, 0), shape_hw=(2, 4),
    ...                  out_downsample=1, fill=0).tolist()
    [[0, 0, 1, 1], [0, 0, 1, 1]]
    """
    values = np.asarray(values)
    y = out_origin_xy[1] + (np.arange(shape_hw[0]) + 0.5) * out_downsample
    x = out_origin_xy[0] + (np.arange(shape_hw[1]) + 0.5) * out_downsample
    rows = np.floor((y - origin_xy[1]) / downsample).astype(np.int64)
    cols = np.floor((x - origin_xy[0]) / downsample).astype(np.int64)
    inside_r = (rows >= 0) & (rows < values.shape[0])
    inside_c = (cols >= 0) & (cols < values.shape[1])
    out = np.full(shape_hw, fill, dtype=values.dtype)
    out[np.ix_(inside_r, inside_c)] = values[np.ix_(rows[inside_r], cols[inside_c])]
    return out


def resample_mask(
    mask: np.ndarray,
    mask_downsample: float,
    *,
    shape_hw: tuple[int, int],
    origin_xy: tuple[float, float],
    downsample: float,
) -> np.ndarray:
    """Nearest-neighbour sample of a level-0-anchored mask onto another grid (origin, downsample, shape)."""
    return resample_nearest(
        np.asarray(mask, bool),
        downsample=mask_downsample,
        origin_xy=(0.0, 0.0),
        shape_hw=shape_hw,
        out_downsample=downsample,
        out_origin_xy=origin_xy,
        fill=False,
    )


def mask_on_maps(mask: np.ndarray, mask_downsample: float, maps: UncertaintyMaps) -> np.ndarray:
    """A level-0-anchored bool mask (tissue, truth) sampled onto the maps' grid."""
    return resample_mask(
        mask, mask_downsample, shape_hw=maps.shape, origin_xy=maps.origin_xy, downsample=maps.downsample
    )


def share_away_from_points(
    mask: np.ndarray, points_xy: np.ndarray, *, origin_xy: tuple[float, float], downsample: float, radius_px: float
) -> float:
    """The share of ``mask``'s pixels farther than ``radius_px`` (level-0 px) from every point, 0 for an empty mask.

    ``mask`` is a map grid (``origin_xy``: its level-0 top-left, ``downsample``: level-0 px per map px);
    ``points_xy`` (N, 2) level-0 px. Measured between pixel centres on the map grid, so to about a pixel.

    >>> m = np.zeros((10, 10), bool); m[:, :5] = True        # the left half
    >>> share_away_from_points(m, np.array([[10.0, 50.0]]), origin_xy=(0, 0), downsample=10, radius_px=25)
    0.64
    >>> share_away_from_points(m, np.zeros((0, 2)), origin_xy=(0, 0), downsample=10, radius_px=25)
    1.0
    """
    from scipy import ndimage as ndi

    n = int(np.count_nonzero(mask))
    if n == 0:
        return 0.0
    seeds = np.ones(mask.shape, bool)  # False where a point lies
    if len(points_xy):
        col = np.floor((points_xy[:, 0] - origin_xy[0]) / downsample).astype(np.int64)
        row = np.floor((points_xy[:, 1] - origin_xy[1]) / downsample).astype(np.int64)
        inside = (row >= 0) & (row < mask.shape[0]) & (col >= 0) & (col < mask.shape[1])
        seeds[row[inside], col[inside]] = False
    if seeds.all():
        return 1.0
    distance_px = ndi.distance_transform_edt(seeds) * downsample
    return float(np.count_nonzero(mask & (distance_px > radius_px))) / n


# A positive map pixel counts as on tumour cells within this distance of a tumour nucleus (a cell or two).
OFF_TUMOUR_UM = 15.0
# Below this share of the analysed tissue predicted positive, the off-tumour share is a few map pixels' edges.
OFF_TUMOUR_MIN_POSITIVE_PCT = 1.0


def positive_off_tumour_pct(
    positive: np.ndarray, tumour_xy: np.ndarray, maps: UncertaintyMaps, *, level0_mpp: float
) -> float:
    """% of the predicted positive map area (``positive``, on ``maps``' grid) farther than :data:`OFF_TUMOUR_UM`
    from every tumour nucleus (``tumour_xy``, level-0 px): positive area the predicted TPS does not see."""
    return 100 * share_away_from_points(
        positive, tumour_xy, origin_xy=maps.origin_xy, downsample=maps.downsample, radius_px=OFF_TUMOUR_UM / level0_mpp
    )


# Half-width of the band of mean positive probability around the threshold counted as an unsettled call.
UNSETTLED_PROB_BAND = 0.2


def unsettled_positive_area_pct(
    prob: np.ndarray, analysed: np.ndarray, *, threshold: float, band: float = UNSETTLED_PROB_BAND
) -> float | None:
    """The analysed area whose mean positive probability lies within ``band`` of ``threshold``, as a % of the
    predicted positive area (probability >= ``threshold``, at least one map pixel); None without analysed tissue.

    How far the positive area could move if the ensemble were a little more or less sure: at 50 % it could be
    a quarter larger or smaller, the error #32 counts as a failed slide.

    >>> p = np.array([[0.9, 0.9, 0.6, 0.4, 0.1]])
    >>> unsettled_positive_area_pct(p, np.ones_like(p, bool), threshold=0.5)
    66.66666666666667
    """
    prob = np.asarray(prob)
    analysed = np.asarray(analysed, bool)
    if not analysed.any():
        return None
    unsettled = (prob >= threshold - band) & (prob < threshold + band) & analysed
    positive = (prob >= threshold) & analysed
    return 100 * int(np.count_nonzero(unsettled)) / max(int(np.count_nonzero(positive)), 1)
