"""``pdl1 report`` and ``pdl1 review-queue`` over a project analysed in QuPath: the records pdl1_analyze.groovy saves
(``bridge.analysis_record``, from the service's real results on phantom slides) are each entry's targets' results,
the newer of them and a ``pdl1 run`` summary counts, and a record that does not read is named."""

import csv
import html
import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from shapely.geometry import box

from bridge.analysis_record import QUPATH_ANALYSES, SET_ASIDE, record_path, records_found
from bridge.init_project import init_project_files
from bridge.record_summary import entry_summary_from_records
from bridge.report import write_report
from bridge.review_queue import RANK_KEY, REVIEW_FILE, SCORE_KEY, UNFINISHED_FILE, build_queue, write_review_queue
from bridge.service.record import analysis_record
from inference import tumour_proportion_score
from inference.pipeline import Models, PipelineConfig, analyse_slide
from tests.helpers import two_ranked_phantoms

OUTPUTS = ("regions", "sua", "nuclei", "tiles")
T0 = datetime(2026, 3, 1, 9, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """A project of two phantom slides and the records of three analyses in QuPath: two annotations of the first
    (``left``, ``right``), the second whole; each with its result, as the service gives them."""
    root = tmp_path_factory.mktemp("records")
    slides = two_ranked_phantoms(root)
    project = root / "project"
    init_project_files(project, slides)
    config = PipelineConfig(device="cpu")
    models = Models(config)
    analyses = [
        ("1", "p-left", "left", "annotation", slides[0], box(0, 0, 768, 1536)),
        ("1", "p-right", "right", "annotation", slides[0], box(768, 0, 1536, 1536)),
        ("2", "p-whole", "PD-L1 analysis", "whole image", slides[1], None),
    ]
    results = {}
    for k, (entry, parent, target, kind, slide, roi) in enumerate(analyses):
        result = analyse_slide(slide, models=models, config=config, roi=roi)
        record = analysis_record(
            result,
            outputs=OUTPUTS,
            area=roi,
            written_at=T0 + timedelta(minutes=k),
            target=target,
            target_type=kind,
        )
        path = record_path(project / "pdl1" / entry, parent)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))
        results[parent] = result
    return project, results


@pytest.fixture
def project(analysed, tmp_path):
    return Path(shutil.copytree(analysed[0], tmp_path / "project"))


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_a_record_keeps_the_scores_pdl1_run_writes_of_its_target(analysed):
    project, results = analysed
    record = json.loads(record_path(project / "pdl1" / "1", "p-left").read_text())
    result = results["p-left"]
    summary, row = record["scores"]["summary"], record["scores"]["target"]
    assert summary["tps_percent"] == pytest.approx(result.tps.percent) and summary["stain"] == result.stain
    assert summary["analysed_area_um2"] == pytest.approx(result.analysed_area_um2)
    assert summary["provenance"]["analysed_at"] == T0.isoformat(timespec="seconds")
    assert summary["provenance"]["seg_model"]["sha256"] == result.seg_model.sha256
    assert (row["target"], row["target_type"], row["tumour_cells"]) == ("left", "annotation", result.tps.tumour)
    assert record["scores"]["metadata_counts"]["tumour_positive"] == result.tps.positive


