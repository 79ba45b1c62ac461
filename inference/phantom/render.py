"""Draw any region of a phantom scene at any downsample, as an H&E or PD-L1 IHC section is seen in brightfield."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import ndimage as ndi
from scipy.special import erf

from inference.phantom.ihc import MAX_CELL_RADIUS_UM, IhcScene
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
    if len(nuc["x"]) == 0:
        return
    half = math.ceil(MAX_NUCLEUS_RADIUS_UM / mpp / ds) + 2
    density, covered = _summed_patches(
        nuc, lambda part: _nucleus_patches(part, ox, oy, w, h, ds, mpp, half), half=half, shape_hw=(h, w)
    )
    haem += density.astype(np.float32)
    # Nuclei displace cytoplasm: less eosin under them.
    eosin *= 1 - 0.6 * np.clip(covered, 0, 1).astype(np.float32)


def _summed_patches(
    items: dict[str, np.ndarray],
    patches: Callable[[dict[str, np.ndarray]], tuple[np.ndarray, ...]],
    *,
    half: int,
    shape_hw: tuple[int, int],
) -> list[np.ndarray]:
    """Each channel of the items' pixel patches summed into a (h, w) image, :data:`_PATCH_BUDGET` patch
    pixels at a time; ``patches(part)`` gives the flat pixel index and one weight array per channel."""
    h, w = shape_hw
    chunk = max(1, _PATCH_BUDGET // (2 * half + 1) ** 2)
    sums: list[np.ndarray] = []
    for start in range(0, len(items["x"]), chunk):
        flat, *weights = patches({key: values[start : start + chunk] for key, values in items.items()})
        if not sums:
            sums = [np.zeros(h * w) for _ in weights]
        for total, weight in zip(sums, weights, strict=True):
            total += np.bincount(flat, weights=weight, minlength=h * w)
    return [total.reshape(h, w) for total in sums]


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


def render_ihc(scene: IhcScene, x0: int, y0: int, width: int, height: int, downsample: float = 1.0) -> np.ndarray:
    """RGB uint8 (height, width, 3) of the PD-L1 IHC section: pixel (r, c) spans IHC level-0 [x0 + c*ds, ...).

    Haematoxylin counterstain and DAB in Beer-Lambert optical density, the tissue's zones and textures
    read at the section transform of each pixel.
    """
    ds = float(downsample)
    stains = scene.stains
    mpp = scene.spec.mpp
    blur_px = stains.blur_um / mpp / ds
    margin = math.ceil(3 * blur_px) + 1 if blur_px > 0.3 else 0
    ox, oy = x0 - margin * ds, y0 - margin * ds
    w, h = width + 2 * margin, height + 2 * margin
    xg = (ox + (np.arange(w, dtype=np.float64) + 0.5) * ds)[None, :]
    yg = (oy + (np.arange(h, dtype=np.float64) + 0.5) * ds)[:, None]
    tx, ty = scene.scene_xy(xg, yg)
    tissue, tumour, _ = scene.zones(xg, yg)
    noise_scale = 1 / max(ds, 1.0)
    pix = hash_uniform(scene.spec.seed, 140, np.floor(xg / max(ds, 1)), np.floor(yg / max(ds, 1)), int(ds))
    grain = (pix - 0.5) * noise_scale

    # Stroma: the tissue's collagen fibres (read at the transform), pale without eosin.
    ca, sa = math.cos(scene.he.fibre_angle), math.sin(scene.he.fibre_angle)
    along = (tx * ca + ty * sa) * mpp
    across = (-tx * sa + ty * ca) * mpp
    period_um = 9.0
    fade = math.exp(-((ds * mpp / period_um) ** 2) * 4)
    fibres = 0.5 + 0.5 * np.sin(2 * np.pi * across / period_um + 2.5 * np.sin(2 * np.pi * along / 140.0))
    fibres = 0.5 + (fibres - 0.5) * fade
    stroma = tissue & ~tumour
    haem = (stroma * (0.035 + 0.03 * fibres + 0.02 * grain) + tumour * (0.06 + 0.02 * grain)).astype(np.float32)
    dab = stroma * stains.background_dab * (0.6 + 0.8 * fibres) + tumour * stains.tumour_background_dab
    dab = (dab + tissue * 0.01 * grain).astype(np.float32)

    _draw_ihc_cells(scene, haem, dab, ox, oy, w, h, ds)
    od = haem[..., None] * (stains.h_scale * 1.45 * stains.h_od) + dab[..., None] * (stains.dab_scale * stains.dab_od)
    rgb = 250.0 * np.exp(-od) + stains.cast_rgb + 6.0 * grain[..., None]
    if margin:
        rgb = ndi.gaussian_filter(rgb, (blur_px, blur_px, 0), mode="nearest")
        rgb = rgb[margin:-margin, margin:-margin]
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def _draw_ihc_cells(
    scene: IhcScene, haem: np.ndarray, dab: np.ndarray, ox: float, oy: float, w: int, h: int, ds: float
) -> None:
    mpp = scene.spec.mpp
    reach = MAX_CELL_RADIUS_UM / mpp + 2 * ds
    cells = scene.nuclei(ox - reach, oy - reach, w * ds + 2 * reach, h * ds + 2 * reach)
    if len(cells["x"]) == 0:
        return
    half = math.ceil(MAX_CELL_RADIUS_UM / mpp / ds) + 2
    haem_sum, dab_sum = _summed_patches(
        cells, lambda part: _ihc_cell_patches(part, ox, oy, w, h, ds, mpp, half), half=half, shape_hw=(h, w)
    )
    haem += haem_sum.astype(np.float32)
    dab += dab_sum.astype(np.float32)


_RING_SIGMA_UM = 0.5  # membrane ring: Gaussian profile across the membrane, about 1 µm at half maximum


def _ring_mass(radius_um: np.ndarray, sigma_um: float) -> np.ndarray:
    """Integral of exp(-((r - R) / s)^2) r dr over r >= 0: a ring's stain, kept across downsamples."""
    q = radius_um / sigma_um
    return sigma_um**2 / 2 * np.exp(-(q**2)) + radius_um * sigma_um * math.sqrt(math.pi) / 2 * (1 + erf(q))


