"""Tissue detection on a low-resolution RGB image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage import filters, morphology

# Saturation below this is glass or dust whatever Otsu says: keeps an all-background
# image from splitting its noise into "tissue".
MIN_SATURATION = 0.05
MIN_TISSUE_OD = 0.12  # summed over R, G, B (natural log); glass is about 0.04, a pale counterstain 0.15
MAX_HOLE_UM2 = 150.0**2  # holes and specks of tissue smaller than this are filled or dropped
GLASS_BIN = 8  # colour bins (levels per channel) in which the glass colour is the commonest one
MIN_GLASS_LEVEL = 200.0  # per channel
# How each stain's tissue is found: by optical density for both. A PD-L1 IHC's pale counterstain has little
# saturation: on held-out IHC phantoms saturation kept 45-88 % of the tissue (88-100 % of the tumour),
# optical density 99.7-100 % (precision 0.95-0.97 against 0.997-1.0). Stain-shifted H&E loses its pale
# tissue the same way: saturation kept 47.5 % of h207's tissue (shift 0.7) and 46 % of he_238's (0.5),
# optical density 100 % (h201-h207 all 100 %, precision 0.93-0.96), the truth's tissue redrawn from the
# scene (inference.phantom.truth_tissue).
TISSUE_METHODS = ("saturation", "od")
# Suspect tissue detection (a review reason): absorbing area the mask leaves out, summed OD from
# FAINT_TISSUE_OD up (above glass noise), outside the mask and the 2 px next to it, specks dropped, as a share
# of the tissue found. Measured on 164 phantoms (calibration c600-c629 and c700-c729, held-out he_/ihc_231-242,
# stain-detection seeds 400-439, both stains, shifts 0-1) against their truth's tissue: the OD mask kept
# >= 97 % of every slide's tissue and its share was at most 0.039; the saturation mask (the detector that
# once lost pale tissue) kept < 80 % on 64 slides, of which a limit of 0.1 flags 51 (0.05: 58, 0.2: 42),
# and none of the 100 where it kept more. Neither real H&E image is flagged with the OD mask.
FAINT_TISSUE_OD = 0.06
MAX_FAINT_SHARE = 0.1
MIN_FAINT_OBJECT_PX = 21
# Less tissue than this share of the analysed area: nothing meaningful to score (empty glass, a blank ROI).
MIN_TISSUE_FRACTION = 0.01
TISSUE_METHOD_OF_STAIN = {"H&E": "od", "H-DAB": "od"}


@dataclass(frozen=True)
class TissueMask:
    """bool mask (height, width) of tissue; one mask pixel spans ``downsample`` level-0 px."""

    mask: np.ndarray
    downsample: float
    # Absorbing area left out of ``mask`` (same grid), see :func:`faint_tissue`; None when not looked for.
    faint: np.ndarray | None = None

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def tissue_review_reasons(tissue: TissueMask, *, within: np.ndarray | None = None) -> list[dict]:
    """Review reasons of a suspect tissue detection, each with value and limit (empty when none).

    ``within`` (bool, the mask's grid) limits both checks to the analysed area (an ROI). Almost no
    tissue found (below :data:`MIN_TISSUE_FRACTION` of the area) and faintly absorbing area outside the
    tissue mask reaching :data:`MAX_FAINT_SHARE` of the tissue found (tissue the detector may have lost).
    """
    area = np.ones(tissue.mask.shape, bool) if within is None else within
    n_area = int(area.sum())
    if n_area == 0:
        return []
    n_tissue = int((tissue.mask & area).sum())
    reasons = []
    fraction = n_tissue / n_area
    if fraction < MIN_TISSUE_FRACTION:
        reasons.append(
            {
                "reason": "suspect tissue detection: almost no tissue found",
                "value": fraction,
                "limit": MIN_TISSUE_FRACTION,
            }
        )
    if tissue.faint is not None and n_tissue > 0:
        share = int((tissue.faint & area).sum()) / n_tissue
        if share >= MAX_FAINT_SHARE:
            reasons.append(
                {
                    "reason": "suspect tissue detection: faintly stained area left out (share of the tissue)",
                    "value": share,
                    "limit": MAX_FAINT_SHARE,
                }
            )
    return reasons


def detect_tissue(
    rgb: np.ndarray, *, min_object_px: int = 16, max_hole_px: int = 16, known: np.ndarray | None = None
) -> np.ndarray:
    """bool mask of tissue in an RGB uint8 image (height, width, 3).

    Otsu's threshold on HSV saturation (stained tissue is coloured, glass is grey), never
    below ``MIN_SATURATION``; then a small closing, objects under ``min_object_px`` removed
    and holes under ``max_hole_px`` filled. ``known`` (bool, same grid; None: all) are the pixels that are the
    image's: the threshold is taken over them alone (an upload's white fill would weigh in as glass).

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
    values = saturation if known is None else saturation[known]
    if values.size == 0 or values.max() - values.min() < 1e-6:
        threshold = MIN_SATURATION
    else:
        threshold = max(float(filters.threshold_otsu(values)), MIN_SATURATION)
    mask = saturation > threshold
    mask = ndi.binary_closing(mask, structure=np.ones((3, 3)), border_value=0) | mask
    mask = morphology.remove_small_objects(mask, max_size=max(min_object_px - 1, 0))
    mask = morphology.remove_small_holes(mask, max_size=max(max_hole_px - 1, 0))
    return mask


