"""``pdl1 review-queue`` on a phantom project that ``pdl1 run`` analysed (without QuPath, and through it)."""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import shapely
from typer.testing import CliRunner

from bridge.cli.app import app
from bridge.init_project import init_project_files
from bridge.project import ProjectError
from bridge.qupath_geojson import QuPathObject, to_feature, write_features
from bridge.review_queue import (
    RANK_KEY,
    REVIEW_FILE,
    SCORE_KEY,
    UNFINISHED_FILE,
    ReviewQueueError,
    build_queue,
    write_review_queue,
)
from bridge.run import RunConfig, run_batch
from inference.pipeline import Models, PipelineConfig
from tests.helpers import two_ranked_phantoms

runner = CliRunner()


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    return two_ranked_phantoms(tmp_path_factory.mktemp("rq-slides"))


@pytest.fixture(scope="module")
def run_project(tmp_path_factory, slides):
    """Two analysed entries and a third whose slide moved away (the run records it as failed)."""
    root = tmp_path_factory.mktemp("rq-project")
    moved = root / "moved.svs"
    shutil.copy(slides[0], moved)
    project = root / "project"
    init_project_files(project, [*slides, moved])
    moved.unlink()
    outcomes = run_batch(
        [project], RunConfig(pipeline=PipelineConfig(device="cpu"), qupath="never"), models=Models(PipelineConfig())
    )
    assert [o.state for o in outcomes] == ["done", "done", "failed"]
    return project


@pytest.fixture
def project(run_project, tmp_path):
    """A fresh copy per test (slides are referenced by absolute URIs, so the copy finds them)."""
    return Path(shutil.copytree(run_project, tmp_path / "project"))


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _summary(project: Path, entry: str) -> dict:
    return json.loads((project / "pdl1" / entry / "summary.json").read_text())


def _expected_entry_score(summary: dict, reference: float, labelled_share: float = 0.0) -> float:
    d = summary["details"]
    u = d["mutual_information_mean"] / reference
    s = min(
        100 * d["candidate_area_um2"] / summary["analysed_area_um2"] / d["review_rule"]["review_candidate_area_pct"], 2
    )
    dom = d["domain"]
    dd = min(max(dom["out_of_domain_score"] / dom["limit"], dom["stain_distance_deg"] / dom["stain_limit_deg"]), 2)
    others = [r for r in d["review_reasons"] if not r["reason"].startswith(("SUA candidate", "out of the training"))]
    return (u + s + dd + 0.5 * len(others)) * (1 - labelled_share)


def test_entries_and_regions_are_ranked_by_the_documented_score_and_written(project):
    queue = write_review_queue(project, qupath="never")
    rows = _rows(project / "pdl1" / "review_queue.csv")
    entries = [r for r in rows if r["kind"] == "entry"]
    summaries = {e: _summary(project, e) for e in ("1", "2")}
    reference = max(s["details"]["mutual_information_mean"] for s in summaries.values())
    expected = {e: _expected_entry_score(s, reference) for e, s in summaries.items()}
    assert [r["entry_id"] for r in entries] == sorted(expected, key=lambda e: -expected[e])
    assert [r["rank"] for r in entries] == ["1", "2"]
    for row in entries:
        assert float(row["score"]) == pytest.approx(expected[row["entry_id"]], abs=1e-4)
    # the moved slide failed in the run: not ranked, and said why
    assert queue.not_ranked == (("3", "moved.svs", queue.not_ranked[0][2]),)
    assert queue.not_ranked[0][2].startswith("failed in the last run:") and "moved" in queue.not_ranked[0][2]

    regions = [r for r in rows if r["kind"] != "entry"]
    assert regions and {r["kind"] for r in regions} <= {"SUA candidate", "positive region", "uncertainty tile"}
    assert any(r["kind"] == "SUA candidate" for r in regions)
    for row in regions:
        x, y, w, h = (int(row[k]) for k in ("x_px", "y_px", "width_px", "height_px"))
        assert min(x, y) >= 0 and w > 0 and h > 0 and x + w <= 1536 and y + h <= 1536
        mpp = summaries[row["entry_id"]]["mpp"]
        assert float(row["centre_x_um"]) == pytest.approx((x + w / 2) * mpp, abs=0.6)
        bonus = 0.5 if row["kind"] == "SUA candidate" else 0.0
        # the best region of the project has MI at the reference; the others are at most that
        assert float(row["score"]) <= 1.0 + bonus + 1e-4
        assert row["labelled"] == "0"
    for entry in ("1", "2"):
        scores = [float(r["score"]) for r in regions if r["entry_id"] == entry]
        assert scores == sorted(scores, reverse=True) and len(scores) <= 5
    top = max(regions, key=lambda r: float(r["mutual_information"]))
    assert float(top["score"]) == pytest.approx(1.0 + (0.5 if top["kind"] == "SUA candidate" else 0.0), abs=1e-4)

    # entry metadata goes where the import script reads it, beside what `pdl1 run` put there
    for row in entries:
        metadata = _summary(project, row["entry_id"])["metadata"]
        assert metadata[RANK_KEY] == row["rank"]
        assert float(metadata[SCORE_KEY]) == pytest.approx(float(row["score"]), abs=6e-4)
        assert "PD-L1 run" in metadata
    provenance = json.loads((project / "pdl1" / "review_queue.json").read_text())
    assert [e["entry_id"] for e in provenance["entries"]] == [r["entry_id"] for r in entries]
    assert not list((project / "pdl1").rglob("*.part"))


def test_top_and_regions_limit_the_csv_but_every_entry_gets_its_rank(project, tmp_path):
    out = tmp_path / "queue.csv"
    write_review_queue(project, out=out, top=1, regions_per_entry=2, qupath="never")
    rows = _rows(out)
    assert rows[0]["kind"] == "entry" and {r["rank"] for r in rows} == {"1"}
    assert len(rows) == 3
    assert {_summary(project, e)["metadata"][RANK_KEY] for e in ("1", "2")} == {"1", "2"}


