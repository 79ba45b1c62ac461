"""A lab's own labels, read from QuPath: the same :class:`~inference.SlideLabels` from a project or GeoJSON.

The objects a pathologist draws in QuPath become labels by their class (README "Train on your own
slides"):

* ``Training region`` annotations bound where regions are labelled: inside them, pixels under
  ``PD-L1 positive`` are positive and the rest negative. A training region whose name contains
  ``all nuclei marked`` (any case) declares every nucleus in it marked, so its unmarked pixels are
  nuclei background; elsewhere unmarked pixels are not labels.
* ``PD-L1 positive`` / ``PD-L1 negative`` areas drawn anywhere are positive / negative; ``Ignore*``
  (any class starting with ``Ignore``) areas are never labels.
* Points of a nucleus class (multi-point annotations, as QuPath's Points tool makes them, or point
  detections) are nuclei labels; a class the model does not have must be mapped (``class_map``). Cell and
  detection polygons of a nucleus class (QuPath's cell detection, classified by a person) are labels at their
  centroids; polygons of other classes are counted as skipped, naming the ``class_map`` that would take them.
* A paired IHC's ``PD-L1 IHC positive (registered)`` area (``pdl1/pairs/<H&E key>.ihc_positive.geojson``)
  with ``ihc_band_um``: the whole image is a training region, the area positive, and a band of that
  width on either side of its edge is ignored.
* Objects pdl1-bridge wrote (its signature measurements) are not labels while they are as it wrote
  them. A candidate or predicted region a person reclassified ``PD-L1 positive`` or ``PD-L1 negative``
  is a label with ``from_review``; without it, it is skipped and counted. Where what the tool wrote into a
  project entry is at hand (:class:`WrittenObjects`: the last ``pdl1 run``'s ``pdl1/<entry ID>/objects.geojson``,
  and its ``target_regions.json`` for every target of an image where several were analysed; the record
  ``pdl1_analyze.groovy`` saves of each parent it analysed, ``pdl1/<entry ID>/qupath_analyses/<parent ID>.json``),
  two more review actions are labels with ``from_review``: a nucleus whose class a person changed is a point of
  its new class (the newest analysis there whose output is still in the image says what was written), and a
  ``PD-L1 FN candidate`` a person deleted was dismissed, so its area is negative (only where its analysis's
  output is still in the image and no newer analysis covers it; otherwise counted). Which of a record and the
  run's output is newer is what :func:`bridge.analysis_record.record_is_newer` says (the files where they tell it,
  else the two machines' clocks), as for ``pdl1 report``. A record the script set aside
  (``qupath_analyses/removed``: its parent was not in the image as QuPath held it) is taken where the objects read
  hold its parent (QuPath closed without saving): :meth:`WrittenObjects.taking_back`. A tool-written nucleus that
  no record holds (an earlier script, a record deleted) is counted as not told, with a warning. Where an image's
  several targets left no record of the summary's run (an earlier version), only the first target's output is
  at hand, and the reviews of the others are counted as not read.

Everything else (lines, other classes, unclassified objects) is counted as skipped, except an area whose class
says positive (QuPath's ``Positive``) lying in a training region: it would train as negative, and is refused.
Bad input raises :class:`LabelError` naming the entry, the object and the fix; nothing is dropped silently. A
project's labels carry the pixel size QuPath states for their image (``SlideLabels.mpp``), which training reads it
at instead of the file's own, as ``pdl1 run`` does.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import cached_property, cmp_to_key
from pathlib import Path

import numpy as np
import shapely
from scipy.spatial import cKDTree
from shapely.geometry import MultiPoint, MultiPolygon, Point, Polygon
from shapely.geometry.base import BaseGeometry

from bridge.analysis_record import (
    RecordOrder,
    RunOrder,
    entry_records,
    read_analysis_record,
    record_is_newer,
    set_aside_records,
    summary_analysed_at,
)
from bridge.classes import (
    IGNORE,
    PDL1_FN_CANDIDATE,
    PDL1_IHC_POSITIVE,
    PDL1_NEGATIVE,
    PDL1_POSITIVE,
    TRAINING_REGION,
)
from bridge.objects import OWN_ANNOTATION_SIGNATURE, OWN_DETECTION_SIGNATURE, TILE_NAME
from bridge.pairs import IHC_NEEDS_REVIEW
from bridge.project import (
    ImageSearch,
    ProjectEntry,
    ProjectInfo,
    annotation_class_counts,
    locate_image,
    read_project,
    sidecar_dir,
)
from bridge.qupath_geojson import READ_ONLY_OBJECT_TYPES, QuPathObject, read_features
from bridge.run_lock import project_read_lock
from bridge.targets import (
    MISSING,
    RUN_IMAGE_AGAIN,
    TARGET_REGIONS_FILE,
    UNREADABLE,
    rows_from_summary,
    run_target_regions,
)
from inference import IHC_CELL_RADIUS_UM, IHC_NUCLEUS_CLASSES, MppAdvice, Pdl1Error, Slide, SlideLabels, UnlabeledSlide

log = logging.getLogger(__name__)

POSITIVE = PDL1_POSITIVE.name
NEGATIVE = PDL1_NEGATIVE.name
IGNORE_PREFIX = IGNORE.name.rstrip("*")  # QuPath's Ignore*, and any class a lab names Ignore...
EXHAUSTIVE_MARK = "all nuclei marked"
SUA_SIGNATURE = "SUA score"
#: Where ``pdl1_export_labels.groovy`` writes an entry's objects, under the project folder.
EXPORT_FOLDER = Path("pdl1") / "labels"
# Overlaps of positive and negative labels smaller than this (level-0 px^2) are drawing slack, not a contradiction.
_OVERLAP_TOLERANCE_PX2 = 1.0


# The count of paired IHC areas whose IHC's own analysis was flagged for review (pdl1 train warns of them).
DOUBTFUL_IHC_COUNT = "paired IHC positive areas whose IHC analysis needs review"
# The counts of paired IHC areas passed over: without a band (``LabelRules.ihc_band_um``), which only `pdl1 train
# seg` gives (`pdl1 export nnunet` reads labels without one), and by a nuclei run, which trains on points.
IHC_AREA_SKIPPED = "skipped: paired IHC area (`pdl1 train seg --ihc-band-um` trains on it)"
IHC_AREA_SKIPPED_POINTS = "skipped: paired IHC area (a nuclei run)"
# Counted (the number of targets) where the last run analysed several targets of an image (TMA cores, annotations)
# but left no record of every target's output of the summary's run (target_regions.json; an earlier version): the
# first target's alone is at hand, so the FN candidates a person deleted and the nuclei a person reclassified in the
# others cannot be told from the tool's output (pdl1 train warns of them).
UNREAD_TARGETS_COUNT = (
    "not read: targets but the first, their deleted FN candidates and reclassified nuclei (the last run kept the "
    "first's output only)"
)
# What to do about it: a run replaces the objects it wrote, reviewed ones too, so a review made before it is gone.
UNREAD_TARGETS_FIX = (
    f"to train on such reviews, {RUN_IMAGE_AGAIN} and review it after that run (a run replaces the objects it wrote, "
    "reviewed ones too)"
)


# Counted (the number of nuclei) where --from-review is given and a nucleus the tool wrote into a project entry lies
# where no record of what it wrote has one: an analysis by an earlier pdl1_analyze.groovy (which kept no record), a
# record or a run's output deleted, another version's run. What class it was written with is unknown, so whether a
# person changed it cannot be told: it is no label, and not counted as unreviewed either (pdl1 train warns of them).
UNRECORDED_NUCLEI_COUNT = "not read: pdl1 nuclei that no record of an analysis holds (a review of them cannot be told)"
# What to do about it (an analysis replaces the objects it wrote under its parent, reviewed ones too).
UNRECORDED_NUCLEI_FIX = (
    "to train on reviews of them, analyse the image again with the current pdl1_analyze.groovy or `pdl1 run`, which "
    "record what they write (the analysis replaces the objects it wrote, reviewed ones too), and review it after that"
)
# Counted (the number of annotations) where --from-review is given and an FN candidate or positive region the tool
# wrote into a project entry is one no record of an analysis holds (as for the nuclei above): the candidates a person
# deleted beside it cannot be told from its analysis's output, so none of them is a negative label.
UNRECORDED_ANNOTATIONS_COUNT = (
    "not read: pdl1 FN candidates and regions that no record of an analysis holds (deleted candidates beside them "
    "cannot be told)"
)
# What the commands reading reviews (pdl1 train, pdl1 export nnunet) say of them, after the slides and their counts.
UNRECORDED_ANNOTATIONS_WARNING = (
    "FN candidates or regions pdl1-bridge wrote that no record of an analysis holds (neither pdl1/<entry ID>/"
    "objects.geojson of a run nor a record of pdl1_analyze.groovy's analysis holds them: written by another run than "
    "the one recorded there, by an earlier version, or the record deleted): "
    "FN candidates a person deleted beside them cannot be told, so no deleted candidate is a negative label there "
    "(those reclassified still are); to dismiss a candidate there, set its class to PD-L1 negative instead of "
    "deleting it"
)
# Counted (the number of candidates): an FN candidate gone from the image where an analysis newer than the one that
# wrote it covers it; that analysis replaced what the older one wrote there, so a person deleting it cannot be told.
OLDER_CANDIDATES_COUNT = "skipped: FN candidates of an older analysis, gone where a newer one analysed"
# Counted (the number of candidates): the FN candidates of an analysis none of whose output is in the image any more
# (cleared, its parent deleted, replaced): a person dismissing them cannot be told from their absence.
GONE_OUTPUT_CANDIDATES_COUNT = "skipped: FN candidates of an analysis whose output is no longer in the image"


class LabelError(Pdl1Error, ValueError):
    """Labels that cannot be trained on: none, contradictory, outside the image, of an unknown class."""


@dataclass(frozen=True)
class LabelRules:
    """How label objects are read: the model's nuclei classes, how other classes map onto them, review."""

    class_names: tuple[str, ...] = ()  # the nuclei classes a point may take (the model's)
    class_map: Mapping[str, str | None] | None = None  # label class -> model class (None: not a label)
    from_review: bool = False
    points: bool = True  # False: a segmentation run, which counts points as skipped instead of reading them
    # Paired IHC: the registered IHC positive area labels the whole H&E, a band this wide around its edge ignored
    # (registration is never exact); None: such an area is skipped.
    ihc_band_um: float | None = None
    # The stain of the slides labelled: "H&E" (the segmentation ensemble, the H&E nuclei model) or "H-DAB" (points
    # on PD-L1 IHC slides, for the IHC nuclei model; class_names then the IHC classes).
    stain: str = "H&E"
    # The caller's option that sets ``stain`` (``pdl1 train nuclei``'s --stain, he or ihc), offered in advice; empty
    # where the command has none (``pdl1 train seg``, ``pdl1 export nnunet``: their labels are H&E's).
    stain_option: str = ""


def export_path(project_folder: Path, entry_id: str) -> Path:
    """The GeoJSON ``pdl1_export_labels.groovy`` writes for an entry."""
    return project_folder / EXPORT_FOLDER / f"{entry_id}.geojson"


_AREA_CLASSES = frozenset({TRAINING_REGION.name, POSITIVE, NEGATIVE, PDL1_IHC_POSITIVE.name})


def _is_ignore(cls: str | None) -> bool:
    return cls is not None and cls.startswith(IGNORE_PREFIX)


