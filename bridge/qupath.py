"""The one module that talks to QuPath, through paquo (imported lazily: it starts a JVM).

Kept thin: what to write is decided in :mod:`bridge.objects` (pure, tested without QuPath);
here it is only put into QuPath's hierarchy. Version quirks are paquo's business; this uses
the paquo 0.9 API that works on QuPath 0.4.4 to 0.6.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shapely.geometry.base import BaseGeometry

from bridge.classes import ALL_CLASSES, PDL1_ANALYSIS, PathClassSpec
from bridge.objects import TILE_NAME, is_own_object
from bridge.qupath_geojson import QuPathObject
from inference import Pdl1Error

log = logging.getLogger(__name__)
BACKUP_SUFFIX = ".pdl1-backup"


class QuPathUnavailableError(Pdl1Error, RuntimeError):
    """paquo found no QuPath installation."""


def _paquo() -> dict[str, Any]:
    try:
        from paquo.classes import QuPathPathClass
        from paquo.pathobjects import QuPathPathAnnotationObject, QuPathPathDetectionObject, QuPathPathTileObject
        from paquo.projects import QuPathProject
    except ValueError as err:  # paquo raises ValueError("no valid qupath installation found")
        raise QuPathUnavailableError(
            f"QuPath is needed for this ({err}): install it with "
            "`python -m paquo get_qupath --install-path DIR 0.6.0` and set PAQUO_QUPATH_DIR to the folder it prints"
        ) from err
    return {
        "QuPathProject": QuPathProject,
        "QuPathPathClass": QuPathPathClass,
        "annotation": QuPathPathAnnotationObject,
        "detection": QuPathPathDetectionObject,
        "tile": QuPathPathTileObject,
    }


def qupath_available() -> tuple[bool, str]:
    """Whether paquo can start QuPath here, and why not."""
    try:
        _paquo()
    except QuPathUnavailableError as err:
        return False, str(err)
    return True, ""


@contextmanager
def open_project(path: str | Path, *, mode: str = "r+") -> Iterator[Any]:
    """A paquo ``QuPathProject``; no save on exit (callers save the entries they touched)."""
    p = _paquo()
    try:
        project = p["QuPathProject"](Path(path), mode=mode)
    except OSError as err:
        raise Pdl1Error(f"{path}: QuPath cannot open the project ({err}); is it open and locked elsewhere?") from err
    yield project


def path_class(spec: PathClassSpec) -> Any:
    """paquo class for a name; ``"Tumor: Positive"`` is ``Positive`` derived from ``Tumor``."""
    cls = _paquo()["QuPathPathClass"]
    parts = spec.names
    parent = None
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        parent = cls(part, color=spec.rgb if last else None, parent=parent)
    return parent


def ensure_classes(project: Any, specs: Iterable[PathClassSpec] = ALL_CLASSES) -> None:
    """Add missing classes (with colours) to the project's list; paquo's setter replaces the whole list."""
    existing = list(project.path_classes)
    have = {c.id for c in existing}
    added = [path_class(s) for s in specs if s.name not in have]
    if added:
        project.path_classes = existing + added


def annotation_targets(entry: Any, *, classes: tuple[str, ...] = (), names: tuple[str, ...] = ()) -> list[Any]:
    """The entry's annotations with one of ``classes`` or ``names`` (ours excluded)."""
    out = []
    for ann in entry.hierarchy.annotations:
        cls = ann.path_class.id if ann.path_class is not None else None
        if is_own_object("annotation", cls, ann.name, list(ann.measurements.keys())):
            continue
        if (classes and cls in classes) or (names and ann.name in names):
            out.append(ann)
    return out


def backup_data(entry: Any) -> Path | None:
    """Copy the entry's ``data.qpdata`` aside before writing; returns the backup (None when new)."""
    data = Path(entry.entry_path) / "data.qpdata"
    if not data.is_file():
        return None
    backup = data.with_name(data.name + BACKUP_SUFFIX)
    shutil.copy2(data, backup)
    return backup


def restore_data(entry: Any, backup: Path | None) -> None:
    if backup is not None and backup.is_file():
        shutil.copy2(backup, backup.with_name("data.qpdata"))


def _own_children(parent: Any) -> list[Any]:
    wrap = _paquo()["annotation"]  # any paquo object wrapper reads names across QuPath versions
    out = []
    for child in parent.java_object.getChildObjectsAsArray():
        cls = child.getPathClass()
        kind = "tile" if child.isTile() else "annotation" if child.isAnnotation() else "detection"
        names = list(wrap(child).measurements)
        name = child.getName()
        if is_own_object(
            kind, None if cls is None else str(cls.toString()), None if name is None else str(name), names
        ):
            out.append(child)
    return out


def _to_paquo(obj: QuPathObject, classes: dict[str, Any]) -> Any:
    p = _paquo()
    spec_class = None if obj.classification is None else classes[obj.classification]
    made = p[obj.object_type].from_shapely(obj.geometry, spec_class, obj.measurements)
    if obj.name is not None:
        made.name = obj.name
    return made


def find_or_create_analysis_parent(entry: Any, geometry: BaseGeometry) -> Any:
    """The ``PD-L1 analysis`` annotation of an earlier run, or a new one over ``geometry``."""
    for ann in entry.hierarchy.annotations:
        if ann.path_class is not None and ann.path_class.id == PDL1_ANALYSIS.name and ann.name == PDL1_ANALYSIS.name:
            return ann
    ann = entry.hierarchy.add_annotation(roi=geometry, path_class=path_class(PDL1_ANALYSIS))
    ann.name = PDL1_ANALYSIS.name
    return ann


def write_children(entry: Any, parent: Any, objects: Iterable[QuPathObject], measurements: dict[str, float]) -> int:
    """Replace this tool's earlier children of ``parent`` with ``objects`` and set its measurements.

    Objects this tool did not create are left alone. One hierarchy event for the whole batch.
    """
    from paquo.java import ArrayList

    from bridge.classes import BY_NAME

    classes = {name: path_class(spec) for name, spec in BY_NAME.items()}
    hierarchy = entry.hierarchy
    with hierarchy.no_autoflush():
        old = _own_children(parent)
        if old:
            stale = ArrayList()
            for child in old:
                stale.add(child)
            hierarchy.java_object.removeObjects(stale, True)
        fresh = ArrayList()
        count = 0
        for obj in objects:
            fresh.add(_to_paquo(obj, classes).java_object)
            count += 1
        parent.java_object.addChildObjects(fresh)
        for key, value in measurements.items():
            parent.measurements[key] = float(value)
    return count


def add_image(project: Any, slide: Path) -> Any:
    """Add a brightfield H&E image to the project."""
    from paquo.images import QuPathImageType

    return project.add_image(slide, image_type=QuPathImageType.BRIGHTFIELD_H_E)


def save_entries(project: Any, entries: Iterable[Any]) -> None:
    """Save only the touched entries, then the project file (not every image, which is slow)."""
    for entry in entries:
        entry.save()
    project.save(images=False)


__all__ = [
    "TILE_NAME",
    "QuPathUnavailableError",
    "add_image",
    "annotation_targets",
    "backup_data",
    "ensure_classes",
    "find_or_create_analysis_parent",
    "open_project",
    "path_class",
    "qupath_available",
    "restore_data",
    "save_entries",
    "write_children",
]