def test_an_entry_with_a_summary_gets_its_rank_there_and_no_review_json(project):
    # review.json is for entries analysed in QuPath alone: one an earlier queue wrote, before `pdl1 run` analysed the
    # image, kept its old rank beside the summary's new one; one of an entry no longer ranked kept its rank.
    earlier = json.dumps({"metadata": {RANK_KEY: "9", SCORE_KEY: "0.100"}})
    for entry in ("1", "3"):  # 3: its slide moved, the last run failed on it: not ranked
        (project / "pdl1" / entry).mkdir(exist_ok=True)
        (project / "pdl1" / entry / REVIEW_FILE).write_text(earlier)
    queue = write_review_queue(project, qupath="never")
    assert [i for i, _, _ in queue.not_ranked] == ["3"]
    assert {_summary(project, e)["metadata"][RANK_KEY] for e in ("1", "2")} == {"1", "2"}
    assert not (project / "pdl1" / "1" / REVIEW_FILE).exists() and not (project / "pdl1" / "2" / REVIEW_FILE).exists()
    cleared = json.loads((project / "pdl1" / "3" / REVIEW_FILE).read_text())
    assert cleared["metadata"] == {RANK_KEY: None, SCORE_KEY: None}
    assert cleared["not_ranked"].startswith("failed in the last run:")
    assert queue.metadata_written_to.startswith(
        "summary.json sidecars and review.json of 1 entry no longer ranked, its rank cleared; run "
        "pdl1_import_results.groovy"
    )


def test_labelled_regions_are_marked_and_the_entry_down_ranked(project):
    before = {r["entry_id"] + r["region_rank"]: r for r in _rows(_queue(project))}
    first = before["11"]
    x, y, w, h = (int(first[k]) for k in ("x_px", "y_px", "width_px", "height_px"))
    # The pathologist drew a training region over the left half, and the model's best region of entry 1
    training = shapely.union_all([shapely.box(0, 0, 768, 1536), shapely.box(x, y, x + w, y + h)])
    export = project / "pdl1" / "labels" / "1.geojson"
    export.parent.mkdir(parents=True)
    objects = [
        QuPathObject(training, "annotation", "Training region"),
        # an Ignore* area within it is not labelled; this tool's own results never count as labels
        QuPathObject(shapely.box(0, 0, 100, 100), "annotation", "Ignore*"),
    ]
    write_features(export, [to_feature(o) for o in objects])
    after = {r["entry_id"] + r["region_rank"]: r for r in _rows(_queue(project))}
    summary = _summary(project, "1")
    labelled_um2 = (training.area - 100 * 100) * summary["mpp"] ** 2
    share = min(labelled_um2 / summary["analysed_area_um2"], 1.0)
    assert float(after["1"]["labelled"]) == pytest.approx(share, abs=1e-3)
    assert float(after["1"]["score"]) == pytest.approx(float(before["1"]["score"]) * (1 - share), abs=2e-4)
    assert "already labelled" in after["1"]["reasons"]
    moved = [
        r for r in after.values() if r["entry_id"] == "1" and r["x_px"] == first["x_px"] and r["y_px"] == first["y_px"]
    ]
    assert all(r["labelled"] == "1" for r in moved)
    regions_1 = [after[k] for k in sorted(after) if k.startswith("1") and after[k]["region_rank"]]
    flags = [r["labelled"] for r in sorted(regions_1, key=lambda r: int(r["region_rank"]))]
    assert flags == sorted(flags)  # unlabelled first
    assert after["11"]["labelled"] == "0"


def test_an_entry_whose_labels_could_not_be_read_says_so(project):
    # Without QuPath and without the export, an entry a pathologist labelled ranked as unlabelled and nothing said
    # so (the README's "an entry without one counts as unlabelled"). QuPath's own summary.json counts its classes.
    data = project / "data" / "1"
    data.mkdir(parents=True, exist_ok=True)
    counts = {"Training region": 2, "PD-L1 positive": 4, "PD-L1 negative": 1, "Unclassified": 1}
    (data / "summary.json").write_text(
        json.dumps({"imageType": "BRIGHTFIELD_H_E", "hierarchy": {"annotationClassificationCounts": counts}})
    )
    # Entry 2's QuPath summary counts only what the run writes (PD-L1 positive regions): nothing to say there.
    (project / "data" / "2").mkdir(exist_ok=True)
    (project / "data" / "2" / "summary.json").write_text(
        json.dumps({"hierarchy": {"annotationClassificationCounts": {"PD-L1 positive": 3}}})
    )
    rows = {r["entry_id"]: r for r in _rows(_queue(project)) if r["kind"] == "entry"}
    assert rows["1"]["reasons"].endswith(
        "labels not read, ranked as unlabelled: QuPath's summary of the entry counts Training region 2, PD-L1 "
        f"negative 1, but QuPath is not found here and there is no {project / 'pdl1' / 'labels' / '1.geojson'}; run "
        "pdl1_export_labels.groovy for the project (Run for project), then this again"
    )
    assert "labels not read" not in rows["2"]["reasons"]
    # Once exported, they are read (here: none of them lies in the analysed area) and the note goes.
    (project / "pdl1" / "labels").mkdir()
    write_features(project / "pdl1" / "labels" / "1.geojson", [])
    rows = {r["entry_id"]: r for r in _rows(_queue(project)) if r["kind"] == "entry"}
    assert "labels not read" not in rows["1"]["reasons"]


def _queue(project: Path) -> Path:
    return write_review_queue(project, qupath="never").csv_path


