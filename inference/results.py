"""What the pipeline hands to ``bridge``: frozen dataclasses of numpy arrays, shapely geometry and numbers.

Nothing here imports torch; this is the whole of what crosses the inference/bridge line.
Geometry is in level-0 pixels of the image; areas carry their unit in the name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from shapely.geometry import MultiPolygon, Polygon

# The maps of an ensemble, in the channel order of inference.analysis.uncertainty.ensemble_stats.
MAP_NAMES = ("prob", "predictive_entropy", "expected_entropy", "mutual_information", "prob_std")


@dataclass(frozen=True)
class Tps:
    """Tumour proportion score of one analysed region."""

    positive: int
    negative: int
    percent: float | None
    category: str

    @property
    def tumour(self) -> int:
        return self.positive + self.negative


@dataclass(frozen=True)
class Cps:
    """Combined positive score of a PD-L1 IHC: stained tumour and immune cells per 100 tumour cells, max 100."""

    positive_tumour: int
    positive_immune: int
    tumour: int
    percent: float | None


@dataclass(frozen=True)
class UncertaintyMaps:
    """Per-pixel maps on a grid of ``downsample`` level-0 px per map px, starting at ``origin_xy``.

    All maps are float32 (height, width); ``covered`` is False where no tile predicted
    (outside the ROI/tissue), and the maps hold 0 there. Large maps may be memory-mapped.
    """

    prob: np.ndarray
    predictive_entropy: np.ndarray
    expected_entropy: np.ndarray
    mutual_information: np.ndarray
    prob_std: np.ndarray
    covered: np.ndarray
    origin_xy: tuple[float, float]
    downsample: float
    mpp: float
    member_prob: np.ndarray | None = None  # (M, height, width) when asked for

    def as_dict(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in MAP_NAMES}

    @property
    def shape(self) -> tuple[int, int]:
        return self.prob.shape


@dataclass(frozen=True)
class RegionStats:
    """A predicted region (or SUA candidate) with the means of the maps over its pixels."""

    polygon: Polygon | MultiPolygon
    area_um2: float
    prob_mean: float
    predictive_entropy_mean: float
    expected_entropy_mean: float
    mutual_information_mean: float
    prob_std_mean: float
    sua_score: float | None = None


@dataclass(frozen=True)
class UncertaintyTile:
    """One cell of the uncertainty grid: level-0 box and the means of the maps inside it.

    ``x``, ``y``, ``width`` and ``height`` are the cell's box (cut at the image's edge). Of an analysed ROI,
    a cell the ROI does not wholly hold is trimmed to it, as QuPath's *Create tiles* with *Trim to ROI*:
    ``outline`` is then the box ∩ ROI (a Polygon or MultiPolygon, level-0 px); None where the box is the
    tile's outline. The means are over the covered map pixels whose centres lie in the tile, and
    ``tissue_fraction`` is the share of its map pixels (in the image, in the ROI) that are tissue.
    """

    x: float
    y: float
    width: float
    height: float
    prob: float
    predictive_entropy: float
    expected_entropy: float
    mutual_information: float
    prob_std: float
    tissue_fraction: float
    outline: Polygon | MultiPolygon | None = None


@dataclass(frozen=True)
class Nuclei:
    """Detected nuclei: one point each, level-0 px.

    ``cls`` indexes ``class_names`` (an H&E model's ``Tumor: Positive``, ``Tumor: Negative``,
    ``Other``; a PD-L1 IHC model adds ``Immune cells: PD-L1 positive`` and ``... negative``);
    ``score`` is the heatmap peak that found it, ``class_prob`` the probability of the chosen class,
    ``positive_prob`` the PD-L1 positive probability among tumour classes, ``entropy`` the predictive entropy of the
    class distribution (None unless the nuclei model is an ensemble). On an IHC image
    ``membrane_dab_od`` is the 75th percentile of each cell's DAB optical density on its membrane ring and
    ``intensity`` its grade (0, or 1+/2+/3+ for a positive tumour cell); None on H&E.
    ``member_cls`` (N, M) is each ensemble member's own class of each nucleus (None for one model).
    On H&E a tumour nucleus's PD-L1 call comes from the segmentation ensemble's maps
    (:func:`inference.analysis.nuclei.pdl1_from_maps`): ``positive_prob`` is the map's probability there,
    ``member_cls`` the members' calls and ``pdl1_entropy`` the map's predictive entropy (NaN elsewhere).
    """

    xy: np.ndarray
    cls: np.ndarray
    score: np.ndarray
    class_prob: np.ndarray
    positive_prob: np.ndarray
    entropy: np.ndarray | None
    class_names: tuple[str, ...]
    membrane_dab_od: np.ndarray | None = None
    intensity: np.ndarray | None = None
    member_cls: np.ndarray | None = None
    pdl1_entropy: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.xy)

    def tumour_xy(self) -> np.ndarray:
        """(N, 2) positions of the tumour nuclei (``Tumor: Positive`` and ``Tumor: Negative``)."""
        tumour = [self.class_names.index(c) for c in ("Tumor: Positive", "Tumor: Negative") if c in self.class_names]
        return self.xy[np.isin(self.cls, tumour)]

    def count(self, name: str) -> int:
        return int((self.cls == self.class_names.index(name)).sum())

    def subset(self, keep: np.ndarray) -> Nuclei:
        return Nuclei(
            self.xy[keep],
            self.cls[keep],
            self.score[keep],
            self.class_prob[keep],
            self.positive_prob[keep],
            None if self.entropy is None else self.entropy[keep],
            self.class_names,
            None if self.membrane_dab_od is None else self.membrane_dab_od[keep],
            None if self.intensity is None else self.intensity[keep],
            None if self.member_cls is None else self.member_cls[keep],
            None if self.pdl1_entropy is None else self.pdl1_entropy[keep],
        )

    def member_tps(self) -> list[float | None]:
        """Each ensemble member's own TPS (%) over these nuclei: the spread of the score (empty for one model)."""
        if self.member_cls is None:
            return []
        pos, neg = self.class_names.index("Tumor: Positive"), self.class_names.index("Tumor: Negative")
        out: list[float | None] = []
        for m in range(self.member_cls.shape[1]):
            p, n = int((self.member_cls[:, m] == pos).sum()), int((self.member_cls[:, m] == neg).sum())
            out.append(100.0 * p / (p + n) if p + n else None)
        return out


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    sha256: str
    members: int


@dataclass(frozen=True)
class SlideResult:
    """Everything one analysis of one image produced, with its provenance (DESIGN.md §2).

    ``stain`` is the stain the image was analysed as (``H&E`` or ``H-DAB``) and ``stain_source``
    where that came from. An H&E analysis has the segmentation ensemble's ``maps``, regions and
    tiles; a PD-L1 IHC analysis scores cells only: ``seg_model`` and ``maps`` are None, ``regions``
    and ``tiles`` empty, and ``cps`` is set.
    """

    image_path: str
    image_width_px: int
    image_height_px: int
    mpp: float
    run_id: str
    config_hash: str
    seg_model: ModelInfo | None
    maps: UncertaintyMaps | None
    regions: tuple[RegionStats, ...]
    tiles: tuple[UncertaintyTile, ...]
    positive_area_um2: float
    analysed_area_um2: float
    nuclei: Nuclei | None = None
    nuclei_model: ModelInfo | None = None
    tps: Tps | None = None
    candidates: tuple[RegionStats, ...] = ()
    uncertainty_flag: bool = False
    summary: dict[str, Any] = field(default_factory=dict)
    stain: str = "H&E"
    stain_source: str = ""
    cps: Cps | None = None
