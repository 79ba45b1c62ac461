"""Against a real QuPath through paquo: run when PAQUO_QUPATH_DIR points at an installation.

Create a project with paquo, add the pathologist's own annotations, run, reopen and check classes,
colours, measurements, counts, parent/child placement and metadata; run again and check nothing is
duplicated and the pathologist's own objects are untouched.
"""

import json
import re
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from shapely.geometry import Point, box

from bridge.classes import ALL_CLASSES
from bridge.init_project import init_project_qupath
from bridge.project import DamagedDataError, ProjectError, read_project
from bridge.run import RunConfig, run_batch
from inference.pipeline import Models, PipelineConfig

pytestmark = pytest.mark.qupath


@pytest.fixture(scope="module")
def models():
    return Models(PipelineConfig(device="cpu"))


def _ancestors(obj):
    """The names of a paquo object's ancestors, nearest first (the image's root last, as None)."""
    names = []
    while (obj := obj.parent) is not None:
        names.append(obj.name)
    return names


def _snapshot(project_dir):
    from paquo.projects import QuPathProject

    with QuPathProject(project_dir, mode="r") as qp:
        classes = {c.id: (c.color.to_rgb() if c.color is not None else None) for c in qp.path_classes}
        entry = qp.images[0]
        hierarchy = entry.hierarchy
        tumour = next(a for a in hierarchy.annotations if a.name == "Tumor ROI")
        by_hand = [a for a in hierarchy.annotations if a.name == "drawn by hand"]
        own_regions = [
            a
            for a in hierarchy.annotations
            if a.path_class is not None and a.path_class.id == "PD-L1 positive" and a.name != "drawn by hand"
        ]
        detections = [d for d in hierarchy.detections if d.path_class is not None]
        return {
            "classes": classes,
            "tumour_measurements": dict(tumour.measurements),
            "tumour_parent": tumour.parent.name,
            "by_hand": [(a.name, dict(a.measurements), a.roi.bounds) for a in by_hand],
            "by_hand_parents": [a.parent.name for a in by_hand],
            "regions": len(own_regions),
            "region_parents": {r.parent.name for r in own_regions},
            "nuclei": len(
                [d for d in detections if d.path_class.id in ("Tumor: Positive", "Tumor: Negative", "Other")]
            ),
            "nucleus_parents": {d.parent.name for d in detections[:50]},
            "tiles": len(hierarchy.tiles),
            "metadata": dict(entry.metadata),
            "nucleus_measurements": set(detections[0].measurements) if detections else set(),
        }