def test_a_project_never_run_is_refused_with_what_to_do(tmp_path, slides):
    project = tmp_path / "fresh"
    init_project_files(project, slides)
    with pytest.raises(
        ReviewQueueError,
        match=r"no results of `pdl1 run` to rank .* nor records of analyses in QuPath "
        r"\(.*qupath_analyses/\*\.json, which pdl1_analyze\.groovy saves\); "
        r"run `pdl1 run .*fresh` or pdl1_analyze.groovy in QuPath first",
    ):
        write_review_queue(project, qupath="never")
    assert not (project / "pdl1").exists()  # refused before anything is written, the run lock included
    with pytest.raises(ReviewQueueError, match="no such project"):
        write_review_queue(tmp_path / "nope", qupath="never")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "project.qpproj").write_text("{not json")
    with pytest.raises(ProjectError, match=r"project.qpproj: not valid JSON .* half-written or corrupt"):
        write_review_queue(tmp_path / "bad", qupath="never")
    assert not (tmp_path / "bad" / "pdl1").exists()


def test_a_slide_or_a_damaged_project_file_given_as_the_project_is_named_as_such(tmp_path, slides):
    # A slide in the project's place was read as a corrupt project file ("restore it from your own backups");
    # a project file of another name was passed over for a project.qpproj beside it ("no QuPath project here").
    slide = tmp_path / slides[0].name
    shutil.copyfile(slides[0], slide)
    (tmp_path / "copy.qpproj").write_text("{not json")
    for given, said in (
        (slide, f"{slide}: a file, not a QuPath project; give the project's folder or its project.qpproj"),
        (tmp_path / "copy.qpproj", f"{tmp_path / 'copy.qpproj'}: not valid JSON"),
    ):
        result = runner.invoke(app, ["review-queue", str(given), "--qupath", "never"], env={"COLUMNS": "400"})
        text = " ".join(result.output.split())
        assert result.exit_code == 1 and text.startswith(f"error: {said}"), result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.qpproj", slide.name]  # no pdl1/ made
    result = runner.invoke(app, ["report", str(slide)], env={"COLUMNS": "400"})
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert text.startswith(f"error: {slide}: a file, not a project or a run's output folder; give the QuPath project")


def test_an_out_that_cannot_be_the_csv_or_the_report_folder_is_refused_before_anything_is_written(project, tmp_path):
    # A folder as --out left the staged .part files behind after "[Errno 21] Is a directory"; a path under a
    # file said only "[Errno 17] File exists" (report: "[Errno 20] Not a directory").
    from bridge.report import write_report

    (tmp_path / "folder").mkdir()
    (tmp_path / "notes").write_text("")
    before = {p: p.read_bytes() for p in sorted((project / "pdl1").rglob("*")) if p.is_file()}
    with pytest.raises(ReviewQueueError, match=r"--out .*folder is a folder; give the CSV file to write, e\.g\. "):
        write_review_queue(project, out=tmp_path / "folder", qupath="never")
    with pytest.raises(ReviewQueueError, match=r"--out .*notes.q\.csv: its folder .*notes is a file; give a CSV path"):
        write_review_queue(project, out=tmp_path / "notes" / "q.csv", qupath="never")
    # --out naming a slide (or any other file than a CSV) replaced it with the queue.
    (tmp_path / "folder" / "slide.svs").write_bytes(b"II*\x00 the slide")
    with pytest.raises(ReviewQueueError, match=r"--out .*slide\.svs does not end in \.csv; give the CSV file to write"):
        write_review_queue(project, out=tmp_path / "folder" / "slide.svs", qupath="never")
    assert (tmp_path / "folder" / "slide.svs").read_bytes() == b"II*\x00 the slide"
    (tmp_path / "folder" / "slide.svs").unlink()
    with pytest.raises(ProjectError, match=r"--out .*notes.r lies under .*notes, which is a file; the report is "):
        write_report(project, tmp_path / "notes" / "r")
    with pytest.raises(ProjectError, match=r"--out .*notes is a file; the report is written into a folder"):
        write_report(project, tmp_path / "notes")
    # In the project's pdl1/, --out targets.csv replaced the run's table with the queue, status.csv its status.json
    # with the queue's provenance, 1/summary.csv an entry's summary.
    # So is a name not ending .csv there (helper-134: it suggested pdl1/rq.csv, which was then refused).
    for name in ("targets.csv", "status.csv", "1/summary.csv", "rq.svs"):
        with pytest.raises(ReviewQueueError, match=r"--out .* lies in .*pdl1, which holds what pdl1 run writes"):
            write_review_queue(project, out=project / "pdl1" / name, qupath="never")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "notes", "project"]
    assert not any((tmp_path / "folder").iterdir())
    assert {p: p.read_bytes() for p in sorted((project / "pdl1").rglob("*")) if p.is_file()} == before
    write_review_queue(project, out=project / "pdl1" / "review_queue.csv", qupath="never")  # its own name there


def test_an_out_beside_a_users_file_of_the_provenances_name_is_refused_and_an_earlier_queue_replaced(project, tmp_path):
    # --out notes/cases.csv replaced the user's notes/cases.json with the queue's provenance, naming only the CSV.
    (tmp_path / "notes").mkdir()
    notes = tmp_path / "notes" / "cases.json"
    notes.write_text('{"my": "case notes"}')
    with pytest.raises(
        ReviewQueueError, match=r"notes.cases\.json is there and no review queue's, so it would be replaced"
    ):
        write_review_queue(project, out=tmp_path / "notes" / "cases.csv", qupath="never")
    assert notes.read_text() == '{"my": "case notes"}' and not (tmp_path / "notes" / "cases.csv").exists()
    table = tmp_path / "notes" / "table.csv"
    table.write_text("patient,score\n1,3\n")  # a CSV of the user's own
    with pytest.raises(ReviewQueueError, match=r"no review queue's"):
        write_review_queue(project, out=table, qupath="never")
    assert table.read_text() == "patient,score\n1,3\n"
    queue = tmp_path / "notes" / "queue.csv"
    write_review_queue(project, out=queue, qupath="never")
    write_review_queue(project, out=queue, qupath="never")  # an earlier queue of its own is replaced


