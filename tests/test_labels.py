"""Label sources: a QuPath project's objects (GeoJSON exports, or through paquo) become the same SlideLabels."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile

from bridge.labels import (
    GONE_OUTPUT_CANDIDATES_COUNT,
    UNRECORDED_NUCLEI_COUNT,
    LabelError,
    LabelRules,
    export_path,
    labels_from_objects,
    parse_class_map,
    project_classes,
    read_geojson_labels,
    read_project_labels,
)
from bridge.qupath_geojson import QuPathObject
from inference import IGNORE_LABEL, IHC_NUCLEUS_CLASSES, labels_digest, nuclei_known_mask, region_target

HE_CLASSES = ("Tumor: Positive", "Tumor: Negative", "Other")
RULES = LabelRules(class_names=HE_CLASSES)


@pytest.fixture(scope="module")
def labelled(fixtures_dir) -> Path:
    return fixtures_dir / "qupath-0.4.4-labels"


def _fixture_labels(labelled: Path, rules: LabelRules = RULES):
    return read_geojson_labels(
        labelled / "objects-labelled-by-pathologist-0.4.4.geojson",
        slide=labelled / "he-1357.svs",
        image_size_px=(2048, 2048),
        rules=rules,
        project_classes=project_classes(labelled / "project"),
    )


def test_the_fixture_objects_become_labels_by_class(labelled):
    labels = _fixture_labels(labelled)
    assert labels.counts == {
        "areas: PD-L1 negative": 1,
        "areas: PD-L1 positive": 3,
        "areas: ignore": 1,
        "points: Other": 91,
        "points: Tumor: Negative": 721,
        "points: Tumor: Positive": 440,
        "skipped: annotation LineString (unclassified)": 1,
        "skipped: pdl1 results as written (not reviewed)": 1,
        "skipped: reviewed pdl1 results (use --from-review)": 2,
        "training regions": 1,
        "training regions (all nuclei marked)": 1,
    }
    # The region named "... (all nuclei marked)" is the exhaustive one, the other is regions only.
    assert labels.exhaustive == (True, False)
    assert len(labels.points_xy) == 91 + 721 + 440
    # Every point lies in the first (exhaustive) region, where the README says they were marked.
    region = labels.training_regions[0]
    assert shapely.contains_xy(region, labels.points_xy[:, 0], labels.points_xy[:, 1]).all()


def test_reviewed_candidates_are_labels_only_with_from_review(labelled):
    plain = _fixture_labels(labelled)
    reviewed = _fixture_labels(labelled, LabelRules(HE_CLASSES, from_review=True))
    assert reviewed.counts["reviewed: PD-L1 positive"] == 1
    assert reviewed.counts["reviewed: PD-L1 negative"] == 1
    assert reviewed.counts["skipped: pdl1 results as written (not reviewed)"] == 1  # the untouched candidate
    # Each reviewed candidate (a 81.92 px square) adds its area to its side.
    assert reviewed.positive.area - plain.positive.area == pytest.approx(81.92**2, rel=1e-6)
    assert reviewed.negative.area - plain.negative.area == pytest.approx(81.92**2, rel=1e-6)
    assert labels_digest(plain) != labels_digest(reviewed)


def test_region_target_agrees_with_the_truth_the_positives_were_traced_from(labelled):
    labels = _fixture_labels(labelled)
    truth = tifffile.imread(labelled / "he-1357.truth" / "positive_mask.tif").astype(bool)  # downsample 8
    target = region_target(labels, shape_hw=truth.shape, downsample=8)
    inside = target != IGNORE_LABEL
    # Labelled only inside the two regions and the drawn areas; the Ignore* area is out.
    assert 0.1 < inside.mean() < 0.6
    assert not inside[~_raster(labels, 8, truth.shape)].any()
    agree = (target[inside] == 1) == truth[inside]
    assert agree.mean() > 0.95
    ignore = _ignore_raster(labels, truth.shape)
    assert (target[ignore] == IGNORE_LABEL).all()


def _raster(labels, downsample, shape):
    from inference.training.labels import rasterize

    every = shapely.union_all([*labels.training_regions, labels.positive, labels.negative])
    return rasterize(every, shape_hw=shape, downsample=downsample)


def _ignore_raster(labels, shape):
    from inference.training.labels import rasterize

    return rasterize(labels.ignore, shape_hw=shape, downsample=8)


def test_nuclei_are_known_everywhere_in_the_exhaustive_region_and_only_near_points_elsewhere():
    labels = labels_from_objects(
        [
            _obj(shapely.box(0, 0, 40, 40), "Training region", name="Training region (All nuclei marked)"),
            _obj(shapely.box(60, 0, 100, 40), "Training region"),
            _obj(shapely.MultiPoint([(10, 10), (80, 20)]), "Other"),
        ],
        slide="s.svs",
        image_size_px=(100, 100),
        rules=RULES,
    )
    known = nuclei_known_mask(labels, shape_hw=(100, 100), downsample=1, radius_px=3)
    assert known[:40, :40].all()  # every pixel of the exhaustive region
    assert known[20, 80] and known[20, 83] and not known[20, 84]  # near the marked point only
    assert not known[5, 70]  # an unmarked pixel of the other region is not a label
    assert known.sum() == 40 * 40 + 29  # the region and a radius-3 disk (29 px)


def _obj(geometry, cls=None, *, name=None, measurements=None, object_type="annotation"):
    return QuPathObject(geometry, object_type, cls, measurements or {}, name)


@pytest.mark.parametrize(
    ("content", "holds"),
    [('{"tps": 30.1, "nuclei_counts": {}}', "an object of type None"), ("[]", None), ("5", "int")],
    ids=["other-json", "empty-list", "number"],
)
def test_a_json_that_is_no_geojson_export_says_so(tmp_path, content, holds):
    # A run's truth.json given as --labels said "expected type 'Feature', got None".
    path = tmp_path / "truth.json"
    path.write_text(content)
    if holds is None:  # an empty list of features is GeoJSON: no labels in it
        with pytest.raises(LabelError, match="no labels"):
            read_geojson_labels(path, slide="s.svs", image_size_px=(10, 10), rules=RULES)
        return
    with pytest.raises(LabelError) as err:
        read_geojson_labels(path, slide="s.svs", image_size_px=(10, 10), rules=RULES)
    assert str(err.value) == (
        f"{path}: not GeoJSON objects: the file holds {holds}; expected a FeatureCollection, a list of features or "
        "one Feature, as QuPath exports them; export the objects again from QuPath as GeoJSON"
    )


def test_an_entry_without_labels_is_refused_with_what_it_holds():
    with pytest.raises(LabelError, match=r"no labels \(skipped: annotation LineString \(unclassified\): 1\)"):
        labels_from_objects(
            [_obj(shapely.LineString([(0, 0), (5, 5)]))], slide="s.svs", image_size_px=(10, 10), rules=RULES
        )


def test_points_outside_the_image_are_refused():
    with pytest.raises(
        LabelError, match=r"1 of 2 points lie outside the 100 x 50 px image \(first at x=20.0, y=60.0\)"
    ):
        labels_from_objects(
            [_obj(shapely.MultiPoint([(10, 10), (20, 60)]), "Other")],
            slide="s.svs",
            image_size_px=(100, 50),
            rules=RULES,
        )


def test_overlapping_positive_and_negative_labels_are_refused():
    with pytest.raises(LabelError, match=r"overlap by 25 px\^2 \(within x 5-10, y 5-10\)"):
        labels_from_objects(
            [_obj(shapely.box(0, 0, 10, 10), "PD-L1 positive"), _obj(shapely.box(5, 5, 20, 20), "PD-L1 negative")],
            slide="s.svs",
            image_size_px=(100, 100),
            rules=RULES,
        )


def test_a_class_not_in_the_project_is_refused():
    with pytest.raises(LabelError, match=r"class 'Tumour' is not in the project's class list"):
        labels_from_objects(
            [_obj(shapely.box(0, 0, 10, 10), "Stroma"), _obj(shapely.MultiPoint([(1, 1)]), "Tumour")],
            slide="s.svs",
            image_size_px=(100, 100),
            rules=RULES,
            project_classes=frozenset({"Training region", "PD-L1 positive"}),
        )


@pytest.mark.parametrize(
    ("cls", "meant"), [("other", "Other"), ("Tumor:Positive", "Tumor: Positive"), ("Tumor: Negativ", "Tumor: Negative")]
)
def test_a_class_not_in_the_project_names_the_project_class_it_misspells(cls, meant):
    # It said "is this export from another project? Add the class in QuPath", adding a second spelling of one class.
    classes = frozenset({"Training region", "Other", "Tumor: Positive", "Tumor: Negative"})
    with pytest.raises(LabelError) as err:
        labels_from_objects(
            [_obj(shapely.box(0, 0, 10, 10), "Training region"), _obj(shapely.MultiPoint([(1, 1)]), cls)],
            slide="s.svs",
            image_size_px=(100, 100),
            rules=RULES,
            project_classes=classes,
        )
    said = str(err.value)
    assert said.endswith(f"did you mean {meant!r}? Set its class to {meant!r} in QuPath and export again"), said
    assert "another project" not in said


def test_a_class_not_in_the_project_and_like_none_of_its_classes_says_how_to_add_it():
    with pytest.raises(LabelError) as err:
        labels_from_objects(
            [_obj(shapely.MultiPoint([(1, 1)]), "Lymphocyte")],
            slide="s.svs",
            image_size_px=(100, 100),
            rules=RULES,
            project_classes=frozenset({"Training region", "Other"}),
        )
    assert str(err.value).endswith(
        "is this export from another project? Export this project's labels again; or, if the class is meant, add it "
        "to the project's class list in QuPath (the Annotations tab's class list) and save the project"
    )


def test_an_all_nuclei_marked_region_under_ignore_is_not_taken_for_unmarked(caplog):
    # Its points, under Ignore*, were taken for missing: the labels were refused, telling to draw the region around
    # the points outside it, or (all points inside regions) warned that its nuclei would train as background.
    marked = shapely.box(0, 0, 40, 40)
    objects = [
        _obj(marked, "Training region", name="Training region (all nuclei marked)"),
        _obj(shapely.MultiPoint([(10, 10), (20, 20)]), "Tumor: Negative"),
        _obj(shapely.box(0, 0, 45, 45), "Ignore*"),
        _obj(shapely.MultiPoint([(70, 70)]), "Other"),
    ]
    with caplog.at_level("WARNING", logger="bridge.labels"):
        labels = labels_from_objects(objects, slide="s.svs", image_size_px=(100, 100), rules=RULES)
    assert labels.counts["skipped: points under Ignore*"] == 2 and len(labels.points_class) == 1
    assert "says all its nuclei are marked" not in caplog.text


NEAR_MISSES = [
    ("PDL1 positive", "PD-L1 positive"),
    ("training region", "Training region"),
    ("PD-L1 negativ", "PD-L1 negative"),
    ("PD_L1_Positive", "PD-L1 positive"),
]


@pytest.mark.parametrize("cls, meant", NEAR_MISSES)
def test_an_area_whose_class_is_a_near_miss_of_a_label_class_is_refused_not_skipped(cls, meant):
    # Skipped, a misspelled positive area inside a training region would silently train as negative.
    objects = [_obj(shapely.box(0, 0, 50, 50), "Training region"), _obj(shapely.box(5, 5, 20, 20), cls)]
    with pytest.raises(LabelError, match=rf"class {cls!r} is not a label class; did you mean {re.escape(repr(meant))}"):
        labels_from_objects(objects, slide="s.svs", image_size_px=(100, 100), rules=RULES)
    # Classes that resemble no label class are other annotations, skipped and counted (QuPath's "Positive" only
    # outside training regions: inside one, see below).
    others = [objects[0], _obj(shapely.box(5, 5, 20, 20), "Stroma"), _obj(shapely.box(60, 60, 70, 70), "Positive")]
    labels = labels_from_objects(others, slide="s.svs", image_size_px=(100, 100), rules=RULES)
    assert labels.counts["skipped: annotation Polygon (Stroma)"] == 1
    assert labels.counts["skipped: annotation Polygon (Positive)"] == 1


@pytest.mark.parametrize("meant", ["PD-L1 positive", "PD-L1 negative", "Training region", "Ignore*"])
def test_a_near_miss_says_what_it_would_have_done_and_that_training_stops(meant):
    # It said "Skipped, it would not label anything (a positive area inside a training region would train as
    # negative)" for every class, though the run stopped and the harm named was a positive area's only.
    harm = {
        "PD-L1 positive": "inside a training region its pixels would train as negative",
        "PD-L1 negative": "outside training regions its pixels would be no label",
        "Training region": "the PD-L1 positive areas inside it would be labels, its other pixels not negative",
        "Ignore*": "inside a training region its pixels would be labels, not ignored",
    }[meant]
    objects = [_obj(shapely.box(0, 0, 50, 50), "Training region"), _obj(shapely.box(5, 5, 20, 20), meant.lower())]
    with pytest.raises(LabelError) as err:
        labels_from_objects(objects, slide="s.svs", image_size_px=(100, 100), rules=RULES)
    said = str(err.value)
    assert f"As it is, it labels nothing ({harm}), so these labels are refused. Set its class to {meant!r}" in said


# PD-L1+ and Tumour PDL1+ went through as negative areas of the region without a word (helper-151)
@pytest.mark.parametrize("cls", ["Positive", "Tumor: Positive", "PD-L1+", "Tumour PDL1+", "2+", "PDL1 pos"])
def test_an_area_whose_class_says_positive_inside_a_training_region_is_refused(cls):
    # QuPath's built-in "Positive" (or a nucleus class) drawn as an area in a training region was skipped, and its
    # pixels trained as negative: the seg run only warned "97% of the labelled area is negative".
    region = _obj(shapely.box(0, 0, 50, 50), "Training region")
    drawn = _obj(shapely.box(40, 40, 60, 60), cls, name="tumour nest")
    with pytest.raises(LabelError) as err:
        labels_from_objects([region, drawn], slide="s.svs", image_size_px=(100, 100), rules=RULES)
    assert str(err.value) == (
        f"s.svs: annotation tumour nest ({cls}): an area of class {cls!r} lies in a training region (100 px^2 of "
        "it), where every pixel not under a 'PD-L1 positive' area trains as negative: this area would teach the "
        "opposite of what its class says. Set its class to 'PD-L1 positive' in QuPath and export again if it is "
        "PD-L1 positive tissue; otherwise give it a class that does not say positive, or move it out of the training "
        "region"
    )
    # Another marker's positive area says nothing of PD-L1: skipped, not refused.
    other = _obj(shapely.box(40, 40, 60, 60), "CD8+")
    labels = labels_from_objects([region, other], slide="s.svs", image_size_px=(100, 100), rules=RULES)
    assert labels.counts["training regions"] == 1
    # Points of that class are nuclei, and a 'PD-L1 positive' area is the label itself.
    points = _obj(shapely.MultiPoint([(10, 10)]), "Tumor: Positive")
    area = _obj(shapely.box(40, 40, 60, 60), "PD-L1 positive")
    labels = labels_from_objects([region, points, area], slide="s.svs", image_size_px=(100, 100), rules=RULES)
    assert labels.counts["areas: PD-L1 positive"] == 1


def test_the_run_s_uncertainty_tiles_are_counted_as_its_results_not_as_other_objects():
    from bridge.objects import TILE_NAME

    tile = _obj(shapely.box(0, 0, 10, 10), name=TILE_NAME, measurements={"PD-L1 probability": 0.2}, object_type="tile")
    labels = labels_from_objects(
        [_obj(shapely.box(0, 0, 50, 50), "Training region"), tile], slide="s.svs", image_size_px=(100, 100), rules=RULES
    )
    assert labels.counts["skipped: pdl1 uncertainty tiles (results, never labels)"] == 1


def test_label_areas_far_outside_the_image_are_refused():
    # As from a 2048 px image used on a 1536 px one; a slight overhang past the edge is kept.
    far = [_obj(shapely.box(1000, 1000, 2000, 2000), "Training region")]
    with pytest.raises(LabelError, match=r"spans x 1000 to 2000, y 1000 to 2000 px, outside the 1536 x 1536 px"):
        labels_from_objects(far, slide="s.svs", image_size_px=(1536, 1536), rules=RULES)
    near = [_obj(shapely.box(1000, 1000, 1550, 1550), "Training region"),
            _obj(shapely.box(1100, 1100, 1200, 1200), "PD-L1 positive")]  # fmt: skip
    labels = labels_from_objects(near, slide="s.svs", image_size_px=(1536, 1536), rules=RULES)
    assert labels.counts["training regions"] == 1


def test_point_classes_the_model_lacks_must_be_mapped():
    objects = [_obj(shapely.MultiPoint([(1, 1), (2, 2)]), "connective"), _obj(shapely.Point(3, 3), "junk")]
    with pytest.raises(LabelError, match=r"connective \(2 points\), junk \(1 points\).*--class-map"):
        labels_from_objects(objects, slide="s.svs", image_size_px=(10, 10), rules=RULES)
    rules = LabelRules(HE_CLASSES, class_map=parse_class_map(["connective=Other", "junk="]))
    labels = labels_from_objects(objects, slide="s.svs", image_size_px=(10, 10), rules=rules)
    assert labels.points_class.tolist() == [2, 2]
    assert labels.counts["skipped: points of junk (mapped to none)"] == 1


def test_points_under_ignore_are_left_out_and_counted():
    labels = labels_from_objects(
        [_obj(shapely.MultiPoint([(1, 1), (8, 8)]), "Other"), _obj(shapely.box(5, 5, 10, 10), "Ignore*")],
        slide="s.svs",
        image_size_px=(10, 10),
        rules=RULES,
    )
    assert labels.points_xy.tolist() == [[1.0, 1.0]]
    assert labels.counts["skipped: points under Ignore*"] == 1


def test_a_bad_class_map_entry_is_a_usage_error():
    with pytest.raises(LabelError, match="LABEL=MODEL"):
        parse_class_map(["connective"])
    # One label two ways took the last without a word (helper-150): Other trained as Tumor: Negative.
    with pytest.raises(LabelError, match=r"maps 'Other' twice, to Tumor: Positive and to Tumor: Negative; give one"):
        parse_class_map(["Other=Tumor: Positive", "Other=Tumor: Negative"])
    with pytest.raises(LabelError, match=r"maps 'junk' twice, to nothing and to Other"):
        parse_class_map(["junk=", "junk=Other"])
    assert parse_class_map(["Other=Other", "Other=Other"]) == {"Other": "Other"}  # the same twice says one thing


def _project_copy(labelled: Path, tmp_path: Path) -> Path:
    """The fixture project beside its slide, as the project was made (the moved-project rule finds it)."""
    shutil.copytree(labelled / "project", tmp_path / "project")
    (tmp_path / "he-1357.svs").symlink_to(labelled / "he-1357.svs")
    return tmp_path / "project"


def _exported_project_copy(labelled: Path, tmp_path: Path) -> Path:
    """:func:`_project_copy` with entry 1's labels where the export script writes them: QuPath's GeoJSON of the
    entry's objects, as a list of features."""
    project = _project_copy(labelled, tmp_path)
    exported = export_path(project, "1")
    exported.parent.mkdir(parents=True)
    features = json.loads((labelled / "objects-labelled-by-pathologist-0.4.4.geojson").read_text())["features"]
    exported.write_text(json.dumps(features))
    return project


