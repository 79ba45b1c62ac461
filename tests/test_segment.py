import tracemalloc

import numpy as np
import pytest
import torch
from shapely.geometry import box

from inference.analysis.segment import SegmentConfig, SegmentProfile, segment_slide
from inference.analysis.tiling import gaussian_weights
from inference.analysis.uncertainty import ensemble_stats_np
from inference.errors import Cancelled
from inference.slides.slide import Mpp, Slide
from inference.slides.tissue import TissueMask
from tests.helpers import demo_seg_ensemble, pointwise_ensemble, random_slide


def _direct(ensemble, rgb):
    probs = np.stack([m.probs_np(rgb, ensemble.manifest) for m in ensemble.members])
    return ensemble_stats_np(probs)


def test_one_tile_maps_equal_direct_computation():
    slide = random_slide(64, 64)
    ens = pointwise_ensemble(4, tile_size_px=64)
    # fp32: on a CPU with native bf16, auto precision would autocast
    maps = segment_slide(slide, ens, config=SegmentConfig(map_downsample=1, read_workers=0, precision="fp32"))
    ref = _direct(ens, slide.read_region((0, 0), 0, (64, 64)))
    for name, value in maps.as_dict().items():
        np.testing.assert_allclose(value, ref[name], atol=2e-5, err_msg=name)
    assert maps.covered.all()


def test_pooled_maps_are_gaussian_weighted_cell_means():
    slide = random_slide(64, 64, seed=3)
    ens = pointwise_ensemble(3, tile_size_px=64, seed=2)
    maps = segment_slide(slide, ens, config=SegmentConfig(map_downsample=4, read_workers=0, precision="fp32"))
    ref = _direct(ens, slide.read_region((0, 0), 0, (64, 64)))
    w = gaussian_weights(64).astype(np.float64)
    pooled_w = w.reshape(16, 4, 16, 4).sum(axis=(1, 3))
    expect = (ref["prob"] * w).reshape(16, 4, 16, 4).sum(axis=(1, 3)) / pooled_w
    np.testing.assert_allclose(maps.prob, expect, atol=2e-5)
    assert maps.downsample == 4 and maps.mpp == 4.0


@pytest.mark.parametrize(("tile", "overlap"), [(64, 0.25), (32, 0.5), (128, 0.0)])
def test_many_tiles_give_the_same_maps_as_one_tile(tile, overlap):
    slide = random_slide(300, 200, seed=5)
    one = segment_slide(
        slide, pointwise_ensemble(3, tile_size_px=512), config=SegmentConfig(map_downsample=1, read_workers=0)
    )
    many = segment_slide(
        slide,
        pointwise_ensemble(3, tile_size_px=tile),
        config=SegmentConfig(map_downsample=1, overlap_fraction=overlap, batch_size=3),
    )
    assert many.shape == one.shape == (200, 300)
    for name in ("prob", "predictive_entropy", "expected_entropy", "mutual_information", "prob_std"):
        np.testing.assert_allclose(getattr(many, name), getattr(one, name), atol=3e-5, err_msg=name)


def test_identical_members_give_zero_mutual_information():
    slide = random_slide(200, 150, seed=8)
    maps = segment_slide(
        slide,
        pointwise_ensemble(5, tile_size_px=64, identical=True),
        config=SegmentConfig(map_downsample=2, overlap_fraction=0.5),
    )
    assert maps.covered.all()
    assert np.abs(maps.mutual_information).max() < 1e-6
    assert np.abs(maps.prob_std).max() < 1e-6
    assert maps.predictive_entropy.max() > 0.05


def test_mutual_information_never_negative_and_ensemble_disagrees():
    maps = segment_slide(
        random_slide(128, 128, seed=9),
        pointwise_ensemble(5, tile_size_px=64),
        config=SegmentConfig(map_downsample=2, overlap_fraction=0.5),
    )
    assert (maps.mutual_information >= 0).all()
    assert maps.mutual_information.max() > 0.01


