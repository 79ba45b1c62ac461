"""Nuclei detection over a slide: tiled FCN heatmaps, max-pool NMS, one point per nucleus.

Each tile's heatmaps (mean of the members' sigmoids) are peak-picked with a max-pool of
radius ``nms_radius_um`` on the max over classes; a peak keeps the class of the largest
heatmap there. A tile keeps only peaks inside its core (cores partition the grid, so the
overlap is seen twice but counted once), and a final radius NMS across all tiles removes a
nucleus found on both sides of a core boundary.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import shapely
import torch
import torch.nn.functional as F  # noqa: N812
from shapely.geometry.base import BaseGeometry

from inference.allocator import release_every
from inference.analysis.ihc import DEFAULT_INTENSITY_LIMITS_OD, annulus_means, dab_density, intensity_grades
from inference.analysis.points import radius_nms
from inference.analysis.tiling import TileGrid, read_grid_tiles, tile_grid, validate_roi
from inference.errors import Cancelled
from inference.models.ensemble import Ensemble, Precision
from inference.models.openvino_engine import validate_runtime
from inference.results import Nuclei, UncertaintyMaps
from inference.slides.slide import Slide
from inference.slides.tissue import TissueMask

log = logging.getLogger(__name__)


# Measured on the 2-CPU machine (benchmarks/README.md, nuclei_inference): an 8192² phantom's analysis
# took 8.0-8.2 s with 2 tiles per pass against 8.75 s with 8, the same nuclei.
CPU_BATCH = 2
CUDA_BATCH = 8
# The heatmap peak that counts as a nucleus when neither the config nor the model states one.
DEFAULT_MIN_SCORE = 0.3
# The membrane of a tumour cell lies about this far from its nucleus centre (µm): the ring where an IHC
# cell's DAB is measured (a 10 µm cell with a 3-4 µm nucleus), as this percentile of the ring's pixels, so
# a partial ring or a neighbour's cytoplasm does not dilute it. Chosen on the training phantoms
# (train/ihc_123: grades right for 91 % of true positive cells at their true centres, against 82 % for
# the mean over 3-6.5 µm); real cells vary in size more than phantom cells.
MEMBRANE_RING_UM = (3.5, 5.5)
MEMBRANE_PERCENTILE = 75.0


@dataclass(frozen=True)
class NucleiConfig:
    """How to run nuclei detection.

    Attributes
    ----------
    nms_radius_um
        Peaks closer than this are one nucleus.
    min_score
        Smallest heatmap peak that counts as a nucleus; ``None`` takes the model's (its manifest's
        ``min_score``, which validation on a lab's own slides may have refitted; else
        :data:`DEFAULT_MIN_SCORE`).
    overlap_px
        Tile overlap in model px; at least twice the receptive context you want at seams.
    read_workers
        Threads reading tiles ahead; 0 reads in the calling thread.
    read_block_tiles
        Tiles read together as one region, per side (overlapping pixels are decoded once);
        1 reads every tile on its own.
    batch_size
        Tiles per forward pass; ``None`` picks :data:`CPU_BATCH` on the CPU (its activations stay
        in the caches) and :data:`CUDA_BATCH` on CUDA.
    precision
        ``auto``, ``fp32`` or ``bf16``, as ``SegmentConfig.precision``.
    tta
        Test-time augmentation: each member's heatmaps are the mean over the 8 flips and 90° rotations
        of every tile (:func:`dihedral_mean`), as nnU-Net's mirroring; 8 times the compute. ``None``
        takes the model's (its manifest's ``extra["tta"]``, set by ``pdl1 train nuclei --tta`` so that
        the peak threshold it fits is used as it was fitted; else off).
    runtime
        What runs the members: ``torch``, ``openvino`` or ``auto``, as ``SegmentConfig.runtime``.
    """

    nms_radius_um: float = 2.5
    min_score: float | None = None
    overlap_px: int = 32
    batch_size: int | None = None
    read_workers: int = 2
    read_block_tiles: int = 3
    precision: str = "auto"
    tta: bool | None = None
    runtime: str = "auto"

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (or None for the device's), got {self.batch_size}")
        validate_runtime(self.runtime)

    def batch_for(self, device: torch.device) -> int:
        """Tiles per forward pass on ``device`` (see ``batch_size``)."""
        if self.batch_size is not None:
            return self.batch_size
        return CUDA_BATCH if device.type == "cuda" else CPU_BATCH

    def tta_for(self, manifest) -> bool:
        """Whether ``manifest``'s model runs with test-time augmentation (see ``tta``)."""
        if self.tta is not None:
            return self.tta
        return bool(manifest.extra.get("tta", False))

    def min_score_for(self, manifest) -> float:
        """The peak threshold on ``manifest``'s model (see ``min_score``)."""
        if self.min_score is not None:
            return self.min_score
        return float(manifest.thresholds.get("min_score", DEFAULT_MIN_SCORE))