def test_a_project_without_qupath_reads_the_export_script_s_geojson_as_the_same_labels(labelled, tmp_path):
    project = _exported_project_copy(labelled, tmp_path)
    (labels,) = read_project_labels(project, rules=RULES, entries=["1"], qupath="never")
    assert labels.slide == str(tmp_path / "he-1357.svs")
    assert labels_digest(labels) == labels_digest(_fixture_labels(labelled))
    assert "entry 1 (he-1357.svs)" in labels.source


def _two_he_entries(labelled: Path, tmp_path: Path) -> Path:
    """:func:`_exported_project_copy` with entry 2 (the same file) typed H&E and its labels exported too."""
    project = _exported_project_copy(labelled, tmp_path)
    summary = project / "data" / "2" / "summary.json"
    summary.write_text(summary.read_text().replace("BRIGHTFIELD_H_DAB", "BRIGHTFIELD_H_E"))
    shutil.copy(export_path(project, "1"), export_path(project, "2"))
    return project


def test_every_entry_s_bad_labels_are_named_in_one_refusal(labelled, tmp_path):
    """Training stopped at the first entry with bad labels: with two, the user fixed one, ran again, and only then
    heard of the other. Now every entry is read, and each that cannot be trained on is named with its fix."""
    project = _two_he_entries(labelled, tmp_path)
    assert len(read_project_labels(project, rules=RULES, qupath="never")) == 2
    mistyped = LabelRules(class_names=HE_CLASSES, class_map={"Other": "Tumour"})
    with pytest.raises(LabelError, match=r"^--class-map 'Other=Tumour': the MODEL side"):  # an option's: said once
        read_project_labels(project, rules=mistyped, qupath="never")
    features = json.loads(export_path(project, "1").read_text())
    (points,) = [f for f in features if f["properties"].get("name") == "Other points"]
    points["geometry"]["coordinates"].append([3000.0, 100.0])  # past the 2048 px image's right edge
    export_path(project, "1").write_text(json.dumps(features))
    export_path(project, "2").write_text("[{")
    with pytest.raises(LabelError) as err:
        read_project_labels(project, rules=RULES, qupath="never")
    first, one, two = str(err.value).split("\n")
    assert first == (
        f"{project / 'project.qpproj'}: 2 of 2 entries cannot be used, so nothing was trained or exported; fix each "
        "(or leave it out with --entries), then run again:"
    )
    assert one.startswith(f"- entry 1 (he-1357.svs): {export_path(project, '1')}: 1 of 1253 points lie outside")
    assert two.startswith(f"- entry 2 (he-1357.svs): {export_path(project, '2')}: not JSON (")
    # The fix of an export that does not read is the export script, not QuPath's own GeoJSON export.
    assert two.endswith("; export it again: run qupath_scripts/pdl1_export_labels.groovy on he-1357.svs in QuPath "
                        "(or Run for project)")  # fmt: skip
    # One bad entry is refused in its own words, as before.
    with pytest.raises(LabelError, match=r"^.*1\.geojson: 1 of 1253 points lie outside"):
        read_project_labels(project, rules=RULES, entries=["1"], qupath="never")
    moved = project.parent / "he-1357.svs"
    moved.unlink()  # an image that is not found is named with the others
    with pytest.raises(LabelError, match=r"(?s)- entry 1 \(he-1357.svs\): image of entry 1 .* has moved.*- entry 2"):
        read_project_labels(project, rules=RULES, qupath="never")


def test_an_export_cut_short_is_refused_as_such_with_the_fix(labelled, tmp_path):
    # The script's layout (one object a line) with its end missing (a copy interrupted, the disk full): read a line
    # at a time, it is said to be cut short, not parsed again whole to fail with JSON's "Expecting ',' delimiter".
    project = _two_he_entries(labelled, tmp_path)
    features = json.loads(export_path(project, "2").read_text())
    lines = [json.dumps(f, separators=(",", ":")) for f in features]
    export_path(project, "2").write_text("[\n" + ",\n".join(lines[:-1]) + ",\n")
    with pytest.raises(LabelError) as err:
        read_project_labels(project, rules=RULES, qupath="never")
    assert str(err.value) == (
        f"{export_path(project, '2')}: cut short: the file ends after {len(lines) - 1} "
        "objects without the closing ']' of their list (an export or a copy interrupted, or the disk full?); export "
        "it again: run qupath_scripts/pdl1_export_labels.groovy on he-1357.svs in QuPath (or Run for project)"
    )


@pytest.mark.parametrize("qupath", ["never", "always"])
def test_a_project_s_labels_carry_qupath_s_pixel_size_which_wins_over_the_file_s(
    labelled, tmp_path, monkeypatch, qupath
):
    """As `pdl1 run` reads an entry: the pixel size set in QuPath (1 µm/px here) replaces the file's own (the SVS
    states 0.5), through QuPath (paquo, faked here: QuPath cannot start in this test) and from the exports alike.
    Training read the file's own, so a slide QuPath calibrated otherwise was trained at another scale."""
    from bridge import qupath as qupath_module
    from bridge.qupath_geojson import read_features
    from inference import open_labelled_slide
    from inference.training.train_seg import load_labelled_seg_slide

    project = _exported_project_copy(labelled, tmp_path)
    qpproj = json.loads((project / "project.qpproj").read_text())
    calibration = qpproj["images"][0]["serverBuilder"]["metadata"]["pixelCalibration"]
    for key in ("pixelWidth", "pixelHeight"):
        calibration[key]["value"] = 1.0
    (project / "project.qpproj").write_text(json.dumps(qpproj))
    objects = list(read_features(labelled / "objects-labelled-by-pathologist-0.4.4.geojson"))
    monkeypatch.setattr(
        qupath_module, "read_entry_objects", lambda path, ids, keep: {"1": [o for o in objects if keep("1", o)]}
    )
    (labels,) = read_project_labels(project, rules=RULES, entries=["1"], qupath=qupath)
    assert labels.mpp == 1.0 and labels.source.endswith(" through QuPath") == (qupath == "always")
    with open_labelled_slide(labels) as slide:
        assert (slide.mpp.mean, slide.mpp.source) == (1.0, "QuPath project")
    # 2048 px at 1 µm/px, read at 2 µm/px: 1024 px (at the file's 0.5 µm/px it was 512).
    assert load_labelled_seg_slide(labels, input_mpp=2.0, patch_px=32).rgb.shape[:2] == (1024, 1024)
    plain = read_geojson_labels(
        labelled / "objects-labelled-by-pathologist-0.4.4.geojson", slide=labelled / "he-1357.svs",
        image_size_px=(2048, 2048), rules=RULES,
    )  # fmt: skip
    assert plain.mpp is None  # a slide given with its GeoJSON: the file's own
    assert load_labelled_seg_slide(plain, input_mpp=2.0, patch_px=32).rgb.shape[:2] == (512, 512)


def test_a_project_entry_without_an_export_names_the_script(labelled, tmp_path):
    project = _project_copy(labelled, tmp_path)
    with pytest.raises(LabelError, match=r"entry 1 .*pdl1_export_labels.groovy"):
        read_project_labels(project, rules=RULES, entries=["1"], qupath="never")
    with pytest.raises(LabelError, match=r"no entry 'nope'; the project has 1 \(he-1357.svs\), 2"):
        read_project_labels(project, rules=RULES, entries=["nope"], qupath="never")


def test_an_entry_qupath_types_as_another_stain_than_the_labels_train_is_refused(labelled, tmp_path):
    # Entry 2 is the same file typed BRIGHTFIELD_H_DAB: H&E labels (the default) refuse it, saying how an IHC trains.
    project = _project_copy(labelled, tmp_path)
    with pytest.raises(
        LabelError, match=r"entry 2 \(he-1357.svs\): QuPath's image type BRIGHTFIELD_H_DAB says H-DAB; .*--stain ihc"
    ):
        read_project_labels(project, rules=RULES, entries=["2"], qupath="never")
    # Labels for the IHC nuclei model take entry 2, with the IHC classes and the stain, and refuse the H&E entry 1.
    ihc_rules = dataclasses.replace(RULES, class_names=tuple(IHC_NUCLEUS_CLASSES), stain="H-DAB")
    with pytest.raises(LabelError, match=r"entry 1 \(he-1357.svs\): QuPath's image type BRIGHTFIELD_H_E says H&E; "):
        read_project_labels(project, rules=ihc_rules, entries=["1"], qupath="never")
    with pytest.raises(LabelError, match=r"entry 2 .*pdl1_export_labels.groovy"):  # past the stain, to its labels
        read_project_labels(project, rules=ihc_rules, entries=["2"], qupath="never")


