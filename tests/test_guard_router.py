"""The guard router's pure routing (benchmarks/guard_router.py, issue #33)."""

import pytest

from benchmarks.guard_router import route, routed_dice


def test_route_sends_a_slide_over_the_threshold_to_the_fine_tune_and_an_unmeasured_one_to_the_demo():
    assert route([1.6, 1.2, None, 1.467], 1.467) == [True, False, False, False]


def test_route_takes_one_limit_per_slide_and_a_missing_limit_keeps_the_demo():
    assert route([3.0, 3.0, 2.0], [2.632, None, 2.632]) == [True, False, False]
    with pytest.raises(ValueError, match="2 scores but 1 thresholds"):
        route([1.0, 2.0], [1.5])


def test_routed_dice_is_each_slides_dice_of_the_model_it_went_to():
    assert routed_dice([0.9, 0.5], [0.8, 0.97], [True, False]) == [0.9, 0.97]
