"""Writing into a project through QuPath, with paquo's objects replaced by fakes that save as QuPath does: what the
bridge does around them (backups, resume, when the project file is saved, which targets it analyses) needs no QuPath.
The ``fake_qupath`` fixture (conftest.py) puts them in place."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import shapely


class FakeURI:
    """java.net.URI as bridge.qupath uses it: made of its text, which ``toString`` gives; equal by it (Java's compares
    parts, alike for the one form written here)."""

    def __init__(self, text: str):
        self.text = str(text)

    def toString(self) -> str:  # noqa: N802
        return self.text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FakeURI) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


class FakeJavaEntry:
    """QuPath's DefaultProjectImageEntry of 0.6+: its one image URI (getURIs), replaced by updateURIs as QuPath does
    (the builder's URI that is a key of the map; true where one was)."""

    def __init__(self, entry: FakeEntry):
        self.entry = entry
        self.updates: list[dict] = []

    def getURIs(self) -> list[FakeURI]:  # noqa: N802
        return [FakeURI(self.entry.uri)]

    def updateURIs(self, replacements: dict) -> bool:  # noqa: N802
        self.updates.append(dict(replacements))
        new = replacements.get(FakeURI(self.entry.uri))
        if new is None:
            return False
        self.entry.uri = new.toString()
        return True


class FakeEntry:
    def __init__(self, folder: Path, image: dict, qpdata: bytes):
        from bridge.project import file_builder

        self.entry_id = str(image["entryID"])
        self.image_name = image["imageName"]
        self.entry_path = folder / "data" / self.entry_id
        self.metadata: dict[str, str] = dict(image["metadata"])
        self.qpdata = qpdata
        self.uri = file_builder(image["serverBuilder"])[0]["uri"]
        self.java_object = FakeJavaEntry(self)

    def save(self) -> None:  # QuPath writes the entry's objects; paquo skips it, logging only, where is_readable is not
        if self.is_readable():
            (self.entry_path / "data.qpdata").write_bytes(self.qpdata)

    def is_readable(self) -> bool:  # paquo: its URI's path is a file here (images.py is_readable)
        from bridge.project import uri_to_path

        return Path(str(uri_to_path(self.uri))).is_file()

    @property
    def hierarchy(self) -> object:  # QuPath reads data.qpdata, a damaged one as an empty image (raising nothing)
        return object()


class FakeProject:
    def __init__(self, folder: Path, qpdata: bytes):
        self.qpproj = folder / "project.qpproj"
        self.images = [FakeEntry(folder, i, qpdata) for i in json.loads(self.qpproj.read_text())["images"]]
        self.saves = 0

    def save(self, images: bool = True) -> None:  # QuPath rewrites project.qpproj with the entries' metadata
        assert not images
        self.saves += 1
        from bridge.project import file_builder

        raw = json.loads(self.qpproj.read_text())
        for image, entry in zip(raw["images"], self.images, strict=True):
            image["metadata"] = entry.metadata
            if isinstance(entry, FakeEntry):  # its server builder, as updateURIs left it (a test's own entry: as read)
                file_builder(image["serverBuilder"])[0]["uri"] = entry.uri
        self.qpproj.write_text(json.dumps(raw))


class FakeHashMap(dict):
    """java.util.HashMap as bridge.qupath fills it."""

    def put(self, key: Any, value: Any) -> None:
        self[key] = value


def fake_uris(monkeypatch: pytest.MonkeyPatch) -> None:
    """What bridge.qupath asks of paquo to point an entry at a file (point_entry_at): paquo's ImageProvider writing a
    path as QuPath does (``file:/abs/path``, bridge.project.path_to_uri), Java's URI and HashMap."""
    from bridge import qupath
    from bridge.project import path_to_uri

    provider = SimpleNamespace(uri_from_path=path_to_uri)
    monkeypatch.setattr(qupath, "_paquo", lambda: {"ImageProvider": provider, "URI": FakeURI, "HashMap": FakeHashMap})


def fake_paquo(monkeypatch: pytest.MonkeyPatch, qpdata: bytes) -> dict[str, Any]:
    """paquo's side of :mod:`bridge.qupath` faked (entries with no targets and no TMA grid, whose saves write
    ``qpdata``); returns the hierarchy reads, the projects opened and the entries let go (their ids, in order)."""
    from bridge import qupath

    seen: dict = {"read": [], "projects": [], "qpdata": qpdata, "let_go": []}

    @contextmanager
    def open_project(path, *, mode="r+"):
        seen["projects"].append(FakeProject(Path(path).parent, qpdata))  # as run passes it: the .qpproj
        yield seen["projects"][-1]

    def annotation_targets(entry, *, classes=(), names=()):
        seen["read"].append(entry.entry_id)  # QuPath reads data.qpdata here
        return []

    let_go = qupath.let_go

    def letting_go(entry):
        seen["let_go"].append(entry.entry_id)  # what QuPath read of it is dropped
        let_go(entry)

    monkeypatch.setattr(qupath, "let_go", letting_go)
    fake_uris(monkeypatch)
    monkeypatch.setattr(qupath, "qupath_available", lambda: (True, ""))
    monkeypatch.setattr(qupath, "open_project", open_project)
    monkeypatch.setattr(qupath, "ensure_classes", lambda project: None)
    monkeypatch.setattr(qupath, "annotation_targets", annotation_targets)
    monkeypatch.setattr(qupath, "tma_cores", lambda entry: [])  # no TMA grid
    monkeypatch.setattr(qupath, "remove_whole_image_analysis", lambda entry: 0)
    monkeypatch.setattr(qupath, "find_or_create_analysis_parent", lambda entry, geometry: object())
    monkeypatch.setattr(qupath, "write_children", lambda entry, parent, objects, measurements: 0)
    return seen


def stand_in_core(name: str, x: float, y: float, *, radius_px: float, missing: bool = False) -> SimpleNamespace:
    """A TMA core as bridge.qupath.tma_cores hands it out: paquo's wrapper of a round core, its Java object answering
    TMACoreObject.isMissing()."""
    java = SimpleNamespace(isMissing=lambda: missing)
    return SimpleNamespace(name=name, path_class=None, roi=shapely.Point(x, y).buffer(radius_px), java_object=java)