def test_a_slide_whose_colour_says_another_stain_is_warned_of(ihc_pair, caplog):
    from bridge.labels import warn_unless_stain

    he, ihc = ihc_pair
    ihc_rules = dataclasses.replace(RULES, class_names=tuple(IHC_NUCLEUS_CLASSES), stain="H-DAB")
    for slide, rules in ((he, RULES), (ihc, ihc_rules)):
        with caplog.at_level("WARNING", logger="bridge.labels"):
            warn_unless_stain(slide, slide.name, rules)
        assert not caplog.records
    # --stain is offered only where the command has it (pdl1 train nuclei); pdl1 train seg and pdl1 export nnunet,
    # which read H&E labels, were told to give it too.
    nuclei_rules = dataclasses.replace(RULES, stain_option="--stain")
    with caplog.at_level("WARNING", logger="bridge.labels"):
        warn_unless_stain(ihc, "ihc_271.svs", nuclei_rules)
        warn_unless_stain(he, "he_271.svs", dataclasses.replace(ihc_rules, stain_option="--stain"))
        warn_unless_stain(ihc, "ihc_271.svs", LabelRules(points=False))
    first, second, third = (r.getMessage() for r in caplog.records)
    assert first.startswith("ihc_271.svs: its colour says H-DAB") and "(or give `--stain ihc`)" in first
    assert second.startswith("he_271.svs: its colour says H&E") and "train the PD-L1 IHC nuclei model" in second
    assert "(or give `--stain he`)" in second
    assert third.startswith("ihc_271.svs: its colour says H-DAB") and "--stain" not in third
    assert "if it is another stain, leave it out; if it is an H&E, set its image type in QuPath" in third


@pytest.mark.qupath
def test_through_qupath_the_project_gives_the_labels_of_its_geojson(labelled, tmp_path):
    project = _project_copy(labelled, tmp_path)
    before = (project / "data" / "1" / "data.qpdata").read_bytes()
    (labels,) = read_project_labels(project, rules=RULES, entries=["1"], qupath="always")
    assert labels.counts == _fixture_labels(labelled).counts
    assert labels_digest(labels) == labels_digest(_fixture_labels(labelled))
    assert (project / "data" / "1" / "data.qpdata").read_bytes() == before  # read-only


@pytest.mark.qupath
def test_through_qupath_an_entry_without_labels_is_refused(labelled, tmp_path):
    project = _project_copy(labelled, tmp_path)
    # Entry 2 (no labels) is typed H-DAB, which is refused first: typed H&E here, as if the lab had set it so.
    summary = project / "data" / "2" / "summary.json"
    summary.write_text(summary.read_text().replace("BRIGHTFIELD_H_DAB", "BRIGHTFIELD_H_E"))
    with pytest.raises(LabelError, match=r"entry 2 .*no labels"):
        read_project_labels(project, rules=RULES, entries=["2"], qupath="always")


@pytest.mark.qupath
def test_through_qupath_an_ihc_entry_is_read_for_the_ihc_nuclei_model(labelled, tmp_path):
    # Entry 2 is typed H-DAB in QuPath: IHC labels (--stain ihc) pass it on to QuPath's reader, which finds it holds
    # no labels; H&E labels refuse it before QuPath reads anything.
    project = _project_copy(labelled, tmp_path)
    ihc_rules = dataclasses.replace(RULES, class_names=tuple(IHC_NUCLEUS_CLASSES), stain="H-DAB")
    with pytest.raises(LabelError, match=r"entry 2 .*no labels"):
        read_project_labels(project, rules=ihc_rules, entries=["2"], qupath="always")
    with pytest.raises(LabelError, match=r"entry 2 .*says H-DAB; .*--stain ihc"):
        read_project_labels(project, rules=RULES, entries=["2"], qupath="always")


def test_labels_digest_ignores_object_order():
    a = [_obj(shapely.box(0, 0, 4, 4), "PD-L1 positive"), _obj(shapely.MultiPoint([(1, 1), (2, 2)]), "Other")]
    first = labels_from_objects(a, slide="s", image_size_px=(10, 10), rules=RULES)
    second = labels_from_objects(a[::-1], slide="s", image_size_px=(10, 10), rules=RULES)
    assert labels_digest(first) == labels_digest(second)
    moved = labels_from_objects(
        [a[0], _obj(shapely.MultiPoint([(1, 1), (2, 3)]), "Other")], slide="s", image_size_px=(10, 10), rules=RULES
    )
    assert labels_digest(moved) != labels_digest(first)
    assert np.array_equal(first.points_xy, [[1, 1], [2, 2]])


def test_validation_slides_are_held_out_whole_by_entry_id_image_name_or_file_name():
    from bridge.labels import split_validation
    from inference import SlideLabels

    def lab(slide, source=""):
        return SlideLabels(slide, (10, 10), positive=shapely.box(0, 0, 2, 2), source=source)

    a = lab("/s/a.svs", "/p/project.qpproj entry 1 (A.svs) from /p/pdl1/labels/1.geojson")
    b = lab("/s/b.svs", "/p/project.qpproj entry 2 (B.svs) through QuPath")
    c = lab("/s/c.svs", "/s/c.geojson")
    for names in (["2"], ["B.svs"], ["b.svs"]):
        assert split_validation([a, b, c], names) == ([a, c], [b])
    assert split_validation([a, b, c], ["c.svs", "1"]) == ([b], [a, c])
    with pytest.raises(LabelError) as err:
        split_validation([a, b, c], ["7"])
    assert str(err.value) == (
        "--val-entries names 7, which no labelled slide is; the labelled slides are entry 1 (A.svs); entry 2 (B.svs); "
        "c.svs: give an entry ID, image name or slide file name of one of them"
    )
    with pytest.raises(LabelError, match="every labelled slide is held out"):
        split_validation([a], ["a.svs"])
    # A share of the slides, whole: drawn by the seed, at least one held out and one kept.
    train, held = split_validation([a, b, c], [], fraction=0.3, seed=0)
    assert len(held) == 1 and sorted(map(id, train + held)) == sorted(map(id, [a, b, c]))
    assert split_validation([a, b, c], [], fraction=0.3, seed=0) == (train, held)
    draws = {split_validation([a, b, c], [], fraction=0.3, seed=s)[1][0].slide for s in range(20)}
    assert len(draws) > 1  # the seed chooses
    assert len(split_validation([a, b, c], [], fraction=0.9)[0]) == 1
    with pytest.raises(LabelError, match="not both"):
        split_validation([a, b], ["a.svs"], fraction=0.5)
    with pytest.raises(LabelError, match="holds out whole slides, and there is 1 labelled slide"):
        split_validation([a], [], fraction=0.5)


def test_validation_needs_a_region_with_every_nucleus_marked():
    from inference import SlideLabels, demo_model_dir, score_nuclei_on_labels

    sparse = SlideLabels(
        "s.svs",
        (10, 10),
        (shapely.box(0, 0, 5, 5),),
        (False,),
        points_xy=np.array([[1.0, 1]]),
        points_class=np.array([2]),
        class_names=HE_CLASSES,
    )
    with pytest.raises(ValueError, match="validation needs a training region with every nucleus marked"):
        score_nuclei_on_labels(demo_model_dir("nuclei"), [sparse])


def test_a_paired_ihc_area_labels_the_whole_he_with_a_band_around_its_edge_ignored(tmp_path):
    from bridge.classes import PDL1_IHC_POSITIVE
    from bridge.qupath_geojson import to_feature, write_features

    # As bridge/pairs.py writes pdl1/pairs/<H&E key>.ihc_positive.geojson.
    path = tmp_path / "he_1.ihc_positive.geojson"
    area = QuPathObject(shapely.box(100, 100, 300, 300), "annotation", PDL1_IHC_POSITIVE.name, {"Area µm^2": 1e4})
    write_features(path, [to_feature(area)])
    rules = LabelRules((), points=False, ihc_band_um=10.0)
    labels = read_geojson_labels(path, slide="he_1.svs", image_size_px=(400, 400), rules=rules, mpp=0.5)
    assert labels.counts == {"paired IHC positive areas": 1}
    target = region_target(labels, shape_hw=(400, 400), downsample=1)
    assert target[200, 200] == 1 and target[10, 10] == 0 and target[390, 200] == 0
    # 10 µm at 0.5 µm/px: 20 px either side of the edge at x = 100 are not labels.
    assert (target[200, 81:119] == IGNORE_LABEL).all()
    assert target[200, 78] == 0 and target[200, 122] == 1
    # Skipped, the count says what trains on it: only pdl1 train seg has --ihc-band-um (pdl1 export nnunet reads
    # regions without one), and a nuclei run trains on points (both were told "use --ihc-band-um").
    for without_band, why in (
        (LabelRules((), points=False), r"\(`pdl1 train seg --ihc-band-um` trains on it\)"),
        (LabelRules(HE_CLASSES), r"\(a nuclei run\)"),
    ):
        with pytest.raises(LabelError, match=rf"no labels \(skipped: paired IHC area {why}: 1\)"):
            read_geojson_labels(path, slide="he_1.svs", image_size_px=(400, 400), rules=without_band, mpp=0.5)
    # The area is positive cells' discs (8 µm around each): a gap narrower than two cells between them lies in a
    # positive nest and is closed before the band is cut, so the band does not eat the nest from inside.
    cells = shapely.union_all([shapely.Point(x, 200).buffer(16) for x in (100, 136, 172, 208, 244, 280)])
    assert cells.area < shapely.box(84, 184, 296, 216).area  # gaps of a few px between the discs
    write_features(path, [to_feature(QuPathObject(cells, "annotation", PDL1_IHC_POSITIVE.name, {}))])
    nest = read_geojson_labels(
        path, slide="he_1.svs", image_size_px=(400, 400), rules=LabelRules((), points=False, ihc_band_um=2.0), mpp=0.5
    )
    target = region_target(nest, shape_hw=(400, 400), downsample=1)
    assert (target[200, 110:270] == 1).all()  # between the cells too; the band only at the nest's outer edge
    # An area whose IHC was flagged in its run (bridge.pairs marks it) still labels, and is counted apart.
    from bridge.labels import DOUBTFUL_IHC_COUNT
    from bridge.pairs import IHC_NEEDS_REVIEW

    doubtful = QuPathObject(area.geometry, "annotation", area.classification, {IHC_NEEDS_REVIEW: 1.0})
    write_features(path, [to_feature(doubtful)])
    labels = read_geojson_labels(path, slide="he_1.svs", image_size_px=(400, 400), rules=rules, mpp=0.5)
    assert labels.counts == {"paired IHC positive areas": 1, DOUBTFUL_IHC_COUNT: 1}


def _add_entry(project: Path, slide: Path, entry_id: int) -> None:
    """An H&E entry for ``slide`` added to the fixture project as QuPath adds one (its entry and data folder)."""
    import copy

    qpproj = project / "project.qpproj"
    data = json.loads(qpproj.read_text())
    entry = copy.deepcopy(data["images"][0])
    uri = f"file:///data/pathology/pdl1-labels/{slide.name}"  # where the project was made; the slide sits beside it
    entry.update(entryID=entry_id, imageName=slide.name, randomizedName=f"{entry_id:08d}-0000-0000-0000-000000000000")
    entry["metadata"] = {}
    entry["serverBuilder"]["uri"] = uri
    entry["serverBuilder"]["metadata"]["name"] = slide.name
    data["images"].append(entry)
    data["lastID"] = entry_id
    qpproj.write_text(json.dumps(data))
    folder = project / "data" / str(entry_id)
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"imageType": "BRIGHTFIELD_H_E", "hierarchy": {"nObjects": 0}}))


def test_nnunet_export_of_a_project_cuts_its_test_images_whole_without_labels(labelled, tmp_path):
    # `--test IMAGE` of a project labelled in QuPath: the image to predict has no drawn regions (nor needs
    # any), so it is cut whole into imagesTs/; the training cases are the labelled entry's regions.
    from typer.testing import CliRunner

    from bridge.cli.app import app
    from inference.phantom.pyramid import write_phantom
    from inference.phantom.scene import PhantomSpec

    project = _exported_project_copy(labelled, tmp_path)
    write_phantom(tmp_path / "unseen.svs", PhantomSpec(2048, 2048, seed=77, tps_percent=20))
    _add_entry(project, tmp_path / "unseen.svs", 3)
    out = tmp_path / "Dataset602_LAB"
    args = ["export", "nnunet", str(project), "--out", str(out), "--qupath", "never", "--mpp", "2"]
    result = CliRunner().invoke(app, [*args, "--entries", "1", "--test", "unseen.svs"])
    assert result.exit_code == 0, result.output
    cases = json.loads((out / "cases.json").read_text())
    by_split = {split: [c for c in cases.values() if c["split"] == split] for split in ("train", "test")}
    assert [(c["entry_id"], c["image_name"]) for c in by_split["test"]] == [("3", "unseen.svs")]
    assert by_split["test"][0]["region_xywh"] == [0, 0, 2048, 2048]  # 2048 px at 0.5 µm/px: one 512 px case at 2
    assert {c["entry_id"] for c in by_split["train"]} == {"1"} and len(by_split["train"]) == 2
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["unseen_0000_0000.png"]
    assert len(list((out / "labelsTr").iterdir())) == 2
    # Two entries of the fixture show one file under one name: --test asks which, by ID.
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "Dataset603_X"), "--test", "he-1357.svs"])
    assert result.exit_code == 1
    assert "2 entries are named 'he-1357.svs' (IDs 1, 2); give the ID of the one to predict with --test" in " ".join(
        result.output.split()
    )
    # A test entry is no training entry: --entries naming only it says so.
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "Dataset604_X"), "--entries", "3", "--test", "3"])
    assert result.exit_code == 2
    assert "entry 3 (unseen.svs) is to be predicted (--test), so --entries leaves nothing to train on" in " ".join(
        result.output.replace("│", " ").split()
    )
    assert not list(tmp_path.glob("*Dataset60[34]*"))


