"""Reading with the JPEG tiles decoded on the device (SegmentConfig.read_on_device).

The block assembly is checked on the CPU with a decoder that takes each tile as a file of
its own, as the GPU's does; nvImageCodec itself is checked where CUDA and it are present.
"""

from functools import partial

import imagecodecs
import numpy as np
import pytest
import torch

from inference.analysis.segment import SegmentConfig, SegmentProfile, segment_slide
from inference.analysis.tiling import block_region, grid_block_reader, read_grid_tiles, tile_blocks
from inference.errors import SlideFormatError
from inference.slides.gpu_decode import DeviceBlockReader, device_decoded_level
from inference.slides.slide import open_slide
from tests.helpers import assert_device_blocks_match_cpu, demo_seg_ensemble, random_slide, whole_image_grid


def _cpu_decode(files, rgb):
    # Each tile alone, told nothing: the Adobe marker of standalone_jpeg carries ``rgb``.
    return [torch.from_numpy(imagecodecs.jpeg8_decode(f)) for f in files]


def _regions(grid, box_factor=1):
    return partial(block_region, grid, box_factor=box_factor)


def _assert_same_blocks(slide, *, mpp, box_factor, block_tiles=3, tile_px=256):
    return assert_device_blocks_match_cpu(
        slide,
        mpp=mpp,
        box_factor=box_factor,
        device=torch.device("cpu"),
        decode=_cpu_decode,
        tile_px=tile_px,
        block_tiles=block_tiles,
    )


def test_blocks_assembled_from_standalone_tiles_equal_the_cpu_readers(phantom_svs):
    with open_slide(phantom_svs) as slide:
        assert _assert_same_blocks(slide, mpp=0.5, box_factor=1) > 4  # level 0 as it is
        _assert_same_blocks(slide, mpp=1.0, box_factor=2)  # level 0 for the device to average
        _assert_same_blocks(slide, mpp=2.0, box_factor=1, block_tiles=2)  # level 1 as it is


def test_blocks_of_a_real_aperio_slide_equal_the_cpu_readers(cmu_svs):
    # RGB samples in abbreviated JPEG, 240 px tiles padded at the edges: none of it lines up with ours.
    with open_slide(cmu_svs) as slide:
        mpp = slide.mpp.mean
        _assert_same_blocks(slide, mpp=mpp, box_factor=1, tile_px=200)
        _assert_same_blocks(slide, mpp=2 * mpp, box_factor=2, tile_px=200)


def test_a_tile_never_written_reads_as_glass(phantom_svs, monkeypatch):
    with open_slide(phantom_svs) as slide:
        reader = slide.reader
        stored = reader.tile_bytes
        monkeypatch.setattr(reader, "tile_bytes", lambda level, index: None if index == 9 else stored(level, index))
        grid = whole_image_grid(slide, mpp=0.5, tile_px=512)
        device = DeviceBlockReader(
            slide, _regions(grid), mpp=0.5, box_factor=1, device=torch.device("cpu"), decode=_cpu_decode
        )
        first_block = tile_blocks(grid, block_tiles=3)[0]
        first = device(first_block)[0].numpy()
        np.testing.assert_array_equal(first, grid_block_reader(slide, grid, mpp=0.5)(first_block)[0])
    # Tile 9 of level 0 (256 px tiles, 8 across) is the lower right quarter of our first tile.
    assert (first[256:, 256:] == 255).all()
    assert (first[:256, :256] != 255).any() and (first[256:, :256] != 255).any()


def test_a_tile_the_decoder_gives_up_on_names_the_file_and_tile(phantom_svs):
    with open_slide(phantom_svs) as slide:
        grid = whole_image_grid(slide, mpp=0.5)
        failing = DeviceBlockReader(
            slide,
            _regions(grid),
            mpp=0.5,
            box_factor=1,
            device=torch.device("cpu"),
            decode=lambda files, rgb: [None, *_cpu_decode(files[1:], rgb)],
        )
        with pytest.raises(SlideFormatError, match=r"p1\.svs: tile 0 of level 0 decoded on the GPU to nothing"):
            failing(tile_blocks(grid, block_tiles=3)[0])


def test_read_grid_tiles_hands_over_the_device_readers_tiles_in_order(phantom_svs):
    with open_slide(phantom_svs) as slide:
        grid = whole_image_grid(slide, mpp=1.0)
        device = DeviceBlockReader(
            slide, _regions(grid, 2), mpp=1.0, box_factor=2, device=torch.device("cpu"), decode=_cpu_decode
        )
        ours = list(read_grid_tiles(slide, grid, mpp=1.0, workers=2, block_tiles=2, box_factor=2, block_reader=device))
        theirs = list(read_grid_tiles(slide, grid, mpp=1.0, workers=2, block_tiles=2, box_factor=2))
    assert [i for i, _ in ours] == [i for i, _ in theirs] and len(ours) == len(grid)
    for (_, a), (_, b) in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a.numpy(), b)


