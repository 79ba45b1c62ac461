"""PD-L1 immunohistochemistry scoring: DAB optical density, membrane intensity grades, TPS and CPS.

Pure functions on numpy arrays. Optical density is base-10 against a white of 255, as QuPath
measures it (``DAB: Mean`` in its cell detection), so the numbers and the 1+/2+/3+ limits read
the same in both. The DAB channel comes from colour deconvolution with the haematoxylin and
DAB vectors QuPath uses by default for an H-DAB image (Ruifrok & Johnston).
"""

from __future__ import annotations

import numpy as np

from inference.results import Cps

# The immune-cell classes of a PD-L1 IHC nuclei model (CPS counts the positive ones). Neither ends in
# "Positive" or "Negative", which QuPath would count into its "Positive %" of tumour cells.
IMMUNE_POSITIVE = "Immune cells: PD-L1 positive"
IMMUNE_NEGATIVE = "Immune cells: PD-L1 negative"
HAEMATOXYLIN_OD = (0.651, 0.701, 0.290)
DAB_OD = (0.269, 0.568, 0.778)
# Membrane DAB (OD) from which a positive tumour cell is 1+, 2+, 3+: the limits QuPath's positive
# cell detection offers for DAB, used until a model's manifest states calibrated ones.
DEFAULT_INTENSITY_LIMITS_OD = (0.2, 0.4, 0.6)


def _deconvolution_matrix() -> np.ndarray:
    h = np.asarray(HAEMATOXYLIN_OD) / np.linalg.norm(HAEMATOXYLIN_OD)
    d = np.asarray(DAB_OD) / np.linalg.norm(DAB_OD)
    residual = np.cross(h, d)
    residual /= np.linalg.norm(residual)
    return np.linalg.inv(np.stack([h, d, residual]))


_UNMIX = _deconvolution_matrix()


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """float32 (..., 3) base-10 optical density of uint8 RGB against a white of 255."""
    if rgb.dtype != np.uint8 or rgb.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB (..., 3), got {rgb.dtype} {rgb.shape}")
    return -np.log10(np.maximum(rgb.astype(np.float32), 1.0) / 255.0)


def dab_density(rgb: np.ndarray) -> np.ndarray:
    """float32 (H, W) DAB optical density by colour deconvolution (0 where there is no brown)."""
    od = optical_density(rgb)
    return np.maximum(od @ _UNMIX.astype(np.float32)[:, 1], 0.0)


def annulus_means(
    image: np.ndarray,
    centres_xy: np.ndarray,
    *,
    inner_px: float,
    outer_px: float,
    percentile: float | None = None,
) -> np.ndarray:
    """Mean (or ``percentile``) of ``image`` (H, W) over the ring ``inner_px <= r <= outer_px`` around each
    centre (N, 2).

    Pixels of the ring outside the image are left out; a centre whose ring lies wholly outside gets NaN.

    >>> img = np.zeros((9, 9), np.float32); img[4, 7] = 8.0
    >>> float(annulus_means(img, np.array([[4.5, 4.5]]), inner_px=2.5, outer_px=3.5)[0]) > 0
    True
    """
    n = len(centres_xy)
    if n == 0:
        return np.zeros(0, np.float64)
    reach = int(np.ceil(outer_px))
    offs = np.arange(-reach, reach + 1)
    dy, dx = np.meshgrid(offs, offs, indexing="ij")
    # Centres are pixel-centre coordinates: pixel (r, c) spans [c, c+1) x [r, r+1).
    col0 = np.floor(centres_xy[:, 0]).astype(np.int64)
    row0 = np.floor(centres_xy[:, 1]).astype(np.int64)
    cols = col0[:, None, None] + dx[None]
    rows = row0[:, None, None] + dy[None]
    dist = np.hypot(cols + 0.5 - centres_xy[:, 0, None, None], rows + 0.5 - centres_xy[:, 1, None, None])
    h, w = image.shape
    use = (dist >= inner_px) & (dist <= outer_px) & (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    if percentile is not None:
        # np.nanpercentile's "linear" rule, on rows sorted once with the pixels off the ring last (inf).
        ring = np.sort(
            np.where(use, image[np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1)], np.inf).reshape(n, -1), axis=1
        )
        count = use.reshape(n, -1).sum(axis=1)
        pos = (np.maximum(count, 1) - 1) * percentile / 100.0
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, np.maximum(count - 1, 0))
        idx = np.arange(n)
        frac = pos - lo
        with np.errstate(invalid="ignore"):
            out = ring[idx, lo] * (1 - frac) + np.where(frac > 0, ring[idx, hi] * frac, 0.0)
        return np.where(count > 0, out, np.nan)
    values = np.where(use, image[np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1)], 0.0)
    count = use.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, values.sum(axis=(1, 2)) / count, np.nan)


def intensity_grades(
    dab_od: np.ndarray, limits_od: tuple[float, float, float] = DEFAULT_INTENSITY_LIMITS_OD
) -> np.ndarray:
    """int64 grade per cell: 0 below the 1+ limit, else 1, 2 or 3 (the last limit it reaches).

    >>> intensity_grades(np.array([0.1, 0.25, 0.45, 0.9]))
    array([0, 1, 2, 3])
    """
    lo, mid, hi = limits_od
    if not lo <= mid <= hi:
        raise ValueError(f"intensity limits must rise (1+ <= 2+ <= 3+), got {limits_od}")
    values = np.nan_to_num(np.asarray(dab_od, np.float64), nan=0.0)
    return np.digitize(values, [lo, mid, hi]).astype(np.int64)


def combined_positive_score(positive_tumour: int, positive_immune: int, tumour: int) -> Cps:
    """CPS: PD-L1 stained tumour and immune cells per 100 viable tumour cells, capped at 100.

    >>> combined_positive_score(30, 20, 100).percent
    50.0
    >>> combined_positive_score(90, 40, 100).percent
    100.0
    >>> combined_positive_score(0, 3, 0).percent is None
    True
    """
    percent = None if tumour == 0 else min(100.0, 100.0 * (positive_tumour + positive_immune) / tumour)
    return Cps(positive_tumour, positive_immune, tumour, percent)


def h_score(grades: np.ndarray) -> float | None:
    """H-score of tumour cells graded 0-3: sum over grades of grade x % of cells, 0 to 300.

    >>> h_score(np.array([0, 1, 2, 3]))
    150.0
    """
    grades = np.asarray(grades)
    if grades.size == 0:
        return None
    return float(sum(g * 100.0 * (grades == g).mean() for g in (1, 2, 3)))
