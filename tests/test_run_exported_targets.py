"""`pdl1 run PROJECT` without QuPath: annotation targets and TMA cores read from pdl1_export_labels.groovy's export,
their results written for pdl1_import_results.groovy by each object's ID."""

import csv
import json
import logging
import os
import uuid
from pathlib import Path

import pytest
from shapely.geometry import Point, box, mapping

from bridge.exported_targets import read_exported_entry, target_objects_path
from bridge.init_project import init_project_files
from bridge.project import ProjectError
from bridge.qupath_geojson import QuPathObject, read_features, to_feature
from bridge.run import RunConfig, run_batch
from inference.pipeline import Models, PipelineConfig
from tests.helpers import small_phantoms

EXPORT_SCRIPT = "qupath_scripts/pdl1_export_labels.groovy"


@pytest.fixture(scope="module")
def models():
    return Models(PipelineConfig(device="cpu", run_nuclei=False))


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    return small_phantoms(tmp_path_factory.mktemp("slides"), [(41, 60, 0.0), (42, 10, 0.0)])


def _config(**kw):
    return RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="never", **kw)


def _annotation(geometry, cls=None, name=None, measurements=None) -> dict:
    obj = QuPathObject(
        geometry, "annotation", cls, measurements or {}, name=name, id=str(uuid.uuid4()), color=(9, 9, 9)
    )
    return to_feature(obj)


def _core(geometry, name, missing=False) -> dict:
    # As QuPath's Gson writes a TMA core (QuPathTypeAdapters.java v0.4.4:300-311, 398-400; v0.7.0:297-308, 390-392).
    props = {"objectType": "tmaCore", "name": name, "isMissing": missing}
    return {"type": "Feature", "id": str(uuid.uuid4()), "geometry": mapping(geometry), "properties": props}


def _export(project: Path, entry_id: str, features: list[dict]) -> Path:
    path = project / "pdl1" / "labels" / f"{entry_id}.geojson"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(features), encoding="utf-8")
    return path


def _project(tmp_path, slides) -> Path:
    project = tmp_path / "project"
    init_project_files(project, slides)
    return project


def test_annotation_targets_are_read_from_the_export_and_each_ones_results_written_under_its_id(
    tmp_path, slides, models, caplog
):
    project = _project(tmp_path, slides[:1])
    one, two = box(100, 100, 700, 700), box(800, 800, 1400, 1300)
    tumour_a, tumour_b = _annotation(one, "Tumor", "nest A"), _annotation(two, "Tumor")
    own = _annotation(box(120, 120, 200, 200), "PD-L1 positive", measurements={"PD-L1 probability mean": 0.9})
    other = _annotation(box(0, 0, 50, 50), "Stroma")
    cell = to_feature(QuPathObject(Point(300, 300), "detection", "Tumor", {}, color=(9, 9, 9)))
    _export(project, "1", [tumour_a, own, other, tumour_b, cell])
    with caplog.at_level(logging.INFO):
        (outcome,) = run_batch([project], _config(target_classes=("Tumor",)), models=models)
    assert outcome.state == "done", outcome.error
    folder = project / "pdl1" / "1"
    summary = json.loads((folder / "summary.json").read_text())
    rows = summary["targets"]
    assert [(r["target"], r["target_type"], r["object_id"]) for r in rows] == [
        ("nest A", "annotation", tumour_a["id"]),
        ("Tumor", "annotation", tumour_b["id"]),
    ]
    stamp = summary["provenance"]["targets_export"]
    assert stamp["path"] == "pdl1/labels/1.geojson"  # in the project, which may move
    for feature, outline in ((tumour_a, one), (tumour_b, two)):
        objects = list(read_features(target_objects_path(folder, feature["id"])))
        head, children = objects[0], objects[1:]
        assert head.id == feature["id"] and head.geometry.equals(outline)
        assert head.classification is None and "PD-L1: Uncertainty flag" in head.measurements
        assert children, "a target's regions and tiles"
        # Each target's own, in its outline to a pixel of the segmentation (2 µm/px: 4 px here), not its neighbour's.
        assert all(outline.buffer(4).covers(c.geometry) for c in children)
    assert sorted(p.name for p in (folder / "target_objects").iterdir()) == sorted(
        f"{f['id']}.geojson" for f in (tumour_a, tumour_b)
    )
    table = list(csv.DictReader((project / "pdl1" / "targets.csv").open(encoding="utf-8")))
    assert [r["target"] for r in table] == ["nest A", "Tumor"]
    assert "s41.svs: analysing annotation nest A" in caplog.text

    # --resume keeps it while its export is the same, and analyses it again once the export changed.
    (again,) = run_batch([project], _config(target_classes=("Tumor",), resume=True), models=models)
    assert again.state == "skipped"
    _export(project, "1", [tumour_b])
    (fresh,) = run_batch([project], _config(target_classes=("Tumor",), resume=True), models=models)
    assert fresh.state == "done"
    # The target no longer exported is no longer there for the import to put back.
    assert [p.name for p in (folder / "target_objects").iterdir()] == [f"{tumour_b['id']}.geojson"]


