import contextlib
import gzip
import json
import math
import os
import stat
import subprocess
import sys
import tracemalloc
import uuid
import zipfile

import pytest
from shapely.geometry import Point, Polygon

from bridge.classes import argb_to_rgb, rgb_to_argb
from bridge.qupath_geojson import (
    GeoJsonError,
    QuPathObject,
    classification_json,
    read_features,
    to_feature,
    validate_feature,
    write_features,
)


def test_reads_what_qupath_044_writes(fixtures_dir):
    objs = list(read_features(fixtures_dir / "objects-written-by-qupath-0.4.4.geojson"))
    assert len(objs) == 25
    kinds = [o.object_type for o in objs]
    assert kinds.count("annotation") == 4 and kinds.count("detection") == 20 and kinds.count("tile") == 1
    tumour = next(o for o in objs if o.name == "Tumor ROI")
    assert tumour.classification == "Tumor" and tumour.color == (200, 0, 0)
    points = next(o for o in objs if o.name == "points")
    assert points.locked and points.classification is None
    derived = {o.classification for o in objs if o.object_type == "detection"}
    assert derived == {"Tumor: Positive", "Tumor: Negative"}


def test_our_features_match_qupath_keys(fixtures_dir):
    written = json.loads((fixtures_dir / "objects-written-by-qupath-0.4.4.geojson").read_text())["features"]
    qupath_point = next(
        f for f in written if f["properties"].get("classification", {}).get("names") == ["Tumor", "Positive"]
    )
    ours = to_feature(QuPathObject(Point(465, 500), "detection", "Tumor: Positive", {"Class probability": 0.9}))
    assert ours.keys() == qupath_point.keys()
    assert ours["properties"].keys() == qupath_point["properties"].keys()
    assert ours["properties"]["classification"] == qupath_point["properties"]["classification"]


def test_round_trip(tmp_path):
    objs = [
        QuPathObject(Polygon([(0, 0), (10, 0), (10, 10)]), "annotation", "PD-L1 positive", {"Area µm^2": 12.5}),
        QuPathObject(Point(3, 4), "detection", "Tumor: Negative", {"Class probability": 0.75}),
        QuPathObject(Polygon([(0, 0), (4, 0), (4, 4), (0, 4)]), "tile", None, {"Predictive entropy": 0.3}),
        QuPathObject(Point(1, 1), "annotation", None, name="note", locked=True),
    ]
    n = write_features(tmp_path / "o.geojson", (to_feature(o) for o in objs))
    back = list(read_features(tmp_path / "o.geojson"))
    assert n == 4
    for a, b in zip(objs, back, strict=True):
        assert a.geometry.equals(b.geometry)
        assert (a.object_type, a.classification, a.measurements, a.name, a.locked) == (
            b.object_type,
            b.classification,
            b.measurements,
            b.name,
            b.locked,
        )


def test_nan_and_inf_measurements_are_left_out():
    feature = to_feature(QuPathObject(Point(0, 0), "detection", "Other", {"a": math.nan, "b": math.inf, "c": 1}))
    assert feature["properties"]["measurements"] == {"c": 1.0}


def test_unknown_class_without_colour_is_refused():
    with pytest.raises(GeoJsonError, match="no colour"):
        classification_json("Mystery")
    assert classification_json("Mystery", (1, 2, 3)) == {"name": "Mystery", "color": [1, 2, 3]}


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda f: f["properties"]["classification"].pop("color"), "color"),
        (lambda f: f["properties"]["measurements"].update(x="NaN"), "finite number"),
        (lambda f: f.update(id="not-a-uuid"), "UUID"),
        (lambda f: f["properties"].update(objectType="blob"), "objectType"),
        (lambda f: f["geometry"].update(coordinates=[math.nan, 1.0]), "finite"),
    ],
)
def test_validator_rejects_what_qupath_cannot_read(mutate, match):
    feature = to_feature(QuPathObject(Point(1, 2), "detection", "Tumor: Positive", {"p": 0.5}))
    mutate(feature)
    with pytest.raises(GeoJsonError, match=match):
        validate_feature(feature)


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "o.geojson"
    write_features(path, [to_feature(QuPathObject(Point(0, 0), "detection", "Other"))])
    before = path.read_bytes()

    def broken():
        yield to_feature(QuPathObject(Point(0, 0), "detection", "Other"))
        yield {"type": "Feature"}

    path.chmod(0o640)
    with pytest.raises(GeoJsonError):
        write_features(path, broken())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["o.geojson"]
    # A successful rewrite replaces the file and keeps the permissions it had.
    write_features(path, [])
    assert json.loads(path.read_text())["features"] == []
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_class_colours_as_qupath_packs_them(fixtures_dir):
    classes = json.loads((fixtures_dir / "qupath-0.4.4-project/classifiers/classes.json").read_text())
    rgb = {c["name"]: argb_to_rgb(c["color"]) for c in classes["pathClasses"]}
    assert rgb["Tumor"] == (200, 0, 0)
    assert rgb["PD-L1 positive"] == (200, 80, 0)
    for c in classes["pathClasses"]:
        assert rgb_to_argb(argb_to_rgb(c["color"])) == c["color"]


