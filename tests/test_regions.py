import numpy as np
import pytest
from shapely.geometry import box

from inference.analysis.regions import positive_regions, resample_mask, uncertainty_tiles
from inference.analysis.vectorize import mask_to_polygons
from inference.evaluation.metrics import auroc, dice, iou
from inference.results import UncertaintyMaps


def _maps(prob, **kw):
    shape = prob.shape
    zeros = np.zeros(shape, np.float32)
    return UncertaintyMaps(
        prob=prob.astype(np.float32),
        predictive_entropy=kw.get("pe", zeros),
        expected_entropy=kw.get("ee", zeros),
        mutual_information=kw.get("mi", zeros),
        prob_std=kw.get("std", zeros),
        covered=kw.get("covered", np.ones(shape, bool)),
        origin_xy=kw.get("origin", (0.0, 0.0)),
        downsample=kw.get("ds", 16.0),
        mpp=kw.get("mpp", 8.0),
    )


def test_square_with_hole_and_island():
    m = np.zeros((12, 12), bool)
    m[1:9, 1:9] = True
    m[3:6, 3:6] = False
    m[4, 4] = True  # island inside the hole
    polys, labels = mask_to_polygons(m, downsample=2.0, origin_xy=(100.0, 50.0))
    assert len(polys) == 2
    ring = max(polys, key=lambda p: p.area)
    assert len(ring.interiors) == 1
    minx, miny, maxx, maxy = ring.bounds
    assert (minx, miny, maxx, maxy) == pytest.approx((102, 52, 118, 68), abs=1.01)
    # Edge-traced outlines cut each corner by half a pixel: areas match the pixel counts closely.
    for i, poly in enumerate(polys, start=1):
        assert poly.is_valid
        assert poly.area == pytest.approx((labels == i).sum() * 4, rel=0.15, abs=2.1)


def test_small_islands_are_dropped():
    m = np.zeros((20, 20), bool)
    m[2:12, 2:12] = True
    m[15, 15] = True
    polys, labels = mask_to_polygons(m, min_area_px=4)
    assert len(polys) == 1
    assert labels[15, 15] == 0 and labels[5, 5] == 1


def test_regions_carry_map_means_and_area():
    prob = np.zeros((10, 10), np.float32)
    prob[2:6, 2:6] = 0.9
    pe = np.full((10, 10), 0.1, np.float32)
    pe[2:6, 2:6] = 0.4
    regions = positive_regions(_maps(prob, pe=pe), threshold=0.5, min_area_um2=0, simplify_px=0)
    assert len(regions) == 1
    r = regions[0]
    assert r.prob_mean == pytest.approx(0.9)
    assert r.predictive_entropy_mean == pytest.approx(0.4)
    # 4x4 map px of 8 µm, chamfered corners: 16 px * 64 µm² minus 4 half-pixel corners.
    assert r.area_um2 == pytest.approx((16 - 0.5) * 64, rel=0.01)
    assert r.polygon.bounds == pytest.approx((32, 32, 96, 96), abs=8.01)


def test_uncovered_pixels_are_never_positive():
    prob = np.full((6, 6), 0.9, np.float32)
    covered = np.zeros((6, 6), bool)
    assert positive_regions(_maps(prob, covered=covered), threshold=0.5, min_area_um2=0) == ()


def test_uncertainty_tiles_average_covered_pixels_and_report_tissue():
    prob = np.arange(64, dtype=np.float32).reshape(8, 8) / 64
    tissue = np.zeros((8, 8), bool)
    tissue[:4, :4] = True
    tissue[4:, 4:6] = True
    tiles = uncertainty_tiles(_maps(prob, mpp=8.0, ds=16.0), tissue, tile_um=32.0)  # 4x4 map px cells
    assert len(tiles) == 2
    first = next(t for t in tiles if t.x == 0 and t.y == 0)
    assert first.width == 64 and first.tissue_fraction == 1.0
    assert first.prob == pytest.approx(prob[:4, :4].mean())
    other = next(t for t in tiles if t.x == 64)
    assert other.tissue_fraction == pytest.approx(0.5)


def test_uncertainty_tiles_stop_at_the_image_edge():
    # Maps of 8 x 8 px at 16 level-0 px each (128 x 128) over an image of 100 x 76 px: the sliding window's
    # last tiles hang over the edge, the uncertainty grid must not (QuPath would show tiles off the image).
    prob = np.full((8, 8), 0.25, np.float32)
    prob[:, 6:] = 0.9  # what the models say about the white padding past x = 96
    tiles = uncertainty_tiles(_maps(prob), np.ones((8, 8), bool), tile_um=32.0, image_size_wh=(100, 76))
    boxes = sorted((t.x, t.y, t.width, t.height) for t in tiles)
    assert boxes == [(0, 0, 64, 64), (0, 64, 64, 12), (64, 0, 36, 64), (64, 64, 36, 12)]
    # Only map pixels whose centre lies in the image count: of columns 4-7 (centres 72, 88, 104, 120) two.
    right = next(t for t in tiles if (t.x, t.y) == (64, 0))
    assert right.prob == pytest.approx(0.25) and right.tissue_fraction == 1.0
    without = uncertainty_tiles(_maps(prob), np.ones((8, 8), bool), tile_um=32.0)  # the grid as it was
    assert max(t.x + t.width for t in without) == 128


