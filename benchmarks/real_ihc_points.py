"""The IHC path on real immunostains with nuclei marked: the shipped phantom-trained IHC nuclei ensemble, the LoG
baseline and the ensemble fine-tuned on a lab's points (``pdl1 train nuclei --stain ihc``), on DeepLIIF's tiles.

``python -m benchmarks.real_ihc_points DATA [--seeds 0,1] [--models DIR] [--train Lung1,Bladder1]``
``python -m benchmarks.real_ihc_points DATA --diagnose [--split train|test] [--model DIR]``

No real PD-L1 IHC with cells marked is at hand. The nearest is DeepLIIF's sample data (Ghahremani et al., Nature
Machine Intelligence 2022; github.com/nadeemlab/DeepLIIF, Apache 2.0 with the Commons Clause, read from ``DATA``
and never kept in this repository): Ki67 immunostains (haematoxylin and DAB, as a PD-L1 IHC) of lung and bladder,
512 x 512 px tiles scanned at 40x, each with a mask of its nuclei, Ki67 positive in red and negative in blue, made
from a multiplex immunofluorescence of the same section (not drawn by hand). Ki67 stains the nucleus where PD-L1
stains the membrane, so the shipped model's positive call is not the marker's; detection is the fair check, and the
fine-tuned rows show what a lab's own points teach. ``DATA`` is the ``Datasets/Sample_Dataset`` folder of that
repository at commit eab8bddd031d: ``train/{Lung1,Bladder1}.png`` (six 512 px panels side by side, the IHC first and
the mask last; 2 tiles) and ``test/*.png`` (the IHC first) with ``test_groundtruth/*.png`` (the mask; 4 tiles).

The protocol, fixed before any test tile was scored:

- Pixel size 0.25 µm/px (40x): the masks' nuclei are then 6-9 µm across (median equivalent diameter 24-36 px).
- Points: the centroid of every red or blue component of a mask of at least 30 px (the masks' anti-aliased specks
  are smaller); red is ``Tumor: Positive``, blue ``Tumor: Negative`` (a cell's type is not given).
- Scores on the 4 test tiles: detection within 3 µm (class-agnostic); over the matched nuclei, the share of truth
  positives called positive (a ``Tumor: Positive`` or ``Immune cells: PD-L1 positive``) and of truth negatives called
  anything else; the positive share of the cells called tumour or immune against the truth's red share.
- The shipped IHC ensemble as it is (its own threshold, no TTA); the LoG on haematoxylin tuned on the 2 training
  tiles; the shipped IHC ensemble fine-tuned on the 2 training tiles' points (each one ``Training region (all
  nuclei marked)``) with the stroma tile's pick unchanged (160 it/epoch, strong jitter, sigma 3.5 µm, lr 0.001,
  3 cycles of 2 epochs, batch 8, TTA), at the default threshold 0.3: no tile is left to fit one on.

``--diagnose`` asks what a model's positive call rests on, on one split (the training tiles by default: choices are
judged there, the test tiles are scored once): its calls on the tiles as they are and with their DAB taken out by
colour deconvolution (scikit-image's ``rgb2hed``, DAB set to 0, ``hed2rgb``), and the share of the truth's negatives
it calls positive by the membrane DAB the pipeline measures on their ring (OD, the ring's 75th percentile).
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import shapely
from PIL import Image
from scipy import ndimage as ndi
from skimage.color import hed2rgb, rgb2hed

from benchmarks import real_crc_points as crc
from benchmarks import real_tile_labels as stroma
from benchmarks.stain_real_images import write_tiff
from bridge.labels import LabelRules, labels_from_objects
from bridge.qupath_geojson import QuPathObject
from inference import IHC_NUCLEUS_CLASSES
from inference.analysis.nuclei import DEFAULT_MIN_SCORE, NucleiConfig, detect_nuclei
from inference.analysis.points import DetectionScores, match_points
from inference.models.ensemble import Ensemble, demo_model_dir
from inference.results import Nuclei
from inference.slides.slide import open_slide
from inference.training.train_nuclei import train_nuclei

MPP = 0.25  # 40x (DeepLIIF's tiles: 512 px at 40x)
TILE_PX = 512
MIN_COMPONENT_PX = 30
POSITIVE, NEGATIVE = "Tumor: Positive", "Tumor: Negative"
RULES = LabelRules(class_names=tuple(IHC_NUCLEUS_CLASSES), stain="H-DAB")
SETTING = stroma.Setting(iterations=160, stain_jitter="strong", sigma_um=3.5, lr_max=1e-3)
CALLED_POSITIVE = frozenset({"Tumor: Positive", "Immune cells: PD-L1 positive"})
CALLED_CELL = CALLED_POSITIVE | {"Tumor: Negative", "Immune cells: PD-L1 negative"}


@dataclass(frozen=True)
class Tile:
    """One tile: its name, split, IHC pixels, and its nuclei's centres (QuPath px) with Ki67 positive or not."""

    name: str
    split: str
    rgb: np.ndarray
    xy: np.ndarray
    positive: np.ndarray  # bool (N,)


