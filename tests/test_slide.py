from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import inference.slides.slide as slide_mod
from inference.errors import MissingMppError, ResolutionError, SlideFormatError, SlideNotFoundError
from inference.phantom.pyramid import write_phantom
from inference.phantom.scene import PhantomSpec
from inference.slides.openslide_reader import OpenSlideReader, qupath_frame
from inference.slides.reader import ArrayReader
from inference.slides.slide import MIN_THUMBNAIL_SIDE_PX, Mpp, Slide, open_slide


def test_phantom_svs_opens_with_mpp_and_all_levels(phantom_svs):
    with open_slide(phantom_svs) as slide:
        assert slide.dimensions == (2048, 2048)
        assert slide.level_count == 2
        assert slide.level_downsamples == pytest.approx((1.0, 4.0))
        assert slide.mpp.mean == pytest.approx(0.5)
        assert slide.mpp.source == "openslide.mpp-x/y"
        assert slide.reader.properties["openslide.vendor"] == "aperio"


def test_generic_tiled_tiff_gets_mpp_from_resolution_tags(tmp_path):
    path = tmp_path / "g.tif"
    write_phantom(path, PhantomSpec(1024, 1536, seed=2, mpp=0.25))
    with open_slide(path) as slide:
        assert slide.dimensions == (1024, 1536)
        assert slide.level_count == 2
        assert slide.mpp.mean == pytest.approx(0.25, rel=1e-4)


@pytest.mark.parametrize(("downsample", "level"), [(1.0, 0), (3.9, 0), (4.0, 1), (8.0, 1), (0.5, 0)])
def test_best_level_for_downsample(phantom_svs, downsample, level):
    with open_slide(phantom_svs) as slide:
        assert slide.best_level_for_downsample(downsample) == level


def test_read_at_level_mpp_is_the_level_itself(phantom_svs):
    with open_slide(phantom_svs) as slide:
        direct = slide.read_region((256, 512), 1, (100, 80))
        at_mpp = slide.read_region_at_mpp((256, 512), (100, 80), mpp=2.0)
    assert at_mpp.shape == (80, 100, 3)
    np.testing.assert_array_equal(direct, at_mpp)


def test_read_between_levels_resamples_from_the_finer_level(phantom_svs):
    with open_slide(phantom_svs) as slide:
        full = slide.read_region((0, 0), 0, (256, 256)).astype(np.float64)
        half = slide.read_region_at_mpp((0, 0), (128, 128), mpp=1.0).astype(np.float64)
    box = full.reshape(128, 2, 128, 2, 3).mean(axis=(1, 3))
    assert half.shape == (128, 128, 3)
    assert np.abs(half - box).max() <= 1.0


def test_integer_and_fractional_steps_agree_with_an_area_resize(phantom_svs):
    # 1 µm/px from 0.5 takes the reduce-before-conversion path; 0.75 µm/px the general resize.
    with open_slide(phantom_svs) as slide:
        full = slide.read_region((512, 256), 0, (300, 300))
        for mpp, out_px in ((1.0, 150), (1.5, 100), (0.75, 200)):
            got = slide.read_region_at_mpp((512, 256), (out_px, out_px), mpp=mpp).astype(int)
            ref = np.asarray(Image.fromarray(full).resize((out_px, out_px), Image.Resampling.BOX)).astype(int)
            assert got.shape == (out_px, out_px, 3)
            assert np.abs(got - ref).max() <= 1, mpp


def test_reduced_reads_outside_the_image_are_white_glass(phantom_svs):
    with open_slide(phantom_svs) as slide:
        w, h = slide.dimensions
        rgb = slide.read_region_at_mpp((w - 100, h - 100), (100, 100), mpp=1.0)
    assert (rgb[50:, 50:] == 255).all() and (rgb[:50, :50] != 255).any()


def test_openslide_alpha_is_composited_onto_white():
    from inference.slides.openslide_reader import OpenSlideReader

    rgba = np.array([[[200, 100, 50, 255], [0, 0, 0, 0], [200, 100, 50, 128]]], np.uint8)
    rgb = OpenSlideReader._to_rgb(rgba).astype(int)
    assert rgb[0, 0].tolist() == [200, 100, 50]  # opaque: as scanned
    assert rgb[0, 1].tolist() == [255, 255, 255]  # outside: glass
    # half transparent (straight alpha): half the colour, half white
    np.testing.assert_allclose(rgb[0, 2], [227.5, 177.3, 152.2], atol=1)


