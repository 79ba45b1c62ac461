"""pdl1_import_results.groovy run whole (QuPath stand-ins) on `pdl1 run`'s results of targets read from an export:
each one's objects go under the annotation of its ID, a re-import replaces them, a moved or deleted target is said."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import Polygon, mapping

from bridge.exported_targets import target_objects_path
from bridge.init_project import init_project_files
from bridge.qupath_geojson import QuPathObject, read_features, to_feature
from bridge.run import RunConfig, run_batch
from inference.phantom.pyramid import write_phantom
from inference.phantom.scene import PhantomSpec
from inference.pipeline import Models, PipelineConfig
from tests.test_groovy_pixel_upload import _run_script, _square
from tests.test_groovy_scripts import IMPORT, needs_groovy


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """A project of one phantom whose two Tumor annotations `pdl1 run` analysed from their export, without QuPath."""
    tmp = tmp_path_factory.mktemp("exported")
    slide = tmp / "s51.svs"
    write_phantom(slide, PhantomSpec(1536, 1536, seed=51, tps_percent=50))
    qpproj = init_project_files(tmp / "project", [slide])
    targets = [
        {**_square("nest A", 100, 100, 500), "cls": "Tumor"},
        # a triangle, the top left half of its bounds: redrawn as the other half, it keeps bounds and area
        {**_square("nest B", 800, 800, 500), "vertices": [[800, 800], [1300, 800], [800, 1300]], "cls": "Tumor"},
    ]
    export = qpproj.parent / "pdl1" / "labels" / "1.geojson"
    export.parent.mkdir(parents=True)
    features = [
        to_feature(QuPathObject(Polygon(t["vertices"]), "annotation", "Tumor", {}, name=t["name"], id=t["id"],
                                color=(200, 0, 0)))
        for t in targets
    ]  # fmt: skip
    export.write_text(json.dumps(features))
    config = RunConfig(
        pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="never", target_classes=("Tumor",)
    )
    (outcome,) = run_batch([qpproj], config, models=Models(config.pipeline))
    assert outcome.state == "done", outcome.error
    png = tmp / "level0.png"
    Image.fromarray(np.full((64, 64, 3), 240, np.uint8)).save(png)
    return qpproj, targets, png


def _setup(qpproj: Path, png: Path, annotations: list, steps: list) -> dict:
    return {
        "server": "OpenslideImageServer", "image": str(png), "level0": str(png), "width": 1536, "height": 1536,
        "mpp": 0.5, "project": str(qpproj), "entry": "1", "annotations": annotations, "steps": steps, "measured": True,
    }  # fmt: skip


@needs_groovy
def test_each_targets_results_go_under_the_annotation_of_its_id_and_a_reimport_replaces_them(tmp_path, analysed):
    qpproj, targets, png = analysed
    folder = qpproj.parent / "pdl1" / "1"
    written = {t["name"]: list(read_features(target_objects_path(folder, t["id"]))) for t in targets}
    # nest A was analysed in QuPath too (pdl1_analyze.groovy's record of it): the import replaces that output, so its
    # record is set aside, as the whole-image import sets aside the record of the analysis it replaces.
    records = folder / "qupath_analyses"
    records.mkdir(exist_ok=True)
    record = f"{targets[0]['id']}.json"
    (records / record).write_text("{}")
    steps = [{"script": str(IMPORT)}, {"script": str(IMPORT)}]  # imported twice: the second replaces the first
    log, seen = _run_script(tmp_path, _setup(qpproj, png, targets, steps))
    assert seen["records"] == [[], []] and seen["aside"] == [[record], [record]]
    assert log[0].startswith(f"pdl1: set aside {records / record}, the record of the pdl1_analyze.groovy analysis"), log
    count = sum(len(objects) - 1 for objects in written.values())
    assert count > 10  # regions and uncertainty tiles
    assert log.count(f"pdl1: imported {count} objects under 2 of 2 targets for image 1: nest A, nest B") == 2, log
    for name, objects in written.items():
        children = seen["children"][name]
        assert len(children) == len(objects) - 1  # once, not twice
        assert sorted(c["cls"] or "" for c in children) == sorted(o.classification or "" for o in objects[1:])
        assert seen["measured"][name] == pytest.approx(objects[0].measurements)  # the target's TPS and flag
    assert set(seen["children"]) == {"nest A", "nest B"}  # no 'PD-L1 analysis' of the whole image beside them


@needs_groovy
def test_a_target_moved_or_deleted_since_the_export_is_not_imported_and_said_with_the_fix(tmp_path, analysed):
    qpproj, targets, png = analysed
    moved = {**targets[1], "vertices": [[x + 40, y] for x, y in targets[1]["vertices"]]}
    (x0, y0), (x1, _), (_, y1), _ = targets[0]["vertices"]  # nest A redrawn within its bounds: a corner cut off
    redrawn = {**targets[0], "vertices": [[x0, y0], [x1, y0], [x1, y1 - 100], [x1 - 100, y1], [x0, y1]]}
    log, seen = _run_script(tmp_path, _setup(qpproj, png, [moved], [{"script": str(IMPORT)}]))
    assert "pdl1: image 1: not imported: nest A: no annotation or TMA core of ID " in "\n".join(log), log
    assert (
        "pdl1: image 1: not imported: nest B: moved or redrawn since it was exported and analysed; export it again "
        "(pdl1_export_labels.groovy) and run `pdl1 run` on the project again"
    ) in log
    assert log[-1] == "pdl1: imported 0 objects under 0 of 2 targets for image 1"
    assert seen["children"]["nest B"] == []
    log, seen = _run_script(tmp_path, _setup(qpproj, png, [redrawn, targets[1]], [{"script": str(IMPORT)}]))
    assert any(line.startswith("pdl1: image 1: not imported: nest A: moved or redrawn") for line in log), log
    assert log[-1].endswith(" under 1 of 2 targets for image 1: nest B") and seen["children"]["nest A"] == []
    # nest B redrawn as the other half of its bounds: the same bounds and area, another outline (a check of bounds and
    # area let it through)
    flipped = {**targets[1], "vertices": [[1300, 800], [1300, 1300], [800, 1300]]}
    log, seen = _run_script(tmp_path, _setup(qpproj, png, [targets[0], flipped], [{"script": str(IMPORT)}]))
    assert any(line.startswith("pdl1: image 1: not imported: nest B: moved or redrawn") for line in log), log
    assert log[-1].endswith(" under 1 of 2 targets for image 1: nest A") and seen["children"]["nest B"] == []


@needs_groovy
def test_the_cores_results_go_under_each_core_and_replace_an_earlier_whole_image_analysis(tmp_path):
    # As `pdl1 run` through QuPath and pdl1_analyze.groovy do: left, the whole image's TPS over all cores stayed on
    # its 'PD-L1 analysis' and every nucleus in a core was there twice.
    slide = tmp_path / "t52.svs"
    write_phantom(slide, PhantomSpec(1536, 1536, seed=52, tps_percent=50))
    qpproj = init_project_files(tmp_path / "project", [slide])
    cores = [_square(name, x, y, 600) for name, x, y in (("A-1", 100, 100), ("A-2", 800, 100), ("B-1", 100, 800))]
    export = qpproj.parent / "pdl1" / "labels" / "1.geojson"
    export.parent.mkdir(parents=True)
    features = [
        {"type": "Feature", "id": c["id"], "geometry": mapping(Polygon(c["vertices"])),
         "properties": {"objectType": "tmaCore", "name": c["name"], "isMissing": c["name"] == "A-2"}}
        for c in cores
    ]  # fmt: skip
    export.write_text(json.dumps(features))
    config = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="never")
    (outcome,) = run_batch([qpproj], config, models=Models(config.pipeline))
    assert outcome.state == "done", outcome.error
    whole = {**_square("PD-L1 analysis", 0, 0, 1536), "cls": "PD-L1 analysis",
             "measurements": {"PD-L1: Uncertainty flag": 0.0, "PD-L1: Predicted TPS % (H&E)": 50.0}}  # fmt: skip
    records = qpproj.parent / "pdl1" / "1" / "qupath_analyses"
    records.mkdir()
    (records / f"{whole['id']}.json").write_text("{}")  # pdl1_analyze.groovy had analysed the whole image
    png = tmp_path / "level0.png"
    Image.fromarray(np.full((64, 64, 3), 240, np.uint8)).save(png)
    steps = [{"cores": cores, "script": str(IMPORT)}]
    log, seen = _run_script(tmp_path, _setup(qpproj, png, [whole], steps))
    assert (
        "pdl1: removed the earlier whole-image analysis ('PD-L1 analysis' and what this tool put under it: 1 "
        "objects), which scored all TMA cores as one; each core's analysis replaces it" in log
    ), log
    assert "PD-L1 analysis" not in seen["children"] and seen["aside"] == [[f"{whole['id']}.json"]]
    assert log[-1].startswith("pdl1: imported ") and log[-1].endswith(" under 2 of 2 targets for image 1: A-1, B-1")
    assert seen["children"]["A-1"] and seen["children"]["B-1"] and seen["children"]["A-2"] == []
    assert "PD-L1: Uncertainty flag" in seen["measured"]["A-1"] and seen["measured"]["A-2"] == {}


@needs_groovy
def test_the_outline_check_takes_the_same_vertices_without_areas_and_else_compares_areas(tmp_path):
    # sameOutline's helpers run in plain Groovy on ROIs of two calls: vertices (ROI.getAllPoints) and a shape
    # (ROI.getShape). The same vertices, a closing point on one side only, need no shape (a brush annotation's
    # java.awt.geom.Area took seconds), nor do outlines of areas further apart than the tolerance; a triangle against
    # its mirror image (the same area) is told by the area inside one and not the other.
    from tests.test_groovy_scripts import run_groovy

    driver = """