def test_without_validation_entries_every_slide_trains_and_phantoms_pass_through():
    from bridge.labels import split_validation

    assert split_validation([], []) == ([], [])


def test_nnunet_export_takes_the_regions_drawn_in_a_project(labelled, tmp_path):
    # The labelled fixture through the export script's GeoJSON: cases cut from its training regions, labels
    # as pdl1 train seg reads them, every undecided pixel nnU-Net's ignore label.
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from bridge.cli.app import app

    project = _exported_project_copy(labelled, tmp_path)
    out = tmp_path / "Dataset601_LAB"
    result = CliRunner().invoke(
        app,
        ["export", "nnunet", str(project), "--out", str(out), "--entries", "1", "--qupath", "never", "--mpp", "2"],
    )
    assert result.exit_code == 0, result.output
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "PD-L1 positive": 1, "ignore": 2}
    cases = json.loads((out / "cases.json").read_text())
    assert cases and all(c["entry_id"] == "1" for c in cases.values())
    values = np.concatenate([np.asarray(Image.open(p)).ravel() for p in sorted((out / "labelsTr").glob("*.png"))])
    assert set(np.unique(values)) <= {0, 1, 2} and (values == 1).any() and (values == 0).any()
    # Against the phantom's truth: labelled pixels agree where the pathologist traced it.
    from inference import load_truth

    truth = load_truth(labelled / "he-1357.svs")
    agree = total = 0
    for name, case in cases.items():
        x, y, w, h = case["region_xywh"]
        label = np.asarray(Image.open(out / "labelsTr" / f"{name}.png"))
        ds = truth.mask_downsample
        mask = truth.positive_mask[int(y // ds) : int((y + h) // ds), int(x // ds) : int((x + w) // ds)]
        mask = np.asarray(Image.fromarray(mask * 255).resize(label.shape[::-1], Image.Resampling.NEAREST)) > 0
        known = label != 2
        agree += int(((label == 1) == mask)[known].sum())
        total += int(known.sum())
    assert total > 0 and agree / total > 0.9


def _nucleus(x, y, cls):
    from bridge.objects import OWN_DETECTION_SIGNATURE

    return _obj(shapely.Point(x, y), cls, measurements={OWN_DETECTION_SIGNATURE: 0.5}, object_type="detection")


def _candidate(geometry, cls="PD-L1 FN candidate"):
    from bridge.labels import SUA_SIGNATURE
    from bridge.objects import OWN_ANNOTATION_SIGNATURE

    return _obj(geometry, cls, measurements={OWN_ANNOTATION_SIGNATURE: 0.2, SUA_SIGNATURE: 0.4})


def test_with_the_last_run_s_output_reclassified_nuclei_and_deleted_candidates_are_review_labels():
    from bridge.labels import WrittenObjects

    kept, dismissed = shapely.box(10, 10, 30, 30), shapely.box(60, 60, 80, 80)
    written = WrittenObjects.from_objects(
        [
            _nucleus(5, 5, "Tumor: Positive"),
            _nucleus(40.25, 7.5, "Tumor: Negative"),
            _nucleus(90, 90, "Other"),
            _candidate(kept),
            _candidate(dismissed),
        ]
    )
    assert len(written.nuclei_xy) == 3 and len(written.candidates) == 2
    image = [
        _nucleus(5, 5, "Tumor: Negative"),  # a person corrected it
        _nucleus(40.25, 7.5, "Tumor: Negative"),  # as written
        _nucleus(50, 50, "Tumor: Positive"),  # not in the run's output (another run's)
        _candidate(kept, "PD-L1 positive"),  # reclassified: a confirmed miss
        # the other candidate was deleted: dismissed
    ]
    review = LabelRules(class_names=HE_CLASSES, from_review=True)
    labels = labels_from_objects(image, slide="s", image_size_px=(100, 100), rules=review, written=written)
    assert labels.points_xy.tolist() == [[5.0, 5.0]] and labels.points_class.tolist() == [1]
    assert labels.positive.equals(kept) and labels.negative.equals(dismissed)
    assert labels.counts["reviewed: nuclei reclassified"] == 1
    assert labels.counts["reviewed: PD-L1 FN candidate deleted (PD-L1 negative)"] == 1
    assert labels.counts["skipped: pdl1 results as written (not reviewed)"] == 1
    assert labels.counts[UNRECORDED_NUCLEI_COUNT] == 1
    # Without --from-review none of it is a label; a segmentation run counts the corrected nuclei as skipped.
    with pytest.raises(LabelError, match="no labels"):
        labels_from_objects(image, slide="s", image_size_px=(100, 100), rules=RULES, written=written)
    seg = LabelRules(from_review=True, points=False)
    seg_labels = labels_from_objects(image, slide="s", image_size_px=(100, 100), rules=seg, written=written)
    assert seg_labels.counts["skipped: reviewed nuclei (a segmentation run)"] == 1 and not seg_labels.has_points
    # An image cleared of the run's annotations was not reviewed: its candidates are not taken as dismissed.
    cleared = labels_from_objects(image[:1], slide="s", image_size_px=(100, 100), rules=review, written=written)
    assert cleared.negative.is_empty
    assert cleared.counts[GONE_OUTPUT_CANDIDATES_COUNT] == 2
    # A corrected class the model lacks needs a mapping, as drawn points do.
    odd = [_nucleus(5, 5, "Stroma"), _candidate(kept, "PD-L1 positive")]
    with pytest.raises(LabelError, match=r"Stroma \(1 points\).*--class-map"):
        labels_from_objects(odd, slide="s", image_size_px=(100, 100), rules=review, written=written)


def test_on_an_ihc_the_nuclei_a_person_reclassified_are_ihc_labels_with_its_classes():
    # pdl1 run writes an IHC's cells in the IHC classes; --stain ihc --from-review takes a pathologist's corrections.
    from bridge.labels import WrittenObjects

    written = WrittenObjects.from_objects(
        [_nucleus(5, 5, "Tumor: Positive"), _nucleus(40, 8, "Immune cells: PD-L1 negative"), _nucleus(90, 90, "Other")]
    )
    image = [
        _nucleus(5, 5, "Tumor: Negative"),  # no membrane staining: corrected
        _nucleus(40, 8, "Immune cells: PD-L1 positive"),  # a stained macrophage: corrected
        _nucleus(90, 90, "Other"),  # as written
    ]
    review = LabelRules(class_names=tuple(IHC_NUCLEUS_CLASSES), from_review=True, stain="H-DAB")
    labels = labels_from_objects(image, slide="s", image_size_px=(100, 100), rules=review, written=written)
    assert labels.stain == "H-DAB" and labels.class_names == tuple(IHC_NUCLEUS_CLASSES)
    names = [labels.class_names[c] for c in labels.points_class]
    assert labels.points_xy.tolist() == [[5.0, 5.0], [40.0, 8.0]]
    assert names == ["Tumor: Negative", "Immune cells: PD-L1 positive"]
    assert labels.counts["reviewed: nuclei reclassified"] == 2
    # H&E labels do not take the immune classes: the message points at --stain ihc.
    he_review = LabelRules(class_names=HE_CLASSES, from_review=True)
    with pytest.raises(LabelError, match=r"Immune cells: PD-L1 positive \(1 points\).*train it with --stain ihc"):
        labels_from_objects(image, slide="s", image_size_px=(100, 100), rules=he_review, written=written)


def test_candidates_no_record_holds_are_counted_since_deletions_beside_them_cannot_be_told():
    # A project whose run output and records are gone (or never were: an export from another copy): --from-review
    # took the reclassified candidates and said nothing of the deleted ones it could not see.
    from bridge.labels import UNRECORDED_ANNOTATIONS_COUNT, WrittenAnalysis, WrittenObjects

    kept, reclassified, other = shapely.box(10, 10, 30, 30), shapely.box(60, 60, 80, 80), shapely.box(40, 60, 50, 70)
    image = [_candidate(kept), _candidate(reclassified, "PD-L1 negative")]
    review = LabelRules(class_names=HE_CLASSES, from_review=True)

    def counted(written):
        labels = labels_from_objects(image, slide="s", image_size_px=(100, 100), rules=review, written=written)
        # Reclassified is told from the object itself, record or not.
        assert labels.negative.intersection(reclassified).area == reclassified.area
        return labels.counts.get(UNRECORDED_ANNOTATIONS_COUNT, 0)

    assert counted(WrittenObjects(())) == 2
    assert counted(WrittenObjects.from_objects([_candidate(kept), _candidate(reclassified), _candidate(other)])) == 0
    # A record of another analysis holds one of them; one recorded by its region's bounds counts as held.
    assert counted(WrittenObjects.from_objects([_candidate(kept)])) == 1
    regions = WrittenObjects((WrittenAnalysis(np.zeros((0, 2)), (), (), np.asarray([reclassified.bounds])),))
    assert counted(regions) == 1
    # Without --from-review nothing is read, so nothing is counted.
    drawn = [*image, _obj(shapely.box(0, 0, 8, 8), "PD-L1 positive")]
    plain = labels_from_objects(drawn, slide="s", image_size_px=(100, 100), rules=RULES, written=WrittenObjects(()))
    assert UNRECORDED_ANNOTATIONS_COUNT not in plain.counts


def test_a_deleted_candidate_yields_where_the_reviewer_drew_positive_area_over_it():
    """A reviewer who redrew a candidate's positive part as a PD-L1 positive area and deleted the candidate got
    'PD-L1 positive and PD-L1 negative labels overlap ...: fix one of them in QuPath', naming an object (the
    deleted candidate, taken as negative) no longer in QuPath. What they drew is the label there."""
    from bridge.labels import WrittenObjects

    kept, dismissed = shapely.box(10, 10, 30, 30), shapely.box(60, 60, 80, 80)
    written = WrittenObjects.from_objects([_candidate(kept), _candidate(dismissed)])
    drawn = _obj(shapely.box(70, 60, 90, 80), "PD-L1 positive")  # over the right half of the deleted candidate
    review = LabelRules(class_names=HE_CLASSES, from_review=True)
    labels = labels_from_objects(
        [_candidate(kept), drawn], slide="s", image_size_px=(100, 100), rules=review, written=written
    )
    assert labels.negative.equals(shapely.box(60, 60, 70, 80)) and labels.positive.equals(drawn.geometry)
    assert labels.counts["reviewed: PD-L1 FN candidate deleted (PD-L1 negative)"] == 1
    assert labels.counts["reviewed: PD-L1 FN candidate deleted, PD-L1 positive drawn over it (there positive)"] == 1
    # Drawn over whole, nothing of it is negative.
    whole = _obj(shapely.box(55, 55, 85, 85), "PD-L1 positive")
    labels = labels_from_objects(
        [_candidate(kept), whole], slide="s", image_size_px=(100, 100), rules=review, written=written
    )
    assert labels.negative.is_empty and labels.positive.equals(whole.geometry)


@pytest.mark.parametrize("qupath", ["never", pytest.param("always", marks=pytest.mark.qupath)])
def test_a_project_s_run_output_tells_which_candidate_a_pathologist_deleted(labelled, tmp_path, qupath):
    from bridge.labels import WrittenObjects, _tool_written_class
    from bridge.qupath_geojson import read_features, to_feature

    project = _exported_project_copy(labelled, tmp_path)
    # The run's own output: the fixture's three candidates as the tool wrote them, and a fourth the reviewer deleted.
    objects = list(read_features(labelled / "objects-labelled-by-pathologist-0.4.4.geojson"))
    written = [
        QuPathObject(o.geometry, "annotation", "PD-L1 FN candidate", {**o.measurements, "SUA score": 0.3})
        for o in objects
        if _tool_written_class(o) is not None
    ]
    assert len(written) == 3
    deleted = shapely.box(1700, 1700, 1760, 1760)
    written.append(QuPathObject(deleted, "annotation", "PD-L1 FN candidate", dict(written[0].measurements)))
    run_output = project / "pdl1" / "1" / "objects.geojson"
    run_output.parent.mkdir(parents=True)
    run_output.write_text(json.dumps({"type": "FeatureCollection", "features": [to_feature(o) for o in written]}))
    assert len(WrittenObjects.read(run_output).candidates) == 4
    review = LabelRules(class_names=HE_CLASSES, from_review=True)
    (labels,) = read_project_labels(project, rules=review, entries=["1"], qupath=qupath)
    assert labels.counts["reviewed: PD-L1 FN candidate deleted (PD-L1 negative)"] == 1
    assert labels.negative.contains(deleted.centroid)
    (plain,) = read_project_labels(project, rules=RULES, entries=["1"], qupath=qupath)
    assert not plain.negative.contains(deleted.centroid)  # without --from-review nothing of the run is read
    run_output.write_text("{not json")
    with pytest.raises(LabelError, match="last run's output is not readable GeoJSON"):
        read_project_labels(project, rules=review, entries=["1"], qupath=qupath)


@pytest.mark.parametrize("cls", ["tumor: positive", "Tumor:Positive", "Tumor: Positive "])
def test_point_classes_spelt_otherwise_are_named_with_the_class_map_that_takes_them(cls):
    """A class QuPath holds as 'Tumor: Positive ' (a trailing space) could not be mapped at all: --class-map strips
    its LABEL, and the points' class kept the space; nor did the error say which model class was meant (then it
    named the label's class as the model's: "these are the model's 'tumor: positive'")."""
    region = _obj(shapely.box(0, 0, 100, 100), "Training region")
    points = _obj(shapely.MultiPoint([(10, 10), (20, 20)]), cls)
    meant = f"{cls!r} is the model's 'Tumor: Positive' (pass --class-map '{cls}=Tumor: Positive')"
    with pytest.raises(LabelError, match=re.escape(meant)):
        labels_from_objects([region, points], slide="s.svs", image_size_px=(100, 100), rules=RULES)
    rules = LabelRules(class_names=HE_CLASSES, class_map=parse_class_map([f"{cls}=Tumor: Positive"]))
    labels = labels_from_objects([region, points], slide="s.svs", image_size_px=(100, 100), rules=rules)
    assert labels.counts["points: Tumor: Positive"] == 2


@pytest.mark.parametrize("geometry", [shapely.Point(), shapely.MultiPoint(), shapely.Polygon()])
def test_an_object_without_coordinates_is_counted_as_skipped(geometry):
    """A hand-written '"coordinates": []' Point ended in GEOS's 'getX called on empty Point' traceback."""
    region = _obj(shapely.box(0, 0, 100, 100), "Training region")
    labels = labels_from_objects(
        [region, _obj(geometry, "Other")], slide="s.svs", image_size_px=(100, 100), rules=RULES
    )
    assert labels.counts[f"skipped: annotation {geometry.geom_type} without coordinates"] == 1


@pytest.mark.parametrize(
    ("rules", "passed_over"),
    [
        (RULES, 6),  # the unclassified, Positive and Stroma cells and detections
        (LabelRules(HE_CLASSES, class_map=parse_class_map(["Positive=Tumor: Positive", "Stroma="])), 4),
        (LabelRules((), points=False), 8),  # and the two of nucleus classes
    ],
    ids=["nuclei", "nuclei, classes mapped", "segmentation"],
)
def test_the_reader_lets_go_of_cells_that_label_nothing_and_counts_them_the_same(tmp_path, rules, passed_over):
    """QuPath's positive cell detection is a million cells a slide (2 GB as objects), classed Positive and Negative,
    no nucleus label; a segmentation run labels with none of them. The reader passes over such cells as it reads them
    and counts them; the labels are those of every object given at once."""
    from bridge.labels import read_label_objects
    from bridge.objects import OWN_DETECTION_SIGNATURE
    from bridge.qupath_geojson import read_features, to_feature

    cell = shapely.box(10, 10, 16, 16)
    objects = [
        _obj(shapely.box(0, 0, 90, 90), "Training region"),
        _obj(shapely.box(40, 40, 50, 50), "PD-L1 positive"),
        *(_obj(cell, cls, object_type=kind) for kind in ("cell", "detection") for cls in (None, "Positive", "Stroma")),
        _obj(cell, "Tumor: Positive", object_type="cell"),  # a nucleus label
        _obj(cell, "PD-L1 negative", object_type="detection"),  # an area, whatever its object type
        _obj(cell, "Ignore*", object_type="cell"),
        _obj(shapely.MultiPolygon([cell, shapely.box(30, 30, 33, 33)]), "Other", object_type="detection"),
        _obj(shapely.Point(20, 20), "Tumor: Negative", object_type="detection"),  # a point
        _obj(cell, "Tumor: Negative", measurements={OWN_DETECTION_SIGNATURE: 0.5}, object_type="detection"),
        _obj(shapely.Polygon(), "Positive", object_type="cell"),
        dataclasses.replace(_obj(cell, None, object_type="cell"), plane_zt=(1, 0)),
    ]
    path = tmp_path / "labels.geojson"

    def feature(o):  # as QuPath exports a cell: its nucleus beside its outline
        kind = "detection" if o.object_type == "cell" else o.object_type
        out = to_feature(dataclasses.replace(o, object_type=kind, color=(9, 9, 9) if o.classification else None))
        if o.object_type == "cell":
            out["properties"]["objectType"], out["nucleusGeometry"] = "cell", out["geometry"]
        return out

    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature(o) for o in objects]}))
    read = read_label_objects(path, "export again", rules)
    kept_cells = [o for o in read.objects if o.object_type in ("cell", "detection")]
    assert sum(read.skipped.values()) == len(objects) - len(read.objects) == passed_over
    assert all(o.classification is not None or o.plane_zt != (0, 0) for o in kept_cells)  # none unclassified kept
    given = dict(slide="s.svs", image_size_px=(100, 100), rules=rules)
    whole = labels_from_objects(list(read_features(path)), **given)
    passed_over = read_geojson_labels(path, **given)
    assert passed_over.counts == whole.counts
    assert passed_over.points_xy.tolist() == whole.points_xy.tolist()
    assert passed_over.points_class.tolist() == whole.points_class.tolist()
    assert passed_over.positive.equals(whole.positive) and passed_over.negative.equals(whole.negative)
    assert passed_over.ignore.equals(whole.ignore)


