"""Where the two stains lie in the tissue, beside what stain detection said: the numbers issue #31 explored.

``python -m benchmarks.stain_structure DIR... [--out features.csv]``: for every phantom slide with a truth
folder in each ``DIR`` (``benchmarks.review_phantoms --ihc`` writes ``c<seed>.svs`` H&E and ``ihc_<seed>.svs``
IHC) and the real images at hand (the CMU H&E where cached, the HGSC stroma tile and the QuPath fixture,
scikit-image's immunostain whole and every 4th pixel), one row: the truth, what
:func:`~inference.slides.stain_detect.detect_stain` said (stain, margin, hue, red gap) on the 8 µm/px
thumbnail, and statistics of the two stains' concentrations over the tissue, unmixed on the detector's own
two extreme vectors:

* ``share_median``, ``share_mean``: the second stain's share of each pixel's concentration (0 = haematoxylin
  only, 1 = second stain only); ``mass_share``: its share of the summed concentration;
* ``coverage``: share of tissue pixels where the second stain exceeds a quarter of its 99th percentile;
  ``h_coverage`` the same of haematoxylin;
* ``corr``: Pearson correlation of the two concentrations over tissue pixels;
* ``low_high``: the second stain's mean over the third of the tissue with least haematoxylin divided by its
  mean over the third with most (eosin fills stroma, DAB marks cells);
* ``s_fine``, ``h_fine``: each concentration's detail left after a 1.5 px Gaussian, over its spread.

Not a registry benchmark: it prints (and writes) a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from inference.slides import stain_detect as sd
from inference.slides.slide import open_slide

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
CMU = Path.home() / ".cache" / "pdl1-bridge-tests" / "cmu_small_region.svs"
COLUMNS = (
    "name",
    "truth",
    "found",
    "margin",
    "hue",
    "dab_hue",
    "red_gap",
    "apart",
    "shift",
    "tps",
    "share_median",
    "share_mean",
    "mass_share",
    "coverage",
    "h_coverage",
    "corr",
    "low_high",
    "s_fine",
    "h_fine",
    "s_low",
    "s_med",
    "h_med",
    "od_med",
    "tissue_frac",
    "ms",
)


def _od_and_tissue(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Optical density (h, w, 3) and tissue mask as detect_stain builds them."""
    px = sd._denoised(rgb)
    flat = px.reshape(-1, 3)
    brightness = flat.mean(axis=1)
    background = np.median(flat[brightness >= np.quantile(brightness, sd.BACKGROUND_QUANTILE)], axis=0)
    od = np.clip(-np.log((px + 1) / (background + 1)), 0, None)
    return od, od.sum(axis=2) > sd.TISSUE_OD


def structure(rgb: np.ndarray, estimate: sd.StainEstimate) -> dict[str, float]:
    """The statistics of the module docstring (NaN where the detector measured no two stains)."""
    names = COLUMNS[10:-1]  # tissue_frac comes from the estimate
    if not np.all(np.isfinite(estimate.haematoxylin_od)) or not np.all(np.isfinite(estimate.second_od)):
        return dict.fromkeys(names, math.nan)
    od, tissue = _od_and_tissue(rgb)
    basis = np.stack([estimate.haematoxylin_od, estimate.second_od])  # (2, 3)
    conc = np.clip(od @ np.linalg.pinv(basis), 0, None)  # (h, w, 2)
    ch, cs = conc[..., 0], conc[..., 1]
    h, s = ch[tissue], cs[tissue]
    total = h + s
    share = s / np.maximum(total, 1e-6)
    lo_cut, hi_cut = np.quantile(h, [1 / 3, 2 / 3])
    low, high = s[h <= lo_cut].mean(), s[h >= hi_cut].mean()

    def fine(c: np.ndarray) -> float:
        detail = (c - ndi.gaussian_filter(c, 1.5))[tissue]
        return float(detail.std() / max(c[tissue].std(), 1e-6))

    return {
        "share_median": float(np.median(share)),
        "share_mean": float(share.mean()),
        "mass_share": float(s.sum() / max(total.sum(), 1e-6)),
        "coverage": float((s > 0.25 * np.quantile(s, 0.99)).mean()),
        "h_coverage": float((h > 0.25 * np.quantile(h, 0.99)).mean()),
        "corr": float(np.corrcoef(h, s)[0, 1]) if h.std() > 0 and s.std() > 0 else math.nan,
        "low_high": float(low / max(high, 1e-6)),
        "s_fine": fine(cs),
        "h_fine": fine(ch),
        "s_low": float(low),
        "s_med": float(np.median(s)),
        "h_med": float(np.median(h)),
        "od_med": float(np.median(od[tissue].sum(axis=1))),
        "tissue_frac": estimate.tissue_fraction,
    }


def row(name: str, truth: str, rgb: np.ndarray, **extra) -> dict:
    t0 = time.perf_counter()
    estimate = sd.detect_stain(rgb)
    ms = (time.perf_counter() - t0) * 1e3
    out = {
        "name": name,
        "truth": truth,
        "found": estimate.stain,
        "margin": estimate.margin_deg,
        "hue": estimate.second_hue_deg,
        "dab_hue": estimate.dab_hue_deg,
        "red_gap": estimate.red_gap_deg,
        "apart": estimate.stain_angle_deg,
        "shift": extra.get("shift", math.nan),
        "tps": extra.get("tps", math.nan),
        "ms": ms,
    }
    out.update(structure(rgb, estimate))
    return out


def _thumbnail(path: Path) -> np.ndarray:
    with open_slide(path) as slide:
        return np.array(slide.thumbnail(mpp=8.0))


