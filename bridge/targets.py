"""What of an image an analysis runs on (annotations, TMA cores or the whole image), and the per-target table.

No QuPath here: ``bridge.qupath`` hands in paquo's objects, the tests plain ones. ``pdl1_analyze.groovy`` chooses
its targets by the same rule (its ``chooseTargets``; a test keeps the two equal).
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
from shapely.errors import ShapelyError
from shapely.geometry import mapping, shape
from shapely.geometry.base import BaseGeometry

from bridge.atomic import replace_atomically
from bridge.project import review_reason_text
from bridge.qupath_geojson import QuPathObject, from_feature, to_feature, validate_feature
from inference import cps_category, cps_text, is_finite_number, tps_text

T = TypeVar("T")

# Where the targets came from (TargetChoice.source), in the order the rule tries them.
SELECTION = "selection"  # the objects selected in QuPath (pdl1_analyze.groovy only)
ANNOTATIONS = "annotations"  # the annotations of the target classes or names
TMA_CORES = "TMA cores"  # the cores of the image's TMA grid (TMA > TMA dearrayer)
WHOLE_IMAGE = "whole image"  # none of those: the image under a "PD-L1 analysis" annotation

TARGETS_FILE = "targets.csv"  # <project>/pdl1/targets.csv, or <--out>/pdl1/targets.csv for plain slides
MISSING = "missing"  # TargetRow.state of a TMA core marked missing: left alone, no numbers
TMA_CORE = "TMA core"  # TargetRow.target_type of a core of a dearrayed TMA grid
# The fix for an image whose output an earlier version wrote, or that no longer reads, one wording wherever it is
# said (report, review queue, --from-review, pdl1 run, pairs): a run replaces it, and --resume may keep an image
# recorded as done.
RUN_IMAGE_AGAIN = "run the image again (`pdl1 run PROJECT` without --resume)"


@dataclass(frozen=True)
class TargetChoice(Generic[T]):
    """The targets of one image, where they came from, and the TMA cores marked missing that are left alone."""

    source: str
    targets: tuple[T, ...]
    missing: tuple[T, ...] = ()


def choose_targets(
    *,
    selected: Sequence[T] = (),
    annotations: Sequence[T] = (),
    cores: Sequence[T] = (),
    is_missing: Callable[[T], bool],
) -> TargetChoice[T]:
    """The first of: the selected objects, the annotations of the target classes or names, the TMA cores, the whole
    image. Cores marked missing (set in QuPath, or by the dearrayer where it found no tissue) are never analysed:
    they go to ``missing``, also when selected (``is_missing`` is asked of the selected objects and the cores). A
    grid whose every core is missing gives no targets (not the whole image, whose one TPS over all cores would mean
    nothing): the caller says so.

    >>> cores = ["A-1", "A-2 (missing)", "B-1"]
    >>> missing = lambda c: c.endswith("(missing)")
    >>> choose_targets(cores=cores, is_missing=missing)
    TargetChoice(source='TMA cores', targets=('A-1', 'B-1'), missing=('A-2 (missing)',))
    >>> choose_targets(annotations=["Tumor 1"], cores=cores, is_missing=missing).targets
    ('Tumor 1',)
    >>> choose_targets(is_missing=missing)
    TargetChoice(source='whole image', targets=(), missing=())
    """
    if annotations and not selected:
        return TargetChoice(ANNOTATIONS, tuple(annotations))  # annotations are never missing: not asked
    for source, objects in ((SELECTION, selected), (TMA_CORES, cores)):
        if objects:
            present = tuple(o for o in objects if not is_missing(o))
            return TargetChoice(source, present, tuple(o for o in objects if is_missing(o)))
    return TargetChoice(WHOLE_IMAGE, ())


def core_label(name: str | None, index: int) -> str:
    """A TMA core's name as QuPath shows it ("A-1" from the dearrayer), or its place in the grid's list when it has
    none (a grid built by a script).

    >>> core_label("A-1", 0), core_label(None, 4)
    ('A-1', 'core 5')
    """
    return name if name else f"core {index + 1}"


@dataclass(frozen=True)
class TargetRow:
    """One analysed target of an image (or a TMA core left alone as missing): a row of ``targets.csv``.

    ``tumour_cells``: the tumour nuclei the TPS and the CPS count (under 100 is a review reason and the category
    "insufficient tumour cells" of both). ``cps_percent``: IHC only. ``review_reasons``: each with value and limit.
    ``outline``: the annotation's or core's ROI in level-0 px, for the report's thumbnail (not a column of
    ``targets.csv``); None for a whole image, and in summaries written before outlines were kept.

    The numbers ``pdl1 review-queue`` scores a target by (not columns of ``targets.csv``, which holds the scores a
    pathologist reads; None where not measured, and in summaries written before they were kept): its
    ``analysed_area_um2``, the segmentation's ``mutual_information_mean`` (H&E) or the IHC nuclei ensemble's
    ``nuclei_entropy_mean``, the SUA candidate area in % of the analysed area and its review limit (H&E), and the
    domain guard's out-of-domain score and stain distance with their limits.
    """

    image: str
    entry_id: str | None
    target: str
    target_type: str  # "TMA core", "annotation" or "whole image"
    state: str  # "analysed" or MISSING
    stain: str | None = None
    tps_percent: float | None = None
    tps_category: str | None = None
    tumour_cells: int | None = None
    cps_percent: float | None = None
    needs_review: bool | None = None
    review_reasons: tuple[str, ...] = ()
    outline: BaseGeometry | None = None
    analysed_area_um2: float | None = None
    mutual_information_mean: float | None = None
    nuclei_entropy_mean: float | None = None
    sua_candidate_area_pct: float | None = None
    sua_area_limit_pct: float | None = None
    out_of_domain_score: float | None = None
    out_of_domain_limit: float | None = None
    stain_distance_deg: float | None = None
    stain_limit_deg: float | None = None
    # QuPath's ID of the annotation or core, where it was read from an export (pdl1_import_results.groovy finds it by
    # it); None through QuPath, for a whole image, and in summaries written before.
    object_id: str | None = None

    @property
    def cps_category(self) -> str | None:
        """The CPS's category (a PD-L1 IHC's): ``insufficient tumour cells`` under 100 tumour cells, as its TPS's
        (:func:`inference.cps_category`), else None; a column of ``targets.csv`` beside ``cps_percent``."""
        if self.stain != "H-DAB" or self.state != "analysed" or self.tumour_cells is None:
            return None
        return cps_category(self.tumour_cells)


def analysed_row(
    image: str, entry_id: str | None, target: str, target_type: str, result: Any, *, outline: BaseGeometry | None = None
) -> TargetRow:
    """The row of one analysed target from its ``SlideResult``; ``outline``: the ROI it was analysed in."""
    tps, cps = result.tps, result.cps
    details = result.summary
    reasons = tuple(review_reason_text(r) for r in details.get("review_reasons", []))
    analysed = getattr(result, "analysed_area_um2", None)
    candidate_um2 = details.get("candidate_area_um2")  # only where the segmentation ran (H&E)
    candidate_pct = None
    if _number(candidate_um2) is not None and _number(analysed) is not None:
        candidate_pct = 100 * float(candidate_um2) / float(analysed) if analysed > 0 else 0.0
    domain = details.get("domain") or {}
    return TargetRow(
        image=image,
        entry_id=entry_id,
        target=target,
        target_type=target_type,
        state="analysed",
        stain=result.stain,
        tps_percent=None if tps is None else tps.percent,
        tps_category=None if tps is None else tps.category,
        tumour_cells=None if tps is None else int(tps.tumour),
        cps_percent=None if cps is None else cps.percent,
        needs_review=bool(result.uncertainty_flag),
        review_reasons=reasons,
        outline=outline,
        analysed_area_um2=_number(analysed),
        mutual_information_mean=_number(details.get("mutual_information_mean")),
        nuclei_entropy_mean=_number(details.get("nuclei_entropy_mean")),
        sua_candidate_area_pct=candidate_pct,
        sua_area_limit_pct=_number((details.get("review_rule") or {}).get("review_candidate_area_pct")),
        out_of_domain_score=_number(domain.get("out_of_domain_score")),
        out_of_domain_limit=_number(domain.get("limit")),
        stain_distance_deg=_number(domain.get("stain_distance_deg")),
        stain_limit_deg=_number(domain.get("stain_limit_deg")),
    )


def _number(value: Any) -> float | None:
    """A finite number as a float (what JSON keeps), else None."""
    return float(value) if is_finite_number(value) else None


def missing_row(image: str, entry_id: str | None, core: str, *, outline: BaseGeometry | None = None) -> TargetRow:
    """The row of a TMA core marked missing: named, so the table has every core of the grid, and without numbers."""
    return TargetRow(image=image, entry_id=entry_id, target=core, target_type=TMA_CORE, state=MISSING, outline=outline)


def rows_to_json(rows: Iterable[TargetRow]) -> list[dict[str, Any]]:
    """The rows as a summary.json keeps them (``targets``); an outline as a GeoJSON geometry."""
    return [
        {
            **{f.name: getattr(r, f.name) for f in fields(TargetRow)},
            "cps_category": r.cps_category,  # targets.csv's column (a property of the row, so not a field)
            "review_reasons": list(r.review_reasons),
            "outline": None if r.outline is None else mapping(r.outline),
        }
        for r in rows
    ]


def rows_from_summary(summary: dict[str, Any]) -> list[TargetRow]:
    """The rows a summary.json keeps; a summary an earlier version wrote (no ``targets``) gives none, and one
    written before outlines were kept gives rows without them."""
    names = {f.name for f in fields(TargetRow)}
    out = []
    for row in summary.get("targets") or []:
        known = {k: v for k, v in row.items() if k in names}
        try:
            outline = None if known.get("outline") is None else shape(known["outline"])
        except (AttributeError, KeyError, TypeError, ValueError, ShapelyError) as err:  # not a GeoJSON geometry
            raise ValueError(
                f"the outline of target {known.get('target')!r} is not a GeoJSON geometry ({err})"
            ) from err
        out.append(
            TargetRow(
                **{
                    **known,
                    "review_reasons": tuple(known.get("review_reasons") or ()),
                    "outline": outline,
                }
            )
        )
    return out


def target_labels(rows: Sequence[TargetRow]) -> list[str]:
    """Each target's name as the report's table and thumbnail, the review reasons and ``pdl1 review-queue`` show it;
    a name several share (annotations named by their class: "Tumor") gets its place among them, "Tumor #2", so a
    row can be found on the picture.

    >>> rows = [missing_row("a.svs", None, n) for n in ("Tumor", "A-1", "Tumor")]
    >>> target_labels(rows)
    ['Tumor #1', 'A-1', 'Tumor #2']
    """
    return numbered([t.target for t in rows])


def numbered(names: Sequence[str]) -> list[str]:
    """Names as :func:`target_labels` gives them: one several share numbered by its place among them."""
    seen: dict[str, int] = {}
    shared = {name for name, n in Counter(names).items() if n > 1}
    labels = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        labels.append(f"{name} #{seen[name]}" if name in shared else name)
    return labels


# How far outside another target's outline a target may reach and still lie within it, in level-0 px: QuPath keeps an
# outline's vertices to 0.01 px, and one drawn along another's edge crosses it by such amounts.
NESTED_TOLERANCE_PX = 0.5


def nested_targets(outlines: Sequence[BaseGeometry | None]) -> list[bool]:
    """Which of an image's analysed targets lie within another of them (a hotspot analysed inside an analysed tissue
    outline): the image's score counts each cell once, so over the outer one only; of two of one outline, the first.
    None (a whole image, or an outline not kept) lies within none. ``pdl1_analyze.groovy``'s ``nestedTargets`` does
    the same.

    >>> from shapely.geometry import box
    >>> nested_targets([box(0, 0, 100, 100), box(10, 10, 20, 20), box(90, 90, 120, 120), box(0, 0, 100, 100), None])
    [False, True, False, True, False]
    """
    areas = [None if g is None or g.is_empty else g.area for g in outlines]
    # Each outline grown once, and its bounds, so that a TMA's hundreds of cores cost n buffers, not n² of them.
    grown = [None if a is None else g.buffer(NESTED_TOLERANCE_PX) for g, a in zip(outlines, areas, strict=True)]
    bounds = [None if g is None else g.bounds for g in grown]
    out = []
    for i, inner in enumerate(outlines):
        if areas[i] is None:
            out.append(False)
            continue
        x0, y0, x1, y1 = inner.bounds
        out.append(
            any(
                j != i
                and areas[j] is not None
                and (areas[j] > areas[i] or (areas[j] == areas[i] and j < i))
                and bounds[j][0] <= x0
                and bounds[j][1] <= y0
                and x1 <= bounds[j][2]
                and y1 <= bounds[j][3]
                and grown[j].covers(inner)
                for j in range(len(outlines))
            )
        )
    return out


def analysed_targets(rows: Sequence[TargetRow]) -> list[tuple[TargetRow, str]]:
    """The analysed targets among ``rows`` (not the cores marked missing), each with its name as
    :func:`target_labels` gives it (numbered among all the rows, so a name matches the table's and the picture's).

    >>> from dataclasses import replace
    >>> rows = [missing_row("a.svs", None, n) for n in ("Tumor", "A-1", "Tumor")]
    >>> [label for _, label in analysed_targets([rows[0], replace(rows[1], state="analysed"), rows[2]])]
    ['A-1']
    """
    return [(t, label) for t, label in zip(rows, target_labels(rows), strict=True) if t.state != MISSING]


def domain_distance(domain: Any) -> float | None:
    """How far a domain guard reading (a summary's ``details.domain``) lies from the training domain, in limits: the
    larger of the out-of-domain score over its limit and the stain distance over its limit (1 and above: out of
    domain); None where neither was measured. One measured alone counts: the guard flags an image whose stain is out
    of domain where the network's features were not captured, and the furthest target must not pass it over.

    >>> domain_distance({"out_of_domain_score": 1.2, "limit": 2.0, "stain_distance_deg": 9.0, "stain_limit_deg": 6.0})
    1.5
    >>> domain_distance({"out_of_domain_score": None, "stain_distance_deg": 9.0, "stain_limit_deg": 6.0})
    1.5
    >>> domain_distance({"out_of_domain_score": None, "why_not": "no tiles"}) is None
    True
    """
    if not isinstance(domain, dict):
        return None
    ratios = [
        float(value) / float(limit)
        for value, limit in (
            (domain["out_of_domain_score"], domain.get("limit")),
            (domain.get("stain_distance_deg"), domain.get("stain_limit_deg")),
        )
        if is_finite_number(value) and is_finite_number(limit) and float(limit) > 0
    ]
    return max(ratios, default=None)


def furthest_domain(domains: Sequence[tuple[str, Any]]) -> dict[str, Any] | None:
    """Of several analysed targets' domain guard readings (each target's name and its ``details.domain``), the one
    furthest from the training domain (:func:`domain_distance`; the first of equals), with that target's name under
    ``target``: what an image of several targets reports as its domain, so one core out of domain among 40 is not
    hidden behind the first core's reading. None where no target's was measured.

    >>> far = {"out_of_domain_score": 3.0, "limit": 2.0}
    >>> furthest_domain([("A-1", {"out_of_domain_score": 1.0, "limit": 2.0}), ("C-4", far)])["target"]
    'C-4'
    >>> furthest_domain([("A-1", None), ("A-2", {"out_of_domain_score": None})]) is None
    True
    """
    measured = [
        (distance, -i, label, d) for i, (label, d) in enumerate(domains) if (distance := domain_distance(d)) is not None
    ]
    if not measured:
        return None
    _, _, label, domain = max(measured, key=lambda m: m[:2])
    return {**domain, "target": label}


def targets_review_reasons(rows: Sequence[TargetRow]) -> tuple[str, ...]:
    """Why an image of several analysed targets needs review: each flagged target's reasons (value and limit) led by
    its name, in the targets' order ("flagged" where it gives none); what ``details.review_reasons`` of its summary
    holds, the ``pdl1 run`` closing lines, the report and ``pdl1 review-queue`` say.

    >>> from dataclasses import replace
    >>> a = replace(missing_row("t.svs", None, "A-1"), state="analysed", needs_review=False)
    >>> c = replace(a, target="C-4", needs_review=True, review_reasons=("SUA candidate area % (5, limit 2)",))
    >>> targets_review_reasons([a, c])
    ('C-4: SUA candidate area % (5, limit 2)',)
    """
    return tuple(
        f"{label}: {reason}"
        for t, label in analysed_targets(rows)
        if t.needs_review
        for reason in (t.review_reasons or ("flagged",))
    )


COLUMNS = (
    "image",
    "entry_id",
    "target",
    "target_type",
    "state",
    "stain",
    "tps_percent",
    "tps_category",
    "tumour_cells",
    "cps_percent",
    "cps_category",
    "needs_review",
    "review_reasons",
)


# What makes a spreadsheet read a cell as a formula (OWASP's CSV injection list).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_text(value: Any) -> Any:
    """``value``, or for text a spreadsheet would run as a formula (an image or annotation named
    ``=HYPERLINK(...)``, a case ``@SUM(...)``) the text after an apostrophe, which Excel and LibreOffice show as text;
    numbers, and text that is one (``-3.2``), stay as they are.

    >>> spreadsheet_text("=HYPERLINK(1)"), spreadsheet_text("-B12.svs"), spreadsheet_text("-3.2"), spreadsheet_text(2)
    ("'=HYPERLINK(1)", "'-B12.svs", '-3.2', 2)
    """
    if not isinstance(value, str) or not value.startswith(_FORMULA_START):
        return value
    try:
        float(value)
    except ValueError:
        return "'" + value
    return value


def spreadsheet_row(row: dict[str, Any]) -> dict[str, Any]:
    """A CSV row whose every cell is :func:`spreadsheet_text`."""
    return {k: spreadsheet_text(v) for k, v in row.items()}


def csv_cell(value: Any, *, tps: bool = False, cps: bool = False) -> str:
    """A CSV cell: empty for none, 1/0 for the review flag, reasons joined by "; ", a number to one decimal, and a TPS
    (``tps``) or CPS (``cps``) as QuPath's metadata holds it (:func:`inference.tps_text`, :func:`inference.cps_text`:
    more decimals where one would carry it across a cut-off)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return tps_text(value) if tps else cps_text(value) if cps else f"{value:.1f}"
    if isinstance(value, tuple):
        return spreadsheet_text("; ".join(value))
    return spreadsheet_text(str(value))


