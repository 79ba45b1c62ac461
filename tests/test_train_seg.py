import hashlib
import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from inference.models.ensemble import Ensemble
from inference.phantom.pyramid import write_phantom
from inference.phantom.scene import PhantomSpec
from inference.training.cyclic import cycle_of, is_member_epoch, learning_rate
from inference.training.train_seg import SegTrainConfig, ce_loss, seg_loss, train_segmentation


def _cfg(**kw):
    base = dict(
        slides=("x.svs",),
        out_dir="unused",
        cycles=3,
        epochs_per_cycle=4,
        iterations_per_epoch=10,
        lr_max=1e-2,
        lr_min=1e-4,
    )
    return SegTrainConfig(**{**base, **kw})


def test_cosine_schedule_restarts_each_cycle():
    cfg = _cfg()
    assert learning_rate(cfg, 0, 0) == pytest.approx(1e-2)
    assert learning_rate(cfg, 3, 9) == pytest.approx(1e-4, abs=2e-4)
    assert learning_rate(cfg, 4, 0) == pytest.approx(1e-2)  # warm restart
    lrs = [learning_rate(cfg, e, i) for e in range(4) for i in range(10)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_members_come_from_the_low_lr_end():
    cfg = _cfg(members_per_cycle=2)
    members = [e for e in range(cfg.total_epochs) if is_member_epoch(cfg, e)]
    assert members == [6, 7, 10, 11]  # first cycle dropped; last two epochs of each other cycle
    keep_first = _cfg(drop_first_cycle=False)
    assert [e for e in range(12) if is_member_epoch(keep_first, e)] == [3, 7, 11]


def test_a_long_first_cycle_converges_before_the_first_member():
    cfg = _cfg(first_cycle_epochs=8)  # 8 + 4 + 4 epochs
    assert cfg.total_epochs == 16
    assert learning_rate(cfg, 7, 9) == pytest.approx(1e-4, abs=2e-4)  # end of the long first cycle
    assert learning_rate(cfg, 8, 0) == pytest.approx(1e-2)  # first restart after 8 epochs, not 4
    assert learning_rate(cfg, 3, 9) > 4e-3  # mid-way down the first cycle, not at its low end
    assert [e for e in range(cfg.total_epochs) if is_member_epoch(cfg, e)] == [11, 15]
    assert cycle_of(cfg, 11) == (1, 3, 4)
    keep_first = _cfg(first_cycle_epochs=8, drop_first_cycle=False)
    assert [e for e in range(keep_first.total_epochs) if is_member_epoch(keep_first, e)] == [7, 11, 15]


def test_later_cycles_restart_at_restart_lr():
    cfg = _cfg(first_cycle_epochs=8, restart_lr=2e-3)
    assert learning_rate(cfg, 0, 0) == pytest.approx(1e-2)
    assert learning_rate(cfg, 8, 0) == pytest.approx(2e-3)
    assert learning_rate(cfg, 12, 0) == pytest.approx(2e-3)
    assert learning_rate(cfg, 11, 9) == pytest.approx(1e-4, abs=1e-4)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"members_per_cycle": 9}, "members_per_cycle"),
        ({"cycles": 1}, "at least 2 cycles"),
        ({"patch_px": 100}, "multiples of 8"),
        ({"slides": ()}, "no training slides"),
        ({"first_cycle_epochs": 1, "members_per_cycle": 2}, "first_cycle_epochs"),
        ({"restart_lr": 5e-2}, "restart_lr"),
        ({"stain_jitter": "heavy"}, "stain_jitter must be one of light, strong"),
        ({"loss": "dice"}, r"loss must be one of ce\+dice, ce"),
        ({"chains": 0}, "chains must be at least 1"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kw)


