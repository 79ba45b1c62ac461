"""Colour augmentation: the light jitter the nuclei trainer keeps, the strong one segmentation trains with, the
haematoxylin turn."""

import numpy as np
import pytest
from skimage.color import rgb_from_hed

from inference.phantom.render import render
from inference.phantom.scene import PhantomScene, PhantomSpec
from inference.training.augment import (
    LIGHT_STAIN_JITTER,
    MIN_TURNED_OD,
    STRONG_STAIN_JITTER,
    StainJitter,
    augment_batch,
    hed_jitter,
    stain_jitter,
    turn_haematoxylin,
    turned_unit_vector,
)
from inference.training.train_nuclei import NucleiTrainConfig


def _patch() -> np.ndarray:
    scene = PhantomScene(PhantomSpec(2048, 2048, seed=5, tps_percent=50))
    return render(scene, 600, 600, 128, 128, downsample=4.0)


def test_light_jitter_is_the_hed_jitter_the_shipped_nuclei_model_was_trained_with():
    patch = _patch()
    a = stain_jitter(patch, np.random.default_rng(7), LIGHT_STAIN_JITTER)
    b = hed_jitter(patch, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)


def test_strong_jitter_is_seeded_and_moves_colours_further_than_light():
    patch = _patch()
    one = stain_jitter(patch, np.random.default_rng(1), STRONG_STAIN_JITTER)
    again = stain_jitter(patch, np.random.default_rng(1), STRONG_STAIN_JITTER)
    np.testing.assert_array_equal(one, again)
    assert one.dtype == np.uint8 and one.shape == patch.shape

    def spread(jitter) -> float:
        rng = np.random.default_rng(0)
        means = [stain_jitter(patch, rng, jitter).reshape(-1, 3).mean(0) for _ in range(40)]
        return float(np.std(means, axis=0).mean())

    light, strong = spread(LIGHT_STAIN_JITTER), spread(STRONG_STAIN_JITTER)
    # The phantom's tissue colour moves by tens of grey levels between shifts 0 and 0.5.
    assert strong > 2 * light and strong > 10


def test_augment_batch_moves_masks_with_images_and_colours_images_only():
    patch = _patch()
    mask = (np.arange(128)[:, None] < 40) & (np.arange(128)[None, :] < 90)  # asymmetric: shows every turn
    images, masks = augment_batch(
        np.stack([patch] * 8),
        np.stack([mask.astype(np.uint8)] * 8),
        np.random.default_rng(3),
        p_colour=0.0,
        p_blur=0.0,
        jitter=STRONG_STAIN_JITTER,
    )
    for img, msk in zip(images, masks, strict=True):
        # Without colour or blur the image is a pure turn/flip of the patch, and the mask the same one.
        turns = [np.rot90(a, k) for a in (patch, patch[:, ::-1]) for k in range(4)]
        mturns = [np.rot90(a, k) for a in (mask, mask[:, ::-1]) for k in range(4)]
        hits = [i for i, t in enumerate(turns) if t.shape == img.shape and np.array_equal(t, img)]
        assert hits and any(np.array_equal(mturns[i], msk.astype(bool)) for i in hits)


def _od(rgb: np.ndarray) -> np.ndarray:
    return -np.log((rgb.astype(np.float64) + 1) / 256)


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    cos = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    return float(np.degrees(np.arccos(np.clip(cos, -1, 1))))


def test_turn_haematoxylin_turns_the_haematoxylin_within_its_limit_and_leaves_the_dab():
    # Left half haematoxylin alone, right half DAB alone, each rendered from Ruifrok's vector (OD about 0.6-0.8).
    h_od, dab_od = rgb_from_hed[0], rgb_from_hed[2]
    od = np.zeros((8, 16, 3))
    od[:, :8] = 0.8 * h_od
    od[:, 8:] = 0.8 * dab_od
    patch = np.clip(256 * np.exp(-od) - 1 + 0.5, 0, 255).astype(np.uint8)
    rng = np.random.default_rng(4)
    angles = []
    for _ in range(200):
        out = turn_haematoxylin(patch, rng, max_deg=30)
        assert out.dtype == np.uint8 and out.shape == patch.shape
        # DAB carries no haematoxylin: its pixels keep their grey levels (rounding aside).
        assert np.abs(out[:, 8:].astype(int) - patch[:, 8:]).max() <= 1
        turned = _od(out[0, 0])
        # The haematoxylin's amount stays: the OD vector keeps its length (to the grey-level rounding).
        assert abs(np.linalg.norm(turned) - np.linalg.norm(_od(patch[0, 0]))) < 0.02
        angles.append(_angle_deg(turned, h_od))
    angles = np.array(angles)
    assert angles.max() <= 30.5  # uint8 rounding moves a direction by a fraction of a degree
    # Uniform over 0-30 degrees: some near the limit, some near none, half either side of 15.
    assert angles.max() > 27 and angles.min() < 3 and 0.35 < np.mean(angles > 15) < 0.65
    # No turn, no change (rounding aside).
    unturned = turn_haematoxylin(patch, np.random.default_rng(4), max_deg=0)
    assert np.abs(unturned.astype(int) - patch).max() <= 1


def test_turned_unit_vector_keeps_every_channel_absorbing():
    rng = np.random.default_rng(0)
    vectors = np.array([turned_unit_vector(rgb_from_hed[0], rng, max_deg=90) for _ in range(500)])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0)
    # Clipped to MIN_TURNED_OD, then renormalised: a norm of at most sqrt(1 + 3 * MIN_TURNED_OD**2) lowers it a hair.
    assert vectors.min() >= MIN_TURNED_OD / np.sqrt(1 + 3 * MIN_TURNED_OD**2) - 1e-12
    assert turned_unit_vector(rgb_from_hed[0], rng, max_deg=0) == pytest.approx(
        rgb_from_hed[0] / np.linalg.norm(rgb_from_hed[0])
    )


@pytest.mark.parametrize("bad", [-1.0, 91.0])
def test_haematoxylin_turn_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="haematoxylin_turn_deg must lie in 0-90 degrees"):
        StainJitter(haematoxylin_turn_deg=bad)
    with pytest.raises(ValueError, match="haematoxylin_turn_deg must lie in 0-90 degrees"):
        NucleiTrainConfig(slides=("a.svs",), out_dir="out", haematoxylin_turn_deg=bad)


def test_stain_jitter_with_a_turn_is_seeded_and_the_nuclei_config_passes_it_on():
    patch = _patch()
    jitter = NucleiTrainConfig(slides=("a.svs",), out_dir="out", haematoxylin_turn_deg=40).jitter
    assert jitter == StainJitter(haematoxylin_turn_deg=40)
    one = stain_jitter(patch, np.random.default_rng(2), jitter)
    np.testing.assert_array_equal(one, stain_jitter(patch, np.random.default_rng(2), jitter))
    assert not np.array_equal(one, stain_jitter(patch, np.random.default_rng(2), LIGHT_STAIN_JITTER))
    assert NucleiTrainConfig(slides=("a.svs",), out_dir="out").jitter == LIGHT_STAIN_JITTER


def test_pdl1_train_nuclei_refuses_a_haematoxylin_turn_out_of_range_before_reading(tmp_path):
    from typer.testing import CliRunner

    from bridge.cli.app import app

    args = ["train", "nuclei", str(tmp_path / "a.svs"), "--out", str(tmp_path / "m"), "--haematoxylin-turn-deg", "91"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    text = " ".join(result.output.split())
    assert result.exit_code == 2, text
    assert "--haematoxylin-turn-deg" in text and "91" in text
    assert not (tmp_path / "m").exists()
