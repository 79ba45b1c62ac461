"""What ``pdl1 run`` analyses of an entry (annotations, TMA cores, the whole image) and the per-target table."""

import csv
import json
import logging
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import shapely

from bridge.project import ProjectError
from bridge.run import RunConfig, entry_targets
from bridge.targets import (
    COLUMNS,
    TargetRow,
    analysed_row,
    choose_targets,
    domain_distance,
    furthest_domain,
    missing_row,
    rows_from_summary,
    rows_to_json,
    write_target_table,
)
from inference import Cps, tumour_proportion_score


def _missing(name: str) -> bool:
    return name.endswith("*")


# (selected, annotations, cores) -> (source, targets, missing); a name ending in * is a core marked missing.
CHOICES = [
    ([], [], [], ("whole image", [], [])),
    ([], ["Tumor 1", "Tumor 2"], ["A-1", "A-2*"], ("annotations", ["Tumor 1", "Tumor 2"], [])),
    ([], [], ["A-1", "A-2*", "B-1"], ("TMA cores", ["A-1", "B-1"], ["A-2*"])),
    ([], [], ["A-1*", "A-2*"], ("TMA cores", [], ["A-1*", "A-2*"])),
    (["B-1", "A-2*"], ["Tumor 1"], ["A-1", "A-2*", "B-1"], ("selection", ["B-1"], ["A-2*"])),
    (["Tumor 2"], ["Tumor 1"], [], ("selection", ["Tumor 2"], [])),
]


@pytest.mark.parametrize(("selected", "annotations", "cores", "expected"), CHOICES)
def test_targets_are_the_selection_then_the_target_annotations_then_the_cores_not_missing(
    selected, annotations, cores, expected
):
    choice = choose_targets(selected=selected, annotations=annotations, cores=cores, is_missing=_missing)
    assert (choice.source, list(choice.targets), list(choice.missing)) == expected


def test_annotations_are_never_asked_whether_they_are_missing():
    def is_missing(obj):  # paquo's annotations have no isMissing
        raise AssertionError(f"asked of {obj}")

    assert choose_targets(annotations=["Tumor"], cores=["A-1"], is_missing=is_missing).targets == ("Tumor",)


class _Qp:
    """bridge.qupath's target calls on stand-ins: annotations and the TMA grid's cores of one entry."""

    def __init__(self, annotations=(), cores=()):
        self.annotations, self.cores = list(annotations), list(cores)

    def annotation_targets(self, entry, *, classes=(), names=()):
        return [a for a in self.annotations if a.path_class.id in classes or a.name in names]

    def tma_cores(self, entry):
        return self.cores

    def core_is_missing(self, core):
        return core.missing

    def core_is_analysed(self, core):
        return core.analysed


def _core(name, x, *, missing=False, analysed=False):
    roi = shapely.Point(x, 500).buffer(200)
    return SimpleNamespace(name=name, missing=missing, analysed=analysed, path_class=None, roi=roi)


def _annotation(name, cls="Tumor"):
    return SimpleNamespace(name=name, path_class=SimpleNamespace(id=cls), roi=shapely.box(0, 0, 100, 100))


def test_a_tma_is_analysed_core_by_core_and_its_missing_cores_are_named(caplog):
    qp = _Qp(cores=[_core("A-1", 300), _core("A-2", 800, missing=True), _core(None, 1300)])
    with caplog.at_level(logging.WARNING, logger="bridge.run"):
        choice = entry_targets("tma.svs", None, RunConfig(), qp)
    assert choice.source == "TMA cores"
    assert [(t.label, t.target_type, t.position) for t in choice.targets] == [
        ("A-1", "TMA core", 0),
        ("core 3", "TMA core", 2),  # a core without a name: its place in the grid
    ]
    assert [t.label for t in choice.missing] == ["A-2"]
    assert "tma.svs: skipped 1 TMA cores marked missing: A-2" in caplog.text
    assert "keep an earlier run's results" not in caplog.text  # A-2 was never analysed


