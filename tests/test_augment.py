"""Colour augmentation: the light jitter the nuclei trainer keeps, the strong one segmentation trains with."""

import numpy as np

from inference.phantom.render import render
from inference.phantom.scene import PhantomScene, PhantomSpec
from inference.training.augment import (
    LIGHT_STAIN_JITTER,
    STRONG_STAIN_JITTER,
    augment_batch,
    hed_jitter,
    stain_jitter,
)


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