def heatmap_peaks(heat: torch.Tensor, *, radius_px: int, min_score: float) -> tuple[torch.Tensor, ...]:
    """Max-pool NMS on a batch of heatmaps (B, C, H, W) -> (b, y, x) index tensors of peaks."""
    top = heat.max(dim=1).values
    pooled = F.max_pool2d(top[:, None], 2 * radius_px + 1, stride=1, padding=radius_px)[:, 0]
    return torch.nonzero((top == pooled) & (top >= min_score), as_tuple=True)


def class_probabilities(values: np.ndarray) -> np.ndarray:
    """Normalise per-class heatmap values at a peak (N, C) into a class distribution."""
    return values / np.clip(values.sum(axis=1, keepdims=True), 1e-12, None)


def plan_nuclei_tiles(
    slide: Slide,
    ensemble: Ensemble,
    *,
    roi: BaseGeometry | None,
    tissue: TissueMask | None,
    config: NucleiConfig,
) -> TileGrid:
    """The tiles :func:`detect_nuclei` reads (``roi`` already validated): known before any is read, so a caller
    running the segmentation first can count them in one progress total."""
    manifest = ensemble.manifest
    tile = manifest.tile_size_px
    downsample = manifest.input_mpp / slide.mpp.mean
    # Tiles reach past the ROI by half the overlap, so nuclei on its boundary keep their context.
    grid_area = None if roi is None else roi.buffer(config.overlap_px / 2 * downsample, join_style="mitre")
    return tile_grid(
        image_size_wh=slide.dimensions,
        tile_size_px=tile,
        overlap_px=min(config.overlap_px, tile - 2),
        downsample=downsample,
        roi=grid_area,
        tissue_mask=None if tissue is None else tissue.mask,
        tissue_downsample=None if tissue is None else tissue.downsample,
        align_px=2,
    )


