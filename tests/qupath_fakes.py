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


class FakeEntry:
    def __init__(self, folder: Path, image: dict, qpdata: bytes):
        self.entry_id = str(image["entryID"])
        self.image_name = image["imageName"]
        self.entry_path = folder / "data" / self.entry_id
        self.metadata: dict[str, str] = dict(image["metadata"])
        self.qpdata = qpdata

    def save(self) -> None:  # QuPath writes the entry's objects
        (self.entry_path / "data.qpdata").write_bytes(self.qpdata)

    def is_readable(self) -> bool:  # paquo saves only an entry whose image is at its URI
        return True

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
        raw = json.loads(self.qpproj.read_text())
        for image, entry in zip(raw["images"], self.images, strict=True):
            image["metadata"] = entry.metadata
        self.qpproj.write_text(json.dumps(raw))


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
