"""Stain augmentation on numpy batches: flips, rot90, colour jitter in HED and optical-density space, blur."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.color import hed2rgb, rgb2hed, rgb_from_hed


@dataclass(frozen=True)
class StainJitter:
    """How far colour augmentation moves a patch's stains (each draw is per patch).

    ``hed_scale_sd`` / ``hed_bias_sd`` scale and shift the haematoxylin, eosin and DAB
    channels; ``od_mix_sd`` multiplies optical densities by ``I + N(0, sd)`` (3 x 3), which
    turns and rescales the stain vectors themselves, as another lab's stains or scanner do;
    ``cast_sd_rgb`` adds one offset per RGB channel in grey levels (a colour cast);
    ``haematoxylin_turn_deg`` turns the haematoxylin's OD vector alone by up to that many degrees
    (:func:`turn_haematoxylin`), as another lab's counterstain does, leaving the other stains as they are.
    """

    hed_scale_sd: float = 0.08
    hed_bias_sd: float = 0.005
    od_mix_sd: float = 0.0
    cast_sd_rgb: float = 0.0
    haematoxylin_turn_deg: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.haematoxylin_turn_deg <= 90:
            raise ValueError(f"haematoxylin_turn_deg must lie in 0-90 degrees, got {self.haematoxylin_turn_deg}")


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


#: The smallest absorbance a turned haematoxylin keeps per RGB channel (of a unit vector), as the phantom's
#: stain shift clips its vectors: a dye absorbs some of every channel.
MIN_TURNED_OD = 0.02


def _optical_density(rgb: np.ndarray, dtype: type) -> np.ndarray:
    """Natural-log optical density of uint8 RGB, with a white of 256 and 1 added so that black stays finite (the
    form :func:`_rgb_of_density` inverts); ``dtype`` kept as each caller computed it, its draws unchanged."""
    return -np.log((rgb.astype(dtype) + 1) / 256)


def _rgb_of_density(od: np.ndarray) -> np.ndarray:
    """uint8 RGB of an optical density as :func:`_optical_density` gives it, rounded and clipped."""
    return np.clip(256 * np.exp(-od) - 1 + 0.5, 0, 255).astype(np.uint8)


def turned_unit_vector(v: np.ndarray, rng: np.random.Generator, *, max_deg: float) -> np.ndarray:
    """``v`` as a unit vector turned by an angle drawn uniformly from [0, ``max_deg``] degrees, towards a
    direction drawn uniformly around it; each component is clipped to at least :data:`MIN_TURNED_OD`, then the
    vector renormalised (as the phantom's stain shift does).

    >>> u = turned_unit_vector(np.array([0.65, 0.70, 0.29]), np.random.default_rng(0), max_deg=30)
    >>> bool(abs(np.linalg.norm(u) - 1) < 1e-9 and u.min() > 0)
    True
    """
    unit = np.asarray(v, np.float64) / np.linalg.norm(v)
    angle = np.radians(rng.uniform(0.0, max_deg))
    away = rng.normal(size=3)
    away -= (away @ unit) * unit
    away /= np.linalg.norm(away)
    turned = np.clip(np.cos(angle) * unit + np.sin(angle) * away, MIN_TURNED_OD, None)
    return turned / np.linalg.norm(turned)


def turn_haematoxylin(rgb: np.ndarray, rng: np.random.Generator, *, max_deg: float) -> np.ndarray:
    """Turn the haematoxylin of a uint8 (H, W, 3) patch: its optical-density vector moves by up to ``max_deg``
    degrees (:func:`turned_unit_vector`); the eosin or DAB stays. Returns uint8 of the same shape.

    Each pixel's haematoxylin is found by colour deconvolution with Ruifrok and Johnston's vectors (scikit-image's
    ``rgb_from_hed``; negative amounts, glass noise, count as none), and that amount's optical density is moved
    from Ruifrok's direction to the turned one, of the same length. A patch whose own haematoxylin lies off
    Ruifrok's keeps its offset, turned with it. The light HED jitter only rescales the stains, so a model trained
    with it alone has seen the haematoxylin hues of its training slides and no others.
    """
    od = _optical_density(rgb, np.float64)
    amounts = od @ np.linalg.inv(rgb_from_hed)
    haematoxylin = np.clip(amounts[..., 0], 0, None)
    h_od = rgb_from_hed[0]
    turned = turned_unit_vector(h_od, rng, max_deg=max_deg) * np.linalg.norm(h_od)
    return _rgb_of_density(od + haematoxylin[..., None] * (turned - h_od))


def stain_jitter(rgb: np.ndarray, rng: np.random.Generator, jitter: StainJitter) -> np.ndarray:
    """One random draw of ``jitter`` applied to a uint8 (H, W, 3) patch; returns uint8."""
    if jitter.haematoxylin_turn_deg > 0:  # drawn first, and only when asked: the other draws stay as they were
        rgb = turn_haematoxylin(rgb, rng, max_deg=jitter.haematoxylin_turn_deg)
    if jitter.od_mix_sd > 0:
        mix = np.eye(3, dtype=np.float32) + rng.normal(0, jitter.od_mix_sd, (3, 3)).astype(np.float32)
        rgb = _rgb_of_density(_optical_density(rgb, np.float32) @ mix)
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