def write_target_table(
    path: Path, rows: Iterable[TargetRow], *, last_run_failed: Callable[[TargetRow], str] | None = None
) -> Path:
    """Write ``targets.csv`` (one row per analysed target, and per TMA core left alone as missing) atomically:
    a reader sees the old table or the new one, never half of one. ``last_run_failed`` (the report's table) adds
    that column: the error of the last run, which failed on the row's image, whose results are an earlier run's."""
    with replace_atomically(path, newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*COLUMNS, *(["last_run_failed"] if last_run_failed else [])])
        for row in rows:
            cells = [csv_cell(getattr(row, c), tps=c == "tps_percent", cps=c == "cps_percent") for c in COLUMNS]
            writer.writerow([*cells, *([csv_cell(last_run_failed(row) or None)] if last_run_failed else [])])
    return path


# <project>/pdl1/<entry ID>/target_regions.json, beside objects.geojson, of an image where several targets were
# analysed: every target's positive regions, SUA candidates and uncertainty tiles, as QuPath GeoJSON features under
# the target's name, and its nuclei as the run wrote them into QuPath (``nuclei``: parallel arrays of x, y in level-0
# px rounded to 0.1 px and an index into the target's class names; a TMA's cells as GeoJSON features would outweigh
# all else). objects.geojson keeps the first target's results only (pdl1_import_results.groovy imports it under one
# "PD-L1 analysis" annotation); each target's own are under it in QuPath. `pdl1 review-queue` lists regions from
# this file, the report draws them, and `pdl1 train --from-review` tells a person's review in every target from the
# run's output by it (bridge.labels.WrittenObjects), each reading it through run_target_regions.
TARGET_REGIONS_FILE = "target_regions.json"
# Nuclei positions are kept to this many decimals of a level-0 px (a 0.05 px error; a review is matched within 1 px).
NUCLEI_XY_DECIMALS = 1