def test_member_maps_average_to_the_ensemble_mean():
    maps = segment_slide(
        random_slide(96, 96, seed=4),
        pointwise_ensemble(3, tile_size_px=32),
        config=SegmentConfig(map_downsample=2, member_maps=True),
    )
    assert maps.member_prob.shape == (3, 48, 48)
    np.testing.assert_allclose(maps.member_prob.mean(axis=0), maps.prob, atol=1e-5)


def test_roi_limits_maps_and_coverage():
    slide = random_slide(400, 400, seed=1)
    roi = box(100, 120, 220, 260)
    maps = segment_slide(slide, pointwise_ensemble(2, tile_size_px=32), roi=roi, config=SegmentConfig(map_downsample=2))
    x0, y0 = maps.origin_xy
    assert x0 <= 100 and y0 <= 120
    assert x0 + maps.shape[1] * maps.downsample >= 220
    covered_area = maps.covered.sum() * maps.downsample**2
    assert covered_area == pytest.approx(roi.area, rel=0.05)


def test_cancel_between_batches():
    with pytest.raises(Cancelled, match="cancelled after"):
        segment_slide(
            random_slide(256, 256),
            pointwise_ensemble(2, tile_size_px=32),
            config=SegmentConfig(batch_size=2),
            should_cancel=lambda: True,
        )


class _VirtualSlideReader:
    """A 40k x 40k px slide of flat pink, generated on read: no pixels are held."""

    level_dimensions = ((40_000, 40_000),)
    level_downsamples = (1.0,)

    def read_region(self, location_xy, level, size_wh):
        w, h = size_wh
        out = np.empty((h, w, 3), np.uint8)
        out[...] = (200, 120, 180)
        return out

    def close(self):
        pass


def test_memory_stays_bounded_on_a_huge_slide(tmp_path):
    slide = Slide(_VirtualSlideReader(), mpp=Mpp(0.5, 0.5, "test"))
    ens = pointwise_ensemble(2, tile_size_px=64)  # 1 µm/px model -> downsample 2
    tissue = np.zeros((400, 400), bool)  # 100 px per mask px
    tissue[0, 0] = tissue[-1, -1] = True  # two corners: the maps span the whole slide
    config = SegmentConfig(map_downsample=4, max_in_memory_mb=16, scratch_dir=tmp_path)
    in_memory_mb = (40_000 / 8) ** 2 * 6 * 4 / 2**20
    tracemalloc.start()
    maps = segment_slide(slide, ens, tissue=TissueMask(tissue, 100.0), config=config)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert maps.shape == (5_000, 5_000)
    assert isinstance(maps.prob, np.memmap)
    assert in_memory_mb > 500
    assert peak / 2**20 < 40, f"peak {peak / 2**20:.0f} MB"
    assert maps.covered[:20, :20].any() and maps.covered[-20:, -20:].any()
    assert not maps.covered[2000:2100, 2000:2100].any()