@pytest.mark.parametrize("damage", ['{"cut short', '{"run_id": "x"}'], ids=["not JSON", "no mpp"])
def test_a_damaged_summary_is_its_entry_s_problem_the_others_are_ranked(project, damage):
    # It stopped the whole queue; a report lists such an entry among those left out and goes on.
    damaged = project / "pdl1" / "2" / "summary.json"
    damaged.write_text(damage)
    queue = write_review_queue(project, qupath="never")
    assert [e.entry_id for e in queue.entries] == ["1"]
    (why,) = [w for i, _, w in queue.not_ranked if i == "2"]
    assert re.search(r"pdl1/2/summary.json (does not read|is not a pdl1 summary) .*--resume", why), why
    assert damaged.read_text() == damage  # left as it was: no rank written into it
    assert RANK_KEY in _summary(project, "1")["metadata"]
    assert {r["entry_id"] for r in _rows(project / "pdl1" / "review_queue.csv") if r["rank"]} == {"1"}


def test_an_output_that_does_not_read_leaves_its_entry_ranked_without_regions(project):
    # It stopped the whole queue; the entry's scores are in its summary, only its regions are lost (and said).
    (project / "pdl1" / "2" / "objects.geojson").write_text('{"cut short')
    queue = write_review_queue(project, qupath="never")
    assert sorted(e.entry_id for e in queue.entries) == ["1", "2"]
    (second,) = [e for e in queue.entries if e.entry_id == "2"]
    assert second.regions == ()
    said = r"no regions listed: .*pdl1/2/objects.geojson does not read .*--resume"
    assert any(re.match(said, r) for r in second.reasons), second.reasons
    assert next(e for e in queue.entries if e.entry_id == "1").regions


def test_a_run_status_of_the_wrong_shape_is_refused_naming_it(project):
    # Valid JSON, not a run status: named with its fix, not an AttributeError.
    status = project / "pdl1" / "status.json"
    before = status.read_bytes()
    status.write_text("[1]")
    try:
        with pytest.raises(ProjectError, match=r"status.json: not a pdl1 run status .*delete it"):
            write_review_queue(project, qupath="never")
    finally:
        status.write_bytes(before)


def test_a_failure_while_writing_leaves_every_file_as_it_was(project, monkeypatch):
    import bridge.review_queue as rq

    before = {p: p.read_bytes() for p in (project / "pdl1").rglob("summary.json")}
    staged = rq._staged
    calls = {"n": 0}

    def full_disk_at_the_fourth(path, text):
        calls["n"] += 1
        if calls["n"] == 4:  # csv, provenance, entry 1's summary staged: entry 2's fails
            raise OSError(28, "No space left on device")
        return staged(path, text)

    monkeypatch.setattr(rq, "_staged", full_disk_at_the_fourth)
    with pytest.raises(OSError, match="No space left"):
        write_review_queue(project, qupath="never")
    assert {p: p.read_bytes() for p in before} == before
    assert not (project / "pdl1" / "review_queue.csv").exists()
    assert not list((project / "pdl1").rglob("*.part"))


def test_a_failure_while_renaming_leaves_no_staged_files_behind_and_says_the_ranks_are_mixed(project, monkeypatch):
    import bridge.review_queue as rq

    replace = rq.os.replace
    first = {}

    def refused_for_the_second_summary(src, dst):
        if Path(dst).name == "summary.json" and first.setdefault("summary", dst) != dst:
            raise PermissionError(13, "Permission denied", str(dst))
        return replace(src, dst)

    monkeypatch.setattr(rq.os, "replace", refused_for_the_second_summary)
    with pytest.raises(PermissionError):
        write_review_queue(project, qupath="never")
    assert not list((project / "pdl1").rglob("*.part"))  # the summaries' staged copies were left behind
    ranks = [_summary(project, entry)["metadata"].get(RANK_KEY) for entry in ("1", "2")]
    assert sorted(rank is None for rank in ranks) == [False, True]  # one summary renamed, the other not
    # What a reader is told: the marker stays, and no review_queue.json vouches for the CSV.
    assert (project / "pdl1" / UNFINISHED_FILE).is_file()
    assert not (project / "pdl1" / "review_queue.json").exists()


