"""A slide damaged on its way (a copy cut short, an empty file) is named as damaged, with the fix."""

import pytest

from inference import SlideFormatError, open_slide
from inference.phantom.pyramid import write_phantom
from inference.phantom.scene import PhantomSpec

FIX = r"the file looks damaged or truncated, as an interrupted copy leaves it: .*; copy it again"


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    path = tmp_path_factory.mktemp("whole") / "w.svs"
    write_phantom(path, PhantomSpec(1024, 1024, seed=3, tps_percent=20))
    return path


@pytest.mark.parametrize("suffix", [".svs", ".tif"])
def test_a_slide_cut_short_by_an_interrupted_copy_is_named_as_such(tmp_path, whole, suffix):
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) * 6 // 10])  # as `head -c` of 60 % leaves it
    with pytest.raises(SlideFormatError, match=FIX + r"(.|\n)*") as err:
        open_slide(cut)
    assert f"but the file has {len(data) * 6 // 10:,} bytes" in str(err.value)


@pytest.mark.filterwarnings("ignore:Truncated File Read")  # Pillow's, on the cut-off TIFF; pdl1's CLI hides it too
@pytest.mark.parametrize(
    ("name", "content", "sign"),
    [
        ("empty.svs", b"", "it is empty"),
        ("head.svs", None, "TIFF structure does not read"),
        ("text.svs", b"not a slide", "does not start as a TIFF, as a .svs file does"),
    ],
)
def test_empty_or_broken_whole_slide_files_are_named_as_damaged(tmp_path, whole, name, content, sign):
    path = tmp_path / name
    path.write_bytes(whole.read_bytes()[:100] if content is None else content)
    with pytest.raises(SlideFormatError, match=FIX) as err:
        open_slide(path)
    assert sign in str(err.value) and "neither OpenSlide nor Pillow can read it" in str(err.value)


def test_a_file_of_another_kind_is_not_called_damaged(tmp_path):
    path = tmp_path / "notes.png"
    path.write_bytes(b"not a png")
    with pytest.raises(SlideFormatError, match=r"expected a whole-slide format") as err:
        open_slide(path)
    assert "damaged" not in str(err.value)


def test_pdl1_run_on_a_cut_off_slide_says_only_its_own_words(tmp_path, whole):
    # Pillow's "UserWarning: Truncated File Read", with a line of its source in site-packages, came first.
    import subprocess
    import sys

    path = tmp_path / "head.svs"
    path.write_bytes(whole.read_bytes()[:100])
    code = "from bridge.cli.app import app; app()"
    out = subprocess.run(
        [sys.executable, "-c", code, "run", str(path), "--out", str(tmp_path / "out"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "head.svs: neither OpenSlide nor Pillow can read it" in out.stderr
    assert "the file looks damaged or truncated" in out.stderr
    assert "Truncated File Read" not in out.stderr and "UserWarning" not in out.stderr, out.stderr


def test_a_tile_whose_jpeg_data_was_overwritten_is_damaged_not_decoded_in_part(whole, tmp_path):
    # helper-131: a tile's second half zeroed (a failed in-place copy; the file size unchanged) decoded without an
    # error through the direct decoder, the rest of the tile grey, and the slide was analysed (TPS 33.2 for 29.2).
    # OpenSlide refuses it ("Premature end of JPEG file").
    import tifffile

    damaged = tmp_path / "bad.svs"
    data = bytearray(whole.read_bytes())
    with tifffile.TiffFile(whole) as tif:
        offset, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    data[offset + count // 2 : offset + count] = bytes(count - count // 2)
    damaged.write_bytes(bytes(data))
    with open_slide(damaged) as slide, pytest.raises(SlideFormatError) as err:
        slide.read_region((0, 0), 0, (64, 64))
    assert "tile 0 of level 0 cannot be decoded (ValueError: its JPEG data does not end as a JPEG stream does" in str(
        err.value
    )
    assert str(err.value).endswith("the file is damaged: copy it again from the scanner or archive")


def test_the_gpu_decoders_standalone_tiles_are_checked_as_the_cpu_decoder_checks_them(whole):
    # helper-132: the end-of-image check covered libjpeg's path only; the GPU's batched decoder takes each tile as a
    # standalone JPEG and decodes a cut-short one too. Bytes after the marker are allowed, as libjpeg allows them.
    import tifffile

    from inference.slides.tiff_tiles import TiledLevel

    with tifffile.TiffFile(whole) as tif:
        page = tif.pages[0]
        level = TiledLevel(page)
        tif.filehandle.seek(page.dataoffsets[0])
        tile = tif.filehandle.read(page.databytecounts[0])
    assert level.standalone_jpeg(tile + b"\0\0padding")[-9:] == b"\0\0padding"
    with pytest.raises(ValueError, match="does not end as a JPEG stream does"):
        level.standalone_jpeg(tile[: len(tile) // 2] + bytes(len(tile) - len(tile) // 2))


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_a_png_or_jpeg_cut_short_is_named_as_damaged(tmp_path, suffix):
    # helper-134: "image file is truncated; expected a whole-slide format (SVS, ...)", as if the format were wrong.
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (300, 300, 3)).astype(np.uint8)
    path = tmp_path / f"cut{suffix}"
    Image.fromarray(pixels).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SlideFormatError, match=FIX) as err, open_slide(path, mpp=0.5) as slide:
        slide.thumbnail(mpp=2.0)
    assert "its data ends before the image does" in str(err.value) and "expected a whole-slide" not in str(err.value)
