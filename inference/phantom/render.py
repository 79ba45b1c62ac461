"""Draw any region of a phantom scene at any downsample, as an H&E section is seen in brightfield."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from inference.phantom.scene import MAX_NUCLEUS_RADIUS_UM, PhantomScene, hash_uniform


def render(scene: PhantomScene, x0: int, y0: int, width: int, height: int, downsample: float = 1.0) -> np.ndarray:
    """RGB uint8 (height, width, 3) of ``scene``: pixel (r, c) spans level-0 [x0 + c*ds, x0 + (c+1)*ds)."""
    ds = float(downsample)
    blur_px = scene.stains.blur_um / scene.spec.mpp / ds
    margin = math.ceil(3 * blur_px) + 1 if blur_px > 0.3 else 0
    ox, oy = x0 - margin * ds, y0 - margin * ds
    w, h = width + 2 * margin, height + 2 * margin
    xs = ox + (np.arange(w, dtype=np.float64) + 0.5) * ds
    ys = oy + (np.arange(h, dtype=np.float64) + 0.5) * ds
    xg, yg = xs[None, :], ys[:, None]
    tissue, tumour, positive = scene.zones(xg, yg)
    mpp = scene.spec.mpp
    # Per-pixel noise at level-0 resolution averages out when downsampled.
    noise_scale = 1 / max(ds, 1.0)
    pix = hash_uniform(scene.spec.seed, 20, np.floor(xg / max(ds, 1)), np.floor(yg / max(ds, 1)), int(ds))
    grain = (pix - 0.5) * noise_scale

    # Stroma: wavy collagen fibres along the scene's fibre direction.
    ca, sa = math.cos(scene.fibre_angle), math.sin(scene.fibre_angle)
    along = (xg * ca + yg * sa) * mpp
    across = (-xg * sa + yg * ca) * mpp
    period_um = 9.0
    fade = math.exp(-((ds * mpp / period_um) ** 2) * 4)
    fibres = 0.5 + 0.5 * np.sin(2 * np.pi * across / period_um + 2.5 * np.sin(2 * np.pi * along / 140.0))
    fibres = 0.5 + (fibres - 0.5) * fade
    # Granular cytoplasm (coarser in positive nests).
    gran = 0.5 + 0.5 * np.sin(xg * mpp * 1.7 + 3 * np.sin(yg * mpp * 0.9)) * np.sin(yg * mpp * 1.3)
    gran_fade = math.exp(-((ds * mpp / 3.5) ** 2) * 4)
    gran = 0.5 + (gran - 0.5) * gran_fade

    eosin = np.zeros((h, w), np.float32)
    haem = np.zeros((h, w), np.float32)
    stroma = tissue & ~tumour
    eosin += stroma * (0.32 + 0.30 * fibres + 0.15 * grain)
    haem += stroma * 0.03
    strength = scene.strength(xg, yg, positive)
    neg_eosin = 0.22 + 0.06 * gran + 0.10 * grain
    pos_eosin = 0.30 + 0.16 * gran + 0.12 * grain
    eosin += tumour * ((1 - strength) * neg_eosin + strength * pos_eosin)
    haem += tumour * 0.05
    eosin += ~tissue * (0.015 * grain)

    _draw_nuclei(scene, haem, eosin, ox, oy, w, h, ds)
    od = (
        haem[..., None] * (scene.stains.h_scale * 1.45 * scene.stains.h_od)
        + eosin[..., None] * (scene.stains.e_scale * 0.75 * scene.stains.e_od)
        + 0.02 * scene.stains.residual_od
    )
    rgb = 250.0 * np.exp(-od) + scene.stains.cast_rgb + 6.0 * grain[..., None]
    if margin:
        rgb = ndi.gaussian_filter(rgb, (blur_px, blur_px, 0), mode="nearest")
        rgb = rgb[margin:-margin, margin:-margin]
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


# Patch pixels (nuclei x patch area) drawn at once: a coarse level's one tile covers a whole large slide
# (every nucleus of a 16k² phantom at downsample 64), so nuclei are drawn in chunks of this many pixels.
_PATCH_BUDGET = 1 << 20


def _draw_nuclei(
    scene: PhantomScene, haem: np.ndarray, eosin: np.ndarray, ox: float, oy: float, w: int, h: int, ds: float
) -> None:
    mpp = scene.spec.mpp
    reach = MAX_NUCLEUS_RADIUS_UM / mpp + 2 * ds
    nuc = scene.nuclei(ox - reach, oy - reach, w * ds + 2 * reach, h * ds + 2 * reach)
    n = len(nuc["x"])
    if n == 0:
        return
    half = math.ceil(MAX_NUCLEUS_RADIUS_UM / mpp / ds) + 2
    chunk = max(1, _PATCH_BUDGET // (2 * half + 1) ** 2)
    density = np.zeros(h * w)
    covered = np.zeros(h * w)
    for start in range(0, n, chunk):
        part = {key: values[start : start + chunk] for key, values in nuc.items()}
        flat, part_density, part_inside = _nucleus_patches(part, ox, oy, w, h, ds, mpp, half)
        density += np.bincount(flat, weights=part_density, minlength=h * w)
        covered += np.bincount(flat, weights=part_inside, minlength=h * w)
    haem += density.reshape(h, w).astype(np.float32)
    # Nuclei displace cytoplasm: less eosin under them.
    eosin *= 1 - 0.6 * np.clip(covered.reshape(h, w), 0, 1).astype(np.float32)


def _nucleus_patches(
    nuc: dict[str, np.ndarray], ox: float, oy: float, w: int, h: int, ds: float, mpp: float, half: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each nucleus's patch of pixels in the region: flat pixel index, haematoxylin density and coverage."""
    offs = np.arange(-half, half + 1)
    # Patch pixel centres relative to each nucleus centre, in level-0 px: (n, k, k).
    cx = (nuc["x"] - ox) / ds - 0.5
    cy = (nuc["y"] - oy) / ds - 0.5
    col = np.round(cx).astype(np.int64)[:, None, None] + offs[None, None, :]
    row = np.round(cy).astype(np.int64)[:, None, None] + offs[None, :, None]
    dx = (col - cx[:, None, None]) * ds * mpp
    dy = (row - cy[:, None, None]) * ds * mpp
    ca, sa = np.cos(nuc["angle"])[:, None, None], np.sin(nuc["angle"])[:, None, None]
    u = dx * ca + dy * sa
    v = -dx * sa + dy * ca
    a = nuc["a"][:, None, None]
    b = nuc["b"][:, None, None]
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    edge_um = max(ds * mpp, 0.4)
    inside = 1 / (1 + np.exp(-np.clip((1 - r) * b / edge_um * 2.5, -30, 30)))
    kind = nuc["kind"][:, None, None]
    strength = nuc["s"][:, None, None]
    rim = np.exp(-(((r - 0.85) / 0.13) ** 2))
    nucleolus = np.exp(-((u - 0.25 * a) ** 2 + (v + 0.1 * b) ** 2) / (2 * (0.16 * b) ** 2 + 1e-6))
    fine = math.exp(-((ds * mpp / 1.0) ** 2))  # vesicular detail fades when downsampled
    vesicular = inside * (0.55 + fine * (0.45 * rim + 0.9 * nucleolus - 0.15)) + (1 - fine) * 0.1 * inside
    density = np.select(
        [kind == 0, kind == 2, kind == 3],
        [(1 - strength) * inside * 1.35 + strength * vesicular * 0.95, inside * 1.55, inside * 1.1],
    )
    ok = (row >= 0) & (row < h) & (col >= 0) & (col < w)
    return (row * w + col)[ok], density[ok], inside[ok]
