"""Batch runs without QuPath: plain slides, projects with sidecars, failures, resume."""

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from bridge.init_project import init_project_files
from bridge.objects import is_own_object
from bridge.project import DamagedDataError, ProjectError, RunStatus, path_to_uri, read_project
from bridge.qupath_geojson import read_features
from bridge.report import write_report
from bridge.run import RunConfig, RunInterrupted, run_batch
from bridge.targets import rows_from_summary
from inference import SegmentConfig
from inference.phantom.pyramid import write_phantom
from inference.phantom.scene import PhantomSpec
from inference.pipeline import Models, PipelineConfig
from tests.helpers import JavaPathObject, paquo_stand_ins, small_phantoms
from tests.qupath_fakes import stand_in_core

SCRIPTS = Path(__file__).resolve().parents[1] / "qupath_scripts"
CONTRACT_PARENT = {
    "PD-L1: Num Tumor: Positive",
    "PD-L1: Num Tumor: Negative",
    "PD-L1: Num Other",
    "PD-L1: Predicted TPS % (H&E)",
    "PD-L1: Predicted TPS low % (H&E)",
    "PD-L1: Predicted TPS high % (H&E)",
    "PD-L1: Positive area µm^2",
    "PD-L1: Positive area %",
    "PD-L1: Predictive entropy mean",
    "PD-L1: Mutual information mean",
    "PD-L1: SUA candidates",
    "PD-L1: Uncertainty flag",
}


@pytest.fixture(scope="module")
def models():
    return Models(PipelineConfig(device="cpu"))


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    return small_phantoms(tmp_path_factory.mktemp("slides"), [(31, 60, 0.0), (32, 10, 0.0)])


def _config(**kw):
    return RunConfig(pipeline=PipelineConfig(device="cpu"), qupath="never", **kw)


def test_plain_slides_write_valid_geojson_and_a_failed_slide_does_not_stop_the_batch(tmp_path, slides, models):
    corrupt = tmp_path / "corrupt.svs"
    corrupt.write_bytes(b"not a slide")
    inputs = [slides[0], corrupt, slides[1]]
    outcomes = run_batch(inputs, _config(out=tmp_path / "out"), models=models)
    assert [o.state for o in outcomes] == ["done", "failed", "done"]
    assert "corrupt.svs: neither OpenSlide nor Pillow can read it" in outcomes[1].error  # our message, no class name
    objs = list(read_features(tmp_path / "out" / "s31.geojson"))
    parent = objs[0]
    assert parent.classification == "PD-L1 analysis" and parent.name == "PD-L1 analysis"
    assert set(parent.measurements) >= CONTRACT_PARENT
    kinds = {(o.object_type, o.classification) for o in objs[1:]}
    assert ("annotation", "PD-L1 positive") in kinds and ("tile", None) in kinds
    assert {c for t, c in kinds if t == "detection"} <= {"Tumor: Positive", "Tumor: Negative", "Other"}
    assert all(is_own_object(o.object_type, o.classification, o.name, o.measurements) for o in objs[1:])
    tile = next(o for o in objs if o.object_type == "tile")
    assert set(tile.measurements) == {
        "PD-L1 probability",
        "Predictive entropy",
        "Expected entropy",
        "Mutual information",
        "Probability std",
        "Tissue fraction",
    }
    nucleus = next(o for o in objs if o.object_type == "detection")
    assert {"Class probability", "PD-L1 positive probability"} <= set(nucleus.measurements)
    summary = json.loads((tmp_path / "out" / "s31.summary.json").read_text())
    assert "PD-L1 TPS %" not in summary["metadata"]  # an H&E's TPS is a prediction, named as one
    assert summary["metadata"]["PD-L1 Predicted TPS category (H&E)"] in (
        "<1%",
        "1-49%",
        ">=50%",
        "insufficient tumour cells",
    )
    assert summary["provenance"]["seg_model"]["sha256"] == models.seg_info.sha256


def test_the_closing_lines_give_each_review_reason_its_value_and_limit(tmp_path):
    # "c.svs: needs review: unsettled positive area (...), % of the predicted positive area" said which reason but
    # not by how much, where the summary, the report and the Groovy script give value and limit.
    from bridge.run import outcome_from_summary

    reasons = [
        {"reason": "unsettled positive area, % of the predicted positive area", "value": 175.0, "limit": 50.0},
        {"reason": "the IHC's own analysis needs review", "value": None, "limit": None},
    ]
    summary = {
        "tps_percent": 0.3, "tps_category": "<1%", "positive_area_pct": 0.1, "uncertainty_flag": True,
        "sua_candidates": 1, "run_id": "r", "details": {"review_reasons": reasons},
    }  # fmt: skip
    outcome = outcome_from_summary("1", "c.svs", summary, 1.0, (tmp_path / "g", tmp_path / "s"))
    assert outcome.review_reasons == (
        "unsettled positive area, % of the predicted positive area (175, limit 50)",
        "the IHC's own analysis needs review",
    )


def test_the_closing_lines_of_an_image_of_several_targets_give_each_flagged_targets_reasons(tmp_path):
    # The flag is the image's (any target's), the details the first target's: a TMA whose first core was fine and
    # whose third needed review said "needs review" in the table and gave no reason.
    from bridge.run import outcome_from_summary

    def target(name, state="analysed", reasons=()):
        return {"target": name, "state": state, "needs_review": bool(reasons), "review_reasons": list(reasons)}

    few = "fewer than 100 tumour cells (40, limit 100)"
    summary = {
        "tps_percent": 20.0, "tps_category": "1-49%", "positive_area_pct": 5.0, "uncertainty_flag": True,
        "sua_candidates": 0, "run_id": "r", "details": {"review_reasons": []},
        "targets": [target("A-1"), target("A-2", "missing"), target("B-1", reasons=[few]), target("B-2")],
    }  # fmt: skip
    outcome = outcome_from_summary("1", "tma.svs", summary, 1.0, (tmp_path / "g", tmp_path / "s"))
    assert outcome.review_reasons == (f"B-1: {few}",)
    # One analysed target (the others missing): its own reasons, as the summary's details have them.
    summary["targets"] = [target("A-1", reasons=[few]), target("A-2", "missing")]
    summary["details"] = {"review_reasons": [{"reason": "fewer than 100 tumour cells", "value": 40, "limit": 100}]}
    assert outcome_from_summary("1", "t", summary, 1.0, ("g", "s")).review_reasons == (few,)


def test_a_case_whose_ihc_failed_is_named_in_pairs_json_not_dropped(tmp_path, slides, models):
    # A corrupt IHC in the batch: its H&E was analysed and the case vanished from pairs.json and the run's table.
    he = Path(shutil.copy(slides[0], tmp_path / "c1_HE.svs"))
    ihc = tmp_path / "c1_IHC.svs"
    ihc.write_bytes(b"not a slide")
    outcomes = run_batch([he, ihc], _config(out=tmp_path / "out"), models=models)
    assert [o.state for o in outcomes] == ["done", "failed"]
    cases = json.loads((tmp_path / "out" / "pdl1" / "pairs.json").read_text())["cases"]
    assert list(cases) == ["c1"]
    assert cases["c1"]["why_not_compared"].startswith(
        "case 'c1' is not compared: the run failed on c1_IHC.svs (its error is in the run's table and status.json)"
    )


def test_an_image_resume_skips_keeps_the_results_its_earlier_run_recorded(tmp_path, slides, models):
    # --resume's closing table showed the skipped images' rows blank, as if their results were lost.
    out = tmp_path / "out"
    config = _config(out=out)
    first = run_batch(slides[:1], config, models=models)
    again = run_batch(slides, RunConfig(pipeline=config.pipeline, qupath="never", out=out, resume=True), models=models)
    assert [o.state for o in again] == ["skipped", "done"]
    skipped, done = again[0], first[0]
    for field in ("tps_percent", "tps_category", "positive_area_pct", "uncertainty_flag", "candidates", "run_id"):
        assert getattr(skipped, field) == getattr(done, field), field
    assert skipped.tps_percent is not None and skipped.stain == "H&E" and skipped.seconds == 0.0
    assert skipped.outputs == (str(out / "s31.geojson"), str(out / "s31.summary.json")) and skipped.error is None


def test_resume_analyses_again_an_image_done_with_other_settings(tmp_path, slides, models, caplog):
    # A run without nuclei finished both images; a run with them stopped after the first; --resume skipped the
    # second as done, keeping its results without TPS under the run with nuclei. A resume on another device or
    # batch size still skips what is done.
    out = tmp_path / "out"
    without = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="never", out=out)
    assert [o.state for o in run_batch(slides, without, models=models)] == ["done", "done"]
    with_nuclei = replace(without, pipeline=PipelineConfig(device="cpu"))
    assert [o.state for o in run_batch(slides[:1], with_nuclei, models=models)] == ["done"]  # then stopped
    with caplog.at_level("WARNING", logger="bridge.run"):
        again = run_batch(slides, replace(with_nuclei, resume=True), models=models)
    assert [o.state for o in again] == ["skipped", "done"]
    assert again[1].tps_percent is not None
    assert "s32.svs: done by an earlier run with other settings (run_nuclei); analysing it again" in caplog.text
    assert [o.state for o in run_batch(slides, without, models=models)] == ["done", "done"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="bridge.run"):  # both done with other settings: said once (helper-135)
        assert [o.state for o in run_batch(slides, replace(with_nuclei, resume=True), models=models)] == ["done"] * 2
    assert caplog.text.count("other settings") == 1 and "as every image done with them (said once)" in caplog.text
    faster = replace(
        with_nuclei, resume=True, pipeline=PipelineConfig(device="cpu", segment=SegmentConfig(batch_size=2))
    )
    assert [o.state for o in run_batch(slides, faster, models=models)] == ["skipped", "skipped"]


def test_resume_analyses_again_an_image_whose_project_now_states_another_stain_or_pixel_size(
    tmp_path, slides, models, caplog
):
    # A pathologist corrects an image type (an H&E typed H-DAB) or a pixel size in QuPath after a run: --resume
    # skipped the image, keeping results of the old path or scale. A type that states what the run used (the H&E
    # typed H&E) or none (QuPath's UNSET, which every save through QuPath writes for an untyped image) changes nothing.
    project = tmp_path / "project"
    init_project_files(project, list(slides))
    assert [o.state for o in run_batch([project], _config(), models=models)] == ["done", "done"]
    first, second = read_project(project).entries
    for entry, image_type in ((first, "UNSET"), (second, "BRIGHTFIELD_H_E")):
        (project / "data" / entry.entry_id).mkdir(parents=True, exist_ok=True)
        (project / "data" / entry.entry_id / "summary.json").write_text(json.dumps({"imageType": image_type}))
    assert [o.state for o in run_batch([project], _config(resume=True), models=models)] == ["skipped", "skipped"]
    (project / "data" / second.entry_id / "summary.json").write_text('{"imageType": "BRIGHTFIELD_H_DAB"}')
    qpproj = json.loads((project / "project.qpproj").read_text())
    calibration = qpproj["images"][0]["serverBuilder"]["metadata"]["pixelCalibration"]
    for axis in ("pixelWidth", "pixelHeight"):
        calibration[axis]["value"] = 0.6
    (project / "project.qpproj").write_text(json.dumps(qpproj))
    with caplog.at_level("WARNING", logger="bridge.run"):
        again = run_batch([project], _config(resume=True), models=models)
    assert [o.state for o in again] == ["done", "done"]
    said = " ".join(caplog.text.split())
    assert f"{first.image_name}: recorded as done by an earlier run, but its project now states 0.6 µm/px" in said
    assert (
        f"{second.image_name}: recorded as done by an earlier run, but its project now states the image type " in said
    )
    assert "BRIGHTFIELD_H_DAB (H-DAB), and its results are of H&E; analysing it again" in said


def test_project_sidecars_resume_after_a_crash_and_moved_slide(tmp_path, slides, models):
    project = tmp_path / "project"
    work = tmp_path / "work"
    work.mkdir()
    copies = [Path(shutil.copy(s, work / s.name)) for s in slides]
    for s in slides:
        shutil.copytree(s.with_name(s.stem + ".truth"), work / (s.stem + ".truth"))
    moved = work / "moved.svs"
    shutil.copy(slides[0], moved)
    init_project_files(project, [*copies, moved])
    moved.unlink()

    calls = {"n": 0}

    def crash_in_second_image(done, total):
        if calls.setdefault("image", 0) == 1 and done > 0:
            raise KeyboardInterrupt
        calls["n"] += 1

    def on_image(i, n, name):
        calls["image"] = i

    with pytest.raises(RunInterrupted) as stop:  # a KeyboardInterrupt, carrying what was done before it
        run_batch([project], _config(), models=models, on_image=on_image, on_tiles=crash_in_second_image)
    assert [(o.key, o.state) for o in stop.value.outcomes] == [("1", "done")]
    assert (stop.value.stopped, stop.value.total) == (slides[1].name, 3)
    status = RunStatus(project)
    assert status.is_done("1") and not status.is_done("2")
    assert not (project / "pdl1" / "2" / "objects.geojson").exists()  # nothing half-written

    outcomes = run_batch([project], _config(resume=True), models=models)
    assert [o.state for o in outcomes] == ["skipped", "done", "failed"]
    assert "has moved" in outcomes[2].error
    for entry in ("1", "2"):
        objs = list(read_features(project / "pdl1" / entry / "objects.geojson"))
        assert objs[0].classification == "PD-L1 analysis"
    html_path, csv_path = write_report(project)
    assert "s31.svs" in html_path.read_text() and csv_path.read_text().count("\n") == 4
    # The moved slide, which has no results, has a row with the run's error and no numbers.
    moved_row = csv_path.read_text().splitlines()[3]
    assert moved_row.startswith("moved.svs,3,,,") and "has moved" in moved_row
    assert "Demo models." in html_path.read_text()  # Models(...) without folders: the shipped demos
    assert [p.name for p in html_path.parent.glob("*s31.jpg")] == ["1-s31.jpg"]  # named by its QuPath entry too


