"""Cases with an H&E and a PD-L1 IHC of the same block: paired, registered and compared after a run.

A case is named by the entry metadata key ``case`` (QuPath: the entry's metadata, e.g. set with
*Project > Edit metadata*; another key with ``pdl1 run --case-key``); where an entry has none, or for plain
slides, by the file name with its leading or trailing stain words taken off (``B12_HE.svs``,
``B12_PD-L1_22C3.svs`` and ``ihc_B12.svs`` are case ``B12``). A case with
exactly one analysed H&E and one analysed IHC is compared: the IHC is registered to the H&E, its
positive tumour cells are mapped onto it, and the H&E's prediction is set against the IHC's
measurement (:func:`inference.compare_pair`). The comparisons go to ``pdl1/pairs.json`` beside the run
status; a case that cannot be compared says why there, also one of whose images the run failed on, and one
whose ``case`` a person stated in an entry's metadata but that found images of one stain only while the run
has the other (the partner's ``case`` misspelt or not set). A case of one stain named by its file names
says nothing: an H&E-only study would otherwise hear of every image.

A case whose two images were both analysed core by core (TMAs of one block) is also compared core by core, its
cores matched by name (:func:`match_cores`, :func:`core_agreement`): ``cores`` and ``cores_summary`` in its
record, and a row per core in ``pdl1/pairs_cores.csv``.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from shapely.geometry import Polygon, box
from shapely.ops import unary_union

from bridge.atomic import replace_atomically
from bridge.classes import INTENSITY_CLASSES, PDL1_IHC_POSITIVE, PDL1_POSITIVE, TUMOR_POSITIVE
from bridge.objects import TILE_NAME
from bridge.project import PDL1_DIR, write_json_atomic
from bridge.qupath_geojson import (
    DETECTION_LINE_TYPES,
    QuPathObject,
    not_detections,
    read_features,
    to_feature,
    write_features,
)
from bridge.review_advice import CASE_STAIN_FIX
from bridge.targets import MISSING, RUN_IMAGE_AGAIN, TMA_CORE, TargetRow, csv_cell, rows_from_summary
from inference import (
    IHC_CELL_RADIUS_UM,
    MIN_TUMOUR_NUCLEI,
    TPS_CUTOFFS_PERCENT,
    Pdl1Error,
    cells_area,
    compare_pair,
    open_slide,
    register_slides,
    spearman,
    tps_category,
)

log = logging.getLogger(__name__)

CASE_KEY = "case"
PAIRS_FILE = "pairs.json"
PAIRS_DIR = "pairs"  # <folder>/pdl1/pairs/<H&E key>.ihc_positive.geojson: the IHC's positive area on the H&E
LABELS_SUFFIX = ".ihc_positive.geojson"
# A measurement of the registered IHC area: 1 where the IHC's own analysis needs review (bridge.labels counts it).
IHC_NEEDS_REVIEW = "IHC needs review"
# Stain words leading or trailing a file name (a stain and its antibody clone, B12_PD-L1_22C3): what is left names
# the case.
_STAIN_WORD = r"(?:h[&_-]?e|hes|hande|ihc|pd[-_ ]?l1|22c3|sp263|sp142|28-8|73-10|e1l3n|qr1|dab)"
_STAIN_SUFFIX = re.compile(rf"^(?P<case>.+?)(?:[ _.-]+{_STAIN_WORD})+$", re.I)
_STAIN_PREFIX = re.compile(rf"^(?:{_STAIN_WORD}[ _.-]+)+(?P<case>.+)$", re.I)
_POSITIVE_CELL_CLASSES = frozenset({TUMOR_POSITIVE.name, *(c.name for c in INTENSITY_CLASSES)})
# A TMA case's cores, one row each: <folder>/pdl1/pairs_cores.csv beside pairs.json.
CORES_FILE = "pairs_cores.csv"
# Kappa and the correlations need this many compared cores: below it one core is a quarter of them or more.
MIN_CORES_FOR_STATISTICS = 5
TPS_CATEGORIES = tuple(tps_category(p) for p in (0.0, *TPS_CUTOFFS_PERCENT))  # ('<1%', '1-49%', '>=50%')
ABSENT = "absent"  # CoreComparison.state_he/state_ihc: no core of that name in the image's grid


@dataclass(frozen=True)
class CaseImage:
    """One analysed image of a run, as pairing sees it."""

    key: str
    name: str
    image: Path
    case: str | None
    stain: str
    summary_path: Path
    geojson_path: Path
    mpp: float
    case_in_metadata: bool = False
    """True when ``case`` is the entry's metadata (stated by a person), False when it came from the file name."""
    stain_doubt: str | None = None
    """Why its stain may be wrong (:func:`stain_doubt`): the likely cause when its case finds no partner."""


@dataclass(frozen=True)
class FailedImage:
    """An image of the run that failed: its case cannot be told complete, so it is not compared."""

    name: str
    case: str | None


def case_in_metadata(metadata: dict[str, str] | None, *, key: str = CASE_KEY) -> str | None:
    """The case a person stated in an entry's metadata ``key``; None where it has none (or a blank one).

    >>> case_in_metadata({"case": " C7 "}), case_in_metadata({"case": ""}), case_in_metadata(None)
    ('C7', None, None)
    """
    value = str((metadata or {}).get(key) or "").strip()
    return value or None


