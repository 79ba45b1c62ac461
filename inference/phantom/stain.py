"""Stains of a phantom: H&E and haematoxylin-DAB optical-density vectors, their per-slide variation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Ruifrok & Johnston optical-density vectors (per unit concentration).
H_OD = np.array([0.65, 0.70, 0.29])
E_OD = np.array([0.07, 0.99, 0.11])
RESIDUAL_OD = np.array([0.27, 0.57, 0.78])


@dataclass(frozen=True)
class Stains:
    """One slide's stain vectors, dye scales, colour cast, blur and JPEG quality."""

    h_od: np.ndarray
    e_od: np.ndarray
    residual_od: np.ndarray
    h_scale: float
    e_scale: float
    cast_rgb: np.ndarray
    blur_um: float
    jpeg_quality: int


def stains_for(rng: np.random.Generator, shift: float) -> Stains:
    """Stains drawn from ``rng``, moving away from the training domain as ``shift`` (0 to 1) grows."""

    def perturb(v: np.ndarray, amount: float) -> np.ndarray:
        out = np.clip(v + rng.normal(0, amount, 3), 0.02, None)
        return out / np.linalg.norm(out)

    return Stains(
        h_od=perturb(H_OD / np.linalg.norm(H_OD), 0.03 + 0.25 * shift),
        e_od=perturb(E_OD / np.linalg.norm(E_OD), 0.03 + 0.25 * shift),
        residual_od=RESIDUAL_OD,
        h_scale=float(rng.uniform(0.9, 1.1) * (1 + rng.uniform(-0.4, 0.4) * shift)),
        e_scale=float(rng.uniform(0.9, 1.1) * (1 + rng.uniform(-0.4, 0.4) * shift)),
        cast_rgb=rng.normal(0, 2 + 25 * shift, 3),
        blur_um=1.2 * shift,
        jpeg_quality=round(92 - 50 * shift),
    )


# PD-L1 immunohistochemistry: haematoxylin counterstain and DAB chromogen (Ruifrok & Johnston).
DAB_OD = np.array([0.27, 0.57, 0.78])


@dataclass(frozen=True)
class IhcStains:
    """One IHC slide's haematoxylin and DAB vectors, dye scales, background DAB, colour cast, blur and JPEG."""

    h_od: np.ndarray
    dab_od: np.ndarray
    h_scale: float
    dab_scale: float
    background_dab: float  # DAB concentration over stroma (non-specific staining)
    cast_rgb: np.ndarray
    blur_um: float
    jpeg_quality: int
    tumour_background_dab: float  # DAB concentration over tumour nests, negative cells included


def ihc_stains_for(rng: np.random.Generator, shift: float) -> IhcStains:
    """IHC stains drawn from ``rng``, moving away from the training domain as ``shift`` (0 to 1) grows."""

    def perturb(v: np.ndarray, amount: float) -> np.ndarray:
        out = np.clip(v + rng.normal(0, amount, 3), 0.02, None)
        return out / np.linalg.norm(out)

    return IhcStains(
        h_od=perturb(H_OD / np.linalg.norm(H_OD), 0.03 + 0.25 * shift),
        dab_od=perturb(DAB_OD / np.linalg.norm(DAB_OD), 0.02 + 0.06 * shift),  # DAB stays brown: its hue moves less
        h_scale=float(rng.uniform(0.9, 1.1) * (1 + rng.uniform(-0.4, 0.4) * shift)),
        dab_scale=float(rng.uniform(0.9, 1.1) * (1 + rng.uniform(-0.35, 0.35) * shift)),
        background_dab=float(rng.uniform(0.01, 0.04) + rng.uniform(0.0, 0.12) * shift),
        cast_rgb=rng.normal(0, 2 + 12 * shift, 3),  # half the H&E's: brown must stay brown
        blur_um=1.2 * shift,
        jpeg_quality=round(92 - 50 * shift),
        # Drawn last, so the other draws stay those of a seed before it was added. Real negative tumour cells are
        # rarely DAB-free (a real Ki67 tile's read 0.07-0.14 OD on the membrane ring): a model that saw only clean
        # negatives called such cells positive.
        tumour_background_dab=float(rng.uniform(0.0, 0.2)),
    )
