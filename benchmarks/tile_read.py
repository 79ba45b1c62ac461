"""Tile read throughput from a phantom slide: decoding, resampling, block reads, read-ahead.

Tiles overlap as the segmentation's do (a quarter of the tile). The baseline reads every
tile on its own through OpenSlide, converts the region to a numpy array and then box-resizes
it, as the reader did first. Then: OpenSlide with the box reduce before conversion; the
JPEG tiles decoded directly (``inference.slides.tiff_tiles``); block reads (``read_grid_tiles``),
which decode the overlap between neighbouring tiles once; and read-ahead threads.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from benchmarks import Case, PhantomSlideBenchmark
from inference.analysis.tiling import read_grid_tiles, tile_grid


class TileRead(PhantomSlideBenchmark):
    """Tile read throughput (Mpx/s of tiles) from a phantom SVS: per-tile vs block reads, one thread vs read-ahead."""

    unit = "Mpx/s"
    tile_size_px = 512
    overlap_px = 128  # segment's default overlap_fraction 0.25
    read_mpp = 1.0  # a resampled read (level 0 at 0.5 µm/px, box-averaged by 2)

    def setup(self, *, quick: bool) -> None:
        self.open_phantom(4096 if quick else 8192, seed=3)
        self.grid = tile_grid(
            image_size_wh=self.slide.dimensions,
            tile_size_px=self.tile_size_px,
            overlap_px=self.overlap_px,
            downsample=self.read_mpp / self.slide.mpp.mean,
        )

    @property
    def mpx(self) -> float:
        return len(self.grid) * self.tile_size_px**2 / 1e6

    def _read_convert_then_resize(self, origin) -> np.ndarray:
        step = round(self.read_mpp / self.slide.mpp.mean)
        size = (self.tile_size_px * step, self.tile_size_px * step)
        rgb = self.openslide_only().read_region((int(origin[0]), int(origin[1])), 0, size)
        box = Image.Resampling.BOX
        return np.asarray(Image.fromarray(rgb).resize((self.tile_size_px, self.tile_size_px), box))

    def _baseline(self) -> float:
        for origin in self.grid.origins_xy:
            self._read_convert_then_resize(origin)
        return self.mpx

    def _run(self, workers: int, block_tiles: int, *, openslide_only: bool = False) -> float:
        slide = self.openslide_only() if openslide_only else self.slide
        tiles = read_grid_tiles(slide, self.grid, mpp=self.read_mpp, workers=workers, block_tiles=block_tiles)
        for _ in tiles:
            pass
        return self.mpx

    def cases(self) -> list[Case]:
        cases = [
            Case("OpenSlide, one thread, per tile, convert then resize (first reader)", self._baseline, baseline=True),
            Case("OpenSlide, one thread, per tile", lambda: self._run(0, 1, openslide_only=True)),
            Case("OpenSlide, one thread, blocks of 3x3 tiles", lambda: self._run(0, 3, openslide_only=True)),
        ]
        for workers in (0, 2):
            threads = "one thread" if workers == 0 else f"read-ahead, {workers} threads"
            for block in (1, 2, 3, 4):
                label = f"direct, {threads}, " + ("per tile" if block == 1 else f"blocks of {block}x{block} tiles")
                cases.append(Case(label, lambda workers=workers, block=block: self._run(workers, block)))
        return cases

    def conditions(self) -> dict[str, str]:
        return {
            "slide": f"phantom SVS {self.size_px}x{self.size_px} px, JPEG",
            "tiles": f"{len(self.grid)} x {self.tile_size_px} px at {self.read_mpp} µm/px",
            "overlap": f"{self.overlap_px} px",
        }
