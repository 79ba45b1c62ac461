"""Tile grids over a region of interest and the Gaussian weights that blend them.

Pure functions on numbers and arrays, apart from the model runner (as nnU-Net's
``compute_steps_for_sliding_window`` and ``compute_gaussian``). A tile is addressed by its
level-0 origin (x, y); its size is given in model pixels and in level-0 pixels through the
grid's ``downsample`` (level-0 px per model px).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, box
from shapely.geometry.base import BaseGeometry

from inference.errors import RoiError
from inference.slides.readahead import read_ahead
from inference.slides.reader import BlockRegion

if TYPE_CHECKING:
    import torch

    from inference.slides.slide import Slide

    # A tile's (H, W, 3) uint8 pixels: on the host, or on the model's device when the GPU decodes.
    TilePixels = np.ndarray | torch.Tensor


def compute_steps(extent_px: int, *, tile_px: int, max_step_px: int) -> list[int]:
    """Start offsets of tiles that cover ``extent_px`` with steps of at most ``max_step_px``.

    The steps are spread evenly so the first tile starts at 0 and the last ends at the
    extent (when the extent is at least one tile), as nnU-Net does.

    >>> compute_steps(1000, tile_px=512, max_step_px=256)
    [0, 244, 488]
    >>> compute_steps(300, tile_px=512, max_step_px=256)
    [0]
    """
    if tile_px <= 0 or max_step_px <= 0:
        raise ValueError(f"tile_px and max_step_px must be positive, got {tile_px}, {max_step_px}")
    if extent_px <= tile_px:
        return [0]
    n = math.ceil((extent_px - tile_px) / max_step_px) + 1
    actual = (extent_px - tile_px) / (n - 1)
    return [round(actual * i) for i in range(n)]


@lru_cache(maxsize=8)
def _gaussian_weights(tile_size_px: int, sigma_scale: float) -> np.ndarray:
    centre = (tile_size_px - 1) / 2
    sigma = tile_size_px * sigma_scale
    axis = np.exp(-0.5 * ((np.arange(tile_size_px) - centre) / sigma) ** 2)
    weights = np.outer(axis, axis).astype(np.float32)
    weights /= weights.max()
    # No zero weights: a pixel covered only by tile corners must still get a prediction.
    weights = np.maximum(weights, weights[weights > 0].min(), dtype=np.float32)
    weights.setflags(write=False)
    return weights


def gaussian_weights(tile_size_px: int, *, sigma_scale: float = 1 / 8) -> np.ndarray:
    """Importance map for blending overlapping tiles: float32 (tile, tile), max 1, all > 0.

    ``sigma = tile_size_px * sigma_scale`` (nnU-Net uses 1/8). The array is cached and read-only.

    >>> w = gaussian_weights(64)
    >>> w.shape, float(w.max()), bool((w > 0).all())
    ((64, 64), 1.0, True)
    """
    return _gaussian_weights(int(tile_size_px), float(sigma_scale))


@lru_cache(maxsize=8)
def _nnunet_gaussian_weights(tile_size_px: int, sigma_scale: float) -> np.ndarray:
    centre = tile_size_px // 2
    sigma = tile_size_px * sigma_scale
    radius = int(4.0 * sigma + 0.5)  # scipy's gaussian_filter truncates its kernel at 4 sigma
    offset = np.arange(tile_size_px) - centre
    axis = np.where(np.abs(offset) <= radius, np.exp(-0.5 * (offset / sigma) ** 2), 0.0)
    weights = np.outer(axis, axis)
    # nnU-Net's predictor holds the map in float16, scaled to a maximum of 10.
    weights = (weights / weights.max() * 10).astype(np.float16)
    weights[weights == 0] = weights[weights > 0].min()
    weights = weights.astype(np.float32)
    weights.setflags(write=False)
    return weights


def nnunet_gaussian_weights(tile_size_px: int, *, sigma_scale: float = 1 / 8) -> np.ndarray:
    """nnU-Net v2's importance map, as its predictor computes and stores it: float32 (tile, tile), max 10.

    It differs from :func:`gaussian_weights` in what nnU-Net does: the centre is the pixel
    ``tile // 2`` (not the tile's middle), the kernel is cut at 4 sigma, and the values are
    rounded to float16. Imported nnU-Net members are blended with it, so that their maps are
    nnU-Net's. The array is cached and read-only.

    >>> w = nnunet_gaussian_weights(64)
    >>> float(w.max()), float(w[32, 32]), bool((w > 0).all())
    (10.0, 10.0, True)
    """
    return _nnunet_gaussian_weights(int(tile_size_px), float(sigma_scale))


@dataclass(frozen=True)
class TileGrid:
    """Tiles to run, in deterministic row-major order.

    Attributes
    ----------
    origins_xy
        int64 (N, 2): level-0 top-left corner of each tile.
    origins_model_px
        int64 (N, 2): the same corners in model pixels (level-0 px / downsample).
    tile_size_px
        Tile edge in model pixels.
    downsample
        Level-0 pixels per model pixel.
    bounds_xy
        (x0, y0, x1, y1) level-0 box the grid covers.
    steps_x_model_px, steps_y_model_px
        Every column's and row's origin in model px, skipped tiles included.
    """

    origins_xy: np.ndarray
    origins_model_px: np.ndarray
    tile_size_px: int
    downsample: float
    bounds_xy: tuple[int, int, int, int]
    steps_x_model_px: tuple[int, ...]
    steps_y_model_px: tuple[int, ...]

    def columns_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """int64 (N,) column and row of each tile in the full grid, skipped tiles included."""
        col = np.searchsorted(np.asarray(self.steps_x_model_px), self.origins_model_px[:, 0])
        row = np.searchsorted(np.asarray(self.steps_y_model_px), self.origins_model_px[:, 1])
        return col, row

    def cores_model_px(self) -> np.ndarray:
        """float64 (N, 4) x0, y0, x1, y1 of the region each tile owns, in model px.

        Cores split the grid at the midpoints between neighbouring tile centres, so they
        partition the plane: a detection is kept by exactly one tile, the one whose centre
        is nearest along each axis (the outermost cores extend to infinity).
        """

        def bounds(steps: tuple[int, ...], idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            s = np.asarray(steps, np.float64)
            mids = (s[:-1] + s[1:]) / 2 + self.tile_size_px / 2
            lo = np.concatenate([[-np.inf], mids])
            hi = np.concatenate([mids, [np.inf]])
            return lo[idx], hi[idx]

        col, row = self.columns_rows()
        x0, x1 = bounds(self.steps_x_model_px, col)
        y0, y1 = bounds(self.steps_y_model_px, row)
        return np.column_stack([x0, y0, x1, y1])

    @property
    def tile_size_level0_px(self) -> int:
        return math.ceil(self.tile_size_px * self.downsample)

    def __len__(self) -> int:
        return len(self.origins_xy)


def validate_roi(roi: BaseGeometry, *, image_size_wh: tuple[int, int]) -> Polygon | MultiPolygon:
    """Check a level-0 ROI polygon and clip it to the image.

    Raises :class:`RoiError` for a geometry that is not a (multi)polygon, is invalid
    (self-intersecting, ...), is empty, or lies outside the image.
    """
    if not isinstance(roi, Polygon | MultiPolygon):
        raise RoiError(f"ROI must be a Polygon or MultiPolygon in level-0 pixels, got {roi.geom_type}")
    if roi.is_empty:
        raise RoiError("ROI is empty")
    if not roi.is_valid:
        reason = shapely.is_valid_reason(roi)
        raise RoiError(
            f"ROI geometry is invalid ({reason}); fix it in QuPath (e.g. Objects > Annotations > "
            "Simplify shape) or pass a valid polygon"
        )
    width, height = image_size_wh
    clipped = roi.intersection(box(0, 0, width, height))
    if clipped.is_empty or clipped.area <= 0:
        x0, y0, x1, y1 = (round(v) for v in roi.bounds)
        raise RoiError(
            f"ROI ({x0}, {y0})-({x1}, {y1}) lies outside the image of {width}x{height} px; "
            "ROI coordinates must be level-0 pixels of this image"
        )
    return clipped if isinstance(clipped, Polygon | MultiPolygon) else polygonal_part(clipped)


def polygonal_part(geometry: BaseGeometry) -> Polygon | MultiPolygon:
    """The polygons of ``geometry`` (an intersection's lines and points where shapes only touch dropped).

    >>> from shapely.geometry import GeometryCollection, LineString, box
    >>> polygonal_part(GeometryCollection([box(0, 0, 1, 1), LineString([(1, 1), (2, 2)])])).wkt
    'POLYGON ((1 0, 1 1, 0 1, 0 0, 1 0))'
    >>> polygonal_part(LineString([(1, 1), (2, 2)])).is_empty
    True
    """
    parts = [p for g in shapely.get_parts(geometry) for p in shapely.get_parts(g) if isinstance(p, Polygon)]
    if len(parts) == 1:
        return parts[0]
    return MultiPolygon(parts)


def rasterize_polygon(geometry: BaseGeometry, *, shape_hw: tuple[int, int], downsample: float) -> np.ndarray:
    """bool mask (height, width) of the pixels of a ``downsample`` grid whose centres lie in ``geometry``."""
    h, w = shape_hw
    ys, xs = np.mgrid[0:h, 0:w]
    return shapely.contains_xy(geometry, (xs + 0.5) * downsample, (ys + 0.5) * downsample)


def tile_grid(
    *,
    image_size_wh: tuple[int, int],
    tile_size_px: int,
    overlap_px: int,
    downsample: float,
    roi: BaseGeometry | None = None,
    tissue_mask: np.ndarray | None = None,
    tissue_downsample: float | None = None,
    align_px: int = 1,
) -> TileGrid:
    """Tiles of ``tile_size_px`` model px, overlapping by at least ``overlap_px``, over an ROI.

    Parameters
    ----------
    image_size_wh
        Level-0 (width, height) of the image.
    tile_size_px, overlap_px
        Tile edge and minimal overlap, in model pixels.
    downsample
        Level-0 pixels per model pixel (model mpp / slide mpp).
    roi
        Level-0 polygon; the whole image when None. Validated with :func:`validate_roi`.
    tissue_mask, tissue_downsample
        Optional bool mask of tissue with its level-0 px per mask px. Tiles that touch no
        tissue pixel (inside the ROI) are skipped, so every tissue pixel stays covered.
    align_px
        Tile origins in model px are multiples of this (so tiles pool onto a coarser map
        grid exactly); ``tile_size_px`` must be a multiple of it.
    """
    if overlap_px < 0 or overlap_px >= tile_size_px:
        raise ValueError(f"overlap_px must be in [0, tile_size_px), got {overlap_px} for tile {tile_size_px}")
    if align_px < 1 or tile_size_px % align_px:
        raise ValueError(f"tile_size_px {tile_size_px} must be a multiple of align_px {align_px}")
    width, height = image_size_wh
    area = validate_roi(roi, image_size_wh=image_size_wh) if roi is not None else box(0, 0, width, height)
    # The grid is laid out in model px (aligned cells), then mapped to level-0 px.
    x0, y0, x1, y1 = area.bounds
    cx0, cy0 = math.floor(x0 / downsample / align_px), math.floor(y0 / downsample / align_px)
    cx1, cy1 = math.ceil(x1 / downsample / align_px), math.ceil(y1 / downsample / align_px)
    tile_cells = tile_size_px // align_px
    step_cells = max(1, (tile_size_px - overlap_px) // align_px)
    xs = [(cx0 + s) * align_px for s in compute_steps(cx1 - cx0, tile_px=tile_cells, max_step_px=step_cells)]
    ys = [(cy0 + s) * align_px for s in compute_steps(cy1 - cy0, tile_px=tile_cells, max_step_px=step_cells)]
    gx, gy = np.meshgrid(np.asarray(xs, np.int64), np.asarray(ys, np.int64))
    origins_model = np.column_stack([gx.ravel(), gy.ravel()])  # row-major: y outer, x inner
    origins = np.round(origins_model * downsample).astype(np.int64)
    tile_l0 = math.ceil(tile_size_px * downsample)
    bx0, by0 = round(cx0 * align_px * downsample), round(cy0 * align_px * downsample)
    bx1, by1 = round(cx1 * align_px * downsample), round(cy1 * align_px * downsample)

    if tissue_mask is not None:
        if tissue_downsample is None or tissue_downsample <= 0:
            raise ValueError("tissue_downsample (level-0 px per mask px) is required with tissue_mask")
        wanted = tissue_mask.astype(bool)
        if roi is not None:
            wanted = wanted & rasterize_polygon(area, shape_hw=wanted.shape, downsample=tissue_downsample)
        # Summed-area table: the count of wanted mask pixels under each tile in O(1).
        sat = np.pad(wanted.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        mh, mw = wanted.shape
        c0 = np.clip(np.floor(origins[:, 0] / tissue_downsample).astype(np.int64), 0, mw)
        r0 = np.clip(np.floor(origins[:, 1] / tissue_downsample).astype(np.int64), 0, mh)
        c1 = np.clip(np.ceil((origins[:, 0] + tile_l0) / tissue_downsample).astype(np.int64), 0, mw)
        r1 = np.clip(np.ceil((origins[:, 1] + tile_l0) / tissue_downsample).astype(np.int64), 0, mh)
        counts = sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]
        keep = counts > 0
    elif roi is not None:
        tiles = shapely.box(origins[:, 0], origins[:, 1], origins[:, 0] + tile_l0, origins[:, 1] + tile_l0)
        keep = shapely.intersects(tiles, area)
    else:
        keep = np.ones(len(origins), bool)
    return TileGrid(
        origins_xy=origins[keep],
        origins_model_px=origins_model[keep],
        tile_size_px=tile_size_px,
        downsample=float(downsample),
        bounds_xy=(bx0, by0, bx1, by1),
        steps_x_model_px=tuple(int(v) for v in xs),
        steps_y_model_px=tuple(int(v) for v in ys),
    )


def tile_blocks(grid: TileGrid, *, block_tiles: int) -> list[np.ndarray]:
    """``grid``'s tile indices grouped into blocks of at most ``block_tiles`` x ``block_tiles`` neighbours.

    Blocks come in row-major order, and so do the tiles inside each block. ``block_tiles=1``
    gives one tile per block, in grid order.

    >>> grid = tile_grid(image_size_wh=(1000, 600), tile_size_px=200, overlap_px=0, downsample=1.0)
    >>> [b.tolist() for b in tile_blocks(grid, block_tiles=2)]
    [[0, 1, 5, 6], [2, 3, 7, 8], [4, 9], [10, 11], [12, 13], [14]]
    """
    if block_tiles < 1:
        raise ValueError(f"block_tiles must be >= 1, got {block_tiles}")
    if len(grid) == 0:
        return []
    # Positions in the full grid, skipped tiles included, so a block only ever holds tiles
    # that are neighbours on the slide.
    col, row = grid.columns_rows()
    block = (row // block_tiles) * (len(grid.steps_x_model_px) // block_tiles + 1) + col // block_tiles
    order = np.lexsort((col, row, block))
    return np.split(order, np.flatnonzero(np.diff(block[order])) + 1)


def block_region(grid: TileGrid, indices: np.ndarray, *, box_factor: int = 1) -> BlockRegion:
    """The region that holds tiles ``indices`` of ``grid``, on the model's pixel grid (its origin a tile's).

    ``box_factor`` > 1 measures the region in px of the level the caller box-averages.
    """
    tile, f = grid.tile_size_px, box_factor
    origins = grid.origins_model_px[indices]
    x0, y0 = (int(v) for v in origins.min(axis=0))
    x1, y1 = (int(v) + tile for v in origins.max(axis=0))
    return BlockRegion(
        location_xy=(round(x0 * grid.downsample), round(y0 * grid.downsample)),
        size_wh=((x1 - x0) * f, (y1 - y0) * f),
        offsets_xy=[(int(dx), int(dy)) for dx, dy in (origins - (x0, y0)) * f],
        cut_px=tile * f,
    )


def grid_block_reader(
    slide: Slide, grid: TileGrid, *, mpp: float, box_factor: int = 1
) -> Callable[[np.ndarray], list[np.ndarray]]:
    """``read(indices)``: the (T, T, 3) uint8 pixels of those tiles of ``grid``, from one region read.

    Neighbouring tiles overlap, and a slide's compressed tiles rarely line up with ours, so
    reading a block of tiles as one region decodes each slide pixel about once instead of
    once per tile that covers it. The block is read on the model's pixel grid (its origin is
    a tile origin) and the tiles are views into it, so every tile gets the same pixels as a
    read of its own wherever the step from the pyramid level is an integer.

    ``box_factor`` > 1 leaves the box averaging to the caller: the tiles come as the
    (T * box_factor)² pixels of the pyramid level that ``mpp`` averages (it must be that
    level's integer step, :meth:`Slide.integer_reduction`).
    """
    f = box_factor
    if f > 1:
        reduction = slide.integer_reduction(mpp)
        if reduction is None or reduction[1] != f:
            raise ValueError(f"box_factor {f} is not the integer step of reading {slide} at {mpp:g} µm/px")
        level = reduction[0]

    def read(indices: np.ndarray) -> list[np.ndarray]:
        region = block_region(grid, indices, box_factor=f)
        if f > 1:
            pixels = slide.read_region(region.location_xy, level, region.size_wh)
        else:
            pixels = slide.read_region_at_mpp(region.location_xy, region.size_wh, mpp=mpp)
        cut = region.cut_px
        return [pixels[dy : dy + cut, dx : dx + cut] for dx, dy in region.offsets_xy]

    return read


def read_grid_tiles(
    slide: Slide,
    grid: TileGrid,
    *,
    mpp: float,
    workers: int,
    block_tiles: int = 1,
    max_pending_tiles: int = 16,
    box_factor: int = 1,
    block_reader: Callable[[np.ndarray], Sequence[TilePixels]] | None = None,
) -> Iterator[tuple[int, TilePixels]]:
    """Yield ``(index, pixels)`` for every tile of ``grid``, read ahead on ``workers`` threads.

    Tiles are read in blocks of up to ``block_tiles`` x ``block_tiles`` (:func:`grid_block_reader`)
    and come in block order (:func:`tile_blocks`); ``block_tiles=1`` reads them one by one in
    grid order. About ``max_pending_tiles`` tiles (never fewer than ``workers`` blocks) wait
    in memory at most. ``box_factor`` > 1 yields the pyramid level's pixels for the caller to
    box-average (:func:`grid_block_reader`). ``block_reader`` replaces the reader of
    :func:`grid_block_reader` (one that decodes on the GPU: :class:`inference.slides.gpu_decode.DeviceBlockReader`).
    Closing the iterator early cancels the pending reads.
    """
    blocks = tile_blocks(grid, block_tiles=block_tiles)
    pending = max(workers, 1, math.ceil(max_pending_tiles / block_tiles**2))
    reader = block_reader or grid_block_reader(slide, grid, mpp=mpp, box_factor=box_factor)
    reads = read_ahead(reader, blocks, workers=workers, max_pending=pending)
    try:
        for indices, pixels in reads:
            yield from zip(indices.tolist(), pixels, strict=True)
    finally:
        reads.close()
