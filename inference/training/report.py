"""What the training report shows, computed: label statistics, loss and learning-rate curves, example tiles.

Pure data out (frozen dataclasses of numpy arrays and numbers); ``bridge.training_report`` draws them.
The curves come from the per-epoch history :func:`~inference.training.cyclic.train_cyclic` keeps
(``training_history.json`` beside the members, and in the checkpoint so ``--resume`` keeps it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from inference.training.labels import IGNORE_LABEL, SlideLabels, open_labelled_slide, region_target

#: Per-epoch loss and learning rate of a run, beside its members (written by ``cyclic.train_cyclic``).
HISTORY_FILE = "training_history.json"


@dataclass(frozen=True)
class LabelStatistics:
    """One slide's labels by class: areas in level-0 px^2 (and µm^2 when the MPP is known), point counts.

    ``positive_px2`` and ``negative_px2`` are the pixels the segmentation loss sees as positive and
    negative (training regions, drawn areas, less ``Ignore*``), as :func:`region_target` sets them.
    """

    slide: str
    source: str
    mpp: float | None
    training_regions: int
    training_region_px2: float
    positive_px2: float
    negative_px2: float
    ignore_px2: float
    points: dict[str, int]

    def um2(self, px2: float) -> float | None:
        return None if self.mpp is None else px2 * self.mpp * self.mpp


def label_statistics(labels: SlideLabels, *, mpp: float | None = None) -> LabelStatistics:
    """Areas and point counts per class of one slide's labels.

    >>> lab = SlideLabels("s", (10, 10), (shapely.box(0, 0, 10, 4),), (False,), positive=shapely.box(0, 0, 2, 10),
    ...                   ignore=shapely.box(8, 0, 10, 2))
    >>> st = label_statistics(lab, mpp=0.5)
    >>> (st.positive_px2, st.negative_px2, st.ignore_px2, st.um2(st.positive_px2))
    (20.0, 28.0, 4.0, 5.0)
    """
    regions = shapely.union_all(labels.training_regions) if labels.training_regions else shapely.Polygon()
    labelled = shapely.union_all([regions, labels.positive, labels.negative]).difference(labels.ignore)
    positive = labels.positive.difference(labels.negative).difference(labels.ignore)
    counts = {
        name: int((labels.points_class == i).sum())
        for i, name in enumerate(labels.class_names)
        if len(labels.points_xy)
    }
    return LabelStatistics(
        slide=labels.slide,
        source=labels.source,
        mpp=mpp,
        training_regions=len(labels.training_regions),
        training_region_px2=float(regions.area),
        positive_px2=float(positive.area),
        negative_px2=float(labelled.area - positive.area),
        ignore_px2=float(labels.ignore.area),
        points={k: v for k, v in counts.items() if v},
    )


def truth_statistics(slide: str | Path) -> LabelStatistics:
    """A phantom's truth as labels: the whole image labelled, its positive mask and its nuclei by class."""
    from inference.phantom.truth import load_truth
    from inference.slides.slide import open_slide

    truth = load_truth(slide)
    with open_slide(slide) as opened:
        width, height = opened.dimensions
        mpp = opened.mpp.mean
    positive = float(truth.positive_mask.astype(bool).sum()) * truth.mask_downsample**2
    counts = {name: int((truth.nuclei_class == i).sum()) for i, name in enumerate(truth.class_names)}
    return LabelStatistics(
        slide=str(slide),
        source="phantom truth",
        mpp=mpp,
        training_regions=1,
        training_region_px2=float(width * height),
        positive_px2=positive,
        negative_px2=float(width * height) - positive,
        ignore_px2=0.0,
        points={k: v for k, v in counts.items() if v},
    )


@dataclass(frozen=True)
class TrainingCurves:
    """One chain's loss and learning rate per iteration (``step``: 1-based over the run) and per epoch."""

    chain: int
    step: np.ndarray  # int64 (N,)
    loss: np.ndarray  # float64 (N,)
    learning_rate: np.ndarray  # float64 (N,)
    epoch: np.ndarray  # int64 (E,)
    epoch_loss: np.ndarray  # float64 (E,): the mean over the epoch's iterations
    epoch_end_step: np.ndarray  # int64 (E,): the step that ends each epoch
    member_epochs: tuple[int, ...]  # epochs whose weights became members
    missing_epochs: tuple[int, ...]  # epochs run before history was kept (resumed from an older checkpoint)