def test_run_writes_into_a_real_project_and_rerun_replaces_only_its_own(tmp_path, phantom_svs, models):
    from paquo.classes import QuPathPathClass
    from paquo.projects import QuPathProject

    project_dir = tmp_path / "qp"
    init_project_qupath(project_dir, [phantom_svs])
    with QuPathProject(project_dir, mode="r+") as qp:
        hierarchy = qp.images[0].hierarchy
        tissue = hierarchy.add_annotation(roi=box(50, 50, 2000, 2000))
        tissue.name = "Tissue"
        # Round, as drawn: uncertainty tiles and regions over its edge are not wholly inside it.
        tumour = hierarchy.add_annotation(roi=Point(1024, 1024).buffer(700), path_class=QuPathPathClass("Tumor"))
        tumour.name = "Tumor ROI"
        mine = hierarchy.add_annotation(roi=box(980, 980, 1100, 1100), path_class=QuPathPathClass("PD-L1 positive"))
        mine.name = "drawn by hand"

    config = RunConfig(pipeline=PipelineConfig(device="cpu"), qupath="always", target_classes=("Tumor",))
    first = run_batch([project_dir], config, models=models)
    assert [o.state for o in first] == ["done"], first
    snap = _snapshot(project_dir)

    for spec in ALL_CLASSES:
        assert snap["classes"][spec.name] == spec.rgb
    # Those are the JVM's classes, coloured by ensure_classes in this process whatever the project says; the file
    # QuPath wrote holds each name with its packed ARGB colour (DefaultProject.writePathClasses, v0.4.4:1076-1100).
    saved = json.loads((project_dir / "classifiers" / "classes.json").read_text())["pathClasses"]
    saved_rgb = {c["name"]: ((c["color"] >> 16) & 255, (c["color"] >> 8) & 255, c["color"] & 255) for c in saved}
    assert {spec.name: saved_rgb.get(spec.name) for spec in ALL_CLASSES} == {s.name: s.rgb for s in ALL_CLASSES}
    for key in (
        "PD-L1: Predicted TPS % (H&E)",
        "PD-L1: Num Tumor: Positive",
        "PD-L1: Positive area %",
        "PD-L1: Uncertainty flag",
        "PD-L1: SUA candidates",
    ):
        assert key in snap["tumour_measurements"], key
    assert snap["regions"] > 0 and snap["region_parents"] == {"Tumor ROI"}
    assert snap["nuclei"] > 100 and snap["nucleus_parents"] == {"Tumor ROI"}
    assert snap["tiles"] > 0
    assert {"Class probability", "PD-L1 positive probability"} <= snap["nucleus_measurements"]
    assert snap["metadata"]["PD-L1 Predicted TPS category (H&E)"] in ("<1%", "1-49%", ">=50%")  # an H&E
    assert snap["metadata"]["PD-L1 run"] == first[0].run_id
    assert snap["by_hand"] == [("drawn by hand", {}, (980.0, 980.0, 1100.0, 1100.0))]

    # A measurement of ours the next run does not write (as a TPS after a run without nuclei) goes; a user's stays.
    with QuPathProject(project_dir, mode="r+") as qp:
        (tumour,) = [a for a in qp.images[0].hierarchy.annotations if a.name == "Tumor ROI"]
        tumour.measurements["PD-L1: Written by an earlier run"] = 1.0
        tumour.measurements["My own score"] = 2.0
        # Objects > Annotations > Resolve hierarchy: nuclei and tiles move under the regions they lie in; the re-run
        # must still find (and replace) them, not leave them beside its new ones.
        hierarchy = qp.images[0].hierarchy
        hierarchy.java_object.resolveHierarchy()
        # What the re-run must cope with: ours moved below other annotations, and ours the ROI no longer holds (QuPath
        # puts an object in the smallest annotation covering it, a detection in the one holding its centroid; on
        # this phantom both regions stick out of the ROI and go up beside it, under Tissue). The regions' nuclei stay
        # in the ROI: Resolve hierarchy inserts the annotations again largest first, each taking from its new parent
        # only the children that lie in it (PathObjectHierarchy.java v0.4.4:276-277, 372-381; v0.7.0:231-232,
        # 327-335), so the ROI took its nuclei before the smaller regions came, and a region beside it takes from
        # Tissue only what lies outside the ROI. The nuclei that move go under annotations inside the ROI (the one
        # drawn by hand).
        assert [d for d in hierarchy.detections if _ancestors(d)[0] != "Tumor ROI"], "Resolve hierarchy moved none"
        # The tiles are trimmed to the ROI (inference.analysis.regions.uncertainty_tiles): each lies within it, to
        # QuPath's 0.01 px grid (paquo reads a ROI through GeometryTools.roiToGeometry, whose precision model rounds
        # each vertex to 0.01 px: GeometryTools.java v0.4.4:100, v0.6.0:127, 1184-1191; a trimmed tile's vertex on
        # the circle moves up to 0.005 px each way), and none leaves it (a piece of a round ROI in a cell is convex:
        # its centroid is in the ROI, which took it before a region of ours over its edge came).
        round_roi = next(a for a in hierarchy.annotations if a.name == "Tumor ROI").roi.buffer(0.01)
        assert hierarchy.tiles and all(round_roi.covers(t.roi) for t in hierarchy.tiles)
        assert [t for t in hierarchy.tiles if t.roi.equals(t.roi.envelope)], "no tile of a whole cell"
        assert [t for t in hierarchy.tiles if not t.roi.equals(t.roi.envelope)], "no tile trimmed to the ROI"
        assert [_ancestors(t) for t in hierarchy.tiles if "Tumor ROI" not in _ancestors(t)] == []
        assert _ancestors(next(a for a in hierarchy.annotations if a.name == "Tumor ROI")) == ["Tissue", None]
        # Entry metadata an earlier run wrote (as the IHC the slide was taken for) goes; a user's stays.
        metadata = qp.images[0].metadata
        metadata["PD-L1 TPS %"] = "55.0"
        metadata["PD-L1 stain"] = "H-DAB"
        metadata["case"] = "B12"
        metadata["PD-L1 TPS (pathologist)"] = "40"
    second = run_batch([project_dir], config, models=models)
    assert [o.state for o in second] == ["done"]
    again = _snapshot(project_dir)
    assert "PD-L1: Written by an earlier run" not in again["tumour_measurements"]
    assert again["tumour_measurements"]["My own score"] == 2.0
    assert set(again["tumour_measurements"]) == set(snap["tumour_measurements"]) | {"My own score"}
    assert again["nuclei"] == snap["nuclei"] and again["regions"] == snap["regions"] and again["tiles"] == snap["tiles"]
    assert again["by_hand"] == snap["by_hand"]
    # The re-run moved neither your ROI out of the annotation holding it nor your annotation out of the ROI.
    assert again["tumour_parent"] == "Tissue" and again["by_hand_parents"] == ["Tumor ROI"]
    assert again["region_parents"] == {"Tumor ROI"}
    assert again["metadata"]["PD-L1 run"] == second[0].run_id != first[0].run_id
    assert "PD-L1 TPS %" not in again["metadata"] and "PD-L1 stain" not in again["metadata"]
    assert again["metadata"]["case"] == "B12" and again["metadata"]["PD-L1 TPS (pathologist)"] == "40"
    assert set(again["metadata"]) == set(snap["metadata"]) | {"case", "PD-L1 TPS (pathologist)"}