def test_a_project_summary_s_provenance_lists_the_script_s_records_found_beside_it(tmp_path, slides, models):
    # The service that saved the records may run on a machine whose clock is ahead of the batch machine's: a record
    # stamped after the summary was there before it, and the summary says so (older whatever the clocks say).
    from datetime import datetime, timedelta, timezone

    from bridge.analysis_record import RecordOrder, RunOrder, record_is_newer, record_path

    project = tmp_path / "project"
    init_project_files(project, [slides[1]])
    ahead = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    record_path(project / "pdl1" / "1", "p1").parent.mkdir(parents=True)
    record_path(project / "pdl1" / "1", "p1").write_text(json.dumps({"written_at": ahead}))
    record_path(project / "pdl1" / "1", "p2").write_text("{")  # there, but its time does not read
    (outcome,) = run_batch([project], _config(), models=models)
    assert outcome.state == "done", outcome.error
    summary = json.loads((project / "pdl1" / "1" / "summary.json").read_text())
    assert summary["provenance"]["after_analyses"] == {"p1": ahead, "p2": None}
    run = RunOrder.of_summary(summary)
    assert run.analysed_at < datetime.fromisoformat(ahead)
    assert not record_is_newer(RecordOrder("p1", datetime.fromisoformat(ahead)), run)


def test_a_study_folder_moved_to_a_server_runs_and_says_where_its_slides_were_found(tmp_path, slides, models, caplog):
    study = tmp_path / "study"
    (study / "slides").mkdir(parents=True)
    shutil.copy(slides[0], study / "slides" / "s31.svs")
    init_project_files(study / "project", [study / "slides" / "s31.svs"])
    server = tmp_path / "server"
    server.mkdir()
    study.rename(server / "study")
    with caplog.at_level("WARNING", logger="bridge.run"):
        (outcome,) = run_batch([server / "study" / "project"], _config(), models=models)
    assert outcome.state == "done"
    summary = json.loads((server / "study" / "project" / "pdl1" / "1" / "summary.json").read_text())
    assert summary["image"] == str(server / "study" / "slides" / "s31.svs")
    assert "1 of 1 images are not where the project says" in caplog.text and "Check project URIs" in caplog.text


def test_entries_whose_file_is_not_the_image_qupath_shows_fail_alone(tmp_path, slides, models):
    project = tmp_path / "project"
    init_project_files(project, [slides[0], slides[0], slides[1]])
    qpproj = project / "project.qpproj"
    raw = json.loads(qpproj.read_text())
    # entry 2: rotated in QuPath; entry 3: QuPath states another size (as for one scene of a multi-image file)
    raw["images"][1]["serverBuilder"] = {
        "builderType": "rotated",
        "rotation": "ROTATE_180",
        "builder": raw["images"][1]["serverBuilder"],
    }
    raw["images"][2]["serverBuilder"]["metadata"]["width"] = 1024
    qpproj.write_text(json.dumps(raw))
    outcomes = run_batch([project], _config(), models=models)
    assert [o.state for o in outcomes] == ["done", "failed", "failed"]
    assert "rotated (ROTATE_180)" in outcomes[1].error and "wrong place" in outcomes[1].error
    assert "QuPath shows this image at 1024 x 1536 px, but the file opens here at 1536 x 1536 px" in outcomes[2].error
    assert not (project / "pdl1" / "2").exists() and not (project / "pdl1" / "3" / "objects.geojson").exists()


def test_the_pixel_size_set_in_qupath_is_used_and_mpp_overrides_it(tmp_path, slides, models):
    project = tmp_path / "project"
    init_project_files(project, [slides[0]])  # the file states 0.5 µm/px
    qpproj = project / "project.qpproj"
    raw = json.loads(qpproj.read_text())
    calibration = raw["images"][0]["serverBuilder"]["metadata"]["pixelCalibration"]
    calibration["pixelWidth"]["value"] = calibration["pixelHeight"]["value"] = 0.25  # as "Set pixel size" saves it
    qpproj.write_text(json.dumps(raw))

    def mpp_of_run(config: RunConfig) -> float:
        (outcome,) = run_batch([project], config, models=models)
        assert outcome.state == "done", outcome.error
        return json.loads((project / "pdl1" / "1" / "summary.json").read_text())["mpp"]

    assert mpp_of_run(_config()) == pytest.approx(0.25)
    assert mpp_of_run(RunConfig(pipeline=PipelineConfig(device="cpu", mpp=0.4), qupath="never")) == pytest.approx(0.4)


def test_a_project_with_no_images_is_refused_as_nothing_to_analyse(tmp_path, models):
    (tmp_path / "project.qpproj").write_text(json.dumps({"version": "0.4.4", "images": []}))
    with pytest.raises(ProjectError, match=r"project\.qpproj: the project has no images, so there is nothing"):
        run_batch([tmp_path], _config(), models=models)
    assert not (tmp_path / "pdl1").exists()


def test_a_project_file_without_images_is_not_taken_for_an_empty_project(tmp_path, models):
    (tmp_path / "project.qpproj").write_text("{}")
    with pytest.raises(ProjectError, match=r"not a QuPath project: it has no 'images' key"):
        run_batch([tmp_path], _config(), models=models)


def test_an_entry_without_a_server_builder_fails_alone(tmp_path, slides, models):
    project = tmp_path / "project"
    init_project_files(project, [slides[0], slides[1]])
    qpproj = project / "project.qpproj"
    raw = json.loads(qpproj.read_text())
    del raw["images"][0]["serverBuilder"]
    qpproj.write_text(json.dumps(raw))
    config = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="never")
    outcomes = run_batch([project], config, models=models)
    assert [(o.name, o.state) for o in outcomes] == [("s31.svs", "failed"), ("s32.svs", "done")]
    assert "image #1 (s31.svs) lacks 'serverBuilder'" in outcomes[0].error
    assert "add the image again" in outcomes[0].error
    assert not RunStatus(project).is_done("1") and RunStatus(project).is_done("2")


def test_an_unreadable_entry_is_counted_from_1_as_a_person_counts_the_images(tmp_path, slides, models):
    # The second image of the list was named "image #1", in the error, the closing table and the run's status.
    project = tmp_path / "project"
    init_project_files(project, [slides[0], slides[1]])
    qpproj = project / "project.qpproj"
    raw = json.loads(qpproj.read_text())
    raw["images"][1] = None
    qpproj.write_text(json.dumps(raw))
    config = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="never")
    outcomes = run_batch([project], config, models=models)
    assert [(o.name, o.state) for o in outcomes] == [("s31.svs", "done"), ("image #2", "failed")]
    assert f"{qpproj}: image #2 is malformed" in outcomes[1].error
    assert set(json.loads((project / "pdl1" / "status.json").read_text())["images"]) == {"1", "#2"}


def test_an_entry_id_naming_another_folder_fails_alone_and_nothing_is_written_outside(tmp_path, slides, models):
    # entryID "../../escaped" had its results written two folders above the project.
    project = tmp_path / "a" / "b" / "project"
    init_project_files(project, [slides[0], slides[1]])
    qpproj = project / "project.qpproj"
    raw = json.loads(qpproj.read_text())
    raw["images"][0]["entryID"] = "../../escaped"
    qpproj.write_text(json.dumps(raw))
    config = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="never")
    outcomes = run_batch([project], config, models=models)
    assert [(o.name, o.state) for o in outcomes] == [("s31.svs", "failed"), ("s32.svs", "done")]
    assert 'has entryID "../../escaped", not the whole number QuPath writes' in outcomes[0].error
    assert not (tmp_path / "a" / "escaped").exists() and not (project / "escaped").exists()
    assert sorted(p.name for p in (project / "pdl1").iterdir() if p.is_dir()) == ["2"]


def test_out_with_a_project_is_refused_not_ignored(tmp_path, slides, models):
    # The results went into the project while --out named another folder (and --report looked for them there).
    project = tmp_path / "project"
    init_project_files(project, [slides[0]])
    with pytest.raises(ProjectError) as err:
        run_batch([project], _config(out=tmp_path / "out"), models=models)
    assert str(err.value) == (
        f"--out {tmp_path / 'out'}: a project's results are written into the project ({project / 'pdl1'} and its "
        "images' data), so --out is for plain slides only; leave it out, or give the slide files themselves with "
        "--out (`pdl1 report PROJECT --out DIR` puts the report elsewhere)"
    )
    assert not (project / "pdl1").exists() and not (tmp_path / "out").exists()


def test_annotation_targets_need_qupath(tmp_path, slides, models):
    with pytest.raises(ProjectError, match="need a QuPath project"):
        run_batch([slides[0]], _config(out=tmp_path, target_classes=("Tumor",)), models=models)


def test_plain_slides_need_out(slides, models):
    with pytest.raises(ProjectError, match="--out"):
        run_batch([slides[0]], _config(), models=models)


def test_import_script_uses_the_same_names_as_the_writer():
    script = (SCRIPTS / "pdl1_import_results.groovy").read_text()
    from bridge.objects import OWN_ANNOTATION_SIGNATURE, OWN_DETECTION_SIGNATURE, TILE_NAME

    for needle in (
        OWN_ANNOTATION_SIGNATURE,
        OWN_DETECTION_SIGNATURE,
        TILE_NAME,
        "PD-L1 analysis",
        "PD-L1 positive",
        "PD-L1 FN candidate",
        "Tumor: Positive",
        "Tumor: Negative",
        '"pdl1"',
        "objects.geojson",
        "summary.json",
    ):
        assert needle in script, needle
    # Only scripting API that works on QuPath 0.4.4 to 0.6 (DESIGN.md §5).
    for banned in (
        "parseObjectsFromGeoJSON",
        "setClassification",
        "getClassification",
        "removeObject(",
        "removeAllObjects",
        "removeDetections",
        "removeAnnotations",
        "getLogger",
        "addPathObjects",
        "putMeasurement",
    ):
        assert banned not in script, banned
    assert re.search(r"removeObjects\([^,]+, true\)", script)


def test_a_report_of_nothing_is_refused_and_writes_nothing(tmp_path):
    with pytest.raises(ProjectError, match="no such project"):
        write_report(tmp_path / "typo")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProjectError, match="pdl1 run PROJECT"):
        write_report(tmp_path / "empty")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["empty"]


def test_resume_runs_again_an_image_of_several_targets_whose_target_regions_json_is_damaged(
    tmp_path, slides, models, caplog
):
    # Every target's output is what the report, review-queue and --from-review read; a damaged one was kept by
    # --resume, and each of them then told the user to run the image again without --resume.
    out = tmp_path / "out"
    config = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="never", out=out)
    assert [o.state for o in run_batch(slides[:1], config, models=models)] == ["done"]
    summary_path = out / "s31.summary.json"
    summary = json.loads(summary_path.read_text())
    (row,) = summary["targets"]
    summary["targets"] = [{**row, "target": "A-1"}, {**row, "target": "A-2"}]  # as a run of two TMA cores
    summary_path.write_text(json.dumps(summary))
    resume = RunConfig(pipeline=config.pipeline, qupath="never", out=out, resume=True)
    # Without the file: a run of an earlier version, whose results stand.
    assert [o.state for o in run_batch(slides[:1], resume, models=models)] == ["skipped"]
    (out / "s31.target_regions.json").write_text('{"run_id": "r", "targets": [')  # a kill mid-write
    with caplog.at_level("WARNING", logger="bridge.run"):
        again = run_batch(slides[:1], resume, models=models)
    assert [o.state for o in again] == ["done"]
    assert re.search(r"s31\.svs: recorded as done .*s31\.target_regions\.json does not read \(", caplog.text)


def test_resume_runs_again_a_done_image_whose_files_were_damaged_and_says_why(tmp_path, slides, models, caplog):
    out = tmp_path / "out"
    config = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="never", out=out)
    assert [o.state for o in run_batch(slides, config, models=models)] == ["done", "done"]
    (out / "s31.geojson").write_text('{"type":"FeatureCollection","features":[\n{"type":')  # a kill mid-write
    (out / "s32.summary.json").unlink()
    resume = RunConfig(pipeline=config.pipeline, qupath="never", out=out, resume=True)
    with caplog.at_level("WARNING", logger="bridge.run"):
        again = run_batch(slides, resume, models=models)
    assert [o.state for o in again] == ["done", "done"]
    assert re.search(r"s31\.svs: recorded as done by an earlier run, but .*s31\.geojson does not read", caplog.text)
    assert re.search(r"s32\.svs: recorded as done .*/s32\.summary\.json is missing; analysing it again", caplog.text)
    assert len(list(read_features(out / "s31.geojson"))) > 1
    caplog.clear()
    begun = []  # on_image: the images analysed, not those skipped (a progress bar of skips alone stayed empty)
    with caplog.at_level("WARNING", logger="bridge.run"):
        again = run_batch(slides, resume, models=models, on_image=lambda *image: begun.append(image))
    assert [o.state for o in again] == ["skipped", "skipped"] and begun == []
    assert "recorded as done" not in caplog.text
    (out / "s32.summary.json").write_text("[]")  # reads as JSON, but is no summary: pdl1 report leaves it out
    with caplog.at_level("WARNING", logger="bridge.run"):
        again = run_batch(slides, resume, models=models, on_image=lambda *image: begun.append(image))
    assert [o.state for o in again] == ["skipped", "done"] and begun == [(1, 2, "s32.svs")]
    assert re.search(r"s32\.svs: recorded as done .*s32\.summary\.json is not a pdl1 summary", caplog.text)