def detect_nuclei(
    slide: Slide,
    ensemble: Ensemble,
    *,
    roi: BaseGeometry | None = None,
    tissue: TissueMask | None = None,
    config: NucleiConfig | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    grid: TileGrid | None = None,
) -> Nuclei:
    """Find nuclei in the ROI (or tissue, or whole image); positions in level-0 px. ``grid``: the tiles where the
    caller planned them already (:func:`plan_nuclei_tiles` of the same slide, ensemble, ROI, tissue and config; a
    slide's grid takes about a second to plan)."""
    config = config or NucleiConfig()
    manifest = ensemble.manifest
    names = tuple(manifest.class_names)
    if roi is not None:
        roi = validate_roi(roi, image_size_wh=slide.dimensions)
    if grid is None:
        grid = plan_nuclei_tiles(slide, ensemble, roi=roi, tissue=tissue, config=config)
    cores = grid.cores_model_px()
    batch_size = config.batch_for(ensemble.device)
    radius_px = max(1, round(config.nms_radius_um / manifest.input_mpp))
    min_score = config.min_score_for(manifest)
    precision = Precision.choose(config.precision, ensemble.device)
    ensemble = ensemble.on_runtime(config.runtime, precision=precision)
    tta = config.tta_for(manifest)
    pos_i, neg_i = names.index("Tumor: Positive"), names.index("Tumor: Negative")
    ring_px = membrane_ring_px(manifest) if manifest.stain == "H-DAB" else None
    total = len(grid)
    xy_parts, val_parts, ent_parts, dab_parts, member_parts = [], [], [], [], []

    batch: list[tuple[int, np.ndarray]] = []
    done = 0

    def flush() -> None:
        nonlocal done
        idx = np.array([i for i, _ in batch])
        heat_members = _member_heatmaps(ensemble, np.stack([p for _, p in batch]), precision, tta=tta)
        heat = heat_members.mean(dim=0)
        b, y, x = heatmap_peaks(heat, radius_px=radius_px, min_score=min_score)
        values = heat[b, :, y, x].cpu().numpy().astype(np.float64)
        b_np, y_np, x_np = b.cpu().numpy(), y.cpu().numpy(), x.cpu().numpy()
        gx = grid.origins_model_px[idx[b_np], 0] + x_np + 0.5
        gy = grid.origins_model_px[idx[b_np], 1] + y_np + 0.5
        core = cores[idx[b_np]]
        own = (gx >= core[:, 0]) & (gx < core[:, 2]) & (gy >= core[:, 1]) & (gy < core[:, 3])
        xy_parts.append(np.column_stack([gx[own], gy[own]]) * grid.downsample)
        val_parts.append(values[own])
        if ring_px is not None:
            dab_parts.append(_membrane_dab(batch, b_np[own], x_np[own], y_np[own], ring_px))
        if len(ensemble.members) > 1:
            # (B, H, W, M, C) indexed by peak -> (N, M, C)
            member_vals = heat_members.permute(1, 3, 4, 0, 2)[b, y, x].cpu().numpy().astype(np.float64)[own]
            p_members = member_vals / np.clip(member_vals.sum(axis=2, keepdims=True), 1e-12, None)
            p_mean = p_members.mean(axis=1)
            member_parts.append(p_members.argmax(axis=2).astype(np.int8))
            ent_parts.append(-(p_mean * np.log(np.clip(p_mean, 1e-12, None))).sum(axis=1))
        release_every(done, done + len(batch))
        done += len(batch)
        batch.clear()
        if on_progress is not None:
            on_progress(done, total)

    if on_progress is not None:
        on_progress(0, total)
    tiles = read_grid_tiles(
        slide,
        grid,
        mpp=manifest.input_mpp,
        workers=config.read_workers,
        block_tiles=config.read_block_tiles,
        max_pending_tiles=2 * batch_size,
    )
    try:
        for index, pixels in tiles:
            batch.append((index, pixels))
            if len(batch) == batch_size:
                if should_cancel is not None and should_cancel():
                    raise Cancelled(f"cancelled after {done} of {total} tiles")
                flush()
    finally:
        tiles.close()  # stops pending reads at once on an error or a cancel
    if batch:
        flush()
    release_every(done, done, finished=True)

    xy = np.concatenate(xy_parts) if xy_parts else np.zeros((0, 2))
    values = np.concatenate(val_parts) if val_parts else np.zeros((0, len(names)))
    entropy = np.concatenate(ent_parts) if ent_parts else None
    member_cls = np.concatenate(member_parts) if member_parts else None
    dab = np.concatenate(dab_parts) if dab_parts else (np.zeros(0) if ring_px is not None else None)
    score = values.max(axis=1) if len(values) else np.zeros(0)
    keep = radius_nms(xy, score, radius=config.nms_radius_um / slide.mpp.mean)
    width, height = slide.dimensions
    inside = (xy[keep, 0] >= 0) & (xy[keep, 0] < width) & (xy[keep, 1] >= 0) & (xy[keep, 1] < height)
    keep = keep[inside]
    if roi is not None:
        keep = keep[shapely.contains_xy(roi, xy[keep, 0], xy[keep, 1])]
    probs = class_probabilities(values[keep])
    cls = probs.argmax(axis=1) if len(keep) else np.zeros(0, np.int64)
    tumour = probs[:, pos_i] + probs[:, neg_i]
    membrane = intensity = None
    if dab is not None:
        membrane = dab[keep]
        # A positive tumour cell is 1+ at least: any membrane staining counts for TPS.
        graded = np.maximum(intensity_grades(membrane, intensity_limits_od(manifest)), 1)
        intensity = np.where(cls == pos_i, graded, 0)
    log.info("%d nuclei in %d tiles", len(keep), total)
    return Nuclei(
        xy=xy[keep],
        cls=cls.astype(np.int64),
        score=score[keep],
        class_prob=probs[np.arange(len(keep)), cls] if len(keep) else np.zeros(0),
        positive_prob=np.where(tumour > 0, probs[:, pos_i] / np.clip(tumour, 1e-12, None), 0.0),
        entropy=None if entropy is None else entropy[keep],
        class_names=names,
        membrane_dab_od=membrane,
        intensity=intensity,
        member_cls=None if member_cls is None else member_cls[keep],
    )


