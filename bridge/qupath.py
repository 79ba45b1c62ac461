"""The one module that talks to QuPath, through paquo (imported lazily: it starts a JVM).

Kept thin: what to write is decided in :mod:`bridge.objects` (pure, tested without QuPath);
here it is only put into QuPath's hierarchy. Version quirks are paquo's business; this uses
the paquo 0.9 API that works on QuPath 0.4.4 to 0.6.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import shapely
from shapely.geometry.base import BaseGeometry

from bridge.classes import ALL_CLASSES, PDL1_ANALYSIS, PathClassSpec
from bridge.objects import (
    ANALYSED_SIGNATURE,
    OWN_DETECTION_CLASSES,
    TILE_NAME,
    is_own_object,
    stale_parent_measurements,
)
from bridge.project import (
    QPDATA_BACKUP_SUFFIX,
    ProjectError,
    check_qpdata,
    damaged_data_error,
    not_a_file_uri,
    qpdata_problem,
    slide_file_problem,
    uri_to_path,
)
from bridge.qupath_geojson import QuPathObject, finite_measurements
from inference import Pdl1Error

log = logging.getLogger(__name__)


class QuPathUnavailableError(Pdl1Error, RuntimeError):
    """paquo found no QuPath installation."""


def _paquo() -> dict[str, Any]:
    try:
        from paquo.classes import QuPathPathClass
        from paquo.images import ImageProvider
        from paquo.java import URI, JClass
        from paquo.pathobjects import QuPathPathAnnotationObject, QuPathPathDetectionObject, QuPathPathTileObject
        from paquo.projects import QuPathProject
    # paquo raises ValueError("no valid qupath installation found") when it finds none, FileNotFoundError("qupath
    # installation is incompatible") when PAQUO_QUPATH_DIR (or qupath_dir in .paquo.toml) names no QuPath folder, an
    # OSError for a jvm_path_override that is no file, and RuntimeError for a JVM that does not start (its JAVA_OPTS,
    # a JVM of another architecture): paquo jpype_backend.py find_qupath, start_jvm.
    except (ValueError, OSError, RuntimeError) as err:
        where = os.environ.get("PAQUO_QUPATH_DIR")
        named = f"; PAQUO_QUPATH_DIR is {where}" if where and isinstance(err, FileNotFoundError) else ""
        raise QuPathUnavailableError(
            f"QuPath is needed for this ({err}{named}): install it with "
            "`python -m paquo get_qupath --install-path DIR 0.6.0` and set PAQUO_QUPATH_DIR to the folder it prints"
        ) from err
    return {
        "QuPathProject": QuPathProject,
        "QuPathPathClass": QuPathPathClass,
        "annotation": QuPathPathAnnotationObject,
        "detection": QuPathPathDetectionObject,
        "tile": QuPathPathTileObject,
        "ImageProvider": ImageProvider,
        "URI": URI,
        "HashMap": JClass("java.util.HashMap"),
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
    from jpype import JException  # paquo's JVM bridge: every Java exception is one

    try:
        project = p["QuPathProject"](Path(path), mode=mode)
    except OSError as err:
        # paquo's OSErrors here are FileNotFoundError (mode r/r+, no project) and FileExistsError (mode x); QuPath
        # takes no lock on a project, so "open elsewhere" was never the reason.
        raise Pdl1Error(f"{path}: QuPath cannot open the project ({type(err).__name__}: {err})") from err
    except JException as err:
        # What ProjectIO.loadProject throws for a project.qpproj it cannot read or parse (an IOException, Gson's
        # JsonSyntaxException) comes through paquo untranslated, and is no OSError under JPype.
        raise Pdl1Error(
            f"{path}: QuPath cannot read the project file ({err}); open the project in QuPath to see whether it "
            "loads, or put back the project.qpproj.backup QuPath keeps beside it"
        ) from err
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
    added = []
    for spec in specs:
        if spec.name not in have:
            made = path_class(spec)
            # QuPath keeps one class per name in the JVM, coloured when first made: a project read earlier in this
            # process (its classes.json) may have coloured it otherwise, and the colour asked for is then ignored.
            made.color = spec.rgb
            added.append(made)
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


def tma_cores(entry: Any) -> list[Any]:
    """The cores of the entry's TMA grid (TMA > TMA dearrayer), missing ones too, in the grid's order; none without
    a grid.

    paquo 0.9 has no TMA API, so the grid is read from the Java hierarchy: ``PathObjectHierarchy.getTMAGrid()``
    (null without a grid; PathObjectHierarchy.java v0.4.4:183, v0.5.1:184, v0.6.0:153, v0.7.0:152) and
    ``TMAGrid.getTMACoreList()`` (TMAGrid.java:78 on all four). Each core goes into paquo's annotation wrapper: it
    checks no Java type and calls only what every ``PathROIObject`` has (``getName``, ``getROI``,
    ``getMeasurementList``, ``getPathClass``, ``getParent``), which a ``TMACoreObject`` is (TMACoreObject.java
    v0.4.4:46, v0.7.0:44); its one annotation-only property, ``description``, is not used here. Built without an
    update callback, so writing a core's measurements changes the core only (see :func:`write_children`).
    """
    return _grid_cores(entry.hierarchy)


def _grid_cores(hierarchy: Any) -> list[Any]:
    """:func:`tma_cores` of a paquo hierarchy already read (reading ``entry.hierarchy`` again reads its data again)."""
    grid = hierarchy.java_object.getTMAGrid()
    if grid is None:
        return []
    wrap = _paquo()["annotation"]
    return [wrap(core) for core in grid.getTMACoreList()]


def core_is_missing(core: Any) -> bool:
    """Whether a core of :func:`tma_cores` is marked missing (TMACoreObject.isMissing(), v0.4.4:103, v0.5.1:103,
    v0.6.0:102, v0.7.0:101): QuPath's own analyses leave such a core out, and so does this tool."""
    return bool(core.java_object.isMissing())