def test_resume_knows_a_geojson_whole_by_its_recorded_size_without_parsing_it(tmp_path, slides, models, monkeypatch):
    # helper-135: --resume parsed every finished image's whole GeoJSON (a slide's nuclei: seconds and hundreds of MB
    # each) before analysing anything new. status.json keeps its size as written; a copy cut short has another.
    import bridge.run

    out = tmp_path / "out"
    config = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="never", out=out)
    run_batch(slides[:1], config, models=models)
    status = json.loads((out / "pdl1" / "status.json").read_text())
    assert status["images"]["s31"]["geojson_bytes"] == (out / "s31.geojson").stat().st_size
    parsed = []
    real = bridge.run.json.loads
    monkeypatch.setattr(bridge.run.json, "loads", lambda text, *a, **k: parsed.append(text[:40]) or real(text, *a, **k))
    resume = RunConfig(pipeline=config.pipeline, qupath="never", out=out, resume=True)
    assert [o.state for o in run_batch(slides[:1], resume, models=models)] == ["skipped"]
    assert not any("FeatureCollection" in text for text in parsed)
    data = (out / "s31.geojson").read_bytes()
    (out / "s31.geojson").write_bytes(data[: len(data) // 2])  # as an interrupted copy leaves it
    assert [o.state for o in run_batch(slides[:1], resume, models=models)] == ["done"]
    # A copy that sets the full size first and stops leaves its end zeroed, at the recorded size (helper-137).
    data = (out / "s31.geojson").read_bytes()
    (out / "s31.geojson").write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))
    assert [o.state for o in run_batch(slides[:1], resume, models=models)] == ["done"]
    # One that copies parts in parallel and stops leaves a zeroed hole inside, its ends whole.
    data = (out / "s31.geojson").read_bytes()
    hole = slice(len(data) // 3, len(data) // 3 + len(data) // 8)
    (out / "s31.geojson").write_bytes(data[: hole.start] + bytes(hole.stop - hole.start) + data[hole.stop :])
    assert [o.state for o in run_batch(slides[:1], resume, models=models)] == ["done"]
    assert [o.state for o in run_batch(slides[:1], resume, models=models)] == ["skipped"]  # written whole again


def test_a_damaged_run_status_stops_a_resume_and_is_set_aside_by_a_run_without_it(tmp_path, slides, models, caplog):
    # A run that resumes nothing was refused with "delete it" too, though it analyses every image anyway.
    out = tmp_path / "out"
    status = out / "pdl1" / "status.json"
    status.parent.mkdir(parents=True)
    status.write_text('{"images": {"s31": {"state": "do')  # cut short
    config = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="never", out=out)
    with pytest.raises(ProjectError, match=r"unreadable run status .*run without --resume to start over"):
        run_batch(slides, replace(config, resume=True), models=models)
    assert status.read_text() == '{"images": {"s31": {"state": "do'  # left as it was
    with caplog.at_level("WARNING", logger="bridge.project"):
        assert [o.state for o in run_batch(slides, config, models=models)] == ["done", "done"]
    (aside,) = status.parent.glob("status.json.damaged-*")
    assert aside.read_text() == '{"images": {"s31": {"state": "do'  # kept, not lost
    assert f"set aside as {aside}" in caplog.text
    assert set(json.loads(status.read_text())["images"]) == {"s31", "s32"}


def test_orphan_part_files_of_a_killed_run_are_removed_from_its_own_folders_only(tmp_path, caplog):
    out = tmp_path / "out"
    corrupt = tmp_path / "c.svs"
    corrupt.write_bytes(b"not a slide")
    orphans = [
        out / "c.geojson.0123456789ab.part",
        out / "pdl1" / "status.json.a1b2c3d4e5f6.part",
        out / "pdl1" / "7" / "objects.geojson.bbbbbbbbbbbb.part",
    ]
    kept = [
        out / "notes.part",  # not a name bridge.atomic makes
        out / "elsewhere" / "x.geojson.dddddddddddd.part",  # not where a plain-slides run writes
        out / "pdl1" / "report" / "report.html.cccccccccccc.part",  # pdl1 report's, which takes no lock
    ]
    for path in orphans + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("half")
    with caplog.at_level("WARNING", logger="bridge.run_lock"):
        (outcome,) = run_batch([corrupt], _config(out=out))
    assert outcome.state == "failed"
    assert [p for p in orphans if p.exists()] == []
    assert all(p.exists() for p in kept)
    assert "removed 3 unfinished file(s) an interrupted run left" in caplog.text


def test_a_projects_orphans_include_backup_copies_and_stale_lock_holders(tmp_path):
    import os
    import time

    from bridge.run_lock import remove_orphan_parts

    project = tmp_path / "project"
    orphans = [
        project / "data" / "3" / "data.qpdata.pdl1-backup.0123456789ab.part",  # a backup being copied
        project / "data" / "3" / "data.qpdata.abcdefabcdef.part",  # a restore being copied
        project / "pdl1" / "run.lock.4242.0a1b2c3d.tmp",  # a holder written, never linked (a minute old)
    ]
    kept = [
        project / "data" / "3" / "server.json.0123456789ab.part",  # not a file pdl1 copies there
        project / "pdl1" / "run.lock.4343.0a1b2c3d.tmp",  # another run's, written this instant
        project / "data.qpdata.0123456789ab.part",  # not in an entry's folder
    ]
    for path in orphans + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("half")
    old = time.time() - 120
    os.utime(orphans[2], (old, old))
    assert sorted(remove_orphan_parts(project, plain_slides=False)) == sorted(orphans)
    assert all(p.exists() for p in kept)


def _save_of_entry_1_raises(monkeypatch, error: BaseException) -> None:
    """QuPath's save of entry 1's data raises ``error`` (a full disk, a Ctrl-C); the other entries save."""
    from bridge import qupath

    save = qupath.save_entries

    def save_entries(entries):
        if [e.entry_id for e in entries] == ["1"]:
            raise error
        save(entries)

    monkeypatch.setattr(qupath, "save_entries", save_entries)


DISK_FULL = ProjectError("s31.svs: QuPath could not save its data (the disk is full)")


def test_through_qupath_an_entry_whose_save_fails_keeps_its_metadata_as_it_was(
    tmp_path, slides, models, fake_qupath, monkeypatch
):
    # Its data was restored from the backup, but its metadata, set on QuPath's entry before the save, stayed: the
    # run's next project save wrote the failed image's TPS into project.qpproj beside its old objects.

    project = tmp_path / "project"
    init_project_files(project, [slides[0], slides[1]])
    raw = json.loads((project / "project.qpproj").read_text())
    earlier = {"case": "A", "PD-L1 TPS %": "12.0", "PD-L1 TPS category": "1-49%"}
    raw["images"][0]["metadata"] = earlier
    (project / "project.qpproj").write_text(json.dumps(raw))
    _save_of_entry_1_raises(monkeypatch, DISK_FULL)
    config = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="always")
    outcomes = run_batch([project], config, models=models)
    assert [o.state for o in outcomes] == ["failed", "done"]
    first, second = read_project(project).entries
    assert first.metadata == earlier
    assert second.metadata["PD-L1 run"] == outcomes[1].run_id


def test_through_qupath_each_entry_read_is_let_go_once_saved_put_back_or_failed(
    tmp_path, slides, models, fake_qupath, monkeypatch
):
    # paquo keeps what QuPath read of an entry (its ImageData and hierarchy: every object) until the project closes,
    # so a batch held every image in the JVM. Each is let go as it ends: saved (2), put back after a failed save (1),
    # or failed before anything was written (3: its targets did not read).
    from bridge import qupath

    project = tmp_path / "project"
    init_project_files(project, [slides[0], slides[1], slides[0]])
    save, targets = qupath.save_entries, qupath.annotation_targets

    def save_entries(entries):
        (entry,) = entries
        assert fake_qupath["let_go"] == [str(n) for n in range(1, int(entry.entry_id))]  # this one after its save
        if entry.entry_id == "1":
            raise ProjectError("s31.svs: QuPath could not save its data (the disk is full)")
        save(entries)

    def annotation_targets(entry, **kwargs):
        if entry.entry_id == "3":
            raise ProjectError("s31.svs: its annotations do not read")
        return targets(entry, **kwargs)

    monkeypatch.setattr(qupath, "save_entries", save_entries)
    monkeypatch.setattr(qupath, "annotation_targets", annotation_targets)
    config = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="always")
    outcomes = run_batch([project], config, models=models)
    assert [o.state for o in outcomes] == ["failed", "done", "failed"]
    assert fake_qupath["let_go"] == ["1", "2", "3"]


def test_letting_an_entry_go_drops_what_paquo_cached_of_it():
    from functools import cached_property

    from bridge import qupath

    class Entry:  # paquo 0.9's QuPathProjectImageEntry caches its data as these (images.py)
        reads = 0

        @cached_property
        def hierarchy(self):
            Entry.reads += 1
            return object()

        @cached_property
        def _image_data(self):
            return object()

    entry = Entry()
    first = entry.hierarchy
    assert entry.hierarchy is first and Entry.reads == 1
    entry._image_data  # noqa: B018
    qupath.let_go(entry)
    assert vars(entry) == {}
    assert entry.hierarchy is not first and Entry.reads == 2  # read again on the next access
    qupath.let_go(entry)
    qupath.let_go(entry)  # nothing cached: nothing to drop


