"""Direct tile decoding for SVS / tiled TIFF must give OpenSlide's pixels."""

import shutil
from concurrent.futures import ThreadPoolExecutor
from threading import Event

import numpy as np
import openslide
import pytest
import tifffile

from inference.errors import SlideFormatError
from inference.slides.openslide_reader import OpenSlideReader
from inference.slides.slide import open_slide
from inference.slides.tiff_tiles import TiffTileReader


def _regions(level_dimensions, level_downsamples, *, n: int, seed: int):
    """Random regions on whole level pixels, some hanging over the image's edges."""
    rng = np.random.default_rng(seed)
    for level, (width, height) in enumerate(level_dimensions):
        ds = level_downsamples[level]
        for _ in range(n):
            w, h = (int(v) for v in rng.integers(1, 400, 2))
            x, y = int(rng.integers(-w // 2, width)), int(rng.integers(-h // 2, height))
            yield (round(x * ds), round(y * ds)), level, (w, h)


def _assert_same_as_openslide(path, *, n: int = 12):
    with open_slide(path) as slide:
        reader = slide.reader
        assert isinstance(reader, TiffTileReader)
        assert reader.direct_levels == tuple(range(slide.level_count))
        plain = OpenSlideReader(openslide.OpenSlide(path))
        try:
            for location, level, size in _regions(slide.level_dimensions, slide.level_downsamples, n=n, seed=0):
                ours = reader.read_region(location, level, size)
                assert ours.shape == (size[1], size[0], 3) and ours.dtype == np.uint8
                np.testing.assert_array_equal(ours, plain.read_region(location, level, size), err_msg=f"{location}")
        finally:
            plain.close()


def test_phantom_svs_decodes_to_openslides_pixels_at_every_level(phantom_svs):
    # The phantom's tiles are YCbCr JPEG, 256 px, three levels.
    _assert_same_as_openslide(phantom_svs)


def test_real_aperio_slide_decodes_to_openslides_pixels(cmu_svs):
    # A scanner's file: RGB JPEG with shared JPEG tables, 240 px tiles, edge tiles padded.
    _assert_same_as_openslide(cmu_svs)


def test_reduced_reads_match_openslide_inside_the_image(phantom_svs):
    with open_slide(phantom_svs) as slide:
        plain = OpenSlideReader(openslide.OpenSlide(phantom_svs))
        try:
            for location in ((0, 0), (300, 512), (1000, 1466)):
                ours = slide.reader.read_region_reduced(location, 0, (512, 512), 2)
                np.testing.assert_array_equal(ours, plain.read_region_reduced(location, 0, (512, 512), 2))
        finally:
            plain.close()


def test_threads_read_the_same_pixels(phantom_svs):
    with open_slide(phantom_svs) as slide:
        regions = list(_regions(slide.level_dimensions, slide.level_downsamples, n=20, seed=1))
        alone = [slide.read_region(*r) for r in regions]
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda r: slide.read_region(*r), regions))
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_level_it_cannot_decode_is_read_by_openslide(phantom_svs, monkeypatch):
    with open_slide(phantom_svs) as slide:
        reader = slide.reader
        wanted = reader.read_region((512, 512), 1, (200, 100))
        monkeypatch.delitem(reader._levels, 1)
        assert 1 not in reader.direct_levels and 0 in reader.direct_levels
        np.testing.assert_array_equal(reader.read_region((512, 512), 1, (200, 100)), wanted)


def test_openslide_only_reads_through_openslide_and_the_library_reads_no_environment(phantom_svs, monkeypatch):
    # inference read PDL1_OPENSLIDE_ONLY itself (STYLE: nothing below the edges reads os.environ); now open_slide is
    # told, and the variable alone changes nothing here.
    with open_slide(phantom_svs, openslide_only=True) as slide:
        assert type(slide.reader) is OpenSlideReader
    monkeypatch.setenv("PDL1_OPENSLIDE_ONLY", "1")
    with open_slide(phantom_svs) as slide:
        assert type(slide.reader) is TiffTileReader