@pytest.fixture(scope="module")
def small_phantom(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "s.svs"
    write_phantom(path, PhantomSpec(1024, 1024, seed=21, tps_percent=50))
    return str(path)


# A run of seconds shared by the seg and nuclei trainer tests: member at epoch 3 (cycle 1).
TINY_SCHEDULE = dict(cycles=2, epochs_per_cycle=2, iterations_per_epoch=2, batch_size=2, patch_px=32, tile_size_px=64)


def _tiny(small_phantom, out, **kw):
    return SegTrainConfig(
        slides=(small_phantom,),
        out_dir=str(out),
        **TINY_SCHEDULE,
        features=(4, 8),
        optimizer=kw.pop("optimizer", "adamw"),
        seed=3,
        **kw,
    )


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("member_*"))}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_training_writes_a_loadable_verified_ensemble(small_phantom, tmp_path, optimizer):
    manifest = train_segmentation(_tiny(small_phantom, tmp_path, optimizer=optimizer))
    assert [m.cycle for m in manifest.members] == [1]
    assert manifest.members[0].epoch == 3
    assert manifest.training["data"][0]["seed"] == 21
    # The domain guard's statistics of the one training slide: measured, but no slide left out to set limits on.
    domain = manifest.extra["domain"]
    assert domain["train_tiles"] > 0 and domain["feature_limit"] is None and domain["slides"][0]["slide"]
    ens = Ensemble.load(tmp_path, task="segmentation")
    probs = ens.member_probs(
        np.zeros((1, 64, 64, 3), np.uint8),
        precision=__import__("inference.models.ensemble", fromlist=["Precision"]).Precision(None),
    )
    assert probs.shape == (1, 1, 2, 64, 64)


def test_long_first_cycle_is_trained_and_recorded(small_phantom, tmp_path):
    manifest = train_segmentation(_tiny(small_phantom, tmp_path, first_cycle_epochs=3, restart_lr=1e-3))
    member = manifest.members[0]
    assert (member.cycle, member.epoch) == (1, 4)  # 3 epochs of first cycle, then a 2-epoch cycle
    assert member.learning_rate < 1e-3 / 5  # the low end of a cycle that restarted at 1e-3
    config = manifest.training["config"]
    assert (config["first_cycle_epochs"], config["restart_lr"]) == (3, 1e-3)


@pytest.mark.parametrize(("key", "value"), [("stain_jitter", "strong"), ("loss", "ce")])
def test_another_augmentation_or_loss_trains_other_members_and_is_recorded(small_phantom, tmp_path, key, value):
    default = train_segmentation(_tiny(small_phantom, tmp_path / "default"))
    other = train_segmentation(_tiny(small_phantom, tmp_path / "other", **{key: value}))
    assert default.training["config"][key] == SegTrainConfig.__dataclass_fields__[key].default
    assert other.training["config"][key] == value
    assert default.members[0].sha256 != other.members[0].sha256


def _train_seg_cli(small_phantom, out, *args):
    """`pdl1 train seg` on a schedule of a few seconds, plus the options a test adds."""
    from typer.testing import CliRunner

    from bridge.cli.app import app

    tiny = ["--cycles", "2", "--epochs-per-cycle", "2", "--iterations", "2", "--batch-size", "2", "--patch-px", "32"]
    return CliRunner().invoke(
        app, ["train", "seg", small_phantom, "--out", str(out), *tiny, "--features", "4,8", "--no-progress", *args]
    )


@pytest.mark.parametrize(
    ("args", "lr_max"), [(["--optimizer", "sgd"], 1e-2), (["--optimizer", "adamw"], 3e-3), (["--lr-max", "0.02"], 0.02)]
)
def test_cli_learning_rate_defaults_to_the_optimizers_peak(small_phantom, tmp_path, args, lr_max):
    out = tmp_path / "m"
    result = _train_seg_cli(small_phantom, out, *args)
    assert result.exit_code == 0, result.output
    config = Ensemble.load(out, task="segmentation").manifest.training["config"]
    assert (config["lr_max"], config["lr_min"]) == pytest.approx((lr_max, lr_max / 100))


def _interrupt_after_two_checkpoints(monkeypatch):
    """Make training raise KeyboardInterrupt (Ctrl-C) once its second checkpoint is saved; returns the undo."""
    import inference.training.cyclic

    real, saved = inference.training.cyclic.save_checkpoint, []

    def interrupted_after_the_second_epoch(*args, **kwargs):
        real(*args, **kwargs)
        saved.append(kwargs["epoch"])
        if len(saved) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(inference.training.cyclic, "save_checkpoint", interrupted_after_the_second_epoch)
    return lambda: monkeypatch.setattr(inference.training.cyclic, "save_checkpoint", real)