def test_a_core_marked_missing_after_it_was_analysed_is_named_as_keeping_that_runs_results(caplog):
    # Skipped without a word, while QuPath's Export TMA data still writes its stored PD-L1 measurements.
    qp = _Qp(cores=[_core("A-1", 300), _core("A-2", 800, missing=True, analysed=True)])
    with caplog.at_level(logging.WARNING, logger="bridge.run"):
        entry_targets("tma.svs", None, RunConfig(), qp)
    assert "tma.svs: TMA cores marked missing keep an earlier run's results" in caplog.text
    assert "Export TMA data still writes): A-2; delete them in QuPath, or mark the core not missing" in caplog.text


def test_target_annotations_come_before_the_cores_and_cores_before_an_error_for_targets_not_found():
    cores = [_core("A-1", 300)]
    config = RunConfig(target_classes=("Tumor",))
    chosen = entry_targets("tma.svs", None, config, _Qp([_annotation("hotspot")], cores))
    assert [(t.label, t.target_type) for t in chosen.targets] == [("hotspot", "annotation")]
    # A class the pdl1-config.toml names for the project's other images: a TMA's cores are analysed all the same.
    assert [t.label for t in entry_targets("tma.svs", None, config, _Qp([], cores)).targets] == ["A-1"]
    with pytest.raises(ProjectError, match=r"slide.svs: no annotation of class \('Tumor',\)"):
        entry_targets("slide.svs", None, config, _Qp())
    assert entry_targets("slide.svs", None, RunConfig(), _Qp()).source == "whole image"


def test_a_grid_whose_every_core_is_missing_is_not_analysed_as_one_region():
    qp = _Qp(cores=[_core("A-1", 300, missing=True), _core("A-2", 800, missing=True)])
    with pytest.raises(ProjectError, match="every one of its 2 TMA cores is marked missing, so nothing is analysed"):
        entry_targets("tma.svs", None, RunConfig(), qp)


def _result(positive, negative, *, stain="H&E", immune=None, reasons=()):
    return SimpleNamespace(
        tps=tumour_proportion_score(positive, negative),
        cps=None
        if immune is None
        else Cps(
            positive, immune, positive + negative, min(100.0, 100.0 * (positive + immune) / (positive + negative))
        ),
        stain=stain,
        uncertainty_flag=bool(reasons),
        summary={"review_reasons": [{"reason": r, "value": 40, "limit": 100} for r in reasons]},
    )