def test_labels_given_as_a_folder_say_a_file_is_wanted(tmp_path):
    """A folder of exports given as --labels was 'no such GeoJSON file', though it is there."""
    with pytest.raises(LabelError, match=r"is a folder; --labels takes one GeoJSON file per slide"):
        read_geojson_labels(tmp_path, slide="s.svs", image_size_px=(100, 100), rules=RULES)


def test_cell_and_detection_polygons_of_a_nucleus_class_are_nuclei_at_their_centroids():
    """QuPath's cell detection makes polygons, not points; the cells a person classified are nucleus labels."""
    cell = _obj(shapely.box(10, 10, 20, 20), "Tumor: Positive", object_type="cell")
    detection = _obj(shapely.box(30, 30, 34, 38), "Other", object_type="detection")
    qupath_positive = _obj(shapely.box(50, 50, 60, 60), "Positive", object_type="cell")  # positive cell detection
    stroma = _obj(shapely.box(0, 0, 90, 90), "Stroma", object_type="detection")
    objects = [cell, detection, qupath_positive, stroma]
    labels = labels_from_objects(objects, slide="s.svs", image_size_px=(100, 100), rules=RULES)
    assert labels.points_xy.tolist() == [[15.0, 15.0], [32.0, 34.0]]
    assert labels.points_class.tolist() == [0, 2]
    assert labels.counts["nuclei from cell polygons (their centroids)"] == 1
    assert labels.counts["nuclei from detection polygons (their centroids)"] == 1
    hint = "--class-map 'Positive=CLASS' takes their centroids"
    assert labels.counts[f"skipped: cell polygons of Positive (not a nucleus class: {hint})"] == 1
    mapped = LabelRules(HE_CLASSES, class_map=parse_class_map(["Positive=Tumor: Positive", "Stroma="]))
    labels = labels_from_objects(objects, slide="s.svs", image_size_px=(100, 100), rules=mapped)
    assert labels.points_xy.tolist() == [[15.0, 15.0], [32.0, 34.0], [55.0, 55.0]]
    assert labels.counts["skipped: detection polygons of Stroma (mapped to none)"] == 1
    segmentation = labels_from_objects(
        [_obj(shapely.box(0, 0, 90, 90), "Training region"), cell],
        slide="s.svs",
        image_size_px=(100, 100),
        rules=LabelRules((), points=False),
    )
    assert len(segmentation.points_xy) == 0
    assert segmentation.counts["skipped: cell Polygon (Tumor: Positive)"] == 1  # as before: not a label there


def test_a_class_map_onto_no_class_of_the_model_names_the_mistyped_target():
    # --class-map 'Tumor=Tumour: Positive' said "points of classes the model does not have: Tumor ... map each with
    # --class-map", naming the label the user had mapped, not the target they mistyped.
    objects = [_obj(shapely.MultiPoint([(1, 1), (2, 2)]), "Tumor")]
    rules = LabelRules(HE_CLASSES, class_map=parse_class_map(["Tumor=Tumour: Positive", "Stroma=Others", "junk="]))
    with pytest.raises(
        LabelError,
        match=re.escape(
            "--class-map 'Tumor=Tumour: Positive' (did you mean 'Tumor=Tumor: Positive'?), 'Stroma=Others' (did you "
            "mean 'Stroma=Other'?): the MODEL side must be one of the model's classes (Tumor: Positive, "
            "Tumor: Negative, Other), or empty ('LABEL=') to leave the label out"
        ),
    ):
        labels_from_objects(objects, slide="s.svs", image_size_px=(10, 10), rules=rules)
    # A segmentation run reads no points: its class map is not checked against nuclei classes.
    area = [_obj(shapely.box(0, 0, 5, 5), "PD-L1 positive")]
    seg = LabelRules((), class_map=parse_class_map(["Tumor=Tumour: Positive"]), points=False)
    assert labels_from_objects(area, slide="s.svs", image_size_px=(10, 10), rules=seg).has_regions


@pytest.mark.parametrize(
    ("objects", "said"),
    [
        (
            [_obj(shapely.box(0, 0, 10, 10), "Training region"), _obj(shapely.box(0, 0, 10, 10), "Ignore*")],
            r"no labelled pixels \(.*Ignore\* areas cover them",
        ),
        (
            [_obj(shapely.box(0, 0, 6, 6), "PD-L1 positive"), _obj(shapely.box(0, 0, 8, 8), "Ignore*")],
            r"no labelled pixels \(.*Ignore\* areas cover them",
        ),
        (  # its corners on one line: no area, counted as skipped, not as a Training region
            [_obj(shapely.Polygon([(2, 2), (8, 8), (5, 5)]), "Training region")],
            r"no labels \(skipped: Training region areas of no area \(their corners on one line\): 1\)",
        ),
    ],
    ids=["all-ignored", "positive-ignored", "no-area"],
)
def test_region_labels_that_leave_no_labelled_pixel_are_refused_not_trained_on(objects, said, tmp_path):
    # An Ignore* over everything, or a Training region of no area: pdl1 train seg trained on no pixel (its loss 0)
    # and counted the labels as used.
    seg = LabelRules((), points=False)
    with pytest.raises(LabelError, match=r"s\.svs: " + said + r".*or leave the entry out \(--entries\)$"):
        labels_from_objects(objects, slide="s.svs", image_size_px=(10, 10), rules=seg)
    # A slide given with its GeoJSON (--labels) is no project entry, and --entries is refused there: it was told
    # to leave "the entry" out with --entries all the same.
    from bridge.qupath_geojson import to_feature, write_features

    path = tmp_path / "s.geojson"
    write_features(path, [to_feature(o) for o in objects])
    with pytest.raises(LabelError, match=said + r".*or leave the slide and its GeoJSON \(--labels\) out$") as err:
        read_geojson_labels(path, slide="s.svs", image_size_px=(10, 10), rules=seg)
    assert "--entries" not in str(err.value)


def _two_core_run(project: Path, *, regions_file: str = "this run") -> dict:
    """The sidecars `pdl1 run` leaves of entry 1 analysed as two TMA cores through QuPath: objects.geojson with core
    A-1's objects alone, the summary naming both cores, and (``regions_file``: "this run", "an earlier run" or
    "none") target_regions.json with every core's. Returns what the run wrote, by core."""
    from bridge.qupath_geojson import to_feature
    from bridge.targets import TargetNuclei, TargetRow, rows_to_json, write_target_regions

    cores = {
        "A-1": {
            "candidates": [shapely.box(100, 100, 160, 160)],
            "nuclei": [((200.04, 200.0), "Tumor: Positive"), ((300.0, 300.0), "Other")],
        },
        "B-1": {
            "candidates": [shapely.box(1500, 1500, 1540, 1540), shapely.box(1700, 1700, 1760, 1760)],
            "nuclei": [((1730.03, 1790.07), "Tumor: Positive"), ((1650.0, 1600.0), "Tumor: Negative")],
        },
    }
    folder = project / "pdl1" / "1"
    folder.mkdir(parents=True, exist_ok=True)
    first = [_candidate(c) for c in cores["A-1"]["candidates"]] + [
        _nucleus(*xy, cls) for xy, cls in cores["A-1"]["nuclei"]
    ]
    (folder / "objects.geojson").write_text(
        json.dumps({"type": "FeatureCollection", "features": [to_feature(o) for o in first]})
    )
    rows = [TargetRow("he-1357.svs", "1", name, "TMA core", "analysed") for name in cores]
    (folder / "summary.json").write_text(json.dumps({"run_id": "r2", "targets": rows_to_json(rows)}))
    if regions_file != "none":
        nuclei = [
            TargetNuclei(
                np.array([xy for xy, _ in core["nuclei"]]),
                np.array([HE_CLASSES.index(c) for _, c in core["nuclei"]]),
                HE_CLASSES,
            )
            for core in cores.values()
        ]
        write_target_regions(
            folder / "target_regions.json",
            run_id="r1" if regions_file == "an earlier run" else "r2",
            targets=[(name, [_candidate(c) for c in core["candidates"]]) for name, core in cores.items()],
            nuclei=nuclei,
        )
    return cores


def _reviewed_export(project: Path, cores: dict) -> None:
    """The entry's objects as a person left them in QuPath after reviewing core B-1: its second candidate deleted
    (dismissed), its first nucleus reclassified Tumor: Negative; everything else as the run wrote it; and a point
    of Other the person drew in core A-1."""
    from bridge.qupath_geojson import to_feature

    a, b = cores["A-1"], cores["B-1"]
    objects = [_candidate(c) for c in a["candidates"]] + [_nucleus(*xy, cls) for xy, cls in a["nuclei"]]
    objects += [_candidate(b["candidates"][0]), _nucleus(*b["nuclei"][0][0], "Tumor: Negative")]
    objects += [_nucleus(*b["nuclei"][1][0], b["nuclei"][1][1]), _obj(shapely.Point(50, 50), "Other")]
    exported = export_path(project, "1")
    exported.parent.mkdir(parents=True, exist_ok=True)
    exported.write_text(json.dumps([to_feature(o) for o in objects]))


