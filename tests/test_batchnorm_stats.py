"""BatchNorm statistics re-estimated on the tiles to be analysed (AdaBN; issue #33's forgetting)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.batchnorm_stats import (
    adapt_batchnorm,
    batchnorm_state,
    reestimate_batchnorm,
    with_batchnorm_state,
)
from inference.models.ensemble import Ensemble, Precision
from inference.models.unet import PlainConvUNet
from tests.helpers import make_manifest

FP32 = Precision(None)


def conv_bn() -> nn.Sequential:
    """1x1 convolution (weight 1, no bias) then BatchNorm: the BatchNorm sees the input's channel as it is."""
    net = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.BatchNorm2d(1))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[1].running_mean.fill_(7.0)
        net[1].running_var.fill_(9.0)
    return net.eval()


def test_one_batch_gives_its_mean_and_unbiased_variance():
    net = conv_bn()
    x = torch.tensor([1.0, 2.0, 3.0, 6.0]).view(1, 1, 2, 2)
    assert reestimate_batchnorm(net, [x]) == 1
    assert net[1].running_mean.item() == pytest.approx(3.0)
    assert net[1].running_var.item() == pytest.approx(np.var([1, 2, 3, 6], ddof=1))
    assert not net.training and not net[1].training
    assert net[1].momentum == 0.1  # put back


def test_batches_count_the_same_and_the_weights_stay():
    net = conv_bn()
    weights = {k: v.clone() for k, v in net.named_parameters()}
    batches = [torch.full((1, 1, 2, 2), 1.0), torch.full((2, 1, 2, 2), 2.0), torch.full((1, 1, 2, 2), 6.0)]
    assert reestimate_batchnorm(net, batches) == 3
    assert net[1].running_mean.item() == pytest.approx(3.0)  # (1 + 2 + 6) / 3, not weighted by batch size
    assert net[1].running_var.item() == pytest.approx(0.0)
    assert all(torch.equal(v, dict(net.named_parameters())[k]) for k, v in weights.items())


def test_the_model_then_normalises_with_the_new_statistics():
    net = conv_bn()
    x = torch.tensor([1.0, 2.0, 3.0, 6.0]).view(1, 1, 2, 2)
    reestimate_batchnorm(net, [x])
    with torch.no_grad():
        out = net(x)
    expected = (x - 3.0) / torch.sqrt(torch.tensor(np.var([1, 2, 3, 6], ddof=1) + 1e-5, dtype=torch.float32))
    assert torch.allclose(out, expected, atol=1e-6)


def test_no_batch_raises_and_keeps_the_statistics():
    net = conv_bn()
    with pytest.raises(ValueError, match="no batch"):
        reestimate_batchnorm(net, [])
    assert net[1].running_mean.item() == 7.0 and net[1].running_var.item() == 9.0
    assert net[1].momentum == 0.1 and not net[1].training


def test_an_error_halfway_keeps_the_statistics():
    net = conv_bn()

    def batches():
        yield torch.full((1, 1, 2, 2), 1.0)
        raise OSError("tile unreadable")

    with pytest.raises(OSError, match="unreadable"):
        reestimate_batchnorm(net, batches())
    assert net[1].running_mean.item() == 7.0 and net[1].running_var.item() == 9.0


def test_a_model_without_batchnorm_is_refused():
    with pytest.raises(ValueError, match=r"no BatchNorm layer.*fold_bn=False"):
        reestimate_batchnorm(nn.Conv2d(1, 1, 1), [torch.zeros(1, 1, 2, 2)])


def unet_ensemble(n: int = 2) -> Ensemble:
    torch.manual_seed(0)
    members = [PlainConvUNet(features=(4, 8), n_conv_per_stage=1).eval() for _ in range(n)]
    return Ensemble.from_members(make_manifest(tile_size_px=16, n_members=n), members)


def tiles(seed: int, *, n: int = 3, low: int = 0, high: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, (n, 16, 16, 3), dtype=np.uint8)


