"""SlideResult -> QuPath objects and features: the fast paths give what the object-by-object path gives."""

import dataclasses
import json
import math

import numpy as np
import pytest
from shapely import affinity
from shapely.geometry import MultiPolygon, Polygon, box

from bridge.objects import (
    TILE_NAME,
    feature_page,
    nucleus_features,
    nucleus_object,
    result_features,
    result_objects,
    tile_object,
)
from bridge.qupath_geojson import from_feature, point_features, to_feature, validate_feature
from inference.results import ModelInfo, Nuclei, RegionStats, SlideResult, UncertaintyMaps, UncertaintyTile

CLASSES = ("Tumor: Positive", "Tumor: Negative", "Other")


def _nuclei(n: int, *, entropy: bool = True) -> Nuclei:
    rng = np.random.default_rng(5)
    ent = rng.uniform(0, 1, n) if entropy else None
    if ent is not None:
        ent[1] = np.nan  # left out of that feature, as to_feature leaves out non-finite measurements
    return Nuclei(
        xy=rng.uniform(0, 5000, (n, 2)),
        cls=rng.integers(0, 3, n),
        score=rng.uniform(0, 1, n),
        class_prob=rng.uniform(0.4, 1, n).astype(np.float32),
        positive_prob=rng.uniform(0, 1, n).astype(np.float32),
        entropy=ent,
        class_names=CLASSES,
    )


def _result(nuclei: Nuclei | None) -> SlideResult:
    square = Polygon([(0, 0), (100, 0), (100, 100), (0, 100)])
    region = RegionStats(square, 2500.0, 0.8, 0.3, 0.2, 0.1, 0.05)
    candidate = RegionStats(affinity.translate(square, 200), 2500.0, 0.3, 0.6, 0.4, 0.2, 0.1, sua_score=0.7)
    tiles = tuple(UncertaintyTile(128.0 * i, 0.0, 128.0, 128.0, 0.5, 0.4, 0.3, 0.1, 0.2, 1.0) for i in range(3))
    empty = np.zeros((1, 1), np.float32)
    maps = UncertaintyMaps(empty, empty, empty, empty, empty, empty.astype(bool), (0.0, 0.0), 16.0, 0.5)
    model = ModelInfo("m", "1", "0" * 64, 5)
    return SlideResult(
        "s.svs", 5000, 5000, 0.5, "run", "cfg", model, maps, (region,), tiles, 2500.0, 1e6,
        nuclei=nuclei, candidates=(candidate,),
    )  # fmt: skip


def _no_id(features):
    """Features as their JSON reads back (shapely gives tuples, the fast path lists), without the fresh ids."""
    return [{k: v for k, v in json.loads(json.dumps(f)).items() if k != "id"} for f in features]


@pytest.mark.parametrize("entropy", [True, False])
def test_nucleus_features_are_what_each_object_gives(entropy):
    nuclei = _nuclei(40, entropy=entropy)
    fast = list(nucleus_features(nuclei))
    slow = [to_feature(nucleus_object(nuclei, i)) for i in range(len(nuclei))]
    assert _no_id(fast) == _no_id(slow)
    assert len({f["id"] for f in fast}) == len(fast)
    for feature in fast:
        validate_feature(feature)
    if entropy:
        assert "Predictive entropy" not in fast[1]["properties"]["measurements"]
        assert "Predictive entropy" in fast[0]["properties"]["measurements"]


def test_nucleus_features_of_a_range_are_placed_in_level0_px():
    nuclei = _nuclei(30)
    fast = list(nucleus_features(nuclei, 10, 20, scale=2.0, origin_xy=(100.0, 300.0)))
    assert len(fast) == 10
    for feature, (x, y) in zip(fast, nuclei.xy[10:20], strict=True):
        assert feature["geometry"]["coordinates"] == pytest.approx([2 * x + 100, 2 * y + 300])


def test_point_features_refuse_what_qupath_cannot_read():
    with pytest.raises(ValueError, match="objectType"):
        next(point_features(np.zeros((1, 2)), ["Other"], np.zeros(1, int), {}, object_type="cells"))
    with pytest.raises(ValueError, match="no colour"):
        next(point_features(np.zeros((1, 2)), ["Made up"], np.zeros(1, int), {}))
    feature = next(point_features(np.zeros((1, 2)), ["Other"], np.zeros(1, int), {"m": np.array([math.inf])}))
    assert "measurements" not in feature["properties"]