def test_a_project_analysed_only_in_qupath_is_reported_per_target_and_ranked(project, analysed):
    # Before, both said there were no results: `pdl1 run` had left no summary.json.
    results = analysed[1]
    html_path, csv_path = write_report(project)
    rows = {r["entry_id"]: r for r in _rows(csv_path)}
    left, right, whole = results["p-left"], results["p-right"], results["p-whole"]
    both = tumour_proportion_score(left.tps.positive + right.tps.positive, left.tps.negative + right.tps.negative)
    assert float(rows["1"]["tps_percent"]) == pytest.approx(both.percent)
    assert rows["1"]["tps_category"] == both.category
    assert float(rows["2"]["tps_percent"]) == pytest.approx(whole.tps.percent)
    assert rows["1"]["results_from"] == "pdl1_analyze.groovy's 2 analyses in QuPath"
    assert rows["1"]["analysed_at"] == (T0 + timedelta(minutes=1)).isoformat(timespec="seconds")
    targets = {(r["entry_id"], r["target"]): r for r in _rows(csv_path.with_name("targets.csv"))}
    assert float(targets[("1", "left")]["tps_percent"]) == pytest.approx(left.tps.percent, abs=0.05)
    assert float(targets[("1", "right")]["tps_percent"]) == pytest.approx(right.tps.percent, abs=0.05)
    assert targets[("2", "PD-L1 analysis")]["target_type"] == "whole image"
    page = html_path.read_text(encoding="utf-8")
    assert "Per target: 2 annotations (2 analysed)" in page and "Results from" in page
    assert "Left out of this report" not in page

    queue = write_review_queue(project, qupath="never")
    assert sorted(e.entry_id for e in queue.entries) == ["1", "2"] and queue.not_ranked == ()
    assert queue.metadata_written_to == (
        "review.json sidecars of 2 entries analysed in QuPath alone; run pdl1_import_results.groovy for the "
        "project (Run for project) to set them in QuPath"
    )
    # Their ranks, for pdl1_import_results.groovy (QuPath 0.7, which paquo does not reach): before, in the CSV only.
    for rank, entry in enumerate(queue.entries, start=1):
        sidecar = json.loads((project / "pdl1" / entry.entry_id / REVIEW_FILE).read_text())
        assert sidecar["metadata"] == {RANK_KEY: str(rank), SCORE_KEY: f"{entry.score:.3f}"}
        assert sidecar["queue"] == str(queue.csv_path) and "not_ranked" not in sidecar
    for entry in queue.entries:
        assert entry.summary_path is None and entry.score > 0
        assert any(r.startswith("results from pdl1_analyze.groovy") for r in entry.reasons)
    entry1 = next(e for e in queue.entries if e.entry_id == "1")
    assert entry1.analysed_area_um2 == pytest.approx(left.analysed_area_um2 + right.analysed_area_um2)
    assert all(r.target in ("left", "right") for r in entry1.regions)
    csv_rows = _rows(queue.csv_path)
    assert {r["entry_id"] for r in csv_rows if r["kind"] == "entry"} == {"1", "2"}
    assert not (project / "pdl1" / "1" / "summary.json").exists()  # nothing made up for the script's entries


def test_an_entry_of_several_targets_has_no_parent_measurements_of_one_of_them(analysed):
    # The summary of an entry of two annotations held the first one's parent measurements (its TPS, counts, flag)
    # unnamed beside the image's TPS; each annotation's are on it in QuPath. One target's summary keeps its own.
    project, results = analysed
    two = entry_summary_from_records(project / "pdl1" / "1", image="a", entry_id="1").summary
    one = entry_summary_from_records(project / "pdl1" / "2", image="b", entry_id="2").summary
    assert two["parent_measurements"] is None and len(two["targets"]) == 2
    whole = json.loads(record_path(project / "pdl1" / "2", "p-whole").read_text())["scores"]["summary"]
    assert one["parent_measurements"] == whole["parent_measurements"]
    assert one["parent_measurements"]["PD-L1: Predicted TPS % (H&E)"] == pytest.approx(results["p-whole"].tps.percent)


def test_records_set_aside_are_neither_reported_ranked_nor_listed_by_a_run(project, analysed):
    # pdl1_analyze.groovy sets aside the record of an annotation no longer in the image (qupath_analyses/removed), so
    # that QuPath closed without saving can have it back; until then it is no result of the entry's.
    for entry, parent in (("1", "p-right"), ("2", "p-whole")):
        path = record_path(project / "pdl1" / entry, parent)
        aside = path.parent / SET_ASIDE / path.name
        aside.parent.mkdir()
        path.rename(aside)
    html_path, csv_path = write_report(project)
    row, aside = _rows(csv_path)
    assert (row["entry_id"], row["results_from"]) == ("1", "pdl1_analyze.groovy's 1 analysis in QuPath")
    assert aside["entry_id"] == "2" and aside["left_out"].startswith("not analysed: no results") and not aside["run_id"]
    assert [r["target"] for r in _rows(csv_path.with_name("targets.csv"))] == ["left"]
    assert "1 of the project&#x27;s 2 images have no results, not analysed" in html_path.read_text(encoding="utf-8")
    ranked, not_ranked = build_queue(project)
    assert [e.entry_id for e in ranked] == ["1"]
    assert ranked[0].analysed_area_um2 == pytest.approx(analysed[1]["p-left"].analysed_area_um2)
    assert not_ranked == [("2", "s42.svs", "not analysed")]  # its one analysis set aside
    # `pdl1 run` lists the records it found beside its output (provenance.after_analyses): not one set aside.
    assert list(records_found(project / "pdl1" / "1")) == ["p-left"]
    assert records_found(project / "pdl1" / "2") == {}
    assert (project / "pdl1" / "2" / QUPATH_ANALYSES / SET_ASIDE / "p-whole.json").is_file()


