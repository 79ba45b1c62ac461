import numpy as np
import pytest

from inference.analysis.sua import (
    SuaParams,
    aggregate,
    calibrate,
    conversion_scores,
    find_candidates,
    negative_prediction_regions,
    npr_is_false_negative,
    pixel_baseline,
)
from inference.evaluation.metrics import auprc, brier, ece, fbeta_score, reliability, spearman
from inference.results import UncertaintyMaps


def _maps(prob, pe, *, mpp=8.0, ds=16.0):
    z = np.zeros(prob.shape, np.float32)
    return UncertaintyMaps(
        prob=prob.astype(np.float32),
        predictive_entropy=pe.astype(np.float32),
        expected_entropy=z,
        mutual_information=pe.astype(np.float32) / 2,
        prob_std=z,
        covered=np.ones(prob.shape, bool),
        origin_xy=(0.0, 0.0),
        downsample=ds,
        mpp=mpp,
    )


def test_npr_bounds_lower_inclusive_upper_exclusive():
    p = np.array([[0.2, 0.5, 0.19999]])
    labels, n = negative_prediction_regions(p, lower=0.2, upper=0.5)
    assert n == 1 and labels.tolist() == [[1, 0, 0]]


def test_npr_connectivity_is_eight():
    p = np.zeros((4, 4))
    p[0, 0] = p[1, 1] = p[2, 2] = 0.3
    p[0, 3] = 0.3
    labels, n = negative_prediction_regions(p, lower=0.25, upper=0.5)
    assert n == 2
    assert labels[0, 0] == labels[1, 1] == labels[2, 2] != labels[0, 3]


def test_mean_and_p90_aggregation_by_hand():
    labels = np.array([[1] * 10 + [2, 2]])
    values = np.array([[*np.arange(10) / 10, 0.5, 0.7]])
    assert aggregate(values, labels, 2, method="mean") == pytest.approx([0.45, 0.6])
    assert aggregate(values, labels, 2, method="p90") == pytest.approx([np.percentile(np.arange(10) / 10, 90), 0.68])
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(values, labels, 2, method="max")


def _scene():
    """Two NPRs: a missed positive nest (uncertain) and a confident-ish negative halo."""
    prob = np.zeros((20, 20))
    pe = np.full((20, 20), 0.05)
    truth = np.zeros((20, 20), bool)
    prob[2:8, 2:8], pe[2:8, 2:8], truth[2:8, 2:8] = 0.4, 0.65, True  # false negative nest
    prob[12:18, 12:18], pe[12:18, 12:18] = 0.3, 0.2  # negative region, lower uncertainty
    pe[12, 12] = 0.69  # one very uncertain pixel inside the negative region
    return _maps(prob, pe), truth


def test_candidates_are_flagged_regions_in_level0_with_scores():
    maps, _ = _scene()
    cands, mask = find_candidates(maps, SuaParams(lower=0.25, upper=0.5, threshold=0.5, min_area_um2=0))
    assert len(cands) == 1
    c = cands[0]
    assert c.sua_score == pytest.approx(0.65)
    assert c.prob_mean == pytest.approx(0.4)
    assert c.polygon.bounds == pytest.approx((32, 32, 128, 128), abs=16.01)
    assert mask.sum() == 36


def test_candidates_are_ordered_by_score_and_respect_min_area():
    maps, _ = _scene()
    params = SuaParams(lower=0.25, upper=0.5, threshold=0.1, min_area_um2=0)
    cands, _ = find_candidates(maps, params)
    assert [round(c.sua_score, 3) for c in cands] == [0.65, round((0.2 * 35 + 0.69) / 36, 3)]
    big_only, _ = find_candidates(maps, SuaParams(lower=0.25, upper=0.5, threshold=0.1, min_area_um2=64 * 37))
    assert big_only == ()


def test_pixel_baseline_flags_single_pixels():
    maps, _ = _scene()
    mask = pixel_baseline(maps, lower=0.25, upper=0.5, threshold=0.6, uncertainty="predictive_entropy")
    assert mask.sum() == 36 + 1  # the nest and the lone uncertain pixel of the halo


def test_fn_rule_uses_fraction_of_truly_positive_pixels():
    labels = np.array([[1, 1, 1, 1, 0, 2, 2]])
    truth = np.array([[1, 1, 1, 0, 0, 1, 1]], bool)
    assert npr_is_false_negative(labels, 2, truth, min_fraction=0.9).tolist() == [False, True]
    assert npr_is_false_negative(labels, 2, truth, min_fraction=0.75).tolist() == [True, True]


