"""nnU-Net v2 raw datasets written from labelled slides (``pdl1 export nnunet``).

A dataset is ``DatasetNNN_NAME/`` with ``imagesTr/CASE_0000.png`` (RGB tiles at one µm/px),
``labelsTr/CASE.png`` (uint8 labels), ``dataset.json``, optional ``imagesTs/``, ``cases.json``,
which maps every case back to its slide and level-0 region, and ``pdl1_export.json`` (how it was
written). Pixels a label source says nothing about get nnU-Net's ``ignore`` label (the highest label
value), so nnU-Net v2 trains on sparse labels. The channels are named ``rgb_to_0_1`` so nnU-Net
normalises them as ``x / 255`` (a fixed map that ``pdl1 import nnunet`` can carry over; its default
z-score is per image).

Labels come through :class:`LabelSource`: phantom truth (``<slide>.truth/``,
:class:`PhantomTruthLabels`) or what a lab drew in QuPath (:class:`QuPathRegionLabels`, read by
:mod:`bridge.labels` through QuPath or from its GeoJSON exports).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image
from scipy.ndimage import distance_transform_edt

from bridge.atomic import folder_replaced_whole
from bridge.project import sharing_a_stem
from inference import (
    IGNORE_LABEL,
    MppAdvice,
    SlideLabels,
    TruthNotFoundError,
    __version__,
    labels_digest,
    load_truth,
    open_slide,
    region_target,
    truth_dir_for,
)

UNLABELLED = 255  # what a label source returns where it says nothing; written as nnU-Net's ignore label
_DATASET_DIR = re.compile(r"^Dataset\d{3}_[A-Za-z0-9_-]+$")


class LabelSource(Protocol):
    """Labels of slides' regions, one value per pixel at a given µm/px."""

    class_names: tuple[str, ...]  # label values 0 .. K-1, "background" first

    def regions(self, slide_path: Path, *, case_size_um: float, mpp: float) -> list[tuple[int, int, int, int]]:
        """Level-0 (x, y, width, height) boxes of ``slide_path`` that carry labels; ``mpp``: its level-0 µm/px as
        the export reads it (its QuPath project's, else its file's own)."""
        ...

    def labels(
        self, slide_path: Path, region_xywh: tuple[int, int, int, int], *, size_wh: tuple[int, int]
    ) -> np.ndarray:
        """uint8 (height, width) labels of the region at ``size_wh`` px; :data:`UNLABELLED` where unknown."""
        ...


@lru_cache(maxsize=2)
def _truth_mask(slide_path: Path) -> tuple[np.ndarray, float]:
    """A phantom's positive mask and its downsample, read once for all the cases of a slide."""
    try:
        truth = load_truth(slide_path)
    except FileNotFoundError as err:  # TruthNotFoundError too: its message speaks of evaluation
        truth_dir = truth_dir_for(slide_path)
        missing = err.filename or truth_dir / "truth.json"
        raise TruthNotFoundError(
            f"{slide_path}: no phantom truth to take labels from ({missing} is missing); exporting slide files "
            f"needs phantoms with their truth beside them ({truth_dir}/ with truth.json and positive_mask.tif, "
            "as `pdl1 phantom` writes it). For slides a lab labelled, export their QuPath project "
            "(--labels qupath), or leave this slide out"
        ) from err
    return truth.positive_mask, truth.mask_downsample


