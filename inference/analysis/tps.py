"""A TPS's category and its text, and a CPS's text: pure functions of a number, apart from
:mod:`inference.analysis.points` so that every ``pdl1`` command (its tables and CSVs) can show a score without
importing SciPy at start-up."""

from __future__ import annotations

import math
from collections.abc import Callable
from decimal import ROUND_FLOOR, Decimal

TPS_CUTOFFS_PERCENT = (1.0, 50.0)  # the category boundaries of tps_category
# A TPS and a CPS need this many viable tumour cells (their denominator); under it either's category is INSUFFICIENT.
MIN_TUMOUR_NUCLEI = 100
INSUFFICIENT = "insufficient tumour cells"


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


def cps_category(tumour_cells: int) -> str | None:
    """A CPS's category: :data:`INSUFFICIENT` under :data:`MIN_TUMOUR_NUCLEI` tumour cells (a CPS, as a TPS, is scored
    on at least 100 viable tumour cells, its denominator), else None: a CPS has no category of its own here (its
    cut-offs, 1, 5, 10 or 20, are by indication).

    >>> cps_category(57), cps_category(100)
    ('insufficient tumour cells', None)
    """
    return INSUFFICIENT if tumour_cells < MIN_TUMOUR_NUCLEI else None


def cps_shown(text: str, category: str | None) -> str:
    """A CPS's text (:func:`cps_text`) as a table or a line shows it beside a TPS: with its category in brackets
    where it has one, as the TPS beside it (``40.0% (insufficient tumour cells)``).

    >>> cps_shown("12.5", cps_category(57)), cps_shown("12.5", None)
    ('12.5 (insufficient tumour cells)', '12.5')
    """
    return f"{text} ({category})" if category else text


def tps_range_text(low: float, high: float, *, percent: float | None = None) -> str:
    """The ensemble members' own TPS, lowest to highest, as text (:func:`tps_text`), saying where the range crosses a
    cut-off (its members fall in different categories; the review rule flags that only from a share of members on)
    and where the ensemble's ``percent`` lies outside it: the ensemble calls each cell from its members' mean map,
    each member from its own, so members positive on different cells can all lie below or above it.

    >>> tps_range_text(45.1, 52.3, percent=48.0)
    '45.1-52.3%, either side of 50%'
    >>> tps_range_text(0.8, 52.3)
    '0.8-52.3%, either side of 1% and 50%'
    >>> tps_range_text(41.2, 43.5, percent=44.0), tps_range_text(12.0, 12.0, percent=12.0)
    ("41.2-43.5%; the ensemble's TPS is above all of them", '12.0-12.0%')
    """
    text = f"{tps_text(low)}-{tps_text(high)}%"
    crossed = [f"{c:g}%" for c in TPS_CUTOFFS_PERCENT if low < c <= high]
    if crossed:
        text += ", either side of " + " and ".join(crossed)
    if percent is not None and not low <= percent <= high:
        text += f"; the ensemble's TPS is {'below' if percent < low else 'above'} all of them"
    return text


def _text_keeping(percent: float, side: Callable[[float], object], decimals: int) -> str:
    """``percent`` to ``decimals`` decimals, more while the rounded number lies on another ``side`` of a cut-off than
    the number itself, and cut down (not rounded) where even four more would carry it across."""
    for places in range(decimals, decimals + 5):
        text = f"{percent:.{places}f}"
        if side(float(text)) == side(percent):
            return text
    return str(Decimal(percent).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_FLOOR))
