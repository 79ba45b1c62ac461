"""Tissue detection on a low-resolution RGB image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage import filters, morphology

# Saturation below this is glass or dust whatever Otsu says: keeps an all-background
# image from splitting its noise into "tissue".
MIN_SATURATION = 0.05


@dataclass(frozen=True)
class TissueMask:
    """bool mask (height, width) of tissue; one mask pixel spans ``downsample`` level-0 px."""

    mask: np.ndarray
    downsample: float

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def detect_tissue(rgb: np.ndarray, *, min_object_px: int = 16, max_hole_px: int = 16) -> np.ndarray:
    """bool mask of tissue in an RGB uint8 image (height, width, 3).

    Otsu's threshold on HSV saturation (stained tissue is coloured, glass is grey), never
    below ``MIN_SATURATION``; then a small closing, objects under ``min_object_px`` removed
    and holes under ``max_hole_px`` filled.

    >>> rgb = np.full((32, 32, 3), 245, np.uint8); rgb[8:24, 8:24] = (180, 90, 160)
    >>> int(detect_tissue(rgb).sum())
    256
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected RGB (height, width, 3), got shape {rgb.shape}")
    img = rgb.astype(np.float32)
    vmax = img.max(axis=2)
    vmin = img.min(axis=2)
    saturation = np.where(vmax > 0, (vmax - vmin) / np.maximum(vmax, 1), 0.0)
    if saturation.max() - saturation.min() < 1e-6:
        threshold = MIN_SATURATION
    else:
        threshold = max(float(filters.threshold_otsu(saturation)), MIN_SATURATION)
    mask = saturation > threshold
    mask = ndi.binary_closing(mask, structure=np.ones((3, 3)), border_value=0) | mask
    mask = morphology.remove_small_objects(mask, max_size=max(min_object_px - 1, 0))
    mask = morphology.remove_small_holes(mask, max_size=max(max_hole_px - 1, 0))
    return mask


def tissue_mask_for_slide(slide, *, mpp: float = 8.0) -> TissueMask:
    """Detect tissue on a thumbnail of ``slide`` (an :class:`inference.slides.slide.Slide`) at ``mpp``."""
    thumb = slide.thumbnail(mpp=mpp)
    width, _ = slide.dimensions
    return TissueMask(mask=detect_tissue(thumb), downsample=width / thumb.shape[1])
