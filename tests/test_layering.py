"""The inference/ <-> bridge/ line (DESIGN.md §1): checked on the import statements themselves."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "inference").rglob("*.py")), ids=lambda p: p.name)
def test_inference_knows_nothing_of_qupath_http_or_cli(path):
    assert not _imports(path) & {"paquo", "fastapi", "typer", "geojson", "bridge", "uvicorn", "jpype"}


@pytest.mark.parametrize("path", sorted((ROOT / "bridge").rglob("*.py")), ids=lambda p: p.name)
def test_bridge_never_imports_torch(path):
    assert "torch" not in _imports(path)


def test_only_one_module_imports_paquo():
    users = [p for p in (ROOT / "bridge").rglob("*.py") if "paquo" in _imports(p)]
    assert len(users) <= 1, users
