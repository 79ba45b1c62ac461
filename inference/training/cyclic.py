"""Cyclic training shared by the segmentation and nuclei trainers (nnUNet-B's checkpoint ensembles).

Cosine annealing with warm restarts; members are saved at the low-learning-rate end of
cycles; a checkpoint is one safetensors file (no pickle) holding the weights, the optimizer,
the random states and the epoch, so a crashed run resumes exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from inference.advice import SettingWords, library_setting
from inference.atomic import write_text_whole
from inference.errors import ModelFileError, Pdl1Error, raise_together
from inference.models.manifest import (
    MANIFEST_NAME,
    Manifest,
    give_new_file_mode,
    read_manifest,
    sha256_file,
    wrong_model_message,
)
from inference.phantom.truth import phantom_mpp_advice
from inference.slides.slide import MppAdvice, header_mpp, require_resolution
from inference.training.anchor import WeightAnchor, freeze_batchnorm
from inference.training.distill import Distiller
from inference.training.labels import SlideLabels, check_slide_mpp, labelled_mpp_advice
from inference.training.report import HISTORY_FILE

log = logging.getLogger(__name__)

#: Peak learning rate per optimizer when none is given: nnU-Net's 0.01 for SGD with Nesterov
#: momentum; 3e-3 for AdamW, whose steps are already scaled per parameter.
DEFAULT_LR_MAX = {"sgd": 1e-2, "adamw": 3e-3}


class CyclicSchedule(Protocol):
    slides: tuple[str, ...]
    cycles: int
    epochs_per_cycle: int
    first_cycle_epochs: int
    iterations_per_epoch: int
    members_per_cycle: int
    drop_first_cycle: bool
    lr_max: float
    restart_lr: float
    lr_min: float
    optimizer: str
    weight_decay: float


def check_schedule(config: CyclicSchedule) -> None:
    """Raise ``ValueError`` for a schedule that cannot run (shared by both trainers' configs)."""
    if config.optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be sgd or adamw, got {config.optimizer!r}")
    if not 1 <= config.members_per_cycle <= config.epochs_per_cycle:
        raise ValueError("members_per_cycle must be between 1 and epochs_per_cycle")
    if config.first_cycle_epochs and config.first_cycle_epochs < config.members_per_cycle:
        raise ValueError("first_cycle_epochs must be 0 (as epochs_per_cycle) or at least members_per_cycle")
    if config.drop_first_cycle and config.cycles < 2:
        raise ValueError(
            "drop_first_cycle (leaving out the first cycle's members) needs at least 2 cycles: give cycles=2 or "
            "more, or drop_first_cycle=False"
        )
    if config.restart_lr and not config.lr_min < config.restart_lr <= config.lr_max:
        raise ValueError("restart_lr must be 0 (as lr_max) or between lr_min and lr_max")
    if not config.slides:
        raise ValueError("no training slides given")


def check_patch_fits(
    name: str, shape_hw: tuple[int, int], *, patch_px: int, input_mpp: float, setting: SettingWords = library_setting
) -> None:
    """Refuse a slide smaller than one training patch at the model's input resolution: no patch could be cut from
    it (numpy said only "could not broadcast input array from shape (256,256,3) into shape (512,512,3)", or ran
    out of memory for a huge patch). The advice names ``patch_px`` in ``setting``'s words.

    >>> check_patch_fits("a.svs", (256, 300), patch_px=128, input_mpp=2.0)
    >>> check_patch_fits("a.svs", (256, 300), patch_px=512, input_mpp=2.0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: a.svs: 300 x 256 px at 2 µm/px (the model's input resolution) is smaller than one training patch ...
    """
    h, w = shape_hw
    if min(h, w) < patch_px:
        raise ValueError(
            f"{name}: {w} x {h} px at {input_mpp:g} µm/px (the model's input resolution) is smaller than one training "
            f"patch of {patch_px} px ({setting('patch_px')}): give a smaller {setting('patch_px')}, or leave out "
            "slides this small"
        )


def check_slide_resolution(
    slides: Sequence[str],
    *,
    input_mpp: float,
    slide_mpp: Mapping[str, float],
    reader: str,
    phantom_advice: MppAdvice | None = None,
) -> None:
    """Refuse, before any slide is read, every training or validation slide that cannot be read at ``input_mpp``
    (the model's): a file missing or unreadable, one that states no plausible pixel size, or one too coarse
    (:func:`~inference.slides.slide.require_resolution`, ``reader`` naming the training as the message does when the
    slide is read). Each is read at ``slide_mpp``'s µm/px where that names it (its project's), else its file's own;
    its header alone is read (:func:`~inference.slides.slide.header_mpp`). Found as each slide was read, a training
    slide ended the run after those before it were read, and a validation slide was scored enlarged after training;
    all are named in one error, so they can be fixed together. ``phantom_advice``: how the command's user gives a
    phantom its µm/px (:func:`phantom_training_advice`); None: the slides are a lab's, each told where its pixel size
    is set (:func:`~inference.training.labels.labelled_mpp_advice`).
    """
    errors = []
    for path in slides:
        advice = phantom_advice or labelled_mpp_advice(from_project=path in slide_mpp)
        try:
            mpp = header_mpp(path, mpp=slide_mpp.get(path), mpp_source="QuPath project", mpp_advice=advice)
            require_resolution(
                mpp, input_mpp, reader=reader, path=path, mpp_advice=advice, coarser_reader="--input-mpp"
            )
        except Pdl1Error as err:
            errors.append(err)
    raise_together(errors, f"{len(errors)} of {len(slides)} slides cannot be read for {reader}, so none was:")


# What reads a trainer's slides, as its messages name it; and its command's words for a phantom's pixel size (the
# library's "pass ... as mpp" names no option of the command, whose --input-mpp is the model's).
TRAINING_READER = {"seg": "segmentation training", "nuclei": "nuclei training"}


def phantom_training_advice(task: str) -> MppAdvice:
    """How a user of ``pdl1 train <task>`` gives a phantom its pixel size
    (:func:`~inference.phantom.truth.phantom_mpp_advice`)."""
    return phantom_mpp_advice(f"`pdl1 train {task}` (whose --input-mpp is the model's resolution, not the slides')")


def check_training_slides(
    slides: Sequence[str], *, task: str, input_mpp: float, slide_mpp: Mapping[str, float], phantoms: bool
) -> None:
    """Every training and validation slide of a ``task`` run (``seg`` or ``nuclei``) readable at ``input_mpp``,
    checked from its header before any slide is read (:func:`check_slide_resolution`): the trainers check them first
    (:func:`check_training_input`), and a caller that pseudo-labels slides before training (``pdl1 train seg``)
    checks them before that. ``phantoms``: the slides are phantoms with truth (:func:`phantom_training_advice`), else
    a lab's labelled slides."""
    check_slide_resolution(
        slides,
        input_mpp=input_mpp,
        slide_mpp=slide_mpp,
        reader=TRAINING_READER[task],
        phantom_advice=phantom_training_advice(task) if phantoms else None,
    )


class _TrainingSlides(Protocol):
    """What :func:`check_training_input` reads of a trainer's config (SegTrainConfig's, NucleiTrainConfig's)."""

    slides: Sequence[str]
    validation_slides: Sequence[str]
    slide_mpp: Mapping[str, float]
    input_mpp: float


def check_training_input(config: _TrainingSlides, labels: Sequence[SlideLabels], *, task: str) -> None:
    """What a ``task`` trainer (``seg`` or ``nuclei``) checks of its ``config``'s slides before reading any: the pixel
    sizes it records against its labels' (:func:`~inference.training.labels.check_slide_mpp`), the labels in the
    order of ``config.slides``, and every slide readable at ``config.input_mpp`` (:func:`check_training_slides`)."""
    check_slide_mpp(labels, config.slide_mpp, validation_slides=config.validation_slides)
    if labels and tuple(lab.slide for lab in labels) != tuple(config.slides):
        raise ValueError("config.slides must be the labelled slides, in the order of the labels")
    check_training_slides(
        [*config.slides, *config.validation_slides],
        task=task,
        input_mpp=config.input_mpp,
        slide_mpp=config.slide_mpp,
        phantoms=not labels,
    )


def run_checkpoints(out_dir: str | Path) -> list[Path]:
    """The checkpoint folders a training run left in ``out_dir`` (one, or one per chain); [] before its first epoch
    finished."""
    out_dir = Path(out_dir)
    folders = [out_dir / "checkpoint", *sorted(out_dir.glob("chain_*/checkpoint"))]
    return [f for f in folders if (f / CHECKPOINT_FILE).is_file()]


def _resume_advice(setting: SettingWords = library_setting) -> str:
    """How an interrupted run is continued, or another started, in ``setting``'s words: ``config`` names the
    settings as a whole (``pdl1 train``'s words: its command), ``resume`` and ``out_dir`` the trainers' own.

    >>> _resume_advice()
    'the same config and labels, with resume=True, continue it; a new out_dir starts another run'
    """
    return (
        f"the same {setting('config')} and labels, with {setting('resume', True)}, continue it; a new "
        f"{setting('out_dir')} starts another run"
    )


def check_out_dir(out_dir: str | Path, *, resume: bool, setting: SettingWords = library_setting) -> None:
    """Refuse to train into a folder that already holds a model or an interrupted run, unless resuming its run.

    Members are written into the folder as training reaches them and the manifest only at the end, so
    training over an existing model would replace its members one by one under its old manifest: an
    interrupted run would leave neither model. A fresh run into an interrupted run's folder would overwrite
    its checkpoint, and with it every epoch trained. Resuming is allowed where the folder's checkpoint exists
    (the same run, continued). The advice names ``resume`` (and for an interrupted run how it is continued:
    :func:`_resume_advice`) in ``setting``'s words.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir}: is a file; the model is written as a folder: give a new folder")
    checkpoints = run_checkpoints(out_dir)
    finished = (out_dir / MANIFEST_NAME).is_file()  # written last, when the run ends
    if resume and checkpoints and finished:  # it wrote the members and the manifest again: calibrate's were lost
        raise FileExistsError(
            f"{out_dir}: its training run finished (it holds the model, {MANIFEST_NAME}), so nothing is left to "
            "resume; training it again would replace its members and its manifest, with what calibrate and "
            "domain-stats wrote into it: give a new folder for another run"
        )
    if resume and checkpoints:
        return
    if finished:  # its checkpoint, if kept, is of the finished run: nothing to resume
        raise FileExistsError(
            f"{out_dir}: already holds a model ({MANIFEST_NAME}); training would overwrite its members. Give a new "
            "folder, or delete this one first"
        )
    others = sorted(p.name for p in out_dir.iterdir() if not _ours_or_clutter(p)) if out_dir.is_dir() else []
    if not checkpoints and others:  # a QuPath project's folder took the model
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise FileExistsError(
            f"{out_dir}: holds other files ({shown}) and no model or training run; the model is written into a new "
            "or empty folder of its own: give one"
        )
    if checkpoints and not resume:
        try:
            epochs = 1 + int(_checkpoint_meta(checkpoints[0])["epoch"])
            done = f" after {epochs} epoch{'s' if epochs != 1 else ''}"
        except (OSError, ValueError, KeyError, TypeError, SafetensorError):  # what is in it does not change the refusal
            done = ""
        raise FileExistsError(
            f"{out_dir}: holds the checkpoint of an interrupted training run (stopped{done}); a new run would "
            f"overwrite it (delete the folder to start again): {_resume_advice(setting)}"
        )


# What a file manager leaves in any folder it shows; not a user's files.
_CLUTTER = frozenset({"Thumbs.db", "desktop.ini"})


def _ours_or_clutter(path: Path) -> bool:
    """A file that does not make a folder someone else's: a chain's folder a run made before its first checkpoint
    (``chain_0``: stopped then, it is the same run's), a hidden file, or a file manager's."""
    name = path.name
    return name.startswith(".") or name in _CLUTTER or (path.is_dir() and re.fullmatch(r"chain_\d+", name) is not None)


def _first_cycle_epochs(config: CyclicSchedule) -> int:
    return config.first_cycle_epochs or config.epochs_per_cycle


def total_epochs(config: CyclicSchedule) -> int:
    """Epochs of the whole run: the first cycle, then ``cycles - 1`` cycles of ``epochs_per_cycle``."""
    return _first_cycle_epochs(config) + (config.cycles - 1) * config.epochs_per_cycle


def cycle_of(config: CyclicSchedule, epoch: int) -> tuple[int, int, int]:
    """(cycle, epoch within that cycle, the cycle's length in epochs) of a 0-based ``epoch``."""
    first = _first_cycle_epochs(config)
    if epoch < first:
        return 0, epoch, first
    cycle, within = divmod(epoch - first, config.epochs_per_cycle)
    return cycle + 1, within, config.epochs_per_cycle


def learning_rate(config: CyclicSchedule, epoch: int, iteration: int) -> float:
    """Cosine annealing with warm restarts, per iteration.

    The first cycle starts at ``lr_max``, every later one at ``restart_lr`` (0: ``lr_max``).
    """
    cycle, within, length = cycle_of(config, epoch)
    t = within * config.iterations_per_epoch + iteration
    period = length * config.iterations_per_epoch
    high = config.lr_max if cycle == 0 or not config.restart_lr else config.restart_lr
    return config.lr_min + (high - config.lr_min) * (1 + math.cos(math.pi * t / period)) / 2


def is_member_epoch(config: CyclicSchedule, epoch: int) -> bool:
    cycle, within, length = cycle_of(config, epoch)
    if config.drop_first_cycle and cycle == 0:
        return False
    return within >= length - config.members_per_cycle


def make_optimizer(config: CyclicSchedule, model: torch.nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=config.lr_max, momentum=0.99, nesterov=True, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(model.parameters(), lr=config.lr_max, weight_decay=config.weight_decay)


def init_record(init_model: str | Path, member_sha256: str) -> dict[str, str]:
    """The manifest's record of the model fine-tuning started from: its folder as an absolute path (as typed, a
    relative one meant nothing once the manifest left the folder it was typed in) and the member's checksum."""
    return {"model": str(Path(init_model).absolute()), "member_sha256": member_sha256}


def check_init_model(
    folder: str | Path,
    *,
    task: str,
    architecture: str,
    arch_kwargs: dict,
    class_names: list[str] | tuple[str, ...],
    stain: str,
    setting: SettingWords = library_setting,
) -> Manifest:
    """The manifest of a model folder to fine-tune from, once it is found fit: raise :class:`ModelFileError` else.

    Its checksums are verified; its task, the stain of the slides (``stain``), its architecture and its classes
    must be the run's. A trainer calls this before it reads any slide or makes its output folder, so a wrong
    ``init_model`` is said at once and leaves nothing behind. The advice names the settings (``init_model``, the
    labels' ``class_names``) in ``setting``'s words.
    """
    init, scratch = setting("init_model"), setting("init_model", None)
    manifest = read_manifest(folder, verify=True)
    if (manifest.task, manifest.stain) != (task, stain):
        raise ModelFileError(
            wrong_model_message(
                str(folder),
                manifest,
                task=task,
                stain=stain,
                needed_for=f"to fine-tune from ({init})",
                fix=f"give one, or train from scratch ({scratch})",
            )
        )
    if manifest.architecture != architecture or manifest.architecture_kwargs != arch_kwargs:
        raise ModelFileError(
            f"{folder}: {init} needs a {architecture} with {arch_kwargs}, this is {manifest.architecture} with "
            f"{manifest.architecture_kwargs}; train with its architecture, or from scratch ({scratch})"
        )
    if list(manifest.class_names) != list(class_names):
        # A segmentation's classes are fixed (background and PD-L1 positive): nothing maps labels onto others.
        fix = (
            f"give a model of the classes {list(class_names)}"
            if task == "segmentation"
            else f"map the label classes onto the model's ({setting('class_names')})"
        )
        raise ModelFileError(
            f"{folder}: {init} has the classes {manifest.class_names}, the labels {list(class_names)}; "
            f"{fix} or train from scratch ({scratch})"
        )
    return manifest


def init_weights(
    model: torch.nn.Module,
    folder: str | Path,
    *,
    task: str,
    architecture: str,
    arch_kwargs: dict,
    class_names: list[str] | tuple[str, ...],
    stain: str,
    setting: SettingWords = library_setting,
) -> str:
    """Start ``model`` from the last member of a model folder (fine-tuning); returns that member's sha256.

    The folder is checked first (:func:`check_init_model`, the same arguments).
    """
    manifest = check_init_model(
        folder,
        task=task,
        architecture=architecture,
        arch_kwargs=arch_kwargs,
        class_names=class_names,
        stain=stain,
        setting=setting,
    )
    member = manifest.members[-1]
    state = load_file(str(Path(folder) / member.file))  # fp16 on disk (save_member), fp32 to train
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return member.sha256


CHECKPOINT_FILE = "state.safetensors"

# Settings that do not change what a run trains: where it writes, what the model is called, the device, the slides
# scored after training (held out, never trained on), whether the manifest asks for TTA, and the number of chains
# (chain k is the run its seed alone gives).
_NOT_THE_RUN = frozenset({"out_dir", "name", "version", "device", "validation_slides", "tta", "chains"})


def _resolved(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else path


def run_identity(config: Any, label_digests: Sequence[str] = ()) -> dict:
    """What a checkpoint may be continued with: a training config's settings and the digests of its labels.

    A checkpoint written by a run of other settings or labels and continued by this one would give members
    that neither run gives, under a manifest that records only the second run's. Paths are made absolute (a
    run may be resumed from another folder); the settings in ``_NOT_THE_RUN`` are left out.

    >>> from types import SimpleNamespace
    >>> a = SimpleNamespace(slides=("/s/a.svs",), out_dir="m", device="cpu", iterations_per_epoch=40)
    >>> sorted(run_identity(a, ["ab12"]))
    ['iterations_per_epoch', 'labels_sha256', 'slides']
    """
    fields = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(vars(config))
    settings = {k: v for k, v in fields.items() if k not in _NOT_THE_RUN}
    settings["slides"] = [_resolved(s) for s in config.slides]
    for key in ("init_model", "pseudo_model"):
        if key in settings:
            settings[key] = _resolved(settings[key])
    if "unlabeled" in settings:
        settings["unlabeled"] = [[_resolved(u.path), u.mpp, u.stain] for u in config.unlabeled]
    if "slide_mpp" in settings:
        settings["slide_mpp"] = {_resolved(k): v for k, v in sorted(config.slide_mpp.items())}
    settings["labels_sha256"] = list(label_digests)
    return json.loads(json.dumps(settings))  # tuples as lists, as the checkpoint gives them back


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_checkpoint_run(folder: Path, run: Mapping[str, Any], *, setting: SettingWords = library_setting) -> None:
    """Raise :class:`ModelFileError` where the checkpoint in ``folder`` was written by a run of other settings or
    labels than ``run`` (:func:`run_identity`); a checkpoint written before runs were recorded is not checked.

    The settings that differ are named in ``setting``'s words (the config's fields; ``label_rules``: how the caller
    read the labels, ``bridge.labels.LabelRules``), and the message ends with how the run is continued
    (:func:`_resume_advice`).
    """
    saved = _checkpoint_meta(folder).get("run")
    if saved is None:
        return
    differ = sorted(k for k in saved.keys() | run.keys() if saved.get(k) != run.get(k))
    if not differ:
        return
    parts = [
        f"{setting(k)}: {_short(saved.get(k, 'absent'))} there, {_short(run.get(k, 'absent'))} now" for k in differ
    ]
    if "labels_sha256" in differ:  # digests say nothing to a reader: how many slides' labels changed
        was, now = saved.get("labels_sha256") or [], run.get("labels_sha256") or []
        changed = sum(a != b for a, b in zip(was, now, strict=False)) + abs(len(was) - len(now))
        parts[differ.index("labels_sha256")] = (
            f"the labels of {changed} of {max(len(was), len(now))} slides: objects drawn, changed or deleted in "
            f"QuPath since, or read with other {setting('label_rules')}, or phantom truth written again"
        )
    listing = "; ".join(parts[:4]) + (f"; and {len(parts) - 4} more" if len(parts) > 4 else "")
    what = "labels" if differ == ["labels_sha256"] else "settings"
    raise ModelFileError(
        f"{folder / CHECKPOINT_FILE}: was written by a run with other {what} ({listing}). A checkpoint continues "
        "only the run that started it, with its settings and labels; continued with others, its members would be "
        "neither run's and the manifest would record only this one's: " + _resume_advice(setting)
    )


def save_checkpoint(
    folder: Path,
    model,
    optimizer,
    *,
    epoch: int,
    rng: np.random.Generator,
    members: list,
    history: list | None = None,
    run: Mapping[str, Any] | None = None,
) -> None:
    """Write the training state as one file, renamed into place; ``run``: the settings and labels it belongs to
    (:func:`run_identity`), checked when it is continued.

    One file and one rename: with the tensors and the epoch in separate files, an interrupt
    between their two renames would resume one epoch's weights as the next epoch's.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_state = optimizer.state_dict()
    scalars: dict[str, dict[str, float]] = {}
    for idx, state in opt_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.ndim > 0:
                tensors[f"opt.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = float(value)
    tensors["torch_rng"] = torch.get_rng_state()
    meta = {
        "epoch": epoch,
        "numpy_rng": rng.bit_generator.state,
        "members": members,
        "history": history or [],
        "opt_scalars": scalars,
        "param_groups": opt_state["param_groups"],
    } | ({"run": dict(run)} if run is not None else {})
    part = folder / (CHECKPOINT_FILE + ".part")
    save_file(tensors, str(part), metadata={"pdl1": json.dumps(meta)})
    give_new_file_mode(part)
    part.replace(folder / CHECKPOINT_FILE)
    (folder / "state.json").unlink(missing_ok=True)  # left by a version that wrote two files


def _checkpoint_meta(folder: Path) -> dict:
    with safe_open(str(folder / CHECKPOINT_FILE), framework="pt") as fh:
        text = (fh.metadata() or {}).get("pdl1")
    if text is None:  # written by a version that kept the state beside the tensors
        text = (folder / "state.json").read_text()
    return json.loads(text)


def _optimizer_kind(group: dict) -> str:
    return "adamw" if "betas" in group else "sgd" if "momentum" in group else "unknown"


def _check_checkpoint_fits(folder: Path, weights: dict, param_groups: list, model, optimizer) -> None:
    """Raise :class:`ModelFileError` where the checkpoint was written by a run of another model or optimizer.

    Loading it would fail with torch's list of every mismatched tensor (a network width or class list changed),
    or, for another optimizer, only at its first step.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.items()}
    differ = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
    why = ""
    if differ:
        key = differ[0]
        why = (
            f"its network differs ({len(differ)} of {len(expected)} weights; {key}: "
            f"{found.get(key, 'absent')} in the checkpoint, {expected.get(key, 'absent')} in the model to train)"
        )
    else:
        saved = {_optimizer_kind(g) for g in param_groups}
        wanted = {_optimizer_kind(g) for g in optimizer.state_dict()["param_groups"]}
        if saved != wanted or len(param_groups) != len(optimizer.param_groups):
            was, now = "/".join(sorted(saved)), "/".join(sorted(wanted))
            why = f"it was trained with the {was} optimizer, this run uses {now}"
    if why:
        raise ModelFileError(
            f"{folder / CHECKPOINT_FILE}: cannot be continued by this run: {why}. A checkpoint continues only with "
            "the settings that started it (network width, classes, optimizer): give those, or train into a new folder"
        )


def load_checkpoint(folder: Path, model, optimizer, rng: np.random.Generator) -> tuple[int, list]:
    tensors = load_file(str(folder / CHECKPOINT_FILE))
    meta = _checkpoint_meta(folder)
    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    _check_checkpoint_fits(folder, weights, meta["param_groups"], model, optimizer)
    model.load_state_dict(weights)
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["opt_scalars"].items():
        for name, value in values.items():
            state.setdefault(int(idx), {})[name] = torch.tensor(value)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["torch_rng"])
    rng.bit_generator.state = meta["numpy_rng"]
    return int(meta["epoch"]), meta["members"]


def checkpoint_history(folder: Path) -> list[dict]:
    """The per-epoch history a checkpoint keeps ([] for one written before history was kept)."""
    return list(_checkpoint_meta(folder).get("history", []))


def write_history(out_dir: Path, history: list[dict]) -> None:
    """``training_history.json``: one record per epoch (its loss and rate per iteration), renamed into place."""
    write_text_whole(out_dir / HISTORY_FILE, json.dumps({"epochs": history}))


def save_member(out_dir: Path, model: torch.nn.Module, index: int) -> tuple[str, str]:
    name = f"member_{index:02d}.safetensors"
    # fp16 on disk keeps the shipped demo small; weights are cast back to fp32 on load.
    state = {
        k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in model.state_dict().items()
    }
    # One metadata key only: safetensors writes metadata in hash-map order, which would make
    # the bytes (and sha256) of identical weights differ between runs.
    save_file(state, str(out_dir / name), metadata={"format": "pt"})
    give_new_file_mode(out_dir / name)
    return name, sha256_file(out_dir / name)


def train_cyclic(
    config: CyclicSchedule,
    model: torch.nn.Module,
    *,
    out_dir: Path,
    rng: np.random.Generator,
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    resume: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    anchor: WeightAnchor | None = None,
    frozen_batchnorm: bool = False,
    distill: Distiller | None = None,
    run: Mapping[str, Any] | None = None,
    setting: SettingWords = library_setting,
) -> list[dict]:
    """The shared training loop: cosine restarts, members at the low ends, a checkpoint every epoch.

    ``next_batch()`` draws (inputs, targets) on the model's device using ``rng`` (whose state is
    checkpointed, so a resumed run draws the same batches). Returns the member records
    (file, sha256, cycle, epoch, learning rate, training loss). Every epoch's loss and learning rate,
    per iteration, go into the checkpoint (so ``resume`` keeps them) and ``out_dir/training_history.json``.
    With ``anchor`` (L2-SP, fine-tuning) its penalty is added to every step's loss; the losses recorded are
    ``loss_fn``'s alone (comparable with a run without it), each epoch's mean penalty beside them.
    With ``frozen_batchnorm`` BatchNorm layers normalise with the model's running statistics as it came and
    keep them (:func:`~inference.training.anchor.freeze_batchnorm`).
    With ``distill`` (LwF, fine-tuning) its penalty on each batch's unlabelled pixels is added to the loss, and
    recorded as the anchor's is (``distill_penalty``).
    ``run`` (:func:`run_identity`) goes into every checkpoint; resuming one written with other settings or labels
    raises :class:`ModelFileError`, advising in ``setting``'s words (:func:`check_checkpoint_run`).
    """
    optimizer = make_optimizer(config, model)
    ckpt = out_dir / "checkpoint"
    start_epoch, members, history = 0, [], []
    if resume and (ckpt / CHECKPOINT_FILE).is_file():
        if run is not None:
            check_checkpoint_run(ckpt, run, setting=setting)
        last, members = load_checkpoint(ckpt, model, optimizer, rng)
        history = [h for h in checkpoint_history(ckpt) if h["epoch"] <= last]
        start_epoch = last + 1
        log.info("resuming at epoch %d with %d members", start_epoch, len(members))
    n_epochs = total_epochs(config)
    total = n_epochs * config.iterations_per_epoch
    lr = config.lr_max
    for epoch in range(start_epoch, n_epochs):
        model.train()
        if frozen_batchnorm:
            freeze_batchnorm(model)
        losses, rates, penalties, distilled = [], [], [], []
        for it in range(config.iterations_per_epoch):
            lr = learning_rate(config, epoch, it)
            rates.append(lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = next_batch()
            logits = model(x)
            loss = data_loss = loss_fn(logits, y)
            if distill is not None:
                kl = distill.penalty(x, logits, y)
                distilled.append(kl.item())
                loss = loss + kl
            if anchor is not None:
                penalty = anchor.penalty(model)
                penalties.append(penalty.item())
                loss = loss + penalty
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
            optimizer.step()
            losses.append(data_loss.item())
            if on_progress is not None:
                on_progress(epoch * config.iterations_per_epoch + it + 1, total)
        mean_loss = float(np.mean(losses))
        log.info("epoch %d loss %.4f lr %.2e", epoch, mean_loss, lr)
        if penalties:
            log.info("epoch %d anchor penalty %.4f", epoch, float(np.mean(penalties)))
        if distilled:
            log.info("epoch %d distillation penalty %.4f", epoch, float(np.mean(distilled)))
        if is_member_epoch(config, epoch):
            name, digest = save_member(out_dir, model, len(members))
            members.append(
                {
                    "file": name,
                    "sha256": digest,
                    "cycle": cycle_of(config, epoch)[0],
                    "epoch": epoch,
                    "learning_rate": lr,
                    "train_loss": mean_loss,
                }
            )
        history.append(
            {
                "epoch": epoch,
                "cycle": cycle_of(config, epoch)[0],
                "loss": mean_loss,
                "iteration_losses": losses,
                "iteration_lrs": rates,
            }
            | ({"anchor_penalty": float(np.mean(penalties))} if penalties else {})
            | ({"distill_penalty": float(np.mean(distilled))} if distilled else {})
        )
        save_checkpoint(ckpt, model, optimizer, epoch=epoch, rng=rng, members=members, history=history, run=run)
        write_history(out_dir, history)
    return members