# Two ROIs side by side on the 2048² phantom (0.5 µm/px), sharing the edge x = 1030, over the positive region that
# straddles x = 1030 near the top (y 96 to 600). What the analyses write there (pdl1 run's own write path):
# - regions are the map pixels whose centres lie in the ROI (inference.analysis.segment.segment_slide's ``valid``,
#   rasterize_polygon), on a 16 px grid (8 µm/px) anchored at multiples of 16: the pixel at x 1024 to 1040 is the
#   right ROI's, so the right's region reaches 6 px into the left ROI, and 4 px over both ROIs' top edge (y 96);
# - uncertainty tiles are 128 px cells (64 µm) of a grid that starts at each ROI's own bounds, rounded to 16 px,
#   trimmed to the ROI (inference.analysis.regions.uncertainty_tiles): the left ROI's cell column over the shared
#   edge starts at x 960 when the ROI starts at x 70 (70 px of 128 in the left ROI), at x 992 when it starts at x 100
#   (38 px in it), and its tiles end at x 1030; the bottom row's cells (y 992 to 1120) end at the ROIs' edge (y 1030).
#   Before the tiles were trimmed, that column's tiles with x 992 lay 90 px of 128 in the right ROI: Resolve hierarchy
#   put them into the right ROI (their centres lay in it), the right's re-run removed them and the left's left them.
# Resolve hierarchy (PathObjectHierarchy.resolveHierarchy, v0.4.4:294-317, v0.6.0:250-273) takes every annotation out,
# its children to the root, and inserts them again largest first (insertPathObjects sorts by HIERARCHY_COMPARATOR
# reversed, v0.4.4:277): each into the smallest annotation that covers it, taking from that one its direct children
# that lie in it, a detection (a tile too: PathTileObject extends PathDetectionObject) by its centroid
# (insertPathObject, v0.4.4:355-381, v0.6.0:310-336). So the regions over an edge go up to the root beside both ROIs,
# and every tile, a box within its ROI, has its centroid in it: none goes into the neighbour (one whose centroid lies
# in a region of its own ROI's that went to the root goes under that region).
SHARED_EDGE_X = 1030


def _our_objects(project_dir, roi_names):
    """This tool's objects in the project's first image, each as (key, ancestor names nearest first, shapely ROI), and
    the ROIs named ``roi_names`` as {name: (ancestor names, measurements)}. The key (kind, class, bounds) tells apart
    the objects of one image, so a key found twice is a duplicate."""
    from paquo.projects import QuPathProject

    from bridge.objects import is_own_object

    ours, rois = [], {}
    with QuPathProject(project_dir, mode="r") as qp:
        hierarchy = qp.images[0].hierarchy  # mode "r": read from data.qpdata (images.py readHierarchy)
        # detections: getObjects(None, PathDetectionObject), tiles among them (paquo hierarchy.py PathObjectProxy._list)
        for obj in [*hierarchy.annotations, *hierarchy.detections]:
            java = obj.java_object
            kind = "tile" if java.isTile() else "annotation" if java.isAnnotation() else "detection"
            cls = obj.path_class.id if obj.path_class is not None else None
            if obj.name in roi_names and kind == "annotation":
                rois[obj.name] = (_ancestors(obj), dict(obj.measurements))
            if is_own_object(kind, cls, obj.name, list(obj.measurements)):
                roi = obj.roi
                ours.append(((kind, cls, tuple(round(v, 1) for v in roi.bounds)), _ancestors(obj), roi))
    return ours, rois


@pytest.mark.parametrize(
    "left_x", [70, 100], ids=["edge-tiles-mostly-in-their-own-roi", "edge-tiles-mostly-in-the-neighbour"]
)  # the ids say where the left's cells over the shared edge lie before they are trimmed to it
@pytest.mark.parametrize("rerun", ["left ROI", "right ROI"])
def test_a_rerun_of_one_of_two_rois_side_by_side_leaves_the_other_its_results_over_the_shared_edge(
    tmp_path, phantom_svs, models, left_x, rerun
):
    from paquo.classes import QuPathPathClass
    from paquo.projects import QuPathProject

    rois = {"left ROI": box(left_x, 100, SHARED_EDGE_X, 1030), "right ROI": box(SHARED_EDGE_X, 100, 1990, 1030)}
    kept = next(name for name in rois if name != rerun)
    project_dir = tmp_path / "qp"
    init_project_qupath(project_dir, [phantom_svs])
    with QuPathProject(project_dir, mode="r+") as qp:  # leaving it saves every entry (paquo projects.py __exit__)
        hierarchy = qp.images[0].hierarchy
        for name, roi in rois.items():
            # add_annotation adds it under the root; a name set on the object it returns changes that object only
            hierarchy.add_annotation(roi=roi, path_class=QuPathPathClass("Tumor")).name = name

    # Both analysed, as `pdl1 run --class Tumor PROJECT` does.
    config = RunConfig(pipeline=PipelineConfig(device="cpu"), qupath="always", target_classes=("Tumor",))
    assert [o.state for o in run_batch([project_dir], config, models=models)] == ["done"]
    written, _ = _our_objects(project_dir, rois)
    # write_children puts all of an analysis's objects directly under its ROI: that says whose each one is.
    owner = {key: ancestors[0] for key, ancestors, _ in written}
    assert len(owner) == len(written) and set(owner.values()) == set(rois)
    first = {name: Counter(key[0] for key, who in owner.items() if who == name) for name in rois}
    assert all(first[name]["annotation"] and first[name]["tile"] and first[name]["detection"] for name in rois), first
    # Every tile lies within its own ROI (trimmed to it): none over the shared edge.
    assert [key for key, _, roi in written if key[0] == "tile" and not rois[owner[key]].buffer(1e-3).covers(roi)] == []

    # Objects > Annotations > Resolve hierarchy, QuPath's own call (v0.4.4:294, v0.5.1:295, v0.6.0:250); the entry's
    # ImageData marks itself changed on the hierarchy's event (ImageData.hierarchyChanged), so leaving saves it.
    with QuPathProject(project_dir, mode="r+") as qp:
        qp.images[0].hierarchy.java_object.resolveHierarchy()
    resolved, rois_resolved = _our_objects(project_dir, rois)
    assert {name: ancestors for name, (ancestors, _) in rois_resolved.items()} == {name: [None] for name in rois}
    # Resolve hierarchy put no tile into the ROI beside its own (their centroids lie in their own).
    neighbour = {name: next(other for other in rois if other != name) for name in rois}
    assert [key for key, ancestors, _ in resolved if key[0] == "tile" and neighbour[owner[key]] in ancestors] == []
    # What the re-run must leave: the kept ROI's objects over the shared edge that Resolve hierarchy moved out of it,
    # beside both ROIs at the root, overlapping the ROI re-run: the right's region over the edge (the right holds the
    # map pixel column at x 1024); of the left's, none (its regions end at x 1024, its tiles at 1030).
    over_the_edge = [
        key
        for key, ancestors, roi in resolved
        if owner[key] == kept and ancestors == [None] and roi.intersection(rois[rerun]).area > 0
    ]
    if kept == "right ROI":
        assert any(key[0] == "annotation" for key in over_the_edge), over_the_edge
    else:
        assert over_the_edge == []

    # Only the one ROI re-run, as `pdl1 run --name 'left ROI' PROJECT` does.
    again = replace(config, target_classes=(), target_names=(rerun,))
    assert [o.state for o in run_batch([project_dir], again, models=models)] == ["done"]
    after, rois_after = _our_objects(project_dir, rois)
    copies = Counter(key for key, _, _ in after)
    theirs = {key for key, who in owner.items() if who == kept}
    # The kept ROI's results, all of them, once each, where Resolve hierarchy put them (over the edge too), and its
    # measurements as its own analysis left them.
    assert {key: ancestors for key, ancestors, _ in after if key in theirs} == {
        key: ancestors for key, ancestors, _ in resolved if key in theirs
    }
    assert all(copies[key] == 1 for key in theirs)
    assert rois_after[kept] == rois_resolved[kept]
    # The ROI re-run: one set of its results, all under it: none of its earlier ones left at the root beside it, nor
    # in the kept ROI.
    mine = [(key, ancestors) for key, ancestors, _ in after if key not in theirs]
    assert [key for key, ancestors in mine if rerun not in ancestors] == []
    assert [key for key, _ in mine if copies[key] > 1] == []
    assert Counter(key[0] for key, _ in mine) == first[rerun]
    assert {name: ancestors for name, (ancestors, _) in rois_after.items()} == {name: [None] for name in rois}