KILL_AT = """
import os, signal, sys
from bridge.review_queue import write_review_queue

calls, n, replace = [0], int(sys.argv[2]), os.replace


def killed_at_the_nth(src, dst):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst)


os.replace = killed_at_the_nth
write_review_queue(sys.argv[1], qupath="never")
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="kill -9 is a POSIX signal")
@pytest.mark.parametrize("kill_at", [1, 3, 5])  # the marker's rename, the second summary's, review_queue.json's
def test_a_review_queue_killed_between_its_renames_is_told_apart_and_repaired_by_the_next(project, kill_at, caplog):
    # Killed between its renames, the CSV ranked every entry but only some summaries carried the new rank, and
    # nothing said so: pdl1_import_results.groovy set those ranks in QuPath beside older ones.
    old = {"1": "7", "2": "7"}  # an earlier generation's, told apart from the new ranks (1 and 2)
    for entry, rank in old.items():
        summary = _summary(project, entry)
        summary["metadata"][RANK_KEY] = rank
        (project / "pdl1" / entry / "summary.json").write_text(json.dumps(summary))
    (project / "pdl1" / "review_queue.json").write_text("{}")  # the earlier generation's record
    done = subprocess.run(
        [sys.executable, "-c", KILL_AT, str(project), str(kill_at)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    marker = project / "pdl1" / UNFINISHED_FILE
    ranks = {entry: _summary(project, entry)["metadata"][RANK_KEY] for entry in old}
    if kill_at == 1:  # killed writing the marker: nothing replaced yet, every file the earlier generation's
        assert not marker.exists() and ranks == old and (project / "pdl1" / "review_queue.json").read_text() == "{}"
    else:  # the marker says the ranks are mixed, and no record vouches for the CSV
        assert marker.is_file() and json.loads(marker.read_text())["pid"] > 0
        assert not (project / "pdl1" / "review_queue.json").exists()
        renamed = sorted(rank != "7" for rank in ranks.values())
        assert renamed == ([False, True] if kill_at == 3 else [True, True])
    with caplog.at_level("WARNING"):
        write_review_queue(project, qupath="never")
    if kill_at != 1:
        assert "an earlier pdl1 review-queue was stopped while renaming its files" in caplog.text
        assert "this one writes every entry's again" in caplog.text
    assert not marker.exists() and not list((project / "pdl1").rglob("*.part"))
    assert sorted(_summary(project, entry)["metadata"][RANK_KEY] for entry in old) == ["1", "2"]
    record = json.loads((project / "pdl1" / "review_queue.json").read_text())
    assert {e["entry_id"]: str(e["rank"]) for e in record["entries"]} == {
        entry: _summary(project, entry)["metadata"][RANK_KEY] for entry in old
    }


def test_the_cli_lists_the_command_and_prints_the_queue(project):
    help_text = runner.invoke(app, ["--help"]).output
    assert "review-queue" in help_text
    result = runner.invoke(app, ["review-queue", str(project), "--qupath", "never", "--top", "1"])
    assert result.exit_code == 0, result.output
    assert "review queue" in result.output and "not ranked: moved.svs (entry 3)" in result.output
    assert "entry metadata in the summary.json sidecars; run pdl1_import_results.groovy for the project" in (
        " ".join(result.output.split())
    )
    result = runner.invoke(app, ["review-queue", str(project), "--top", "0"])
    assert result.exit_code == 2


def test_the_cli_names_the_entry_where_two_share_an_image_name(project, monkeypatch):
    # One file typed H&E in one entry and H-DAB in another (the QuPath-written fixture's layout): both rows read
    # "s41.svs" and only the CSV said which entry each rank was.
    import bridge.review_queue

    (first, second), not_ranked = build_queue(project)
    twins = bridge.review_queue.ReviewQueue(
        (first, replace(second, image=first.image)), tuple(not_ranked), project / "q.csv", "summary.json sidecars"
    )
    monkeypatch.setattr(bridge.review_queue, "write_review_queue", lambda *a, **k: twins)
    result = runner.invoke(app, ["review-queue", str(project), "--qupath", "never"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert f"{first.image} (entry {first.entry_id})" in result.output
    assert f"{first.image} (entry {second.entry_id})" in result.output
    monkeypatch.undo()
    alone = runner.invoke(app, ["review-queue", str(project), "--qupath", "never"], env={"COLUMNS": "400"})
    assert "(entry" not in alone.output.replace("(entry 3)", "")  # names of their own stay bare


@pytest.mark.qupath
def test_through_qupath_the_entries_get_their_rank_as_metadata(tmp_path, slides):
    from paquo.projects import QuPathProject

    from bridge.init_project import init_project_qupath

    project = init_project_qupath(tmp_path / "qp", slides).parent
    outcomes = run_batch(
        [project], RunConfig(pipeline=PipelineConfig(device="cpu"), qupath="always"), models=Models(PipelineConfig())
    )
    assert [o.state for o in outcomes] == ["done", "done"]
    data_before = {p: p.read_bytes() for p in project.glob("data/*/data.qpdata")}
    queue = write_review_queue(project, qupath="always")
    assert queue.metadata_written_to == "QuPath project"
    with QuPathProject(project / "project.qpproj", mode="r") as qp:
        got = {str(e.entry_id): (e.metadata[RANK_KEY], e.metadata[SCORE_KEY]) for e in qp.images}
    expected = {e.entry_id: (str(rank), f"{e.score:.3f}") for rank, e in enumerate(queue.entries, start=1)}
    assert got == expected
    assert {p: p.read_bytes() for p in data_before} == data_before  # metadata only: no data.qpdata rewritten


def test_a_region_is_left_out_only_when_half_of_it_lies_under_a_better_one():
    import shapely

    from bridge.review_queue import RegionItem, rank_regions

    def region(kind, score, geometry):
        x0, y0, x1, y1 = geometry.bounds
        return RegionItem(kind, "annotation", (x0, y0, x1 - x0, y1 - y0), geometry.area, 0.1, score, False, "")

    tile = shapely.box(10, 10, 20, 20)  # the best, small, inside the large positive region
    large = shapely.box(0, 0, 200, 200)
    copy = shapely.box(12, 12, 22, 22)  # mostly under the tile: a duplicate
    geometries = dict(enumerate([tile, large, copy]))
    regions = [region("uncertainty tile", 0.9, tile), region("positive region", 0.5, large), region("tile", 0.4, copy)]
    chosen = rank_regions(regions, labelled=shapely.Polygon(), limit=10, geometries=geometries)
    assert [r.kind for r in chosen] == ["uncertainty tile", "positive region"]


def test_an_entry_the_last_run_failed_on_says_its_results_are_an_earlier_runs(project):
    # A re-run that fails on an image keeps its earlier results; the queue ranked them as the last run's.
    status_path = project / "pdl1" / "status.json"
    status = json.loads(status_path.read_text())
    status["images"]["1"] = {"state": "failed", "error": "s31.svs: out of memory", "image": "s31.svs"}
    status_path.write_text(json.dumps(status))
    ranked, _ = build_queue(project)
    first = next(e for e in ranked if e.entry_id == "1")
    run_id = _summary(project, "1")["run_id"]
    assert first.reasons[0] == (
        f"the last run failed on it (s31.svs: out of memory): ranked by an earlier run's results (run {run_id})"
    )
    assert not any("last run failed" in r for e in ranked if e.entry_id != "1" for r in e.reasons)


def test_the_staged_files_of_a_killed_review_queue_are_removed_by_the_next(project, caplog):
    # A kill between staging and renaming left a copy of every summary, and of the queue, as .part files that
    # each later review-queue left where they were.
    left = [
        project / "pdl1" / "1" / "summary.json.0123456789ab.part",
        project / "pdl1" / "review_queue.csv.ba9876543210.part",
    ]
    for path in left:
        path.write_text("staged")
    with caplog.at_level("WARNING", logger="bridge.run_lock"):
        write_review_queue(project, qupath="never")
    assert not any(path.exists() for path in left)
    assert "removed 2 unfinished file(s) an interrupted run left" in caplog.text


def _as_tma(project: Path, entry: str, *, regions: bool = True) -> dict:
    """Entry ``entry`` made a TMA of three cores as ``pdl1 run`` through QuPath leaves it: A-1 and A-2 as its whole
    image was (within the domain, little SUA area), A-3 out of the training domain with a large SUA candidate area
    (its review reasons; no other, which R would count from the details too). Its details stay A-1's but for the
    review reasons, as summary.json keeps them; with ``regions``, its target_regions.json holds A-1's regions (the
    image's own) and a SUA candidate of A-3. Returns the summary."""
    import numpy as np

    from bridge.qupath_geojson import read_features
    from bridge.targets import TargetNuclei, rows_from_summary, rows_to_json, write_target_regions

    path = project / "pdl1" / entry / "summary.json"
    summary = json.loads(path.read_text())
    (whole,) = rows_from_summary(summary)
    third = summary["analysed_area_um2"] / 3
    fine = replace(whole, target_type="TMA core", analysed_area_um2=third)
    model = summary["details"]["domain"]["model"]
    reasons = (
        ("SUA candidate area %", 5.0, 2.0),
        (f"out of the training domain of {model}: network features", 3.1, 2.6),
    )
    bad = replace(
        fine,
        target="A-3",
        needs_review=True,
        sua_candidate_area_pct=5.0,
        sua_area_limit_pct=2.0,
        out_of_domain_score=3.1,
        out_of_domain_limit=2.6,
        review_reasons=tuple(f"{r} ({v:.3g}, limit {limit:.3g})" for r, v, limit in reasons),
    )
    summary["targets"] = rows_to_json([replace(fine, target="A-1"), replace(fine, target="A-2"), bad])
    summary["details"]["review_reasons"] = [
        {"reason": r, "value": v, "limit": limit, "target": "A-3"} for r, v, limit in reasons
    ]
    path.write_text(json.dumps(summary))
    if regions:
        objects = list(read_features(project / "pdl1" / entry / "objects.geojson"))
        candidate = QuPathObject(
            shapely.box(1200, 1200, 1300, 1300),
            "annotation",
            "PD-L1 FN candidate",
            {"Area µm^2": 2500.0, "PD-L1 probability mean": 0.8, "Mutual information mean": 1.0, "SUA score": 0.9},
        )
        write_target_regions(
            project / "pdl1" / entry / "target_regions.json",
            run_id=summary["run_id"],
            targets=[("A-1", objects[1:]), ("A-2", []), ("A-3", [candidate])],
            nuclei=[TargetNuclei(np.zeros((0, 2)), np.zeros(0, np.int64), ())] * 3,
        )
    return summary


