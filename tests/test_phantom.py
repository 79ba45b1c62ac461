import hashlib
from dataclasses import replace

import numpy as np
import openslide
import pytest
import tifffile
from scipy import ndimage as ndi

from inference.phantom.pyramid import box_average_4, pyramid_downsamples, write_phantom, write_pyramid
from inference.phantom.render import render
from inference.phantom.scene import PhantomScene, PhantomSpec
from inference.phantom.truth import NUCLEUS_CLASSES, load_truth, truth_dir_for


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = write_phantom(tmp_path / "a" / "s.svs", PhantomSpec(1024, 1024, seed=5))
    b = write_phantom(tmp_path / "b" / "s.svs", PhantomSpec(1024, 1024, seed=5))
    c = write_phantom(tmp_path / "c" / "s.svs", PhantomSpec(1024, 1024, seed=6))
    assert _sha(a.slide_path) == _sha(b.slide_path)
    assert _sha(a.nuclei_csv_path) == _sha(b.nuclei_csv_path)
    assert _sha(a.mask_path) == _sha(b.mask_path)
    assert _sha(a.slide_path) != _sha(c.slide_path)


def test_openslide_reads_mpp_and_levels(phantom_svs):
    osr = openslide.OpenSlide(phantom_svs)
    assert osr.properties["openslide.vendor"] == "aperio"
    assert float(osr.properties["openslide.mpp-x"]) == 0.5
    assert float(osr.properties["aperio.MPP"]) == 0.5
    assert osr.level_count == len(pyramid_downsamples(2048, 2048)) == 2
    assert osr.properties["tiff.ImageDescription"].startswith("Aperio")


def test_rendering_is_seamless_across_tiles():
    scene = PhantomScene(PhantomSpec(1024, 1024, seed=3, shift=0.6))
    whole = render(scene, 256, 256, 256, 256)
    quads = [[render(scene, 256 + x, 256 + y, 128, 128) for x in (0, 128)] for y in (0, 128)]
    tiled = np.concatenate([np.concatenate(row, axis=1) for row in quads], axis=0)
    assert np.abs(whole.astype(int) - tiled.astype(int)).max() <= 1


def test_levels_agree_with_level_zero(phantom_svs):
    osr = openslide.OpenSlide(phantom_svs)
    l0 = np.asarray(osr.read_region((0, 0), 0, (2048, 2048)).convert("RGB"), np.float64)
    l1 = np.asarray(osr.read_region((0, 0), 1, (512, 512)).convert("RGB"), np.float64)
    box = l0.reshape(512, 4, 512, 4, 3).mean(axis=(1, 3))
    assert np.abs(box - l1).mean() < 8  # same scene, rendered at the level's resolution


def test_averaged_levels_are_level_zero_box_averaged_and_level_zero_is_unchanged(tmp_path):
    spec = PhantomSpec(2048, 2048, seed=3)
    rendered = write_phantom(tmp_path / "r.svs", spec)
    averaged = write_phantom(tmp_path / "a.svs", replace(spec, reduced_levels="averaged"))
    r, a = openslide.OpenSlide(rendered.slide_path), openslide.OpenSlide(averaged.slide_path)
    assert a.level_downsamples == r.level_downsamples
    l0 = np.asarray(r.read_region((0, 0), 0, (2048, 2048)).convert("RGB"))
    assert np.array_equal(np.asarray(a.read_region((0, 0), 0, (2048, 2048)).convert("RGB")), l0)
    box = box_average_4(render(PhantomScene(spec), 0, 0, 2048, 2048)).astype(float)
    a1 = np.asarray(a.read_region((0, 0), 1, (512, 512)).convert("RGB"), float)
    r1 = np.asarray(r.read_region((0, 0), 1, (512, 512)).convert("RGB"), float)
    # JPEG's error only (3.5 at quality 92 with its chroma subsampling), the rendered level over twice that (8.2)
    error, rendered_error = np.abs(a1 - box).mean(), np.abs(r1 - box).mean()
    assert error < 4.5 and 2 * error < rendered_error
    assert list(tmp_path.glob(".phantom-level-*")) == []  # scratch levels leave nothing behind