def case_of(name: str, metadata: dict[str, str] | None, *, key: str = CASE_KEY) -> str | None:
    """The case an image belongs to: its metadata's ``key``, else its file name without its stain words.

    >>> case_of("B12_HE.svs", None), case_of("B12 PD-L1.ndpi", None), case_of("slide.svs", None)
    ('B12', 'B12', None)
    >>> case_of("S22-1234 A1 PD-L1 22C3.svs", None), case_of("S22-1234 A1 H&E.svs", None)
    ('S22-1234 A1', 'S22-1234 A1')
    >>> case_of("anything.svs", {"case": "C7"}), case_of("B7_HE.ome.tif", None)
    ('C7', 'B7')
    """
    stated = case_in_metadata(metadata, key=key)
    if stated is not None:
        return stated
    stem = Path(name).stem
    if stem.lower().endswith(".ome"):  # an OME-TIFF's double suffix (QuPath exports server images as such)
        stem = stem[: -len(".ome")]
    match = _STAIN_SUFFIX.match(stem) or _STAIN_PREFIX.match(stem)
    return match.group("case") if match else None


def _case_key(case: str) -> str:
    """A case name as pairing compares it: without surrounding blanks, capitals or Unicode's spellings of one
    letter (an é typed as one character or as e and an accent, as macOS writes file names).

    >>> _case_key(" Café-7") == _case_key("cafe\u0301-7\u00a0")
    True
    """
    return unicodedata.normalize("NFKC", case.strip()).casefold()


def stain_doubt(name: str, summary: dict[str, Any]) -> str | None:
    """Why an analysed image's stain may be wrong, from its summary: its colour says another stain than it was
    analysed as (its stated image type or --stain against the colour), or the colour told it by a weak margin."""
    details = summary.get("details") if isinstance(summary.get("details"), dict) else {}
    colour = details.get("stain_from_colour")
    if not isinstance(colour, dict) or colour.get("stain") not in ("H&E", "H-DAB"):
        return None
    stain, said = summary.get("stain"), summary.get("stain_source") or "its colour"
    if colour["stain"] != stain:
        return f"{name} was analysed as {stain} ({said}), but its colour says {colour['stain']}"
    for reason in details.get("review_reasons") or ():
        if isinstance(reason, dict) and str(reason.get("reason", "")).startswith("stain told from the colour"):
            return f"{name}'s stain ({stain}) was told from its colour by a weak margin"
    return None


def _doubts(members: Sequence[CaseImage]) -> str:
    """The case's images whose stain may be wrong, and the fix; empty where none."""
    doubts = [m.stain_doubt for m in members if m.stain_doubt]
    if not doubts:
        return ""
    return f"{'; '.join(doubts)}: if a stain is wrong, {CASE_STAIN_FIX}"


def _and_doubts(said: str, members: Sequence[CaseImage]) -> str:
    """``said``, then the case's images whose stain may be wrong (:func:`_doubts`) where any is."""
    doubts = _doubts(members)
    return f"{said}; {doubts}" if doubts else said


def pair_cases(
    images: Iterable[CaseImage], failed: Iterable[FailedImage] = (), *, case_key: str = CASE_KEY
) -> tuple[dict[str, tuple[CaseImage, CaseImage]], dict[str, str]]:
    """Cases with one H&E and one IHC image, and for every case with both stains but not one of each, why it
    is not paired. A case of one image of one stain (an H&E-only study named ``*_HE``) is no pair and says nothing,
    unless it states the case in its entry metadata (``case_in_metadata``) and the run has images of the other
    stain: a person paired it, so its partner's ``case`` is misspelt or not set, and it says so. A case of two or
    more images of one stain in a run of both says so too, naming an image whose stain its colour doubts.
    A case with an analysed image and one in ``failed`` (a corrupt slide: its stain is unknown, so the case's
    pairing is too) is not paired either, and says which image failed and why.

    Case names are compared without surrounding blanks and regardless of capitals: ``B12`` typed as ``b12 `` in
    the IHC's metadata (or ``B12_HE.svs`` beside ``b12_ihc.svs``) is the same case, not two of one stain each,
    which would say nothing. A case is named as its first image (by name) spells it. ``case_key``: the entry
    metadata key the cases were read from, as the messages name it."""
    images = sorted(images, key=lambda i: i.name)
    stains = {image.stain for image in images}  # also of images without a case: an IHC named slide7.svs
    by_case: dict[str, list[CaseImage]] = {}
    for image in images:
        if image.case is not None and image.case.strip():
            by_case.setdefault(_case_key(image.case), []).append(image)
    failed_by_case: dict[str, list[FailedImage]] = {}
    for image in sorted(failed, key=lambda i: i.name):
        if image.case is not None and image.case.strip():
            failed_by_case.setdefault(_case_key(image.case), []).append(image)
    pairs: dict[str, tuple[CaseImage, CaseImage]] = {}
    problems: dict[str, str] = {}
    for members in sorted(by_case.values(), key=lambda m: m[0].case.strip()):
        case = members[0].case.strip()
        he = [m for m in members if m.stain == "H&E"]
        ihc = [m for m in members if m.stain == "H-DAB"]
        lost = failed_by_case.get(_case_key(case))
        if lost:
            names = ", ".join(f"{m.name} ({m.stain})" for m in members)
            problems[case] = (
                f"case {case!r} is not compared: the run failed on {', '.join(f.name for f in lost)} (its error is "
                f"in the run's table and status.json), so the case is incomplete (analysed: {names}); fix it and run "
                "again (--resume analyses only the images not done)"
            )
        elif len(he) == 1 and len(ihc) == 1:
            pairs[case] = (he[0], ihc[0])
        elif he and ihc:
            names = ", ".join(f"{m.name} ({m.stain})" for m in members)
            problems[case] = _and_doubts(
                f"case {case!r} has {len(he)} H&E and {len(ihc)} PD-L1 IHC images analysed ({names}); a pair is one "
                f"of each: {_one_pair_per_case(members, case_key)}",
                members,
            )
        elif any(m.case_in_metadata for m in members) and len(stains) > 1:
            problems[case] = _and_doubts(_stated_without_partner(case, members, case_key), members)
        elif len(members) > 1 and len(stains) > 1:  # two *_HE of one case, or an H&E and an IHC read as one stain
            stain, other = ("H&E", "PD-L1 IHC") if he else ("PD-L1 IHC", "H&E")
            names = ", ".join(m.name for m in members)
            problems[case] = (
                f"case {case!r} has {len(members)} {stain} images analysed ({names}) and no {other}; a pair is one of "
                f"each: {_doubts(members) or _one_pair_per_case(members, case_key)}"
            )
    return pairs, problems