def test_cli_ctrl_c_says_how_to_resume_and_resume_finishes(small_phantom, tmp_path, monkeypatch):
    undo = _interrupt_after_two_checkpoints(monkeypatch)
    result = _train_seg_cli(small_phantom, tmp_path / "m")
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output and "--resume" in result.output
    undo()
    result = _train_seg_cli(small_phantom, tmp_path / "m", "--resume")
    assert result.exit_code == 0, result.output
    assert _train_seg_cli(small_phantom, tmp_path / "whole").exit_code == 0
    assert _digests(tmp_path / "m") == _digests(tmp_path / "whole") != {}


def test_cli_an_interrupted_run_is_continued_only_by_its_own_command(small_phantom, tmp_path, monkeypatch):
    # The same command without --resume started again from epoch 0 over the checkpoint (the README: --out is a new
    # folder, or that interrupted run's with --resume); --resume with another --iterations (or other labels) went on
    # from the checkpoint with the new settings, and the manifest recorded them as the whole run's.
    undo = _interrupt_after_two_checkpoints(monkeypatch)
    out = tmp_path / "m"
    assert _train_seg_cli(small_phantom, out).exit_code == 130
    undo()
    state = out / "checkpoint" / "state.safetensors"
    before = state.read_bytes()
    again = _train_seg_cli(small_phantom, out)
    said = "".join(again.output.split())
    assert again.exit_code == 1, again.output
    assert (
        "".join(f"{out}: holds the checkpoint of an interrupted training run (stopped after 2 epochs)".split()) in said
    )
    assert "thesamecommandandlabels,with--resume,continueit;anew--outstartsanotherrun" in said
    other = _train_seg_cli(small_phantom, out, "--resume", "--seed", "4")
    said = "".join(other.output.split())  # the rich error box breaks lines inside the long path
    assert other.exit_code == 1, other.output
    # Named by its option, as given (the config's field names were said: iterations_per_epoch for --iterations).
    assert "".join(f"{state}: was written by a run with other settings (--seed: 0 there, 4 now)".split()) in said
    assert "--resume" in said and state.read_bytes() == before and not (out / "manifest.json").exists()
    assert _train_seg_cli(small_phantom, out, "--resume").exit_code == 0
    assert _train_seg_cli(small_phantom, tmp_path / "whole").exit_code == 0
    assert _digests(out) == _digests(tmp_path / "whole") != {}
    # The help said "Continue from the checkpoints under OUT if present", as if any checkpoint would do.
    from typer.testing import CliRunner

    from bridge.cli.app import app

    for task in ("seg", "nuclei"):
        helped = " ".join(CliRunner().invoke(app, ["train", task, "--help"], env={"COLUMNS": "300"}).output.split())
        assert (
            "give the command that started it plus --resume; other training options or labels are refused, naming "
            "what differs (--device, seg's --chains and nuclei's --tta, how the finished model runs, may change)"
        ) in helped.replace("│ ", ""), helped