def test_calibration_picks_the_f05_maximum():
    maps, truth = _scene()
    valid = np.ones(truth.shape, bool)
    cal = calibrate([(maps, truth, valid)], upper=0.5, lowers=(0.25, 0.35), min_area_um2=0)
    assert cal.params.lower == 0.25
    assert 0.2 < cal.params.threshold < 0.65  # separates the FN nest (0.65) from the halo (~0.21)
    assert cal.f05 == 1.0 and cal.n_false_negative == 1
    # With lower 0.35 the halo is no NPR and the nest alone is found too: the first best is kept.
    cands, _ = find_candidates(maps, cal.params)
    assert len(cands) == 1


def test_calibration_objective_pixels_weighs_a_large_nest_over_specks():
    """One large missed nest (moderately uncertain), three negative specks and one small missed
    speck (both more uncertain). Counting regions, flagging the small speck alone is best
    (F0.5 0.83 vs 0.45 for all); counting pixels, flagging everything is (0.81 vs 0.36)."""
    prob = np.zeros((20, 20))
    pe = np.full((20, 20), 0.05)
    truth = np.zeros((20, 20), bool)
    prob[1:7, 1:7], pe[1:7, 1:7], truth[1:7, 1:7] = 0.4, 0.5, True
    for r, c in [(10, 1), (10, 5), (15, 1)]:
        prob[r : r + 2, c : c + 2], pe[r : r + 2, c : c + 2] = 0.3, 0.6
    prob[15:17, 15:17], pe[15:17, 15:17], truth[15:17, 15:17] = 0.4, 0.65, True
    maps, valid = _maps(prob, pe), np.ones((20, 20), bool)
    by_regions = calibrate([(maps, truth, valid)], upper=0.5, lowers=(0.25,), min_area_um2=0, objective="regions")
    assert 0.6 < by_regions.params.threshold < 0.65 and by_regions.f05 == pytest.approx(1.25 / 1.5)
    assert (by_regions.n_regions, by_regions.n_false_negative) == (5, 2)
    by_pixels = calibrate([(maps, truth, valid)], upper=0.5, lowers=(0.25,), min_area_um2=0, objective="pixels")
    assert by_pixels.params.threshold < 0.5 and by_pixels.f05 == pytest.approx(50 / 62)
    assert by_pixels.objective == "pixels"
    _, flagged = find_candidates(maps, by_pixels.params)
    assert flagged.sum() == 52
    with pytest.raises(ValueError, match="objective"):
        calibrate([(maps, truth, valid)], upper=0.5, objective="area")


def test_conversion_scores_by_hand():
    truth = np.array([1, 1, 1, 0, 0], bool)
    predicted_negative = np.array([1, 1, 0, 1, 1], bool)
    converted = np.array([1, 0, 0, 1, 0], bool)
    s = conversion_scores(converted, truth, predicted_negative)
    assert (s.converted_px, s.true_positive_px, s.false_negative_px) == (2, 1, 2)
    assert s.fncr == 0.5 and s.recall == 0.5 and s.f05 == pytest.approx(0.5)


def test_metrics_by_hand():
    assert fbeta_score(np.array([1, 0], bool), np.array([1, 1], bool), beta=1) == pytest.approx(2 / 3)
    assert brier(np.array([0.8, 0.2]), np.array([1, 0])) == pytest.approx(0.04)
    conf, freq, counts = reliability(np.array([0.05, 0.15, 0.95, 0.95]), np.array([0, 1, 1, 0]), bins=10)
    assert counts[0] == 1 and counts[9] == 2 and freq[9] == 0.5 and np.isnan(conf[5])
    assert ece(np.array([0.95, 0.95]), np.array([1, 0]), bins=10) == pytest.approx(0.45)
    assert auprc(np.array([0.9, 0.1]), np.array([1, 0])) == 1.0
    assert spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1])) == pytest.approx(-1.0)


def test_bad_params():
    with pytest.raises(ValueError, match="lower < upper"):
        SuaParams(lower=0.6, upper=0.5)
    with pytest.raises(ValueError, match="uncertainty"):
        SuaParams(uncertainty="vibes")