def _one_pair_per_case(members: Sequence[CaseImage], case_key: str) -> str:
    """How to make a case one H&E and one IHC, where its case is stated in metadata or comes from file names."""
    if any(m.case_in_metadata for m in members):
        return f"give each case its own '{case_key}' metadata value"
    return (
        "the case comes from the file names (without their stain words): rename the files so that each case has one "
        f"H&E and one IHC, or, in a QuPath project, give each entry a '{case_key}' metadata value"
    )


def _stated_without_partner(case: str, members: list[CaseImage], case_key: str) -> str:
    """Why a case a person stated in the metadata, whose images are all of one stain, is not compared."""
    if members[0].stain == "H&E":
        an, stain, other, partner = "an", "H&E", "PD-L1 IHC", "IHC"
    else:
        an, stain, other, partner = "a", "PD-L1 IHC", "H&E", "H&E"
    stated = next(m for m in members if m.case_in_metadata).case.strip()
    names = ", ".join(m.name for m in members)
    which = f"only {an} {stain} ({names}) carries" if len(members) == 1 else f"only {stain} images ({names}) carry"
    return (
        f"case {case!r} is not compared: {which} {case_key}={stated} (entry metadata); no {other} entry does: "
        f"check the {partner}'s `{case_key}` value in QuPath (Project > Edit metadata)"
    )


def _read_he(geojson: Path) -> tuple[Any, np.ndarray, np.ndarray]:
    regions, boxes, entropy = [], [], []
    # Its regions and tiles: the nuclei, most of the file, are passed over unparsed.
    for obj in read_features(geojson, keep=not_detections, unparsed=DETECTION_LINE_TYPES):
        if obj.object_type == "annotation" and obj.classification == PDL1_POSITIVE.name:
            regions.append(obj.geometry)
        elif obj.object_type == "tile" and obj.name == TILE_NAME and "Predictive entropy" in obj.measurements:
            boxes.append(obj.geometry.bounds)
            entropy.append(obj.measurements["Predictive entropy"])
    return unary_union(regions), np.array(boxes, np.float64).reshape(-1, 4), np.array(entropy, np.float64)


def _read_ihc_positive_cells(geojson: Path) -> np.ndarray:
    xy = [
        (obj.geometry.x, obj.geometry.y)
        for obj in read_features(geojson)
        if obj.object_type == "detection" and obj.classification in _POSITIVE_CELL_CLASSES
    ]
    return np.array(xy, np.float64).reshape(-1, 2)