def test_cli_ctrl_c_before_the_first_checkpoint_says_there_is_none(small_phantom, tmp_path, monkeypatch):
    # Stopped while reading labels, pseudo-labelling or in the first epoch, it said "m holds a checkpoint of the last
    # finished epoch; the same command with --resume goes on from it", and m was empty.
    import inference.training.cyclic

    def stopped_in_the_first_epoch(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(inference.training.cyclic, "save_checkpoint", stopped_in_the_first_epoch)
    result = _train_seg_cli(small_phantom, tmp_path / "m")
    assert result.exit_code == 130, result.output
    said = "".join(result.output.split())
    assert (
        "".join(
            f"interrupted: {tmp_path / 'm'}: stopped before the first epoch finished, so there is no checkpoint to "
            "resume; the same command starts again".split()
        )
        in said
    )
    assert "holdsacheckpoint" not in said
    monkeypatch.undo()
    assert _train_seg_cli(small_phantom, tmp_path / "m").exit_code == 0  # and it does


def test_cli_ctrl_c_after_the_model_is_written_says_it_is_complete(small_phantom, tmp_path, monkeypatch):
    # Stopped while the report was drawn (or held-out slides scored), it said "the same command with --resume goes
    # on from it", which then refused the finished run (helper-150); the model was complete.
    import bridge.training_report

    def stopped_drawing(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bridge.training_report, "write_training_report", stopped_drawing)
    result = _train_seg_cli(small_phantom, tmp_path / "m")
    assert result.exit_code == 130, result.output
    said = " ".join(result.output.split())
    assert f"interrupted: {tmp_path / 'm'}: the model is complete (its manifest.json was written before the stop);" in (
        said
    )
    assert f"`pdl1 train report {tmp_path / 'm'}` draws its training report" in said and "--resume" not in said


def test_cli_progress_goes_on_through_the_stages_after_the_last_step(small_phantom, tmp_path):
    # After 'training: 8/8' the domain statistics and the report's label statistics read every slide again, and a
    # log said nothing of them (minutes for a lab's slides).
    import re

    result = _train_seg_cli(small_phantom, tmp_path / "m", "--progress")  # lines: the runner's stderr is no terminal
    assert result.exit_code == 0, result.output
    stages = r"^training: (\d+)/\1 .*^domain statistics: 0/1 .*^domain statistics: 1/1 .*^training report: 0/2 .*"
    # Then its pictures drawn (the curves, each example tile), which said nothing either.
    drawn = r"^drawing the training report: 0/(\d+) .*^drawing the training report: \2/\2 "
    assert re.search(stages + r"^training report: 2/2 .*" + drawn + ".*^wrote ", result.output, re.M | re.S), (
        result.output
    )


def test_a_checkpoint_is_continued_only_with_its_settings_and_labels(tmp_path, monkeypatch):
    from bridge.cli.train import NUCLEI_TRAIN_WORDS, SEG_TRAIN_WORDS
    from inference.errors import ModelFileError
    from inference.training.cyclic import check_checkpoint_run, run_identity, save_checkpoint

    model = torch.nn.Linear(2, 3)
    config = _cfg(slides=(str(tmp_path / "a.svs"),))
    run = run_identity(config, ["1" * 64, "2" * 64])
    save_checkpoint(
        tmp_path,
        model,
        torch.optim.AdamW(model.parameters()),
        epoch=0,
        rng=np.random.default_rng(0),
        members=[],
        run=run,
    )
    check_checkpoint_run(tmp_path, run)
    # Where it writes, on what device, the slides scored afterwards and a relative path to the same slide: the same run.
    monkeypatch.chdir(tmp_path)
    moved = replace(config, slides=("a.svs",), out_dir="elsewhere", device="cuda", validation_slides=("v.svs",))
    check_checkpoint_run(tmp_path, run_identity(moved, ["1" * 64, "2" * 64]))
    # Nor do nuclei's TTA (how the finished model runs) and seg's chains, which --resume's help says may change.
    from inference.training.train_nuclei import NucleiTrainConfig

    nuclei = NucleiTrainConfig(slides=("a.svs",), out_dir="m")
    assert run_identity(replace(nuclei, tta=True)) == run_identity(nuclei) != run_identity(replace(nuclei, seed=1))
    assert run_identity(replace(config, chains=3)) == run_identity(config)
    with pytest.raises(
        ModelFileError,
        match=r"other labels \(the labels of 1 of 2 slides: objects drawn, changed or deleted in QuPath since, or read "
        r"with other label_rules, or phantom truth written again\)\. "
        r".*resume=True",
    ) as err:
        check_checkpoint_run(tmp_path, run_identity(config, ["1" * 64, "3" * 64]))
    assert str(err.value).endswith(
        ": the same config and labels, with resume=True, continue it; a new out_dir starts another run"
    )
    with pytest.raises(ModelFileError, match=r"other settings \(batch_size: 16 there, 8 now; cycles: 3 there, 4 now\)"):
        check_checkpoint_run(tmp_path, run_identity(replace(config, cycles=4, batch_size=8), ["1" * 64, "2" * 64]))
    # In the caller's words: pdl1 train's are its command, --resume and --out, and each command's own label options
    # (train seg has no --class-map, which it was told of; train nuclei no --ihc-band-um).
    for words, options in (
        (SEG_TRAIN_WORDS, "such as --from-review or --ihc-band-um"),
        (NUCLEI_TRAIN_WORDS, "such as --from-review, --class-map or --stain"),
    ):
        with pytest.raises(ModelFileError, match=rf"read with other label options \({options}\)") as err:
            check_checkpoint_run(tmp_path, run_identity(config, []), setting=words)
        assert str(err.value).endswith(
            ": the same command and labels, with --resume, continue it; a new --out starts another run"
        )
    # The settings that differ by the options that set them, not the config's fields (iterations_per_epoch, lr_min,
    # tile_size_px and slides were named as such).
    other = replace(config, iterations_per_epoch=7, lr_min=1e-6, tile_size_px=512, slides=(str(tmp_path / "b.svs"),))
    with pytest.raises(ModelFileError) as err:
        check_checkpoint_run(tmp_path, run_identity(other, ["1" * 64, "2" * 64]), setting=SEG_TRAIN_WORDS)
    said = str(err.value)
    assert "other settings (--iterations: 10 there, 7 now; the lowest learning rate (a hundredth of --lr-max): " in said
    assert (
        "the slides trained on: [" in said and "the tile size, which pdl1 train sets itself: 256 there, 512 now" in said
    )
    for field in ("iterations_per_epoch", "lr_min", "tile_size_px", "slides:"):
        assert field not in said, said


def test_losses():
    logits = torch.tensor([[[[2.0, -1.0]], [[-2.0, 3.0]]]])  # (1, 2 classes, 1, 2)
    target = torch.tensor([[[0, 1]]])
    ce = ce_loss(logits, target)
    assert ce.item() == pytest.approx(-np.log(1 / (1 + np.exp(-4.0))), rel=1e-5)
    p = torch.softmax(logits, 1)[0, 1, 0]  # positive-class probabilities of the 2 pixels
    soft_dice = (2 * p[1] + 1) / (p.sum() + 1 + 1)
    assert seg_loss(logits, target).item() == pytest.approx(ce.item() + 1 - soft_dice.item(), rel=1e-5)


def test_same_seed_same_members_and_resume_after_a_crash(small_phantom, tmp_path):
    train_segmentation(_tiny(small_phantom, tmp_path / "a"))
    crashed = {"calls": 0}

    def crash(done, total):
        crashed["calls"] += 1
        if done == 5:  # in the middle of epoch 2, after the epoch-1 checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_segmentation(_tiny(small_phantom, tmp_path / "b"), on_progress=crash)
    # The whole state is one file, so no interrupt can pair one epoch's weights with another's epoch.
    ckpt = tmp_path / "b" / "checkpoint"
    assert [p.name for p in ckpt.iterdir()] == ["state.safetensors"]
    with safe_open(str(ckpt / "state.safetensors"), framework="pt") as fh:
        assert json.loads(fh.metadata()["pdl1"])["epoch"] == 1
    train_segmentation(_tiny(small_phantom, tmp_path / "b"), resume=True)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert len(_digests(tmp_path / "a")) == 1


def test_resumes_a_checkpoint_written_as_two_files(small_phantom, tmp_path):
    # Earlier versions kept the epoch, optimizer scalars and random states in state.json.
    train_segmentation(_tiny(small_phantom, tmp_path / "a"))

    def crash(done, total):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_segmentation(_tiny(small_phantom, tmp_path / "b"), on_progress=crash)
    ckpt = tmp_path / "b" / "checkpoint"
    tensors = load_file(str(ckpt / "state.safetensors"))
    with safe_open(str(ckpt / "state.safetensors"), framework="pt") as fh:
        (ckpt / "state.json").write_text(fh.metadata()["pdl1"])
    save_file(tensors, str(ckpt / "state.safetensors"))
    train_segmentation(_tiny(small_phantom, tmp_path / "b"), resume=True)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert not (ckpt / "state.json").exists()


def test_chains_pool_independent_runs_each_equal_to_its_single_run(small_phantom, tmp_path):
    # Chain k of `--chains N --seed S` is the single-chain run with seed S + k, so a chained
    # ensemble can be checked (and rebuilt) chain by chain.
    pooled = train_segmentation(_tiny(small_phantom, tmp_path / "pooled", chains=2))
    assert [(m.file, m.chain, m.cycle) for m in pooled.members] == [
        ("chain_0/member_00.safetensors", 0, 1),
        ("chain_1/member_00.safetensors", 1, 1),
    ]
    assert pooled.training["config"]["chains"] == 2
    for chain, seed in ((0, 3), (1, 4)):
        single = train_segmentation(replace(_tiny(small_phantom, tmp_path / f"seed{seed}"), seed=seed))
        assert pooled.members[chain].sha256 == single.members[0].sha256
    assert pooled.members[0].sha256 != pooled.members[1].sha256
    assert len(Ensemble.load(tmp_path / "pooled", task="segmentation").members) == 2


def test_an_interrupted_chained_run_writes_no_manifest_and_resumes_to_the_same_members(small_phantom, tmp_path):
    whole = train_segmentation(_tiny(small_phantom, tmp_path / "a", chains=2))
    steps = []

    def crash(done, total):
        steps.append((done, total))
        if done == 13:  # chain 1, epoch 2 (each chain is 4 epochs x 2 iterations)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_segmentation(_tiny(small_phantom, tmp_path / "b", chains=2), on_progress=crash)
    assert steps[-1] == (13, 16)  # progress counts over all chains
    assert not (tmp_path / "b" / "manifest.json").exists()  # nothing that loads as a partial ensemble
    resumed = train_segmentation(_tiny(small_phantom, tmp_path / "b", chains=2), resume=True)
    assert [m.sha256 for m in resumed.members] == [m.sha256 for m in whole.members]


def test_cli_chains_option(small_phantom, tmp_path):
    from typer.testing import CliRunner

    from bridge.cli.app import app

    out = tmp_path / "m"
    result = _train_seg_cli(small_phantom, out, "--chains", "2")
    assert result.exit_code == 0, result.output
    assert "chain_1/member_00.safetensors" in result.output
    assert [m.chain for m in Ensemble.load(out, task="segmentation").manifest.members] == [0, 1]
    scored = CliRunner().invoke(app, ["eval", "seg", small_phantom, "--model", str(out), "--no-progress"])
    assert scored.exit_code == 0, scored.output
    assert "Dice, member 1 (chain 1, cycle 1)" in scored.output


def test_nuclei_training_is_resumable_and_loadable(small_phantom, tmp_path):
    from inference.training.train_nuclei import NucleiTrainConfig, train_nuclei

    def cfg(out):
        return NucleiTrainConfig(
            slides=(small_phantom,),
            out_dir=str(out),
            **TINY_SCHEDULE,
            width=8,
            dilations=(1, 2),
            seed=5,
        )

    manifest = train_nuclei(cfg(tmp_path / "a"))
    assert manifest.task == "nuclei" and [m.cycle for m in manifest.members] == [1]
    # H&E is judged by the segmentation ensemble's domain: an H&E nuclei model gets no statistics nobody reads.
    assert manifest.stain == "H&E" and "domain" not in manifest.extra

    def crash(done, total):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_nuclei(cfg(tmp_path / "b"), on_progress=crash)
    train_nuclei(cfg(tmp_path / "b"), resume=True)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    ens = Ensemble.load(tmp_path / "a", task="nuclei")
    assert ens.manifest.class_names == ["Tumor: Positive", "Tumor: Negative", "Other"]
    # A finished model is never trained over: its members would be replaced under its old manifest.
    before = _digests(tmp_path / "a")
    with pytest.raises(FileExistsError, match=r"already holds a model \(manifest.json\).*delete this one first$"):
        train_nuclei(replace(cfg(tmp_path / "a"), seed=6))
    assert _digests(tmp_path / "a") == before
    # Nor is a finished run resumed: it wrote its members and manifest again, and what calibrate had written into the
    # manifest was lost. Nothing is left to resume, and it says so.
    manifest = (tmp_path / "a" / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError, match=r"its training run finished .* nothing is left to resume"):
        train_nuclei(cfg(tmp_path / "a"), resume=True)
    assert _digests(tmp_path / "a") == before and (tmp_path / "a" / "manifest.json").read_bytes() == manifest


def test_a_model_folder_of_an_unfinished_run_advises_resuming_in_each_callers_words(small_phantom, tmp_path):
    # The library said --resume to every caller of check_out_dir and the trainers (a Python caller has resume=True).
    from typer.testing import CliRunner

    from bridge.cli.app import app
    from inference import check_out_dir

    out = tmp_path / "m"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "state.safetensors").write_bytes(b"")  # no manifest.json: the run did not finish
    with pytest.raises(FileExistsError) as err:
        check_out_dir(out, resume=False)
    assert "with resume=True, continue it; a new out_dir starts another run" in str(err.value)
    result = CliRunner().invoke(app, ["train", "seg", small_phantom, "--out", str(out)], env={"COLUMNS": "400"})
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "with --resume, continue it" in said and "resume=True" not in said, said


