"""A TPS's category and its text, and a CPS's text: pure functions of a number, apart from
:mod:`inference.analysis.points` so that every ``pdl1`` command (its tables and CSVs) can show a score without
importing SciPy at start-up."""

from __future__ import annotations

import math
from collections.abc import Callable
from decimal import ROUND_FLOOR, Decimal

TPS_CUTOFFS_PERCENT = (1.0, 50.0)  # the category boundaries of tps_category


def tps_category(percent: float) -> str:
    """``<1%``, ``1-49%`` or ``>=50%`` (the PD-L1 22C3 NSCLC cut-offs).

    >>> [tps_category(p) for p in (0.5, 1.0, 49.9, 50.0)]
    ['<1%', '1-49%', '1-49%', '>=50%']
    """
    low, high = TPS_CUTOFFS_PERCENT
    if percent < low:
        return "<1%"
    if percent < high:
        return "1-49%"
    return ">=50%"


def tps_text(percent: float, *, decimals: int = 1) -> str:
    """A TPS as text: ``decimals`` decimals, more where rounding would carry it across a cut-off (0.96 % shown as
    1.0 % reads as the 1-49 % category it is not; its category is told from the unrounded value), and cut down
    (not rounded) where even four more decimals would carry it.

    >>> [tps_text(p) for p in (12.34, 1.0, 0.96, 49.96, 49.9996, 0.0)]
    ['12.3', '1.0', '0.96', '49.96', '49.9996', '0.0']
    >>> import math
    >>> tps_text(math.nextafter(1.0, 0.0))
    '0.9'
    """
    return _text_keeping(percent, tps_category, decimals)


def cps_text(percent: float, *, decimals: int = 1) -> str:
    """A CPS as text: ``decimals`` decimals, more where rounding would carry it to a whole number it lies below (the
    CPS cut-offs, 1, 5, 10 or 20 by indication, are whole numbers: 9.96 shown as 10.0 reads as CPS >= 10), and cut
    down (not rounded) where even four more decimals would.

    >>> [cps_text(p) for p in (52.749, 10.0, 9.96, 0.952, 19.9996, 100.0)]
    ['52.7', '10.0', '9.96', '0.95', '19.9996', '100.0']
    """
    return _text_keeping(percent, math.floor, decimals)


def _text_keeping(percent: float, side: Callable[[float], object], decimals: int) -> str:
    """``percent`` to ``decimals`` decimals, more while the rounded number lies on another ``side`` of a cut-off than
    the number itself, and cut down (not rounded) where even four more would carry it across."""
    for places in range(decimals, decimals + 5):
        text = f"{percent:.{places}f}"
        if side(float(text)) == side(percent):
            return text
    return str(Decimal(percent).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_FLOOR))