class R {
    List xy; List hole = []
    List getAllPoints() {  // every ring's, as a GeometryROI's
        (xy + hole).collect { new java.awt.geom.Point2D.Double(it[0] as double, it[1] as double) }
    }
    java.awt.Shape getShape() {
        if (xy.size() > 400) throw new IllegalStateException("no shape for the same vertices")
        def path = new java.awt.geom.Path2D.Double(java.awt.geom.Path2D.WIND_EVEN_ODD)
        [xy, hole].findAll { !it.isEmpty() }.each { ring ->
            path.moveTo(ring[0][0] as double, ring[0][1] as double)
            ring.drop(1).each { path.lineTo(it[0] as double, it[1] as double) }
            path.closePath()
        }
        return path
    }
    double area = Double.NaN  // ROI.getArea(): set below where the check may ask
    double getArea() { area }
}
def measured = { R r -> r.area = shapeArea(new java.awt.geom.Area(r.getShape())); r }
def circle = (0..<1000).collect { k ->
    def a = 2 * Math.PI * k / 1000
    [500 + 400 * Math.cos(a), 500 + 400 * Math.sin(a)]
}
def square = [[0, 0], [100, 0], [100, 100], [0, 100]]
def holed = measured(new R(xy: square, hole: [[40, 40], [60, 40], [60, 60], [40, 60]]))
println JsonOutput.toJson([
    sameVertices: sameOutline(new R(xy: circle), new R(xy: circle + [circle[0]])),
    square: sameOutline(measured(new R(xy: square)), measured(new R(xy: [[0, 0], [0, 100], [100, 100], [100, 0]]))),
    flipped: sameOutline(measured(new R(xy: [[0, 0], [100, 0], [0, 100]])),
                         measured(new R(xy: [[100, 0], [100, 100], [0, 100]]))),
    hole: sameOutline(holed, measured(new R(xy: square))),
    holeArea: holed.getArea(),
    // another area, told by the areas alone (no shape asked of these 1000 vertices)
    shrunk: sameOutline(new R(xy: circle, area: 502_000),
                        new R(xy: circle.collect { [it[0] * 0.99, it[1]] }, area: 497_000)),
])
"""
    (said,) = run_groovy(tmp_path, driver, IMPORT)
    # the square's vertices in another order: the same outline, by area
    assert said == {
        "sameVertices": True,
        "square": True,
        "flipped": False,
        "hole": False,
        "holeArea": 9600.0,
        "shrunk": False,
    }
