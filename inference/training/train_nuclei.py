"""Train the point-supervised nuclei FCN from annotated points (phantom truth ``nuclei.csv``, or a lab's labels).

Targets are unit-peak Gaussians (``sigma_um``) at each nucleus on its class's heatmap; the
loss is CenterNet's penalty-reduced focal loss on the sigmoid heatmaps. Patches are centred
on nuclei of a class drawn uniformly, so rare classes are seen as often as common ones.
Cyclic training as the segmentation ensemble: with several members, each nucleus also gets
a predictive entropy.

A lab's own labels (:class:`~inference.training.labels.SlideLabels`) are sparse: the heatmap target is
known only inside exhaustively marked training regions and near marked points, and the focal loss
leaves every other pixel out (:func:`masked_focal_loss`). ``init_model`` fine-tunes from an existing
ensemble's last member instead of random weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from inference import __version__
from inference.advice import SettingWords, library_setting, renamed
from inference.analysis.ihc import DEFAULT_INTENSITY_LIMITS_OD, annulus_means, dab_density
from inference.analysis.nuclei import DEFAULT_MIN_SCORE, MEMBRANE_PERCENTILE, MEMBRANE_RING_UM, detect_nuclei
from inference.analysis.points import gaussian_targets
from inference.models.ensemble import Ensemble
from inference.models.manifest import Manifest, Member, read_manifest, write_manifest
from inference.models.nuclei_model import DilatedResFCN
from inference.phantom.truth import load_truth
from inference.slides.slide import open_slide
from inference.slides.tissue import TISSUE_METHOD_OF_STAIN, tissue_mask_for_slide
from inference.training.anchor import WeightAnchor, check_fine_tuning
from inference.training.augment import STAIN_JITTERS, StainJitter, augment_batch
from inference.training.cyclic import (
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
from inference.training.domain_stats import write_training_domain_stats
from inference.training.labels import (
    SlideLabels,
    labels_digest,
    nuclei_known_mask,
    open_labelled_slide,
)
from inference.training.train_seg import NORMALIZATION

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NucleiTrainConfig:
    """A nuclei training run (recorded in the manifest); schedule fields as :class:`SegTrainConfig`."""

    slides: tuple[str, ...]
    out_dir: str
    name: str | None = None
    version: str = "1"
    input_mpp: float = 1.0
    patch_px: int = 96
    tile_size_px: int = 256
    width: int = 32
    dilations: tuple[int, ...] = (1, 2, 4, 8)
    sigma_um: float = 1.5
    batch_size: int = 12
    cycles: int = 3
    epochs_per_cycle: int = 3
    first_cycle_epochs: int = 0
    iterations_per_epoch: int = 40
    members_per_cycle: int = 1
    drop_first_cycle: bool = True
    optimizer: str = "adamw"
    lr_max: float = 3e-3
    restart_lr: float = 0.0
    lr_min: float = 3e-5
    weight_decay: float = 1e-4
    stain_jitter: str = "light"
    # Up to this many degrees the haematoxylin's OD vector is turned in augmentation (StainJitter); 0: never.
    haematoxylin_turn_deg: float = 0.0
    seed: int = 0
    device: str = "cpu"
    init_model: str | None = None  # a nuclei model folder whose last member the training starts from
    # Where a lab's labels are sparse: pixels within this radius of a marked point have a known target.
    known_radius_um: float = 6.0
    # Slides held out whole for validation (not trained on): the domain guard's limits are calibrated on them.
    validation_slides: tuple[str, ...] = ()
    # The model runs with test-time augmentation (manifest extra["tta"]; see NucleiConfig.tta): what follows
    # training (the held-out scores, the peak threshold refitted on them, the IHC review limit) is measured with it.
    tta: bool = False
    anchor_weight: float = 0.0  # L2-SP toward init_model's weights (as SegTrainConfig's); 0: off
    freeze_batchnorm: bool = False  # fine-tuning: BatchNorm keeps init_model's statistics (as SegTrainConfig's)
    # µm/px by slide path (training and validation slides) that replace those files' own: the pixel size their
    # QuPath project states (SlideLabels.mpp, as `pdl1 run` reads an entry); the domain statistics read them so too.
    slide_mpp: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_schedule(self)
        bad = {path: mpp for path, mpp in self.slide_mpp.items() if not mpp > 0}
        if bad:
            raise ValueError(f"slide_mpp must be positive µm/px, got {bad}")
        check_fine_tuning(self.anchor_weight, self.freeze_batchnorm, init_model=self.init_model)
        if self.stain_jitter not in STAIN_JITTERS:
            raise ValueError(f"stain_jitter must be one of {', '.join(STAIN_JITTERS)}, got {self.stain_jitter!r}")
        if not 0 <= self.haematoxylin_turn_deg <= 90:
            raise ValueError(f"haematoxylin_turn_deg must lie in 0-90 degrees, got {self.haematoxylin_turn_deg}")
        if self.patch_px % 2 or self.tile_size_px % 2:
            raise ValueError("patch_px and tile_size_px must be even (the FCN works at stride 2 inside)")

    @property
    def total_epochs(self) -> int:
        return total_epochs(self)

    @property
    def jitter(self) -> StainJitter:
        """The colour augmentation: the ``stain_jitter`` preset, haematoxylin turned up to ``haematoxylin_turn_deg``."""
        return replace(STAIN_JITTERS[self.stain_jitter], haematoxylin_turn_deg=self.haematoxylin_turn_deg)


@dataclass
class _NucleiData:
    name: str
    rgb: np.ndarray  # uint8 at input_mpp
    xy: np.ndarray  # (N, 2) model px
    cls: np.ndarray
    summary: dict
    class_names: tuple[str, ...]
    intensity: np.ndarray  # (N,) truth grade 0-3
    known: np.ndarray | None = None  # (H, W) bool where the target is known; None: everywhere (phantom truth)

    @property
    def stain(self) -> str:
        return self.summary.get("stain", "H&E")


PHANTOM_MPP_ADVICE = phantom_training_advice("nuclei")


def load_nuclei_slide(path: str | Path, *, input_mpp: float) -> _NucleiData:
    truth = load_truth(path)
    with open_slide(path, mpp_advice=PHANTOM_MPP_ADVICE) as slide:
        rgb = slide.whole_at_mpp(input_mpp, reader="nuclei training")
        ds = input_mpp / slide.mpp.mean
    return _NucleiData(
        Path(path).name,
        rgb,
        truth.nuclei_xy / ds - 0.5,
        truth.nuclei_class,
        truth.summary,
        tuple(truth.class_names),
        truth.nuclei_intensity,
    )


def load_labelled_slide(labels: SlideLabels, *, input_mpp: float, known_radius_um: float) -> _NucleiData:
    """A slide with a lab's point labels, read whole at ``input_mpp`` (its project's pixel size, else its file's:
    :func:`~inference.training.labels.open_labelled_slide`), with the mask of known targets."""
    with open_labelled_slide(labels) as slide:
        if tuple(slide.dimensions) != tuple(labels.image_size_px):
            raise ValueError(
                f"{labels.slide}: the labels are for a {labels.image_size_px[0]} x {labels.image_size_px[1]} px image "
                f"but the file is {slide.dimensions[0]} x {slide.dimensions[1]} px; are they from another image?"
            )
        rgb = slide.whole_at_mpp(input_mpp, reader="nuclei training")
        ds = input_mpp / slide.mpp.mean
    known = nuclei_known_mask(labels, shape_hw=rgb.shape[:2], downsample=ds, radius_px=known_radius_um / input_mpp)
    if not labels.has_points:
        raise ValueError(
            f"{labels.source or labels.slide}: no nucleus points to train on ({labels.counts or 'nothing read'}); mark "
            "nuclei with QuPath's Points tool (a class of the model's per point set), or leave the slide out"
        )
    return _NucleiData(
        Path(labels.slide).name,
        rgb,
        labels.points_xy / ds - 0.5,
        labels.points_class,
        {"stain": labels.stain},
        tuple(labels.class_names),
        np.zeros(len(labels.points_class), np.int64),
        known,
    )


def _one_kind(data: list[_NucleiData]) -> tuple[tuple[str, ...], str]:
    """The class names and stain all training slides share; mixing H&E and IHC truth is refused."""
    kinds = {(d.class_names, d.stain) for d in data}
    if len(kinds) > 1:
        listing = "; ".join(f"{d.name}: {d.stain}, {len(d.class_names)} classes" for d in data)
        raise ValueError(
            f"the training slides are of different stains or classes ({listing}); a model is trained on one "
            "stain: train the H&E and the PD-L1 IHC nuclei models separately"
        )
    return next(iter(kinds))


def calibrate_intensity_limits(data: list[_NucleiData], *, ring_px: tuple[float, float]) -> dict[str, float]:
    """Membrane DAB OD limits of 2+ and 3+ from the training truth: midway between the grades' medians.

    The 1+ limit stays QuPath's default (at most the 2+ limit): any staining of a cell the model calls
    positive is at least 1+.
    """
    values: dict[int, list[np.ndarray]] = {1: [], 2: [], 3: []}
    for d in data:
        dab = dab_density(d.rgb)
        membrane = annulus_means(
            dab, d.xy + 0.5, inner_px=ring_px[0], outer_px=ring_px[1], percentile=MEMBRANE_PERCENTILE
        )
        for grade in values:
            values[grade].append(membrane[d.intensity == grade])
    medians = {g: float(np.nanmedian(np.concatenate(v))) if sum(map(len, v)) else None for g, v in values.items()}
    if None in medians.values() or not medians[1] < medians[2] < medians[3]:
        raise ValueError(
            f"cannot calibrate the 1+/2+/3+ limits: the training slides' membrane DAB medians by grade are {medians}; "
            "they need cells of every grade whose membranes darken with the grade"
        )
    limit_2plus = (medians[1] + medians[2]) / 2
    return {
        # Not above the 2+ limit: the membranes of these slides may be fainter than QuPath's default expects.
        "intensity_1plus_od": min(DEFAULT_INTENSITY_LIMITS_OD[0], limit_2plus),
        "intensity_2plus_od": limit_2plus,
        "intensity_3plus_od": (medians[2] + medians[3]) / 2,
        "membrane_inner_um": MEMBRANE_RING_UM[0],
        "membrane_outer_um": MEMBRANE_RING_UM[1],
    }


# The intensity thresholds of an IHC nuclei manifest: membrane DAB OD limits of 1+/2+/3+ and the ring they are read on.
_INTENSITY_KEYS = (
    "intensity_1plus_od",
    "intensity_2plus_od",
    "intensity_3plus_od",
    "membrane_inner_um",
    "membrane_outer_um",
)


def intensity_limits_of(init_model: str | Path | None) -> dict[str, float]:
    """The 1+/2+/3+ membrane limits an IHC model trained on a lab's points keeps: its ``init_model``'s (calibrated
    on graded truth), else QuPath's defaults. Points are marked positive or negative, with no grade to calibrate on.

    >>> intensity_limits_of(None)["intensity_3plus_od"]
    0.6
    """
    defaults = dict(zip(_INTENSITY_KEYS, (*DEFAULT_INTENSITY_LIMITS_OD, *MEMBRANE_RING_UM), strict=True))
    if init_model is None:
        return defaults
    stated = read_manifest(init_model, task="nuclei", verify=False).thresholds
    return {key: float(stated.get(key, value)) for key, value in defaults.items()}


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss (alpha 2, beta 4), normalised by the number of peaks."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    neg_weight = (1 - target).pow(4)
    pos_loss = (torch.log(p) * (1 - p).pow(2) * pos).sum()
    neg_loss = (torch.log(1 - p) * p.pow(2) * neg_weight * (1 - pos)).sum()
    return -(pos_loss + neg_loss) / pos.sum().clamp_min(1.0)


def masked_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """:func:`focal_loss` over the pixels whose target is known: ``target``'s last channel is that mask."""
    heat, known = target[:, :-1], target[:, -1:]
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1).float() * known
    neg_weight = (1 - heat).pow(4) * known
    pos_loss = (torch.log(p) * (1 - p).pow(2) * pos).sum()
    neg_loss = (torch.log(1 - p) * p.pow(2) * neg_weight * (1 - pos)).sum()
    return -(pos_loss + neg_loss) / pos.sum().clamp_min(1.0)