def test_asked_for_targets_without_an_export_fail_that_image_with_the_script_to_run(tmp_path, slides, models):
    project = _project(tmp_path, slides)
    _export(project, "2", [_annotation(box(100, 100, 600, 600), "Tumor")])
    outcomes = run_batch([project], _config(target_classes=("Tumor",)), models=models)
    assert [o.state for o in outcomes] == ["failed", "done"]
    assert outcomes[0].error == (
        "s41.svs: its annotations of class ['Tumor'] or name [] are in QuPath's data, which only QuPath reads, and "
        "this run does not go through QuPath (none here, or --qupath never); they are read from the export of its "
        f"objects, {project / 'pdl1' / 'labels' / '1.geojson'}, which is not there: run {EXPORT_SCRIPT} on s41.svs "
        "in QuPath (or Run for project), then run again; or "
        "install QuPath 0.4.4 to 0.6 here (paquo finds it through PAQUO_QUPATH_DIR), which reads the annotations "
        "itself"
    )


def test_an_exported_tma_grid_is_analysed_core_by_core_without_asking_and_a_missing_core_is_left_alone(
    tmp_path, slides, models
):
    project = _project(tmp_path, slides[:1])
    cores = [_core(Point(400, 400).buffer(300), "A-1"), _core(Point(1100, 400).buffer(300), "A-2", missing=True),
             _core(Point(400, 1100).buffer(300), "B-1")]  # fmt: skip
    _export(project, "1", [_annotation(box(0, 0, 40, 40), "Stroma"), *cores])
    (outcome,) = run_batch([project], _config(), models=models)
    assert outcome.state == "done", outcome.error
    summary = json.loads((project / "pdl1" / "1" / "summary.json").read_text())
    assert [(r["target"], r["target_type"], r["state"], r["object_id"]) for r in summary["targets"]] == [
        ("A-1", "TMA core", "analysed", cores[0]["id"]),
        ("A-2", "TMA core", "missing", cores[1]["id"]),  # from the export too, though not analysed
        ("B-1", "TMA core", "analysed", cores[2]["id"]),
    ]
    written = sorted(p.stem for p in (project / "pdl1" / "1" / "target_objects").iterdir())
    assert written == sorted([cores[0]["id"], cores[2]["id"]])


def test_an_export_without_targets_or_a_grid_leaves_the_whole_image_analysed_as_before(
    tmp_path, slides, models, caplog
):
    project = _project(tmp_path, slides[:1])
    _export(project, "1", [_annotation(box(100, 100, 600, 600), "Training region")])
    (outcome,) = run_batch([project], _config(), models=models)
    assert outcome.state == "done", outcome.error
    folder = project / "pdl1" / "1"
    summary = json.loads((folder / "summary.json").read_text())
    assert [r["target_type"] for r in summary["targets"]] == ["whole image"]
    assert "targets_export" not in summary["provenance"] and not (folder / "target_objects").exists()
    assert next(iter(read_features(folder / "objects.geojson"))).classification == "PD-L1 analysis"
    # --resume keeps it; once its objects are exported with a TMA grid, it analyses the cores.
    (kept,) = run_batch([project], _config(resume=True), models=models)
    assert kept.state == "skipped"
    _export(project, "1", [_core(Point(400, 400).buffer(300), "A-1")])
    with caplog.at_level(logging.WARNING):
        (cored,) = run_batch([project], _config(resume=True), models=models)
    assert cored.state == "done"
    assert "its objects were exported since, with 1 targets to analyse; analysing it again" in caplog.text
    summary = json.loads((folder / "summary.json").read_text())
    assert [r["target"] for r in summary["targets"]] == ["A-1"]