def test_an_image_of_several_targets_is_ranked_by_its_worst_target_and_says_which(project):
    # The queue scored a TMA by its summary's details, which are the first core's: a TMA whose first core was fine
    # and whose last was out of the training domain with a large SUA candidate area ranked below a slide that was
    # only mildly uncertain, and neither its reasons nor its regions led to the last core.
    tma = _as_tma(project, "2")
    ranked, _ = build_queue(project)
    assert [e.entry_id for e in ranked] == ["2", "1"]
    single, entry = _summary(project, "1"), next(e for e in ranked if e.entry_id == "2")
    reference = single["details"]["mutual_information_mean"]  # the highest U: the TMA's cores are entry 2's tissue
    # A single-target entry scores exactly as before.
    assert ranked[1].score == pytest.approx(_expected_entry_score(single, reference), abs=1e-9)
    assert ranked[1].reasons == ()
    # The TMA: U over all its tissue (its cores' means weighted by area: here all alike), S, D and R the worst core's.
    u = tma["details"]["mutual_information_mean"] / reference
    assert (entry.parts.uncertainty, entry.parts.sua, entry.parts.domain, entry.parts.reasons) == pytest.approx(
        (u, 2.0, 3.1 / 2.6, 0.0)
    )
    assert entry.score == pytest.approx(u + 2.0 + 3.1 / 2.6)
    assert entry.reasons[:2] == ("core A-3: SUA candidate area 5% / limit 2%", "core A-3: out of domain 3.1 / 2.6")
    assert entry.reasons[2:] == (
        "A-3: SUA candidate area % (5, limit 2)",
        f"A-3: out of the training domain of {tma['details']['domain']['model']}: network features (3.1, limit 2.6)",
    )
    # Its regions are every core's, each named by its core: A-3's candidate first (the project's highest MI).
    best = entry.regions[0]
    assert (best.kind, best.bounds_px, best.why) == (
        "SUA candidate",
        (1200, 1200, 100, 100),
        "core A-3: SUA score 0.900",
    )
    assert best.score == pytest.approx(1.5) and best.target == "core A-3"
    assert len(entry.regions) == 5 and all(r.why.startswith("core A-1") for r in entry.regions[1:])
    rows = _rows(_queue(project))
    assert rows[0]["entry_id"] == "2" and "core A-3: out of domain 3.1 / 2.6" in rows[0]["reasons"]
    assert (rows[1]["kind"], rows[1]["x_px"], rows[1]["reasons"]) == (
        "SUA candidate",
        "1200",
        "core A-3: SUA score 0.900",
    )
    shown = runner.invoke(app, ["review-queue", str(project), "--qupath", "never"], env={"COLUMNS": "400"})
    assert "SUA candidate 1200, 1200, 100, 100 (core A-3)" in shown.output, shown.output


