"""The slide "needs review" rule fitted to a stated target: catch failures, keep false alarms few.

A slide is flagged when any of its QC scores reaches its limit (an OR of one-sided limits). Given
validation slides that include failures, :func:`fit_review_limits` tries every combination of limits
(each score's observed values, plus "never") and keeps the one that catches most failures with false
alarms on at most ``max_false_alarm`` of the other slides; among equals, the fewest false alarms,
then the limits that flag least readily. Pure numpy: what the slides were and what counts as a failure is the caller's.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from inference.analysis.regions import OFF_TUMOUR_MIN_POSITIVE_PCT

# #32's target: catch at least this share of failed slides ...
TARGET_CATCH = 0.9
# ... at no more than this share of false alarms on the slides that were right.
TARGET_FALSE_ALARM = 0.2
# QC scores that flag a slide at or *below* their limit (every other score flags at or above): a predicted
# positive area so small that a few missed or extra cells move it by more than a quarter.
FLAG_AT_OR_BELOW = frozenset({"review_positive_area_pct"})


@dataclass(frozen=True)
class ReviewFit:
    """The chosen limits, how they did on the slides they were fitted on, and the ROC of the search.

    ``roc`` holds (false-alarm rate, catch rate) of the best rule at each number of false alarms;
    ``met`` says whether the chosen point reaches :data:`TARGET_CATCH` within the false-alarm budget.
    """

    limits: dict[str, float]
    catch: float
    false_alarm: float
    failures: int
    successes: int
    roc: tuple[tuple[float, float], ...]
    met: bool


def flags(scores: dict[str, np.ndarray], limits: dict[str, float]) -> np.ndarray:
    """bool per slide: any score at or above its limit, or at or below it for :data:`FLAG_AT_OR_BELOW`
    (a limit of +inf, or -inf for those, never fires)."""
    n = len(next(iter(scores.values()))) if scores else 0
    out = np.zeros(n, bool)
    for name, limit in limits.items():
        out |= _flagged(name, np.asarray(scores[name], np.float64), limit)
    return out


def slide_review_scores(
    *,
    mean_entropy: float | None,
    candidate_area_pct: float,
    positive_area_pct: float | None,
    positive_off_tumour_pct: float | None,
    tps_member_disagreement: float | None = None,
    unsettled_positive_area_pct: float | None = None,
) -> dict[str, float]:
    """One H&E slide's values of the review rule's scores, keyed as the rule's limits (``review_...``).

    A score that does not apply is left out: no entropy or positive share without analysed tissue, no
    off-tumour share without nuclei or below :data:`OFF_TUMOUR_MIN_POSITIVE_PCT` of positive area (there it
    measures a few map pixels' edges), no members' disagreement on the TPS category without nuclei
    (:func:`inference.analysis.points.tps_member_disagreement`), no unsettled share of the positive area
    without analysed tissue (:func:`inference.analysis.regions.unsettled_positive_area_pct`). ``pdl1 run`` and
    the evaluation suite flag from the same values.
    """
    scores = {} if mean_entropy is None else {"review_entropy": mean_entropy}
    scores["review_candidate_area_pct"] = candidate_area_pct
    if positive_area_pct is not None:
        scores["review_positive_area_pct"] = positive_area_pct
        if positive_off_tumour_pct is not None and positive_area_pct >= OFF_TUMOUR_MIN_POSITIVE_PCT:
            scores["review_positive_off_tumour_pct"] = positive_off_tumour_pct
    if tps_member_disagreement is not None:
        scores["review_tps_member_disagreement"] = tps_member_disagreement
    if unsettled_positive_area_pct is not None:
        scores["review_unsettled_positive_area_pct"] = unsettled_positive_area_pct
    return scores


def scores_at_limit(scores: dict[str, float], limits: dict[str, float]) -> list[str]:
    """The names in ``scores`` at their limit in ``limits`` (at or below it for :data:`FLAG_AT_OR_BELOW`),
    in ``scores``' order; a score without a limit never flags.

    >>> scores_at_limit({"review_entropy": 0.5, "review_positive_area_pct": 0.2},
    ...                 {"review_entropy": 0.45, "review_positive_area_pct": 0.3})
    ['review_entropy', 'review_positive_area_pct']
    """
    return [k for k, v in scores.items() if k in limits and bool(_flagged(k, np.asarray(v), limits[k]))]


def _flagged(name: str, values: np.ndarray, limit: float) -> np.ndarray:
    return values <= limit if name in FLAG_AT_OR_BELOW else values >= limit


def fit_review_limits(
    scores: dict[str, np.ndarray],
    failures: np.ndarray,
    *,
    max_false_alarm: float = TARGET_FALSE_ALARM,
    target_catch: float = TARGET_CATCH,
    already: np.ndarray | None = None,
) -> ReviewFit:
    """Limits for each score in ``scores`` (name -> value per slide; higher = less trusted, lower for
    :data:`FLAG_AT_OR_BELOW`). ``already``: slides flagged whatever the limits (another rule's reasons,
    such as the domain guard's); their catches and false alarms count in the fit.

    >>> fit = fit_review_limits({"entropy": np.array([0.1, 0.2, 0.9, 0.3])}, np.array([0, 0, 1, 0], bool))
    >>> fit.limits, fit.catch, fit.false_alarm
    ({'entropy': 0.9}, 1.0, 0.0)

    Where the slides in ``already`` alone raise more false alarms than ``max_false_alarm`` allows, the limits add
    the fewest to them, and the target is not met:

    >>> fit = fit_review_limits({"entropy": np.array([0.9, 0.2, 0.3])}, np.array([1, 0, 0], bool),
    ...                         already=np.array([0, 1, 0], bool))
    >>> fit.limits, fit.catch, fit.false_alarm, fit.met
    ({'entropy': 0.9}, 1.0, 0.5, False)
    """
    failures = np.asarray(failures, bool)
    names = list(scores)
    if not names:
        raise ValueError("no QC scores to fit limits for")
    arrays = {k: np.asarray(v, np.float64) for k, v in scores.items()}
    if any(a.shape != failures.shape for a in arrays.values()):
        raise ValueError("every score needs one value per slide, as failures has")
    n_fail, n_ok = int(failures.sum()), int((~failures).sum())
    if n_fail == 0 or n_ok == 0:
        raise ValueError(
            f"fitting review limits needs failed and correct slides; got {n_fail} failed and {n_ok} correct: "
            "add validation slides with stain shifts beyond training, weak expression or extreme TPS"
        )
    # Candidate limits: each observed value (flag from it up, or down), and +inf (-inf) where it never flags.
    candidates = [
        np.unique(np.append(arrays[k][np.isfinite(arrays[k])], -math.inf if k in FLAG_AT_OR_BELOW else math.inf))
        for k in names
    ]
    # Among equal catches and false alarms the rule that flags least readily: the highest limits, the lowest
    # for scores that flag below theirs.
    strictness = np.array([-1.0 if k in FLAG_AT_OR_BELOW else 1.0 for k in names])
    best_at: dict[int, tuple[int, tuple[float, ...], tuple[float, ...]]] = {}  # alarms -> (catches, key, limits)
    base = np.zeros(failures.shape, bool) if already is None else np.asarray(already, bool)
    if base.shape != failures.shape:
        raise ValueError("already needs one value per slide, as failures has")
    for combo in itertools.product(*candidates):
        flagged = base.copy()
        for k, limit in zip(names, combo, strict=True):
            flagged |= _flagged(k, arrays[k], limit)
        caught, alarms = int((flagged & failures).sum()), int((flagged & ~failures).sum())
        key = tuple(strictness * np.array(combo))
        prev = best_at.get(alarms)
        if prev is None or caught > prev[0] or (caught == prev[0] and key > prev[1]):
            best_at[alarms] = (caught, key, combo)
    budget = math.floor(max_false_alarm * n_ok + 1e-9)
    allowed = [(c, -a, key, combo) for a, (c, key, combo) in best_at.items() if a <= budget]
    # The slides flagged whatever the limits (``already``) can alone exceed the budget: then the limits add the
    # fewest false alarms to theirs, and the target is not met.
    within_budget = bool(allowed)
    if not within_budget:
        fewest = min(best_at)
        allowed = [(best_at[fewest][0], -fewest, *best_at[fewest][1:])]
    caught, neg_alarms, _, combo = max(allowed)
    roc, top = [], -1
    for alarms in sorted(best_at):
        if best_at[alarms][0] > top:
            top = best_at[alarms][0]
            roc.append((alarms / n_ok, top / n_fail))
    catch = caught / n_fail
    return ReviewFit(
        limits=dict(zip(names, (float(v) for v in combo), strict=True)),
        catch=catch,
        false_alarm=-neg_alarms / n_ok,
        failures=n_fail,
        successes=n_ok,
        roc=tuple(roc),
        met=catch >= target_catch and within_budget,
    )