def target_regions_path(geojson: Path) -> Path:
    """Where every target's regions go beside an image's GeoJSON (:data:`TARGET_REGIONS_FILE`): in a project
    entry's sidecar folder, or ``OUT/<stem>.target_regions.json`` beside ``OUT/<stem>.geojson``."""
    if geojson.name == "objects.geojson":
        return geojson.with_name(TARGET_REGIONS_FILE)
    return geojson.with_name(f"{geojson.stem}.{TARGET_REGIONS_FILE}")


@dataclass(frozen=True)
class TargetNuclei:
    """A target's nuclei as a run wrote them into QuPath: positions and class names.

    ``xy``: (N, 2) float64, level-0 px; ``class_index``: (N,) int, into ``class_names`` (QuPath's class names, as
    ``bridge.objects.qupath_classes`` gives them).

    >>> n = TargetNuclei(np.array([[10.0, 20.0], [30.5, 40.0]]), np.array([1, 0]), ("Tumor: Positive", "Other"))
    >>> n.classes
    ('Other', 'Tumor: Positive')
    """

    xy: np.ndarray
    class_index: np.ndarray
    class_names: tuple[str, ...]

    @classmethod
    def none(cls) -> TargetNuclei:
        """No nuclei (a target the nuclei model did not run on, or whose nuclei were not written).

        >>> len(TargetNuclei.none().xy), TargetNuclei.none().classes
        (0, ())
        """
        return cls(np.zeros((0, 2)), np.zeros(0, np.int64), ())

    @property
    def classes(self) -> tuple[str, ...]:
        """Each nucleus's class name."""
        return tuple(self.class_names[int(i)] for i in self.class_index)

    def to_json(self) -> dict[str, Any]:
        """The ``nuclei`` member of a target in :data:`TARGET_REGIONS_FILE`.

        >>> TargetNuclei(np.array([[10.04, 20.06]]), np.array([0]), ("Other",)).to_json()
        {'class_names': ['Other'], 'x': [10.0], 'y': [20.1], 'class': [0]}
        """
        xy = np.round(np.asarray(self.xy, np.float64).reshape(-1, 2), NUCLEI_XY_DECIMALS)
        if not np.isfinite(xy).all():
            raise ValueError("a nucleus position is not a finite number")
        return {
            "class_names": list(self.class_names),
            "x": xy[:, 0].tolist(),
            "y": xy[:, 1].tolist(),
            "class": [int(i) for i in self.class_index],
        }

    @classmethod
    def from_json(cls, data: Any) -> TargetNuclei:
        """From a ``nuclei`` member; one that is not one raises ValueError saying what is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"nuclei are not an object of arrays: {data!r:.80}")
        try:
            names = tuple(str(n) for n in data["class_names"])
            x = np.asarray(data["x"], np.float64)
            y = np.asarray(data["y"], np.float64)
            index = np.asarray(data["class"], np.int64)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"nuclei without arrays 'x', 'y', 'class' and 'class_names' ({err!r})") from err
        if not (x.ndim == y.ndim == index.ndim == 1 and len(x) == len(y) == len(index)):
            raise ValueError(f"nuclei arrays of different lengths: x {x.shape}, y {y.shape}, class {index.shape}")
        if len(index) and (index.min() < 0 or index.max() >= len(names)):
            raise ValueError(f"a nucleus class index outside the {len(names)} class names")
        return cls(np.column_stack([x, y]).reshape(-1, 2), index, names)


@dataclass(frozen=True)
class TargetRegions:
    """What :data:`TARGET_REGIONS_FILE` holds: the run that wrote it and each analysed target's name (as
    :func:`target_labels` gives it) with its objects; ``nuclei``: each target's nuclei in the same order."""

    run_id: str | None
    targets: tuple[tuple[str, tuple[QuPathObject, ...]], ...]
    nuclei: tuple[TargetNuclei, ...]