def test_an_export_older_than_qupaths_last_save_of_other_annotations_is_refused(tmp_path, slides, models):
    project = _project(tmp_path, slides[:1])
    exported = _export(project, "1", [_annotation(box(100, 100, 600, 600), "Tumor")])
    data = project / "data" / "1"
    data.mkdir(parents=True, exist_ok=True)
    counts = {"hierarchy": {"annotationClassificationCounts": {"Tumor": 2}}}  # one drawn after the export
    (data / "summary.json").write_text(json.dumps(counts))
    os.utime(exported, (1_000_000_000, 1_000_000_000))
    (outcome,) = run_batch([project], _config(target_classes=("Tumor",)), models=models)
    assert outcome.state == "failed"
    assert "(Tumor: 2 saved, 1 exported: annotations drawn, or results added, since the export)" in outcome.error
    assert f"run {EXPORT_SCRIPT} on s41.svs in QuPath" in outcome.error


@pytest.mark.parametrize(
    ("text", "why"),
    [('[{"type": "Feature"', "does not read"), ('{"entry_id": "1"}', "not GeoJSON objects")],
    ids=["cut short", "another file"],
)
def test_an_export_that_does_not_read_is_named_with_the_fix(tmp_path, text, why):
    project = tmp_path / "project"
    path = project / "pdl1" / "labels" / "1.geojson"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(ProjectError) as err:
        read_exported_entry(project, "1", "s.svs")
    assert why in str(err.value) and "pdl1_export_labels.groovy on s.svs" in str(err.value)
    assert str(path) in str(err.value)


def test_targets_of_a_plain_slide_still_need_a_project(tmp_path, slides, models):
    with pytest.raises(ProjectError, match="need a QuPath project"):
        run_batch([slides[0]], _config(out=tmp_path, target_classes=("Tumor",)), models=models)


def test_without_qupath_a_run_asking_for_targets_goes_on_and_says_where_they_are_read_from(
    tmp_path, slides, models, monkeypatch, caplog
):
    # It refused the whole run: QuPath 0.7 users, whom paquo cannot reach, had no batch run of their annotations.
    from bridge import qupath

    monkeypatch.setattr(qupath, "qupath_available", lambda: (False, "no valid qupath installation found"))
    project = _project(tmp_path, slides[:1])
    config = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="auto", target_classes=("T",))
    (outcome,) = run_batch([project], config, models=models)
    assert outcome.state == "failed" and f"run {EXPORT_SCRIPT} on s41.svs in QuPath" in outcome.error
    assert (
        "QuPath not found: writing GeoJSON sidecars under pdl1/ for "
        "qupath_scripts/pdl1_import_results.groovy; each image's annotation targets and TMA cores are read from its "
        f"export by {EXPORT_SCRIPT} (pdl1/labels/<entry ID>.geojson), and an image without one is analysed whole"
    ) in caplog.text


def test_an_export_in_the_scripts_layout_is_read_without_parsing_its_cells_and_any_other_layout_a_feature_at_a_time(
    tmp_path, monkeypatch
):
    # pdl1_export_labels.groovy writes "[", one object a line (QuPath's compact Gson), "]": a slide with QuPath's cell
    # detection has a million cells, which the targets do not need. QuPath's own export is read a feature at a time.
    from bridge import qupath_geojson

    named = _annotation(box(0, 0, 90, 90), "Tumor", name='"objectType":"detection"')  # escaped inside the name
    cells = [to_feature(QuPathObject(Point(i, i), "detection", "Tumor", {}, color=(9, 9, 9))) for i in range(3)]
    core = _core(Point(50, 50).buffer(40), "A-1")
    features = [named, *cells, core]
    compact = [json.dumps(f, separators=(",", ":"), ensure_ascii=False) for f in features]
    layouts = {
        "script": "[\n" + ",\n".join(compact) + "\n]\n",
        "one line": json.dumps(features),
        "pretty": json.dumps(features, indent=2),
    }
    real = qupath_geojson.json.loads
    parsed = []  # the objectType of each feature parsed on its own ("whole": the file parsed at once)

    def loads(text, *args, **kwargs):
        out = real(text, *args, **kwargs)
        parsed.append(out["properties"]["objectType"] if isinstance(out, dict) else "whole")
        return out

    monkeypatch.setattr(qupath_geojson.json, "loads", loads)
    streamed = qupath_geojson._features_streamed
    monkeypatch.setattr(
        qupath_geojson, "_features_streamed", lambda fh, unparsed=(): (parsed.append("streamed"), *streamed(fh))[1:]
    )
    for layout, text in layouts.items():
        path = tmp_path / layout / "pdl1" / "labels" / "1.geojson"
        path.parent.mkdir(parents=True)
        path.write_text(text, encoding="utf-8")
        parsed.clear()
        entry = read_exported_entry(tmp_path / layout, "1", "s.svs")
        assert [a.object_id for a in entry.annotations] == [named["id"]], layout
        assert [c.object_id for c in entry.cores] == [core["id"]], layout
        # The script's layout: a line at a time, no cell parsed; another a feature at a time, never whole.
        assert parsed == (["annotation", "tmaCore"] if layout == "script" else ["streamed"]), layout