def test_whole_image_run_creates_one_analysis_parent(tmp_path, phantom_svs, models):
    from paquo.projects import QuPathProject

    project_dir = tmp_path / "qp"
    init_project_qupath(project_dir, [phantom_svs])
    config = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="always")
    for _ in range(2):
        assert [o.state for o in run_batch([project_dir], config, models=models)] == ["done"]
    with QuPathProject(project_dir, mode="r") as qp:
        parents = [a for a in qp.images[0].hierarchy.annotations if a.name == "PD-L1 analysis"]
        assert len(parents) == 1
        assert "PD-L1: Positive area %" in parents[0].measurements


def test_read_only_use_leaves_the_project_bytes_unchanged(tmp_path, phantom_svs):
    from paquo.classes import QuPathPathClass
    from paquo.projects import QuPathProject

    from bridge import qupath

    project_dir = tmp_path / "qp"
    init_project_qupath(project_dir, [phantom_svs])
    with QuPathProject(project_dir, mode="r+") as qp:  # leaving it saves the entry: a data.qpdata to read
        qp.images[0].hierarchy.add_annotation(roi=box(10, 10, 90, 90), path_class=QuPathPathClass("Tumor"))
    before = {p: p.read_bytes() for p in project_dir.rglob("*") if p.is_file()}
    assert [p.name for p in before if p.name == "data.qpdata"] == ["data.qpdata"]
    with qupath.open_project(project_dir, mode="r") as project:
        assert len(project.images) == 1
    # What pdl1 labels, review-queue and export nnunet read through QuPath (paquo's read-only hierarchy).
    (objects,) = qupath.read_entry_objects(project_dir).values()
    assert [(o.object_type, o.classification, o.geometry.bounds) for o in objects] == [
        ("annotation", "Tumor", (10.0, 10.0, 90.0, 90.0))
    ]
    assert before == {p: p.read_bytes() for p in project_dir.rglob("*") if p.is_file()}


def test_reading_an_entrys_objects_holds_only_those_kept(tmp_path, phantom_svs):
    # pdl1 train reads every entry at once through QuPath: a slide's cell detection is a million objects, so the
    # reader holds only what the caller keeps (bridge.labels passes over the cells that label nothing).
    from paquo.classes import QuPathPathClass
    from paquo.projects import QuPathProject

    from bridge import qupath

    project_dir = tmp_path / "qp"
    init_project_qupath(project_dir, [phantom_svs])
    with QuPathProject(project_dir, mode="r+") as qp:
        hierarchy = qp.images[0].hierarchy
        hierarchy.add_annotation(roi=box(10, 10, 90, 90), path_class=QuPathPathClass("Tumor"))
        hierarchy.add_detection(roi=box(20, 20, 26, 26), path_class=QuPathPathClass("Positive"))
        hierarchy.add_detection(roi=box(30, 30, 36, 36))
        entry_id = str(qp.images[0].entry_id)
    (every,) = qupath.read_entry_objects(project_dir).values()
    assert sorted((o.object_type, o.classification or "") for o in every) == [
        ("annotation", "Tumor"),
        ("detection", ""),
        ("detection", "Positive"),
    ]
    asked = []
    kept = qupath.read_entry_objects(
        project_dir, keep=lambda entry, obj: asked.append(entry) or obj.object_type != "detection"
    )
    assert [(o.object_type, o.classification) for o in kept[entry_id]] == [("annotation", "Tumor")]
    assert asked == [entry_id] * 3


