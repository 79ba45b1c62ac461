"""Stain detection (``inference.slides.stain_detect``) on a folder of real images of stated stain: a held-out check.

``python -m benchmarks.stain_real_images DIR [--csv DIR/images.csv] [--mpp 8] [--min-side 24]``. ``DIR`` holds
PIL-readable RGB images (PNG, JPEG, TIFF) and a CSV with at least the columns ``file`` and ``stated_stain``
(``H&E`` or ``H-DAB``; ``he``/``ihc`` and any case read too); optional ``mpp`` (µm per pixel, approximate is
fine), ``held_out`` (``no`` for an image the detector was tuned or checked on; default ``yes``) and ``source``.
The images stay outside the repository (their licences are their sources').

Each image is judged twice: at its own resolution, and resampled to about ``--mpp`` µm/px (8, as
:func:`detect_slide_stain` reads a slide's thumbnail) by the box average :meth:`Slide.read_region_at_mpp` uses
when shrinking, where its ``mpp`` is known, finer than ``--mpp`` and the result keeps at least ``--min-side`` px
on its short side (a 512 px tile at 0.25 µm/px would be 16 px: that row says ``-``). A call is *weak* where
its margin is under :data:`WEAK_MARGIN_DEG` (the pipeline flags it for review); *wrong* where it is not the
stated stain (``other`` included); *wrong, unflagged* where wrong with a margin of :data:`WEAK_MARGIN_DEG` or
more: an image the product would analyse with the wrong models and no weak-margin review reason. Not a
registry benchmark: it prints one table (with the numbers the call rests on) and a summary per resolution,
for the held-out images and for all. Nothing in it tunes the detector.
"""

from __future__ import annotations

import argparse
import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from inference.slides.stain_detect import HDAB, HE, StainEstimate, detect_stain

# The margin under which the pipeline gives a stain told from colour a review reason (README: "by under 5°").
WEAK_MARGIN_DEG = 5.0
_STAIN_NAMES = {"h&e": HE, "he": HE, "h-dab": HDAB, "hdab": HDAB, "ihc": HDAB}


@dataclass(frozen=True)
class Judged:
    """One image at one resolution: what it is said to be and what the detector called it."""

    image: str
    resolution: str  # "native" or e.g. "8 µm/px"
    stated: str
    held_out: bool
    size: tuple[int, int] | None  # (width, height) judged; None where not judged at this resolution
    estimate: StainEstimate | None

    @property
    def judged(self) -> bool:
        return self.estimate is not None

    @property
    def right(self) -> bool:
        return self.judged and self.estimate.stain == self.stated

    @property
    def weak(self) -> bool:
        return self.judged and self.estimate.margin_deg < WEAK_MARGIN_DEG


@dataclass(frozen=True)
class Summary:
    judged: int
    wrong: int
    wrong_unflagged: int
    right_weak: int


def stated_stain(text: str) -> str:
    """``H&E`` or ``H-DAB`` from a CSV's spelling (``he``, ``IHC``, ``H-DAB``, ...)."""
    try:
        return _STAIN_NAMES[text.strip().lower()]
    except KeyError:
        raise ValueError(f"stated stain {text!r} is neither H&E nor H-DAB (he, ihc)") from None


def downsampled(rgb: np.ndarray, mpp: float, target_mpp: float, *, min_side: int) -> np.ndarray | None:
    """``rgb`` at ``target_mpp`` µm/px, box-averaged as a slide's thumbnail is; None where it would be
    enlarged or left under ``min_side`` px on its short side."""
    if not mpp > 0 or mpp >= target_mpp:
        return None
    factor = target_mpp / mpp
    h, w = rgb.shape[:2]
    size = (round(w / factor), round(h / factor))
    if min(size) < min_side:
        return None
    return np.asarray(Image.fromarray(rgb).resize(size, resample=Image.Resampling.BOX))


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"file", "stated_stain"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{csv_path}: no column {', '.join(sorted(missing))}")
    return rows


