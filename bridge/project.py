"""QuPath projects read as JSON (no QuPath needed), image lookup, run status and sidecar paths.

QuPath keeps entries, image URIs and entry metadata in ``project.qpproj`` (JSON); the objects
live in each entry's ``data.qpdata`` (Java serialisation, only QuPath reads it). Everything
that needs only the JSON is here; :mod:`bridge.qupath` does the rest through paquo.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

from bridge.atomic import replace_atomically
from inference import Pdl1Error, is_finite_number

log = logging.getLogger(__name__)
T = TypeVar("T")

PDL1_DIR = "pdl1"
STATUS_FILE = "status.json"


class ProjectError(Pdl1Error, ValueError):
    """A QuPath project is missing, malformed or cannot be written."""


class DamagedDataError(ProjectError):
    """An entry's ``data.qpdata`` is empty, cut short or not QuPath data (a kill or a full disk during a save)."""


class ImageMovedError(Pdl1Error, FileNotFoundError):
    """An entry's image is not where the project says and was not found nearby."""


@dataclass(frozen=True)
class ProjectEntry:
    """One image of a QuPath project, as ``project.qpproj`` describes it."""

    entry_id: str
    image_name: str
    uri: str
    metadata: dict[str, str] = field(default_factory=dict)
    size_px: tuple[int, int] | None = None  # (width, height) as QuPath shows the image, when stated
    mpp: float | None = None  # µm/px of QuPath's calibration (the file's, or what a user set), when in µm
    not_analysable: str | None = None  # why the file cannot stand for the image QuPath shows, if it cannot
    image_type: str | None = None  # QuPath's image type (BRIGHTFIELD_H_E, ...), when its data states one

    @property
    def stain(self) -> str | None:
        """The stain QuPath's image type says ("H&E", "H-DAB" or "other"); None when unset."""
        return stain_of_image_type(self.image_type)

    @property
    def path(self) -> PurePosixPath | PureWindowsPath:
        """The image path as the project states it (a Windows path for a project made on Windows)."""
        return uri_to_path(self.uri)


@dataclass(frozen=True)
class UnreadableEntry:
    """An image of ``project.qpproj`` whose record lacks what is needed to find it (entryID, serverBuilder.uri)."""

    index: int  # its place in the project's "images" list, from 0
    entry_id: str | None
    image_name: str
    error: ProjectError  # what is missing, and the fix


@dataclass(frozen=True)
class ProjectInfo:
    path: Path  # the .qpproj file
    version: str | None
    entries: tuple[ProjectEntry, ...]
    saved_uri: str | None = None  # where QuPath last saved the project (its "uri"), None if unstated
    unreadable: tuple[UnreadableEntry, ...] = ()  # only from read_project(..., unreadable_entries="keep")

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def saved_folder(self) -> PurePosixPath | PureWindowsPath | None:
        """The project's folder when QuPath last saved it: where it was made, if it has moved since."""
        if not self.saved_uri:
            return None
        try:
            return uri_to_path(self.saved_uri).parent
        except ProjectError:
            return None


def uri_to_path(uri: str) -> PurePosixPath | PureWindowsPath:
    """File path of a QuPath image URI; Windows URIs (``file:/C:/Slides/x.svs``) give Windows paths.

    >>> str(uri_to_path("file:/C:/Slides/CMU-1%20small.svs"))
    'C:\\\\Slides\\\\CMU-1 small.svs'
    >>> str(uri_to_path("file:///data/slides/a.svs"))
    '/data/slides/a.svs'
    >>> str(uri_to_path("file://localhost/data/slides/a.svs"))  # RFC 8089: this machine, as file:///
    '/data/slides/a.svs'
    >>> uri_to_path("file:////server/share/a.svs") == uri_to_path("file://server/share/a.svs")  # a UNC share, twice
    True
    """
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise ProjectError(not_a_file_uri(uri))
    path = unquote(parsed.path)
    if parsed.netloc and parsed.netloc.lower() != "localhost":  # UNC share: file://server/share/x.svs
        return PureWindowsPath(f"//{parsed.netloc}{path}")
    if path.startswith("//") and not path.startswith("///"):
        # The same share as Java's File.toURI writes it (file:////server/share/x.svs): QuPath writes a project's own
        # URI so, and an image it located again by Path.toUri with two slashes.
        return PureWindowsPath(path)
    if len(path) >= 3 and path[0] == "/" and path[2] == ":":
        return PureWindowsPath(path[1:])
    return PurePosixPath(path)


def not_a_file_uri(uri: str) -> str:
    """What to say of an image QuPath opens from ``uri``, which is not a ``file:`` URI (an OMERO or web server's
    image): pdl1 reads files only. :func:`uri_to_path` says it, and so does :func:`bridge.qupath.check_saveable`
    where paquo meets such an entry.

    >>> not_a_file_uri("https://omero.example.org/webclient/?show=image-7")[:81]
    'only file: image URIs can be analysed (a file on this machine or a mounted share)'
    """
    return (
        f"only file: image URIs can be analysed (a file on this machine or a mounted share), got {uri!r}; "
        "for an image QuPath opens from a server (OMERO, a web address), export it from QuPath (File > Export "
        "images... > OME TIFF) and add that file to the project instead"
    )


def path_to_uri(path: str | Path) -> str:
    """QuPath's form of a file URI (``file:/abs/path``): absolute, links kept, as QuPath writes the path it was given
    (``File.toURI``); a link resolved would name where it leads on this machine, which another may not have.

    >>> path_to_uri("/data/a b.svs")
    'file:/data/a%20b.svs'
    """
    return "file:" + Path(os.path.abspath(path)).as_uri()[len("file://") :]


# Whole-slide and plain image files a folder given for a project may hold instead (to say so).
_SLIDE_SUFFIXES = frozenset(
    {".svs", ".ndpi", ".scn", ".bif", ".svslide", ".tif", ".tiff", ".qptiff", ".mrxs", ".vms", ".czi", ".vsi"}
)


