"""Decode the tiles of TIFF-based slides (Aperio SVS, generic tiled TIFF) directly.

OpenSlide paints every region through an ARGB surface, and openslide-python converts
that to straight RGBA; for a 0.5 µm/px level read at 1 µm/px this conversion costs more
than decoding the JPEG tiles (measured: 80 ms through OpenSlide vs 15 ms direct for
1024 x 1024 px, the same pixels). When a GPU runs one member, that difference decides
whether reading keeps it busy. :class:`TiffTileReader` keeps OpenSlide for everything but
pixels: levels, downsamples and properties come from OpenSlide, and any level it cannot
decode itself (another compression, an unusual layout) is still read by OpenSlide.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
from PIL import Image

from inference.errors import SlideFormatError
from inference.slides.reader import BACKGROUND_RGB, ReducingReader

log = logging.getLogger(__name__)

# OpenSlide vendors whose levels are plain TIFF pages (one page per level, nothing stitched).
DIRECT_VENDORS = frozenset({"aperio", "generic-tiff"})
# TIFF compressions decoded here: none, LZW, JPEG, Adobe deflate, deflate.
DIRECT_COMPRESSIONS = frozenset({1, 5, 7, 8, 32946})
_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"
# APP14 "Adobe", version 100, no flags, transform 0: the three components are RGB, not YCbCr.
_ADOBE_NO_TRANSFORM = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


def check_jpeg_ends(tile: bytes) -> None:
    """Raise ValueError where a JPEG tile's stream does not end as a whole one does (an end-of-image marker in its
    last bytes, zeros after it allowed). libjpeg, and a GPU's decoder, decode a stream cut short (or its end
    overwritten with zeros by a failed copy) without an error, the rest of the tile grey: a damaged slide analysed as
    if whole. OpenSlide refuses it ("Premature end of JPEG file")."""
    if _EOI not in tile.rstrip(b"\0")[-16:]:
        raise ValueError("its JPEG data does not end as a JPEG stream does (cut short or overwritten)")


def standalone_jpeg(tile: bytes, tables: bytes | None, *, rgb: bool) -> bytes:
    """A TIFF JPEG tile as a complete JPEG file that any decoder reads with no side information.

    TIFF stores JPEG tiles abbreviated: the quantisation and Huffman tables they share sit
    once in the page's JPEGTables tag (itself SOI, tables, EOI), and a tile's stream starts
    at its own SOI. ``rgb`` marks tiles whose samples are RGB (Aperio's: photometric RGB, no
    JFIF marker); decoders take three-component JPEG for YCbCr unless an Adobe marker says
    there is no colour transform, so one is added. Decoders that get each tile on its own
    (a GPU's batched JPEG decoder) need this; libjpeg-turbo is instead told both things apart.
    """
    if tile[:2] != _SOI:
        raise ValueError(f"a JPEG tile starts with SOI (ffd8), this one with {tile[:2].hex() or 'nothing'}")
    head = _SOI + (_ADOBE_NO_TRANSFORM if rgb else b"")
    if tables:
        if tables[:2] != _SOI or tables[-2:] != _EOI:
            raise ValueError("JPEGTables must be an abbreviated table stream (SOI ... EOI)")
        head += tables[2:-2]
    return head + tile[2:]


@dataclass(frozen=True)
class TilePaste:
    """Where the part of stored tile ``index`` that a region covers goes in that region."""

    index: int
    tile_rows: slice
    tile_cols: slice
    region_rows: slice
    region_cols: slice


class TiledLevel:
    """One pyramid level stored as a tiled RGB TIFF page: where its tiles are and how to decode them."""

    def __init__(self, page) -> None:  # page: tifffile.TiffPage
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self.tile_w, self.tile_h = int(page.tilewidth), int(page.tilelength)
        self.tiles_across = math.ceil(self.width / self.tile_w)
        self.tiles_down = math.ceil(self.height / self.tile_h)
        # Read every tag now: tifffile loads some values lazily from its file handle, which
        # is not safe to share between the reading threads.
        self.offsets = np.asarray(page.dataoffsets, np.int64)
        self.byte_counts = np.asarray(page.databytecounts, np.int64)
        self.jpegtables = page.jpegtables
        self._decode_page = page.decode
        self.is_jpeg = int(page.compression) == 7
        # JPEG tiles of photometric RGB without a JFIF marker (Aperio's) hold RGB, not YCbCr.
        self.jpeg_rgb = self.is_jpeg and int(page.photometric) == 2 and not page.is_jfif
        if len(self.offsets) != self.tiles_across * self.tiles_down:
            raise ValueError(f"{len(self.offsets)} tiles for a {self.tiles_across} x {self.tiles_down} grid")

    def decode(self, data: bytes, index: int) -> np.ndarray:
        """(tile_h, tile_w, 3) uint8 pixels of tile ``index`` from its stored bytes."""
        if self.is_jpeg:
            check_jpeg_ends(data)
            # imagecodecs directly: tifffile's generic decode adds Python work per tile, and
            # with many reading threads that time is spent holding the GIL (measured on 14
            # threads: 280 vs 620 Mpx/s of decoded tiles).
            pixels = imagecodecs.jpeg8_decode(
                data, tables=self.jpegtables, colorspace=2 if self.jpeg_rgb else None, outcolorspace=2
            )
            if pixels.shape != (self.tile_h, self.tile_w, 3):
                raise ValueError(f"decoded a {pixels.shape} tile, expected {(self.tile_h, self.tile_w, 3)}")
            return pixels
        pixels, _, _ = self._decode_page(data, index, jpegtables=self.jpegtables)
        return pixels[0]  # (1, tile_h, tile_w, 3) -> (tile_h, tile_w, 3)

    def standalone_jpeg(self, data: bytes) -> bytes:
        """Tile bytes ``data`` as a complete JPEG file (:func:`standalone_jpeg`); JPEG levels only."""
        if not self.is_jpeg:
            raise ValueError("this level's tiles are not JPEG-compressed")
        check_jpeg_ends(data)  # as decode does: the GPU's decoder also decodes a stream cut short
        return standalone_jpeg(data, self.jpegtables, rgb=self.jpeg_rgb)

    @staticmethod
    def supported(page) -> bool:
        return (
            page.is_tiled
            and int(page.compression) in DIRECT_COMPRESSIONS
            and int(page.photometric) in (2, 6)  # RGB, YCbCr
            and page.samplesperpixel == 3
            and page.bitspersample == 8
            and int(page.planarconfig) == 1
            and page.imagedepth == 1
        )


class TiffTileReader:
    """:class:`~inference.slides.reader.RegionReader` that decodes tiled TIFF levels itself; thread-safe.

    Levels, downsamples, properties and every level it does not decode come from ``fallback``
    (the OpenSlide reader of the same file). Use :meth:`open`, which returns ``fallback``
    itself for other formats. Pixels equal OpenSlide's wherever a region starts on a whole
    level pixel (OpenSlide interpolates a region that starts between level pixels; here it
    is rounded to the nearest one).
    """

    def __init__(self, fallback: ReducingReader, path: Path, levels: dict[int, TiledLevel]) -> None:
        self._fallback = fallback
        self.path = path
        self._levels = levels
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self._lock = threading.Lock()  # only for platforms without os.pread

    @classmethod
    def open(cls, fallback: ReducingReader, path: Path) -> ReducingReader:
        """The fastest reader for a file ``fallback`` (its OpenSlide reader) reads: direct where possible.

        :func:`~inference.slides.slide.open_slide` does not ask where it is told ``openslide_only``.
        """
        if fallback.properties.get("openslide.vendor") not in DIRECT_VENDORS:
            return fallback
        try:
            levels = _match_levels(path, fallback.level_dimensions)
        except Exception as err:  # any file tifffile cannot parse simply stays with OpenSlide
            log.debug("%s: decoding through OpenSlide (%s)", path, err)
            return fallback
        if 0 not in levels:
            return fallback
        return cls(fallback, path, levels)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._fallback.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._fallback.level_downsamples

    @property
    def properties(self) -> dict[str, str]:
        return self._fallback.properties

    @property
    def direct_levels(self) -> tuple[int, ...]:
        """Levels decoded here rather than by OpenSlide."""
        return tuple(sorted(self._levels))

    def tiled_level(self, level: int) -> TiledLevel:
        """How direct ``level`` is stored (tile size, compression); KeyError for other levels."""
        return self._levels[level]

    def read_region(self, location_xy: tuple[int, int], level: int, size_wh: tuple[int, int]) -> np.ndarray:
        if level not in self._levels:
            return self._fallback.read_region(location_xy, level, size_wh)
        w, h = size_wh
        out = np.full((h, w, 3), BACKGROUND_RGB, np.uint8)
        for paste in self.region_pastes(location_xy, level, size_wh):
            tile = self._tile(level, paste.index)
            if tile is not None:  # None: a tile the scanner never wrote, glass
                out[paste.region_rows, paste.region_cols] = tile[paste.tile_rows, paste.tile_cols]
        return out

    def region_pastes(self, location_xy: tuple[int, int], level: int, size_wh: tuple[int, int]) -> list[TilePaste]:
        """The stored tiles of direct ``level`` that a region read covers, and where each goes.

        ``location_xy`` is in level-0 px (rounded to the nearest level pixel, as :meth:`read_region`),
        ``size_wh`` in level px. Pixels outside the level are in no paste: they stay background.
        """
        tiled = self._levels[level]
        ds = self.level_downsamples[level]
        x, y = round(location_xy[0] / ds), round(location_xy[1] / ds)
        w, h = size_wh
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, tiled.width), min(y + h, tiled.height)
        pastes: list[TilePaste] = []
        if x1 <= x0 or y1 <= y0:
            return pastes
        for row in range(y0 // tiled.tile_h, (y1 - 1) // tiled.tile_h + 1):
            for col in range(x0 // tiled.tile_w, (x1 - 1) // tiled.tile_w + 1):
                tx, ty = col * tiled.tile_w, row * tiled.tile_h
                sx0, sy0 = max(x0, tx), max(y0, ty)
                sx1, sy1 = min(x1, tx + tiled.tile_w), min(y1, ty + tiled.tile_h)
                pastes.append(
                    TilePaste(
                        index=row * tiled.tiles_across + col,
                        tile_rows=slice(sy0 - ty, sy1 - ty),
                        tile_cols=slice(sx0 - tx, sx1 - tx),
                        region_rows=slice(sy0 - y, sy1 - y),
                        region_cols=slice(sx0 - x, sx1 - x),
                    )
                )
        return pastes

    def read_region_reduced(
        self, location_xy: tuple[int, int], level: int, size_wh: tuple[int, int], factor: int
    ) -> np.ndarray:
        if level not in self._levels:
            return self._fallback.read_region_reduced(location_xy, level, size_wh, factor)
        return np.asarray(Image.fromarray(self.read_region(location_xy, level, size_wh)).reduce(factor))

    def jpeg_tiles(self, level: int) -> Iterator[tuple[int, bytes]]:
        """``(index, complete JPEG file)`` of every stored tile of a direct JPEG level, in file order.

        For decoders that take each tile as a file of its own (:func:`standalone_jpeg`);
        tiles the scanner never wrote (glass) are left out.
        """
        tiled = self._levels.get(level)
        if tiled is None or not tiled.is_jpeg:
            raise ValueError(f"level {level} of {self.path} is not a JPEG level decoded here")
        for index in np.argsort(tiled.offsets, kind="stable").tolist():
            data = self.tile_bytes(level, index)
            if data is not None:
                yield index, tiled.standalone_jpeg(data)

    def tile_bytes(self, level: int, index: int) -> bytes | None:
        """Tile ``index`` of a direct level as stored in the file; None for a tile never written."""
        tiled = self._levels[level]
        count = int(tiled.byte_counts[index])
        return None if count == 0 else self._pread(count, int(tiled.offsets[index]))

    def _tile(self, level: int, index: int) -> np.ndarray | None:
        data = self.tile_bytes(level, index)
        if data is None:
            return None
        try:
            return self._levels[level].decode(data, index)
        except Exception as err:
            raise SlideFormatError(
                f"{self.path}: tile {index} of level {level} cannot be decoded ({type(err).__name__}: {err}); "
                "the file is damaged: copy it again from the scanner or archive"
            ) from err

    def _pread(self, count: int, offset: int) -> bytes:
        if hasattr(os, "pread"):
            data = os.pread(self._fd, count, offset)
        else:
            with self._lock:
                os.lseek(self._fd, offset, os.SEEK_SET)
                data = os.read(self._fd, count)
        if len(data) != count:
            raise SlideFormatError(
                f"{self.path}: the file is truncated (read {len(data)} of {count} bytes at offset {offset}); "
                "copy it again from the scanner or archive"
            )
        return data

    def close(self) -> None:
        os.close(self._fd)
        self._fallback.close()


def _match_levels(path: Path, level_dimensions: tuple[tuple[int, int], ...]) -> dict[int, TiledLevel]:
    """The OpenSlide levels that are a tiled RGB TIFF page of exactly their size."""
    import tifffile

    levels: dict[int, TiledLevel] = {}
    with tifffile.TiffFile(path) as tif:
        pages = [page for page in tif.pages if page.is_tiled]
        for level, (width, height) in enumerate(level_dimensions):
            page = next((p for p in pages if (p.imagewidth, p.imagelength) == (width, height)), None)
            if page is not None and TiledLevel.supported(page):
                levels[level] = TiledLevel(page)
    return levels