def test_a_folder_holding_other_files_is_no_model_folder(tmp_path):
    # --out PROJECT_FOLDER wrote the members, checkpoint and report among the project's files.
    from inference import check_out_dir

    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "project.qpproj").write_text("{}")
    with pytest.raises(FileExistsError, match=r"holds other files \(project.qpproj\) and no model or training run"):
        check_out_dir(tmp_path / "project", resume=False)
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty", resume=False)  # an empty folder is a new one
    # A file manager's files, and the chain folder a run stopped before its first checkpoint made, are no one else's.
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"")
    (tmp_path / "empty" / "Thumbs.db").write_bytes(b"")
    (tmp_path / "empty" / "chain_0").mkdir()
    check_out_dir(tmp_path / "empty", resume=False)
    check_out_dir(tmp_path / "empty", resume=True)


def test_a_schedule_whose_only_cycle_is_dropped_is_advised_as_the_configs_fields():
    # The library said "in pdl1 train: --cycles 2 or more, or --no-drop-first-cycle" (pdl1 train says its own first).
    with pytest.raises(ValueError) as err:
        SegTrainConfig(slides=("x.svs",), out_dir="unused", cycles=1)
    assert str(err.value).endswith("needs at least 2 cycles: give cycles=2 or more, or drop_first_cycle=False")