def membrane_ring_px(manifest) -> tuple[float, float]:
    """Inner and outer radius of the membrane ring around a nucleus, in the model's px."""
    inner = float(manifest.thresholds.get("membrane_inner_um", MEMBRANE_RING_UM[0]))
    outer = float(manifest.thresholds.get("membrane_outer_um", MEMBRANE_RING_UM[1]))
    return inner / manifest.input_mpp, outer / manifest.input_mpp


def intensity_limits_od(manifest) -> tuple[float, float, float]:
    """Membrane DAB OD limits of 1+, 2+ and 3+: the manifest's calibrated ones, else QuPath's defaults."""
    t = manifest.thresholds
    keys = ("intensity_1plus_od", "intensity_2plus_od", "intensity_3plus_od")
    return tuple(float(t.get(k, d)) for k, d in zip(keys, DEFAULT_INTENSITY_LIMITS_OD, strict=True))


def _membrane_dab(
    batch: list[tuple[int, np.ndarray]], b: np.ndarray, x: np.ndarray, y: np.ndarray, ring_px: tuple[float, float]
) -> np.ndarray:
    """Membrane DAB OD (the ring's 75th percentile) of each peak (tile ``b``, model px ``x``, ``y``), from its tile."""
    out = np.full(len(b), np.nan)
    for tile in np.unique(b):
        at = b == tile
        centres = np.column_stack([x[at] + 0.5, y[at] + 0.5])
        out[at] = annulus_means(
            dab_density(batch[tile][1]),
            centres,
            inner_px=ring_px[0],
            outer_px=ring_px[1],
            percentile=MEMBRANE_PERCENTILE,
        )
    return out


