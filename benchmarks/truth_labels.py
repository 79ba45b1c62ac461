"""Labels drawn from a phantom's truth as a pathologist would draw them in QuPath, for the training benchmarks.

Each function builds the QuPath objects (``Training region`` squares, ``PD-L1 positive`` areas, nucleus
points as multi-point annotations) and reads them through ``bridge.labels`` exactly as a QuPath GeoJSON
export is read, so the training runs see what a lab's labels would give. Shared by
``benchmarks.shift_finetune`` and ``benchmarks.sparse_vs_full``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPoint

from bridge.labels import EXHAUSTIVE_MARK, LabelRules, labels_from_objects
from bridge.qupath_geojson import QuPathObject
from inference.analysis.vectorize import mask_to_polygons
from inference.phantom.pyramid import write_phantom
from inference.phantom.scene import PhantomSpec
from inference.phantom.truth import PhantomTruthData, load_truth, truth_dir_for
from inference.phantom.truth_tissue import truth_tissue_mask
from inference.slides.slide import open_slide
from inference.training.labels import SlideLabels, labels_digest
from inference.training.train_seg import train_segmentation

#: The name of a training region whose every nucleus is marked (``bridge.labels`` reads the mark in it).
EXHAUSTIVE_REGION_NAME = f"Training region ({EXHAUSTIVE_MARK})"


def phantom_once(path: Path, spec: PhantomSpec) -> Path:
    """``path`` written as the phantom ``spec`` draws, unless its truth is there already (kept between runs)."""
    if not (truth_dir_for(path) / "truth.json").is_file():
        write_phantom(path, spec)
    return path


# How region_boxes places its squares.
PLACEMENTS = ("random", "positive-first")


def region_boxes(
    truth: PhantomTruthData,
    *,
    image_size_px: tuple[int, int],
    mpp: float,
    regions: int,
    region_um: float,
    rng: np.random.Generator,
    placement: str = "random",
) -> list[shapely.Polygon]:
    """``regions`` squares of ``region_um`` µm (level-0 px) centred on distinct true tissue pixels, kept inside
    the image (a square near the edge is moved in). ``placement="positive-first"`` centres the first on a true
    positive pixel (where the slide has one), as a person drawing a few regions makes sure one covers the
    positive class; the rest stay random."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    width, height = image_size_px
    ds = truth.mask_downsample
    tissue_rc = np.argwhere(truth_tissue_mask(truth))
    half = region_um / mpp / 2
    centres = tissue_rc[rng.choice(len(tissue_rc), size=regions, replace=False)]
    positive_rc = np.argwhere(truth.positive_mask)
    if placement == "positive-first" and len(positive_rc):
        centres[0] = positive_rc[rng.integers(len(positive_rc))]
    boxes = []
    for r, c in centres:
        cx = min(max((c + 0.5) * ds, half), width - half)
        cy = min(max((r + 0.5) * ds, half), height - half)
        boxes.append(shapely.box(cx - half, cy - half, cx + half, cy + half))
    return boxes


def _slide_geometry(slide: Path) -> tuple[tuple[int, int], float]:
    with open_slide(slide) as s:
        return tuple(s.dimensions), s.mpp.mean


def _positive_objects(positive: shapely.Geometry, within: shapely.Geometry | None = None) -> list[QuPathObject]:
    """The true positive area (inside ``within`` where given) as ``PD-L1 positive`` annotations, one per polygon."""
    inside = positive if within is None else positive.intersection(within)
    return [
        QuPathObject(poly, "annotation", "PD-L1 positive")
        for poly in getattr(inside, "geoms", [inside])
        if poly.geom_type == "Polygon" and not poly.is_empty
    ]


def _true_positive_area(truth: PhantomTruthData) -> shapely.Geometry:
    return shapely.union_all(mask_to_polygons(truth.positive_mask.astype(bool), downsample=truth.mask_downsample)[0])


def sparse_truth_labels(
    slide: Path, *, regions: int, region_um: float, seed: int, placement: str = "random"
) -> SlideLabels:
    """``regions`` square training regions of ``region_um`` µm centred on true tissue (seeded; ``placement``
    as :func:`region_boxes`), each with the true positive area inside it drawn as ``PD-L1 positive``; read as
    a QuPath export of them is."""
    truth = load_truth(slide)
    size, mpp = _slide_geometry(slide)
    rng = np.random.default_rng(seed)
    positive = _true_positive_area(truth)
    objects = []
    boxes = region_boxes(
        truth, image_size_px=size, mpp=mpp, regions=regions, region_um=region_um, rng=rng, placement=placement
    )
    for box in boxes:
        objects.append(QuPathObject(box, "annotation", "Training region"))
        objects += _positive_objects(positive, box)
    return labels_from_objects(
        objects,
        slide=str(slide),
        image_size_px=size,
        rules=LabelRules(points=False),
        source=f"truth of {slide.name}, {regions} regions of {region_um:g} µm"
        + ("" if placement == "random" else f", {placement}"),
        mpp=mpp,
    )


def full_truth_labels(slide: Path) -> SlideLabels:
    """Every true tissue pixel labelled: the truth's tissue as ``Training region`` areas and its whole positive
    area as ``PD-L1 positive`` (read as a QuPath export of them is)."""
    truth = load_truth(slide)
    size, mpp = _slide_geometry(slide)
    tissue = mask_to_polygons(truth_tissue_mask(truth), downsample=truth.mask_downsample)[0]
    objects = [QuPathObject(poly, "annotation", "Training region") for poly in tissue]
    objects += _positive_objects(_true_positive_area(truth))
    return labels_from_objects(
        objects,
        slide=str(slide),
        image_size_px=size,
        rules=LabelRules(points=False),
        source=f"truth of {slide.name}, all tissue",
        mpp=mpp,
    )