def test_through_qupath_a_damaged_entry_keeps_its_backup_and_resume_checks_what_it_skips(
    tmp_path, slides, models, fake_qupath, caplog
):
    project = tmp_path / "project"
    init_project_files(project, [slides[0], slides[1], slides[0]])
    data = project / "data" / "1" / "data.qpdata"
    data.write_bytes(fake_qupath["qpdata"])  # the pathologist's annotations
    config = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="always")
    first = run_batch([project], config, models=models)
    assert [o.state for o in first] == ["done", "done", "done"]
    # project.qpproj is saved once for the run, not after every image
    assert fake_qupath["projects"][0].saves == 1
    assert [e.metadata["PD-L1 run"] for e in read_project(project).entries] == [o.run_id for o in first]
    backup = data.with_name("data.qpdata.pdl1-backup")
    assert backup.read_bytes() == fake_qupath["qpdata"]

    data.write_bytes(b"")  # killed while QuPath saved entry 1
    raw = json.loads((project / "project.qpproj").read_text())
    raw["images"][1]["metadata"] = {}  # killed before project.qpproj took entry 2's metadata
    (project / "project.qpproj").write_text(json.dumps(raw))
    fake_qupath["read"].clear()
    with caplog.at_level("WARNING", logger="bridge.run"):
        again = run_batch([project], RunConfig(pipeline=config.pipeline, qupath="always", resume=True), models=models)
    assert [o.state for o in again] == ["failed", "done", "skipped"]
    assert "s31.svs: recorded as done by an earlier run, but its QuPath data" in caplog.text
    assert "it is empty (0 bytes); analysing it again" in caplog.text
    assert "s32.svs: recorded as done by an earlier run, but project.qpproj was not saved after it" in caplog.text
    assert "is damaged, it is empty (0 bytes)" in again[0].error
    assert f"the pdl1 backup {backup}" in again[0].error and f"`cp '{backup}' '{data}'`" in again[0].error
    assert backup.read_bytes() == fake_qupath["qpdata"]  # the good backup survives
    assert data.read_bytes() == b"" and fake_qupath["read"] == ["2"]  # QuPath never read the damaged file

    # Cut short after a whole header: QuPath would read it as an empty image (or its own .backup) and raise nothing,
    # so the end is checked before QuPath reads it, and it is not backed up.
    good = fake_qupath["qpdata"]
    data.write_bytes(good[: len(good) // 2])
    (cut,) = run_batch([project], RunConfig(pipeline=config.pipeline, qupath="always"), models=models)[:1]
    assert cut.state == "failed" and "is damaged, it is cut short" in cut.error
    assert f"`cp '{backup}' '{data}'`" in cut.error
    assert backup.read_bytes() == good and data.read_bytes() == good[: len(good) // 2]


def test_through_qupath_a_rerun_removes_the_entry_metadata_of_the_earlier_run_it_does_not_write(
    tmp_path, slides, models, fake_qupath
):
    # After the stain was corrected (run as an IHC, then as the H&E it is), the entry kept the IHC's TPS, category,
    # CPS and stain beside the H&E's predicted TPS. Keys this tool does not write as a run's result stay.
    project = tmp_path / "project"
    init_project_files(project, [slides[0]])
    theirs = {"case": "B12", "PD-L1 TPS (pathologist)": "40", "PD-L1 review rank": "3"}
    earlier = {"PD-L1 TPS %": "55.0", "PD-L1 TPS category": ">=50%", "PD-L1 CPS": "60.0", "PD-L1 stain": "H-DAB"}
    raw = json.loads((project / "project.qpproj").read_text())
    raw["images"][0]["metadata"] = {**theirs, **earlier, "PD-L1 run": "earlier"}
    (project / "project.qpproj").write_text(json.dumps(raw))
    config = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="always", stain="H&E")
    (done,) = run_batch([project], config, models=models)
    assert done.state == "done", done.error
    metadata = read_project(project).entries[0].metadata
    assert {k: metadata[k] for k in theirs} == theirs
    assert not set(earlier) & set(metadata), metadata
    assert metadata["PD-L1 run"] == done.run_id
    # Run without nuclei: no TPS, so no TPS key (an empty one reads as a fault in QuPath's Project > metadata).
    assert set(metadata) == set(theirs) | {"PD-L1 model", "PD-L1 run"}


SERVER_URI = "https://omero.example.org/webclient/?show=image-7"
NOT_A_FILE = (
    "only file: image URIs can be analysed (a file on this machine or a mounted share), got "
    f"'{SERVER_URI}'; for an image QuPath opens from a server (OMERO, a web address), export it from QuPath (File > "
    "Export images... > OME TIFF) and add that file to the project instead"
)


def _server_entry(entry_path: Path, uris: list[str], **kwargs):
    """A paquo entry of an image QuPath does not open from one file: paquo's ``is_readable`` reads the file through
    ``ImageProvider.path_from_uri(entry.uri)``, whose ``_normalize_pathlib_uris`` raises ValueError for a URI that is
    not ``file:``, and ``entry.uri`` raises NotImplementedError for several (paquo 0.9, images.py); its Java entry's
    ``getURIs`` lists them."""
    from types import SimpleNamespace

    def is_readable() -> bool:
        if len(uris) > 1:
            raise NotImplementedError("unsupported in paquo as of now")
        if uris[0].startswith("file:"):  # one Java's URI class cannot rebuild
            raise ValueError(f"uri syntax error '{uris[0]}'")
        raise ValueError(f"uri unsupported scheme '{uris[0]}'")

    java = SimpleNamespace(getURIs=lambda: [SimpleNamespace(toString=lambda u=u: u) for u in uris])
    return SimpleNamespace(entry_path=entry_path, is_readable=is_readable, java_object=java, **kwargs)


@pytest.mark.parametrize(
    ("uris", "says"),
    [
        ([SERVER_URI], f"image of entry 2 (b.svs): {NOT_A_FILE}"),
        (
            ["file:/slides/b-1.tif", "file:/slides/b-2.tif"],
            "image of entry 2 (b.svs): QuPath makes the image of 2 files (file:/slides/b-1.tif, file:/slides/b-2.tif), "
            "and pdl1 reads one file; export the image from QuPath (File > Export images... > OME TIFF) and add that "
            "file to the project instead",
        ),
        (
            ["file://scanner:port/b.svs"],
            "image of entry 2 (b.svs): QuPath's URI of it, 'file://scanner:port/b.svs', does not read as a file path "
            "(uri syntax error 'file://scanner:port/b.svs'); point the entry at its file again in QuPath (File > "
            "Project... > Check project URIs)",
        ),
    ],
    ids=["a server's image", "several files", "a file URI paquo cannot parse"],
)
def test_an_entry_paquo_reads_no_file_of_is_named_with_the_fix_not_paquos_error(tmp_path, uris, says):
    # paquo's own error ("uri unsupported scheme 'https://...'", "unsupported in paquo as of now") came through the
    # run as the image's: no entry, no fix. bridge.project says what to do for such an entry where QuPath is not used.
    from bridge import qupath

    entry = _server_entry(tmp_path, uris, entry_id="2", image_name="b.svs")
    with pytest.raises(ProjectError) as err:
        qupath.backup_data(entry)  # the first thing a run through QuPath asks of an entry's image
    assert str(err.value) == says
    assert isinstance(err.value.__cause__, ValueError if len(uris) == 1 else NotImplementedError)


def test_through_qupath_an_entry_of_a_servers_image_fails_alone_named_with_the_fix(
    tmp_path, slides, models, fake_qupath, monkeypatch
):
    # paquo reads the entry as QuPath holds it (its server builder's URIs), here relinked in QuPath to an OMERO
    # server's image after the run read project.qpproj: only that image fails, saying what bridge.project says of it.
    from contextlib import contextmanager

    from bridge import qupath

    project = tmp_path / "project"
    init_project_files(project, [slides[0], slides[1]])
    opened = qupath.open_project

    @contextmanager
    def open_project(path, *, mode="r+"):
        with opened(path, mode=mode) as fake:
            second = fake.images[1]
            fake.images[1] = _server_entry(
                second.entry_path, [SERVER_URI], entry_id=second.entry_id, image_name=second.image_name,
                metadata=second.metadata,
            )  # fmt: skip
            yield fake

    monkeypatch.setattr(qupath, "open_project", open_project)
    done, failed = run_batch(
        [project], RunConfig(pipeline=PipelineConfig(device="cpu"), qupath="always"), models=models
    )
    assert done.state == "done", done.error
    assert (failed.state, failed.error) == ("failed", f"image of entry 2 ({slides[1].name}): {NOT_A_FILE}")
    # Where QuPath's entry says so as the run reads project.qpproj, it fails before QuPath is asked, saying the same.
    raw = json.loads((project / "project.qpproj").read_text())
    raw["images"][1]["serverBuilder"]["uri"] = SERVER_URI
    (project / "project.qpproj").write_text(json.dumps(raw))
    monkeypatch.setattr(qupath, "open_project", opened)
    config = RunConfig(pipeline=PipelineConfig(device="cpu"), qupath="always", resume=True)
    skipped, failed = run_batch([project], config, models=models)
    assert skipped.state == "skipped" and failed.error == f"image of entry 2 ({slides[1].name}): {NOT_A_FILE}"


def test_a_backup_is_only_replaced_by_a_copy_that_reads_back_whole(tmp_path, fixtures_dir, monkeypatch):
    from types import SimpleNamespace

    from bridge import qupath

    good = next((fixtures_dir / "qupath-0.4.4-labels" / "project" / "data").glob("*/data.qpdata")).read_bytes()
    entry = SimpleNamespace(  # QuPath read it
        entry_path=tmp_path, image_name="he-1357.svs", hierarchy=object(), is_readable=lambda: True
    )
    data = tmp_path / "data.qpdata"
    data.write_bytes(good)
    backup = qupath.backup_data(entry)
    assert backup.read_bytes() == good
    # The last one cut short by a kill during QuPath's save: QuPath reads it (as an empty image) without raising.
    for damaged in (b"", b"\xac\xed", b"PK\x03\x04 a zip, not QuPath data", good[: len(good) // 2]):
        data.write_bytes(damaged)
        with pytest.raises(DamagedDataError, match=rf"is damaged.*the pdl1 backup {backup} .* is whole"):
            qupath.backup_data(entry)
        assert backup.read_bytes() == good
    qupath.restore_data(entry, backup)
    assert data.read_bytes() == good

    data.write_bytes(good[:-106] + b"\x00" * 100 + good[-6:])  # a newer state, copied onto a full disk:
    monkeypatch.setattr(qupath.shutil, "copy2", lambda src, dst: Path(dst).write_bytes(Path(src).read_bytes()[:9]))
    with pytest.raises(ProjectError, match=r"did not read back whole \(it has 9 bytes of \d+\).*left as it was"):
        qupath.backup_data(entry)
    assert backup.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == [
        "data.qpdata",
        "data.qpdata.pdl1-backup",
    ]


def test_reading_objects_through_qupath_refuses_damaged_data_before_qupath_reads_any(
    tmp_path, fixtures_dir, monkeypatch
):
    """Read-only, paquo reads data.qpdata with PathIO.readHierarchy, whose loop catches the EOFException of a file
    cut short and reads on for ever (PathIO.java v0.4.4:684-719, v0.6.0:742-778): `pdl1 labels` hung."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    from bridge import qupath

    good = next((fixtures_dir / "qupath-0.4.4-labels" / "project" / "data").glob("*/data.qpdata")).read_bytes()
    read = []

    class Entry:
        def __init__(self, entry_id: str, content: bytes | None):
            self.entry_id, self.image_name = entry_id, f"slide-{entry_id}.svs"
            self.entry_path = tmp_path / "data" / entry_id
            self.entry_path.mkdir(parents=True)
            if content is not None:
                (self.entry_path / "data.qpdata").write_bytes(content)

        @property
        def hierarchy(self):
            if qupath.qpdata_problem(self.entry_path / "data.qpdata") not in (None, "it is missing"):
                raise AssertionError(f"QuPath reads entry {self.entry_id}'s cut-short data.qpdata for ever")
            read.append(self.entry_id)
            grid = SimpleNamespace(getTMAGrid=lambda: None)  # no TMA grid (PathObjectHierarchy.getTMAGrid(): null)
            return SimpleNamespace(annotations=[], detections=[], java_object=grid)

    entries = [Entry("1", good), Entry("2", good[: len(good) // 2]), Entry("3", None), Entry("4", good[:-1])]

    @contextmanager
    def open_project(path, *, mode="r+"):
        assert mode == "r"
        yield SimpleNamespace(images=entries)

    monkeypatch.setattr(qupath, "open_project", open_project)
    counted = []
    got = qupath.read_entry_objects(tmp_path, ["1", "3"], on_progress=lambda done, total: counted.append((done, total)))
    assert got == {"1": [], "3": []}  # no data.qpdata: none saved yet
    assert counted == [(0, 2), (1, 2), (2, 2)]  # the entries read (pdl1 review-queue's bar through QuPath)
    with pytest.raises(
        ProjectError, match=r"2 entries' QuPath data is damaged:\nslide-2.svs: .* is damaged, it is cut"
    ):
        qupath.read_entry_objects(tmp_path)
    with pytest.raises(DamagedDataError, match=r"slide-4.svs: .*data.qpdata is damaged, it is cut short"):
        qupath.read_entry_objects(tmp_path, ["1", "4"])
    assert read == ["1", "3"]  # refused before QuPath read any of them


@pytest.mark.parametrize(
    "error",
    [
        ValueError("no valid qupath installation found"),
        FileNotFoundError("qupath installation is incompatible"),
        IsADirectoryError("/opt/jdk"),  # jvm_path_override a folder
        RuntimeError("Provided JAVA_OPTS prevent the JVM from starting! ['-Xmx']"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_every_way_paquo_fails_to_start_qupath_says_qupath_is_unavailable(monkeypatch, error):
    """paquo.java starts the JVM on import: what its find_qupath and start_jvm raise (jpype_backend.py). A JVM that
    did not start was a RuntimeError traceback, also with --qupath auto, which falls back to sidecars for the others."""
    import sys

    import paquo.jpype_backend

    from bridge import qupath

    for name in ("java", "classes", "pathobjects", "hierarchy", "images", "projects"):
        monkeypatch.delitem(sys.modules, f"paquo.{name}", raising=False)  # imported again, paquo.java starts the JVM

    def start_jvm(*args, **kwargs):
        raise error

    monkeypatch.setattr(paquo.jpype_backend, "start_jvm", start_jvm)
    available, why = qupath.qupath_available()
    assert not available and str(error) in why and "set PAQUO_QUPATH_DIR" in why
    with pytest.raises(qupath.QuPathUnavailableError, match="QuPath is needed for this"):
        qupath.path_class(qupath.PDL1_ANALYSIS)


def test_a_project_file_qupath_cannot_load_is_said_with_its_fix_not_a_java_traceback(monkeypatch, tmp_path):
    """ProjectIO.loadProject's IOException or JsonSyntaxException reaches paquo's QuPathProject untranslated, and
    under JPype a Java exception is no OSError (jpype.JException); stood in for here, as no JVM runs."""
    import jpype

    from bridge import qupath
    from inference import Pdl1Error

    class JavaError(Exception):  # jpype.JException's place: the base of every Java exception
        pass

    class QuPathProject:
        def __init__(self, path, mode):
            raise JavaError("com.google.gson.JsonSyntaxException: java.io.EOFException: End of input at line 9")

    monkeypatch.setattr(jpype, "JException", JavaError)
    monkeypatch.setattr(qupath, "_paquo", lambda: {"QuPathProject": QuPathProject})
    refused = r"QuPath cannot read the project file \(com.google.gson.Json.*put back"
    with pytest.raises(Pdl1Error, match=refused), qupath.open_project(tmp_path / "project.qpproj", mode="r"):
        pass


def test_an_entry_whose_image_is_not_at_its_uri_is_refused_before_its_analysis(tmp_path):
    # paquo's entry.save() skips such an entry with a log line only: the run said done, nothing was written.
    from types import SimpleNamespace

    from bridge import qupath

    entry = SimpleNamespace(entry_path=tmp_path, image_name="a.svs", uri="file:/gone/a.svs", is_readable=lambda: False)
    where = r"a.svs: QuPath saves an entry's objects only while its image is where the project says \(file:/gone/a"
    with pytest.raises(ProjectError, match=where):
        qupath.backup_data(entry)
    with pytest.raises(ProjectError, match="--qupath never"):
        qupath.save_entries([entry])


def _moved_project(tmp_path, slides):
    """A project of two images, the first moved from made/ to local/ since (the second where its URI says); the
    project's folder, the first entry's URI and its image's place now."""
    (tmp_path / "made").mkdir()
    moved = Path(shutil.copy(slides[0], tmp_path / "made" / "s31.svs"))
    project = tmp_path / "project"
    init_project_files(project, [moved, slides[1]])
    (tmp_path / "local").mkdir()
    now = moved.rename(tmp_path / "local" / "s31.svs")
    return project, read_project(project).entries[0].uri, now


def test_through_qupath_an_image_search_dir_found_has_its_entry_pointed_at_it_and_saved_once(
    tmp_path, slides, models, fake_qupath, caplog
):
    # QuPath saves an entry's objects only while its image is at its URI: an image --search-dir found was refused
    # (check_saveable), and a project moved between machines could be analysed through QuPath only with --qupath
    # never. The run now points the entry at the file, as QuPath's File > Project... > Check project URIs does.
    project, before, now = _moved_project(tmp_path, slides)
    kept = read_project(project).entries[1].uri
    config = RunConfig(
        pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="always", search_dirs=(tmp_path / "local",)
    )
    with caplog.at_level("WARNING", logger="bridge.run"):
        outcomes = run_batch([project], config, models=models)
    assert [o.state for o in outcomes] == ["done", "done"], outcomes
    after = path_to_uri(now)
    assert [e.uri for e in read_project(project).entries] == [after, kept]  # the other entry untouched
    (fake,) = fake_qupath["projects"]
    assert fake.saves == 1  # with the run's metadata, at its end
    assert [len(e.java_object.updates) for e in fake.images] == [1, 0]
    assert (project / "data" / "1" / "data.qpdata").read_bytes() == fake_qupath["qpdata"]  # saved: readable now
    first, second = (json.loads(Path(o.outputs[1]).read_text()) for o in outcomes)
    assert first["image"] == str(now)
    assert first["provenance"]["entry_uri_changed"] == {"from": before, "to": after}
    assert "entry_uri_changed" not in second["provenance"]
    said = f"s31.svs (entry 1): pointed at its image where this run found it, {after} (the project said {before})"
    assert said in caplog.text

    # Run again: the image is where the URI says, and nothing is changed.
    again = run_batch([project], config, models=models)
    assert [o.state for o in again] == ["done", "done"]
    assert [len(e.java_object.updates) for e in fake_qupath["projects"][1].images] == [0, 0]
    assert "entry_uri_changed" not in json.loads(Path(again[0].outputs[1]).read_text())["provenance"]


def test_through_qupath_an_entry_moved_with_its_project_is_pointed_at_its_image_without_search_dir(
    tmp_path, slides, models, fake_qupath
):
    # The saved_folder case: a study folder (project and slides) moved to a server, as QuPath itself suggests.
    study = tmp_path / "study"
    (study / "slides").mkdir(parents=True)
    shutil.copy(slides[0], study / "slides" / "s31.svs")
    init_project_files(study / "project", [study / "slides" / "s31.svs"])
    (tmp_path / "server").mkdir()
    study.rename(tmp_path / "server" / "study")
    project = tmp_path / "server" / "study" / "project"
    config = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="always")
    (outcome,) = run_batch([project], config, models=models)
    assert outcome.state == "done", outcome.error
    assert read_project(project).entries[0].uri == path_to_uri(tmp_path / "server" / "study" / "slides" / "s31.svs")


def test_through_qupath_an_image_found_beside_the_project_without_search_dir_is_refused_and_left_as_it_was(
    tmp_path, slides, models, fake_qupath
):
    # Found by its name alone, where nobody said to look: the entry is not pointed at it, and the refusal says how.
    project, before, now = _moved_project(tmp_path, slides)
    now.rename(tmp_path / "s31.svs")  # the project folder's parent
    config = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="always")
    failed, done = run_batch([project], config, models=models)
    assert (failed.state, done.state) == ("failed", "done")
    assert "is where the project says" in failed.error and "run again with --search-dir" in failed.error
    assert read_project(project).entries[0].uri == before


def test_through_qupath_a_failed_image_has_its_entry_pointed_back_at_its_uri(
    tmp_path, slides, models, fake_qupath, monkeypatch
):
    # A failure halfway leaves the project as it was: its URI too, else the run's project save wrote the new one.

    project, before, _ = _moved_project(tmp_path, slides)
    _save_of_entry_1_raises(monkeypatch, DISK_FULL)
    config = RunConfig(
        pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="always", search_dirs=(tmp_path / "local",)
    )
    outcomes = run_batch([project], config, models=models)
    assert [o.state for o in outcomes] == ["failed", "done"]
    assert read_project(project).entries[0].uri == before
    assert fake_qupath["projects"][0].images[0].uri == before


def test_a_ctrl_c_stops_the_run_even_where_qupath_refuses_to_put_an_entrys_uri_back(
    tmp_path, slides, models, fake_qupath, monkeypatch, caplog
):
    # Putting the URI back runs on a failure's path: a Java error there replaced the Ctrl-C, which became the image's
    # failure, and the run went on to the next image.
    from tests.qupath_fakes import FakeJavaEntry

    project, before, _ = _moved_project(tmp_path, slides)
    update = FakeJavaEntry.updateURIs

    def refusing_the_second(self, replacements):
        if self.updates:  # the first pointed the entry at its image; this one puts it back
            raise RuntimeError("java.io.IOException: the project folder is read-only")
        return update(self, replacements)

    monkeypatch.setattr(FakeJavaEntry, "updateURIs", refusing_the_second)
    _save_of_entry_1_raises(monkeypatch, KeyboardInterrupt())
    config = RunConfig(
        pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="always", search_dirs=(tmp_path / "local",)
    )
    with caplog.at_level("WARNING", logger="bridge.qupath"), pytest.raises(RunInterrupted) as stop:
        run_batch([project], config, models=models)
    assert stop.value.outcomes == () and stop.value.stopped == "s31.svs"
    said = f"s31.svs: its URI could not be put back to {before} (QuPath refused: RuntimeError: java.io.IOException"
    assert said in caplog.text


def test_pointing_an_entry_at_its_file_uses_qupaths_update_of_its_version_and_checks_it_took(monkeypatch, tmp_path):
    # QuPath before 0.6 has getServerURIs/updateServerURIs (paquo's update_image_paths chooses so too).
    from types import SimpleNamespace

    from bridge import qupath
    from tests.qupath_fakes import FakeURI, fake_uris

    fake_uris(monkeypatch)
    image = tmp_path / "a b.svs"
    image.write_bytes(b"x")
    replaced = []

    def entry_at(uri, *, takes=True):
        entry = SimpleNamespace(entry_id="4", image_name="a b.svs", uri=uri)

        def update(replacements):
            replaced.append(replacements)
            [(old, new)] = replacements.items()
            if takes and old.toString() == entry.uri:
                entry.uri = new.toString()
                return True
            return False

        entry.java_object = SimpleNamespace(getServerURIs=lambda: [FakeURI(entry.uri)], updateServerURIs=update)
        entry.is_readable = lambda: Path(str(qupath.uri_to_path(entry.uri))).is_file()
        return entry

    entry = entry_at("file:/C:/Slides/a%20b.svs")
    change = qupath.point_entry_at(entry, image)
    assert (change.before, change.after) == ("file:/C:/Slides/a%20b.svs", path_to_uri(image))
    assert entry.uri == path_to_uri(image) and entry.is_readable()
    qupath.put_back_uri(entry, change)
    assert entry.uri == "file:/C:/Slides/a%20b.svs"
    replaced.clear()
    assert qupath.point_entry_at(entry_at(path_to_uri(image)), image) is None and not replaced  # already there
    with pytest.raises(ProjectError, match=r"QuPath did not change the entry's URI \(file:/gone/a%20b.svs\)"):
        qupath.point_entry_at(entry_at("file:/gone/a%20b.svs", takes=False), image)


class _JavaIOError(Exception):  # what JPype raises for java.io.IOException: no OSError
    pass


def test_an_entry_qupath_cannot_save_is_named_with_the_fix(tmp_path):
    # QuPath's IOException on a full disk or a read-only folder came through paquo untranslated: Java's text alone.
    from types import SimpleNamespace

    from bridge import qupath

    def full_disk():
        raise _JavaIOError("No space left on device")

    entry = SimpleNamespace(entry_path=tmp_path, image_name="a.svs", uri="file:/a.svs", is_readable=lambda: True)
    entry.save = full_disk
    said = (
        rf"a.svs: QuPath could not save its data in {re.escape(str(tmp_path))} \(_JavaIOError: No space left on "
        r"device\); make room on the disk or make the project folder writable, then run again with --resume"
    )
    with pytest.raises(ProjectError, match=said):
        qupath.save_entries([entry])


def test_an_entry_qupath_types_as_an_immunostain_runs_the_ihc_model_and_is_flagged_when_its_colour_disagrees(
    tmp_path, models, fixtures_dir
):
    # The labelled fixture holds one slide twice: entry 1 typed H&E, entry 2 BRIGHTFIELD_H_DAB (QuPath 0.4.4's
    # files); the pixels are an H&E phantom's.
    study = tmp_path / "study"
    shutil.copytree(fixtures_dir / "qupath-0.4.4-labels" / "project", study / "project")
    shutil.copy(fixtures_dir / "qupath-0.4.4-labels" / "he-1357.svs", study / "he-1357.svs")
    config = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="never")
    first, second = run_batch([study / "project"], config, models=models)
    assert (first.state, second.state) == ("done", "done")
    summaries = [json.loads(Path(o.outputs[1]).read_text()) for o in (first, second)]
    assert [s["stain"] for s in summaries] == ["H&E", "H-DAB"]
    assert summaries[1]["stain_source"] == "QuPath's image type BRIGHTFIELD_H_DAB"
    assert summaries[1]["provenance"]["seg_model"] is None and summaries[1]["cps"] is not None
    reasons = [r["reason"] for r in summaries[1]["details"]["review_reasons"]]
    assert "stain: QuPath's image type BRIGHTFIELD_H_DAB says H-DAB, the colour says H&E" in reasons
    assert second.uncertainty_flag
    # The user says otherwise (the type was set by mistake): --stain wins, and both are analysed as H&E.
    told = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="never", stain="H&E")
    outcomes = run_batch([study / "project"], told, models=models)
    assert [json.loads(Path(o.outputs[1]).read_text())["stain"] for o in outcomes] == ["H&E", "H&E"]


