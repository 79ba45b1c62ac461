"""An H&E and the PD-L1 IHC of the same block compared: predicted against measured, on the H&E.

Pure geometry on what the two analyses wrote: the H&E's predicted positive regions and its
uncertainty tiles, the IHC's positive tumour cells mapped onto the H&E by the registration
(:mod:`inference.analysis.registration`). Everything is in H&E level-0 px.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from inference.analysis.tps import TPS_CUTOFFS_PERCENT, tps_category

# A positive tumour cell of an IHC stands for this much tissue around its centre (µm): its positive area.
IHC_CELL_RADIUS_UM = 8.0


@dataclass(frozen=True)
class PairComparison:
    """One case: the H&E's prediction against the IHC's measurement.

    Attributes
    ----------
    tps_he_predicted, tps_ihc
        TPS (%) predicted from the H&E and measured on the IHC; None where a side has no tumour cells.
    positive_area_he_um2, positive_area_ihc_um2
        Predicted positive area on the H&E, and the area of the IHC's positive tumour cells (each standing
        for ``cell_radius_um`` around it) mapped onto the H&E, both within the compared area.
    dice
        Dice of the two positive areas (None when both are empty).
    entropy_disagree, entropy_agree
        Mean predictive entropy of the H&E's uncertainty tiles whose centre lies where the two areas
        disagree (one positive, the other not) and where they agree; None without such tiles.
    tiles_disagree, tiles_agree
        How many tiles each of those means is over.
    """

    tps_he_predicted: float | None
    tps_ihc: float | None
    positive_area_he_um2: float
    positive_area_ihc_um2: float
    dice: float | None
    entropy_disagree: float | None
    entropy_agree: float | None
    tiles_disagree: int
    tiles_agree: int

    @property
    def tps_difference(self) -> float | None:
        """H&E-predicted minus IHC-measured TPS, in points."""
        if self.tps_he_predicted is None or self.tps_ihc is None:
            return None
        return self.tps_he_predicted - self.tps_ihc

    @property
    def uncertainty_higher_where_they_disagree(self) -> bool | None:
        if self.entropy_disagree is None or self.entropy_agree is None:
            return None
        return self.entropy_disagree > self.entropy_agree

    def review_reasons(self) -> list[dict]:
        """The case's review reasons: the H&E's predicted TPS in another category than the IHC's measured one.

        Value: the predicted minus the measured TPS (points); limit: the cut-off between the two categories
        (1 or 50 %). The IHC is the measurement, so the H&E's prediction is what needs a look.
        """
        if self.tps_he_predicted is None or self.tps_ihc is None:
            return []
        predicted, measured = tps_category(self.tps_he_predicted), tps_category(self.tps_ihc)
        if predicted == measured:
            return []
        low, high = sorted((self.tps_he_predicted, self.tps_ihc))
        cutoff = next(c for c in TPS_CUTOFFS_PERCENT if low < c <= high)
        return [
            {
                "reason": f"H&E-predicted TPS category ({predicted}) differs from the IHC's ({measured})",
                "value": self.tps_he_predicted - self.tps_ihc,
                "limit": cutoff,
            }
        ]


def cells_area(xy: np.ndarray, *, radius_px: float) -> BaseGeometry:
    """The area of cells at points (N, 2): the union of discs of ``radius_px`` around them (empty for none).

    An IHC's positive tumour area is its positive tumour cells' area; mapped onto the H&E it is the label a
    model of the H&E can learn from.
    """
    if len(xy) == 0:
        return shapely.Polygon()
    return shapely.union_all(shapely.buffer(shapely.points(xy), radius_px, quad_segs=4))


def compare_pair(
    *,
    he_positive: BaseGeometry,
    ihc_positive_xy_on_he: np.ndarray,
    compared_area: BaseGeometry,
    mpp_he: float,
    tile_boxes: np.ndarray,
    tile_entropy: np.ndarray,
    tps_he_predicted: float | None,
    tps_ihc: float | None,
    cell_radius_um: float = IHC_CELL_RADIUS_UM,
) -> PairComparison:
    """Compare one case on the H&E: ``he_positive`` (predicted positive regions), the IHC's positive tumour
    cells already mapped to H&E px, within ``compared_area`` (the H&E's analysed tissue, or the overlap of
    both sections). ``tile_boxes`` (N, 4: x0, y0, x1, y1) and ``tile_entropy`` (N,) are the H&E's
    uncertainty tiles.

    >>> from shapely.geometry import box
    >>> c = compare_pair(he_positive=box(0, 0, 50, 100), ihc_positive_xy_on_he=np.array([[20.0, 50.0]]),
    ...     compared_area=box(0, 0, 100, 100), mpp_he=1.0, tile_boxes=np.zeros((0, 4)),
    ...     tile_entropy=np.zeros(0), tps_he_predicted=40.0, tps_ihc=35.0, cell_radius_um=10)
    >>> round(c.positive_area_ihc_um2), c.tps_difference
    (306, 5.0)
    """
    if ihc_positive_xy_on_he.ndim != 2 or ihc_positive_xy_on_he.shape[1:] != (2,):
        raise ValueError(f"IHC positive cells must be (N, 2) x, y, got shape {ihc_positive_xy_on_he.shape}")
    he = shapely.make_valid(he_positive).intersection(compared_area)
    ihc = cells_area(ihc_positive_xy_on_he, radius_px=cell_radius_um / mpp_he).intersection(compared_area)
    px_um2 = mpp_he**2
    both = he.intersection(ihc).area
    total = he.area + ihc.area
    disagree_area = he.symmetric_difference(ihc)
    centres_x = (tile_boxes[:, 0] + tile_boxes[:, 2]) / 2
    centres_y = (tile_boxes[:, 1] + tile_boxes[:, 3]) / 2
    in_area = shapely.contains_xy(compared_area, centres_x, centres_y)
    disagree = in_area & shapely.contains_xy(disagree_area, centres_x, centres_y)
    agree = in_area & ~disagree

    def mean(mask: np.ndarray) -> float | None:
        return float(tile_entropy[mask].mean()) if mask.any() else None

    return PairComparison(
        tps_he_predicted=tps_he_predicted,
        tps_ihc=tps_ihc,
        positive_area_he_um2=float(he.area * px_um2),
        positive_area_ihc_um2=float(ihc.area * px_um2),
        dice=None if total == 0 else float(2 * both / total),
        entropy_disagree=mean(disagree),
        entropy_agree=mean(agree),
        tiles_disagree=int(disagree.sum()),
        tiles_agree=int(agree.sum()),
    )