def training_curves(history: Sequence[dict], *, chain: int = 0, member_epochs: Sequence[int] = ()) -> TrainingCurves:
    """Curves from :func:`~inference.training.cyclic.train_cyclic`'s history records (one per epoch).

    >>> h = [{"epoch": 0, "loss": 2.0, "iteration_losses": [3.0, 1.0], "iteration_lrs": [0.1, 0.05]},
    ...      {"epoch": 1, "loss": 0.5, "iteration_losses": [0.6, 0.4], "iteration_lrs": [0.1, 0.05]}]
    >>> c = training_curves(h, member_epochs=[1])
    >>> c.step.tolist(), c.epoch_end_step.tolist(), c.epoch_loss.tolist()
    ([1, 2, 3, 4], [2, 4], [2.0, 0.5])
    """
    records = sorted(history, key=lambda r: int(r["epoch"]))
    per_epoch = len(records[0]["iteration_losses"]) if records else 0
    step, loss, lr = [], [], []
    for r in records:
        first = int(r["epoch"]) * per_epoch
        step += [first + i + 1 for i in range(len(r["iteration_losses"]))]
        loss += [float(v) for v in r["iteration_losses"]]
        lr += [float(v) for v in r["iteration_lrs"]]
    epochs = [int(r["epoch"]) for r in records]
    run = set(epochs)
    return TrainingCurves(
        chain=chain,
        step=np.asarray(step, np.int64),
        loss=np.asarray(loss, np.float64),
        learning_rate=np.asarray(lr, np.float64),
        epoch=np.asarray(epochs, np.int64),
        epoch_loss=np.asarray([float(r["loss"]) for r in records], np.float64),
        epoch_end_step=np.asarray([(e + 1) * per_epoch for e in epochs], np.int64),
        member_epochs=tuple(int(e) for e in member_epochs),
        missing_epochs=tuple(e for e in range(max(epochs, default=-1)) if e not in run),
    )


