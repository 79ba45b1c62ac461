"""Write a phantom as a pyramidal slide (Aperio SVS or tiled TIFF) with its truth beside it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np

from inference import __version__
from inference.phantom.ihc import IhcScene, IhcSpec
from inference.phantom.render import render, render_ihc
from inference.phantom.scene import PhantomScene, PhantomSpec
from inference.phantom.truth import IHC_NUCLEUS_CLASSES, PhantomTruth, TruthWriter

# render_tile(x0, y0, width, height, downsample) -> RGB uint8 (height, width, 3) of a level's tile.
RenderTile = Callable[[int, int, int, int, int], np.ndarray]
# on_level0_tile(x0, y0): called once per level-0 tile as it is written (the truth is written there).
Level0Hook = Callable[[int, int], None]


def pyramid_downsamples(width_px: int, height_px: int) -> list[int]:
    """Downsamples 1, 4, 16, ... while the level keeps at least 256 px on its short side."""
    out = [1]
    while min(width_px, height_px) // (out[-1] * 4) >= 256:
        out.append(out[-1] * 4)
    return out


def check_slide_path(path: str | Path) -> Path:
    """``path`` as a Path if it names a slide a phantom can be written as (.svs, .tif, .tiff)."""
    path = Path(path)
    if path.suffix.lower() not in (".svs", ".tif", ".tiff"):
        raise ValueError(f"phantom slides are written as .svs or .tif/.tiff, got {path.name!r}")
    return path


def write_pyramid(
    path: Path,
    spec: PhantomSpec,
    render_tile: RenderTile,
    *,
    jpeg_quality: int,
    on_level0_tile: Level0Hook,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[int]:
    """Write the levels of a phantom slide tile by tile; returns the level downsamples.

    ``.svs`` writes an Aperio-style SVS (ImageDescription ``Aperio ...|MPP = ...``, JPEG
    tiles, levels at downsample 4); ``.tif``/``.tiff`` a generic tiled TIFF whose levels are
    consecutive pages with resolution tags in CENTIMETER (OpenSlide 4 ignores SubIFDs).
    Both open in OpenSlide with MPP and every level. ``spec.reduced_levels`` decides whether the
    levels below level 0 are rendered at their downsample or box-averaged 4 x 4 from the level above
    (level 1 from level 0's rendered pixels before JPEG).
    """
    import tifffile

    suffix = path.suffix.lower()
    tile = spec.tile_size_px
    levels = pyramid_downsamples(spec.width_px, spec.height_px)
    level_sizes = [(math.ceil(spec.width_px / d), math.ceil(spec.height_px / d)) for d in levels]
    total = sum(math.ceil(w / tile) * math.ceil(h / tile) for w, h in level_sizes)
    done = 0
    res_per_cm = 10_000.0 / spec.mpp
    w0, h0 = spec.width_px, spec.height_px
    bigtiff = w0 * h0 > 15_000 * 15_000

    averaged = spec.reduced_levels == "averaged"
    # An averaged pyramid keeps its reduced levels until their turn in unnamed scratch files beside the slide
    # (1/16 of level 0's bytes and less), so memory stays flat; they are JPEG-compressed only as written.
    reduced = [None] + [_scratch((h, w, 3), path.parent) for w, h in level_sizes[1:]] if averaged else []

    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        for level, (ds, (lw, lh)) in enumerate(zip(levels, level_sizes, strict=True)):
            if averaged and level >= 2:  # this level from the one above, 64 rows of it at a time
                above, below = reduced[level - 1], reduced[level]
                for y in range(0, above.shape[0], 64):
                    below[y // 4 : y // 4 + 16] = box_average_4(above[y : y + 64])

            def level_tiles(ds: int = ds, level: int = level, lw: int = lw, lh: int = lh) -> Iterator[np.ndarray]:
                nonlocal done
                for ty in range(0, lh, tile):
                    for tx in range(0, lw, tile):
                        if level == 0 or not averaged:
                            rgb = render_tile(tx * ds, ty * ds, tile, tile, ds)
                        else:  # the stored level's pixels, padded to a whole tile at the right and bottom edge
                            part = reduced[level][ty : ty + tile, tx : tx + tile]
                            ph, pw = part.shape[:2]
                            rgb = np.pad(part, ((0, tile - ph), (0, tile - pw), (0, 0)), mode="edge")
                        if level == 0:
                            if averaged and len(levels) > 1:  # tiles start on multiples of 4: whole 4x4 blocks
                                valid = rgb[: min(tile, h0 - ty), : min(tile, w0 - tx)]
                                reduced[1][ty // 4 : ty // 4 + tile // 4, tx // 4 : tx // 4 + tile // 4] = (
                                    box_average_4(valid)
                                )
                            on_level0_tile(tx, ty)
                        done += 1
                        if on_progress is not None:
                            on_progress(done, total)
                        yield rgb

            if suffix == ".svs":
                if level == 0:
                    description = (
                        f"Aperio Image Library v12.0.15 \n{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile}) "
                        f"JPEG/RGB Q={jpeg_quality}|AppMag = {round(10 / spec.mpp)}|MPP = {spec.mpp}"
                        f"|Filename = {_aperio_value(path.stem)}|pdl1-bridge phantom seed = {spec.seed}"
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
                compressionargs={"level": jpeg_quality},
                description=description,
                resolution=(res_per_cm / ds, res_per_cm / ds),
                resolutionunit="CENTIMETER",
                subfiletype=0 if level == 0 else 1,
                metadata=None,
            )
    return levels


def box_average_4(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` (h, w, 3) uint8 averaged over 4 x 4 blocks and rounded, (ceil(h/4), ceil(w/4), 3); a block cut
    by the right or bottom edge is the mean of its pixels inside.

    >>> box_average_4(np.arange(5 * 4 * 3, dtype=np.uint8).reshape(5, 4, 3))[..., 0].tolist()
    [[23], [53]]
    """
    h, w = rgb.shape[:2]
    ph, pw = -h % 4, -w % 4
    a = np.pad(rgb.astype(np.float32), ((0, ph), (0, pw), (0, 0)))
    sums = a.reshape((h + ph) // 4, 4, (w + pw) // 4, 4, 3).sum(axis=(1, 3))
    rows = np.full((h + ph) // 4, 4.0, np.float32)
    cols = np.full((w + pw) // 4, 4.0, np.float32)
    rows[-1] -= ph
    cols[-1] -= pw
    return np.clip(sums / (rows[:, None, None] * cols[None, :, None]) + 0.5, 0, 255).astype(np.uint8)


def _scratch(shape: tuple[int, int, int], folder: Path) -> np.ndarray:
    """A uint8 array of ``shape`` in an unnamed temporary file in ``folder`` (gone when it is)."""
    import tempfile

    with tempfile.TemporaryFile(dir=folder, prefix=".phantom-level-") as f:
        f.truncate(max(1, int(np.prod(shape))))
        return np.memmap(f, dtype=np.uint8, mode="r+", shape=shape)


def _aperio_value(text: str) -> str:
    """``text`` as a value of an Aperio ImageDescription, which TIFF keeps in 7-bit ASCII and which ``|`` splits:
    other characters as Python escapes them, ``|`` as ``_``.

    >>> _aperio_value("Fall 1|Schnitt ü")
    'Fall 1_Schnitt \\\\xfc'
    """
    return text.replace("|", "_").encode("ascii", "backslashreplace").decode("ascii")


def write_phantom(
    path: str | Path,
    spec: PhantomSpec,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> PhantomTruth:
    """Write a pyramidal phantom H&E slide and its truth (see :func:`write_pyramid` for the formats)."""
    path = check_slide_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scene = PhantomScene(spec)
    truth = TruthWriter(path, width_px=spec.width_px, height_px=spec.height_px, mask_downsample=spec.truth_downsample)
    return _write_scene(path, spec, scene, render, truth, on_progress=on_progress)


def write_ihc_phantom(
    path: str | Path,
    spec: PhantomSpec,
    ihc: IhcSpec | None = None,
    *,
    paired_with: str | Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> PhantomTruth:
    """Write the PD-L1 IHC (haematoxylin-DAB) section of ``spec``'s tissue and its truth.

    The slide is a consecutive section of the H&E that :func:`write_phantom` writes for the same
    ``spec`` (see :mod:`inference.phantom.ihc`); ``paired_with`` names that H&E slide in the truth.
    Its ``truth.json`` adds ``cps``, ``intensity_counts`` and the ``transform`` from IHC to H&E
    level-0 px (read by :func:`~inference.phantom.ihc.ihc_to_he_points`); ``nuclei.csv`` adds each
    nucleus's ``intensity`` and ``pattern``.
    """
    path = check_slide_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ihc = ihc or IhcSpec()
    scene = IhcScene(spec, ihc)
    truth = TruthWriter(
        path,
        width_px=spec.width_px,
        height_px=spec.height_px,
        mask_downsample=spec.truth_downsample,
        classes=IHC_NUCLEUS_CLASSES,
        ihc=True,
    )
    extra = {
        "ihc_spec": asdict(ihc),
        "paired_with": Path(paired_with).name if paired_with is not None else None,
        "transform": scene.transform.to_dict(),
    }
    return _write_scene(path, spec, scene, render_ihc, truth, on_progress=on_progress, extra=extra)


def _write_scene(
    path: Path,
    spec: PhantomSpec,
    scene: PhantomScene | IhcScene,
    draw: Callable[..., np.ndarray],
    truth: TruthWriter,
    *,
    on_progress: Callable[[int, int], None] | None,
    extra: dict | None = None,
) -> PhantomTruth:
    """Draw ``scene`` with ``draw`` into the pyramid at ``path`` while ``truth`` takes its level-0 tiles'
    nuclei (with an IHC's intensity and pattern) and positive mask."""
    tile, tds = spec.tile_size_px, spec.truth_downsample
    w0, h0 = spec.width_px, spec.height_px

    def on_level0_tile(x0: int, y0: int) -> None:
        nuc = scene.nuclei(x0, y0, min(tile, w0 - x0), min(tile, h0 - y0))
        graded = (nuc["intensity"], nuc["pattern"]) if truth.ihc else ()
        truth.add_nuclei(nuc["x"], nuc["y"], nuc["cls"], *graded)
        truth.add_mask(x0, y0, scene.positive_mask(x0, y0, tile // tds, tile // tds, tds))

    with truth:
        levels = write_pyramid(
            path,
            spec,
            lambda x0, y0, w, h, ds: draw(scene, x0, y0, w, h, ds),
            jpeg_quality=scene.stains.jpeg_quality,
            on_level0_tile=on_level0_tile,
            on_progress=on_progress,
        )
    return truth.finish(
        generator=f"pdl1-bridge {__version__} inference.phantom",
        spec=asdict(spec),
        levels=levels,
        jpeg_quality=scene.stains.jpeg_quality,
        extra=extra,
    )
