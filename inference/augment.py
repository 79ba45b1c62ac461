"""H&E augmentation on numpy batches: flips, rot90, colour jitter in HED space, blur."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.color import hed2rgb, rgb2hed


def hed_jitter(rgb: np.ndarray, rng: np.random.Generator, *, sigma: float = 0.08, bias: float = 0.005) -> np.ndarray:
    """Scale and shift each stain channel (haematoxylin, eosin, DAB) by a random amount.

    ``rgb`` is uint8 (H, W, 3); returns uint8 of the same shape.
    """
    hed = rgb2hed(rgb)
    alpha = rng.normal(1.0, sigma, 3)
    beta = rng.normal(0.0, bias, 3)
    out = hed2rgb(hed * alpha + beta)
    return np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)


def augment_batch(
    images: np.ndarray, masks: np.ndarray, rng: np.random.Generator, *, p_blur: float = 0.2, p_colour: float = 0.8
) -> tuple[np.ndarray, np.ndarray]:
    """Augment a batch in place of copies: ``images`` uint8 (B, H, W, 3), ``masks`` (B, H, W) any dtype.

    Geometry (flips, rot90) is applied to both; colour and blur to images only.
    """
    images = images.copy()
    masks = masks.copy()
    for i in range(len(images)):
        k = int(rng.integers(4))
        img, msk = np.rot90(images[i], k), np.rot90(masks[i], k)
        if rng.random() < 0.5:
            img, msk = img[:, ::-1], msk[:, ::-1]
        if rng.random() < p_colour:
            img = hed_jitter(np.ascontiguousarray(img), rng)
        if rng.random() < p_blur:
            img = ndi.gaussian_filter(img, (rng.uniform(0.3, 1.2),) * 2 + (0,))
        images[i], masks[i] = img, msk
    return images, masks
