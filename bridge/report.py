"""``pdl1 report``: HTML and CSV over a project's (or output folder's) results, with overlay thumbnails.

Built from the files every run writes (QuPath GeoJSON + summary JSON per image), so it works
with and without QuPath; in a project, also from the records ``pdl1_analyze.groovy`` saves of its analyses in QuPath
(``<project>/pdl1/<entry ID>/qupath_analyses/``, :mod:`bridge.record_summary`): an entry's records are its targets'
results, the newer of them and a ``pdl1 run`` summary is reported, and each image says which (``results_from``).
Thumbnails show the slide with PD-L1 positive regions (orange), SUA false-negative candidates (magenta) and the
predictive entropy of the uncertainty tiles; an image of several targets (TMA cores, annotations) gets a table of
each one's score, and its thumbnail their named outlines.
"""

from __future__ import annotations

import csv
import html
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any, TextIO
from urllib.parse import quote

import numpy as np
from shapely.geometry import Point

from bridge.analysis_record import QUPATH_ANALYSES
from bridge.atomic import replace_atomically, save_figure
from bridge.classes import INTENSITY_CLASSES, PDL1_FN_CANDIDATE
from bridge.pairs import PAIRS_FILE
from bridge.project import (
    PDL1_DIR,
    QUPATH_URI_FIX,
    STATUS_FILE,
    ProjectError,
    RunStatus,
    find_project_file,
    first_names,
    locate_image,
    not_a_folder,
    read_project,
    review_reason_text,
    summary_problem,
)
from bridge.qupath_geojson import GeoJsonError, QuPathObject, keep_detections_of, read_features
from bridge.record_summary import RUN, SCRIPT, RecordsSummary, entry_summary_from_records, newer_source
from bridge.review_advice import RUN_STAIN_FIX, SCRIPT_STAIN_FIX, review_advice
from bridge.run_lock import output_folder_lock, run_in_progress
from bridge.targets import (
    MISSING,
    RUN_IMAGE_AGAIN,
    TARGETS_FILE,
    UNREADABLE,
    TargetNuclei,
    TargetRow,
    analysed_targets,
    rows_from_summary,
    run_target_regions,
    spreadsheet_row,
    target_labels,
    target_regions_path,
    targets_review_reasons,
    write_target_table,
)
from inference import (
    INSUFFICIENT,
    MIN_TUMOUR_NUCLEI,
    Pdl1Error,
    cps_shown,
    cps_text,
    demo_model_checksums,
    open_slide,
    tps_range_text,
    tps_text,
)

log = logging.getLogger(__name__)

# The head of every report.html: it tells a folder holding an earlier report (--out) from one of other files.
REPORT_TITLE = "<title>pdl1-bridge report</title>"
# Made in a report's folder before its first file: a report stopped before its report.html is told by it.
REPORT_MARK = ".pdl1-report"
THUMBNAIL_JPEG_QUALITY = 88
# A report's thumbnails: JPEG now, PNG before 2026-12-07 (its own, in a folder it wrote).
_THUMBNAILS = (".jpg", ".png")

COLUMNS = (
    "image",
    "entry_id",  # QuPath's entry ID (projects only): two entries may share an image name
    "stain",
    "mpp",
    "analysed_at",
    "tps_percent",
    "tps_category",
    "cps",
    "cps_category",
    "positive_area_pct",
    "uncertainty_flag",
    "review_reasons",
    "out_of_domain_score",
    "stain_distance_deg",
    "sua_candidates",
    "tumor_positive",
    "tumor_negative",
    "other",
    "run_id",
    "models",
    # The error of the last run, which failed on the image: the results are an earlier run's, or, where it has
    # none (run_id and every number empty), the row says only that.
    "last_run_failed",
    # Why an image has no numbers in the report though a run analysed it: its summary does not read (the warning's
    # words, with the fix); every number empty. The HTML names it among what it left out; the CSV had no row.
    "left_out",
    # Where the numbers come from: "pdl1 run", or pdl1_analyze.groovy's analyses in QuPath (bridge.record_summary).
    "results_from",
)


@dataclass(frozen=True)
class ReportItem:
    image_name: str
    slide: Path | None
    geojson: Path
    summary: dict
    not_found: str = ""  # why ``slide`` is None: where the image was looked for, and the fix
    last_run_failed: str = ""  # the error of the last run, which failed on this image: these results are older
    entry_id: str = ""  # QuPath's entry ID, "" for a plain-slides output folder (one summary per file name there)
    has_results: bool = True  # False: the last run failed on it and no earlier run left results (summary is {})
    left_out: str = ""  # why it has no results here though it was analysed (its summary does not read)
    results_from: str = RUN  # what the numbers come from (bridge.record_summary.newer_source's text)
    # From pdl1_analyze.groovy's records (None: from a run's files): what the thumbnail draws, their FN candidates
    # and graded cells (a record keeps no region outlines nor tiles).
    overlay: tuple[QuPathObject, ...] | None = None