def dihedral_mean(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Mean of ``predict`` over the 8 flips and 90° rotations of ``x`` (..., H, W), each mapped back.

    ``predict`` must map (..., H, W) to (..., H, W) pixel for pixel (an FCN at full resolution); the
    result is equivariant under those 8 transforms whatever ``predict`` is.

    A 4-d ``x`` in channels-last strides (``Ensemble.normalize``'s output) is handed to ``predict`` in them in every
    transform, as in the plain pass: ``rot90`` otherwise returns NCHW (k=0) or transposed strides (k=1, 3), on
    which eager PyTorch's CPU convolutions ran the H&E nuclei members 1.6x slower in bf16 (32 ms against 20 for
    2 tiles, 2 CPUs, 2026-12-05): 6 of the 8 passes. ``detect_nuclei`` with TTA on 4096² px of the 8192² phantom:
    8.0 s against 11.2 (medians of 3), the same 19 477 nuclei and classes, 2 peaks moved by a pixel or two.

    Examples
    --------
    >>> x = torch.arange(6.0).reshape(1, 1, 2, 3)
    >>> torch.equal(dihedral_mean(lambda t: 2 * t, x), 2 * x)
    True
    >>> dihedral_mean(lambda t: torch.zeros_like(t) + torch.arange(t.shape[-1]), torch.zeros(2, 2)).tolist()
    [[0.5, 0.5], [0.5, 0.5]]
    """
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    total = None
    for k in range(4):
        for flip in (False, True):
            t = torch.rot90(x, k, dims=(-2, -1))
            t = t.flip(-1) if flip else t
            y = predict(t.contiguous(memory_format=torch.channels_last) if channels_last else t)
            y = torch.rot90(y.flip(-1) if flip else y, -k, dims=(-2, -1))
            total = y if total is None else total + y
    return total / 8


@torch.inference_mode()
def _member_heatmaps(ensemble: Ensemble, batch: np.ndarray, precision: Precision, *, tta: bool) -> torch.Tensor:
    """Each member's heatmaps (M, B, C, H, W) of a (B, H, W, 3) uint8 batch; ``tta``: see :class:`NucleiConfig`."""
    x = ensemble.normalize(torch.from_numpy(batch))
    if not tta:
        return torch.sigmoid(_forward(ensemble, x, precision))
    # Probabilities are averaged over the transforms as they are over the members.
    return dihedral_mean(lambda t: torch.sigmoid(_forward(ensemble, t, precision)), x)


def _forward(ensemble: Ensemble, x: torch.Tensor, precision: Precision) -> torch.Tensor:
    """Each member's logits (M, B, C, H, W) of a normalised batch (B, 3, H, W)."""
    out = []
    for model in ensemble.members:
        if precision.autocast_dtype is not None:
            with torch.autocast(ensemble.device.type, dtype=precision.autocast_dtype):
                out.append(model(x).float())
        else:
            out.append(model(x))
    return torch.stack(out)


def pdl1_from_maps(nuclei: Nuclei, maps: UncertaintyMaps, *, threshold: float) -> Nuclei:
    """H&E nuclei whose PD-L1 call comes from the segmentation ensemble's maps at their position.

    The nuclei model says what H&E shows, tumour or other; whether a tumour nucleus is PD-L1 positive is the
    ensemble-mean probability at its map pixel (``>= threshold``), and each member's own map gives that
    member's call (``member_cls``, so :meth:`Nuclei.member_tps` is the spread of the predicted TPS; needs
    ``member_prob``). ``positive_prob`` becomes the map's probability, ``pdl1_entropy`` its predictive
    entropy, ``class_prob`` the nuclei model's probability of tumour times the map's of the call. A tumour
    nucleus off the maps' covered pixels keeps the nuclei model's own call.
    """
    names = nuclei.class_names
    pos, neg = names.index("Tumor: Positive"), names.index("Tumor: Negative")
    tumour = np.isin(nuclei.cls, [pos, neg])
    h, w = maps.shape
    col = np.floor((nuclei.xy[:, 0] - maps.origin_xy[0]) / maps.downsample).astype(np.int64)
    row = np.floor((nuclei.xy[:, 1] - maps.origin_xy[1]) / maps.downsample).astype(np.int64)
    on_map = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    col, row = np.clip(col, 0, w - 1), np.clip(row, 0, h - 1)
    use = tumour & on_map & np.asarray(maps.covered)[row, col]
    prob = np.asarray(maps.prob)[row, col].astype(np.float64)
    cls = np.where(use, np.where(prob >= threshold, pos, neg), nuclei.cls)
    # The nuclei model's P(tumour) = P(its class) / P(that class among tumour classes).
    share = np.where(nuclei.cls == pos, nuclei.positive_prob, 1 - nuclei.positive_prob)
    with np.errstate(divide="ignore", invalid="ignore"):
        p_tumour = np.clip(np.where(share > 0, nuclei.class_prob / share, 0.0), 0, 1)
    class_prob = np.where(use, p_tumour * np.where(cls == pos, prob, 1 - prob), nuclei.class_prob)
    member_cls = None
    if maps.member_prob is not None:
        member_prob = np.stack([np.asarray(m)[row, col] for m in maps.member_prob], axis=1)
        member_cls = np.where(use[:, None], np.where(member_prob >= threshold, pos, neg), cls[:, None])
        member_cls = member_cls.astype(np.int8)
    return replace(
        nuclei,
        cls=cls.astype(np.int64),
        class_prob=class_prob,
        positive_prob=np.where(use, prob, nuclei.positive_prob),
        member_cls=member_cls,
        pdl1_entropy=np.where(use, np.asarray(maps.predictive_entropy)[row, col], np.nan),
    )
