"""An entry's annotations and TMA cores as ``pdl1_export_labels.groovy`` exported them: ``pdl1 run``'s targets where
QuPath is not here (QuPath 0.7, which paquo does not reach; a machine without QuPath).

This module stands in for :mod:`bridge.qupath` in :func:`bridge.run.entry_targets` (the same four calls, on what
:func:`read_exported_entry` read), so the targets are chosen by the one rule whichever way they were read. Their
results go back into QuPath by the object's ID: ``pdl1_import_results.groovy`` puts each target's objects under the
annotation or core of that ID (:func:`target_objects_path`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shapely.geometry.base import BaseGeometry

from bridge.labels import annotation_counts, export_path, refuse_stale_export
from bridge.objects import ANALYSED_SIGNATURE, is_own_object
from bridge.project import ProjectError
from bridge.qupath_geojson import DETECTION_LINE_TYPES, QuPathObject, not_detections, read_features

EXPORT_SCRIPT = "qupath_scripts/pdl1_export_labels.groovy"
# Where a run puts each exported target's results for pdl1_import_results.groovy: <entry folder>/<this>/<ID>.geojson,
# the target's stand-in (its ID, outline and measurements) first, then its objects.
TARGET_OBJECTS_FOLDER = "target_objects"


@dataclass(frozen=True)
class ClassName:
    """A class as paquo's ``path_class`` gives it to :func:`bridge.run.entry_targets` (its ``id``: the name)."""

    id: str


@dataclass(frozen=True)
class ExportedObject:
    """An annotation or TMA core of an export, with what :func:`bridge.run.entry_targets` asks of a paquo object
    (``roi``, ``name``, ``path_class``) and what the import needs (``object_id``: QuPath's ID of it)."""

    roi: BaseGeometry
    name: str | None
    path_class: ClassName | None
    object_id: str
    missing: bool = False  # a TMA core marked missing
    analysed: bool = False  # it carries an earlier analysis of this tool (ANALYSED_SIGNATURE)


@dataclass(frozen=True)
class ExportedEntry:
    """What an entry's export holds for ``pdl1 run``: its annotations (this tool's own left out) and TMA cores (in
    the grid's order), and the file with its size and time, which the summary records (:func:`export_stamp`)."""

    path: Path
    annotations: tuple[ExportedObject, ...]
    cores: tuple[ExportedObject, ...]


def export_again(image: str) -> str:
    """The fix for an export that is missing or out of date."""
    return (
        f"run {EXPORT_SCRIPT} on {image} in QuPath (or Run for project), then run again; or install QuPath 0.4.4 to "
        "0.6 here (paquo finds it through PAQUO_QUPATH_DIR), which reads the annotations itself"
    )


def read_exported_entry(project_folder: Path, entry_id: str, image: str) -> ExportedEntry | None:
    """The entry's export (``<project>/pdl1/labels/<entry ID>.geojson``), None where there is none.

    Refused (:class:`ProjectError`, naming the file and the fix): an export that does not read, and one written
    before QuPath last saved the entry where its annotations changed since (targets drawn after the export would be
    left out without a word). Detections are not read: a slide's cells cost seconds and say nothing of targets.
    """
    path = export_path(project_folder, entry_id)
    if not path.is_file():
        return None
    source = f"{image}: its targets"
    try:
        objects = _objects_but_detections(path)
    except (OSError, ValueError) as err:  # GeoJsonError is a ValueError; JSON cut short too
        raise ProjectError(f"{source}: {path} does not read ({err}); {export_again(image)}") from err
    refuse_stale_export(
        path,
        project_folder / "data" / entry_id,
        source,
        export_again(image),
        drawn="annotations",
        error=ProjectError,
        exported_counts=annotation_counts(objects),
    )
    annotations, cores = [], []
    for obj in objects:
        if obj.object_type == "annotation" and not _is_own(obj):
            annotations.append(_exported(obj))
        elif obj.object_type == "tmaCore":
            cores.append(_exported(obj))
    return ExportedEntry(path, tuple(annotations), tuple(cores))


def _objects_but_detections(path: Path) -> list[QuPathObject]:
    """The export's objects but its detections and cells, without parsing those where the file is laid out as
    ``pdl1_export_labels.groovy`` writes it (one object a line): a slide with QuPath's cell detection has a million
    cells, GBs of JSON that say nothing of targets."""
    return list(read_features(path, keep=not_detections, unparsed=DETECTION_LINE_TYPES))


def export_stamp(entry: ExportedEntry, project_folder: Path) -> dict[str, object]:
    """What a summary records of the export its targets came from: the file (in the project folder, which may move),
    its size and modification time (ns), so ``--resume`` analyses again an image whose export changed since."""
    st = entry.path.stat()
    return {"path": entry.path.relative_to(project_folder).as_posix(), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def stamp_matches(stamp: object, project_folder: Path, entry_id: str) -> bool:
    """Whether the entry's export is the one a summary's :func:`export_stamp` describes (False: gone or changed)."""
    if not isinstance(stamp, dict):
        return False
    try:
        st = os.stat(export_path(project_folder, entry_id))
    except OSError:
        return False
    return stamp.get("bytes") == st.st_size and stamp.get("mtime_ns") == st.st_mtime_ns


def _is_own(obj: QuPathObject) -> bool:
    return is_own_object(obj.object_type, obj.classification, obj.name, obj.measurements)


def _exported(obj: QuPathObject) -> ExportedObject:
    return ExportedObject(
        roi=obj.geometry,
        name=obj.name,
        path_class=None if obj.classification is None else ClassName(obj.classification),
        object_id=str(obj.id),  # a UUID (from_feature makes one where the export held none or another)
        missing=obj.missing,
        analysed=ANALYSED_SIGNATURE in obj.measurements,
    )


# The calls bridge.run.entry_targets makes of bridge.qupath, on an ExportedEntry.


def annotation_targets(entry: ExportedEntry, *, classes: Sequence[str] = (), names: Sequence[str] = ()) -> list:
    """The export's annotations with one of ``classes`` or ``names`` (this tool's own were left out when read)."""
    return [
        a
        for a in entry.annotations
        if (classes and a.path_class is not None and a.path_class.id in classes) or (names and a.name in names)
    ]


def tma_cores(entry: ExportedEntry) -> list[ExportedObject]:
    """The cores of the export's TMA grid, missing ones too, in the grid's order; none without a grid."""
    return list(entry.cores)


def core_is_missing(core: ExportedObject) -> bool:
    return core.missing


def core_is_analysed(core: ExportedObject) -> bool:
    return core.analysed


def target_objects_path(entry_folder: Path, object_id: str) -> Path:
    """Where a run puts the results of the exported target ``object_id`` for ``pdl1_import_results.groovy``."""
    return entry_folder / TARGET_OBJECTS_FOLDER / f"{object_id}.geojson"
