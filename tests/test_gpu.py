"""The CUDA path: maps from the GPU match the CPU's. Skipped where torch sees no GPU (CI)."""

import numpy as np
import pytest
import torch

from bridge.environment import nvimgcodec_backend
from inference.analysis.segment import SegmentConfig, SegmentProfile, segment_slide
from inference.models.ensemble import Ensemble, demo_model_dir
from inference.slides.gpu_decode import NvImageCodecDecoder, nvimgcodec_available
from inference.slides.slide import open_slide
from tests.helpers import assert_device_blocks_match_cpu, demo_seg_ensemble, pointwise_ensemble, random_slide

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; torch sees none"),
]


def _on_cuda(ens: Ensemble) -> Ensemble:
    return Ensemble(ens.manifest, [m.to("cuda") for m in ens.members], folder=ens.folder, device=torch.device("cuda"))


def test_gpu_maps_equal_cpu_maps_in_fp32():
    slide = random_slide(400, 300, seed=21)
    cpu = pointwise_ensemble(3, tile_size_px=64, seed=5)
    config = SegmentConfig(map_downsample=2, batch_size=4, precision="fp32", member_maps=True)
    ref = segment_slide(slide, cpu, config=config)
    profile = SegmentProfile()
    gpu = segment_slide(slide, _on_cuda(pointwise_ensemble(3, tile_size_px=64, seed=5)), config=config, profile=profile)
    assert profile.accumulate_on.startswith("device (cuda")  # auto keeps the accumulators on the GPU
    for name, value in ref.as_dict().items():
        np.testing.assert_allclose(getattr(gpu, name), value, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(gpu.member_prob, ref.member_prob, atol=1e-5)
    np.testing.assert_array_equal(gpu.covered, ref.covered)


def test_demo_ensemble_bf16_on_gpu_agrees_with_cpu(phantom_svs):
    with open_slide(phantom_svs) as slide:
        cpu = segment_slide(slide, Ensemble.load(demo_model_dir("seg"), task="segmentation"))
        gpu_ens = Ensemble.load(demo_model_dir("seg"), task="segmentation", device="cuda")
        gpu = segment_slide(slide, gpu_ens, config=SegmentConfig(precision="bf16", compile=False))
    covered = cpu.covered
    assert (gpu.covered == covered).all()
    same_class = ((gpu.prob >= 0.5) == (cpu.prob >= 0.5))[covered].mean()
    assert same_class > 0.995
    assert np.abs(gpu.prob - cpu.prob)[covered].mean() < 0.01
    assert (gpu.mutual_information >= 0).all()


def test_level_pixels_averaged_on_the_gpu_give_the_cpu_maps(phantom_svs):
    """A 1 µm/px model on the 0.5 µm/px phantom: on CUDA the GPU averages level 0 (automatic)."""
    cpu, gpu = demo_seg_ensemble(input_mpp=1.0), demo_seg_ensemble(device="cuda", input_mpp=1.0)
    profile = SegmentProfile()
    config = SegmentConfig(precision="fp32")
    with open_slide(phantom_svs) as slide:
        ref = segment_slide(slide, cpu, config=config)
        out = segment_slide(slide, gpu, config=config, profile=profile)
    assert profile.box_factor == 2
    for name in ("prob", "predictive_entropy", "mutual_information"):
        diff = np.abs(getattr(out, name) - getattr(ref, name))
        assert diff.mean() < 1e-3 and diff.max() < 0.05, (name, diff.mean(), diff.max())


# Tiles decoded on the GPU (nvImageCodec, SegmentConfig.read_on_device) ----------------------

needs_nvimgcodec = pytest.mark.skipif(
    not nvimgcodec_available(), reason="needs nvImageCodec (the gpu-cu12 or gpu-cu13 extra)"
)


def _nvimgcodec_blocks_equal_cpu(slide, *, mpp: float, box_factor: int, tile_px: int = 256) -> None:
    # Measured on the H100: the hardware decoder within 1 grey level of libjpeg-turbo's pixels
    # (at a few pixels of the phantom), CUDA decoding within 3.
    # The backend as pdl1 reads it (PDL1_NVIMGCODEC_BACKEND), passed down as pdl1 passes it.
    backend = nvimgcodec_backend()
    hardware = backend == "HW_GPU_ONLY"
    assert_device_blocks_match_cpu(
        slide,
        mpp=mpp,
        box_factor=box_factor,
        device=torch.device("cuda"),
        decode=NvImageCodecDecoder(torch.device("cuda"), backend=backend),
        max_diff=1 if hardware else 4,
        tile_px=tile_px,
    )


@needs_nvimgcodec
def test_nvimgcodec_decodes_the_phantoms_tiles_to_the_cpu_readers_pixels(phantom_svs):
    with open_slide(phantom_svs) as slide:
        _nvimgcodec_blocks_equal_cpu(slide, mpp=1.0, box_factor=2)


@needs_nvimgcodec
def test_nvimgcodec_decodes_a_real_aperio_slides_rgb_tiles_to_the_cpu_readers_pixels(cmu_svs):
    with open_slide(cmu_svs) as slide:
        _nvimgcodec_blocks_equal_cpu(slide, mpp=slide.mpp.mean, box_factor=1, tile_px=200)


@needs_nvimgcodec
def test_maps_read_on_the_device_equal_the_maps_read_on_the_cpu(phantom_svs):
    gpu = demo_seg_ensemble(device="cuda", input_mpp=1.0)
    on_device, on_cpu = SegmentProfile(), SegmentProfile()
    with open_slide(phantom_svs) as slide:
        on_gpu = SegmentConfig(precision="fp32", decode_backend=nvimgcodec_backend())  # as pdl1 passes it
        ours = segment_slide(slide, gpu, config=on_gpu, profile=on_device)
        ref = segment_slide(slide, gpu, config=SegmentConfig(precision="fp32", read_on_device=False), profile=on_cpu)
    assert on_device.read_on_device and not on_cpu.read_on_device
    covered = ref.covered
    assert (ours.covered == covered).all()
    assert ((ours.prob >= 0.5) == (ref.prob >= 0.5))[covered].mean() > 0.999
    # Decoded with CUDA, pixels may differ from libjpeg-turbo's by a few grey levels.
    for name, value in ref.as_dict().items():
        diff = np.abs(getattr(ours, name) - value)[covered]
        assert diff.mean() < 1e-3 and diff.max() < 0.05, (name, diff.mean(), diff.max())
