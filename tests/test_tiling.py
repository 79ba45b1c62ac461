import numpy as np
import pytest
from shapely.geometry import LineString, Polygon, box

from inference.analysis.tiling import (
    compute_steps,
    gaussian_weights,
    rasterize_polygon,
    read_grid_tiles,
    tile_blocks,
    tile_grid,
    validate_roi,
)
from inference.errors import RoiError
from inference.slides.reader import ArrayReader
from inference.slides.slide import Mpp, Slide, open_slide
from tests.helpers import random_slide


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


def test_columns_rows_count_skipped_tiles():
    full = tile_grid(image_size_wh=(1000, 600), tile_size_px=200, overlap_px=0, downsample=1.0)
    col, row = full.columns_rows()
    assert col.tolist() == [i % 5 for i in range(15)] and row.tolist() == [i // 5 for i in range(15)]
    tissue = np.zeros((6, 10), bool)
    tissue[5, 9] = True  # only the bottom-right tile is kept
    sparse = tile_grid(
        image_size_wh=(1000, 600),
        tile_size_px=200,
        overlap_px=0,
        downsample=1.0,
        tissue_mask=tissue,
        tissue_downsample=100.0,
    )
    assert [c.tolist() for c in sparse.columns_rows()] == [[4], [2]]


@pytest.mark.parametrize("block_tiles", [1, 2, 3, 5])
def test_blocks_hold_every_tile_once_and_only_neighbours(block_tiles):
    # Tissue in two far corners and a diagonal: kept tiles are sparse, and a block must never
    # join tiles that are far apart on the slide just because the tiles between them were skipped.
    tissue = np.zeros((100, 100), bool)
    tissue[:8, :8] = tissue[-8:, -8:] = True
    tissue[np.arange(100), np.arange(100)] = True
    grid = tile_grid(
        image_size_wh=(10_000, 10_000),
        tile_size_px=512,
        overlap_px=128,
        downsample=2.0,
        tissue_mask=tissue,
        tissue_downsample=100.0,
    )
    blocks = tile_blocks(grid, block_tiles=block_tiles)
    flat = np.concatenate(blocks)
    assert sorted(flat.tolist()) == list(range(len(grid)))
    col, row = grid.columns_rows()
    for block in blocks:
        assert col[block].max() - col[block].min() < block_tiles
        assert row[block].max() - row[block].min() < block_tiles
        assert len(set((col[block] // block_tiles).tolist())) == 1
    if block_tiles == 1:
        assert flat.tolist() == list(range(len(grid)))  # grid order


def test_block_reads_give_each_tile_its_own_read(phantom_svs):
    # 0.5 µm/px slide read at 1 µm/px: an integer step, so a tile cut from a block read is
    # exactly the tile read on its own, edges of the slide (white outside) included.
    with open_slide(phantom_svs) as slide:
        grid = tile_grid(image_size_wh=slide.dimensions, tile_size_px=96, overlap_px=24, downsample=2.0)
        single = dict(read_grid_tiles(slide, grid, mpp=1.0, workers=0, block_tiles=1))
        blocked = list(read_grid_tiles(slide, grid, mpp=1.0, workers=2, block_tiles=3))
    assert sorted(i for i, _ in blocked) == list(range(len(grid)))
    for index, pixels in blocked:
        assert pixels.shape == (96, 96, 3) and pixels.dtype == np.uint8
        np.testing.assert_array_equal(pixels, single[index])


def test_box_factor_reads_give_the_level_pixels_that_average_to_the_tiles(phantom_svs):
    # 0.5 µm/px read at 1 µm/px: with box_factor 2 every tile comes as its 2x2-larger patch
    # of level 0, whose box means are the reduced tile's pixels before rounding to uint8.
    with open_slide(phantom_svs) as slide:
        assert slide.integer_reduction(1.0) == (0, 2)
        grid = tile_grid(image_size_wh=slide.dimensions, tile_size_px=96, overlap_px=24, downsample=2.0)
        reduced = dict(read_grid_tiles(slide, grid, mpp=1.0, workers=2, block_tiles=3))
        level = list(read_grid_tiles(slide, grid, mpp=1.0, workers=2, block_tiles=3, box_factor=2))
        with pytest.raises(ValueError, match="box_factor 4 is not the integer step"):
            read_grid_tiles(slide, grid, mpp=1.0, workers=0, box_factor=4).__next__()
    assert sorted(i for i, _ in level) == sorted(reduced)
    for index, pixels in level:
        assert pixels.shape == (192, 192, 3)
        means = pixels.astype(np.float64).reshape(96, 2, 96, 2, 3).mean(axis=(1, 3))
        assert np.abs(means - reduced[index]).max() <= 0.5 + 1e-9, index


def test_block_reads_at_a_fractional_step_stay_close_to_tile_reads():
    # Smooth stain-like texture (features of ~20 px): 0.5 -> 0.8 µm/px resamples each tile
    # on its own phase, a block once as a whole, so they may differ by interpolation only
    # (measured: at most 2.8 grey levels on average; a tile one pixel off differs by 6.5 or more).
    yy, xx = np.mgrid[0:700, 0:900].astype(np.float64)
    wave = np.sin(xx / 7) * np.cos(yy / 5)
    rgb = np.stack([160 + 60 * wave, 110 - 50 * wave, 170 + 40 * np.sin((xx + yy) / 11)], axis=-1)
    slide = Slide(ArrayReader(rgb.round().astype(np.uint8)), mpp=Mpp(0.5, 0.5, "test"))
    grid = tile_grid(image_size_wh=slide.dimensions, tile_size_px=64, overlap_px=16, downsample=1.6)
    single = dict(read_grid_tiles(slide, grid, mpp=0.8, workers=0, block_tiles=1))
    for index, pixels in read_grid_tiles(slide, grid, mpp=0.8, workers=0, block_tiles=4):
        diff = np.abs(pixels.astype(int) - single[index].astype(int))
        assert diff.mean() < 4, f"tile {index}: mean difference {diff.mean():.1f} grey levels"


def test_closing_the_tile_reader_early_stops_reading():
    slide = random_slide(2048, 2048)
    grid = tile_grid(image_size_wh=slide.dimensions, tile_size_px=64, overlap_px=0, downsample=1.0)
    read = 0
    original = slide.read_region_at_mpp

    def counting(*args, **kwargs):
        nonlocal read
        read += 1
        return original(*args, **kwargs)

    slide.read_region_at_mpp = counting
    tiles = read_grid_tiles(slide, grid, mpp=1.0, workers=2, block_tiles=2, max_pending_tiles=8)
    next(tiles)
    tiles.close()
    assert read < 10, f"{read} of {len(tile_blocks(grid, block_tiles=2))} blocks were read after closing"
