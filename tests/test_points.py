import numpy as np
import pytest

from inference.analysis.points import (
    INSUFFICIENT,
    DetectionScores,
    detection_scores,
    gaussian_targets,
    match_points,
    radius_nms,
    tps_category,
    tumour_proportion_score,
)


def test_gaussian_targets_peak_and_class():
    t = gaussian_targets(
        np.array([[5.0, 4.0], [1.0, 1.0]]), np.array([2, 0]), shape_hw=(8, 10), n_classes=3, sigma_px=1.0
    )
    assert t.shape == (3, 8, 10)
    assert t[2, 4, 5] == 1.0 and t[0, 1, 1] == 1.0
    assert t[1].max() == 0.0
    assert t[2, 4, 6] == pytest.approx(np.exp(-0.5))


def test_radius_nms_keeps_the_strongest_and_far_points():
    xy = np.array([[0, 0], [2, 0], [4, 0], [20, 20]], float)
    keep = radius_nms(xy, np.array([0.9, 0.95, 0.5, 0.1]), radius=2.5)
    assert keep.tolist() == [1, 3]  # 1 suppresses 0 and 2
    assert radius_nms(np.zeros((0, 2)), np.zeros(0), radius=1).size == 0


def test_radius_nms_ties_are_deterministic():
    xy = np.array([[0, 0], [1, 0]], float)
    assert radius_nms(xy, np.array([0.5, 0.5]), radius=2).tolist() == [0]


def test_matching_never_crosses_the_radius():
    pred = np.array([[0, 0], [10, 0]], float)
    truth = np.array([[3.0, 0], [13.01, 0]])
    m = match_points(pred, truth, radius=3.0)
    assert m.pred_index.tolist() == [0] and m.truth_index.tolist() == [0]
    assert m.distance.tolist() == [3.0]


def test_matching_is_optimal_not_greedy():
    # Greedy nearest-first would match p0-t1 (0.9) and leave p1 and t0 unmatched.
    pred = np.array([[0.0, 0], [1.8, 0]])
    truth = np.array([[-1.0, 0], [0.9, 0]])
    m = match_points(pred, truth, radius=1.5)
    assert sorted(zip(m.pred_index.tolist(), m.truth_index.tolist(), strict=True)) == [(0, 0), (1, 1)]


def test_matching_one_to_one():
    pred = np.array([[0.0, 0], [0.5, 0], [1.0, 0]])
    truth = np.array([[0.4, 0]])
    m = match_points(pred, truth, radius=3)
    assert len(m.pred_index) == 1 and m.pred_index[0] == 1


def test_detection_scores_by_hand():
    pred = np.array([[0, 0], [10, 0], [50, 50]], float)
    pred_cls = np.array([0, 1, 2])
    truth = np.array([[1, 0], [10, 1], [90, 90]], float)
    truth_cls = np.array([0, 0, 2])
    overall, per = detection_scores(pred, pred_cls, truth, truth_cls, radius=3, n_classes=3)
    assert (overall.tp, overall.fp, overall.fn) == (2, 1, 1)
    assert overall.precision == pytest.approx(2 / 3) and overall.f1 == pytest.approx(2 / 3)
    assert (per[0].tp, per[0].fp, per[0].fn) == (1, 0, 1)
    assert (per[1].tp, per[1].fp, per[1].fn) == (0, 1, 0)
    assert (per[2].tp, per[2].fp, per[2].fn) == (0, 1, 1)
    # Pooled over classes (or slides) the counts add up, and F1 is of the pooled counts, not a mean of F1s.
    pooled = sum(per, DetectionScores(0, 0, 0))
    assert (pooled.tp, pooled.fp, pooled.fn) == (1, 2, 2) and pooled.f1 == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("pct", "cat"), [(0.0, "<1%"), (0.99, "<1%"), (1.0, "1-49%"), (49.99, "1-49%"), (50.0, ">=50%"), (100.0, ">=50%")]
)
def test_tps_categories(pct, cat):
    assert tps_category(pct) == cat


def test_tps_and_the_insufficient_cells_rule():
    t = tumour_proportion_score(60, 40)
    assert t.percent == 60.0 and t.category == ">=50%" and t.tumour == 100
    few = tumour_proportion_score(60, 39)
    assert few.category == INSUFFICIENT and few.percent == pytest.approx(60 / 99 * 100)
    none = tumour_proportion_score(0, 0)
    assert none.percent is None and none.category == INSUFFICIENT