def test_averaged_levels_of_a_size_not_a_multiple_of_the_tile_or_of_4(tmp_path):
    # Each level from the one above, edge blocks the mean of the pixels inside (4099 px: the last is 3 px wide).
    spec = PhantomSpec(4099, 4096, reduced_levels="averaged")
    rng = np.random.default_rng(0)
    level0 = rng.integers(0, 256, (4096, 4099, 3), dtype=np.uint8)
    level0 = np.asarray(ndi.uniform_filter(level0, (65, 65, 1)))  # smooth: JPEG keeps it to a unit or two

    def tile(x0, y0, w, h, ds):
        assert ds == 1, "an averaged pyramid renders level 0 only"
        part = level0[y0 : y0 + h, x0 : x0 + w]
        return np.pad(part, ((0, h - part.shape[0]), (0, w - part.shape[1]), (0, 0)))

    levels = write_pyramid(tmp_path / "p.tif", spec, tile, jpeg_quality=95, on_level0_tile=lambda x, y: None)
    assert levels == [1, 4, 16]
    want = box_average_4(level0)
    pages = tifffile.TiffFile(tmp_path / "p.tif").pages
    for level in (1, 2):
        got = pages[level].asarray()
        assert got.shape == want.shape == (-(-4096 // 4**level), -(-4099 // 4**level), 3)
        assert np.abs(got.astype(int) - want).mean() < 1.5
        want = box_average_4(want)


@pytest.mark.parametrize("tps", [0.5, 30, 70])
def test_truth_tps_is_as_asked(tmp_path, tps):
    truth = write_phantom(tmp_path / "t.svs", PhantomSpec(2048, 2048, seed=4, tps_percent=tps))
    counts = truth.summary["nuclei_counts"]
    assert counts["Tumor: Positive"] + counts["Tumor: Negative"] > 1000
    assert truth.summary["tps_percent"] == pytest.approx(tps, abs=1.0)


def test_tps_zero_has_no_positive_nuclei_or_region(tmp_path):
    truth = write_phantom(tmp_path / "z.tif", PhantomSpec(1024, 1024, seed=2, tps_percent=0))
    assert truth.summary["nuclei_counts"]["Tumor: Positive"] == 0
    assert truth.summary["mask_positive_fraction"] == 0


def test_truth_is_consistent_with_the_scene(phantom_svs):
    truth = load_truth(phantom_svs)
    scene = PhantomScene(PhantomSpec(**truth.summary["spec"]))
    xs, ys = truth.nuclei_xy[:, 0], truth.nuclei_xy[:, 1]
    tissue, tumour, positive = scene.zones(xs, ys)
    assert tissue.all(), "every nucleus lies in tissue"
    cls = truth.nuclei_class
    assert (positive == (cls == NUCLEUS_CLASSES.index("Tumor: Positive"))).all()
    assert (tumour[cls != NUCLEUS_CLASSES.index("Other")]).all()
    # Positive nuclei sit in the truth mask (nearest mask pixel, away from its edges).
    ds = truth.mask_downsample
    rows = np.clip((ys // ds).astype(int), 0, truth.positive_mask.shape[0] - 1)
    cols = np.clip((xs // ds).astype(int), 0, truth.positive_mask.shape[1] - 1)
    in_mask = truth.positive_mask[rows, cols] == 1
    assert in_mask[cls == 0].mean() > 0.97
    assert in_mask[cls == 1].mean() < 0.03


def test_positive_and_negative_nests_differ_in_morphology_not_colour_code():
    scene = PhantomScene(PhantomSpec(2048, 2048, seed=1, tps_percent=50))
    nuc = scene.nuclei(0, 0, 2048, 2048)
    pos, neg = nuc["cls"] == 0, nuc["cls"] == 1
    area = np.pi * nuc["a"] * nuc["b"]
    assert area[pos].mean() > 1.5 * area[neg].mean()
    assert (nuc["b"] / nuc["a"])[pos].mean() < 0.8 < (nuc["b"] / nuc["a"])[neg].mean()
    # Mean stain of positive and negative nest regions stays close (no colour code).
    xs = np.arange(0, 2048, 4) + 2.0
    _, tumour, positive = scene.zones(xs[None, :], xs[:, None])
    rgb = render(scene, 0, 0, 512, 512, 4).astype(float)
    diff = np.abs(rgb[positive].mean(0) - rgb[tumour & ~positive].mean(0))
    assert diff.max() < 30


def test_some_positive_nests_are_subtle_like_real_pd_l1():
    scene = PhantomScene(PhantomSpec(4096, 4096, seed=101, tps_percent=50))
    nuc = scene.nuclei(0, 0, 4096, 4096)
    pos = nuc["cls"] == 0
    assert 0.1 < (nuc["s"][pos] < 0.6).mean() < 0.7  # intermediate morphology exists, but is not the rule
    assert nuc["s"][pos].min() >= 0.35 - 1e-6 and nuc["s"][~pos].max() == 0.0  # float32 field


def test_weak_expression_fades_morphology_but_keeps_truth():
    base = PhantomScene(PhantomSpec(4096, 4096, seed=101, tps_percent=50))
    weak = PhantomScene(PhantomSpec(4096, 4096, seed=101, tps_percent=50, weak_fraction=0.3))
    nb, nw = base.nuclei(0, 0, 4096, 4096), weak.nuclei(0, 0, 4096, 4096)
    np.testing.assert_array_equal(nb["cls"], nw["cls"])  # the truth does not move
    pos = nb["cls"] == 0
    faded = nw["s"][pos] < nb["s"][pos] - 1e-6
    assert 0.15 < faded.mean() < 0.45  # about the asked fraction of positive nuclei
    assert nw["s"][pos][faded].max() <= 0.45 + 1e-6 and nw["s"][pos].min() >= 0.15 - 1e-6
    assert np.array_equal(nw["s"][pos][~faded], nb["s"][pos][~faded])
    # Outside positive nests nothing changes: the weak field has its own random stream.
    ys, xs = np.mgrid[0:4096:64, 0:4096:64] + 32.0
    # (3 px of margin: at downsample 64 a nucleus drawn near a nest reaches that far; a nest
    # smaller than a pixel can still tint a neighbour by one grey level.)
    outside = ~ndi.binary_dilation(base.zones(xs, ys)[2], iterations=3)
    assert outside.mean() > 0.3
    a, b = render(base, 0, 0, 64, 64, downsample=64), render(weak, 0, 0, 64, 64, downsample=64)
    np.testing.assert_allclose(a[outside], b[outside], atol=1)
    assert (a[outside] != b[outside]).mean() < 0.01


def test_shift_changes_appearance_but_not_truth():
    base = PhantomScene(PhantomSpec(1024, 1024, seed=9))
    shifted = PhantomScene(PhantomSpec(1024, 1024, seed=9, shift=1.0))
    assert shifted.stains.jpeg_quality < base.stains.jpeg_quality
    a = render(base, 0, 0, 256, 256).astype(float)
    b = render(shifted, 0, 0, 256, 256).astype(float)
    assert np.abs(a - b).mean() > 5
    na, nb = base.nuclei(0, 0, 1024, 1024), shifted.nuclei(0, 0, 1024, 1024)
    np.testing.assert_array_equal(na["cls"], nb["cls"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width_px": 100}, "width_px"),
        ({"tps_percent": 120}, "tps_percent"),
        ({"shift": 2}, "shift"),
        ({"weak_fraction": 1.0}, "weak_fraction"),
        ({"reduced_levels": "bilinear"}, "reduced_levels"),
    ],
)
def test_spec_validation(kwargs, match):
    args = {"width_px": 1024, "height_px": 1024, **kwargs}
    with pytest.raises(ValueError, match=match):
        PhantomSpec(**args)


def test_only_svs_or_tiff(tmp_path):
    with pytest.raises(ValueError, match=r"\.svs or \.tif"):
        write_phantom(tmp_path / "x.png", PhantomSpec(1024, 1024))


def test_a_name_with_non_ascii_letters_or_a_bar_is_written(tmp_path):
    # "Fall ü.svs" failed with "TIFF strings must be 7-bit ASCII": the name goes into the Aperio description.
    slide = tmp_path / "Schnitte mit Ümlaut" / "Fall ü|1.svs"
    write_phantom(slide, PhantomSpec(1024, 1024, seed=3))
    osr = openslide.OpenSlide(slide)
    assert float(osr.properties["aperio.MPP"]) == 0.5
    assert osr.properties["aperio.Filename"] == "Fall \\xfc_1"
    assert load_truth(slide).positive_mask.any()


def test_truth_dir_naming(tmp_path):
    assert truth_dir_for(tmp_path / "slide.svs") == tmp_path / "slide.truth"


def test_nuclei_drawn_in_chunks_give_the_same_pixels(monkeypatch):
    # A coarse level's tile holds every nucleus of a large slide; drawing them in chunks bounds the memory
    # (a 16k² phantom peaked at 1.08 GB, now 0.24 GB) and must not change a pixel.
    import inference.phantom.render as rendering

    scene = PhantomScene(PhantomSpec(4096, 4096, seed=5, tps_percent=40))
    whole = render(scene, 0, 0, 256, 256, 16)
    monkeypatch.setattr(rendering, "_PATCH_BUDGET", 49 * 100)  # 100 nuclei a chunk at this downsample
    np.testing.assert_array_equal(render(scene, 0, 0, 256, 256, 16), whole)


def test_an_interrupted_truth_write_leaves_no_part_file_and_no_truth(tmp_path, monkeypatch):
    # truth.json was written to a fixed truth.json.part, left behind by an error and shared by two writers.
    import os
    from pathlib import Path

    from inference.phantom.pyramid import write_phantom
    from inference.phantom.scene import PhantomSpec

    replace = os.replace

    def interrupted(source, target):
        if Path(source).name.startswith("truth.json."):
            raise KeyboardInterrupt
        return replace(source, target)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_phantom(tmp_path / "p.svs", PhantomSpec(1024, 1024, seed=2, tps_percent=30))
    truth = tmp_path / "p.truth"
    assert not (truth / "truth.json").exists() and not list(truth.glob("*.part"))