def _labels_study(tmp_path: Path, fixtures_dir: Path, edit_metadata) -> Path:
    """The labelled 0.4.4 fixture's project (an H&E and an H-DAB entry of he-1357.svs) with its slide, each entry's
    metadata changed by ``edit_metadata(index, metadata)``; the project's folder."""
    study = tmp_path / "study"
    shutil.copytree(fixtures_dir / "qupath-0.4.4-labels" / "project", study / "project")
    shutil.copy(fixtures_dir / "qupath-0.4.4-labels" / "he-1357.svs", study / "he-1357.svs")
    qpproj = study / "project" / "project.qpproj"
    raw = json.loads(qpproj.read_text())
    for index, image in enumerate(raw["images"]):
        edit_metadata(index, image["metadata"])
    qpproj.write_text(json.dumps(raw))
    return study / "project"


def test_a_case_stated_in_qupath_whose_partner_does_not_carry_it_is_named_in_pairs_json_and_the_table(
    tmp_path, models, fixtures_dir, capsys
):
    # A user trial: the H&E carries case=phantom-1357, its IHC's case is not set (so its file name, he-1357.svs,
    # names it case 1357): the pathologist's pairing found no partner and the run said nothing. The IHC's case of
    # one stain, named by its file name, stays silent.
    from bridge.cli.common import pairs_table

    def unset_ihc_case(index: int, metadata: dict) -> None:
        if index == 1:  # entry 2, typed H-DAB
            del metadata["case"]

    project = _labels_study(tmp_path, fixtures_dir, unset_ihc_case)
    config = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="never")
    assert [o.state for o in run_batch([project], config, models=models)] == ["done", "done"]
    pairs = project / "pdl1" / "pairs.json"
    why = (
        "case 'phantom-1357' is not compared: only an H&E (he-1357.svs) carries case=phantom-1357 (entry metadata); "
        "no PD-L1 IHC entry does: check the IHC's `case` value in QuPath (Project > Edit metadata)"
    )
    assert json.loads(pairs.read_text())["cases"] == {"phantom-1357": {"why_not_compared": why}}
    capsys.readouterr()
    pairs_table(pairs)
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in capsys.readouterr().out.splitlines()]
    rows = [r for r in rows if r]
    assert rows[0][0] == "phantom-1357" and " ".join(r[6] for r in rows) == why  # once, in the review column


def _study_run_logged(tmp_path, fixtures_dir, models, caplog, respell):
    """The labelled study with its entries' metadata changed by ``respell``, run once (both images done), its
    warnings in ``caplog``; the project and the run's config."""
    project = _labels_study(tmp_path, fixtures_dir, respell)
    config = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="never")
    with caplog.at_level("WARNING", logger="bridge.run"):
        assert [o.state for o in run_batch([project], config, models=models)] == ["done", "done"]
    return project, config


def test_the_case_key_is_the_runs_and_one_spelt_otherwise_in_the_entries_is_warned_of(
    tmp_path, models, fixtures_dir, caplog
):
    # A lab whose entries say "Case" (QuPath's keys are exact): the run read no case from them and fell back on the
    # file names without a word. It warns, naming the key; --case-key Case (pdl1-config.toml's [pairs] case_key)
    # pairs by it, and pairs.json says which key it used.
    respell = lambda _, metadata: metadata.update(Case=metadata.pop("case"))  # noqa: E731
    project, config = _study_run_logged(tmp_path, fixtures_dir, models, caplog, respell)
    assert (
        "no entry has the metadata key 'case', which names each image's case for pairing; 2 have 'Case': give that "
        "key instead (--case-key or pdl1-config.toml's [pairs] case_key), or rename it in QuPath"
    ) in caplog.text
    pairs = project / "pdl1" / "pairs.json"
    by_name = json.loads(pairs.read_text())
    assert by_name["case_key"] == "case" and list(by_name["cases"]) == ["1357"]  # he-1357.svs, twice
    caplog.clear()
    with caplog.at_level("WARNING", logger="bridge.run"):  # pairing only: the images' results are kept
        outcomes = run_batch([project], replace(config, resume=True, case_key="Case"), models=models)
    assert [o.state for o in outcomes] == ["skipped", "skipped"] and "metadata key" not in caplog.text
    by_key = json.loads(pairs.read_text())
    assert by_key["case_key"] == "Case" and list(by_key["cases"]) == ["phantom-1357"]


def test_entries_some_of_which_spell_the_case_key_otherwise_are_warned_of(tmp_path, models, fixtures_dir, caplog):
    # helper-134: entry 1 says "case", entry 2 "Case": entry 2's case came from its file name, without a word.
    def respell_ihc(index, metadata):
        if index == 1:
            metadata["Case"] = metadata.pop("case")

    _study_run_logged(tmp_path, fixtures_dir, models, caplog, respell_ihc)
    assert (
        "some entries name their case under another spelling of the metadata key 'case' (1 has 'Case'), so their "
        "cases are read from file names; rename that key to 'case' in QuPath (Project > Edit metadata)"
    ) in caplog.text


def test_the_report_warns_only_about_demo_models(tmp_path):
    from bridge.report import _demo_warning, _model_label

    demo = {"name": "pdl1-seg", "version": "1", "members": 5, "sha256": "d" * 64}
    own = {"name": "lab-seg", "version": "3", "members": 4, "sha256": "e" * 64}
    assert "shipped demo" in _model_label(demo, {"d" * 64}) and "shipped demo" not in _model_label(own, {"d" * 64})
    assert _demo_warning([{"image": "a.svs", "demo_models": False}]) == ""
    warning = _demo_warning([{"image": "a.svs", "demo_models": True}, {"image": "b.svs", "demo_models": False}])
    assert "1 of 2 images" in warning and "phantom" in warning


def test_a_mistyped_project_path_and_two_projects_say_what_is_wrong(tmp_path, models):
    with pytest.raises(ProjectError, match=r"no/such/project: no such file or folder; check the path"):
        run_batch([tmp_path / "no" / "such" / "project"], _config(), models=models)
    for name in ("p1", "p2"):
        (tmp_path / name).mkdir()
    for out in (None, tmp_path / "out"):
        with pytest.raises(ProjectError, match=r"2 projects given .*p1, .*p2\); give one project per run"):
            run_batch([tmp_path / "p1", tmp_path / "p2"], _config(out=out), models=models)


def test_slides_sharing_a_stem_are_named_with_the_fix(tmp_path, models):
    slides = [tmp_path / n for n in ("a.png", "a.tif", "b.svs", "a.jpg")]
    out = tmp_path / "out"
    with pytest.raises(ProjectError) as err:
        run_batch(slides, _config(out=out), models=models)
    assert str(err.value) == (
        f"{slides[0]}, {slides[1]}, {slides[3]} share the file name 'a', so their outputs ({out / 'a'}.geojson and "
        ".summary.json) would overwrite each other; rename one, or run them into different --out folders"
    )


def test_a_slide_or_project_named_twice_is_run_once_and_said_so(tmp_path, slides, models, caplog):
    # A slide named twice was refused ("given 2 times") and a project named as its folder and its project.qpproj
    # was "2 projects given"; each is one, run once with a note, as `pdl1 init-project` adds a slide named twice once.
    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "again.svs"
    link.symlink_to(slides[0])
    out = tmp_path / "out"
    outcomes = run_batch([slides[0], slides[1], slides[0], link], _config(out=out), models=models)
    assert [(o.name, o.state) for o in outcomes] == [(slides[0].name, "done"), (slides[1].name, "done")]
    assert f"{slides[0]} is given twice; it is analysed once" in caplog.text
    assert f"{slides[0]} is given twice (as {link}); it is analysed once" in caplog.text
    assert not (out / "again.geojson").exists()
    project = tmp_path / "project"
    init_project_files(project, [slides[1]])
    caplog.clear()
    outcomes = run_batch([project / "project.qpproj", project], _config(), models=models)
    assert [(o.key, o.state) for o in outcomes] == [("1", "done")]
    assert f"{project / 'project.qpproj'} is given twice (as {project}); it is analysed once" in caplog.text