def write_target_regions(
    path: Path,
    *,
    run_id: str | None,
    targets: Iterable[tuple[str, Iterable[QuPathObject]]],
    nuclei: Sequence[TargetNuclei],
) -> Path:
    """Write :data:`TARGET_REGIONS_FILE` atomically; each object is checked as QuPath's reader would.

    ``nuclei``: each target's, in the targets' order."""
    record = target_regions_record(run_id=run_id, targets=targets, nuclei=nuclei)
    with replace_atomically(path) as fh:
        json.dump(record, fh, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return path


def target_regions_record(
    *, run_id: str | None, targets: Iterable[tuple[str, Iterable[QuPathObject]]], nuclei: Sequence[TargetNuclei]
) -> dict[str, Any]:
    """What :data:`TARGET_REGIONS_FILE` holds (:func:`write_target_regions`), each object checked as QuPath's reader
    would."""
    record = {
        "run_id": run_id,
        "targets": [{"target": name, "features": [to_feature(o) for o in objects]} for name, objects in targets],
    }
    if len(nuclei) != len(record["targets"]):
        raise ValueError(f"nuclei of {len(nuclei)} targets for {len(record['targets'])} targets")
    for target, kept in zip(record["targets"], nuclei, strict=True):
        target["nuclei"] = kept.to_json()
    for target in record["targets"]:
        for feature in target["features"]:
            validate_feature(feature)
    return record


def read_target_regions(path: Path) -> TargetRegions:
    """Read :data:`TARGET_REGIONS_FILE`; a file that is not one raises ValueError saying what is wrong."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("targets"), list):
        raise ValueError("not a list of targets' regions (no 'targets' list)")
    out, nuclei = [], []
    for target in data["targets"]:
        if not isinstance(target, dict) or not isinstance(target.get("features"), list):
            raise ValueError(f"a target without a list of features: {target!r:.80}")
        out.append((str(target.get("target")), tuple(from_feature(f) for f in target["features"])))
        try:
            nuclei.append(TargetNuclei.from_json(target.get("nuclei")))
        except ValueError as err:
            raise ValueError(f"target {target.get('target')!r}: {err}") from err
    run_id = data.get("run_id")
    return TargetRegions(None if run_id is None else str(run_id), tuple(out), tuple(nuclei))


# What :func:`run_target_regions` found (``RunTargetRegions.state``).
OF_THE_RUN = "of the run"  # there, readable and of the summary's run: every target's output is at hand
NO_FILE = "missing"  # not there: a run of an earlier version, or of one target
OF_ANOTHER_RUN = "of another run"  # left by an earlier run (one stopped between its files, or since run again)
UNREADABLE = "unreadable"  # there but not readable: cut short, hand-edited, not UTF-8


@dataclass(frozen=True)
class RunTargetRegions:
    """:data:`TARGET_REGIONS_FILE` as :func:`run_target_regions` found it for a summary's run.

    ``record``: what it holds, only where ``state`` is :data:`OF_THE_RUN`; else None, ``state`` is :data:`NO_FILE`,
    :data:`OF_ANOTHER_RUN` or :data:`UNREADABLE`, and ``why`` says so naming the file (the one wording the report,
    ``pdl1 review-queue`` and ``pdl1 train --from-review`` give, each adding what it does about it and the fix)."""

    path: Path
    state: str
    record: TargetRegions | None = None
    why: str = ""


def run_target_regions(path: Path, summary: dict[str, Any]) -> RunTargetRegions:
    """Every target's output of the run ``summary`` (an image's ``summary.json``) describes: :data:`TARGET_REGIONS_FILE`
    at ``path`` where it is there, reads and was written by that run (the same ``run_id``); otherwise why not. Never
    raises for the file: what a file that does not read means (refuse, fall back, note) is the caller's.

    >>> found = run_target_regions(Path("no such folder") / TARGET_REGIONS_FILE, {"run_id": "r2"})
    >>> found.state, found.record is None
    ('missing', True)
    >>> found.why.startswith("there is no no such folder")
    True
    """
    if not path.is_file():
        return RunTargetRegions(
            path, NO_FILE, why=f"there is no {path} (an earlier version kept the first target's output alone)"
        )
    try:
        record = read_target_regions(path)
    except (OSError, ValueError) as err:  # GeoJsonError, JSONDecodeError and UnicodeDecodeError are ValueErrors
        return RunTargetRegions(path, UNREADABLE, why=f"{path} does not read ({err})")
    if record.run_id != summary.get("run_id"):
        why = f"{path} is of run {record.run_id}, not of the summary's ({summary.get('run_id')})"
        return RunTargetRegions(path, OF_ANOTHER_RUN, why=why)
    return RunTargetRegions(path, OF_THE_RUN, record)
