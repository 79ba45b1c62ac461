"""``pdl1 review-queue``: entries and regions ranked by what labelling them would teach the model most.

Built from what an earlier ``pdl1 run`` left under ``<project>/pdl1/<entry>/`` (``summary.json`` and
``objects.geojson``), or from the records ``pdl1_analyze.groovy`` saved there of its analyses in QuPath
(``qupath_analyses/``, :mod:`bridge.record_summary`: each record one target of the entry; where an entry has both,
the newer is used and its reasons say which), so it works with and without QuPath; nothing is analysed again. An
entry ranked from records has, as regions, its targets' SUA candidates and positive regions' boxes (a record keeps no
uncertainty tiles nor region uncertainty), and its rank goes into QuPath's metadata where QuPath is here, and into
its ``summary.json`` where an older run left one, else into :data:`REVIEW_FILE` beside its records, from which
``pdl1_import_results.groovy`` sets it in QuPath (0.7 too, which paquo does not reach).

Entry score (higher: label first)::

    score = (U + S + D + R) * (1 - L)

* ``U``: the entry's mean mutual information over its analysed tissue (on a PD-L1 IHC the nuclei model's
  mean entropy) divided by the highest such mean among the project's entries of its stain (0 to 1).
  Mutual information is the ensemble's epistemic uncertainty (BALD): the part labels can remove.
* ``S``: the SUA candidate area in % of the analysed area over the model's review limit, at most 2:
  possible false negatives, which a label settles.
* ``D``: the larger of out-of-domain score / its limit and stain distance / its limit, at most 2
  (0 where the domain guard did not measure): a slide unlike the training slides teaches most.
* ``R``: 0.5 per review reason not already counted in ``S`` or ``D`` (segmentation or nuclei
  uncertainty, a stain the colour contradicts, too few tumour cells).
* ``L``: the share of the analysed area already labelled (``Training region``, ``PD-L1 positive`` /
  ``PD-L1 negative`` areas a person drew, less ``Ignore*``): what is labelled teaches nothing new.

Region score, within an entry: the region's mean mutual information over the highest among all the
project's regions (0 to 1), plus 0.5 for a SUA candidate (it crossed the calibrated SUA threshold: a
likely false negative). Regions are SUA candidates, predicted positive regions and uncertainty tiles
(at least half tissue); a region whose box is at least half inside labelled area is marked and ranked after every
unlabelled one; a region whose box is mostly covered by a better-ranked one's is left out.

An entry of several analysed targets (TMA cores, annotations) is scored from its targets' rows in its summary
(:func:`target_score_parts` says why so): ``U`` over all its analysed tissue, ``S``, ``D`` and ``R`` the worst
target's; its reasons name the targets that set them, and its regions are every target's
(:data:`bridge.targets.TARGET_REGIONS_FILE`), each named by its target.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import shapely
from shapely.geometry.base import BaseGeometry

from bridge.analysis_record import QUPATH_ANALYSES, entry_records
from bridge.atomic import replace_atomically
from bridge.classes import IGNORE, PDL1_FN_CANDIDATE, PDL1_NEGATIVE, PDL1_POSITIVE, TRAINING_REGION
from bridge.objects import is_own_object
from bridge.project import (
    PDL1_DIR,
    ProjectEntry,
    ProjectError,
    ProjectInfo,
    RunStatus,
    annotation_class_counts,
    find_project_file,
    not_a_folder,
    read_project,
    review_reason_text,
)
from bridge.qupath_geojson import (
    DETECTION_LINE_TYPES,
    READ_ONLY_OBJECT_TYPES,
    QuPathObject,
    keep_detections_of,
    not_detections,
    read_features,
)
from bridge.record_summary import RUN, SCRIPT, RecordsSummary, entry_summary_from_records, newer_source
from bridge.run_lock import remove_orphan_parts, run_lock
from bridge.targets import (
    RUN_IMAGE_AGAIN,
    TARGET_REGIONS_FILE,
    TMA_CORE,
    TargetRow,
    analysed_targets,
    domain_distance,
    rows_from_summary,
    run_target_regions,
    spreadsheet_row,
    target_labels,
    targets_review_reasons,
)
from inference import Pdl1Error, __version__, is_finite_number

log = logging.getLogger(__name__)

RANK_KEY = "PD-L1 review rank"
SCORE_KEY = "PD-L1 review score"
QUEUE_FILE = "review_queue.csv"
PROVENANCE_FILE = "review_queue.json"
# In <project>/pdl1/ while review-queue renames its files: the review metadata of the summaries (and, through QuPath,
# project.qpproj) may be part new, part old. pdl1_import_results.groovy holds the same name.
UNFINISHED_FILE = "review_queue.unfinished"
# In <project>/pdl1/<entry ID>/ of an entry analysed in QuPath alone (records, no summary.json): its review metadata,
# for pdl1_import_results.groovy (QuPath 0.7, which paquo does not reach). The script holds the same name.
REVIEW_FILE = "review.json"

# Formula constants (module docstring); recorded in the provenance file.
CAP = 2.0  # S and D: one extreme number must not bury every other reason
REASON_WEIGHT = 0.5
CANDIDATE_BONUS = 0.5
MIN_TILE_TISSUE = 0.5
LABELLED_SHARE = 0.5  # a region at least this much inside labelled area counts as labelled
OVERLAP_SHARE = 0.5  # a region this much covered by a better-ranked one is left out
_COUNTED_ELSEWHERE = ("SUA candidate area", "out of the training domain")  # reasons S and D already weigh

COLUMNS = (
    "rank",
    "region_rank",
    "entry_id",
    "image",
    "kind",
    "object_type",
    "score",
    "x_px",
    "y_px",
    "width_px",
    "height_px",
    "centre_x_um",
    "centre_y_um",
    "area_um2",
    "mutual_information",
    "labelled",
    "reasons",
)


class ReviewQueueError(ProjectError):
    """No results to rank, or results that do not read."""


@dataclass(frozen=True)
class ScoreParts:
    """The terms of an entry's score (module docstring)."""

    uncertainty: float  # U
    sua: float  # S
    domain: float  # D
    reasons: float  # R
    labelled_share: float  # L

    @property
    def score(self) -> float:
        return (self.uncertainty + self.sua + self.domain + self.reasons) * (1 - self.labelled_share)


@dataclass(frozen=True)
class RegionItem:
    """One place in an image to look at: level-0 px box, its score and why."""

    kind: str  # "SUA candidate", "positive region" or "uncertainty tile"
    object_type: str  # the QuPath object it is: annotation or tile
    bounds_px: tuple[float, float, float, float]  # x, y, width, height at level 0
    area_um2: float
    mutual_information: float | None
    score: float
    labelled: bool
    why: str
    target: str | None = None  # of an entry of several targets: the one it lies in ("core C-4"), which ``why`` leads