def test_an_out_path_that_is_a_file_says_so(tmp_path, slides, models):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(ProjectError, match=r"--out .*taken is a file; expected a folder"):
        run_batch([slides[0]], _config(out=tmp_path / "taken"), models=models)
    with pytest.raises(ProjectError, match=r"--out .*taken/sub lies under .*taken, which is a file; expected a folder"):
        run_batch([slides[0]], _config(out=tmp_path / "taken" / "sub"), models=models)


@pytest.mark.parametrize(
    ("manifest_tta", "option", "used", "source"),
    [(True, None, True, "model manifest"), (True, False, False, "run option"), (None, None, False, "model manifest")],
)
def test_the_provenance_records_the_nuclei_tta_used_and_what_decided_it(tmp_path, manifest_tta, option, used, source):
    """``--nuclei-tta`` left out lets the model's manifest decide: the provenance says what ran, never null."""
    from dataclasses import replace

    from inference import NucleiConfig, demo_model_dir
    from inference.models.manifest import read_manifest, write_manifest
    from inference.phantom.pyramid import write_ihc_phantom

    nuclei = tmp_path / "nuclei"
    shutil.copytree(demo_model_dir("nuclei"), nuclei)
    if manifest_tta is not None:  # as `pdl1 train nuclei --tta` writes it
        manifest = read_manifest(nuclei)
        write_manifest(nuclei, replace(manifest, extra={**manifest.extra, "tta": manifest_tta}))
    spec = PhantomSpec(1024, 1024, seed=33, tps_percent=40)
    write_phantom(tmp_path / "he.svs", spec)
    write_ihc_phantom(tmp_path / "ihc.svs", spec)
    pipeline = PipelineConfig(device="cpu", nuclei_model_dir=str(nuclei), nuclei=NucleiConfig(tta=option))
    outcomes = run_batch(
        [tmp_path / "he.svs", tmp_path / "ihc.svs"],
        RunConfig(pipeline=pipeline, qupath="never", out=tmp_path / "out", compare_pairs=False),
    )
    assert [(o.stain, o.state) for o in outcomes] == [("H&E", "done"), ("H-DAB", "done")], outcomes
    he, ihc = (json.loads((tmp_path / "out" / f"{n}.summary.json").read_text()) for n in ("he", "ihc"))
    recorded = he["provenance"]["pipeline_config"]["nuclei"]
    assert (recorded["tta"], recorded["tta_source"]) == (used, source)
    assert (he["details"]["nuclei_tta"], he["details"]["nuclei_tta_source"]) == (used, source)
    # The IHC model's manifest states no TTA: off unless the option says so.
    assert ihc["provenance"]["pipeline_config"]["nuclei"]["tta"] is bool(option)
    assert ihc["provenance"]["pipeline_config"]["nuclei"]["tta_source"] == (
        "run option" if option is not None else "model manifest"
    )


def test_the_entry_metadata_of_several_annotations_sums_their_cells_for_tps_and_cps():
    # An IHC image with two tumour annotations: its TPS and CPS are the image's, from all counted cells (the CPS
    # was the first annotation's alone).
    from bridge.run import merge_entry_metadata

    first = {"PD-L1 TPS %": "60.0", "PD-L1 TPS category": ">=50%", "PD-L1 CPS": "100.0", "PD-L1 run": "r"}
    second = {"PD-L1 TPS %": "2.0", "PD-L1 TPS category": "1-49%", "PD-L1 CPS": "3.0", "PD-L1 run": "r"}
    merged = merge_entry_metadata(
        [
            (first, {"tumour_positive": 60, "tumour_negative": 40, "immune_positive": 90}),
            (second, {"tumour_positive": 2, "tumour_negative": 98, "immune_positive": 1}),
        ]
    )
    assert merged == {"PD-L1 TPS %": "31.0", "PD-L1 TPS category": "1-49%", "PD-L1 CPS": "76.5", "PD-L1 run": "r"}
    # One annotation, or one without cells counted (no nuclei): its own metadata as it is.
    assert merge_entry_metadata([(second, {})]) == second
    assert merge_entry_metadata([(first, {"tumour_positive": 1, "tumour_negative": 1}), (second, {})]) == second


def test_an_image_without_a_tumour_cell_gets_no_empty_score_in_its_entry_metadata():
    # 0 tumour cells wrote "PD-L1 TPS %" and "PD-L1 CPS" as empty text, which QuPath's Project > metadata shows as a
    # blank that reads as a fault. The numbers' keys are left out and the categories say why; a re-run with enough
    # cells writes the numbers again, and one without removes them.
    from types import SimpleNamespace

    from bridge.run import entry_metadata, merge_entry_metadata, metadata_counts, set_entry_metadata
    from inference import INSUFFICIENT, combined_positive_score, tumour_proportion_score

    def result(stain, positive, negative, immune=None):
        cps = None if immune is None else combined_positive_score(positive, immune, positive + negative)
        tps = tumour_proportion_score(positive, negative)
        return SimpleNamespace(tps=tps, cps=cps, stain=stain, run_id="r", seg_model=None, nuclei_model=None)

    zero_ihc = entry_metadata(result("H-DAB", 0, 0, immune=0))
    assert zero_ihc == {
        "PD-L1 TPS category": INSUFFICIENT,
        "PD-L1 run": "r",
        "PD-L1 CPS category": INSUFFICIENT,
        "PD-L1 stain": "H-DAB",
    }
    zero_he = entry_metadata(result("H&E", 0, 0))
    assert zero_he == {"PD-L1 Predicted TPS category (H&E)": INSUFFICIENT, "PD-L1 run": "r"}
    no_nuclei = entry_metadata(
        SimpleNamespace(tps=None, cps=None, stain="H&E", run_id="r", seg_model=None, nuclei_model=None)
    )
    assert no_nuclei == {"PD-L1 run": "r"}  # no TPS at all: neither key, never an empty one
    # Several annotations, none with a tumour cell: still no number; the last one without, the sum has one.
    enough = result("H-DAB", 60, 90, immune=15)
    zero_part = (zero_ihc, metadata_counts(result("H-DAB", 0, 0, immune=0)))
    assert merge_entry_metadata([zero_part, zero_part]) == zero_ihc
    summed = merge_entry_metadata([(entry_metadata(enough), metadata_counts(enough)), zero_part])
    assert (summed["PD-L1 TPS %"], summed["PD-L1 TPS category"], summed["PD-L1 CPS"]) == ("40.0", "1-49%", "50.0")
    assert "PD-L1 CPS category" not in summed  # 150 tumour cells
    # Re-runs of one entry: the numbers go with the cells and come back with them; the user's key stays.
    metadata = {"case": "B12"}
    set_entry_metadata(metadata, entry_metadata(enough))
    set_entry_metadata(metadata, zero_ihc)
    assert metadata == {"case": "B12", **zero_ihc}
    set_entry_metadata(metadata, entry_metadata(enough))
    assert metadata == {"case": "B12", **entry_metadata(enough)} and metadata["PD-L1 TPS %"] == "40.0"
    assert all(value for value in metadata.values())


def test_a_tps_just_under_a_cut_off_is_never_shown_at_it():
    # helper-129: 24 positive of 2500 tumour cells (0.96 %) read "1.0" beside its category "<1%" in the metadata, the
    # run's table and targets.csv; 1249 of 2500 (49.96 %) read "50.0" beside "1-49%".
    from bridge.report import _fmt_tps
    from bridge.run import merge_entry_metadata
    from bridge.targets import csv_cell

    for positive, shown, category in [(24, "0.96", "<1%"), (1249, "49.96", "1-49%"), (25, "1.0", "1-49%")]:
        counts = {"tumour_positive": positive, "tumour_negative": 2500 - positive}
        meta = {"PD-L1 TPS %": "x", "PD-L1 TPS category": "x"}
        merged = merge_entry_metadata([(meta, counts), (meta, {"tumour_positive": 0, "tumour_negative": 0})])
        assert (merged["PD-L1 TPS %"], merged["PD-L1 TPS category"]) == (shown, category)
        percent = 100 * positive / 2500
        assert csv_cell(percent, tps=True) == _fmt_tps(percent) == shown
    assert csv_cell(0.96) == "1.0"  # other numbers keep one decimal


def _grey_png(path: Path) -> Path:
    """Grey shades on white: tissue of no stain the product knows (neither H&E nor haematoxylin-DAB)."""
    import numpy as np
    from PIL import Image

    rgb = np.full((512, 512, 3), 245, np.uint8)
    rgb[64:-64, 64:-64] = np.random.default_rng(0).integers(30, 200, (384, 384, 1), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def test_an_image_of_no_known_stain_is_told_how_pdl1_run_states_one(tmp_path, models):
    # The library's messages named pdl1 run's --stain (inference speaking a CLI's words); pdl1 run passes its own.
    grey = _grey_png(tmp_path / "grey.png")
    config = RunConfig(pipeline=PipelineConfig(device="cpu", mpp=0.5), qupath="never", out=tmp_path / "out")
    (failed,) = run_batch([grey], config, models=models)
    assert failed.state == "failed"
    assert "is not a brightfield H&E or haematoxylin-DAB stain" in failed.error
    # --stain states every image's stain: it was offered as the fix for one image of any run.
    assert failed.error.rstrip(".").endswith(
        "say which: set its image type in QuPath (Image tab: Image type), or pass --stain he|ihc where every image of "
        "the run is of that stain (it states them all), and run again"
    ), failed.error


def test_a_dark_image_is_no_brightfield_stain_and_a_long_name_fails_before_its_analysis(tmp_path, models):
    # helper-131: a fluorescence image (and an all-black one) was taken for empty glass, defaulted to H&E and given a
    # TPS (88.5 %); a slide whose name the results' suffixes made too long failed after its whole analysis, told to
    # free some space. The other images of the run are finished either way.
    import numpy as np
    from PIL import Image

    dark = tmp_path / "fluo.png"
    rgb = np.zeros((256, 256, 3), np.uint8)
    rgb[64:192, 64:192, 1] = np.random.default_rng(0).integers(80, 255, (128, 128), dtype=np.uint8)
    Image.fromarray(rgb).save(dark)
    long_name = _grey_png(tmp_path / ("M" * 220 + ".png"))  # its pairs label file would be 259 bytes
    fine = tmp_path / "fine.png"
    Image.fromarray(np.full((64, 64, 3), 245, np.uint8)).save(fine)
    config = RunConfig(pipeline=PipelineConfig(device="cpu", mpp=0.5), qupath="never", out=tmp_path / "out")
    outcomes = run_batch([dark, long_name, fine], config, models=models)
    assert [o.state for o in outcomes] == ["failed", "failed", "done"]
    said = outcomes[0].error
    assert "dark background: median brightness 0 < 70 (fluorescence or dark field, not brightfield)" in said
    assert "is not a brightfield H&E or haematoxylin-DAB stain" in said
    assert outcomes[1].error.endswith(
        "the file system allows 255): rename the slide to a shorter name (at most 216 bytes before its extension) and "
        "run it again"
    )
    # Refused before its analysis: analysed, this grey image of no known stain would have failed on its colour.


def test_through_qupath_a_target_annotation_without_an_area_is_skipped_and_named(
    tmp_path, slides, models, fake_qupath, monkeypatch, caplog
):
    # A Points annotation of a target class (a pathologist's marked nuclei, class "Tumor") was analysed as the ROI:
    # its RoiError failed the image, its other target annotations too (pdl1_analyze.groovy skips and names it).
    from dataclasses import replace
    from types import SimpleNamespace

    import shapely

    from bridge import qupath

    project = tmp_path / "project"
    init_project_files(project, [slides[0]])
    tumour = SimpleNamespace(name="core 1", path_class=SimpleNamespace(id="Tumor"), roi=shapely.box(200, 200, 700, 700))
    points = SimpleNamespace(name=None, path_class=SimpleNamespace(id="Tumor"), roi=shapely.MultiPoint([(5, 5)]))
    analysed = []
    monkeypatch.setattr(qupath, "annotation_targets", lambda entry, *, classes=(), names=(): [points, tumour])
    monkeypatch.setattr(
        qupath, "write_children", lambda entry, parent, objects, measurements: analysed.append(parent) or 0
    )
    config = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="always", stain="H&E")
    with caplog.at_level("WARNING", logger="bridge.run"):
        (done,) = run_batch([project], replace(config, target_classes=("Tumor",)), models=models)
    assert done.state == "done", done.error
    assert analysed == [tumour]
    assert "s31.svs: skipped Tumor: a MultiPoint annotation has no area to analyse; draw an area annotation" in (
        caplog.text
    )

    monkeypatch.setattr(qupath, "annotation_targets", lambda entry, *, classes=(), names=(): [points])
    (failed,) = run_batch([project], replace(config, target_classes=("Tumor",)), models=models)
    assert failed.state == "failed"
    assert "nothing analysed: none of the 1 target annotations has an area" in failed.error

    # A polygon is an area also where its area sums to 0 (a bow-tie's halves cancel): what is wrong with it is said.
    bow_tie = shapely.Polygon([(200, 200), (700, 700), (700, 200), (200, 700)])
    assert bow_tie.area == 0
    tie = SimpleNamespace(name="tie", path_class=SimpleNamespace(id="Tumor"), roi=bow_tie)
    monkeypatch.setattr(qupath, "annotation_targets", lambda entry, *, classes=(), names=(): [tie])
    (failed,) = run_batch([project], replace(config, target_classes=("Tumor",)), models=models)
    assert failed.state == "failed"
    assert "has an area" not in failed.error and "Self-intersection" in failed.error, failed.error