def test_the_review_of_a_tma_s_second_core_is_told_from_every_core_s_output_of_the_run(labelled, tmp_path, caplog):
    # objects.geojson holds the first core's output alone: a candidate deleted in core B-1 was never seen as deleted
    # (the dismissal lost, uncounted), a nucleus reclassified there was "not in the last run's output".
    from bridge.labels import UNREAD_TARGETS_COUNT, WrittenObjects

    project = _project_copy(labelled, tmp_path)
    cores = _two_core_run(project)
    _reviewed_export(project, cores)
    written = WrittenObjects.of_entry(project / "pdl1" / "1")
    assert len(written.candidates) == 3 and written.nuclei_class == ("Tumor: Positive", "Other", *HE_CLASSES[:2])
    review = LabelRules(class_names=HE_CLASSES, from_review=True)
    (labels,) = read_project_labels(project, rules=review, entries=["1"], qupath="never")
    assert labels.counts["reviewed: PD-L1 FN candidate deleted (PD-L1 negative)"] == 1
    assert labels.negative.equals(shapely.box(1700, 1700, 1760, 1760))
    assert labels.counts["reviewed: nuclei reclassified"] == 1
    assert labels.points_xy.tolist() == [[1730.03, 1790.07], [50.0, 50.0]]
    assert labels.points_class.tolist() == [HE_CLASSES.index("Tumor: Negative"), HE_CLASSES.index("Other")]
    assert labels.counts["skipped: pdl1 results as written (not reviewed)"] == 5  # 2 candidates, 3 nuclei
    assert UNRECORDED_NUCLEI_COUNT not in labels.counts
    assert UNREAD_TARGETS_COUNT not in labels.counts and "not read" not in caplog.text


@pytest.mark.parametrize("regions_file", ["none", "an earlier run"])
def test_without_every_core_s_output_of_the_run_the_reviews_of_the_other_cores_are_counted_as_not_read(
    labelled, tmp_path, caplog, regions_file
):
    # An older run (or a record of another run) leaves the first core's output alone: the second core's reviews
    # cannot be told, and that is counted and warned of, not passed over.
    from bridge.labels import UNREAD_TARGETS_COUNT

    project = _project_copy(labelled, tmp_path)
    _reviewed_export(project, _two_core_run(project, regions_file=regions_file))
    review = LabelRules(class_names=HE_CLASSES, from_review=True)
    with caplog.at_level("WARNING", logger="bridge.labels"):
        (labels,) = read_project_labels(project, rules=review, entries=["1"], qupath="never")
    assert labels.counts[UNREAD_TARGETS_COUNT] == 1
    assert "reviewed: PD-L1 FN candidate deleted (PD-L1 negative)" not in labels.counts
    assert labels.counts[UNRECORDED_NUCLEI_COUNT] == 2  # B-1's
    assert "the last run analysed 2 targets" in caplog.text and "other than the first (B-1)" in caplog.text
    why = "there is no" if regions_file == "none" else "is of run r1, not of the summary's (r2)"
    assert why in caplog.text


@pytest.mark.parametrize("damage", [b'{"run_id": "r2", "targ', b"\xff\xfe"], ids=["cut short", "not UTF-8"])
def test_a_damaged_record_of_every_core_s_output_stops_training_from_review_naming_it_and_the_fix(
    labelled, tmp_path, damage
):
    # Training refuses it (the reviews of the other cores would be silently lost), where the report falls back to
    # the first core's output and review-queue notes it: one reading of the file, each its own policy.
    project = _project_copy(labelled, tmp_path)
    _reviewed_export(project, _two_core_run(project))
    damaged = project / "pdl1" / "1" / "target_regions.json"
    damaged.write_bytes(damage)
    with pytest.raises(LabelError) as err:
        review = LabelRules(class_names=HE_CLASSES, from_review=True)
        read_project_labels(project, rules=review, entries=["1"], qupath="never")  # entry 2 is an IHC: refused too
    message = str(err.value)
    assert message.startswith(f"{damaged} does not read (") and "the reviews of the last run's targets" in message
    assert message.endswith("run `pdl1 run` on the project again, or train without --from-review")
    # Without --from-review nothing the run wrote is read.
    read_project_labels(project, rules=LabelRules(class_names=HE_CLASSES), entries=["1"], qupath="never")


# ------------------------------------------------------------------- records of pdl1_analyze.groovy's analyses

T1, T2 = "2025-03-01T09:00:00+00:00", "2025-03-02T09:00:00+00:00"


def _groovy_record(
    project: Path, parent_id: str, *, when: str, outline, candidates=(), nuclei=(), after_run: str | None = None
) -> Path:
    """The record pdl1_analyze.groovy saves of its analysis of a parent (as GET /v1/jobs/{id}/record gives it);
    ``after_run``: the run id of the summary.json the script found in the entry's folder (None: not said)."""
    from bridge.analysis_record import RECORD_FORMAT, RECORD_VERSION, record_path
    from bridge.targets import TargetNuclei

    path = record_path(project / "pdl1" / "1", parent_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = TargetNuclei(
        np.array([xy for xy, _ in nuclei], float).reshape(-1, 2),
        np.array([HE_CLASSES.index(c) for _, c in nuclei], np.int64),
        HE_CLASSES,
    )
    record = {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "written_at": when,
        "run_id": f"job of {parent_id}",
        "outline": shapely.geometry.mapping(outline),
        "candidates": [shapely.geometry.mapping(c) for c in candidates],
        "region_bounds": [],
        "nuclei": kept.to_json(),
        **({} if after_run is None else {"after_run": after_run}),
    }
    path.write_text(json.dumps(record))
    return path


def _run_output(project: Path, *, when: str, outline=None, candidates=(), nuclei=(), after_analyses=None) -> None:
    """The sidecars `pdl1 run` leaves of entry 1 analysed in one target (``outline``; None: the whole image), run id
    "r"; ``after_analyses``: the records it found in the entry's folder (None: not said, as an earlier version)."""
    from bridge.qupath_geojson import to_feature
    from bridge.targets import TargetRow, rows_to_json

    folder = project / "pdl1" / "1"
    folder.mkdir(parents=True, exist_ok=True)
    objects = [_candidate(c) for c in candidates] + [_nucleus(*xy, cls) for xy, cls in nuclei]
    (folder / "objects.geojson").write_text(
        json.dumps({"type": "FeatureCollection", "features": [to_feature(o) for o in objects]})
    )
    kind = "whole image" if outline is None else "annotation"
    row = TargetRow("he-1357.svs", "1", "Tumor", kind, "analysed", outline=outline)
    provenance = {"analysed_at": when, **({} if after_analyses is None else {"after_analyses": after_analyses})}
    summary = {"run_id": "r", "provenance": provenance, "targets": rows_to_json([row])}
    (folder / "summary.json").write_text(json.dumps(summary))


def _export(project: Path, objects: list) -> None:
    from bridge.qupath_geojson import to_feature

    exported = export_path(project, "1")
    exported.parent.mkdir(parents=True, exist_ok=True)
    exported.write_text(json.dumps([to_feature(o) for o in objects]))


REVIEW = LabelRules(class_names=HE_CLASSES, from_review=True)
# A Groovy analysis of annotation P and a pdl1 run of annotation Q overlapping it (600-1000 px both ways).
P, Q = shapely.box(200, 200, 1000, 1000), shapely.box(600, 600, 1400, 1400)
SHARED_XY = (800.0, 800.0)  # a nucleus both analyses wrote, in the overlap


@pytest.mark.parametrize("newer", ["groovy", "run"])
@pytest.mark.parametrize("now", ["the newer's class", "the older's class"])
@pytest.mark.parametrize("clocks", ["agree", "disagree, the files tell"])
def test_of_a_groovy_analysis_and_a_run_over_the_same_tissue_the_newer_says_what_was_written(
    labelled, tmp_path, newer, now, clocks
):
    # A record older than what replaced it must never turn into labels: a candidate gone where a newer analysis
    # covers it was replaced, not dismissed; a nucleus is as the newer analysis wrote it. The service and the batch
    # run may be two machines whose clocks differ: what the files say of each other decides then. The script found
    # the run's summary when it asked for the record (its after_run); the run found the record when it wrote.
    project = _project_copy(labelled, tmp_path)
    groovy_when, run_when = (T2, T1) if (newer == "groovy") == (clocks == "agree") else (T1, T2)
    told = clocks != "agree"
    g_shared, g_own = shapely.box(800, 650, 840, 690), shapely.box(300, 300, 340, 340)  # in the overlap, in P alone
    r_shared, r_own = shapely.box(700, 700, 740, 740), shapely.box(1200, 1200, 1240, 1240)
    _groovy_record(
        project, "P", when=groovy_when, outline=P, candidates=[g_shared, g_own],
        nuclei=[(SHARED_XY, "Tumor: Positive"), ((300, 500), "Other")],
        after_run="r" if told and newer == "groovy" else None,
    )  # fmt: skip
    _run_output(
        project, when=run_when, outline=Q, candidates=[r_shared, r_own],
        nuclei=[(SHARED_XY, "Tumor: Negative"), ((1300, 1300), "Other")],
        after_analyses={"P": groovy_when} if told and newer == "run" else None,
    )  # fmt: skip
    newer_class, older_class = ("Tumor: Positive", "Tumor: Negative")[:: 1 if newer == "groovy" else -1]
    # Every candidate gone; one object at the shared place; each analysis's other nucleus as written.
    shared = _nucleus(*SHARED_XY, newer_class if now == "the newer's class" else older_class)
    _export(project, [shared, _nucleus(300, 500, "Other"), _nucleus(1300, 1300, "Other")])
    (labels,) = read_project_labels(project, rules=REVIEW, entries=["1"], qupath="never")
    older_shared, newer_shared = (r_shared, g_shared) if newer == "groovy" else (g_shared, r_shared)
    assert labels.counts["skipped: FN candidates of an older analysis, gone where a newer one analysed"] == 1
    assert labels.counts["reviewed: PD-L1 FN candidate deleted (PD-L1 negative)"] == 3
    assert labels.negative.equals(shapely.union_all([newer_shared, g_own, r_own]))
    assert not labels.negative.intersects(older_shared)
    if now == "the newer's class":
        assert labels.counts["skipped: pdl1 results as written (not reviewed)"] == 3 and not labels.has_points
    else:  # a person put the older analysis's class back: a review
        assert labels.counts["reviewed: nuclei reclassified"] == 1
        assert labels.points_xy.tolist() == [list(SHARED_XY)]
        assert labels.points_class.tolist() == [HE_CLASSES.index(older_class)]


@pytest.mark.parametrize(
    ("stamp", "says"),
    [
        ("2025-03-02T09:00:00", None),  # no zone: UTC, so a day after the record (T1)
        ("2025-03-02T10:00:00+01:00", None),  # the same time in another zone
        ("2025-02-28T09:00:00", "older"),  # no zone, a day before the record
        ("yesterday", "provenance.analysed_at 'yesterday' is not an ISO time such as 2026-01-02T10:00:00+00:00"),
        (20250302, "provenance.analysed_at 20250302 is not an ISO time"),
        ("provenance", "provenance is not an object of the run's details: 'by hand'"),
    ],
)
def test_a_run_s_time_without_a_zone_is_utc_and_one_that_does_not_read_stops_training(labelled, tmp_path, stamp, says):
    # summary.json's provenance.analysed_at, read as pdl1 report and review-queue read it (one parser; it was two, one
    # taking a zone-less time as UTC and the other as no time): it says whether the run or a record is newer, so
    # which wrote what is in the image; a time that does not read would guess that, and is refused.
    project = _project_copy(labelled, tmp_path)
    candidate = shapely.box(700, 700, 740, 740)  # in both analysed areas
    _groovy_record(project, "P", when=T1, outline=P, candidates=[candidate], nuclei=[((300, 500), "Other")])
    _run_output(project, when="2025-03-02T09:00:00+00:00", outline=Q, nuclei=[((1300, 1300), "Other")])
    summary_path = project / "pdl1" / "1" / "summary.json"
    summary = json.loads(summary_path.read_text())
    if stamp == "provenance":
        summary["provenance"] = "by hand"
    else:
        summary["provenance"]["analysed_at"] = stamp
    summary_path.write_text(json.dumps(summary))
    drawn = _obj(shapely.box(1500, 1500, 1600, 1600), "PD-L1 positive")
    # The candidate gone; each analysis's output still there.
    _export(project, [drawn, _nucleus(300, 500, "Other"), _nucleus(1300, 1300, "Other")])
    if says not in (None, "older"):
        with pytest.raises(LabelError) as err:
            read_project_labels(project, rules=REVIEW, entries=["1"], qupath="never")
        assert str(err.value).startswith(f"{summary_path}: {says}")
        assert str(err.value).endswith("run `pdl1 run` on the project again, or train without --from-review")
        return
    (labels,) = read_project_labels(project, rules=REVIEW, entries=["1"], qupath="never")
    if says == "older":  # the record is newer: its candidate, deleted, is a dismissal
        assert labels.negative.equals(candidate)
    else:  # the run is newer and covers it: it replaced the record's candidate, which no person deleted
        assert labels.negative.is_empty
        assert labels.counts["skipped: FN candidates of an older analysis, gone where a newer one analysed"] == 1


def test_the_candidates_of_a_record_whose_output_is_all_gone_are_counted_not_dismissed(labelled, tmp_path):
    # The annotation's results were cleared (or it was deleted with everything under it, and the script has not run on
    # the image since, or was an earlier version): its record stays behind.
    project = _project_copy(labelled, tmp_path)
    candidates = [shapely.box(300, 300, 340, 340), shapely.box(500, 500, 540, 540)]
    _groovy_record(
        project, "P", when=T1, outline=P, candidates=candidates, nuclei=[((300, 500), "Other"), ((400, 400), "Other")]
    )
    drawn = _obj(shapely.box(1500, 1500, 1600, 1600), "PD-L1 positive")
    _export(project, [drawn, _nucleus(400, 400, "Tumor: Positive")])  # a nucleus of another class where one was
    (labels,) = read_project_labels(project, rules=REVIEW, entries=["1"], qupath="never")
    assert labels.negative.is_empty
    assert labels.counts["skipped: FN candidates of an analysis whose output is no longer in the image"] == 2
    # Where no other analysis wrote a nucleus, the gone one's record still says what it wrote there.
    assert labels.counts["reviewed: nuclei reclassified"] == 1
    # With one of its nuclei as it wrote it, its output is in the image: the candidates were deleted.
    _export(project, [drawn, _nucleus(300, 500, "Other")])
    (labels,) = read_project_labels(project, rules=REVIEW, entries=["1"], qupath="never")
    assert labels.counts["reviewed: PD-L1 FN candidate deleted (PD-L1 negative)"] == 2
    assert labels.negative.equals(shapely.union_all(candidates))


def test_two_records_of_overlapping_annotations_each_keep_their_own_nuclei_and_the_newer_covers_the_older(
    labelled, tmp_path
):
    # Overlapping annotations each keep their own results (the script leaves another analysed annotation's alone):
    # at a place both wrote a nucleus of different classes, both objects are there as written; no label.
    project = _project_copy(labelled, tmp_path)
    a_shared, b_shared = shapely.box(700, 700, 740, 740), shapely.box(800, 650, 840, 690)
    _groovy_record(
        project,
        "A",
        when=T1,
        outline=P,
        candidates=[a_shared],
        nuclei=[(SHARED_XY, "Tumor: Positive"), ((300, 500), "Other")],
    )
    _groovy_record(
        project,
        "B",
        when=T2,
        outline=Q,
        candidates=[b_shared],
        nuclei=[(SHARED_XY, "Tumor: Negative"), ((1300, 1300), "Other")],
    )
    both = [_nucleus(*SHARED_XY, "Tumor: Positive"), _nucleus(*SHARED_XY, "Tumor: Negative")]
    _export(project, [*both, _nucleus(300, 500, "Other"), _nucleus(1300, 1300, "Other")])
    (labels,) = read_project_labels(project, rules=REVIEW, entries=["1"], qupath="never")
    assert labels.counts["skipped: pdl1 results as written (not reviewed)"] == 4
    assert labels.counts["skipped: FN candidates of an older analysis, gone where a newer one analysed"] == 1
    assert labels.counts["reviewed: PD-L1 FN candidate deleted (PD-L1 negative)"] == 1
    assert labels.negative.equals(b_shared) and not labels.has_points


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("{not json", "not JSON"),
        (json.dumps({"format": "something else"}), "not a 'pdl1-bridge analysis record'"),
        (
            json.dumps({"format": "pdl1-bridge analysis record", "version": 2}),
            "version 2, this pdl1-bridge reads version 1",
        ),
        ("written_at", "has no time zone"),
        ("nuclei", "nuclei arrays of different lengths"),
        ("outline", "'outline' is not a GeoJSON geometry"),
    ],
)
def test_a_record_that_does_not_read_is_refused_naming_it_and_the_fix(labelled, tmp_path, content, says):
    project = _project_copy(labelled, tmp_path)
    path = _groovy_record(project, "P", when=T1, outline=P, nuclei=[((300, 500), "Other")])
    record = json.loads(path.read_text())
    if content == "written_at":
        record["written_at"] = "2025-03-01T09:00:00"
    elif content == "nuclei":
        record["nuclei"]["x"].append(1.0)
    elif content == "outline":
        record["outline"] = {"type": "Polygon", "coordinates": "here"}
    path.write_text(json.dumps(record) if content in ("written_at", "nuclei", "outline") else content)
    _export(
        project, [_nucleus(300, 500, "Tumor: Positive"), _obj(shapely.box(1500, 1500, 1600, 1600), "PD-L1 positive")]
    )
    with pytest.raises(LabelError) as err:
        read_project_labels(project, rules=REVIEW, entries=["1"], qupath="never")
    message = str(err.value)
    assert message.startswith(f"{path}: the record of an analysis by pdl1_analyze.groovy does not read (")
    assert says in message and "analyse that annotation (or TMA core) again with pdl1_analyze.groovy" in message
    # Without --from-review no record is read.
    read_project_labels(project, rules=LabelRules(class_names=HE_CLASSES), entries=["1"], qupath="never")