def sample_nuclei_batch(
    data: list[_NucleiData], rng: np.random.Generator, *, batch_size: int, patch_px: int, sigma_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """Patches centred near a nucleus of a uniformly drawn class, with (H, W, C) Gaussian targets.

    Slides with sparse labels (``known`` set) add a last target channel, 1 where the target is known,
    and centre half their patches on a known pixel, so unmarked background is seen too.
    """
    n_classes = len(data[0].class_names)
    sparse = data[0].known is not None
    images = np.empty((batch_size, patch_px, patch_px, 3), np.uint8)
    targets = np.empty((batch_size, patch_px, patch_px, n_classes + sparse), np.float32)
    half = patch_px // 2
    for i in range(batch_size):
        d = data[int(rng.integers(len(data)))]
        h, w = d.rgb.shape[:2]
        wanted = int(rng.integers(n_classes))
        pool = np.flatnonzero(d.cls == wanted)
        if pool.size == 0:
            pool = np.arange(len(d.cls))
        cx, cy = d.xy[pool[rng.integers(pool.size)]] + rng.uniform(-half / 2, half / 2, 2)
        if sparse and rng.random() < 0.5:
            rows, cols = np.nonzero(d.known)
            j = int(rng.integers(rows.size))
            cx, cy = float(cols[j]), float(rows[j])
        x0 = int(np.clip(round(cx) - half, 0, w - patch_px))
        y0 = int(np.clip(round(cy) - half, 0, h - patch_px))
        images[i] = d.rgb[y0 : y0 + patch_px, x0 : x0 + patch_px]
        near = (
            (d.xy[:, 0] >= x0 - 5)
            & (d.xy[:, 0] < x0 + patch_px + 5)
            & (d.xy[:, 1] >= y0 - 5)
            & (d.xy[:, 1] < y0 + patch_px + 5)
        )
        t = gaussian_targets(
            np.round(d.xy[near] - (x0, y0)),
            d.cls[near],
            shape_hw=(patch_px, patch_px),
            n_classes=n_classes,
            sigma_px=sigma_px,
        )
        targets[i, ..., :n_classes] = np.moveaxis(t, 0, -1)
        if sparse:
            targets[i, ..., n_classes] = d.known[y0 : y0 + patch_px, x0 : x0 + patch_px]
    return images, targets


def train_nuclei(
    config: NucleiTrainConfig,
    *,
    labels: Sequence[SlideLabels] = (),
    label_sources: list[dict] | None = None,
    resume: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    setting: SettingWords = library_setting,
    on_domain_progress: Callable[[int, int], None] | None = None,
    on_review_progress: Callable[[int, int], None] | None = None,
) -> Manifest:
    """Train and write a nuclei model folder (``config.out_dir``); returns its manifest.

    ``resume`` continues from the checkpoint, refusing one written with other settings or labels
    (:func:`~inference.training.cyclic.check_checkpoint_run`).

    Without ``labels`` the slides are phantoms with truth; with them, ``config.slides`` are the
    labelled slides (in the same order) and training honours where the labels are sparse.
    ``label_sources`` (project, entries, counts: ``bridge.labels.label_summary``) go into the manifest.
    The messages' advice names the settings (``config``'s fields, ``resume``) in ``setting``'s words.
    ``on_progress(done, total)`` counts the training steps, ``on_domain_progress`` the slides of the domain
    statistics computed after them (:func:`~inference.training.domain_stats.write_training_domain_stats`), and
    before those, of a PD-L1 IHC ensemble, ``on_review_progress`` the slides of its review limit
    (:func:`review_entropy_limit`).
    """
    out_dir = Path(config.out_dir)
    check_out_dir(out_dir, resume=resume, setting=setting)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = torch.device(config.device)
    check_training_input(config, labels, task="nuclei")
    if labels:
        data = [
            load_labelled_slide(lab, input_mpp=config.input_mpp, known_radius_um=config.known_radius_um)
            for lab in labels
        ]
    else:
        data = [load_nuclei_slide(p, input_mpp=config.input_mpp) for p in config.slides]
    for d in data:
        check_patch_fits(d.name, d.rgb.shape[:2], patch_px=config.patch_px, input_mpp=config.input_mpp, setting=setting)
    class_names, stain = _one_kind(data)
    thresholds = {"min_score": DEFAULT_MIN_SCORE, "nms_radius_um": 2.5}
    if stain == "H-DAB" and labels:  # a lab's points say positive or negative, not 1+/2+/3+
        thresholds |= intensity_limits_of(config.init_model)
    elif stain == "H-DAB":
        ring_px = (MEMBRANE_RING_UM[0] / config.input_mpp, MEMBRANE_RING_UM[1] / config.input_mpp)
        thresholds |= calibrate_intensity_limits(data, ring_px=ring_px)
    arch_kwargs = {
        "in_channels": 3,
        "n_classes": len(class_names),
        "width": config.width,
        "dilations": list(config.dilations),
    }
    model = DilatedResFCN(**{**arch_kwargs, "dilations": tuple(config.dilations)})
    init_sha256 = None
    if config.init_model is not None:
        init_sha256 = init_weights(
            model,
            config.init_model,
            task="nuclei",
            architecture="DilatedResFCN",
            arch_kwargs=arch_kwargs,
            class_names=class_names,
            stain=stain,
            setting=setting,
        )
    model = model.to(device)
    # Made once the slides, labels and initial model have been read: a refused run leaves no empty folder.
    out_dir.mkdir(parents=True, exist_ok=True)
    anchor = WeightAnchor(model, weight=config.anchor_weight) if config.anchor_weight else None
    mean = torch.tensor(NORMALIZATION["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(NORMALIZATION["std"], device=device).view(1, 3, 1, 1)
    sigma_px = config.sigma_um / config.input_mpp

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = sample_nuclei_batch(
            data, rng, batch_size=config.batch_size, patch_px=config.patch_px, sigma_px=sigma_px
        )
        images, targets = augment_batch(images, targets, rng, jitter=config.jitter)
        x = (torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 255 - mean) / std
        return x, torch.from_numpy(np.ascontiguousarray(targets)).to(device).permute(0, 3, 1, 2)

    members = train_cyclic(
        config,
        model,
        out_dir=out_dir,
        rng=rng,
        next_batch=next_batch,
        loss_fn=masked_focal_loss if labels else focal_loss,
        resume=resume,
        on_progress=on_progress,
        anchor=anchor,
        frozen_batchnorm=config.freeze_batchnorm,
        run=run_identity(config, [labels_digest(lab) for lab in labels]),
        setting=setting,
    )

    manifest = Manifest(
        name=config.name or ("pdl1-nuclei-ihc" if stain == "H-DAB" else "pdl1-nuclei"),
        version=config.version,
        task="nuclei",
        architecture="DilatedResFCN",
        architecture_kwargs=arch_kwargs,
        input_mpp=config.input_mpp,
        tile_size_px=config.tile_size_px,
        normalization=NORMALIZATION,
        class_names=list(class_names),
        members=[Member(**{k: m[k] for k in ("file", "sha256", "cycle", "epoch", "learning_rate")}) for m in members],
        thresholds=thresholds,
        stain=stain,
        extra={"output_stride": DilatedResFCN.output_stride, "sigma_um": config.sigma_um}
        | ({"tta": True} if config.tta else {}),
        training={
            "config": {k: v for k, v in asdict(config).items() if k != "out_dir"},
            "data": _data_record(data, labels, label_sources),
            "init": None if init_sha256 is None else init_record(config.init_model, init_sha256),
            "final_losses": [m["train_loss"] for m in members],
            "producer": f"pdl1-bridge {__version__}",
        },
    )
    write_manifest(out_dir, manifest)
    if stain == "H-DAB" and len(members) > 1:
        limit = review_entropy_limit(
            out_dir, config.slides, device=config.device, slide_mpp=config.slide_mpp, on_progress=on_review_progress
        )
        manifest = manifest.with_thresholds(review_nuclei_entropy=limit)
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


def _data_record(data: list[_NucleiData], labels: Sequence[SlideLabels], sources: list[dict] | None) -> list[dict]:
    if not labels:
        return [
            {
                "slide": d.name,
                "seed": d.summary["spec"]["seed"],
                "tps_percent": d.summary["spec"]["tps_percent"],
                "shift": d.summary["spec"]["shift"],
                "nuclei": len(d.cls),
            }
            for d in data
        ]
    return sources or [
        {"slide": lab.slide, "source": lab.source, "counts": dict(lab.counts), "labels_sha256": labels_digest(lab)}
        for lab in labels
    ]


# An IHC slide needs review when its cells' mean ensemble entropy passes the training slides' highest by this
# factor: above anything the model was sure of in its own domain.
REVIEW_ENTROPY_MARGIN = 1.1


def review_entropy_limit(
    model_dir: str | Path,
    slides: tuple[str, ...],
    *,
    device: str = "cpu",
    slide_mpp: Mapping[str, float] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> float:
    """The review limit of an IHC nuclei ensemble: its training slides' highest mean nuclei entropy x margin.
    ``slide_mpp``: the µm/px a slide's project states, where it replaces the file's own (as training read it);
    ``on_progress(done, total)`` counts the slides (the ensemble runs over each one's tissue)."""
    ensemble = Ensemble.load(model_dir, task="nuclei", device=device)
    means = []
    if on_progress is not None:
        on_progress(0, len(slides))
    for done, path in enumerate(slides, start=1):
        mpp = (slide_mpp or {}).get(path)
        with open_slide(path, mpp=mpp, mpp_source="QuPath project") as slide:
            tissue = tissue_mask_for_slide(slide, method=TISSUE_METHOD_OF_STAIN[ensemble.manifest.stain])
            nuclei = detect_nuclei(slide, ensemble, tissue=tissue)
        if nuclei.entropy is not None and len(nuclei):
            means.append(float(nuclei.entropy.mean()))
        if on_progress is not None:
            on_progress(done, len(slides))
    return max(means) * REVIEW_ENTROPY_MARGIN