def read_training_curves(model_dir: str | Path, members: Sequence[dict]) -> list[TrainingCurves]:
    """Every chain's curves from a model folder (``training_history.json``, or ``chain_k/`` for several chains).

    ``members``: the manifest's member records (``epoch``, ``chain``), to mark the member epochs.
    """
    folder = Path(model_dir)
    paths = sorted(folder.glob(f"chain_*/{HISTORY_FILE}"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not paths and (folder / HISTORY_FILE).is_file():
        paths = [folder / HISTORY_FILE]
    out = []
    for path in paths:
        chain = int(path.parent.name.split("_")[1]) if path.parent != folder else 0
        history = json.loads(path.read_text(encoding="utf-8"))["epochs"]
        epochs = [int(m["epoch"]) for m in members if int(m.get("chain", 0) or 0) == chain]
        out.append(training_curves(history, chain=chain, member_epochs=epochs))
    return out


@dataclass(frozen=True)
class ExampleTile:
    """A tile of a training or validation slide: its pixels, its labels and the model's prediction.

    All arrays are on the tile's own grid (``mpp`` µm/px, level-0 box ``box_px`` = x, y, width, height).
    Segmentation: ``label_mask`` (0 negative, 1 positive, :data:`IGNORE_LABEL` not a label) and ``prob``
    (the ensemble's mean positive probability). Nuclei: points (N, 2) in tile px, xy, with class indices
    into ``class_names``.
    """

    slide: str
    role: str  # "validation" or "training"
    box_px: tuple[int, int, int, int]
    mpp: float
    rgb: np.ndarray
    label_mask: np.ndarray | None
    prob: np.ndarray | None
    label_xy: np.ndarray
    label_class: np.ndarray
    predicted_xy: np.ndarray
    predicted_class: np.ndarray
    class_names: tuple[str, ...]
    threshold: float | None


def _centres_from_labels(labels: SlideLabels, *, task: str, n: int) -> list[tuple[float, float]]:
    """Where labels are: positive and negative labelled areas (segmentation), or points of each class."""
    if task == "nuclei" and len(labels.points_xy):
        out = []
        for i in np.unique(labels.points_class):
            xy = labels.points_xy[labels.points_class == i]
            median = np.median(xy, axis=0)
            out.append(tuple(xy[int(np.argmin(((xy - median) ** 2).sum(1)))]))
        return [(float(x), float(y)) for x, y in out[:n]]
    regions = shapely.union_all(labels.training_regions) if labels.training_regions else shapely.Polygon()
    areas: list[BaseGeometry] = [
        labels.positive.difference(labels.ignore),
        shapely.union_all([regions, labels.negative]).difference(labels.positive).difference(labels.ignore),
        labels.positive.boundary,
    ]
    points = [a.representative_point() for a in areas if not a.is_empty]  # a point on each, lines included
    return [(p.x, p.y) for p in points][:n]


def _centres_from_truth(slide: str, *, task: str, n: int) -> list[tuple[float, float]]:
    from inference.phantom.truth import load_truth

    truth = load_truth(slide)
    if task == "nuclei":
        out = []
        for i in np.unique(truth.nuclei_class):
            xy = truth.nuclei_xy[truth.nuclei_class == i]
            out.append(tuple(xy[len(xy) // 2]))
        return [(float(x), float(y)) for x, y in out[:n]]
    mask = truth.positive_mask.astype(bool)
    edge = mask & ~np.pad(mask, 1)[2:, 1:-1] | mask & ~np.pad(mask, 1)[1:-1, 2:]
    out = []
    for pool in (mask, edge):
        rows, cols = np.nonzero(pool)
        if len(rows):
            k = len(rows) // 2
            out.append(((cols[k] + 0.5) * truth.mask_downsample, (rows[k] + 0.5) * truth.mask_downsample))
    return out[:n]


def example_tiles(
    model_dir: str | Path,
    *,
    task: str,
    labels: Sequence[SlideLabels] = (),
    truth_slides: Sequence[str] = (),
    role: str = "training",
    per_slide: int = 2,
    max_tiles: int = 4,
    device: str = "cpu",
) -> list[ExampleTile]:
    """A few tiles where the labels are (``labels``), or where the phantom truth is (``truth_slides``),
    with the trained model's prediction on each (the ensemble run over the tile as an analysis runs it)."""
    from inference.models.ensemble import Ensemble
    from inference.phantom.truth import load_truth
    from inference.slides.slide import open_slide

    if task not in ("segmentation", "nuclei"):
        raise ValueError(f"task must be segmentation or nuclei, got {task!r}")
    ensemble = Ensemble.load(model_dir, task=task, device=device)
    manifest = ensemble.manifest
    edge_um = manifest.tile_size_px * manifest.input_mpp if task == "segmentation" else 96 * manifest.input_mpp
    sources: list[tuple[str, SlideLabels | None]] = [(lab.slide, lab) for lab in labels]
    sources += [(s, None) for s in truth_slides]
    out: list[ExampleTile] = []
    for slide_path, lab in sources:
        if len(out) >= max_tiles:
            break
        centres = (
            _centres_from_labels(lab, task=task, n=per_slide)
            if lab is not None
            else _centres_from_truth(slide_path, task=task, n=per_slide)
        )
        truth = load_truth(slide_path) if lab is None else None
        with open_slide(slide_path) if lab is None else open_labelled_slide(lab) as slide:
            width, height = slide.dimensions
            edge = max(8, round(edge_um / slide.mpp.mean))
            for cx, cy in centres[: max_tiles - len(out)]:
                x = int(min(max(cx - edge / 2, 0), max(width - edge, 0)))
                y = int(min(max(cy - edge / 2, 0), max(height - edge, 0)))
                w, h = min(edge, width), min(edge, height)
                if any(t.slide == slide_path and t.box_px == (x, y, w, h) for t in out):
                    continue  # two centres in one tile of a small image: one picture of it is enough
                box = shapely.box(x, y, x + w, y + h)
                ds = manifest.input_mpp / slide.mpp.mean
                size = (max(1, round(w / ds)), max(1, round(h / ds)))
                rgb = slide.read_region_at_mpp((x, y), size, mpp=manifest.input_mpp)
                tile = _predict(
                    slide, ensemble, task=task, box=box, rgb=rgb, origin=(x, y), ds=ds, lab=lab, truth=truth
                )
                out.append(
                    ExampleTile(slide=slide_path, role=role, box_px=(x, y, w, h), mpp=manifest.input_mpp, **tile)
                )
    return out


def _predict(slide, ensemble, *, task, box, rgb, origin, ds, lab, truth) -> dict:
    """The model on one tile, and the tile's labels (or phantom truth), on the tile's grid."""
    from inference.analysis.nuclei import detect_nuclei
    from inference.analysis.segment import SegmentConfig, segment_slide

    manifest = ensemble.manifest
    h, w = rgb.shape[:2]
    empty_xy, empty_cls = np.zeros((0, 2)), np.zeros(0, np.int64)
    if task == "segmentation":
        maps = segment_slide(slide, ensemble, roi=box, config=SegmentConfig(map_downsample=1))
        prob = _on_grid(np.asarray(maps.prob, np.float32), maps.origin_xy, maps.downsample, origin, ds, (h, w))
        if lab is not None:
            mask = region_target(lab, shape_hw=(h, w), downsample=ds, origin_xy=origin)
        else:
            rows = ((origin[1] + (np.arange(h) + 0.5) * ds) / truth.mask_downsample).astype(int)
            cols = ((origin[0] + (np.arange(w) + 0.5) * ds) / truth.mask_downsample).astype(int)
            rows = np.clip(rows, 0, truth.positive_mask.shape[0] - 1)
            cols = np.clip(cols, 0, truth.positive_mask.shape[1] - 1)
            mask = truth.positive_mask[rows][:, cols].astype(np.uint8)
        return {
            "rgb": rgb,
            "label_mask": mask,
            "prob": prob,
            "label_xy": empty_xy,
            "label_class": empty_cls,
            "predicted_xy": empty_xy,
            "predicted_class": empty_cls,
            "class_names": tuple(manifest.class_names),
            "threshold": float(manifest.thresholds.get("segmentation", 0.5)),
        }
    nuclei = detect_nuclei(slide, ensemble, roi=box)
    xy, cls = (lab.points_xy, lab.points_class) if lab is not None else (truth.nuclei_xy, truth.nuclei_class)
    inside = shapely.contains_xy(box, xy[:, 0], xy[:, 1]) if len(xy) else np.zeros(0, bool)
    return {
        "rgb": rgb,
        "label_mask": None,
        "prob": None,
        "label_xy": (xy[inside] - origin) / ds,
        "label_class": cls[inside].astype(np.int64),
        "predicted_xy": (np.asarray(nuclei.xy, np.float64).reshape(-1, 2) - origin) / ds,
        "predicted_class": np.asarray(nuclei.cls, np.int64),
        "class_names": tuple(nuclei.class_names),
        "threshold": None,
    }


def _on_grid(values, src_origin, src_ds, origin, ds, shape_hw) -> np.ndarray:
    """Nearest-neighbour resampling of a map onto the tile's grid; NaN where the map does not reach."""
    h, w = shape_hw
    rows = np.floor((origin[1] + (np.arange(h) + 0.5) * ds - src_origin[1]) / src_ds).astype(int)
    cols = np.floor((origin[0] + (np.arange(w) + 0.5) * ds - src_origin[0]) / src_ds).astype(int)
    out = np.full((h, w), np.nan, np.float32)
    ok_r = (rows >= 0) & (rows < values.shape[0])
    ok_c = (cols >= 0) & (cols < values.shape[1])
    out[np.ix_(ok_r, ok_c)] = values[np.ix_(rows[ok_r], cols[ok_c])]
    return out


__all__ = [
    "IGNORE_LABEL",
    "ExampleTile",
    "LabelStatistics",
    "TrainingCurves",
    "example_tiles",
    "label_statistics",
    "read_training_curves",
    "training_curves",
    "truth_statistics",
]
