"""``pdl1 report`` over damaged results: the damaged image (or the pairs section) is left out with a warning
naming the file and the fix; the rest is reported."""

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
    rows = csv_path.read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("a.svs,")
    for name in ("b.summary.json", "c.summary.json"):
        assert f"{out / name} " in caplog.text
    assert "b.summary.json is not a pdl1 summary (expected a JSON object" in caplog.text
    assert "c.summary.json does not read (" in caplog.text
    assert f"run the same `pdl1 run SLIDES... --out {out}` with --resume" in caplog.text
    assert "Left out of this report" in html_path.read_text() and "c.summary.json" in html_path.read_text()


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
    assert [r.split(",")[0] for r in csv_path.read_text().splitlines()[1:]] == ["a.svs"]
    fix = f"`pdl1 run {project} --resume`"
    assert f"{project / 'pdl1' / '2' / 'summary.json'} does not read (" in caplog.text
    assert f"its image is left out of the report; run {fix}, which analyses again" in caplog.text
    assert (
        f"{project / 'pdl1' / 'pairs.json'} does not read" in caplog.text and "compares the cases again" in caplog.text
    )
    assert "H&amp;E vs PD-L1 IHC, per case" not in html_path.read_text()


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
        (project / "pdl1" / entry / "summary.json").write_text(json.dumps(_summary(project / name)))
    error = "b.svs: slide not found"
    status = {"images": {"1": {"state": "done", "run_id": "r2"}, "2": {"state": "failed", "error": error}}}
    (project / "pdl1" / "status.json").write_text(json.dumps(status))
    with caplog.at_level("WARNING", logger="bridge.report"):
        html_path, csv_path = write_report(project)
    rows = list(csv.DictReader(csv_path.open(encoding="utf-8")))
    assert [(r["image"], r["last_run_failed"]) for r in rows] == [("a.svs", ""), ("b.svs", error)]
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
    assert sorted(p.name for p in html_path.parent.glob("*.png")) == ["1-a.png", "2-a.png"]
    assert 'src="1-a.png"' in page and 'src="2-a.png"' in page and "a.tif (QuPath entry 2)" in page


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
    with_tiles, plain = (np.asarray(Image.open(html_path.parent / f"{e}-a.png").convert("RGB"), float) for e in "12")
    changed = np.abs(with_tiles - plain).sum(axis=2) > 30
    assert changed.shape == (64, 64)  # one thumbnail px per image px here
    assert changed[4:28, 2:36].mean() > 0.9  # the whole cell, and the trimmed tile's left part
    assert changed[4:28, 42:54].mean() < 0.1  # the gap between the trimmed tile's parts
    assert changed[4:28, 57:60].mean() > 0.9  # its right part
    assert changed[36:, :56].mean() < 0.1  # no tile


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
    assert f"removed 3 unfinished file(s) an interrupted one left (first: {ours[2]})" in caplog.text
    assert sorted(p.name for p in report.iterdir()) == sorted(
        ["old", "report.csv", "report.html", *(p.name for p in others[:3])]
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