@dataclass(frozen=True)
class EntryItem:
    entry_id: str
    image: str
    stain: str
    mpp: float
    score: float
    parts: ScoreParts
    mean_uncertainty: float | None
    analysed_area_um2: float
    reasons: tuple[str, ...]
    regions: tuple[RegionItem, ...]
    summary_path: Path | None  # where the rank goes beside QuPath (None: no summary.json, only records)
    run_id: str | None
    results_from: str = RUN  # bridge.record_summary.newer_source's text


@dataclass(frozen=True)
class ReviewQueue:
    """The ranked entries (best first), the entries without results and why, and what was written."""

    entries: tuple[EntryItem, ...]
    not_ranked: tuple[tuple[str, str, str], ...]  # (entry ID, image name, why)
    csv_path: Path
    metadata_written_to: str  # "QuPath project", or which sidecars and how QuPath gets them from there


def _ratio(value: Any, limit: Any) -> float:
    if not is_finite_number(value) or not is_finite_number(limit) or float(limit) <= 0:
        return 0.0
    return min(max(float(value), 0.0) / float(limit), CAP)


def entry_uncertainty(summary: dict) -> float | None:
    """The number ``U`` is made of: mean mutual information (H&E) or mean nuclei entropy (IHC); of an entry of several
    analysed targets, their means weighted by their analysed areas (:func:`scored_targets`)."""
    key = "nuclei_entropy_mean" if summary.get("stain") == "H-DAB" else "mutual_information_mean"
    targets = scored_targets(summary)
    if targets is not None:
        weighted = [(getattr(t, key), t.analysed_area_um2) for t, _ in targets if getattr(t, key) is not None]
        total = sum(area for _, area in weighted)
        return sum(value * area for value, area in weighted) / total if total > 0 else None
    value = (summary.get("details") or {}).get(key)
    return float(value) if is_finite_number(value) else None


def _target_rows(summary: dict) -> list[TargetRow]:
    """The summary's target rows; none where they do not read (:func:`build_queue` says so)."""
    try:
        return rows_from_summary(summary)
    except (ValueError, TypeError, AttributeError):
        return []


def _analysed_targets(summary: dict) -> list[tuple[TargetRow, str]]:
    """The analysed targets of a summary with their names (:func:`bridge.targets.target_labels`)."""
    return analysed_targets(_target_rows(summary))


def scored_targets(summary: dict) -> list[tuple[TargetRow, str]] | None:
    """The analysed targets an entry is scored from, with their names: where several were analysed and each row
    carries the numbers the terms need (a summary written before they were kept has none: scored by its ``details``,
    the first target's, and :func:`build_queue` says so); None otherwise."""
    analysed = _analysed_targets(summary)
    if len(analysed) < 2 or any(t.analysed_area_um2 is None for t, _ in analysed):
        return None
    return analysed


def _who(row: TargetRow, label: str) -> str:
    """A target as the queue's reasons name it: "core C-4", "Tumor #2"."""
    return f"core {label}" if row.target_type == TMA_CORE else label


def score_parts(summary: dict, *, reference: float | None, labelled_share: float) -> ScoreParts:
    """The score's terms for one summary; ``reference``: the highest entry uncertainty of its stain.

    >>> s = {"analysed_area_um2": 1000.0, "details": {"mutual_information_mean": 0.02,
    ...      "candidate_area_um2": 30.0, "review_rule": {"review_candidate_area_pct": 1.0},
    ...      "review_reasons": [{"reason": "SUA candidate area %", "value": 3.0, "limit": 1.0},
    ...                         {"reason": "segmentation uncertainty", "value": 0.3, "limit": 0.2}]}}
    >>> p = score_parts(s, reference=0.04, labelled_share=0.25)
    >>> (p.uncertainty, p.sua, p.domain, p.reasons, round(p.score, 3))
    (0.5, 2.0, 0.0, 0.5, 2.25)
    """
    details = summary.get("details") or {}
    u = entry_uncertainty(summary)
    uncertainty = u / reference if u is not None and reference else 0.0
    analysed = summary.get("analysed_area_um2")
    candidate_pct = (
        100 * float(details.get("candidate_area_um2") or 0.0) / float(analysed)
        if is_finite_number(analysed) and analysed > 0
        else 0.0
    )
    sua = _ratio(candidate_pct, (details.get("review_rule") or {}).get("review_candidate_area_pct"))
    # The report's reading of how far the image lies (bridge.targets.domain_distance), within [0, CAP].
    domain = min(max(domain_distance(details.get("domain")) or 0.0, 0.0), CAP)
    others = [
        r for r in details.get("review_reasons", []) if not str(r.get("reason", "")).startswith(_COUNTED_ELSEWHERE)
    ]
    return ScoreParts(uncertainty, sua, domain, REASON_WEIGHT * len(others), min(max(labelled_share, 0.0), 1.0))


def target_score_parts(
    targets: Sequence[tuple[TargetRow, str]],
    *,
    uncertainty: float | None,
    reference: float | None,
    labelled_share: float,
) -> tuple[ScoreParts, tuple[str, ...]]:
    """The score's terms of an entry of several analysed targets (TMA cores, annotations), and the reasons naming
    the targets that set ``S`` and ``D``; ``uncertainty``: :func:`entry_uncertainty`.

    ``U`` is the mean over all the analysed tissue (the targets' means weighted by their areas), as a whole slide's
    is, so an image of 40 small cores does not outrank slides by the noisiest of its many small means. ``S``, ``D``
    and ``R`` are the worst target's: each core is tested against the review limits on its own (its flag, its
    domain), and one out-of-domain core, or one with a large SUA candidate area, among 40 fine ones is the one to
    label (their mean would hide it); ``R`` counts the reasons of the target with the most, so a grid of many cores
    is not ranked by their number.

    >>> from bridge.targets import missing_row
    >>> a = replace(missing_row("t.svs", "1", "A-1"), state="analysed", analysed_area_um2=100.0,
    ...             sua_candidate_area_pct=0.0, sua_area_limit_pct=2.0, out_of_domain_score=1.0,
    ...             out_of_domain_limit=2.0)
    >>> c = replace(a, target="C-4", sua_candidate_area_pct=3.0, out_of_domain_score=3.1, out_of_domain_limit=2.6,
    ...             review_reasons=("fewer than 100 tumour cells (40, limit 100)",))
    >>> parts, why = target_score_parts([(a, "A-1"), (c, "C-4")], uncertainty=0.01, reference=0.02,
    ...                                 labelled_share=0.0)
    >>> (parts.uncertainty, parts.sua, round(parts.domain, 3), parts.reasons)
    (0.5, 1.5, 1.192, 0.5)
    >>> why
    ('core C-4: SUA candidate area 3% / limit 2%', 'core C-4: out of domain 3.1 / 2.6')
    """
    sua = [(_ratio(t.sua_candidate_area_pct, t.sua_area_limit_pct), t, label) for t, label in targets]
    domain = [
        (
            max(
                (_ratio(t.out_of_domain_score, t.out_of_domain_limit), "feature"),
                (_ratio(t.stain_distance_deg, t.stain_limit_deg), "stain"),
            ),
            t,
            label,
        )
        for t, label in targets
    ]
    why = []
    s_value, t, label = max(sua, key=lambda item: item[0])  # the first of equals: the grid's order
    if s_value > 0:
        why.append(
            f"{_who(t, label)}: SUA candidate area {t.sua_candidate_area_pct:.3g}% / limit {t.sua_area_limit_pct:.3g}%"
        )
    (d_value, which), t, label = max(domain, key=lambda item: item[0][0])
    if d_value > 0 and which == "feature":
        why.append(f"{_who(t, label)}: out of domain {t.out_of_domain_score:.3g} / {t.out_of_domain_limit:.3g}")
    elif d_value > 0:
        why.append(f"{_who(t, label)}: stain distance {t.stain_distance_deg:.3g}° / {t.stain_limit_deg:.3g}°")
    others = max(sum(not reason.startswith(_COUNTED_ELSEWHERE) for reason in t.review_reasons) for t, _ in targets)
    parts = ScoreParts(
        uncertainty / reference if uncertainty is not None and reference else 0.0,
        s_value,
        d_value,
        REASON_WEIGHT * others,
        min(max(labelled_share, 0.0), 1.0),
    )
    return parts, tuple(why)


