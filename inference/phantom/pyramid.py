"""Write a phantom as a pyramidal slide (Aperio SVS or tiled TIFF) with its truth beside it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np

from inference import __version__
from inference.phantom.render import render
from inference.phantom.scene import PhantomScene, PhantomSpec
from inference.phantom.truth import PhantomTruth, TruthWriter


def pyramid_downsamples(width_px: int, height_px: int) -> list[int]:
    """Downsamples 1, 4, 16, ... while the level keeps at least 256 px on its short side."""
    out = [1]
    while min(width_px, height_px) // (out[-1] * 4) >= 256:
        out.append(out[-1] * 4)
    return out


def _tiles(scene: PhantomScene, downsample: int, tile: int) -> Iterator[tuple[int, int, np.ndarray]]:
    spec = scene.spec
    lw, lh = math.ceil(spec.width_px / downsample), math.ceil(spec.height_px / downsample)
    for ty in range(0, lh, tile):
        for tx in range(0, lw, tile):
            yield tx, ty, render(scene, tx * downsample, ty * downsample, tile, tile, downsample)


def write_phantom(
    path: str | Path,
    spec: PhantomSpec,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> PhantomTruth:
    """Write a pyramidal phantom slide and its truth.

    ``.svs`` writes an Aperio-style SVS (ImageDescription ``Aperio ...|MPP = ...``, JPEG
    tiles, levels at downsample 4); ``.tif``/``.tiff`` a generic tiled TIFF whose levels are
    consecutive pages with resolution tags in CENTIMETER (OpenSlide 4 ignores SubIFDs).
    Both open in OpenSlide with MPP and every level.
    """
    import tifffile

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".svs", ".tif", ".tiff"):
        raise ValueError(f"phantom slides are written as .svs or .tif/.tiff, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    scene = PhantomScene(spec)
    tile = spec.tile_size_px
    levels = pyramid_downsamples(spec.width_px, spec.height_px)
    level_sizes = [(math.ceil(spec.width_px / d), math.ceil(spec.height_px / d)) for d in levels]
    total = sum(math.ceil(w / tile) * math.ceil(h / tile) for w, h in level_sizes)
    done = 0

    tds = spec.truth_downsample
    truth = TruthWriter(path, width_px=spec.width_px, height_px=spec.height_px, mask_downsample=tds)
    res_per_cm = 10_000.0 / spec.mpp
    quality = scene.stains.jpeg_quality
    w0, h0 = spec.width_px, spec.height_px
    bigtiff = w0 * h0 > 15_000 * 15_000

    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif, truth:
        for level, (ds, (lw, lh)) in enumerate(zip(levels, level_sizes, strict=True)):

            def level_tiles(ds: int = ds, level: int = level) -> Iterator[np.ndarray]:
                nonlocal done
                for tx, ty, rgb in _tiles(scene, ds, tile):
                    if level == 0:
                        x0, y0 = tx, ty
                        nuc = scene.nuclei(x0, y0, min(tile, w0 - x0), min(tile, h0 - y0))
                        truth.add_nuclei(nuc["x"], nuc["y"], nuc["cls"])
                        truth.add_mask(x0, y0, scene.positive_mask(x0, y0, tile // tds, tile // tds, tds))
                    done += 1
                    if on_progress is not None:
                        on_progress(done, total)
                    yield rgb

            if suffix == ".svs":
                if level == 0:
                    description = (
                        f"Aperio Image Library v12.0.15 \n{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile}) "
                        f"JPEG/RGB Q={quality}|AppMag = {round(10 / spec.mpp)}|MPP = {spec.mpp}"
                        f"|Filename = {path.stem}|pdl1-bridge phantom seed = {spec.seed}"
                    )
                else:
                    description = f"Aperio Image Library v12.0.15 \n{w0}x{h0} -> {lw}x{lh} - |"
            else:
                description = f"pdl1-bridge phantom seed={spec.seed} level={level}"
            tif.write(
                level_tiles(),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": quality},
                description=description,
                resolution=(res_per_cm / ds, res_per_cm / ds),
                resolutionunit="CENTIMETER",
                subfiletype=0 if level == 0 else 1,
                metadata=None,
            )

    return truth.finish(
        generator=f"pdl1-bridge {__version__} inference.phantom",
        spec=asdict(spec),
        levels=levels,
        jpeg_quality=quality,
    )