def test_outside_the_image_reads_as_white_glass(phantom_svs):
    with open_slide(phantom_svs) as slide:
        rgb = slide.read_region_at_mpp((2000, 2000), (100, 100), mpp=0.5)
    assert (rgb[60:, 60:] == 255).all()


def test_real_aperio_slide(cmu_svs):
    with open_slide(cmu_svs) as slide:
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp.mean == pytest.approx(0.499, abs=1e-3)
        thumb = slide.thumbnail(mpp=4.0)
        assert thumb.shape == (round(2967 * 0.499 / 4), round(2220 * 0.499 / 4), 3)
        # Real H&E: a good part of the region is clearly stained.
        assert (thumb.astype(int).max(axis=2) - thumb.min(axis=2) > 40).mean() > 0.1


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.svs"
    with pytest.raises(SlideNotFoundError, match=r"slide not found: .*nope\.svs"):
        open_slide(missing)
    with pytest.raises(FileNotFoundError):
        open_slide(missing)


def test_a_link_to_nothing_a_link_loop_or_a_folder_says_which(tmp_path):
    # Each said "no such file; check the path", though the path was there: a link to a slide on a share that is
    # not mounted is the usual case.
    dangling = tmp_path / "moved.svs"
    dangling.symlink_to("/mnt/scanner/case 1.svs")
    loop = tmp_path / "loop.svs"
    loop.symlink_to(tmp_path / "loop2.svs")
    (tmp_path / "loop2.svs").symlink_to(loop)
    (tmp_path / "case.svs").mkdir()
    said = {
        dangling: "a symbolic link to /mnt/scanner/case 1.svs, which does not exist: mount the share or restore "
        "the slide it leads to, or relink the image in QuPath if it moved",
        loop: "a symbolic link that leads back to itself: fix or remove that link",
        tmp_path / "case.svs": "a folder, not a slide file; give the slide file in it",
    }
    for path, why in said.items():
        with pytest.raises(SlideNotFoundError) as err:
            open_slide(path)
        assert str(err.value) == f"slide not found: {path} ({why})"


def test_unreadable_format(tmp_path):
    bad = tmp_path / "corrupt.svs"
    bad.write_bytes(b"this is not a slide" * 100)
    with pytest.raises(SlideFormatError, match=r"corrupt\.svs"):
        open_slide(bad)


def test_png_without_mpp_needs_mpp_in_the_callers_words(tmp_path):
    path = tmp_path / "small.png"
    Image.fromarray(np.full((64, 80, 3), 200, np.uint8)).save(path)
    with pytest.raises(MissingMppError, match=r"= 0\.17\) as mpp$") as err:
        open_slide(path)
    message = str(err.value)
    # Named once, and the advice fits a picture from a camera, not only a slide scanner. A Python caller was told
    # to pass --mpp, an option of `pdl1 run` it has not: the library names its argument, a program its option.
    assert message.count("small.png") == 1
    assert "a plain PNG file states no microns per pixel" in message and "camera" in message
    assert "--mpp" not in message
    with pytest.raises(MissingMppError, match=r"states no microns per pixel\. Give the µm/px .*, with --mpp, or set"):
        open_slide(path, mpp_advice=lambda value: f"give {value}, with --mpp, or set it in QuPath")
    with pytest.raises(MissingMppError, match=r"small\.png: microns per pixel must be positive, got -1 \(from --mpp\)"):
        open_slide(path, mpp=-1, mpp_source="--mpp")
    with open_slide(path, mpp=0.5) as slide:
        assert slide.dimensions == (80, 64)
        assert slide.mpp == Mpp(0.5, 0.5, "the mpp given")


def test_a_png_of_more_than_8_bits_is_refused_not_clipped(tmp_path):
    # A 16-bit PNG was clipped at 255 and analysed as white (the same TIFF, and the service's uploads, were refused).
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((64, 80), 4000, np.uint16)).save(path)
    with pytest.raises(SlideFormatError) as err:
        open_slide(path, mpp=0.5)
    assert str(err.value) == (
        f"{path}: expected 8-bit RGB pixels, got 16- or 32-bit integer samples (Pillow mode I;16), which would be "
        "clipped; save the image as 8-bit RGB"
    )