def test_which_reads_the_device_can_decode(phantom_svs, tmp_path):
    import tifffile

    with open_slide(phantom_svs) as slide:
        assert device_decoded_level(slide, 0.5, box_factor=1) == 0
        assert device_decoded_level(slide, 1.0, box_factor=2) == 0
        assert device_decoded_level(slide, 2.0, box_factor=1) == 1
        assert device_decoded_level(slide, 1.0, box_factor=1) is None  # the box is the readers'
        assert device_decoded_level(slide, 0.7, box_factor=1) is None  # resampled
        with pytest.raises(ValueError, match="no JPEG level read as it is or by that box"):
            DeviceBlockReader(
                slide, _regions(whole_image_grid(slide, mpp=0.7)), mpp=0.7, box_factor=1, device=torch.device("cpu")
            )
    assert device_decoded_level(random_slide(300, 200, seed=1), 1.0, box_factor=1) is None  # not a TIFF
    lzw = tmp_path / "lzw.tif"
    tifffile.imwrite(lzw, np.zeros((512, 512, 3), np.uint8), tile=(256, 256), compression="lzw", photometric="rgb")
    with open_slide(lzw, mpp=0.5) as slide:
        assert device_decoded_level(slide, 0.5, box_factor=1) is None  # not JPEG


def test_asking_for_device_decoding_where_it_cannot_be_done_says_why(phantom_svs):
    with open_slide(phantom_svs) as slide:
        with pytest.raises(ValueError, match="read_on_device was asked for, but the model runs on cpu"):
            segment_slide(slide, demo_seg_ensemble(), config=SegmentConfig(read_on_device=True))
        profile = SegmentProfile()
        segment_slide(slide, demo_seg_ensemble(), config=SegmentConfig(), profile=profile)
    assert not profile.read_on_device  # automatic: the CPU decodes on the CPU


def test_automatic_device_decoding_falls_back_to_the_cpu_when_nvimgcodec_does_not_start(phantom_svs, monkeypatch):
    # nvImageCodec built for another CUDA than torch's fails when its first decoder starts.
    from inference.analysis import segment

    def broken(*args, **kwargs):
        raise RuntimeError("Could not create decoder")

    monkeypatch.setattr(segment, "nvimgcodec_available", lambda: True)
    monkeypatch.setattr(segment, "DeviceBlockReader", broken)
    cuda = torch.device("cuda")  # never used: the reader fails before touching it
    with open_slide(phantom_svs) as slide:
        grid = whole_image_grid(slide, mpp=0.5)
        reads = segment.plan_reads(slide, grid, mpp=0.5, device=cuda, config=SegmentConfig(reduce_on_device=False))
        assert not reads.on_device  # the JPEG tiles are decoded on the CPU, as without nvImageCodec
        with pytest.raises(ValueError, match=r"nvImageCodec did not start \(RuntimeError: Could not create decoder"):
            segment.plan_reads(slide, grid, mpp=0.5, device=cuda, config=SegmentConfig(read_on_device=True))


def test_the_nvimgcodec_backend_is_read_from_the_environment_by_pdl1_and_passed_down(phantom_svs, monkeypatch):
    # inference read PDL1_NVIMGCODEC_BACKEND itself (STYLE: nothing below the edges reads os.environ); pdl1 reads it
    # into SegmentConfig.decode_backend, which reaches the decoder, and the library ignores the variable.
    import sys
    import types

    from bridge.cli.common import pipeline_config
    from inference.analysis import segment
    from inference.slides.gpu_decode import NvImageCodecDecoder

    monkeypatch.setenv("PDL1_NVIMGCODEC_BACKEND", "HW_GPU_ONLY")
    assert pipeline_config("cpu", None, None, None).segment.decode_backend == "HW_GPU_ONLY"
    monkeypatch.setenv("PDL1_NVIMGCODEC_BACKEND", "")
    assert pipeline_config("cpu", None, None, None).segment.decode_backend is None

    seen = []

    def reader(*args, backend=None, **kwargs):
        seen.append(backend)
        raise RuntimeError("no GPU here")  # automatic decoding falls back to the CPU

    monkeypatch.setattr(segment, "nvimgcodec_available", lambda: True)
    monkeypatch.setattr(segment, "DeviceBlockReader", reader)
    with open_slide(phantom_svs) as slide:
        grid = whole_image_grid(slide, mpp=0.5)
        config = SegmentConfig(reduce_on_device=False, decode_backend="HW_GPU_ONLY")
        segment.plan_reads(slide, grid, mpp=0.5, device=torch.device("cuda"), config=config)
    assert seen == ["HW_GPU_ONLY"]

    made = []
    fake = types.SimpleNamespace(
        BackendKind=types.SimpleNamespace(HW_GPU_ONLY="hw"),
        Backend=lambda kind: ("backend", kind),
        ColorSpec=types.SimpleNamespace(SRGB="srgb", SYCC="sycc"),
        DecodeParams=lambda color_spec: color_spec,
        Decoder=lambda **kwargs: made.append(kwargs) or object(),
    )
    monkeypatch.setitem(sys.modules, "nvidia", types.SimpleNamespace(nvimgcodec=fake))
    monkeypatch.setattr(NvImageCodecDecoder, "_idle", {})
    monkeypatch.setenv("PDL1_NVIMGCODEC_BACKEND", "NOT_A_BACKEND")  # no longer read here
    assert NvImageCodecDecoder(torch.device("cuda")).backend is None
    assert NvImageCodecDecoder(torch.device("cuda"), backend="HW_GPU_ONLY").backend == "HW_GPU_ONLY"
    assert made == [{"device_id": 0}, {"device_id": 0, "backends": [("backend", "hw")]}]
    with pytest.raises(ValueError, match=r"nvImageCodec backend 'HW' .* expected one of \['HW_GPU_ONLY'\]"):
        NvImageCodecDecoder(torch.device("cuda"), backend="HW")
