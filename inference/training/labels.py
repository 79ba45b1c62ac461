"""A lab's own labels of one slide, and their training targets with an ignore value.

:class:`SlideLabels` is what every label source gives (QuPath projects, GeoJSON exports; built in
``bridge.labels``): plain shapely areas and point arrays in level-0 px, no QuPath objects. The
functions here turn them into targets on a model's pixel grid, pure numpy/scikit-image:

* regions (segmentation): inside a training region, ``PD-L1 positive`` areas are 1 and the rest 0;
  drawn ``PD-L1 negative`` areas are 0 and drawn positive areas 1 wherever they lie; ``Ignore*``
  areas and everything else are :data:`IGNORE_LABEL`;
* nuclei: the marked points, and a mask of where the heatmap target is known: everywhere inside a
  training region whose nuclei are all marked (``exhaustive``), elsewhere only near a marked point.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import shapely
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry
from skimage.draw import polygon as draw_polygon

if TYPE_CHECKING:
    from inference.slides.slide import MppAdvice, Slide

#: The value of a region target's pixel that is not a label (the loss leaves it out).
IGNORE_LABEL = 255


@dataclass(frozen=True)
class SlideLabels:
    """The labels of one slide, in level-0 px of the image as QuPath shows it.

    ``training_regions`` and ``exhaustive`` run in parallel (``exhaustive[i]``: every nucleus of
    region ``i`` is marked); ``positive``, ``negative`` and ``ignore`` are (multi)polygons, empty when
    none were drawn; ``points_xy`` is (N, 2) float64 in xy order with ``points_class`` (N,) indexing
    ``class_names``; ``counts`` says what was used and what was skipped, and why. ``mpp`` is the µm/px of
    level 0 that the labels' QuPath project states for the image (its calibration, which a user may have set
    in QuPath); it replaces the file's own wherever the slide is read for these labels, as ``pdl1 run`` reads
    the entry (:func:`open_labelled_slide`). None: the file's own. ``image_size_px`` is the image's (width,
    height) as QuPath shows it; ``source`` says where the labels came from (a project's entry, a GeoJSON file),
    as messages name them. ``stain``: the stain of the slide the labels were drawn on, ``"H&E"`` or ``"H-DAB"``
    (a PD-L1 IHC, whose points train the IHC nuclei model); the model trained on them is of that stain.
    """

    slide: str
    image_size_px: tuple[int, int]
    training_regions: tuple[BaseGeometry, ...] = ()
    exhaustive: tuple[bool, ...] = ()
    positive: BaseGeometry = field(default_factory=Polygon)
    negative: BaseGeometry = field(default_factory=Polygon)
    ignore: BaseGeometry = field(default_factory=Polygon)
    points_xy: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    points_class: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    class_names: tuple[str, ...] = ()
    counts: Mapping[str, int] = field(default_factory=dict)
    source: str = ""
    mpp: float | None = None
    stain: str = "H&E"

    def __post_init__(self) -> None:
        if len(self.training_regions) != len(self.exhaustive):
            raise ValueError("training_regions and exhaustive must have the same length")
        if self.points_xy.shape != (len(self.points_class), 2):
            raise ValueError(f"points_xy must be (N, 2) with N = len(points_class), got {self.points_xy.shape}")

    @property
    def has_regions(self) -> bool:
        """Whether the labels say anything about PD-L1 areas (segmentation targets): an area of a Training region
        or a drawn positive or negative area that ``Ignore*`` leaves (an Ignore over everything, or a Training
        region of no area, trained on no pixel, its loss 0, while the labels were counted as used)."""
        return self.labelled_area_px2 > 0

    @property
    def drew_regions(self) -> bool:
        """Whether region labels were drawn at all (a Training region, a positive or negative area), whatever
        ``Ignore*`` leaves of them."""
        return bool(self.training_regions) or not self.positive.is_empty or not self.negative.is_empty

    @property
    def labelled_area_px2(self) -> float:
        """The level-0 px² that :func:`region_target` labels: Training regions and drawn positive and negative
        areas, less ``Ignore*``."""
        if not self.drew_regions:
            return 0.0
        drawn = shapely.union_all([*self.training_regions, self.positive, self.negative])
        return float(drawn.difference(self.ignore).area)

    @property
    def has_points(self) -> bool:
        return len(self.points_class) > 0


def labelled_mpp_advice(from_project: bool) -> MppAdvice:
    """How whoever labelled a slide corrects its pixel size, for the messages of a slide that states an implausible
    one or one too coarse for the model (:data:`~inference.slides.slide.MppAdvice`): training takes no pixel size of
    its own, so the library's "pass ... as mpp" names an argument nobody can give. ``from_project``: the pixel size
    is its QuPath project's (the slide's ``SlideLabels.mpp``), else its file's own.

    >>> labelled_mpp_advice(True)("0.5")[:52]
    "set the image's pixel size in QuPath (Image tab: Pix"
    """

    def advice(value: str) -> str:
        if from_project:
            return (
                f"set the image's pixel size in QuPath (Image tab: Pixel width/height) to {value} and save the project"
            )
        return (
            f"a slide given with a labels file is read at its file's own pixel size: save it as a TIFF whose "
            f"resolution tags state {value}, or train from its QuPath project with the pixel size set there (Image "
            "tab: Pixel width/height)"
        )

    return advice


def open_labelled_slide(labels: SlideLabels, *, mpp_advice: MppAdvice | None = None) -> Slide:
    """The slide of ``labels``, at the pixel size its project states (``labels.mpp``), else at its file's own.

    ``mpp_advice``: how the caller's user gives an image's µm/px, for the message of a slide that states
    none either way (:func:`~inference.slides.slide.open_slide`).
    """
    from inference.slides.slide import open_slide

    return open_slide(labels.slide, mpp=labels.mpp, mpp_source="QuPath project", mpp_advice=mpp_advice)


def check_slide_mpp(
    labels: Sequence[SlideLabels], slide_mpp: Mapping[str, float], *, validation_slides: Sequence[str] = ()
) -> None:
    """Refuse a training run's ``slide_mpp`` (the µm/px by slide path its manifest records and its domain
    statistics read the slides at) that differs from a labelled slide's own ``mpp`` (what it is trained at),
    or names a slide that is neither labelled nor a validation slide (a phantom is read at its file's own)."""
    stray = sorted(set(slide_mpp) - {lab.slide for lab in labels} - set(validation_slides))
    if stray:
        raise ValueError(
            f"slide_mpp names {', '.join(stray)}, neither a labelled training slide nor a validation slide; it "
            "holds the pixel size a labelled slide's project states (its labels' mpp)"
        )
    for lab in labels:
        if slide_mpp.get(lab.slide) != lab.mpp:
            raise ValueError(
                f"{lab.slide}: its labels state {lab.mpp} µm/px, but the training's slide_mpp gives "
                f"{slide_mpp.get(lab.slide)}; slide_mpp must hold each labelled slide's project pixel size (its "
                "labels' mpp). One file is read at one pixel size: are two project entries of it calibrated "
                "differently?"
            )


def labels_digest(labels: SlideLabels) -> str:
    """sha256 of the labels' content (geometry, points, classes), independent of object order and ids.

    >>> a = SlideLabels("s.svs", (10, 10), positive=shapely.box(0, 0, 2, 2))
    >>> labels_digest(a) == labels_digest(SlideLabels("s.svs", (10, 10), positive=shapely.box(0, 0, 2, 2)))
    True
    """
    h = hashlib.sha256()
    h.update(repr(tuple(labels.image_size_px)).encode())
    regions = sorted(
        (shapely.normalize(g).wkb_hex, e) for g, e in zip(labels.training_regions, labels.exhaustive, strict=True)
    )
    h.update(repr(regions).encode())
    for geom in (labels.positive, labels.negative, labels.ignore):
        h.update(shapely.normalize(geom).wkb_hex.encode() if not geom.is_empty else b"empty")
    names = np.asarray(labels.class_names, dtype=object)[labels.points_class] if labels.has_points else []
    rows = sorted(zip(np.round(labels.points_xy, 3).tolist(), list(names), strict=True))
    h.update(repr(rows).encode())
    if labels.stain != "H&E":  # H&E labels keep the digest they had before labels stated a stain
        h.update(labels.stain.encode())
    return h.hexdigest()


def rasterize(
    geometry: BaseGeometry,
    *,
    shape_hw: tuple[int, int],
    downsample: float,
    origin_xy: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Pixels of a grid at ``downsample`` whose centres lie in ``geometry`` (holes left out).

    Pixel (row, col) has its centre at (origin_x + (col + 0.5) * downsample, origin_y + (row + 0.5) *
    downsample) in level 0 (a map's grid starts at its ``origin_xy``).

    >>> rasterize(shapely.box(0, 0, 4, 2), shape_hw=(3, 3), downsample=2).astype(int).tolist()
    [[1, 1, 0], [0, 0, 0], [0, 0, 0]]
    """
    out = np.zeros(shape_hw, bool)
    for poly in getattr(geometry, "geoms", [geometry]):
        if poly.is_empty or not isinstance(poly, Polygon):
            continue
        out |= _fill(np.asarray(poly.exterior.coords) - origin_xy, shape_hw, downsample)
        for hole in poly.interiors:
            out &= ~_fill(np.asarray(hole.coords) - origin_xy, shape_hw, downsample)
    return out


def _fill(ring_xy: np.ndarray, shape_hw: tuple[int, int], downsample: float) -> np.ndarray:
    mask = np.zeros(shape_hw, bool)
    rows, cols = draw_polygon(ring_xy[:, 1] / downsample - 0.5, ring_xy[:, 0] / downsample - 0.5, shape=shape_hw)
    mask[rows, cols] = True
    return mask


def region_target(
    labels: SlideLabels,
    *,
    shape_hw: tuple[int, int],
    downsample: float,
    origin_xy: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """uint8 (H, W) segmentation target: 1 positive, 0 negative, :data:`IGNORE_LABEL` not a label.

    On the grid of :func:`rasterize` (``downsample`` level-0 px per pixel, starting at ``origin_xy``).

    >>> lab = SlideLabels("s", (8, 8), (shapely.box(0, 0, 8, 4),), (False,), positive=shapely.box(0, 0, 4, 4))
    >>> region_target(lab, shape_hw=(2, 2), downsample=4).tolist()
    [[1, 0], [255, 255]]
    """
    grid = {"shape_hw": shape_hw, "downsample": downsample, "origin_xy": origin_xy}
    target = np.full(shape_hw, IGNORE_LABEL, np.uint8)
    for region in labels.training_regions:
        target[rasterize(region, **grid)] = 0
    target[rasterize(labels.positive, **grid)] = 1
    target[rasterize(labels.negative, **grid)] = 0
    target[rasterize(labels.ignore, **grid)] = IGNORE_LABEL
    return target


def nuclei_known_mask(
    labels: SlideLabels, *, shape_hw: tuple[int, int], downsample: float, radius_px: float
) -> np.ndarray:
    """bool (H, W): where a nuclei heatmap target is known.

    Inside exhaustively marked training regions every pixel (an unmarked pixel there is background);
    elsewhere only pixels within ``radius_px`` (model px) of a marked point; never under ``Ignore*``.

    >>> lab = SlideLabels("s", (8, 8), points_xy=np.array([[1.0, 1.0]]), points_class=np.array([0]), class_names=("a",))
    >>> nuclei_known_mask(lab, shape_hw=(4, 4), downsample=2, radius_px=1).astype(int).tolist()
    [[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    """
    known = np.zeros(shape_hw, bool)
    for region, exhaustive in zip(labels.training_regions, labels.exhaustive, strict=True):
        if exhaustive:
            known |= rasterize(region, shape_hw=shape_hw, downsample=downsample)
    if labels.has_points:
        xy = labels.points_xy / downsample - 0.5  # model-px coordinates of pixel centres
        r = int(np.ceil(radius_px))
        offsets = np.arange(-r, r + 1)
        dy, dx = np.meshgrid(offsets, offsets, indexing="ij")
        disk = dy**2 + dx**2 <= radius_px**2
        centres = np.round(xy).astype(np.int64)
        rows = (centres[:, 1, None] + dy[disk][None, :]).ravel()
        cols = (centres[:, 0, None] + dx[disk][None, :]).ravel()
        inside = (rows >= 0) & (rows < shape_hw[0]) & (cols >= 0) & (cols < shape_hw[1])
        known[rows[inside], cols[inside]] = True
    known &= ~rasterize(labels.ignore, shape_hw=shape_hw, downsample=downsample)
    return known
