"""Textbook detectors that a trained model has to beat, measured beside it on the same pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.color import rgb2hed
from skimage.feature import blob_log


@dataclass(frozen=True)
class LogParams:
    """Laplacian-of-Gaussian blob detection on haematoxylin: blob sigmas in µm and the LoG threshold."""

    min_sigma_um: float = 2.0
    max_sigma_um: float = 5.0
    threshold: float = 0.1
    num_sigma: int = 5


def haematoxylin(rgb: np.ndarray) -> np.ndarray:
    """float (H, W) haematoxylin density of an RGB uint8 image (colour deconvolution), scaled to about [0, 1].

    Scaled by the 99.5th percentile so that one LoG threshold means the same on light and dark slides.
    """
    h = rgb2hed(rgb)[..., 0]
    low, high = np.percentile(h, [1, 99.5])
    return np.clip((h - low) / max(high - low, 1e-6), 0, 1)


def log_nuclei(rgb: np.ndarray, *, mpp: float, params: LogParams) -> np.ndarray:
    """(N, 2) xy pixel centres of nuclei found as LoG blobs of the haematoxylin channel of ``rgb``.

    ``rgb`` uint8 (H, W, 3) at ``mpp`` µm/px. Positions use the pixel-centre convention of QuPath
    (pixel (0, 0) has its centre at (0.5, 0.5)).

    >>> img = np.full((40, 40, 3), 235, np.uint8)
    >>> yy, xx = np.mgrid[:40, :40]
    >>> img[(yy - 20) ** 2 + (xx - 12) ** 2 < 16] = (60, 40, 120)  # one dark-blue nucleus
    >>> log_nuclei(img, mpp=1.0, params=LogParams(1.5, 4.0, 0.1)).round().tolist()
    [[12.0, 20.0]]
    """
    blobs = blob_log(
        haematoxylin(rgb),
        min_sigma=params.min_sigma_um / mpp,
        max_sigma=params.max_sigma_um / mpp,
        num_sigma=params.num_sigma,
        threshold=params.threshold,
    )
    return blobs[:, [1, 0]].astype(np.float64) + 0.5