def mask_points(mask_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The centroids (x, y, QuPath px: a pixel's centre at i + 0.5) of a DeepLIIF mask's red and blue nuclei of at
    least :data:`MIN_COMPONENT_PX`, and whether each is red (Ki67 positive)."""
    m = mask_rgb.astype(np.int16)
    red = (m[..., 0] > 150) & (m[..., 1] < 100) & (m[..., 2] < 100)
    blue = (m[..., 2] > 150) & (m[..., 0] < 100) & (m[..., 1] < 100)
    xy, positive = [], []
    for colour, is_positive in ((red, True), (blue, False)):
        lab, n = ndi.label(colour)
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        keep = [i for i in range(1, n + 1) if sizes[i] >= MIN_COMPONENT_PX]
        for y, x in ndi.center_of_mass(colour, lab, keep):
            xy.append((x + 0.5, y + 0.5))
            positive.append(is_positive)
    return np.array(xy, np.float64).reshape(-1, 2), np.array(positive, bool)


def read_tiles(data: Path) -> list[Tile]:
    """The 2 training and 4 test tiles of ``data`` (see the module docstring)."""
    tiles = []
    for path in sorted((data / "train").glob("*.png")):
        panels = np.asarray(Image.open(path).convert("RGB"))
        xy, positive = mask_points(panels[:, -TILE_PX:])
        tiles.append(Tile(path.stem, "train", np.ascontiguousarray(panels[:, :TILE_PX]), xy, positive))
    for path in sorted((data / "test").glob("*.png")):
        truth = data / "test_groundtruth" / path.name
        if not truth.exists():
            continue
        rgb = np.asarray(Image.open(path).convert("RGB"))[:, :TILE_PX]
        xy, positive = mask_points(np.asarray(Image.open(truth).convert("RGB")))
        tiles.append(Tile(path.stem, "test", np.ascontiguousarray(rgb), xy, positive))
    if not any(t.split == "train" for t in tiles) or not any(t.split == "test" for t in tiles):
        raise SystemExit(f"{data}: expected train/*.png and test/*.png with test_groundtruth/*.png (see --help)")
    return tiles


def tile_labels(tile: Tile, slide: Path):
    """The tile's points under one ``Training region (all nuclei marked)``, as a QuPath export gives them."""
    region = QuPathObject(
        shapely.box(0, 0, TILE_PX, TILE_PX), "annotation", "Training region", {}, "Training region (all nuclei marked)"
    )
    points = [
        QuPathObject(shapely.Point(x, y), "annotation", POSITIVE if p else NEGATIVE)
        for (x, y), p in zip(tile.xy, tile.positive, strict=True)
    ]
    return labels_from_objects(
        [region, *points], slide=str(slide), image_size_px=(TILE_PX, TILE_PX), rules=RULES, source=tile.name
    )


@dataclass(frozen=True)
class Scores:
    detection: DetectionScores
    truth_positive_called_positive: tuple[int, int]  # (called positive, matched truth positives)
    truth_negative_called_negative: tuple[int, int]
    called_positive_share: tuple[int, int]  # (called positive, called tumour or immune)

    def __add__(self, other: Scores) -> Scores:
        def add(a, b):
            return tuple(x + y for x, y in zip(a, b, strict=True))

        return Scores(
            self.detection + other.detection,
            add(self.truth_positive_called_positive, other.truth_positive_called_positive),
            add(self.truth_negative_called_negative, other.truth_negative_called_negative),
            add(self.called_positive_share, other.called_positive_share),
        )


def score_tile(tile: Tile, pred_xy: np.ndarray, pred_names: np.ndarray | None) -> Scores:
    """Detection within 3 µm and, with the predicted class names, the calls over the matched nuclei."""
    radius_px = stroma.RADIUS_UM / MPP
    detection = stroma._score(pred_xy, tile.xy, radius_px=radius_px)
    if pred_names is None:
        return Scores(detection, (0, 0), (0, 0), (0, 0))
    m = match_points(pred_xy, tile.xy, radius=radius_px)
    called = np.array([n in CALLED_POSITIVE for n in pred_names], bool)
    tp_pos = [(called[p], tile.positive[t]) for p, t in zip(m.pred_index, m.truth_index, strict=True)]
    pos = sum(1 for c, t in tp_pos if t and c), sum(1 for _, t in tp_pos if t)
    neg = sum(1 for c, t in tp_pos if not t and not c), sum(1 for _, t in tp_pos if not t)
    cells = np.array([n in CALLED_CELL for n in pred_names], bool)
    return Scores(detection, pos, neg, (int((called & cells).sum()), int(cells.sum())))


NO_SCORES = Scores(DetectionScores(0, 0, 0), (0, 0), (0, 0), (0, 0))  # what a sum over tiles starts from


def detected_nuclei(slide: Path, ensemble: Ensemble, config: NucleiConfig | None = None) -> Nuclei:
    """The nuclei ``ensemble`` finds on a tile written as ``slide`` (``config`` None: the model's own settings)."""
    with open_slide(slide) as opened:
        return detect_nuclei(opened, ensemble, config=config)


def call_names(nuclei: Nuclei) -> np.ndarray:
    """Each nucleus's class name (an object array), as :func:`score_tile` takes the calls."""
    return np.asarray(nuclei.class_names, dtype=object)[nuclei.cls]


def called_nuclei(
    slide: Path, ensemble: Ensemble, *, tta: bool = False, threshold: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The nuclei ``ensemble`` finds on a tile written as ``slide``: their centres (QuPath px) and class names."""
    found = detected_nuclei(slide, ensemble, NucleiConfig(tta=tta, min_score=threshold))
    return found.xy, call_names(found)


def without_dab(rgb: np.ndarray) -> np.ndarray:
    """The tile with its DAB taken out: colour deconvolution (scikit-image's H, E, DAB), DAB set to 0, recomposed."""
    hed = rgb2hed(rgb)
    hed[..., 2] = 0.0
    return np.clip(hed2rgb(hed) * 255 + 0.5, 0, 255).astype(np.uint8)


def ring_dab_od(tile: Tile) -> np.ndarray:
    """Membrane DAB OD of each truth nucleus on the pipeline's ring (3.5-5.5 µm, its 75th percentile), read at the
    tile's own 0.25 µm/px (the pipeline reads it at its model's input pixel size)."""
    from inference.analysis.ihc import annulus_means, dab_density
    from inference.analysis.nuclei import MEMBRANE_PERCENTILE, MEMBRANE_RING_UM

    inner, outer = (r / MPP for r in MEMBRANE_RING_UM)
    return annulus_means(dab_density(tile.rgb), tile.xy, inner_px=inner, outer_px=outer, percentile=MEMBRANE_PERCENTILE)


RING_BINS_OD = (0.0, 0.08, 0.10, 0.12, 0.15, np.inf)


def diagnose(tiles: list[Tile], model: Path, work: Path) -> None:
    """Print a model's calls on ``tiles`` as they are and without DAB, and its negatives' calls by ring DAB."""
    ensemble = Ensemble.load(model, task="nuclei")
    print(
        "| tiles | F1 (3 µm) | truth positives called positive | truth negatives called negative "
        "| share called positive |"
    )
    print("|---|---|---|---|---|")
    called_by_ring: list[tuple[float, bool]] = []
    for label, recolour in (("as they are", None), ("DAB removed", without_dab)):
        total = NO_SCORES
        for t in tiles:
            rgb = t.rgb if recolour is None else recolour(t.rgb)
            xy, names = called_nuclei(write_tiff(rgb, work / f"diagnose_{t.name}.tif", MPP), ensemble)
            total += score_tile(t, xy, names)
            if recolour is None:
                m = match_points(xy, t.xy, radius=stroma.RADIUS_UM / MPP)
                ring = ring_dab_od(t)
                called_by_ring += [
                    (float(ring[ti]), names[pi] in CALLED_POSITIVE)
                    for pi, ti in zip(m.pred_index, m.truth_index, strict=True)
                    if not t.positive[ti]
                ]
        d = total.detection
        print(
            f"| {label} | {d.f1:.3f} | {_frac(total.truth_positive_called_positive)} | "
            f"{_frac(total.truth_negative_called_negative)} | {_frac(total.called_positive_share)} |",
            flush=True,
        )
    ring = np.array([r for r, _ in called_by_ring])
    called = np.array([c for _, c in called_by_ring], bool)
    parts = []
    for lo, hi in itertools.pairwise(RING_BINS_OD):
        sel = (ring >= lo) & (ring < hi)
        parts.append(f"{lo:g}-{hi:g} OD: {_frac((int(called[sel].sum()), int(sel.sum())))}")
    print("\nTruth negatives (matched) called positive, by their ring's DAB: " + "; ".join(parts))


def _frac(pair: tuple[int, int]) -> str:
    return "-" if pair[1] == 0 else f"{pair[0] / pair[1]:.2f} ({pair[0]}/{pair[1]})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_ihc_points", description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="DeepLIIF's Datasets/Sample_Dataset folder")
    parser.add_argument("--seeds", default="0,1", help="seeds of the fine-tuned models")
    parser.add_argument("--models", type=Path, help="folder keeping every model trained, reused by later runs")
    parser.add_argument(
        "--train", default="", help="the training tiles the models learn from, by name (default: all; the LoG: all)"
    )
    parser.add_argument("--diagnose", action="store_true", help="what a model's positive call rests on (see above)")
    parser.add_argument("--split", choices=("train", "test"), default="train", help="--diagnose's tiles")
    parser.add_argument("--model", type=Path, help="--diagnose's model (default: the shipped IHC ensemble)")
    args = parser.parse_args(argv)
    tiles = read_tiles(args.data)
    if args.diagnose:
        with tempfile.TemporaryDirectory() as tmp:
            model = args.model or demo_model_dir("nuclei-ihc")
            print(f"{model} on the {args.split} tiles")
            diagnose([t for t in tiles if t.split == args.split], model, Path(tmp))
        return
    train, test = [t for t in tiles if t.split == "train"], [t for t in tiles if t.split == "test"]
    chosen = [t for t in train if not args.train or t.name in args.train.split(",")]
    if not chosen:
        raise SystemExit(f"--train {args.train}: no such training tile ({', '.join(t.name for t in train)})")
    for t in tiles:
        print(f"{t.split} {t.name}: {len(t.xy)} nuclei, {int(t.positive.sum())} Ki67 positive", flush=True)
    truth_pos = sum(int(t.positive.sum()) for t in test), sum(len(t.xy) for t in test)
    print(
        f"\nDeepLIIF Ki67 tiles at {MPP} µm/px; test truth positive share {_frac(truth_pos)}; detection within "
        f"{stroma.RADIUS_UM} µm\n"
    )
    print(
        "| detector | trained on (points) | threshold | precision | recall | F1 | truth positives called positive "
        "| truth negatives called negative | called positive share | time s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)

    def row(what: str, trained_on: str, threshold: str, s: Scores, seconds: float) -> None:
        d = s.detection
        print(
            f"| {what} | {trained_on} | {threshold} | {d.precision:.3f} | {d.recall:.3f} | {d.f1:.3f} | "
            f"{_frac(s.truth_positive_called_positive)} | {_frac(s.truth_negative_called_negative)} | "
            f"{_frac(s.called_positive_share)} | {seconds:.0f} |",
            flush=True,
        )

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        slides = {t.name: write_tiff(t.rgb, work / f"{t.split}_{t.name}.tif", MPP) for t in tiles}

        def model_scores(model: Path, *, tta: bool, threshold: float | None) -> tuple[Scores, list[str]]:
            ensemble = Ensemble.load(model, task="nuclei")
            total, per_tile = NO_SCORES, []
            for t in test:
                s = score_tile(t, *called_nuclei(slides[t.name], ensemble, tta=tta, threshold=threshold))
                total += s
                per_tile.append(f"{t.name} F1 {s.detection.f1:.3f}")
            return total, per_tile

        t0 = time.perf_counter()
        shipped = demo_model_dir("nuclei-ihc")
        s, per_tile = model_scores(shipped, tta=False, threshold=None)
        row("shipped phantom-trained IHC ensemble, as it is", "0", "manifest's", s, time.perf_counter() - t0)
        notes = [f"shipped: {', '.join(per_tile)}"]

        t0 = time.perf_counter()
        best = crc.tune_log_pooled(train, mpp=MPP)
        total = NO_SCORES
        for t in test:
            total += score_tile(t, crc.log_points(t, best, mpp=MPP), None)
        n_train = sum(len(t.xy) for t in train)
        row(
            f"LoG on haematoxylin, tuned on the training tiles {best}",
            str(n_train),
            "-",
            total,
            time.perf_counter() - t0,
        )

        labels = [tile_labels(t, slides[t.name]) for t in chosen]
        n_chosen = sum(len(t.xy) for t in chosen)
        tag = "" if len(chosen) == len(train) else "_" + "_".join(t.name for t in chosen)
        models = args.models or work / "models"
        for seed in stroma._csv(args.seeds, int):
            config = replace(
                stroma._config(SETTING, out=models, seed=seed),
                slides=tuple(lab.slide for lab in labels),
                init_model=str(demo_model_dir("nuclei-ihc")),
                tta=True,
            )
            out = models / f"deepliif{tag}_seed{seed}_{stroma._slug(SETTING)}"
            model, seconds = stroma.trained_once(
                out, lambda o, c=config: train_nuclei(replace(c, out_dir=str(o)), labels=labels)
            )
            s, per_tile = model_scores(model, tta=True, threshold=DEFAULT_MIN_SCORE)
            what = f"fine-tuned on {', '.join(t.name for t in chosen)}, seed {seed}, TTA"
            row(what, str(n_chosen), f"{DEFAULT_MIN_SCORE:g}", s, seconds)
            notes.append(f"seed {seed}: {', '.join(per_tile)}")
    print("\nPer test tile: " + "; ".join(notes))


if __name__ == "__main__":
    main()
