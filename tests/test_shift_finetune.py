"""The shift fine-tuning benchmark's runs build the labels they name (benchmarks/shift_finetune.py; no training)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import shift_finetune
from benchmarks.shift_finetune import RUNS, Phantoms, Run, run_labels


def _phantoms() -> Phantoms:
    def paths(*names: str) -> list[Path]:
        return [Path(f"{n}.svs") for n in names]

    return Phantoms(
        train=paths("train_841", "train_842", "train_843"),
        unlabeled=paths("unlabeled_871", "unlabeled_872", "unlabeled_873"),
        unlabeled_unshifted=paths("unlabeled_874", "unlabeled_875", "unlabeled_876"),
        val_shifted=[],
        val_unshifted=[],
        held_shifted=[],
        held_unshifted=[],
        extreme_shifted=[],
        extreme_unshifted=[],
    )


@pytest.fixture
def recorded(monkeypatch) -> None:
    """Label functions that say what they were asked for instead of reading a phantom's truth."""
    monkeypatch.setattr(
        shift_finetune,
        "sparse_truth_labels",
        lambda p, *, regions, region_um, seed: ("sparse", p.stem, regions, region_um, seed),
    )
    monkeypatch.setattr(shift_finetune, "full_truth_labels", lambda p: ("full", p.stem))


@pytest.mark.parametrize(
    ("run", "replayed"),
    [
        ("3lab", []),
        ("3lab+3unl0", []),  # pseudo-labelled, not labelled
        ("3lab+3tru0", [("full", "unlabeled_874"), ("full", "unlabeled_875"), ("full", "unlabeled_876")]),
        (
            "3lab+3sp0",
            [
                ("sparse", "unlabeled_874", 3, 200.0, 13),
                ("sparse", "unlabeled_875", 3, 200.0, 14),
                ("sparse", "unlabeled_876", 3, 200.0, 15),
            ],
        ),
    ],
)
def test_runs_label_the_shifted_slides_first_then_the_replayed_unshifted_ones(recorded, run, replayed):
    labels = run_labels(RUNS[run], _phantoms(), regions=3, region_um=200.0, seed=10)
    shifted = [("sparse", f"train_{s}", 3, 200.0, 10 + i) for i, s in enumerate((841, 842, 843))]
    assert labels == shifted + replayed


def test_replay_runs_pseudo_label_nothing():
    for name in ("3lab+3tru0", "3lab+3sp0"):
        assert (RUNS[name].unlabelled, RUNS[name].unlabelled_unshifted, RUNS[name].replayed) == (0, 0, 3)


def test_unknown_replay_labels_are_refused(recorded):
    with pytest.raises(ValueError, match="replay_labels must be one of"):
        run_labels(Run("x", 3, 0, 0, 3, "dense"), _phantoms(), regions=3, region_um=200.0, seed=0)


def test_controls_label_the_unshifted_slides_alone(recorded):
    phantoms = _phantoms()
    assert run_labels(RUNS["3tru0"], phantoms, regions=3, region_um=200.0, seed=0) == [
        ("full", f"unlabeled_{s}") for s in (874, 875, 876)
    ]
    assert run_labels(RUNS["3sp0"], phantoms, regions=3, region_um=200.0, seed=0) == [
        ("sparse", f"unlabeled_{s}", 3, 200.0, 3 + i) for i, s in enumerate((874, 875, 876))
    ]


@pytest.fixture
def written(monkeypatch) -> dict[str, object]:
    """phantom_once that records each slide's spec by file name instead of writing it."""
    specs: dict[str, object] = {}

    def record(path: Path, spec: object) -> Path:
        specs[path.name] = spec
        return path

    monkeypatch.setattr(shift_finetune, "phantom_once", record)
    return specs


def test_averaged_domain_levels_give_the_domain_a_scanners_pyramid_and_leave_unshifted_slides_rendered(written):
    phantoms = shift_finetune.make_phantoms(Path("w"), size=1024, domain_levels="averaged")
    assert [p.name for p in phantoms.train] == ["train_841_avg.svs", "train_842_avg.svs", "train_843_avg.svs"]
    assert [p.name for p in phantoms.held_unshifted] == [f"held_{s}.svs" for s in (861, 862, 863, 864)]
    assert [p.name for p in phantoms.held_unshifted_averaged] == [f"held_{s}_avg.svs" for s in (861, 862, 863, 864)]
    for name, spec in written.items():
        domain = name.endswith("_avg.svs") and not name.startswith("held_86")
        assert spec.shift == (0.8 if domain else 0.0), name
        assert spec.reduced_levels == ("averaged" if name.endswith("_avg.svs") else "rendered"), name
    assert written["held_861_avg.svs"].seed == written["held_861.svs"].seed == 861


def test_rendered_domain_levels_write_the_slides_as_before(written):
    phantoms = shift_finetune.make_phantoms(Path("w"), size=1024)
    assert phantoms.held_unshifted_averaged == []
    assert phantoms.train[0].name == "train_841.svs"
    assert {spec.reduced_levels for spec in written.values()} == {"rendered"}


def test_unknown_domain_levels_are_refused(written):
    with pytest.raises(ValueError, match="domain_levels must be one of"):
        shift_finetune.make_phantoms(Path("w"), size=1024, domain_levels="scanned")
