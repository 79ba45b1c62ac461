"""The QuPath classes pdl1-bridge writes, with their colours (DESIGN.md §3)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PathClassSpec:
    """A QuPath class name and its RGB colour."""

    name: str
    rgb: tuple[int, int, int]

    @property
    def names(self) -> list[str]:
        """QuPath's derived-class parts: ``"Tumor: Positive"`` -> ``["Tumor", "Positive"]``."""
        return [part.strip() for part in self.name.split(":")]


PDL1_POSITIVE = PathClassSpec("PD-L1 positive", (200, 80, 0))
PDL1_FN_CANDIDATE = PathClassSpec("PD-L1 FN candidate", (230, 0, 230))
PDL1_ANALYSIS = PathClassSpec("PD-L1 analysis", (0, 150, 200))
TUMOR_POSITIVE = PathClassSpec("Tumor: Positive", (200, 50, 50))
TUMOR_NEGATIVE = PathClassSpec("Tumor: Negative", (90, 90, 180))
OTHER = PathClassSpec("Other", (255, 200, 0))
# PD-L1 IHC cells. Positive tumour cells carry their membrane intensity as QuPath's graded classes, so
# QuPath's own "Positive %" of the parent is the TPS and its "H-score" ours. Immune cells end in neither
# "Positive" nor "Negative": QuPath would count them into "Positive %" (CPS has its own measurement).
TUMOR_1PLUS = PathClassSpec("Tumor: 1+", (255, 215, 0))
TUMOR_2PLUS = PathClassSpec("Tumor: 2+", (225, 150, 50))
TUMOR_3PLUS = PathClassSpec("Tumor: 3+", (200, 50, 50))
IMMUNE_POSITIVE = PathClassSpec("Immune cells: PD-L1 positive", (160, 60, 160))
IMMUNE_NEGATIVE = PathClassSpec("Immune cells: PD-L1 negative", (60, 160, 160))
INTENSITY_CLASSES = (TUMOR_1PLUS, TUMOR_2PLUS, TUMOR_3PLUS)
# The IHC's positive tumour area registered onto its H&E (pairs): the measured truth beside the prediction.
PDL1_IHC_POSITIVE = PathClassSpec("PD-L1 IHC positive (registered)", (120, 60, 0))
# A lab's own labels (bridge/labels.py): where regions are labelled, explicit negatives, and areas never to train on.
TRAINING_REGION = PathClassSpec("Training region", (0, 160, 255))
PDL1_NEGATIVE = PathClassSpec("PD-L1 negative", (90, 90, 200))
IGNORE = PathClassSpec("Ignore*", (180, 180, 180))

ALL_CLASSES: tuple[PathClassSpec, ...] = (
    PDL1_POSITIVE,
    PDL1_FN_CANDIDATE,
    PDL1_ANALYSIS,
    TUMOR_POSITIVE,
    TUMOR_NEGATIVE,
    OTHER,
    TUMOR_1PLUS,
    TUMOR_2PLUS,
    TUMOR_3PLUS,
    IMMUNE_POSITIVE,
    IMMUNE_NEGATIVE,
    PDL1_IHC_POSITIVE,
    TRAINING_REGION,
    PDL1_NEGATIVE,
    IGNORE,
)
BY_NAME = {c.name: c for c in ALL_CLASSES}


def argb_to_rgb(packed: int) -> tuple[int, int, int]:
    """QuPath stores colours as signed packed ARGB ints (``classes.json``).

    >>> argb_to_rgb(-3670016)
    (200, 0, 0)
    """
    value = packed & 0xFFFFFFFF
    return (value >> 16) & 0xFF, (value >> 8) & 0xFF, value & 0xFF


def rgb_to_argb(rgb: tuple[int, int, int]) -> int:
    """Inverse of :func:`argb_to_rgb`, opaque.

    >>> rgb_to_argb((200, 0, 0))
    -3670016
    """
    r, g, b = rgb
    value = (0xFF << 24) | (r << 16) | (g << 8) | b
    return value - (1 << 32) if value >= 1 << 31 else value