def test_a_slide_without_mpp_asks_for_the_scanners_value(tmp_path):
    path = tmp_path / "nompp.tif"
    pixels = np.zeros((512, 512, 3), np.uint8)
    tifffile.imwrite(path, pixels, tile=(256, 256), photometric="rgb")  # tiled: OpenSlide opens it
    with pytest.raises(MissingMppError) as err:
        open_slide(path)
    assert str(err.value).count("nompp.tif") == 1
    assert "the slide states no microns per pixel" in str(err.value) and "scanner" in str(err.value)


def test_plain_tiff_with_resolution_tags(tmp_path):
    path = tmp_path / "plain.tif"
    pixels = np.zeros((40, 50, 3), np.uint8)
    tifffile.imwrite(path, pixels, resolution=(40000, 40000), resolutionunit="CENTIMETER")
    with open_slide(path) as slide:
        assert slide.mpp.mean == pytest.approx(0.25)
        assert slide.dimensions == (50, 40)


def test_screen_resolution_is_not_taken_for_a_scan(tmp_path):
    path = tmp_path / "screen.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(path, dpi=(72, 72))
    with pytest.raises(MissingMppError, match="plausible range"):
        open_slide(path)


def test_array_reader_rejects_non_rgb():
    with pytest.raises(SlideFormatError, match="RGB"):
        ArrayReader(np.zeros((4, 4), np.uint8))


def test_slide_over_array_reader_resamples():
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:, 4:] = 200
    slide = Slide(ArrayReader(rgb), mpp=Mpp(1.0, 1.0, "test"))
    out = slide.read_region_at_mpp((0, 0), (4, 4), mpp=2.0)
    np.testing.assert_array_equal(out[:, :2], 0)
    np.testing.assert_array_equal(out[:, 2:], 200)


def test_open_slide_accepts_str_paths(phantom_svs):
    with open_slide(str(phantom_svs)) as slide:
        assert isinstance(slide.path, Path)


def _bounds(*xywh: int) -> dict[str, str]:
    return {f"openslide.bounds-{k}": str(v) for k, v in zip(("x", "y", "width", "height"), xywh, strict=True)}


class _ScannedAreaBox:
    """An OpenSlide handle that states a scanned-area box, as MRXS files (which cannot be made here) do."""

    def __init__(self, osr, box_xywh):
        self._osr = osr
        self.properties = {**osr.properties, **_bounds(*box_xywh)}

    def __getattr__(self, name):
        return getattr(self._osr, name)


def test_qupath_frame_crops_only_when_width_and_height_both_differ():
    assert qupath_frame(_bounds(40, 30, 900, 700), (1000, 800)) == ((40, 30), (900, 700))
    # QuPath offsets its reads by the corner even when it keeps the full size
    assert qupath_frame(_bounds(40, 0, 900, 800), (1000, 800)) == ((40, 0), (1000, 800))
    unparsable = {**_bounds(40, 30, 900, 700), "openslide.bounds-x": "4.5"}
    assert qupath_frame(unparsable, (1000, 800)) == ((0, 0), (1000, 800))


def test_a_slide_with_a_scanned_area_box_is_read_in_qupaths_frame(phantom_svs, monkeypatch):
    import openslide

    box = (300, 200, 1500, 1700)
    full = OpenSlideReader(openslide.OpenSlide(phantom_svs))
    real_open = openslide.OpenSlide
    monkeypatch.setattr(openslide, "OpenSlide", lambda path: _ScannedAreaBox(real_open(path), box))
    with open_slide(phantom_svs) as slide:
        # QuPath shows this slide as 1500 x 1700 px; its (0, 0) is the box's corner
        assert slide.dimensions == (1500, 1700)
        assert slide.level_dimensions[1] == (375, 425)
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (96, 64)), full.read_region((300, 200), 0, (96, 64)))
        np.testing.assert_array_equal(
            slide.read_region((400, 40), 1, (32, 32)), full.read_region((700, 240), 1, (32, 32))
        )
        # the fast path for integer steps reads the same place
        np.testing.assert_array_equal(
            slide.read_region_at_mpp((100, 100), (48, 48), mpp=1.0),
            full.read_region_reduced((400, 300), 0, (96, 96), 2),
        )


class _CountingReader(ArrayReader):
    def __init__(self, rgb):
        super().__init__(rgb)
        self.read_px: list[int] = []

    def read_region(self, location_xy, level, size_wh):
        self.read_px.append(size_wh[0] * size_wh[1])
        return super().read_region(location_xy, level, size_wh)


