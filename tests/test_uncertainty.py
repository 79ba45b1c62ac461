import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.analysis.uncertainty import ensemble_stats, ensemble_stats_np, entropy_np
from inference.results import MAP_NAMES


def _dirichlet(rng, m, b, c, h, w, alpha=1.0):
    p = rng.gamma(alpha, size=(m, b, c, h, w))
    return p / p.sum(axis=2, keepdims=True)


def test_torch_stats_match_numpy_reference():
    rng = np.random.default_rng(0)
    probs = _dirichlet(rng, 5, 3, 2, 8, 9)
    got = ensemble_stats(torch.from_numpy(probs)).numpy()
    for b in range(3):
        ref = ensemble_stats_np(probs[:, b])
        for i, name in enumerate(MAP_NAMES):
            np.testing.assert_allclose(got[b, i], ref[name], atol=1e-5, err_msg=name)


def test_torch_stats_match_numpy_on_channels_last_member_outputs():
    # The members' outputs are channels-last, as the pipeline's are: the member axis then has odd strides.
    rng = np.random.default_rng(3)
    m, b = 5, 4
    probs = _dirichlet(rng, m, b, 2, 16, 12).astype(np.float32)
    strided = torch.from_numpy(probs.reshape(m * b, 2, 16, 12)).contiguous(memory_format=torch.channels_last)
    got = ensemble_stats(strided.view(m, b, 2, 16, 12)).numpy()
    for i in range(b):
        ref = ensemble_stats_np(probs[:, i].astype(np.float64))
        for c, name in enumerate(MAP_NAMES):
            np.testing.assert_allclose(got[i, c], ref[name], atol=1e-5, err_msg=name)


def test_hand_computed_two_members():
    # Member A says 0.9 positive, member B 0.1: mean 0.5, H(mean) = ln 2.
    probs = np.array([[0.1, 0.9], [0.9, 0.1]]).reshape(2, 2, 1, 1)
    ref = ensemble_stats_np(probs)
    h = -(0.1 * np.log(0.1) + 0.9 * np.log(0.9))
    assert ref["prob"][0, 0] == pytest.approx(0.5)
    assert ref["predictive_entropy"][0, 0] == pytest.approx(np.log(2))
    assert ref["expected_entropy"][0, 0] == pytest.approx(h)
    assert ref["mutual_information"][0, 0] == pytest.approx(np.log(2) - h)
    assert ref["prob_std"][0, 0] == pytest.approx(0.4)


def test_identical_members_have_no_epistemic_uncertainty():
    rng = np.random.default_rng(1)
    one = _dirichlet(rng, 1, 2, 2, 6, 6)
    stats = ensemble_stats(torch.from_numpy(np.repeat(one, 4, axis=0))).numpy()
    assert np.abs(stats[:, 3]).max() < 1e-6  # mutual information
    assert np.abs(stats[:, 4]).max() < 1e-6  # std
    np.testing.assert_allclose(stats[:, 1], stats[:, 2], atol=1e-6)  # H(mean) == mean H


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 8), st.floats(0.05, 5.0), st.integers(0, 2**16))
def test_mutual_information_is_never_negative(members, alpha, seed):
    probs = _dirichlet(np.random.default_rng(seed), members, 1, 2, 4, 4, alpha)
    stats = ensemble_stats(torch.from_numpy(probs)).numpy()
    assert (stats[:, 3] >= 0).all()
    assert (stats[:, 1] <= np.log(2) + 1e-6).all()


def test_entropy_of_certain_prediction_is_zero():
    assert entropy_np(np.array([1.0, 0.0]), axis=0) == 0.0
