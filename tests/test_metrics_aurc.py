"""Risk-coverage, AURC and E-AURC (slide failure detection, as the ValUES framework scores it)."""

import numpy as np
import pytest

from inference.evaluation.metrics import aurc, e_aurc, risk_coverage


def test_a_score_that_ranks_failures_last_is_optimal():
    failures = np.array([False, True, False, True, False])
    scores = np.array([0.1, 0.9, 0.2, 0.8, 0.3])
    assert e_aurc(scores, failures) == pytest.approx(0.0)
    # Risks 0, 0, 0, 1/4, 2/5: the mean is the AURC.
    assert aurc(scores, failures) == pytest.approx((0.25 + 0.4) / 5)


def test_a_score_that_ranks_failures_first_is_worst():
    failures = np.array([False, True, False, True, False])
    best = aurc(np.where(failures, 1.0, 0.0), failures)
    worst = aurc(np.where(failures, 0.0, 1.0), failures)
    assert worst > best
    # Accepting both failures first: risks 1, 1, 2/3, 2/4, 2/5.
    assert worst == pytest.approx((1 + 1 + 2 / 3 + 0.5 + 0.4) / 5)


def test_a_constant_score_costs_the_failure_rate_everywhere():
    failures = np.array([True, False, False, False])
    coverage, risk = risk_coverage(np.zeros(4), failures)
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk == pytest.approx([0.25] * 4)
    assert aurc(np.zeros(4), failures) == pytest.approx(0.25)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="1-D arrays of one length"):
        aurc(np.zeros(3), np.zeros(4, bool))
    assert np.isnan(aurc(np.zeros(0), np.zeros(0, bool)))
