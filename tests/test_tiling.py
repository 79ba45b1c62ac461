import numpy as np
import pytest
from shapely.geometry import LineString, Polygon, box

from inference.errors import RoiError
from inference.tiling import compute_steps, gaussian_weights, rasterize_polygon, tile_grid, validate_roi


@pytest.mark.parametrize(
    ("extent", "tile", "step", "expected"),
    [(1000, 512, 256, [0, 244, 488]), (512, 512, 256, [0]), (100, 512, 256, [0]), (1024, 512, 512, [0, 512])],
)
def test_compute_steps(extent, tile, step, expected):
    assert compute_steps(extent, tile_px=tile, max_step_px=step) == expected


def test_steps_cover_extent_and_respect_max_step():
    for extent in range(513, 3000, 97):
        steps = compute_steps(extent, tile_px=512, max_step_px=384)
        assert steps[0] == 0 and steps[-1] + 512 == extent
        assert max(np.diff(steps)) <= 384


def test_gaussian_weights_shape_and_sigma():
    w = gaussian_weights(64)
    assert w.dtype == np.float32 and w.shape == (64, 64)
    assert (w > 0).all() and w.max() == 1.0
    # sigma = 64 / 8 = 8 px: one sigma from the centre the weight is exp(-1/2) along an axis.
    centre = w[31:33, 31:33].mean()
    assert w[31, 31 - 8] / w[31, 31] == pytest.approx(np.exp(-0.5 * (8.5**2 - 0.5**2) / 64), rel=1e-3)
    assert centre == pytest.approx(1.0, abs=0.02)
    assert not w.flags.writeable


def _coverage(grid, shape_hw, downsample):
    covered = np.zeros(shape_hw, bool)
    size = grid.tile_size_level0_px
    for x, y in grid.origins_xy:
        r0, c0 = int(y // downsample), int(x // downsample)
        r1, c1 = int(np.ceil((y + size) / downsample)), int(np.ceil((x + size) / downsample))
        covered[max(r0, 0) : r1, max(c0, 0) : c1] = True
    return covered


def test_tiles_cover_every_tissue_pixel_and_skip_empty_ones():
    rng = np.random.default_rng(0)
    tissue = np.zeros((64, 96), bool)
    tissue[5:20, 10:30] = True
    tissue[40:60, 70:90] = rng.random((20, 20)) > 0.5
    grid = tile_grid(
        image_size_wh=(96 * 16, 64 * 16),
        tile_size_px=128,
        overlap_px=32,
        downsample=1.0,
        tissue_mask=tissue,
        tissue_downsample=16,
    )
    covered = _coverage(grid, tissue.shape, 16)
    assert covered[tissue].all()
    full = tile_grid(image_size_wh=(96 * 16, 64 * 16), tile_size_px=128, overlap_px=32, downsample=1.0)
    assert 0 < len(grid) < len(full)


def test_blending_weights_positive_wherever_tiles_cover():
    grid = tile_grid(image_size_wh=(300, 200), tile_size_px=64, overlap_px=16, downsample=2.0)
    acc = np.zeros((200, 300))
    w = np.kron(gaussian_weights(64), np.ones((2, 2)))
    for x, y in grid.origins_xy:
        sub = acc[y : y + 128, x : x + 128]
        sub += w[: sub.shape[0], : sub.shape[1]]
    assert (acc > 0).all()


def test_grid_order_is_row_major_and_deterministic():
    a = tile_grid(image_size_wh=(1000, 700), tile_size_px=256, overlap_px=64, downsample=1.0)
    b = tile_grid(image_size_wh=(1000, 700), tile_size_px=256, overlap_px=64, downsample=1.0)
    np.testing.assert_array_equal(a.origins_xy, b.origins_xy)
    keys = [(y, x) for x, y in a.origins_xy]
    assert keys == sorted(keys)


def test_roi_restricts_tiles_to_those_touching_it():
    roi = Polygon([(600, 600), (900, 600), (900, 900), (600, 900)])
    grid = tile_grid(image_size_wh=(2000, 2000), tile_size_px=256, overlap_px=0, downsample=1.0, roi=roi)
    assert grid.bounds_xy == (600, 600, 900, 900)
    tiles = [box(x, y, x + 256, y + 256) for x, y in grid.origins_xy]
    assert all(t.intersects(roi) for t in tiles)
    from shapely.ops import unary_union

    assert unary_union(tiles).intersection(roi).area == pytest.approx(roi.area)


def test_roi_with_tissue_mask_uses_both():
    tissue = np.ones((20, 20), bool)
    roi = box(0, 0, 50, 50)
    grid = tile_grid(
        image_size_wh=(200, 200),
        tile_size_px=32,
        overlap_px=0,
        downsample=1.0,
        roi=roi,
        tissue_mask=tissue,
        tissue_downsample=10,
    )
    assert all(x < 50 and y < 50 for x, y in grid.origins_xy)


def test_roi_outside_image():
    with pytest.raises(RoiError, match="outside the image of 100x100"):
        validate_roi(box(200, 200, 300, 300), image_size_wh=(100, 100))


def test_invalid_roi_geometry():
    bowtie = Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])
    with pytest.raises(RoiError, match="invalid"):
        validate_roi(bowtie, image_size_wh=(100, 100))


def test_roi_must_be_a_polygon():
    with pytest.raises(RoiError, match="Polygon or MultiPolygon"):
        validate_roi(LineString([(0, 0), (5, 5)]), image_size_wh=(100, 100))


def test_roi_is_clipped_to_the_image():
    clipped = validate_roi(box(-50, -50, 50, 50), image_size_wh=(100, 100))
    assert clipped.bounds == (0, 0, 50, 50)


def test_rasterize_polygon_uses_pixel_centres():
    mask = rasterize_polygon(box(0, 0, 20, 10), shape_hw=(4, 4), downsample=10)
    expected = np.zeros((4, 4), bool)
    expected[0, :2] = True
    np.testing.assert_array_equal(mask, expected)


def test_bad_overlap():
    with pytest.raises(ValueError, match="overlap_px"):
        tile_grid(image_size_wh=(100, 100), tile_size_px=32, overlap_px=32, downsample=1.0)
