"""Fine-tuning with the initial model's predictions distilled in: Learning without Forgetting (``distill_weight``)."""

import hashlib
import json

import pytest
import torch
from typer.testing import CliRunner

from bridge.cli.app import app
from inference.phantom.pyramid import write_phantom
from inference.phantom.scene import PhantomSpec
from inference.training.distill import (
    DEFAULT_TEMPERATURE,
    Distiller,
    check_distillation,
    distillation_loss,
    unlabelled_pixels,
)
from inference.training.labels import IGNORE_LABEL
from inference.training.pseudo import UnlabeledSlide
from inference.training.train_seg import PSEUDO_OFFSET, SegTrainConfig, train_segmentation
from tests.helpers import TINY_TRAINING_ARGS, finetune_config


def test_the_loss_is_zero_when_student_and_teacher_agree_and_grows_with_their_difference():
    torch.manual_seed(0)
    teacher = torch.randn(2, 2, 4, 4)
    target = torch.full((2, 4, 4), IGNORE_LABEL)
    assert distillation_loss(teacher.clone(), teacher, target, temperature=2.0).item() == pytest.approx(0, abs=1e-7)
    near = distillation_loss(teacher + 0.1 * torch.randn(2, 2, 4, 4), teacher, target, temperature=2.0)
    far = distillation_loss(-teacher, teacher, target, temperature=2.0)
    assert 0 < near.item() < far.item()


def test_the_loss_is_t_squared_times_the_mean_kl_over_unlabelled_pixels_only():
    student = torch.tensor([[[[0.0, 0.0]], [[0.0, 0.0]]]])  # (1, 2, 1, 2): 1/2, 1/2 at both pixels
    teacher = torch.tensor([[[[4.0, -4.0]], [[0.0, 0.0]]]])
    t = 2.0
    p = torch.softmax(teacher / t, dim=1)[0, :, 0, 0]  # the teacher at the first pixel
    kl = float((p * (p / 0.5).log()).sum())
    # first pixel pseudo-labelled (distilled), second labelled (not): the mean is over the first alone
    target = torch.tensor([[[PSEUDO_OFFSET + 1, 0]]])
    assert distillation_loss(student, teacher, target, temperature=t).item() == pytest.approx(t * t * kl, rel=1e-5)
    assert unlabelled_pixels(torch.tensor([0, 1, PSEUDO_OFFSET, PSEUDO_OFFSET + 1, IGNORE_LABEL])).tolist() == [
        False,
        False,
        True,
        True,
        True,
    ]
    labelled = torch.tensor([[[1, 0]]])
    loss = distillation_loss(student.requires_grad_(), teacher, labelled, temperature=t)
    assert loss.item() == 0.0
    loss.backward()  # labels only: still a graph, and it moves nothing
    assert torch.equal(student.grad, torch.zeros_like(student))


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.BatchNorm2d(2))


def test_the_teacher_is_a_frozen_copy_of_the_model_as_it_started():
    net = _net().eval()
    distiller = Distiller(net, weight=3.0)
    x = torch.randn(2, 3, 4, 4)
    target = torch.full((2, 4, 4), IGNORE_LABEL)
    assert distiller.penalty(x, net(x), target).item() == pytest.approx(0, abs=1e-7)
    with torch.no_grad():
        net[0].bias.add_(torch.tensor([1.0, -1.0]))
    net.train()
    penalty = distiller.penalty(x, net(x), target)
    assert penalty.item() > 0
    penalty.backward()
    assert net[0].weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in distiller.teacher.parameters())
    assert not distiller.teacher.training  # the student's train() does not reach it
    assert not torch.equal(distiller.teacher[0].bias, net[0].bias)


@pytest.mark.parametrize(
    ("weight", "temperature", "init", "match"),
    [
        (-1.0, 2.0, "demo", r"distill_weight must be a finite number >= 0 \(0: off\), got -1.0"),
        (float("nan"), 2.0, "demo", "distill_weight must be a finite number >= 0"),
        (True, 2.0, "demo", "distill_weight must be a finite number >= 0"),
        (1.0, 0.0, "demo", "distill_temperature must be a finite number > 0, got 0.0"),
        (1.0, float("inf"), "demo", "distill_temperature must be a finite number > 0"),
        (2.0, 2.0, None, r"distill_weight 2 distils .* starts from scratch: give init_model, or distill_weight 0$"),
    ],
)
def test_bad_distillation_settings_are_refused(weight, temperature, init, match):
    with pytest.raises(ValueError, match=match):
        check_distillation(weight, temperature, init_model=init)
    with pytest.raises(ValueError, match=match):
        SegTrainConfig(
            slides=("x.svs",), out_dir="unused", distill_weight=weight, distill_temperature=temperature, init_model=init
        )


def test_a_distiller_needs_a_positive_weight():
    with pytest.raises(ValueError, match="weight must be a finite number > 0, got 0"):
        Distiller(_net(), weight=0)


@pytest.fixture
def phantom(finetune_phantom):
    return finetune_phantom


