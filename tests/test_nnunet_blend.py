"""nnU-Net's blending of overlapping tiles (``Manifest.blend == "nnunet"``), used for imported nnU-Net members."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest
import torch

from inference.analysis.segment import SegmentConfig, segment_slide
from inference.analysis.tiling import compute_steps, gaussian_weights, nnunet_gaussian_weights
from inference.analysis.uncertainty import ensemble_stats_np
from inference.models.ensemble import Ensemble
from inference.models.unet import PlainConvUNet
from tests.helpers import make_manifest, random_slide


def _instance_norm_members(n: int) -> list[torch.nn.Module]:
    # InstanceNorm, as nnU-Net's networks: a tile's logits depend on the whole tile, so blending order matters.
    members = []
    for seed in range(n):
        torch.manual_seed(seed)
        members.append(PlainConvUNet(features=(4, 8), n_conv_per_stage=1, norm="instance").eval())
    return members


def _reference(members, manifest, rgb: np.ndarray, *, tile: int) -> dict[str, np.ndarray]:
    """nnU-Net's predictor by hand, per member: Gaussian-weighted logits summed, divided, softmax; then statistics."""
    h, w = rgb.shape[:2]
    g = nnunet_gaussian_weights(tile).astype(np.float64)
    mean = np.asarray(manifest.normalization["mean"])[:, None, None]
    std = np.asarray(manifest.normalization["std"])[:, None, None]
    probs = []
    for net in members:
        logits = np.zeros((2, h, w))
        weight = np.zeros((h, w))
        for y in compute_steps(h, tile_px=tile, max_step_px=tile // 2):
            for x in compute_steps(w, tile_px=tile, max_step_px=tile // 2):
                x_in = (rgb[y : y + tile, x : x + tile].transpose(2, 0, 1) / 255.0 - mean) / std
                with torch.no_grad():
                    out = net(torch.from_numpy(x_in[None]).float())[0].double().numpy()
                logits[:, y : y + tile, x : x + tile] += out * g
                weight[y : y + tile, x : x + tile] += g
        logits /= weight
        probs.append(np.exp(logits) / np.exp(logits).sum(axis=0))
    return ensemble_stats_np(np.stack(probs))


@pytest.mark.parametrize("accumulate_on", ["host", "device"])  # "device" on the CPU: the GPU path's tensors
def test_nnunet_blend_equals_nnunets_predictor_by_hand(accumulate_on):
    tile = 32
    members = _instance_norm_members(2)
    manifest = dataclasses.replace(make_manifest(tile_size_px=tile, n_members=2), extra={"blend": "nnunet"})
    ens = Ensemble.from_members(manifest, members)
    slide = random_slide(90, 70, seed=4)
    config = SegmentConfig(
        map_downsample=1,
        overlap_fraction=0.5,
        read_workers=0,
        precision="fp32",
        batch_size=3,
        accumulate_on=accumulate_on,
    )
    maps = segment_slide(slide, ens, config=config)
    ref = _reference(members, manifest, slide.read_region((0, 0), 0, (90, 70)), tile=tile)
    for name, value in maps.as_dict().items():
        np.testing.assert_allclose(value, ref[name], atol=2e-5, err_msg=name)


def test_blending_probabilities_differs_from_nnunets_blend():
    # The product's own blending is not nnU-Net's on tile-dependent members: the manifest chooses.
    tile = 32
    members = _instance_norm_members(2)
    base = make_manifest(tile_size_px=tile, n_members=2)
    slide = random_slide(90, 70, seed=4)
    config = SegmentConfig(map_downsample=1, overlap_fraction=0.5, read_workers=0, precision="fp32")
    ours = segment_slide(slide, Ensemble.from_members(base, members), config=config)
    ref = _reference(members, base, slide.read_region((0, 0), 0, (90, 70)), tile=tile)
    assert np.abs(ours.prob - ref["prob"]).max() > 1e-3


def test_nnunet_blend_keeps_member_maps_and_pools():
    tile = 32
    members = _instance_norm_members(3)
    manifest = dataclasses.replace(make_manifest(tile_size_px=tile, n_members=3), extra={"blend": "nnunet"})
    ens = Ensemble.from_members(manifest, members)
    slide = random_slide(96, 64, seed=6)
    config = SegmentConfig(map_downsample=2, overlap_fraction=0.5, read_workers=0, precision="fp32", member_maps=True)
    maps = segment_slide(slide, ens, config=config)
    assert maps.member_prob is not None and maps.member_prob.shape == (3, *maps.prob.shape)
    np.testing.assert_allclose(maps.member_prob.mean(axis=0), maps.prob, atol=1e-5)
    assert maps.covered.all() and (maps.mutual_information >= 0).all()


def test_nnunet_gaussian_is_not_the_products():
    w = nnunet_gaussian_weights(64)
    assert w.dtype == np.float32 and float(w.max()) == 10.0
    assert np.unravel_index(np.argmax(w), w.shape) == (32, 32)  # nnU-Net's centre pixel, tile // 2
    assert not np.allclose(np.asarray(gaussian_weights(64)) * 10, w, atol=1e-3)


@pytest.mark.skipif(importlib.util.find_spec("nnunetv2") is None, reason="nnU-Net v2 not installed (benchmarks/README)")
@pytest.mark.parametrize("tile", [64, 127, 256])
def test_nnunet_gaussian_equals_nnunets(tile):
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    theirs = compute_gaussian((tile, tile), 1 / 8, 10, device=torch.device("cpu")).float().numpy()
    np.testing.assert_array_equal(nnunet_gaussian_weights(tile), theirs)


def test_unknown_blend_is_refused(tmp_path):
    from safetensors.torch import save_file

    from inference.errors import ModelFileError
    from inference.models.manifest import read_manifest, sha256_file, write_manifest

    save_file({"w": torch.zeros(1)}, tmp_path / "m0.safetensors")
    manifest = make_manifest()
    member = dataclasses.replace(
        manifest.members[0], file="m0.safetensors", sha256=sha256_file(tmp_path / "m0.safetensors")
    )
    write_manifest(tmp_path, dataclasses.replace(manifest, members=[member], extra={"blend": "logit-mean"}))
    with pytest.raises(ModelFileError, match="blend 'logit-mean' is not one of"):
        read_manifest(tmp_path)