def test_records_of_annotations_of_one_name_name_their_regions_as_the_reasons_do(project):
    # Annotations are often named by their class ("Tumor"): the report and the queue's reasons number such names
    # ("Tumor #2"), but the queue's regions from records read the names back from the merged summary unnumbered, so
    # a region could not be told to which of the two it belonged.
    path = record_path(project / "pdl1" / "1", "p-right")
    record = json.loads(path.read_text())
    record["scores"]["target"]["target"] = "left"  # both annotations now "left"
    path.write_text(json.dumps(record))
    entry = next(e for e in build_queue(project, regions_per_entry=1000)[0] if e.entry_id == "1")
    assert {r.target for r in entry.regions} == {"left #1", "left #2"}
    assert all(r.why.startswith(r.target) for r in entry.regions)


def _summary_from_record(project: Path, entry: str, parent: str, *, when: datetime, tps: float) -> None:
    """A summary.json of a `pdl1 run` of the entry at ``when`` whose TPS is ``tps`` (to tell it apart)."""
    summary = json.loads(record_path(project / "pdl1" / entry, parent).read_text())["scores"]["summary"]
    summary["tps_percent"] = tps
    summary["image"] = str(project / f"s{40 + int(entry)}.svs")
    summary["provenance"]["analysed_at"] = when.isoformat(timespec="seconds")
    (project / "pdl1" / entry / "summary.json").write_text(json.dumps(summary))


@pytest.mark.parametrize("run_later", [True, False])
def test_an_entry_with_a_summary_and_records_takes_the_newer_and_says_which(project, analysed, run_later):
    when = T0 + (timedelta(hours=1) if run_later else -timedelta(hours=1))
    _summary_from_record(project, "2", "p-whole", when=when, tps=99.0)
    _, csv_path = write_report(project)
    row = next(r for r in _rows(csv_path) if r["entry_id"] == "2")
    ranked, _ = build_queue(project)
    entry = next(e for e in ranked if e.entry_id == "2")
    if run_later:
        assert float(row["tps_percent"]) == 99.0
        assert (
            row["results_from"]
            == "pdl1 run (newer than pdl1_analyze.groovy's 1 analysis in QuPath, which are not counted)"
        )
        assert entry.summary_path == project / "pdl1" / "2" / "summary.json"
        assert "results from pdl1 run (newer than" in "; ".join(entry.reasons)
    else:
        assert float(row["tps_percent"]) == pytest.approx(analysed[1]["p-whole"].tps.percent)
        assert row["results_from"].endswith("(newer than pdl1 run's summary.json, which is not counted)")
        assert "results from pdl1_analyze.groovy's 1 analysis" in "; ".join(entry.reasons)


RUN_ID = "3f2b1c9e-4d5a-4e6f-8a7b-9c0d1e2f3a4b"