def test_result_features_stream_the_parent_then_every_child_in_order():
    result = _result(_nuclei(25))
    features = list(result_features(result))
    assert features[0]["properties"]["classification"]["name"] == "PD-L1 analysis"
    assert _no_id(features[1:]) == _no_id(map(to_feature, result_objects(result)))
    without_tiles = list(result_features(result, include_tiles=False))
    assert len(without_tiles) == len(features) - 3


@pytest.mark.parametrize("nuclei", [25, None])
@pytest.mark.parametrize("limit", [1, 4, 7, 100])
def test_pages_across_every_kind_add_up_to_the_whole(nuclei, limit):
    result = _result(_nuclei(nuclei) if nuclei else None)
    outputs = ("regions", "sua", "uncertainty_tiles", "nuclei")
    whole = _no_id(map(to_feature, result_objects(result)))
    pages, offset = [], 0
    while True:
        page, total = feature_page(result, outputs, offset, limit)
        assert total == len(whole) and len(page) <= limit
        if not page:
            break
        pages += page
        offset += limit
    assert _no_id(pages) == whole


def test_a_page_of_chosen_outputs_placed_for_an_upload():
    result = _result(_nuclei(5))
    page, total = feature_page(result, ("sua", "nuclei"), 0, 100, scale=2.0, origin_xy=(10.0, 20.0))
    assert total == 6
    candidate = Polygon(page[0]["geometry"]["coordinates"][0])
    assert candidate.bounds == (410.0, 20.0, 610.0, 220.0)
    assert page[1]["geometry"]["coordinates"] == pytest.approx(list(result.nuclei.xy[0] * 2 + (10, 20)))


@pytest.mark.parametrize("outputs", [("regions",), ("regions", "sua", "uncertainty_tiles"), ("nuclei",)])
def test_an_ihc_result_pages_its_cells_whatever_the_outputs(outputs):
    # An IHC is scored by its cells: its parent's counts and TPS are theirs, and QuPath's Positive % counts
    # them. A service job without "nuclei" in its outputs once returned none (the script then removed the
    # earlier run's cells and left the parent's TPS over nothing), where `pdl1 run` writes them.
    nuclei = _nuclei(12)
    result = SlideResult(
        "s.svs", 5000, 5000, 0.5, "run", "cfg", None, None, (), (), 0.0, 1e6, nuclei=nuclei, stain="H-DAB"
    )  # fmt: skip
    page, total = feature_page(result, outputs, 0, 100)
    assert total == 12 == len(page)
    assert _no_id(page) == _no_id(map(to_feature, result_objects(result)))
    he_page, he_total = feature_page(_result(_nuclei(12)), ("regions",), 0, 100)  # an H&E's nuclei stay optional
    assert he_total == 1 and he_page[0]["properties"]["classification"]["name"] == "PD-L1 positive"


def test_a_tile_trimmed_to_the_roi_is_written_with_its_outline_everywhere():
    # A cell over the ROI's edge, trimmed to it in two parts (inference.analysis.regions.uncertainty_tiles).
    outline = MultiPolygon([box(0, 0, 30, 128), box(90, 0, 128, 128)])
    trimmed = UncertaintyTile(0.0, 0.0, 128.0, 128.0, 0.5, 0.4, 0.3, 0.1, 0.2, 0.75, outline=outline)
    whole = UncertaintyTile(128.0, 0.0, 128.0, 128.0, 0.5, 0.4, 0.3, 0.1, 0.2, 1.0)
    obj, square = tile_object(trimmed), tile_object(whole)
    assert obj.geometry.equals(outline) and square.geometry.equals(box(128, 0, 256, 128))
    assert (obj.object_type, obj.name, obj.classification) == ("tile", TILE_NAME, None) == (
        square.object_type, square.name, square.classification
    )  # fmt: skip
    assert obj.measurements["Tissue fraction"] == 0.75 and set(obj.measurements) == set(square.measurements)
    feature = to_feature(obj)
    validate_feature(feature)
    assert from_feature(json.loads(json.dumps(feature))).geometry.equals(outline)
    # The service's pages of an uploaded region's result: mapped to the image's level-0 px like the rest.
    result = dataclasses.replace(_result(None), tiles=(trimmed, whole))
    page, total = feature_page(result, ("uncertainty_tiles",), 0, 10, scale=2.0, origin_xy=(10.0, 20.0))
    assert total == 2
    placed = affinity.affine_transform(outline, [2, 0, 0, 2, 10, 20])
    assert from_feature(page[0]).geometry.equals(placed)
    assert _no_id(result_features(result))[-2:] == _no_id(map(to_feature, (obj, square)))