@pytest.mark.parametrize("record", ["none", "of another annotation"])
def test_nuclei_the_tool_wrote_that_no_record_holds_are_counted_as_not_told_and_warned_of(
    labelled, tmp_path, caplog, record
):
    # Analysed by an earlier pdl1_analyze.groovy (no record): a nucleus a person reclassified was counted as
    # "results as written (not reviewed)", its review silently lost.
    project = _project_copy(labelled, tmp_path)
    if record != "none":
        _groovy_record(project, "Q", when=T1, outline=Q, nuclei=[((1300, 1300), "Other")])
    reviewed = [
        _nucleus(300, 500, "Tumor: Positive"),
        _nucleus(400, 400, "Other"),
        _nucleus(1300, 1300, "Tumor: Positive"),
    ]
    _export(project, [*reviewed, _obj(shapely.box(1500, 1500, 1600, 1600), "PD-L1 positive")])
    with caplog.at_level("WARNING", logger="bridge.labels"):
        (labels,) = read_project_labels(project, rules=REVIEW, entries=["1"], qupath="never")
    unrecorded = 3 if record == "none" else 2  # the one at (1300, 1300) is recorded: a person changed it
    assert labels.counts[UNRECORDED_NUCLEI_COUNT] == unrecorded
    assert "skipped: pdl1 results as written (not reviewed)" not in labels.counts
    assert labels.counts.get("reviewed: nuclei reclassified", 0) == (record != "none")
    warned = [r.getMessage() for r in caplog.records if "no record of an analysis" in r.getMessage()]
    assert len(warned) == 1 and f"{unrecorded} nuclei pdl1-bridge wrote" in warned[0]
    assert "analyse the image again with the current pdl1_analyze.groovy or `pdl1 run`" in warned[0]
    # Without --from-review nothing of it is read, and nothing is warned of.
    caplog.clear()
    (plain,) = read_project_labels(project, rules=RULES, entries=["1"], qupath="never")
    assert UNRECORDED_NUCLEI_COUNT not in plain.counts and not caplog.records


# The QuPath ID of the annotation whose record pdl1_analyze.groovy set aside (QuPath's GeoJSON "id").
SET_ASIDE_ID = "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9"


def test_a_record_set_aside_is_taken_where_the_export_holds_its_annotation_and_left_where_it_does_not(
    labelled, tmp_path, caplog
):
    # pdl1_analyze.groovy's tidy deleted the record of an annotation no longer in QuPath's hierarchy (in memory):
    # closed without saving, QuPath brought the annotation and its objects back, and training counted their nuclei
    # "not read". It sets such a record aside now; the export says whether the annotation is the image's.
    project = _project_copy(labelled, tmp_path)
    candidate = shapely.box(300, 300, 340, 340)
    path = _groovy_record(
        project, SET_ASIDE_ID, when=T1, outline=P, candidates=[candidate],
        nuclei=[((300, 500), "Other"), ((400, 400), "Other")],
    )  # fmt: skip
    aside = path.parent / "removed" / path.name
    aside.parent.mkdir()
    path.rename(aside)
    annotation = QuPathObject(P, "annotation", None, {}, "Tumor core", id=SET_ASIDE_ID.upper())  # any case
    reviewed = [_nucleus(300, 500, "Tumor: Positive"), _nucleus(400, 400, "Other")]  # the candidate deleted
    drawn = _obj(shapely.box(1500, 1500, 1600, 1600), "PD-L1 positive")
    _export(project, [annotation, *reviewed, drawn])
    with caplog.at_level("INFO", logger="bridge.labels"):
        (labels,) = read_project_labels(project, rules=REVIEW, entries=["1"], qupath="never")
    assert UNRECORDED_NUCLEI_COUNT not in labels.counts
    assert labels.counts["reviewed: nuclei reclassified"] == 1
    assert labels.points_xy.tolist() == [[300.0, 500.0]]
    assert labels.counts["reviewed: PD-L1 FN candidate deleted (PD-L1 negative)"] == 1
    assert labels.negative.equals(candidate)
    took = [r.getMessage() for r in caplog.records if "took the record" in r.getMessage()]
    assert len(took) == 1 and f"took the record {aside}, which pdl1_analyze.groovy set aside" in took[0], took
    assert f"the objects read hold that annotation ({SET_ASIDE_ID}; QuPath closed without saving" in took[0]
    # Saved after that run, the annotation is gone from the export: the record stays aside, its nuclei not told.
    _export(project, [*reviewed, drawn])
    caplog.clear()
    with caplog.at_level("INFO", logger="bridge.labels"):
        (labels,) = read_project_labels(project, rules=REVIEW, entries=["1"], qupath="never")
    assert labels.counts[UNRECORDED_NUCLEI_COUNT] == 2 and labels.negative.is_empty and not labels.has_points
    assert not any("took the record" in r.getMessage() for r in caplog.records)
    assert aside.is_file()  # training moves nothing


def test_a_detection_is_never_the_parent_of_a_record_set_aside(tmp_path):
    # A record's parent is an annotation or a TMA core. A detection bearing its ID (hand-edited) took the record back
    # where every object was held, and not where the reader passed the detection over (helper-142): now in neither.
    from bridge.labels import WrittenObjects
    from bridge.qupath_geojson import read_features, to_feature

    parent = "0f0e0d0c-0000-4000-8000-000000000001"
    detection = dataclasses.replace(_obj(shapely.box(10, 10, 16, 16), object_type="detection"), id=parent)
    objects = [_obj(shapely.box(0, 0, 90, 90), "Training region"), detection]
    path = tmp_path / "labels.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [to_feature(o) for o in objects]}))
    # A record that does not read: taken back, it would be refused.
    written = WrittenObjects((), set_aside=(tmp_path / "removed" / f"{parent}.json",))
    rules = LabelRules(HE_CLASSES, from_review=True)
    given = dict(slide="s.svs", image_size_px=(100, 100), rules=rules, written=written)
    for labels in (read_geojson_labels(path, **given), labels_from_objects(list(read_features(path)), **given)):
        assert labels.counts == {"skipped: detection Polygon (unclassified)": 1, "training regions": 1}


def test_a_record_set_aside_of_an_annotation_analysed_again_since_is_not_read(labelled, tmp_path):
    # The annotation came back and was analysed again: its record in the folder is the newer one, and the older copy
    # set aside (the script deletes it on its next run) is not read, damaged or not.
    project = _project_copy(labelled, tmp_path)
    _groovy_record(project, SET_ASIDE_ID, when=T2, outline=P, nuclei=[((300, 500), "Tumor: Positive")])
    aside = project / "pdl1" / "1" / "qupath_analyses" / "removed" / f"{SET_ASIDE_ID}.json"
    aside.parent.mkdir()
    aside.write_text("{not json")
    annotation = QuPathObject(P, "annotation", None, {}, "Tumor core", id=SET_ASIDE_ID)
    drawn = _obj(shapely.box(1500, 1500, 1600, 1600), "PD-L1 positive")
    _export(project, [annotation, _nucleus(300, 500, "Tumor: Positive"), drawn])
    (labels,) = read_project_labels(project, rules=REVIEW, entries=["1"], qupath="never")
    assert labels.counts["skipped: pdl1 results as written (not reviewed)"] == 1
    # Without the record in the folder, the one set aside is the image's, and does not read: named, with the fix.
    (project / "pdl1" / "1" / "qupath_analyses" / f"{SET_ASIDE_ID}.json").unlink()
    with pytest.raises(LabelError, match=re.escape(f"{aside}: the record of an analysis by pdl1_analyze.groovy")):
        read_project_labels(project, rules=REVIEW, entries=["1"], qupath="never")


@pytest.mark.parametrize("import_saved", [True, False], ids=["import saved", "closed without saving"])
def test_the_record_an_import_set_aside_says_what_was_written_only_where_its_output_is_in_the_image(
    labelled, tmp_path, caplog, import_saved
):
    # pdl1_import_results.groovy put `pdl1 run`'s results under the "PD-L1 analysis" annotation of a whole-image
    # analysis, newer than the run, and set that analysis's record aside: the annotation is in the export either way.
    # Saved, the run's output is what lies under it and says what was written; closed without saving, the analysis's
    # output is back, and its record (deleted by the import before) tells the review of its nuclei.
    project = _project_copy(labelled, tmp_path)
    _run_output(project, when=T1, nuclei=[((700, 700), "Tumor: Positive"), ((900, 300), "Other")])
    path = _groovy_record(
        project, SET_ASIDE_ID, when=T2, outline=shapely.box(0, 0, 2048, 2048),
        nuclei=[((300, 500), "Other"), ((400, 400), "Other")], after_run="r",
    )  # fmt: skip
    aside = path.parent / "removed" / path.name
    aside.parent.mkdir()
    path.rename(aside)
    annotation = QuPathObject(shapely.box(0, 0, 2048, 2048), "annotation", "PD-L1 analysis", {}, "PD-L1 analysis",
                              id=SET_ASIDE_ID)  # fmt: skip
    if import_saved:
        under = [_nucleus(700, 700, "Other"), _nucleus(900, 300, "Other")]  # the run's, one reclassified
        reviewed_xy = [700.0, 700.0]
    else:
        under = [_nucleus(300, 500, "Tumor: Positive"), _nucleus(400, 400, "Other")]  # the analysis's
        reviewed_xy = [300.0, 500.0]
    _export(project, [annotation, *under, _obj(shapely.box(1500, 1500, 1600, 1600), "PD-L1 positive")])
    with caplog.at_level("INFO", logger="bridge.labels"):
        (labels,) = read_project_labels(project, rules=REVIEW, entries=["1"], qupath="never")
    assert UNRECORDED_NUCLEI_COUNT not in labels.counts
    assert labels.counts["reviewed: nuclei reclassified"] == 1
    assert labels.points_xy.tolist() == [reviewed_xy]
    assert labels.counts["skipped: pdl1 results as written (not reviewed)"] == 1
    took = [r.getMessage() for r in caplog.records if "took the record" in r.getMessage()]
    assert len(took) == 1 and "(or pdl1_import_results.groovy when it replaced that analysis's output)" in took[0]