def split_span(start: int, end: int, step: int) -> list[tuple[int, int]]:
    """``[start, end)`` covered by cases of ``step`` px, spread evenly over it, (start, size) each: as many as leave
    at most a quarter of a case uncovered (between them, or at both ends for one), overlapping where the span is more;
    a span no longer than a case is one case of its own size. Cut into ``step`` px from the start, a region a pixel
    wider than a case left a 1 px sliver case, which nnU-Net trains on and plans its patch size from (the median case
    shape); cut with the last case ending at the end, a region a few pixels wider gave two near copies.

    >>> split_span(0, 1024, 512), split_span(0, 820, 816), split_span(0, 1100, 512), split_span(10, 30, 512)
    ([(0, 512), (512, 512)], [(2, 816)], [(0, 512), (588, 512)], [(10, 20)])
    """
    span = end - start
    if span <= step:
        return [(start, span)] if span > 0 else []
    n = max(1, math.ceil(span / step - 0.25))
    if n == 1:
        return [(start + (span - step) // 2, step)]
    return [(start + round(k * (span - step) / (n - 1)), step) for k in range(n)]


def whole_image_regions(
    slide_path: Path, *, case_size_um: float, mpp: float | None = None
) -> list[tuple[int, int, int, int]]:
    """The image cut into cases of ``case_size_um`` (level-0 ``(x, y, width, height)``, row by row); a strip at
    the right or bottom edge narrower than a case is left out. How phantoms and every test image are cut:
    they need no drawn region to be cut from. ``mpp``: the image's level-0 µm/px, replacing its file's own
    (its QuPath project's); None: the file's."""
    with open_slide(slide_path, mpp=mpp) as slide:
        width, height = slide.dimensions
        step = max(1, round(case_size_um / slide.mpp.mean))
    return [
        (x, y, min(step, width - x), min(step, height - y))
        for y in range(0, height - step + 1, step)
        for x in range(0, width - step + 1, step)
    ]


@dataclass(frozen=True)
class PhantomTruthLabels:
    """Labels from phantom truth: ``PD-L1 positive`` where the truth mask is, background elsewhere.

    The truth mask is coarser or finer than the export grid; an exported pixel whose area the
    mask covers by more than ``purity`` one way or the other gets that class, a mixed one is
    left unlabelled (nnU-Net ignores it) instead of being guessed. ``margin_px`` also leaves the
    pixels within that many exported pixels of a class boundary unlabelled, as a pathologist's
    annotations stay inside regions and leave their edges: sparse labels, the kind nnU-Net v2
    trains on with its ignore label.
    """

    purity: float = 0.99
    margin_px: int = 0
    class_names: tuple[str, ...] = ("background", "PD-L1 positive")

    def regions(self, slide_path: Path, *, case_size_um: float, mpp: float) -> list[tuple[int, int, int, int]]:
        return whole_image_regions(slide_path, case_size_um=case_size_um, mpp=mpp)

    def labels(
        self, slide_path: Path, region_xywh: tuple[int, int, int, int], *, size_wh: tuple[int, int]
    ) -> np.ndarray:
        mask, ds = _truth_mask(Path(slide_path))
        x, y, w, h = region_xywh
        x0, y0 = math.floor(x / ds), math.floor(y / ds)
        x1, y1 = math.ceil((x + w) / ds), math.ceil((y + h) / ds)
        crop = mask[y0:y1, x0:x1].astype(np.float32)
        # Fraction of each exported pixel that is positive: the mask resampled by area over the region exactly (the
        # crop is whole mask pixels, wider than a region that does not start on the mask's grid; stretched whole
        # onto the case, it put a few labels a fraction of a pixel off).
        box = (x / ds - x0, y / ds - y0, (x + w) / ds - x0, (y + h) / ds - y0)
        fraction = np.asarray(Image.fromarray(crop).resize(size_wh, resample=Image.Resampling.BOX, box=box))
        out = np.full(fraction.shape, UNLABELLED, np.uint8)
        for value, mask in ((1, fraction >= self.purity), (0, fraction <= 1 - self.purity)):
            if self.margin_px > 0:
                # Distance to the nearest pixel of another class (or of an undecided one); the case's own
                # edge is no boundary.
                mask = distance_transform_edt(mask) > self.margin_px
            out[mask] = value
        return out


@dataclass(frozen=True)
class QuPathRegionLabels:
    """Labels a lab drew in QuPath (:mod:`bridge.labels`: training regions, ``PD-L1 positive`` and
    ``negative`` areas, ``Ignore*``), one :class:`inference.SlideLabels` per slide.

    The cases are the training regions (or, without any, the bounds of the drawn areas) cut into
    tiles of the case size; inside them the rules of ``pdl1 train seg`` apply (a training region's
    pixels outside the positive areas are negative), and every pixel the labels do not decide gets
    nnU-Net's ignore label, the way nnU-Net v2 trains on sparse annotations.
    """

    by_slide: Mapping[str, SlideLabels]
    class_names: tuple[str, ...] = ("background", "PD-L1 positive")

    def _labels(self, slide_path: Path) -> SlideLabels:
        key = str(Path(slide_path).resolve())
        for path, labels in self.by_slide.items():
            if str(Path(path).resolve()) == key:
                return labels
        raise ValueError(f"{slide_path}: no QuPath labels were read for this image")

    def regions(self, slide_path: Path, *, case_size_um: float, mpp: float) -> list[tuple[int, int, int, int]]:
        labels = self._labels(slide_path)
        with open_slide(slide_path, mpp=mpp) as slide:
            step = max(1, round(case_size_um / slide.mpp.mean))
            width, height = slide.dimensions
        areas = list(labels.training_regions) or [g for g in (labels.positive, labels.negative) if not g.is_empty]
        out = []
        for area in areas:
            left, top, right, bottom = area.bounds
            x0, y0 = max(math.floor(left), 0), max(math.floor(top), 0)
            x1, y1 = min(math.ceil(right), width), min(math.ceil(bottom), height)
            for y, h in split_span(y0, y1, step):
                for x, w in split_span(x0, x1, step):
                    out.append((x, y, w, h))
        return out

    def labels(
        self, slide_path: Path, region_xywh: tuple[int, int, int, int], *, size_wh: tuple[int, int]
    ) -> np.ndarray:
        x, y, w, _ = region_xywh
        target = region_target(
            self._labels(slide_path), shape_hw=(size_wh[1], size_wh[0]), downsample=w / size_wh[0], origin_xy=(x, y)
        )
        return np.where(target == IGNORE_LABEL, UNLABELLED, target).astype(np.uint8)

    def provenance(self) -> dict:
        """Per slide: where its labels came from, what was used and skipped, and a sha256 of them."""
        return {
            "class_names": list(self.class_names),
            "slides": {
                path: {"source": lab.source, "counts": dict(lab.counts), "sha256": labels_digest(lab)}
                for path, lab in self.by_slide.items()
            },
        }


def _describe(source: LabelSource) -> dict:
    """What a label source records in ``pdl1_export.json``: its own summary, else its fields."""
    if hasattr(source, "provenance"):
        return source.provenance()
    return asdict(source) if is_dataclass(source) else {}


@dataclass(frozen=True)
class ExportImage:
    """An image to export: its file and, for a QuPath project's image, its entry id and name, and ``mpp``, the
    µm/px of level 0 its project states (QuPath's calibration, also one a user set in QuPath), which replaces
    the file's own as ``pdl1 run`` and ``pdl1 train`` read the entry. None: the file's own."""

    path: Path
    entry_id: str | None = None
    image_name: str | None = None
    mpp: float | None = None


def _refuse_shared_names(images: list[ExportImage]) -> None:
    """A case is named after its image's file stem: one file given twice, or two files of one stem, would
    overwrite each other's cases."""
    for same in sharing_a_stem(images, path=lambda image: image.path):
        named = " and ".join(
            f"entry {i.entry_id} ({i.image_name})" if i.entry_id is not None else str(i.path) for i in same
        )
        if len({i.path.resolve() for i in same}) == 1:
            if all(i.entry_id is not None for i in same):
                raise ValueError(f"{named} are one image ({same[0].path}): remove all but one of them in QuPath")
            raise ValueError(f"{same[0].path} is given {len(same)} times ({named}): give each image once")
        raise ValueError(
            f"{named} share the file name {same[0].path.stem!r}, which names their cases (they would overwrite each "
            "other): rename one, or export them into different datasets"
        )


def project_images(
    project: Path, *, test_names: Sequence[str] = (), search_dirs: tuple[Path, ...] = ()
) -> tuple[list[ExportImage], list[ExportImage]]:
    """A QuPath project's images (read without QuPath), split into training and ``test_names`` (image names
    or entry IDs). An image not where the project says is looked for as `pdl1 run` does, also under
    ``search_dirs`` (``--search-dir``).

    Raises :class:`bridge.project.ProjectError` for an unknown test name, a name several entries share (QuPath
    allows that; the ID tells them apart) or an image that cannot be exported.
    """
    from bridge.project import ImageSearch, ProjectError, locate_image, read_project

    info = read_project(project)
    ids_of: dict[str, list[str]] = {}
    for entry in info.entries:
        ids_of.setdefault(entry.image_name, []).append(entry.entry_id)
    test_ids = set()
    for name in test_names:
        if any(e.entry_id == name for e in info.entries):
            test_ids.add(name)
        elif name not in ids_of:
            raise ProjectError(
                f"{info.path}: no image named {name!r} to predict; its images are {sorted(ids_of)} (or give an "
                "entry ID)"
            )
        elif len(ids_of[name]) > 1:
            raise ProjectError(
                f"{info.path}: {len(ids_of[name])} entries are named {name!r} (IDs {', '.join(ids_of[name])}); "
                "give the ID of the one to predict with --test"
            )
        else:
            test_ids.add(ids_of[name][0])
    train, test = [], []
    search = ImageSearch(search_dirs)  # one walk of the folders for every moved image
    for entry in info.entries:
        if entry.not_analysable:
            raise ProjectError(f"{entry.image_name}: {entry.not_analysable}; export the image as it is in the file")
        path = locate_image(entry, project_folder=info.folder, saved_folder=info.saved_folder, search=search)
        image = ExportImage(Path(path), entry.entry_id, entry.image_name, mpp=entry.mpp)
        (test if entry.entry_id in test_ids else train).append(image)
    return train, test


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`export_nnunet_dataset` wrote."""

    folder: Path
    training_cases: int
    test_cases: int
    labelled_fraction: float  # of training pixels, not the ignore label
    positive_fraction: float  # of labelled training pixels


def _case_labels(
    source: LabelSource, path: Path, region: tuple[int, int, int, int], *, size_wh: tuple[int, int], names: list[str]
) -> np.ndarray:
    """The source's labels of one case, checked, with :data:`UNLABELLED` turned into nnU-Net's ignore label."""
    labels = source.labels(path, region, size_wh=size_wh)
    if labels.shape != (size_wh[1], size_wh[0]):
        raise ValueError(f"{path}: label source gave {labels.shape} for an image of {(size_wh[1], size_wh[0])}")
    known = labels != UNLABELLED
    if (labels[known] >= len(names)).any():
        raise ValueError(f"{path}: label values beyond the {len(names)} classes {names}")
    return np.where(known, labels, len(names)).astype(np.uint8)


def _refuse_a_slide_without_cases(path: Path, *, slide_mpp: float, mpp: float, case_size_px: int) -> None:
    """Raise ValueError for a slide (of level-0 µm/px ``slide_mpp``) that gives no case: smaller than one, or
    labels that bound none."""
    with open_slide(path, mpp=slide_mpp) as slide:
        width, height = slide.dimensions
    at_mpp = (width * slide_mpp / mpp, height * slide_mpp / mpp)
    if min(at_mpp) < case_size_px:
        raise ValueError(
            f"{path}: {width} x {height} px at {slide_mpp:g} µm/px is {at_mpp[0]:.0f} x {at_mpp[1]:.0f} px at "
            f"{mpp:g} µm/px, smaller than one case of {case_size_px} px (--case-px): give a smaller --case-px "
            "or --mpp, or leave the slide out"
        )
    raise ValueError(f"{path}: its labels bound no region to cut cases from; label a region or leave the slide out")


def export_nnunet_dataset(
    slides: Sequence[Path | ExportImage],
    out_dir: Path,
    *,
    source: LabelSource,
    mpp: float,
    case_size_px: int = 512,
    test_slides: Sequence[Path | ExportImage] = (),
    on_progress: Callable[[int, int], None] | None = None,
    mpp_advice: MppAdvice | None = None,
    stain: str = "H&E",
) -> ExportSummary:
    """Write an nnU-Net v2 raw dataset of ``slides``' labelled regions at ``mpp`` µm/px.

    Each region of ``case_size_px`` px (at ``mpp``) is a case ``<file stem>_<n>``; ``test_slides``
    go to ``imagesTs/`` without labels, each cut whole into cases (:func:`whole_image_regions`: an image to
    predict has no labels to bound its regions). ``out_dir`` must be named
    ``DatasetNNN_NAME``, as nnU-Net requires, and be new or empty. Every slide is opened and every
    training slide's labels read before anything is written, and the dataset is written into a
    folder beside ``out_dir`` renamed into place at the end: an error leaves no half-written dataset.
    Raises ``ValueError`` for a bad name or size, two images of one file stem or a slide that gives
    no case (smaller than one), ``FileExistsError`` when ``out_dir`` is not empty or a dataset of its
    number is beside it (nnU-Net would take neither), and the label source's errors (phantom truth:
    :class:`inference.TruthNotFoundError` for a slide without its truth).

    Each image is read at the µm/px its QuPath project states (an :class:`ExportImage`'s ``mpp``), else at its
    file's own; one that states none either way raises :class:`inference.MissingMppError`, its message ending
    with ``mpp_advice`` (how the caller's user gives one; :func:`inference.open_slide`). ``stain``: the images'
    (H&E or H-DAB), recorded in ``dataset.json`` (``pdl1_stain``), where ``pdl1 import nnunet`` takes it from.
    """
    out_dir = Path(out_dir)
    if not _DATASET_DIR.match(out_dir.name):
        raise ValueError(
            f"{out_dir.name!r}: nnU-Net datasets are named DatasetNNN_NAME (three digits), e.g. Dataset501_PDL1"
        )
    if case_size_px < 32:
        raise ValueError(f"case_size_px must be at least 32, got {case_size_px}")
    if (out_dir / "dataset.json").exists():
        raise FileExistsError(f"{out_dir}: already holds a dataset.json; choose a new DatasetNNN_NAME or remove it")
    # nnU-Net reads every file under imagesTr/ and labelsTr/: files left from an earlier export would join this one.
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        held = sorted(p.name for p in out_dir.iterdir())[:3] if out_dir.is_dir() else []
        raise FileExistsError(
            f"{out_dir}: exists and is not an empty folder (holds {held}); a dataset is written into a new or "
            "empty folder: choose a new DatasetNNN_NAME or remove it"
        )
    number = out_dir.name[len("Dataset") : len("Dataset") + 3]
    namesakes = sorted(
        p.name
        for p in (out_dir.parent.glob(f"Dataset{number}_*") if out_dir.parent.is_dir() else [])
        if p.name != out_dir.name and p.is_dir()
    )
    if namesakes:  # nnU-Net finds a dataset by its number and refuses two ("More then one dataset name found")
        raise FileExistsError(
            f"{out_dir.parent} already holds {', '.join(namesakes)}, of the same number {number}: nnU-Net finds a "
            f"dataset by its number and refuses both when two have it; choose another number (Dataset{number} is "
            "taken), or remove the other"
        )
    images = [i if isinstance(i, ExportImage) else ExportImage(Path(i)) for i in slides]
    if not images:  # nnU-Net's planning would fail on it, later and less clearly
        raise ValueError("no labelled image to train on: a dataset needs at least one (the test images are not enough)")
    tests = [i if isinstance(i, ExportImage) else ExportImage(Path(i)) for i in test_slides]
    _refuse_shared_names(images + tests)
    names = list(source.class_names)
    ignore = len(names)
    case_size_um = case_size_px * mpp
    work = [(i, True) for i in images] + [(i, False) for i in tests]
    planned = []
    for image, train in work:
        # At the pixel size its QuPath project states, else its file's (as `pdl1 run` and training read it).
        with open_slide(image.path, mpp=image.mpp, mpp_source="QuPath project", mpp_advice=mpp_advice) as slide:
            slide_mpp = slide.mpp.mean
        if train:
            regions = source.regions(image.path, case_size_um=case_size_um, mpp=slide_mpp)
        else:
            regions = whole_image_regions(image.path, case_size_um=case_size_um, mpp=slide_mpp)
        if not regions:  # an empty dataset would only fail later, in nnU-Net's planning
            _refuse_a_slide_without_cases(image.path, slide_mpp=slide_mpp, mpp=mpp, case_size_px=case_size_px)
        if train:
            # Reads the slide's labels (a phantom's whole truth mask) and checks one case: a slide without
            # labels is refused here, before anything is written.
            _, _, w, h = regions[0]
            size_wh = (max(1, round(w * slide_mpp / mpp)), max(1, round(h * slide_mpp / mpp)))
            _case_labels(source, image.path, regions[0], size_wh=size_wh, names=names)
        planned.append((image, train, regions))
    total = sum(len(r) for _, _, r in planned)
    if on_progress is not None:  # the first case of a whole slide takes its read: the count is shown before it
        on_progress(0, total)
    # Written beside out_dir and renamed into place (hidden from nnU-Net, which finds dataset NNN by the prefix
    # "DatasetNNN" among nnUNet_raw's folders).
    with folder_replaced_whole(out_dir) as tmp:
        for sub in ("imagesTr", "labelsTr") + (("imagesTs",) if test_slides else ()):
            (tmp / sub).mkdir(parents=True)
        mapping: dict[str, dict] = {}
        labelled = positive = pixels = done = 0
        for image, train, regions in planned:
            path = image.path
            with open_slide(path, mpp=image.mpp, mpp_source="QuPath project") as slide:
                for n, region in enumerate(regions):
                    x, y, w, h = region
                    size_wh = (max(1, round(w * slide.mpp.mean / mpp)), max(1, round(h * slide.mpp.mean / mpp)))
                    case = f"{path.stem}_{n:04d}"
                    rgb = slide.read_region_at_mpp((x, y), size_wh, mpp=mpp)
                    Image.fromarray(rgb).save(tmp / ("imagesTr" if train else "imagesTs") / f"{case}_0000.png")
                    if train:
                        labels = _case_labels(source, path, region, size_wh=size_wh, names=names)
                        if labels.shape != rgb.shape[:2]:
                            raise ValueError(f"{path}: labels of {labels.shape} for an image of {rgb.shape[:2]}")
                        Image.fromarray(labels).save(tmp / "labelsTr" / f"{case}.png")
                        labelled += int((labels != ignore).sum())
                        positive += int((labels == 1).sum())
                        pixels += labels.size
                    mapping[case] = {
                        "slide": str(path.resolve()),
                        **({"entry_id": image.entry_id, "image_name": image.image_name} if image.entry_id else {}),
                        "region_xywh": list(region),
                        "mpp": mpp,
                        "split": "train" if train else "test",
                    }
                    done += 1
                    if on_progress is not None:
                        on_progress(done, total)
        training = sum(1 for m in mapping.values() if m["split"] == "train")
        dataset = {
            "channel_names": {"0": "rgb_to_0_1", "1": "rgb_to_0_1", "2": "rgb_to_0_1"},
            "labels": {**{name: i for i, name in enumerate(names)}, "ignore": ignore},
            "numTraining": training,
            "file_ending": ".png",
            "name": out_dir.name.split("_", 1)[1],
            "description": f"exported by pdl1-bridge at {mpp:g} µm/px; cases.json maps cases to slides",
            "pdl1_mpp": mpp,
            "pdl1_stain": stain,
        }
        (tmp / "dataset.json").write_text(json.dumps(dataset, indent=2))
        (tmp / "cases.json").write_text(json.dumps(mapping, indent=2))
        provenance = {
            "pdl1_bridge": __version__,
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "mpp": mpp,
            "stain": stain,
            "case_size_px": case_size_px,
            "label_source": {"kind": type(source).__name__, **_describe(source)},
            "ignore_label": ignore,
            "training_images": [str(i.path.resolve()) for i in images],
            "test_images": [str(i.path.resolve()) for i in tests],
        }
        (tmp / "pdl1_export.json").write_text(json.dumps(provenance, indent=2))
    return ExportSummary(
        folder=out_dir,
        training_cases=training,
        test_cases=len(mapping) - training,
        labelled_fraction=labelled / pixels if pixels else 0.0,
        positive_fraction=positive / labelled if labelled else 0.0,
    )