def test_a_thumbnail_never_enlarges_the_image():
    reader = _CountingReader(np.zeros((1000, 1200, 3), np.uint8))
    slide = Slide(reader, mpp=Mpp(50, 50, "--mpp"))  # a wrong --mpp 50 on a 1200 px wide image
    thumb = slide.thumbnail(mpp=8.0)  # the tissue detector's resolution: 6.25 times finer
    assert thumb.shape == (1000, 1200, 3)
    assert max(reader.read_px) == 1000 * 1200
    assert slide.thumbnail(mpp=100.0).shape == (500, 600, 3)  # shrinking is as before


def test_reading_a_whole_image_for_a_model_is_refused_beyond_twice_its_pixels():
    slide = Slide(ArrayReader(np.zeros((64, 64, 3), np.uint8)), mpp=Mpp(2.0, 2.0, "test"))
    assert slide.whole_at_mpp(1.0, reader="the nuclei model").shape == (128, 128, 3)  # 2x: allowed
    with pytest.raises(ResolutionError, match=r"the nuclei model reads 0\.5 µm/px: it would enlarge the image 4 times"):
        slide.whole_at_mpp(0.5, reader="the nuclei model")


def test_the_last_thumbnail_is_read_once_and_kept_read_only():
    class Counting(ArrayReader):
        reads = 0

        def read_region(self, location_xy, level, size_wh):
            Counting.reads += 1
            return super().read_region(location_xy, level, size_wh)

    slide = Slide(Counting(np.full((1024, 1024, 3), 200, np.uint8)), mpp=Mpp(1.0, 1.0, "test"))
    first = slide.thumbnail(mpp=8.0)
    assert slide.thumbnail(mpp=8.0) is first and Counting.reads == 1  # the stain, then the tissue: one read
    with pytest.raises(ValueError, match="read-only"):
        first[0, 0] = 0
    assert slide.thumbnail(mpp=4.0).shape == (256, 256, 3) and Counting.reads == 2


def test_a_small_image_s_thumbnail_keeps_enough_pixels_to_judge_it_by():
    # A 128 µm tile was 16 px at 8 µm/px: too few to tell its stain by or to find pale tissue in.
    tile = Slide(ArrayReader(np.full((512, 512, 3), 200, np.uint8)), mpp=Mpp(0.25, 0.25, "test"))
    assert tile.thumbnail(mpp=8.0).shape == (MIN_THUMBNAIL_SIDE_PX, MIN_THUMBNAIL_SIDE_PX, 3)
    tiny = Slide(ArrayReader(np.full((40, 50, 3), 200, np.uint8)), mpp=Mpp(0.5, 0.5, "test"))
    assert tiny.thumbnail(mpp=8.0).shape == (40, 50, 3)  # never enlarged


def test_a_named_pipe_is_said_to_be_one_not_missing(tmp_path):
    # "no such file; check the path" for a named pipe that is there (pdl1 run's row of a failed image).
    import os

    pipe = tmp_path / "pipe.svs"
    os.mkfifo(pipe)
    with pytest.raises(SlideNotFoundError) as err:
        open_slide(pipe)
    assert str(err.value) == (
        f"slide not found: {pipe} (not a regular file (a named pipe, socket or device); give the slide file itself)"
    )


def _tissue_like(height: int = 64, width: int = 96) -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(60, 230, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("kind", ["cmyk", "palette", "planar", "rgb"])
def test_a_plain_tiff_is_read_as_a_viewer_shows_it_whatever_its_colour_space_or_layout(tmp_path, kind):
    # helper-131: tifffile's stored samples were taken as RGB: a CMYK TIFF's C, M, Y (K dropped), a palette TIFF's
    # indices (refused as grey, and analysed so with --stain he: TPS 10.7 for 93), planar RGB refused as (3, H, W).
    rgb = _tissue_like()
    path = tmp_path / f"{kind}.tif"
    if kind == "cmyk":
        Image.fromarray(rgb).convert("CMYK").save(path, dpi=(50800, 50800))
        expected = np.asarray(Image.fromarray(rgb).convert("CMYK").convert("RGB"))
    elif kind == "palette":
        image = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE)
        image.save(path, dpi=(50800, 50800))
        expected = np.asarray(image.convert("RGB"))
    else:
        stored = np.ascontiguousarray(rgb.transpose(2, 0, 1)) if kind == "planar" else rgb
        tifffile.imwrite(
            path,
            stored,
            photometric="rgb",
            planarconfig="separate" if kind == "planar" else "contig",
            resolution=(20000, 20000),
            resolutionunit="CENTIMETER",
        )
        expected = rgb
    with open_slide(path) as slide:
        assert slide.mpp.mean == pytest.approx(0.5)
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (96, 64)), expected)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_transparent_pixels_of_a_plain_image_are_white_glass_not_the_black_under_them(tmp_path, suffix):
    # helper-131: half a tile transparent over black was analysed as dark tissue (positive area 48 % for 93 %).
    rgba = np.dstack([_tissue_like(), np.full((64, 96), 255, np.uint8)])
    rgba[:, :48] = 0
    path = tmp_path / f"clear{suffix}"
    if suffix == ".png":
        Image.fromarray(rgba).save(path, dpi=(50800, 50800))
    else:
        tifffile.imwrite(
            path, rgba, photometric="rgb", extrasamples=["unassalpha"], resolution=(20000, 20000), resolutionunit=3
        )
    with open_slide(path) as slide:
        pixels = slide.read_region((0, 0), 0, (96, 64))
    assert (pixels[:, :48] == 255).all()
    np.testing.assert_array_equal(pixels[:, 48:], rgba[:, 48:, :3])


