"""BatchNorm folding: the folded members compute what the trained ones compute."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from inference.models.ensemble import Ensemble, Precision, demo_model_dir
from inference.models.fusion import fold_batchnorm
from inference.models.nuclei_model import DilatedResFCN
from inference.models.unet import PlainConvUNet, build_model


def _with_trained_statistics(model: nn.Module, seed: int) -> nn.Module:
    # Fresh BatchNorms are identities (mean 0, var 1, gamma 1, beta 0); give them statistics
    # far from that, as training does, so a wrong fold cannot pass.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                n = mod.num_features
                mod.running_mean.copy_(torch.randn(n, generator=gen))
                mod.running_var.copy_(torch.rand(n, generator=gen) * 4 + 0.05)
                mod.weight.copy_(torch.randn(n, generator=gen))
                mod.bias.copy_(torch.randn(n, generator=gen))
    return model.eval()


@pytest.mark.parametrize(
    ("model", "n_bn"),
    [
        (PlainConvUNet(features=(8, 16, 32)), 10),  # 3 encoder + 2 decoder stages, 2 convs each
        (DilatedResFCN(width=16, dilations=(1, 2)), 6),  # stem 2 + 2 per residual block
    ],
    ids=["unet", "nuclei_fcn"],
)
def test_folded_model_computes_the_same_logits(model, n_bn):
    model = _with_trained_statistics(model, seed=3)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(x)
    folded = copy.deepcopy(model)
    assert fold_batchnorm(folded) == n_bn
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        got = folded(x)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_instance_norm_is_left_alone():
    model = PlainConvUNet(features=(8, 16), norm="instance").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    assert fold_batchnorm(model) == 0
    assert sum(isinstance(m, nn.InstanceNorm2d) for m in model.modules()) == 6  # 2 + 1 stages, 2 each
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_a_model_in_training_mode_is_refused():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(PlainConvUNet(features=(8, 16)))
    partly = PlainConvUNet(features=(8, 16)).eval()
    partly.decoder.train()  # a BatchNorm deep inside still normalises by the batch
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(partly)


def test_loaded_demo_members_are_folded_and_agree_with_the_trained_weights():
    # What users get from Ensemble.load against the members exactly as their safetensors hold them.
    folded = Ensemble.load(demo_model_dir("seg"), task="segmentation")
    kept = Ensemble.load(demo_model_dir("seg"), task="segmentation", fold_bn=False)
    assert all(not any(isinstance(m, nn.BatchNorm2d) for m in member.modules()) for member in folded.members)
    man = folded.manifest
    reference = build_model(man.architecture, man.architecture_kwargs)
    reference.load_state_dict(load_file(folded.folder / man.members[0].file))
    reference.eval()
    assert [type(m) for m in kept.members[0].modules()] == [type(m) for m in reference.modules()]

    tiles = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    fp32 = Precision(None)
    p_folded = folded.member_probs(tiles, precision=fp32)
    p_kept = kept.member_probs(tiles, precision=fp32)
    assert p_folded.shape == (len(man.members), 2, 2, 64, 64)
    assert torch.allclose(p_folded, p_kept, atol=1e-5)
    with torch.no_grad():
        p_ref = torch.softmax(reference(kept.normalize(tiles)), dim=1)
    assert torch.allclose(p_folded[0], p_ref, atol=1e-5)