def test_the_target_table_has_a_row_per_core_with_its_own_score_and_the_missing_ones(tmp_path: Path):
    rows = [
        analysed_row("tma.svs", "3", "A-1", "TMA core", _result(30, 70)),
        missing_row("tma.svs", "3", "A-2"),
        analysed_row(
            "tma.svs", "3", "B-1", "TMA core", _result(4, 36, stain="H-DAB", immune=2, reasons=["few tumour cells"])
        ),
    ]
    path = write_target_table(tmp_path / "pdl1" / "targets.csv", rows)
    with path.open(newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == list(COLUMNS)
    assert [(r["target"], r["state"], r["tps_percent"], r["tps_category"], r["tumour_cells"]) for r in table] == [
        ("A-1", "analysed", "30.0", "1-49%", "100"),
        ("A-2", "missing", "", "", ""),
        ("B-1", "analysed", "10.0", "insufficient tumour cells", "40"),
    ]
    assert [(r["stain"], r["cps_percent"], r["needs_review"], r["review_reasons"]) for r in table] == [
        ("H&E", "", "0", ""),
        ("", "", "", ""),
        ("H-DAB", "15.0", "1", "few tumour cells (40, limit 100)"),
    ]
    # A CPS of 40 tumour cells: the number kept, its category beside it as the TPS's (it read as a plain "15.0").
    assert [r["cps_category"] for r in table] == ["", "", "insufficient tumour cells"]
    assert [p.name for p in path.parent.iterdir()] == ["targets.csv"]  # written aside and renamed: no .part left


def test_target_rows_go_through_a_summary_unchanged():
    import json

    import shapely

    rows = [missing_row("a.svs", None, "A-2"), replace(missing_row("a.svs", "1", "A-3"), review_reasons=("x",))]
    assert rows_from_summary({"targets": rows_to_json(rows)}) == rows
    # An outline, kept for the report's thumbnail, as the GeoJSON geometry summary.json holds.
    core = shapely.Point(400.5, 300).buffer(250)
    (back,) = rows_from_summary(
        json.loads(json.dumps({"targets": rows_to_json([missing_row("a", "1", "A-1", outline=core)])}))
    )
    assert back.outline.equals_exact(core, 0) and "outline" not in COLUMNS
    (old,) = rows_to_json(rows[:1])
    del old["outline"]  # a summary written before outlines were kept
    assert rows_from_summary({"targets": [old]}) == rows[:1]
    assert rows_from_summary({"image": "a.svs"}) == []  # an earlier version's summary
    assert isinstance(rows_from_summary({"targets": rows_to_json(rows)})[1], TargetRow)


def test_a_target_row_keeps_the_numbers_the_review_queue_scores_it_by(tmp_path: Path):
    # Only the image's details (the first target's) had them: a TMA was ranked by its first core alone.
    import numpy as np
    import shapely

    from bridge.qupath_geojson import QuPathObject
    from bridge.targets import TargetNuclei, read_target_regions, write_target_regions

    he = _result(30, 70, reasons=["SUA candidate area %"])
    he.analysed_area_um2 = 4000.0
    he.summary |= {
        "mutual_information_mean": 0.02,
        "candidate_area_um2": 200.0,
        "review_rule": {"review_candidate_area_pct": 2.0},
        "domain": {"out_of_domain_score": 3.1, "limit": 2.6, "stain_distance_deg": None, "stain_limit_deg": 20.0},
    }
    row = analysed_row("tma.svs", "3", "C-4", "TMA core", he)
    assert (row.analysed_area_um2, row.mutual_information_mean, row.nuclei_entropy_mean) == (4000.0, 0.02, None)
    assert (row.sua_candidate_area_pct, row.sua_area_limit_pct) == (5.0, 2.0)
    assert (row.out_of_domain_score, row.out_of_domain_limit, row.stain_distance_deg, row.stain_limit_deg) == (
        3.1,
        2.6,
        None,
        20.0,
    )
    assert rows_from_summary({"targets": rows_to_json([row])}) == [row]
    ihc = _result(4, 36, stain="H-DAB")
    ihc.summary["nuclei_entropy_mean"] = 0.3
    row = analysed_row("tma.svs", "3", "B-1", "TMA core", ihc)  # no area, no segmentation, no domain measured
    assert (row.nuclei_entropy_mean, row.analysed_area_um2, row.sua_candidate_area_pct, row.out_of_domain_score) == (
        0.3,
        None,
        None,
        None,
    )
    # Every target's regions, named, beside the image's GeoJSON: read back as written.
    candidate = QuPathObject(shapely.box(1, 2, 30, 40), "annotation", "PD-L1 FN candidate", {"SUA score": 0.9})
    none = TargetNuclei(np.zeros((0, 2)), np.zeros(0, np.int64), ())
    path = write_target_regions(
        tmp_path / "target_regions.json", run_id="r1", targets=[("A-1", []), ("C-4", [candidate])], nuclei=[none] * 2
    )
    record = read_target_regions(path)
    assert record.run_id == "r1" and [(name, len(objs)) for name, objs in record.targets] == [("A-1", 0), ("C-4", 1)]
    back = record.targets[1][1][0]
    assert (back.geometry.bounds, back.classification, back.measurements) == (
        (1, 2, 30, 40),
        "PD-L1 FN candidate",
        {"SUA score": 0.9},
    )
    assert [n.xy.shape for n in record.nuclei] == [(0, 2), (0, 2)]
    path.write_text('{"targets": [{"target": "A-1"}]}')
    with pytest.raises(ValueError, match="a target without a list of features"):
        read_target_regions(path)


def test_target_regions_keep_each_target_s_nuclei_as_arrays_to_a_tenth_of_a_pixel(tmp_path: Path):
    # `pdl1 train --from-review` tells a reclassified nucleus of any target by them; objects.geojson holds the
    # first target's alone.
    import numpy as np

    from bridge.targets import TargetNuclei, read_target_regions, write_target_regions

    names = ("Tumor: Positive", "Tumor: Negative", "Other")
    a = TargetNuclei(np.array([[10.04, 20.06], [1234.56, 7.0]]), np.array([2, 0]), names)
    none = TargetNuclei(np.zeros((0, 2)), np.zeros(0, np.int64), ())  # a target where the nuclei model did not run
    path = write_target_regions(
        tmp_path / "target_regions.json", run_id="r1", targets=[("A-1", []), ("C-4", [])], nuclei=[a, none]
    )
    stored = json.loads(path.read_text())["targets"][0]["nuclei"]
    assert stored == {"class_names": list(names), "x": [10.0, 1234.6], "y": [20.1, 7.0], "class": [2, 0]}
    first, second = read_target_regions(path).nuclei
    assert first.xy.tolist() == [[10.0, 20.1], [1234.6, 7.0]] and first.classes == ("Other", "Tumor: Positive")
    assert first.xy.shape == (2, 2) and second.xy.shape == (0, 2) and second.classes == ()
    with pytest.raises(ValueError, match="nuclei of 1 targets for 2 targets"):
        write_target_regions(path, run_id="r1", targets=[("A-1", []), ("C-4", [])], nuclei=[a])
    for bad, says in (
        ({"class_names": ["Other"], "x": [1.0], "y": [], "class": [0]}, "arrays of different lengths"),
        ({"class_names": ["Other"], "x": [1.0], "y": [2.0], "class": [1]}, "class index outside the 1 class names"),
        ({"x": [1.0]}, "nuclei without arrays"),
    ):
        path.write_text(json.dumps({"run_id": "r1", "targets": [{"target": "A-1", "features": [], "nuclei": bad}]}))
        with pytest.raises(ValueError, match=f"target 'A-1': .*{says}"):
            read_target_regions(path)


@pytest.mark.parametrize(
    ("written", "state", "why"),
    [
        (None, "missing", r"there is no .*target_regions\.json \(an earlier version kept the first target's output"),
        ("r1", "of another run", r".*target_regions\.json is of run r1, not of the summary's \(r2\)$"),
        ('{"run_id": "r2", "targ', "unreadable", r".*target_regions\.json does not read \(.*\)$"),
        (b"\xff\xfe not UTF-8", "unreadable", r".*target_regions\.json does not read \(.*codec.*\)$"),
        ('{"run_id": "r2", "targets": [{"target": "A-1"}]}', "unreadable", r"does not read \(a target without a list"),
        ("r2", "of the run", r"^$"),
    ],
    ids=["missing", "another run", "cut short", "not UTF-8", "not of targets", "this run"],
)
def test_a_run_s_target_regions_are_read_once_for_every_caller_saying_why_not(tmp_path: Path, written, state, why):
    # The report, `pdl1 review-queue` and `pdl1 train --from-review` each checked the file themselves, in three
    # wordings; one reading now says whether it is the summary's run's, and why not, each caller keeping its policy.
    import numpy as np

    from bridge.targets import TargetNuclei, run_target_regions, write_target_regions

    path = tmp_path / "target_regions.json"
    if written in ("r1", "r2"):
        none = TargetNuclei(np.zeros((0, 2)), np.zeros(0, np.int64), ())
        write_target_regions(path, run_id=written, targets=[("A-1", []), ("C-4", [])], nuclei=[none] * 2)
    elif isinstance(written, bytes):
        path.write_bytes(written)
    elif written is not None:
        path.write_text(written)
    found = run_target_regions(path, {"run_id": "r2"})
    assert found.state == state and found.path == path
    assert (found.record is not None) == (state == "of the run")
    assert re.search(why, found.why), found.why
    if found.record is not None:
        assert [name for name, _ in found.record.targets] == ["A-1", "C-4"]
    else:
        assert str(path) in found.why


def test_the_furthest_target_from_the_domain_counts_a_stain_measured_alone():
    # A core whose network features were not captured but whose stain is out of domain (the guard flags it by that)
    # was passed over for one within it, and the image read "within the training domain".
    within = {"out_of_domain_score": 0.8, "limit": 2.0, "stain_distance_deg": 4.0, "stain_limit_deg": 20.0}
    stain_out = {"out_of_domain_score": None, "limit": 2.0, "stain_distance_deg": 30.0, "stain_limit_deg": 20.0}
    assert domain_distance(stain_out) == 1.5
    assert furthest_domain([("A-1", within), ("C-4", stain_out)])["target"] == "C-4"
    nothing = {"out_of_domain_score": None, "stain_distance_deg": None, "why_not": "no tiles analysed"}
    assert domain_distance(nothing) is None
    assert furthest_domain([("A-1", nothing), ("A-2", within)])["target"] == "A-2"


def test_a_cps_is_never_shown_rounded_up_to_a_whole_number_a_cut_off_is_read_at():
    # helper-156: a CPS of 9.96 was "10.0" in targets.csv, the entry metadata and the report (CPS >= 10 is a cut-off).
    from bridge.report import _fmt_cps
    from bridge.run import _cps_metadata
    from bridge.targets import csv_cell
    from inference import Cps

    for value, shown in ((9.96, "9.96"), (0.952, "0.95"), (19.96, "19.96"), (52.749, "52.7"), (10.0, "10.0")):
        metadata = _cps_metadata(Cps(0, 0, 200, value))["PD-L1 CPS"]
        assert csv_cell(value, cps=True) == metadata == _fmt_cps(value) == shown
    assert csv_cell(9.96) == "10.0"  # any other number: one decimal


def test_a_cps_from_under_100_tumour_cells_says_so_wherever_its_tps_does():
    # The TPS of 40 tumour cells read "insufficient tumour cells" in the entry metadata, targets.csv, the report and
    # the run's table; the CPS of the same cells was a plain "15.0" beside it (a CPS too needs 100 tumour cells).
    from bridge.report import _image_cps_category
    from bridge.run import CPS_CATEGORY_KEY, RUN_METADATA_KEYS, entry_metadata, merge_entry_metadata, metadata_counts
    from inference import INSUFFICIENT, cps_category, cps_shown

    def meta(positive, negative, immune):
        result = _result(positive, negative, stain="H-DAB", immune=immune)
        result.run_id, result.seg_model, result.nuclei_model = "r", None, None
        return entry_metadata(result), metadata_counts(result)

    few, enough = meta(4, 36, 2), meta(60, 40, 9)
    assert few[0]["PD-L1 CPS"] == "15.0" and few[0][CPS_CATEGORY_KEY] == INSUFFICIENT == few[0]["PD-L1 TPS category"]
    assert enough[0]["PD-L1 CPS"] == "69.0" and CPS_CATEGORY_KEY not in enough[0]  # a CPS has no category else
    assert CPS_CATEGORY_KEY in RUN_METADATA_KEYS  # a re-run with enough cells removes an earlier run's
    # Several annotations: the category of the summed cells, not the last annotation's.
    assert CPS_CATEGORY_KEY not in merge_entry_metadata([enough, few])  # 140 cells, the last one's 40
    assert merge_entry_metadata([few, meta(5, 20, 0)])[CPS_CATEGORY_KEY] == INSUFFICIENT  # 65 cells
    assert cps_category(99) == INSUFFICIENT and cps_category(100) is None
    assert cps_shown("15.0", INSUFFICIENT) == "15.0 (insufficient tumour cells)" and cps_shown("69.0", None) == "69.0"
    row = analysed_row("ihc.svs", "1", "A-1", "TMA core", _result(4, 36, stain="H-DAB", immune=2))
    assert row.cps_category == INSUFFICIENT and row.tps_category == INSUFFICIENT
    assert analysed_row("he.svs", "1", "A-1", "TMA core", _result(4, 36)).cps_category is None  # an H&E has no CPS
    # summary.json's targets are targets.csv's rows (the README says so): its column was missing there.
    from bridge.targets import rows_to_json

    assert rows_to_json([row])[0]["cps_category"] == INSUFFICIENT
    ihc = {"stain": "H-DAB", "cps": 15.0}
    assert _image_cps_category(ihc | {"tps_category": INSUFFICIENT}) == INSUFFICIENT
    assert _image_cps_category(ihc | {"tps_category": "1-49%"}) is None
    assert _image_cps_category({"stain": "H&E", "cps": None, "tps_category": INSUFFICIENT}) is None