def core_is_analysed(core: Any) -> bool:
    """Whether a core of :func:`tma_cores` holds an analysis of this tool (it carries ``ANALYSED_SIGNATURE``): a core
    marked missing after it was analysed keeps those results, which a run that skips it leaves as they are."""
    return _own_or_analysed(core.java_object)[1]


def backup_data(entry: Any) -> Path | None:
    """Copy the entry's ``data.qpdata`` aside before writing; returns the backup (None when new).

    A damaged ``data.qpdata`` (what a kill during QuPath's save leaves: empty, a bad header, or cut
    short) raises :class:`~bridge.project.DamagedDataError` before QuPath reads it or it can replace the
    backup, so the last whole backup survives. Its start and end are checked here, not by QuPath: paquo's
    ``entry.hierarchy`` raises for none of these, QuPath reading a damaged file as its ``.backup`` or as
    an empty image (:data:`~bridge.project.QPDATA_END`). The copy goes through a temporary file that
    must read back whole before it replaces the backup: a full disk leaves the old backup as it was.
    """
    check_saveable(entry)  # before the analysis, which would be lost
    data = Path(entry.entry_path) / "data.qpdata"
    if not data.exists():
        return None
    check_qpdata(data, image_name=str(entry.image_name))
    # What QuPath cannot make an image of still fails here, before the backup is replaced: on v0.4.4 a stream whose
    # hierarchy is cut off is a NullPointerException (PathIO.java v0.4.4:385-392, 407-409), which its fallback lets by.
    try:
        entry.hierarchy  # noqa: B018 - paquo reads data.qpdata on first access
    except Exception as err:  # paquo passes Java's reasons on as various exceptions
        problem = f"QuPath cannot read it ({err})"
        raise damaged_data_error(data, image_name=str(entry.image_name), problem=problem) from err
    backup = data.with_name(data.name + QPDATA_BACKUP_SUFFIX)
    _copy_checked(data, backup)
    return backup


