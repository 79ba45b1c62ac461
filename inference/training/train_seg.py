"""Train a segmentation ensemble the nnUNet-B way: cyclic cosine learning rate, members at the low ends.

One network is trained with cosine annealing and warm restarts. At the low-learning-rate end
of every cycle it sits in a different mode of the loss surface; the weights saved there are
samples that approximate the posterior, and their mean softmax is the prediction. With
``chains > 1`` several such runs start from different seeds (as several MCMC chains do) and
their members are pooled: one trajectory's checkpoints share its errors, independent ones do not.

Data are phantom slides with their truth (``<stem>.truth/positive_mask.tif``), or a lab's own
region labels (:class:`~inference.training.labels.SlideLabels`): each slide is read whole at the
model's input MPP, and class-balanced patches are drawn from it. Pixels that are not labels
(:data:`~inference.training.labels.IGNORE_LABEL`) count in neither the cross-entropy nor the Dice.
Slides nobody labelled can add pseudo-labels (``unlabeled``, :mod:`inference.training.pseudo`): a
teacher ensemble's confident tissue pixels, weighed ``pseudo_weight`` in the loss.
Training is seeded and resumable: a checkpoint (safetensors + JSON, no pickle) is written
after every epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from inference import __version__
from inference.advice import SettingWords, library_setting, renamed
from inference.models.manifest import Manifest, Member, write_manifest
from inference.models.unet import PlainConvUNet
from inference.phantom.truth import load_truth
from inference.slides.slide import open_slide
from inference.slides.tissue import detect_tissue
from inference.training.anchor import WeightAnchor, check_fine_tuning
from inference.training.augment import STAIN_JITTERS, augment_batch
from inference.training.cyclic import (
    check_init_model,
    check_out_dir,
    check_patch_fits,
    check_schedule,
    check_training_input,
    init_record,
    init_weights,
    phantom_training_advice,
    run_identity,
    total_epochs,
    train_cyclic,
)
from inference.training.distill import DEFAULT_TEMPERATURE, Distiller, check_distillation
from inference.training.domain_stats import write_training_domain_stats
from inference.training.labels import (
    IGNORE_LABEL,
    SlideLabels,
    labels_digest,
    open_labelled_slide,
    region_target,
)
from inference.training.pseudo import PseudoLabelRule, PseudoLabels, UnlabeledSlide, pseudo_label_slides

log = logging.getLogger(__name__)

# ImageNet-free normalisation: the phantom/H&E mean and spread, fixed so members agree.
NORMALIZATION = {"mean": [0.78, 0.62, 0.78], "std": [0.15, 0.18, 0.12]}
CLASS_NAMES = ["background", "PD-L1 positive"]
#: A pseudo-labelled pixel's target is its class plus this (2 negative, 3 positive) until the loss, which
#: weighs it ``pseudo_weight``; labels are 0 and 1, :data:`IGNORE_LABEL` is no target.
PSEUDO_OFFSET = 2


@dataclass(frozen=True)
class SegTrainConfig:
    """Everything that defines a training run (recorded in the manifest).

    The learning rate follows ``lr_min + (high - lr_min) * (1 + cos(pi * t / T)) / 2`` within
    each cycle: the first lasts ``first_cycle_epochs`` (0: ``epochs_per_cycle``) from
    ``high = lr_max``, every later one ``epochs_per_cycle`` from ``high = restart_lr``
    (0: ``lr_max``). The last ``members_per_cycle`` epochs of each cycle (the low end) each
    give a member; with ``drop_first_cycle`` the first cycle's members are left out. A long
    first cycle lets the network converge before the first member is kept (measured effects
    on the demo data are in the README).
    ``optimizer`` is ``sgd`` (Nesterov momentum 0.99, as nnU-Net) or ``adamw``; the rates are
    used as given (``pdl1 train`` takes ``cyclic.DEFAULT_LR_MAX`` for the optimizer and a hundredth
    of it as ``lr_min``). ``loss`` is ``ce+dice`` (nnU-Net's compound loss) or ``ce`` (cross-entropy alone).
    ``chains`` independent runs of this schedule are trained one after another, chain ``k`` seeded
    with ``seed + k`` (so chain ``k`` is exactly the single-chain run with that seed) and written to
    ``out_dir/chain_k``; the ensemble holds every chain's members.
    ``unlabeled`` slides are pseudo-labelled by the segmentation ensemble in ``pseudo_model`` (before
    training; :func:`~inference.training.pseudo.pseudo_label_slides` with ``pseudo_margin`` and
    ``pseudo_mi_limit``) and drawn from like the labelled ones, their targets weighing ``pseudo_weight``.
    An ``unlabeled`` slide that is also a labelled one (a lab's labels, e.g. reviewed results) keeps its
    labels and takes pseudo-labels on the rest of it (:func:`with_pseudo_rest`), so labels that cover
    little of a slide do not leave the rest of it untaught.
    ``anchor_weight`` > 0 (fine-tuning from ``init_model`` only) adds L2-SP,
    ``anchor_weight / 2 * sum((w - w_init)^2)`` over the initial model's weights, to the loss
    (:mod:`inference.training.anchor`): the weights move from the initial model only as far as the labels
    pay for, against forgetting what they do not show. 0 is off. ``freeze_batchnorm`` (fine-tuning only)
    keeps the initial model's BatchNorm statistics: updated, they become the fine-tuning patches' (one
    domain's), which the network then applies to every slide; the anchor cannot hold them (not weights).
    ``distill_weight`` > 0 (fine-tuning only) adds Learning without Forgetting: the initial model's last member,
    frozen, runs on every training batch, and the student pays ``distill_weight * T^2 * KL(teacher_T ||
    student_T)`` (``T`` = ``distill_temperature``) per pixel with no human label (ignored and pseudo-labelled
    pixels; :mod:`inference.training.distill`): the function held where the labels say nothing. 0 is off.
    """

    slides: tuple[str, ...]
    out_dir: str
    name: str = "pdl1-seg"
    version: str = "1"
    input_mpp: float = 2.0
    patch_px: int = 128
    tile_size_px: int = 256
    features: tuple[int, ...] = (8, 16, 32, 64)
    batch_size: int = 16
    cycles: int = 5
    epochs_per_cycle: int = 4
    first_cycle_epochs: int = 0
    iterations_per_epoch: int = 40
    members_per_cycle: int = 1
    drop_first_cycle: bool = True
    optimizer: str = "adamw"
    lr_max: float = 3e-3
    restart_lr: float = 0.0
    lr_min: float = 3e-5
    weight_decay: float = 1e-4
    positive_fraction: float = 0.5
    stain_jitter: str = "light"
    loss: str = "ce+dice"
    threshold: float = 0.5
    seed: int = 0
    chains: int = 1
    device: str = "cpu"
    init_model: str | None = None  # a segmentation model folder whose last member every chain starts from
    unlabeled: tuple[UnlabeledSlide, ...] = ()
    pseudo_model: str | None = None  # the teacher of the unlabelled slides' pseudo-labels
    pseudo_margin: float = PseudoLabelRule.margin
    pseudo_mi_limit: float = PseudoLabelRule.mi_limit
    pseudo_weight: float = PseudoLabelRule.weight
    # Slides held out whole for validation (not trained on): the domain guard's limits are calibrated on them.
    validation_slides: tuple[str, ...] = ()
    anchor_weight: float = 0.0  # L2-SP toward init_model's weights; 0: off
    freeze_batchnorm: bool = False  # fine-tuning: BatchNorm keeps init_model's running statistics (eval mode)
    distill_weight: float = 0.0  # LwF: KL to init_model's predictions on pixels with no human label; 0: off
    distill_temperature: float = DEFAULT_TEMPERATURE  # the distillation's softmax temperature
    # µm/px by slide path (training and validation slides) that replace those files' own: the pixel size their
    # QuPath project states (SlideLabels.mpp, as `pdl1 run` reads an entry); the domain statistics read them so too.
    slide_mpp: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_schedule(self)
        bad = {path: mpp for path, mpp in self.slide_mpp.items() if not mpp > 0}
        if bad:
            raise ValueError(f"slide_mpp must be positive µm/px, got {bad}")
        check_fine_tuning(self.anchor_weight, self.freeze_batchnorm, init_model=self.init_model)
        check_distillation(self.distill_weight, self.distill_temperature, init_model=self.init_model)
        if self.unlabeled:
            self.pseudo_rule  # noqa: B018  (checks the numbers)
            if self.pseudo_model is None:
                raise ValueError("unlabeled slides need pseudo_model, the ensemble that pseudo-labels them")
        if self.chains < 1:
            raise ValueError(f"chains must be at least 1, got {self.chains}")
        if self.stain_jitter not in STAIN_JITTERS:
            raise ValueError(f"stain_jitter must be one of {', '.join(STAIN_JITTERS)}, got {self.stain_jitter!r}")
        if self.loss not in SEG_LOSSES:
            raise ValueError(f"loss must be one of {', '.join(SEG_LOSSES)}, got {self.loss!r}")
        divisor = 2 ** (len(self.features) - 1)
        if self.patch_px % divisor or self.tile_size_px % divisor:
            raise ValueError(
                f"patch_px and tile_size_px must be multiples of {divisor} for {len(self.features)} stages"
            )

    @property
    def total_epochs(self) -> int:
        return total_epochs(self)

    @property
    def pseudo_rule(self) -> PseudoLabelRule:
        return PseudoLabelRule(margin=self.pseudo_margin, mi_limit=self.pseudo_mi_limit, weight=self.pseudo_weight)


@dataclass
class _SlideData:
    name: str
    rgb: np.ndarray  # uint8 (H, W, 3) at input_mpp
    mask: np.ndarray  # uint8 (H, W)
    positive_idx: np.ndarray  # flat indices of valid positive centres
    tissue_idx: np.ndarray
    summary: dict


def _patch_centres(shape_hw: tuple[int, int], patch_px: int) -> np.ndarray:
    """Where a patch of ``patch_px`` can be centred without leaving the slide (bool, ``shape_hw``)."""
    h, w = shape_hw
    half = patch_px // 2
    valid = np.zeros((h, w), bool)
    valid[half : h - half, half : w - half] = True
    return valid


def _refuse_ihc_truth(slides: Sequence[str | Path]) -> None:
    """The segmentation ensemble is the H&E path's (a PD-L1 IHC is scored by its cells); trained on IHC phantoms
    it was written as an H&E model, which `pdl1 run` then ran on H&E slides."""
    ihc = [Path(p).name for p in slides if load_truth(p).summary.get("stain", "H&E") != "H&E"]
    if ihc:
        raise ValueError(
            f"{', '.join(ihc)}: PD-L1 IHC phantoms (their truth.json's stain is H-DAB), but the segmentation "
            "ensemble is trained on H&E (an IHC is scored by its cells: train the IHC nuclei model on them with "
            "`pdl1 train nuclei`); give the H&E phantoms"
        )


PHANTOM_MPP_ADVICE = phantom_training_advice("seg")


def load_training_slide(path: str | Path, *, input_mpp: float, patch_px: int) -> _SlideData:
    """Read a phantom slide whole at ``input_mpp`` with its truth mask on the same grid."""
    truth = load_truth(path)
    with open_slide(path, mpp_advice=PHANTOM_MPP_ADVICE) as slide:
        rgb = slide.whole_at_mpp(input_mpp, reader="segmentation training")
        ds = input_mpp / slide.mpp.mean
    h, w = rgb.shape[:2]
    ys = np.minimum(((np.arange(h) + 0.5) * ds / truth.mask_downsample).astype(int), truth.positive_mask.shape[0] - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * ds / truth.mask_downsample).astype(int), truth.positive_mask.shape[1] - 1)
    mask = truth.positive_mask[ys][:, xs].astype(np.uint8)
    tissue = detect_tissue(rgb)
    valid = _patch_centres((h, w), patch_px)
    return _SlideData(
        name=Path(path).name,
        rgb=rgb,
        mask=mask,
        positive_idx=np.flatnonzero(valid & (mask == 1)),
        tissue_idx=np.flatnonzero(valid & tissue),
        summary=truth.summary,
    )


def load_labelled_seg_slide(labels: SlideLabels, *, input_mpp: float, patch_px: int) -> _SlideData:
    """A slide with a lab's region labels, read whole at ``input_mpp`` (its project's pixel size, else its file's:
    :func:`~inference.training.labels.open_labelled_slide`); its mask holds :data:`IGNORE_LABEL`.

    Patches are centred on labelled pixels only (positive ones for the positive share).
    """
    if not labels.has_regions:
        raise ValueError(
            f"{labels.source or labels.slide}: no region labels (Training region, PD-L1 positive or negative areas)"
        )
    with open_labelled_slide(labels) as slide:
        if tuple(slide.dimensions) != tuple(labels.image_size_px):
            raise ValueError(
                f"{labels.slide}: the labels are for a {labels.image_size_px[0]} x {labels.image_size_px[1]} px image "
                f"but the file is {slide.dimensions[0]} x {slide.dimensions[1]} px; are they from another image?"
            )
        rgb = slide.whole_at_mpp(input_mpp, reader="segmentation training")
        ds = input_mpp / slide.mpp.mean
    h, w = rgb.shape[:2]
    mask = region_target(labels, shape_hw=(h, w), downsample=ds)
    valid = _patch_centres((h, w), patch_px)
    return _SlideData(
        name=Path(labels.slide).name,
        rgb=rgb,
        mask=mask,
        positive_idx=np.flatnonzero(valid & (mask == 1)),
        tissue_idx=np.flatnonzero(valid & (mask != IGNORE_LABEL)),
        summary={"labels": labels.source},
    )


def load_pseudo_slide(pseudo: PseudoLabels, *, input_mpp: float, patch_px: int) -> _SlideData:
    """An unlabelled slide with its pseudo-labels (``PSEUDO_OFFSET`` + class; :data:`IGNORE_LABEL` elsewhere).

    Patches are centred on pseudo-labelled pixels only (pseudo-positive ones for the positive share).
    """
    if pseudo.input_mpp != input_mpp:
        raise ValueError(f"{pseudo.slide.label}: pseudo-labels at {pseudo.input_mpp} µm/px, training at {input_mpp}")
    with open_slide(pseudo.slide.path, mpp=pseudo.slide.mpp, mpp_source="QuPath project") as slide:
        rgb = slide.whole_at_mpp(input_mpp, reader="segmentation training")
    h, w = rgb.shape[:2]
    if pseudo.target.shape != (h, w):
        raise ValueError(
            f"{pseudo.slide.label}: pseudo-labels of {pseudo.target.shape} px for an image read as {(h, w)} px"
        )
    known = pseudo.target != IGNORE_LABEL
    mask = np.where(known, pseudo.target + PSEUDO_OFFSET, IGNORE_LABEL).astype(np.uint8)
    valid = _patch_centres((h, w), patch_px)
    return _SlideData(
        name=Path(pseudo.slide.path).name,
        rgb=rgb,
        mask=mask,
        positive_idx=np.flatnonzero(valid & (mask == PSEUDO_OFFSET + 1)),
        tissue_idx=np.flatnonzero(valid & known),
        summary=pseudo.summary(),
    )


def with_pseudo_rest(labelled: _SlideData, pseudo: _SlideData, *, patch_px: int) -> _SlideData:
    """A labelled slide whose unlabelled pixels take the teacher's pseudo-labels; labels win where both exist.

    The positive share of patches stays on the labelled positives (what a person taught), falling back on
    the pseudo-positive pixels when the labels hold none; other patches are centred on any target pixel.
    """
    if labelled.mask.shape != pseudo.mask.shape:
        raise ValueError(
            f"{labelled.name}: labels on a {labelled.mask.shape} px grid but pseudo-labels on {pseudo.mask.shape}"
        )
    mask = np.where(labelled.mask != IGNORE_LABEL, labelled.mask, pseudo.mask).astype(np.uint8)
    valid = _patch_centres(mask.shape, patch_px)
    positive = (
        labelled.positive_idx if labelled.positive_idx.size else np.flatnonzero(valid & (mask == PSEUDO_OFFSET + 1))
    )
    return replace(
        labelled,
        mask=mask,
        positive_idx=positive,
        tissue_idx=np.flatnonzero(valid & (mask != IGNORE_LABEL)),
    )


def sample_batch(
    data: list[_SlideData], rng: np.random.Generator, *, batch_size: int, patch_px: int, positive_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced patches: ``positive_fraction`` centred on positive pixels, the rest on tissue."""
    images = np.empty((batch_size, patch_px, patch_px, 3), np.uint8)
    masks = np.empty((batch_size, patch_px, patch_px), np.uint8)
    half = patch_px // 2
    for i in range(batch_size):
        d = data[int(rng.integers(len(data)))]
        pool = d.positive_idx if (rng.random() < positive_fraction and d.positive_idx.size) else d.tissue_idx
        if pool.size == 0:
            pool = np.arange(d.mask.size)
        r, c = divmod(int(pool[rng.integers(pool.size)]), d.mask.shape[1])
        r = min(max(r, half), d.mask.shape[0] - half)
        c = min(max(c, half), d.mask.shape[1] - half)
        images[i] = d.rgb[r - half : r + half, c - half : c + half]
        masks[i] = d.mask[r - half : r + half, c - half : c + half]
    return images, masks


def ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy alone: a proper scoring rule, so members' probabilities stay calibrated.

    Pixels whose target is :data:`IGNORE_LABEL` are left out (a batch of them only costs 0).
    """
    if bool((target == IGNORE_LABEL).all()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=IGNORE_LABEL)


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice of the positive class (nnU-Net's compound loss, 2 classes), over labelled pixels."""
    known = (target != IGNORE_LABEL).float()
    p = torch.softmax(logits, dim=1)[:, 1] * known
    t = (target == 1).float()
    inter = (p * t).sum()
    soft_dice = (2 * inter + 1) / (p.sum() + t.sum() + 1)
    return ce_loss(logits, target) + (1 - soft_dice)


SEG_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"ce+dice": seg_loss, "ce": ce_loss}


def pixel_weights(target: torch.Tensor, *, pseudo_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(class, weight) per pixel of a target holding labels (0, 1), pseudo-labels (``PSEUDO_OFFSET`` +
    class) and :data:`IGNORE_LABEL`: labels weigh 1, pseudo-labels ``pseudo_weight``, the rest 0 (class 0)."""
    ignore = target == IGNORE_LABEL
    pseudo = (target >= PSEUDO_OFFSET) & ~ignore
    cls = torch.where(pseudo, target - PSEUDO_OFFSET, target).masked_fill(ignore, 0)
    weight = torch.where(pseudo, pseudo_weight, 1.0).masked_fill(ignore, 0.0)
    return cls, weight


def weighted_ce_loss(logits: torch.Tensor, target: torch.Tensor, *, pseudo_weight: float) -> torch.Tensor:
    """Cross-entropy with pseudo-labelled pixels weighing ``pseudo_weight``, averaged over the target pixels.

    Over the pixels that are labels or pseudo-labels (not their weights), so a batch of pseudo-labels
    alone counts ``pseudo_weight`` of a labelled one; on labels alone this is :func:`ce_loss`.
    """
    cls, weight = pixel_weights(target, pseudo_weight=pseudo_weight)
    n_known = int((target != IGNORE_LABEL).sum())
    if n_known == 0:
        return logits.sum() * 0.0
    return (F.cross_entropy(logits, cls, reduction="none") * weight).sum() / n_known


def weighted_seg_loss(logits: torch.Tensor, target: torch.Tensor, *, pseudo_weight: float) -> torch.Tensor:
    """:func:`seg_loss` with pseudo-labels weighed ``pseudo_weight``: the weighted cross-entropy, and the
    soft Dice over weighted pixels, scaled by the batch's mean weight (labels alone: :func:`seg_loss`)."""
    cls, weight = pixel_weights(target, pseudo_weight=pseudo_weight)
    n_known = int((target != IGNORE_LABEL).sum())
    if n_known == 0:
        return logits.sum() * 0.0
    p = torch.softmax(logits, dim=1)[:, 1] * weight
    t = (cls == 1).float() * weight
    soft_dice = (2 * (p * (cls == 1)).sum() + 1) / (p.sum() + t.sum() + 1)
    mean_weight = weight.sum() / n_known
    return weighted_ce_loss(logits, target, pseudo_weight=pseudo_weight) + (1 - soft_dice) * mean_weight


WEIGHTED_SEG_LOSSES = {"ce+dice": weighted_seg_loss, "ce": weighted_ce_loss}


def _seg_init_kind(arch_kwargs: dict) -> dict:
    """What a segmentation run's ``init_model`` must be (:func:`~inference.training.cyclic.check_init_model`)."""
    return {
        "task": "segmentation",
        "architecture": "PlainConvUNet",
        "arch_kwargs": arch_kwargs,
        "class_names": CLASS_NAMES,
        "stain": "H&E",
    }


def train_segmentation(
    config: SegTrainConfig,
    *,
    labels: Sequence[SlideLabels] = (),
    label_sources: list[dict] | None = None,
    pseudo: Sequence[PseudoLabels] | None = None,
    resume: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    setting: SettingWords = library_setting,
    on_domain_progress: Callable[[int, int], None] | None = None,
) -> Manifest:
    """Train and write an ensemble folder (``config.out_dir``); returns its manifest.

    The manifest is written only once every chain has finished, so an interrupted run writes none
    (nothing loads as a partial ensemble); ``resume`` continues from the chains' checkpoints, refusing one
    written with other settings or labels (:func:`~inference.training.cyclic.check_checkpoint_run`). With
    ``labels`` (a lab's region labels), ``config.slides`` are the labelled slides in the same order;
    ``label_sources`` go into the manifest. ``pseudo``: the pseudo-labels of ``config.unlabeled``, in
    their order, when the caller made them already (to show their counts); else they are made here.
    The messages' advice names the settings (``config``'s fields, ``resume``) in ``setting``'s words.
    ``on_progress(done, total)`` counts the training steps, ``on_domain_progress`` the slides of the domain
    statistics computed after them (:func:`~inference.training.domain_stats.write_training_domain_stats`).
    """
    out_dir = Path(config.out_dir)
    check_out_dir(out_dir, resume=resume, setting=setting)
    if not labels:
        _refuse_ihc_truth(config.slides)
    device = torch.device(config.device)
    check_training_input(config, labels, task="seg")
    arch_kwargs = {
        "in_channels": 3,
        "n_classes": 2,
        "features": list(config.features),
        "n_conv_per_stage": 2,
        "norm": "batch",
    }
    if config.init_model is not None:  # before any slide is read or the folder made: each chain loads it later
        check_init_model(config.init_model, **_seg_init_kind(arch_kwargs), setting=setting)
    if labels:
        data = [load_labelled_seg_slide(lab, input_mpp=config.input_mpp, patch_px=config.patch_px) for lab in labels]
    else:
        data = [load_training_slide(p, input_mpp=config.input_mpp, patch_px=config.patch_px) for p in config.slides]
    for d in data:
        check_patch_fits(d.name, d.mask.shape, patch_px=config.patch_px, input_mpp=config.input_mpp, setting=setting)
    pseudo = _pseudo_labels(config, pseudo, setting=setting)
    pseudo_data = [load_pseudo_slide(p, input_mpp=config.input_mpp, patch_px=config.patch_px) for p in pseudo]
    for d in pseudo_data:
        check_patch_fits(d.name, d.mask.shape, patch_px=config.patch_px, input_mpp=config.input_mpp, setting=setting)
    if labels:  # an unlabeled slide that is also labelled: its pseudo-labels fill the rest of its labelled item
        rest = {Path(p.slide.path).resolve(): d for p, d in zip(pseudo, pseudo_data, strict=True)}
        paths = [Path(s).resolve() for s in config.slides]
        data = [
            with_pseudo_rest(d, rest.pop(path), patch_px=config.patch_px) if path in rest else d
            for path, d in zip(paths, data, strict=True)
        ]
        pseudo_data = list(rest.values())
    steps_per_chain = config.total_epochs * config.iterations_per_epoch
    run = run_identity(config, [labels_digest(lab) for lab in labels])
    # Made once the slides, labels and pseudo-labels have been read: a refused run leaves no empty folder.
    out_dir.mkdir(parents=True, exist_ok=True)
    members: list[dict] = []
    for chain in range(config.chains):
        chain_dir = out_dir if config.chains == 1 else out_dir / f"chain_{chain}"
        chain_dir.mkdir(exist_ok=True)
        progress = None
        if on_progress is not None:
            progress = _offset_progress(on_progress, chain * steps_per_chain, config.chains * steps_per_chain)
        records = _train_chain(
            config,
            [*data, *pseudo_data],
            arch_kwargs,
            seed=config.seed + chain,
            out_dir=chain_dir,
            device=device,
            resume=resume,
            on_progress=progress,
            run=run,
            setting=setting,
        )
        members += [
            {**r, "file": (chain_dir / r["file"]).relative_to(out_dir).as_posix(), "chain": chain} for r in records
        ]

    manifest = Manifest(
        name=config.name,
        version=config.version,
        task="segmentation",
        architecture="PlainConvUNet",
        architecture_kwargs=arch_kwargs,
        input_mpp=config.input_mpp,
        tile_size_px=config.tile_size_px,
        normalization=NORMALIZATION,
        class_names=CLASS_NAMES,
        members=[
            Member(**{k: m[k] for k in ("file", "sha256", "cycle", "epoch", "learning_rate", "chain")}) for m in members
        ],
        thresholds={"segmentation": config.threshold},
        training={
            "config": {k: v for k, v in asdict(config).items() if k != "out_dir"},
            "data": _data_record(data, labels, label_sources),
            "init": None if config.init_model is None else init_record(config.init_model, members[0]["init_sha256"]),
            "pseudo_labels": _pseudo_record(config, pseudo) if pseudo else None,
            "final_losses": [m["train_loss"] for m in members],
            "producer": f"pdl1-bridge {__version__}",
        },
    )
    write_manifest(out_dir, manifest)
    # The domain guard's statistics of these slides, limits by leaving one slide out (pdl1 domain-stats
    # recomputes them with held-out slides).
    return write_training_domain_stats(
        out_dir,
        config.slides,
        held_out=config.validation_slides,
        device=config.device,
        slide_mpp=config.slide_mpp,
        setting=renamed(setting, held_out="validation_slides"),
        on_progress=on_domain_progress,
    )


def _pseudo_labels(
    config: SegTrainConfig, given: Sequence[PseudoLabels] | None, *, setting: SettingWords
) -> list[PseudoLabels]:
    if not config.unlabeled:
        if given:
            raise ValueError("pseudo-labels were given for a run without unlabeled slides")
        return []
    if given is None:
        return pseudo_label_slides(
            config.pseudo_model or "",
            config.unlabeled,
            rule=config.pseudo_rule,
            input_mpp=config.input_mpp,
            device=config.device,
            setting=renamed(setting, slides="unlabeled"),
        )
    if tuple(p.slide for p in given) != tuple(config.unlabeled):
        raise ValueError("pseudo must be the pseudo-labels of config.unlabeled, in their order")
    return list(given)


def _pseudo_record(config: SegTrainConfig, pseudo: list[PseudoLabels]) -> dict:
    """The teacher, the rule and per slide the pixels used per class and those left out (teacher's grid)."""
    from inference.models.manifest import read_manifest

    teacher = read_manifest(config.pseudo_model or "", task="segmentation", verify=False)
    return {
        "teacher": {"model": config.pseudo_model, "name": teacher.name, "checksum": teacher.checksum},
        "teacher_mpp": teacher.input_mpp,
        "margin": config.pseudo_margin,
        "mi_limit": config.pseudo_mi_limit,
        "weight": config.pseudo_weight,
        "slides": [p.summary() for p in pseudo],
    }


def _data_record(data: list[_SlideData], labels: Sequence[SlideLabels], sources: list[dict] | None) -> list[dict]:
    if not labels:
        return [
            {
                "slide": d.name,
                "seed": d.summary["spec"]["seed"],
                "tps_percent": d.summary["spec"]["tps_percent"],
                "shift": d.summary["spec"]["shift"],
                "size_px": [d.summary["spec"]["width_px"], d.summary["spec"]["height_px"]],
                "positive_fraction": float(d.mask.mean()),
            }
            for d in data
        ]
    records = sources or [
        {"slide": lab.slide, "source": lab.source, "counts": dict(lab.counts), "labels_sha256": labels_digest(lab)}
        for lab in labels
    ]
    out = []
    for record, d in zip(records, data, strict=True):
        known = d.mask != IGNORE_LABEL
        positive = float((d.mask[known] == 1).mean()) if known.any() else 0.0
        out.append(record | {"labelled_px": int(known.sum()), "positive_fraction_of_labelled": positive})
    return out


def _offset_progress(on_progress: Callable[[int, int], None], offset: int, total: int) -> Callable[[int, int], None]:
    """Report one chain's steps as steps of the whole run."""

    def report(done: int, _chain_total: int) -> None:
        on_progress(offset + done, total)

    return report


def _train_chain(
    config: SegTrainConfig,
    data: list[_SlideData],
    arch_kwargs: dict,
    *,
    seed: int,
    out_dir: Path,
    device: torch.device,
    resume: bool,
    on_progress: Callable[[int, int], None] | None,
    setting: SettingWords,
    run: Mapping | None = None,
) -> list[dict]:
    """One cyclic run from its own seed: initial weights, patch draws and augmentation all follow it."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = PlainConvUNet(**{**arch_kwargs, "features": tuple(config.features)})
    init_sha256 = None
    if config.init_model is not None:
        init_sha256 = init_weights(model, config.init_model, **_seg_init_kind(arch_kwargs), setting=setting)
    model = model.to(device)
    anchor = WeightAnchor(model, weight=config.anchor_weight) if config.anchor_weight else None
    # The teacher is the initial model as loaded (a resumed run loads its checkpoint into the student only).
    distill = (
        Distiller(model, weight=config.distill_weight, temperature=config.distill_temperature)
        if config.distill_weight
        else None
    )
    mean = torch.tensor(NORMALIZATION["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(NORMALIZATION["std"], device=device).view(1, 3, 1, 1)
    jitter = STAIN_JITTERS[config.stain_jitter]

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        images, masks = sample_batch(
            data,
            rng,
            batch_size=config.batch_size,
            patch_px=config.patch_px,
            positive_fraction=config.positive_fraction,
        )
        images, masks = augment_batch(images, masks, rng, jitter=jitter)
        x = (torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 255 - mean) / std
        return x, torch.from_numpy(masks.astype(np.int64)).to(device)

    records = train_cyclic(
        config,
        model,
        out_dir=out_dir,
        rng=rng,
        next_batch=next_batch,
        loss_fn=partial(WEIGHTED_SEG_LOSSES[config.loss], pseudo_weight=config.pseudo_weight)
        if config.unlabeled
        else SEG_LOSSES[config.loss],
        resume=resume,
        on_progress=on_progress,
        anchor=anchor,
        frozen_batchnorm=config.freeze_batchnorm,
        distill=distill,
        run=run,
        setting=setting,
    )
    return [r | {"init_sha256": init_sha256} for r in records]