def test_a_rerun_through_qupath_replaces_what_resolve_hierarchy_moved_out_of_the_roi(monkeypatch):
    """Resolve hierarchy puts a tile whose centre lies outside a round ROI, and a region over its edge (with what lies
    in it), beside the ROI: the re-run finds them too; yours inside them go back where they lay, not to the root."""
    from shapely.geometry import Point, box

    from bridge import qupath
    from bridge.objects import ANALYSED_SIGNATURE, OWN_ANNOTATION_SIGNATURE, OWN_DETECTION_SIGNATURE, TILE_NAME

    removed = []
    wrapper, entry = paquo_stand_ins(monkeypatch, lambda objects, keep: removed.extend(objects))

    def ours(kind, geometry, cls=None, kids=()):
        signature = {"annotation": OWN_ANNOTATION_SIGNATURE, "detection": OWN_DETECTION_SIGNATURE}.get(kind, "x")
        return JavaPathObject(kind, geometry, cls, TILE_NAME if kind == "tile" else None, {signature: 0.5}, kids)

    inside = ours("detection", Point(1000, 1000), "Tumor: Positive")
    yours_in_region = JavaPathObject("annotation", box(1610, 950, 1640, 980), name="yours, in the ROI")
    yours_out = JavaPathObject("detection", Point(1790, 990), "Tumor: Positive", measurements={"Nucleus: Area": 9.0})
    edge_tile = ours("tile", box(1650, 950, 1780, 1080))
    region = ours("annotation", box(1600, 900, 1800, 1000), "PD-L1 positive", [yours_in_region, yours_out])
    roi = JavaPathObject(
        "annotation", Point(1000, 1000).buffer(700), "Tumor", "ROI", {ANALYSED_SIGNATURE: 0.0}, [inside]
    )
    far_tile = ours("tile", box(2500, 2500, 2600, 2600))  # another analysis's, nowhere near the ROI
    other = JavaPathObject("annotation", box(2000, 0, 2900, 900), "Tumor", "other", {ANALYSED_SIGNATURE: 1.0})
    other.addChildObjects([ours("tile", box(1690, 500, 2100, 600))])  # under another analysed ROI: its own
    tissue = JavaPathObject("annotation", box(0, 0, 3000, 3000), name="Tissue", kids=[roi, edge_tile, region])
    root = JavaPathObject("root", None, kids=[tissue, far_tile, other])

    qupath.write_children(entry, wrapper(roi), [], {ANALYSED_SIGNATURE: 1.0})
    assert sorted(map(id, removed)) == sorted(map(id, [inside, edge_tile, region]))
    assert yours_in_region.parent is roi and yours_out.parent is tissue  # by QuPath's rule, covered / centroid
    assert other.kids[0].parent is other and far_tile.parent is root and roi.parent is tissue


def test_a_rerun_killed_between_an_images_two_files_is_not_skipped_by_resume(tmp_path, slides, models, monkeypatch):
    # A re-run replaced an image's GeoJSON, then its summary; killed between, status.json said "done" with the earlier
    # run's ID and --resume skipped the image, and later (recorded "started") the report and review-queue showed the
    # re-run's objects beside the earlier run's numbers. Now both are written first and replace theirs together:
    # killed before, the earlier pair stands whole, and --resume analyses the image again.
    import bridge.run

    out = tmp_path / "out"
    first = RunConfig(pipeline=PipelineConfig(device="cpu"), qupath="never", out=out)
    assert [o.state for o in run_batch(slides[:1], first, models=models)] == ["done"]
    earlier = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    changed = PipelineConfig(device="cpu", run_nuclei=False)  # the re-run's settings differ from the first run's
    real = bridge.run.write_features_to

    def killed(fh, features):  # the GeoJSON is written; the process dies before the summary is
        real(fh, features)
        raise KeyboardInterrupt

    monkeypatch.setattr(bridge.run, "write_features_to", killed)
    with pytest.raises(KeyboardInterrupt):
        run_batch(slides[:1], RunConfig(pipeline=changed, qupath="never", out=out), models=models)
    monkeypatch.undo()
    assert not RunStatus(out).is_done("s31")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == earlier  # no .part, nothing replaced
    again = run_batch(slides[:1], RunConfig(pipeline=changed, qupath="never", out=out, resume=True), models=models)
    assert [o.state for o in again] == ["done"]
    summary = json.loads((out / "s31.summary.json").read_text())
    parent = next(iter(read_features(out / "s31.geojson")))
    assert summary["nuclei"] == {} and "PD-L1: Num Tumor: Positive" not in parent.measurements
    assert summary["run_id"] == RunStatus(out).images["s31"]["run_id"] == again[0].run_id


def test_resume_analyses_again_an_image_whose_results_are_of_another_file(tmp_path, slides, models, caplog):
    # A slide of the same name from another folder into the same --out (or an entry pointed at another file in
    # QuPath): --resume skipped it, keeping the other image's TPS under its name.
    out = tmp_path / "out"
    config = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="never", out=out)
    assert [o.state for o in run_batch(slides[:1], config, models=models)] == ["done"]
    (tmp_path / "newbatch").mkdir()
    other = Path(shutil.copy(slides[1], tmp_path / "newbatch" / slides[0].name))
    with caplog.at_level("WARNING", logger="bridge.run"):
        again = run_batch([other], replace(config, resume=True), models=models)
    assert [o.state for o in again] == ["done"]
    size = slides[0].stat().st_size
    said = f"its results are of {slides[0]} ({size} bytes), not of {other} ({other.stat().st_size} bytes); analysing"
    assert said in caplog.text
    moved = Path(shutil.copy(slides[1], tmp_path / "elsewhere.svs")).rename(tmp_path / "s32.svs")  # the same file
    assert [o.state for o in run_batch([slides[1]], replace(config, resume=True), models=models)] == ["done"]
    assert [o.state for o in run_batch([moved], replace(config, resume=True), models=models)] == ["skipped"]
    assert json.loads((out / "s31.summary.json").read_text())["image"] == str(other)


def test_a_geojson_of_the_users_where_the_results_go_is_not_replaced(tmp_path, slides, models):
    # The README trains from `--labels slide.geojson` beside the slide: `pdl1 run slide.svs --out .` replaced it.
    out = tmp_path / "out"
    out.mkdir()
    own = '{"type": "FeatureCollection", "features": [], "note": "Dr X tumour outline"}'
    (out / "s31.geojson").write_text(own)
    config = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="never", out=out)
    with pytest.raises(ProjectError, match=r"s31\.geojson is there and no pdl1 run wrote it .*; move that file"):
        run_batch(slides[:1], config, models=models)
    assert (out / "s31.geojson").read_text() == own
    (out / "s31.geojson").unlink()
    assert [o.state for o in run_batch(slides[:1], config, models=models)] == ["done"]
    (out / "s31.summary.json").unlink()  # pdl1's own, its summary lost: analysed again
    assert [o.state for o in run_batch(slides[:1], config, models=models)] == ["done"]


def test_a_full_disk_fails_the_image_naming_the_file_and_the_fix_and_the_batch_goes_on(tmp_path, slides, models):
    import errno
    import os

    import bridge.run

    real = bridge.run.write_features_to

    def full_for_the_first(fh, features):
        if Path(fh.name).name.startswith("s31.geojson."):  # its temporary file beside it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write() says it: no file named
        return real(fh, features)

    out = tmp_path / "out"
    config = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="never", out=out)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bridge.run, "write_features_to", full_for_the_first)
        outcomes = run_batch(slides, config, models=models)
    assert [o.state for o in outcomes] == ["failed", "done"]
    assert re.fullmatch(
        r".*/s31\.geojson: the results cannot be written \(No space left on device\); free some space on that "
        r"drive, then run again with --resume \(it keeps the images already done\)",
        outcomes[0].error,
    )


def test_through_qupath_a_tma_is_analysed_core_by_core_and_its_table_has_a_row_per_core(
    tmp_path, slides, models, fake_qupath, monkeypatch, caplog
):
    # A dearrayed TMA was analysed as one region: one TPS over every core, meaningless for a TMA. Each core not marked
    # missing is analysed on its own, its results under it; a missing core is left alone and named in targets.csv.
    import csv

    from bridge import qupath

    def core(name, x, y, *, missing=False):
        return stand_in_core(name, x, y, radius_px=300, missing=missing)

    # B-1 small, with fewer than 100 tumour cells: a review reason the first core does not have.
    cores = [
        core("A-1", 400, 400),
        core("A-2", 1100, 400, missing=True),
        stand_in_core("B-1", 400, 1100, radius_px=120),
    ]
    written = []
    children = {}  # each core's objects as QuPath gets them
    monkeypatch.setattr(qupath, "tma_cores", lambda entry: cores)
    monkeypatch.setattr(
        qupath,
        "write_children",
        lambda entry, parent, objects, measurements: (
            written.append((parent, measurements)) or children.setdefault(parent.name, list(objects))
        ),
    )
    # An earlier whole-image analysis stayed beside the cores' (an analysed annotation's results are its own).
    monkeypatch.setattr(qupath, "remove_whole_image_analysis", lambda entry: written.append(("whole image", {})) or 5)
    # A-2 was analysed before it was marked missing: its results stay, and the log says so.
    monkeypatch.setattr(qupath, "core_is_analysed", lambda core: core.name == "A-2")
    project = tmp_path / "project"
    init_project_files(project, [slides[0]])
    config = RunConfig(pipeline=PipelineConfig(device="cpu"), qupath="always", stain="H&E")
    with caplog.at_level("WARNING", logger="bridge.run"):
        (done,) = run_batch([project], config, models=models)
    assert done.state == "done", done.error
    assert "skipped 1 TMA cores marked missing: A-2" in caplog.text
    assert "TMA cores marked missing keep an earlier run's results" in caplog.text and "): A-2; delete" in caplog.text
    assert written[0] == ("whole image", {})  # removed before the cores are written, inside the backup's guard
    del written[0]
    assert [parent.name for parent, _ in written] == ["A-1", "B-1"]  # no PD-L1 analysis annotation, not A-2
    assert all("PD-L1: Predicted TPS % (H&E)" in m for _, m in written)

    summary = json.loads((project / "pdl1" / "1" / "summary.json").read_text())
    with (project / "pdl1" / "targets.csv").open(newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    assert [(r["image"], r["entry_id"], r["target"], r["target_type"], r["state"]) for r in table] == [
        ("s31.svs", "1", "A-1", "TMA core", "analysed"),
        ("s31.svs", "1", "A-2", "TMA core", "missing"),
        ("s31.svs", "1", "B-1", "TMA core", "analysed"),
    ]
    tps = [m["PD-L1: Predicted TPS % (H&E)"] for _, m in written]
    assert [r["tps_percent"] for r in table] == [f"{tps[0]:.1f}", "", f"{tps[1]:.1f}"]
    assert [r["tumour_cells"] for r in table if r["state"] == "analysed"] == [
        str(int(m["PD-L1: Num Tumor: Positive"] + m["PD-L1: Num Tumor: Negative"])) for _, m in written
    ]
    # The image's score is over both cores' cells, as its entry metadata; the run id is the metadata's, so --resume
    # takes the image for finished (with the first core's id it took the project for unsaved and ran it again).
    metadata = read_project(project).entries[0].metadata
    assert summary["metadata"] == {k: metadata[k] for k in summary["metadata"]}
    assert f"{summary['tps_percent']:.1f}" == metadata["PD-L1 Predicted TPS % (H&E)"]
    assert summary["run_id"] == metadata["PD-L1 run"] == done.run_id
    # What adds up is the image's too (the closing table and the report show it): nuclei, area, candidates.
    per_core = [m for _, m in written]
    assert summary["nuclei"]["Tumor: Positive"] == sum(m["PD-L1: Num Tumor: Positive"] for m in per_core)
    assert summary["nuclei"]["Tumor: Negative"] == sum(m["PD-L1: Num Tumor: Negative"] for m in per_core)
    assert summary["analysed_area_um2"] > 0 and summary["sua_candidates"] is not None
    _each_core_is_kept_for_the_review_queue(project, summary, children)
    written.clear()
    (again,) = run_batch([project], replace(config, resume=True), models=models)  # the same command, --resume
    assert again.state == "skipped" and written == []
    with (project / "pdl1" / "targets.csv").open(newline="", encoding="utf-8") as fh:
        assert [r["target"] for r in csv.DictReader(fh)] == ["A-1", "A-2", "B-1"]  # kept rows of a skipped image
    # Each core's outline is kept for the report's thumbnail (the GeoJSON has only the first core's objects), and
    # the report lists every core, the missing one too.
    assert [t.outline.equals(c.roi) for t, c in zip(rows_from_summary(summary), cores, strict=True)] == [True] * 3
    page = write_report(project)[0].read_text()
    assert "Per target: 3 TMA cores (2 analysed, 1 missing), in the grid's order" in page
    assert "<td>A-2</td><td colspan='4'>missing: marked missing in QuPath, not analysed</td>" in page
    # Analysed whole again (without QuPath), its every-core regions of the earlier run go: no one reads them as its.
    (whole,) = run_batch([project], RunConfig(pipeline=config.pipeline, qupath="never"), models=models)
    assert whole.state == "done" and not (project / "pdl1" / "1" / "target_regions.json").exists()


def _each_core_is_kept_for_the_review_queue(project, summary, children):
    """What `pdl1 review-queue` scores a TMA by, and the regions it lists, are every core's, not the first one's:
    the numbers of each core in its row, the reasons of each named, and every core's regions beside the GeoJSON
    (which keeps the first core's objects, as pdl1_import_results.groovy imports them)."""
    import numpy as np

    from bridge.project import review_reason_text
    from bridge.qupath_geojson import read_features
    from bridge.review_queue import build_queue
    from bridge.targets import read_target_regions

    analysed = [t for t in rows_from_summary(summary) if t.state == "analysed"]
    assert [t.target for t in analysed] == ["A-1", "B-1"]
    for t in analysed:
        assert t.analysed_area_um2 > 0 and t.mutual_information_mean > 0 and t.sua_area_limit_pct > 0
        assert t.sua_candidate_area_pct is not None and t.nuclei_entropy_mean is None  # an H&E
        assert (t.out_of_domain_score is None) == (t.out_of_domain_limit is None)
    assert sum(t.analysed_area_um2 for t in analysed) == pytest.approx(summary["analysed_area_um2"])
    # The image's review reasons are every core's, each named (the first core's alone said nothing of B-1's).
    assert analysed[1].review_reasons and analysed[1].review_reasons[0].startswith("fewer than 100 tumour cells")
    assert [review_reason_text(r) for r in summary["details"]["review_reasons"]] == [
        f"{t.target}: {reason}" for t in analysed for reason in t.review_reasons
    ]
    # Every core's regions, candidates and tiles, of this run; objects.geojson holds A-1's.
    record = read_target_regions(project / "pdl1" / "1" / "target_regions.json")
    assert record.run_id == summary["run_id"] and [name for name, _ in record.targets] == ["A-1", "B-1"]
    for name, objects in record.targets:
        own = [o for o in children[name] if o.object_type in ("annotation", "tile")]
        assert own and [o.geometry.bounds for o in objects] == [o.geometry.bounds for o in own]
    # And every core's nuclei as QuPath got them (to 0.1 px), for `pdl1 train --from-review`.
    for (name, _), nuclei in zip(record.targets, record.nuclei, strict=True):
        own = [o for o in children[name] if o.object_type == "detection"]
        assert len(own) == len(nuclei.xy) > 0 and nuclei.classes == tuple(o.classification for o in own)
        assert np.abs(nuclei.xy - [(o.geometry.x, o.geometry.y) for o in own]).max() <= 0.05 + 1e-9
    geojson = [o for o in read_features(project / "pdl1" / "1" / "objects.geojson")][1:]
    assert [o.geometry.bounds for o in geojson if o.object_type != "detection"] == [
        o.geometry.bounds for o in record.targets[0][1]
    ]
    (entry,), _ = build_queue(project, regions_per_entry=10_000)
    assert {r.why.split(":")[0] for r in entry.regions} == {"core A-1", "core B-1"}


def test_through_qupath_a_review_in_a_tma_s_second_core_is_read_for_training(
    tmp_path, slides, models, fake_qupath, monkeypatch
):
    # A person deletes an FN candidate of the second core and reclassifies one of its nuclei; `pdl1 train
    # --from-review` takes both as labels. objects.geojson, the first core's output, knew neither: the dismissal was
    # lost uncounted and the nucleus was "not in the last run's output".
    from dataclasses import replace

    from bridge import qupath
    from bridge.labels import UNRECORDED_NUCLEI_COUNT, LabelRules, export_path, read_project_labels
    from bridge.qupath_geojson import to_feature
    from bridge.targets import read_target_regions

    cores = [stand_in_core("A-1", 400, 1100, radius_px=120), stand_in_core("A-2", 400, 400, radius_px=300)]
    children = {}  # each core's objects as QuPath gets them
    monkeypatch.setattr(qupath, "tma_cores", lambda entry: cores)
    monkeypatch.setattr(
        qupath,
        "write_children",
        lambda entry, parent, objects, measurements: children.setdefault(parent.name, list(objects)),
    )
    monkeypatch.setattr(qupath, "core_is_analysed", lambda core: False)
    project = tmp_path / "project"
    init_project_files(project, [slides[0]])
    config = RunConfig(pipeline=PipelineConfig(device="cpu"), qupath="always", stain="H&E")
    (done,) = run_batch([project], config, models=models)
    assert done.state == "done", done.error
    class_names = read_target_regions(project / "pdl1" / "1" / "target_regions.json").nuclei[1].class_names
    second = children["A-2"]
    candidate = next(o for o in second if o.classification == "PD-L1 FN candidate")
    nucleus = next(o for o in second if o.object_type == "detection")
    other = next(c for c in class_names if c != nucleus.classification)
    reviewed = [o for o in children["A-1"] + second if o is not candidate and o is not nucleus]
    reviewed.append(replace(nucleus, classification=other))
    export_path(project, "1").parent.mkdir(parents=True, exist_ok=True)
    export_path(project, "1").write_text(json.dumps([to_feature(o) for o in reviewed]))
    rules = LabelRules(class_names=class_names, from_review=True)
    (labels,) = read_project_labels(project, rules=rules, entries=["1"], qupath="never")
    assert labels.counts["reviewed: PD-L1 FN candidate deleted (PD-L1 negative)"] == 1
    assert labels.negative.symmetric_difference(candidate.geometry).area < 1e-6
    assert labels.counts["reviewed: nuclei reclassified"] == 1 and UNRECORDED_NUCLEI_COUNT not in labels.counts
    assert labels.points_xy.tolist() == [[nucleus.geometry.x, nucleus.geometry.y]]
    assert labels.points_class.tolist() == [class_names.index(other)]


def test_without_qupath_the_table_has_the_whole_image_and_the_report_still_reads(tmp_path, slides, models):
    import csv

    project = tmp_path / "project"
    init_project_files(project, [slides[1]])
    config = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="never")
    (done,) = run_batch([project], config, models=models)
    assert done.state == "done", done.error
    with (project / "pdl1" / "targets.csv").open(newline="", encoding="utf-8") as fh:
        (row,) = csv.DictReader(fh)
    assert (row["image"], row["target"], row["target_type"], row["tps_percent"]) == (
        "s32.svs",
        "PD-L1 analysis",
        "whole image",
        "",  # no nuclei, no TPS
    )
    html_path, csv_path = write_report(project)
    assert html_path.is_file() and csv_path.is_file()