def test_a_patch_larger_than_a_slide_is_advised_as_the_library_argument():
    from inference.training.cyclic import check_patch_fits

    with pytest.raises(ValueError) as err:
        check_patch_fits("s.svs", (256, 256), patch_px=1024, input_mpp=2.0)
    assert str(err.value) == (
        "s.svs: 256 x 256 px at 2 µm/px (the model's input resolution) is smaller than one training patch of 1024 px "
        "(patch_px): give a smaller patch_px, or leave out slides this small"
    )


@pytest.mark.parametrize("task", ["seg", "nuclei"])
def test_a_patch_larger_than_a_slide_is_refused_naming_both(small_phantom, tmp_path, task):
    # numpy said "could not broadcast input array from shape (256,256,3) into shape (512,512,3)", or, for a large
    # --patch-px, ran out of memory with a traceback.
    from typer.testing import CliRunner

    from bridge.cli.app import app

    tiny = ["--cycles", "2", "--epochs-per-cycle", "1", "--iterations", "1", "--batch-size", "1", "--patch-px", "1024"]
    args = ["train", task, small_phantom, "--out", str(tmp_path / "m"), *tiny, "--no-progress"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    size, mpp = ("256 x 256", 2) if task == "seg" else ("512 x 512", 1)  # the 1024² phantom at each model's µm/px
    assert result.exit_code == 1, result.output
    assert " ".join(result.output.split()) == (
        f"error: s.svs: {size} px at {mpp} µm/px (the model's input resolution) is smaller than one training patch "
        "of 1024 px (--patch-px): give a smaller --patch-px, or leave out slides this small"
    )


@pytest.mark.parametrize(
    ("model", "optimizer", "match"),
    [
        (torch.nn.Linear(2, 4), torch.optim.AdamW, r"network differs \(2 of 2 weights; bias: \(3,\) in the checkpoint"),
        (torch.nn.Linear(2, 3), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "trained with the adamw optimizer"),
    ],
)
def test_resume_of_another_runs_checkpoint_names_what_differs(tmp_path, model, optimizer, match):
    # --resume into a folder whose checkpoint was written with another --width (or optimizer) was torch's
    # traceback listing every mismatched tensor (or, for the optimizer, a KeyError at the first step).
    from inference.errors import ModelFileError
    from inference.training.cyclic import load_checkpoint, save_checkpoint

    written = torch.nn.Linear(2, 3)
    rng = np.random.default_rng(0)
    save_checkpoint(tmp_path, written, torch.optim.AdamW(written.parameters()), epoch=1, rng=rng, members=[])
    with pytest.raises(ModelFileError, match=match):
        load_checkpoint(tmp_path, model, optimizer(model.parameters()), rng)
    same = torch.nn.Linear(2, 3)
    assert load_checkpoint(tmp_path, same, torch.optim.AdamW(same.parameters()), rng) == (1, [])


def test_ihc_phantoms_are_refused_before_anything_is_written(ihc_pair, tmp_path):
    """Trained on the IHC sections of phantom pairs, the ensemble's manifest said stain H&E, and `pdl1 run --seg-model`
    ran it on H&E slides; the segmentation ensemble is the H&E path's."""
    he, ihc = ihc_pair
    out = tmp_path / "m"
    with pytest.raises(ValueError, match=r"ihc_271\.svs: PD-L1 IHC phantoms .* give the H&E phantoms"):
        train_segmentation(_cfg(slides=(str(he), str(ihc)), out_dir=str(out)))
    assert not out.exists()


def test_a_nuclei_training_refused_for_its_slides_leaves_no_out_folder(tmp_path):
    # Refused for mixing stains (or any other slide problem) after the folder was made, it left an empty --out.
    from inference.phantom.pyramid import write_ihc_phantom, write_phantom
    from inference.phantom.scene import PhantomSpec
    from inference.training.train_nuclei import NucleiTrainConfig, train_nuclei

    spec = PhantomSpec(1024, 1024, seed=3, tps_percent=40)
    he = write_phantom(tmp_path / "he.svs", spec)
    write_ihc_phantom(tmp_path / "ihc.svs", spec, paired_with=he.slide_path)
    out = tmp_path / "deep" / "m"
    config = NucleiTrainConfig(slides=(str(tmp_path / "he.svs"), str(tmp_path / "ihc.svs")), out_dir=str(out))
    with pytest.raises(ValueError, match="different stains or classes"):
        train_nuclei(config)
    assert not out.exists()


@pytest.mark.parametrize("command", ["seg", "nuclei"])
def test_a_phantom_of_implausible_pixel_size_is_told_in_the_training_commands_words(small_phantom, tmp_path, command):
    # The library's advice, "pass ... as mpp", named an argument neither command takes (helper-152).
    import shutil
    from pathlib import Path

    from typer.testing import CliRunner

    from bridge.cli.app import app
    from inference.phantom.truth import truth_dir_for

    data = Path(small_phantom).read_bytes()
    assert data.count(b"MPP = 0.5") == 1
    bad = tmp_path / "bad.svs"
    bad.write_bytes(data.replace(b"MPP = 0.5", b"MPP = 900"))  # as many characters: the TIFF's offsets stay right
    shutil.copytree(truth_dir_for(Path(small_phantom)), truth_dir_for(bad))
    result = CliRunner().invoke(app, ["train", command, str(bad), "--out", str(tmp_path / "m")], env={"COLUMNS": "400"})
    said = " ".join(result.output.split())
    assert result.exit_code == 1, said
    assert (
        f"bad.svs: microns per pixel 900 (from openslide.mpp-x/y) is outside the plausible range (0.05, 50.0); `pdl1 "
        f"train {command}` (whose --input-mpp is the model's resolution, not the slides') reads each phantom at the "
        "pixel size its file states, and takes none"
    ) in said, said
    assert "as mpp" not in said