def rows_for(folders: list[Path], *, real: bool = True) -> list[dict]:
    rows = []
    if real:
        from skimage import data

        for path, truth in (
            (CMU, "H&E"),
            (FIXTURES / "real-he-hgsc-stroma" / "hgsc_stroma.svs", "H&E"),
            (FIXTURES / "qupath-0.4.4-labels" / "he-1357.svs", "H&E"),
        ):
            if path.is_file():
                rows.append(row(path.name, truth, _thumbnail(path)))
        ihc = data.immunohistochemistry()
        rows.append(row("skimage_ihc", "H-DAB", ihc))
        rows.append(row("skimage_ihc/4", "H-DAB", np.ascontiguousarray(ihc[::4, ::4])))
    for folder in folders:
        for path in sorted(folder.glob("*.svs")):
            spec_path = path.with_suffix(".truth") / "truth.json"
            if not spec_path.is_file():
                continue
            spec = json.loads(spec_path.read_text())["spec"]
            truth = "H-DAB" if path.name.startswith("ihc_") else "H&E"
            rows.append(
                row(path.stem, truth, _thumbnail(path), shift=spec.get("shift", math.nan), tps=spec.get("tps_percent"))
            )
    return rows


def rendered_thumbnails(seeds: list[int], *, size_px: int = 2048, reduced_levels: str = "rendered"):
    """(name, truth, thumbnail, shift, TPS) of each seed's review phantom pair, rendered without writing slides.

    As ``benchmarks.review_phantoms --ihc`` would write them and :meth:`Slide.thumbnail` read them at 8 µm/px:
    the pyramid level at downsample 4 rendered tile by tile, JPEG-coded as the SVS writer codes it (YCbCr 2x2
    at the phantom's quality), box-averaged 4x. Decoders may differ by a grey level from OpenSlide's.
    ``reduced_levels="averaged"``: that level box-averaged 4 x 4 from level 0's pixels before JPEG, as
    ``pdl1 phantom --reduced-levels averaged`` writes it (and a scanner builds its pyramid); 16 times the rendering.
    """
    import imagecodecs
    from PIL import Image

    from benchmarks.review_phantoms import draw
    from inference.phantom.ihc import IhcScene, IhcSpec
    from inference.phantom.pyramid import box_average_4
    from inference.phantom.render import render, render_ihc
    from inference.phantom.scene import PhantomScene, PhantomSpec

    for seed in seeds:
        tps, shift, weak = draw(seed)
        spec = PhantomSpec(size_px, size_px, seed=seed, tps_percent=tps, shift=shift, weak_fraction=weak)
        for name, scene, paint, truth in (
            (f"c{seed}", PhantomScene(spec), render, "H&E"),
            (f"ihc_{seed}", IhcScene(spec, IhcSpec(immune_positive_fraction=0.3)), render_ihc, "H-DAB"),
        ):
            ds, tile = 4, spec.tile_size_px
            level = np.zeros((size_px // ds, size_px // ds, 3), np.uint8)
            for y in range(0, level.shape[0], tile):
                for x in range(0, level.shape[1], tile):
                    if reduced_levels == "averaged":
                        rgb = box_average_4(paint(scene, x * ds, y * ds, tile * ds, tile * ds, 1))
                    else:
                        rgb = paint(scene, x * ds, y * ds, tile, tile, ds)
                    coded = imagecodecs.jpeg8_encode(
                        rgb,
                        level=scene.stains.jpeg_quality,
                        colorspace="RGB",
                        outcolorspace="YCBCR",
                        subsampling=(2, 2),
                    )
                    level[y : y + tile, x : x + tile] = imagecodecs.jpeg8_decode(coded)[
                        : level.shape[0] - y, : level.shape[1] - x
                    ]
            thumb = np.asarray(Image.fromarray(level).reduce(4))  # 8 µm/px, as the slide reader box-averages
            yield name, truth, thumb, shift, tps


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stain_structure", description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="*")
    parser.add_argument("--out", type=Path, help="also write the table as CSV")
    parser.add_argument("--no-real", action="store_true", help="phantoms only")
    parser.add_argument(
        "--render",
        type=str,
        default="",
        help="FIRST-LAST: also review phantom pairs of these seeds, rendered in memory",
    )
    parser.add_argument(
        "--reduced-levels",
        choices=("rendered", "averaged"),
        default="rendered",
        help="how --render builds the level the thumbnail is read from (as pdl1 phantom --reduced-levels)",
    )
    args = parser.parse_args()
    rows = rows_for(args.folders, real=not args.no_real)
    if args.render:
        first, _, last = args.render.partition("-")
        for name, truth, thumb, shift, tps in rendered_thumbnails(
            list(range(int(first), int(last or first) + 1)), reduced_levels=args.reduced_levels
        ):
            rows.append(row(name, truth, thumb, shift=shift, tps=tps))
            print(name, rows[-1]["found"], f"{rows[-1]['margin']:.1f}", flush=True)
    if args.out:
        with args.out.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    width = max(len(r["name"]) for r in rows) if rows else 4
    print(" ".join([f"{'name':{width}s}", *(f"{c[:8]:>8s}" for c in COLUMNS[1:])]))
    for r in rows:
        cells = [f"{r[c]:8.3f}" if isinstance(r[c], float) else f"{r[c]!s:>8s}" for c in COLUMNS[1:]]
        mark = "" if r["truth"] == r["found"] else "  WRONG"
        print(" ".join([f"{r['name']:{width}s}", *cells]) + mark)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
