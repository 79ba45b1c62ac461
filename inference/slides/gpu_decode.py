"""Decode a slide's JPEG tiles on the CUDA device that runs the model (nvImageCodec).

Why: on an H100 one nnU-Net-sized member consumes tiles faster than CPU threads decode
JPEG, copy the pixels into blocks and the blocks into pinned memory (issue #8: the loop
waited for tiles 22 % of the time at M=1). Here the reading threads only read the
compressed bytes; the GPU decodes a block's tiles in one batch, the block is assembled on
the device and the model's tiles are views into it, so no pixel crosses host memory.

Used where the model reads a directly decoded JPEG level of a TIFF slide as it is or by an
integer box (:meth:`inference.slides.slide.Slide.integer_reduction` with ``reduce_on_device``);
everything else reads on the CPU as before. Needs ``nvidia-nvimgcodec-cu12`` or ``-cu13``
(the ``gpu-cu12`` or ``gpu-cu13`` extra) for the CUDA of the installed torch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np
import torch

from inference.errors import SlideFormatError
from inference.slides.reader import BACKGROUND_RGB, BlockRegion
from inference.slides.slide import Slide
from inference.slides.tiff_tiles import TiffTileReader, TilePaste

# Decodes complete JPEG files (``rgb``: their samples are RGB, not YCbCr) into (H, W, 3)
# uint8 tensors on the device, enqueued on the current stream; None for a file it cannot decode.
TileDecoder = Callable[[Sequence[bytes], bool], list[torch.Tensor | None]]


def nvimgcodec_available() -> bool:
    """Whether nvImageCodec can be imported (it still needs a CUDA device to decode)."""
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except ImportError:
        return False
    return True


class NvImageCodecDecoder:
    """A :data:`TileDecoder` on a CUDA device with nvImageCodec; safe to call from many threads.

    nvImageCodec decoders take long to create (they start their own threads), so they are
    kept for the life of the process and lent to one call at a time. ``backend`` (a ``BackendKind``
    name; :class:`~inference.analysis.segment.SegmentConfig`'s ``decode_backend``) limits them to one
    nvImageCodec backend, e.g. the hardware decoder of A100/H100-class GPUs (``HW_GPU_ONLY``: within 1 grey
    level of libjpeg-turbo's pixels); None lets nvImageCodec pick per batch, and pixels may differ from
    libjpeg-turbo's by a few grey levels where it decodes with CUDA.
    """

    _idle: ClassVar[dict[tuple[int, str | None], queue.SimpleQueue]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, device: torch.device, *, backend: str | None = None) -> None:
        from nvidia import nvimgcodec

        if device.type != "cuda":
            raise ValueError(f"nvImageCodec decodes on a CUDA device, not {device}")
        self.device = device
        self._nv = nvimgcodec
        if backend is not None and not hasattr(nvimgcodec.BackendKind, backend):
            kinds = [k for k in dir(nvimgcodec.BackendKind) if k.isupper()]
            raise ValueError(
                f"nvImageCodec backend {backend!r} (SegmentConfig.decode_backend; pdl1 reads PDL1_NVIMGCODEC_BACKEND) "
                f"is no nvImageCodec backend; expected one of {kinds}, or none for all of them"
            )
        self.backend = backend
        # nvJPEG takes every three-component JPEG for YCbCr (it ignores the Adobe marker that
        # says otherwise); asked for YCbCr it leaves the samples as stored, which for Aperio's
        # RGB tiles are the RGB pixels (measured on the H100: max |diff| 254 vs 0 against libjpeg-turbo).
        self._params = {
            False: nvimgcodec.DecodeParams(color_spec=nvimgcodec.ColorSpec.SRGB),
            True: nvimgcodec.DecodeParams(color_spec=nvimgcodec.ColorSpec.SYCC),
        }
        with self._lock:
            self._pool = self._idle.setdefault((device.index or 0, backend), queue.SimpleQueue())
            if self._pool.empty():  # start one now: a broken install fails here, not mid-slide
                self._pool.put(self._new_decoder())

    def _new_decoder(self):
        kwargs = {"device_id": self.device.index or 0}
        if self.backend is not None:
            kwargs["backends"] = [self._nv.Backend(getattr(self._nv.BackendKind, self.backend))]
        return self._nv.Decoder(**kwargs)

    def __call__(self, files: Sequence[bytes], rgb: bool) -> list[torch.Tensor | None]:
        try:
            decoder = self._pool.get_nowait()
        except queue.Empty:
            decoder = self._new_decoder()
        try:
            stream = torch.cuda.current_stream(self.device)
            images = decoder.decode(list(files), params=self._params[rgb], cuda_stream=stream.cuda_stream)
        finally:
            self._pool.put(decoder)
        return [None if image is None else torch.as_tensor(image, device=self.device) for image in images]


class DeviceBlockReader:
    """``read(indices)`` as :func:`inference.analysis.tiling.grid_block_reader`, decoding on ``decode``'s device.

    ``regions(indices)`` gives the region that holds those tiles (the tiling's ``block_region``
    of its grid, at ``box_factor``).

    Returns the tiles as (T, T, 3) uint8 views into the block assembled on the device, with
    the same pixels as the CPU reader wherever the decoder's equal libjpeg-turbo's. On CUDA
    each reading thread decodes on a stream of its own and waits for it, so a block is
    complete when it is handed over; the caller must ``record_stream`` the tiles on the
    stream that uses them (:func:`claim_tiles`) before dropping them.
    """

    def __init__(
        self,
        slide: Slide,
        regions: Callable[[np.ndarray], BlockRegion],
        *,
        mpp: float,
        box_factor: int,
        device: torch.device,
        decode: TileDecoder | None = None,
        backend: str | None = None,
    ) -> None:
        level = device_decoded_level(slide, mpp, box_factor=box_factor)
        if level is None:
            raise ValueError(
                f"{slide} read at {mpp:g} µm/px (box {box_factor}) is no JPEG level read as it is or by that box"
            )
        self.reader: TiffTileReader = slide.reader
        self.level = level
        self.tiled = self.reader.tiled_level(level)
        self.regions, self.box_factor, self.device = regions, box_factor, device
        self.decode = decode if decode is not None else NvImageCodecDecoder(device, backend=backend)
        self._background = torch.tensor(BACKGROUND_RGB, dtype=torch.uint8, device=device)
        self._local = threading.local()

    def _stream(self) -> torch.cuda.Stream | None:
        if self.device.type != "cuda":
            return None
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.device)
        return stream

    def __call__(self, indices: np.ndarray) -> list[torch.Tensor]:
        region = self.regions(indices)
        width, height = region.size_wh
        pastes = self.reader.region_pastes(region.location_xy, self.level, region.size_wh)
        stored = [self.reader.tile_bytes(self.level, paste.index) for paste in pastes]
        files = [
            self._standalone(data, paste.index) for paste, data in zip(pastes, stored, strict=True) if data is not None
        ]
        stream = self._stream()
        with torch.cuda.stream(stream):  # a no-op for None (the CPU)
            decoded = iter(self.decode(files, self.tiled.jpeg_rgb) if files else [])
            tiles = []
            for paste, data in zip(pastes, stored, strict=True):
                # None: a tile the scanner never wrote, glass
                tiles.append(self._glass_tile() if data is None else self._checked(next(decoded), paste.index))
            block = self._assemble(tiles, pastes, width=width, height=height)
            if stream is not None:
                stream.synchronize()
        cut = region.cut_px
        return [block[dy : dy + cut, dx : dx + cut] for dx, dy in region.offsets_xy]

    def _assemble(self, tiles: list[torch.Tensor], pastes: list[TilePaste], *, width: int, height: int) -> torch.Tensor:
        # The tiles cover a rectangle of the level, row by row: one copy lays them out as a
        # mosaic, and the region is a view into it unless it reaches past the level's edges.
        # (A paste per tile costs a kernel launch and Python work per tile, in the hot loop.)
        if not pastes:  # the region lies wholly outside the level
            return self._background_block(width=width, height=height)
        first, last = pastes[0], pastes[-1]
        across = last.index % self.tiled.tiles_across - first.index % self.tiled.tiles_across + 1
        down = len(tiles) // across
        th, tw = self.tiled.tile_h, self.tiled.tile_w
        mosaic = torch.stack(tiles).view(down, across, th, tw, 3)
        mosaic = mosaic.permute(0, 2, 1, 3, 4).reshape(down * th, across * tw, 3)
        rows = slice(first.region_rows.start, last.region_rows.stop)
        cols = slice(first.region_cols.start, last.region_cols.stop)
        inside = mosaic[
            first.tile_rows.start : first.tile_rows.start + rows.stop - rows.start,
            first.tile_cols.start : first.tile_cols.start + cols.stop - cols.start,
        ]
        if inside.shape[:2] == (height, width):
            return inside
        block = self._background_block(width=width, height=height)
        block[rows, cols] = inside
        return block

    def _background_block(self, *, width: int, height: int) -> torch.Tensor:
        block = torch.empty((height, width, 3), dtype=torch.uint8, device=self.device)
        block[:] = self._background
        return block

    def _glass_tile(self) -> torch.Tensor:
        return self._background.expand(self.tiled.tile_h, self.tiled.tile_w, 3)

    def _standalone(self, data: bytes, index: int) -> bytes:
        try:
            return self.tiled.standalone_jpeg(data)
        except ValueError as err:  # a stream cut short or overwritten: the CPU reader's words
            raise SlideFormatError(
                f"{self.reader.path}: tile {index} of level {self.level} cannot be decoded (ValueError: {err}); the "
                "file is damaged: copy it again from the scanner or archive"
            ) from err

    def _checked(self, tile: torch.Tensor | None, index: int) -> torch.Tensor:
        expected = (self.tiled.tile_h, self.tiled.tile_w, 3)
        if tile is None or tuple(tile.shape) != expected:
            got = "nothing" if tile is None else f"a {tuple(tile.shape)} tile"
            raise SlideFormatError(
                f"{self.reader.path}: tile {index} of level {self.level} decoded on the GPU to {got}, "
                f"expected {expected}; the file may be damaged (set read_on_device off to decode it on the CPU)"
            )
        return tile


def device_decoded_level(slide: Slide, mpp: float, *, box_factor: int) -> int | None:
    """The level :class:`DeviceBlockReader` decodes to read ``slide`` at ``mpp``, or None where it cannot.

    That is a JPEG level the direct reader decodes, read as it is (``box_factor`` 1) or
    averaged on the device by exactly ``box_factor``.
    """
    if not isinstance(slide.reader, TiffTileReader):
        return None
    level, scale = slide.level_for_mpp(mpp)
    if abs(scale - box_factor) > 1e-6 or level not in slide.reader.direct_levels:
        return None
    return level if slide.reader.tiled_level(level).is_jpeg else None


def claim_tiles(tiles: Sequence[torch.Tensor]) -> None:
    """Tell the CUDA caching allocator that the current stream uses ``tiles`` (from another stream)."""
    for tile in tiles:
        if tile.is_cuda:
            tile.record_stream(torch.cuda.current_stream(tile.device))