def compare_case(
    he: CaseImage,
    ihc: CaseImage,
    *,
    registration_mpp: float = 8.0,
    labels_dir: Path | None = None,
    openslide_only: bool = False,
) -> dict[str, Any]:
    """Register the IHC to the H&E and compare them; the record that goes into ``pairs.json``.

    With ``labels_dir``, the IHC's positive tumour area mapped onto the H&E is also written there as QuPath
    GeoJSON (one ``PD-L1 IHC positive (registered)`` annotation in H&E level-0 px), to import onto the H&E
    or to train from. ``openslide_only``: ``open_slide``'s, for both slides (the run's ``PipelineConfig``'s).
    """
    with (
        open_slide(he.image, mpp=he.mpp, openslide_only=openslide_only) as he_slide,
        open_slide(ihc.image, mpp=ihc.mpp, openslide_only=openslide_only) as ihc_slide,
    ):
        registration = register_slides(he_slide, ihc_slide, mpp=registration_mpp)
        he_size, ihc_size = he_slide.dimensions, ihc_slide.dimensions
    record: dict[str, Any] = {
        "he": {"key": he.key, "image": he.name},
        "ihc": {"key": ihc.key, "image": ihc.name},
        "registration": {
            "ok": registration.ok,
            "reason": registration.reason,
            "error_um": registration.error_um,
            "tissue_dice": registration.dice,
            "angle_deg": registration.angle_deg,
            "mirrored": registration.mirrored,
            "matrix_ihc_to_he": np.asarray(registration.matrix).tolist(),
        },
    }
    if not registration.ok:
        record["comparison"] = None
        record["why_not_compared"] = f"registration failed: {registration.reason}"
        return record
    he_summary = json.loads(he.summary_path.read_text())
    ihc_summary = json.loads(ihc.summary_path.read_text())
    ihc_reasons = ihc_review_reasons(ihc_summary)
    he_positive, tile_boxes, tile_entropy = _read_he(he.geojson_path)
    cells = registration.apply(_read_ihc_positive_cells(ihc.geojson_path))
    # Compared where both sections lie: the H&E image and the IHC image's outline mapped onto it.
    corners = registration.apply(np.array([[0, 0], [ihc_size[0], 0], [ihc_size[0], ihc_size[1]], [0, ihc_size[1]]]))
    compared = box(0, 0, *he_size).intersection(Polygon(corners))
    comparison = compare_pair(
        he_positive=he_positive,
        ihc_positive_xy_on_he=cells,
        compared_area=compared,
        mpp_he=he_summary["mpp"],
        tile_boxes=tile_boxes,
        tile_entropy=tile_entropy,
        tps_he_predicted=he_summary.get("tps_percent"),
        tps_ihc=ihc_summary.get("tps_percent"),
        cell_radius_um=IHC_CELL_RADIUS_UM,
    )
    if labels_dir is not None:
        area = cells_area(cells, radius_px=IHC_CELL_RADIUS_UM / he_summary["mpp"]).intersection(compared)
        labels = (labels_dir / f"{he.key}{LABELS_SUFFIX}").absolute()  # pairs.json is read from other folders
        labels_dir.mkdir(parents=True, exist_ok=True)
        obj = QuPathObject(
            area,
            "annotation",
            PDL1_IHC_POSITIVE.name,
            {"Area µm^2": comparison.positive_area_ihc_um2, IHC_NEEDS_REVIEW: float(bool(ihc_reasons))},
            name=f"{ihc.name} registered (tissue outlines {registration.error_um:.0f} µm apart)"
            + ("; its IHC analysis needs review" if ihc_reasons else ""),
        )
        write_features(labels, [] if area.is_empty else [to_feature(obj)])
        record["ihc_positive_on_he"] = str(labels)
    record["comparison"] = {
        **asdict(comparison),
        "tps_difference": comparison.tps_difference,
        "uncertainty_higher_where_they_disagree": comparison.uncertainty_higher_where_they_disagree,
    }
    # The case's own reasons: the H&E's results were written before its IHC was scored, so they stay here
    # (pairs.json, the run's table, the report) rather than in the H&E's measurements.
    record["review_reasons"] = comparison.review_reasons() + ihc_reasons
    return record


def ihc_review_reasons(ihc_summary: dict[str, Any]) -> list[dict]:
    """The case's reason when its IHC's own analysis is flagged: the measurement the H&E is set against, and
    the labels its registered area gives, are then in doubt. [] when the IHC is not flagged."""
    if not ihc_summary.get("uncertainty_flag"):
        return []
    # An IHC of several targets (TMA cores) names the target of each reason ("C-4: fewer than 100 tumour cells").
    own = [
        f"{r['target']}: {r.get('reason', '')}" if r.get("target") is not None else r.get("reason", "")
        for r in (ihc_summary.get("details") or {}).get("review_reasons", [])
    ]
    return [
        {
            "reason": "the IHC's own analysis needs review, so it is no sure reference ("
            + ("; ".join(own) or "flagged")
            + ")",
            "value": None,
            "limit": None,
        }
    ]


@dataclass(frozen=True)
class CoreComparison:
    """One TMA core of a case: the H&E's predicted TPS beside the IHC's measured one.

    ``state_he``, ``state_ihc``: ``analysed``, ``missing`` (marked so in that image's grid, never analysed) or
    ``absent`` (no core of that name in its grid). ``compared``: counted in the case's agreement
    (:func:`core_agreement`); a core that is not says why in ``why_not_compared`` and keeps the numbers it has.
    Categories are :func:`inference.tps_category`'s (cut-offs 1 and 50 %), ``insufficient tumour cells`` under
    the minimum. ``review_reasons``: each side's own, led by ``H&E: `` or ``IHC: ``; ``needs_review`` where either
    side is flagged.
    """

    core: str
    state_he: str
    state_ihc: str
    compared: bool
    why_not_compared: str | None
    tps_he_predicted: float | None
    tps_ihc: float | None
    category_he: str | None
    category_ihc: str | None
    tumour_cells_he: int | None
    tumour_cells_ihc: int | None
    categories_agree: bool | None
    needs_review: bool
    review_reasons: tuple[str, ...] = ()

    @property
    def tps_difference(self) -> float | None:
        """H&E-predicted minus IHC-measured TPS, in points; None without both."""
        if self.tps_he_predicted is None or self.tps_ihc is None:
            return None
        return self.tps_he_predicted - self.tps_ihc


def _core_key(name: str) -> str:
    return name.strip().casefold()


