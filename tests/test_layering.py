"""The layering of the code (README "Architecture"), checked on the import statements themselves.

Each rule fails naming the file, the line and the import that breaks it. ``benchmarks/`` and
``tests/`` may import anything.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import inference

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Import:
    path: Path
    line: int
    module: str  # absolute dotted module, e.g. "inference.models.ensemble"
    names: tuple[str, ...]  # what a ``from`` import takes; empty for ``import x``

    def __str__(self) -> str:
        what = f"from {self.module} import {', '.join(self.names)}" if self.names else f"import {self.module}"
        return f"{self.path.relative_to(ROOT)}:{self.line}: {what}"


def imports_of(path: Path) -> list[Import]:
    """Every import in a file, lazy ones inside functions too, relative ones made absolute."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [Import(path, node.lineno, alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            found.append(Import(path, node.lineno, module, tuple(a.name for a in node.names)))
    return found


def python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_imports_are_read_with_their_line_and_relative_imports_resolved(tmp_path, monkeypatch):
    # The helper the rules stand on: a lazy import inside a function and a relative one are seen.
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    package = tmp_path / "inference" / "analysis"
    package.mkdir(parents=True)
    source = package / "m.py"
    source.write_text("import numpy\n\n\ndef f():\n    from ..training import cyclic\n")
    found = [str(i) for i in imports_of(source)]
    assert found == [
        "inference/analysis/m.py:1: import numpy",
        "inference/analysis/m.py:5: from inference.training import cyclic",
    ]


def _files(folder: str):
    return pytest.mark.parametrize(
        "path", python_files(folder), ids=lambda p: str(p.relative_to(ROOT / folder.split("/")[0]))
    )


def forbidden_imports(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    """The imports of ``path`` of any module in ``forbidden`` (or below it), as ``file:line: import``."""
    return [
        str(imp)
        for imp in imports_of(path)
        if any(imp.module == f or imp.module.startswith(f + ".") for f in forbidden)
    ]


@_files("inference/analysis")
def test_analysis_imports_neither_training_evaluation_nor_phantoms(path):
    assert forbidden_imports(path, ("inference.training", "inference.evaluation", "inference.phantom")) == []


@_files("inference/slides")
def test_slides_import_no_model_code(path):
    assert forbidden_imports(path, ("inference.models", "inference.analysis", "inference.pipeline")) == []


@_files("inference/models")
def test_models_do_not_read_slides_or_analyse(path):
    assert forbidden_imports(path, ("inference.slides", "inference.analysis", "inference.pipeline")) == []


@_files("inference")
def test_inference_knows_nothing_of_qupath_http_or_cli(path):
    forbidden = ("bridge", "paquo", "fastapi", "starlette", "uvicorn", "typer", "geojson", "jpype")
    assert forbidden_imports(path, forbidden) == []


@_files("bridge")
def test_bridge_never_imports_torch(path):
    assert forbidden_imports(path, ("torch",)) == []


@_files("bridge")
def test_bridge_imports_only_the_public_names_of_inference(path):
    public = set(inference.__all__)
    wrong = [
        str(imp)
        for imp in imports_of(path)
        if imp.module.startswith("inference") and (imp.module != "inference" or not set(imp.names) <= public)
    ]
    assert wrong == []


def test_every_public_name_of_inference_resolves():
    for name in inference.__all__:
        assert getattr(inference, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'segment'"):
        inference.segment  # noqa: B018 - the lookup is the test


def test_no_module_imports_a_module_that_imports_it():
    graph: dict[str, set[str]] = {}
    for path in python_files("inference") + python_files("bridge"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = {imp.module for imp in imports_of(path)}
    cycles = sorted(f"{a} <-> {b}" for a, deps in graph.items() for b in deps if a < b and a in graph.get(b, ()))
    assert cycles == []


def test_only_one_module_imports_paquo():
    users = [str(path.relative_to(ROOT)) for path in python_files("bridge") if forbidden_imports(path, ("paquo",))]
    assert len(users) <= 1, users


# The environment reads left below the edges, each with its reason (STYLE: configs are built at the edges and
# passed down; nothing below them reads os.environ): tune_openmp writes GOMP_SPINCOUNT into the environment the
# CLI gives it at start-up, for libgomp. (PDL1_NVIMGCODEC_BACKEND and PDL1_OPENSLIDE_ONLY are read in
# bridge/environment.py and passed down.)
ENVIRONMENT_READERS = {"inference/openmp.py"}


def test_inference_reads_the_environment_only_where_listed():
    readers = {
        str(path.relative_to(ROOT))
        for path in python_files("inference")
        if "os.environ" in path.read_text(encoding="utf-8") or "getenv" in path.read_text(encoding="utf-8")
    }
    assert readers <= ENVIRONMENT_READERS, (
        f"read the variable in bridge/ and pass it down: {readers - ENVIRONMENT_READERS}"
    )