def collect(source: Path, left_out: list[str] | None = None) -> list[ReportItem]:
    """Results of a project (``<project>/pdl1/<entry>/``) or of a plain-slides output folder.

    A damaged summary (cut short by a kill, or not a pdl1 summary) leaves its image out with a warning
    that names the file and the fix, and the others are reported; ``left_out`` collects those warnings.
    So does an image the last run failed on that has no earlier results: it is named with its error, not
    passed over as if it had never been in the run, and it is collected without results (``has_results``
    False: a row of report.csv with its error, no section of the HTML). One with earlier results is reported with
    its failure. An entry's records of ``pdl1_analyze.groovy`` are its results where it has no summary, or where they
    are newer than its summary (:func:`bridge.record_summary.newer_source`); a record that does not read, or was
    saved without its scores, is named in ``left_out`` and the entry's other results are reported.
    """
    items = []
    left_out = [] if left_out is None else left_out
    try:
        qpproj = find_project_file(source)
    except ProjectError:  # not a project: a plain-slides output folder
        qpproj = None
    if qpproj is not None:
        info = read_project(qpproj, unreadable_entries="keep")  # those have no results to report
        fix = f"run {_rerun(source)}, which analyses again the images whose results are damaged"
        failed = _failed_in_last_run(info.folder)
        not_analysed: list[str] = []
        for entry in info.entries:
            folder = info.folder / PDL1_DIR / entry.entry_id
            name = f"{entry.image_name} (QuPath entry {entry.entry_id})"
            records = entry_summary_from_records(folder, image=entry.image_name, entry_id=entry.entry_id)
            problems = [f"{name}: {problem}" for problem in records.problems()]
            for problem in problems:
                _leave_out(left_out, problem)
            has_summary = (folder / "summary.json").is_file()
            if records.summary is not None and not has_summary:
                items.append(_from_records(entry, records, info, newer_source(None, records)[1]))
                continue
            if not has_summary:
                if entry.entry_id in failed:
                    error = failed[entry.entry_id][1]
                    _leave_out(left_out, _failed_without_results(name, error, source))
                    items.append(_without_results(entry.image_name, folder / "objects.geojson", error, entry.entry_id))
                elif problems:  # analysed in QuPath, its records named above as not reading
                    why = "; ".join(problems)
                    items.append(
                        _without_results(entry.image_name, folder / "objects.geojson", "", entry.entry_id, left_out=why)
                    )
                else:  # a run stopped before it, or added since: a row saying so (the report read as the project's)
                    not_analysed.append(name)
                    why = f"not analysed: no results; run {_rerun(source)}, which analyses the images not done"
                    items.append(
                        _without_results(entry.image_name, folder / "objects.geojson", "", entry.entry_id, left_out=why)
                    )
                continue
            summary, why = _read_summary(folder / "summary.json", fix, left_out, records.summary is not None)
            source_kind, results_from = newer_source(summary, records)
            if source_kind == SCRIPT:
                items.append(_from_records(entry, records, info, results_from))
                continue
            if summary is None:
                error = failed.get(entry.entry_id, ("", ""))[1]
                geojson = folder / "objects.geojson"
                items.append(_without_results(entry.image_name, geojson, error, entry.entry_id, left_out=why))
                continue
            slide, not_found = _slide(entry, info)
            error = failed.get(entry.entry_id, ("", ""))[1]
            _warn_earlier_results(entry.image_name, error, summary, source)
            other = _analysed_another_file(summary, entry)
            if slide is None and other is None:
                # The file the run analysed, where it found a moved image (--search-dir, which the report lacks).
                slide = _analysed_file(summary)
                not_found = "" if slide is not None else not_found
            if other is not None:
                # The entry was pointed at another file since (Project > Set image URI): its thumbnail with those
                # results drawn over it showed the other file's regions and cells on this one.
                slide, not_found = (
                    None,
                    (
                        f"the results are of {other}, analysed before the entry was pointed at {entry.path.name}; "
                        f"run {_rerun(source)}, which analyses it again"
                    ),
                )
                log.warning("%s: %s", entry.image_name, not_found)
            items.append(
                ReportItem(
                    entry.image_name,
                    slide,
                    folder / "objects.geojson",
                    summary,
                    not_found,
                    error,
                    entry.entry_id,
                    results_from=results_from,
                )
            )
        never_run = not (info.folder / PDL1_DIR / STATUS_FILE).exists()
        if not_analysed and len(not_analysed) == len(info.entries) and never_run:
            # Never run here (no run's status): the "no results" error says so, not a warning of a run that stopped.
            left_out.append(f"no image of the project has been analysed yet: run `pdl1 run {source}`")
        elif not_analysed:
            shown = first_names(not_analysed)
            _leave_out(
                left_out,
                f"{len(not_analysed)} of the project's {len(info.entries)} images have no results, not analysed (a run "
                f"stopped before them, or they were added since): {shown}; run {_rerun(source)}, which analyses the "
                "images not done",
            )
        return items
    fix = f"run {_rerun(source)}, which analyses again the slides whose results are damaged"
    failed = _failed_in_last_run(Path(source))  # keyed by the slide's stem, as its summary is named
    by_file: dict[str, ReportItem] = {}  # by summary file name, the order the report lists them in
    for key, (name, error) in failed.items():
        if not (Path(source) / f"{key}.summary.json").is_file():
            _leave_out(left_out, _failed_without_results(name, error, source))
            by_file[f"{key}.summary.json"] = _without_results(name, Path(source) / f"{key}.geojson", error)
    for summary_path in sorted(Path(source).glob("*.summary.json")):
        summary, why = _read_summary(summary_path, fix, left_out)
        if summary is None:  # named by its file: the image's path is in the summary that does not read
            key = summary_path.name.removesuffix(".summary.json")
            geojson = summary_path.with_name(f"{key}.geojson")
            error = failed.get(key, ("", ""))[1]
            by_file[summary_path.name] = _without_results(summary_path.name, geojson, error, left_out=why)
            continue
        image = Path(summary["image"])
        found = image.is_file()
        error = failed.get(summary_path.name.removesuffix(".summary.json"), ("", ""))[1]
        _warn_earlier_results(image.name, error, summary, source)
        by_file[summary_path.name] = ReportItem(
            image.name,
            image if found else None,
            summary_path.with_name(summary_path.name.replace(".summary.json", ".geojson")),
            summary,
            "" if found else f"no image at {image}, where it was analysed (moved, renamed or on another machine?)",
            error,
        )
    # Those without results among the others, in the order of the summaries' names.
    return [by_file[name] for name in sorted(by_file)]


def _slide(entry, info) -> tuple[Path | None, str]:
    """A project entry's image file, or None and why not (``ReportItem.not_found``): moved, or not a file (a
    server's URI), which costs that image its thumbnail, not the report."""
    try:
        # pdl1 report has no --search-dir: the image is found where the project says, or its fix is in QuPath.
        found = locate_image(
            entry,
            project_folder=info.folder,
            saved_folder=info.saved_folder,
            find_it=f"{QUPATH_URI_FIX}, then run pdl1 report again",
        )
        return found, ""
    except (FileNotFoundError, ProjectError) as err:
        return None, str(err)


def _from_records(entry, records: RecordsSummary, info, results_from: str) -> ReportItem:
    """The item of an entry reported from its records of ``pdl1_analyze.groovy``: their summary, and their FN
    candidates and graded cells to draw."""
    slide, not_found = _slide(entry, info)
    overlay = [
        QuPathObject(c, "annotation", PDL1_FN_CANDIDATE.name, {}) for _, r in records.records for c in r.candidates
    ] + _graded_cells(r.nuclei for _, r in records.records)
    folder = info.folder / PDL1_DIR / entry.entry_id
    return ReportItem(
        entry.image_name,
        slide,
        folder / QUPATH_ANALYSES,
        records.summary or {},
        not_found,
        entry_id=entry.entry_id,
        results_from=results_from,
        overlay=tuple(overlay),
    )


def _without_results(name: str, geojson: Path, error: str, entry_id: str = "", *, left_out: str = "") -> ReportItem:
    """An image with no results to report (``geojson``: where they would be): the last run failed on it and no
    earlier run left any (``error``), or its summary does not read (``left_out``: why, with the fix)."""
    return ReportItem(
        name, None, geojson, {}, last_run_failed=error, entry_id=entry_id, has_results=False, left_out=left_out
    )


def _failed_in_last_run(folder: Path) -> dict[str, tuple[str, str]]:
    """Key (entry ID, or a plain slide's stem) → (image name, error) of the images the last `pdl1 run` of them
    failed on (``pdl1/status.json``); none where there is no status, or where it does not read (the report needs
    it only for this, so that is a warning)."""
    try:
        status = RunStatus(folder)
    except ProjectError as err:
        log.warning("%s; the report cannot tell which images the last run failed on", err)
        return {}
    return {key: (str(status.images[key].get("image") or key), error) for key, error in status.failed().items()}


def _failed_without_results(name: str, error: str, source: Path) -> str:
    """Why an image the last run failed on, with no earlier results, has no results in the report (report.csv gives
    it a row with the error alone), and the fix."""
    return (
        f"{name}: the last run failed on it ({error}) and it has no earlier results, so this report has no results "
        f"for it; fix the cause and run {_rerun(source)}"
    )


def _analysed_file(summary: dict) -> Path | None:
    """The file a run analysed (its summary's ``image``) where it is one here, else None."""
    analysed = summary.get("image")
    if not isinstance(analysed, str) or not analysed:
        return None
    try:
        return Path(analysed) if Path(analysed).is_file() else None
    except (OSError, ValueError):  # a path this system cannot state (a NUL, a name too long)
        return None


