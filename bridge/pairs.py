"""Cases with an H&E and a PD-L1 IHC of the same block: paired, registered and compared after a run.

A case is named by the entry metadata key ``case`` (QuPath: the entry's metadata, e.g. set with
*Project > Edit metadata*); where an entry has none, or for plain slides, by the file name with a
leading or trailing stain word taken off (``B12_HE.svs``, ``B12_PD-L1.svs`` and ``ihc_B12.svs`` are case
``B12``). A case with
exactly one analysed H&E and one analysed IHC is compared: the IHC is registered to the H&E, its
positive tumour cells are mapped onto it, and the H&E's prediction is set against the IHC's
measurement (:func:`inference.compare_pair`). The comparisons go to ``pdl1/pairs.json`` beside the run
status; a case that cannot be compared says why there, also one of whose images the run failed on, and one
whose ``case`` a person stated in an entry's metadata but that found images of one stain only while the run
has the other (the partner's ``case`` misspelt or not set). A case of one stain named by its file names
says nothing: an H&E-only study would otherwise hear of every image.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from shapely.geometry import Polygon, box
from shapely.ops import unary_union

from bridge.classes import INTENSITY_CLASSES, PDL1_IHC_POSITIVE, PDL1_POSITIVE, TUMOR_POSITIVE
from bridge.objects import TILE_NAME
from bridge.project import PDL1_DIR, write_json_atomic
from bridge.qupath_geojson import QuPathObject, read_features, to_feature, write_features
from inference import IHC_CELL_RADIUS_UM, Pdl1Error, cells_area, compare_pair, open_slide, register_slides

log = logging.getLogger(__name__)

CASE_KEY = "case"
PAIRS_FILE = "pairs.json"
PAIRS_DIR = "pairs"  # <folder>/pdl1/pairs/<H&E key>.ihc_positive.geojson: the IHC's positive area on the H&E
# A measurement of the registered IHC area: 1 where the IHC's own analysis needs review (bridge.labels counts it).
IHC_NEEDS_REVIEW = "IHC needs review"
# A stain word leading or trailing a file name: what is left names the case.
_STAIN_WORD = r"(?:h&e|he|hande|ihc|pd-?l1|22c3|sp263|sp142|28-8|dab)"
_STAIN_SUFFIX = re.compile(rf"^(?P<case>.+?)[ _.-]+{_STAIN_WORD}$", re.I)
_STAIN_PREFIX = re.compile(rf"^{_STAIN_WORD}[ _.-]+(?P<case>.+)$", re.I)
_POSITIVE_CELL_CLASSES = frozenset({TUMOR_POSITIVE.name, *(c.name for c in INTENSITY_CLASSES)})


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
    """The case an image belongs to: its metadata's ``key``, else its file name without a stain word.

    >>> case_of("B12_HE.svs", None), case_of("B12 PD-L1.ndpi", None), case_of("slide.svs", None)
    ('B12', 'B12', None)
    >>> case_of("anything.svs", {"case": "C7"})
    'C7'
    """
    stated = case_in_metadata(metadata, key=key)
    if stated is not None:
        return stated
    stem = Path(name).stem
    match = _STAIN_SUFFIX.match(stem) or _STAIN_PREFIX.match(stem)
    return match.group("case") if match else None


def pair_cases(
    images: Iterable[CaseImage], failed: Iterable[FailedImage] = ()
) -> tuple[dict[str, tuple[CaseImage, CaseImage]], dict[str, str]]:
    """Cases with one H&E and one IHC image, and for every case with both stains but not one of each, why it
    is not paired. A case of one stain only (an H&E-only study named ``*_HE``) is no pair and says nothing,
    unless one of its images states the case in its entry metadata (``case_in_metadata``) and the run has images
    of the other stain: a person paired it, so its partner's ``case`` is misspelt or not set, and it says so.
    A case with an analysed image and one in ``failed`` (a corrupt slide: its stain is unknown, so the case's
    pairing is too) is not paired either, and says which image failed and why.

    Case names are compared without surrounding blanks and regardless of capitals: ``B12`` typed as ``b12 `` in
    the IHC's metadata (or ``B12_HE.svs`` beside ``b12_ihc.svs``) is the same case, not two of one stain each,
    which would say nothing. A case is named as its first image (by name) spells it."""
    images = sorted(images, key=lambda i: i.name)
    stains = {image.stain for image in images}  # also of images without a case: an IHC named slide7.svs
    by_case: dict[str, list[CaseImage]] = {}
    for image in images:
        if image.case is not None and image.case.strip():
            by_case.setdefault(image.case.strip().casefold(), []).append(image)
    failed_by_case: dict[str, list[FailedImage]] = {}
    for image in sorted(failed, key=lambda i: i.name):
        if image.case is not None and image.case.strip():
            failed_by_case.setdefault(image.case.strip().casefold(), []).append(image)
    pairs: dict[str, tuple[CaseImage, CaseImage]] = {}
    problems: dict[str, str] = {}
    for members in sorted(by_case.values(), key=lambda m: m[0].case.strip()):
        case = members[0].case.strip()
        he = [m for m in members if m.stain == "H&E"]
        ihc = [m for m in members if m.stain == "H-DAB"]
        lost = failed_by_case.get(case.casefold())
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
            problems[case] = (
                f"case {case!r} has {len(he)} H&E and {len(ihc)} PD-L1 IHC images analysed ({names}); a pair is one "
                f"of each: give each case its own '{CASE_KEY}' metadata value"
            )
        elif any(m.case_in_metadata for m in members) and len(stains) > 1:
            problems[case] = _stated_without_partner(case, members)
    return pairs, problems


def _stated_without_partner(case: str, members: list[CaseImage]) -> str:
    """Why a case a person stated in the metadata, whose images are all of one stain, is not compared."""
    if members[0].stain == "H&E":
        an, stain, other, partner = "an", "H&E", "PD-L1 IHC", "IHC"
    else:
        an, stain, other, partner = "a", "PD-L1 IHC", "H&E", "H&E"
    stated = next(m for m in members if m.case_in_metadata).case.strip()
    names = ", ".join(m.name for m in members)
    which = f"only {an} {stain} ({names}) carries" if len(members) == 1 else f"only {stain} images ({names}) carry"
    return (
        f"case {case!r} is not compared: {which} {CASE_KEY}={stated} (entry metadata); no {other} entry does: "
        f"check the {partner}'s `{CASE_KEY}` value in QuPath (Project > Edit metadata)"
    )


def _read_he(geojson: Path) -> tuple[Any, np.ndarray, np.ndarray]:
    regions, boxes, entropy = [], [], []
    for obj in read_features(geojson):
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
        labels = labels_dir / f"{he.key}.ihc_positive.geojson"
        labels_dir.mkdir(parents=True, exist_ok=True)
        obj = QuPathObject(
            area,
            "annotation",
            PDL1_IHC_POSITIVE.name,
            {"Area µm^2": comparison.positive_area_ihc_um2, IHC_NEEDS_REVIEW: float(bool(ihc_reasons))},
            name=f"{ihc.name} registered (est. error {registration.error_um:.0f} µm)"
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
    own = [r.get("reason", "") for r in (ihc_summary.get("details") or {}).get("review_reasons", [])]
    return [
        {
            "reason": "the IHC's own analysis needs review, so it is no sure reference ("
            + ("; ".join(own) or "flagged")
            + ")",
            "value": None,
            "limit": None,
        }
    ]


def write_pair_comparisons(
    images: list[CaseImage], folder: Path, *, failed: Iterable[FailedImage] = (), openslide_only: bool = False
) -> Path | None:
    """Pair the run's images by case, compare each pair and write ``folder/pdl1/pairs.json`` (beside the run
    status; ``folder`` is the project folder or a plain-slides run's ``--out``); None without cases, and
    then an earlier run's ``pairs.json`` is removed. ``failed``: the run's images that failed, whose cases
    say so instead of being compared (:func:`pair_cases`)."""
    pairs, problems = pair_cases(images, failed)
    path = folder / PDL1_DIR / PAIRS_FILE
    if not pairs and not problems:
        path.unlink(missing_ok=True)  # an earlier run's cases are not this run's
        return None
    records: dict[str, Any] = {case: {"why_not_compared": why} for case, why in problems.items()}
    for case, (he, ihc) in pairs.items():
        try:
            labels_dir = folder / PDL1_DIR / PAIRS_DIR
            records[case] = compare_case(he, ihc, labels_dir=labels_dir, openslide_only=openslide_only)
        except (Pdl1Error, OSError, ValueError) as err:  # one case's failure leaves the others compared
            log.warning("case %s: not compared: %s", case, err)
            records[case] = {"he": {"image": he.name}, "ihc": {"image": ihc.name}, "why_not_compared": str(err)}
    write_json_atomic(path, {"case_key": CASE_KEY, "cases": records})
    return path