def match_cores(
    he_rows: Iterable[TargetRow], ihc_rows: Iterable[TargetRow], *, min_tumour_cells: int = MIN_TUMOUR_NUCLEI
) -> tuple[CoreComparison, ...]:
    """The TMA cores of a case's H&E and IHC (their ``targets`` rows, :func:`bridge.targets.rows_from_summary`)
    matched by name, the grid labels of serial sections dearrayed alike ("A-1"), regardless of capitals and
    surrounding blanks: in the H&E's grid order, then the IHC's cores the H&E lacks. Rows of other targets are
    left out. A name that two cores of one grid carry is not compared: which of them is meant is unknown.

    >>> from bridge.targets import missing_row
    >>> def core(name, tps, cells):
    ...     return TargetRow("x.svs", "1", name, "TMA core", "analysed", "H&E", tps, tps_category(tps), cells)
    >>> cores = match_cores(
    ...     [core("A-1", 30.0, 400), core("A-2", 0.5, 250)],
    ...     [core("a-1 ", 60.0, 500), missing_row("y.svs", "2", "A-2"), core("B-1", 5.0, 90)],
    ... )
    >>> [(c.core, c.compared, c.categories_agree, c.tps_difference) for c in cores]
    [('A-1', True, False, -30.0), ('A-2', False, None, None), ('B-1', False, None, None)]
    >>> print(cores[1].why_not_compared, cores[2].why_not_compared, sep="\\n")
    marked missing in the IHC's grid
    no core of this name in the H&E's grid; 90 tumour cells on the IHC, under 100: its TPS is undefined
    """
    he_cores = [r for r in he_rows if r.target_type == TMA_CORE]
    ihc_cores = [r for r in ihc_rows if r.target_type == TMA_CORE]
    he_count = Counter(_core_key(r.target) for r in he_cores)
    ihc_count = Counter(_core_key(r.target) for r in ihc_cores)
    he_by = {_core_key(r.target): r for r in he_cores}
    ihc_by = {_core_key(r.target): r for r in ihc_cores}
    out = []
    for key in dict.fromkeys(_core_key(r.target) for r in [*he_cores, *ihc_cores]):
        he, ihc = he_by.get(key), ihc_by.get(key)
        name = (he or ihc).target.strip()  # as the H&E spells it
        sides = (("H&E", he_count[key]), ("IHC", ihc_count[key]))
        twice = [f"{n} cores of the {side}'s grid" for side, n in sides if n > 1]
        core = compare_core(name, he, ihc, min_tumour_cells=min_tumour_cells)
        if twice:
            core = CoreComparison(
                name,
                core.state_he,
                core.state_ihc,
                compared=False,
                why_not_compared=f"{' and '.join(twice)} are named {name!r}: which to compare is unknown; name "
                "each core of a grid once (QuPath: TMA > Relabel TMA grid)",
                tps_he_predicted=None,
                tps_ihc=None,
                category_he=None,
                category_ihc=None,
                tumour_cells_he=None,
                tumour_cells_ihc=None,
                categories_agree=None,
                needs_review=False,
            )
        out.append(core)
    return tuple(out)


def compare_core(
    name: str, he: TargetRow | None, ihc: TargetRow | None, *, min_tumour_cells: int = MIN_TUMOUR_NUCLEI
) -> CoreComparison:
    """One core's H&E row against its IHC row (None: no core of that name in that image's grid).

    It is compared where both sides were analysed and counted at least ``min_tumour_cells`` tumour cells: under
    that the TPS is undefined (the category ``insufficient tumour cells``), so the core is listed with its numbers
    but not counted in the agreement.

    >>> he = TargetRow("he.svs", "1", "B-2", "TMA core", "analysed", "H&E", 0.5, "<1%", 300, needs_review=False)
    >>> ihc = TargetRow("ihc.svs", "2", "B-2", "TMA core", "analysed", "H-DAB", 0.8, "<1%", 220, 0.9, True,
    ...                 ("out of the model's domain (3.1, limit 2.32)",))
    >>> c = compare_core("B-2", he, ihc)
    >>> c.compared, c.categories_agree, c.needs_review, c.review_reasons
    (True, True, True, ("IHC: out of the model's domain (3.1, limit 2.32)",))
    """
    why = [w for w in (_why_not(he, "H&E", min_tumour_cells), _why_not(ihc, "IHC", min_tumour_cells)) if w]
    category_he, category_ihc = _category(he, min_tumour_cells), _category(ihc, min_tumour_cells)
    reasons = _side_reasons(he, "H&E") + _side_reasons(ihc, "IHC")
    return CoreComparison(
        core=name,
        state_he=ABSENT if he is None else he.state,
        state_ihc=ABSENT if ihc is None else ihc.state,
        compared=not why,
        why_not_compared="; ".join(why) or None,
        tps_he_predicted=None if he is None else he.tps_percent,
        tps_ihc=None if ihc is None else ihc.tps_percent,
        category_he=category_he,
        category_ihc=category_ihc,
        tumour_cells_he=None if he is None else he.tumour_cells,
        tumour_cells_ihc=None if ihc is None else ihc.tumour_cells,
        categories_agree=None if why else category_he == category_ihc,
        needs_review=bool(reasons),
        review_reasons=reasons,
    )


def _why_not(row: TargetRow | None, side: str, min_tumour_cells: int) -> str | None:
    """Why one side of a core keeps it out of the agreement; None where that side counts."""
    if row is None:
        return f"no core of this name in the {side}'s grid"
    if row.state == MISSING:
        return f"marked missing in the {side}'s grid"
    if row.tumour_cells is None:
        return f"no TPS on the {side}: its nuclei were not counted (a run without the nuclei model)"
    if row.tps_percent is None:
        return f"no tumour cells found on the {side}"
    if row.tumour_cells < min_tumour_cells:
        return f"{row.tumour_cells} tumour cells on the {side}, under {min_tumour_cells}: its TPS is undefined"
    return None


