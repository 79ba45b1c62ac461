"""Register a PD-L1 IHC section to the H&E of the next section of the same block (issue #31).

The two stains look different (H&E: eosin and haematoxylin; IHC: haematoxylin and DAB, no
eosin), so the images are compared on signals both share: the tissue mask and the haematoxylin
density (colour deconvolution with the Ruifrok H/E/DAB vectors, which puts DAB aside), smoothed.
At a low resolution (8-16 µm/px):

1. a coarse search over rotations about the tissue centroids, each with the translation of best
   tissue overlap (FFT cross-correlation of the smoothed masks);
2. an affine refinement (6 parameters) maximising the normalised cross-correlation of both
   signals, coarse to fine over a small pyramid.

The tissue mask is the union of :func:`~inference.slides.tissue.detect_tissue` (saturation) and
an optical density against the glass; the glass colour is the commonest colour of the brighter
pixels, not the brightest value of each channel: a colour cast tints the glass, and the
per-channel brightest values then come from different pixels (blue tissue's blue, say), which
put the tinted glass above the density threshold and made the whole image "tissue". That, not
the haematoxylin vector, was what failed on strongly shifted stains (phantom shift 0.8-1.0):
with the glass taken right, rgb2hed's fixed haematoxylin vector correlates 0.88-0.94 between
the sections; the optical-density sum and the first principal component of the optical density
were measured in its place and correlate a little less (0.84-0.92), with the same errors.

The result says how well it went without any truth: the tissue Dice, the correlation of the
haematoxylin density, and the mean distance between the two tissue boundaries (µm), and it is
``ok`` only where those are plausible for two sections of one block. On phantom pairs, right
registrations correlate 0.87 or more, while unrelated sections of similar shapes, forced onto
each other, reach about 0.5 (and fill each other's outline: Dice up to 0.95), hence
:data:`MIN_STRUCTURE_NCC` of 0.6.

Coordinates are continuous pixel coordinates (x, y) as in openslide and QuPath: pixel (i, j)
spans [i, i + 1) x [j, j + 1), so its centre is (i + 0.5, j + 0.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage as ndi
from scipy import signal
from skimage.color import rgb2hed
from skimage.transform import downscale_local_mean

from inference.slides.tissue import tissue_mask

# Plausibility of a registration of two sections of one block.
MIN_TISSUE_PX = 64  # fewer tissue pixels than this (at the working resolution) is "no tissue"
MIN_DICE = 0.80  # tissue overlap after registration
MIN_STRUCTURE_NCC = 0.60  # correlation of the haematoxylin density after registration (see the module doc)
SCALE_RANGE = (0.85, 1.18)  # per axis; sections shrink or stretch by a few percent, not more
MAX_SHEAR = 0.12
# The coarse search runs on images of at most this many px per side, the refinement up to this one.
COARSE_SIZE_PX = 160
REFINE_SIZE_PX = 640


@dataclass(frozen=True)
class Registration:
    """An affine map from MOVING to FIXED pixel coordinates and how well it fits.

    Attributes
    ----------
    matrix
        float64 (2, 3): ``[x_f, y_f] = matrix[:, :2] @ [x_m, y_m] + matrix[:, 2]``, continuous
        pixel coordinates (pixel (i, j) spans [i, i + 1)) of the moving and the fixed image. From
        :func:`register_slides` they are level-0 px of each slide; from :func:`register_pair`,
        px of the arrays given.
    fixed_mpp, moving_mpp
        µm per unit of the fixed and of the moving coordinates.
    error_um
        Mean symmetric distance between the two tissue boundaries after registration, µm
        (boundaries at an image's edge are left out); NaN where there is nothing to measure.
    dice
        Dice of the two tissue masks after registration, where both images have pixels.
    structure_ncc
        Normalised cross-correlation of the haematoxylin density on tissue after registration.
    ok
        True when the result is plausible for two sections of one block; ``reason`` says why not.
    registered_mpp
        µm/px of the images the registration was computed on (:func:`register_slides` reads small
        images finer than asked); NaN where not recorded.
    """

    matrix: np.ndarray
    fixed_mpp: float
    moving_mpp: float
    error_um: float
    dice: float
    structure_ncc: float
    ok: bool
    reason: str = ""
    registered_mpp: float = math.nan

    @property
    def linear_um(self) -> np.ndarray:
        """(2, 2) linear part of the map in µm per µm (free of the two pixel sizes)."""
        return self.matrix[:, :2] * (self.fixed_mpp / self.moving_mpp)

    @property
    def angle_deg(self) -> float:
        """Rotation of the moving section onto the fixed one, degrees (clockwise on screen, y down)."""
        lin = self.linear_um
        return math.degrees(math.atan2(lin[1, 0], lin[0, 0]))

    @property
    def mirrored(self) -> bool:
        """True where the moving section lies mirrored on its slide (face down) against the fixed one."""
        return bool(np.linalg.det(self.matrix[:, :2]) < 0)

    @property
    def scale_xy(self) -> tuple[float, float]:
        """Scale along the moving section's x and y after its rotation is taken out (1 = same size in µm; y is
        negative for a :attr:`mirrored` section)."""
        _, upper = _rotation_and_upper(self.linear_um)
        return float(upper[0, 0]), float(upper[1, 1])

    @property
    def shear(self) -> float:
        """Shear after rotation and scale are taken out (0 = none)."""
        _, upper = _rotation_and_upper(self.linear_um)
        return float(upper[0, 1] / upper[1, 1])

    def apply(self, xy: np.ndarray) -> np.ndarray:
        """Map (N, 2) moving points (x, y) to fixed points, float64 (N, 2).

        >>> reg = Registration(np.array([[1.0, 0, 10], [0, 1, -5]]), 1.0, 1.0, 0.0, 1.0, 1.0, True)
        >>> reg.apply(np.array([[0.0, 0.0], [2.0, 3.0]])).tolist()
        [[10.0, -5.0], [12.0, -2.0]]
        """
        pts = np.asarray(xy, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != 2:
            raise ValueError(f"expected points of shape (N, 2) in (x, y) order, got {pts.shape}")
        return pts @ self.matrix[:, :2].T + self.matrix[:, 2]

    def inverse(self) -> Registration:
        """The map from fixed to moving coordinates, with the same measures of fit."""
        lin_inv = np.linalg.inv(self.matrix[:, :2])
        matrix = np.hstack([lin_inv, (-lin_inv @ self.matrix[:, 2])[:, None]])
        return Registration(
            matrix=matrix,
            fixed_mpp=self.moving_mpp,
            moving_mpp=self.fixed_mpp,
            error_um=self.error_um,
            dice=self.dice,
            structure_ncc=self.structure_ncc,
            ok=self.ok,
            reason=self.reason,
            registered_mpp=self.registered_mpp,
        )


def _rotation_and_upper(lin: np.ndarray) -> tuple[float, np.ndarray]:
    # lin = R(theta) @ upper with upper = [[sx, k], [0, sy]].
    theta = math.atan2(lin[1, 0], lin[0, 0])
    c, s = math.cos(theta), math.sin(theta)
    return theta, np.array([[c, s], [-s, c]]) @ lin


@dataclass(frozen=True)
class _Features:
    mask: np.ndarray  # bool tissue
    signals: np.ndarray  # float32 (2, height, width): smoothed tissue mask, haematoxylin density


def _check_rgb(rgb: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"{name}: expected an RGB uint8 image (height, width, 3), got {arr.dtype} {arr.shape}")
    if min(arr.shape[:2]) < 16:
        raise ValueError(f"{name}: expected at least 16 x 16 px, got {arr.shape[1]} x {arr.shape[0]}")
    return arr


def _features(rgb: np.ndarray, *, mpp: float) -> _Features:
    mask = tissue_mask(rgb, mpp=mpp)
    haem = np.clip(rgb2hed(rgb)[..., 0], 0, None).astype(np.float32)
    on_tissue = haem[mask]
    scale = float(np.percentile(on_tissue, 99)) if on_tissue.size else 0.0
    haem = np.clip(haem / scale, 0, 1.5) if scale > 0 else np.zeros_like(haem)
    haem *= mask  # nothing outside tissue: dust and pen have no counterpart in the other section
    sigma_px = max(8.0 / mpp, 0.5)  # smooth away single nuclei (~8 µm), keep nests and stroma
    signals = np.stack([ndi.gaussian_filter(mask.astype(np.float32), sigma_px), ndi.gaussian_filter(haem, sigma_px)])
    return _Features(mask=mask, signals=signals)


def _reduce(signals: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return signals
    return downscale_local_mean(signals, (1, factor, factor)).astype(np.float32)


def _warp(image: np.ndarray, lin: np.ndarray, offset_c: np.ndarray, out_shape, *, k: float, order: int = 1):
    """Sample ``image`` (a level reduced ``k`` times) at m = lin @ f + offset_c, f and m in level-0 corner coords.

    ``out_shape`` is the fixed image's shape at the same level.
    """
    # Level index coords: f0 = k (fi + 0.5); mi = m0 / k - 0.5.
    off_idx = lin @ np.array([0.5, 0.5]) + offset_c / k - 0.5
    # ndimage works in (row, col): swap x and y.
    lin_rc = lin[::-1, ::-1]
    return ndi.affine_transform(image, lin_rc, offset=off_idx[::-1], output_shape=out_shape, order=order, cval=0.0)


def _ncc(a: np.ndarray, b: np.ndarray, weight: np.ndarray) -> float:
    wsum = weight.sum()
    if wsum <= 0:
        return 0.0
    ma, mb = (a * weight).sum() / wsum, (b * weight).sum() / wsum
    da, db = a - ma, b - mb
    den = math.sqrt(float((weight * da * da).sum()) * float((weight * db * db).sum()))
    return float((weight * da * db).sum() / den) if den > 0 else 0.0


def _centroid_xy(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([cols.mean() + 0.5, rows.mean() + 0.5])


def _rot(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]])


def _coarse(fixed: _Features, moving: _Features, *, max_rotation_deg: float, step_deg: float):
    """Fixed->moving map (lin, offset) in level-0 corner coords from a rotation search."""
    shape_max = max(*fixed.mask.shape, *moving.mask.shape)
    k = max(1, math.ceil(shape_max / COARSE_SIZE_PX))
    fs = _reduce(fixed.signals[:1], k)[0]
    ms = _reduce(moving.signals[:1], k)[0]
    cf = _centroid_xy(fixed.mask)
    cm = _centroid_xy(moving.mask)
    pad = max(ms.shape) // 2 + 2
    canvas = np.pad(fs, pad)
    shape = canvas.shape
    fnorm = math.sqrt(float((canvas**2).sum()))
    n_steps = max(1, math.ceil(max_rotation_deg / step_deg))
    angles = np.linspace(-max_rotation_deg, max_rotation_deg, 2 * n_steps + 1)
    results = []
    for angle in angles:
        lin = _rot(math.radians(angle))
        # Canvas corner coords q (at level k) are fixed level-0 coords f = k (q - pad).
        # m = cm + lin (f - cf)  =>  in level-0 terms of q: m = lin (k q) + (cm - lin (cf + k pad)).
        offset = cm - lin @ (cf + k * pad)
        warped = _warp(ms, lin, offset, shape, k=k)
        wnorm = math.sqrt(float((warped**2).sum()))
        if wnorm == 0 or fnorm == 0:
            results.append((0.0, np.zeros(2)))
            continue
        corr = signal.fftconvolve(canvas, warped[::-1, ::-1], mode="same")
        peak = np.unravel_index(int(np.argmax(corr)), corr.shape)
        # "same" keeps the middle of the full correlation: index p is the shift p - n // 2.
        shift_rc = np.array(peak) - np.array(shape) // 2
        results.append((float(corr[peak]) / (fnorm * wnorm), shift_rc[::-1].astype(np.float64)))
    scores = np.array([r[0] for r in results])
    best = int(np.argmax(scores))
    angle = float(angles[best])
    if 0 < best < len(angles) - 1:  # parabola through the best score and its neighbours
        y0, y1, y2 = scores[best - 1 : best + 2]
        den = y0 - 2 * y1 + y2
        if den < 0:
            angle += float(np.clip(0.5 * (y0 - y2) / den, -0.5, 0.5)) * (angles[1] - angles[0])
    shift_xy = results[best][1]
    # Warped moving, shifted by s, matches fixed: fixed f <-> moving cm + lin (f - k s - cf).
    lin = _rot(math.radians(angle))
    offset = cm - lin @ (cf + k * shift_xy)
    return lin, offset, float(scores[best])


def _refine(fixed: _Features, moving: _Features, lin: np.ndarray, offset: np.ndarray):
    """Affine refinement maximising the correlation of both signals (ECC), coarse to fine."""
    shape_max = max(*fixed.mask.shape, *moving.mask.shape)
    k_fine = max(1, math.ceil(shape_max / REFINE_SIZE_PX))
    factors = [k_fine * 4, k_fine * 2, k_fine] if shape_max / k_fine >= 128 else [k_fine * 2, k_fine]
    cf = _centroid_xy(fixed.mask)
    radius = max(math.sqrt(fixed.mask.sum() / math.pi), 4.0)
    for k in factors:
        lin, offset = _ecc_level(
            _reduce(fixed.signals, k), _reduce(moving.signals, k), lin, offset, k=k, cf=cf, radius=radius
        )
    return lin, offset


def _ecc_level(fs, ms, lin, offset, *, k: int, cf: np.ndarray, radius: float, max_iter: int = 30):
    """Forward-additive ECC (Evangelidis and Psarakis 2008, as OpenCV's findTransformECC) at one level.

    ``fs`` and ``ms`` are (channels, height, width) signals reduced ``k`` times; the map m = lin f +
    offset is in level-0 corner coords. Parameters are the moving place of the fixed centroid and the
    linear part times the tissue radius, so every step is in px of displacement.
    """
    n_ch, h, w = fs.shape
    rows, cols = np.mgrid[0:h, 0:w]
    # Fixed level-0 corner coords of the level's pixel centres, about the centroid, in radii.
    ux = ((cols + 0.5) * k - cf[0]).ravel() / radius
    uy = ((rows + 0.5) * k - cf[1]).ravel() / radius
    full = np.ones(ms.shape[1:], np.float32)
    t_all = fs.reshape(n_ch, -1).astype(np.float64)
    centre = lin @ cf + offset
    for _ in range(max_iter):
        off = centre - lin @ cf
        valid = (_warp(full, lin, off, (h, w), k=k, order=0) > 0.5).ravel()
        if valid.sum() < 16:
            break
        lin_inv = np.linalg.inv(lin)
        blocks, imgs, temps = [], [], []
        for c in range(n_ch):
            warped = _warp(ms[c], lin, off, (h, w), k=k)
            gy, gx = np.gradient(warped)
            # Gradient of the moving image at the warped place (level px per level px of moving).
            mgx = (gx * lin_inv[0, 0] + gy * lin_inv[1, 0]).ravel()[valid]
            mgy = (gx * lin_inv[0, 1] + gy * lin_inv[1, 1]).ravel()[valid]
            u, v = ux[valid], uy[valid]
            jac = np.stack([mgx * u, mgx * v, mgy * u, mgy * v, mgx, mgy], axis=1)
            i_vec = warped.ravel()[valid].astype(np.float64)
            t_vec = t_all[c][valid]
            blocks.append(jac - jac.mean(axis=0))
            imgs.append(i_vec - i_vec.mean())
            temps.append(t_vec - t_vec.mean())
        jac, img, tmp = np.concatenate(blocks), np.concatenate(imgs), np.concatenate(temps)
        hess = jac.T @ jac
        try:
            hess_inv = np.linalg.inv(hess + 1e-9 * np.trace(hess) * np.eye(6))
        except np.linalg.LinAlgError:
            break
        img_proj, tmp_proj = jac.T @ img, jac.T @ tmp
        lam_n = img @ img - img_proj @ hess_inv @ img_proj
        lam_d = tmp @ img - tmp_proj @ hess_inv @ img_proj
        if lam_d <= 0:  # the images are not correlated here: no step increases the correlation
            break
        delta = hess_inv @ (jac.T @ (lam_n / lam_d * tmp - img))
        step = np.clip(delta, -2.0, 2.0)  # level px: keep a bad step from jumping off
        lin = lin + step[:4].reshape(2, 2) * (k / radius)
        centre = centre + step[4:] * k
        if np.abs(step).max() < 0.01:
            break
    return lin, centre - lin @ cf


def _boundary(mask: np.ndarray, inside: np.ndarray) -> np.ndarray:
    # Edge pixels of the mask; the image frame is no tissue boundary (border_value=1), nor is the
    # edge of where the other image has pixels (``inside``, eroded).
    edge = mask & ~ndi.binary_erosion(mask, structure=np.ones((3, 3)), border_value=1)
    return edge & ndi.binary_erosion(inside, structure=np.ones((3, 3)), iterations=2, border_value=0)


def _fit_measures(fixed: _Features, moving: _Features, lin, offset, *, mpp: float) -> tuple[float, float, float]:
    shape = fixed.mask.shape
    warped_mask = _warp(moving.mask.astype(np.float32), lin, offset, shape, k=1) > 0.5
    inside = _warp(np.ones(moving.mask.shape, np.float32), lin, offset, shape, k=1, order=0) > 0.5
    fm, mm = fixed.mask & inside, warped_mask & inside
    total = fm.sum() + mm.sum()
    dice = float(2 * (fm & mm).sum() / total) if total else 0.0
    haem_w = _warp(moving.signals[1], lin, offset, shape, k=1)
    union = (fm | mm).astype(np.float32)
    ncc = _ncc(fixed.signals[1], haem_w, union)
    edge_f, edge_m = _boundary(fixed.mask, inside), _boundary(warped_mask, inside)
    if not edge_f.any() or not edge_m.any():
        return dice, ncc, float("nan")
    dist_to_m = ndi.distance_transform_edt(~edge_m)[edge_f]
    dist_to_f = ndi.distance_transform_edt(~edge_f)[edge_m]
    error_um = float((dist_to_m.sum() + dist_to_f.sum()) / (dist_to_m.size + dist_to_f.size)) * mpp
    return dice, ncc, error_um


def register_pair(
    fixed_rgb: np.ndarray,
    moving_rgb: np.ndarray,
    *,
    mpp: float,
    max_rotation_deg: float = 15.0,
    rotation_step_deg: float = 2.0,
    any_orientation: bool = True,
) -> Registration:
    """Register ``moving_rgb`` (e.g. the IHC) onto ``fixed_rgb`` (e.g. the H&E): rigid search, then affine.

    Parameters
    ----------
    fixed_rgb, moving_rgb
        RGB uint8 (height, width, 3) whole sections at the same ``mpp``, 8-16 µm/px suits; their sizes may differ.
    mpp
        µm per pixel of both images.
    max_rotation_deg, rotation_step_deg
        The coarse search tries rotations within ±``max_rotation_deg`` every ``rotation_step_deg``
        (180 searches every orientation); the refinement then moves freely.
    any_orientation
        Where no fit within ``max_rotation_deg`` is plausible, also search every rotation, and the moving
        section mirrored (sections are laid turned on the slide, and now and then face down); the most
        plausible fit of those is taken (:attr:`Registration.mirrored` says which).

    Returns
    -------
    Registration
        ``matrix`` maps moving px to fixed px (continuous coords, pixel (i, j) spans [i, i + 1)).
        Never raises for images that merely do not match: ``ok`` is False with a ``reason``.

    Raises
    ------
    ValueError
        For arrays that are not RGB uint8 images of at least 16 x 16 px, or a bad ``mpp`` or search range.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> img = np.full((96, 96, 3), 240, np.uint8)
    >>> img[20:76, 24:70] = (150, 60, 150)
    >>> img[40:60, 30:50] = (90, 40, 140)
    >>> reg = register_pair(img, np.roll(img, (5, -3), axis=(0, 1)), mpp=8.0)
    >>> reg.ok, np.round(reg.matrix[:, 2]).tolist()
    (True, [3.0, -5.0])
    """
    fixed_rgb = _check_rgb(fixed_rgb, "fixed_rgb")
    moving_rgb = _check_rgb(moving_rgb, "moving_rgb")
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number of µm per pixel, got {mpp}")
    if not (0 <= max_rotation_deg <= 180 and rotation_step_deg > 0):
        raise ValueError(
            f"expected 0 <= max_rotation_deg <= 180 and rotation_step_deg > 0, got {max_rotation_deg}, "
            f"{rotation_step_deg}"
        )
    identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    fixed, moving = _features(fixed_rgb, mpp=mpp), _features(moving_rgb, mpp=mpp)
    for name, feats in (("fixed", fixed), ("moving", moving)):
        n_tissue = int(feats.mask.sum())
        if n_tissue < MIN_TISSUE_PX:
            reason = (
                f"no tissue found in the {name} image ({n_tissue} tissue px at {mpp:g} µm/px, "
                f"at least {MIN_TISSUE_PX} needed): check the slide and the region read"
            )
            return Registration(identity, mpp, mpp, float("nan"), 0.0, 0.0, ok=False, reason=reason)
    reg = _search(fixed, moving, mpp=mpp, max_rotation_deg=max_rotation_deg, step_deg=rotation_step_deg)
    if reg.ok or not any_orientation:
        return reg
    # Judged as found (scale and shear of the unmirrored fit), then the mirroring composed in.
    face_down = _Features(mask=moving.mask[:, ::-1].copy(), signals=moving.signals[:, :, ::-1].copy())
    tries = [_mirrored(_search(fixed, face_down, mpp=mpp, max_rotation_deg=180.0, step_deg=rotation_step_deg), moving)]
    if max_rotation_deg < 180:  # else the first search was this one
        tries.append(_search(fixed, moving, mpp=mpp, max_rotation_deg=180.0, step_deg=rotation_step_deg))
    plausible = [r for r in tries if r.ok]
    if plausible:
        return max(plausible, key=lambda r: r.structure_ncc)
    return replace(reg, reason=f"{reg.reason} (every rotation and the mirror image were searched too)")


def _search(fixed: _Features, moving: _Features, *, mpp: float, max_rotation_deg: float, step_deg: float):
    """One rotation search and its refinement, measured and judged: the moving -> fixed registration."""
    lin, offset, _ = _coarse(fixed, moving, max_rotation_deg=max_rotation_deg, step_deg=step_deg)
    lin, offset = _refine(fixed, moving, lin, offset)
    dice, ncc, error_um = _fit_measures(fixed, moving, lin, offset, mpp=mpp)
    # The fitted map is fixed -> moving; the result is its inverse, moving -> fixed.
    lin_mf = np.linalg.inv(lin)
    matrix = np.hstack([lin_mf, (-lin_mf @ offset)[:, None]])
    reg = Registration(matrix, mpp, mpp, error_um, dice, ncc, True)
    return Registration(matrix, mpp, mpp, error_um, dice, ncc, *_judge(reg))


def _mirrored(reg: Registration, moving: _Features) -> Registration:
    """``reg`` of the moving image mirrored left to right, as a map of the moving image itself: x' = width - x."""
    width = moving.mask.shape[1]
    flip = np.array([[-1.0, 0.0, width], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return replace(reg, matrix=(np.vstack([reg.matrix, [0.0, 0.0, 1.0]]) @ flip)[:2])


def _judge(reg: Registration) -> tuple[bool, str]:
    if reg.structure_ncc < MIN_STRUCTURE_NCC:
        return False, (
            f"the haematoxylin patterns do not match after registration (correlation {reg.structure_ncc:.2f}, at "
            f"least {MIN_STRUCTURE_NCC} expected): the sections may not be of the same block"
        )
    (sx, sy), shear = reg.scale_xy, reg.shear
    if not (SCALE_RANGE[0] <= sx <= SCALE_RANGE[1] and SCALE_RANGE[0] <= sy <= SCALE_RANGE[1]):
        return False, (
            f"implausible scale {sx:.3f} x {sy:.3f} between the sections (expected {SCALE_RANGE[0]}-"
            f"{SCALE_RANGE[1]}): the sections may not be of the same block, or a slide's µm/px is wrong"
        )
    if abs(shear) > MAX_SHEAR:
        return False, f"implausible shear {shear:.3f} (at most {MAX_SHEAR}): the sections may not be of the same block"
    if reg.dice < MIN_DICE:
        return False, (
            f"tissue overlap after registration is Dice {reg.dice:.2f} (at least {MIN_DICE} expected): the "
            "sections may not be of the same block, or tissue is missing from one of them"
        )
    return True, ""


# Registration needs pixels to find structure in: a 1 mm field at 8 µm/px is 128 px across, and a 2048² phantom
# pair (0.5 µm/px) registered there at 27.5 µm median error against 17.3 at 4 µm/px. An image narrower than this
# at the asked µm/px is read finer; the 4096² held-out pairs (256 px at 8 µm/px) gained nothing at 4 µm/px.
MIN_REGISTRATION_PX = 256


def register_slides(fixed, moving, *, mpp: float = 8.0, **options) -> Registration:
    """Register two :class:`~inference.slides.slide.Slide` s read whole at ``mpp`` µm/px.

    The matrix maps level-0 px of ``moving`` to level-0 px of ``fixed``, each at its own µm/px.
    Finer than ``mpp`` where the narrower image would be under :data:`MIN_REGISTRATION_PX` across;
    where a slide's own pixels are coarser, both are read at that coarser size.
    ``options`` go to :func:`register_pair`.
    """
    narrowest_um = min(min(s.dimensions) * s.mpp.mean for s in (fixed, moving))
    work_mpp = max(min(mpp, narrowest_um / MIN_REGISTRATION_PX), fixed.mpp.mean, moving.mpp.mean)
    fixed_rgb, moving_rgb = fixed.thumbnail(mpp=work_mpp), moving.thumbnail(mpp=work_mpp)
    reg = register_pair(fixed_rgb, moving_rgb, mpp=work_mpp, **options)
    # level-0 = D @ work px, with D each slide's downsample per axis (from the shape, as it was read).
    d_f = np.diag([fixed.dimensions[0] / fixed_rgb.shape[1], fixed.dimensions[1] / fixed_rgb.shape[0]])
    d_m = np.diag([moving.dimensions[0] / moving_rgb.shape[1], moving.dimensions[1] / moving_rgb.shape[0]])
    lin = d_f @ reg.matrix[:, :2] @ np.linalg.inv(d_m)
    matrix = np.hstack([lin, (d_f @ reg.matrix[:, 2])[:, None]])
    return Registration(
        matrix=matrix,
        fixed_mpp=fixed.mpp.mean,
        moving_mpp=moving.mpp.mean,
        error_um=reg.error_um,
        dice=reg.dice,
        structure_ncc=reg.structure_ncc,
        ok=reg.ok,
        reason=reg.reason,
        registered_mpp=work_mpp,
    )