_LABEL_AREA_CLASSES = (TRAINING_REGION.name, PDL1_POSITIVE.name, PDL1_NEGATIVE.name)


def _is_ignore(cls: str | None) -> bool:
    return cls is not None and cls.startswith(IGNORE.name.rstrip("*"))


def _labels_area(cls: str | None) -> bool:
    return cls in _LABEL_AREA_CLASSES or _is_ignore(cls)


# ``keep`` for an export read for labelled_area: everything but the detections and cells of other classes (a slide's
# cells, most of the file, are not made objects).
_may_label_area = keep_detections_of(_labels_area)


def _may_label_area_in_qupath(_entry_id: str, obj: QuPathObject) -> bool:
    """``keep`` for :func:`bridge.qupath.read_entry_objects`: what :data:`_may_label_area` keeps of an export, of the
    objects paquo gives (every entry is read at once there)."""
    return obj.object_type not in ("detection", "cell") or _labels_area(obj.classification)


def labelled_area(objects: Iterable[QuPathObject]) -> BaseGeometry:
    """The area a person labelled: training regions and drawn ``PD-L1 positive``/``negative`` areas, less
    ``Ignore*`` (the label classes of :mod:`bridge.labels`); this tool's own results are not labels."""
    keep: list[BaseGeometry] = []
    ignore: list[BaseGeometry] = []
    for obj in objects:
        if obj.geometry.is_empty or obj.geometry.geom_type not in ("Polygon", "MultiPolygon"):
            continue
        if is_own_object(obj.object_type, obj.classification, obj.name, obj.measurements):
            continue
        if obj.object_type in READ_ONLY_OBJECT_TYPES or obj.plane_zt != (0, 0):  # no labels to training either
            continue
        geometry = obj.geometry if obj.geometry.is_valid else shapely.make_valid(obj.geometry)
        if obj.classification in _LABEL_AREA_CLASSES:
            keep.append(geometry)
        elif _is_ignore(obj.classification):
            ignore.append(geometry)
    if not keep:
        return shapely.Polygon()
    area = shapely.union_all(keep)
    return area.difference(shapely.union_all(ignore)) if ignore else area


def candidate_regions(objects: Iterable[QuPathObject], *, mpp: float) -> list[RegionItem]:
    """Every region of a run's results worth a look, not yet scored (:func:`score_regions`) nor ranked."""
    out = []
    for obj in objects:
        m = obj.measurements
        if obj.object_type == "tile":
            if m.get("Tissue fraction", 0.0) < MIN_TILE_TISSUE or "Mutual information" not in m:
                continue
            kind, mi, why = "uncertainty tile", m["Mutual information"], ""
        elif obj.object_type == "annotation" and is_own_object(obj.object_type, obj.classification, obj.name, m):
            mi = m.get("Mutual information mean")
            if obj.classification == PDL1_FN_CANDIDATE.name:
                kind, why = "SUA candidate", f"SUA score {m.get('SUA score', float('nan')):.3f}"
            else:
                kind, why = (
                    "positive region",
                    f"predictive entropy {m.get('Predictive entropy mean', float('nan')):.3f}",
                )
        else:
            continue
        x0, y0, x1, y1 = obj.geometry.bounds
        area = m.get("Area µm^2", obj.geometry.area * mpp * mpp)
        out.append(
            RegionItem(
                kind=kind,
                object_type=obj.object_type,
                bounds_px=(x0, y0, x1 - x0, y1 - y0),
                area_um2=float(area),
                mutual_information=float(mi) if is_finite_number(mi) else None,
                score=0.0,
                labelled=False,
                why=why,
            )
        )
    return out


def score_regions(regions: Sequence[RegionItem], *, reference: float | None) -> list[RegionItem]:
    """Each region scored: mean mutual information over ``reference`` (the project's highest), plus the
    SUA candidate bonus.

    >>> tile = RegionItem("uncertainty tile", "tile", (0, 0, 8, 8), 16.0, 0.02, 0.0, False, "")
    >>> [r.score for r in score_regions([tile, replace(tile, kind="SUA candidate")], reference=0.04)]
    [0.5, 1.0]
    """
    return [
        replace(
            r,
            score=(r.mutual_information / reference if r.mutual_information is not None and reference else 0.0)
            + (CANDIDATE_BONUS if r.kind == "SUA candidate" else 0.0),
        )
        for r in regions
    ]


def rank_regions(
    regions: Sequence[RegionItem], *, labelled: BaseGeometry, limit: int, geometries: dict[int, BaseGeometry]
) -> list[RegionItem]:
    """The best ``limit`` regions: unlabelled first, by score; overlapping duplicates left out."""
    marked = []
    for i, region in enumerate(regions):
        geometry = geometries[i]
        inside = (
            not labelled.is_empty
            and geometry.area > 0
            and geometry.intersection(labelled).area >= LABELLED_SHARE * geometry.area
        )
        marked.append((i, replace(region, labelled=inside)))
    marked.sort(key=lambda item: (item[1].labelled, -item[1].score))
    chosen: list[tuple[int, RegionItem]] = []
    for i, region in marked:
        if len(chosen) >= limit:
            break
        geometry = geometries[i]
        covered = any(
            # Its own area: a large region holding a small better one inside is another place to look, not a copy.
            geometry.intersection(geometries[j]).area >= OVERLAP_SHARE * geometry.area
            for j, _ in chosen
            if geometry.area > 0 and geometries[j].area > 0
        )
        if not covered:
            chosen.append((i, region))
    return [r for _, r in chosen]