def test_a_class_map_label_the_project_has_no_class_of_is_warned_of(labelled, tmp_path, caplog):
    # `--class-map 'Lymphocyte=Other'` (the README's example) on a project without that class mapped nothing, and
    # nothing said so: a misspelt label left its points refused or skipped as unmapped.
    project = _exported_project_copy(labelled, tmp_path)
    rules = LabelRules(HE_CLASSES, class_map=parse_class_map(["Lymphocyte=Other", "Tumor: Positive =Tumor: Positive"]))
    with caplog.at_level("WARNING", logger="bridge.labels"):
        (labels,) = read_project_labels(project, rules=rules, entries=["1"], qupath="never")
    said = " ".join(caplog.text.split())
    assert f"--class-map names 'Lymphocyte', which is no class of {project / 'project.qpproj'}" in said
    assert "Tumor: Positive " not in said.split("--class-map names")[1].split("which")[0]  # held with spaces: known
    assert labels.counts["points: Tumor: Positive"] == 440


def test_an_export_older_than_the_entrys_last_save_with_other_annotations_is_refused(labelled, tmp_path):
    # Export, label on, save, train: the old labels trained without a word (QuPath's summary.json counted 4 positive
    # areas, the export 3). An export newer than the save is of what QuPath shows, labels not saved yet: it stands.
    import os

    project = _exported_project_copy(labelled, tmp_path)
    exported = export_path(project, "1")
    features = json.loads(exported.read_text())
    drawn = [f for f in features if (f["properties"].get("classification") or {}).get("name") == "PD-L1 positive"]
    exported.write_text(json.dumps([f for f in features if f is not drawn[0]]))
    saved_at = (project / "data" / "1" / "summary.json").stat().st_mtime
    os.utime(exported, (saved_at - 600, saved_at - 600))
    with pytest.raises(LabelError) as refused:
        read_project_labels(project, rules=RULES, entries=["1"], qupath="never")
    said = str(refused.value)
    assert f"QuPath saved the entry after {exported} was written, and its annotations changed since" in said
    assert "(PD-L1 positive: 4 saved, 3 exported: labels drawn, or results added, since the export), so the " in said
    assert "export is out of date; export it again" in said
    os.utime(exported, (saved_at + 600, saved_at + 600))
    assert read_project_labels(project, rules=RULES, entries=["1"], qupath="never")


def test_one_image_file_is_not_both_trained_on_and_held_out_nor_named_ambiguously(labelled, tmp_path):
    # Entries 1 and 2 are one file: --val-entries 2 scored the model on its training slide (and fitted its threshold
    # there), and --entries he-1357.svs took the last entry of that image name in silence.
    from bridge.labels import split_validation

    project = _two_he_entries(labelled, tmp_path)
    labels = read_project_labels(project, rules=RULES, qupath="never")
    with pytest.raises(LabelError) as refused:
        split_validation(labels, ["2"])
    assert str(refused.value).startswith(
        f"entry 2 (he-1357.svs) is held out for validation, but its image {tmp_path / 'he-1357.svs'} is also "
        "trained on (as entry 1 (he-1357.svs))"
    )
    with pytest.raises(LabelError, match=r"2 entries have the image name 'he-1357.svs' \(entries 1, 2\); name the"):
        read_project_labels(project, rules=RULES, entries=["he-1357.svs"], qupath="never")
    with pytest.raises(LabelError, match=r"--val-entries he-1357.svs names 2 labelled slides \(entry 1 \(he-1357"):
        split_validation(labels, ["he-1357.svs"])


def test_an_unlabeled_entry_with_labels_of_its_own_is_refused(labelled, tmp_path):
    # --unlabeled 1 pseudo-labelled entry 1 and dropped its training regions and areas without a word.
    from bridge.labels import unlabeled_slides

    project = _exported_project_copy(labelled, tmp_path)
    with pytest.raises(
        LabelError, match=r"^--unlabeled 1 \(he-1357.svs\) has labels of its own \(2 Training region annotations,"
    ):
        unlabeled_slides(["1"], project=project)
    assert [s.name for s in unlabeled_slides(["2"], project=project)] == [
        f"{project / 'project.qpproj'} entry 2 (he-1357.svs)"
    ]  # entry 2 holds no annotation
    # An entry this tool analysed holds its PD-L1 positive regions and candidates: those are no labels of a person's.
    summary = project / "data" / "2" / "summary.json"
    saved = json.loads(summary.read_text())
    saved["hierarchy"]["annotationClassificationCounts"] = {"PD-L1 analysis": 1, "PD-L1 positive": 7}
    summary.write_text(json.dumps(saved))
    assert len(unlabeled_slides(["2"], project=project)) == 1


def test_an_export_of_this_tools_results_without_their_measurements_is_refused():
    # QuPath's Export objects with "Exclude measurements": the tool's own nuclei became point labels (1617 of them).
    tile = QuPathObject(shapely.box(0, 0, 64, 64), "tile", None, {}, "PD-L1 uncertainty")
    nucleus = QuPathObject(shapely.Point(30, 30), "detection", "Tumor: Positive", {})
    region = QuPathObject(shapely.box(0, 0, 200, 200), "annotation", "Training region", {})
    with pytest.raises(LabelError, match=r"1 objects this tool writes .* without their measurements"):
        labels_from_objects([region, tile, nucleus], slide="s.svs", image_size_px=(256, 256), rules=RULES)
    tile = QuPathObject(tile.geometry, "tile", None, {"Predictive entropy": 0.2}, "PD-L1 uncertainty")
    labels = labels_from_objects([region, tile, nucleus], slide="s.svs", image_size_px=(256, 256), rules=RULES)
    assert labels.counts["skipped: pdl1 uncertainty tiles (results, never labels)"] == 1


def test_a_candidate_confirmed_positive_is_no_negative_label_without_from_review(labelled):
    # Reclassified PD-L1 positive by the pathologist, inside Training region 2: without --from-review its pixels were
    # negative (the region's rule), the opposite of what the person said. They are left out instead.
    from bridge.objects import OWN_ANNOTATION_SIGNATURE
    from bridge.qupath_geojson import read_features

    objects = read_features(labelled / "objects-labelled-by-pathologist-0.4.4.geojson")
    (confirmed,) = [
        o.geometry
        for o in objects
        if o.classification == "PD-L1 positive" and OWN_ANNOTATION_SIGNATURE in o.measurements
    ]
    labels = _fixture_labels(labelled)
    assert labels.ignore.intersection(confirmed).area == pytest.approx(confirmed.area)
    reviewed = _fixture_labels(labelled, LabelRules(class_names=HE_CLASSES, from_review=True))
    assert reviewed.positive.intersection(confirmed).area == pytest.approx(confirmed.area)


def test_a_nucleus_marked_twice_with_two_classes_is_refused():
    # Re-marked in QuPath without deleting the first point: both classes trained at one spot without a word.
    region = QuPathObject(shapely.box(0, 0, 200, 200), "annotation", "Training region", {})
    positive = QuPathObject(shapely.MultiPoint([(50, 50), (120, 80)]), "annotation", "Tumor: Positive", {})
    negative = QuPathObject(shapely.MultiPoint([(50.5, 50.0), (150, 150)]), "annotation", "Tumor: Negative", {})
    with pytest.raises(LabelError, match=r"1 nuclei are marked twice with different classes \(first at x=50\.0"):
        labels_from_objects([region, positive, negative], slide="s.svs", image_size_px=(256, 256), rules=RULES)
    apart = QuPathObject(shapely.MultiPoint([(60, 50), (150, 150)]), "annotation", "Tumor: Negative", {})
    labels = labels_from_objects([region, positive, apart], slide="s.svs", image_size_px=(256, 256), rules=RULES)
    assert len(labels.points_xy) == 4


def test_a_region_saying_all_nuclei_are_marked_without_a_point_in_it_is_refused_for_nuclei():
    # Its whole tissue trained as "no nucleus" without a word (the points were drawn in the other region).
    marked = QuPathObject(
        shapely.box(0, 0, 100, 100), "annotation", "Training region", {}, "Region (all nuclei marked)"
    )
    other = QuPathObject(shapely.box(120, 120, 250, 250), "annotation", "Training region", {})
    points = QuPathObject(shapely.MultiPoint([(150, 150), (200, 200)]), "annotation", "Other", {})
    stray = QuPathObject(shapely.MultiPoint([(110, 10)]), "annotation", "Other", {})  # outside every region
    with pytest.raises(LabelError, match=r"training region 1 \(x 0-100, y 0-100\) says all its nuclei are marked"):
        labels_from_objects([marked, other, points, stray], slide="s.svs", image_size_px=(256, 256), rules=RULES)
    # Every point in a region: the empty one may be mucin or lumen drawn as a hard negative; warned of, not refused.
    assert labels_from_objects([marked, other, points], slide="s.svs", image_size_px=(256, 256), rules=RULES)
    seg = LabelRules(class_names=HE_CLASSES, points=False)  # a segmentation run reads no points: nothing to refuse
    assert labels_from_objects([marked, other, points], slide="s.svs", image_size_px=(256, 256), rules=seg)


def test_a_class_map_of_qupaths_own_cell_classes_is_not_called_misspelt(caplog):
    # QuPath's positive cell detection classes its cells Positive / Negative (or 1+, 2+, 3+) whatever the project's
    # class list holds: --class-map 'Positive=Tumor: Positive' was warned of as "no class of the project".
    from bridge.labels import _warn_class_map_unknown

    with caplog.at_level("WARNING", logger="bridge.labels"):
        _warn_class_map_unknown(
            {"Positive": "Tumor: Positive", "2+": None, "Tumour": "Other"}, frozenset({"Tumor"}), Path("p")
        )
    assert "--class-map names 'Tumour', which is no class of p" in caplog.text and "Positive" not in caplog.text


def test_an_export_of_all_objects_with_tma_cores_and_cells_without_nuclei_gives_its_labels(labelled, tmp_path):
    # helper-133: QuPath's "Export objects" of a TMA slide (all objects) holds its cores, and cell detection without
    # "Include cell nucleus" writes cells with no nucleusGeometry; each refused the whole file, and exporting again
    # wrote the same.
    import json
    import uuid

    path = labelled / "objects-labelled-by-pathologist-0.4.4.geojson"
    features = json.loads(path.read_text(encoding="utf-8"))
    features = features["features"] if isinstance(features, dict) else features
    square = {"type": "Polygon", "coordinates": [[[100, 100], [110, 100], [110, 110], [100, 110], [100, 100]]]}
    extra = [
        {"type": "Feature", "id": str(uuid.uuid4()), "geometry": square, "properties": {"objectType": "tmaCore"}},
        {
            "type": "Feature",
            "id": str(uuid.uuid4()),
            "geometry": square,
            "properties": {"objectType": "cell", "classification": {"name": "Tumor: Negative", "color": [0, 0, 200]}},
        },
    ]
    export = tmp_path / "all objects.geojson"
    export.write_text(json.dumps({"type": "FeatureCollection", "features": [*features, *extra]}), encoding="utf-8")
    labels = read_geojson_labels(
        export,
        slide=labelled / "he-1357.svs",
        image_size_px=(2048, 2048),
        rules=RULES,
        project_classes=project_classes(labelled / "project"),
    )
    expected = _fixture_labels(labelled).counts
    assert labels.counts == {
        **expected,
        "points: Tumor: Negative": expected["points: Tumor: Negative"] + 1,  # the cell's centroid
        "skipped: TMA cores": 1,
        "nuclei from cell polygons (their centroids)": 1,
    }
    assert [105.0, 105.0] in labels.points_xy.tolist()


def test_labels_drawn_on_another_z_slice_or_time_point_are_counted_not_taken():
    # QuPath writes "plane" (z, t) for an object drawn off the first plane of a z-stack; training reads the first,
    # so such points fell on pixels they were never drawn on (helper-133).
    from bridge.qupath_geojson import from_feature, to_feature

    on_first = _obj(shapely.MultiPoint([(10, 10)]), "Tumor: Positive")
    elsewhere = dataclasses.replace(_obj(shapely.MultiPoint([(20, 20)]), "Tumor: Positive"), plane_zt=(3, 0))
    assert from_feature(to_feature(elsewhere)).plane_zt == (3, 0)  # as QuPath writes it: {"c": -1, "z": 3, "t": 0}
    assert to_feature(elsewhere)["geometry"]["plane"] == {"c": -1, "z": 3, "t": 0}
    assert "plane" not in to_feature(on_first)["geometry"]
    labels = labels_from_objects([on_first, elsewhere], slide="s.svs", image_size_px=(100, 100), rules=RULES)
    assert labels.points_xy.tolist() == [[10.0, 10.0]]
    assert labels.counts["skipped: objects on another z-slice or time point than the first"] == 1