def _spelling(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _label_class_meant(cls: str) -> str | None:
    """The label class an area's class is a near miss of (``PDL1 positive``, ``training region``), else None.

    Such an area is almost surely meant as a label; skipped, a positive area inside a training region would
    train as negative. Spellings equal but for case, spaces and punctuation, or within one or two letters.
    """
    wanted = {_spelling(c): c for c in (*_AREA_CLASSES, IGNORE.name)}
    key = _spelling(cls)
    if key in wanted:
        return wanted[key]
    close = difflib.get_close_matches(key, list(wanted), n=1, cutoff=0.85)
    return wanted[close[0]] if close else None


def _not_a_project_class(what: str, cls: str, project_classes: frozenset[str]) -> str:
    """Why a label class missing from the project's class list is refused, and the fix: the project's class it is a
    near miss of (``other`` for ``Other``, ``Tumor:Positive``), else how the class gets into the list.

    The fix said was "Add the class in QuPath", also for a class the project holds spelt otherwise.
    """
    listed = ", ".join(sorted(project_classes))
    spelt = {_spelling(c): c for c in sorted(project_classes)}
    close = difflib.get_close_matches(_spelling(cls), list(spelt), n=1, cutoff=0.85)
    meant = spelt.get(_spelling(cls)) or (spelt[close[0]] if close else None)
    if meant is not None:
        return (
            f"{what}: class {cls!r} is not in the project's class list ({listed}); did you mean {meant!r}? Set "
            f"its class to {meant!r} in QuPath and export again"
        )
    return (
        f"{what}: class {cls!r} is not in the project's class list ({listed}); is this export from another "
        "project? Export this project's labels again; or, if the class is meant, add it to the project's class "
        "list in QuPath (the Annotations tab's class list) and save the project"
    )


# What an area of a near-miss class would have done to training, by the label class it was meant as.
_NEAR_MISS_HARM = {
    POSITIVE: "inside a training region its pixels would train as negative",
    NEGATIVE: "outside training regions its pixels would be no label",
    TRAINING_REGION.name: "the PD-L1 positive areas inside it would be labels, its other pixels not negative",
    PDL1_IHC_POSITIVE.name: "the paired IHC's positive area would be no label",
    IGNORE.name: "inside a training region its pixels would be labels, not ignored",
}


# A class name that says positive: the word, or PD-L1 with a "+" or "pos" (PD-L1+, Tumour PDL1+, PDL1 pos), or
# QuPath's intensity classes 1+ to 3+ (another marker's, CD8+, says nothing of PD-L1).
_SAYS_POSITIVE = re.compile(r"positive|pd-?\s*l1\s*(\+|pos\b)|^\s*[123]\s*\+")


def _says_positive(cls: str | None) -> bool:
    """A class other than the label class whose name says positive: QuPath's own ``Positive``, ``Tumor: Positive``,
    a lab's ``PD-L1+`` (which went through as a negative area of a training region without a word)."""
    return cls is not None and cls != POSITIVE and _SAYS_POSITIVE.search(cls.lower()) is not None


def _refuse_positive_looking_areas(areas: list[tuple[str, str, BaseGeometry]], regions: list[BaseGeometry]) -> None:
    """Raise :class:`LabelError` for an area whose class says positive but is no label class (QuPath's built-in
    ``Positive``, ``Tumor: Positive`` drawn as an area) lying in a training region: every pixel of a training region
    not under a ``PD-L1 positive`` area trains as negative, so the area drawn as positive would teach the opposite.
    Outside training regions such an area labels nothing and is only counted as skipped."""
    if not areas or not regions:
        return
    inside = _union(regions)
    for what, cls, geometry in areas:
        overlap = geometry.intersection(inside).area
        if overlap > _OVERLAP_TOLERANCE_PX2:
            raise LabelError(
                f"{what}: an area of class {cls!r} lies in a training region ({overlap:.0f} px^2 of it), where every "
                f"pixel not under a {POSITIVE!r} area trains as negative: this area would teach the opposite of what "
                f"its class says. Set its class to {POSITIVE!r} in QuPath and export again if it is PD-L1 positive "
                "tissue; otherwise give it a class that does not say positive, or move it out of the training region"
            )


def _mapped(class_map: Mapping[str, str | None], cls: str, class_names: Sequence[str]) -> str | None:
    """A point's model class: ``--class-map``'s (its LABEL is stripped of spaces, so a class QuPath holds as
    'Tumor: Negative ' is found by it), else the class itself if the model has it, else "" (unknown)."""
    for key in (cls, cls.strip()):
        if key in class_map:
            return class_map[key]
    return cls if cls in class_names else ""


def _check_class_map_targets(class_map: Mapping[str, str | None], rules: LabelRules) -> None:
    """Raise :class:`LabelError` for a ``--class-map`` whose MODEL side is no class of the model.

    Such points were reported as "points of classes the model does not have: LABEL ... map each with
    --class-map", naming the label the user had mapped, not the target they mistyped.
    """
    if not rules.points or not rules.class_names:
        return
    wrong = {label: target for label, target in class_map.items() if target not in (None, *rules.class_names)}
    if not wrong:
        return
    spelt = {_spelling(c): c for c in rules.class_names}
    parts = []
    for label, target in wrong.items():
        close = difflib.get_close_matches(target, rules.class_names, n=1)
        meant = spelt.get(_spelling(target)) or (close[0] if close else None)
        parts.append(f"'{label}={target}'" + (f" (did you mean '{label}={meant}'?)" if meant else ""))
    raise LabelError(
        f"--class-map {', '.join(parts)}: the MODEL side must be one of the model's classes "
        f"({', '.join(rules.class_names)}), or empty ('LABEL=') to leave the label out"
    )


def _tool_written_class(obj: QuPathObject) -> str | None:
    """The class pdl1-bridge gave an object it wrote (by its signature measurements), else None."""
    if obj.object_type == "annotation" and OWN_ANNOTATION_SIGNATURE in obj.measurements:
        return PDL1_FN_CANDIDATE.name if SUA_SIGNATURE in obj.measurements else POSITIVE
    if obj.object_type in ("detection", "cell") and OWN_DETECTION_SIGNATURE in obj.measurements:
        return obj.classification or ""
    return None


def _skipped_detection(obj: QuPathObject, rules: LabelRules, class_map: Mapping[str, str | None]) -> str | None:
    """What :func:`labels_from_objects` counts a detection or cell polygon under where it labels nothing (QuPath's cell
    detection unclassified, or of a class that is no nucleus label, or in a segmentation run of any class but an
    area's or ``Ignore*``; never the tool's own), else None. Told
    from each object alone, so a reader passes over such objects as it reads them (:func:`read_label_objects`): a
    slide's positive cell detection is a million of them, 2 GB held as objects."""
    cls, geometry = obj.classification, obj.geometry
    if (
        obj.object_type not in ("detection", "cell")
        or not isinstance(geometry, Polygon | MultiPolygon)
        or obj.plane_zt != (0, 0)
        or geometry.is_empty
        or _tool_written_class(obj) is not None
        or (cls is not None and (cls in _AREA_CLASSES or _is_ignore(cls)))
    ):
        return None
    if not (rules.points and cls):
        return f"skipped: {obj.object_type} {geometry.geom_type} ({cls or 'unclassified'})"
    # QuPath's cell detection gives polygons, and a person classifies or reclassifies those cells: one of a nucleus
    # class is a nucleus label at its centroid (labels_from_objects).
    target = _mapped(class_map, cls, rules.class_names)
    if target is None:
        return f"skipped: {obj.object_type} polygons of {cls} (mapped to none)"
    if target not in rules.class_names:
        return (
            f"skipped: {obj.object_type} polygons of {cls} (not a nucleus class: "
            f"--class-map '{cls.strip()}=CLASS' takes their centroids)"
        )
    return None


# A nucleus of an analysis's output and one in the image are the same where their points lie this close
# (level-0 px): QuPath keeps the coordinates it imported.
_SAME_NUCLEUS_PX = 1.0
# A candidate of an analysis's output is still in the image where one of the tool's annotations there
# overlaps it by this IoU (the same polygon, whatever its class now).
_SAME_CANDIDATE_IOU = 0.9
# A positive region of an analysis's output is still in the image where one of the tool's annotations there has its
# bounds within this many level-0 px (its class may have changed; the records keep regions by their bounds).
_SAME_REGION_BOUNDS_PX = 1.0
# The time of an analysis whose output states none (a summary without ``provenance.analysed_at``): older than all.
_UNKNOWN_TIME = datetime.min.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class WrittenAnalysis:
    """What one analysis wrote into QuPath: its nuclei (positions, level-0 px, and classes), its FN candidates, the
    bounds of its positive regions ((R, 4) x0, y0, x1, y1), when it wrote them (``written_at``, timezone-aware;
    None: unknown, older than any other) and the area it analysed (``area``; None: the whole image). ``source``:
    the file it was read from, for messages. ``order``: what orders a record of ``pdl1_analyze.groovy`` and the
    ``pdl1 run`` output of its entry (:func:`bridge.analysis_record.record_is_newer`), which ``written_at`` alone
    does not (two machines' clocks); None: by ``written_at`` (:meth:`is_newer_than`)."""

    nuclei_xy: np.ndarray  # (N, 2) level-0 px
    nuclei_class: tuple[str, ...]
    candidates: tuple[BaseGeometry, ...]
    region_bounds: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    written_at: datetime | None = None
    area: BaseGeometry | None = None
    source: str = ""
    order: RecordOrder | RunOrder | None = None

    @classmethod
    def from_objects(cls, objects: Iterable[QuPathObject], **kwargs) -> WrittenAnalysis:
        """From the QuPath objects an analysis wrote (its output GeoJSON): those carrying the tool's signature."""
        xy, names, candidates, bounds = [], [], [], []
        for obj in objects:
            original = _tool_written_class(obj)
            if original is None:
                continue
            if obj.object_type in ("detection", "cell"):
                point = obj.geometry.centroid
                xy.append((point.x, point.y))
                names.append(original)
            elif original == PDL1_FN_CANDIDATE.name and obj.classification == original:
                candidates.append(obj.geometry)
            elif original == POSITIVE and not obj.geometry.is_empty:
                bounds.append(obj.geometry.bounds)
        return cls(
            np.asarray(xy, np.float64).reshape(-1, 2),
            tuple(names),
            tuple(candidates),
            np.asarray(bounds, np.float64).reshape(-1, 4),
            **kwargs,
        )

    @property
    def when(self) -> datetime:
        return self.written_at or _UNKNOWN_TIME

    def is_newer_than(self, other: WrittenAnalysis) -> bool:
        """Whether it was written after ``other``: a record and the run's output as
        :func:`~bridge.analysis_record.record_is_newer` says (as ``pdl1 report`` orders them), else by their
        ``written_at`` (two records: the service's clock)."""
        if isinstance(self.order, RecordOrder) and isinstance(other.order, RunOrder):
            return record_is_newer(self.order, other.order)
        if isinstance(self.order, RunOrder) and isinstance(other.order, RecordOrder):
            return not record_is_newer(other.order, self.order)
        return self.when > other.when

    def covers(self, geometry: BaseGeometry) -> bool:
        """Whether the analysed area overlaps ``geometry`` (more than a shared edge)."""
        return self.area is None or self.area.intersection(geometry).area > _OVERLAP_TOLERANCE_PX2

    @cached_property
    def nuclei_tree(self) -> cKDTree:
        """The nuclei's positions, to look up which of the image's nuclei are this analysis's (built once)."""
        return cKDTree(self.nuclei_xy)


@dataclass(frozen=True)
class WrittenObjects:
    """What the tool wrote into an image, analysis by analysis (:class:`WrittenAnalysis`), so that a review can be
    told from its output: a nucleus's class as written, a candidate a person deleted.

    Read by :meth:`of_entry` from a project entry's sidecar folder (``pdl1/<entry ID>``): the last ``pdl1 run``'s
    output (``objects.geojson``, and ``target_regions.json`` where several targets were analysed; its time the
    summary's ``provenance.analysed_at``, its area its targets' outlines) and the record of each parent
    ``pdl1_analyze.groovy`` analysed (``qupath_analyses/<parent ID>.json``, :mod:`bridge.analysis_record`; a record
    and the run's output ordered by :func:`~bridge.analysis_record.record_is_newer`).
    ``not_read``: (count name, number of targets) of the targets whose output was not at hand, which
    :func:`labels_from_objects` counts. ``set_aside``: the records the script set aside (``qupath_analyses/removed``,
    :func:`~bridge.analysis_record.set_aside_records`) of parents with no record in the folder itself, which
    :meth:`taking_back` takes where the image's objects hold their parent.
    """

    analyses: tuple[WrittenAnalysis, ...]
    not_read: tuple[tuple[str, int], ...] = ()
    set_aside: tuple[Path, ...] = ()

    @property
    def nuclei_xy(self) -> np.ndarray:
        """Every analysis's nuclei positions, (N, 2) level-0 px."""
        return np.concatenate([np.zeros((0, 2)), *(a.nuclei_xy for a in self.analyses)])

    @property
    def nuclei_class(self) -> tuple[str, ...]:
        return tuple(c for a in self.analyses for c in a.nuclei_class)

    @property
    def candidates(self) -> tuple[BaseGeometry, ...]:
        return tuple(c for a in self.analyses for c in a.candidates)

    @classmethod
    def from_objects(cls, objects: Iterable[QuPathObject]) -> WrittenObjects:
        """One analysis's output, of unknown time, over the whole image."""
        return cls((WrittenAnalysis.from_objects(objects),))

    @classmethod
    def read(cls, path: str | Path) -> WrittenObjects:
        """From a run's GeoJSON; a file that is not one names itself."""
        return cls((_read_run_output(Path(path)),))

    @classmethod
    def of_entry(cls, folder: Path) -> WrittenObjects:
        """What the tool wrote for a project entry, from its sidecar folder (``pdl1/<entry ID>``): the last run's
        output and the records of ``pdl1_analyze.groovy``'s analyses; no analyses where it left none.

        Where the run's summary lists several analysed targets (TMA cores, annotations), every target's candidates,
        regions and nuclei come from :data:`~bridge.targets.TARGET_REGIONS_FILE` of the summary's run
        (objects.geojson holds the first target's alone). Where that file is missing or of another run,
        objects.geojson is read and the other targets are counted in ``not_read`` (with a warning). A file that does
        not read raises :class:`LabelError` with the fix.
        """
        run, not_read = _last_run(folder)
        paths = entry_records(folder)
        records = tuple(_read_record(path) for path in paths)
        recorded = {path.stem for path in paths}  # a record in the folder is newer than one set aside (re-analysis)
        aside = tuple(path for path in set_aside_records(folder) if path.stem not in recorded)
        return cls(((run,) if run is not None else ()) + records, not_read, aside)

    def taking_back(self, object_ids: Iterable[str], where: str) -> WrittenObjects:
        """With the records set aside (:attr:`set_aside`) whose parent is among the image's objects (their QuPath IDs,
        the GeoJSON ``id``): ``pdl1_analyze.groovy`` set such a record aside when the parent was not in the image as
        QuPath held it, but the objects read (``pdl1_export_labels.groovy``'s export, or QuPath's saved data through
        paquo) hold it, so QuPath was closed without saving (or the deletion undone) and what the record says is in
        the image. ``pdl1_import_results.groovy`` sets aside the record of a whole-image analysis whose output it
        replaced under the same parent, which is in the objects read whether the import was saved or not: taken, the
        record says what was written only where its output is in the image (:class:`_WrittenInImage`), and otherwise
        the run's output the import put there does. Each one taken is logged (INFO); one that does not read raises
        :class:`LabelError`, as a record in the folder does. The others stay set aside: their parent is gone from the
        image. A parent is an annotation or a TMA core (the export and paquo's reading hold the grid's cores); the
        script also moves a core's record back on its next run on the image."""
        ids = {str(i).lower() for i in object_ids}
        back = [path for path in self.set_aside if path.stem.lower() in ids]
        if not back:
            return self
        for path in back:
            log.info(
                "%s: took the record %s, which pdl1_analyze.groovy set aside when its annotation was not in the image "
                "as QuPath held it (or pdl1_import_results.groovy when it replaced that analysis's output): the "
                "objects read hold that annotation (%s; QuPath closed without saving, or the deletion undone), so the "
                "record tells what the tool wrote under it where that output is still there",
                where,
                path,
                path.stem,
            )
        left = tuple(path for path in self.set_aside if path not in back)
        return replace(self, analyses=self.analyses + tuple(_read_record(path) for path in back), set_aside=left)


_RUN_FIX = "run `pdl1 run` on the project again, or train without --from-review"


def _read_run_output(path: Path, **kwargs) -> WrittenAnalysis:
    try:
        return WrittenAnalysis.from_objects(read_features(path), source=str(path), **kwargs)
    except (json.JSONDecodeError, UnicodeDecodeError, Pdl1Error) as err:
        raise LabelError(f"{path}: the last run's output is not readable GeoJSON ({err}); {_RUN_FIX}") from err


def _last_run(folder: Path) -> tuple[WrittenAnalysis | None, tuple[tuple[str, int], ...]]:
    """The last ``pdl1 run``'s output of an entry (None where it left none) and its targets not read."""
    geojson, summary_path, regions_path = (
        folder / "objects.geojson",
        folder / "summary.json",
        folder / TARGET_REGIONS_FILE,
    )
    summary = None
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            if not isinstance(summary, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            raise LabelError(f"{summary_path}: the last run's summary does not read ({err}); {_RUN_FIX}") from err
    rows = [] if summary is None else summary.get("targets")
    analysed = [r for r in rows if isinstance(r, dict) and r.get("state") != MISSING] if isinstance(rows, list) else []
    found = None if summary is None else run_target_regions(regions_path, summary)
    if found is not None and found.state == UNREADABLE:  # nothing is trained on reviews silently dropped
        raise LabelError(f"{found.why}: the reviews of the last run's targets cannot be told; {_RUN_FIX}")
    record = None if found is None else found.record
    others = len(analysed) - 1
    if record is None:
        if not geojson.is_file():
            return None, ()
        when, area = _run_time_and_area(summary, summary_path)
        written = _read_run_output(geojson, written_at=when, area=area, order=RunOrder.of_summary(summary))
        if others <= 0:
            return written, ()
        log.warning(
            "%s: the last run analysed %d targets, but %s: the FN candidates deleted and the nuclei reclassified in "
            "targets other than the first (%s) cannot be told from its output and are no labels; %s",
            folder,
            len(analysed),
            found.why,
            ", ".join(str(r.get("target")) for r in analysed[1:]),
            UNREAD_TARGETS_FIX,
        )
        return written, ((UNREAD_TARGETS_COUNT, others),)
    when, area = _run_time_and_area(summary, summary_path)
    regions = WrittenAnalysis.from_objects(o for _, objects in record.targets for o in objects)
    xy = np.concatenate([np.zeros((0, 2)), *(n.xy for n in record.nuclei)])
    nuclei = tuple(c for n in record.nuclei for c in n.classes)
    written = replace(regions, nuclei_xy=xy, nuclei_class=nuclei, written_at=when, area=area, source=str(regions_path))
    return replace(written, order=RunOrder.of_summary(summary)), ()


def _run_time_and_area(summary: dict | None, path: Path) -> tuple[datetime | None, BaseGeometry | None]:
    """When the run wrote its output (the summary's ``provenance.analysed_at`` as
    :func:`~bridge.analysis_record.summary_analysed_at` reads it, a time without a zone as UTC; None where it states
    none; one that does not read raises :class:`LabelError`) and what it analysed: its analysed targets' outlines,
    None (the whole image) where one has none (a whole-image target) or the summary lists none."""
    if summary is None:
        return None, None
    try:
        when = summary_analysed_at(summary)  # a time without a zone is UTC
    except ValueError as err:  # which of the image's analyses is newest, and so what was written, is unknown
        raise LabelError(f"{path}: {err}; {_RUN_FIX}") from err
    try:
        rows = rows_from_summary(summary) if isinstance(summary.get("targets"), list) else []
    except (TypeError, ValueError, AttributeError) as err:
        raise LabelError(f"{path}: the last run's targets do not read ({err}); {_RUN_FIX}") from err
    analysed = [r for r in rows if r.state != MISSING]
    if not analysed or any(r.outline is None for r in analysed):
        return when, None
    return when, shapely.union_all([r.outline for r in analysed])


# What to do about a record that does not read: the analysis it records is known only from it.
_RECORD_FIX = (
    "analyse that annotation (or TMA core) again with pdl1_analyze.groovy, which writes its record anew, or delete the "
    "file (the reviews of that analysis then cannot be told), or train without --from-review"
)


def _read_record(path: Path) -> WrittenAnalysis:
    """The record ``pdl1_analyze.groovy`` left of one analysis, as a :class:`WrittenAnalysis`."""
    try:
        record = read_analysis_record(path)
    except (OSError, ValueError) as err:
        raise LabelError(
            f"{path}: the record of an analysis by pdl1_analyze.groovy does not read ({err}); {_RECORD_FIX}"
        ) from err
    return WrittenAnalysis(
        record.nuclei.xy,
        record.nuclei.classes,
        record.candidates,
        record.region_bounds,
        written_at=record.written_at,
        area=record.outline if record.outline.is_valid else shapely.make_valid(record.outline),
        source=str(path),
        order=record.order,
    )


def _gone(candidates: Sequence[BaseGeometry], tool_annotations: list[BaseGeometry]) -> list[BaseGeometry]:
    """The candidates no longer in the image: none of the tool's annotations there is the same polygon."""
    tree = shapely.STRtree(tool_annotations)
    gone = []
    for cand in candidates:
        near = [tool_annotations[i] for i in tree.query(cand)]
        iou = max((cand.intersection(g).area / max(cand.union(g).area, 1e-9) for g in near), default=0.0)
        if iou < _SAME_CANDIDATE_IOU:
            gone.append(cand)
    return gone


AS_WRITTEN, REVIEWED = "as written", "reviewed"


def _by_time(a: WrittenAnalysis, b: WrittenAnalysis) -> int:
    """Older first (:meth:`WrittenAnalysis.is_newer_than`); 0 where neither is newer (two records at one time)."""
    return 1 if a.is_newer_than(b) else -1 if b.is_newer_than(a) else 0


class _WrittenInImage:
    """The analyses of an image set against what is in it now: which one's output is still there (one of its
    candidates or regions, whatever their class now, or one of its nuclei at its place with the class it wrote), and
    so what each tool-written object in the image was as written."""

    def __init__(
        self,
        written: WrittenObjects,
        tool_annotations: list[BaseGeometry],
        nuclei_xy: np.ndarray,
        nuclei_class: Sequence[str | None],
    ):
        self.written = written
        self.tool_annotations = tool_annotations
        self.nuclei_xy, self.nuclei_class = nuclei_xy.reshape(-1, 2), nuclei_class
        self.nuclei_tree = cKDTree(nuclei_xy.reshape(-1, 2))
        bounds = np.asarray([g.bounds for g in tool_annotations], np.float64).reshape(-1, 4)
        bounds_tree = cKDTree(bounds)
        newest_first = sorted(written.analyses, key=cmp_to_key(_by_time), reverse=True)

        def in_image(a: WrittenAnalysis) -> bool:
            if a.candidates and tool_annotations and len(_gone(a.candidates, tool_annotations)) < len(a.candidates):
                return True
            if len(a.region_bounds) and len(bounds):
                distance, _ = bounds_tree.query(a.region_bounds, distance_upper_bound=_SAME_REGION_BOUNDS_PX, p=np.inf)
                if np.isfinite(distance).any():
                    return True
            if len(a.nuclei_xy) and len(nuclei_xy):
                distance, i = self.nuclei_tree.query(a.nuclei_xy, distance_upper_bound=_SAME_NUCLEUS_PX)
                near = np.flatnonzero(np.isfinite(distance))
                return any(nuclei_class[i[k]] == a.nuclei_class[k] for k in near)
            return False

        self.present = [a for a in newest_first if in_image(a)]
        self.absent = [a for a in newest_first if not any(a is p for p in self.present)]

    def nuclei_verdicts(self) -> list[str | None]:
        """Whether each of the tool's nuclei in the image (in the order given) is :data:`AS_WRITTEN` or
        :data:`REVIEWED` (its class changed); None where no analysis wrote a nucleus at its place.

        The newest analysis whose output is still in the image says what was written there (an analysis whose
        output is gone only where none of those wrote one). A class an older analysis wrote there is as written too
        where another of the tool's nuclei lies at that place: two analyses of overlapping parents each keep their
        own nuclei, so the older one's is there beside the newer one's.
        """
        xy, now = self.nuclei_xy, self.nuclei_class
        seen = np.zeros(len(xy), bool)
        said: list[str | None] = [None] * len(xy)  # the class the analysis that says what was written gave it
        older: dict[int, list[str]] = {}  # the classes other analyses wrote there
        for a in (*self.present, *self.absent):
            if not len(a.nuclei_xy) or not len(xy):
                continue
            # Only the image's nuclei within the analysis's nuclei's bounds are looked up: a TMA's cores, a hundred
            # records, each query their own.
            (x0, y0), (x1, y1) = a.nuclei_xy.min(axis=0) - _SAME_NUCLEUS_PX, a.nuclei_xy.max(axis=0) + _SAME_NUCLEUS_PX
            near = np.flatnonzero((xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1))
            if not len(near):
                continue
            distance, index = a.nuclei_tree.query(xy[near], distance_upper_bound=_SAME_NUCLEUS_PX)
            for k in np.flatnonzero(np.isfinite(distance)):
                j, cls = int(near[k]), a.nuclei_class[int(index[k])]
                if seen[j]:
                    older.setdefault(j, []).append(cls)
                else:
                    seen[j], said[j] = True, cls

        def beside_its_own(j: int) -> bool:  # an older analysis's class, with another of the tool's nuclei there
            return now[j] in older.get(j, ()) and len(self.nuclei_tree.query_ball_point(xy[j], _SAME_NUCLEUS_PX)) > 1

        return [
            None
            if not seen[j]
            else AS_WRITTEN
            if now[j] is None or now[j] == said[j] or beside_its_own(j)
            else REVIEWED
            for j in range(len(xy))
        ]

    def unrecorded_annotations(self) -> int:
        """How many of the tool's candidates and regions in the image no analysis wrote (of an analysis with no
        record: an earlier pdl1_analyze.groovy's, a record or the run's output deleted, another project's copy)."""
        if not self.tool_annotations:
            return 0
        written = [c for a in self.written.analyses for c in a.candidates]
        bounds = np.concatenate([np.zeros((0, 4)), *(a.region_bounds for a in self.written.analyses)])
        left = _gone(self.tool_annotations, written) if written else self.tool_annotations
        if not len(bounds) or not left:
            return len(left)
        distance, _ = cKDTree(bounds).query(
            np.asarray([g.bounds for g in left], np.float64), distance_upper_bound=_SAME_REGION_BOUNDS_PX, p=np.inf
        )
        return int(np.isinf(distance).sum())

    def deleted_candidates(self, counts: Counter[str]) -> list[BaseGeometry]:
        """The FN candidates a person deleted: gone from the image, of an analysis whose output is still there and
        that no newer analysis covers (a newer analysis of the area replaced it; a person deleting it cannot be told
        from that). The others gone are counted."""
        deleted = []
        for a in self.present:
            for gone in _gone(a.candidates, self.tool_annotations):
                if any(b.is_newer_than(a) and b.covers(gone) for b in self.written.analyses):
                    counts[OLDER_CANDIDATES_COUNT] += 1
                else:
                    deleted.append(gone)
        for a in self.absent:
            if a.candidates:
                counts[GONE_OUTPUT_CANDIDATES_COUNT] += len(a.candidates)
        return deleted


def _area(geometry: BaseGeometry, where: str) -> BaseGeometry:
    if not isinstance(geometry, Polygon | shapely.MultiPolygon) or geometry.is_empty:
        raise LabelError(f"{where}: a label area must be a polygon, got {geometry.geom_type}; redraw it as an area")
    return geometry if geometry.is_valid else shapely.make_valid(geometry)


# A colour call this clear (degrees of margin, as the pipeline's stain contradiction) makes a warning.
STAIN_WARNING_MARGIN_DEG = 10.0
# A label area may overhang the image by this share of its width or height (QuPath lets an annotation pass the
# edge a little); farther, the labels are from another image or another scale.
AREA_OVERHANG = 0.05


def _check_areas_inside(where: str, areas: list[BaseGeometry], width: int, height: int) -> None:
    """Refuse label areas far outside the image, as points outside it are refused."""
    dx, dy = AREA_OVERHANG * width, AREA_OVERHANG * height
    for area in areas:
        x0, y0, x1, y1 = area.bounds
        if x0 < -dx or y0 < -dy or x1 > width + dx or y1 > height + dy:
            raise LabelError(
                f"{where}: a label area spans x {x0:.0f} to {x1:.0f}, y {y0:.0f} to {y1:.0f} px, outside the "
                f"{width} x {height} px image; are the labels from another image or downsampled? Export them "
                "again from this image"
            )


def _union(parts: list[BaseGeometry]) -> BaseGeometry:
    return shapely.union_all(parts) if parts else Polygon()


def _refuse_results_without_measurements(objects: Sequence[QuPathObject], where: str) -> None:
    """This tool's own nuclei and regions are told from a person's labels by their measurements (their signature,
    :func:`_tool_written_class`). An export without measurements (QuPath's *Export objects* with "Exclude
    measurements") made every nucleus and region the tool predicted a label; its uncertainty tiles and FN candidates,
    which it always writes with measurements (and a person makes neither), tell such an export."""
    own = [
        o
        for o in objects
        if (o.object_type == "tile" and o.name == TILE_NAME)
        or (o.object_type == "annotation" and o.classification == PDL1_FN_CANDIDATE.name)
    ]
    if own and not any(o.measurements for o in own):
        raise LabelError(
            f"{where}: it holds {len(own)} objects this tool writes (its '{TILE_NAME}' tiles or "
            f"{PDL1_FN_CANDIDATE.name}s) without their measurements, by which its own nuclei and regions are told "
            "from your labels: exported with 'Exclude measurements'? Export again with measurements "
            "(qupath_scripts/pdl1_export_labels.groovy keeps them)"
        )


def labels_from_objects(
    objects: Iterable[QuPathObject],
    *,
    slide: str,
    image_size_px: tuple[int, int],
    rules: LabelRules,
    project_classes: frozenset[str] | None = None,
    source: str = "",
    mpp: float | None = None,
    written: WrittenObjects | None = None,
    skipped: Mapping[str, int] | None = None,
    leave_out: str = "leave the entry out (--entries)",
) -> SlideLabels:
    """The labels of one image from its QuPath objects (see the module docstring for the rules).

    ``skipped``: the counts of objects the reader already passed over (:attr:`LabelObjects.skipped`), kept in the
    labels' counts as if they had been given. ``leave_out``: how the caller's user leaves the image out, the last
    fix of an image without labels (a project entry's by default; a slide given with its GeoJSON has no entry).

    ``written``: what the tool wrote into this image (a project entry's: :meth:`WrittenObjects.of_entry`; None for
    a plain slide's GeoJSON, whose nuclei reviews are not read); with ``rules.from_review`` a reclassified nucleus
    and a deleted FN candidate become labels. A nucleus's class as written is the newest analysis's there whose
    output is still in the image (:class:`_WrittenInImage`); a tool-written nucleus that no analysis recorded is
    counted (:data:`UNRECORDED_NUCLEI_COUNT`, with a warning), not taken as unreviewed; so are the tool's candidates
    and regions that no analysis recorded (:data:`UNRECORDED_ANNOTATIONS_COUNT`): candidates deleted beside them cannot
    be told. A candidate gone from the
    image is dismissed only where its analysis's output is still in the image (an image cleared of it was not
    reviewed) and no newer analysis covers it (:data:`OLDER_CANDIDATES_COUNT`, :data:`GONE_OUTPUT_CANDIDATES_COUNT`).

    ``project_classes``: the project's class list; a label (an area of a label class, or points) of a
    class not in it is refused (an export from another project); other objects' classes are not checked.
    ``mpp``: the image's µm/px, needed only for the band of a paired IHC area. Raises :class:`LabelError`
    for an entry without labels, points outside the image, an unknown point class, and overlapping
    positive and negative labels.
    """
    where = source or slide
    class_map = dict(rules.class_map or {})
    _check_class_map_targets(class_map, rules)
    objects = list(objects)
    _refuse_results_without_measurements(objects, where)
    counts: Counter[str] = Counter(skipped or {})
    regions: list[tuple[BaseGeometry, bool]] = []
    positive: list[BaseGeometry] = []
    negative: list[BaseGeometry] = []
    ignore: list[BaseGeometry] = []
    ihc: list[BaseGeometry] = []
    xy: list[tuple[float, float]] = []
    point_cls: list[int] = []
    unknown_point_classes: Counter[str] = Counter()
    positive_looking: list[tuple[str, str, BaseGeometry]] = []  # areas of another class that say "positive"
    in_image = None
    verdicts: dict[int, str | None] = {}  # by the object's place in objects: each tool nucleus's (with from_review)
    if written is not None and rules.from_review:
        # A record the script set aside is the image's where these objects hold its parent (closed without saving).
        # A record's parent is an annotation or a TMA core, never a detection or cell (which a reader may have
        # passed over: helper-142), so theirs are not asked.
        parents = (o.id for o in objects if o.id and o.object_type not in ("detection", "cell"))
        written = written.taking_back(parents, where)
        # What of the tool's output is in the image, before any of it is read: which analyses' output is still
        # there decides what a nucleus was written as.
        tool = [(k, o, _tool_written_class(o) is not None) for k, o in enumerate(objects) if not o.geometry.is_empty]
        nuclei = [
            (k, o.geometry.centroid, o.classification) for k, o, own in tool if own and o.object_type != "annotation"
        ]
        in_image = _WrittenInImage(
            written,
            [o.geometry for _, o, own in tool if own and o.object_type == "annotation"],
            np.asarray([(p.x, p.y) for _, p, _ in nuclei], np.float64).reshape(-1, 2),
            [c for _, _, c in nuclei],
        )
        verdicts = dict(zip((k for k, _, _ in nuclei), in_image.nuclei_verdicts(), strict=True))
    for place, obj in enumerate(objects):
        passed_over = _skipped_detection(obj, rules, class_map)
        if passed_over is not None:
            counts[passed_over] += 1
            continue
        cls = obj.classification
        what = f"{where}: {obj.object_type} {obj.name or obj.id or ''} ({cls or 'unclassified'})"
        if obj.object_type in READ_ONLY_OBJECT_TYPES:  # "Export objects" of a TMA slide: its cores label nothing
            counts["skipped: TMA cores"] += 1
            continue
        if obj.plane_zt != (0, 0):  # drawn on another z-slice or time point: not on the pixels training reads
            counts["skipped: objects on another z-slice or time point than the first"] += 1
            continue
        if obj.geometry.is_empty:  # a hand-written "coordinates": [] (a Point's gave a GEOS traceback)
            counts[f"skipped: {obj.object_type} {obj.geometry.geom_type} without coordinates"] += 1
            continue
        is_label = cls is not None and (
            cls in _AREA_CLASSES or _is_ignore(cls) or isinstance(obj.geometry, Point | MultiPoint)
        )
        if project_classes is not None and is_label and cls not in project_classes:
            raise LabelError(_not_a_project_class(what, cls, project_classes))
        original = _tool_written_class(obj)
        if original is not None and obj.object_type != "annotation" and in_image is not None:
            point = obj.geometry.centroid
            verdict = verdicts[place]
            if verdict is None:
                counts[UNRECORDED_NUCLEI_COUNT] += 1
                continue
            if verdict == AS_WRITTEN:
                counts["skipped: pdl1 results as written (not reviewed)"] += 1
                continue
            if not rules.points:
                counts["skipped: reviewed nuclei (a segmentation run)"] += 1
                continue
            target = _mapped(class_map, cls, rules.class_names)
            if target is None:
                counts[f"skipped: reviewed nuclei of {cls} (mapped to none)"] += 1
            elif target not in rules.class_names:
                unknown_point_classes[cls] += 1
            else:
                xy.append((point.x, point.y))
                point_cls.append(rules.class_names.index(target))
                counts["reviewed: nuclei reclassified"] += 1
            continue
        if original is not None:
            if cls == original:
                counts["skipped: pdl1 results as written (not reviewed)"] += 1
                continue
            if cls not in (POSITIVE, NEGATIVE) or obj.object_type != "annotation":
                counts["skipped: reviewed pdl1 results of other classes"] += 1
                continue
            if not rules.from_review:
                counts["skipped: reviewed pdl1 results (use --from-review)"] += 1
                if cls == POSITIVE:  # confirmed positive by a person: never negative under a training region
                    ignore.append(_area(obj.geometry, what))
                continue
            (positive if cls == POSITIVE else negative).append(_area(obj.geometry, what))
            counts[f"reviewed: {cls}"] += 1
            continue
        geometry = obj.geometry
        area_label = cls in (TRAINING_REGION.name, POSITIVE, NEGATIVE, PDL1_IHC_POSITIVE.name) or _is_ignore(cls)
        if area_label and isinstance(geometry, Polygon | MultiPolygon):
            geometry = _area(geometry, what)  # made valid once: the branches below take it as it is
            if geometry.area == 0:
                # Corners on one line (a ring of 3 positions, first and last the same): it labels no pixel, and was
                # counted as a label used (helper-150).
                counts[f"skipped: {cls} areas of no area (their corners on one line)"] += 1
                continue
        if cls == TRAINING_REGION.name:
            exhaustive = EXHAUSTIVE_MARK in (obj.name or "").lower()
            regions.append((_area(geometry, what), exhaustive))
            counts["training regions (all nuclei marked)" if exhaustive else "training regions"] += 1
        elif cls in (POSITIVE, NEGATIVE) and not isinstance(geometry, Point | MultiPoint):
            (positive if cls == POSITIVE else negative).append(_area(geometry, what))
            counts[f"areas: {cls}"] += 1
        elif cls == PDL1_IHC_POSITIVE.name:
            if rules.ihc_band_um is None:
                counts[IHC_AREA_SKIPPED_POINTS if rules.points else IHC_AREA_SKIPPED] += 1
                continue
            ihc.append(_area(geometry, what))
            counts["paired IHC positive areas"] += 1
            if obj.measurements.get(IHC_NEEDS_REVIEW):  # the IHC it came from was flagged (bridge.pairs)
                counts[DOUBTFUL_IHC_COUNT] += 1
        elif _is_ignore(cls):
            ignore.append(_area(geometry, what))
            counts["areas: ignore"] += 1
        elif isinstance(geometry, Point | MultiPoint) and cls is not None:
            target = _mapped(class_map, cls, rules.class_names)
            pts = [geometry] if isinstance(geometry, Point) else list(geometry.geoms)
            if not rules.points:
                counts["skipped: points (a segmentation run)"] += len(pts)
                continue
            if target is None:
                counts[f"skipped: points of {cls} (mapped to none)"] += len(pts)
                continue
            if target not in rules.class_names:
                unknown_point_classes[cls] += len(pts)
                continue
            xy.extend((p.x, p.y) for p in pts)
            point_cls.extend([rules.class_names.index(target)] * len(pts))
        elif (
            rules.points
            and obj.object_type in ("detection", "cell")
            and isinstance(geometry, Polygon | MultiPolygon)
            and cls
        ):
            # A cell of a nucleus class (_skipped_detection passed over the others): a nucleus label at its centroid
            # (a cell's boundary surrounds its nucleus, so the two centroids lie within a few px; the 3 µm matching
            # radius allows that).
            centre = geometry.centroid
            xy.append((centre.x, centre.y))
            point_cls.append(rules.class_names.index(_mapped(class_map, cls, rules.class_names)))
            counts[f"nuclei from {obj.object_type} polygons (their centroids)"] += 1
        elif obj.object_type == "tile" and obj.name == TILE_NAME:
            counts["skipped: pdl1 uncertainty tiles (results, never labels)"] += 1
        else:
            meant = _label_class_meant(cls) if cls is not None and obj.object_type == "annotation" else None
            if meant is not None:
                raise LabelError(
                    f"{what}: class {cls!r} is not a label class; did you mean {meant!r}? As it is, it labels "
                    f"nothing ({_NEAR_MISS_HARM[meant]}), so these labels are refused. Set its class to {meant!r} "
                    "in QuPath and export again, or give it a class that resembles none"
                )
            if obj.object_type == "annotation" and isinstance(geometry, Polygon | MultiPolygon) and _says_positive(cls):
                positive_looking.append((what, cls, geometry))
            counts[f"skipped: {obj.object_type} {geometry.geom_type} ({cls or 'unclassified'})"] += 1
    _refuse_positive_looking_areas(positive_looking, [g for g, _ in regions])
    if written is not None and rules.from_review:
        for name, n in written.not_read:
            counts[name] += n
    if in_image is not None:
        # A deleted candidate is a dismissal inferred from its absence; where the reviewer drew (or reclassified)
        # positive area over it, what they drew is the label. Left whole, it contradicted their drawing and the
        # run stopped, telling them to fix in QuPath an object no longer there.
        drawn_positive = _union(positive)
        for gone in in_image.deleted_candidates(counts):
            dismissed = _area(gone, f"{where}: a deleted {PDL1_FN_CANDIDATE.name}").difference(drawn_positive)
            counts[f"reviewed: {PDL1_FN_CANDIDATE.name} deleted ({NEGATIVE})"] += 1
            if dismissed.area < gone.area - _OVERLAP_TOLERANCE_PX2:
                counts[f"reviewed: {PDL1_FN_CANDIDATE.name} deleted, {POSITIVE} drawn over it (there positive)"] += 1
            dismissed = shapely.union_all(
                [g for g in shapely.get_parts(dismissed) if isinstance(g, Polygon | shapely.MultiPolygon)]
            )  # the area only: a difference can leave slivers of lines and points at the positive's edge
            if not dismissed.is_empty:
                negative.append(dismissed)
        unrecorded = in_image.unrecorded_annotations()
        if unrecorded:
            counts[UNRECORDED_ANNOTATIONS_COUNT] += unrecorded
        if counts[UNRECORDED_NUCLEI_COUNT]:
            log.warning(
                "%s: %d nuclei pdl1-bridge wrote lie where no record of an analysis has them (analysed by an earlier "
                "pdl1_analyze.groovy, which kept none, or their record was deleted; a TMA core's record set aside in "
                "qupath_analyses/removed is taken back by the script's next run on the image): whether a person "
                "reclassified them cannot be told, so they are no labels; %s",
                where,
                counts[UNRECORDED_NUCLEI_COUNT],
                UNRECORDED_NUCLEI_FIX,
            )
    if unknown_point_classes:
        listing = ", ".join(f"{c} ({n} points)" for c, n in sorted(unknown_point_classes.items()))
        # 'tumor: positive' or 'Tumor:Positive ' is the model's class spelt otherwise: say which, and the option.
        spelt = {_spelling(c): c for c in rules.class_names}
        meant = {c: spelt[_spelling(c)] for c in sorted(unknown_point_classes) if _spelling(c) in spelt}
        hint = (
            "; spelt otherwise, "
            + ", ".join(f"{c!r} is the model's {m!r} (pass --class-map '{c}={m}')" for c, m in meant.items())
            + ", or rename the class in QuPath and export again"
            if meant
            else ""
        )
        ihc = {_spelling(c) for c in IHC_NUCLEUS_CLASSES} - {_spelling(c) for c in rules.class_names}
        if rules.stain == "H&E" and any(_spelling(c) in ihc for c in unknown_point_classes):
            hint += (
                "; the immune cell classes are the PD-L1 IHC nuclei model's: points on IHC slides train it with "
                "--stain ihc"
            )
        raise LabelError(
            f"{where}: points of classes the model does not have: {listing}; the model's classes are "
            f"{', '.join(rules.class_names)}: map each with --class-map 'LABEL=MODEL' (or 'LABEL=' to leave it out)"
            + hint
        )
    points = np.asarray(xy, np.float64).reshape(-1, 2)
    classes = np.asarray(point_cls, np.int64)
    width, height = image_size_px
    outside = (points[:, 0] < 0) | (points[:, 1] < 0) | (points[:, 0] > width) | (points[:, 1] > height)
    _check_areas_inside(where, [g for g, _ in regions] + positive + negative + ignore + ihc, width, height)
    if outside.any():
        first = points[np.flatnonzero(outside)[0]]
        raise LabelError(
            f"{where}: {int(outside.sum())} of {len(points)} points lie outside the {width} x {height} px image "
            f"(first at x={first[0]:.1f}, y={first[1]:.1f}); are the labels from another image or downsampled? "
            "Export them again from this image"
        )
    if ihc:
        if mpp is None:
            raise LabelError(f"{where}: a paired IHC area needs the image's µm/px for its band; pass the slide's MPP")
        # The registered area is the union of discs around the IHC's positive cells (bridge.pairs): gaps under
        # two cells wide inside a positive nest are not negative tissue. Closed first, or the band on every such
        # hole's edge leaves almost nothing positive (a phantom pair: 78 of 94,580 µm² at 20 µm; closed, 48,852).
        close_px = IHC_CELL_RADIUS_UM / mpp
        area = _union(ihc).buffer(close_px).buffer(-close_px)
        band = area.boundary.buffer(rules.ihc_band_um / mpp)
        # The whole image is labelled: IHC positive is positive, the rest negative, the edge band not a label.
        regions.append((shapely.box(0, 0, *image_size_px), False))
        positive.append(area)
        ignore.append(band)
    ignore_area = _union(ignore)
    if len(points) and not ignore_area.is_empty:
        in_ignore = shapely.contains_xy(ignore_area, points[:, 0], points[:, 1])
        points, classes = points[~in_ignore], classes[~in_ignore]
        if in_ignore.any():
            counts["skipped: points under Ignore*"] += int(in_ignore.sum())
    for i, name in enumerate(rules.class_names):
        if (classes == i).any():
            counts[f"points: {name}"] += int((classes == i).sum())
    if rules.points:
        _refuse_contradicting_points(where, points, classes, rules.class_names)
        _refuse_empty_exhaustive_regions(where, regions, points, ignore_area)
    pos_area, neg_area = _union(positive), _union(negative)
    overlap = pos_area.intersection(neg_area)
    if overlap.area > _OVERLAP_TOLERANCE_PX2:
        x0, y0, x1, y1 = (round(v) for v in overlap.bounds)
        raise LabelError(
            f"{where}: PD-L1 positive and PD-L1 negative labels overlap by {overlap.area:.0f} px^2 "
            f"(within x {x0}-{x1}, y {y0}-{y1}); a pixel cannot be both: fix one of them in QuPath"
        )
    labels = SlideLabels(
        slide=slide,
        image_size_px=(int(width), int(height)),
        training_regions=tuple(r for r, _ in regions),
        exhaustive=tuple(e for _, e in regions),
        positive=pos_area,
        negative=neg_area,
        ignore=ignore_area,
        points_xy=points,
        points_class=classes,
        class_names=tuple(rules.class_names),
        counts=dict(sorted(counts.items())),
        source=source,
        stain=rules.stain,
    )
    if not labels.has_regions and not labels.has_points:
        skipped = "; ".join(f"{k}: {v}" for k, v in labels.counts.items()) or "no objects"
        if labels.drew_regions:  # drawn, but nothing of them is a label: trained on, they gave no pixel
            raise LabelError(
                f"{where}: no labelled pixels ({skipped}): the Training regions and PD-L1 areas have no area, or "
                f"Ignore* areas cover them; draw them again around tissue, shrink the Ignore* areas, or {leave_out}"
            )
        raise LabelError(
            f"{where}: no labels ({skipped}); draw 'Training region', 'PD-L1 positive' or 'PD-L1 negative' "
            f"areas or nucleus points, or {leave_out}"
        )
    return labels


# Two points of a nucleus marked twice lie this close (level-0 px): QuPath keeps the coordinates clicked or copied.
_SAME_POINT_PX = 2.0


def _refuse_contradicting_points(where: str, points: np.ndarray, classes: np.ndarray, names: Sequence[str]) -> None:
    """A nucleus marked twice with two classes (re-marked in QuPath without deleting the first point) trained both
    classes at one spot without a word, as overlapping positive and negative areas are refused."""
    if len(points) < 2:
        return
    pairs = cKDTree(points).query_pairs(_SAME_POINT_PX, output_type="ndarray")
    differ = pairs[classes[pairs[:, 0]] != classes[pairs[:, 1]]] if len(pairs) else pairs
    if len(differ):
        i, j = differ[0]
        raise LabelError(
            f"{where}: {len(differ)} nuclei are marked twice with different classes (first at x={points[i, 0]:.1f}, "
            f"y={points[i, 1]:.1f}: {names[classes[i]]} and {names[classes[j]]}); a nucleus is of one class: delete "
            "one of its points in QuPath and export again"
        )


def _refuse_empty_exhaustive_regions(
    where: str, regions: Sequence[tuple[BaseGeometry, bool]], points: np.ndarray, ignore_area: BaseGeometry
) -> None:
    """A training region named all nuclei marked holding no point: every nucleus in it trains as background (its
    tissue "no nucleus"). Refused where the slide has points outside every region (they were most often meant for
    it); else it may be a region of mucin or lumen drawn as a hard negative, and it is warned of. ``points`` are
    those left by ``Ignore*`` (``ignore_area``); a region it covers whole trains nothing, and is passed over (its
    points, under it, were taken for missing: the region was refused or warned of as unmarked)."""
    outside = (
        len(points) > 0 and not shapely.contains_xy(_union([r for r, _ in regions]), points[:, 0], points[:, 1]).all()
    )
    for k, (region, exhaustive) in enumerate(regions, start=1):
        if not exhaustive or (len(points) and shapely.contains_xy(region, points[:, 0], points[:, 1]).any()):
            continue
        if region.difference(ignore_area).area <= 0:
            continue
        x0, y0, x1, y1 = (round(v) for v in region.bounds)
        said = (
            f"{where}: training region {k} (x {x0}-{x1}, y {y0}-{y1}) says all its nuclei are marked, and no "
            "nucleus point lies in it, so every nucleus there trains as background"
        )
        if outside:
            raise LabelError(
                f"{said}, while points lie outside every training region; draw the region around them, mark its "
                f"nuclei, or take '{EXHAUSTIVE_MARK}' out of its name"
            )
        log.warning("%s (a region of no nuclei, drawn as such?); if it has nuclei, mark them", said)


def read_geojson_labels(
    path: str | Path,
    *,
    slide: str | Path,
    image_size_px: tuple[int, int],
    rules: LabelRules,
    project_classes: frozenset[str] | None = None,
    mpp: float | None = None,
    written: WrittenObjects | None = None,
    export_again: str = "export the objects again from QuPath as GeoJSON",
    leave_out: str = "leave the slide and its GeoJSON (--labels) out",
) -> SlideLabels:
    """Labels from a QuPath GeoJSON export (QuPath's *Export objects*, ``pdl1_export_labels.groovy``, or the
    ``pdl1/pairs/<H&E key>.ihc_positive.geojson`` of a paired IHC). ``export_again``: the fix for a file that
    does not read (how the file at hand is made again); ``leave_out``: how the slide is left out, for a file that
    holds no labels (:func:`labels_from_objects`; a slide given with its file, not a project's entry)."""
    path = Path(path)
    if path.is_dir():  # "no such GeoJSON file" of a folder that is there
        raise LabelError(
            f"{path} is a folder; --labels takes one GeoJSON file per slide (QuPath: File > Export objects as "
            "GeoJSON), in the slides' order"
        )
    if not path.is_file():
        raise LabelError(f"{path}: no such GeoJSON file; export the image's objects from QuPath as GeoJSON")
    read = read_label_objects(path, export_again, rules)
    return labels_from_objects(
        read.objects,
        slide=str(slide),
        image_size_px=image_size_px,
        rules=rules,
        project_classes=project_classes,
        source=str(path),
        mpp=mpp,
        written=written,
        skipped=read.skipped,
        leave_out=leave_out,
    )


@dataclass(frozen=True)
class LabelObjects:
    """The objects of an image's labels (a file's, or QuPath's through paquo) that may label something, and the counts
    of those passed over as they were read."""

    objects: list[QuPathObject]
    skipped: Counter[str]


def _keeping_labels(rules: LabelRules, skipped: Counter[str]) -> Callable[[QuPathObject], bool]:
    """Whether an object may label something under ``rules``; one that labels nothing (:func:`_skipped_detection`)
    is counted into ``skipped`` instead."""
    class_map = dict(rules.class_map or {})

    def keeps(obj: QuPathObject) -> bool:
        passed_over = _skipped_detection(obj, rules, class_map)
        if passed_over is not None:
            skipped[passed_over] += 1
        return passed_over is None

    return keeps


def read_label_objects(path: Path, export_again: str, rules: LabelRules) -> LabelObjects:
    """The objects of a GeoJSON file of labels, but the detections and cells that label nothing under ``rules``
    (:func:`_skipped_detection`), counted and let go as they are read; refused (:class:`LabelError`, naming the file)
    where the file does not read. ``export_again``: how the file is made again."""
    skipped: Counter[str] = Counter()
    keeps = _keeping_labels(rules, skipped)
    try:
        kept = [obj for obj in read_features(path) if keeps(obj)]
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LabelError(f"{path}: not JSON ({err}); {export_again}") from err
    except Pdl1Error as err:
        raise LabelError(f"{path}: {err}; {export_again}") from err
    return LabelObjects(kept, skipped)


def annotation_counts(objects: Iterable[QuPathObject]) -> Counter[str]:
    """The annotations among ``objects`` by class, as QuPath counts them in an entry's ``summary.json``
    (``Unclassified`` for none): what :func:`refuse_stale_export` compares."""
    return Counter(o.classification or "Unclassified" for o in objects if o.object_type == "annotation")


def project_classes(project_folder: Path) -> frozenset[str] | None:
    """The class names of ``classifiers/classes.json``, or None when the project has none."""
    path = project_folder / "classifiers" / "classes.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return frozenset(str(c["name"]) for c in raw["pathClasses"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise LabelError(f"{path}: not QuPath's class list ({err}); save the project in QuPath again") from err


def choose_entries(info: ProjectInfo, wanted: Sequence[str] = ()) -> list[ProjectEntry]:
    """The entries named by ID or image name (all when none are named); an unknown name is refused."""
    if not wanted:
        return list(info.entries)
    chosen = {w: _entry_named(info, w) for w in dict.fromkeys(wanted)}
    missing = [w for w, e in chosen.items() if e is None]
    if missing:
        known = ", ".join(f"{e.entry_id} ({e.image_name})" for e in info.entries)
        raise LabelError(f"{info.path}: no entry {', '.join(map(repr, missing))}; the project has {known}")
    return list({e.entry_id: e for e in chosen.values()}.values())  # each once (by ID and by name too), in order


def _entry_named(info: ProjectInfo, name: str) -> ProjectEntry | None:
    """The entry of ID ``name``, else the one entry of image name ``name``; None where none is. An image name
    several entries share is refused, naming their IDs: one of them was taken in silence (the last)."""
    for entry in info.entries:
        if entry.entry_id == name:
            return entry
    named = [e for e in info.entries if e.image_name == name]
    if len(named) > 1:
        raise LabelError(
            f"{info.path}: {len(named)} entries have the image name {name!r} (entries "
            f"{', '.join(e.entry_id for e in named)}); name the one you mean by its entry ID"
        )
    return named[0] if named else None


def read_project_labels(
    project: str | Path,
    *,
    rules: LabelRules,
    entries: Sequence[str] = (),
    qupath: str = "auto",
    search_dirs: tuple[Path, ...] = (),
    mpp_advice: MppAdvice | None = None,
    reader: str = "pdl1 train",
) -> list[SlideLabels]:
    """Labels of a project's entries: through QuPath (paquo) when it is installed, else from exports.

    ``qupath``: ``auto`` (QuPath when paquo finds one), ``always`` or ``never``. Without QuPath each
    entry's objects are read from ``pdl1/labels/<entry ID>.geojson`` in the project folder, which
    ``qupath_scripts/pdl1_export_labels.groovy`` writes; the labels are the same either way.

    Each entry's labels carry the pixel size the project states for it (``mpp``: QuPath's calibration, also
    one a user set in QuPath), which replaces the file's own, as ``pdl1 run`` reads the entry. Each image is
    opened once here: an image that states no pixel size either way raises
    :class:`~inference.errors.MissingMppError` (its message ends with ``mpp_advice``, how the caller's user
    gives one), and one whose stain nobody states is warned of when its colour says another (:func:`warn_unless_stain`).
    Every entry is read before anything is refused: one entry's error is raised as it is, those of several in one
    :class:`LabelError` naming each entry (a line each), so one run tells the user every fix.

    The project's objects (and the sidecars of its runs and analyses) are read under its run lock
    (:func:`bridge.run_lock.project_read_lock`), so a ``pdl1 run`` replacing them is never read half-way, and one
    started meanwhile waits for the read; a run holding the lock is a :class:`~bridge.run_lock.RunLockBusyError`
    naming it, another read is waited for.
    ``reader``: the command reading, as the lock's messages name it. The lock is released when this returns.
    """
    info = read_project(project)
    with project_read_lock(info.folder, reader=reader):
        return _read_project_labels(
            info,
            rules=rules,
            entries=entries,
            qupath=qupath,
            search_dirs=search_dirs,
            mpp_advice=mpp_advice,
        )


def _read_project_labels(
    info: ProjectInfo,
    *,
    rules: LabelRules,
    entries: Sequence[str],
    qupath: str,
    search_dirs: tuple[Path, ...],
    mpp_advice: MppAdvice | None,
) -> list[SlideLabels]:
    """:func:`read_project_labels` of a project read, with its run lock held."""
    chosen = choose_entries(info, entries)
    classes = project_classes(info.folder)
    use_qupath = qupath == "always"
    if qupath == "auto":
        from bridge.qupath import qupath_available

        use_qupath = qupath_available()[0]
    objects_by_entry: dict[str, LabelObjects] | None = None
    if use_qupath:
        from bridge.qupath import read_entry_objects

        # Every entry is read at once there: each holds only what may label.
        skipped: defaultdict[str, Counter[str]] = defaultdict(Counter)
        keeps = {e.entry_id: _keeping_labels(rules, skipped[e.entry_id]) for e in chosen}
        read = read_entry_objects(
            info.path, [e.entry_id for e in chosen], keep=lambda entry_id, obj: keeps[entry_id](obj)
        )
        objects_by_entry = {entry_id: LabelObjects(objects, skipped[entry_id]) for entry_id, objects in read.items()}
    search = ImageSearch(search_dirs)
    _check_class_map_targets(dict(rules.class_map or {}), rules)  # an option's error, said once, not per entry
    _warn_class_map_unknown(dict(rules.class_map or {}), classes, info.path)
    out, problems = [], []
    for entry in chosen:
        try:
            out.append(
                _entry_labels(
                    info,
                    entry,
                    rules=rules,
                    classes=classes,
                    objects_by_entry=objects_by_entry,
                    search=search,
                    mpp_advice=mpp_advice,
                )
            )
        except Pdl1Error as err:  # every entry is checked, so one run names all that need fixing
            problems.append((entry, err))
    if len(problems) == 1:
        raise problems[0][1]
    if problems:
        lines = "\n".join(
            f"- entry {e.entry_id} ({e.image_name}): {_without_entry(str(err), info, e)}" for e, err in problems
        )
        raise LabelError(
            f"{info.path}: {len(problems)} of {len(chosen)} entries cannot be used, so nothing was trained or "
            f"exported; fix each (or leave it out with --entries), then run again:\n{lines}"
        ) from problems[0][1]
    return out


# QuPath's own classes of positive cell detection (PathClass.StandardPathClasses: POSITIVE, NEGATIVE, ONE_PLUS, ...):
# its cells carry them whether or not the project's class list names them.
_QUPATH_INTENSITY_CLASSES = frozenset({"Positive", "Negative", "1+", "2+", "3+"})


def _warn_class_map_unknown(class_map: Mapping[str, str | None], classes: frozenset[str] | None, where: Path) -> None:
    """Warn of a ``--class-map`` LABEL that is no class of the project (a misspelt one maps nothing, and the
    points of the class meant are then refused or skipped as unmapped); nothing where the project lists none."""
    if not classes:
        return
    known = classes | _QUPATH_INTENSITY_CLASSES
    unknown = sorted(label for label in class_map if label not in known and label.strip() not in known)
    if unknown:
        log.warning(
            "--class-map names %s, which %s no class of %s (its classes: %s); check the spelling, as QuPath shows the "
            "class, or leave it out",
            ", ".join(repr(u) for u in unknown),
            "is" if len(unknown) == 1 else "are",
            where,
            ", ".join(sorted(classes)),
        )


def _without_entry(message: str, info: ProjectInfo, entry: ProjectEntry) -> str:
    """``message`` less a leading project and entry, for a list whose lines name the entry already."""
    for prefix in (f"{info.path} entry {entry.entry_id} ({entry.image_name}): ", f"{info.path}: "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


def _entry_labels(
    info: ProjectInfo,
    entry: ProjectEntry,
    *,
    rules: LabelRules,
    classes: frozenset[str],
    objects_by_entry: dict[str, LabelObjects] | None,
    search: ImageSearch,
    mpp_advice: MppAdvice | None,
) -> SlideLabels:
    """One entry's labels for :func:`read_project_labels` (its image found and opened, its stain checked)."""
    from inference import open_slide

    slide = locate_image(entry, project_folder=info.folder, saved_folder=info.saved_folder, search=search)
    if entry.size_px is None:
        raise LabelError(
            f"{info.path}: entry {entry.entry_id} ({entry.image_name}) states no image size; "
            "open it in QuPath and save the project"
        )
    source = f"{info.path} entry {entry.entry_id} ({entry.image_name})"
    if entry.stain is not None and entry.stain != rules.stain:
        raise LabelError(f"{source}: QuPath's image type {entry.image_type} says {entry.stain}; {_trains(rules)}")
    # At the pixel size QuPath saved, else the file's (as `pdl1 run` reads the entry, and as training reads it).
    with open_slide(slide, mpp=entry.mpp, mpp_source="QuPath project", mpp_advice=mpp_advice) as opened:
        mpp = opened.mpp.mean
        # Checked here with the entry's other problems: the trainers refused it only after pseudo-labelling, one
        # slide at a time, and held-out slides were scored against labels drawn on another image.
        if tuple(opened.dimensions) != tuple(entry.size_px):
            raise LabelError(
                f"{source}: QuPath's project says the image is {entry.size_px[0]} x {entry.size_px[1]} px, but {slide} "
                f"is {opened.dimensions[0]} x {opened.dimensions[1]} px, so its labels were drawn on another image; "
                "point the entry at its image in QuPath (or with --search-dir), or leave it out with --entries"
            )
        if entry.stain is None:
            warn_unless_stain(opened, source, rules)
    written = WrittenObjects.of_entry(sidecar_dir(info.folder, entry.entry_id)) if rules.from_review else None
    if objects_by_entry is not None:
        read = objects_by_entry.get(entry.entry_id, LabelObjects([], Counter()))
        labels = labels_from_objects(
            read.objects,
            slide=str(slide),
            image_size_px=entry.size_px,
            rules=rules,
            project_classes=classes,
            source=source + " through QuPath",
            mpp=mpp,
            written=written,
            skipped=read.skipped,
        )
    else:
        exported = export_path(info.folder, entry.entry_id)
        if not exported.is_file():
            raise LabelError(
                f"{source}: QuPath is not installed here and {exported} is missing; run "
                "qupath_scripts/pdl1_export_labels.groovy for the project in QuPath (Run for project), "
                "or set PAQUO_QUPATH_DIR"
            )
        export_again = (
            f"export it again: run qupath_scripts/pdl1_export_labels.groovy on {entry.image_name} in QuPath (or Run "
            "for project)"
        )
        read = read_label_objects(exported, export_again, rules)  # read once: a slide's cells cost seconds
        refuse_stale_export(
            exported,
            info.folder / "data" / entry.entry_id,
            source,
            export_again,
            exported_counts=annotation_counts(read.objects),  # annotations are never passed over
        )
        labels = labels_from_objects(
            read.objects,
            slide=str(slide),
            image_size_px=entry.size_px,
            rules=rules,
            project_classes=classes,
            source=str(exported),
            mpp=mpp,
            written=written,
            skipped=read.skipped,
        )
        labels = replace(labels, source=f"{source} from {exported}")
    return replace(labels, mpp=entry.mpp)


def refuse_stale_export(
    exported: Path,
    entry_folder: Path,
    source: str,
    export_again: str,
    *,
    exported_counts: Mapping[str, int],
    drawn: str = "labels",
    error: type[Pdl1Error] = LabelError,
) -> None:
    """Refuse an export written before the entry's last save in QuPath where its annotations differ since: labelling
    on after the export (export, label more, save, train) trained on the old labels without a word. QuPath's own
    count of the entry's annotations by class (``summary.json``, written with each save) tells; a save that changed
    no class's count (an outline moved) it does not. An export newer than the save is of what QuPath shows (labels
    not saved yet), and stands. ``exported_counts``: the export's annotations by class (:func:`annotation_counts` of
    what the caller read). ``drawn``: what the export is read for (``labels``; ``annotations`` for ``pdl1 run``'s
    targets), raised as ``error``."""
    saved = annotation_class_counts(entry_folder)
    summary = entry_folder / "summary.json"
    try:
        if saved is None or summary.stat().st_mtime <= exported.stat().st_mtime:
            return
    except OSError:  # gone since it was read: the reader said what it found
        return
    in_export = Counter(exported_counts)
    differ = sorted(c for c in {*saved, *in_export} if saved.get(c, 0) != in_export.get(c, 0))
    if differ:
        said = ", ".join(f"{c}: {saved.get(c, 0)} saved, {in_export.get(c, 0)} exported" for c in differ)
        raise error(
            f"{source}: QuPath saved the entry after {exported} was written, and its annotations changed since "
            f"({said}: {drawn} drawn, or results added, since the export), so the export is out of date; {export_again}"
        )


def _trains(rules: LabelRules) -> str:
    """What labels of ``rules`` train, and how to leave out or retype an image of another stain (after "; ")."""
    if rules.stain == "H-DAB":
        return (
            "these labels train the PD-L1 IHC nuclei model (--stain ihc). Leave the entry out with --entries, or set "
            "its image type in QuPath (Image > Image type) to Brightfield (H-DAB) if it is a PD-L1 IHC"
        )
    return (
        "these labels train the H&E models (the segmentation ensemble and the H&E nuclei model); for points on PD-L1 "
        "IHC slides, train the IHC nuclei model with `pdl1 train nuclei --stain ihc`. Leave the entry out with "
        "--entries, or set its image type in QuPath (Image > Image type) if it is an H&E"
    )


def warn_unless_stain(slide: str | Path | Slide, source: str, rules: LabelRules) -> None:
    """Warn when a slide (a path, or one already open) whose stain nobody stated looks like another stain than the
    one ``rules`` train (H&E, or H-DAB for the IHC nuclei model) by its colour.

    A warning, not a refusal: the colour can be wrong (README, stain detection), and without a QuPath image
    type there is nothing to override it with. Stated stains are checked by :func:`read_project_labels`.
    """
    from inference import detect_slide_stain, open_slide

    if isinstance(slide, Slide):
        colour = detect_slide_stain(slide)
    else:
        with open_slide(slide) as opened:
            colour = detect_slide_stain(opened)
    if colour.stain != rules.stain and colour.margin_deg >= STAIN_WARNING_MARGIN_DEG:
        model = "the PD-L1 IHC nuclei model" if rules.stain == "H-DAB" else "the H&E models"
        # The other stain's labels train where the command has an option for it (rules.stain_option), else nowhere.
        other = f" (or give `{rules.stain_option} {'he' if rules.stain == 'H-DAB' else 'ihc'}`)"
        log.warning(
            "%s: its colour says %s (%s), but these labels train %s; if it is another stain, leave it out%s; if it "
            "is %s, set its image type in QuPath to make that plain",
            source,
            colour.stain,
            colour.reason,
            model,
            other if rules.stain_option else "",
            "a PD-L1 IHC" if rules.stain == "H-DAB" else "an H&E",
        )


def _entry_of(lab: SlideLabels) -> re.Match | None:
    """The project entry ``lab`` came from, as its ``source`` names it (groups: ID, image name), else None."""
    return re.search(r" entry (\S+) \((.*?)\)", lab.source)


def _names_of(lab: SlideLabels) -> set[str]:
    """What ``--val-entries`` may call a slide: its path, file name, and its project entry's ID and image name."""
    names = {lab.slide, Path(lab.slide).name}
    entry = _entry_of(lab)
    if entry:
        names |= {entry.group(1), entry.group(2)}
    return names


def _val_name(lab: SlideLabels) -> str:
    """A labelled slide as ``--val-entries`` may name it: ``entry 2 (B.svs)``, else its file name."""
    entry = _entry_of(lab)
    return f"entry {entry.group(1)} ({entry.group(2)})" if entry else Path(lab.slide).name


def refuse_unscorable_held_out(held_out: Sequence[SlideLabels], *, points: bool, chosen_by: str) -> None:
    """Raise :class:`LabelError` naming the held-out slides validation cannot score, before anything is trained:
    a nuclei model (``points``) is scored inside training regions whose nuclei are all marked alone, a segmentation
    ensemble on labelled pixels. Found after training, that cost the run, and wrote no validation.json or report.
    ``chosen_by``: the option that held them out (``--val-entries``, ``--val-fraction``)."""
    if points:
        bad = [lab for lab in held_out if not any(lab.exhaustive)]
        needs = (
            "a nuclei model is scored only inside a Training region whose name says 'all nuclei marked' (every "
            "nucleus in it marked)"
        )
        fix = "mark every nucleus of a Training region in QuPath and name it so"
    else:
        bad = [lab for lab in held_out if not lab.has_regions]
        needs = "a segmentation is scored on labelled pixels (a Training region, PD-L1 positive or negative areas)"
        fix = "draw such labels in QuPath"
    if not bad:
        return
    names = "; ".join(_val_name(lab) for lab in bad)
    other = "name others with --val-entries" if chosen_by == "--val-fraction" else "hold out others"
    raise LabelError(
        f"{chosen_by} holds out {names} for validation, which {'it' if len(bad) == 1 else 'they'} cannot score: "
        f"{needs}, and {'it has' if len(bad) == 1 else 'they have'} none; {fix}, or {other}; nothing was trained"
    )


def refuse_files_calibrated_twice(labels: Sequence[SlideLabels]) -> None:
    """Raise :class:`LabelError` where two labelled entries are one image file with different pixel sizes.

    QuPath lets each entry set its own (``mpp``, None: the file's own), but training reads a file at one pixel
    size (its ``slide_mpp``, by slide path): the held-out ones too, so this is checked before any are held out.
    The message names both entries, both pixel sizes and the fix.
    """
    first: dict[Path, SlideLabels] = {}
    for lab in labels:
        earlier = first.setdefault(Path(lab.slide).resolve(), lab)
        if earlier.mpp == lab.mpp:
            continue
        both = []
        for one in (earlier, lab):
            entry = _entry_of(one)
            name = f"entry {entry.group(1)} ({entry.group(2)})" if entry else (one.source or one.slide)
            size = "its file's own pixel size (none set in QuPath)" if one.mpp is None else f"{one.mpp:g} µm/px"
            both.append(f"{name} at {size}")
        raise LabelError(
            f"{earlier.slide} is the image of two project entries with different pixel sizes: {both[0]} and "
            f"{both[1]}; training reads one file at one pixel size. Set one pixel size for the image in QuPath "
            "(Image tab: Pixel width/height, the same in both entries) and save the project; or leave one of the "
            "two entries out, naming the others with --entries (and not that one with --val-entries)"
        )


def split_validation(
    labels: Sequence[SlideLabels], val: Sequence[str], *, fraction: float = 0.0, seed: int = 0
) -> tuple[list[SlideLabels], list[SlideLabels]]:
    """(training, validation) by slide, never by tile: the slides named in ``val`` (entry ID, image name
    or file name) are held out whole; or, without names, ``fraction`` of the slides (at least one, drawn
    with ``seed``: the same labels and seed hold out the same slides).

    >>> from inference import SlideLabels
    >>> labs = [SlideLabels(slide=f"s{i}.svs", image_size_px=(10, 10)) for i in range(5)]
    >>> train, held = split_validation(labs, [], fraction=0.4, seed=1)
    >>> len(train), len(held), sorted(lab.slide for lab in held) == sorted(
    ...     lab.slide for lab in split_validation(labs, [], fraction=0.4, seed=1)[1])
    (3, 2, True)
    """
    if val and fraction:
        raise LabelError("give --val-entries or --val-fraction, not both")
    if fraction:
        if not 0 < fraction < 1:
            raise LabelError(f"--val-fraction must lie between 0 and 1 (a share of the slides), got {fraction:g}")
        if len(labels) < 2:
            raise LabelError(
                f"--val-fraction holds out whole slides, and there is {len(labels)} labelled slide: label another "
                "slide, or train without validation"
            )
        n_held = min(len(labels) - 1, max(1, round(fraction * len(labels))))
        order = np.random.default_rng(seed).permutation(len(labels))
        held_idx = set(order[:n_held].tolist())
        train = [lab for i, lab in enumerate(labels) if i not in held_idx]
        held = [lab for i, lab in enumerate(labels) if i in held_idx]
        _refuse_held_out_trained_on(train, held)
        return train, held
    if not val:
        return list(labels), []
    wanted = set(val)
    for name in sorted(wanted):  # as --entries refuses an image name several entries share (one was taken in silence)
        named = [lab for lab in labels if name in _names_of(lab)]
        if len(named) > 1:
            raise LabelError(
                f"--val-entries {name} names {len(named)} labelled slides ({'; '.join(map(_val_name, named))}); name "
                "the one you mean by its entry ID (or its path)"
            )
    held = [lab for lab in labels if _names_of(lab) & wanted]
    train = [lab for lab in labels if not _names_of(lab) & wanted]
    unknown = wanted - set().union(*(_names_of(lab) for lab in held)) if held else wanted
    if unknown:
        known = "; ".join(_val_name(lab) for lab in labels)
        raise LabelError(
            f"--val-entries names {', '.join(sorted(unknown))}, which no labelled slide is; the labelled slides are "
            f"{known}: give an entry ID, image name or slide file name of one of them"
        )
    if not train:
        raise LabelError("every labelled slide is held out for validation: leave at least one to train on")
    _refuse_held_out_trained_on(train, held)
    return train, held


def _refuse_held_out_trained_on(train: Sequence[SlideLabels], held: Sequence[SlideLabels]) -> None:
    """A held-out slide whose image file is also trained on (two entries of one file): scored on its own training
    data, its validation says nothing of other slides, and the thresholds fitted there are fitted on training data."""
    by_file = {Path(lab.slide).resolve(): lab for lab in train}
    for lab in held:
        same = by_file.get(Path(lab.slide).resolve())
        if same is not None:
            raise LabelError(
                f"{_val_name(lab)} is held out for validation, but its image {lab.slide} is also trained on (as "
                f"{_val_name(same)}): scored on its own training data, its validation would say nothing of other "
                "slides, and the thresholds fitted on it would be fitted on training data; hold out another slide, or "
                "leave one of the two entries out (--entries)"
            )


def parse_class_map(items: Iterable[str]) -> dict[str, str | None]:
    """``LABEL=MODEL`` pairs (``LABEL=`` leaves that class out) as a dict.

    >>> parse_class_map(["connective=Other", "neoplastic=Tumor: Negative", "junk="])
    {'connective': 'Other', 'neoplastic': 'Tumor: Negative', 'junk': None}
    """
    out: dict[str, str | None] = {}
    for item in items:
        label, sep, target = item.partition("=")
        if not sep or not label.strip():
            raise LabelError(f"--class-map expects LABEL=MODEL (or LABEL= to leave it out), got {item!r}")
        mapped = target.strip() or None
        if label.strip() in out and out[label.strip()] != mapped:  # the last one won without a word
            raise LabelError(
                f"--class-map maps {label.strip()!r} twice, to {out[label.strip()] or 'nothing'} and to "
                f"{mapped or 'nothing'}; give one --class-map for each label class"
            )
        out[label.strip()] = mapped
    return out


def label_summary(labels: Sequence[SlideLabels]) -> list[dict]:
    """Per slide: source, counts used and skipped, and the labels' sha256 (for manifests and reports)."""
    from inference import labels_digest

    return [
        {
            "slide": lab.slide,
            "source": lab.source,
            "counts": dict(lab.counts),
            "labels_sha256": labels_digest(lab),
        }
        for lab in labels
    ]


def _refuse_labelled_as_unlabeled(info: ProjectInfo, entry: ProjectEntry) -> None:
    """An entry named ``--unlabeled`` that a person labelled (training regions, as QuPath last saved it): its
    pseudo-labels replaced those labels without a word. Only training regions tell it by QuPath's counts alone:
    this tool writes its own ``PD-L1 positive`` regions and candidates into an analysed entry."""
    saved = annotation_class_counts(info.folder / "data" / entry.entry_id) or {}
    regions = saved.get(TRAINING_REGION.name, 0)
    if regions:
        raise LabelError(
            f"--unlabeled {entry.entry_id} ({entry.image_name}) has labels of its own ({regions} "
            f"{TRAINING_REGION.name} annotations, as QuPath last saved it), which pseudo-labels would replace: train "
            "on it as a labelled entry (leave it out of --unlabeled), or remove its training regions in QuPath"
        )


def unlabeled_slides(
    items: Sequence[str],
    *,
    project: Path | None = None,
    labelled: Sequence[str] = (),
    search_dirs: tuple[Path, ...] = (),
) -> list[UnlabeledSlide]:
    """What ``--unlabeled`` names: slide files, or entries (ID or image name) of the training ``project``.

    An entry brings QuPath's calibration and image type along. A slide that is also among the
    ``labelled`` ones is refused (it is either labelled or pseudo-labelled), as is a name that is
    neither a file nor an entry.
    """
    info = read_project(project) if project is not None else None
    out = []
    for item in dict.fromkeys(items):
        entry = None if info is None or Path(item).is_file() else _entry_named(info, item)
        if Path(item).is_file():
            out.append(UnlabeledSlide(path=str(item), name=str(item)))
        elif info is not None and entry is not None:
            _refuse_labelled_as_unlabeled(info, entry)
            slide = locate_image(
                entry, project_folder=info.folder, saved_folder=info.saved_folder, search=ImageSearch(search_dirs)
            )
            name = f"{info.path} entry {entry.entry_id} ({entry.image_name})"
            out.append(UnlabeledSlide(path=str(slide), mpp=entry.mpp, stain=entry.stain, name=name))
        elif info is not None:
            known = ", ".join(f"{e.entry_id} ({e.image_name})" for e in info.entries)
            raise LabelError(f"--unlabeled {item}: no such file, and {info.path} has no such entry; it has {known}")
        else:
            raise LabelError(
                f"--unlabeled {item}: no such file. Give slide files, or entries (ID or image name) of a QuPath "
                "project that is the training source"
            )
    taken = {Path(p).resolve() for p in labelled}
    for slide in out:
        if Path(slide.path).resolve() in taken:
            raise LabelError(
                f"--unlabeled {slide.label} is also a labelled training slide: leave it out of --unlabeled (to "
                "pseudo-label the unlabelled rest of every labelled slide, use --pseudo-label-rest)"
            )
    return out
