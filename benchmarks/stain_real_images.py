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

``--pipeline``: each image also goes through the product end to end, as ``pdl1 run`` does with no stain stated
(:func:`inference.analyse_slide`, default models and settings, the whole image): written as a TIFF stating its
``mpp`` (the CSV's estimate where unknown; 0.5 µm/px where it has none), it is told from its colour on the 8 µm/px
thumbnail the pipeline reads, analysed on that stain's path and judged by its models' domain guards and
uncertainty. One line an image: the call, the path analysed, whether it was flagged for review and why (a weak
stain margin; the domain guard of which model, by its network features or its stain vectors; uncertainty and the
rest), or the error that refused it (e.g. an image too coarse for the model); then how many wrong calls were
flagged and by what, and how many right calls were flagged anyway. Slow: seconds to minutes an image on a CPU
(12-20 minutes for the 66 images of 2026-12-05 on two shared cores); ``--only a.png,b.png`` runs those rows alone.
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


# Default pixel size (µm/px) of an image whose CSV row states none.
DEFAULT_MPP = 0.5


@dataclass(frozen=True)
class PipelineRun:
    """One image through :func:`inference.analyse_slide` with no stain stated."""

    image: str
    stated: str
    mpp: float
    stain: str | None  # the stain analysed (None: refused)
    margin_deg: float  # the colour call's margin (NaN: not told from colour)
    flagged: bool
    reasons: tuple[str, ...]  # review reasons, short
    error: str = ""
    told_by: str = "colour"  # "colour", or "default" (H&E where the thumbnail had too little tissue to tell)

    @property
    def right(self) -> bool:
        return self.stain == self.stated

    @property
    def weak_margin(self) -> bool:
        return any(r.startswith("weak stain margin") for r in self.reasons)

    @property
    def domain(self) -> bool:
        return any(r.startswith("domain") for r in self.reasons)


def _short_reason(reason: dict) -> str:
    text = str(reason.get("reason", ""))
    value, limit = reason.get("value"), reason.get("limit")
    numbers = ""
    if isinstance(value, int | float) and isinstance(limit, int | float):
        numbers = f" {value:.3g}/{limit:.3g}"
    if text.startswith("stain told from the colour"):
        return f"weak stain margin{numbers}"
    if text.startswith("out of the training domain of "):
        model, _, what = text.removeprefix("out of the training domain of ").partition(": ")
        return f"domain {model} {'features' if what.startswith('network') else 'stain vectors'}{numbers}"
    return text.split(" (")[0] + numbers


def write_tiff(rgb: np.ndarray, path: Path, mpp: float) -> Path:
    """``rgb`` as a TIFF whose resolution tags state ``mpp`` µm/px (as the pipeline's tests write a real image)."""
    import tifffile

    per_cm = 1e4 / mpp
    tifffile.imwrite(path, rgb, resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
    return path


def run_pipeline(folder: Path, rows: list[dict[str, str]], workdir: Path, *, models=None) -> list[PipelineRun]:
    """Every image of ``rows`` through :func:`inference.analyse_slide` as ``pdl1 run`` does with no stain stated."""
    from inference import Models, PipelineConfig, analyse_slide, open_slide
    from inference.slides.stain_detect import detect_slide_stain

    config = PipelineConfig(device="cpu")
    models = models if models is not None else Models(config)
    out = []
    for row in rows:
        stated = stated_stain(row["stated_stain"])
        mpp = float(row.get("mpp") or "nan")
        mpp = mpp if mpp > 0 else DEFAULT_MPP
        rgb = np.asarray(Image.open(folder / row["file"]).convert("RGB"))
        path = write_tiff(rgb, workdir / (Path(row["file"]).stem + ".tif"), mpp)
        try:
            result = analyse_slide(path, models=models, config=config)
        except Exception as error:  # a refused image is a row of the table, not the end of it
            with open_slide(path) as slide:  # what the colour said, as the pipeline read it
                colour = detect_slide_stain(slide, mpp=config.tissue_mpp)
            why = f"(colour: {colour.stain}) {type(error).__name__}: {error}"  # the colour first: lines are cut
            out.append(PipelineRun(row["file"], stated, mpp, None, colour.margin_deg, False, (), why))
            continue
        colour = result.summary.get("stain_from_colour") or {}
        reasons = tuple(_short_reason(r) for r in result.summary.get("review_reasons", []))
        out.append(
            PipelineRun(
                row["file"],
                stated,
                mpp,
                result.stain,
                float(colour.get("margin_deg", math.nan)),
                bool(result.uncertainty_flag),
                reasons,
                told_by="colour" if result.stain_source.startswith("its colour") else "default",
            )
        )
    return out


def format_pipeline(runs: list[PipelineRun]) -> list[str]:
    """One line an image, then how many wrong and right calls were flagged and by what."""
    lines = [f"{'image':32s} {'mpp':>5s} {'stated':6s} {'path':6s} {'margin°':>7s} {'ok':5s} {'flag':4s}  reasons"]
    for r in runs:
        if r.stain is None:
            lines.append(
                f"{r.image:32s} {r.mpp:5.3g} {r.stated:6s} {'-':6s} {r.margin_deg:7.1f} {'-':5s} {'-':4s}  "
                f"refused: {r.error[:160]}"
            )
            continue
        lines.append(
            f"{r.image:32s} {r.mpp:5.3g} {r.stated:6s} {r.stain:6s} {r.margin_deg:7.1f} "
            f"{'ok' if r.right else 'WRONG':5s} {'yes' if r.flagged else 'no':4s}  "
            + ("[no tissue to tell a stain by: H&E by default] " if r.told_by == "default" else "")
            + "; ".join(r.reasons)
        )
    ran = [r for r in runs if r.stain is not None]
    wrong = [r for r in ran if not r.right]
    right = [r for r in ran if r.right]
    lines += [
        "",
        f"{len(runs)} images, {len(runs) - len(ran)} refused, {len(ran)} analysed "
        f"({sum(r.told_by == 'default' for r in ran)} as H&E by default: too little tissue on the thumbnail)",
        f"wrong stain: {len(wrong)}; flagged {sum(r.flagged for r in wrong)} (weak margin "
        f"{sum(r.weak_margin for r in wrong)}, domain guard {sum(r.domain for r in wrong)}); unflagged: "
        + (", ".join(r.image for r in wrong if not r.flagged) or "none"),
        f"right stain: {len(right)}; flagged anyway {sum(r.flagged for r in right)} (weak margin "
        f"{sum(r.weak_margin for r in right)}, domain guard {sum(r.domain for r in right)}, other reasons only "
        f"{sum(r.flagged and not r.domain and not r.weak_margin for r in right)})",
    ]
    for stain in (HE, HDAB):
        some = [r for r in right if r.stated == stain]
        lines.append(f"  right {stain}: {len(some)}, flagged {sum(r.flagged for r in some)}")
    kinds: dict[str, list[int]] = {}
    for r in ran:
        for kind in dict.fromkeys(_reason_kind(x) for x in r.reasons):
            kinds.setdefault(kind, [0, 0])[0 if r.right else 1] += 1
    lines.append("review reasons (images with it: right stain / wrong stain):")
    lines += [f"  {kind}: {n[0]} / {n[1]}" for kind, n in sorted(kinds.items(), key=lambda kv: -sum(kv[1]))]
    return lines


def _reason_kind(short: str) -> str:
    """A short reason without its numbers: "domain pdl1-seg features", "nuclei uncertainty", ..."""
    words = short.split()
    while words and any(c.isdigit() for c in words[-1]) and "/" in words[-1]:
        words.pop()
    return " ".join(words)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stain_real_images", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="folder of the images (and, by default, images.csv)")
    parser.add_argument("--csv", type=Path, default=None, help="the images' CSV (default FOLDER/images.csv)")
    parser.add_argument("--mpp", type=float, default=8.0, help="the coarse resolution, µm/px (default 8)")
    parser.add_argument(
        "--min-side", type=int, default=24, help="judge the coarse version only where its short side keeps this many px"
    )
    parser.add_argument(
        "--pipeline", action="store_true", help="also run each image end to end as pdl1 run does (slow)"
    )
    parser.add_argument("--only", default="", help="comma-separated file names: only these rows")
    args = parser.parse_args(argv)
    rows = read_rows(args.csv or args.folder / "images.csv")
    if args.only:
        wanted = set(args.only.split(","))
        rows = [r for r in rows if r["file"] in wanted]
    judged = evaluate(args.folder, rows, target_mpp=args.mpp, min_side=args.min_side)
    print("\n".join(format_table(judged)))
    print()
    print("\n".join(format_summary(judged)))
    if args.pipeline:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            runs = run_pipeline(args.folder, rows, Path(tmp))
        print()
        print("\n".join(format_pipeline(runs)))


if __name__ == "__main__":
    main()
