"""Checks of values read from JSON files written by hand or by other tools (model manifests, phantom truths).

Imports nothing of this package, so any module below it (``inference.models``, ``inference.phantom``) may use it.
"""

from __future__ import annotations

import math


def is_finite_number(value: object) -> bool:
    """Whether ``value`` is an ``int`` or ``float`` (not a ``bool``, which is an ``int``) and finite.

    What ``json.loads`` gives for a number a threshold or a shift can be: a number written as text (``"0.5"``),
    ``true`` and ``NaN``/``Infinity`` (which json reads) are not.

    >>> [is_finite_number(v) for v in (0, 0.5, -3, True, "0.5", float("nan"), float("inf"), None)]
    [True, True, True, False, False, False, False, False]
    """
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