def slide_files_in(folder: Path) -> list[Path]:
    """The files directly in ``folder`` that a slide suffix tells (any case), by name; OSError where it cannot be
    listed."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _SLIDE_SUFFIXES)


def folder_given_as_slide(folder: Path) -> str:
    """Why a folder cannot be added as a slide, with the glob of its slides to give instead (``*.svs`` where it
    holds none that a slide suffix tells)."""
    try:
        suffixes = sorted(p.suffix for p in slide_files_in(folder))
    except OSError:
        suffixes = []
    return (
        f"a folder, not a slide file: give the slide files in it (e.g. {folder}/*{suffixes[0] if suffixes else '.svs'})"
    )


def slide_file_problem(slide: Path) -> str | None:
    """Why ``slide`` cannot be added to a project before any reader tries it (a folder, nothing there), else None."""
    if slide.is_dir():  # slides/ given for slides/*.svs
        return folder_given_as_slide(slide)
    if not slide.is_file():
        return "slide not found"
    return None


def find_project_file(path: str | Path) -> Path:
    """``project.qpproj`` itself, or the one inside a project folder.

    QuPath saves the project file as ``project.qpproj.tmp``, moves the old one to ``.backup`` and then
    renames the ``.tmp`` into place: a save killed in between leaves no ``project.qpproj`` but a whole
    copy beside it, which the error names with the command that restores it.
    """
    path = Path(path)
    if path.is_file() and ".qpproj" not in path.name:  # a slide or a results file given in the project's place
        raise ProjectError(f"{path}: a file, not a QuPath project; give the project's folder or its project.qpproj")
    candidate = path / "project.qpproj" if path.is_dir() else path
    if not candidate.is_file():
        if path.is_dir() or path.suffix == ".qpproj":
            restorable = _restorable_project_files(candidate)
            if restorable:
                best, images = restorable[0]
                older = "".join(f"; or the older {p.name} ({n} images)" for p, n in restorable[1:])
                raise ProjectError(
                    f"{candidate} is missing, but {best} is a whole QuPath project file ({images} images): a save "
                    f"was interrupted before QuPath renamed it into place; restore it with "
                    f"`mv '{best}' '{candidate}'`{older}, then run again"
                )
        # The folder a lab keeps a project in (QuPath's "project" beside the slides) given for the project itself.
        inside = sorted(p.parent for p in path.glob("*/project.qpproj")) if path.is_dir() else []
        if inside:
            raise ProjectError(
                f"{path}: no QuPath project here, but in {', '.join(map(str, inside))}: give that folder (or its "
                "project.qpproj)"
            )
        slides = [p.name for p in slide_files_in(path)] if path.is_dir() else []
        if slides:  # a folder of slides given for a project
            shown = first_names(slides)
            raise ProjectError(
                f"{path}: no QuPath project here (expected a project folder or its project.qpproj), but slides "
                f"({shown}): a folder of slides is no project; make one with `pdl1 init-project PROJECT "
                f"{path}/*{Path(slides[0]).suffix}`, or give the slide files themselves where the command takes them"
            )
        raise ProjectError(f"{path}: no QuPath project here (expected a project folder or its project.qpproj)")
    return candidate


def _restorable_project_files(qpproj: Path) -> list[tuple[Path, int]]:
    """QuPath's ``.tmp`` (newest) and ``.backup`` of a missing project file that read as a project,
    with their image counts."""
    found = []
    for suffix in (".tmp", ".backup"):
        copy = qpproj.with_name(qpproj.name + suffix)
        try:
            raw = json.loads(copy.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # absent, unreadable or cut short: not a copy to restore
            continue
        if isinstance(raw, dict) and isinstance(raw.get("images"), list):
            found.append((copy, len(raw["images"])))
    return found


# What to do about a project file that does not read as one and has no whole copy beside it.
_RECREATE = (
    "restore it from your own backups, or re-create the project: in QuPath (File > Project > Create project, then "
    "Add images) or with `pdl1 init-project FOLDER SLIDES...`"
)


def read_project(path: str | Path, *, unreadable_entries: str = "raise") -> ProjectInfo:
    """Read a project's entries from its JSON; raises :class:`ProjectError` naming what is wrong.

    An image record without entryID or serverBuilder.uri raises too; with ``unreadable_entries="keep"``
    it is left out of ``entries`` and kept in ``unreadable`` instead, so a batch can fail that image
    alone and analyse the others.
    """
    if unreadable_entries not in ("raise", "keep"):
        raise ValueError(f"unreadable_entries: expected 'raise' or 'keep', got {unreadable_entries!r}")
    qpproj = find_project_file(path)
    try:
        raw = json.loads(qpproj.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        restorable = _restorable_project_files(qpproj)
        fix = (
            f"{restorable[0][0]} is a whole copy ({restorable[0][1]} images): restore it with "
            f"`cp '{restorable[0][0]}' '{qpproj}'`, then run again"
            if restorable
            else "the project file is half-written or corrupt, and no whole copy lies beside it (QuPath's "
            f"project.qpproj.backup or .tmp): {_RECREATE}"
        )
        raise ProjectError(f"{qpproj}: not valid JSON ({err}); {fix}") from err
    problem = _not_a_project(raw)
    if problem is not None:
        raise ProjectError(
            f"{qpproj}: not a QuPath project: {problem} (QuPath writes an 'images' list, empty or not); {_RECREATE}"
        )
    entries = []
    positions = []  # each entry's place in the "images" list
    unreadable = []
    for i, image in enumerate(raw["images"]):
        try:
            outer = image["serverBuilder"]
            builder, not_analysable = file_builder(outer)
            if builder is None and not_analysable is None:
                raise KeyError("uri")
            entry_id = _entry_id(image["entryID"])
            meta = (builder or {}).get("metadata") or {}
            width, height = meta.get("width"), meta.get("height")
            entries.append(
                ProjectEntry(
                    entry_id=entry_id,
                    image_name=str(image.get("imageName", f"image {entry_id}")),
                    uri=str(builder["uri"]) if builder is not None else "",
                    metadata={str(k): str(v) for k, v in (image.get("metadata") or {}).items()},
                    size_px=(width, height) if isinstance(width, int) and isinstance(height, int) else None,
                    mpp=calibration_um(meta),
                    not_analysable=not_analysable,
                    image_type=image_type_of(qpproj.parent / "data" / entry_id),
                )
            )
            positions.append(i)
        except (KeyError, TypeError, AttributeError, _EntryIdError) as err:
            named = image.get("imageName") if isinstance(image, dict) else None
            entry_id = image.get("entryID") if isinstance(image, dict) else None
            name = f" ({named})" if isinstance(named, str) else ""
            # A KeyError names the key; a TypeError/AttributeError says only "'int' object has no attribute 'get'".
            problem = f"lacks {err}" if isinstance(err, KeyError) else f"is malformed ({err})"
            if isinstance(err, _EntryIdError):  # one such as ../x named folders
                problem = str(err)
            # Counted from 1, as a person counts the project's images (#0 read as a first image that was fine).
            error = ProjectError(
                f"{qpproj}: image #{i + 1}{name} {problem} (expected entryID and serverBuilder.uri); remove it in "
                "QuPath and add the image again (File > Project > Add images)"
            )
            if unreadable_entries == "raise":
                raise error from err
            unreadable.append(
                UnreadableEntry(
                    index=i,
                    # one that is no whole number is no key either: it would name another folder
                    entry_id=None if entry_id is None or isinstance(err, _EntryIdError) else str(entry_id),
                    image_name=named if isinstance(named, str) else f"image #{i + 1}",
                    error=error,
                )
            )
    entries, shared = _without_shared_ids(qpproj, entries, positions)
    if shared and unreadable_entries == "raise":
        raise shared[0].error
    unreadable.extend(shared)
    saved_uri = raw.get("uri")
    return ProjectInfo(
        qpproj,
        raw.get("version"),
        tuple(entries),
        saved_uri if isinstance(saved_uri, str) else None,
        unreadable=tuple(sorted(unreadable, key=lambda u: u.index)),  # in the project's order
    )


class _EntryIdError(ValueError):
    """An image record's entryID that is no whole number; its message says what it is."""