def tissue_mask(rgb: np.ndarray, *, mpp: float, unknown: np.ndarray | None = None) -> np.ndarray:
    """bool tissue mask for either stain: saturated (:func:`detect_tissue`) or absorbing light.

    An IHC with a pale counterstain and strong DAB splits :func:`detect_tissue`'s Otsu threshold
    between DAB and the rest, so tissue is also where the optical density (summed over R, G, B,
    against the glass colour of :func:`_glass_rgb`) exceeds :data:`MIN_TISSUE_OD`.

    ``unknown`` (bool, same grid; None: none) are pixels that are not the image's (an uploaded region's
    transparent surround, read as white): never tissue, left out of the glass colour and the thresholds, and
    like the image's edge for the speck and hole rules, since tissue there may go on beyond them.

    >>> rgb = np.full((64, 64, 3), 255, np.uint8); rgb[20:40, 20:40] = (180, 90, 160)  # 40 µm of tissue
    >>> unknown = np.ones((64, 64), bool); unknown[20:40, 20:40] = False  # uploaded with all else transparent
    >>> int(tissue_mask(rgb, mpp=2.0).sum()), int(tissue_mask(rgb, mpp=2.0, unknown=unknown).sum())
    (0, 400)
    """
    known = None if unknown is None else ~unknown
    mask = detect_tissue(rgb, known=known) | (_smoothed_od(rgb, known=known) > MIN_TISSUE_OD)
    mask = ndi.binary_opening(mask, structure=np.ones((3, 3)))
    if known is not None:
        mask &= known
    max_px = max(round(MAX_HOLE_UM2 / mpp**2), 1)
    mask |= _small_inner(~mask, max_px, open_to=unknown)  # holes
    mask &= ~_small_inner(mask, max_px, open_to=unknown)  # specks
    return mask if known is None else mask & known


def _small_inner(mask: np.ndarray, max_px: int, *, open_to: np.ndarray | None = None) -> np.ndarray:
    """The components of ``mask`` (4-connected, as scikit-image's remove_small_objects) of at most ``max_px`` pixels
    that touch neither the image's edge nor ``open_to`` (bool, same grid: pixels whose content is not known).

    One that touches them may go on beyond them, so its size is not known: a region or tile smaller than
    :data:`MAX_HOLE_UM2` (a 128 µm tile, an uploaded region) is tissue edge to edge, and as a speck it was all
    dropped ("almost no tissue found"); so was the tissue of an uploaded annotation cut off by its transparent
    surround.
    """
    labels, n = ndi.label(mask)
    if n == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    if open_to is not None and open_to.any():
        beside = ndi.binary_dilation(open_to, structure=np.ones((3, 3)))
        edge = np.union1d(edge, np.unique(labels[beside]))
    small = sizes <= max_px
    small[0] = False
    small[edge] = False
    return small[labels]