@pytest.mark.parametrize("newer", ["records", "run"])
def test_what_the_files_say_decides_the_newer_whatever_the_clocks(project, analysed, newer):
    # The service's and the batch machine's clocks an hour apart, each way against what happened: the script found
    # the run's summary when it asked for the record (after_run), or the run found the record when it wrote.
    path = record_path(project / "pdl1" / "2", "p-whole")
    record = json.loads(path.read_text())
    written = datetime.fromisoformat(record["written_at"])
    when = written + (timedelta(hours=1) if newer == "records" else -timedelta(hours=1))
    _summary_from_record(project, "2", "p-whole", when=when, tps=99.0)
    summary_path = project / "pdl1" / "2" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["run_id"] = RUN_ID
    if newer == "records":
        path.write_text(json.dumps({**record, "after_run": RUN_ID}))
    else:
        summary["provenance"]["after_analyses"] = {"p-whole": record["written_at"]}
    summary_path.write_text(json.dumps(summary))
    _, csv_path = write_report(project)
    row = next(r for r in _rows(csv_path) if r["entry_id"] == "2")
    ranked, _ = build_queue(project)
    reasons = "; ".join(next(e for e in ranked if e.entry_id == "2").reasons)
    if newer == "records":
        assert float(row["tps_percent"]) == pytest.approx(analysed[1]["p-whole"].tps.percent)
        assert row["results_from"].endswith("(newer than pdl1 run's summary.json, which is not counted)")
        assert "results from pdl1_analyze.groovy's 1 analysis" in reasons
    else:
        assert float(row["tps_percent"]) == 99.0
        assert row["results_from"].startswith("pdl1 run (newer than pdl1_analyze.groovy's 1 analysis")
        assert "results from pdl1 run (newer than" in reasons


@pytest.mark.parametrize(
    ("stamp", "used"),
    [
        ((T0 + timedelta(hours=1)).replace(tzinfo=None).isoformat(), "pdl1 run"),  # no zone: UTC, an hour later
        ((T0 - timedelta(hours=1)).replace(tzinfo=None).isoformat(), "pdl1_analyze.groovy"),
        ("yesterday", "pdl1_analyze.groovy"),  # not a time: as none, older
        ({"by": "hand"}, "pdl1_analyze.groovy"),  # provenance not an object: as no time
    ],
    ids=["no zone, later", "no zone, earlier", "not a time", "provenance not an object"],
)
def test_a_summary_s_time_without_a_zone_is_utc_and_one_that_does_not_read_is_as_none(project, stamp, used):
    # A zone-less provenance.analysed_at counted as no time here (older than any record) and as UTC in
    # `pdl1 train --from-review`: one parser, one policy. A provenance that was not an object failed the report
    # and the queue with an AttributeError.
    _summary_from_record(project, "2", "p-whole", when=T0, tps=99.0)
    path = project / "pdl1" / "2" / "summary.json"
    summary = json.loads(path.read_text())
    if isinstance(stamp, dict):
        summary["provenance"] = "by hand"
    else:
        summary["provenance"]["analysed_at"] = stamp
    path.write_text(json.dumps(summary))
    _, csv_path = write_report(project)
    row = next(r for r in _rows(csv_path) if r["entry_id"] == "2")
    entry = next(e for e in build_queue(project)[0] if e.entry_id == "2")
    assert row["results_from"].startswith(used)
    assert (float(row["tps_percent"]) == 99.0) == (used == "pdl1 run")
    assert any(r.startswith(f"results from {used}") for r in entry.reasons), entry.reasons


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ('{"format": ', "does not read (not JSON"),
        (
            json.dumps(
                {
                    "format": "pdl1-bridge analysis record",
                    "version": 1,
                    "written_at": "2026-03-01T10:00:00+00:00",
                    "outline": {"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9], [0, 0]]]},
                    "candidates": [],
                    "region_bounds": [],
                    "nuclei": {"x": [], "y": [], "class": [], "class_names": []},
                    "scores": {"summary": [1]},
                }
            ),
            "its 'scores' hold no summary",
        ),
    ],
)
def test_a_record_that_does_not_read_is_named_and_the_entry_s_others_counted(project, analysed, content, says):
    bad = record_path(project / "pdl1" / "1", "p-bad")
    bad.write_text(content)
    html_path, csv_path = write_report(project)
    page = html.unescape(html_path.read_text(encoding="utf-8"))
    assert "Left out of this report" in page and str(bad) in page and says in page
    assert "analyse its annotation or core again in QuPath" in page
    row = next(r for r in _rows(csv_path) if r["entry_id"] == "1")
    assert row["results_from"] == "pdl1_analyze.groovy's 2 analyses in QuPath"
    ranked, _ = build_queue(project)
    entry = next(e for e in ranked if e.entry_id == "1")
    assert any(str(bad) in r and says in r for r in entry.reasons)