def _entry_id(value: Any) -> str:
    """A project image's entryID as a folder name: QuPath writes a whole number (its data is ``data/<entryID>``,
    this tool's results ``pdl1/<entryID>``); anything else (``../x``, null) would name another folder, so it is
    refused (:class:`_EntryIdError` saying what it is)."""
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
        raise _EntryIdError(f"has entryID {_shorten(value)}, not the whole number QuPath writes")
    return str(int(value))


def _without_shared_ids(
    qpproj: Path, entries: list[ProjectEntry], positions: list[int]
) -> tuple[list[ProjectEntry], list[UnreadableEntry]]:
    """``entries`` (at ``positions`` in the project's list) less those whose entryID another shares (both would
    read and write one ``data/<ID>`` and ``pdl1/<ID>``: one image's results lost under the other's), and those
    as unreadable, each naming the other, keyed by their place (their ID is no key)."""
    by_id: dict[str, list[int]] = {}
    for i, entry in enumerate(entries):
        by_id.setdefault(entry.entry_id, []).append(i)
    shared = {i for indices in by_id.values() if len(indices) > 1 for i in indices}
    if not shared:
        return entries, []
    out = []
    for i in sorted(shared):
        entry = entries[i]
        others = ", ".join(entries[j].image_name for j in by_id[entry.entry_id] if j != i)
        error = ProjectError(
            f"{qpproj}: entry {entry.entry_id} ({entry.image_name}) shares its entryID with {others}, so their "
            "data and results would overwrite each other; QuPath gives each entry its own: remove one of them in "
            "QuPath and add its image again (File > Project > Add images)"
        )
        out.append(UnreadableEntry(index=positions[i], entry_id=None, image_name=entry.image_name, error=error))
    return [e for i, e in enumerate(entries) if i not in shared], out


def _not_a_project(raw: Any) -> str | None:
    """Why a project file's JSON is not a QuPath project's (None when it has its 'images' list)."""
    if not isinstance(raw, dict):
        return f"its JSON is {_shorten(raw)}, not an object"
    if "images" not in raw:
        return "it has no 'images' key"
    if not isinstance(raw["images"], list):
        return f"its 'images' is {_shorten(raw['images'])}, not a list"
    return None


# QuPath's ImageData.ImageType -> the stain a model is trained on (inference's manifest ``stain``).
IMAGE_TYPE_STAINS = {
    "BRIGHTFIELD_H_E": "H&E",
    "BRIGHTFIELD_H_DAB": "H-DAB",
    "BRIGHTFIELD_OTHER": "other",
    "FLUORESCENCE": "other",
    "OTHER": "other",
}


def stain_of_image_type(image_type: str | None) -> str | None:
    """The stain of a QuPath image type; None for UNSET or none.

    >>> stain_of_image_type("BRIGHTFIELD_H_DAB"), stain_of_image_type("UNSET")
    ('H-DAB', None)
    """
    return IMAGE_TYPE_STAINS.get(image_type or "")


def image_type_of(entry_folder: Path) -> str | None:
    """QuPath's image type of an entry, from the ``summary.json`` QuPath writes beside its ``data.qpdata``.

    None when the entry was never saved with data (QuPath writes the file then), or the file does not read: then
    a warning names it, as the stain is told from the colour instead of the type a person may have set.
    """
    path = entry_folder / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning(
            "%s does not read (%s), so QuPath's image type of that entry is not known (its stain is told from its "
            "colour), nor whether QuPath saved it after its objects were exported; open the image in QuPath and save "
            "it (QuPath writes the file again; for pdl1 run, --stain also states the stain)",
            path,
            err,
        )
        return None
    image_type = summary.get("imageType") if isinstance(summary, dict) else None
    return image_type if isinstance(image_type, str) else None