def point_objects(xy: np.ndarray, cls: np.ndarray, class_names: Sequence[str]) -> list[QuPathObject]:
    """Points (N, 2) level-0 xy of classes ``cls`` (N,) as QuPath's Points tool keeps them: one multi-point
    annotation per class that has any."""
    return [
        QuPathObject(MultiPoint(xy[cls == i]), "annotation", name)
        for i, name in enumerate(class_names)
        if (cls == i).any()
    ]


def truth_point_labels(slide: Path, *, regions: int, region_um: float, scattered: int, seed: int) -> SlideLabels:
    """Nucleus points from the truth, as a lab marks them sparsely in QuPath.

    ``regions`` squares of ``region_um`` µm centred on true tissue, each a ``Training region (all nuclei
    marked)`` with every true nucleus whose centre lies in it marked, plus ``scattered`` true nuclei drawn at
    random from the rest of the slide (points without a region: only their neighbourhood is a label).
    ``regions=0, scattered=-1``: every true nucleus, under one exhaustive region covering the whole image
    (the full truth, through the same reader).
    """
    truth = load_truth(slide)
    size, mpp = _slide_geometry(slide)
    xy, cls = truth.nuclei_xy, truth.nuclei_class
    if scattered < 0:
        if regions:
            raise ValueError(f"scattered=-1 (every nucleus) takes regions=0, got regions={regions}")
        boxes = [shapely.box(0, 0, *size)]
        keep = np.ones(len(xy), bool)
        what = "all nuclei"
    else:
        rng = np.random.default_rng(seed)
        boxes = region_boxes(truth, image_size_px=size, mpp=mpp, regions=regions, region_um=region_um, rng=rng)
        keep = np.zeros(len(xy), bool)
        for box in boxes:
            keep |= shapely.contains_xy(box, xy[:, 0], xy[:, 1])
        rest = np.flatnonzero(~keep)
        keep[rng.choice(rest, size=min(scattered, rest.size), replace=False)] = True
        what = f"{regions} regions of {region_um:g} µm all marked + {scattered} scattered points"
    objects = [QuPathObject(box, "annotation", "Training region", name=EXHAUSTIVE_REGION_NAME) for box in boxes]
    objects += point_objects(xy[keep], cls[keep], truth.class_names)
    return labels_from_objects(
        objects,
        slide=str(slide),
        image_size_px=size,
        rules=LabelRules(class_names=tuple(truth.class_names)),
        source=f"truth of {slide.name}, {what}",
        mpp=mpp,
    )


def _json_defaults(config_type: type) -> dict[str, Any]:
    """A config dataclass's field defaults as its manifest records them (JSON)."""
    defaults = {}
    for f in fields(config_type):
        if f.default is not MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not MISSING:
            defaults[f.name] = f.default_factory()
    return json.loads(json.dumps(defaults))


def same_config(recorded: dict[str, Any], wanted: dict[str, Any], *, defaults: dict[str, Any]) -> bool:
    """Whether a model's recorded training config is ``wanted``: the same, but for fields the config gained after the
    model was trained, which it lacks and ``wanted`` leaves at their defaults (so they change nothing).

    >>> same_config({"lr": 1}, {"lr": 1, "distill": 0.0}, defaults={"distill": 0.0})
    True
    >>> same_config({"lr": 1}, {"lr": 1, "distill": 1.0}, defaults={"distill": 0.0})
    False
    """
    added = {k for k in set(wanted) - set(recorded) if k in defaults and wanted[k] == defaults[k]}
    return recorded == {k: v for k, v in wanted.items() if k not in added}


def train_or_reuse(
    config, labels: list[SlideLabels], *, train: Callable = train_segmentation
) -> tuple[dict, float | None]:
    """Run ``train(config, labels=labels)`` (``pdl1 train seg`` or ``nuclei``'s library call) into
    ``config.out_dir``, unless a model of the same config and labels is there already.

    Returns (the manifest's training record, seconds trained; None when the folder was reused).
    """
    out = Path(config.out_dir)
    wanted = json.loads(json.dumps({k: v for k, v in asdict(config).items() if k != "out_dir"}))
    manifest = out / "manifest.json"
    if manifest.is_file():
        training = json.loads(manifest.read_text())["training"]
        same_labels = [d.get("labels_sha256") for d in training["data"]] == [labels_digest(lab) for lab in labels]
        if same_config(training["config"], wanted, defaults=_json_defaults(type(config))) and same_labels:
            return training, None
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    train(config, labels=labels)
    seconds = time.perf_counter() - t0
    return json.loads(manifest.read_text())["training"], seconds


def print_pseudo_labels(training: dict, *, indent: str = "  ") -> None:
    """One line per pseudo-labelled slide of a training record (``train_or_reuse``'s first value): what
    the teacher's confident pixels gave and what was left out."""
    for row in (training.get("pseudo_labels") or {}).get("slides", []):
        print(
            f"{indent}pseudo-labels {row['name']}: {row['positive_px']} positive, {row['negative_px']} negative, "
            f"left out {row['left_out_uncertain_px']} uncertain + {row['left_out_disagreement_px']} "
            f"disagreeing of {row['tissue_px']} tissue px",
            flush=True,
        )