def test_adapt_batchnorm_copies_the_members_and_leaves_the_ensemble():
    ensemble = unet_ensemble()
    before = [batchnorm_state(m) for m in ensemble.members]
    adapted = adapt_batchnorm(ensemble, [tiles(1, low=100, high=140)], fold_bn=False)
    assert adapted.members[0] is not ensemble.members[0]
    for member, state in zip(ensemble.members, before, strict=True):
        assert all(torch.equal(v, batchnorm_state(member)[k]) for k, v in state.items())
    first_bn = adapted.members[0].encoder[0][1]
    x = ensemble.normalize(torch.from_numpy(tiles(1, low=100, high=140)))
    with torch.no_grad():
        conv_out = adapted.members[0].encoder[0][0](x)
    assert torch.allclose(first_bn.running_mean, conv_out.mean(dim=(0, 2, 3)), atol=1e-5)


def test_adapted_and_folded_agree_with_adapted_unfolded():
    ensemble = unet_ensemble()
    batch = tiles(2)
    folded = adapt_batchnorm(ensemble, [batch])
    unfolded = adapt_batchnorm(ensemble, [batch], fold_bn=False)
    assert folded.bn_folded and not unfolded.bn_folded
    a = folded.member_probs(batch, precision=FP32)
    b = unfolded.member_probs(batch, precision=FP32)
    assert torch.allclose(a, b, atol=1e-5)


def test_statistics_of_other_tiles_change_the_prediction():
    ensemble = unet_ensemble()
    pale, dark = tiles(3, low=180, high=256), tiles(4, low=0, high=90)
    own = ensemble.member_probs(pale, precision=FP32)
    on_pale = adapt_batchnorm(ensemble, [pale]).member_probs(pale, precision=FP32)
    on_dark = adapt_batchnorm(ensemble, [dark]).member_probs(pale, precision=FP32)
    assert not torch.allclose(own, on_pale, atol=1e-3)
    assert not torch.allclose(on_pale, on_dark, atol=1e-3)


def test_a_folded_ensemble_is_refused():
    ensemble = unet_ensemble()
    folded = adapt_batchnorm(ensemble, [tiles(5)])
    with pytest.raises(ValueError, match=r"folded.*fold_bn=False"):
        adapt_batchnorm(folded, [tiles(5)])


def test_hooks_on_the_members_hear_the_prediction_not_the_estimation():
    ensemble = unet_ensemble()
    heard = []
    handle = ensemble.members[0].register_forward_hook(lambda _m, x, _out: heard.append(x[0].shape[0]))
    try:
        adapted = adapt_batchnorm(ensemble, [tiles(6, n=3)])
        assert heard == []
        adapted.member_probs(tiles(6, n=2), precision=FP32)
    finally:
        handle.remove()
    assert heard == [2]


def test_with_batchnorm_state_puts_one_members_statistics_into_all():
    ensemble = unet_ensemble()
    source = adapt_batchnorm(ensemble, [tiles(7, low=0, high=60)], fold_bn=False).members[1]
    state = batchnorm_state(source)
    moved = with_batchnorm_state(ensemble, state, fold_bn=False)
    for member, original in zip(moved.members, ensemble.members, strict=True):
        assert all(torch.equal(v, batchnorm_state(member)[k]) for k, v in state.items())
        own_weights = {k: v for k, v in original.state_dict().items() if k not in state}
        assert all(torch.equal(v, member.state_dict()[k]) for k, v in own_weights.items())
    with pytest.raises(ValueError, match="do not fit"):
        with_batchnorm_state(ensemble, {"encoder.0.1.running_mean": torch.zeros(4)})


@pytest.mark.parametrize("weight", [0.25, 0.5, 1.0])
def test_weight_mixes_the_new_statistics_with_the_members_own(weight):
    ensemble = unet_ensemble()
    batch = tiles(8, low=0, high=60)
    own = batchnorm_state(ensemble.members[0])
    new = batchnorm_state(adapt_batchnorm(ensemble, [batch], fold_bn=False).members[0])
    mixed = batchnorm_state(adapt_batchnorm(ensemble, [batch], fold_bn=False, weight=weight).members[0])
    for key in own:
        if key.endswith(("running_mean", "running_var")):
            assert torch.allclose(mixed[key], weight * new[key] + (1 - weight) * own[key], atol=1e-6)


def test_a_weight_outside_0_1_is_refused():
    with pytest.raises(ValueError, match=r"weight must be in \(0, 1\]"):
        adapt_batchnorm(unet_ensemble(), [tiles(9)], weight=0)
