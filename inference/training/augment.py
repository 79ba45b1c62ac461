"""H&E augmentation on numpy batches: flips, rot90, colour jitter in HED and optical-density space, blur."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.color import hed2rgb, rgb2hed


@dataclass(frozen=True)
class StainJitter:
    """How far colour augmentation moves a patch's stains (each draw is per patch).

    ``hed_scale_sd`` / ``hed_bias_sd`` scale and shift the haematoxylin, eosin and DAB
    channels; ``od_mix_sd`` multiplies optical densities by ``I + N(0, sd)`` (3 x 3), which
    turns and rescales the stain vectors themselves, as another lab's stains or scanner do;
    ``cast_sd_rgb`` adds one offset per RGB channel in grey levels (a colour cast).
    """

    hed_scale_sd: float = 0.08
    hed_bias_sd: float = 0.005
    od_mix_sd: float = 0.0
    cast_sd_rgb: float = 0.0


#: The default, and what the shipped demo models were trained with.
LIGHT_STAIN_JITTER = StainJitter()
#: Stain vectors turned and rescaled, as the phantom's domain shift does them. Measured against the
#: light jitter in the README: better on shifted slides, and on weakly expressing ones only with a
#: long first cycle.
STRONG_STAIN_JITTER = StainJitter(hed_scale_sd=0.15, hed_bias_sd=0.01, od_mix_sd=0.12, cast_sd_rgb=12.0)
STAIN_JITTERS = {"light": LIGHT_STAIN_JITTER, "strong": STRONG_STAIN_JITTER}


def hed_jitter(rgb: np.ndarray, rng: np.random.Generator, *, sigma: float = 0.08, bias: float = 0.005) -> np.ndarray:
    """Scale and shift each stain channel (haematoxylin, eosin, DAB) by a random amount.

    ``rgb`` is uint8 (H, W, 3); returns uint8 of the same shape.
    """
    hed = rgb2hed(rgb)
    alpha = rng.normal(1.0, sigma, 3)
    beta = rng.normal(0.0, bias, 3)
    out = hed2rgb(hed * alpha + beta)
    return np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)


def stain_jitter(rgb: np.ndarray, rng: np.random.Generator, jitter: StainJitter) -> np.ndarray:
    """One random draw of ``jitter`` applied to a uint8 (H, W, 3) patch; returns uint8."""
    if jitter.od_mix_sd > 0:
        od = -np.log((rgb.astype(np.float32) + 1) / 256)
        mix = np.eye(3, dtype=np.float32) + rng.normal(0, jitter.od_mix_sd, (3, 3)).astype(np.float32)
        rgb = np.clip(256 * np.exp(-(od @ mix)) - 1 + 0.5, 0, 255).astype(np.uint8)
    out = hed_jitter(rgb, rng, sigma=jitter.hed_scale_sd, bias=jitter.hed_bias_sd)
    if jitter.cast_sd_rgb > 0:
        cast = rng.normal(0, jitter.cast_sd_rgb, 3)
        out = np.clip(out + cast + 0.5, 0, 255).astype(np.uint8)
    return out


def augment_batch(
    images: np.ndarray,
    masks: np.ndarray,
    rng: np.random.Generator,
    *,
    p_blur: float = 0.2,
    p_colour: float = 0.8,
    jitter: StainJitter = LIGHT_STAIN_JITTER,
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
            img = stain_jitter(np.ascontiguousarray(img), rng, jitter)
        if rng.random() < p_blur:
            img = ndi.gaussian_filter(img, (rng.uniform(0.3, 1.2),) * 2 + (0,))
        images[i], masks[i] = img, msk
    return images, masks
