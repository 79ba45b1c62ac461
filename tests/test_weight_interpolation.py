"""Weight-space interpolation toward the initial model (WiSE-FT; issue #33's forgetting), and the benchmark's reuse of
a model trained before its config gained fields."""

from __future__ import annotations

import pytest
import torch

from benchmarks.truth_labels import same_config
from benchmarks.weight_interpolation import interpolated_ensemble, interpolated_state
from inference.models.ensemble import Ensemble
from inference.models.unet import PlainConvUNet
from tests.helpers import make_manifest


def unet(seed: int) -> PlainConvUNet:
    torch.manual_seed(seed)
    net = PlainConvUNet(features=(4, 8), n_conv_per_stage=1)
    with torch.no_grad():  # statistics of their own, so that they are interpolated too
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(seed + 1)
    return net.eval()


def tuned_ensemble() -> Ensemble:
    members = [unet(1), unet(2)]
    return Ensemble.from_members(make_manifest(tile_size_px=16, n_members=2), members)


def test_the_ends_are_the_initial_and_the_fine_tuned_weights_and_the_middle_lies_between():
    init = unet(0).state_dict()
    ensemble = tuned_ensemble()
    tuned = [m.state_dict() for m in ensemble.members]
    at_start = interpolated_ensemble(ensemble, init, 0.0)
    as_trained = interpolated_ensemble(ensemble, init, 1.0)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(at_start.members[0](x), at_start.members[1](x))  # both are the initial model
        assert torch.allclose(as_trained.members[1](x), ensemble.members[1].eval()(x), atol=1e-5)
    half = interpolated_state(init, tuned[1], 0.5)
    for key, value in tuned[1].items():
        if value.is_floating_point():  # weights and BatchNorm statistics alike
            assert torch.allclose(half[key], (init[key] + value) / 2), key
        else:  # counters stay the fine-tuned model's
            assert torch.equal(half[key], value), key
    # The ensemble given is left as it was.
    assert all(torch.equal(v, ensemble.members[0].state_dict()[k]) for k, v in tuned[0].items())


def test_another_architecture_or_a_weight_outside_0_1_is_refused():
    other = PlainConvUNet(features=(4, 8, 16), n_conv_per_stage=1).state_dict()
    with pytest.raises(ValueError, match="not the same architecture"):
        interpolated_state(other, unet(1).state_dict(), 0.5)
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
            interpolated_state(unet(0).state_dict(), unet(1).state_dict(), alpha)


def test_a_model_trained_before_a_field_was_added_is_reused_only_at_that_fields_default():
    recorded = {"lr_max": 0.001, "seed": 0}
    defaults = {"distill_weight": 0.0, "slide_mpp": {}}
    assert same_config(recorded, {**recorded, "distill_weight": 0.0, "slide_mpp": {}}, defaults=defaults)
    assert not same_config(recorded, {**recorded, "distill_weight": 1.0, "slide_mpp": {}}, defaults=defaults)
    assert not same_config(recorded, {"lr_max": 0.003, "seed": 0, "distill_weight": 0.0}, defaults=defaults)
    # A field the recorded config has counts whatever its default.
    assert not same_config({**recorded, "distill_weight": 1.0}, {**recorded, "distill_weight": 0.0}, defaults=defaults)