def annotation_class_counts(entry_folder: Path) -> dict[str, int] | None:
    """The annotations of an entry by class, as QuPath last saved them (``hierarchy.annotationClassificationCounts``
    of its ``summary.json``); None where the file is absent, does not read or holds none.

    Read without QuPath: what an entry holds, where its objects (``data.qpdata``) cannot be read here.
    """
    try:
        summary = json.loads((entry_folder / "summary.json").read_text(encoding="utf-8"))
        counts = summary["hierarchy"]["annotationClassificationCounts"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(counts, dict):
        return None
    return {str(k): int(v) for k, v in counts.items() if isinstance(v, int) and not isinstance(v, bool)}


_MICRONS = {"µm", "μm", "um", "micron", "microns"}  # QuPath writes µm; the others are its aliases


def calibration_um(metadata: dict[str, Any]) -> float | None:
    """Mean µm/px of a server builder's ``pixelCalibration``, None when it is not in microns (uncalibrated).

    >>> calibration_um({"pixelCalibration": {"pixelWidth": {"value": 0.25, "unit": "µm"},
    ...                                      "pixelHeight": {"value": 0.27, "unit": "µm"}}})
    0.26
    >>> calibration_um({"pixelCalibration": {"pixelWidth": {"value": 1.0, "unit": "px"},
    ...                                      "pixelHeight": {"value": 1.0, "unit": "px"}}}) is None
    True
    """
    calibration = metadata.get("pixelCalibration")
    if not isinstance(calibration, dict):
        return None
    sizes = []
    for key in ("pixelWidth", "pixelHeight"):
        size = calibration.get(key)
        if not isinstance(size, dict) or str(size.get("unit", "")).strip() not in _MICRONS:
            return None
        value = size.get("value")
        if not isinstance(value, int | float) or not value > 0:
            return None
        sizes.append(float(value))
    return (sizes[0] + sizes[1]) / 2


def file_builder(builder: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The server builder that names the image file, and why that file, read as it is, is not the image
    QuPath shows (None when it is).

    QuPath wraps the file's builder in others when it shows the image rotated, cropped, with its channels
    changed or combined from several files; results computed on the file would then land in the wrong
    place. Only a pyramid QuPath builds on the fly, or a rotation of none, leaves the pixels in place.
    A file's ``--series N`` (a Bio-Formats multi-image file) other than 0 is another image than the one
    pdl1's readers open.

    >>> file_builder({"builderType": "rotated", "rotation": "ROTATE_180", "builder": {"uri": "file:/a.svs"}})
    ({'uri': 'file:/a.svs'}, 'QuPath shows it rotated (ROTATE_180); pdl1 reads the file unrotated')
    """
    why: str | None = None
    while True:
        kind = builder.get("builderType", "uri")
        if kind == "uri":
            if not isinstance(builder.get("uri"), str):
                raise KeyError("uri")
            args = [str(a) for a in builder.get("args") or []]
            if why is None and "--series" in args[:-1] and args[args.index("--series") + 1] != "0":
                why = f"it is series {args[args.index('--series') + 1]} of a multi-image file; pdl1 reads the first"
            return builder, why
        if kind == "rotated":
            if builder.get("rotation", "ROTATE_NONE") != "ROTATE_NONE":
                why = why or f"QuPath shows it rotated ({builder.get('rotation')}); pdl1 reads the file unrotated"
        elif kind != "pyramidize":
            why = why or f"QuPath shows it through a '{kind}' server (cropped, transformed or made of several files)"
        inner = builder.get("builder") or builder.get("serverBuilder")
        if not isinstance(inner, dict):
            return None, why
        builder = inner


def moved_with_project(
    image: PurePosixPath | PureWindowsPath, saved_folder: PurePosixPath | PureWindowsPath, folder: Path
) -> Path | None:
    """Where an image lies now if it moved together with its project: its path relative to the folder
    the project was saved in, taken from the folder the project is in now (what QuPath's *Check project
    URIs* suggests). None when the two stated paths share no root (another drive).

    >>> moved_with_project(PureWindowsPath("C:/Study/slides/a.svs"), PureWindowsPath("C:/Study/project"),
    ...                    Path("/data/Study/project"))
    PosixPath('/data/Study/slides/a.svs')
    """
    if type(image) is not type(saved_folder) or not image.is_absolute():
        return None
    windows = isinstance(image, PureWindowsPath)

    def key(part: str) -> str:
        return _case_key(part) if windows else part  # Windows paths ignore case

    if key(image.anchor) != key(saved_folder.anchor):
        return None
    common = 0
    for a, b in zip(image.parts[:-1], saved_folder.parts, strict=False):
        if key(a) != key(b):
            break
        common += 1
    relative = [os.pardir] * (len(saved_folder.parts) - common) + list(image.parts[common:])
    return Path(os.path.normpath(folder.joinpath(*relative)))


class ImageSearch:
    """Folders to look through, to any depth (as deep as QuPath's own search: 8), for images that are not
    where their project says. Each folder is listed once, on first need, so a batch of moved images costs
    one walk; hidden folders are skipped."""

    MAX_DEPTH = 8

    def __init__(self, folders: tuple[Path, ...] = ()):
        self.folders = tuple(Path(f) for f in folders)
        self._by_name: dict[str, list[Path]] | None = None
        self._by_case_key: dict[str, list[Path]] = {}

    def matches(self, name: str, *, any_case: bool = False) -> list[Path]:
        """The files called ``name`` (compared in Unicode's NFC: macOS writes names decomposed, Java's URIs and Linux
        tools composed), each file once however many links lead to it (the first found, by name).

        Where none is called exactly that, those called so in another case (``case1.svs`` for ``Case1.SVS``): with
        ``any_case`` (the name is a Windows path's, whose case Windows ignores), or where the file's own folder
        opens it under ``name`` (a file system that ignores case, as macOS's and Windows' do by default). A name of
        a Linux or macOS path searched on a file system that tells case names one file: another case is another file.
        """
        if self._by_name is None:
            self._by_name = {}
            for folder in self.folders:
                self._index(folder, self.MAX_DEPTH)
        paths = self._by_name.get(unicodedata.normalize("NFC", name), [])
        if not paths:
            paths = [p for p in self._by_case_key.get(_case_key(name), []) if any_case or _opens_as(p, name)]
        found: dict[tuple, Path] = {}
        for path in paths:
            found.setdefault(same_file_key(path), path)
        return list(found.values())

    def _index(self, folder: Path, depth: int) -> None:
        assert self._by_name is not None
        try:
            children = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:  # unreadable or missing: nothing found there
            return
        for child in children:
            if child.name.startswith("."):
                continue
            if child.is_file():
                self._by_name.setdefault(unicodedata.normalize("NFC", child.name), []).append(Path(child.path))
                self._by_case_key.setdefault(_case_key(child.name), []).append(Path(child.path))
            elif child.is_dir() and depth > 1:
                self._index(Path(child.path), depth - 1)


def _case_key(name: str) -> str:
    """A file name as a file system that ignores case compares it: in NFC, each character in its simple upper case,
    as Windows' upcase table maps it (``str.casefold`` made ``straße.svs`` and ``STRASSE.SVS`` one name, two files
    on Windows).

    >>> _case_key("Case1.svs") == _case_key("CASE1.SVS"), _case_key("straße") == _case_key("STRASSE")
    (True, False)
    """
    return "".join(up if len(up := c.upper()) == 1 else c for c in unicodedata.normalize("NFC", name))


def _opens_as(path: Path, name: str) -> bool:
    """Whether ``path``'s folder opens it under ``name`` too (its file system ignores case)."""
    return same_file_key(path.with_name(name)) == same_file_key(path)


# How a user of a command with --search-dir (pdl1 run, train, export nnunet) finds a moved image: locate_image's
# find_it.
SEARCH_DIR_FIX = "pass --search-dir with a folder that holds it (or fix the URI in QuPath)"
# The same without --search-dir: QuPath's own fix, which asks for moved images when the project opens.
QUPATH_URI_FIX = (
    "point the entry at the image in QuPath (File > Project... > Check project URIs) and save the project, or put "
    "the image back where the project says"
)


# How find_image found an image (FoundImage.how).
AT_URI = "at its URI"
WITH_PROJECT = "where it lies relative to the moved project"
UNDER_SEARCH_DIR = "under --search-dir"
BESIDE_PROJECT = "beside the project"


@dataclass(frozen=True)
class FoundImage:
    """Where :func:`find_image` found an entry's image, and how: :data:`AT_URI` (its name there perhaps spelt
    otherwise: composed, or in another case), :data:`WITH_PROJECT`, :data:`UNDER_SEARCH_DIR` or
    :data:`BESIDE_PROJECT`."""

    path: Path
    how: str


def locate_image(
    entry: ProjectEntry,
    *,
    project_folder: Path,
    saved_folder: PurePosixPath | PureWindowsPath | None = None,
    search: ImageSearch | None = None,
    find_it: str = SEARCH_DIR_FIX,
) -> Path:
    """The entry's image on this machine, for a project made on a pathologist's PC and opened elsewhere
    (:func:`find_image`'s path)."""
    return find_image(
        entry, project_folder=project_folder, saved_folder=saved_folder, search=search, find_it=find_it
    ).path


def find_image(
    entry: ProjectEntry,
    *,
    project_folder: Path,
    saved_folder: PurePosixPath | PureWindowsPath | None = None,
    search: ImageSearch | None = None,
    find_it: str = SEARCH_DIR_FIX,
) -> FoundImage:
    """The entry's image on this machine, and how it was found, for a project made on a pathologist's PC and opened
    elsewhere.

    In this order: its URI; the same place relative to the project, if the project was saved in
    ``saved_folder`` and moved with its slides; the same file name anywhere under ``search``'s folders
    (refused if two files there share it); the project folder or its parent. A name is matched exactly (in Unicode's
    NFC), else, for a project whose URI is a Windows path, in any case (``Case1.SVS`` for ``case1.svs``; two files
    differing only in case are refused, naming both): see :meth:`ImageSearch.matches`. A path found elsewhere is
    made absolute (symbolic links kept), since it is recorded in the run's summaries. ``find_it``: how the
    caller's user points it at an image found nowhere (:data:`SEARCH_DIR_FIX` for a command with --search-dir).
    """
    try:
        original = entry.path
    except ProjectError as err:  # a non-file URI: was named without its entry, and stopped `pdl1 report` whole
        raise ProjectError(f"image of entry {entry.entry_id} ({entry.image_name}): {err}") from err
    which = f"image of entry {entry.entry_id} ({entry.image_name})"
    # Windows ignores case in names, so a project made there may name a file in another case than the one it has
    # here (a scanner's CASE1.SVS copied as case1.svs). A Linux (or macOS) path is matched exactly on a file system
    # that tells case: there Case1.svs and case1.svs are two slides, and the project named its own.
    any_case = isinstance(original, PureWindowsPath)
    here = [(Path(str(original)), AT_URI)] if (os.name == "nt") == any_case else []
    if saved_folder is not None:
        moved = moved_with_project(original, saved_folder, Path(os.path.abspath(project_folder)))
        here += [] if moved is None else [(moved, WITH_PROJECT)]
    for place, how in here:
        found_here = _file_named(place.parent, place.name, any_case=any_case, which=which)
        if found_here is not None:
            return FoundImage(found_here if found_here == place else Path(os.path.abspath(found_here)), how)
        if place.is_dir():
            raise ProjectError(
                f"{which} is a folder, {place} (an image QuPath opens as a folder, such as OME-Zarr), which pdl1 "
                "cannot read; export it from QuPath (File > Export images... > OME TIFF) and add that file to the "
                "project instead"
            )
    name = original.name
    search = search or ImageSearch()
    found = search.matches(name, any_case=any_case)
    if len(found) > 1:
        # Files of one name in several folders (a scanner's per-case folders): the one under the folders the URI
        # names, read from the end, where one alone is.
        score = {path: _folders_in_common(original, path) for path in found}
        best = max(score.values())
        if best > 0 and list(score.values()).count(best) == 1:
            return FoundImage(Path(os.path.abspath(max(found, key=score.__getitem__))), UNDER_SEARCH_DIR)
        exactly = all(unicodedata.normalize("NFC", p.name) == unicodedata.normalize("NFC", name) for p in found)
        raise ImageMovedError(
            f"{which} has moved, and {len(found)} files under --search-dir are called {name}"
            f"{'' if exactly else ' but for case'}: {', '.join(map(str, found))}, none under more of the folders its "
            f"URI names ({original.parent}) than the others; pass the --search-dir that holds only the right one (or "
            "fix the URI in QuPath)"
        )
    if found:
        return FoundImage(Path(os.path.abspath(found[0])), UNDER_SEARCH_DIR)
    for folder in (project_folder, project_folder.parent):
        candidate = _file_named(folder, name, any_case=any_case, which=which)
        if candidate is not None:
            return FoundImage(Path(os.path.abspath(candidate)), BESIDE_PROJECT)
    looked = [*(f"{d} (and below)" for d in search.folders), str(project_folder), str(project_folder.parent)]
    relative = "" if saved_folder is None else " nor at the same place relative to the project,"
    raise ImageMovedError(
        f"{which} has moved: not at {original},{relative} and no {name} in {', '.join(looked)}; {find_it}"
    )


def _file_named(folder: Path, name: str, *, any_case: bool = False, which: str = "the image") -> Path | None:
    """The file ``name`` in ``folder``, or the one whose name is the same in Unicode's NFC (a name macOS wrote
    decomposed, given composed in a URI), else, with ``any_case`` (a Windows path's name), the one whose name is the
    same but for case; else None. Two files there that differ only in case are refused (:class:`ImageMovedError`,
    naming ``which`` and both): neither is more the one a Windows path names."""
    candidate = folder / name
    if candidate.is_file():
        return candidate
    wanted = unicodedata.normalize("NFC", name)
    if wanted == name and name.isascii() and not any_case:
        return None  # no other spelling of an ASCII name
    try:
        names = sorted(os.listdir(folder))
    except OSError:  # no such folder, or unreadable: nothing there
        return None
    for other in names:
        if unicodedata.normalize("NFC", other) == wanted and (folder / other).is_file():
            return folder / other
    if not any_case:
        return None
    key = _case_key(name)
    files: dict[tuple, Path] = {}  # each file once (a link in another case to it is the same file)
    for other in names:
        if _case_key(other) == key and (folder / other).is_file():
            files.setdefault(same_file_key(folder / other), folder / other)
    alike = list(files.values())
    if len(alike) > 1:
        raise ImageMovedError(
            f"{which}: {len(alike)} files in {folder} are called {name} but for case: {', '.join(map(str, alike))}; "
            "its project's Windows path, which ignores case, cannot tell which one it is: rename or move the others"
        )
    return alike[0] if alike else None


def _folders_in_common(original: PurePosixPath | PureWindowsPath, found: Path) -> int:
    """How many folders ``found`` and ``original`` lie in alike, read from the file's own up (Windows' names in any
    case, every name in NFC).

    >>> _folders_in_common(PureWindowsPath("C:/scans/caseA/slide.svs"), Path("/data/CASEA/slide.svs"))
    1
    """
    windows = isinstance(original, PureWindowsPath)

    def key(part: str) -> str:
        return _case_key(part) if windows else unicodedata.normalize("NFC", part)

    count = 0
    for a, b in zip(reversed(original.parent.parts), reversed(found.parent.parts), strict=False):
        if key(a) != key(b):
            break
        count += 1
    return count


def _stated_path(entry: ProjectEntry) -> str:
    """The file ``entry``'s URI names, as a key (a Windows path in any case)."""
    try:
        path = entry.path
    except ProjectError:
        return entry.uri
    return _case_key(str(path)) if isinstance(path, PureWindowsPath) else str(path)


def claimed_twice(located: Sequence[tuple[ProjectEntry, Path]]) -> dict[str, str]:
    """Entry ID → why, for each entry found away from its URI (by its file name) at a file that an entry of the
    project whose URI names another file is found at too: one scan analysed as two images (caseA/slide.svs and
    caseB/slide.svs, only caseA's under --search-dir), whose results would both be reported done. Never named: an entry
    found at its URI, the one alone found under more of the folders its URI names (caseA's), nor entries whose URIs
    name one file (one image added twice). Entries whose URIs are no file paths are not located, so not given."""
    by_file: dict[tuple, list[tuple[ProjectEntry, Path]]] = {}
    for entry, path in located:
        by_file.setdefault(same_file_key(path), []).append((entry, path))
    out = {}
    for sharing in by_file.values():
        if len({_stated_path(entry) for entry, _ in sharing}) < 2:  # one image added twice (QuPath allows it)
            continue
        # The file is the one entry's whose URI it lies at, else the one's under more of the folders its URI names.
        score = {entry.entry_id: _folders_in_common(entry.path, path) for entry, path in sharing}
        best = max(score.values())
        owner = next(k for k, v in score.items() if v == best) if list(score.values()).count(best) == 1 else None
        for entry, path in sharing:
            if str(path) == str(entry.path) or (owner == entry.entry_id and best > 0):
                continue
            others = ", ".join(f"entry {e.entry_id} ({e.image_name})" for e, _ in sharing if e is not entry)
            out[entry.entry_id] = (
                f"image of entry {entry.entry_id} ({entry.image_name}) has moved, and the only file found for it, "
                f"{path}, is {others}'s too: not analysed as two images; pass a --search-dir that holds its own file "
                "(or fix the URI in QuPath)"
            )
    return out


# A data.qpdata is a Java serialisation stream (QuPath's ObjectOutputStream): it starts with the
# stream magic and version, 0xACED 0x0005 (then "Data file version N" in the files QuPath 0.4.4 writes).
QPDATA_HEADER = b"\xac\xed\x00\x05"
# Its last object is the string "EOF" (PathIO.writeImageData, v0.4.4:640, v0.5.1:639, v0.6.0:702, v0.7.0:702):
# TC_STRING, length 3, "EOF". QuPath's own reader does not refuse a file cut short: DefaultProjectImageEntry
# .readImageData logs the error and returns its data.qpdata.backup or an empty image (DefaultProject.java
# v0.4.4:694-718, v0.5.1:702-726, v0.6.0:663-685), which a run would write into and save over the annotations.
QPDATA_END = b"t\x00\x03EOF"
# Or, were that String object written before in the stream, a back-reference to it: TC_REFERENCE and a 4-byte handle
# counted from 0x7E0000 (java.io.ObjectStreamConstants), not refused: QuPath would read it whole.
_QPDATA_END_REFERENCE = b"q\x00\x7e"
QPDATA_BACKUP_SUFFIX = ".pdl1-backup"


def qpdata_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole QuPath ``data.qpdata`` (None when it reads, starts and ends as one).

    Its start and end are checked without QuPath, which catches what kills and full disks leave: an
    empty or cut-short file, one that cannot be read, or one that is not a Java serialisation stream.
    QuPath cannot be asked instead: it reads a damaged file as its own backup or as an empty image
    (:data:`QPDATA_END`).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(len(QPDATA_HEADER))
            fh.seek(max(size - len(QPDATA_END), 0))
            tail = fh.read(len(QPDATA_END))
    except FileNotFoundError:
        return "it is missing"
    except OSError as err:
        return f"it cannot be read ({err.strerror or err})"
    if size == 0:
        return "it is empty (0 bytes)"
    if size <= len(QPDATA_HEADER):
        return f"it is cut short ({size} bytes, not more than the {len(QPDATA_HEADER)}-byte header)"
    if head != QPDATA_HEADER:
        return f"it does not start as QuPath data (0x{head.hex().upper()} instead of 0xACED0005)"
    if tail != QPDATA_END and tail[1:4] != _QPDATA_END_REFERENCE:
        return f"it is cut short ({size} bytes, without the end marker QuPath writes last)"
    return None


def check_qpdata(data: Path, *, image_name: str) -> None:
    """Raise :class:`DamagedDataError` when an entry's existing ``data.qpdata`` is damaged (its header
    says so), naming the pdl1 backup beside it (if that one is whole) and how to put it back."""
    problem = qpdata_problem(data)
    if problem is not None and data.exists():
        raise damaged_data_error(data, image_name=image_name, problem=problem)


def damaged_data_error(data: Path, *, image_name: str, problem: str) -> DamagedDataError:
    """The error for a damaged ``data.qpdata``: what is wrong, and the whole backup to restore (if any)."""
    backup = data.with_name(data.name + QPDATA_BACKUP_SUFFIX)
    if qpdata_problem(backup) is None:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(backup.stat().st_mtime))
        fix = (
            f"the pdl1 backup {backup} (made {when}, before pdl1 last wrote this image) is whole: restore it "
            f"with `cp '{backup}' '{data}'`, then run again"
        )
    else:
        fix = (
            f"there is no whole pdl1 backup beside it ({backup.name}: {qpdata_problem(backup)}); restore "
            f"{data.name} from your own backups, or open the image in QuPath to see what it can recover"
        )
    return DamagedDataError(
        f"{image_name}: {data} is damaged, {problem}; pdl1 leaves it (and its backup) alone rather than "
        f"write over the pathologist's objects; {fix}"
    )


def not_a_folder(folder: Path) -> str | None:
    """Why ``folder`` cannot be made or used as a folder: it, or a parent, is a file (a path mistyped, or
    given in another's place); None when nothing is in the way. Said before a bare "Not a directory" is.

    >>> not_a_folder(Path(__file__))
    'is a file'
    """
    for path in (folder, *folder.parents):
        if path.exists():
            if path.is_dir():
                return None
            return "is a file" if path == folder else f"lies under {path}, which is a file"
    return None


def same_file_key(path: Path) -> tuple:
    """What tells one file from another: device and inode where it exists (so a symlink, ``..`` or a hard link
    to it counts as the file), else the absolute path as written."""
    try:
        status = os.stat(path)
    except (OSError, ValueError):
        return ("path", os.path.abspath(path))
    return ("file", status.st_dev, status.st_ino)


def same_input_key(path: Path) -> tuple:
    """:func:`same_file_key` of a slide or project file; a folder counts as its ``project.qpproj``, so a project
    given as its folder and as its project file is one project."""
    return same_file_key(path / "project.qpproj" if path.is_dir() else path)


def distinct_inputs(paths: list[Path]) -> tuple[list[Path], dict[Path, Path]]:
    """``paths`` with each file (and each project) once, in the order given (the first naming is kept), and each
    later naming of one already listed mapped to that first one.

    A file named twice is the same path twice, a shell glob plus one of its files, or a symlink or ``..`` path to
    it; a project is named twice also as its folder and its ``project.qpproj``.
    """
    first: dict[tuple, Path] = {}
    kept: list[Path] = []
    repeats: dict[Path, Path] = {}
    for path in map(Path, paths):
        key = same_input_key(path)
        if key in first:
            repeats[path] = first[key]
        else:
            first[key] = path
            kept.append(path)
    return kept, repeats


def sharing_a_stem(slides: Sequence[T], *, path: Callable[[T], Path] = lambda slide: slide) -> list[list[T]]:
    """The groups of ``slides`` (each named once, :func:`distinct_inputs`) that share a file stem, which outputs
    named after the stem cannot tell apart (``pdl1 run --out``'s ``<stem>.geojson``, the eval suite's overlays, an
    nnU-Net export's cases). ``path``: a slide's file, for slides given as other objects than paths.

    >>> sharing_a_stem([Path("a/x.svs"), Path("b/x.tif"), Path("c/y.svs")])
    [[PosixPath('a/x.svs'), PosixPath('b/x.tif')]]
    """
    by_stem: dict[str, list[T]] = {}
    for slide in slides:
        by_stem.setdefault(path(slide).stem, []).append(slide)
    return [same for same in by_stem.values() if len(same) > 1]


def repeat_note(again: Path, first: Path, done: str) -> str:
    """The note for a slide or project named twice: ``done`` says what happens to it (``added once``)."""
    also = "" if str(again) == str(first) else f" (as {again})"
    return f"{first} is given twice{also}; it is {done}"


def unwritable_fix(err: OSError) -> str:
    """What to do about ``err``, met writing a file: a full drive, a read-only one and permissions differ.

    >>> import errno
    >>> unwritable_fix(OSError(errno.EROFS, "Read-only file system"))
    'the drive (or mount) is read-only: make it writable, or work on a copy on a writable drive'
    >>> unwritable_fix(FileExistsError(errno.EEXIST, "File exists"))  # it said to free some space
    'a file stands where a folder of that path goes: move it away'
    """
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space on that drive"
    if err.errno == errno.EROFS:
        return "the drive (or mount) is read-only: make it writable, or work on a copy on a writable drive"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "fix its permissions (you may not write there)"
    if err.errno in (errno.EEXIST, errno.ENOTDIR):  # a file where its folder goes (pdl1/2 a file, not a folder)
        return "a file stands where a folder of that path goes: move it away"
    if err.errno == errno.ENAMETOOLONG:  # it said to free some space, which could never help
        return "the name is too long for the file system: give the slide (or the --out folder) a shorter name"
    return "free some space on that drive (or fix its permissions)"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and rename, so readers never see half a file."""
    with replace_atomically(path) as fh:
        json.dump(data, fh, indent=2, allow_nan=False)


class RunStatus:
    """Per-image status of batch runs, kept in ``<project>/pdl1/status.json`` for ``--resume``.

    ``settings``: what decides this run's results (models, sizes, targets, ...; :func:`bridge.run.analysis_settings`):
    an image recorded done records their digest, and the file keeps each digest's settings, so that ``--resume``
    can tell an image done with other settings (:meth:`other_settings`). None: nothing recorded (a reader).
    """

    def __init__(self, folder: Path, settings: dict[str, Any] | None = None):
        self.folder = folder  # the project folder, or a plain-slides run's --out
        self.path = folder / PDL1_DIR / STATUS_FILE
        self.images: dict[str, dict[str, Any]] = {}
        self.settings: dict[str, dict[str, Any]] = {}  # digest -> settings, of the images recorded done
        self.current = None if settings is None else (_settings_digest(settings), settings)
        self.said: set[str] = set()  # what a run has warned of about these images, said once (bridge.run)
        if self.path.is_file():
            fix = (
                "run without --resume to start over (every image is analysed again, and the file is kept aside as "
                f"{STATUS_FILE}.damaged-<time>), or delete it"
            )
            try:
                raw = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:  # cut short, not UTF-8 or unreadable
                raise ProjectError(f"{self.path}: unreadable run status ({err}); {fix}") from err
            images = raw.get("images", {}) if isinstance(raw, dict) else None
            # Checked whole here, so is_done and resume never meet a list or a string in its place.
            if not isinstance(images, dict) or not all(isinstance(v, dict) for v in images.values()):
                raise ProjectError(
                    f'{self.path}: not a pdl1 run status (expected {{"images": {{KEY: {{"state": ...}}}}}}, got '
                    f"{_shorten(raw)}); {fix}"
                )
            self.images = images
            kept = raw.get("settings")
            self.settings = {k: v for k, v in kept.items() if isinstance(v, dict)} if isinstance(kept, dict) else {}

    def is_done(self, key: str) -> bool:
        return self.images.get(key, {}).get("state") == "done"

    def failed(self) -> dict[str, str]:
        """Key -> error of the images the last run failed on (their results, if any, are an earlier run's)."""
        return {
            k: str(v.get("error") or "no error recorded") for k, v in self.images.items() if v.get("state") == "failed"
        }

    def other_settings(self, key: str) -> list[str] | None:
        """The settings that differ between the run that did image ``key`` and this one (their names, or
        ``["(not recorded)"]`` where the file lost them); None where they are the same or either is unknown (an
        earlier version recorded none)."""
        recorded = self.images.get(key, {}).get("settings")
        if self.current is None or not isinstance(recorded, str) or recorded == self.current[0]:
            return None
        then, now = self.settings.get(recorded), self.current[1]
        if then is None:
            return ["(not recorded)"]
        return sorted(k for k in {*then, *now} if then.get(k) != now.get(k)) or ["(not recorded)"]

    def record(self, key: str, **fields: Any) -> None:
        if fields.get("state") == "done" and self.current is not None:
            fields["settings"] = self.current[0]
        self.images[key] = fields
        used = {v.get("settings") for v in self.images.values()}
        if self.current is not None:
            self.settings[self.current[0]] = self.current[1]
        self.settings = {k: v for k, v in self.settings.items() if k in used}
        # Written after every image: an image a line, by json's C encoder (indent=2 takes the pure-Python one, whose
        # cost over a whole batch grows as its square: 162 ms an image at 10 000 images; helper-135).
        images = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v, allow_nan=False)}" for k, v in self.images.items())
        settings = json.dumps(self.settings, indent=2, allow_nan=False).replace("\n", "\n  ")
        with replace_atomically(self.path) as fh:
            fh.write(f'{{\n  "images": {{\n{images}\n  }},\n  "settings": {settings}\n}}\n')

    def replacing(self, key: str, *, image: str) -> None:
        """Record an image an earlier run finished as being analysed again, before its results are replaced.

        Its files are replaced one at a time (GeoJSON, then summary; through QuPath ``data.qpdata`` first): a
        kill between them left one file of each run under "done" with the earlier run's ID, and ``--resume``
        skipped the image, its objects from one run and its numbers from the other. Nothing to record for an
        image not done: ``--resume`` analyses it again anyway.
        """
        if self.is_done(key):
            self.record(key, state="started", image=image)


def _settings_digest(settings: dict[str, Any]) -> str:
    """A short hash of a run's settings (JSON, keys sorted).

    >>> _settings_digest({"b": 1, "a": None}) == _settings_digest({"a": None, "b": 1})
    True
    """
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def status_for_run(folder: Path, *, resume: bool, settings: dict[str, Any] | None = None) -> RunStatus:
    """The run status a run records into (:class:`RunStatus`). A damaged one stops a ``--resume``, which needs it to
    know what is done; a run without ``--resume`` analyses every image anyway, so it sets the damaged file aside
    (renamed to ``status.json.damaged-<UTC time>``: kept, not lost) with a warning, and starts a new one. It was
    refused with "delete it", and a user who had not asked to resume anything had to do that first."""
    try:
        return RunStatus(folder, settings)
    except ProjectError as err:
        if resume:
            raise
        path = folder / PDL1_DIR / STATUS_FILE
        aside = path.with_name(f"{STATUS_FILE}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        try:
            os.replace(path, aside)
        except OSError as move_err:
            raise ProjectError(f"{err}; it could not be set aside as {aside.name} ({move_err})") from move_err
        log.warning("%s: a run status that does not read was set aside as %s; this run starts a new one", path, aside)
        return RunStatus(folder, settings)


def _shorten(value: Any, limit: int = 60) -> str:
    """A JSON value as an error message quotes it: its start only.

    >>> _shorten({"images": [1]})
    '{"images": [1]}'
    """
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_names(names: Sequence[str], *, shown: int = 3) -> str:
    """The first ``shown`` of ``names``, and how many more, as a message lists them.

    >>> first_names(["a", "b"]), first_names(["a", "b", "c", "d", "e"])
    ('a, b', 'a, b, c and 2 more')
    """
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def alike(texts: Mapping[T, str], names: Callable[[T], Iterable[str]]) -> dict[str, list[T]]:
    """The keys of ``texts`` grouped by their text less what names the key (each of ``names(key)`` blanked, the
    longest first), in first-seen order: a message many items share but for their own names is said once.

    >>> alike({"a.svs": "a.svs: no pixel size", "b.svs": "b.svs: no pixel size", "c.svs": "c.svs: damaged"},
    ...       lambda k: [k])
    {'\\x00: no pixel size': ['a.svs', 'b.svs'], '\\x00: damaged': ['c.svs']}
    """
    groups: dict[str, list[T]] = {}
    for key, text in texts.items():
        for name in sorted(names(key), key=len, reverse=True):
            text = text.replace(name, "\0")
        groups.setdefault(text, []).append(key)
    return groups


def summary_problem(summary: Any) -> str | None:
    """Why a JSON value read from a run's ``summary.json`` is not one (None when it is): what ``--resume``
    and ``pdl1 report`` rely on is an object naming the image analysed and its µm/px.

    >>> summary_problem([])
    'is not a pdl1 summary (expected a JSON object with "image" and "mpp", got [])'
    """
    if not (isinstance(summary, dict) and isinstance(summary.get("image"), str) and "mpp" in summary):
        return f'is not a pdl1 summary (expected a JSON object with "image" and "mpp", got {_shorten(summary)})'
    wrong = [
        f"{key}: {_shorten(summary[key])}"
        for key, ok in _SUMMARY_FIELDS.items()
        if key in summary and not ok(summary[key])
    ]
    details = summary.get("details") or {}
    wrong += [
        f"details.{key}: {_shorten(details[key])}"
        for key, ok in _DETAILS_FIELDS.items()
        if key in details and not ok(details[key])
    ]
    if wrong:  # a hand-edited or damaged field: report and --resume stopped on it with a traceback
        return f"is not a pdl1 summary (fields of the wrong kind: {'; '.join(wrong)})"
    return None


def _number_or_none(value: Any) -> bool:
    return value is None or (is_finite_number(value) and not isinstance(value, bool))


# The fields of a summary its readers (the report, --resume's table, review-queue) take as numbers, maps or lists.
_SUMMARY_FIELDS = {
    "mpp": _number_or_none,
    **{
        key: _number_or_none
        for key in ("tps_percent", "cps", "positive_area_um2", "analysed_area_um2", "sua_candidates", "regions")
    },
    "nuclei": lambda v: v is None or (isinstance(v, dict) and all(_number_or_none(n) for n in v.values())),
    **{key: lambda v: v is None or isinstance(v, dict) for key in ("details", "metadata", "parent_measurements")},
    "targets": lambda v: v is None or (isinstance(v, list) and all(isinstance(t, dict) for t in v)),
    "image_size_px": lambda v: (
        v is None
        or (isinstance(v, list) and len(v) == 2 and all(isinstance(n, int) and not isinstance(n, bool) for n in v))
    ),
    "image_file_bytes": _number_or_none,
}
# The domain reading's numbers (the report formats them).
_DOMAIN_NUMBERS = ("out_of_domain_score", "limit", "stain_distance_deg", "stain_limit_deg")
# Within its details: each review reason an object (its reason, value and limit), the domain reading an object.
_DETAILS_FIELDS = {
    "review_reasons": lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v),
    "domain": lambda v: v is None or (isinstance(v, dict) and all(_number_or_none(v.get(k)) for k in _DOMAIN_NUMBERS)),
    "tps_low": _number_or_none,
    "tps_high": _number_or_none,
}


def review_reason_text(reason: dict[str, Any]) -> str:
    """One review reason of a summary as a person reads it: the reason, then its value against its limit to
    three significant digits (one decimal showed a segmentation uncertainty of 0.0932 over its limit 0.0873
    as "0.1, limit 0.1").

    >>> review_reason_text({"reason": "segmentation uncertainty", "value": 0.0932, "limit": 0.0873})
    'segmentation uncertainty (0.0932, limit 0.0873)'
    >>> review_reason_text({"reason": "no tumour", "value": None, "limit": None})
    'no tumour'

    A reason of one of several analysed targets (an image's ``details.review_reasons``) is led by its name:

    >>> review_reason_text({"reason": "fewer than 100 tumour cells", "value": 40, "limit": 100, "target": "C-4"})
    'C-4: fewer than 100 tumour cells (40, limit 100)'
    """
    value, limit = reason.get("value"), reason.get("limit")
    numbers = (
        f" ({_three_digits(value)}, limit {_three_digits(limit)})"
        if is_finite_number(value) and is_finite_number(limit)
        else ""
    )
    target = reason.get("target")
    return f"{'' if target is None else f'{target}: '}{reason.get('reason')}{numbers}"


def _three_digits(value: float) -> str:
    """``value`` to three significant digits, in plain digits below a billion (a share of a tiny positive area read
    "5.7e+03"), else as ``:.3g`` writes it.

    >>> _three_digits(0.0932), _three_digits(5739.2), _three_digits(123456), _three_digits(2.5e-7), _three_digits(1e21)
    ('0.0932', '5740', '123000', '2.5e-07', '1e+21')
    """
    text = f"{value:.3g}"
    rounded = float(text)  # the billion is the rounded number's, as the Groovy script's threeDigits decides it
    return f"{rounded:.0f}" if "e+" in text and abs(rounded) < 1e9 else text


def sidecar_dir(project_folder: Path, entry_id: str) -> Path:
    """Where batch runs without QuPath put an entry's results: ``<project>/pdl1/<entryID>/``."""
    return project_folder / PDL1_DIR / str(entry_id)
