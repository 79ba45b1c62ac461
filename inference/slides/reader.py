"""The small protocol every image reader meets, and the one over a numpy array.

The pipeline sees pixels only through :class:`RegionReader`, so tests and the service's
pixel uploads pass an :class:`ArrayReader`, and the direct TIFF tile reader
(:mod:`inference.slides.tiff_tiles`) and the OpenSlide reader
(:mod:`inference.slides.openslide_reader`) meet here rather than through each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from inference.errors import SlideFormatError

BACKGROUND_RGB = (255, 255, 255)


class RegionReader(Protocol):
    """What the pipeline needs from an image: levels and RGB regions."""

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]: ...

    @property
    def level_downsamples(self) -> tuple[float, ...]: ...

    def read_region(self, location_xy: tuple[int, int], level: int, size_wh: tuple[int, int]) -> np.ndarray:
        """RGB uint8 array (height, width, 3); pixels outside the image are white."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class BlockRegion:
    """The one region read for a block of tiles (:func:`inference.analysis.tiling.block_region`).

    ``location_xy`` is in level-0 px; ``size_wh`` and every ``offsets_xy`` (a tile's top-left)
    are in px of the region read, each tile ``cut_px`` px square.
    """

    location_xy: tuple[int, int]
    size_wh: tuple[int, int]
    offsets_xy: list[tuple[int, int]]
    cut_px: int


@runtime_checkable
class ReducingReader(RegionReader, Protocol):
    """A :class:`RegionReader` that can box-average a region while decoding it, and has file properties."""

    @property
    def properties(self) -> dict[str, str]: ...

    def read_region_reduced(
        self, location_xy: tuple[int, int], level: int, size_wh: tuple[int, int], factor: int
    ) -> np.ndarray:
        """``read_region`` box-averaged by the integer ``factor`` (``size_wh`` in level px)."""
        ...


class ArrayReader:
    """A single-level :class:`RegionReader` over an RGB numpy array."""

    def __init__(self, rgb: np.ndarray):
        if rgb.ndim != 3 or rgb.shape[2] not in (3, 4) or rgb.dtype != np.uint8:
            raise SlideFormatError(
                f"expected an RGB(A) uint8 image of shape (height, width, 3|4), got {rgb.dtype} {rgb.shape}"
            )
        self._rgb = np.ascontiguousarray(rgb[..., :3])

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return ((self._rgb.shape[1], self._rgb.shape[0]),)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return (1.0,)

    def read_region(self, location_xy: tuple[int, int], level: int, size_wh: tuple[int, int]) -> np.ndarray:
        if level != 0:
            raise ValueError(f"an ArrayReader has only level 0, got level {level}")
        x, y = location_xy
        w, h = size_wh
        out = np.full((h, w, 3), BACKGROUND_RGB, dtype=np.uint8)
        img_h, img_w = self._rgb.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, img_w), min(y + h, img_h)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._rgb[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        pass