def test_pdl1_reads_openslide_only_from_the_environment_and_passes_it_to_every_opening(phantom_svs, monkeypatch):
    # pdl1 run / serve / eval / demo (pipeline_config), the pipeline's own opening of an image, the service's and
    # the case comparison after pdl1 run (RunConfig.compare_pairs) all open slides with the variable's value.
    import types
    from pathlib import Path

    import bridge.pairs
    import bridge.service
    import inference.pipeline
    from bridge.cli.common import pipeline_config

    monkeypatch.setenv("PDL1_OPENSLIDE_ONLY", "1")
    config = pipeline_config("cpu", None, None, None)
    assert config.openslide_only is True
    monkeypatch.setenv("PDL1_OPENSLIDE_ONLY", "0")
    assert pipeline_config("cpu", None, None, None).openslide_only is False

    seen = []

    class OpenedError(Exception):
        pass

    def opening(path, **kwargs):
        seen.append(kwargs["openslide_only"])
        raise OpenedError

    monkeypatch.setattr(inference.pipeline, "open_slide", opening)
    with pytest.raises(OpenedError):
        inference.pipeline.analyse_slide(phantom_svs, models=None, config=config)
    monkeypatch.setattr(bridge.pairs, "open_slide", opening)
    case = bridge.pairs.CaseImage("k", "n", phantom_svs, "c", "H&E", Path("s"), Path("g"), 0.5)
    with pytest.raises(OpenedError):
        bridge.pairs.compare_case(case, case, openslide_only=True)
    assert seen == [True, True]

    # The service: its worker opens the job's image with its PipelineConfig's value, through open_allowed.
    root = phantom_svs.parent
    with bridge.service.open_allowed(phantom_svs, (root,), mpp=None, openslide_only=True) as slide:
        assert type(slide.reader) is OpenSlideReader
    asked = []
    monkeypatch.setattr(bridge.service.jobs, "open_allowed", lambda *args, **kwargs: asked.append(kwargs) or 1 / 0)
    worker = types.SimpleNamespace(pipeline=config, allow_roots=(root,), models=types.SimpleNamespace(nuclei=None))
    job = types.SimpleNamespace(
        mpp=None, outputs=(), upload=None, image=str(phantom_svs), image_as_sent="p1.svs", roi=None, cancel=Event()
    )
    with pytest.raises(ZeroDivisionError):
        bridge.service.Worker._run(worker, job)
    assert asked[0]["openslide_only"] is True


def test_a_damaged_tile_names_the_file_and_tile(phantom_svs, tmp_path):
    damaged = tmp_path / "damaged.svs"
    shutil.copy(phantom_svs, damaged)
    with tifffile.TiffFile(damaged) as tif:
        offset = tif.pages[0].dataoffsets[0]
    with damaged.open("r+b") as fh:  # overwrite the first tile's JPEG header
        fh.seek(offset)
        fh.write(b"\0" * 64)
    with open_slide(damaged) as slide:
        with pytest.raises(SlideFormatError, match=r"damaged\.svs: tile 0 of level 0 cannot be decoded"):
            slide.read_region((0, 0), 0, (64, 64))
        slide.read_region((1024, 1024), 0, (64, 64))  # the rest of the slide still reads


def _assert_standalone_tiles_decode_alone(path) -> int:
    # A GPU decoder gets each tile as a file of its own: no JPEGTables, no colour space hint.
    # Two decoders that are told nothing (imagecodecs and Pillow) must give the tiles' pixels.
    import io

    import imagecodecs
    from PIL import Image

    with open_slide(path) as slide:
        reader = slide.reader
        n = 0
        for index, stream in reader.jpeg_tiles(0):
            expected = reader._tile(0, index)
            np.testing.assert_array_equal(imagecodecs.jpeg8_decode(stream), expected)
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(stream)).convert("RGB")), expected)
            n += 1
    return n


def test_standalone_jpeg_tiles_of_a_phantom_decode_with_no_side_information(phantom_svs):
    with open_slide(phantom_svs) as slide:
        level = slide.reader.tiled_level(0)
        expected = int(np.count_nonzero(level.byte_counts))
    assert _assert_standalone_tiles_decode_alone(phantom_svs) == expected


def test_standalone_jpeg_tiles_of_a_real_aperio_slide_decode_with_no_side_information(cmu_svs):
    # Aperio's tiles are abbreviated (tables in the JPEGTables tag) and hold RGB samples.
    assert _assert_standalone_tiles_decode_alone(cmu_svs) > 0


def test_standalone_jpeg_needs_the_adobe_marker_for_rgb_tiles(cmu_svs):
    import imagecodecs

    from inference.slides.tiff_tiles import standalone_jpeg

    with open_slide(cmu_svs) as slide:
        reader = slide.reader
        level = reader.tiled_level(0)
        index = int(np.argmax(level.byte_counts))
        data = reader.tile_bytes(0, index)
        expected = reader._tile(0, index)
    as_ycbcr = imagecodecs.jpeg8_decode(standalone_jpeg(data, level.jpegtables, rgb=False))
    assert np.abs(as_ycbcr.astype(int) - expected).max() > 50  # read as YCbCr: wrong colours
    with pytest.raises(imagecodecs.Jpeg8Error):
        imagecodecs.jpeg8_decode(data)  # and without the tables it does not decode at all


def test_standalone_jpeg_refuses_what_is_not_a_jpeg_tile():
    from inference.slides.tiff_tiles import standalone_jpeg

    with pytest.raises(ValueError, match="starts with SOI"):
        standalone_jpeg(b"\x89PNG", None, rgb=False)
    with pytest.raises(ValueError, match="JPEGTables"):
        standalone_jpeg(b"\xff\xd8\xff\xd9", b"\x00\x01", rgb=True)


def test_jpeg_tiles_refuses_a_level_that_is_not_jpeg(tmp_path):
    path = tmp_path / "lzw.tif"
    rgb = np.random.default_rng(0).integers(0, 255, (512, 512, 3), np.uint8)
    tifffile.imwrite(path, rgb, tile=(256, 256), compression="lzw", photometric="rgb")
    with open_slide(path, mpp=0.5) as slide:
        assert isinstance(slide.reader, TiffTileReader)
        with pytest.raises(ValueError, match="not a JPEG level"):
            next(slide.reader.jpeg_tiles(0))