@pytest.mark.parametrize("damage", [b'{"run_id": "cut sh', b"\xff\xfe"], ids=["cut short", "not UTF-8"])
def test_a_damaged_target_regions_file_is_its_entry_s_problem_the_others_are_ranked(project, damage):
    # One damaged target_regions.json stopped the whole queue (a ReviewQueueError), where a damaged summary or
    # objects.geojson is its entry's problem: the entry is ranked by its summary, with the first target's regions
    # (objects.geojson), its reasons naming the file and the fix; the other entries as ever.
    _as_tma(project, "2")
    damaged = project / "pdl1" / "2" / "target_regions.json"
    damaged.write_bytes(damage)
    queue = write_review_queue(project, qupath="never")
    assert sorted(e.entry_id for e in queue.entries) == ["1", "2"] and "2" not in {i for i, _, _ in queue.not_ranked}
    tma, other = (next(e for e in queue.entries if e.entry_id == i) for i in ("2", "1"))
    said = [r for r in tma.reasons if str(damaged) in r]
    assert len(said) == 1 and said[0].startswith(f"regions of A-1 only, the first target: {damaged} does not read (")
    assert said[0].endswith("; run the image again (`pdl1 run PROJECT` without --resume) to list every target's")
    assert tma.parts.sua == 2.0  # still scored by its worst core, from its summary
    assert tma.regions and not any(r.why.startswith("core") for r in tma.regions)  # objects.geojson's
    assert other.regions and not any(str(damaged) in r for r in other.reasons)
    assert damaged.read_bytes() == damage  # left as it was
    rows = _rows(project / "pdl1" / "review_queue.csv")
    assert {r["entry_id"] for r in rows if r["rank"]} == {"1", "2"}


def test_an_image_of_several_targets_written_before_their_numbers_or_regions_were_kept_says_so(project):
    # Scored from its details (the first target's) as before, and regions from objects.geojson (the first target's),
    # but each said, with how to have every target's.
    _as_tma(project, "2", regions=False)
    entry = next(e for e in build_queue(project)[0] if e.entry_id == "2")
    assert entry.reasons[-1] == (
        f"regions of A-1 only, the first target: there is no {project / 'pdl1' / '2' / 'target_regions.json'} (an "
        "earlier version kept the first target's output alone); run the image again (`pdl1 run PROJECT` without "
        "--resume) to list every target's"
    )
    assert entry.regions and not any(r.why.startswith("core") for r in entry.regions)
    summary = _summary(project, "2")
    for row in summary["targets"]:
        del row["analysed_area_um2"]
    (project / "pdl1" / "2" / "summary.json").write_text(json.dumps(summary))
    entry = next(e for e in build_queue(project)[0] if e.entry_id == "2")
    assert entry.parts.sua < 2 and entry.reasons[-2] == (
        "scored by A-1 only, the first of its 3 targets: its summary was written before each target's numbers were "
        "kept; run the image again (`pdl1 run PROJECT` without --resume)"
    )


def test_a_run_started_while_the_queue_is_written_is_refused_naming_the_review_queue(project, monkeypatch):
    # review-queue holds the project's run lock while it reads the summaries and writes the ranks; a run refused
    # meanwhile was told "another pdl1 run is writing here", and went looking for a run.
    from bridge import review_queue
    from bridge.project import ProjectError
    from bridge.run_lock import run_lock

    real, refused = review_queue.build_queue, []

    def build_queue(*args, **kwargs):
        with pytest.raises(ProjectError) as err, run_lock(project):
            pass
        refused.append(str(err.value))
        return real(*args, **kwargs)

    monkeypatch.setattr(review_queue, "build_queue", build_queue)
    write_review_queue(project, qupath="never")
    (said,) = refused
    assert said.startswith(f"{project}: pdl1 review-queue is ranking the project here (pid ")
    assert said.endswith(f"; wait for it to finish, or delete {project / 'pdl1' / 'run.lock'} if it is no longer going")