def _category(row: TargetRow | None, min_tumour_cells: int) -> str | None:
    """The TPS category of one side by the cut-offs, or the row's own (``insufficient tumour cells``) under the
    minimum; None without a TPS."""
    if row is None or row.tps_percent is None or row.tumour_cells is None:
        return None
    return tps_category(row.tps_percent) if row.tumour_cells >= min_tumour_cells else row.tps_category


def _side_reasons(row: TargetRow | None, side: str) -> tuple[str, ...]:
    if row is None or not row.needs_review:
        return ()
    return tuple(f"{side}: {reason}" for reason in row.review_reasons or ("flagged",))


def cohen_kappa(first: Sequence[str], second: Sequence[str], *, categories: Sequence[str]) -> float | None:
    """Cohen's kappa of two ratings of the same items into ``categories``: (p_o - p_e) / (1 - p_e), p_o the share
    of items they agree on, p_e the share expected by chance from each rating's own category frequencies.
    Unweighted: a <1 % core called >=50 % counts as one called 1-49 %. None without items, or where p_e is 1
    (both put every item into one and the same category: kappa is 0/0).

    >>> he = ["<1%"] * 4 + ["1-49%"] * 4 + [">=50%"] * 2
    >>> ihc = ["<1%", "<1%", "<1%", "1-49%", "<1%", "1-49%", "1-49%", "1-49%", ">=50%", ">=50%"]
    >>> round(cohen_kappa(he, ihc, categories=TPS_CATEGORIES), 6)  # p_o 0.8, p_e 0.36: 0.44 / 0.64
    0.6875
    >>> cohen_kappa(["1-49%"] * 3, ["1-49%"] * 3, categories=TPS_CATEGORIES) is None
    True
    """
    if len(first) != len(second):
        raise ValueError(f"expected two ratings of the same items, got {len(first)} and {len(second)} of them")
    index = {c: i for i, c in enumerate(categories)}
    unknown = sorted({c for c in (*first, *second) if c not in index})
    if unknown:
        raise ValueError(f"expected categories among {list(categories)}, got {unknown}")
    n = len(first)
    if n == 0:
        return None
    table = np.zeros((len(categories), len(categories)), np.int64)
    np.add.at(table, ([index[c] for c in first], [index[c] for c in second]), 1)
    p_o = np.trace(table) / n
    p_e = float(table.sum(axis=1) @ table.sum(axis=0)) / n**2  # integer sums: exactly 1 where it is 0/0
    if p_e == 1.0:
        return None
    return float((p_o - p_e) / (1.0 - p_e))