def test_init_project_creates_nothing_when_qupath_cannot_add_a_slide(tmp_path, phantom_svs):
    from paquo.projects import QuPathProject

    corrupt = tmp_path / "corrupt.svs"
    corrupt.write_bytes(b"not a slide")
    folder = tmp_path / "PD-L1 study.v2"  # a dot in its name: paquo takes a path with a suffix for the file
    refused = r"1 of 2 slides cannot be added, so nothing was created: .*corrupt\.svs: QuPath cannot add it.*--skip"
    with pytest.raises(ProjectError, match=refused):
        init_project_qupath(folder, [phantom_svs, corrupt])
    assert not folder.exists()
    init_project_qupath(folder, [phantom_svs])  # the next init-project is not blocked by a partial project
    with QuPathProject(folder / "project.qpproj", mode="r") as qp:  # the folder's name would be taken for the file's
        assert len(qp.images) == 1


def test_init_project_through_qupath_given_a_folder_of_slides_says_to_give_the_files(tmp_path, phantom_svs):
    (tmp_path / "slides").mkdir()
    refused = "slides: a folder, not a slide file: give the slide files in it (e.g. " + f"{tmp_path / 'slides'}/*.svs)"
    with pytest.raises(ProjectError, match=re.escape(refused)):
        init_project_qupath(tmp_path / "qp", [phantom_svs, tmp_path / "slides"])
    assert not (tmp_path / "qp").exists()


def test_init_project_through_qupath_can_leave_out_the_slides_it_cannot_add(tmp_path, phantom_svs, caplog):
    corrupt = tmp_path / "corrupt.svs"
    corrupt.write_bytes(b"not a slide")
    with caplog.at_level("WARNING", logger="bridge.init_project"):
        qpproj = init_project_qupath(tmp_path / "qp", [corrupt, phantom_svs], skip_unreadable=True)
    assert [Path(e.path).name for e in read_project(qpproj).entries] == [phantom_svs.name]
    assert "left out 1 of 2 slides" in caplog.text and "corrupt.svs" in caplog.text