def test_a_plain_tiff_of_several_full_size_images_is_refused_not_read_at_its_first(tmp_path):
    # helper-131: page 1 of a stack was analysed without a word (an upload of the same file is refused).
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.stack([_tissue_like(), _tissue_like()[::-1]]), photometric="rgb")
    with pytest.raises(SlideFormatError, match=r"2 images at full resolution .* only the first would be analysed"):
        open_slide(path, mpp=0.5)


def test_a_plain_tiff_of_more_pages_than_an_image_has_is_refused_without_walking_them_all(tmp_path, monkeypatch):
    # Every page was parsed to count the full-size ones: a 5 MB file of 20 000 tiny pages under --allow-root took
    # 6 s of the service's request thread at each submission, and the pages a file may hold grow with its size.
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as writer:
        for _ in range(slide_mod.MAX_PLAIN_TIFF_PAGES + 5):
            writer.write(np.zeros((2, 2, 3), np.uint8), photometric="rgb")
    parsed = []
    page_init = tifffile.TiffPage.__init__

    def counted(self, *args, **kwargs):
        parsed.append(1)
        page_init(self, *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffPage, "__init__", counted)
    with pytest.raises(SlideFormatError) as refused:
        open_slide(path, mpp=0.5)
    assert str(refused.value) == (
        f"{path}: more than {slide_mod.MAX_PLAIN_TIFF_PAGES} pages, more than an image and its reduced-resolution "
        "levels hold (a stack, or several scans in one file); save each image as a file of its own"
    )
    assert len(parsed) <= slide_mod.MAX_PLAIN_TIFF_PAGES + 1


def test_an_ome_tiff_states_its_pixel_size_in_its_ome_xml(tmp_path):
    # helper-131: QuPath's OME-TIFF export states the pixel size only there, and the run said the file stated none.
    path = tmp_path / "x.ome.tif"
    tifffile.imwrite(
        path,
        _tissue_like(),
        photometric="rgb",
        tile=(32, 32),
        metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25, "PhysicalSizeXUnit": "µm"},
    )
    with open_slide(path) as slide:
        assert (slide.mpp.x, slide.mpp.y, slide.mpp.source) == (0.25, 0.25, "OME-XML PhysicalSizeX/Y")


def test_a_16_bit_rgb_tiff_is_refused_not_cut_to_its_high_byte(tmp_path):
    # helper-131: Pillow opens 16-bit RGB as "RGB" by its high byte: 12-bit camera data read nearly black.
    from inference.slides.slide import unconvertible_samples

    path = tmp_path / "rgb12.tif"
    tifffile.imwrite(path, _tissue_like().astype(np.uint16) * 16, photometric="rgb")
    with Image.open(path) as im:
        assert unconvertible_samples(im).startswith("16-bit samples, of which only the high byte would be kept")
    with pytest.raises(SlideFormatError, match=r"got uint16; save the image as 8-bit RGB"):
        open_slide(path, mpp=0.5)