def _analysed_another_file(summary: dict, entry) -> str | None:
    """The name of the file a project entry's results were analysed from where it is not the entry's file now (the
    entry pointed at another since), else None. By name: a project moved with its slides finds them elsewhere."""
    analysed = summary.get("image")
    if not isinstance(analysed, str) or not analysed:
        return None
    try:
        now = entry.path.name
    except (ProjectError, ValueError):  # a URI that is no file: nothing to compare
        return None
    then = PureWindowsPath(analysed).name  # either separator: a project made on Windows states Windows paths
    return then if then != now else None


def _warn_earlier_results(name: str, error: str, summary: dict, source: Path) -> None:
    """A re-run that failed keeps the earlier results: reported, but not as the last run's."""
    if error:
        log.warning(
            "%s: the last run failed on it (%s); the results reported are an earlier run's (run %s); "
            "run %s once the cause is fixed",
            name,
            error,
            summary.get("run_id"),
            _rerun(source),
        )


def _rerun(source: Path) -> str:
    """The command that writes a run's results again where they are damaged (``--resume`` checks them)."""
    try:
        find_project_file(source)
    except ProjectError:
        return f"the same `pdl1 run SLIDES... --out {source}` with --resume"
    return f"`pdl1 run {source} --resume`"


def _read_summary(path: Path, fix: str, left_out: list[str], records: bool = False) -> tuple[dict | None, str]:
    """A run's summary JSON and "", or None and why when it is damaged: then the warning names it and the fix
    (``records``: the entry's records of pdl1_analyze.groovy are reported instead)."""
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # cut short, not UTF-8 or unreadable
        problem: str | None = f"does not read ({err})"
    else:
        problem = summary_problem(summary)
    if problem is None:
        return summary, ""
    instead = "its records of pdl1_analyze.groovy are reported instead" if records else "its image is left out"
    why = f"{path} {problem}, so {instead} of the report; {fix}"
    _leave_out(left_out, why)
    return None, why


def _leave_out(left_out: list[str], message: str) -> None:
    log.warning("%s", message)
    left_out.append(message)


# Positive tumour cells of an IHC on its thumbnail: yellow 1+, orange 2+, red 3+ (their QuPath colours).
_GRADE_COLOURS = {c.name: tuple(v / 255 for v in c.rgb) for c in INTENSITY_CLASSES}


# Target outlines on the thumbnail: blue, thicker with a yellow label where the target needs review, grey dashed for a
# TMA core marked missing (colours the overlays do not use).
_TARGET_COLOUR = (0.1, 0.45, 1.0)
_MISSING_COLOUR = (0.45, 0.45, 0.45)


def _thumbnail(
    item: ReportItem, out: Path, targets: Sequence[TargetRow] = (), *, max_px: int = 900
) -> tuple[Path, bool] | None:
    """The overlay picture of an image and whether it shows every target's results (:func:`_overlay_objects`); None
    without a slide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Polygon as MplPolygon

    if item.slide is None:
        return None
    with open_slide(item.slide, mpp=item.summary.get("mpp")) as slide:
        width, height = slide.dimensions
        mpp = slide.mpp.mean * max(width, height) / max_px
        thumb = slide.thumbnail(mpp=mpp)
    scale = thumb.shape[1] / width
    fig, ax = plt.subplots(figsize=(thumb.shape[1] / 100, thumb.shape[0] / 100), dpi=100)
    ax.imshow(thumb)
    tiles, entropy, regions, candidates = [], [], [], []
    graded: dict[str, list[tuple[float, float]]] = {}  # an IHC's positive tumour cells, by grade
    objects, every_target = _overlay_objects(item)
    for obj in objects:
        if obj.object_type == "detection" and obj.classification in _GRADE_COLOURS:
            graded.setdefault(obj.classification, []).append((obj.geometry.x * scale, obj.geometry.y * scale))
        elif obj.object_type == "tile":
            # Its outline: a square cell, or one trimmed to the analysed ROI (in parts where the ROI cuts it so).
            for poly in getattr(obj.geometry, "geoms", [obj.geometry]):
                tiles.append(MplPolygon(np.asarray(poly.exterior.coords) * scale, closed=True))
                entropy.append(obj.measurements.get("Predictive entropy", 0.0))
        elif obj.object_type == "annotation" and obj.classification in ("PD-L1 positive", "PD-L1 FN candidate"):
            polys = getattr(obj.geometry, "geoms", [obj.geometry])
            target = regions if obj.classification == "PD-L1 positive" else candidates
            for poly in polys:
                for ring in (poly.exterior, *poly.interiors):  # holes are outlined too
                    target.append(MplPolygon(np.asarray(ring.coords) * scale, closed=True))
    if tiles:
        pc = PatchCollection(tiles, cmap="viridis", alpha=0.35, linewidths=0)
        pc.set_array(np.asarray(entropy))
        pc.set_clim(0, np.log(2))
        ax.add_collection(pc)
    ax.add_collection(PatchCollection(regions, facecolor="none", edgecolor=(1.0, 0.5, 0.0), linewidths=1.2))
    ax.add_collection(PatchCollection(candidates, facecolor="none", edgecolor=(0.9, 0.0, 0.9), linewidths=1.5))
    for name, points in graded.items():
        xy = np.asarray(points)
        ax.scatter(xy[:, 0], xy[:, 1], s=1.5, c=[_GRADE_COLOURS[name]], linewidths=0)
    _draw_targets(ax, targets, scale)
    ax.set_axis_off()
    fig.subplots_adjust(0, 0, 1, 1)
    if tiles:  # the entropy's colour scale, inside the picture's top-left corner
        bar = ax.inset_axes((0.02, 0.93, 0.3, 0.025))
        fig.colorbar(pc, cax=bar, orientation="horizontal")
        bar.set_title("predictive entropy (nats), 0 to ln 2", fontsize=7, pad=2)
        bar.tick_params(labelsize=6)
    # Per entry in a project: QuPath lets two entries share an image name (one file typed H&E and H-DAB, or
    # 1.svs from two cases' folders), and the second picture replaced the first.
    # Control characters (a newline in an image name) out: the mark lists the thumbnails a line each.
    stem = re.sub(r"[\x00-\x1f\x7f]", "_", Path(item.image_name).stem)
    # JPEG: a slide's picture, a tenth of a PNG's bytes and encoded in a tenth of its time (a PNG took half a
    # second and 1 MB an image: a report of 1000 images, minutes and a GB; helper-135).
    path = out / (f"{item.entry_id}-{stem}.jpg" if item.entry_id else f"{stem}.jpg")
    save_figure(fig, path, pil_kwargs={"quality": THUMBNAIL_JPEG_QUALITY})
    plt.close(fig)
    return path, every_target


# What to do about a target_regions.json that does not read (--resume keeps an image recorded as done).
_REGIONS_FIX = f"{RUN_IMAGE_AGAIN} to draw every target's"


def _overlay_objects(item: ReportItem) -> tuple[list[QuPathObject], bool]:
    """What the thumbnail draws, and whether it is every target's: the image's GeoJSON (the first target's objects
    where several were analysed), or, where the run left every target's results (:data:`TARGET_REGIONS_FILE`, of the
    summary's run), those: regions, SUA candidates, tiles and the cells of the classes the thumbnail draws (an IHC's
    graded ``Tumor: 1+`` ...). A missing file or one of another run: the GeoJSON alone (the note under the picture
    says whose results it shows); one that does not read: the GeoJSON alone, with a warning naming it and the fix. A
    GeoJSON that does not read (missing, cut short): :class:`GeoJsonError` naming it and the fix."""
    if item.overlay is not None:  # from pdl1_analyze.groovy's records: what they keep of every target
        return list(item.overlay), True
    try:
        objects = list(read_features(item.geojson, keep=_drawn))
    except (OSError, ValueError) as err:  # was "no thumbnail (Invalid control character at: ...)", naming no file
        raise GeoJsonError(
            f"{item.geojson} does not read ({err}); run the image again (`pdl1 run` with --resume analyses again "
            "an image whose results do not read)"
        ) from err
    found = run_target_regions(target_regions_path(item.geojson), item.summary)
    if found.state == UNREADABLE:
        log.warning("%s: the thumbnail shows the first target's results only; %s", found.why, _REGIONS_FIX)
    if found.record is None:  # missing or an earlier run's: the note under the picture says whose it shows
        return objects, False
    record = found.record
    return _graded_cells(record.nuclei) + [o for _, target_objects in record.targets for o in target_objects], True


# ``keep`` for the thumbnail's objects: regions, candidates and tiles, and of the nuclei only an IHC's graded positive
# cells (an H&E's, most of its file, are not drawn, so not parsed).
_drawn = keep_detections_of(lambda cls: cls in _GRADE_COLOURS)


def _graded_cells(nuclei: Iterable[TargetNuclei]) -> list[QuPathObject]:
    """The cells of the nuclei arrays (``target_regions.json``'s, a record's) that the thumbnail draws: an IHC's graded
    positive tumour cells (``Tumor: 1+`` ...), as point detections."""
    return [
        QuPathObject(Point(x, y), "detection", cls, {})
        for n in nuclei
        for (x, y), cls in zip(n.xy.tolist(), n.classes, strict=True)
        if cls in _GRADE_COLOURS
    ]


def _draw_targets(ax, targets: Sequence[TargetRow], scale: float) -> None:
    """Each target's outline, named above it, where the summary keeps it (runs before outlines were kept: none)."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Polygon as MplPolygon

    if not _per_target(targets):  # one annotation, or the whole image: its overlay says enough
        return
    for row, label in zip(targets, target_labels(targets), strict=True):
        if row.outline is None or row.outline.is_empty:
            continue
        missing = row.state == MISSING
        review = bool(row.needs_review)
        rings = [
            MplPolygon(np.asarray(poly.exterior.coords) * scale, closed=True)
            for poly in getattr(row.outline, "geoms", [row.outline])
            if hasattr(poly, "exterior")
        ]
        ax.add_collection(
            PatchCollection(
                rings,
                facecolor="none",
                edgecolor=_MISSING_COLOUR if missing else _TARGET_COLOUR,
                linewidths=2.2 if review else 1.0,
                linestyle="--" if missing else "-",
            )
        )
        minx, miny, maxx, _ = row.outline.bounds
        ax.text(
            (minx + maxx) / 2 * scale,
            miny * scale - 1,
            label,
            parse_math=False,  # user text: "$x_{$" in a name failed the picture as bad mathtext
            fontsize=6,
            ha="center",
            va="bottom",
            fontweight="bold" if review else "normal",
            color=_MISSING_COLOUR if missing else "black",
            bbox={"facecolor": "#ffd54f" if review else "white", "edgecolor": "none", "alpha": 0.8, "pad": 0.8},
        )


