"""Tile read throughput from a phantom slide: the resampling step, and read-ahead on a thread pool.

The baseline converts the decoded level-0 region to a numpy array and then box-resizes it, as
the reader did before; ours box-reduces the decoded image first (``Slide.read_region_at_mpp``).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from benchmarks import Case, PhantomSlideBenchmark
from inference.readahead import read_ahead
from inference.tiling import tile_grid


class TileRead(PhantomSlideBenchmark):
    """Tile read throughput (Mpx/s) from a phantom SVS: one thread vs read-ahead."""

    unit = "Mpx/s"
    tile_size_px = 512
    read_mpp = 1.0  # a resampled read (level 0 at 0.5 µm/px, box-averaged by 2)

    def setup(self, *, quick: bool) -> None:
        self.open_phantom(4096 if quick else 8192, seed=3)
        self.grid = tile_grid(
            image_size_wh=self.slide.dimensions,
            tile_size_px=self.tile_size_px,
            overlap_px=0,
            downsample=self.read_mpp / self.slide.mpp.mean,
        )

    def _read(self, origin) -> None:
        size = (self.tile_size_px, self.tile_size_px)
        return self.slide.read_region_at_mpp((int(origin[0]), int(origin[1])), size, mpp=self.read_mpp)

    def _read_convert_then_resize(self, origin) -> np.ndarray:
        step = round(self.read_mpp / self.slide.mpp.mean)
        size = (self.tile_size_px * step, self.tile_size_px * step)
        rgb = self.slide.read_region((int(origin[0]), int(origin[1])), 0, size)
        box = Image.Resampling.BOX
        return np.asarray(Image.fromarray(rgb).resize((self.tile_size_px, self.tile_size_px), box))

    def _run(self, workers: int, read=None) -> float:
        read = read or self._read
        for _ in read_ahead(read, self.grid.origins_xy, workers=workers, max_pending=2 * max(workers, 1)):
            pass
        return len(self.grid) * self.tile_size_px**2 / 1e6

    def cases(self) -> list[Case]:
        return [
            Case(
                "one thread, convert then resize (before)",
                lambda: self._run(0, self._read_convert_then_resize),
                baseline=True,
            ),
            Case("one thread", lambda: self._run(0)),
            Case("read-ahead, 2 threads", lambda: self._run(2)),
            Case("read-ahead, 4 threads", lambda: self._run(4)),
        ]

    def conditions(self) -> dict[str, str]:
        return {
            "slide": f"phantom SVS {self.size_px}x{self.size_px} px, JPEG",
            "tiles": f"{len(self.grid)} x {self.tile_size_px} px at {self.read_mpp} µm/px",
        }
