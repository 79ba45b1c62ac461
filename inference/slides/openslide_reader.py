"""Read whole-slide files through OpenSlide, in the frame QuPath shows them."""

from __future__ import annotations

import numpy as np


def qupath_frame(properties: dict[str, str], full_wh: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where QuPath's OpenSlide reader puts its (0, 0), in OpenSlide level-0 px, and the size it shows.

    Slides with a scanned-area bounding box (``openslide.bounds-*``: MRXS and others) are shown by
    QuPath cropped to it when both its width and height differ from the full image's, and their reads
    are offset by its corner in any case; QuPath's objects are in that frame, so ours must be too.

    >>> qupath_frame({}, (1000, 800))
    ((0, 0), (1000, 800))
    >>> bounds = {"openslide.bounds-x": "40", "openslide.bounds-y": "30",
    ...           "openslide.bounds-width": "900", "openslide.bounds-height": "700"}
    >>> qupath_frame(bounds, (1000, 800))
    ((40, 30), (900, 700))
    """
    try:
        x, y, w, h = (int(properties[f"openslide.bounds-{k}"]) for k in ("x", "y", "width", "height"))
    except (KeyError, ValueError):  # QuPath, too, ignores bounds it cannot parse as integers
        return (0, 0), full_wh
    cropped = w != full_wh[0] and h != full_wh[1]
    return (x, y), ((w, h) if cropped else full_wh)


class OpenSlideReader:
    """:class:`RegionReader` over ``openslide.OpenSlide``; thread-safe, releases the GIL while reading.

    ``origin_xy`` and ``size_wh`` give the frame the reader shows, in level-0 px of the file (see
    :func:`qupath_frame`); by default the whole image.
    """

    def __init__(self, osr, *, origin_xy: tuple[int, int] = (0, 0), size_wh: tuple[int, int] | None = None):
        self._osr = osr  # an openslide.OpenSlide
        self._origin = origin_xy
        full = tuple((int(w), int(h)) for w, h in osr.level_dimensions)
        if size_wh is None or tuple(size_wh) == full[0]:
            self._dimensions = full
        else:  # levels of the cropped frame, sized as QuPath sizes them
            w0, h0 = size_wh
            coarser = tuple((max(1, int(w0 / ds)), max(1, int(h0 / ds))) for ds in self.level_downsamples[1:])
            self._dimensions = ((w0, h0), *coarser)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._osr.level_downsamples)

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._osr.properties)

    def read_region(self, location_xy: tuple[int, int], level: int, size_wh: tuple[int, int]) -> np.ndarray:
        return self._to_rgb(np.asarray(self._osr.read_region(self._in_file(location_xy), level, size_wh)))

    def _in_file(self, location_xy: tuple[int, int]) -> tuple[int, int]:
        return location_xy[0] + self._origin[0], location_xy[1] + self._origin[1]

    def read_region_reduced(
        self, location_xy: tuple[int, int], level: int, size_wh: tuple[int, int], factor: int
    ) -> np.ndarray:
        """``read_region`` box-averaged by the integer ``factor`` (``size_wh`` in level px).

        Pillow's ``reduce`` runs on the decoded image before it becomes a numpy array, so
        only 1/factor² of the pixels are converted: at factor 2 this halves the time spent
        after decoding, which matters when reading, not the GPU, sets the pace.
        """
        region = self._osr.read_region(self._in_file(location_xy), level, size_wh)
        return self._to_rgb(np.asarray(region.reduce(factor)))

    @staticmethod
    def _to_rgb(rgba: np.ndarray) -> np.ndarray:
        # openslide-python returns straight (not premultiplied) RGBA, alpha 0 outside the scanned
        # area and partial where a reduced pixel straddles its edge: composite onto white so
        # "outside" looks like glass, not black tissue.
        rgb = rgba[..., :3]
        alpha = rgba[..., 3]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgb)
        a = alpha[..., None].astype(np.uint32)
        return ((rgb * a + (255 - a) * 255 + 127) // 255).astype(np.uint8)

    def close(self) -> None:
        self._osr.close()