def spearman_rho(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rank correlation of two (N,) arrays, tied values given their mean rank; None for fewer than 3
    pairs or where either array is constant (its ranks all tie: no order to correlate).

    >>> x, y = np.array([0.0, 0.0, 10.0, 20.0, 30.0]), np.array([0.0, 5.0, 5.0, 40.0, 60.0])
    >>> round(spearman_rho(x, y), 6)  # ranks 1.5 1.5 3 4 5 and 1 2.5 2.5 4 5: 8.75 / 9.5
    0.921053
    >>> spearman_rho(np.array([1.0, 2.0, 3.0]), np.array([5.0, 5.0, 5.0])) is None
    True
    """
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(spearman(x, y))


def pearson_r(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's correlation of two (N,) arrays; None for fewer than 3 pairs or where either is constant.

    >>> round(pearson_r(np.array([0.0, 10.0, 20.0]), np.array([5.0, 10.0, 30.0])), 6)  # 250 / sqrt(200 * 350)
    0.944911
    """
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


@dataclass(frozen=True)
class CoreAgreement:
    """A TMA case's agreement over its compared cores (:class:`CoreComparison`): H&E-predicted against
    IHC-measured TPS. Fractions are 0-1, differences in TPS points (H&E minus IHC). A statistic that cannot be
    computed is None and ``notes`` says why."""

    cores: int  # listed: every core of either grid
    compared: int
    not_compared: int
    categories_agree: int
    category_agreement: float | None
    cohen_kappa: float | None  # over TPS_CATEGORIES, unweighted
    mean_abs_tps_difference: float | None
    mean_tps_difference: float | None  # the H&E's bias
    spearman_rho: float | None
    pearson_r: float | None
    compared_needing_review: int  # either side flagged; counted, as their TPS is defined
    min_cores_for_statistics: int
    notes: tuple[str, ...] = ()


def core_agreement(cores: Sequence[CoreComparison], *, min_cores: int = MIN_CORES_FOR_STATISTICS) -> CoreAgreement:
    """The agreement over the compared cores: category agreement (count and share), mean absolute and mean TPS
    difference, and, from ``min_cores`` compared cores on, Cohen's kappa over the three categories and the
    Spearman and Pearson correlations of the TPS.

    >>> def core(he, ihc):
    ...     a, b = tps_category(he), tps_category(ihc)
    ...     return CoreComparison("c", "analysed", "analysed", True, None, he, ihc, a, b, 500, 500, a == b, False)
    >>> agreement = core_agreement([core(40.0, 30.0), core(0.5, 1.5), core(60.0, 70.0)])
    >>> agreement.categories_agree, round(agreement.category_agreement, 3), agreement.mean_abs_tps_difference
    (2, 0.667, 7.0)
    >>> agreement.cohen_kappa is None, agreement.notes
    (True, ('3 cores compared: kappa and the correlations need at least 5',))
    """
    compared = [c for c in cores if c.compared]
    n = len(compared)
    he = np.array([c.tps_he_predicted for c in compared], np.float64)
    ihc = np.array([c.tps_ihc for c in compared], np.float64)
    agree = sum(bool(c.categories_agree) for c in compared)
    kappa = rho = r = None
    notes = []
    if n == 0:
        in_both = any(c.state_he != ABSENT and c.state_ihc != ABSENT for c in cores)
        notes.append(
            "no core compared: each core's why_not_compared says why"
            if in_both or not cores
            else "no core compared: no core name is in both grids; dearray both sections with the same labels "
            "(QuPath: TMA > Relabel TMA grid)"
        )
    elif n < min_cores:
        cores_word = "core" if n == 1 else "cores"
        notes.append(f"{n} {cores_word} compared: kappa and the correlations need at least {min_cores}")
    else:
        kappa = cohen_kappa([c.category_he for c in compared], [c.category_ihc for c in compared],
                            categories=TPS_CATEGORIES)  # fmt: skip
        if kappa is None:
            notes.append(
                f"kappa is undefined: every compared core is {compared[0].category_he} on both images, so chance "
                "alone agrees on all of them"
            )
        rho, r = spearman_rho(he, ihc), pearson_r(he, ihc)
        if rho is None:
            notes.append("the correlations are undefined: the TPS is the same in every compared core of one image")
    difference = he - ihc
    return CoreAgreement(
        cores=len(cores),
        compared=n,
        not_compared=len(cores) - n,
        categories_agree=agree,
        category_agreement=agree / n if n else None,
        cohen_kappa=kappa,
        mean_abs_tps_difference=float(np.abs(difference).mean()) if n else None,
        mean_tps_difference=float(difference.mean()) if n else None,
        spearman_rho=rho,
        pearson_r=r,
        compared_needing_review=sum(c.needs_review for c in compared),
        min_cores_for_statistics=min_cores,
        notes=tuple(notes),
    )


def core_agreement_text(summary: dict[str, Any]) -> str:
    """A case's ``cores_summary`` (pairs.json) in one line, for the run's case table.

    >>> core_agreement_text({"cores": 9, "compared": 7, "not_compared": 2, "categories_agree": 6,
    ...     "category_agreement": 6 / 7, "cohen_kappa": 0.7, "mean_abs_tps_difference": 6.25,
    ...     "spearman_rho": 0.81, "compared_needing_review": 1, "notes": []})
    '7 of 9 cores compared: 6 agree in category (86%), kappa 0.70, Spearman 0.81, mean |TPS diff| 6.2; 1 flagged'
    >>> core_agreement_text({"cores": 4, "compared": 0, "not_compared": 4, "notes": ["no core compared: ..."]})
    '0 of 4 cores compared: no core compared: ...'
    """
    n, listed = summary.get("compared", 0), summary.get("cores", 0)
    head = f"{n} of {listed} cores compared"
    if not n:
        return f"{head}: {'; '.join(summary.get('notes') or ()) or 'none'}"
    parts = [f"{summary['categories_agree']} agree in category ({100 * summary['category_agreement']:.0f}%)"]
    if summary.get("cohen_kappa") is not None:
        parts.append(f"kappa {summary['cohen_kappa']:.2f}")
    if summary.get("spearman_rho") is not None:
        parts.append(f"Spearman {summary['spearman_rho']:.2f}")
    parts.append(f"mean |TPS diff| {summary['mean_abs_tps_difference']:.1f}")  # points
    flagged = summary.get("compared_needing_review") or 0
    return f"{head}: {', '.join(parts)}" + (f"; {flagged} flagged" if flagged else "")


def _analysed_as(rows: list[TargetRow]) -> str:
    """How an image without TMA-core targets was analysed, for why its case's cores are not compared."""
    if not rows:
        return f"by an earlier version, whose summary lists no targets: {RUN_IMAGE_AGAIN}"
    if any(r.target_type == "annotation" for r in rows):
        return "by its annotations (target annotations come before the TMA cores)"
    return (
        "whole: its TMA grid, if it has one, was not seen (`pdl1 run` without QuPath analyses whole images, and so "
        "did --engine ray through QuPath before 2026-12-06); run it through QuPath or pdl1_analyze.groovy"
    )


def case_cores(
    he_summary: dict[str, Any], ihc_summary: dict[str, Any], *, he_name: str, ihc_name: str
) -> tuple[dict[str, Any], tuple[CoreComparison, ...]]:
    """The TMA-core part of a case's record in ``pairs.json`` and its cores: ``cores`` (one per core of either
    grid) and ``cores_summary`` (:class:`CoreAgreement`) where both images were analysed core by core,
    ``why_cores_not_compared`` where only one was, nothing where neither was."""
    he_rows, ihc_rows = rows_from_summary(he_summary), rows_from_summary(ihc_summary)
    he_tma = any(r.target_type == TMA_CORE for r in he_rows)
    ihc_tma = any(r.target_type == TMA_CORE for r in ihc_rows)
    if not he_tma and not ihc_tma:
        return {}, ()
    if not (he_tma and ihc_tma):
        cored, other, rows = (
            (f"H&E ({he_name})", ihc_name, ihc_rows) if he_tma else (f"IHC ({ihc_name})", he_name, he_rows)
        )
        why = f"only the {cored} was analysed core by core; {other} was analysed {_analysed_as(rows)}"
        return {"why_cores_not_compared": why}, ()
    cores = match_cores(he_rows, ihc_rows)
    agreement = core_agreement(cores)
    record = {
        "cores": [
            {**asdict(c), "review_reasons": list(c.review_reasons), "tps_difference": c.tps_difference} for c in cores
        ],
        "cores_summary": {**asdict(agreement), "notes": list(agreement.notes)},
    }
    return record, cores


CORE_COLUMNS = (
    "case",
    "he_image",
    "ihc_image",
    "core",
    "compared",
    "why_not_compared",
    "state_he",
    "state_ihc",
    "tps_he_predicted",
    "tps_ihc",
    "tps_difference",
    "category_he",
    "category_ihc",
    "categories_agree",
    "tumour_cells_he",
    "tumour_cells_ihc",
    "needs_review",
    "review_reasons",
)


def write_core_table(path: Path, cases: Iterable[tuple[str, CaseImage, CaseImage, Sequence[CoreComparison]]]) -> Path:
    """Write ``pairs_cores.csv``: a row per TMA core of every case compared core by core, atomically (a reader sees
    the old table or the new one). Numbers as ``targets.csv`` has them (TPS to one decimal, flags 1/0)."""
    with replace_atomically(path, newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CORE_COLUMNS)
        for case, he, ihc, cores in cases:
            for core in cores:
                values = {
                    "case": case,
                    "he_image": he.name,
                    "ihc_image": ihc.name,
                    "tps_difference": core.tps_difference,
                }
                writer.writerow(
                    [
                        csv_cell(
                            values[c] if c in values else getattr(core, c), tps=c in ("tps_he_predicted", "tps_ihc")
                        )
                        for c in CORE_COLUMNS
                    ]
                )
    return path


def _cores_of_case(he: CaseImage, ihc: CaseImage) -> tuple[dict[str, Any], tuple[CoreComparison, ...]]:
    """:func:`case_cores` from the two images' summaries; a summary that does not read says so in the record."""
    try:
        he_summary = json.loads(he.summary_path.read_text(encoding="utf-8"))
        ihc_summary = json.loads(ihc.summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # changed since the run wrote it
        return {"why_cores_not_compared": f"a summary does not read: {err}"}, ()
    try:
        return case_cores(he_summary, ihc_summary, he_name=he.name, ihc_name=ihc.name)
    except (ValueError, TypeError, AttributeError) as err:  # its targets edited or damaged, as write_targets says
        return {"why_cores_not_compared": f"a summary's targets do not read: {err}"}, ()


def write_pair_comparisons(
    images: list[CaseImage],
    folder: Path,
    *,
    failed: Iterable[FailedImage] = (),
    openslide_only: bool = False,
    case_key: str = CASE_KEY,
) -> Path | None:
    """Pair the run's images by case, compare each pair and write ``folder/pdl1/pairs.json`` (beside the run
    status; ``folder`` is the project folder or a plain-slides run's ``--out``); None without cases, and
    then an earlier run's ``pairs.json`` is removed. ``failed``: the run's images that failed, whose cases
    say so instead of being compared (:func:`pair_cases`); ``case_key``: the entry metadata key of the cases."""
    pairs, problems = pair_cases(images, failed, case_key=case_key)
    path = folder / PDL1_DIR / PAIRS_FILE
    cores_path = folder / PDL1_DIR / CORES_FILE
    labels_dir = folder / PDL1_DIR / PAIRS_DIR
    if not pairs and not problems:
        path.unlink(missing_ok=True)  # an earlier run's cases are not this run's
        cores_path.unlink(missing_ok=True)
        _remove_labels_but(labels_dir, set())
        return None
    records: dict[str, Any] = {case: {"why_not_compared": why} for case, why in problems.items()}
    tma_cases = []
    for case, (he, ihc) in pairs.items():
        try:
            records[case] = compare_case(he, ihc, labels_dir=labels_dir, openslide_only=openslide_only)
        except (Pdl1Error, OSError, ValueError) as err:  # one case's failure leaves the others compared
            log.warning("case %s: not compared: %s", case, err)
            records[case] = {"he": {"image": he.name}, "ihc": {"image": ihc.name}, "why_not_compared": str(err)}
        # Per core from the two summaries alone: also where the whole slides' registration failed.
        cores_record, cores = _cores_of_case(he, ihc)
        records[case].update(cores_record)
        if cores:
            tma_cases.append((case, he, ihc, cores))
    if tma_cases:
        write_core_table(cores_path, tma_cases)
    else:
        cores_path.unlink(missing_ok=True)
    write_json_atomic(path, {"case_key": case_key, "cases": records})
    # pdl1 train --ihc-band-um reads every label file there: one of a case this run did not compare is stale.
    _remove_labels_but(
        labels_dir, {Path(r["ihc_positive_on_he"]).name for r in records.values() if "ihc_positive_on_he" in r}
    )
    return path


def _remove_labels_but(labels_dir: Path, kept: set[str]) -> None:
    """Remove the registered IHC label files of ``labels_dir`` not named in ``kept`` (earlier runs' cases)."""
    for stale in labels_dir.glob(f"*{LABELS_SUFFIX}") if labels_dir.is_dir() else ():
        if stale.name not in kept:
            stale.unlink(missing_ok=True)