def write_report(
    source: str | Path, out: str | Path | None = None, *, on_progress: Callable[[int, int], None] | None = None
) -> tuple[Path, Path]:
    """Write ``report.html``, ``report.csv`` and ``targets.csv`` (default: ``<source>/pdl1/report/``); returns the
    paths of the first two. ``on_progress(done, total)`` is called with the images done so far before each image and
    once at the end (an image's thumbnail is most of the time: a slide read at a coarse level, seconds each on a real
    slide)."""
    source = Path(source)
    if not source.exists():
        raise ProjectError(f"{source}: no such project or output folder")
    if source.is_file() and ".qpproj" not in source.name:
        raise ProjectError(
            f"{source}: a file, not a project or a run's output folder; give the QuPath project (its folder or "
            "project.qpproj) or the --out folder of `pdl1 run SLIDES... --out DIR`"
        )
    problem = None if out is None else not_a_folder(Path(out))
    if problem is not None:  # said before the thumbnails are drawn, and before a bare "[Errno 17] File exists"
        raise ProjectError(f"--out {out} {problem}; the report is written into a folder (a missing one is made)")
    left_out: list[str] = []
    base = source if source.is_dir() else source.parent
    # A report takes no run lock (it may be made while a run goes on), so it says when one does: each image's files
    # are replaced whole, but the images the run has not reached yet are reported with their earlier results.
    running = run_in_progress(base)
    if running is not None:
        log.warning(
            "%s: a pdl1 run is writing these results (%s): images it has not reached yet are reported with their "
            "earlier results; make the report again when it has finished",
            base,
            running,
        )
    items = collect(source, left_out)
    if not any(item.has_results for item in items):
        raise ProjectError(
            f"no results under {source}: expected <project>/{PDL1_DIR}/<entry>/summary.json or "
            "<out>/<slide>.summary.json, which `pdl1 run PROJECT` or `pdl1 run SLIDES... --out DIR` write, or the "
            f"records of analyses in QuPath, <project>/{PDL1_DIR}/<entry>/{QUPATH_ANALYSES}/*.json, which "
            "pdl1_analyze.groovy saves"
            + "".join(f"; {m}" for m in left_out)  # what the last run failed on, or left damaged
        )
    given = out is not None
    out = Path(out) if given else base / PDL1_DIR / "report"
    # Under the report folder's lock, so no other report writes there: the .part files a killed report left of
    # its own files go first (bridge.run_lock.output_folder_lock says why a lock, not their age). A folder given
    # with --out that holds other files must hold an earlier report: its files of those names are replaced.
    with output_folder_lock(
        out,
        command="report",
        own=_report_file,
        written_before=_holds_a_report if given else None,
        writes="the report writes report.html, report.csv, targets.csv and a JPEG per image",
    ):
        return _write(out, items, base=base, source=source, left_out=left_out, running=running, on_progress=on_progress)


def _holds_a_report(folder: Path) -> bool:
    """Whether ``folder`` holds a report this command wrote (its report.html, by its title), or one it began (its
    mark: a report stopped before its report.html leaves thumbnails, and was then refused its own folder)."""
    if (folder / REPORT_MARK).is_file():
        return True
    try:
        with (folder / "report.html").open(encoding="utf-8", errors="replace") as fh:
            return REPORT_TITLE in fh.read(500)
    except OSError:
        return False


def _report_file(name: str) -> bool:
    """Whether ``name`` is one of the files a report writes into its folder: report.html, report.csv, targets.csv,
    thumbnails and the mark listing them."""
    return name in ("report.html", "report.csv", TARGETS_FILE, REPORT_MARK) or name.lower().endswith(_THUMBNAILS)