def faint_tissue(rgb: np.ndarray, mask: np.ndarray, *, unknown: np.ndarray | None = None) -> np.ndarray:
    """bool: faintly absorbing area (summed OD from :data:`FAINT_TISSUE_OD` up) outside ``mask``, specks dropped.

    The 2 px next to the mask are left out: the smoothed OD of a stained edge spills into them; so are
    ``unknown`` pixels (see :func:`tissue_mask`).
    """
    near = ndi.binary_dilation(mask, structure=np.ones((3, 3)), iterations=2)
    known = None if unknown is None else ~unknown
    faint = (_smoothed_od(rgb, known=known) >= FAINT_TISSUE_OD) & ~near
    if known is not None:
        faint &= known
    return morphology.remove_small_objects(faint, max_size=MIN_FAINT_OBJECT_PX - 1)


def _smoothed_od(rgb: np.ndarray, *, known: np.ndarray | None = None) -> np.ndarray:
    """Optical density summed over R, G, B against the glass colour, smoothed by 1 px (noise).

    Only ``known`` pixels (None: all) tell the glass colour, and the others are read as glass: an upload's white
    surround, taken for the glass, made a slide's real glass absorb (0.1 summed OD at (247, 249, 246)).
    """
    img = rgb.astype(np.float32)
    if known is not None and not known.any():
        return np.zeros(img.shape[:2], np.float32)
    glass = _glass_rgb(img if known is None else img[known])
    if known is not None:
        img[~known] = glass
    return ndi.gaussian_filter(np.clip(-np.log((img + 1) / (glass + 1)), 0, None).sum(axis=2), 1.0)


def _glass_rgb(img: np.ndarray) -> np.ndarray:
    """Colour of the glass: the commonest colour among the brighter half of the pixels.

    Glass is one even colour, tissue a texture of many, so the commonest colour (in bins of
    :data:`GLASS_BIN` levels) is glass even where a colour cast makes it darker, by its sum
    over R, G, B, than the palest tissue. Never darker than :data:`MIN_GLASS_LEVEL` per channel,
    so that an image with no glass does not take its tissue for glass.
    """
    flat = img.reshape(-1, 3)  # (height, width, 3) or (N, 3)
    total = flat.sum(axis=1)
    bright = flat[total >= np.median(total)]
    bins = (bright // GLASS_BIN).astype(np.int64)
    keys = (bins[:, 0] * 256 + bins[:, 1]) * 256 + bins[:, 2]
    values, counts = np.unique(keys, return_counts=True)
    glass = np.median(bright[keys == values[np.argmax(counts)]], axis=0)
    return np.maximum(glass, MIN_GLASS_LEVEL)


def tissue_mask_for_slide(slide, *, mpp: float = 8.0, method: str = "od") -> TissueMask:
    """Detect tissue on a thumbnail of ``slide`` (an :class:`inference.slides.slide.Slide`) at ``mpp``.

    ``method``: ``saturation`` (:func:`detect_tissue`) or ``od`` (:func:`tissue_mask`, which also keeps
    pale, grey, blue and brown tissue); :data:`TISSUE_METHOD_OF_STAIN` says which each stain takes.
    """
    if method not in TISSUE_METHODS:
        raise ValueError(f"tissue method must be one of {TISSUE_METHODS}, got {method!r}")
    thumb = slide.thumbnail(mpp=mpp)
    downsample = slide.dimensions[0] / thumb.shape[1]
    unknown = None
    share = slide.opaque_share(mpp=mpp)
    if share is not None:
        # An uploaded region's transparent pixels came composited over white; a thumbnail pixel that is partly
        # opaque is told by its opaque part (un-premultiplied), one mostly transparent is not known.
        unknown = share < 0.5
        opaque = np.maximum(share, 0.5)[..., None]
        rgb = (thumb.astype(np.float32) - 255 * (1 - opaque)) / opaque
        thumb = np.where(unknown[..., None], 255, np.clip(np.rint(rgb), 0, 255)).astype(np.uint8)
    if method == "od":
        mask = tissue_mask(thumb, mpp=slide.mpp.mean * downsample, unknown=unknown)
    else:
        mask = detect_tissue(thumb, known=None if unknown is None else ~unknown)
        mask = mask if unknown is None else mask & ~unknown
    return TissueMask(mask=mask, downsample=downsample, faint=faint_tissue(thumb, mask, unknown=unknown))
