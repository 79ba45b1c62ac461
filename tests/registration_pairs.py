"""Synthetic H&E -> IHC-like section pairs with a known transform, for the registration tests.

An H&E image (a phantom, or any RGB at a known µm/px) is warped by a known map, rigid or affine
plus a smooth displacement field, and its stains are changed to look like a PD-L1 IHC: eosin
dropped, haematoxylin strength changed, DAB added on some of the tissue. The warp is done at
the source's fine resolution and both images are then reduced to the working µm/px, as slides are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.color import hed2rgb, rgb2hed
from skimage.transform import downscale_local_mean

from inference.phantom.render import render
from inference.phantom.scene import PhantomScene, PhantomSpec
from inference.slides.tissue import detect_tissue

FIELD_STEP_UM = 50.0  # grid of the displacement field


def render_he(seed: int, *, size_um: float = 4096.0, mpp: float = 2.0, height_um: float | None = None) -> np.ndarray:
    """A phantom H&E section of ``size_um`` (x ``height_um``) µm at ``mpp`` µm/px (phantom level 0 is 0.5 µm/px)."""
    w0, h0 = round(size_um / 0.5), round((height_um or size_um) / 0.5)
    scene = PhantomScene(PhantomSpec(w0, h0, seed=seed))
    ds = mpp / 0.5
    return render(scene, 0, 0, round(w0 / ds), round(h0 / ds), ds)


def reduce_rgb(rgb: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return rgb
    return np.clip(downscale_local_mean(rgb.astype(np.float32), (factor, factor, 1)) + 0.5, 0, 255).astype(np.uint8)


def background_rgb(rgb: np.ndarray) -> np.ndarray:
    glass = ~detect_tissue(rgb)
    return np.median(rgb[glass], axis=0) if glass.any() else np.full(3, 245.0)


def ihc_like(
    rgb: np.ndarray,
    *,
    seed: int,
    eosin_keep: float = 0.12,
    haem_scale: float = 0.8,
    dab_fraction: float = 0.35,
    dab_strength: float = 0.35,
    brightness: float = 1.0,
) -> np.ndarray:
    """An H&E image restained: eosin scaled by ``eosin_keep``, haematoxylin by ``haem_scale``, DAB on patches."""
    rng = np.random.default_rng(seed)
    hed = rgb2hed(rgb)
    tissue = detect_tissue(rgb)
    hed[..., 0] *= haem_scale
    hed[..., 1] *= eosin_keep
    field = ndi.gaussian_filter(rng.normal(size=rgb.shape[:2]), max(rgb.shape[:2]) / 20)
    patches = (field > np.quantile(field, 1 - dab_fraction)) & tissue
    patches = ndi.gaussian_filter(patches.astype(np.float64), 2.0)
    hed[..., 2] = dab_strength * patches * (0.6 + 0.4 * rng.random(rgb.shape[:2]))
    out = hed2rgb(hed) * 255 * brightness + rng.normal(0, 2.0, rgb.shape)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class SyntheticPair:
    """``fixed`` and ``moving`` RGB at ``mpp``; ``truth`` maps moving px (continuous xy) to fixed px."""

    fixed: np.ndarray
    moving: np.ndarray
    mpp: float
    lin: np.ndarray  # (2, 2) source-resolution linear part, moving -> fixed
    shift_src: np.ndarray
    centre_fixed_src: np.ndarray
    centre_moving_src: np.ndarray
    field_um: np.ndarray  # (2, rows, cols) displacement (x, y) on a FIELD_STEP_UM grid of the moving section
    source_mpp: float

    def truth(self, xy: np.ndarray) -> np.ndarray:
        f = self.mpp / self.source_mpp
        return self._truth_src(np.asarray(xy, np.float64) * f) / f

    def _truth_src(self, m: np.ndarray) -> np.ndarray:
        grid = m * self.source_mpp / FIELD_STEP_UM - 0.5
        disp = np.stack(
            [ndi.map_coordinates(self.field_um[c], [grid[:, 1], grid[:, 0]], order=1, mode="nearest") for c in (0, 1)],
            axis=1,
        )
        return (
            (m - self.centre_moving_src) @ self.lin.T + self.centre_fixed_src + self.shift_src + disp / self.source_mpp
        )

    def tissue_points(self) -> np.ndarray:
        """Centres (N, 2) of moving tissue px whose true place is fixed tissue: where the error is measured."""
        rows, cols = np.nonzero(detect_tissue(self.moving))
        pts = np.stack([cols + 0.5, rows + 0.5], axis=1)
        true = self.truth(pts)
        h, w = self.fixed.shape[:2]
        inside = (true[:, 0] >= 0) & (true[:, 0] < w) & (true[:, 1] >= 0) & (true[:, 1] < h)
        fixed_tissue = detect_tissue(self.fixed)
        keep = inside.copy()
        keep[inside] = fixed_tissue[true[inside, 1].astype(int), true[inside, 0].astype(int)]
        return pts[keep]

    def errors_um(self, reg) -> np.ndarray:
        """Distances (µm) between where ``reg`` and the truth put the moving tissue points."""
        pts = self.tissue_points()
        return np.linalg.norm(reg.apply(pts) - self.truth(pts), axis=1) * self.mpp


def make_pair(
    source: np.ndarray,
    *,
    source_mpp: float,
    mpp: float = 8.0,
    angle_deg: float = 0.0,
    shift_um: tuple[float, float] = (0.0, 0.0),
    scale_xy: tuple[float, float] = (1.0, 1.0),
    shear: float = 0.0,
    deform_um: float = 0.0,
    deform_length_um: float = 700.0,
    moving_size_um: tuple[float, float] | None = None,
    ihc: dict | None = None,
    seed: int = 0,
) -> SyntheticPair:
    """Fixed = ``source`` reduced to ``mpp``; moving = ``source`` warped by the known map and restained.

    The truth maps moving to fixed: f = c_f + L (m - c_m) + shift + d(m), with L a rotation by
    ``angle_deg`` times [[sx, shear * sy], [0, sy]] and d a smooth field of RMS ``deform_um``.
    ``ihc`` (keyword arguments of :func:`ihc_like`) restains the moving image; None keeps H&E.
    """
    factor = round(mpp / source_mpp)
    if abs(factor * source_mpp - mpp) > 1e-6:
        raise ValueError("mpp must be an integer multiple of source_mpp")
    rng = np.random.default_rng(seed)
    h, w = source.shape[:2]
    if moving_size_um is None:
        mw, mh = w, h
    else:
        mw, mh = (round(s / source_mpp / factor) * factor for s in moving_size_um)
    theta = math.radians(angle_deg)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    sx, sy = scale_xy
    lin = rot @ np.array([[sx, shear * sy], [0.0, sy]])
    field_shape = (2, math.ceil(mh * source_mpp / FIELD_STEP_UM) + 1, math.ceil(mw * source_mpp / FIELD_STEP_UM) + 1)
    field = rng.normal(size=field_shape)
    field = np.stack([ndi.gaussian_filter(c, deform_length_um / FIELD_STEP_UM / 2, mode="reflect") for c in field])
    rms = math.sqrt(float((field**2).sum(axis=0).mean()))
    field = field * (deform_um / rms) if rms > 0 else field * 0
    pair = SyntheticPair(
        fixed=reduce_rgb(source, factor),
        moving=np.zeros((1, 1, 3), np.uint8),
        mpp=mpp,
        lin=lin,
        shift_src=np.asarray(shift_um, np.float64) / source_mpp,
        centre_fixed_src=np.array([w / 2, h / 2]),
        centre_moving_src=np.array([mw / 2, mh / 2]),
        field_um=field,
        source_mpp=source_mpp,
    )
    restained = source if ihc is None else ihc_like(source, seed=seed, **ihc)
    cval = background_rgb(restained)
    rows, cols = np.mgrid[0:mh, 0:mw]
    centres = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5], axis=1)
    src_xy = pair._truth_src(centres) - 0.5  # index coordinates of the source
    moving_src = np.stack(
        [
            ndi.map_coordinates(
                restained[..., c].astype(np.float32), [src_xy[:, 1], src_xy[:, 0]], order=1, cval=cval[c]
            )
            for c in range(3)
        ],
        axis=-1,
    ).reshape(mh, mw, 3)
    moving = reduce_rgb(np.clip(moving_src + 0.5, 0, 255).astype(np.uint8), factor)
    return SyntheticPair(**{**pair.__dict__, "moving": moving})