def evaluate(folder: Path, rows: list[dict[str, str]], *, target_mpp: float = 8.0, min_side: int = 24) -> list[Judged]:
    """Every image of ``rows`` judged at its own resolution and at ``target_mpp``: two entries an image."""
    out = []
    coarse_name = f"{target_mpp:g} µm/px"
    for row in rows:
        stated = stated_stain(row["stated_stain"])
        held_out = row.get("held_out", "yes").strip().lower() not in ("no", "false", "0")
        rgb = np.asarray(Image.open(folder / row["file"]).convert("RGB"))
        mpp = float(row.get("mpp") or "nan")
        for resolution, image in (("native", rgb), (coarse_name, downsampled(rgb, mpp, target_mpp, min_side=min_side))):
            size = None if image is None else (image.shape[1], image.shape[0])
            estimate = None if image is None else detect_stain(image)
            out.append(Judged(row["file"], resolution, stated, held_out, size, estimate))
    return out


def summarise(judged: list[Judged]) -> Summary:
    seen = [j for j in judged if j.judged]
    wrong = [j for j in seen if not j.right]
    return Summary(
        judged=len(seen),
        wrong=len(wrong),
        wrong_unflagged=sum(not j.weak for j in wrong),
        right_weak=sum(j.right and j.weak for j in seen),
    )


def _number(x: float, width: int, digits: int = 1) -> str:
    return f"{'-':>{width}s}" if x is None or math.isnan(x) else f"{x:{width}.{digits}f}"


def format_table(judged: list[Judged]) -> list[str]:
    """One line an image and resolution: call, margin, weak, right, the numbers the call rests on, the reason."""
    lines = [
        f"{'image':28s} {'resolution':10s} {'size':>9s} {'stated':6s} {'call':6s} {'margin°':>7s} {'weak':4s} "
        f"{'ok':5s} {'hue°':>6s} {'apart°':>6s} {'red°':>5s} {'corr':>5s} {'lowOD':>5s}  reason"
    ]
    for j in judged:
        size = "-" if j.size is None else f"{j.size[0]}x{j.size[1]}"
        tag = "" if j.held_out else " (seen)"
        if not j.judged:
            lines.append(f"{j.image:28s} {j.resolution:10s} {size:>9s} {j.stated:6s} {'-':6s}  not judged: too small")
            continue
        e = j.estimate
        lines.append(
            f"{j.image:28s} {j.resolution:10s} {size:>9s} {j.stated:6s} {e.stain:6s} {e.margin_deg:7.1f} "
            f"{'weak' if j.weak else '':4s} {'ok' if j.right else 'WRONG':5s} {_number(e.second_hue_deg, 6)} "
            f"{_number(e.stain_angle_deg, 6)} {_number(e.red_gap_deg, 5)} {_number(e.spread_correlation, 5, 2)} "
            f"{_number(e.low_haem_second_od, 5, 2)}  {e.reason}{tag}"
        )
    return lines


def format_summary(judged: list[Judged]) -> list[str]:
    lines = []
    for resolution in dict.fromkeys(j.resolution for j in judged):
        for scope, chosen in (("held out", [j for j in judged if j.held_out]), ("all", judged)):
            here = [j for j in chosen if j.resolution == resolution]
            for stain in (HE, HDAB, "both"):
                some = here if stain == "both" else [j for j in here if j.stated == stain]
                s = summarise(some)
                lines.append(
                    f"{resolution:10s} {scope:8s} {stain:5s}: {s.judged:3d} judged, {s.wrong:2d} wrong "
                    f"({s.wrong_unflagged} unflagged, margin >= {WEAK_MARGIN_DEG:g}°), {s.right_weak:2d} right but weak"
                )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stain_real_images", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="folder of the images (and, by default, images.csv)")
    parser.add_argument("--csv", type=Path, default=None, help="the images' CSV (default FOLDER/images.csv)")
    parser.add_argument("--mpp", type=float, default=8.0, help="the coarse resolution, µm/px (default 8)")
    parser.add_argument(
        "--min-side", type=int, default=24, help="judge the coarse version only where its short side keeps this many px"
    )
    args = parser.parse_args(argv)
    rows = read_rows(args.csv or args.folder / "images.csv")
    judged = evaluate(args.folder, rows, target_mpp=args.mpp, min_side=args.min_side)
    print("\n".join(format_table(judged)))
    print()
    print("\n".join(format_summary(judged)))


if __name__ == "__main__":
    main()
