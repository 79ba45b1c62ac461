"""Fine-tuning held near the initial model: L2-SP (``anchor_weight``) and frozen BatchNorm statistics."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from bridge.cli.app import app
from inference.models.unet import PlainConvUNet
from inference.training.anchor import (
    WeightAnchor,
    check_anchor_weight,
    check_fine_tuning,
    freeze_batchnorm,
    squared_distance,
)
from inference.training.train_nuclei import NucleiTrainConfig, train_nuclei
from inference.training.train_seg import SegTrainConfig, train_segmentation
from tests.helpers import TINY_TRAINING, TINY_TRAINING_ARGS, finetune_config


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))


def test_the_penalty_is_zero_at_init_and_half_the_weight_times_the_squared_distance():
    net = _net()
    anchor = WeightAnchor(net, weight=0.5)
    assert anchor.penalty(net).item() == 0.0
    with torch.no_grad():
        net[0].bias += torch.tensor([1.0, 2.0])  # squared distance 1 + 4
        net[1].weight -= 1.0  # BatchNorm's scale, 2 channels: + 2
    assert anchor.penalty(net).item() == pytest.approx(0.5 / 2 * 7)


def test_batchnorm_affine_parameters_are_anchored_its_running_statistics_are_not():
    net = _net()
    anchor = WeightAnchor(net, weight=1.0)
    assert sorted(anchor.reference) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    net.train()
    net(torch.randn(4, 1, 3, 3) * 5 + 3)  # moves the running mean and variance only
    assert anchor.penalty(net).item() == 0.0


def test_the_gradient_pulls_toward_the_initial_weights():
    net = _net()
    anchor = WeightAnchor(net, weight=0.1)
    init = {k: v.clone() for k, v in anchor.reference.items()}
    with torch.no_grad():
        for p in net.parameters():
            p += torch.randn_like(p)
    anchor.penalty(net).backward()
    for name, p in net.named_parameters():
        assert torch.allclose(p.grad, 0.1 * (p.detach() - init[name]))  # d/dw of w/2 (w - w0)^2
    before = squared_distance(net, init)
    with torch.no_grad():
        for p in net.parameters():
            p -= 1.0 * p.grad  # one gradient step on the penalty alone
    assert squared_distance(net, init) == pytest.approx(before * 0.9**2)


def test_the_anchor_copies_the_weights_so_training_does_not_move_it():
    net = _net()
    anchor = WeightAnchor(net, weight=1.0)
    with torch.no_grad():
        net[0].weight.fill_(3.0)
    assert anchor.penalty(net).item() > 0


def test_squared_distance_leaves_out_buffers_of_a_state_dict():
    net = _net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["1.running_mean"] += 10
    assert squared_distance(net, state) == 0.0


@pytest.mark.parametrize(
    ("weight", "init", "match"),
    [
        (-0.1, "demo", r"anchor_weight must be a finite number >= 0 \(0: off\), got -0.1"),
        (float("nan"), "demo", r"finite number >= 0 .*got nan"),
        (float("inf"), "demo", r"finite number >= 0 .*got inf"),
        ("0.1", "demo", r"finite number >= 0 .*got '0.1'"),
        (True, "demo", r"finite number >= 0 .*got True"),
        # The library's own words (it said "init_model (pdl1 train: --init MODEL)"; pdl1 train says its own first).
        (0.1, None, r"anchor_weight 0.1 holds .* starts from scratch: give init_model, or anchor_weight 0$"),
    ],
)
def test_bad_anchor_weights_are_refused(weight, init, match):
    with pytest.raises(ValueError, match=match):
        check_anchor_weight(weight, init_model=init)
    with pytest.raises(ValueError, match=match):
        SegTrainConfig(slides=("x.svs",), out_dir="unused", anchor_weight=weight, init_model=init)
    with pytest.raises(ValueError, match=match):
        NucleiTrainConfig(slides=("x.svs",), out_dir="unused", anchor_weight=weight, init_model=init)


def test_freezing_batchnorm_without_an_initial_model_is_refused():
    match = (
        "freeze_batchnorm keeps an initial model's BatchNorm statistics, and this run starts from scratch: give "
        "init_model, or leave BatchNorm to learn its statistics$"
    )
    with pytest.raises(ValueError, match=match):
        check_fine_tuning(0.0, True, init_model=None)
    with pytest.raises(ValueError, match=match):
        SegTrainConfig(slides=("x.svs",), out_dir="unused", freeze_batchnorm=True)
    with pytest.raises(ValueError, match=match):
        NucleiTrainConfig(slides=("x.svs",), out_dir="unused", freeze_batchnorm=True)
    check_fine_tuning(0.0, True, init_model="demo")


def test_frozen_batchnorm_normalises_with_and_keeps_its_running_statistics_and_still_trains_its_affine():
    net = _net()
    with torch.no_grad():
        net[1].running_mean.fill_(1.0)
        net[1].running_var.fill_(4.0)
    net.train()
    freeze_batchnorm(net)
    assert net[0].training and not net[1].training
    x = torch.randn(4, 1, 3, 3) * 5 + 3
    out = net(x)
    assert net[1].running_mean.tolist() == [1.0, 1.0] and net[1].running_var.tolist() == [4.0, 4.0]
    expected = (net[0](x) - 1.0) / torch.sqrt(torch.tensor(4.0 + net[1].eps)) * net[1].weight.view(1, 2, 1, 1)
    assert torch.allclose(out, expected + net[1].bias.view(1, 2, 1, 1), atol=1e-5)
    out.sum().backward()
    assert net[1].weight.grad is not None and net[1].bias.grad is not None


def test_an_anchor_needs_a_positive_weight():
    with pytest.raises(ValueError, match="weight must be a finite number > 0, got 0"):
        WeightAnchor(_net(), weight=0)


@pytest.fixture
def phantom(finetune_phantom):
    return finetune_phantom


@pytest.fixture
def init_model(finetune_init_model):
    return finetune_init_model


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("member_*"))}


def _distance(folder, init_model):
    manifest = json.loads((folder / "manifest.json").read_text())
    net = PlainConvUNet(**{**manifest["architecture_kwargs"], "features": (4, 8)})
    net.load_state_dict({k: v.float() for k, v in load_file(str(folder / manifest["members"][-1]["file"])).items()})
    init_file = json.loads((init_model / "manifest.json").read_text())["members"][-1]["file"]
    return squared_distance(net, {k: v.float() for k, v in load_file(str(init_model / init_file)).items()})


def test_anchor_0_trains_bit_identically_to_a_run_without_it(phantom, init_model, tmp_path, monkeypatch):
    plain = train_segmentation(finetune_config(phantom, init_model, tmp_path / "plain"))

    def no_anchor(*args, **kwargs):
        raise AssertionError("anchor_weight 0 made an anchor")

    monkeypatch.setattr("inference.training.train_seg.WeightAnchor", no_anchor)
    monkeypatch.setattr("inference.training.cyclic.freeze_batchnorm", no_anchor)
    zero = train_segmentation(
        finetune_config(phantom, init_model, tmp_path / "zero", anchor_weight=0.0, freeze_batchnorm=False)
    )
    assert _digests(tmp_path / "plain") == _digests(tmp_path / "zero")
    assert plain.training["final_losses"] == zero.training["final_losses"]
    history = json.loads((tmp_path / "zero" / "training_history.json").read_text())["epochs"]
    assert all("anchor_penalty" not in h for h in history)


def test_an_anchored_run_stays_nearer_the_initial_weights_and_records_its_weight_and_penalty(
    phantom, init_model, tmp_path
):
    from pathlib import Path

    train_segmentation(finetune_config(phantom, init_model, tmp_path / "free"))
    anchored = train_segmentation(finetune_config(phantom, init_model, tmp_path / "held", anchor_weight=10.0))
    assert anchored.training["config"]["anchor_weight"] == 10.0
    assert anchored.training["init"]["model"] == init_model
    free = _distance(tmp_path / "free", Path(init_model))
    held = _distance(tmp_path / "held", Path(init_model))
    assert 0 < held < free / 2
    history = json.loads((tmp_path / "held" / "training_history.json").read_text())["epochs"]
    penalties = [h["anchor_penalty"] for h in history]
    assert len(penalties) == 4 and all(np.isfinite(penalties)) and penalties[-1] > 0


def test_an_anchored_run_resumed_after_a_crash_anchors_to_the_initial_weights_not_the_checkpoints(
    phantom, init_model, tmp_path
):
    kw = dict(anchor_weight=10.0, freeze_batchnorm=True)
    train_segmentation(finetune_config(phantom, init_model, tmp_path / "whole", **kw))

    def crash(done, total):
        if done == 5:  # in epoch 2, after the epoch-1 checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_segmentation(finetune_config(phantom, init_model, tmp_path / "resumed", **kw), on_progress=crash)
    train_segmentation(finetune_config(phantom, init_model, tmp_path / "resumed", **kw), resume=True)
    assert _digests(tmp_path / "whole") == _digests(tmp_path / "resumed")


def _stats(folder, member=-1):
    manifest = json.loads((folder / "manifest.json").read_text())
    state = load_file(str(folder / manifest["members"][member]["file"]))
    return {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}


def test_frozen_batchnorm_members_keep_the_initial_models_statistics(phantom, init_model, tmp_path):
    from pathlib import Path

    init = _stats(Path(init_model))
    updated = train_segmentation(finetune_config(phantom, init_model, tmp_path / "updated"))
    frozen = train_segmentation(finetune_config(phantom, init_model, tmp_path / "frozen", freeze_batchnorm=True))
    assert frozen.training["config"]["freeze_batchnorm"] is True
    assert updated.training["config"]["freeze_batchnorm"] is False
    kept = _stats(tmp_path / "frozen")
    assert init.keys() == kept.keys() and len(init) > 0
    assert all(torch.equal(init[k], kept[k]) for k in init)
    assert not all(torch.equal(init[k], v) for k, v in _stats(tmp_path / "updated").items())
    assert _digests(tmp_path / "frozen") != _digests(Path(init_model))  # the weights still trained


def test_nuclei_fine_tuning_takes_the_anchor_too(phantom, tmp_path):
    common = dict(slides=(phantom,), **TINY_TRAINING, width=8, dilations=(1, 2))
    train_nuclei(NucleiTrainConfig(out_dir=str(tmp_path / "init"), seed=5, **common))
    manifest = train_nuclei(
        NucleiTrainConfig(
            out_dir=str(tmp_path / "ft"),
            seed=6,
            init_model=str(tmp_path / "init"),
            anchor_weight=1.0,
            freeze_batchnorm=True,
            **common,
        )
    )
    assert manifest.training["config"]["anchor_weight"] == 1.0
    assert manifest.training["config"]["freeze_batchnorm"] is True
    init = _stats(tmp_path / "init")
    assert all(torch.equal(init[k], v) for k, v in _stats(tmp_path / "ft").items())
    history = json.loads((tmp_path / "ft" / "training_history.json").read_text())["epochs"]
    assert all(h["anchor_penalty"] >= 0 for h in history) and history[-1]["anchor_penalty"] > 0


@pytest.mark.parametrize("init", [[], ["--init", "none"]])
@pytest.mark.parametrize("task", ["seg", "nuclei"])
@pytest.mark.parametrize("option", [["--anchor-weight", "0.1"], ["--freeze-batchnorm"]])
def test_cli_refuses_an_anchor_or_frozen_batchnorm_when_training_from_scratch(phantom, tmp_path, init, task, option):
    out = tmp_path / "m"
    args = ["train", task, phantom, "--out", str(out), *TINY_TRAINING_ARGS, "--no-progress", *option, *init]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.replace("│", " ").split())
    assert option[0] in text and "trains from scratch" in text and "give --init MODEL" in text
    assert not (out / "manifest.json").exists()


def test_cli_refuses_a_negative_anchor(phantom, tmp_path):
    args = ["train", "seg", phantom, "--out", str(tmp_path / "m"), "--anchor-weight", "-1", "--init", "none"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "--anchor-weight" in result.output


def test_cli_fine_tunes_with_an_anchor_and_records_it(phantom, init_model, tmp_path):
    out = tmp_path / "m"
    args = ["train", "seg", phantom, "--out", str(out), *TINY_TRAINING_ARGS, "--features", "4,8", "--no-progress"]
    result = CliRunner().invoke(app, [*args, "--init", init_model, "--anchor-weight", "0.5", "--freeze-batchnorm"])
    assert result.exit_code == 0, result.output
    training = json.loads((out / "manifest.json").read_text())["training"]
    assert training["config"]["anchor_weight"] == 0.5 and training["init"]["model"] == init_model
    assert training["config"]["freeze_batchnorm"] is True


def test_the_initial_model_is_recorded_by_its_absolute_path(phantom, init_model, tmp_path, monkeypatch):
    # Typed relative (`--init vseg`), it was recorded as typed: meaningless once the manifest left that folder.
    monkeypatch.chdir(Path(init_model).parent)
    manifest = train_segmentation(finetune_config(phantom, Path(init_model).name, tmp_path / "rel"))
    assert manifest.training["init"]["model"] == init_model == str(Path(init_model).absolute())