def test_entries_of_equal_score_are_ranked_in_the_order_of_their_ids_as_numbers(tmp_path):
    # helper-129: ties were broken by the entry ID as text: 1, 10, 11, 2, ...
    import numpy as np
    import tifffile

    from bridge.review_queue import write_review_queue

    root = tmp_path / "project"
    root.mkdir()
    images = []
    for i in range(1, 12):
        tifffile.imwrite(root / f"s{i}.tif", np.full((64, 64, 3), 235, np.uint8))
        uri = {"builderType": "uri", "uri": f"file:{root}/s{i}.tif"}
        images.append({"serverBuilder": uri, "entryID": i, "imageName": f"s{i}.tif"})
        folder = root / "pdl1" / str(i)
        folder.mkdir(parents=True)
        summary = {"image": str(root / f"s{i}.tif"), "mpp": 0.5, "run_id": "r1", "analysed_area_um2": 1000.0}
        (folder / "summary.json").write_text(json.dumps(summary))
        (folder / "objects.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    (root / "project.qpproj").write_text(json.dumps({"version": "0.4.4", "images": images}))
    queue = write_review_queue(root, qupath="never")
    ranked = [r["entry_id"] for r in _rows(queue.csv_path) if r["kind"] == "entry"]
    assert ranked == [str(i) for i in range(1, 12)]


def test_a_plain_slides_output_folder_is_told_what_the_command_takes(tmp_path):
    # helper-129: it said only "no QuPath project here", not that review-queue ranks a project's entries.
    from bridge.review_queue import ReviewQueueError, write_review_queue

    (tmp_path / "a.summary.json").write_text(json.dumps({"image": str(tmp_path / "a.svs"), "mpp": 0.5}))
    with pytest.raises(ReviewQueueError, match=r"holds the results of slides run without a project .* review-queue "):
        write_review_queue(tmp_path, qupath="never")


def test_the_labelled_area_leaves_out_what_training_leaves_out():
    # helper-136: training passes over TMA cores and objects on another z-slice, but the queue's "% already labelled"
    # counted them.
    import dataclasses

    from shapely.geometry import box

    from bridge.qupath_geojson import QuPathObject
    from bridge.review_queue import labelled_area

    region = QuPathObject(box(0, 0, 10, 10), "annotation", "Training region")
    core = QuPathObject(box(20, 20, 30, 30), "tmaCore", "Training region")
    elsewhere = dataclasses.replace(QuPathObject(box(40, 40, 50, 50), "annotation", "Training region"), plane_zt=(2, 0))
    assert labelled_area([region, core, elsewhere]).area == 100


def test_an_export_read_for_its_labelled_area_keeps_no_cells_but_those_of_label_classes(tmp_path):
    # A slide's export holds its cells (a million with QuPath's cell detection), which the queue parsed into objects
    # only to pass over them; a detection of a label class still counts, as training reads it.
    from shapely.geometry import box

    from bridge import review_queue
    from bridge.qupath_geojson import read_features

    region = QuPathObject(box(0, 0, 10, 10), "annotation", "Training region")
    drawn = QuPathObject(box(20, 0, 30, 10), "detection", "Training region", color=(1, 2, 3))
    ignore = QuPathObject(box(2, 2, 4, 4), "detection", "Ignore*", color=(1, 2, 3))
    cells = [QuPathObject(box(i, 40, i + 1, 41), "detection", "Tumor: Positive") for i in range(5)]
    path = tmp_path / "1.geojson"
    write_features(path, [to_feature(o) for o in (region, drawn, ignore, *cells)])
    kept = list(read_features(path, keep=review_queue._may_label_area))
    assert [o.classification for o in kept] == ["Training region", "Training region", "Ignore*"]
    assert review_queue.labelled_area(kept).area == review_queue.labelled_area(list(read_features(path))).area == 196
    # Through QuPath (every entry read at once) the same objects are kept, told from the objects paquo gives.
    unclassified = QuPathObject(box(50, 50, 51, 51), "cell", None)
    every = [*read_features(path), unclassified]
    assert [o for o in every if review_queue._may_label_area_in_qupath("1", o)] == kept


def test_the_cli_counts_the_entries_read_unless_told_not_to(project):
    # Every entry's results were read (a run's objects.geojson holds every nucleus) without a word until the table.
    result = runner.invoke(app, ["review-queue", str(project), "--qupath", "never"])  # lines: stderr is no terminal
    assert result.exit_code == 0, result.output
    assert re.search(r"^entries: 0/2 .*^entries: 2/2 .*review queue", result.output, re.M | re.S), result.output
    quiet = runner.invoke(app, ["review-queue", str(project), "--qupath", "never", "--no-progress"])
    assert quiet.exit_code == 0 and "entries:" not in quiet.output, quiet.output


def test_through_qupath_the_labels_read_are_a_stage_of_their_own(project, monkeypatch):
    import bridge.qupath

    def read_entry_objects(path, ids, *, keep, on_progress):
        on_progress(0, len(ids))
        on_progress(len(ids), len(ids))
        return {}

    monkeypatch.setattr(bridge.qupath, "qupath_available", lambda: (True, ""))
    monkeypatch.setattr(bridge.qupath, "read_entry_objects", read_entry_objects)
    monkeypatch.setattr(bridge.qupath, "set_entry_metadata", lambda path, values: None)
    result = runner.invoke(app, ["review-queue", str(project)])
    assert result.exit_code == 0, result.output
    stages = r"^entries: 2/2 .*^labels in QuPath: 0/2 .*^labels in QuPath: 2/2 "
    assert re.search(stages, result.output, re.M | re.S), result.output


def _ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt


def test_a_ctrl_c_while_the_entries_are_read_says_nothing_was_written(project):
    import bridge.review_queue as rq

    before = {p: p.read_bytes() for p in (project / "pdl1").rglob("*") if p.is_file()}
    # The second entry's results stop it (it ended with exit 130 and not a word).
    read = rq.entry_summary_from_records
    calls = []

    def stopped_at_the_second(folder, **kwargs):
        calls.append(folder)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return read(folder, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rq, "entry_summary_from_records", stopped_at_the_second)
        result = runner.invoke(app, ["review-queue", str(project), "--qupath", "never"], env={"COLUMNS": "400"})
    assert result.exit_code == 130, result.output
    said = " ".join(result.output.split())
    assert f"interrupted: the review queue was not written: {project / 'pdl1' / 'review_queue.csv'}, its " in said
    assert "review_queue.json and the entries' review metadata are as they were" in said
    assert {p: p.read_bytes() for p in (project / "pdl1").rglob("*") if p.is_file()} == before


def test_a_ctrl_c_while_the_files_are_renamed_says_the_ranks_are_mixed(project, monkeypatch):
    import bridge.review_queue as rq

    replace = rq.os.replace
    done = []

    def stopped_at_the_second_summary(src, dst):
        if Path(dst).name == "summary.json" and done:
            raise KeyboardInterrupt
        done.append(dst)
        return replace(src, dst)

    monkeypatch.setattr(rq.os, "replace", stopped_at_the_second_summary)
    result = runner.invoke(app, ["review-queue", str(project), "--qupath", "never"], env={"COLUMNS": "400"})
    assert result.exit_code == 130, result.output
    said = " ".join(result.output.split())
    assert "interrupted: some entries' review rank is the newest queue's and others' an older one's" in said
    assert f"{project / 'pdl1' / UNFINISHED_FILE} says so" in said
    assert (project / "pdl1" / UNFINISHED_FILE).is_file() and not list((project / "pdl1").rglob("*.part"))


def test_a_ctrl_c_during_qupaths_save_keeps_the_marker(project, monkeypatch):
    # Python sees a Ctrl-C when QuPath's call returns, which may be after project.qpproj was written with the new
    # ranks: the marker was removed, as if nothing had been replaced.
    import bridge.qupath

    monkeypatch.setattr(bridge.qupath, "qupath_available", lambda: (True, ""))
    monkeypatch.setattr(bridge.qupath, "read_entry_objects", lambda path, ids, **kwargs: {})
    monkeypatch.setattr(bridge.qupath, "set_entry_metadata", _ctrl_c)
    with pytest.raises(KeyboardInterrupt, match="some entries' review rank is the newest queue's"):
        write_review_queue(project)
    assert (project / "pdl1" / UNFINISHED_FILE).is_file() and not list((project / "pdl1").rglob("*.part"))