def _copy_checked(source: Path, target: Path) -> None:
    """Copy ``source`` over ``target`` only once the copy is on disk, as long as the source, and reads
    as QuPath data; else ``target`` is left as it was."""
    tmp = target.with_name(f"{target.name}.{secrets.token_hex(6)}.part")
    try:
        shutil.copy2(source, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        problem = None
        if tmp.stat().st_size != source.stat().st_size:
            problem = f"it has {tmp.stat().st_size} bytes of {source.stat().st_size}"
        problem = problem or qpdata_problem(tmp)
        if problem is not None:
            raise ProjectError(
                f"the copy of {source} did not read back whole ({problem}); {target} was left as it was; "
                "check the disk (full?) and run again"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# What paquo 0.9 caches of an entry on its wrapper (functools.cached_property: images.py's _image_data, hierarchy,
# _image_server, _properties), which the project's list of entries keeps until the project closes.
_ENTRY_CACHES = ("hierarchy", "_image_data", "_image_server", "_properties")


def let_go(entry: Any) -> None:
    """Drop what paquo holds of an entry's QuPath data (its ``ImageData``, hierarchy and image server): read on first
    access and kept on the entry, which the project keeps until it closes, they held every image of a batch, with
    all its objects, in the JVM. The next access reads ``data.qpdata`` again, so an entry is let go only once its
    objects are saved or put back, never while objects read from it are still to be written."""
    for name in _ENTRY_CACHES:
        vars(entry).pop(name, None)


def restore_data(entry: Any, backup: Path | None) -> None:
    """Put the backup made by :func:`backup_data` back, if it is whole (never a damaged one over the data)."""
    if backup is not None and qpdata_problem(backup) is None:
        _copy_checked(backup, backup.with_name("data.qpdata"))


def _own_descendants(parent: Any) -> list[Any]:
    """This tool's earlier objects of ``parent``'s analysis (Java objects): anywhere under it, and those that
    *Resolve hierarchy* moved out of it; none under another analysed annotation, nor one that another holds more of.

    QuPath's *Resolve hierarchy* moves the nuclei and tiles under the regions (or your annotations) they lie in;
    removing only the parent's own children, with their children kept, put the earlier run's objects back beside
    the new run's. It puts each object in the smallest annotation that covers it (a detection: that holds its
    centroid), so a region over the edge of a drawn ROI goes up beside the ROI, and so does a tile whose centroid lies
    outside it (tiles are trimmed to the ROI, but one its outline cuts in two or into an L may have its centroid
    outside; an earlier version's tiles were whole cells over the edge). One of ours
    outside every analysed annotation that overlaps the parent is the parent's, and so is what of ours lies in it,
    each unless another analysed annotation holds as much of it or more (:func:`_held_most_by`; a smaller analysed
    ROI beside the parent, inserted after our region, leaves in it its nuclei that lie in it): an analysis makes its
    objects from its own ROI's pixels (regions of pixels whose centres lie in it, tiles trimmed to it, nuclei
    inside it), so of two analysed ROIs that touch or overlap, each one's region over the edge between them lies
    mostly in its own, and taking every one that overlapped the parent, a re-run removed its neighbour's (and taking
    all of ours in such a region, the smaller neighbour's nuclei in it). Another analysed annotation
    (it carries :data:`ANALYSED_SIGNATURE`) holds its own results, which its own analysis replaces, also one that the
    parent lies in (a hotspot analysed inside an analysed tissue outline). An analysed TMA core is an analysed
    parent throughout (:func:`_own_or_analysed`): the parent analysed may be a core, and so may its neighbours.
    """
    inside = parent.java_object
    out = _own_under(inside)
    ancestors = []
    above = inside.getParent()
    while above is not None:
        ancestors.append(above)
        above = above.getParent()
    if not ancestors:
        return out
    wrap = _paquo()["annotation"]
    area = others = None
    stack = [ancestors[-1]]  # the root
    while stack:
        above = stack.pop()
        theirs = above in ancestors and _own_or_analysed(above)[1]  # an analysed annotation around the parent
        for child in above.getChildObjectsAsArray():
            if child == inside:
                continue
            if child in ancestors:
                stack.append(child)
                continue
            if theirs:  # that analysis's results, which its own re-run replaces
                continue
            own, analysed = _own_or_analysed(child)
            if own and area is None:
                area = parent.roi
                shapely.prepare(area)
            geometry = wrap(child).roi if own else None
            if own and _overlaps(geometry, area):
                if others is None:  # the other analysed annotations' outlines, read once one of ours overlaps
                    # (not those the parent lies in: they hold all of it that the parent holds, and their own
                    # objects beside the parent are theirs by the walk's rule above)
                    others = [wrap(a).roi for a in _analysed_under(ancestors[-1]) if a != inside and a not in ancestors]
                if _held_most_by(geometry, area, others):
                    out.append(child)
                    # What of ours lies under it by the same rule: Resolve hierarchy inserts the annotations largest
                    # first, each taking from its new parent the children that lie in it (PathObjectHierarchy.java
                    # v0.4.4:277, 372-381; v0.7.0:232, 327-335), so a region of ours beside the parent inserted before
                    # a smaller analysed ROI beside it takes that ROI's nuclei (and regions it covers) that lie in it.
                    held = lambda obj, a=area, o=others: _held_most_by(wrap(obj).roi, a, o)  # noqa: E731
                    out.extend(_own_under(child, keep=held))
                    continue
            if not analysed:  # also one of ours that is another's: the parent's may lie in it
                stack.append(child)
    return out


def _own_under(top: Any, *, keep: Callable[[Any], bool] | None = None) -> list[Any]:
    """This tool's objects anywhere under the Java object ``top``, except under an analysed annotation; with ``keep``,
    those of them it keeps (each looked at alone: what lies under one it leaves is looked at too)."""
    out: list[Any] = []
    stack = [top]
    while stack:
        for child in stack.pop().getChildObjectsAsArray():
            own, analysed = _own_or_analysed(child)
            if own and (keep is None or keep(child)):
                out.append(child)
            if not analysed:
                stack.append(child)
    return out


def _overlaps(geometry: BaseGeometry, area: BaseGeometry) -> bool:
    """Whether ``geometry`` shares more than a boundary with ``area``."""
    return bool(area.intersects(geometry)) and not bool(area.touches(geometry))


def _analysed_under(top: Any) -> list[Any]:
    """Every analysed annotation (or TMA core) below the Java object ``top``.

    Only annotations and TMA cores hold annotations: QuPath puts none under a detection
    (``PathObjectHierarchy.insertPathObject``, v0.4.4:336-350), so detections are not looked into.
    """
    out: list[Any] = []
    stack = [top]
    while stack:
        for child in stack.pop().getChildObjectsAsArray():
            if child.isDetection():
                continue
            if _own_or_analysed(child)[1]:
                out.append(child)
            stack.append(child)
    return out


def _held_most_by(geometry: BaseGeometry, area: BaseGeometry, others: Iterable[BaseGeometry]) -> bool:
    """Whether ``area`` holds more of ``geometry`` (by area) than each of ``others`` that overlaps it.

    A tie is not more: an object held as much by another analysed annotation may be that one's, and is left.

    >>> from shapely.geometry import box
    >>> left, right = box(0, 0, 10, 10), box(10, 0, 20, 10)
    >>> [_held_most_by(box(x, 4, x + 4, 6), left, [right]) for x in (7, 8, 9)]
    [True, False, False]
    """
    share = None
    for other in others:
        if _overlaps(geometry, other):
            if share is None:
                share = area.intersection(geometry).area
            if other.intersection(geometry).area >= share:
                return False
    return True


def _rehome_others(old: list[Any], parent: Any) -> None:
    """Move the children of ``old`` (Java objects about to be removed) that are not in ``old`` (your annotations,
    QuPath's detections that Resolve hierarchy put inside one of our regions) to their nearest ancestor that stays;
    those of one of ours that Resolve hierarchy had moved out of ``parent`` (the paquo annotation analysed) go
    back into ``parent`` where they lie in it by QuPath's rules (an annotation covered, a detection's centroid).

    QuPath's ``removeObjects(objects, keepChildren=true)`` adds the kept children again under the image's root,
    out of the annotation they were in.
    """
    from paquo.java import ArrayList

    wrap = _paquo()["annotation"]
    going = set(old)
    for obj in old:
        others = [child for child in obj.getChildObjectsAsArray() if child not in going]
        if not others:
            continue
        home = obj.getParent()
        while home in going:
            home = home.getParent()
        homes = {home: others}
        if not _is_within(home, parent.java_object):
            area = parent.roi
            inside = [c for c in others if _lies_in(wrap(c).roi, area, detection=bool(c.isDetection()))]
            homes = {home: [c for c in others if c not in inside], parent.java_object: inside}
        for target, children in homes.items():
            if children:
                moved = ArrayList()
                for child in children:
                    moved.add(child)
                target.addChildObjects(moved)


def _is_within(obj: Any, top: Any) -> bool:
    """Whether the Java object ``obj`` is ``top`` or lies below it."""
    while obj is not None:
        if obj == top:
            return True
        obj = obj.getParent()
    return False


def _lies_in(geometry: BaseGeometry, area: BaseGeometry, *, detection: bool) -> bool:
    """Whether QuPath's Resolve hierarchy would put an object there: a detection (a tile too) where ``area`` holds its
    centroid, on the boundary too, anything else where ``area`` covers it.

    QuPath asks a point locator where the centroid lies and takes any answer but ``EXTERIOR``, so a centroid on the
    boundary is inside (PathObjectTileCache.java v0.4.4:298-313, v0.5.1:298-313; RoiRelate.java v0.6.0 and
    v0.7.0:156-186, by PathObjectHierarchy.filterObjectsForROI, v0.4.4:875-876, v0.7.0:860-861, and
    insertPathObject, v0.4.4:359-360, v0.7.0:314-315): shapely's ``covers``, not ``contains``. Since v0.6 the
    centroid is the detection's own ROI's, a cell's too (v0.4.4 and v0.5 took a cell's nucleus): paquo's ``roi``.
    Annotations: ``covers``, as v0.4.4 and v0.5 (PreparedGeometry.covers, PathObjectHierarchy.java v0.4.4:878);
    since v0.6, RoiRelate.coversWithTolerance (RoiRelate.java v0.6.0:90-149) also counts one sticking out of ``area``
    by less than 0.02 px (2 / the scale 100 of GeometryTools' precision model, GeometryTools.java v0.6.0:126-127),
    found with JTS's MaximumInscribedCircle and DiscreteHausdorffDistance, which the scripts' plain helpers do not
    reach: such an annotation of yours stays beside ``area`` here, where it was, rather than going back in.

    >>> from shapely.geometry import box
    >>> [_lies_in(box(x, 4, x + 2, 6), box(0, 0, 10, 10), detection=True) for x in (8, 9, 10)]
    [True, True, False]
    """
    return bool(area.covers(geometry.centroid)) if detection else bool(area.covers(geometry))


def _own_or_analysed(child: Any) -> tuple[bool, bool]:
    """Whether a Java path object is one this tool wrote, and whether it is an analysed parent: an annotation or a
    TMA core (``PathObject.isTMACore()``, PathObject.java v0.4.4:621, v0.5.1:621, v0.6.0:563, v0.7.0:561) that
    carries :data:`ANALYSED_SIGNATURE`. A core is no annotation (``isAnnotation()`` is false for it), and taken for
    a detection an analysed core's results were another's to take.

    Measurement names are read only where they decide it (annotations, cores, detections of this tool's classes):
    reading them makes QuPath create an empty measurement list on every other object.
    """
    cls = child.getPathClass()
    classification = None if cls is None else str(cls.toString())
    kind = (
        "tile"
        if child.isTile()
        else "annotation"
        if child.isAnnotation()
        else "TMA core"
        if child.isTMACore()
        else "detection"
    )
    name = child.getName()
    names: list[str] = []
    parent_kind = kind in ("annotation", "TMA core")
    if parent_kind or (kind == "detection" and classification in OWN_DETECTION_CLASSES):
        names = list(_paquo()["annotation"](child).measurements)  # any paquo wrapper reads names across versions
    own = is_own_object(kind, classification, None if name is None else str(name), names)
    return own, parent_kind and ANALYSED_SIGNATURE in names


def _to_paquo(obj: QuPathObject, classes: dict[str, Any]) -> Any:
    p = _paquo()
    spec_class = None if obj.classification is None else classes[obj.classification]
    # NaN is left out, as the sidecars leave it out (to_feature): QuPath keeps a NaN it is given and shows it as a
    # measurement of no value (its GeoJSON writes "NaN", which the readers here leave out as missing).
    made = p[obj.object_type].from_shapely(obj.geometry, spec_class, finite_measurements(obj.measurements))
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


def remove_whole_image_analysis(entry: Any) -> int:
    """Remove an earlier run's whole-image ``PD-L1 analysis`` annotation and this tool's objects under it; how many
    objects went (0: there was none). Called before the cores of a TMA grid are analysed.

    A TMA analysed whole (before TMA cores were targets, or by ``pdl1 run`` without QuPath and
    ``pdl1_import_results.groovy``, whose notice sends you to the per-core analysis) kept that analysis when its
    cores were analysed: an analysed annotation's results are its own (:func:`_own_descendants`), so every nucleus in
    a core was there twice, once under the core and once under ``PD-L1 analysis``, which kept its TPS over all cores.
    Only this tool's objects go (not those under another analysed annotation inside it); your annotations and
    QuPath's detections under it stay where it was (:func:`_rehome_others`).
    """
    from paquo.java import ArrayList

    hierarchy = entry.hierarchy
    wrap = _paquo()["annotation"]
    tops = [
        ann.java_object
        for ann in hierarchy.annotations
        if ann.path_class is not None and ann.path_class.id == PDL1_ANALYSIS.name and ann.name == PDL1_ANALYSIS.name
    ]
    removed = 0
    with hierarchy.no_autoflush():
        for top in tops:
            going = [top, *_own_under(top)]
            _rehome_others(going, wrap(top.getParent()))  # its parent stays: no area test
            stale = ArrayList()
            for obj in going:
                stale.add(obj)
            hierarchy.java_object.removeObjects(stale, True)
            removed += len(going)
    return removed


def write_children(entry: Any, parent: Any, objects: Iterable[QuPathObject], measurements: dict[str, float]) -> int:
    """Replace this tool's earlier children of ``parent`` with ``objects``, and its measurements with ``measurements``.

    Objects this tool did not create are left alone, and so are measurements it did not write (the ``PD-L1: ``
    ones of an earlier run that this one has not are removed: :func:`~bridge.objects.stale_parent_measurements`).
    Two hierarchy events for the whole batch, not one per object: QuPath's ``removeObjects`` fires one for the
    earlier objects (PathObjectHierarchy.java v0.4.4:500), paquo's ``no_autoflush`` one for the rest on leaving.
    """
    from paquo.java import ArrayList

    from bridge.classes import BY_NAME

    classes = {name: path_class(spec) for name, spec in BY_NAME.items()}
    hierarchy = entry.hierarchy
    # An annotation paquo hands out from hierarchy.annotations puts itself back into the hierarchy on every change
    # (its update callback is hierarchy.addObject, which adds under the image's root): a ROI of yours inside another
    # annotation was taken out of it by the first measurement written. A plain wrapper changes the object only; it
    # serves a TMA core as well (tma_cores), whose measurements QuPath's TMA data viewer then shows per core.
    parent = _paquo()["annotation"](parent.java_object)
    with hierarchy.no_autoflush():
        old = _own_descendants(parent)
        if old:
            _rehome_others(old, parent)
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
        measurements = finite_measurements(measurements)  # a NaN one goes, as a stale one does
        for key in stale_parent_measurements(list(parent.measurements), measurements):
            del parent.measurements[key]
        for key, value in measurements.items():
            parent.measurements[key] = value
    return count


def add_image(project: Any, slide: Path) -> Any:
    """Add an image to the project with its type unset, as a project written without QuPath has it.

    Typed here, every slide said H&E, an IHC slide too: ``pdl1 run`` takes the stain from QuPath's image type
    before the colour, and analysed it with the H&E models. Unset, QuPath asks for the type when the image is
    first opened, and ``pdl1 run`` tells the stain from the colour.
    """
    return project.add_image(slide)


def unaddable_images(slides: Iterable[Path]) -> dict[Path, str]:
    """The slides QuPath cannot add to a project, each with QuPath's reason.

    Each is added to a throwaway project in a temporary folder, exactly as the real one will add it
    (server builder, image size, thumbnail), so a project is only created once all of them can be.
    """
    problems: dict[Path, str] = {}
    with tempfile.TemporaryDirectory(prefix="pdl1-check-") as tmp, open_project(Path(tmp) / "check", mode="x") as trial:
        for slide in map(Path, slides):
            problem = slide_file_problem(slide)
            if problem is not None:
                problems[slide] = problem
                continue
            try:
                add_image(trial, slide)
            except Exception as err:  # collected and reported: QuPath's reasons come as OSError or Java exceptions
                problems[slide] = f"QuPath cannot add it ({type(err).__name__}: {err})"
    return problems


def save_entries(entries: Iterable[Any]) -> None:
    """Save the touched entries' ``data.qpdata`` only (not every image, which is slow).

    The project file, which holds the entries' metadata, is saved apart by :func:`save_project`:
    rewriting it after every image multiplies the moments a kill can catch QuPath between writing
    ``project.qpproj.tmp`` and renaming it into place.
    """
    for entry in entries:
        check_saveable(entry)
        try:
            entry.save()
        except Exception as err:  # QuPath's IOException (a full disk, a read-only folder) comes as a Java exception
            raise ProjectError(
                f"{entry.image_name}: QuPath could not save its data in {entry.entry_path} ({type(err).__name__}: "
                f"{err}); make room on the disk or make the project folder writable, then run again with --resume"
            ) from err


def check_saveable(entry: Any) -> None:
    """Refuse an entry whose image is not where the project says: paquo would not save its objects.

    paquo's ``entry.save()`` skips, with only a log line, an entry whose image file it cannot find at the
    entry's URI; the run found the image elsewhere (:func:`~bridge.project.locate_image`), analysed it and
    reported it done while its objects were never written. ``pdl1 run`` first points such an entry at the file it
    found (:func:`point_entry_at`) where ``--search-dir`` was given or the project moved with its images; the entries
    it does not point anywhere are refused here. An entry whose URI paquo does not read as a file (an
    OMERO or web server's image; one QuPath makes of several files) is refused naming the entry and the fix, as
    :func:`~bridge.project.uri_to_path` refuses it, not with paquo's own error.
    """
    try:
        readable = entry.is_readable()
    except (ValueError, NotImplementedError) as err:
        # paquo reads an entry's file by ImageProvider.path_from_uri(entry.uri): for an OMERO or web server's image its
        # _normalize_pathlib_uris raises ValueError("uri unsupported scheme ...") (path_from_uri's own "paquo only
        # supports file:/ URIs as of now" comes after it), and entry.uri raises NotImplementedError("unsupported in
        # paquo as of now") for an image of several files (paquo 0.9, images.py). Said as bridge.project says it where
        # QuPath is not used, for this image alone.
        raise ProjectError(_unreadable_uri(entry, err)) from err
    if not readable:
        raise ProjectError(
            f"{entry.image_name}: QuPath saves an entry's objects only while its image is where the project says "
            f"({entry.uri}), and it is not there; run again with --search-dir naming a folder that holds it (the run "
            "then points the entry at the file it finds there, as QuPath's File > Project... > Check project URIs "
            "does), or point the entry at it in QuPath yourself, or run with --qupath never to write sidecars instead"
        )


@dataclass(frozen=True)
class UriChange:
    """A project entry pointed at its image where a run found it (:func:`point_entry_at`): its URI before and
    after, as QuPath writes them."""

    entry_id: str
    image_name: str
    before: str
    after: str


def point_entry_at(entry: Any, image: Path) -> UriChange | None:
    """Point a project entry at ``image``, its file where the run found it, as QuPath's File > Project... > Check
    project URIs does; the change, or None where the entry's URI names that file already. The change is QuPath's
    entry's, in memory: ``project.qpproj`` has it once :func:`save_project` saves it (QuPath writes the file aside and
    renames it into place), and :func:`put_back_uri` undoes it before then.

    The URI is written as paquo adds an image (``ImageProvider.uri_from_path``: ``file:/abs/path``, links kept as the
    run found it). What paquo read of the entry is dropped first (:func:`let_go`), and nothing of it may be read
    before: QuPath builds the image of an entry's data from the URI the entry has when its data is read, and saving
    that data gives the entry that URI back (DefaultProject ``readImageData``, ``saveImageData``), so a change made
    after a read was undone by the save. The entry's own ``updateURIs`` (``updateServerURIs`` before QuPath 0.6, as
    paquo's ``update_image_paths`` calls them; asked of the entry, which a stand-in is too) replaces its one URI:
    ``update_image_paths`` reads every entry's ``uri`` first, which raises for an image QuPath makes of several files,
    so one such image anywhere in the project stopped every other from being pointed at its file.
    """
    p = _paquo()
    after = str(p["ImageProvider"].uri_from_path(Path(os.path.abspath(image))))
    java = entry.java_object
    uris = list(java.getURIs() if hasattr(java, "getURIs") else java.getServerURIs())
    if len(uris) != 1:
        raise ProjectError(_unreadable_uri(entry, ValueError(f"{len(uris)} URIs")))
    before = str(uris[0].toString())
    if uri_to_path(before) == uri_to_path(after):
        return None
    let_go(entry)
    if not _replace_uri(entry, uris[0], p["URI"](after)):
        raise ProjectError(
            f"{entry.image_name}: QuPath did not change the entry's URI ({before}) to its image's place here "
            f"({after}); point the entry at it in QuPath (File > Project... > Check project URIs) and save the "
            "project, or run with --qupath never to write sidecars instead"
        )
    change = UriChange(str(entry.entry_id), str(entry.image_name), before, after)
    if not entry.is_readable():  # what paquo's save asks (check_saveable): never left half-done
        put_back_uri(entry, change)
        raise ProjectError(
            f"{entry.image_name}: pointed at {image}, QuPath's entry still does not read it as a file ({after}); "
            "point the entry at it in QuPath (File > Project... > Check project URIs) and save the project, or run "
            "with --qupath never to write sidecars instead"
        )
    return change


def put_back_uri(entry: Any, change: UriChange) -> None:
    """Undo :func:`point_entry_at` on an entry whose results were not saved (the project file has not been saved
    since): the next save of ``project.qpproj`` leaves its URI as it was. What paquo read of it is dropped too.

    Said, never raised: it runs on a failure's path (a Ctrl-C, a failed save), whose own error must go on; a Java
    error here replaced it, and a Ctrl-C became one image's failure while the run went on.
    """
    p = _paquo()
    let_go(entry)
    try:
        replaced = _replace_uri(entry, p["URI"](change.after), p["URI"](change.before))
        why = f"QuPath's entry no longer has {change.after}"
    except ProjectError as err:
        replaced, why = False, f"QuPath refused: {type(err.__cause__).__name__}: {err.__cause__}"
    if not replaced:
        log.warning(
            "%s: its URI could not be put back to %s (%s); check it in QuPath (File > Project... > Check project "
            "URIs) before saving the project there",
            change.image_name,
            change.before,
            why,
        )


def _replace_uri(entry: Any, before: Any, after: Any) -> bool:
    """Replace the entry's URI ``before`` with ``after`` (Java URIs, which compare by their parts); whether QuPath
    changed it. Java's reasons (an IOException) are said as a :class:`~bridge.project.ProjectError`."""
    replacements = _paquo()["HashMap"]()
    replacements.put(before, after)
    java = entry.java_object
    update = java.updateURIs if hasattr(java, "updateURIs") else java.updateServerURIs
    try:
        return bool(update(replacements))
    except Exception as err:  # Java's exceptions come through JPype as various exceptions
        raise ProjectError(
            f"{entry.image_name}: QuPath could not change the entry's URI from {before} to {after} "
            f"({type(err).__name__}: {err}); point the entry at it in QuPath (File > Project... > Check project URIs)"
        ) from err


def _unreadable_uri(entry: Any, err: Exception) -> str:
    """Why paquo cannot give the file of an entry whose URI it does not read (``err``, paquo's reason): not a
    ``file:`` URI (the fix :func:`~bridge.project.not_a_file_uri` says), a ``file:`` URI it cannot parse, or several
    URIs (an image QuPath makes of several files)."""
    where = f"image of entry {entry.entry_id} ({entry.image_name})"
    java = entry.java_object
    try:  # what paquo's entry.uri reads, without its refusal of several (getURIs since QuPath 0.6, getServerURIs
        # before: paquo's compatibility.supports_get_uris; asked of the entry, which a stand-in is too)
        uris = [str(u.toString()) for u in (java.getURIs() if hasattr(java, "getURIs") else java.getServerURIs())]
    except Exception:  # Java's reasons come as various exceptions: the entry is named all the same
        uris = []
    if len(uris) == 1 and urlparse(uris[0]).scheme.lower() == "file":
        return (
            f"{where}: QuPath's URI of it, {uris[0]!r}, does not read as a file path ({err}); point the entry at its "
            "file again in QuPath (File > Project... > Check project URIs)"
        )
    if len(uris) == 1:
        return f"{where}: {not_a_file_uri(uris[0])}"
    made_of = f"{len(uris)} files ({', '.join(uris)})" if uris else "what paquo cannot read as one file"
    return (
        f"{where}: QuPath makes the image of {made_of}, and pdl1 reads one file; export the image from QuPath "
        "(File > Export images... > OME TIFF) and add that file to the project instead"
    )


def save_project(project: Any) -> None:
    """Save ``project.qpproj`` (entries, their metadata, the class list) without the images."""
    project.save(images=False)


__all__ = [
    "TILE_NAME",
    "QuPathUnavailableError",
    "UriChange",
    "add_image",
    "annotation_targets",
    "backup_data",
    "check_saveable",
    "core_is_analysed",
    "core_is_missing",
    "ensure_classes",
    "find_or_create_analysis_parent",
    "let_go",
    "open_project",
    "path_class",
    "point_entry_at",
    "put_back_uri",
    "qupath_available",
    "remove_whole_image_analysis",
    "restore_data",
    "save_entries",
    "save_project",
    "set_entry_metadata",
    "tma_cores",
    "unaddable_images",
    "write_children",
]


def read_entry_objects(
    project_path: str | Path,
    entry_ids: Iterable[str] | None = None,
    keep: Callable[[str, QuPathObject], bool] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, list[QuPathObject]]:
    """Every annotation, TMA core and detection of the project's entries (all, or ``entry_ids``), read-only; where
    ``keep(entry ID, object)`` is given, those it keeps (a slide's cells are a million objects; what the caller passes
    over it counts itself). ``on_progress(done, total)`` counts the entries read.

    Each object goes through QuPath's own GeoJSON writer (``to_geojson``, GsonTools), so what comes
    back is exactly what ``pdl1_export_labels.groovy`` writes for the same entry: one reader of labels,
    whichever way they arrive. Keys are entry IDs.

    A damaged ``data.qpdata`` (:func:`~bridge.project.qpdata_problem`) is refused before QuPath reads any entry,
    each one named with its fix: read-only, paquo reads it with ``PathIO.readHierarchy``, which on a file cut short
    logs "Reached end of file unexpectedly..." and reads on, for ever (its loop catches the EOFException:
    PathIO.java v0.4.4:684-719, v0.6.0:742-778).
    """
    from bridge.qupath_geojson import from_feature

    wanted = None if entry_ids is None else {str(e) for e in entry_ids}
    out: dict[str, list[QuPathObject]] = {}
    with open_project(project_path, mode="r") as project:
        entries = [e for e in project.images if wanted is None or str(e.entry_id) in wanted]
        damaged = []
        for entry in entries:
            data = Path(entry.entry_path) / "data.qpdata"
            problem = qpdata_problem(data) if data.exists() else None  # none: QuPath reads an empty hierarchy
            if problem is not None:
                damaged.append(damaged_data_error(data, image_name=str(entry.image_name), problem=problem))
        if len(damaged) == 1:
            raise damaged[0]
        if damaged:
            raise ProjectError(f"{len(damaged)} entries' QuPath data is damaged:\n" + "\n".join(map(str, damaged)))
        if on_progress is not None:
            on_progress(0, len(entries))
        for done, entry in enumerate(entries, start=1):
            entry_id = str(entry.entry_id)
            hierarchy = entry.hierarchy
            objects = []
            for obj in itertools.chain(hierarchy.annotations, _grid_cores(hierarchy), hierarchy.detections):
                feature = obj.to_geojson()
                if "id" not in feature:  # a QuPath that leaves the id out of its JSON
                    feature["id"] = str(obj.java_object.getID())
                read = from_feature(feature)
                if keep is None or keep(entry_id, read):
                    objects.append(read)
            out[entry_id] = objects
            let_go(entry)
            if on_progress is not None:
                on_progress(done, len(entries))
    return out


def set_entry_metadata(project_path: str | Path, values: dict[str, dict[str, str | None]]) -> None:
    """Set (a string) or remove (None) entry metadata, by entry ID, and save ``project.qpproj`` only.

    Entry metadata lives in the project file, so no ``data.qpdata`` is read or written; QuPath writes the
    project file aside and renames it into place. An entry ID the project lacks is refused before anything
    is set.
    """
    with open_project(project_path, mode="r+") as project:
        by_id = {str(entry.entry_id): entry for entry in project.images}
        missing = sorted(set(values) - set(by_id))
        if missing:
            raise ProjectError(
                f"{project_path}: no entry {', '.join(missing)} any more; run `pdl1 run` on the project again"
            )
        for entry_id, keys in values.items():
            metadata = by_id[entry_id].metadata
            for key, value in keys.items():
                if value is None:
                    if key in metadata:
                        del metadata[key]
                else:
                    metadata[key] = value
        save_project(project)