def test_uncertainty_tiles_are_trimmed_to_the_roi_and_measured_over_what_is_left():
    # Maps of 8 x 8 px at 16 level-0 px (128 x 128), cells of 4 x 4 map px (64 level-0 px); a ROI ending at x 100
    # holds the left cells whole and the right ones up to x 100: of their columns (centres 72, 88, 104, 120) two.
    prob = np.full((8, 8), 0.25, np.float32)
    prob[:, 6:] = 0.9  # outside the ROI: counts for nothing
    tissue = np.zeros((8, 8), bool)
    tissue[:, :4] = True
    tissue[:, 4] = True  # half of what the right cells hold in the ROI
    tiles = uncertainty_tiles(_maps(prob), tissue, tile_um=32.0, roi=box(0, 0, 100, 128))
    assert sorted((t.x, t.y, t.width, t.height) for t in tiles) == [
        (0, 0, 64, 64), (0, 64, 64, 64), (64, 0, 64, 64), (64, 64, 64, 64)
    ]  # fmt: skip
    for t in tiles:
        if t.x == 0:
            assert t.outline is None and t.tissue_fraction == 1.0  # wholly inside: the box is the tile
        else:
            assert t.outline.equals(box(64, t.y, 100, t.y + 64))
            assert t.prob == pytest.approx(0.25) and t.tissue_fraction == pytest.approx(0.5)  # 4 of 8, not of 16


def test_a_roi_that_cuts_a_cell_in_two_gives_it_both_parts_and_a_cell_outside_it_none():
    notch = box(76, 0, 100, 100)  # column centres 72 and 104 beside it, 88 in it
    roi = box(0, 0, 128, 100).difference(notch)
    tissue = np.ones((8, 8), bool)
    tissue[:, 5] = False  # the column in the notch: tissue outside the ROI counts for nothing
    tiles = {(t.x, t.y): t for t in uncertainty_tiles(_maps(np.zeros((8, 8))), tissue, tile_um=32.0, roi=roi)}
    assert set(tiles) == {(0, 0), (64, 0), (0, 64), (64, 64)}
    split = tiles[(64, 0)].outline
    assert split.geom_type == "MultiPolygon" and split.area == (12 + 28) * 64
    assert tiles[(64, 0)].tissue_fraction == 1.0
    assert tiles[(0, 64)].outline.equals(box(0, 64, 64, 100))  # centres 72 and 88 in, 104 and 120 below the ROI
    assert tiles[(0, 64)].tissue_fraction == 1.0
    outside = uncertainty_tiles(_maps(np.zeros((8, 8))), tissue, tile_um=32.0, roi=box(0, 0, 64, 64))
    assert [(t.x, t.y, t.outline) for t in outside] == [(0, 0, None)]  # the others touch it along an edge only


def test_a_roi_over_the_whole_image_gives_the_tiles_of_a_whole_image_run():
    prob = np.random.default_rng(3).uniform(0, 1, (8, 8)).astype(np.float32)
    tissue = prob > 0.3
    whole = uncertainty_tiles(_maps(prob), tissue, tile_um=32.0, image_size_wh=(100, 76))
    assert whole and all(t.outline is None for t in whole)
    roi = box(0, 0, 100, 76)
    assert uncertainty_tiles(_maps(prob), tissue, tile_um=32.0, image_size_wh=(100, 76), roi=roi) == whole


def test_resample_mask_nearest():
    mask = np.array([[1, 0], [0, 1]], bool)
    out = resample_mask(mask, 10.0, shape_hw=(4, 4), origin_xy=(0, 0), downsample=5.0)
    np.testing.assert_array_equal(out, np.kron(mask, np.ones((2, 2), bool)))
    outside = resample_mask(mask, 10.0, shape_hw=(2, 2), origin_xy=(5, 5), downsample=10.0)
    np.testing.assert_array_equal(outside, [[True, False], [False, False]])


@pytest.mark.parametrize(
    ("pred", "truth", "d", "j"),
    [
        ([1, 1, 0, 0], [1, 0, 1, 0], 0.5, 1 / 3),
        ([0, 0], [0, 0], 1.0, 1.0),
        ([1, 1], [0, 0], 0.0, 0.0),
    ],
)
def test_dice_and_iou_by_hand(pred, truth, d, j):
    assert dice(np.array(pred, bool), np.array(truth, bool)) == pytest.approx(d)
    assert iou(np.array(pred, bool), np.array(truth, bool)) == pytest.approx(j)


def test_auroc_by_hand_and_with_ties():
    assert auroc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([1, 1, 0, 0])) == 1.0
    assert auroc(np.array([0.5, 0.5]), np.array([1, 0])) == 0.5
    assert np.isnan(auroc(np.array([0.1, 0.2]), np.array([0, 0])))


def test_polygon_coordinates_are_level0():
    m = np.zeros((4, 4), bool)
    m[1:3, 1:3] = True
    polys, _ = mask_to_polygons(m, downsample=10, origin_xy=(1000, 2000))
    assert polys[0].within(box(1000, 2000, 1040, 2040))
    assert polys[0].centroid.x == pytest.approx(1020) and polys[0].centroid.y == pytest.approx(2020)
