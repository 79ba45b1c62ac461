"""Synthetic brightfield images of known stain for the stain detector's tests and benchmark.

H&E comes from the phantom renderer (its thumbnail at 8 µm/px, as :func:`detect_slide_stain`
reads it); IHC (haematoxylin counterstain + DAB) is made two ways: Beer–Lambert mixtures of
perturbed stain vectors on a drawn scene, and phantoms recoloured (their haematoxylin kept,
eosin dropped, DAB laid on the PD-L1 positive nests). Test-only: the product has no IHC phantom.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage as ndi

from inference.phantom.render import render
from inference.phantom.scene import PhantomScene, PhantomSpec

# Ruifrok & Johnston optical-density vectors (QuPath's H-DAB defaults).
H_OD = np.array([0.65, 0.70, 0.29])
DAB_OD = np.array([0.27, 0.57, 0.78])


def perturbed(rng: np.random.Generator, od: np.ndarray, sigma: float) -> np.ndarray:
    """``od`` (unit length) plus N(0, sigma) per component, kept positive, unit length."""
    out = np.clip(od / np.linalg.norm(od) + rng.normal(0, sigma, 3), 0.02, None)
    return out / np.linalg.norm(out)


def to_rgb(od: np.ndarray, *, background: float = 245.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Beer–Lambert: optical density (..., 3) to RGB uint8 under a ``background`` light, with sensor noise."""
    rgb = background * np.exp(-od)
    if rng is not None:
        rgb = rgb + rng.normal(0, 2.0, rgb.shape)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def phantom_he(seed: int, shift: float, *, size_px: int = 2048, downsample: float = 16.0) -> np.ndarray:
    """An H&E phantom's whole image at ``downsample`` (16 = 8 µm/px at the phantom's 0.5 µm/px)."""
    scene = PhantomScene(PhantomSpec(size_px, size_px, seed=seed, shift=shift))
    n = round(size_px / downsample)
    return render(scene, 0, 0, n, n, downsample)


def phantom_ihc(seed: int, shift: float, *, size_px: int = 2048, downsample: float = 16.0, dab: float = 0.6):
    """The same phantom as an IHC: its haematoxylin (perturbed as the phantom perturbs it), no eosin,
    DAB of strength ``dab`` on the PD-L1 positive nests with a perturbed DAB vector."""
    scene = PhantomScene(PhantomSpec(size_px, size_px, seed=seed, shift=shift))
    scene.stains = dataclasses.replace(scene.stains, e_scale=0.0)
    n = round(size_px / downsample)
    haem_rgb = render(scene, 0, 0, n, n, downsample).astype(np.float64)
    rng = np.random.default_rng([seed, 31])
    positive = scene.positive_mask(0, 0, n, n, downsample).astype(np.float64)
    speckle = ndi.gaussian_filter(rng.uniform(0, 1, (n, n)), 1.0)
    dab_od = dab * positive * (0.5 + speckle)
    dab_vec = perturbed(rng, DAB_OD, 0.03 + 0.10 * shift)
    rgb = haem_rgb * np.exp(-dab_od[..., None] * dab_vec)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def drawn_ihc(
    rng: np.random.Generator, *, size_px: int = 256, sigma: float = 0.05, positive_fraction: float = 0.4
) -> np.ndarray:
    """A drawn IHC field: glass, tissue with pale counterstain, haematoxylin nuclei, DAB on a share of the cells.

    Stain vectors are the Ruifrok ones perturbed by N(0, ``sigma``) per component.
    """
    h_vec, dab_vec = perturbed(rng, H_OD, sigma), perturbed(rng, DAB_OD, sigma)
    yy, xx = np.mgrid[0:size_px, 0:size_px]
    tissue = ndi.gaussian_filter(rng.normal(0, 1, (size_px, size_px)), size_px / 8) > 0
    nuclei = np.zeros((size_px, size_px))
    dab = np.zeros((size_px, size_px))
    n_cells = size_px * size_px // 60
    for x, y in rng.uniform(0, size_px, (n_cells, 2)):
        if not tissue[int(y), int(x)]:
            continue
        d2 = (xx - x) ** 2 + (yy - y) ** 2
        nuclei += np.exp(-d2 / 4.0)
        if rng.uniform() < positive_fraction:  # membrane and cytoplasm around the nucleus
            dab += np.exp(-((np.sqrt(d2) - 3.5) ** 2) / 2.0)
    h_conc = tissue * (0.12 + rng.uniform(0.5, 1.0) * np.clip(nuclei, 0, 1.5))
    dab_conc = tissue * rng.uniform(0.5, 1.2) * np.clip(dab, 0, 1.5)
    od = h_conc[..., None] * h_vec + dab_conc[..., None] * dab_vec
    return to_rgb(od, background=float(rng.uniform(225, 250)), rng=rng)