def _ihc_cell_patches(
    cells: dict[str, np.ndarray], ox: float, oy: float, w: int, h: int, ds: float, mpp: float, half: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each cell's patch of pixels in the region: flat pixel index, haematoxylin and DAB density."""
    offs = np.arange(-half, half + 1)
    cx = (cells["x"] - ox) / ds - 0.5
    cy = (cells["y"] - oy) / ds - 0.5
    col = np.round(cx).astype(np.int64)[:, None, None] + offs[None, None, :]
    row = np.round(cy).astype(np.int64)[:, None, None] + offs[None, :, None]
    dx = (col - cx[:, None, None]) * ds * mpp
    dy = (row - cy[:, None, None]) * ds * mpp

    def per_cell(key: str) -> np.ndarray:
        return cells[key][:, None, None]

    ca, sa = np.cos(per_cell("angle")), np.sin(per_cell("angle"))
    u = dx * ca + dy * sa
    v = -dx * sa + dy * ca
    a, b = per_cell("a"), per_cell("b")
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    edge_um = max(ds * mpp, 0.4)
    inside = 1 / (1 + np.exp(-np.clip((1 - r) * b / edge_um * 2.5, -30, 30)))
    kind, strength = per_cell("kind"), per_cell("s")
    rim = np.exp(-(((r - 0.85) / 0.13) ** 2))
    nucleolus = np.exp(-((u - 0.25 * a) ** 2 + (v + 0.1 * b) ** 2) / (2 * (0.16 * b) ** 2 + 1e-6))
    fine = math.exp(-((ds * mpp / 1.0) ** 2))
    vesicular = inside * (0.55 + fine * (0.45 * rim + 0.9 * nucleolus - 0.15)) + (1 - fine) * 0.1 * inside
    # Counterstain only: nuclei lighter than in H&E.
    haem = 0.75 * np.select(
        [kind == 0, kind == 2, kind == 3],
        [(1 - strength) * inside * 1.35 + strength * vesicular * 0.95, inside * 1.55, inside * 1.1],
        inside * (0.75 + 0.25 * fine * rim),  # macrophage: pale oval nucleus
    )

    # The cell: slightly oval around the nucleus; membrane ring and cytoplasm.
    radius = per_cell("cell_um")
    rc = np.sqrt(dx**2 + dy**2)
    phi = np.arctan2(v, u)
    rc = rc / (1 + 0.08 * np.cos(2 * phi))
    sigma = math.sqrt(_RING_SIGMA_UM**2 + (ds * mpp) ** 2 / 4)
    gain = _ring_mass(cells["cell_um"], _RING_SIGMA_UM) / _ring_mass(cells["cell_um"], sigma)
    ring = np.exp(-(((rc - radius) / sigma) ** 2)) * gain[:, None, None]
    off_arc = np.abs(np.angle(np.exp(1j * (phi - per_cell("arc_at")))))
    arc = 1 / (1 + np.exp(-np.clip((per_cell("arc_half") - off_arc) / 0.12, -30, 30)))
    in_cell = 1 / (1 + np.exp(-np.clip((radius - rc) / edge_um * 2.5, -30, 30)))
    cytoplasm = in_cell * (1 - inside)
    dab = per_cell("ring") * ring * arc + per_cell("cyto") * cytoplasm
    haem = haem + 0.03 * cytoplasm
    ok = (row >= 0) & (row < h) & (col >= 0) & (col < w)
    return (row * w + col)[ok], haem[ok], dab[ok]
