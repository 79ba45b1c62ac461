"""QuPath projects read as JSON (no QuPath needed), image lookup, run status and sidecar paths.

QuPath keeps entries, image URIs and entry metadata in ``project.qpproj`` (JSON); the objects
live in each entry's ``data.qpdata`` (Java serialisation, only QuPath reads it). Everything
that needs only the JSON is here; :mod:`bridge.qupath` does the rest through paquo.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any
from urllib.parse import unquote, urlparse

from bridge.atomic import replace_atomically
from inference.errors import Pdl1Error

PDL1_DIR = "pdl1"
STATUS_FILE = "status.json"


class ProjectError(Pdl1Error, ValueError):
    """A QuPath project is missing, malformed or cannot be written."""


class ImageMovedError(Pdl1Error, FileNotFoundError):
    """An entry's image is not where the project says and was not found nearby."""


@dataclass(frozen=True)
class ProjectEntry:
    """One image of a QuPath project, as ``project.qpproj`` describes it."""

    entry_id: str
    image_name: str
    uri: str
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> PurePosixPath | PureWindowsPath:
        """The image path as the project states it (a Windows path for a project made on Windows)."""
        return uri_to_path(self.uri)


@dataclass(frozen=True)
class ProjectInfo:
    path: Path  # the .qpproj file
    version: str | None
    entries: tuple[ProjectEntry, ...]

    @property
    def folder(self) -> Path:
        return self.path.parent


def uri_to_path(uri: str) -> PurePosixPath | PureWindowsPath:
    """File path of a QuPath image URI; Windows URIs (``file:/C:/Slides/x.svs``) give Windows paths.

    >>> str(uri_to_path("file:/C:/Slides/CMU-1%20small.svs"))
    'C:\\\\Slides\\\\CMU-1 small.svs'
    >>> str(uri_to_path("file:///data/slides/a.svs"))
    '/data/slides/a.svs'
    """
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise ProjectError(f"only file: image URIs can be analysed, got {uri!r}")
    path = unquote(parsed.path)
    if parsed.netloc:  # UNC share: file://server/share/x.svs
        return PureWindowsPath(f"//{parsed.netloc}{path}")
    if len(path) >= 3 and path[0] == "/" and path[2] == ":":
        return PureWindowsPath(path[1:])
    return PurePosixPath(path)


def path_to_uri(path: str | Path) -> str:
    """QuPath's form of a file URI (``file:/abs/path``).

    >>> path_to_uri("/data/a b.svs")
    'file:/data/a%20b.svs'
    """
    return "file:" + Path(path).resolve().as_uri()[len("file://") :]


def find_project_file(path: str | Path) -> Path:
    """``project.qpproj`` itself, or the one inside a project folder."""
    path = Path(path)
    candidate = path / "project.qpproj" if path.is_dir() else path
    if not candidate.is_file():
        raise ProjectError(f"{path}: no QuPath project here (expected a project folder or its project.qpproj)")
    return candidate


def read_project(path: str | Path) -> ProjectInfo:
    """Read a project's entries from its JSON; raises :class:`ProjectError` naming what is wrong."""
    qpproj = find_project_file(path)
    try:
        raw = json.loads(qpproj.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ProjectError(f"{qpproj}: not valid JSON ({err}); is the project half-written or corrupt?") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("images", []), list):
        raise ProjectError(f"{qpproj}: not a QuPath project (no 'images' list)")
    entries = []
    for i, image in enumerate(raw.get("images", [])):
        try:
            builder = image["serverBuilder"]
            uri = builder.get("uri") or _nested_uri(builder)
            entries.append(
                ProjectEntry(
                    entry_id=str(image["entryID"]),
                    image_name=str(image.get("imageName", f"image {image['entryID']}")),
                    uri=str(uri),
                    metadata={str(k): str(v) for k, v in (image.get("metadata") or {}).items()},
                )
            )
        except (KeyError, TypeError) as err:
            raise ProjectError(f"{qpproj}: image #{i} lacks {err} (expected entryID and serverBuilder.uri)") from err
    return ProjectInfo(qpproj, raw.get("version"), tuple(entries))


def _nested_uri(builder: dict[str, Any]) -> str:
    # Rotated/sparse servers wrap the original builder.
    inner = builder.get("builder") or builder.get("serverBuilder")
    if isinstance(inner, dict):
        return inner.get("uri") or _nested_uri(inner)
    raise KeyError("uri")


def locate_image(entry: ProjectEntry, *, project_folder: Path, search_dirs: tuple[Path, ...] = ()) -> Path:
    """The entry's image on this machine: its URI, else the same file name in the project folder,
    its parent, or ``search_dirs`` (a project made on a pathologist's PC and opened elsewhere)."""
    original = entry.path
    if (os.name == "nt") == isinstance(original, PureWindowsPath) and Path(str(original)).is_file():
        return Path(str(original))
    name = original.name
    for folder in (*search_dirs, project_folder, project_folder.parent):
        candidate = Path(folder) / name
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(d) for d in (*search_dirs, project_folder, project_folder.parent))
    raise ImageMovedError(
        f"image of entry {entry.entry_id} ({entry.image_name}) has moved: not at {original} and no {name} in "
        f"{looked}; pass --search-dir with the folder that holds it (or fix the URI in QuPath)"
    )


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and rename, so readers never see half a file."""
    with replace_atomically(path) as fh:
        json.dump(data, fh, indent=2, allow_nan=False)


class RunStatus:
    """Per-image status of batch runs, kept in ``<project>/pdl1/status.json`` for ``--resume``."""

    def __init__(self, folder: Path):
        self.path = folder / PDL1_DIR / STATUS_FILE
        self.images: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                self.images = json.loads(self.path.read_text()).get("images", {})
            except json.JSONDecodeError as err:
                raise ProjectError(f"{self.path}: unreadable run status ({err}); delete it to start over") from err

    def is_done(self, key: str) -> bool:
        return self.images.get(key, {}).get("state") == "done"

    def record(self, key: str, **fields: Any) -> None:
        self.images[key] = fields
        write_json_atomic(self.path, {"images": self.images})


def sidecar_dir(project_folder: Path, entry_id: str) -> Path:
    """Where batch runs without QuPath put an entry's results: ``<project>/pdl1/<entryID>/``."""
    return project_folder / PDL1_DIR / str(entry_id)
