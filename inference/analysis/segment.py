"""Sliding-window ensemble segmentation with uncertainty maps.

As nnU-Net's predictor: tiles are read ahead on a thread pool, batched, run through every
member under ``torch.inference_mode``, weighted by a Gaussian importance map, added into
fp32 accumulators and divided once at the end (checked finite). Per tile and pixel the
ensemble statistics of :mod:`inference.analysis.uncertainty` are computed from member
probabilities, then blended; so an ensemble of identical members has zero mutual
information, and overlapping tiles never count as extra members. Imported nnU-Net members
(``Manifest.blend == "nnunet"``) are blended as nnU-Net's predictor blends them instead: each
member's logits with nnU-Net's Gaussian, the softmax and statistics taken once at the end.

Maps are pooled to ``map_downsample`` model px per map px while accumulating; beyond
``max_in_memory_mb`` the accumulators live in a memory-mapped scratch file, so memory does
not grow with slide size. On CUDA the fp32 accumulators stay on the device while they fit in
``max_device_mb`` (nothing is copied back per batch, so the GPU never waits for the host) and
are copied to the host maps in strips once, at the end.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from shapely.geometry.base import BaseGeometry

from inference.allocator import release_every
from inference.analysis.tiling import (
    TileGrid,
    block_region,
    gaussian_weights,
    nnunet_gaussian_weights,
    rasterize_polygon,
    read_grid_tiles,
    tile_grid,
    validate_roi,
)
from inference.analysis.uncertainty import ensemble_stats
from inference.errors import Cancelled
from inference.models.ensemble import Ensemble, Precision
from inference.models.openvino_engine import validate_runtime
from inference.results import UncertaintyMaps
from inference.slides.gpu_decode import DeviceBlockReader, claim_tiles, device_decoded_level, nvimgcodec_available
from inference.slides.slide import Slide
from inference.slides.tissue import TissueMask

log = logging.getLogger(__name__)

# Accumulator channels: weight, prob, predictive entropy, expected entropy, prob std, and
# mutual information (filled at the end); then optionally one positive probability per member.
_N_ACC = 6
_STRIP_ROWS = 512
# The largest box averaged on the device (reduce_on_device).
_MAX_DEVICE_BOX = 4
# Reading threads when the GPU decodes (read_on_device): each reads a block's bytes, has
# them decoded and waits for its own CUDA stream. On the H100 (12288² phantom, level 0 for
# a 1 µm/px model) 2 threads read fastest: 636 Mpx/s vs 438 with 1 and 329 with 3.
_DEVICE_READ_WORKERS = 2
# Tiles per forward pass by device (SegmentConfig.batch_for). On the CPU a batch of 8 tiles'
# activations outgrows the caches: one demo member's forward pass took 2.70 ms per tile at batch 4 and
# 4.17 at batch 8 in bf16 autocast, 6.01 and 9.09 in fp32 (batch 1: 3.60 / 6.08, 2: 2.88 / 5.92;
# `python -m benchmarks engines`, 2 CPUs, 2026-12-04).
CPU_BATCH = 4
CUDA_BATCH = 8


@dataclass(frozen=True)
class SegmentConfig:
    """How to run the sliding window.

    Attributes
    ----------
    map_downsample
        Model px per map px (the maps' resolution is ``input_mpp * map_downsample`` µm/px).
    overlap_fraction
        Minimal overlap of neighbouring tiles as a fraction of the tile (nnU-Net uses 0.5).
    batch_size
        Tiles per forward pass (all members see the same batch); ``None`` picks
        :data:`CPU_BATCH` on the CPU (the activations of a few tiles stay in the caches) and
        :data:`CUDA_BATCH` on CUDA (see :meth:`batch_for`).
    read_workers
        Threads reading tiles ahead; 0 reads in the calling thread; ``None`` picks two on
        the CPU (the model needs the cores) and all cores but two (at most 12) on CUDA, two
        when the GPU decodes the tiles (:meth:`workers_for`).
    read_block_tiles
        Tiles read together as one region, per side (overlapping pixels are decoded once);
        1 reads every tile on its own.
    reduce_on_device
        Where the model's µm/px is an integer multiple (2 to 4) of a pyramid level's (a
        0.5 µm/px slide for a 1 µm/px model), send that level's pixels to the device and
        average them there (one pooling kernel per batch) instead of on the reading
        threads, where averaging is about a quarter of the work per pixel. The model then
        sees the exact box mean rather than the mean rounded to uint8 (within 0.5/255).
        ``None`` does so on CUDA.
    read_on_device
        Decode the slide's JPEG tiles on the CUDA device and assemble the blocks there
        (:mod:`inference.slides.gpu_decode`, nvImageCodec): the reading threads only read the
        compressed bytes. Possible where the model reads a JPEG level that the direct TIFF
        reader decodes, as it is or by the device's box (``reduce_on_device``). ``None``
        does so wherever possible on CUDA with nvImageCodec installed; ``True`` requires it
        (an error names why it is not possible); ``False`` decodes on the CPU.
    decode_backend
        The one nvImageCodec backend to decode with (a ``BackendKind`` name, e.g. ``HW_GPU_ONLY``, the
        hardware decoder of A100/H100-class GPUs: within 1 grey level of libjpeg-turbo's pixels); None lets
        nvImageCodec pick per batch (within a few grey levels where it decodes with CUDA).
    precision
        ``auto`` (bf16 autocast on CUDA and on CPUs with native bf16), ``fp32`` or ``bf16``.
    max_in_memory_mb
        Accumulators larger than this go to a memory-mapped scratch file.
    max_device_mb
        The most MB of accumulators kept on a CUDA device (``accumulate_on`` ``auto``).
    scratch_dir
        Where the memory-mapped scratch files go; None: the system's temporary folder.
    member_maps
        Also keep each member's blended positive probability (for evaluation).
    compile
        Run the members through ``torch.compile`` (pays off on GPUs for whole slides).
    runtime
        What runs the members: ``torch``, ``openvino`` (CPU only, the ``openvino`` extra; each member
        converted once and cached, :mod:`inference.models.openvino_engine`) or ``auto`` (see
        :func:`~inference.models.openvino_engine.resolve_runtime`).
    accumulate_on
        ``auto`` (on the device when it is CUDA and the accumulators fit in
        ``max_device_mb``), ``host`` or ``device``.
    """

    map_downsample: int = 4
    overlap_fraction: float = 0.25
    batch_size: int | None = None
    read_workers: int | None = None
    read_block_tiles: int = 3
    reduce_on_device: bool | None = None
    read_on_device: bool | None = None
    decode_backend: str | None = None
    precision: str = "auto"
    max_in_memory_mb: float = 512.0
    max_device_mb: float = 4096.0
    scratch_dir: Path | None = None
    member_maps: bool = False
    compile: bool = False
    accumulate_on: str = "auto"
    runtime: str = "auto"

    def __post_init__(self) -> None:
        if self.map_downsample < 1:
            raise ValueError(f"map_downsample must be >= 1, got {self.map_downsample}")
        if not 0 <= self.overlap_fraction < 1:
            raise ValueError(f"overlap_fraction must be in [0, 1), got {self.overlap_fraction}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (or None for the device's), got {self.batch_size}")
        if self.read_workers is not None and self.read_workers < 0:
            raise ValueError(f"read_workers must be >= 0 (or None for automatic), got {self.read_workers}")
        if self.read_block_tiles < 1:
            raise ValueError(f"read_block_tiles must be >= 1, got {self.read_block_tiles}")
        if self.accumulate_on not in ("auto", "host", "device"):
            raise ValueError(f"accumulate_on must be 'auto', 'host' or 'device', got {self.accumulate_on!r}")
        validate_runtime(self.runtime)
        if self.compile and self.runtime == "openvino":
            raise ValueError("compile (torch.compile) and runtime 'openvino' exclude each other; give one")

    def batch_for(self, device: torch.device) -> int:
        """Tiles per forward pass on ``device`` (see ``batch_size``)."""
        if self.batch_size is not None:
            return self.batch_size
        return CUDA_BATCH if device.type == "cuda" else CPU_BATCH

    def workers_for(self, device: torch.device, *, decoding_on_device: bool = False) -> int:
        """The read-ahead threads to use on ``device`` (see ``read_workers``)."""
        if self.read_workers is not None:
            return self.read_workers
        if decoding_on_device:
            return _DEVICE_READ_WORKERS
        cpus = os.cpu_count() or 2
        # On CUDA the cores are free for decoding (the decoders release the GIL); keep two for
        # the inference loop and the driver. Beyond about 12 threads the reading threads queue
        # for the GIL between tiles and read slower (measured on a 16-core GPU machine).
        return min(12, max(2, cpus - 2)) if device.type == "cuda" else 2


@dataclass
class SegmentProfile:
    """Where the wall time of one :func:`segment_slide` call went; filled in when passed.

    ``read_wait_s`` is the time the inference loop waited for tiles: near zero means
    reading kept the model busy, a large share means reading starved it. ``box_factor`` is
    the box the device averaged per model pixel (1: the readers did, see ``reduce_on_device``);
    ``read_on_device`` whether the device decoded the tiles (``SegmentConfig.read_on_device``).
    """

    tiles: int = 0
    read_workers: int = 0
    box_factor: int = 1
    read_on_device: bool = False
    accumulate_on: str = ""
    read_wait_s: float = 0.0
    wall_s: float = 0.0

    @property
    def read_wait_fraction(self) -> float:
        return self.read_wait_s / self.wall_s if self.wall_s > 0 else 0.0


def _allocate(
    shape: tuple[int, ...], config: SegmentConfig, *, dtype=np.float32, name: str = "acc"
) -> tuple[np.ndarray, Path | None]:
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes <= config.max_in_memory_mb * 2**20:
        return np.zeros(shape, dtype), None
    scratch = Path(tempfile.mkdtemp(prefix="pdl1-maps-", dir=config.scratch_dir))
    log.info("%s of %.0f MB memory-mapped in %s", name, nbytes / 2**20, scratch)
    return np.lib.format.open_memmap(scratch / f"{name}.npy", mode="w+", dtype=dtype, shape=shape), scratch


def accumulate_tile_stats(
    acc: np.ndarray | torch.Tensor,
    stats: torch.Tensor,
    weights: torch.Tensor,
    cells_xy: np.ndarray,
    *,
    map_downsample: int,
) -> None:
    """Add Gaussian-weighted, pooled per-tile statistics into the accumulators in place.

    ``stats`` (B, K, T, T) holds prob, predictive entropy, expected entropy and prob std,
    then optionally one positive probability per member; they go to ``acc`` channels 1-4 and
    6 onwards (see :func:`finish_maps`), the pooled weight to channel 0. ``weights`` is the
    (T, T) importance map and ``cells_xy`` (B, 2) the tiles' top-left map cells. ``acc`` is a
    host array, or a tensor on the same device as ``stats`` (then nothing leaves the device).
    """
    targets = [(slice(0, 4), slice(1, 5))]
    if stats.shape[1] > 4:
        targets.append((slice(4, None), slice(_N_ACC, None)))
    _accumulate(acc, stats, weights, cells_xy, map_downsample=map_downsample, targets=targets)


def accumulate_tile_values(
    acc: np.ndarray | torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    cells_xy: np.ndarray,
    *,
    map_downsample: int,
) -> None:
    """Add Gaussian-weighted, pooled per-tile ``values`` (B, K, T, T) into ``acc`` channels 1..K, the weight into 0.

    The plain weighted sum nnU-Net's predictor makes of its logits; otherwise as
    :func:`accumulate_tile_stats`.
    """
    k = values.shape[1]
    _accumulate(acc, values, weights, cells_xy, map_downsample=map_downsample, targets=[(slice(0, k), slice(1, 1 + k))])


def _accumulate(
    acc: np.ndarray | torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    cells_xy: np.ndarray,
    *,
    map_downsample: int,
    targets: list[tuple[slice, slice]],
) -> None:
    """Weight ``values`` (B, K, T, T) by ``weights``, pool them by ``map_downsample`` and add each tile's
    channels ``source`` into ``acc`` channels ``target`` for every (source, target) pair, the weight into 0."""
    f = map_downsample
    w = weights.to(values.device)
    weighted = values * w
    if f > 1:
        weighted = F.avg_pool2d(weighted, f)
        w = F.avg_pool2d(w[None, None], f)[0, 0]
    if isinstance(acc, torch.Tensor):
        pooled, w_cells = weighted.to(acc.device), w.to(acc.device)
    else:
        pooled, w_cells = weighted.cpu().numpy(), w.cpu().numpy()
    tile_h, tile_w = w_cells.shape
    _, acc_h, acc_w = acc.shape
    for (cx, cy), tile in zip(cells_xy, pooled, strict=True):
        # Tiles can reach past the map edge; only the part inside is kept.
        hh, ww = min(tile_h, acc_h - cy), min(tile_w, acc_w - cx)
        if hh <= 0 or ww <= 0:
            continue
        acc[0, cy : cy + hh, cx : cx + ww] += w_cells[:hh, :ww]
        for source, target in targets:
            acc[target, cy : cy + hh, cx : cx + ww] += tile[source, :hh, :ww]


def stats_from_logits(
    logit_acc: np.ndarray, out: np.ndarray, *, members: int, positive_class: int, member_maps: bool
) -> None:
    """Blended member logits -> the weighted statistics :func:`finish_maps` divides, strip by strip.

    ``logit_acc`` holds the weight, then ``members`` x C weighted logits (:func:`accumulate_tile_values`);
    ``out`` gets the layout of :func:`accumulate_tile_stats` (statistics times weight). Each member's
    softmax is taken of its blended logits, as nnU-Net's predictor does.
    """
    classes = (logit_acc.shape[0] - 1) // members
    height = logit_acc.shape[1]
    for r0 in range(0, height, _STRIP_ROWS):
        rows = slice(r0, min(r0 + _STRIP_ROWS, height))
        weight = np.asarray(logit_acc[0, rows])
        safe = np.where(weight > 0, weight, 1.0).astype(np.float32)
        logits = np.asarray(logit_acc[1:, rows]) / safe
        probs = torch.softmax(torch.from_numpy(logits.reshape(members, classes, *weight.shape)), dim=1)
        stats = ensemble_stats(probs[:, None], positive_class=positive_class)[0, [0, 1, 2, 4]].numpy()
        out[0, rows] = weight
        out[1:5, rows] = stats * weight
        if member_maps:
            out[_N_ACC:, rows] = probs[:, positive_class].numpy() * weight


def finish_maps(
    acc: np.ndarray,
    covered: np.ndarray,
    *,
    origin_xy: tuple[float, float],
    downsample: float,
    mpp: float,
    valid: np.ndarray | None,
) -> UncertaintyMaps:
    """Divide the weighted sums by the weights once, in place and in row strips; derive mutual information.

    ``acc`` channels: weight, prob, predictive entropy, expected entropy, prob std, (mutual
    information, written here), then optionally one positive probability per member.
    ``covered`` (bool, same grid) is filled here. Working in strips keeps memory-mapped maps
    out of core.
    """
    height = acc.shape[1]
    for r0 in range(0, height, _STRIP_ROWS):
        rows = slice(r0, min(r0 + _STRIP_ROWS, height))
        weight = acc[0, rows]
        cov = weight > 0
        if valid is not None:
            cov &= valid[rows]
        covered[rows] = cov
        safe = np.where(cov, weight, 1.0).astype(np.float32)
        for c in (1, 2, 3, 4, *range(_N_ACC, acc.shape[0])):
            values = acc[c, rows]
            np.divide(values, safe, out=values)
            values[~cov] = 0.0
            if not np.isfinite(values).all():
                raise FloatingPointError(f"non-finite values in map channel {c}; the model produced inf/NaN")
        acc[5, rows] = np.maximum(acc[2, rows] - acc[3, rows], 0.0)
    return UncertaintyMaps(
        prob=acc[1],
        predictive_entropy=acc[2],
        expected_entropy=acc[3],
        mutual_information=acc[5],
        prob_std=acc[4],
        covered=covered,
        origin_xy=origin_xy,
        downsample=downsample,
        mpp=mpp,
        member_prob=acc[_N_ACC:] if acc.shape[0] > _N_ACC else None,
    )


def plan_tiles(
    slide: Slide,
    ensemble: Ensemble,
    *,
    roi: BaseGeometry | None,
    tissue: TissueMask | None,
    config: SegmentConfig,
) -> TileGrid:
    manifest = ensemble.manifest
    tile = manifest.tile_size_px
    overlap = round(tile * config.overlap_fraction / config.map_downsample) * config.map_downsample
    return tile_grid(
        image_size_wh=slide.dimensions,
        tile_size_px=tile,
        overlap_px=min(overlap, tile - config.map_downsample),
        downsample=manifest.input_mpp / slide.mpp.mean,
        roi=roi,
        tissue_mask=None if tissue is None else tissue.mask,
        tissue_downsample=None if tissue is None else tissue.downsample,
        align_px=config.map_downsample,
    )


def segment_slide(
    slide: Slide,
    ensemble: Ensemble,
    *,
    roi: BaseGeometry | None = None,
    tissue: TissueMask | None = None,
    config: SegmentConfig | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    profile: SegmentProfile | None = None,
) -> UncertaintyMaps:
    """Run the ensemble over the ROI (or the tissue, or the whole image) of ``slide``.

    Returns maps on a grid of ``input_mpp * map_downsample`` µm/px covering the tiles'
    bounds; pixels outside the ROI and tissue are not ``covered``. ``profile``, when given,
    receives the time spent waiting for tiles.
    """
    started = time.perf_counter()
    config = config or SegmentConfig()
    manifest = ensemble.manifest
    tile = manifest.tile_size_px
    f = config.map_downsample
    if tile % f:
        raise ValueError(f"the model's tile size {tile} is not a multiple of map_downsample {f}")
    if roi is not None:
        roi = validate_roi(roi, image_size_wh=slide.dimensions)
    grid = plan_tiles(slide, ensemble, roi=roi, tissue=tissue, config=config)
    model_ds = grid.downsample
    width, height = slide.dimensions
    bx0, by0, bx1, by1 = grid.bounds_xy
    cell0_x, cell0_y = round(bx0 / model_ds / f), round(by0 / model_ds / f)
    map_w = max(1, math.ceil(min(bx1, width) / model_ds / f) - cell0_x)
    map_h = max(1, math.ceil(min(by1, height) / model_ds / f) - cell0_y)
    origin_xy = (cell0_x * f * model_ds, cell0_y * f * model_ds)
    n_channels = _N_ACC + (len(ensemble.members) if config.member_maps else 0)
    # nnU-Net's blending (imported nnU-Net models): each member's logits are summed, the statistics come after.
    blend_logits = manifest.blend == "nnunet"
    n_members, n_classes = len(ensemble.members), len(manifest.class_names)
    acc_channels = 1 + n_members * n_classes if blend_logits else n_channels
    acc, scratch = _allocate((acc_channels, map_h, map_w), config)
    covered, scratch_cov = _allocate((map_h, map_w), config, dtype=bool, name="covered")
    device_acc = _device_accumulators(acc.shape, ensemble.device, config)
    acc_place = "host" if device_acc is None else f"device ({device_acc.device})"

    precision = Precision.choose(config.precision, ensemble.device)
    ensemble = ensemble.on_runtime(config.runtime, precision=precision, compile_members=config.compile)
    if config.compile:
        ensemble = ensemble.compile()
    weights = torch.from_numpy(np.array(nnunet_gaussian_weights(tile) if blend_logits else gaussian_weights(tile)))
    positive = manifest.positive_class
    total = len(grid)
    log.info(
        "segmenting %s: %d tiles of %d px at %.3g µm/px, %d members",
        slide.path,
        total,
        tile,
        manifest.input_mpp,
        len(ensemble.members),
    )

    done = 0
    batch_idx: list[int] = []
    batch_px: list[np.ndarray] = []

    def flush() -> None:
        nonlocal done
        batch = _stack(batch_px, ensemble.device)
        cells = grid.origins_model_px[batch_idx] // f - np.array([cell0_x, cell0_y])
        target = acc if device_acc is None else device_acc
        if blend_logits:
            logits = ensemble.member_logits(batch, precision=precision, box_factor=box_factor)
            values = logits.transpose(0, 1).flatten(1, 2)  # (B, M * C, T, T), member-major
            accumulate_tile_values(target, values, weights, cells, map_downsample=f)
        else:
            probs = ensemble.member_probs(batch, precision=precision, box_factor=box_factor)
            stats = ensemble_stats(probs, positive_class=positive)[:, [0, 1, 2, 4]]
            if config.member_maps:
                stats = torch.cat([stats, probs[:, :, positive].transpose(0, 1)], dim=1)
            accumulate_tile_stats(target, stats, weights, cells, map_downsample=f)
        release_every(done, done + len(batch_idx))
        done += len(batch_idx)
        batch_idx.clear()
        batch_px.clear()
        if on_progress is not None:
            on_progress(done, total)

    if on_progress is not None:
        on_progress(0, total)
    reads = plan_reads(slide, grid, mpp=manifest.input_mpp, device=ensemble.device, config=config)
    batch_size = config.batch_for(ensemble.device)
    box_factor = reads.box_factor
    tiles = reads.tiles()
    read_wait_s = 0.0
    try:
        while True:
            waited = time.perf_counter()
            item = next(tiles, None)
            read_wait_s += time.perf_counter() - waited
            if item is None:
                break
            batch_idx.append(item[0])
            batch_px.append(item[1])
            if len(batch_idx) == batch_size:
                if should_cancel is not None and should_cancel():
                    raise Cancelled(f"cancelled after {done} of {total} tiles")
                flush()
    finally:
        tiles.close()  # stops pending reads at once on an error or a cancel
    if batch_idx:
        flush()
    release_every(done, done, finished=True)
    if device_acc is not None:
        _copy_to_host(device_acc, acc)
        del device_acc

    if blend_logits:
        logit_acc, scratch_logits = acc, scratch
        acc, scratch = _allocate((n_channels, map_h, map_w), config)
        stats_from_logits(logit_acc, acc, members=n_members, positive_class=positive, member_maps=config.member_maps)
        del logit_acc
        if scratch_logits is not None:
            shutil.rmtree(scratch_logits, ignore_errors=True)

    valid = None
    map_ds = model_ds * f
    if roi is not None:
        shifted = _shift(roi, -origin_xy[0], -origin_xy[1])
        valid = rasterize_polygon(shifted, shape_hw=(map_h, map_w), downsample=map_ds)
    maps = finish_maps(acc, covered, origin_xy=origin_xy, downsample=map_ds, mpp=manifest.input_mpp * f, valid=valid)
    for folder in (scratch, scratch_cov):
        if folder is not None:
            weakref.finalize(maps, shutil.rmtree, folder, True)
    wall_s = time.perf_counter() - started
    log.info(
        "segmented %d tiles in %.1f s; waited %.1f s for tiles (%d read threads, decoding on %s)",
        total,
        wall_s,
        read_wait_s,
        reads.workers,
        "the device" if reads.on_device else "the CPU",
    )
    if profile is not None:
        profile.tiles, profile.read_workers, profile.box_factor = total, reads.workers, box_factor
        profile.read_on_device = reads.on_device
        profile.accumulate_on = acc_place
        profile.read_wait_s, profile.wall_s = read_wait_s, wall_s
    return maps


@dataclass(frozen=True)
class TileReads:
    """How :func:`segment_slide` reads a grid's tiles (:func:`plan_reads`); ``tiles()`` starts reading.

    ``box_factor`` is the box the device averages (1: none), ``device_reader`` the reader that
    decodes on the device (None: the CPU decodes), ``workers`` the reading threads.
    """

    slide: Slide
    grid: TileGrid
    mpp: float
    box_factor: int
    device_reader: DeviceBlockReader | None
    workers: int
    block_tiles: int
    max_pending_tiles: int

    @property
    def on_device(self) -> bool:
        return self.device_reader is not None

    def tiles(self) -> Iterator[tuple[int, np.ndarray | torch.Tensor]]:
        """``(index, pixels)`` of every tile, read ahead (:func:`inference.analysis.tiling.read_grid_tiles`)."""
        return read_grid_tiles(
            self.slide,
            self.grid,
            mpp=self.mpp,
            workers=self.workers,
            block_tiles=self.block_tiles,
            max_pending_tiles=self.max_pending_tiles,
            box_factor=self.box_factor,
            block_reader=self.device_reader,
        )


def plan_reads(slide: Slide, grid: TileGrid, *, mpp: float, device: torch.device, config: SegmentConfig) -> TileReads:
    """How to read ``grid``'s tiles at ``mpp`` for a model on ``device``: box on the device, decoder, threads."""
    box_factor = _box_factor_on_device(slide, mpp, device, config)
    device_reader = _device_block_reader(slide, grid, mpp, box_factor, device, config)
    return TileReads(
        slide=slide,
        grid=grid,
        mpp=mpp,
        box_factor=box_factor,
        device_reader=device_reader,
        workers=config.workers_for(device, decoding_on_device=device_reader is not None),
        block_tiles=config.read_block_tiles,
        max_pending_tiles=2 * config.batch_for(device),
    )


def _box_factor_on_device(slide: Slide, mpp: float, device: torch.device, config: SegmentConfig) -> int:
    """The box the device averages (``reduce_on_device``), or 1 when the readers do it."""
    wanted = device.type == "cuda" if config.reduce_on_device is None else config.reduce_on_device
    reduction = slide.integer_reduction(mpp)
    # Beyond 4 x 4 the level's pixels (16x the model's) would cost more host memory and
    # copying than the averaging saves.
    if not wanted or reduction is None or reduction[1] > _MAX_DEVICE_BOX:
        return 1
    return reduction[1]


def _device_block_reader(
    slide: Slide, grid: TileGrid, mpp: float, box_factor: int, device: torch.device, config: SegmentConfig
) -> DeviceBlockReader | None:
    """The reader that decodes on ``device`` (``read_on_device``), or None to decode on the CPU."""
    if config.read_on_device is False:
        return None
    why_not = None
    if device.type != "cuda":
        why_not = f"the model runs on {device}, not on a CUDA device"
    elif not nvimgcodec_available():
        why_not = (
            "nvImageCodec is not installed: pip install 'pdl1-bridge[gpu-cu12]' (or gpu-cu13, as torch.version.cuda)"
        )
    elif device_decoded_level(slide, mpp, box_factor=box_factor) is None:
        why_not = (
            f"{slide} is not read at {mpp:g} µm/px from a JPEG level of a TIFF slide that is decoded directly, "
            "as it is or by the device's box (reduce_on_device)"
        )
    if why_not is None:
        try:
            regions = partial(block_region, grid, box_factor=box_factor)
            return DeviceBlockReader(
                slide, regions, mpp=mpp, box_factor=box_factor, device=device, backend=config.decode_backend
            )
        except (RuntimeError, OSError) as err:  # e.g. nvImageCodec built for another CUDA than torch's
            why_not = f"nvImageCodec did not start ({type(err).__name__}: {err})"
            if not config.read_on_device:
                log.warning("decoding tiles on the CPU: %s", why_not)
                return None
    if config.read_on_device:
        raise ValueError(f"read_on_device was asked for, but {why_not}")
    log.debug("decoding tiles on the CPU: %s", why_not)
    return None


def _stack(tiles: list[np.ndarray] | list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The (B, H, W, 3) uint8 batch; for CUDA stacked straight into pinned memory (one copy, not two).

    Tiles already on the device (``read_on_device``) are stacked there.
    """
    if isinstance(tiles[0], torch.Tensor):
        claim_tiles(tiles)
        return torch.stack(tiles)
    batch = torch.empty((len(tiles), *tiles[0].shape), dtype=torch.uint8, pin_memory=device.type == "cuda")
    np.stack(tiles, out=batch.numpy())
    return batch


def _device_accumulators(shape: tuple[int, ...], device: torch.device, config: SegmentConfig) -> torch.Tensor | None:
    """fp32 accumulators on the model's device, or None to accumulate into the host arrays."""
    if config.accumulate_on == "host":
        return None
    nbytes = math.prod(shape) * 4
    if config.accumulate_on == "auto" and (device.type != "cuda" or nbytes > config.max_device_mb * 2**20):
        return None
    return torch.zeros(shape, dtype=torch.float32, device=device)


def _copy_to_host(device_acc: torch.Tensor, acc: np.ndarray) -> None:
    # Row strips: one strip's host copy at a time, so memory-mapped maps are never held whole.
    for r0 in range(0, device_acc.shape[1], _STRIP_ROWS):
        rows = slice(r0, min(r0 + _STRIP_ROWS, device_acc.shape[1]))
        acc[:, rows] = device_acc[:, rows].cpu().numpy()


def _shift(geom: BaseGeometry, dx: float, dy: float) -> BaseGeometry:
    from shapely import affinity

    return affinity.translate(geom, dx, dy)