def test_a_damaged_data_file_fails_alone_keeps_its_backup_and_the_project_is_saved_once(
    tmp_path, phantom_svs, models, monkeypatch
):
    from paquo.projects import QuPathProject

    from bridge import qupath

    second = tmp_path / "second.svs"
    shutil.copy(phantom_svs, second)
    project_dir = tmp_path / "qp"
    init_project_qupath(project_dir, [phantom_svs, second])
    config = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="always")
    saves = []
    real_save = QuPathProject.save

    def counted_save(self, images=True):
        saves.append(images)
        return real_save(self, images=images)

    with monkeypatch.context() as patch:
        patch.setattr(QuPathProject, "save", counted_save)
        assert [o.state for o in run_batch([project_dir], config, models=models)] == ["done", "done"]
    assert saves == [False]  # project.qpproj once for the run, not after each image

    assert [o.state for o in run_batch([project_dir], config, models=models)] == ["done", "done"]
    data = project_dir / "data" / "1" / "data.qpdata"
    backup = data.with_name("data.qpdata.pdl1-backup")
    good = backup.read_bytes()
    assert good[:4] == b"\xac\xed\x00\x05"
    data.write_bytes(b"")  # what a kill during QuPath's save left
    outcomes = run_batch([project_dir], config, models=models)
    assert [o.state for o in outcomes] == ["failed", "done"]
    assert "is damaged, it is empty (0 bytes)" in outcomes[0].error and f"`cp '{backup}' '{data}'`" in outcomes[0].error
    assert backup.read_bytes() == good and data.read_bytes() == b""

    # Cut short after its header: QuPath itself opens it as an empty image (DefaultProject readImageData logs the
    # error), which the run saved over the annotations, and read-only it reads on for ever (PathIO.readHierarchy).
    cut = good[: len(good) // 2]
    data.write_bytes(cut)
    outcomes = run_batch([project_dir], config, models=models)
    assert [o.state for o in outcomes] == ["failed", "done"]
    assert "is damaged, it is cut short" in outcomes[0].error and f"`cp '{backup}' '{data}'`" in outcomes[0].error
    assert backup.read_bytes() == good and data.read_bytes() == cut
    with pytest.raises(DamagedDataError, match="is damaged, it is cut short"):
        qupath.read_entry_objects(project_dir, ["1"])


def test_an_entry_of_a_servers_image_fails_alone_named_with_the_fix_not_paquos_error(tmp_path, phantom_svs, models):
    # An entry QuPath opens from a server (OMERO, a web address): paquo's entry reads its file by
    # ImageProvider.path_from_uri, which raises "uri unsupported scheme '...'" for it. The entry is made for real
    # (QuPath's own project file, its URI then pointed at a server, as QuPath's OMERO extension saves one) and asked of
    # through paquo and through a run.
    from bridge import qupath

    second = tmp_path / "second.svs"
    shutil.copy(phantom_svs, second)
    project_dir = tmp_path / "qp"
    init_project_qupath(project_dir, [phantom_svs, second])
    server = "https://omero.example.org/webclient/?show=image-7"
    qpproj = project_dir / "project.qpproj"
    raw = json.loads(qpproj.read_text())
    raw["images"][1]["serverBuilder"]["uri"] = server
    qpproj.write_text(json.dumps(raw))
    said = (
        f"image of entry {raw['images'][1]['entryID']} (second.svs): only file: image URIs can be analysed (a file on "
        f"this machine or a mounted share), got '{server}'; for an image QuPath opens from a server (OMERO, a web "
        "address), export it from QuPath (File > Export images... > OME TIFF) and add that file to the project instead"
    )
    with qupath.open_project(project_dir, mode="r") as project:
        entry = next(e for e in project.images if e.image_name == "second.svs")
        assert entry.uri == server
        with pytest.raises(ProjectError) as err:
            qupath.check_saveable(entry)
    assert str(err.value) == said and isinstance(err.value.__cause__, ValueError | NotImplementedError)
    config = RunConfig(pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="always")
    done, failed = run_batch([project_dir], config, models=models)
    assert done.state == "done", done.error
    assert (failed.state, failed.error) == ("failed", said)


def test_an_image_search_dir_finds_elsewhere_has_its_entry_pointed_at_it_and_its_objects_saved(
    tmp_path, phantom_svs, models
):
    # A project whose slide moved since it was made (another machine's folders): QuPath saves an entry's objects only
    # while its image is at its URI, so the run points the entry at the file --search-dir found, as QuPath's File >
    # Project... > Check project URIs does, and project.qpproj is saved with it.
    from paquo.images import ImageProvider
    from paquo.projects import QuPathProject

    from bridge.project import uri_to_path

    (tmp_path / "made").mkdir()
    slide = Path(shutil.copy(phantom_svs, tmp_path / "made" / "p1.svs"))
    project_dir = tmp_path / "qp"
    init_project_qupath(project_dir, [slide])
    before = read_project(project_dir).entries[0].uri
    (tmp_path / "local" / "2026").mkdir(parents=True)
    now = slide.rename(tmp_path / "local" / "2026" / "p1.svs")
    config = RunConfig(
        pipeline=PipelineConfig(device="cpu", run_nuclei=False), qupath="always", search_dirs=(tmp_path / "local",)
    )
    (outcome,) = run_batch([project_dir], config, models=models)
    assert outcome.state == "done", outcome.error
    after = ImageProvider.uri_from_path(now)
    changed = json.loads(Path(outcome.outputs[1]).read_text())["provenance"]["entry_uri_changed"]
    assert changed["to"] == after and uri_to_path(changed["from"]) == uri_to_path(before)
    assert uri_to_path(read_project(project_dir).entries[0].uri) == uri_to_path(after)  # project.qpproj saved so
    with QuPathProject(project_dir, mode="r") as qp:
        (entry,) = qp.images
        assert ImageProvider.compare_uris(entry.uri, after) and entry.is_readable()
        assert entry.metadata["PD-L1 run"] == outcome.run_id
        annotations = entry.hierarchy.annotations
        parent = next(a for a in annotations if a.name == "PD-L1 analysis")
        assert "PD-L1: Positive area %" in parent.measurements
        assert any(a.path_class is not None and a.path_class.id == "PD-L1 positive" for a in annotations)
        assert entry.hierarchy.tiles
    # The image is where the entry says now: a run without --search-dir finds it there and changes nothing.
    (again,) = run_batch([project_dir], replace(config, search_dirs=()), models=models)
    assert again.state == "done", again.error
    assert "entry_uri_changed" not in json.loads(Path(again.outputs[1]).read_text())["provenance"]


def test_a_case_of_an_h_and_e_and_its_ihc_is_analysed_each_on_its_path_and_compared(tmp_path, ihc_pair, models):
    from paquo.images import QuPathImageType
    from paquo.projects import QuPathProject

    he, ihc = ihc_pair
    project_dir = tmp_path / "qp"
    init_project_qupath(project_dir, [he, ihc])
    with QuPathProject(project_dir, mode="r+") as qp:
        for entry, image_type in zip(
            qp.images, (QuPathImageType.BRIGHTFIELD_H_E, QuPathImageType.BRIGHTFIELD_H_DAB), strict=True
        ):
            entry.image_type = image_type
            entry.metadata["case"] = "case A"
    outcomes = run_batch(
        [project_dir], RunConfig(pipeline=PipelineConfig(device="cpu"), qupath="always"), models=models
    )
    assert [o.state for o in outcomes] == ["done", "done"], outcomes
    with QuPathProject(project_dir, mode="r") as qp:
        he_entry, ihc_entry = qp.images
        assert "PD-L1 stain" not in he_entry.metadata and "PD-L1 CPS" not in he_entry.metadata
        assert ihc_entry.metadata["PD-L1 stain"] == "H-DAB" and ihc_entry.metadata["PD-L1 CPS"]
        classes = {d.path_class.id for d in ihc_entry.hierarchy.detections if d.path_class is not None}
        assert {"Tumor: 1+", "Tumor: 2+", "Tumor: 3+", "Tumor: Negative"} <= classes
        assert "Tumor: Positive" not in classes
        parent = next(a for a in ihc_entry.hierarchy.annotations if a.name == "PD-L1 analysis")
        assert "PD-L1: CPS" in parent.measurements and "PD-L1: SUA candidates" not in parent.measurements
    pairs = json.loads((project_dir / "pdl1" / "pairs.json").read_text())["cases"]
    assert pairs["case A"]["registration"]["ok"] and pairs["case A"]["comparison"]["dice"] > 0.6


def _add_tma_grid(hierarchy, cores):
    """A dearrayed TMA grid through QuPath's Java API (paquo 0.9 has none): ``cores`` are (name, x, y, diameter,
    missing), row by row and named as QuPath's dearrayer does by default (rows A-J, columns 1-16, "Row first": "A-2" is
    row A, column 2; TMADearrayerPluginIJ.java v0.6.0:94-97, 322-336). PathObjects.createTMACoreObject(xCenter,
    yCenter, diameter, isMissing) (PathObjects.java v0.4.4:103, v0.6.0:103), DefaultTMAGrid.create(cores, gridWidth)
    (DefaultTMAGrid.java v0.4.4:63, v0.6.0:63) and PathObjectHierarchy.setTMAGrid (v0.4.4:215, v0.6.0:171), which
    adds the cores to the hierarchy under its root (addObjects, v0.4.4:646-663, v0.6.0:540-557)."""
    from paquo.java import ArrayList, JClass, PathObjects

    made = ArrayList()
    for name, x, y, diameter, missing in cores:
        core = PathObjects.createTMACoreObject(float(x), float(y), float(diameter), bool(missing))
        core.setName(name)
        made.add(core)
    grid = JClass("qupath.lib.objects.hierarchy.DefaultTMAGrid").create(made, 2)
    hierarchy.java_object.setTMAGrid(grid)


def _cores(project_dir):
    """Each core of the first entry's grid: (name, missing, its PD-L1 measurements, its children's classes); the
    names of the entry's annotations, its metadata and how many nuclei it holds anywhere."""
    from paquo.projects import QuPathProject

    from bridge import qupath

    with QuPathProject(project_dir, mode="r") as qp:
        out = {}
        for core in qupath.tma_cores(qp.images[0]):
            kids = Counter(
                "tile" if kid.isTile() else str(kid.getPathClass()) for kid in core.java_object.getChildObjectsAsArray()
            )
            measured = {k: v for k, v in core.measurements.items() if k.startswith("PD-L1: ")}
            out[core.name] = (qupath.core_is_missing(core), measured, dict(kids))
        annotations = sorted(str(a.name) for a in qp.images[0].hierarchy.annotations)  # ours are unnamed: "None"
        nuclei = sum(1 for d in qp.images[0].hierarchy.detections if d.path_class is not None)  # anywhere
        return out, annotations, dict(qp.images[0].metadata), nuclei


def test_a_tma_is_analysed_core_by_core_a_missing_core_left_alone_and_a_rerun_replaces_per_core(
    tmp_path, phantom_svs, models
):
    import csv

    from paquo.projects import QuPathProject

    project_dir = tmp_path / "qp"
    init_project_qupath(project_dir, [phantom_svs])
    config = RunConfig(pipeline=PipelineConfig(device="cpu"), qupath="always")
    (whole,) = run_batch([project_dir], config, models=models)  # before the grid: the image analysed whole
    assert whole.state == "done", whole.error
    with QuPathProject(project_dir, mode="r+") as qp:  # leaving saves the entry: setTMAGrid fires a hierarchy event
        _add_tma_grid(
            qp.images[0].hierarchy,
            [
                ("A-1", 550, 550, 900, False),
                ("A-2", 1500, 550, 900, True),
                ("B-1", 550, 1500, 900, False),
                ("B-2", 1500, 1500, 900, False),
            ],
        )
    (done,) = run_batch([project_dir], config, models=models)
    assert done.state == "done", done.error
    cores, annotations, metadata, nuclei = _cores(project_dir)
    assert list(cores) == ["A-1", "A-2", "B-1", "B-2"]
    # No whole-image parent: each core is its own, and the earlier whole-image analysis is gone with its objects
    # (left, every nucleus in a core was there twice).
    assert "PD-L1 analysis" not in annotations
    assert nuclei == sum(
        n for _, _, kids in cores.values() for c, n in kids.items() if c.startswith(("Tumor", "Other"))
    )
    missing, measured, kids = cores["A-2"]
    assert missing and measured == {} and kids == {}  # left alone
    for name in ("A-1", "B-1", "B-2"):
        missing, measured, kids = cores[name]
        assert not missing
        assert {"PD-L1: Uncertainty flag", "PD-L1: Predicted TPS % (H&E)", "PD-L1: Num Tumor: Positive"} <= set(
            measured
        )
        assert kids.get("tile", 0) > 0 and kids.get("Tumor: Positive", 0) + kids.get("Tumor: Negative", 0) > 0
    with (project_dir / "pdl1" / "targets.csv").open(newline="", encoding="utf-8") as fh:
        table = {r["target"]: r for r in csv.DictReader(fh)}
    assert [(t, r["state"]) for t, r in table.items()] == [
        ("A-1", "analysed"),
        ("A-2", "missing"),
        ("B-1", "analysed"),
        ("B-2", "analysed"),
    ]
    for name in ("A-1", "B-1", "B-2"):
        assert table[name]["tps_percent"] == f"{cores[name][1]['PD-L1: Predicted TPS % (H&E)']:.1f}"
    assert metadata["PD-L1 run"] == done.run_id

    # Re-run: each core's objects replaced, none duplicated, the missing core still untouched.
    (again,) = run_batch([project_dir], config, models=models)
    assert again.state == "done", again.error
    after, annotations_after, _, nuclei_after = _cores(project_dir)
    assert {n: kids for n, (_, _, kids) in after.items()} == {n: kids for n, (_, _, kids) in cores.items()}
    assert annotations_after == annotations and nuclei_after == nuclei


def test_ray_analyses_a_tma_core_by_core_as_the_local_engine_does(tmp_path, phantom_svs, models):
    # --engine ray analysed a TMA image whole (one TPS over every core, with a warning). The driver reads the grid
    # through QuPath, a worker analyses each core, and the driver writes each core's results under it.
    ray = pytest.importorskip("ray", reason="the Ray engine needs the 'ray' extra: pip install 'pdl1-bridge[ray]'")
    from paquo.projects import QuPathProject

    from bridge.engine_ray import run_batch_ray

    grid = [("A-1", 550, 550, 900, False), ("A-2", 1500, 550, 900, True), ("B-1", 550, 1500, 900, False)]
    config = RunConfig(pipeline=PipelineConfig(device="cpu"), qupath="always")
    seen = {}
    for engine in ("local", "ray"):
        project_dir = tmp_path / engine
        init_project_qupath(project_dir, [phantom_svs])
        with QuPathProject(project_dir, mode="r+") as qp:
            _add_tma_grid(qp.images[0].hierarchy, grid)
        if engine == "ray":
            ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
            try:
                (done,) = run_batch_ray([project_dir], config)
            finally:
                ray.shutdown()
        else:
            (done,) = run_batch([project_dir], config, models=models)
        assert done.state == "done", done.error
        cores, annotations, metadata, nuclei = _cores(project_dir)
        metadata.pop("PD-L1 run")
        table = (project_dir / "pdl1" / "targets.csv").read_text(encoding="utf-8").replace(str(project_dir), "")
        seen[engine] = (cores, annotations, metadata, nuclei, table)
    cores = seen["ray"][0]
    assert [(name, missing, bool(measured)) for name, (missing, measured, _) in cores.items()] == [
        ("A-1", False, True),
        ("A-2", True, False),
        ("B-1", False, True),
    ]
    assert "PD-L1 analysis" not in seen["ray"][1]  # no whole-image parent
    assert seen["ray"][1:] == seen["local"][1:]
    # The same objects under each core and the same numbers (workers run torch on one thread each: equal to rounding).
    local = seen["local"][0]
    assert {n: (missing, kids) for n, (missing, _, kids) in cores.items()} == {
        n: (missing, kids) for n, (missing, _, kids) in local.items()
    }
    for name, (_, measured, _) in cores.items():
        assert measured == pytest.approx(local[name][1], rel=1e-6, nan_ok=True)


def test_targets_exported_from_a_real_qupath_are_analysed_without_it_under_qupaths_own_ids(
    tmp_path, phantom_svs, models
):
    # QuPath 0.7 (which paquo does not reach) exports with pdl1_export_labels.groovy: each object through QuPath's Gson,
    # the TMA cores among them. `pdl1 run --qupath never` must find the annotations and cores by their IDs as QuPath
    # gives them, which pdl1_import_results.groovy finds them by again.
    from paquo.classes import QuPathPathClass
    from paquo.projects import QuPathProject

    from bridge import qupath
    from bridge.exported_targets import target_objects_path
    from bridge.labels import export_path

    project_dir = tmp_path / "qp"
    init_project_qupath(project_dir, [phantom_svs])
    with QuPathProject(project_dir, mode="r+") as qp:
        hierarchy = qp.images[0].hierarchy
        tumour = QuPathPathClass("Tumor")
        drawn = [hierarchy.add_annotation(roi=box(x, x, x + 600, x + 600), path_class=tumour) for x in (200, 1200)]
        drawn[0].name = "nest A"
        _add_tma_grid(hierarchy, [("A-1", 550, 550, 900, False), ("A-2", 1500, 550, 900, True)])
    with QuPathProject(project_dir, mode="r") as qp:
        entry = qp.images[0]
        annotations = [a for a in entry.hierarchy.annotations if a.path_class is not None]
        cores = qupath.tma_cores(entry)
        features = [o.to_geojson() for o in [*annotations, *cores]]  # what the export script writes of each
        ids = {str(o.name): str(o.java_object.getID()) for o in [*annotations, *cores]}
        entry_id = str(entry.entry_id)
    export = export_path(project_dir, entry_id)
    export.parent.mkdir(parents=True)
    export.write_text(json.dumps(features), encoding="utf-8")
    (labelled,) = qupath.read_entry_objects(project_dir).values()
    assert [o.object_type for o in labelled].count("tmaCore") == 2  # paquo's reading holds the cores, as the export

    config = RunConfig(pipeline=PipelineConfig(device="cpu"), qupath="never", target_classes=("Tumor",))
    (done,) = run_batch([project_dir], config, models=models)
    assert done.state == "done", done.error
    summary = json.loads((project_dir / "pdl1" / entry_id / "summary.json").read_text())
    assert sorted((r["target"], r["object_id"]) for r in summary["targets"]) == [  # in QuPath's order of annotations
        ("Tumor", ids["None"]),
        ("nest A", ids["nest A"]),
    ]
    for row in summary["targets"]:
        assert target_objects_path(project_dir / "pdl1" / entry_id, row["object_id"]).is_file()
    (cored,) = run_batch([project_dir], replace(config, target_classes=()), models=models)
    assert cored.state == "done", cored.error
    summary = json.loads((project_dir / "pdl1" / entry_id / "summary.json").read_text())
    assert [(r["target"], r["state"], r["object_id"]) for r in summary["targets"]] == [
        ("A-1", "analysed", ids["A-1"]),
        ("A-2", "missing", ids["A-2"]),
    ]