def test_geojson_module_does_not_import_torch():
    code = "import sys, bridge.qupath_geojson, bridge.cli.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("features", "says"),
    [
        (None, "'features' must be a list"),
        ([1], "expected a Feature object, got int"),
        ([{"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}], "not a valid Polygon"),
        ([{"type": "Polygon", "coordinates": [[0, 0], [1, 1], [1, 0], [0, 0]]}], "a list of rings"),
        ([{"type": "LineString", "coordinates": [[0, 0]]}], "not a valid LineString"),
        ([{"type": "Point", "coordinates": [1, 2, 3, 4]}], "not a valid Point"),
        ([{"type": "Point", "coordinates": [1, 2]}, {"name": 5, "color": [1, 2, 3]}], "a class name must be text"),
        ([{"type": "Point", "coordinates": [1, 2]}, None, "1, 2"], "measurements must be an object"),
        ([{"type": "Point", "coordinates": [1, 2]}, None, [{"name": "a", "value": 1}]], "GeoJSON of QuPath 0.3"),
        ([{"type": "Polygon", "coordinates": json.loads("[" * 900 + "]" * 900)}], "nested deeper than a MultiPolygon"),
        ([{"type": "Polygon", "coordinates": [[[0, 0], [None, 1], [1, 1], [0, 0]]]}], "malformed coordinates near"),
        (
            [{"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, True], [0, 0]]]}],
            "must be finite numbers, got true",
        ),
        ([{"type": "Point", "coordinates": [0, float("nan")]}], "must be finite numbers, got NaN"),
    ],
)
@pytest.mark.parametrize("by_line", [False, True], ids=["one line", "a feature a line"])
def test_malformed_features_name_the_problem(tmp_path, features, says, by_line):
    """Hand-written or hand-edited GeoJSON (labels for `pdl1 train`) gave a traceback or shapely's bare
    'A linearring requires at least 4 coordinates.' without the feature or the fix. The same whether the file is read
    whole or a line at a time (the layout pdl1_export_labels.groovy writes)."""
    if isinstance(features, list) and features and isinstance(features[0], dict):
        geometry, cls, measurements = (*features, None, None)[:3]
        props = {"objectType": "annotation"}
        if cls is not None:
            props["classification"] = cls
        if measurements is not None:
            props["measurements"] = measurements
        features = [{"type": "Feature", "id": str(uuid.uuid4()), "geometry": geometry, "properties": props}]
    path = tmp_path / "labels.geojson"
    if by_line and isinstance(features, list):
        path.write_text("[\n" + ",\n".join(json.dumps(f, separators=(",", ":")) for f in features) + "\n]\n")
    else:
        path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    with pytest.raises(GeoJsonError, match=says):
        list(read_features(path))


def test_measurements_qupath_wrote_as_missing_are_read_as_missing(tmp_path):
    # QuPath 0.5+ writes a NaN measurement as the string "NaN" (infinities as "Infinity"), 0.4 as a bare NaN; its own
    # objects carry them (cell detection on an image without a stain). Reading labels or results from such an export
    # failed with "measurement must be a finite number"; a string that is no number still fails.
    feature = to_feature(QuPathObject(Point(1, 2), "detection", "Tumor: Positive", {"p": 0.5}))
    feature["properties"]["measurements"].update(a="NaN", b="Infinity", c="-Infinity", d=math.nan)
    path = tmp_path / "cells.geojson"
    path.write_text(json.dumps([feature]))  # d as a bare NaN, as QuPath 0.4 writes it
    assert '"d": NaN' in path.read_text()
    (obj,) = read_features(path)
    assert obj.measurements == {"p": 0.5}
    feature["properties"]["measurements"]["e"] = "high"
    path.write_text(json.dumps([feature]))
    with pytest.raises(GeoJsonError, match="measurement 'e' must be a finite number, got 'high'"):
        list(read_features(path))


def _export(tmp_path, features, name="export.geojson"):
    path = tmp_path / name
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def test_what_qupath_04_to_07_exports_and_reads_is_read(tmp_path):
    # helper-133, from QuPath's sources (QuPathTypeAdapters, GsonTools v0.4.4 to v0.7.0): each of these was refused.
    square = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}
    point = {"type": "Point", "coordinates": [5, 5]}
    cell = {  # cell detection without "Include cell nucleus": no nucleusGeometry (WatershedCellDetection)
        "type": "Feature",
        "id": str(uuid.uuid4()),
        "geometry": square,
        "properties": {"objectType": "cell", "classification": {"name": "Tumor", "color": [200, 0, 0]}},
    }
    core = {  # "Export objects" with nothing selected exports all objects, a TMA slide's cores too
        "type": "Feature",
        "id": str(uuid.uuid4()),
        "geometry": square,
        "properties": {"objectType": "tmaCore", "name": "A-1", "isMissing": False},
    }
    rgba = {  # a class whose alpha is neither 0 nor 255 is written with 4 numbers (GsonTools 0.4.4:372-377)
        "type": "Feature",
        "id": str(uuid.uuid4()),
        "geometry": square,
        "properties": {"objectType": "annotation", "classification": {"name": "Ignore*", "color": [1, 2, 3, 128]}},
    }
    # A hand-made file QuPath reads: a class given as its name, no colour, no id, no objectType (an annotation).
    bare = {"type": "Feature", "geometry": point, "properties": {"classification": "Tumor: Positive"}}
    nameless = {"type": "Feature", "id": 7, "geometry": point, "properties": {"classification": {"name": "Other"}}}
    plain = {"type": "Feature", "geometry": point}  # no properties: an unclassified annotation to QuPath
    objects = list(read_features(_export(tmp_path, [cell, core, rgba, bare, nameless, plain])))
    assert [(o.object_type, o.classification, o.color) for o in objects] == [
        ("cell", "Tumor", (200, 0, 0)),
        ("tmaCore", None, None),
        ("annotation", "Ignore*", (1, 2, 3)),
        ("annotation", "Tumor: Positive", None),
        ("annotation", "Other", None),
        ("annotation", None, None),
    ]
    # Ids made for the features that had none are UUIDs, the same on every read (a label hash stays the same).
    again = list(read_features(_export(tmp_path, [cell, core, rgba, bare, nameless, plain], "again.geojson")))
    assert [o.id for o in objects] == [o.id for o in again] and all(uuid.UUID(o.id) for o in objects)
    assert objects[3].id != objects[4].id


def test_compressed_exports_are_read_and_a_damaged_one_is_named(tmp_path):
    # QuPath's Export objects can compress (gzip, or zip); QuPath reads both back. They were "not JSON".
    feature = to_feature(QuPathObject(Point(1, 2), "annotation", "Tumor: Positive"))
    text = json.dumps({"type": "FeatureCollection", "features": [feature]})
    (tmp_path / "a.geojson.gz").write_bytes(gzip.compress(text.encode()))
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as archive:
        archive.writestr("slide 1.geojson", text)
    for name in ("a.geojson.gz", "a.zip"):
        assert [o.id for o in read_features(tmp_path / name)] == [feature["id"]]
    (tmp_path / "cut.geojson.gz").write_bytes(gzip.compress(text.encode())[:20])
    packed = bytearray(gzip.compress((text * 20).encode()))
    packed[30:90] = bytes(60)  # damaged inside: zlib's own error, which is no OSError (helper-136: a traceback)
    (tmp_path / "damaged.geojson.gz").write_bytes(bytes(packed))
    for name in ("cut.geojson.gz", "damaged.geojson.gz"):
        with pytest.raises(GeoJsonError, match=r"not a readable \.gz file \(.+\)$"):  # the caller says the fix
            list(read_features(tmp_path / name))
    with zipfile.ZipFile(tmp_path / "finder.zip", "w") as archive:  # as macOS's Finder compresses a file
        archive.writestr("slide 1.geojson", text)
        archive.writestr("__MACOSX/._slide 1.geojson", b"\x00\x05\x16\x07")
    assert [o.id for o in read_features(tmp_path / "finder.zip")] == [feature["id"]]
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as archive:
        archive.writestr("a.geojson", text)
        archive.writestr("b.geojson", text)
    with pytest.raises(GeoJsonError, match=r"a \.zip export holds one GeoJSON file; this one holds 2"):
        list(read_features(tmp_path / "two.zip"))


@pytest.mark.parametrize(
    ("feature", "mark"),
    [
        (  # 0.3: object_type, no id, colorRGB (PathObjectTypeAdapters, GsonTools v0.3.2)
            {"properties": {"object_type": "annotation", "classification": {"name": "Tumor", "colorRGB": -3670016}}},
            "'object_type', not 'objectType'",
        ),
        ({"id": "PathAnnotationObject", "properties": {}}, "the id 'PathAnnotationObject', not a UUID"),  # 0.2
        (
            {"id": str(uuid.uuid4()), "properties": {"classification": {"name": "Tumor", "colorRGB": -3670016}}},
            "a classification's 'colorRGB', not 'color'",
        ),
    ],
)
def test_geojson_of_qupath_03_or_earlier_is_refused_naming_the_version(tmp_path, feature, mark):
    # It was "feature id must be a UUID string, got None; export it again", and exporting again wrote the same.
    feature = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, **feature}
    with pytest.raises(GeoJsonError) as err:
        list(read_features(_export(tmp_path, [feature])))
    assert f"GeoJSON of QuPath 0.3 or earlier ({mark}); pdl1 reads what QuPath 0.4.4 and later write" in str(err.value)


def test_writing_stays_as_strict_as_qupath_04_reads(tmp_path):
    # What is read leniently is never written so: QuPath 0.4.4 throws on a class without a colour.
    feature = to_feature(QuPathObject(Point(1, 2), "annotation", "Tumor: Positive"))
    del feature["properties"]["classification"]["color"]
    with pytest.raises(GeoJsonError, match="needs 'color'"):
        write_features(tmp_path / "out.geojson", [feature])
    core = {**feature, "properties": {"objectType": "tmaCore"}}
    with pytest.raises(GeoJsonError, match="objectType must be one of"):
        write_features(tmp_path / "out.geojson", [core])


def test_a_reader_of_regions_and_tiles_passes_over_the_nuclei_unparsed(tmp_path):
    # helper-135: pdl1 review-queue and pdl1 report parsed every nucleus (shapely points, validation) of each image's
    # GeoJSON to use its regions and tiles: 26 of 37 s for 320 small images, seconds per real slide.
    from bridge.qupath_geojson import not_detections

    region = to_feature(QuPathObject(Polygon([(0, 0), (9, 0), (9, 9)]), "annotation", "PD-L1 positive"))
    nucleus = to_feature(QuPathObject(Point(1, 2), "detection", "Tumor: Positive"))
    broken = {**nucleus, "geometry": {"type": "Point", "coordinates": "not parsed"}}
    path = _export(tmp_path, [region, nucleus, broken])
    assert [o.id for o in read_features(path, keep=not_detections)] == [region["id"]]
    with pytest.raises(GeoJsonError, match="malformed coordinates"):  # read whole, every feature is checked
        list(read_features(path))


@pytest.mark.parametrize(
    ("geometry", "properties", "says"),
    [
        ({}, {"classification": {"name": "Other", "color": [1, 2, 3, 999]}}, "needs 'color': \\[r, g, b\\]"),
        ({"plane": {"c": -1, "z": True, "t": 0}}, {}, "plane must be an object of whole numbers z and t"),
        ({"plane": {"c": -1, "z": -1, "t": 0}}, {}, "plane must be an object of whole numbers z and t"),
        ({"plane": {"c": -1, "z": 1.0, "t": 0}}, {}, "plane must be an object of whole numbers z and t"),
        ({"plane": [0, 1]}, {}, "plane must be an object of whole numbers z and t"),
    ],
)
def test_values_qupath_would_not_write_are_refused_by_the_lenient_reading_too(tmp_path, geometry, properties, says):
    # helper-136: an alpha colour was cut to RGB before it was checked; a plane z of true, -1 or 1.0 read as a plane.
    feature = {
        "type": "Feature",
        "id": str(uuid.uuid4()),
        "geometry": {"type": "Point", "coordinates": [1, 2], **geometry},
        "properties": {"objectType": "annotation", **properties},
    }
    with pytest.raises(GeoJsonError, match=says):
        list(read_features(_export(tmp_path, [feature])))


def _objects_parsed_whole(path):
    """What read_features gives a file parsed at once, as it read every file before it read some a line at a time."""
    from bridge.qupath_geojson import from_feature

    data = json.loads(path.read_text(encoding="utf-8"))
    return [from_feature(f) for f in (data["features"] if isinstance(data, dict) else data)]


def _same_objects(a, b):
    return len(a) == len(b) and all(
        x.geometry.equals_exact(y.geometry, 0) and {**vars(x), "geometry": None} == {**vars(y), "geometry": None}
        for x, y in zip(a, b, strict=True)
    )


def test_a_file_written_a_feature_a_line_is_read_a_line_at_a_time(tmp_path, monkeypatch):
    # A slide's cells are hundreds of MB of JSON; parsed whole they took five times that in memory (pdl1 train on an
    # export beside QuPath's cells: 1.8 GB for 300 000). What this module and pdl1_export_labels.groovy write is read
    # a line at a time: the same objects, and no whole-file parse.
    from bridge import qupath_geojson

    objects = [
        QuPathObject(
            Polygon([(0, 0), (9, 0), (9, 9), (0, 9)], [[(2, 2), (4, 2), (4, 4)]]), "annotation", "T", color=(1, 2, 3)
        ),
        QuPathObject(Point(1, 2), "detection", "Tumor: Positive", {"p": 0.5, "n": 3}),
        QuPathObject(Polygon([(0, 0, 1), (5, 0, 1), (5, 5, 1)]), "detection", "Tumor: Negative"),
    ]
    ours = tmp_path / "ours.geojson"
    write_features(ours, [to_feature(o) for o in objects])
    script = tmp_path / "script.geojson"  # pdl1_export_labels.groovy: "[", a compact object a line, "]"
    lines = [json.dumps(to_feature(o), separators=(",", ":")) for o in objects]
    script.write_text("[\n" + ",\n".join(lines) + "\n]\n")
    packed = tmp_path / "script.geojson.gz"  # compressed as a lab may keep it: decompressed a line at a time
    packed.write_bytes(gzip.compress(script.read_bytes()))
    zipped = tmp_path / "script.zip"
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(script, "script.geojson")
    real = qupath_geojson.json.loads
    texts = []
    monkeypatch.setattr(qupath_geojson.json, "loads", lambda text, *a, **k: texts.append(text) or real(text, *a, **k))
    for path in (ours, script, packed, zipped):
        texts.clear()
        read = list(read_features(path))
        assert len(texts) == 3 and all(t.startswith('{"type":"Feature"') for t in texts), path.name
        assert _same_objects(read, _objects_parsed_whole(script if path in (packed, zipped) else path)), path.name
        assert read[0].geometry.equals(objects[0].geometry) and read[2].geometry.has_z
    empty = tmp_path / "empty.geojson"
    write_features(empty, [])
    assert list(read_features(empty)) == []


@pytest.mark.parametrize(
    ("layout", "outcome"),
    [
        ("[\n{a},\n{b}\n]\n", True),  # the script's layout
        ("[\n{a},\n\n{b}\n\n]\n\n", True),  # blank lines
        ("[\n{a}, {b}\n]\n", True),  # two on a line: read whole
        ("[\n{a},\n{b}]\n", True),  # the end on the last object's line: read whole
        ("[\n{a},\n{b}\n]", True),  # no newline at the end
        ("[\n{a},\n{B}\n]\n", True),  # the second pretty-printed: read whole after the first, each once
        ("[\n{a},\n{b}\n]\n\n  \n", True),
        ("[\n{a}\n{b}\n]\n", False),  # a comma missing
        ("[\n{a},\n{b},\n]\n", False),  # a comma too many
        ("[\n{a},\n{b}\n]\n]\n", False),  # text after the end
        ("[\n{a},\n{b}\n", "cut short: the file ends after 2 objects without the closing ']'"),
        ("[\n{a},\n", "cut short: the file ends after 1 object without"),  # and a comma: the same
        ("[\n{a},\n{b", False),  # cut short inside an object
        ("[\n{a},\n1\n]\n", False),  # not a feature: named as such
    ],
)
def test_a_file_laid_out_otherwise_than_its_first_line_says_reads_as_json_reads_it(tmp_path, layout, outcome):
    # Whatever follows a first line of "[": the objects JSON's parser gives the file, once each and in order (outcome
    # True), or its error (False), or where every object was read and the end is missing, that said (the message);
    # never a partial read taken for the whole.

    a, b = (to_feature(QuPathObject(Point(i, i), "detection", "Other", {"i": i})) for i in range(2))
    compact = {"{a}": json.dumps(a, separators=(",", ":")), "{b}": json.dumps(b, separators=(",", ":"))}
    text = layout.replace("{B}", json.dumps(b, indent=1))
    for mark, feature in compact.items():
        text = text.replace(mark, feature)
    path = tmp_path / "f.geojson"
    path.write_text(text)
    # Every object read and no end: said as such, not parsed again whole (a GB file cut short took GBs to fail).
    _reads_as_json_reads(path, outcome)


def _reads_as_json_reads(path, outcome):
    """``read_features(path)`` against ``json.loads`` of its text: the same objects (``outcome`` True), or JSON's or
    the objects' error (False), or where JSON fails, a GeoJsonError matching ``outcome``. Whether it read them."""
    from bridge.qupath_geojson import from_feature

    try:
        data = json.loads(path.read_text())
        items = data["features"] if isinstance(data, dict) and "features" in data else data
        expected = [from_feature(f) for f in (items if isinstance(items, list) else [items])]
    except (json.JSONDecodeError, GeoJsonError) as err:
        assert outcome is not True
        with pytest.raises(GeoJsonError if outcome else type(err), match=outcome or None):
            list(read_features(path))
        return False
    assert outcome is True
    assert _same_objects(list(read_features(path)), expected)
    return True


def _cells_and_regions():
    """Objects as an export beside QuPath's cells holds them: an annotation with a hole, cells with measurements and
    a derived class, a 3-D polygon, a point with a name holding JSON's own characters."""
    cells = [
        QuPathObject(
            Polygon([(i, 0), (i + 5, 0), (i + 5, 5), (i, 5)]), "cell", "Tumor: Positive", {"Nucleus: Area": i / 3}
        )
        for i in range(40)
    ]
    return [
        QuPathObject(
            Polygon([(0, 0), (90, 0), (90, 90), (0, 90)], [[(2, 2), (4, 2), (4, 4)]]),
            "annotation",
            "T",
            color=(1, 2, 3),
        ),
        *cells,
        QuPathObject(Polygon([(0, 0, 1), (5, 0, 1), (5, 5, 1)]), "detection", "Tumor: Negative"),
        QuPathObject(Point(1, 2), "annotation", "Other", name='a "name" ], {with} \\ JSON\'s marks: \u00e9'),
    ]


def _count_whole_parses(monkeypatch):
    from bridge import qupath_geojson

    calls = []
    real = qupath_geojson._features_whole
    monkeypatch.setattr(qupath_geojson, "_features_whole", lambda path: calls.append(path) or real(path))
    return calls


@pytest.mark.parametrize("chunk_chars", [None, 1, 7, 300], ids=["4 Mi", "1", "7", "300"])
@pytest.mark.parametrize(
    "layout",
    ["QuPath compact", "QuPath pretty-printed", "a list", "a list pretty-printed", "spaces everywhere"],
)
@pytest.mark.parametrize("compression", ["", ".gz", ".zip"])
def test_qupaths_own_export_is_read_a_feature_at_a_time(tmp_path, monkeypatch, layout, chunk_chars, compression):
    # QuPath's File > Export objects writes one line (or Gson's pretty-printing): parsed whole, a slide's cells took
    # five times the file's size in memory (1.8 GB for 300 000). Read a feature at a time by json's own decoder: the
    # same objects, no whole-file parse, whatever the chunks the text is read in and whether it is compressed.
    from bridge import qupath_geojson

    if chunk_chars is not None:
        monkeypatch.setattr(qupath_geojson, "_STREAM_CHUNK_CHARS", chunk_chars)
    features = [to_feature(o) for o in _cells_and_regions()]
    collection = {"type": "FeatureCollection", "features": features}
    text = {
        "QuPath compact": json.dumps(collection, separators=(",", ":")),
        "QuPath pretty-printed": json.dumps(collection, indent=2),
        "a list": json.dumps(features),
        "a list pretty-printed": json.dumps(features, indent=1),
        "spaces everywhere": '\r\n { "type" :\t"FeatureCollection" ,\n"features" : [ '
        + " ,\n ".join(json.dumps(f) for f in features)
        + " ] \n}\n\n",
    }[layout]
    plain = tmp_path / "export.geojson"
    plain.write_text(text, encoding="utf-8")
    expected = _objects_parsed_whole(plain)
    path = tmp_path / f"export.geojson{compression}"
    if compression == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    elif compression == ".zip":
        path = tmp_path / "export.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("image 1.geojson", text)
    whole = _count_whole_parses(monkeypatch)
    assert _same_objects(list(read_features(path)), expected)
    assert whole == []
    from bridge.qupath_geojson import not_detections

    assert [o.object_type for o in read_features(path, keep=not_detections)] == ["annotation", "annotation"]


@pytest.mark.parametrize(
    ("layout", "outcome"),
    [
        ('{"type":"FeatureCollection","features":[{a},{b}]}', True),
        ('{"type":"FeatureCollection","features":[]}', True),
        ("[]", True),
        ("[ ]\n", True),
        ('{"type":"FeatureCollection","features":[{a},{b}],"bbox":[0,0,1,1]}', True),  # other keys after: read, left
        ('{"type":"FeatureCollection","features":[{a},{b}],"bbox":[0,0,1,1],"x":{"type":1}}', True),
        ('{"type":"FeatureCollection","features":[{a}],"features":[{b}]}', "names 'features' twice"),  # JSON: b
        ('{"type":"FeatureCollection","features":[{a},{b}],"type":"Feature"}', "names 'type' twice"),
        ('{"type":"FeatureCollection","features":[{a},{b}],"bbox":[0,0,1,1]', False),  # the end missing
        ('{"features":[{a},{b}],"type":"FeatureCollection"}', True),  # keys in another order
        (  # as GDAL writes it (geopandas, QGIS): a name and a CRS before the features
            '{"type":"FeatureCollection","name":"cells","crs":{"type":"name","properties":{"name":"urn:ogc:def:crs:'
            'OGC:1.3:CRS84"}},"features":[{a},{b}]}',
            True,
        ),
        ('{"name":"x","features":[{a},{b}],"type":"FeatureCollection"}', True),
        ('{"type":"FeatureCollection","type":"FeatureCollection","features":[{a}]}', True),  # read whole
        ('{"features":[{a},{b}]}', "not GeoJSON objects: the file holds an object of type None"),
        ('{"features":[{a}],"type":"Feature"}', "not GeoJSON objects: the file holds an object of type 'Feature'"),
        ('{"type":"FeatureCollection","name":"a","features":[{a}]', False),  # the end missing
        ('{"type":"FeatureCollection","features":null}', "'features' must be a list"),
        ("{a}", True),  # one Feature: read whole
        ("[{a},{b}]]", False),  # text after the end
        ('{"type":"FeatureCollection","features":[{a},{b}]}}', False),
        ("[{a},{b},]", False),  # a comma too many
        ("[,{a}]", False),
        ("[{a}{b}]", False),  # a comma missing
        ("[{a},x,{b}]", False),  # not JSON in the middle
        ("[{a},{b", False),  # cut short inside an object: JSON's error, as parsed whole
        ("[{a},{b}", "cut short: the file ends after 2 objects without the closing ']'"),
        ('{"type":"FeatureCollection","features":[{a},', "cut short: the file ends after 1 object without"),
        ("[{a},1]", False),  # not a feature: named as such
    ],
)
@pytest.mark.parametrize("chunk_chars", [None, 5], ids=["4 Mi", "5"])
def test_qupaths_export_laid_out_otherwise_reads_as_json_reads_it(tmp_path, monkeypatch, layout, outcome, chunk_chars):
    # Whatever the layout: the objects JSON's parser gives the file, once each and in order, or its error, or where
    # every object was read and the end is missing, that said; never a partial read taken for the whole.
    from bridge import qupath_geojson

    if chunk_chars is not None:
        monkeypatch.setattr(qupath_geojson, "_STREAM_CHUNK_CHARS", chunk_chars)
    a, b = (to_feature(QuPathObject(Point(i, i), "detection", "Other", {"i": i})) for i in range(2))
    text = layout.replace("{a}", json.dumps(a, separators=(",", ":"))).replace("{b}", json.dumps(b))
    path = tmp_path / "f.geojson"
    path.write_text(text)
    whole = _count_whole_parses(monkeypatch)
    if isinstance(outcome, str):  # refused, and said why
        with pytest.raises(GeoJsonError, match=outcome):
            list(read_features(path))
        return
    if not _reads_as_json_reads(path, outcome):
        return
    # a feature at a time but for one Feature and a collection naming its type twice before its features
    assert len(whole) == (1 if layout == "{a}" or layout.count('"type":"FeatureCollection"') > 1 else 0)


def test_a_number_longer_than_ints_limit_cut_by_a_chunk_reads_as_json_reads_it(tmp_path, monkeypatch):
    # A measurement written with 5000 digits before its exponent (helper-141): the digits read so far are no int
    # Python makes (its 4300-digit limit), the whole number is a float; read on, as for any object a chunk cuts.
    from bridge import qupath_geojson

    a, b = (to_feature(QuPathObject(Point(i, i), "detection", "Other", {"i": i})) for i in range(2))
    text = json.dumps([a, b]).replace('{"i": 1.0}', '{"i": 1' + "0" * 5000 + "e-5000}")
    path = tmp_path / "f.geojson"
    path.write_text(text)
    monkeypatch.setattr(qupath_geojson, "_STREAM_CHUNK_CHARS", text.index("0" * 5000) + 4500)
    whole = _count_whole_parses(monkeypatch)
    assert [o.measurements["i"] for o in read_features(path)] == [0, 1]
    assert whole == []


def test_a_damaged_compressed_export_read_a_feature_at_a_time_is_named(tmp_path):
    # Damage found while decompressing, after features were read, is the compressed file's, named as such.
    features = [to_feature(o) for o in _cells_and_regions()] * 50
    text = json.dumps({"type": "FeatureCollection", "features": features}, separators=(",", ":"))
    packed = gzip.compress(text.encode())
    (tmp_path / "cut.geojson.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(GeoJsonError, match=r"not a readable \.gz file \(.+\)$"):
        list(read_features(tmp_path / "cut.geojson.gz"))
    with zipfile.ZipFile(tmp_path / "a.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.geojson", text)
    raw = bytearray((tmp_path / "a.zip").read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 8] = bytes(8)
    (tmp_path / "a.zip").write_bytes(bytes(raw))
    with pytest.raises(GeoJsonError, match=r"not a readable \.zip file \(.+\)$"):
        list(read_features(tmp_path / "a.zip"))
    # Stored, not compressed (gzip -0, a zip's STORED member): damage reads as text that does not decode or parse
    # before the checksum at the end is tested; the checksum names it (helper-141: a UnicodeDecodeError).
    stored = bytearray(gzip.compress(text.encode(), compresslevel=0))
    stored[20] = 0xFF
    (tmp_path / "stored.geojson.gz").write_bytes(bytes(stored))
    with zipfile.ZipFile(tmp_path / "stored.zip", "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("a.geojson", text)
    raw = bytearray((tmp_path / "stored.zip").read_bytes())
    raw[100] = 0xFF
    (tmp_path / "stored.zip").write_bytes(bytes(raw))
    for name, kind in (("stored.geojson.gz", "gz"), ("stored.zip", "zip")):
        with pytest.raises(GeoJsonError, match=rf"not a readable \.{kind} file \(.+\)$"):
            list(read_features(tmp_path / name))
    # Intact but not UTF-8: the decoding error stands (the checksums found nothing).
    (tmp_path / "latin.geojson.gz").write_bytes(gzip.compress(text.replace("Other", "Autre\xe9").encode("latin-1")))
    with pytest.raises(UnicodeDecodeError):
        list(read_features(tmp_path / "latin.geojson.gz"))


@pytest.mark.parametrize(
    ("kind", "coordinates"),
    [
        ("Point", [1, 2.5]),
        ("Point", [1e308, 1e308]),  # each finite, their sum not: the full scan decides
        ("Point", [1, True]),
        ("Point", [1, 2, 3, 4]),
        ("MultiPoint", [[0, 0], [1, 1, 1]]),
        ("LineString", [[0, 0], [1, "1"]]),
        ("Polygon", [[[0, 0], [1, 0], [1, 1], [0, 0]], []]),
        ("Polygon", [[[0, 0], [1, 0], [1, 1], [0, math.inf]]]),
        ("Polygon", [[[0, 0], [1, 0], [1, [1]], [0, 0]]]),
        ("Polygon", [[0, 0], [1, 0], [1, 1], [0, 0]]),
        ("MultiPolygon", [[[[0, 0], [1, 0], [1, 1], [0, 0]]], [[[5, 5], [6, 5], [6, 6], [5, 5]]]]),
        ("MultiPolygon", [[[[0, 0], [1, 0], [1, 1], [0, 0]]], [[[5, 5], [6, 5], [6, None], [5, 5]]]]),
    ],
)
def test_the_shortcut_for_plain_coordinates_passes_nothing_the_full_scan_refuses(kind, coordinates):
    # The check of each number in a Python loop cost a third of reading a slide's cells; the shortcut tests types
    # in C and leaves anything else to the scan, which names the problem.
    from bridge.qupath_geojson import _plain_positions, scan_coordinates

    scan = scan_coordinates(coordinates)
    if _plain_positions(coordinates, kind) is not None:
        assert scan.depth <= 4 and scan.stray is None and scan.non_finite is None
    feature = to_feature(QuPathObject(Point(0, 0), "annotation"))
    feature["geometry"]["coordinates"] = coordinates
    feature["geometry"]["type"] = kind
    refused = scan.depth > 4 or scan.stray is not None or scan.non_finite is not None
    if refused:
        with pytest.raises(GeoJsonError, match="coordinates"):
            validate_feature(feature)
    else:
        validate_feature(feature)


def test_a_polygon_with_holes_of_different_lengths_reads_as_shapely_builds_it(tmp_path):
    # Polygons are built from arrays; holes of 4 and 5 points did not stack into one and the file was refused.
    from shapely.geometry import shape

    rings = [
        [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]],
        [[10, 10], [20, 10], [20, 20], [10, 10]],
        [[50, 50], [60, 50], [60, 60], [50, 60], [50, 50]],
    ]
    feature = to_feature(QuPathObject(Point(0, 0), "annotation", "Ignore*"))
    feature["geometry"] = {"type": "Polygon", "coordinates": rings}
    path = tmp_path / "holes.geojson"
    path.write_text("[\n" + json.dumps(feature, separators=(",", ":")) + "\n]\n")
    (obj,) = read_features(path)
    assert obj.geometry.wkt == shape(feature["geometry"]).wkt and obj.geometry.area == 9850


@pytest.mark.parametrize(
    ("layout", "kept"),
    [
        ("[\n{D},{A},\n{B}\n]\n", ["A", "B"]),  # a cell and an annotation on one line: read whole, none lost
        ("[\n{D},{A id first}\n]\n", ["A"]),  # the annotation's keys in another order: the same
        ("[\n{M}\n]\n", ["M"]),  # an annotation holding an object that says detection: not taken for a cell
        ('[\n{A},\nnot json "objectType":"detection",\n{B}\n]\n', None),  # not a feature: JSON's error
        ("[\n{A},\n{D}]\n", ["A"]),  # the end on a cell's line: read whole
        ("[\n{A},\n{D}],\n{B}\n]\n", None),
        # cut short after a cell (a cell's line is not read): read a feature at a time, which finds every object read
        ("[\n{A},\n{D},\n", "cut short: the file ends after 2 objects"),
        ("[\xa0\n{A}\n]\n", None),  # a no-break space is not JSON's whitespace
        ("[\n{A}\n]\n\x0c", None),
    ],
)
def test_lines_passed_over_unparsed_hold_one_compact_feature_each(tmp_path, layout, kept):
    # A reader of regions and targets passes over the cells' lines unparsed; a line that is not one whole compact
    # feature sends the file to JSON's parser, so no annotation beside a cell is lost and no broken file is read.
    from bridge.qupath_geojson import DETECTION_LINE_TYPES, not_detections

    features = {
        "A": to_feature(QuPathObject(Point(1, 1), "annotation", "Other", name="A")),
        "B": to_feature(QuPathObject(Point(2, 2), "annotation", "Other", name="B")),
        "D": to_feature(QuPathObject(Point(3, 3), "detection", "Other")),
    }
    features["M"] = to_feature(QuPathObject(Point(4, 4), "annotation", "Other", name="M"))
    features["M"]["properties"]["metadata"] = {"objectType": "detection"}
    features["A id first"] = {"id": features["A"]["id"], **{k: v for k, v in features["A"].items() if k != "id"}}
    text = layout
    for mark, feature in features.items():
        text = text.replace("{" + mark + "}", json.dumps(feature, separators=(",", ":")))
    path = tmp_path / "f.geojson"
    path.write_text(text, encoding="utf-8")
    read = lambda: [o.name for o in read_features(path, keep=not_detections, unparsed=DETECTION_LINE_TYPES)]  # noqa: E731
    if kept is None:
        with pytest.raises(json.JSONDecodeError):
            read()
    elif isinstance(kept, str):
        with pytest.raises(GeoJsonError, match=kept):
            read()
    else:
        assert read() == kept


@pytest.mark.parametrize(
    ("classification", "kept"),
    [
        ({"names": ["Tumor", "Positive"], "color": [1, 2, 3]}, True),
        ({"name": "Tumor: Positive", "color": [1, 2, 3]}, True),
        ("Tumor: Positive", True),  # a class by its name alone, as QuPath reads it (and from_feature)
        ({"name": "Other", "color": [1, 2, 3]}, False),
        (None, False),
        ({"names": 5}, True),  # malformed: kept, for the parse to name (it raised a TypeError in the keep)
        ({"names": [1, 2]}, True),
        ({"color": [1, 2, 3]}, True),
    ],
)
def test_a_keep_by_the_class_of_detections_reads_the_class_as_the_parse_does(classification, kept):
    from bridge.qupath_geojson import keep_detections_of

    keep = keep_detections_of(lambda cls: cls == "Tumor: Positive")
    feature = to_feature(QuPathObject(Point(1, 1), "detection"))
    feature["properties"]["classification"] = classification
    assert keep(feature) is kept
    assert keep(to_feature(QuPathObject(Point(1, 1), "annotation", "Other"))) is True  # not a detection: kept


def _bomb(path, opening: bytes, filler: bytes, filler_bytes: int, closing: bytes) -> None:
    """A small .gz or .zip of ``opening``, ``filler_bytes`` of ``filler`` and ``closing`` (helper-149: a 1 MB .zip of
    1 GiB of white space took 2.1 GB to read)."""
    block = filler * ((1 << 20) // len(filler))
    with contextlib.ExitStack() as stack:
        if path.suffix == ".gz":
            fh = stack.enter_context(gzip.open(path, "wb"))
        else:
            archive = stack.enter_context(zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED))
            fh = stack.enter_context(archive.open("a.geojson", "w"))
        fh.write(opening)
        for _ in range(filler_bytes // len(block)):
            fh.write(block)
        fh.write(closing)


@pytest.mark.parametrize("name", ["bomb.geojson.gz", "bomb.zip"])
@pytest.mark.parametrize("filler", ["white space", "one string"])
def test_a_compressed_file_that_decompresses_far_beyond_its_size_is_refused_early(tmp_path, monkeypatch, name, filler):
    # Read whole, white space or a string took twice the decompressed size in memory; now no more than 64 times the
    # compressed size (and an allowance) is read before the file is refused, and it is not decompressed again to test
    # its checksum (a GB more of work for nothing).
    from bridge import qupath_geojson

    monkeypatch.setattr(qupath_geojson, "_EXPANSION_ALLOWANCE_CHARS", 1 << 20, raising=False)
    feature = json.dumps(to_feature(QuPathObject(Point(1, 2), "annotation", "Tumor: Positive"))).encode()
    if filler == "white space":
        parts = (b'{"type":"FeatureCollection","features":[' + feature, b" \n", b"]}")
    else:
        parts = (b'{"type":"FeatureCollection","features":[' + feature[:-2] + b',"name":"', b"A", b'"}}]}')
    path = tmp_path / name
    _bomb(path, parts[0], parts[1], 64 << 20, parts[2])
    packed = path.stat().st_size if name.endswith(".gz") else zipfile.ZipFile(path).infolist()[0].compress_size
    limit = 64 * packed + (1 << 20)
    assert limit < 8 << 20
    monkeypatch.setattr(qupath_geojson, "_compressed_damage", lambda *a: pytest.fail("decompressed again"))
    tracemalloc.start()
    try:
        with pytest.raises(GeoJsonError, match=r"decompresses to more than \d+ Mi characters from \d+ bytes, over 64"):
            list(read_features(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * limit, (peak, limit)  # the limit's text, and its copies while read on


def test_compressed_exports_as_pretty_printed_as_qupaths_are_well_within_the_expansion_limit(tmp_path, monkeypatch):
    # QuPath's exports compress 5-8 times, 13-19 pretty-printed: they must read, with no allowance at all, at 64.
    from bridge import qupath_geojson

    monkeypatch.setattr(qupath_geojson, "_EXPANSION_ALLOWANCE_CHARS", 0, raising=False)
    features = [to_feature(o) for o in _cells_and_regions()] * 50
    text = json.dumps({"type": "FeatureCollection", "features": features}, indent=8)
    packed = gzip.compress(text.encode(), compresslevel=9)
    assert len(text) / len(packed) > 20  # more than any export of QuPath's
    (tmp_path / "pretty.geojson.gz").write_bytes(packed)
    assert len(list(read_features(tmp_path / "pretty.geojson.gz"))) == len(features)


@pytest.mark.parametrize("layout", ["a line each", "one line", "one Feature"])
def test_a_feature_longer_than_any_qupath_object_is_refused_before_it_fills_memory(tmp_path, monkeypatch, layout):
    # An uncompressed file holding one string of a GB was read whole, in every layout, into several GB.
    from bridge import qupath_geojson

    monkeypatch.setattr(qupath_geojson, "MAX_FEATURE_CHARS", 1 << 16, raising=False)
    monkeypatch.setattr(qupath_geojson, "_STREAM_CHUNK_CHARS", 1 << 10)
    small = to_feature(QuPathObject(Point(1, 2), "annotation", "Tumor: Positive", name="A" * 1000))
    large = to_feature(QuPathObject(Point(1, 2), "annotation", "Tumor: Positive", name="A" * (1 << 16)))
    for features, refused in (([small, small], False), ([small, large], True)):
        text = {
            "a line each": "[\n" + ",\n".join(json.dumps(f) for f in features) + "\n]\n",
            "one line": json.dumps({"type": "FeatureCollection", "features": features}),
            "one Feature": json.dumps(features[-1]),
        }[layout]
        path = tmp_path / "a.geojson"
        path.write_text(text)
        if not refused:
            assert len(list(read_features(path))) == (1 if layout == "one Feature" else 2)
            continue
        expected = r"over 0.0625 Mi characters and not laid out" if layout == "one Feature" else r"feature 2 runs past"
        with pytest.raises(GeoJsonError, match=expected):
            list(read_features(path))


def test_a_collection_whose_members_before_its_features_run_past_a_chunk_is_still_read_a_feature_at_a_time(
    tmp_path, monkeypatch
):
    # A "crs" or "bbox" (or any member) longer than the first chunk sent the file to the whole parse, which is refused
    # past 256 Mi characters: now the opening is read on until it ends.
    from bridge import qupath_geojson

    monkeypatch.setattr(qupath_geojson, "_STREAM_CHUNK_CHARS", 1000)
    features = [to_feature(o) for o in _cells_and_regions()]
    long_member = {"name": "x" * 5000, "bbox": list(range(2000))}
    text = json.dumps({"type": "FeatureCollection", "crs": long_member, "features": features}, separators=(",", ":"))
    path = tmp_path / "gdal.geojson"
    path.write_text(text)
    whole = _count_whole_parses(monkeypatch)
    assert _same_objects(list(read_features(path)), _objects_parsed_whole(path))
    assert whole == []
    for cut in (text[:3000], "{" + " " * 5000):  # no JSON: still told as JSON tells it, by the whole parse
        path.write_text(cut)
        with pytest.raises(ValueError):
            list(read_features(path))
    assert len(whole) == 2