def test_an_entry_whose_records_all_fail_to_read_or_lack_scores_is_named_not_ranked(project):
    for path in (project / "pdl1" / "2" / "qupath_analyses").glob("*.json"):
        record = json.loads(path.read_text())
        del record["scores"]  # a record of another tool's making, or hand-edited: what it holds trains, not reports
        path.write_text(json.dumps(record))
    records = entry_summary_from_records(project / "pdl1" / "2", image="s42.svs", entry_id="2")
    (why,) = records.unreadable
    assert why.endswith("does not read (its 'scores' hold no summary (an object with 'mpp' and 'details'))"), why
    html_path, csv_path = write_report(project)
    rows = _rows(csv_path)
    assert [r["entry_id"] for r in rows] == ["1", "2"] and rows[0]["left_out"] == "" and not rows[1]["run_id"]
    assert "'scores' hold no summary" in rows[1]["left_out"]  # its row says why it has no numbers
    assert "does not read (its &#x27;scores&#x27; hold no summary" in html_path.read_text()
    assert "have no results, not analysed" not in html_path.read_text()  # analysed: its records do not read
    ranked, not_ranked = build_queue(project)
    assert [e.entry_id for e in ranked] == ["1"]
    assert [(i, "'scores' hold no summary" in why) for i, _, why in not_ranked] == [("2", True)]


def test_records_of_tma_cores_are_reported_and_ranked_as_a_run_of_the_cores(project):
    for parent, core in (("p-left", "A-1"), ("p-right", "A-2")):
        path = record_path(project / "pdl1" / "1", parent)
        record = json.loads(path.read_text())
        record["scores"]["target"] |= {"target": core, "target_type": "TMA core"}
        if core == "A-2":  # out of the training domain, where A-1 is within: the image's domain is A-2's
            domain = record["scores"]["summary"]["details"]["domain"]
            domain["out_of_domain_score"] = 3 * domain["limit"]
            far = domain["out_of_domain_score"]
        path.write_text(json.dumps(record))
    html_path, csv_path = write_report(project)
    page = html_path.read_text(encoding="utf-8")
    assert "Per target: 2 TMA cores (2 analysed), in the grid's order" in page
    assert "<i>(of A-2, the furthest from it of the 2 analysed targets; each one's is in the table)</i>" in page
    assert "Training domain</th><td>OUT of the training domain" in page
    row = next(r for r in _rows(csv_path) if r["entry_id"] == "1")
    assert float(row["out_of_domain_score"]) == pytest.approx(far)
    targets = [
        (r["target"], r["target_type"]) for r in _rows(csv_path.with_name("targets.csv")) if r["entry_id"] == "1"
    ]
    assert targets == [("A-1", "TMA core"), ("A-2", "TMA core")]
    ranked, _ = build_queue(project)
    entry = next(e for e in ranked if e.entry_id == "1")
    assert entry.regions and {r.target for r in entry.regions} <= {"core A-1", "core A-2"}


def _copy_record(project: Path, entry: str, parent: str, new_parent: str, *, when: datetime, **target) -> None:
    record = json.loads(record_path(project / "pdl1" / entry, parent).read_text())
    record["written_at"] = when.isoformat()
    record["scores"]["target"] |= target
    record_path(project / "pdl1" / entry, new_parent).write_text(json.dumps(record))


def test_a_whole_image_analysis_and_analyses_of_its_targets_are_alternatives_the_newer_counting(project, analysed):
    # The script removes a whole-image analysis when it analyses the TMA cores; its earlier versions left its record
    # (folders still hold such records): counted with the cores', the image's cells were counted twice.
    later = T0 + timedelta(hours=1)
    _copy_record(project, "2", "p-whole", "p-core", when=later, target="B-1", target_type="TMA core")
    _copy_record(project, "1", "p-left", "p-whole1", when=later, target="PD-L1 analysis", target_type="whole image")
    html_path, csv_path = write_report(project)
    rows = {r["entry_id"]: r for r in _rows(csv_path)}
    assert rows["2"]["results_from"] == "pdl1_analyze.groovy's 1 analysis in QuPath"
    assert float(rows["2"]["tps_percent"]) == pytest.approx(analysed[1]["p-whole"].tps.percent)
    assert rows["1"]["results_from"] == "pdl1_analyze.groovy's 1 analysis in QuPath"
    assert float(rows["1"]["tps_percent"]) == pytest.approx(analysed[1]["p-left"].tps.percent)
    targets = {(r["entry_id"], r["target"]) for r in _rows(csv_path.with_name("targets.csv"))}
    assert targets == {("1", "PD-L1 analysis"), ("2", "B-1")}
    page = html.unescape(html_path.read_text(encoding="utf-8"))
    assert page.count("1 earlier pdl1_analyze.groovy analysis replaced by a later one of the image") == 1
    assert page.count("2 earlier pdl1_analyze.groovy analyses replaced by a later one of the image") == 1