def test_a_48_bit_png_is_refused_and_ome_xml_goes_over_72_dpi_tags(tmp_path):
    # helper-132: a 48-bit PNG opened as "RGB" by its high byte too; an OME-TIFF with the 72-dpi default tags was
    # refused as 352.778 µm/px though its OME-XML states 0.5.
    import zlib

    from inference.slides.slide import unconvertible_samples

    png = tmp_path / "rgb48.png"

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    rows = b"".join(b"\0" + (np.full((4, 3), 3000, ">u2")).tobytes() for _ in range(4))
    header = (4).to_bytes(4, "big") * 2 + bytes([16, 2, 0, 0, 0])  # 4 x 4 px, 16-bit RGB
    png.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )
    with Image.open(png) as im:
        assert im.mode == "RGB" and unconvertible_samples(im).startswith("16-bit samples")
    ome = tmp_path / "x.ome.tif"
    tifffile.imwrite(
        ome, _tissue_like(), photometric="rgb", resolution=(72, 72), resolutionunit="INCH",
        metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
    )  # fmt: skip
    with open_slide(ome) as slide:
        assert (slide.mpp.mean, slide.mpp.source) == (0.5, "OME-XML PhysicalSizeX/Y")


def test_non_square_pixels_are_warned_of_once_per_image(tmp_path, caplog):
    # helper-131: 0.5 x 2 µm pixels were analysed at their mean, 1.25 µm/px, without a word.
    path = tmp_path / "stretched.tif"
    tifffile.imwrite(path, _tissue_like(), photometric="rgb", resolution=(20000, 5000), resolutionunit="CENTIMETER")
    with caplog.at_level("WARNING", logger="inference.slides.slide"):
        for _ in range(2):
            with open_slide(path) as slide:
                assert (slide.mpp.x, slide.mpp.y) == (0.5, 2.0)
    said = [r.getMessage() for r in caplog.records if "not square" in r.getMessage()]
    assert said == [
        f"{path}: its pixels are not square (0.5 x 2 µm, from TIFF resolution tags); it is analysed at their mean, "
        "1.25 µm/px, so lengths along x come out x2.5 of the truth, along y x0.625, and areas x1.56: resample it to "
        "square pixels"
    ]


def test_header_mpp_is_the_pixel_size_open_slide_opens_at_read_without_a_pixel(phantom_svs, tmp_path, monkeypatch):
    # eval, calibrate and domain-stats found a slide without a usable pixel size only when its turn came, after
    # minutes on the slides before it; header_mpp lets them check every slide first, from its header alone.
    import inference.slides.slide as slide_module
    from inference.slides.slide import header_mpp

    png, tif, jpeg = tmp_path / "dpi.png", tmp_path / "tags.tif", tmp_path / "none.jpg"
    screen = tmp_path / "screen.png"
    rgb = np.full((64, 80, 3), 200, np.uint8)
    Image.fromarray(rgb).save(png, dpi=(50_800, 50_800))  # 0.5 µm/px
    tifffile.imwrite(tif, rgb, resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    Image.fromarray(rgb).save(jpeg)
    Image.fromarray(rgb).save(screen, dpi=(72, 72))  # 352.8 µm/px: a screen's resolution, not a scan's
    cases = [(phantom_svs, {}), (png, {}), (tif, {}), (jpeg, {"mpp": 0.7, "mpp_source": "--mpp"})]
    opened = []
    for path, given in cases:
        with open_slide(path, **given) as slide:
            opened.append(slide.mpp)
    assert [m.source for m in opened] == ["openslide.mpp-x/y", "image dpi", "TIFF resolution tags", "--mpp"]

    def advice(value: str) -> str:
        return f"give {value} somehow"

    refused = {}  # what open_slide refuses for the pixel size (none; 352.8 µm/px), in the caller's words
    for path in (jpeg, screen):
        with pytest.raises(MissingMppError) as err:
            open_slide(path, mpp_advice=advice)
        refused[path] = str(err.value)
    monkeypatch.setattr(slide_module, "_tiff_pixels", lambda *a: pytest.fail("a TIFF's pixels were read"))
    monkeypatch.setattr(slide_module, "_pillow_rgb", lambda *a: pytest.fail("an image's pixels were decoded"))
    assert [header_mpp(path, **given) for path, given in cases] == opened
    for path, message in refused.items():
        with pytest.raises(MissingMppError) as err:
            header_mpp(path, mpp_advice=advice)
        assert str(err.value) == message and message.endswith(" somehow") and "as mpp" not in message
    with pytest.raises(MissingMppError, match=r"none\.jpg: microns per pixel must be positive, got 0 \(from --mpp\)"):
        header_mpp(jpeg, mpp=0, mpp_source="--mpp")