def test_through_qupath_a_tma_case_is_compared_core_by_core_in_pairs_json_its_csv_and_the_table(
    tmp_path, ihc_pair, models, fake_qupath, monkeypatch, capsys
):
    # An H&E TMA and the PD-L1 IHC TMA of the same block: the pair compared the images whole, one TPS over every
    # core on each side. Each core's H&E-predicted TPS is now set beside its IHC's, matched by the grid labels; a
    # core missing in the IHC's grid, or in one grid only, is listed as not compared and says why.
    import csv

    from bridge import qupath
    from bridge.cli.common import pairs_table

    def core(name, x, y, *, missing=False):
        return stand_in_core(name, x, y, radius_px=420, missing=missing)

    grids = {
        "he_271.svs": [core("A-1", 520, 520), core("A-2", 1520, 520), core("B-1", 520, 1520), core("C-9", 1520, 1520)],
        "ihc_271.svs": [
            core("A-1", 520, 520),
            core("A-2", 1520, 520, missing=True),  # no tissue on the IHC's section
            core("b-1", 520, 1520),  # relabelled by hand: capitals do not matter
            core("B-2", 1520, 1520),
        ],
    }
    monkeypatch.setattr(qupath, "tma_cores", lambda entry: grids[entry.image_name])
    monkeypatch.setattr(qupath, "core_is_analysed", lambda core: False)  # the missing A-2 was never analysed
    he, ihc = ihc_pair
    project = tmp_path / "project"
    init_project_files(project, [he, ihc])
    outcomes = run_batch([project], RunConfig(pipeline=PipelineConfig(device="cpu"), qupath="always"), models=models)
    assert [o.state for o in outcomes] == ["done", "done"], [o.error for o in outcomes]
    summaries = [json.loads((project / "pdl1" / o.key / "summary.json").read_text()) for o in outcomes]
    assert [s["stain"] for s in summaries] == ["H&E", "H-DAB"]
    he_rows, ihc_rows = ({r["target"].casefold(): r for r in s["targets"]} for s in summaries)
    case = json.loads((project / "pdl1" / "pairs.json").read_text())["cases"]["271"]
    assert case["registration"]["ok"] and case["comparison"]["tps_ihc"] == summaries[1]["tps_percent"]  # kept whole
    cores = {c["core"]: c for c in case["cores"]}
    assert list(cores) == ["A-1", "A-2", "B-1", "C-9", "B-2"]  # the H&E's grid order, then the IHC's others
    assert [(c["state_he"], c["state_ihc"]) for c in cores.values()] == [
        ("analysed", "analysed"),
        ("analysed", "missing"),
        ("analysed", "analysed"),
        ("analysed", "absent"),
        ("absent", "analysed"),
    ]
    assert cores["A-2"]["why_not_compared"] == "marked missing in the IHC's grid"
    assert cores["C-9"]["why_not_compared"] == "no core of this name in the IHC's grid"
    assert cores["B-2"]["why_not_compared"] == "no core of this name in the H&E's grid"
    for name in ("A-1", "B-1"):  # each side's numbers are its own core's, as its targets row has them
        c, h, i = cores[name], he_rows[name.casefold()], ihc_rows[name.casefold()]
        assert (c["tps_he_predicted"], c["tps_ihc"]) == (h["tps_percent"], i["tps_percent"])
        assert (c["tumour_cells_he"], c["tumour_cells_ihc"]) == (h["tumour_cells"], i["tumour_cells"])
        assert c["needs_review"] == (h["needs_review"] or i["needs_review"])
        assert c["compared"] == (min(h["tumour_cells"], i["tumour_cells"]) >= 100)
    assert cores["A-1"]["compared"] and min(cores["A-1"]["tumour_cells_he"], cores["A-1"]["tumour_cells_ihc"]) > 1000
    # B-1 lies at the phantom's edge: under 100 tumour cells, listed with its numbers but not counted.
    assert not cores["B-1"]["compared"] and "under 100: its TPS is undefined" in cores["B-1"]["why_not_compared"]
    a1 = cores["A-1"]
    assert a1["categories_agree"] == (a1["category_he"] == a1["category_ihc"])
    summary = case["cores_summary"]
    assert (summary["cores"], summary["compared"], summary["not_compared"]) == (5, 1, 4)
    assert summary["categories_agree"] == int(a1["categories_agree"])
    assert summary["mean_abs_tps_difference"] == pytest.approx(abs(a1["tps_he_predicted"] - a1["tps_ihc"]))
    assert summary["cohen_kappa"] is None and summary["notes"] == [
        "1 core compared: kappa and the correlations need at least 5"
    ]
    with (project / "pdl1" / "pairs_cores.csv").open(newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    assert [(r["case"], r["he_image"], r["ihc_image"], r["core"], r["compared"]) for r in table] == [
        ("271", "he_271.svs", "ihc_271.svs", "A-1", "1"),
        ("271", "he_271.svs", "ihc_271.svs", "A-2", "0"),
        ("271", "he_271.svs", "ihc_271.svs", "B-1", "0"),
        ("271", "he_271.svs", "ihc_271.svs", "C-9", "0"),
        ("271", "he_271.svs", "ihc_271.svs", "B-2", "0"),
    ]
    assert (table[0]["tps_he_predicted"], table[0]["tps_ihc"]) == (
        f"{a1['tps_he_predicted']:.1f}",
        f"{a1['tps_ihc']:.1f}",
    )
    assert table[1]["tps_ihc"] == "" and table[1]["why_not_compared"] == "marked missing in the IHC's grid"

    capsys.readouterr()
    pairs_table(project / "pdl1" / "pairs.json")
    out = capsys.readouterr().out
    assert "TMA cores" in out.splitlines()[2], out
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines()]
    rows = [r for r in rows if r]
    assert rows[0][0] == "271" and " ".join(r[7] for r in rows if r[7]).startswith("1 of 5 cores compared: ")


def test_two_entries_of_one_file_name_are_not_both_analysed_from_one_scan_found_for_them(tmp_path, slides):
    # helper-155: entries caseA/slide.svs and caseB/slide.svs, moved, only caseA's under --search-dir: both were
    # analysed from it and reported done, with one TPS.
    from bridge.run import _jobs

    made = tmp_path / "made"
    for case in ("caseA", "caseB"):
        (made / case).mkdir(parents=True)
        shutil.copy(slides[0], made / case / "slide.svs")
    project = tmp_path / "project"
    init_project_files(project, [made / "caseA" / "slide.svs", made / "caseB" / "slide.svs"])
    (tmp_path / "local").mkdir()
    (made / "caseA").rename(tmp_path / "local" / "caseA")
    shutil.rmtree(made)
    jobs, _, _ = _jobs([project], _config(search_dirs=(tmp_path / "local",)))
    assert [(j.key, j.image) for j in jobs] == [("1", tmp_path / "local" / "caseA" / "slide.svs"), ("2", None)]
    assert str(jobs[1].error).startswith("image of entry 2 (slide.svs) has moved, and the only file found for it")


def test_the_image_score_counts_the_cells_of_a_target_nested_in_another_once(tmp_path):
    # helper-156: a hotspot analysed inside an analysed outline of the whole image: 1401 of 2855 tumour cells over the
    # outline (TPS 49.1 %), 123 of 584 in the hotspot; the image's TPS was written 44.3 %, the hotspot's cells twice.
    from shapely.geometry import box

    from bridge.run import entry_metadata, merged_targets
    from bridge.targets import TargetRow
    from inference import Cps, tumour_proportion_score

    class Result:  # what entry_metadata reads of a SlideResult
        seg_model = nuclei_model = None
        stain = "H-DAB"

    def part(positive, negative, immune, area_um2, run):
        result = Result()
        result.run_id, result.tps = run, tumour_proportion_score(positive, negative)
        result.cps = Cps(positive, immune, positive + negative, None)
        counts = {"tumour_positive": positive, "tumour_negative": negative, "immune_positive": immune}
        return {
            "metadata": entry_metadata(result),
            "metadata_counts": counts,
            "details": {"review_reasons": []},
            "uncertainty_flag": False,
            "nuclei": {"Tumor: Positive": positive, "Tumor: Negative": negative},
            "analysed_area_um2": area_um2,
        }

    rows = [
        TargetRow("ihc.svs", "1", "Tissue", "annotation", "analysed", outline=box(0, 0, 2048, 2048)),
        TargetRow("ihc.svs", "1", "Hotspot", "annotation", "analysed", outline=box(512, 512, 1024, 1024)),
    ]
    parts = [part(1401, 1454, 105, 1e6, "r1"), part(123, 461, 20, 6.5e4, "r2")]
    summary = merged_targets({"details": {}}, parts, rows)
    assert (summary["tps_percent"], summary["metadata"]["PD-L1 TPS %"]) == (pytest.approx(100 * 1401 / 2855), "49.1")
    assert summary["metadata"]["PD-L1 CPS"] == "52.7" and summary["cps"] == pytest.approx(100 * 1506 / 2855)
    assert summary["analysed_area_um2"] == 1e6 and summary["nuclei"] == {
        "Tumor: Positive": 1401,
        "Tumor: Negative": 1454,
    }
    apart = [replace(rows[1], outline=box(2048, 0, 2560, 512))]  # beside it: both count
    assert merged_targets({"details": {}}, parts, [rows[0], *apart])["tps_percent"] == pytest.approx(100 * 1524 / 3439)