def test_records_that_do_not_add_up_are_named_not_a_crash(project):
    for path in (project / "pdl1" / "1" / "qupath_analyses").glob("*.json"):
        record = json.loads(path.read_text())
        record["scores"]["summary"]["metadata"] = {}  # hand-edited: no "PD-L1 run" to merge by
        path.write_text(json.dumps(record))
    html_path, csv_path = write_report(project)
    rows = _rows(csv_path)
    assert [r["entry_id"] for r in rows] == ["1", "2"] and "do not add up" in rows[0]["left_out"]
    assert "qupath_analyses do not add up as an image's results (KeyError(" in html.unescape(html_path.read_text())
    ranked, not_ranked = build_queue(project)
    assert [e.entry_id for e in ranked] == ["2"] and [i for i, _, _ in not_ranked] == ["1"]


def _sidecars(project: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((project / "pdl1").glob(f"*/{REVIEW_FILE}"))}


def test_an_entry_that_drops_out_of_the_queue_has_its_review_json_rank_cleared(project):
    # Left as it was, its old rank stayed beside the new ranks (two entries ranked 1) for the import to set in QuPath.
    write_review_queue(project, qupath="never")
    assert sorted(_sidecars(project)) == ["1", "2"]
    for path in (project / "pdl1" / "2" / "qupath_analyses").glob("*.json"):
        path.write_text("{}")  # its records no longer read: named, not ranked
    queue = write_review_queue(project, qupath="never")
    assert [e.entry_id for e in queue.entries] == ["1"] and [i for i, _, _ in queue.not_ranked] == ["2"]
    sidecars = _sidecars(project)
    assert sidecars["1"]["metadata"] == {RANK_KEY: "1", SCORE_KEY: f"{queue.entries[0].score:.3f}"}
    assert sidecars["2"]["metadata"] == {RANK_KEY: None, SCORE_KEY: None}
    assert sidecars["2"]["not_ranked"] == queue.not_ranked[0][2]
    assert "review.json of 1 entry no longer ranked, its rank cleared" in queue.metadata_written_to
    assert not (project / "pdl1" / UNFINISHED_FILE).exists() and not list((project / "pdl1").rglob("*.part"))


def test_a_failure_while_staging_a_review_json_leaves_every_sidecar_as_it_was(project, monkeypatch):
    import bridge.review_queue as rq

    earlier = {RANK_KEY: "9", SCORE_KEY: "0.100"}  # an earlier queue's, told apart from this one's
    for entry in ("1", "2"):
        (project / "pdl1" / entry / REVIEW_FILE).write_text(json.dumps({"metadata": earlier}))
    before = {p: p.read_bytes() for p in (project / "pdl1").glob(f"*/{REVIEW_FILE}")}
    staged = rq._staged
    sidecars = []

    def full_disk_at_the_second_sidecar(path, text):
        if path.name == REVIEW_FILE:
            sidecars.append(path)
            if len(sidecars) == 2:
                raise OSError(28, "No space left on device")
        return staged(path, text)

    monkeypatch.setattr(rq, "_staged", full_disk_at_the_second_sidecar)
    with pytest.raises(OSError, match="No space left"):
        write_review_queue(project, qupath="never")
    assert len(sidecars) == 2  # the first was staged
    assert {p: p.read_bytes() for p in before} == before
    assert not (project / "pdl1" / "review_queue.csv").exists()
    assert not (project / "pdl1" / UNFINISHED_FILE).exists() and not list((project / "pdl1").rglob("*.part"))
