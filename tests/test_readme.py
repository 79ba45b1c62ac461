"""The README's links within itself lead somewhere: each ``](#anchor)`` names a heading or an ``<a id>``."""

import re
from collections import Counter
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def heading_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading's text: lower case, punctuation but ``-`` and ``_`` dropped (the code
    spans' backticks too), each space a ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def readme_anchors(markdown: str) -> set[str]:
    """The anchors a markdown text defines: its headings' (outside fenced code; a repeated heading's second is
    ``-1``, as GitHub numbers them) and its ``<a id="...">`` tags."""
    anchors: set[str] = set()
    seen: Counter[str] = Counter()
    in_fence = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and re.match(r"#{1,6} ", line):
            anchor = heading_anchor(line.lstrip("#").strip())
            anchors.add(anchor if seen[anchor] == 0 else f"{anchor}-{seen[anchor]}")
            seen[anchor] += 1
    return anchors | set(re.findall(r'<a id="([^"]+)"></a>', markdown))


def test_heading_anchors_are_githubs():
    assert heading_anchor("The project config (`pdl1-config.toml`)") == "the-project-config-pdl1-configtoml"
    assert heading_anchor("nnU-Net v2: `pdl1 export nnunet`") == "nnu-net-v2-pdl1-export-nnunet"
    assert readme_anchors("# A\n```\n# B\n```\n## A\n") == {"a", "a-1"}


def test_every_link_within_the_readme_reaches_an_anchor():
    # A heading renamed (a command's options are in its heading) leaves the contents' and the text's links dead.
    markdown = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(#([^)]+)\)", markdown)
    assert len(links) >= 40
    anchors = readme_anchors(markdown)
    assert sorted({link for link in links if link not in anchors}) == []


def test_a_pdl1_train_command_names_its_subcommand():
    # `pdl1 train --from-review` (six times) and `pdl1 train ... PROJECT --from-review`: pdl1 train alone is refused,
    # it needs seg, nuclei or report.
    markdown = README.read_text(encoding="utf-8")
    assert re.findall(r"pdl1 train (?!seg\b|nuclei\b|report\b)\S+", markdown) == []


def architecture_tree(markdown: str) -> str:
    """The code block under ``## Architecture``: the folders and what each holds."""
    section = markdown.split("\n## Architecture\n", 1)[1]
    return section.split("```", 2)[1]


def test_the_architecture_tree_names_every_module_of_bridge_and_inferences_top():
    # A module added (bridge/stopping.py, bridge/exported_targets.py) was missing from the tree for good; inference's
    # subpackages are described by what they hold, so only its top-level modules are held here.
    tree = architecture_tree(README.read_text(encoding="utf-8"))
    root = README.parent
    modules = [*(root / "bridge").rglob("*.py"), *(root / "inference").glob("*.py")]
    named = set(re.findall(r"[\w.]+\.py\b", tree))
    assert len(modules) >= 40
    missing = [str(path.relative_to(root)) for path in modules if path.name != "__init__.py" and path.name not in named]
    assert sorted(missing) == []


def test_every_module_the_architecture_tree_names_exists():
    tree = architecture_tree(README.read_text(encoding="utf-8"))
    root = README.parent
    files = {path.name for folder in ("bridge", "inference") for path in (root / folder).rglob("*.py")}
    named = set(re.findall(r"[\w.]+\.py\b", tree))
    assert len(named) >= 40
    assert sorted(named - files) == []