def test_the_training_regions_of_a_project_a_real_qupath_wrote_are_analysed_from_its_own_export(
    tmp_path, fixtures_dir, models
):
    # The labelled fixture: QuPath 0.4.4's project and its own GeoJSON of entry 1's objects (a FeatureCollection,
    # pretty-printed: read whole), saved after the export as QuPath saves after a headless script. Its annotation
    # counts by class are what QuPath's summary.json says, so the export is not out of date; the tool's own FN
    # candidate is no target, the pathologist's Training regions are.
    import shutil

    fixture = fixtures_dir / "qupath-0.4.4-labels"
    shutil.copytree(fixture / "project", tmp_path / "project")
    shutil.copy(fixture / "he-1357.svs", tmp_path / "he-1357.svs")
    project = tmp_path / "project"
    export = project / "pdl1" / "labels" / "1.geojson"
    export.parent.mkdir(parents=True)
    shutil.copy(fixture / "objects-labelled-by-pathologist-0.4.4.geojson", export)
    os.utime(export, (1_000_000_000, 1_000_000_000))  # older than QuPath's save of the entry
    regions = [
        f for f in json.loads(export.read_text())["features"] if f["properties"].get("name", "").startswith("Training")
    ]
    outcomes = run_batch([project], _config(target_classes=("Training region",)), models=models)
    assert outcomes[0].state == "done", outcomes[0].error
    summary = json.loads((project / "pdl1" / "1" / "summary.json").read_text())
    assert [(r["target"], r["object_id"]) for r in summary["targets"]] == [
        (f["properties"]["name"], f["id"]) for f in regions
    ]
    # Entry 2 (the same file typed H-DAB) has no export: named with the script to run, not analysed whole.
    assert outcomes[1].state == "failed" and EXPORT_SCRIPT in outcomes[1].error


def test_a_review_of_exported_targets_results_imported_and_exported_again_becomes_labels(tmp_path, slides):
    # The review loop on QuPath 0.7: export, run, import (each target's objects under its annotation), reclassify a
    # nucleus, export again, `pdl1 train --from-review`: the change is a label, what was left as written is not.
    from bridge.labels import LabelRules, read_project_labels

    project = _project(tmp_path, slides[:1])
    nest = _annotation(box(200, 200, 900, 900), "Tumor", "nest")
    _export(project, "1", [nest])
    pipeline = PipelineConfig(device="cpu")
    (outcome,) = run_batch([project], RunConfig(pipeline=pipeline, qupath="never", target_classes=("Tumor",)))
    assert outcome.state == "done", outcome.error
    written = json.loads(target_objects_path(project / "pdl1" / "1", nest["id"]).read_text(encoding="utf-8"))
    stand_in, children = written["features"][0], written["features"][1:]
    nuclei = [f for f in children if f["properties"]["objectType"] == "detection"]
    assert len(nuclei) > 20
    # What QuPath holds after the import and the review, exported: the annotation with the run's measurements, its
    # objects, one nucleus reclassified.
    changed = next(f for f in nuclei if f["properties"]["classification"]["name"] != "Tumor: Positive")
    positive = {"names": ["Tumor", "Positive"], "color": [200, 50, 50]}
    reviewed = {**changed, "properties": {**changed["properties"], "classification": positive}}
    annotation = {**nest, "properties": {**nest["properties"], "measurements": stand_in["properties"]["measurements"]}}
    _export(project, "1", [annotation, *(reviewed if f is changed else f for f in children)])
    rules = LabelRules(class_names=("Tumor: Positive", "Tumor: Negative", "Other"), from_review=True)
    (labels,) = read_project_labels(project, rules=rules, qupath="never")
    assert labels.counts["reviewed: nuclei reclassified"] == 1
    assert labels.points_xy.tolist() == [changed["geometry"]["coordinates"]]
    # The other nuclei and the regions (and any FN candidates) as the run wrote them.
    regions = [f for f in children if f["properties"]["objectType"] == "annotation"]
    assert regions and labels.counts["skipped: pdl1 results as written (not reviewed)"] == len(nuclei) - 1 + len(
        regions
    )