def _read_json(path: Path, fix: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ReviewQueueError(f"{path} does not read ({err}); {fix}") from err


def _exported_objects(info_folder: Path, entry_id: str) -> tuple[list[QuPathObject], str]:
    """An entry's own objects, for its labels, from the export of pdl1_export_labels.groovy (none where there is
    none), and where they came from."""
    from bridge.labels import export_path

    exported = export_path(info_folder, entry_id)
    if not exported.is_file():
        return [], ""
    try:
        return list(read_features(exported, keep=_may_label_area)), str(exported)
    except (ValueError, Pdl1Error) as err:
        raise ReviewQueueError(
            f"{exported}: not a QuPath GeoJSON export ({err}); run pdl1_export_labels.groovy again"
        ) from err


def _entry_regions(
    folder: Path, summary: dict, records: RecordsSummary | None, notes: list[str], fix: str
) -> list[RegionItem]:
    """An entry's regions, not yet scored, from its records where it is ranked from them, else from the run's
    files in its ``folder``; why some are missing is added to ``notes``."""
    mpp = float(summary["mpp"])
    if records is not None:
        return _record_regions(records, mpp=mpp)
    targets = _analysed_targets(summary)
    if len(targets) > 1:
        regions, note = _target_regions(folder, summary, targets, mpp=mpp)
        if regions is not None:
            return regions
        notes.append(note)
    geojson = folder / "objects.geojson"
    if not geojson.is_file():
        return []
    try:  # its regions and tiles: the nuclei, most of the file, are passed over unparsed
        objects = list(read_features(geojson, keep=not_detections, unparsed=DETECTION_LINE_TYPES))
    except (ValueError, Pdl1Error) as err:  # the entry is ranked by its summary, without regions; said
        notes.append(f"no regions listed: {geojson} does not read ({err}); {fix}")
        objects = []
    return candidate_regions(objects, mpp=mpp)


# Label classes only a person draws (the run writes PD-L1 positive regions too, so their count says nothing).
_DRAWN_LABEL_CLASSES = (TRAINING_REGION.name, PDL1_NEGATIVE.name)


def _unread_labels(project_folder: Path, entry_id: str) -> str:
    """Where QuPath's summary of an entry counts labels that neither QuPath nor an export let us read, the reason
    that says so ("" otherwise): the entry was ranked as unlabelled, its labelled regions not marked."""
    from bridge.labels import export_path

    counts = annotation_class_counts(project_folder / "data" / entry_id) or {}
    drawn = {c: counts[c] for c in _DRAWN_LABEL_CLASSES if counts.get(c)}
    if not drawn:
        return ""
    listing = ", ".join(f"{c} {n}" for c, n in drawn.items())
    return (
        f"labels not read, ranked as unlabelled: QuPath's summary of the entry counts {listing}, but QuPath is not "
        f"found here and there is no {export_path(project_folder, entry_id)}; run pdl1_export_labels.groovy for "
        "the project (Run for project), then this again"
    )


def _scoring_notes(summary: dict) -> list[str]:
    """What an entry of several analysed targets was scored from when its targets could not all be: its summary's
    ``details``, which are the first target's."""
    try:
        rows_from_summary(summary)
    except (ValueError, TypeError, AttributeError) as err:
        return [f"its per-target results do not read ({err}): scored by its summary's details; run the image again"]
    analysed = _analysed_targets(summary)
    if len(analysed) > 1 and scored_targets(summary) is None:
        return [
            f"scored by {analysed[0][1]} only, the first of its {len(analysed)} targets: its summary was written "
            f"before each target's numbers were kept; {RUN_IMAGE_AGAIN}"
        ]
    return []


def _target_regions(
    folder: Path, summary: dict, targets: list[tuple[TargetRow, str]], *, mpp: float
) -> tuple[list[RegionItem] | None, str]:
    """The regions of every analysed target of an entry (each one's ``why`` led by its name), from
    :data:`bridge.targets.TARGET_REGIONS_FILE`; None and why where that file is missing, of another run (written
    before every target's regions were kept) or does not read: the first target's are then listed, from
    objects.geojson, and the entry is ranked as the others are."""
    found = run_target_regions(folder / TARGET_REGIONS_FILE, summary)
    if found.record is None:
        return None, (
            f"regions of {targets[0][1]} only, the first target: {found.why}; {RUN_IMAGE_AGAIN} to list every target's"
        )
    record = found.record
    kinds = {label: row for row, label in targets}
    out = []
    for label, objects in record.targets:
        who = _who(kinds[label], label) if label in kinds else label
        out += [
            replace(r, why=f"{who}: {r.why}" if r.why else who, target=who) for r in candidate_regions(objects, mpp=mpp)
        ]
    return out, ""


def analysed_entries(info: ProjectInfo) -> list[ProjectEntry]:
    """The entries ``pdl1 run`` left a summary of or ``pdl1_analyze.groovy`` records of its analyses; a project
    without any is refused with what to do."""
    pdl1 = info.folder / PDL1_DIR
    found = [
        e for e in info.entries if (pdl1 / e.entry_id / "summary.json").is_file() or entry_records(pdl1 / e.entry_id)
    ]
    if not found:
        raise ReviewQueueError(
            f"{info.path}: no results of `pdl1 run` to rank (expected {pdl1}/<entry ID>/summary.json) nor records of "
            f"analyses in QuPath ({pdl1}/<entry ID>/{QUPATH_ANALYSES}/*.json, which pdl1_analyze.groovy saves); "
            f"run `pdl1 run {info.folder}` or pdl1_analyze.groovy in QuPath first"
        )
    return found


def _record_regions(records: RecordsSummary, *, mpp: float) -> list[RegionItem]:
    """The regions of an entry ranked from its records: each target's SUA candidates and positive regions' boxes,
    named by their target where there are several, as its reasons name it ("Tumor #2" where names repeat; a record
    keeps no uncertainty tiles nor region uncertainty)."""
    several = len(records.records) > 1
    labels = target_labels([row for row, _ in records.records])
    out = []
    for (row, record), label in zip(records.records, labels, strict=True):
        who = _who(row, label) if several else ""
        items = [("SUA candidate", c.bounds, c.area) for c in record.candidates]
        items += [("positive region", tuple(b), (b[2] - b[0]) * (b[3] - b[1])) for b in record.region_bounds.tolist()]
        for kind, (x0, y0, x1, y1), area_px in items:
            out.append(
                RegionItem(
                    kind=kind,
                    object_type="annotation",
                    bounds_px=(x0, y0, x1 - x0, y1 - y0),
                    area_um2=float(area_px) * mpp * mpp,
                    mutual_information=None,
                    score=0.0,
                    labelled=False,
                    why=who,
                    target=who or None,
                )
            )
    return out


def build_queue(
    project: str | Path,
    *,
    regions_per_entry: int = 5,
    use_qupath: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    on_labels_progress: Callable[[int, int], None] | None = None,
) -> tuple[list[EntryItem], list[tuple[str, str, str]]]:
    """Rank a run project's entries and their regions; nothing is written. Returns (ranked, not ranked).

    ``on_progress(done, total)`` counts the analysed entries whose results are read (summary or records, regions,
    and without QuPath the export of their labels); with ``use_qupath``, ``on_labels_progress(done, total)`` then
    counts the entries whose objects QuPath read for their labels (a slide's cells pass through QuPath one by one).
    """
    qpproj = find_project_file(project)
    info = read_project(qpproj)
    pdl1 = info.folder / PDL1_DIR
    run_status = RunStatus(info.folder)  # checked whole: a damaged status is named with its fix
    status, failed = run_status.images, run_status.failed()
    found = analysed_entries(info)
    not_ranked: list[tuple[str, str, str]] = []
    fix = "run `pdl1 run PROJECT --resume`, which analyses again an image whose results do not read"
    # Each entry's results: its summary.json or its records of pdl1_analyze.groovy, the newer.
    summaries: dict[str, Any] = {}
    from_records: dict[str, RecordsSummary] = {}
    sources: dict[str, str] = {}
    record_notes: dict[str, list[str]] = {}
    summary_paths: dict[str, Path] = {}  # the summary.json of each entry whose summary reads: where its rank goes
    region_lists: dict[str, list[RegionItem]] = {}
    region_notes: dict[str, list[str]] = {}  # why regions are missing, in order
    exported: dict[str, tuple[list[QuPathObject], str]] = {}  # without QuPath: each entry's labels export
    # Each entry's files read in one pass, counted: a project of whole slides read for minutes in silence (a run's
    # objects.geojson holds every nucleus).
    if on_progress is not None:
        on_progress(0, len(found))
    for done, entry in enumerate(found, start=1):
        folder = pdl1 / entry.entry_id
        records = entry_summary_from_records(folder, image=entry.image_name, entry_id=entry.entry_id)
        record_notes[entry.entry_id] = records.problems()
        # A summary that does not read is this entry's problem: named (its records rank it where it has them), and
        # the others ranked, as a report lists it among those left out. It stopped the whole queue.
        summary = None
        if (folder / "summary.json").is_file():
            try:
                summary = _read_json(folder / "summary.json", fix)
                if not isinstance(summary, dict) or not is_finite_number(summary.get("mpp")):
                    raise ReviewQueueError(f"{folder / 'summary.json'} is not a pdl1 summary (no mpp); {fix}")
                summary_paths[entry.entry_id] = folder / "summary.json"
            except ReviewQueueError as err:
                summary = None
                record_notes[entry.entry_id].insert(0, str(err))
        source, sources[entry.entry_id] = newer_source(summary, records)
        if source == SCRIPT:
            summaries[entry.entry_id] = records.summary
            from_records[entry.entry_id] = records
        elif summary is not None:
            summaries[entry.entry_id] = summary
        if entry.entry_id in summaries:
            region_notes[entry.entry_id] = []
            region_lists[entry.entry_id] = _entry_regions(
                folder, summaries[entry.entry_id], from_records.get(entry.entry_id), region_notes[entry.entry_id], fix
            )
            if not use_qupath:
                exported[entry.entry_id] = _exported_objects(info.folder, entry.entry_id)
        if on_progress is not None:
            on_progress(done, len(found))
    for entry in found:  # records that do not read, and no summary: named, not ranked
        if entry.entry_id not in summaries:
            why = "; ".join(record_notes[entry.entry_id]) or "no analysis recorded with its scores"
            not_ranked.append((entry.entry_id, entry.image_name, why))
    found = [e for e in found if e.entry_id in summaries]
    for entry in info.entries:
        if entry not in found and entry.entry_id not in record_notes:
            state = status.get(entry.entry_id, {})
            why = f"failed in the last run: {state.get('error')}" if state.get("state") == "failed" else "not analysed"
            not_ranked.append((entry.entry_id, entry.image_name, why))
    if use_qupath:
        from bridge.qupath import read_entry_objects

        qupath_objects = read_entry_objects(
            info.path, [e.entry_id for e in found], keep=_may_label_area_in_qupath, on_progress=on_labels_progress
        )
        own = {e.entry_id: (qupath_objects.get(e.entry_id, []), "QuPath") for e in found}
    else:
        own = exported
    references: dict[str, float] = {}
    for summary in summaries.values():
        u = entry_uncertainty(summary)
        stain = summary.get("stain", "H&E")
        if u is not None:
            references[stain] = max(references.get(stain, 0.0), u)
    region_reference = max(
        (r.mutual_information for rs in region_lists.values() for r in rs if r.mutual_information is not None),
        default=None,
    )
    ranked = []
    for entry in found:
        summary = summaries[entry.entry_id]
        mpp = float(summary["mpp"])
        objects, label_source = own[entry.entry_id]
        labelled = labelled_area(objects)
        analysed_um2 = float(summary.get("analysed_area_um2") or 0.0)
        share = min(labelled.area * mpp * mpp / analysed_um2, 1.0) if analysed_um2 > 0 else 0.0
        stain = summary.get("stain", "H&E")
        targets = scored_targets(summary)
        if targets is None:
            parts = score_parts(summary, reference=references.get(stain), labelled_share=share)
            reasons = [review_reason_text(r) for r in (summary.get("details") or {}).get("review_reasons", [])]
        else:  # each flagged target's reasons led by its name, as details.review_reasons, the report and the run say
            parts, drivers = target_score_parts(
                targets, uncertainty=entry_uncertainty(summary), reference=references.get(stain), labelled_share=share
            )
            reasons = [*drivers, *targets_review_reasons(_target_rows(summary))]
        reasons += _scoring_notes(summary)
        if sources[entry.entry_id] != RUN:  # where its numbers come from, where not only from a pdl1 run
            reasons.append(f"results from {sources[entry.entry_id]}")
        reasons += record_notes[entry.entry_id]
        reasons += region_notes[entry.entry_id]
        items = score_regions(region_lists[entry.entry_id], reference=region_reference)
        geometries = {i: shapely.box(x, y, x + w, y + h) for i, (x, y, w, h) in enumerate(r.bounds_px for r in items)}
        regions = rank_regions(items, labelled=labelled, limit=regions_per_entry, geometries=geometries)
        if entry.entry_id in failed and entry.entry_id not in from_records:  # ranked by an earlier run's results
            reasons.insert(
                0,
                f"the last run failed on it ({failed[entry.entry_id]}): ranked by an earlier run's results "
                f"(run {summary.get('run_id')})",
            )
        if share > 0:
            reasons.append(f"{100 * share:.0f}% of the analysed area already labelled ({label_source})")
        if not label_source:
            unread = _unread_labels(info.folder, entry.entry_id)
            if unread:
                reasons.append(unread)
        ranked.append(
            EntryItem(
                entry_id=entry.entry_id,
                image=entry.image_name,
                stain=stain,
                mpp=mpp,
                score=parts.score,
                parts=parts,
                mean_uncertainty=entry_uncertainty(summary),
                analysed_area_um2=analysed_um2,
                reasons=tuple(reasons),
                regions=tuple(regions),
                summary_path=summary_paths.get(entry.entry_id),
                run_id=summary.get("run_id"),
                results_from=sources[entry.entry_id],
            )
        )
    # Ties in the project's order of entries, by number (QuPath's IDs are numbers: "2" before "10").
    ranked.sort(
        key=lambda e: (
            -e.score,
            int(e.entry_id) if e.entry_id.isascii() and e.entry_id.isdigit() else 1 << 62,
            e.entry_id,
        )
    )
    return ranked, not_ranked


def queue_rows(entries: Sequence[EntryItem], *, top: int | None = None) -> list[dict[str, Any]]:
    """CSV rows: each entry (best first), then its regions."""
    rows = []
    for rank, entry in enumerate(entries[:top] if top else entries, start=1):
        p = entry.parts
        terms = (
            f"U {p.uncertainty:.3f} + S {p.sua:.3f} + D {p.domain:.3f} + R {p.reasons:.1f}, L {p.labelled_share:.2f}"
        )
        rows.append(
            {
                "rank": rank,
                "region_rank": "",
                "entry_id": entry.entry_id,
                "image": entry.image,
                "kind": "entry",
                "object_type": "",
                "score": f"{entry.score:.4f}",
                "area_um2": f"{entry.analysed_area_um2:.0f}",
                "mutual_information": "" if entry.mean_uncertainty is None else f"{entry.mean_uncertainty:.5f}",
                "labelled": f"{p.labelled_share:.3f}",
                "reasons": "; ".join([terms, *entry.reasons]),
            }
        )
        for k, region in enumerate(entry.regions, start=1):
            x, y, w, h = region.bounds_px
            rows.append(
                {
                    "rank": rank,
                    "region_rank": k,
                    "entry_id": entry.entry_id,
                    "image": entry.image,
                    "kind": region.kind,
                    "object_type": region.object_type,
                    "score": f"{region.score:.4f}",
                    "x_px": round(x),
                    "y_px": round(y),
                    "width_px": round(w),
                    "height_px": round(h),
                    "centre_x_um": f"{(x + w / 2) * entry.mpp:.1f}",
                    "centre_y_um": f"{(y + h / 2) * entry.mpp:.1f}",
                    "area_um2": f"{region.area_um2:.0f}",
                    "mutual_information": ""
                    if region.mutual_information is None
                    else f"{region.mutual_information:.5f}",
                    "labelled": int(region.labelled),
                    "reasons": region.why,
                }
            )
    return [{c: row.get(c, "") for c in COLUMNS} for row in rows]


def entry_metadata(entries: Sequence[EntryItem]) -> dict[str, dict[str, str]]:
    """Entry ID -> the review metadata (strings, as QuPath keeps them); rank 1 is labelled first."""
    return {e.entry_id: {RANK_KEY: str(rank), SCORE_KEY: f"{e.score:.3f}"} for rank, e in enumerate(entries, start=1)}


def review_path(project_folder: Path, entry_id: str) -> Path:
    """The review metadata sidecar of an entry analysed in QuPath alone (:data:`REVIEW_FILE`)."""
    return project_folder / PDL1_DIR / entry_id / REVIEW_FILE


def review_sidecar(metadata: dict[str, str | None], *, written_at: str, queue: Path, why: str | None = None) -> str:
    """The text of a :data:`REVIEW_FILE`: the entry's review keys (null: no longer ranked, ``why`` says why: the
    import script removes them from QuPath, as :func:`bridge.qupath.set_entry_metadata` does with None), when and
    which queue wrote them."""
    record: dict[str, Any] = {"metadata": metadata, "written_at": written_at, "queue": str(queue)}
    if why is not None:
        record["not_ranked"] = why
    return json.dumps(record, indent=2, allow_nan=False)


def _staged(path: Path, text: str) -> Path:
    """``text`` written and flushed beside ``path``; :func:`write_review_queue` renames it over ``path``."""
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}.part")
    with open(tmp, "x", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    return tmp


def _refuse_out_among_run_files(out: Path, folder: Path) -> None:
    """Refuse an ``--out`` in the project's ``pdl1/`` other than the queue's own name there: that folder holds the run's
    files (status.json, targets.csv, each entry's summary.json), and ``--out pdl1/targets.csv`` replaced the run's
    table with the queue, ``pdl1/status.csv`` its status (with the queue's provenance, ``status.json``)."""
    results = (folder / PDL1_DIR).resolve()
    where = out.resolve()
    if where.is_relative_to(results) and where != results / QUEUE_FILE:
        raise ReviewQueueError(
            f"--out {out} lies in {results}, which holds what pdl1 run writes (its status, tables and each entry's "
            f"results), and the queue or its provenance ({_provenance_path(where).name}) could replace one of "
            f"them; give a CSV path outside it, or leave --out out for {results / QUEUE_FILE}"
        )


def _provenance_path(csv_path: Path) -> Path:
    """Where a queue's provenance goes: beside its CSV, of the same name (``review_queue.json``)."""
    return csv_path.with_name(csv_path.stem + ".json")


def _refuse_replacing_others(out: Path) -> None:
    """Refuse an ``--out`` whose CSV, or the provenance JSON beside it, is there and no earlier queue's: ``--out
    notes/cases.csv`` replaced the user's ``notes/cases.json`` with the queue's provenance, in silence."""
    provenance = _provenance_path(out)
    for path in (out, provenance):
        if not path.is_file():
            continue
        try:
            if path == out:
                with out.open(encoding="utf-8", newline="") as fh:
                    mine = next(csv.reader(fh), None) == list(COLUMNS)
            else:
                earlier = json.loads(provenance.read_text(encoding="utf-8"))
                mine = isinstance(earlier, dict) and {"formula", "entries"} <= earlier.keys()
        except (OSError, ValueError):  # unreadable, not UTF-8 or JSON: no queue's either
            mine = False
        if not mine:
            raise ReviewQueueError(
                f"--out {out}: the queue writes {out.name} and its provenance {provenance.name}, and {path} is there "
                "and no review queue's, so it would be replaced; give another --out name, or move that file"
            )


def _marker_text(marker: Path) -> str:
    """When and by which process the unfinished review-queue ``marker`` names started, as a reader is told it."""
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "when is not recorded"
    if not isinstance(record, dict):
        return "when is not recorded"
    return f"started {record.get('started', '?')}, pid {record.get('pid', '?')}, writing {record.get('csv', '?')}"


def write_review_queue(
    project: str | Path,
    *,
    out: str | Path | None = None,
    top: int | None = None,
    regions_per_entry: int = 5,
    qupath: str = "auto",
    on_progress: Callable[[int, int], None] | None = None,
    on_labels_progress: Callable[[int, int], None] | None = None,
) -> ReviewQueue:
    """Rank, then write the CSV, its provenance JSON and every ranked entry's review metadata.

    Metadata goes into the project through QuPath when it is installed (``qupath``: auto, always,
    never), and always into each entry's ``summary.json`` ``metadata`` or, for an entry analysed in QuPath alone
    (records of pdl1_analyze.groovy, no summary), into its ``pdl1/<entry ID>/review.json``: from either
    ``pdl1_import_results.groovy`` sets it in QuPath (how QuPath 0.7, which paquo does not reach, gets it). An entry
    not ranked now that has a ``review.json`` gets its keys as null there (the script removes them, as QuPath's are
    removed here); one whose rank now goes into its ``summary.json`` has its ``review.json`` removed. Every file is
    staged beside its target first, so a failure while staging (or QuPath's save failing) changes nothing. Then
    ``pdl1/review_queue.unfinished`` is written, the QuPath project saved, the old ``review_queue.json`` removed,
    the superseded ``review.json`` files removed, the summaries, the ``review.json`` files and the CSV renamed into
    place one at a time and the new ``review_queue.json`` last, and the marker removed. Stopped between those steps
    (a kill, a power cut, a rename refused), some entries carry the new rank and some an older one: the marker stays
    and says so, to pdl1_import_results.groovy (it then leaves QuPath's review keys alone) and to the next
    review-queue (it warns, writes every entry's again and removes it). Holds the project's run lock, so no ``pdl1
    run`` writes meanwhile. A Ctrl-C while it holds the lock raises :class:`ReviewQueueInterrupted`, saying which of
    those states it left. ``on_progress``, ``on_labels_progress``: :func:`build_queue`'s.
    """
    if qupath not in ("auto", "always", "never"):
        raise ReviewQueueError(f"--qupath must be auto, always or never, got {qupath!r}")
    if top is not None and top < 1:
        raise ReviewQueueError(f"--top must be at least 1, got {top}")
    source = Path(project)
    if not source.exists():
        raise ReviewQueueError(f"{source}: no such project; give the folder holding project.qpproj")
    if out is not None:  # said now: staged files could not be renamed onto a folder, nor made under a file
        out = Path(out)
        if out.is_dir():
            raise ReviewQueueError(f"--out {out} is a folder; give the CSV file to write, e.g. {out / QUEUE_FILE}")
        problem = not_a_folder(out.parent)
        if problem is not None:
            raise ReviewQueueError(f"--out {out}: its folder {out.parent} {problem}; give a CSV path in a folder")
    source = Path(source)
    if source.is_dir() and not (source / "project.qpproj").exists() and any(source.glob("*.summary.json")):
        # A plain-slides run's --out: "no QuPath project here" said what was missing, not what the command takes.
        raise ReviewQueueError(
            f"{source} holds the results of slides run without a project (*.summary.json); review-queue ranks a "
            "QuPath project's entries, where it writes each one's rank: add the slides to a project (pdl1 "
            "init-project), run it, and give the project; `pdl1 report` reports plain slides"
        )
    info = read_project(source)  # the project file given, not only a project.qpproj beside it
    folder = info.folder
    if out is not None:
        _refuse_out_among_run_files(out, folder)  # first: the .csv it would suggest there is refused here
        if out.suffix.lower() != ".csv":  # --out slide.svs replaced the slide with the queue
            raise ReviewQueueError(
                f"--out {out} does not end in .csv; give the CSV file to write, e.g. {out.with_suffix('.csv')} "
                f"(its provenance goes beside it, as {out.with_suffix('.json').name})"
            )
        _refuse_replacing_others(out)
    analysed_entries(info)  # refused before the lock, which would create pdl1/
    use_qupath = False
    if qupath != "never":
        from bridge.qupath import qupath_available

        use_qupath, why = qupath_available()
        if qupath == "always" and not use_qupath:
            raise ReviewQueueError(why)
    csv_path = Path(out) if out is not None else folder / PDL1_DIR / QUEUE_FILE
    with (
        _says_what_a_ctrl_c_left(folder, csv_path),  # outside the lock: told once the staged files are gone
        run_lock(folder, doing="pdl1 review-queue is ranking the project here"),
    ):
        # What a killed review-queue (or run) left: staged copies of every summary, as pdl1 run removes them.
        remove_orphan_parts(folder, plain_slides=False)
        entries, not_ranked = build_queue(
            folder,
            regions_per_entry=regions_per_entry,
            use_qupath=use_qupath,
            on_progress=on_progress,
            on_labels_progress=on_labels_progress,
        )
        metadata = entry_metadata(entries)
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(spreadsheet_row(row) for row in queue_rows(entries, top=top))
        provenance = {
            "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "pdl1_bridge": __version__,
            "project": str(find_project_file(folder)),
            "arguments": {"top": top, "regions_per_entry": regions_per_entry, "qupath": qupath},
            "formula": {
                "entry": "(U + S + D + R) * (1 - L)",
                "cap_S_D": CAP,
                "reason_weight": REASON_WEIGHT,
                "region": "MI / highest region MI + candidate bonus",
                "candidate_bonus": CANDIDATE_BONUS,
                "min_tile_tissue_fraction": MIN_TILE_TISSUE,
                "labelled_share": LABELLED_SHARE,
                "several_targets": "U: the targets' means weighted by their areas; S, D, R: the worst target's",
            },
            "entries": [
                {
                    "entry_id": e.entry_id,
                    "image": e.image,
                    "rank": rank,
                    "score": e.score,
                    "parts": asdict(e.parts),
                    "run_id": e.run_id,
                }
                for rank, e in enumerate(entries, start=1)
            ],
            "not_ranked": [{"entry_id": i, "image": n, "why": w} for i, n, w in not_ranked],
        }
        staged: list[tuple[Path, Path]] = []
        marker = folder / PDL1_DIR / UNFINISHED_FILE
        earlier_unfinished = marker.is_file()
        if earlier_unfinished:
            log.warning(
                "%s: an earlier pdl1 review-queue was stopped while renaming its files (%s), so some summaries (or "
                "review.json files) carry its review rank and others an older one; this one writes every entry's again",
                marker,
                _marker_text(marker),
            )
        provenance_path = _provenance_path(csv_path)
        written_at = provenance["written_at"]
        # review.json of entries whose rank now goes into their summary.json: an earlier queue's, when they were
        # analysed in QuPath alone; removed with the renames (the import reads the summary's where there is one).
        superseded = [
            path
            for path in (review_path(folder, e.entry_id) for e in entries if e.summary_path is not None)
            if path.is_file()
        ]
        cleared = 0
        saving = False
        try:
            # The summaries and review.json files first and the CSV, then review_queue.json (the record of the CSV),
            # last: renamed in that order, a review_queue.json beside its CSV says every sidecar carries its rank.
            for entry in entries:
                if entry.summary_path is None:  # analysed in QuPath alone: pdl1_import_results.groovy reads review.json
                    path = review_path(folder, entry.entry_id)
                    text = review_sidecar(metadata[entry.entry_id], written_at=written_at, queue=csv_path)
                    staged.append((_staged(path, text), path))
                    continue
                summary = _read_json(entry.summary_path, "run `pdl1 run PROJECT --resume`")
                summary["metadata"] = {**summary.get("metadata", {}), **metadata[entry.entry_id]}
                text = json.dumps(summary, indent=2, allow_nan=False)
                staged.append((_staged(entry.summary_path, text), entry.summary_path))
            for entry_id, _, why in not_ranked:  # ranked by an earlier queue: its rank cleared, as QuPath's below
                path = review_path(folder, entry_id)
                if path.is_file():
                    text = review_sidecar(
                        {RANK_KEY: None, SCORE_KEY: None}, written_at=written_at, queue=csv_path, why=why
                    )
                    staged.append((_staged(path, text), path))
                    cleared += 1
            staged.append((_staged(csv_path, buffer.getvalue()), csv_path))
            staged.append(
                (_staged(provenance_path, json.dumps(provenance, indent=2, allow_nan=False)), provenance_path)
            )
            # From here until the last rename the review metadata may be part new, part old: the marker says so to
            # pdl1_import_results.groovy (which then leaves QuPath's review keys as they are) and to the next
            # review-queue. Written before QuPath's save, which is the first file replaced.
            with replace_atomically(marker) as fh:
                json.dump({"started": provenance["written_at"], "pid": os.getpid(), "csv": str(csv_path)}, fh)
            if use_qupath:
                from bridge.qupath import set_entry_metadata

                stale = {entry_id: {RANK_KEY: None, SCORE_KEY: None} for entry_id, _, _ in not_ranked}
                saving = True
                set_entry_metadata(find_project_file(folder), {**stale, **metadata})
        except BaseException as err:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            # Nothing was replaced: a failed save leaves project.qpproj as it was. A Ctrl-C during the save is seen
            # when QuPath's call returns, which may be after it wrote project.qpproj: the marker stays.
            if not earlier_unfinished and not (saving and isinstance(err, KeyboardInterrupt)):
                marker.unlink(missing_ok=True)
            raise
        provenance_path.unlink(missing_ok=True)  # the record: gone before the first rename, back after the last
        try:
            for path in superseded:
                path.unlink(missing_ok=True)
        except BaseException:  # none renamed yet: the staged files go; the marker stays (some sidecars are gone)
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            raise
        for done, (tmp, target) in enumerate(staged):
            try:
                os.replace(tmp, target)
            except BaseException:  # those not renamed yet are not left behind as .part files; the marker stays
                for rest, _ in staged[done:]:
                    rest.unlink(missing_ok=True)
                raise
        marker.unlink()
    return ReviewQueue(
        entries=tuple(entries),
        not_ranked=tuple(not_ranked),
        csv_path=csv_path,
        metadata_written_to=_metadata_written_to(entries, use_qupath=use_qupath, cleared=cleared),
    )


class ReviewQueueInterrupted(KeyboardInterrupt):
    """Ctrl-C while ``pdl1 review-queue`` held the project (a KeyboardInterrupt, so what stops on one stops on it):
    ``left`` says in which state it left the queue's CSV and the entries' review metadata."""

    def __init__(self, left: str) -> None:
        super().__init__(left)
        self.left = left


@contextmanager
def _says_what_a_ctrl_c_left(folder: Path, csv_path: Path) -> Iterator[None]:
    """Turn a Ctrl-C into :class:`ReviewQueueInterrupted` saying what it left (:func:`interrupted_text`)."""
    try:
        yield
    except KeyboardInterrupt:
        raise ReviewQueueInterrupted(interrupted_text(folder, csv_path)) from None


def interrupted_text(folder: Path, csv_path: Path) -> str:
    """What a review-queue of the project in ``folder`` stopped by a Ctrl-C left, as its user is told it: the files
    are staged and renamed into place at the end (:func:`write_review_queue`), so nothing where it stopped before,
    else what :data:`UNFINISHED_FILE` says."""
    marker = folder / PDL1_DIR / UNFINISHED_FILE
    if marker.is_file():
        return (
            "some entries' review rank is the newest queue's and others' an older one's (a review-queue was stopped "
            f"while its files were replaced one at a time), and {csv_path} may be either's; {marker} says so, and "
            "pdl1_import_results.groovy leaves QuPath's review keys as they are while it is there; run `pdl1 "
            "review-queue` again, which writes every entry's and removes it"
        )
    return (
        f"the review queue was not written: {csv_path}, its {_provenance_path(csv_path).name} and the entries' "
        "review metadata are as they were (an earlier queue's, or none); run `pdl1 review-queue` again"
    )


def _metadata_written_to(entries: Sequence[EntryItem], *, use_qupath: bool, cleared: int = 0) -> str:
    """Where the ranks went as entry metadata, and how QuPath gets them without paquo (QuPath 0.7): from the
    summary.json sidecars, and the review.json of the entries analysed in QuPath alone (records of
    pdl1_analyze.groovy, no summary.json), pdl1_import_results.groovy sets them; ``cleared``: the review.json of
    entries no longer ranked whose rank was cleared."""
    if use_qupath:
        return "QuPath project"
    alone = sum(e.summary_path is None for e in entries)
    where = []
    if len(entries) > alone:
        where.append("summary.json sidecars")
    if alone:
        where.append(f"review.json sidecars of {_entries(alone)} analysed in QuPath alone")
    if cleared:
        where.append(
            f"review.json of {_entries(cleared)} no longer ranked, {'its' if cleared == 1 else 'their'} rank cleared"
        )
    if not where:
        return "sidecars of no entry (none was ranked)"  # the CLI says "entry metadata in the ..."
    fix = "run pdl1_import_results.groovy for the project (Run for project) to set them in QuPath"
    return f"{' and '.join(where)}; {fix}"


def _entries(count: int) -> str:
    return f"{count} entry" if count == 1 else f"{count} entries"