def _write(
    out: Path,
    items: list[ReportItem],
    *,
    base: Path,
    source: Path,
    left_out: list[str],
    running: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[Path, Path]:
    """write_report's files, in ``out`` (its lock held); ``running``: who was running ``pdl1 run`` there."""
    drawn_before = _thumbnails_listed(out / REPORT_MARK)
    listed = set(drawn_before)  # the mark's list while drawing: the earlier report's and this one's so far
    _own_mark(out / REPORT_MARK).close()  # before the thumbnails: a report stopped among them can be made again here
    rows = []
    all_targets: list[TargetRow] = []  # the report folder's targets.csv
    failed_before: dict[int, str] = {}  # by id() of all_targets' rows: the last run's error on their image
    demo_checksums = set(demo_model_checksums().values())
    for done, item in enumerate(items):
        if on_progress is not None:
            on_progress(done, len(items))
        if not item.has_results:  # a row of report.csv with its error and no numbers; the HTML names it above
            rows.append(
                {
                    "image": item.image_name,
                    "entry_id": item.entry_id,
                    "last_run_failed": item.last_run_failed,
                    "left_out": item.left_out,
                }
            )
            continue
        s = item.summary
        targets = _targets_of(item, left_out)
        all_targets.extend(targets)
        failed_before.update((id(t), item.last_run_failed) for t in targets)
        nuclei = s.get("nuclei", {})
        provenance = s.get("provenance") if isinstance(s.get("provenance"), dict) else {}  # hand-edited: none
        models = [provenance.get(k) for k in ("seg_model", "nuclei_model")]
        models = [m for m in models if isinstance(m, dict)]
        rows.append(
            {
                "image": item.image_name,
                "entry_id": item.entry_id,
                "stain": s.get("stain", "H&E"),
                "mpp": s.get("mpp"),
                "analysed_at": None if provenance.get("analysed_at") is None else str(provenance["analysed_at"]),
                "models": "; ".join(_model_label(m, demo_checksums) for m in models),
                "demo_models": any(m.get("sha256") in demo_checksums for m in models),
                "tps_percent": s.get("tps_percent"),
                "tps_category": s.get("tps_category"),
                "tps_low": _details(s).get("tps_low"),
                "tps_high": _details(s).get("tps_high"),
                "cps": s.get("cps"),
                "cps_category": _image_cps_category(s),
                "review_reasons": "; ".join(_review_reasons(s, targets)),
                "positive_area_pct": s.get("positive_area_pct"),
                "uncertainty_flag": int(bool(s.get("uncertainty_flag"))),
                "out_of_domain_score": (_details(s).get("domain") or {}).get("out_of_domain_score"),
                "stain_distance_deg": (_details(s).get("domain") or {}).get("stain_distance_deg"),
                "domain": _domain_text(_details(s).get("domain")),
                "domain_target": (_details(s).get("domain") or {}).get("target"),
                "sua_candidates": s.get("sua_candidates"),
                "tumor_positive": nuclei.get("Tumor: Positive"),
                "tumor_negative": nuclei.get("Tumor: Negative"),
                "other": nuclei.get("Other"),
                "run_id": s.get("run_id"),
                **_thumbnail_or_none(item, out, targets, left_out),
                "last_run_failed": item.last_run_failed,
                "results_from": item.results_from,
                "from_records": item.overlay is not None,
                "targets": targets,
            }
        )
        thumbnail = rows[-1].get("thumbnail")
        if thumbnail is not None and thumbnail.name not in listed:  # listed as drawn: a killed report's are known
            listed.add(thumbnail.name)
            with _own_mark(out / REPORT_MARK) as fh:  # a line added, not the list written again
                fh.write(f"{thumbnail.name}\n")
    if on_progress is not None:
        on_progress(len(items), len(items))
    html_path, csv_path = out / "report.html", out / "report.csv"
    pairs_path = base / PDL1_DIR / PAIRS_FILE
    pairs = _read_pairs(pairs_path, f"run {_rerun(source)}, which compares the cases again", left_out)
    page = _html([r for r, item in zip(rows, items, strict=True) if item.has_results], pairs, left_out, running)
    # Each replaced whole, in UTF-8: written in place, an interrupt (or, on Windows, an image name outside the
    # console's code page) left a report.csv cut short that still read as a complete table.
    with replace_atomically(csv_path, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore", restval="")
        writer.writeheader()
        writer.writerows(spreadsheet_row(row) for row in rows)
    # Beside report.csv, from the same summaries as the HTML's tables, so a report written elsewhere (--out) carries
    # each target's row too; the run's pdl1/targets.csv has only the images that run analysed or kept.
    write_target_table(out / TARGETS_FILE, all_targets, last_run_failed=lambda row: failed_before[id(row)])
    with replace_atomically(html_path) as fh:
        fh.write(page)
    _forget_old_thumbnails(out, drawn_before, {row["thumbnail"].name for row in rows if row.get("thumbnail")})
    return html_path, csv_path


def _own_mark(mark: Path) -> TextIO:
    """The report's mark opened to add to, made where there is none; never a file a link there leads to: a link
    planted in the report folder had each thumbnail's name added to the file it led to (a shell's start-up file)."""
    if mark.is_symlink():
        mark.unlink()
    fd = os.open(mark, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    return open(fd, "a", encoding="utf-8")


def _thumbnails_listed(mark: Path) -> set[str]:
    """The thumbnails an earlier report here drew, as its mark lists them (none in a mark written before the list)."""
    try:
        names = mark.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return set()
    return {n for n in names if n.lower().endswith(_THUMBNAILS) and Path(n).name == n}


def _forget_old_thumbnails(out: Path, drawn_before: set[str], drawn: set[str]) -> None:
    """List this report's thumbnails in its mark, then remove those an earlier report drew here that this one did
    not (an entry removed from the project, or a slide no longer found): they stayed beside the report, pictures
    of nothing it reports. Only files a report listed as its own go; a PNG of the user's is left alone."""
    with replace_atomically(out / REPORT_MARK) as fh:
        fh.write("".join(f"{name}\n" for name in sorted(drawn)))
    for name in sorted(drawn_before - drawn):
        try:
            (out / name).unlink(missing_ok=True)
        except OSError as err:  # one stale picture is not worth the report
            log.warning("%s: an earlier report's thumbnail, not this one's, could not be removed (%s)", out / name, err)


def _review_reasons(summary: dict, targets: Sequence[TargetRow]) -> tuple[str, ...]:
    """The image's review reasons, each with its value and limit: where several targets were analysed, each flagged
    one's led by its name (also of a summary whose ``details`` held the first target's only), as ``pdl1 run``'s
    closing lines and ``pdl1 review-queue`` say them; else the summary's."""
    if len(_analysed(targets)) > 1:
        return targets_review_reasons(targets)
    return tuple(review_reason_text(r) for r in _details(summary).get("review_reasons", []))


def _targets_of(item: ReportItem, left_out: list[str]) -> list[TargetRow]:
    """The targets its summary lists (none in a summary written before they were listed); none, with a warning,
    where they do not read (the image's own numbers are still reported)."""
    try:
        return rows_from_summary(item.summary)
    except (ValueError, TypeError, AttributeError) as err:  # hand-edited or damaged: not a list of target objects
        _leave_out(
            left_out,
            f"{item.image_name}: its per-target results do not read ({err}), so they are left out; its image's "
            f"numbers are reported; run the image again to write them",
        )
        return []


def _thumbnail_or_none(item: ReportItem, out: Path, targets: list[TargetRow], left_out: list[str]) -> dict:
    """A report row's ``thumbnail`` (the overlay's path; None, with a warning, when the slide or the GeoJSON does not
    read: one image's picture, not the report) and ``overlay_every_target``; a slide that is not where it was
    analysed is named, not only "slide not found" in the HTML."""

    def none(why: str) -> dict:  # the HTML says why beside the numbers (it said "slide not found" for every cause)
        return {"thumbnail": None, "overlay_every_target": False, "no_thumbnail": why}

    if item.slide is None:
        _leave_out(left_out, f"{item.image_name}: no thumbnail: {item.not_found}; its numbers are reported")
        return none(str(item.not_found))
    try:
        drawn = _thumbnail(item, out, targets)
    except (Pdl1Error, OSError, ValueError) as err:
        _leave_out(left_out, f"{item.image_name}: no thumbnail ({err}); its numbers are reported")
        return none(str(err))
    if drawn is None:
        return none(str(item.not_found or "no slide"))
    return {"thumbnail": drawn[0], "overlay_every_target": drawn[1]}


def _details(summary: dict) -> dict:
    """A summary's ``details`` ({} where it holds none, or null, which summaries may)."""
    return summary.get("details") or {}


def _read_pairs(path: Path, fix: str, left_out: list[str]) -> dict:
    """The cases of ``pairs.json`` (none without one); none, with a warning, when it is damaged (every run
    writes it again)."""
    if not path.is_file():
        return {}
    try:
        cases = json.loads(path.read_text(encoding="utf-8")).get("cases")
    except (OSError, ValueError, AttributeError) as err:  # cut short, unreadable, or not a JSON object
        problem = f"does not read ({err})" if not isinstance(err, AttributeError) else "is not a JSON object"
    else:
        if isinstance(cases, dict) and all(isinstance(c, dict) for c in cases.values()):
            readable = {}
            for case, record in cases.items():  # a case edited by hand costs its row, not the report
                try:
                    _pair_row(case, record)
                except (KeyError, TypeError, ValueError, AttributeError) as err:
                    _leave_out(left_out, f"{path}: case {case!r} does not read ({err!r}), so it is left out; {fix}")
                else:
                    readable[case] = record
            return readable
        problem = 'holds no cases (expected {"cases": {CASE: {...}}})'
    _leave_out(left_out, f"{path} {problem}, so the H&E vs IHC comparison is left out of the report; {fix}")
    return {}


def _model_label(model: dict, demo_checksums: set[str]) -> str:
    demo = " (shipped demo, phantom-trained)" if model.get("sha256") in demo_checksums else ""
    return (
        f"{model.get('name')} {model.get('version')}, {model.get('members')} members, "
        f"sha256 {str(model.get('sha256'))[:12]}{demo}"
    )


def _mpp_text(mpp) -> str:
    if isinstance(mpp, list | tuple) and mpp:
        mpp = mpp[0] if len(set(mpp)) == 1 else "/".join(f"{v:.3g}" for v in mpp)
    return f"{mpp:.3g} µm/px" if isinstance(mpp, float | int) else html.escape(str(mpp or "n/a"))


def _domain_text(domain: dict | None) -> str:
    """How far the image lies from the training domain of the model that analysed it, with the limits."""
    if not domain:
        return "not measured (a run before the domain guard, or the guard switched off)"
    score, limit = domain.get("out_of_domain_score"), domain.get("limit")
    deg, deg_limit = domain.get("stain_distance_deg"), domain.get("stain_limit_deg")
    if score is None and deg is None:
        return f"not measured: {domain.get('why_not') or 'no tiles'}"
    over = (limit is not None and score is not None and score >= limit) or (
        deg is not None and deg_limit is not None and deg >= deg_limit
    )
    # One of the two measured alone (the network's features not captured, or no tissue for the stain vectors) is
    # still a reading: the guard flags an image by it, and the report said "not measured" beside that flag.
    unmeasured = f" ({domain['why_not']})" if domain.get("why_not") else ""
    score_text = "not measured" + unmeasured if score is None else f"{score:.2f}"
    deg_text = "not measured" + unmeasured if deg is None else f"{_fmt2(deg)}°"
    return (
        f"{'OUT of' if over else 'within'} the training domain of {domain.get('model')}: out-of-domain score "
        f"{score_text} (limit {_fmt2(limit)}; 1 = like the training tiles), stain distance {deg_text} "
        f"(limit {_fmt2(deg_limit)}°)"
    )


def _fmt2(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _fmt(value: Any) -> str:
    """A float to one decimal; other values as they are, as text for the page: a pairs.json's string was written
    into it as markup."""
    if value is None:
        return "n/a"
    return f"{value:.1f}" if isinstance(value, float) else html.escape(str(value))


def _fmt_tps(value: float | None) -> str:
    """A TPS as the run's metadata and tables show it (:func:`inference.tps_text`); n/a where there is none."""
    return "n/a" if not isinstance(value, int | float) or isinstance(value, bool) else tps_text(value)


def _fmt_cps(value: float | None) -> str:
    """A CPS as the run's metadata and tables show it (:func:`inference.cps_text`); n/a where there is none."""
    return "n/a" if not isinstance(value, int | float) or isinstance(value, bool) else cps_text(value)


def _image_cps_category(s: dict) -> str | None:
    """An IHC image's CPS category (``insufficient tumour cells``, :func:`inference.cps_category`) from its summary
    (or its row of the report):
    its TPS's where that is insufficient, the CPS's denominator being the TPS's tumour cells (an image's over its
    targets too: both from the summed cells; a CPS of none, from no tumour cell, is insufficient too). None on H&E,
    and for a summary with no ``cps`` key (one written before the CPS was recorded)."""
    ihc = s.get("stain") == "H-DAB" and "cps" in s
    return INSUFFICIENT if ihc and s.get("tps_category") == INSUFFICIENT else None


def _fmt3(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _tps_row(r: dict) -> str:
    analysed = _analysed(r.get("targets", []))
    if len(analysed) > 1:  # the image's score from the targets' summed cells; the members' range is the first one's
        spread = f"; over the {len(analysed)} analysed {_kind(analysed)}, from their summed tumour cells"
    elif r["tps_low"] is None or r["tps_high"] is None:
        spread = ""
    else:
        # Where the range crosses a cut-off, and where the ensemble's TPS lies outside it (tps_range_text).
        spread = f"; members {tps_range_text(r['tps_low'], r['tps_high'], percent=r['tps_percent'])}"
    if r["stain"] == "H-DAB":
        return (
            f"<tr><th>TPS (PD-L1 IHC)</th><td>{_fmt_tps(r['tps_percent'])}% ({_fmt(r['tps_category'])}"
            f"{spread})</td></tr><tr><th>CPS</th><td>{cps_shown(_fmt_cps(r['cps']), _image_cps_category(r))}</td></tr>"
        )
    return (
        f"<tr><th>Predicted TPS (H&amp;E)</th><td>{_fmt_tps(r['tps_percent'])}% "
        f"({_fmt(r['tps_category'])}{spread}); a prediction from morphology, not an IHC score</td></tr>"
    )


def _pairs_html(pairs: dict) -> str:
    if not pairs:
        return ""
    rows = [_pair_row(case, record) for case, record in pairs.items()]
    return (
        "<section><h2>H&amp;E vs PD-L1 IHC, per case</h2><table><tr><th>case</th><th>predicted TPS (H&amp;E)</th>"
        "<th>TPS (IHC)</th><th>Dice of positive areas</th><th>registration: tissue outlines µm apart</th>"
        "<th>H&amp;E entropy where they disagree / agree</th><th>review</th></tr>"
        + "".join(rows)
        + "</table></section>"
    )


def _pair_row(case: str, record: dict) -> str:
    """A case's row of the report's table of cases."""
    c = record.get("comparison")
    if not c:
        why = html.escape(str(record.get("why_not_compared", "")))
        return f"<tr><td>{html.escape(case)}</td><td colspan='6'>{why}</td></tr>"
    reasons = record.get("review_reasons", [])
    review = "; ".join(
        r["reason"]
        if r.get("limit") is None
        else f"{r['reason']} ({_fmt(r['value'])} points, cut-off {_fmt(r['limit'])}%)"
        for r in reasons
    )
    return (
        f"<tr><td>{html.escape(case)}</td><td>{_fmt_tps(c['tps_he_predicted'])}</td><td>{_fmt_tps(c['tps_ihc'])}</td>"
        f"<td>{_fmt3(c['dice'])}</td><td>{_fmt(record['registration']['error_um'])}</td>"
        f"<td>{_fmt3(c['entropy_disagree'])} / {_fmt3(c['entropy_agree'])}</td>"
        f"<td>{html.escape(review) if review else 'ok'}</td></tr>"
    )


def _demo_warning(rows: list[dict]) -> str:
    demo = [r["image"] for r in rows if r.get("demo_models")]
    if not demo:
        return ""
    return (
        "<p class='warn'><b>Demo models.</b> "
        f"{len(demo)} of {len(rows)} images were analysed with the shipped demo models, which were trained on "
        "phantom slides the product generates, never on real tissue: on real slides their PD-L1 calls mean "
        "nothing. Train on your own labelled slides (README: <i>Train on your own slides</i>) before reading "
        "these numbers.</p>"
    )


def _left_out_html(left_out: list[str]) -> str:
    if not left_out:
        return ""
    items = "".join(f"<li>{html.escape(m)}</li>" for m in left_out)
    return f"<div class='warn'><b>Left out of this report.</b><ul>{items}</ul></div>"


def _entry_text(row: dict) -> str:
    """The heading's ' (QuPath entry N)' after a project image's name: two entries may share a name."""
    return f" (QuPath entry {html.escape(str(row['entry_id']))})" if row.get("entry_id") else ""


def _uncertainty_row(row: dict, flag: str) -> str:
    """The review flag, and on H&E the SUA candidates (over every target where several were analysed); a PD-L1
    IHC has none to count (no segmentation runs on it)."""
    if row["stain"] == "H-DAB":
        return f"<tr><th>Uncertainty</th><td>{flag} (no SUA on a PD-L1 IHC: it is scored by its cells)</td></tr>"
    return f"<tr><th>Uncertainty</th><td>{flag}; {_fmt(row['sua_candidates'])} SUA false-negative candidates</td></tr>"


def _analysed(targets: Sequence[TargetRow]) -> list[TargetRow]:
    return [t for t in targets if t.state != MISSING]


def _kind(targets: Sequence[TargetRow]) -> str:
    """What the targets are, in the plural: "TMA cores", "annotations", or "targets" where they are of both kinds."""
    kinds = {t.target_type for t in targets}
    return f"{kinds.pop()}s" if len(kinds) == 1 else "targets"


def _per_target(targets: Sequence[TargetRow]) -> bool:
    """Whether an image's targets get their own table and outlines: several, or a TMA core (one left of a grid)."""
    return len(targets) > 1 or any(t.target_type == "TMA core" for t in targets)


def _few_cells(t: TargetRow) -> bool:
    cells = t.tumour_cells  # a number, unless a damaged summary says otherwise (that crashed the whole report)
    return isinstance(cells, int | float) and not isinstance(cells, bool) and cells < MIN_TUMOUR_NUCLEI


def _first_label(targets: Sequence[TargetRow]) -> str | None:
    """The name of the first analysed target where several were analysed: the image's GeoJSON is its own
    (bridge.run.write_result_files), and so was the summary's training domain before it was the furthest target's;
    None otherwise."""
    analysed = analysed_targets(targets)
    return analysed[0][1] if len(analysed) > 1 else None


def _domain_of(r: dict) -> str:
    """After the training domain where several targets were analysed: whose reading it is, the furthest target's
    (bridge.targets.furthest_domain), or the first target's in a summary written before that was kept."""
    analysed = analysed_targets(r.get("targets", []))
    if len(analysed) < 2:
        return ""
    if r.get("domain_target"):
        return (
            f" <i>(of {html.escape(str(r['domain_target']))}, the furthest from it of the {len(analysed)} analysed "
            "targets; each one's is in the table)</i>"
        )
    return f" <i>(of {html.escape(analysed[0][1])} only, the first target)</i>"


def _review_row(r: dict) -> str:
    """The review reasons; where several targets were analysed, the first one's would stand for the image's: the
    count of targets to review instead, each one's reasons being in the table. Then, for a flagged image, what to
    check for each kind of reason (:func:`bridge.review_advice.review_advice`)."""
    analysed = _analysed(r.get("targets", []))
    if len(analysed) < 2:
        row = f"<tr><th>Review</th><td>{html.escape(r['review_reasons'] or 'no reason')}</td></tr>"
    else:
        flagged = sum(bool(t.needs_review) for t in analysed)
        row = (
            f"<tr><th>Review</th><td>{flagged} of {len(analysed)} analysed {_kind(analysed)} need review "
            "(the table below gives each one's reasons)</td></tr>"
        )
    # Results of pdl1_analyze.groovy were analysed in QuPath, which has no --stain: the stain is its image type there.
    stain_fix = SCRIPT_STAIN_FIX if str(r.get("results_from", "")).startswith(SCRIPT) else RUN_STAIN_FIX
    advice = (
        review_advice([r["review_reasons"]], stain_fix=stain_fix)
        if r.get("uncertainty_flag") and r["review_reasons"]
        else []
    )
    if advice:
        items = "".join(f"<li>{html.escape(line)}</li>" for line in advice)
        row += f"<tr><th>What to check</th><td><ul>{items}</ul></td></tr>"
    return row


def _targets_html(r: dict) -> str:
    """The per-target table of an image of several targets, or of TMA cores: one compact row per target in the
    grid's order (a TMA is read against its map), those to look at marked in the row and named above the table."""
    targets = r.get("targets", [])
    if not _per_target(targets):
        return ""
    labels = target_labels(targets)
    analysed = _analysed(targets)
    ihc = any(t.stain == "H-DAB" for t in targets)
    mixed = len({t.target_type for t in targets}) > 1
    review = [label for t, label in zip(targets, labels, strict=True) if t.needs_review]
    few = [label for t, label in zip(targets, labels, strict=True) if _few_cells(t)]
    missing = [label for t, label in zip(targets, labels, strict=True) if t.state == MISSING]
    look = [
        f"<b>needs review ({len(review)})</b>: {html.escape(', '.join(review))}" if review else "",
        f"<b>under {MIN_TUMOUR_NUCLEI} tumour cells ({len(few)})</b>: {html.escape(', '.join(few))}" if few else "",
        f"<b>missing, not analysed ({len(missing)})</b>: {html.escape(', '.join(missing))}" if missing else "",
    ]
    look = [x for x in look if x] or ["none needs review"]
    order = "in the grid's order" if all(t.target_type == "TMA core" for t in targets) else "in the order analysed"
    head = (
        "<tr><th>target</th>"
        + ("<th>type</th>" if mixed else "")
        + f"<th>{'TPS' if ihc else 'predicted TPS'} %</th><th>category</th><th>tumour cells</th>"
        + ("<th>CPS</th>" if ihc else "")
        + "<th>review</th></tr>"
    )
    body = []
    for t, label in zip(targets, labels, strict=True):
        kind = f"<td>{html.escape(t.target_type)}</td>" if mixed else ""
        if t.state == MISSING:
            span = 4 + int(ihc)  # TPS, category, tumour cells, [CPS,] review
            body.append(
                f"<tr class='missing'><td>{html.escape(label)}</td>{kind}"
                f"<td colspan='{span}'>missing: marked missing in QuPath, not analysed</td></tr>"
            )
            continue
        cells = f"{_fmt(t.tumour_cells)}" + (f" <b>(under {MIN_TUMOUR_NUCLEI})</b>" if _few_cells(t) else "")
        reasons = "; ".join(t.review_reasons) or "flagged"
        verdict = f"<b>review</b>: {html.escape(reasons)}" if t.needs_review else "ok"
        row_class = " class='review'" if t.needs_review else ""
        cells_class = " class='few'" if _few_cells(t) else ""
        body.append(
            f"<tr{row_class}><td>{html.escape(label)}</td>{kind}"
            f"<td>{_fmt_tps(t.tps_percent)}</td><td>{_fmt(t.tps_category)}</td>"
            f"<td{cells_class}>{cells}</td>"
            + (f"<td>{cps_shown(_fmt_cps(t.cps_percent), t.cps_category)}</td>" if ihc else "")
            + f"<td>{verdict}</td></tr>"
        )
    return (
        f"<h3>Per target: {len(targets)} {_kind(targets)} ({len(analysed)} analysed"
        f"{f', {len(missing)} missing' if missing else ''}), {order}</h3>"
        f"<p>To look at: {'; '.join(look)}.</p><table class='targets'>{head}{''.join(body)}</table>"
    )


def _overlay_note(r: dict) -> str:
    """Under a thumbnail of several analysed targets: whose results its overlay shows. Every target's where the run
    left them (:data:`TARGET_REGIONS_FILE`); else the first target's (the image's GeoJSON keeps no other's). Each
    target's own are under it in QuPath."""
    targets = r.get("targets", [])
    first = _first_label(targets)
    if r.get("from_records") and r["thumbnail"]:
        return (
            "<p class='note'>From the records of pdl1_analyze.groovy: the overlay shows every target's SUA candidates "
            "and graded cells and the outlines of the targets; a record keeps no region outlines nor uncertainty "
            "tiles (they are in QuPath, under each target).</p>"
        )
    if first is None or not r["thumbnail"]:
        return ""
    outlined = any(t.outline is not None for t in targets)
    if r.get("overlay_every_target"):
        shows = "The overlay shows every target's results"
    else:
        shows = (
            f"The overlay shows the results of {html.escape(first)} only, the first target (the image's GeoJSON keeps "
            "no other's; each target's are under it in QuPath)"
        )
    return (
        f"<p class='note'>{shows}"
        + (
            "; the outlines are every target, named."
            if outlined
            else "; no outlines: its summary, written before they were kept, has none."
        )
        + "</p>"
    )


def _running_html(running: str | None) -> str:
    if running is None:
        return ""
    return (
        f"<p class='warn'><b>A run was going on.</b> pdl1 run was writing these results ({html.escape(running)}) "
        "when this report was made: images it had not reached yet show their earlier results. Make the report "
        "again when it has finished.</p>"
    )


def _html(
    rows: list[dict], pairs: dict | None = None, left_out: list[str] | None = None, running: str | None = None
) -> str:
    body = []
    for r in rows:
        thumb = (
            # A file name is a relative URL there: quoted, "Case #7.png" is not "Case " and a fragment.
            f'<img src="{html.escape(quote(r["thumbnail"].name))}" alt="overlay of {html.escape(r["image"])}">'
            if r["thumbnail"]
            else f"<p>no thumbnail: {html.escape(r.get('no_thumbnail') or 'not drawn')}</p>"
        )
        flag = "needs review" if r["uncertainty_flag"] else "ok"
        domain_of = _domain_of(r)
        body.append(
            f"<section><h2>{html.escape(r['image'])}{_entry_text(r)}</h2><table>"
            + (
                f"<tr><th>Last run</th><td class='warn'>failed on this image: {html.escape(r['last_run_failed'])}; "
                f"the results below are an earlier run's (run {html.escape(str(r['run_id']))})</td></tr>"
                if r.get("last_run_failed")
                else ""
            )
            + _tps_row(r)
            + _review_row(r)
            + f"<tr><th>Image</th><td>{_mpp_text(r['mpp'])}; analysed {html.escape(r['analysed_at'] or 'n/a')}"
            "</td></tr>"
            f"<tr><th>Results from</th><td>{html.escape(r['results_from'])}</td></tr>"
            f"<tr><th>Models</th><td>{html.escape(r['models'] or 'n/a')}</td></tr>"
            f"<tr><th>Training domain</th><td>{html.escape(r['domain'])}{domain_of}</td></tr>"
            f"<tr><th>PD-L1 positive area</th><td>{_fmt(r['positive_area_pct'])}% of analysed tissue</td></tr>"
            + _uncertainty_row(r, flag)
            + f"<tr><th>Nuclei</th><td>{_fmt(r['tumor_positive'])} positive, {_fmt(r['tumor_negative'])} negative "
            f"tumour, {_fmt(r['other'])} other</td></tr></table>"
            + _targets_html(r)
            + f"{thumb}{_overlay_note(r)}</section>"
        )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'>{REPORT_TITLE}<style>"
        "body{font-family:sans-serif;margin:2em}section{margin-bottom:2em}th{text-align:left;padding-right:1em}"
        "img{max-width:900px;border:1px solid #ccc}.warn{background:#fff3cd;border:1px solid #d39e00;padding:.6em}"
        "table.targets{border-collapse:collapse;font-size:.85em;margin-bottom:1em}"
        "table.targets td,table.targets th{padding:1px .6em;border-bottom:1px solid #eee}"
        "tr.review{background:#ffe0b2}tr.missing{color:#777}td.few{color:#b00020}.note{font-size:.9em;color:#444}"
        "</style></head><body><h1>PD-L1 report</h1>"
        + _running_html(running)
        + _demo_warning(rows)
        + _left_out_html(left_out or [])
        + "<p>H&amp;E: orange outlines are predicted PD-L1 positive regions, magenta SUA false-negative candidates "
        "for review, the shading the predictive entropy of the uncertainty tiles (dark = certain). PD-L1 IHC: "
        "dots are positive tumour cells, yellow 1+, orange 2+, red 3+. Blue outlines, named, are the targets of an "
        "image of several (TMA cores, annotations), thick with a yellow name where one needs review, grey dashed "
        "where a core is missing.</p>" + "".join(body) + _pairs_html(pairs or {}) + "</body></html>"
    )