@pytest.fixture
def init_model(finetune_init_model):
    return finetune_init_model


def _finetune(phantom, init_model, out, **kw):
    """Phantom truth plus the same slide unlabelled (pseudo-labelled by the initial model): pixels to distil on."""
    unlabelled = (UnlabeledSlide(phantom),)
    return finetune_config(phantom, init_model, out, unlabeled=unlabelled, pseudo_model=init_model, **kw)


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("member_*"))}


def _history(folder):
    return json.loads((folder / "training_history.json").read_text())["epochs"]


def test_distill_0_trains_bit_identically_to_a_run_without_it(phantom, init_model, tmp_path, monkeypatch):
    plain = train_segmentation(_finetune(phantom, init_model, tmp_path / "plain"))

    def no_distiller(*args, **kwargs):
        raise AssertionError("distill_weight 0 made a teacher")

    monkeypatch.setattr("inference.training.train_seg.Distiller", no_distiller)
    zero = train_segmentation(_finetune(phantom, init_model, tmp_path / "zero", distill_weight=0.0))
    assert _digests(tmp_path / "plain") == _digests(tmp_path / "zero")
    assert plain.training["final_losses"] == zero.training["final_losses"]
    assert all("distill_penalty" not in h for h in _history(tmp_path / "zero"))
    assert zero.training["config"]["distill_weight"] == 0.0


def test_a_distilled_run_records_its_weight_temperature_and_penalty(phantom, init_model, tmp_path):
    train_segmentation(_finetune(phantom, init_model, tmp_path / "plain"))
    kd = train_segmentation(
        _finetune(phantom, init_model, tmp_path / "kd", distill_weight=10.0, distill_temperature=3.0)
    )
    assert kd.training["config"]["distill_weight"] == 10.0
    assert kd.training["config"]["distill_temperature"] == 3.0
    assert kd.training["init"]["model"] == init_model  # the teacher
    penalties = [h["distill_penalty"] for h in _history(tmp_path / "kd")]
    assert len(penalties) == 4 and all(p >= 0 for p in penalties) and max(penalties) > 0
    assert _digests(tmp_path / "kd") != _digests(tmp_path / "plain")


def test_a_distilled_run_resumed_after_a_crash_distils_the_initial_model_not_the_checkpoint(
    phantom, init_model, tmp_path
):
    kw = dict(distill_weight=10.0)
    train_segmentation(_finetune(phantom, init_model, tmp_path / "whole", **kw))

    def crash(done, total):
        if done == 5:  # in epoch 2, after the epoch-1 checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_segmentation(_finetune(phantom, init_model, tmp_path / "resumed", **kw), on_progress=crash)
    train_segmentation(_finetune(phantom, init_model, tmp_path / "resumed", **kw), resume=True)
    assert _digests(tmp_path / "whole") == _digests(tmp_path / "resumed")


@pytest.mark.parametrize("init", [[], ["--init", "none"]])
def test_cli_refuses_distillation_when_training_from_scratch(phantom, tmp_path, init):
    out = tmp_path / "m"
    args = ["train", "seg", phantom, "--out", str(out), *TINY_TRAINING_ARGS, "--no-progress"]
    args += ["--distill-weight", "1", *init]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.replace("│", " ").split())
    assert "--distill-weight" in text and "trains from scratch" in text and "give --init MODEL" in text
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("option", [["--distill-weight", "-1"], ["--distill-temperature", "0"]])
def test_cli_refuses_a_negative_distillation_weight_or_a_zero_temperature(phantom, init_model, tmp_path, option):
    args = ["train", "seg", phantom, "--out", str(tmp_path / "m"), "--init", init_model, *option]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and option[0] in result.output


def test_cli_help_names_the_distillation_and_its_default_temperature_is_the_librarys():
    from bridge.cli.train import train_seg

    result = CliRunner().invoke(app, ["train", "seg", "--help"], env={"COLUMNS": "200"})
    assert "--distill-weight" in result.output and "Learning without Forgetting" in result.output
    defaults = train_seg.__defaults__ or ()
    assert DEFAULT_TEMPERATURE == 2.0 and defaults[-1] == DEFAULT_TEMPERATURE


def test_cli_fine_tunes_with_distillation_and_records_it(phantom, init_model, tmp_path):
    other = tmp_path / "other.svs"
    write_phantom(other, PhantomSpec(1024, 1024, seed=23, tps_percent=40))
    out = tmp_path / "m"
    args = ["train", "seg", phantom, "--out", str(out), *TINY_TRAINING_ARGS, "--features", "4,8", "--no-progress"]
    args += ["--init", init_model, "--unlabeled", str(other), "--distill-weight", "0.5", "--distill-temperature", "1.5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    training = json.loads((out / "manifest.json").read_text())["training"]
    assert training["config"]["distill_weight"] == 0.5 and training["config"]["distill_temperature"] == 1.5
    assert training["init"]["model"] == init_model
    assert all("distill_penalty" in h for h in _history(out))