def grey(rng: np.random.Generator, *, size_px: int = 128) -> np.ndarray:
    """A grayscale section (silver stain, a scan in grey): structure, no colour."""
    field = ndi.gaussian_filter(rng.normal(0, 1, (size_px, size_px)), 3)
    level = np.clip(235 - 120 * np.clip(field * 3, 0, 1), 0, 255)
    return np.repeat(level[..., None], 3, axis=2).astype(np.uint8)


def dark_fluorescence(rng: np.random.Generator, *, size_px: int = 128) -> np.ndarray:
    """A fluorescence-like image: near-black background with blue nuclei and a green marker."""
    rgb = rng.normal(8, 3, (size_px, size_px, 3))
    blobs = ndi.gaussian_filter((rng.uniform(0, 1, (size_px, size_px)) > 0.985).astype(float), 1.5) * 40
    rgb[..., 2] += 180 * np.clip(blobs, 0, 1)
    rgb[..., 1] += 90 * np.clip(ndi.shift(blobs, (2, 2)), 0, 1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def blank(*, size_px: int = 128, level: int = 242) -> np.ndarray:
    """Glass only."""
    return np.full((size_px, size_px, 3), level, np.uint8)


def drawn_two_stains(
    rng: np.random.Generator, h_od: np.ndarray, second_od: np.ndarray, *, eosin: bool, size_px: int = 256
) -> np.ndarray:
    """A drawn field of haematoxylin nuclei and a second stain of given OD vectors (unit length after).

    ``eosin``: the second stain over all tissue (stroma and cytoplasm, as H&E); else DAB rings around a
    tenth of the nuclei (a sparse PD-L1 stain).
    """
    h_vec, second_vec = h_od / np.linalg.norm(h_od), second_od / np.linalg.norm(second_od)
    yy, xx = np.mgrid[0:size_px, 0:size_px]
    tissue = ndi.gaussian_filter(rng.normal(0, 1, (size_px, size_px)), size_px / 8) > 0
    nuclei = np.zeros((size_px, size_px))
    rings = np.zeros((size_px, size_px))
    for x, y in rng.uniform(0, size_px, (size_px * size_px // 60, 2)):
        if not tissue[int(y), int(x)]:
            continue
        d2 = (xx - x) ** 2 + (yy - y) ** 2
        nuclei += np.exp(-d2 / 4.0)
        if rng.uniform() < 0.1:
            rings += np.exp(-((np.sqrt(d2) - 3.5) ** 2) / 2.0)
    h_conc = tissue * (0.1 + 0.9 * np.clip(nuclei, 0, 1.5))
    second = 0.35 + 0.15 * ndi.gaussian_filter(rng.uniform(0, 1, (size_px, size_px)), 2) if eosin else 0.6 * rings
    od = h_conc[..., None] * h_vec + (tissue * np.clip(second, 0, 1.5))[..., None] * second_vec
    return to_rgb(od, background=240.0, rng=rng)