@pytest.mark.parametrize("member_maps", [False, True])
def test_device_accumulators_give_the_host_maps(member_maps):
    # The GPU path keeps the accumulators on the model's device; on this CPU that is a torch
    # tensor instead of a numpy array, which exercises the same code.
    slide = random_slide(300, 220, seed=11)
    ens = pointwise_ensemble(3, tile_size_px=64, seed=4)
    common = {"map_downsample": 2, "batch_size": 3, "member_maps": member_maps, "read_workers": 2}
    host_profile, device_profile = SegmentProfile(), SegmentProfile()
    host = segment_slide(slide, ens, config=SegmentConfig(accumulate_on="host", **common), profile=host_profile)
    dev = segment_slide(slide, ens, config=SegmentConfig(accumulate_on="device", **common), profile=device_profile)
    assert host_profile.accumulate_on == "host" and device_profile.accumulate_on.startswith("device")
    for name, value in host.as_dict().items():
        np.testing.assert_allclose(getattr(dev, name), value, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(dev.covered, host.covered)
    if member_maps:
        np.testing.assert_allclose(dev.member_prob, host.member_prob, atol=1e-6)


def test_profile_reports_tiles_and_read_wait():
    profile = SegmentProfile()
    segment_slide(
        random_slide(256, 256), pointwise_ensemble(2, tile_size_px=64), config=SegmentConfig(), profile=profile
    )
    assert profile.tiles > 1 and profile.read_workers == 2  # automatic on the CPU
    assert 0 <= profile.read_wait_s <= profile.wall_s and 0 <= profile.read_wait_fraction <= 1


def test_read_workers_automatic_per_device():
    assert SegmentConfig().workers_for(torch.device("cpu")) == 2
    assert 2 <= SegmentConfig().workers_for(torch.device("cuda")) <= 16
    assert SegmentConfig(read_workers=5).workers_for(torch.device("cuda")) == 5


def test_bad_config():
    with pytest.raises(ValueError, match="map_downsample"):
        SegmentConfig(map_downsample=0)
    with pytest.raises(ValueError, match="accumulate_on"):
        SegmentConfig(accumulate_on="gpu")
    with pytest.raises(ValueError, match="read_workers"):
        SegmentConfig(read_workers=-1)
    with pytest.raises(ValueError, match="not a multiple of map_downsample"):
        segment_slide(
            random_slide(64, 64), pointwise_ensemble(1, tile_size_px=30), config=SegmentConfig(map_downsample=4)
        )


def test_inference_mode_leaves_no_grad():
    ens = pointwise_ensemble(1)
    probs = ens.member_probs(
        np.zeros((1, 8, 8, 3), np.uint8),
        precision=__import__("inference.models.ensemble", fromlist=["Precision"]).Precision(None),
    )
    assert not probs.requires_grad and probs.dtype == torch.float32


def test_demo_ensemble_maps_do_not_depend_on_tiling(phantom_svs):
    """The shipped U-Net (BatchNorm, so no per-tile statistics): small tiles give the big tile's maps."""
    from inference.slides.slide import open_slide

    ens = demo_seg_ensemble()
    big = demo_seg_ensemble(tile_size_px=1024)
    with open_slide(phantom_svs) as slide:
        one = segment_slide(slide, big, config=SegmentConfig(read_workers=0))
        many = segment_slide(slide, ens, config=SegmentConfig(read_workers=0))
    inner = (slice(8, -8), slice(8, -8))  # away from the image edge, where tiles pad differently
    for name in ("prob", "predictive_entropy", "mutual_information"):
        diff = np.abs(getattr(one, name) - getattr(many, name))[inner]
        # Zero padding at tile borders is the only difference left: tiny on average, small at worst.
        assert diff.mean() < 0.002 and diff.max() < 0.1, (name, diff.mean(), diff.max())
    assert ((one.prob >= 0.5) == (many.prob >= 0.5)).mean() > 0.999


def test_averaging_on_the_device_gives_the_readers_maps(phantom_svs):
    """A 1 µm/px model on a 0.5 µm/px slide: the level-0 pixels averaged by torch, or by the readers."""
    from inference.slides.slide import open_slide

    ens = demo_seg_ensemble(input_mpp=1.0)
    maps, profiles = {}, {}
    with open_slide(phantom_svs) as slide:
        for on_device in (True, False):
            profiles[on_device] = SegmentProfile()
            config = SegmentConfig(reduce_on_device=on_device, precision="fp32")
            maps[on_device] = segment_slide(slide, ens, config=config, profile=profiles[on_device])
    assert (profiles[True].box_factor, profiles[False].box_factor) == (2, 1)
    assert SegmentConfig().reduce_on_device is None  # automatic: on CUDA
    np.testing.assert_array_equal(maps[True].covered, maps[False].covered)
    for name in ("prob", "predictive_entropy", "mutual_information"):
        # The readers round each mean to uint8 (at most 0.5/255 off): the maps barely move.
        diff = np.abs(getattr(maps[True], name) - getattr(maps[False], name))
        assert diff.mean() < 1e-3 and diff.max() < 0.05, (name, diff.mean(), diff.max())
