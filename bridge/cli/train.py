"""``pdl1 train``: the sub-app that trains segmentation ensembles and nuclei models on phantom slides,
or on a lab's own QuPath labels (a project, or GeoJSON exports beside slides: ``bridge.labels``), and draws
their training report again (``train report``); ``pdl1 domain-stats``: a model's training-domain statistics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from bridge.cli.common import (
    TIFF_WITH_RESOLUTION,
    check_device,
    check_model_target,
    check_training_device,
    fail,
    interrupted,
    number_range,
    stain_option,
    warn_of_count,
    write_model_copy,
)
from bridge.options import option_setting, option_words
from inference import Pdl1Error

app = typer.Typer(
    rich_markup_mode=None,
    help="Train models on phantom slides with truth, or on your own QuPath labels.",
    no_args_is_help=True,
)

_TRAINING_KEPT = "{out} holds a checkpoint of the last finished epoch; the same command with --resume goes on from it"
# How `pdl1 train` sets the trainers' settings, for the advice of their messages (the library's own name the configs'
# fields): --init is init_model, --val-entries and --val-fraction choose the validation_slides, --out is out_dir,
# --iterations is iterations_per_epoch, --lr-max sets lr_min too (a hundredth of it), and the command gives the
# config, every setting at once (an interrupted run is continued by the same command and labels); the slides and
# their µm/px come from the sources, and a few fields no option sets (a checkpoint of another version may differ
# there); the others are the fields' names with dashes (--patch-px, --resume).
_FIXED = "which pdl1 train sets itself"
_TRAIN_RENAMES = {
    "init_model": "--init",
    "validation_slides": "--val-entries or --val-fraction",
    "out_dir": "--out",
    "config": "command",
    "iterations_per_epoch": "--iterations",
    "lr_min": "the lowest learning rate (a hundredth of --lr-max)",
    "slides": "the slides trained on",
    "slide_mpp": "the slides' µm/px (a project's: QuPath's Pixel width/height)",
    "pseudo_model": "the pseudo-labelling model (--init)",
    "tile_size_px": f"the tile size, {_FIXED}",
    "weight_decay": f"the weight decay, {_FIXED}",
    "threshold": f"the threshold, {_FIXED}",
    "dilations": f"the dilations, {_FIXED}",
}
TRAIN_WORDS = option_words(**_TRAIN_RENAMES)
# Each command's own: the label options it reads the labels with (the library's label_rules), and seg's unlabeled
# slides, which --pseudo-label-rest adds to; nuclei's --class-map maps the labels' class_names, seg has none.
SEG_TRAIN_WORDS = option_words(
    **_TRAIN_RENAMES,
    unlabeled="the pseudo-labelled slides (--unlabeled, --pseudo-label-rest)",
    label_rules="label options (such as --from-review or --ihc-band-um)",
)
NUCLEI_TRAIN_WORDS = option_words(
    **_TRAIN_RENAMES,
    class_names="--class-map",
    label_rules="label options (such as --from-review, --class-map or --stain)",
)
# pseudo_label_slides' slides are `pdl1 train seg`'s --unlabeled.
_PSEUDO_WORDS = option_words(slides="--unlabeled")


def _kept_after_interrupt(out: Path) -> str:
    """What Ctrl-C left of a training run: a checkpoint to resume, or (stopped while the labels, pseudo-labels or
    first epoch were under way) nothing, which the same command starts again."""
    from inference import run_checkpoints

    if (out / "manifest.json").is_file():
        # Stopped after the model was written (while the held-out slides were scored or the report drawn): --resume
        # refuses a finished run, and the advice to use it left a complete model looking lost.
        scored = (out / "validation.json").is_file()
        return (
            f"{out}: the model is complete (its manifest.json was written before the stop); "
            + ("" if scored else "its held-out slides, if any, were not scored (no validation.json); ")
            + f"`pdl1 train report {out}` draws its training report from what is there"
        )
    if run_checkpoints(out):
        return _TRAINING_KEPT.format(out=out)
    return f"{out}: stopped before the first epoch finished, so there is no checkpoint to resume; the same command starts again"


def _lr_range(optimizer: str, lr_max: float | None) -> tuple[float, float]:
    """(peak, floor) of the cyclic schedule: ``--lr-max`` or the optimizer's default peak, and a
    hundredth of it (an unknown optimizer is refused by the training config)."""
    if lr_max is None:
        from inference import DEFAULT_LR_MAX

        lr_max = DEFAULT_LR_MAX.get(optimizer, DEFAULT_LR_MAX["adamw"])
    return lr_max, lr_max / 100


def _features(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError as err:
        raise typer.BadParameter(f"expected comma-separated widths like 8,16,32,64, got {text!r}") from err
    if len(values) < 2 or min(values) < 1:
        raise typer.BadParameter(f"need at least two positive widths, got {text!r}")
    return values


RESTART_LR_HELP = "Learning rate at each warm restart after the first cycle (0: as --lr-max)."
LR_MAX_HELP = "Learning rate at the start of the first cycle (default: 0.01 for sgd, as nnU-Net; 0.003 for adamw)."
_LABELS_HELP = "A QuPath GeoJSON export per slide, in the slides' order (your labels)."
_ENTRIES_HELP = "Project entries to train on (ID or image name; all)."
_FROM_REVIEW_HELP = (
    "Use what a person changed in pdl1 results as labels: regions and FN candidates reclassified PD-L1 positive / "
    "negative; in a project (against what was written: the run's pdl1/<entry ID>/objects.geojson and the records "
    "pdl1_analyze.groovy leaves in pdl1/<entry ID>/qupath_analyses, and those it set aside in its removed/ whose "
    "annotation the objects read hold) also reclassified nuclei, and deleted FN candidates as negative."
)
_QUPATH_HELP = "Read a project through QuPath: auto, always or never."
ValFraction = Annotated[
    float,
    typer.Option(
        **number_range(0, 0.9),
        help="Your labels: hold out this share of the labelled slides (whole slides, drawn with --seed; at least "
        "one) instead of naming them with --val-entries.",
    ),
]
_UNLABELED_HELP = (
    "Slides nobody labelled (files, or entries of the project trained on; repeatable): the --init ensemble "
    "(the shipped demo ensemble when training from scratch) pseudo-labels their confident tissue pixels."
)
_ANCHOR_HELP = (
    "Fine-tuning: add L2-SP, A/2 * sum((w - w_init)^2) over the --init model's weights, to the loss, so the "
    "weights move only as far as your labels pay for, against forgetting what they do not show (0: off; needs an "
    'initial model). Measured in the README, "Fine-tuning against forgetting".'
)
AnchorWeight = Annotated[float, typer.Option("--anchor-weight", **number_range(0), help=_ANCHOR_HELP)]
_FREEZE_BN_HELP = (
    "Fine-tuning: BatchNorm keeps the --init model's running statistics instead of taking those of your slides' "
    "patches, which the model would then apply to every slide (needs an initial model)."
)
FreezeBatchnorm = Annotated[bool, typer.Option("--freeze-batchnorm/--no-freeze-batchnorm", help=_FREEZE_BN_HELP)]
_DISTILL_HELP = (
    "Fine-tuning: Learning without Forgetting. The --init model's last member, frozen, runs on every training "
    "patch, and the model pays W * T^2 * KL(its softmax || the model's) at temperature T (--distill-temperature) "
    "on each pixel without a label of yours (the unlabelled rest of your labelled slides, --unlabeled slides; "
    "phantom truth labels every pixel), against forgetting what your labels do not show (0: off; needs an "
    'initial model). Measured in the README, "Fine-tuning against forgetting".'
)
_DISTILL_TEMPERATURE_HELP = "Fine-tuning with --distill-weight: the softmax temperature of the distillation."
FIRST_CYCLE_HELP = "Length of the first cycle in epochs (0: as --epochs-per-cycle); a long first cycle converges before members are kept."
EPOCHS_PER_CYCLE_HELP = "Length of each cycle in epochs (the first's too, unless --first-cycle-epochs)."
BATCH_SIZE_HELP = "Patches per iteration."
SEED_HELP = "Random seed of the initial weights, patch draws and augmentation (and of --val-fraction's draw)."


_SEARCH_DIR_HELP = (
    "A project's images (labelled, held out or --unlabeled entries): folder to search, with its subfolders, for "
    "images that are not where the project says (moved, or the project made on another machine); repeatable, as "
    "for pdl1 run."
)
SearchDir = Annotated[
    list[Path] | None, typer.Option("--search-dir", help=_SEARCH_DIR_HELP, exists=True, file_okay=False)
]


_RESUME_HELP = (
    "Continue the run interrupted in OUT from its checkpoint: give the command that started it plus --resume; "
    "other training options or labels are refused, naming what differs (--device, seg's --chains and nuclei's "
    "--tta, how the finished model runs, may change). Without a checkpoint, a new run."
)


@app.command("seg")
def train_seg(
    slides: Annotated[
        list[Path],
        typer.Argument(
            help="Phantom slides with truth beside them (pdl1 phantom); or a QuPath project (its labels); "
            "or slides with --labels."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Model folder to write (manifest + members).")],
    cycles: Annotated[int, typer.Option(min=1, help="Cosine cycles (warm restarts).")] = 5,
    epochs_per_cycle: Annotated[int, typer.Option(min=1, help=EPOCHS_PER_CYCLE_HELP)] = 4,
    first_cycle_epochs: Annotated[int, typer.Option(min=0, help=FIRST_CYCLE_HELP)] = 0,
    iterations: Annotated[int, typer.Option(min=1, help="Iterations per epoch.")] = 40,
    members_per_cycle: Annotated[int, typer.Option(min=1, help="Members from the low-LR end of each cycle.")] = 1,
    drop_first_cycle: Annotated[bool, typer.Option(help="Leave out the first cycle's members.")] = True,
    optimizer: Annotated[str, typer.Option(help="adamw, or sgd (Nesterov momentum 0.99, as nnU-Net).")] = "adamw",
    lr_max: Annotated[float | None, typer.Option(**number_range(0), help=LR_MAX_HELP, show_default=False)] = None,
    restart_lr: Annotated[float, typer.Option(**number_range(0), help=RESTART_LR_HELP)] = 0.0,
    batch_size: Annotated[int, typer.Option(min=1, help=BATCH_SIZE_HELP)] = 16,
    patch_px: Annotated[int, typer.Option(min=16, help="Training patch edge in model px.")] = 128,
    positive_fraction: Annotated[
        float, typer.Option(**number_range(0, 1), help="Share of patches centred on positive pixels (class balance).")
    ] = 0.5,
    features: Annotated[str, typer.Option(help="U-Net stage widths.")] = "8,16,32,64",
    input_mpp: Annotated[float, typer.Option(**number_range(0.1), help="Model input resolution, µm/px.")] = 2.0,
    stain_jitter: Annotated[
        str,
        typer.Option(help="Colour augmentation: light (HED scale) or strong (also stain vectors and a colour cast)."),
    ] = "light",
    loss: Annotated[
        str, typer.Option(help="ce+dice (nnU-Net's compound loss) or ce (cross-entropy alone, calibrated).")
    ] = "ce+dice",
    seed: Annotated[int, typer.Option(min=0, help=SEED_HELP)] = 0,
    chains: Annotated[
        int,
        typer.Option(
            min=1,
            help="Independent cyclic runs pooled into one ensemble; chain k is seeded SEED+k and written to "
            "OUT/chain_k. Time grows with the number of chains.",
        ),
    ] = 1,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.", callback=check_training_device)] = "cpu",
    resume: Annotated[bool, typer.Option(help=_RESUME_HELP)] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    labels: Annotated[list[Path] | None, typer.Option("--labels", help=_LABELS_HELP)] = None,
    entries: Annotated[list[str] | None, typer.Option("--entries", help=_ENTRIES_HELP)] = None,
    from_review: Annotated[bool, typer.Option(help=_FROM_REVIEW_HELP)] = False,
    init: Annotated[
        str | None,
        typer.Option(
            help="Model folder whose last member every chain starts from, or 'none'. Default: the shipped demo "
            "segmentation ensemble for your labels when the architecture matches; from scratch for phantoms.",
            show_default=False,
        ),
    ] = None,
    qupath: Annotated[str, typer.Option(help=_QUPATH_HELP)] = "auto",
    search_dir: SearchDir = None,
    val_entries: Annotated[
        list[str] | None,
        typer.Option(
            "--val-entries",
            help="Your labels: slides held out whole (entry ID, image name or file name), scored after training "
            "(Dice over their labelled pixels, the ensemble's and each member's; OUT/validation.json).",
        ),
    ] = None,
    val_fraction: ValFraction = 0.0,
    recalibrate: Annotated[
        bool,
        typer.Option(
            help="With held-out slides: set the segmentation threshold to the one with the best Dice on their "
            "labelled pixels (kept unless it gains at least 0.005; both printed).",
        ),
    ] = True,
    ihc_band_um: Annotated[
        float | None,
        typer.Option(
            **number_range(0),
            help="Train on a paired IHC's registered positive area (pdl1/pairs/<H&E>.ihc_positive.geojson as "
            "--labels): the whole H&E is labelled, a band this wide around the area's edge ignored.",
            show_default=False,
        ),
    ] = None,
    unlabeled: Annotated[list[str] | None, typer.Option("--unlabeled", help=_UNLABELED_HELP)] = None,
    pseudo_margin: Annotated[
        float,
        typer.Option(
            **number_range(0.001, 0.499),
            help="Pseudo-labels: positive where the ensemble's mean probability is >= 1 - this, negative where <= this.",
        ),
    ] = 0.1,
    pseudo_mi_limit: Annotated[
        float,
        typer.Option(
            **number_range(0.0001),
            help="Pseudo-labels: only where the members' mutual information (nats) is below this.",
        ),
    ] = 0.05,
    pseudo_weight: Annotated[
        float,
        typer.Option(**number_range(0.01, 1.0), help="Loss weight of a pseudo-labelled pixel (a label weighs 1)."),
    ] = 0.3,
    pseudo_label_rest: Annotated[
        bool,
        typer.Option(
            help="Your labels: also pseudo-label the unlabelled rest of each labelled training slide (the labels "
            "win; the teacher and rule as for --unlabeled). For labels that cover little of a slide, such as "
            "reviewed results (--from-review).",
        ),
    ] = False,
    anchor_weight: AnchorWeight = 0.0,
    freeze_batchnorm: FreezeBatchnorm = False,
    distill_weight: Annotated[float, typer.Option("--distill-weight", **number_range(0), help=_DISTILL_HELP)] = 0.0,
    distill_temperature: Annotated[
        float, typer.Option("--distill-temperature", **number_range(0.01), help=_DISTILL_TEMPERATURE_HELP)
    ] = 2.0,  # inference.training.distill.DEFAULT_TEMPERATURE (not imported: torch is not needed to parse options)
) -> None:
    """Train a segmentation ensemble the nnUNet-B way (cyclic LR, members at the low ends).

    On phantom truth, or on your own region labels (a QuPath project, or --labels GeoJSON per slide):
    see the README, "Train on your own slides".
    """
    from inference import SegTrainConfig, check_training_slides, train_segmentation

    lr_peak, lr_floor = _lr_range(optimizer, lr_max)
    _check_before_reading(out, resume=resume, cycles=cycles, drop_first_cycle=drop_first_cycle)
    try:
        project = slides[0] if len(slides) == 1 and _is_project(slides[0]) else None
        if project is not None and unlabeled and not entries:
            entries = _entries_except(project, unlabeled)  # the project's other entries are the labelled ones
        slide_labels = _read_labels(
            slides,
            geojson=labels or [],
            entries=[*entries, *(val_entries or [])] if entries else [],
            from_review=from_review,
            class_map=[],
            qupath=qupath,
            search_dirs=tuple(search_dir or ()),
            points=False,
            ihc_band_um=ihc_band_um,
        )
        slide_labels, held_out = _split_held_out(slide_labels, val_entries or [], val_fraction, seed=seed, points=False)
        _echo_counts(slide_labels, held_out=held_out, regions=True)
        init_model = None if init in (None, "none") else init
        run_arch = (_features(features), input_mpp)
        if init is None and slide_labels and run_arch == _DEMO_SEG_ARCH:
            from inference import demo_model_dir

            init_model = str(demo_model_dir("seg"))
        if slide_labels:
            typer.echo(
                starting_point(
                    init,
                    init_model,
                    demo=_seg_arch_words(_DEMO_SEG_ARCH),
                    run=_seg_arch_words(run_arch),
                    options="--features and --input-mpp",
                    resuming=_resuming(out, resume=resume),
                )
            )
        _check_fine_tuning(anchor_weight, freeze_batchnorm, init_model, distill_weight=distill_weight)
        if pseudo_label_rest and not slide_labels:
            raise typer.BadParameter(
                "--pseudo-label-rest fills the rest of your labelled slides; phantom truth has none"
            )
        if unlabeled or pseudo_label_rest:
            # Training checks its slides before reading any, but pseudo-labelling segments slides before it.
            check_training_slides(
                [lab.slide for lab in [*slide_labels, *held_out]] if slide_labels else [str(s) for s in slides],
                task="seg",
                input_mpp=input_mpp,
                slide_mpp=_slide_mpp([*slide_labels, *held_out]),
                phantoms=not slide_labels,
            )
        pseudo, teacher = _pseudo_labels(
            unlabeled or [],
            rest=slide_labels if pseudo_label_rest else [],
            project=project,
            search_dirs=tuple(search_dir or ()),
            labelled=[lab.slide for lab in slide_labels] if slide_labels else [str(s) for s in slides],
            held_out=[lab.slide for lab in held_out],
            init_model=init_model,
            margin=pseudo_margin,
            mi_limit=pseudo_mi_limit,
            weight=pseudo_weight,
            input_mpp=input_mpp,
            device=device,
            progress=progress,
        )
        config = SegTrainConfig(
            slides=tuple(lab.slide for lab in slide_labels) if slide_labels else tuple(str(s) for s in slides),
            init_model=init_model,
            out_dir=str(out),
            cycles=cycles,
            epochs_per_cycle=epochs_per_cycle,
            first_cycle_epochs=first_cycle_epochs,
            iterations_per_epoch=iterations,
            members_per_cycle=members_per_cycle,
            drop_first_cycle=drop_first_cycle,
            optimizer=optimizer,
            lr_max=lr_peak,
            restart_lr=restart_lr,
            lr_min=lr_floor,
            batch_size=batch_size,
            patch_px=patch_px,
            positive_fraction=positive_fraction,
            features=_features(features),
            input_mpp=input_mpp,
            stain_jitter=stain_jitter,
            loss=loss,
            seed=seed,
            chains=chains,
            device=device,
            unlabeled=tuple(p.slide for p in pseudo),
            pseudo_model=teacher,
            pseudo_margin=pseudo_margin,
            pseudo_mi_limit=pseudo_mi_limit,
            pseudo_weight=pseudo_weight,
            validation_slides=tuple(lab.slide for lab in held_out),
            slide_mpp=_slide_mpp([*slide_labels, *held_out]),
            anchor_weight=anchor_weight,
            freeze_batchnorm=freeze_batchnorm,
            distill_weight=distill_weight,
            distill_temperature=distill_temperature,
        )
        manifest, validation, fit, report = _train_and_validate(
            train_segmentation,
            config,
            task="segmentation",
            labels=slide_labels,
            held_out=held_out,
            recalibrate=recalibrate,
            resume=resume,
            progress=progress,
            pseudo=pseudo,
        )
    except (Pdl1Error, ValueError, OSError) as err:
        raise fail(err) from err
    except KeyboardInterrupt:
        raise interrupted(_kept_after_interrupt(out)) from None
    _echo_trained(
        out,
        manifest,
        [
            f"validation {row['slide']}: {row['labelled_px']} labelled px, {row['positive_px']} positive, "
            f"{row['predicted_px']} predicted positive, Dice {_fmt(row['dice'])}{_members_text(row, 'dice_members')}"
            for row in validation
        ],
        fit,
        report,
    )


def _entries_except(project: Path, unlabeled: list[str]) -> list[str]:
    """IDs of the project's entries that ``--unlabeled`` does not name."""
    from bridge.project import read_project

    named = set(unlabeled)
    return [e.entry_id for e in read_project(project).entries if not {e.entry_id, e.image_name} & named]


def _pseudo_labels(
    unlabeled: list[str],
    *,
    rest: list,
    project: Path | None,
    search_dirs: tuple[Path, ...] = (),
    labelled: list[str],
    held_out: list[str],
    init_model: str | None,
    margin: float,
    mi_limit: float,
    weight: float,
    input_mpp: float,
    device: str,
    progress: bool,
) -> tuple[list, str | None]:
    """(pseudo-labels of the --unlabeled slides and of the ``rest`` of labelled ones (their SlideLabels), the
    teacher model folder); each slide's counts printed."""
    if not unlabeled and not rest:
        return [], None
    from bridge.labels import unlabeled_slides
    from bridge.progress import progress_bar
    from inference import PseudoLabelRule, UnlabeledSlide, demo_model_dir, pseudo_label_slides

    items = unlabeled_slides(unlabeled, project=project, labelled=[*labelled, *held_out], search_dirs=search_dirs)
    # A labelled slide is read at the µm/px its labels are trained at (its project's, else its file's own).
    rest_items = [
        UnlabeledSlide(path=lab.slide, mpp=lab.mpp, name=f"{lab.slide} (the rest of its labels)") for lab in rest
    ]
    items += rest_items

    def leave_out(item: UnlabeledSlide) -> str:
        """How a slide is left out of the pseudo-labels: --pseudo-label-rest added the labelled ones, never given
        with --unlabeled."""
        if item in rest_items:
            return "leave out --pseudo-label-rest (or the slide and its labels)"
        return "leave it out of --unlabeled"

    teacher = init_model or str(demo_model_dir("seg"))
    rule = PseudoLabelRule(margin=margin, mi_limit=mi_limit, weight=weight)
    with progress_bar("pseudo-labels", enabled=progress) as on_progress:
        pseudo = pseudo_label_slides(
            teacher,
            items,
            rule=rule,
            input_mpp=input_mpp,
            device=device,
            on_progress=on_progress,
            mpp_advice=_pseudo_mpp_advice,
            setting=_PSEUDO_WORDS,
            leave_out=leave_out,
        )
    typer.echo(
        f"pseudo-labels by {teacher}: mean probability >= {1 - margin:g} positive, <= {margin:g} negative, "
        f"mutual information < {mi_limit:g}, weight {weight:g} (px at {pseudo[0].counts_mpp:g} µm/px)"
    )
    for p in pseudo:
        c = p.counts
        typer.echo(
            # The share shows glass taken for tissue, which would become negative pseudo-labels.
            f"{p.slide.label}: {c.tissue_px} tissue px ({c.tissue_px / max(c.target.size, 1):.0%} of the image), "
            f"used {c.positive_px} positive and {c.negative_px} negative; "
            f"left out {c.left_out_px} not confident ({c.uncertain_px} between the margins, {c.disagreement_px} "
            "with the members disagreeing)"
        )
    return pseudo, teacher


def _pseudo_mpp_advice(value: str) -> str:
    """What to do about an unlabelled slide that states no pixel size, in its file or (an entry) in its project:
    `pdl1 train seg` has no --mpp (the analysis' advice, "with --mpp", sent users to an option it lacks)."""
    return (
        f"pseudo-labels need the pixel size: set it in QuPath (Image tab: Pixel width/height) to {value}, save "
        "the project and give the slide as an entry of the project trained on (a slide file has only its own "
        "pixel size), or leave it out of --unlabeled"
    )


def _training_mpp_advice(value: str) -> str:
    """What to do about a project's labelled image that states no pixel size, in its file or in the project:
    training reads QuPath's calibration as `pdl1 run` does, and has no --mpp (the analysis' advice, "with --mpp",
    sent users to an option it lacks)."""
    return (
        "nor does the QuPath project, whose pixel size training reads as `pdl1 run` does: set it in QuPath "
        f"(Image tab: Pixel width/height) to {value} and save the project, or leave the entry out (--entries)"
    )


def _slide_mpp_advice(value: str) -> str:
    """What to do about a slide given with --labels that states no pixel size: only its file can state one (a
    GeoJSON export carries no calibration, and `pdl1 train` has no --mpp)."""
    return (
        "a slide given with --labels is read at its file's own pixel size (a GeoJSON export carries no QuPath "
        "calibration): save the image as a TIFF whose resolution tags state "
        f"{value} ({TIFF_WITH_RESOLUTION}); "
        "or train from its QuPath project, with the pixel size set there (Image tab: Pixel width/height); "
        "or leave it out"
    )


def _slide_mpp(labels: Sequence) -> dict[str, float]:
    """The µm/px the labels' project states, by slide (training's ``slide_mpp``); slides read at their file's own
    are not in it."""
    return {lab.slide: lab.mpp for lab in labels if lab.mpp is not None}


def _is_project(path: Path) -> bool:
    return path.suffix == ".qpproj" or (path.is_dir() and (path / "project.qpproj").is_file())


# The shipped demo models' architectures: --init defaults to the demo when the run's matches.
_DEMO_NUCLEI_ARCH = {"width": 32, "dilations": (1, 2, 4, 8), "input_mpp": 1.0}
_DEMO_SEG_ARCH = ((8, 16, 32, 64), 2.0)


def _seg_arch_words(arch: tuple[tuple[int, ...], float]) -> str:
    return f"features {','.join(map(str, arch[0]))} at {arch[1]:g} µm/px"


def _nuclei_arch_words(width: int, input_mpp: float) -> str:
    return f"width {width} at {input_mpp:g} µm/px"


def _resuming(out: Path, *, resume: bool) -> Path | None:
    """``out`` where ``--resume`` continues a run from its checkpoint there, else None (a new run)."""
    from inference import run_checkpoints

    return out if resume and run_checkpoints(out) else None


def starting_point(
    init: str | None, init_model: str | None, *, demo: str, run: str, options: str, resuming: Path | None = None
) -> str:
    """The line a run on a lab's labels prints on the weights it starts from: ``init_model`` (``--init``, or the
    shipped demo model it defaults to), or none; or the checkpoint of the interrupted run in ``resuming`` that
    ``--resume`` continues. Where ``--init`` was left out and the run's architecture (``run``, set by ``options``)
    is not the demo's (``demo``), training went from scratch without a word.

    >>> print(starting_point(None, None, demo="width 32 at 1 µm/px", run="width 16 at 1 µm/px", options="--width"))
    starting from scratch: the shipped demo model is width 32 at 1 µm/px, this run width 16 at 1 µm/px; to fine-tune it, train at its architecture (the defaults of --width), or give --init MODEL of this run's
    """
    if resuming is not None:
        return f"continuing the interrupted run in {resuming} from its checkpoint (it started from {init_model or 'scratch'})"
    if init_model is not None:
        return f"starting from {init_model} (its last member; --init none trains from scratch)"
    if init is None:
        return (
            f"starting from scratch: the shipped demo model is {demo}, this run {run}; to fine-tune it, train at its "
            f"architecture (the defaults of {options}), or give --init MODEL of this run's"
        )
    return "starting from scratch (--init none)"


def _read_labels(
    sources: list[Path],
    *,
    geojson: list[Path],
    entries: list[str],
    from_review: bool,
    class_map: list[str],
    qupath: str,
    points: bool,
    ihc_band_um: float | None = None,
    search_dirs: tuple[Path, ...] = (),
    stain: str | None = None,
) -> list:
    """The SlideLabels of a project, or of slides each with its GeoJSON (in order); [] for phantom slides.

    ``points``: a nuclei run (the nuclei classes of ``stain``: H&E, or H-DAB for the PD-L1 IHC nuclei model); else
    a segmentation run, which reads the areas only (H&E). ``stain``: --stain's (``pdl1 train nuclei``); None for a
    command without it, whose labels are H&E's.
    A project's labels carry the pixel size QuPath states for each entry (it replaces the file's own, as in
    `pdl1 run`); a slide with its GeoJSON has only its file's. A slide that states none either way is refused
    here, before anything is trained, saying how to give one; so is one image file that two entries set to
    different pixel sizes (:func:`bridge.labels.refuse_files_calibrated_twice`).
    """
    from bridge.labels import (
        LabelRules,
        parse_class_map,
        read_geojson_labels,
        read_project_labels,
        refuse_files_calibrated_twice,
        warn_unless_stain,
    )
    from inference import IHC_NUCLEUS_CLASSES, NUCLEUS_CLASSES, open_slide

    if qupath not in ("auto", "always", "never"):
        raise typer.BadParameter(f"expected auto, always or never, got {qupath!r}", param_hint="--qupath")
    classes = IHC_NUCLEUS_CLASSES if stain == "H-DAB" else NUCLEUS_CLASSES
    rules = LabelRules(
        class_names=tuple(classes) if points else (),
        class_map=parse_class_map(class_map),
        from_review=from_review,
        points=points,
        ihc_band_um=ihc_band_um,
        stain=stain or "H&E",
        stain_option="" if stain is None else "--stain",
    )
    projects = [s for s in sources if _is_project(s)]
    if projects:
        if len(projects) > 1:
            raise typer.BadParameter(
                f"{len(projects)} projects given ({', '.join(map(str, projects))}); training reads one project per "
                "run: give one (add the other's images to it in QuPath), or give slide files with --labels"
            )
        if len(sources) != 1 or geojson:
            what = "--labels" if geojson else "slide files"
            raise typer.BadParameter(
                f"give one QuPath project alone (its entries are the slides, their objects the labels), not with "
                f"{what}; for slides with --labels, give the slide files and no project"
            )
        # Each entry at the pixel size its project states, else its file's (as `pdl1 run`); one stating none
        # either way is refused as its labels are read, with what training can read. Training (and validation)
        # reads a file at one pixel size (slide_mpp, by path): two entries of one file set to two are refused
        # here, naming them, before anything is held out or trained.
        labels = read_project_labels(
            projects[0],
            rules=rules,
            entries=tuple(entries),
            qupath=qupath,
            search_dirs=search_dirs,
            mpp_advice=_training_mpp_advice,
        )
        refuse_files_calibrated_twice(labels)
        return labels
    if entries:
        raise typer.BadParameter("--entries chooses entries of a QuPath project; the sources are slides")
    if not geojson:
        # Only the options given are named: seg has no --class-map, nuclei no --ihc-band-um.
        given = [
            option
            for option, value in (
                ("--from-review", from_review),
                ("--class-map", class_map),
                ("--ihc-band-um", ihc_band_um is not None),
            )
            if value
        ]
        if given:
            raise typer.BadParameter(
                f"{' and '.join(given)} {'applies' if len(given) == 1 else 'apply'} to QuPath labels (a project or "
                "--labels), not to phantom truth"
            )
        _check_phantom_sources(sources)
        return []
    if len(geojson) != len(sources):
        raise typer.BadParameter(
            f"--labels gives one GeoJSON per slide, in the slides' order: got {len(geojson)} for {len(sources)} slides"
        )
    out = []
    for slide_path, labels_path in zip(sources, geojson, strict=True):
        with open_slide(slide_path, mpp_advice=_slide_mpp_advice) as slide:
            size, mpp = tuple(slide.dimensions), slide.mpp.mean
            warn_unless_stain(slide, str(slide_path), rules)
        out.append(read_geojson_labels(labels_path, slide=slide_path, image_size_px=size, rules=rules, mpp=mpp))
    return out


def _check_phantom_sources(sources: list[Path]) -> None:
    """Sources that are neither a project nor slides with --labels are phantom slides: a folder or a path that is
    not there is refused here, saying what training takes. The phantom reader's own words ("no such slide; give
    phantom slides") misled whoever mistyped their project's folder or gave the folder the project is in."""
    from bridge.project import ProjectError, find_project_file
    from inference import truth_dir_for

    for source in sources:
        if source.is_dir():
            find_project_file(source)  # no project.qpproj here: raises, naming a project below it or the slides in it
        elif not source.exists():
            raise ProjectError(
                f"{source}: no such file or folder; training takes a QuPath project (its folder or project.qpproj), "
                "slide files with --labels (a QuPath GeoJSON export each), or phantom slides with their truth beside "
                "them (pdl1 phantom)"
            )
        elif not (truth_dir_for(source) / "truth.json").is_file():
            # A lab's slide given without its labels was told "this command takes phantom slides", as if training
            # took nothing else.
            raise ProjectError(
                f"{source}: no labels given and no phantom truth beside it ({truth_dir_for(source) / 'truth.json'}); "
                "to train on your labels, give the slide's QuPath GeoJSON export with --labels (one per slide, in the "
                "slides' order), or give its QuPath project instead of the slide"
            )


# Region labels this one-sided (positive share of the labelled area, or negative share) make a fine-tuned
# model call most tissue that class: reviewed FN candidates alone were 90 % positive and the model then
# called 60 % of truly negative tissue positive (README, "The review loop, measured").
ONE_SIDED_LABELS = 0.9


def one_class_points_warning(slide_labels: Sequence) -> str | None:
    """A warning when every nucleus point of the training slides' labels (``SlideLabels``) is of one class of a
    model of several, else None: the model then learns to give every nucleus that class, as the segmentation
    learns one side from labels 90 % one class. A lopsided share of classes is a slide's truth (TPS near 0 or
    100 %) and no warning."""
    found: Counter[int] = Counter()
    for lab in slide_labels:
        found.update(int(c) for c in lab.points_class)
    names = next((lab.class_names for lab in slide_labels if len(lab.class_names)), ())
    if len(found) != 1 or len(names) < 2:
        return None
    ((only, n),) = found.items()
    others = ", ".join(c for i, c in enumerate(names) if i != only)
    return (
        f"warning: all {n} nucleus point{'s' if n != 1 else ''} are {names[only]}: a model trained on them is taught "
        f"that every nucleus is {names[only]}. Mark nuclei of the other classes too ({others})"
    )


def _echo_counts(slide_labels: list, *, held_out: Sequence = (), regions: bool = False) -> None:
    """What each label source gave, the held-out slides' too: nothing is trained or scored on silently dropped
    data. For a segmentation run (``regions``), a warning when the labelled area is almost all one class."""
    from bridge.labels import (
        DOUBTFUL_IHC_COUNT,
        UNREAD_TARGETS_COUNT,
        UNREAD_TARGETS_FIX,
        UNRECORDED_ANNOTATIONS_COUNT,
        UNRECORDED_ANNOTATIONS_WARNING,
        UNRECORDED_NUCLEI_COUNT,
        UNRECORDED_NUCLEI_FIX,
    )
    from inference import label_statistics

    for lab in slide_labels:
        used = ", ".join(f"{k} {v}" for k, v in lab.counts.items())
        typer.echo(f"{lab.source or lab.slide}: {used}")
    for lab in held_out:
        used = ", ".join(f"{k} {v}" for k, v in lab.counts.items())
        typer.echo(f"{lab.source or lab.slide} (held out, scored after training): {used}")
    doubtful = [str(lab.source or lab.slide) for lab in slide_labels if lab.counts.get(DOUBTFUL_IHC_COUNT)]
    if doubtful:
        typer.echo(
            f"warning: the paired IHC behind the labels of {', '.join(doubtful)} was flagged for review in its run "
            "(pdl1/pairs.json says why): its registered positive area may be wrong; check the IHC in QuPath, or "
            "leave that slide out",
            err=True,
        )
    unread = [
        str(lab.source or lab.slide) for lab in (*slide_labels, *held_out) if lab.counts.get(UNREAD_TARGETS_COUNT)
    ]
    if unread:
        typer.echo(
            f"warning: {', '.join(unread)}: the FN candidates deleted and nuclei reclassified in targets other than the "
            "first are no labels: the last run kept the first target's output only (an earlier version); "
            f"{UNREAD_TARGETS_FIX}",
            err=True,
        )
    labels = (*slide_labels, *held_out)
    warn_of_count(
        labels,
        UNRECORDED_NUCLEI_COUNT,
        "nuclei pdl1-bridge wrote that no record of an analysis holds (analysed by an earlier pdl1_analyze.groovy, or "
        "the record deleted): whether a person reclassified them cannot be told, so they are no labels; "
        f"{UNRECORDED_NUCLEI_FIX}",
    )
    warn_of_count(labels, UNRECORDED_ANNOTATIONS_COUNT, UNRECORDED_ANNOTATIONS_WARNING)
    if not regions:
        one_class = one_class_points_warning(slide_labels)
        if one_class is not None:
            typer.echo(one_class, err=True)
        return
    if not slide_labels:
        return
    stats = [label_statistics(lab) for lab in slide_labels]
    positive, negative = sum(s.positive_px2 for s in stats), sum(s.negative_px2 for s in stats)
    if positive + negative <= 0:
        return
    no_positive = [lab.source or lab.slide for lab, st in zip(slide_labels, stats, strict=True) if st.positive_px2 <= 0]
    if no_positive and len(no_positive) < len(slide_labels):
        # In the sparse-label benchmark random regions let held-out slides collapse on 4 of 10 seeds, one region
        # per slide on positive tissue on none of 7 (README, "Sparse against full labels").
        typer.echo(
            f"note: the labels of {len(no_positive)} of {len(slide_labels)} slides hold no PD-L1 positive area "
            f"({', '.join(str(n) for n in no_positive)}): where such a slide has positive tissue, put one "
            "Training region on it",
            err=True,
        )
    share = positive / (positive + negative)
    side = "positive" if share >= 0.5 else "negative"
    if max(share, 1 - share) >= ONE_SIDED_LABELS:
        typer.echo(
            f"warning: {max(share, 1 - share):.0%} of the labelled area is {side}: a model trained on it learns to "
            f"call most tissue {side}. Label the other class too (PD-L1 {'negative' if side == 'positive' else 'positive'} "
            "areas, or Training regions around ordinary tissue), add --unlabeled slides of the same kind, or "
            "--pseudo-label-rest to pseudo-label the rest of these slides",
            err=True,
        )


@app.command("nuclei")
def train_nuclei_cmd(
    slides: Annotated[
        list[Path],
        typer.Argument(
            help="Phantom slides with truth beside them (pdl1 phantom); or a QuPath project (its labels); "
            "or slides with --labels."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Model folder to write (manifest + members).")],
    cycles: Annotated[int, typer.Option(min=1, help="Cosine cycles (warm restarts).")] = 3,
    epochs_per_cycle: Annotated[int, typer.Option(min=1, help=EPOCHS_PER_CYCLE_HELP)] = 3,
    first_cycle_epochs: Annotated[int, typer.Option(min=0, help=FIRST_CYCLE_HELP)] = 0,
    iterations: Annotated[int, typer.Option(min=1, help="Iterations per epoch.")] = 40,
    members_per_cycle: Annotated[int, typer.Option(min=1, help="Members from the low-LR end of each cycle.")] = 1,
    drop_first_cycle: Annotated[bool, typer.Option(help="Leave out the first cycle's members.")] = True,
    optimizer: Annotated[str, typer.Option(help="adamw or sgd.")] = "adamw",
    lr_max: Annotated[float | None, typer.Option(**number_range(0), help=LR_MAX_HELP, show_default=False)] = None,
    restart_lr: Annotated[float, typer.Option(**number_range(0), help=RESTART_LR_HELP)] = 0.0,
    batch_size: Annotated[int, typer.Option(min=1, help=BATCH_SIZE_HELP)] = 12,
    patch_px: Annotated[int, typer.Option(min=16, help="Training patch edge in model px (even).")] = 96,
    width: Annotated[int, typer.Option(min=4, help="Backbone channels.")] = 32,
    sigma_um: Annotated[float, typer.Option(**number_range(0.1), help="Gaussian target sigma, µm.")] = 1.5,
    input_mpp: Annotated[float, typer.Option(**number_range(0.1), help="Model input resolution, µm/px.")] = 1.0,
    stain_jitter: Annotated[
        str,
        typer.Option(help="Colour augmentation: light (HED scale) or strong (also stain vectors and a colour cast)."),
    ] = "light",
    haematoxylin_turn_deg: Annotated[
        float,
        typer.Option(
            **number_range(0, 90),
            help="Colour augmentation: also turn the haematoxylin's optical-density vector by up to this many "
            "degrees, the other stain left as it is (0: never).",
        ),
    ] = 0.0,
    seed: Annotated[int, typer.Option(min=0, help=SEED_HELP)] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.", callback=check_training_device)] = "cpu",
    resume: Annotated[bool, typer.Option(help=_RESUME_HELP)] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    labels: Annotated[list[Path] | None, typer.Option("--labels", help=_LABELS_HELP)] = None,
    entries: Annotated[list[str] | None, typer.Option("--entries", help=_ENTRIES_HELP)] = None,
    from_review: Annotated[bool, typer.Option(help=_FROM_REVIEW_HELP)] = False,
    class_map: Annotated[
        list[str] | None,
        typer.Option(help="LABEL=MODEL: train points of class LABEL as the model's class MODEL ('LABEL=': leave out)."),
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(
            help="Model folder to fine-tune from (its last member), or 'none'. Default: the shipped demo nuclei "
            "model for your labels when the architecture matches; from scratch for phantoms.",
            show_default=False,
        ),
    ] = None,
    known_radius_um: Annotated[
        float,
        typer.Option(**number_range(0.5), help="Your labels: pixels this near a marked point have a known target."),
    ] = 6.0,
    qupath: Annotated[str, typer.Option(help=_QUPATH_HELP)] = "auto",
    search_dir: SearchDir = None,
    val_entries: Annotated[
        list[str] | None,
        typer.Option(
            "--val-entries",
            help="Your labels: slides held out whole (entry ID, image name or file name), scored after training "
            "(detection F1 within 3 µm in their 'all nuclei marked' regions; OUT/validation.json).",
        ),
    ] = None,
    val_fraction: ValFraction = 0.0,
    recalibrate: Annotated[
        bool,
        typer.Option(
            help="With held-out slides: set the peak threshold to the one with the best F1 on their marked nuclei "
            "(kept unless it gains at least 0.005; both printed).",
        ),
    ] = True,
    tta: Annotated[
        bool,
        typer.Option(
            help="The model runs with test-time augmentation (heatmaps averaged over the 8 flips and 90° "
            "rotations of each tile: 8x the compute), recorded in its manifest; validation and --recalibrate "
            "measure it so. On the real tile of the README it added 0.03 F1.",
        ),
    ] = False,
    anchor_weight: AnchorWeight = 0.0,
    freeze_batchnorm: FreezeBatchnorm = False,
    stain: Annotated[
        str,
        typer.Option(
            help="Your labels: the stain of the slides they mark, he (the H&E nuclei model) or ihc (points on "
            "PD-L1 IHC slides, the IHC nuclei model and its classes). A project's entry QuPath types as the other "
            "stain is refused. Phantom truth states its own stain.",
        ),
    ] = "he",
) -> None:
    """Train the point-based nuclei classifier from truth points, on the stain of the slides given.

    H&E phantoms: Tumor: Positive / Tumor: Negative / Other. PD-L1 IHC phantoms (pdl1 phantom --ihc): also
    Immune cells: PD-L1 positive / negative, and the 2+/3+ membrane DAB limits calibrated on the truth.
    Your own labels (a QuPath project, or --labels GeoJSON per slide): the classes of --stain (H&E by default;
    ihc: the IHC classes, from the shipped IHC model, keeping its 1+/2+/3+ limits); points of other classes
    need --class-map; see the README, "Train on your own slides".
    """
    from inference import NucleiTrainConfig, train_nuclei

    lr_peak, lr_floor = _lr_range(optimizer, lr_max)
    stain_name = stain_option(stain)
    _check_before_reading(out, resume=resume, cycles=cycles, drop_first_cycle=drop_first_cycle)
    try:
        slide_labels = _read_labels(
            slides,
            geojson=labels or [],
            entries=[*entries, *(val_entries or [])] if entries else [],
            from_review=from_review,
            class_map=class_map or [],
            qupath=qupath,
            search_dirs=tuple(search_dir or ()),
            points=True,
            stain=stain_name,
        )
        if stain_name != "H&E" and not slide_labels:
            raise typer.BadParameter(
                "--stain chooses the stain of your labels; phantom truth states its own (pdl1 phantom --ihc)",
                param_hint="--stain",
            )
        slide_labels, held_out = _split_held_out(slide_labels, val_entries or [], val_fraction, seed=seed, points=True)
        init_model = None if init in (None, "none") else init
        if init is None and slide_labels:
            arch = {"width": width, "dilations": (1, 2, 4, 8), "input_mpp": input_mpp}
            if arch == _DEMO_NUCLEI_ARCH:
                from inference import demo_model_dir

                init_model = str(demo_model_dir("nuclei-ihc" if stain_name == "H-DAB" else "nuclei"))
        _check_fine_tuning(anchor_weight, freeze_batchnorm, init_model)
        _echo_counts(slide_labels, held_out=held_out)
        if slide_labels:
            typer.echo(
                starting_point(
                    init,
                    init_model,
                    demo=_nuclei_arch_words(_DEMO_NUCLEI_ARCH["width"], _DEMO_NUCLEI_ARCH["input_mpp"]),
                    run=_nuclei_arch_words(width, input_mpp),
                    options="--width and --input-mpp",
                    resuming=_resuming(out, resume=resume),
                )
            )
        sources = [lab.slide for lab in slide_labels] if slide_labels else [str(s) for s in slides]
        config = NucleiTrainConfig(
            slides=tuple(sources),
            init_model=init_model,
            known_radius_um=known_radius_um,
            out_dir=str(out),
            cycles=cycles,
            epochs_per_cycle=epochs_per_cycle,
            first_cycle_epochs=first_cycle_epochs,
            iterations_per_epoch=iterations,
            members_per_cycle=members_per_cycle,
            drop_first_cycle=drop_first_cycle,
            optimizer=optimizer,
            lr_max=lr_peak,
            restart_lr=restart_lr,
            lr_min=lr_floor,
            batch_size=batch_size,
            patch_px=patch_px,
            width=width,
            sigma_um=sigma_um,
            input_mpp=input_mpp,
            stain_jitter=stain_jitter,
            haematoxylin_turn_deg=haematoxylin_turn_deg,
            seed=seed,
            device=device,
            validation_slides=tuple(lab.slide for lab in held_out),
            slide_mpp=_slide_mpp([*slide_labels, *held_out]),
            tta=tta,
            anchor_weight=anchor_weight,
            freeze_batchnorm=freeze_batchnorm,
        )
        manifest, validation, fit, report = _train_and_validate(
            train_nuclei,
            config,
            task="nuclei",
            labels=slide_labels,
            held_out=held_out,
            recalibrate=recalibrate,
            resume=resume,
            progress=progress,
        )
    except (Pdl1Error, ValueError, OSError) as err:
        raise fail(err) from err
    except KeyboardInterrupt:
        raise interrupted(_kept_after_interrupt(out)) from None
    _echo_trained(
        out,
        manifest,
        [
            f"validation {row['slide']}: {row['n_labelled']} marked nuclei, {row['n_predicted']} found, "
            f"precision {_fmt(row['precision'])}, recall {_fmt(row['recall'])}, F1 {_fmt(row['f1'])}"
            f"{_members_text(row, 'f1_members')}{_classes_text(row, ihc=manifest.stain == 'H-DAB')}"
            for row in validation
        ],
        fit,
        report,
    )


def _check_fine_tuning(
    anchor_weight: float, freeze_batchnorm: bool, init_model: str | None, *, distill_weight: float = 0.0
) -> None:
    """--anchor-weight, --freeze-batchnorm and --distill-weight hold on to the --init model: refused when
    training from scratch."""
    scratch = (
        "this run trains from scratch (--init none, or phantom truth without --init): give --init MODEL to fine-tune"
    )
    if anchor_weight and init_model is None:
        raise typer.BadParameter(
            f"{anchor_weight:g} holds the weights near the --init model's, and {scratch}, or leave the anchor at 0",
            param_hint="--anchor-weight",
        )
    if freeze_batchnorm and init_model is None:
        raise typer.BadParameter(
            f"it keeps the --init model's BatchNorm statistics, and {scratch}", param_hint="--freeze-batchnorm"
        )
    if distill_weight and init_model is None:
        raise typer.BadParameter(
            f"{distill_weight:g} distils the --init model's predictions into the one trained, and {scratch}, or leave "
            "the distillation at 0",
            param_hint="--distill-weight",
        )


def _check_before_reading(out: Path, *, resume: bool, cycles: int, drop_first_cycle: bool) -> None:
    """What would otherwise fail only after the labels are read and the pseudo-labels made, said at once."""
    from inference import check_out_dir

    if drop_first_cycle and cycles < 2:
        raise typer.BadParameter(
            "--cycles 1 leaves no members with --drop-first-cycle (the default): give --cycles 2 or more, or "
            "--no-drop-first-cycle"
        )
    try:
        check_out_dir(out, resume=resume, setting=TRAIN_WORDS)
    except OSError as err:
        raise fail(err) from err


def _split_held_out(
    slide_labels: list, val_entries: list[str], val_fraction: float, *, seed: int, points: bool
) -> tuple[list, list]:
    """(training labels, held-out labels): --val-entries or --val-fraction of your labels, by slide; held-out
    slides that validation could not score are refused here, before training."""
    if (val_entries or val_fraction) and not slide_labels:
        raise typer.BadParameter(
            "--val-entries and --val-fraction hold out slides of your labels; phantom truth has none"
        )
    from bridge.labels import refuse_unscorable_held_out, split_validation

    train, held_out = split_validation(slide_labels, val_entries, fraction=val_fraction, seed=seed)
    chosen_by = "--val-entries" if val_entries else "--val-fraction"
    refuse_unscorable_held_out(held_out, points=points, chosen_by=chosen_by)
    return train, held_out


def _train_and_validate(
    train: Callable[..., Any],
    config: Any,
    *,
    task: str,
    labels: list,
    held_out: list,
    recalibrate: bool,
    resume: bool,
    progress: bool,
    **train_kwargs: Any,
) -> tuple[Any, list[dict], dict | None, str]:
    """Train ``config`` (``train_segmentation`` or ``train_nuclei``) with a progress bar, then score the held-out
    slides (:func:`_validate`) and draw the training report: (manifest, validation rows, threshold fit, report)."""
    from bridge.labels import label_summary
    from bridge.progress import progress_bar

    out, device = Path(config.out_dir), config.device
    # The stages after the last step read every slide again (an IHC nuclei model's review entropy, domain
    # statistics, validation on the held-out slides, the report's label statistics) and draw the report: minutes
    # for a lab's slides, which said nothing after the training bar had ended.
    with progress_bar("training", enabled=progress) as on_progress:

        def stage(name: str) -> Callable[[int, int], None]:
            return lambda done, total: on_progress(done, total, stage=name)

        if task == "nuclei":
            train_kwargs["on_review_progress"] = stage("review entropy")
        manifest = train(
            config,
            labels=labels,
            label_sources=label_summary(labels) if labels else None,
            resume=resume,
            on_progress=on_progress,
            on_domain_progress=stage("domain statistics"),
            setting=SEG_TRAIN_WORDS if task == "segmentation" else NUCLEI_TRAIN_WORDS,
            **train_kwargs,
        )
        validation, fit = (
            _validate(out, held_out, device=device, task=task, recalibrate=recalibrate, on_progress=stage("validation"))
            if held_out
            else ([], None)
        )
        report = _training_report(
            out,
            task=task,
            labels=labels,
            held_out=held_out,
            truth=config.slides,
            device=device,
            on_progress=stage("training report"),
            on_drawing_progress=stage("drawing the training report"),
        )
    return manifest, validation, fit, report


def _echo_trained(out: Path, manifest, validation_lines: list[str], fit: dict | None, report: str) -> None:
    """What a training run printed at its end: the members written, each held-out slide, the threshold fit, the report."""
    typer.echo(
        f"wrote {out}: {len(manifest.members)} member{'s' if len(manifest.members) != 1 else ''} "
        + ", ".join(f"{m.file} (cycle {m.cycle}, epoch {m.epoch})" for m in manifest.members)
    )
    for line in validation_lines:
        typer.echo(line)
    if fit:
        _echo_fit(fit)
    typer.echo(report)


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def _classes_text(row: dict, *, ihc: bool) -> str:
    """ "; classes right on 94% of the matched nuclei" and, on an IHC, "; TPS of the marked cells 7.4%, of those
    found 6.1%" for a nuclei validation row ("" where not measured)."""
    text = (
        ""
        if row.get("class_agreement") is None
        else f"; classes right on {row['class_agreement']:.0%} of the matched nuclei"
    )
    if ihc and row.get("tps_marked_percent") is not None:
        found = row.get("tps_found_percent")
        text += f"; TPS of the marked cells {row['tps_marked_percent']:.1f}%, of those found "
        text += "-" if found is None else f"{found:.1f}%"
    return text


def _members_text(row: dict, key: str) -> str:
    """ ", members 0.91 / 0.93 / 0.92 (ensemble rank 2 of 4)" for a validation row; "" for one model."""
    members = row.get(key) or []
    if not members:
        return ""
    return f", members {' / '.join(_fmt(m) for m in members)} (ensemble rank {row['rank']} of {len(members) + 1})"


def _training_report(
    out: Path,
    *,
    task: str,
    labels: list,
    held_out: list,
    truth: tuple[str, ...],
    device: str,
    on_progress: Callable[[int, int], None] | None = None,
    on_drawing_progress: Callable[[int, int], None] | None = None,
) -> str:
    """Write OUT/training_report.html; the model is already written, so a failure here is a warning, not an error.
    ``on_progress`` counts the slides read for it (:func:`bridge.training_report.record_training_data`),
    ``on_drawing_progress`` the pictures drawn (:func:`bridge.training_report.write_training_report`)."""
    from bridge.training_report import record_training_data, write_training_report

    try:
        record_training_data(
            out,
            task=task,
            labels=labels,
            held_out=held_out,
            truth_slides=() if labels else truth,
            device=device,
            on_progress=on_progress,
        )
        return f"training report: {write_training_report(out, on_progress=on_drawing_progress)}"
    except (Pdl1Error, ValueError, OSError) as err:
        return f"no training report ({err}); the model is complete; `pdl1 train report {out}` draws what is there"


@app.command("report")
def report_cmd(
    out: Annotated[Path, typer.Argument(help="A model folder written by `pdl1 train seg` or `pdl1 train nuclei`.")],
) -> None:
    """Draw OUT/training_report.html again from a model folder: curves, validation, labels, example tiles."""
    from bridge.training_report import write_training_report

    try:
        path = write_training_report(out)
    except (Pdl1Error, ValueError, OSError) as err:
        raise fail(err) from err
    except KeyboardInterrupt:
        raise interrupted(
            f"{out / 'training_report.html'} is the earlier report (or none; it is replaced whole at the end), some of "
            "its pictures may be drawn anew; run `pdl1 train report` again"
        ) from None
    typer.echo(f"wrote {path}")


def _validate(
    out: Path,
    held_out: list,
    *,
    device: str,
    task: str,
    recalibrate: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[list[dict], dict | None]:
    """Score the new model on the held-out slides (rows, and the threshold fit or None); OUT/validation.json;
    ``on_progress(done, total)`` counts the slides the model runs over.

    With ``recalibrate`` the threshold with the best pooled score on these slides goes into the manifest
    first, and the slides are scored at it: a segmentation's on its mean probability (Dice over the labelled
    pixels, :func:`inference.fit_threshold`), a nuclei model's peak threshold (F1 over the marked nuclei,
    :func:`inference.fit_min_score`).
    """
    from dataclasses import asdict

    from bridge.labels import label_summary
    from bridge.project import write_json_atomic
    from inference import (
        DEFAULT_MIN_SCORE,
        fit_min_score,
        fit_threshold,
        labelled_nuclei,
        labelled_region_pixels,
        read_manifest,
        score_labelled_nuclei,
        score_labelled_pixels,
    )

    extra: dict = {}
    if task == "nuclei":
        manifest = read_manifest(out, task="nuclei")
        min_score = float(manifest.thresholds.get("min_score", DEFAULT_MIN_SCORE))
        found = labelled_nuclei(
            out, held_out, radius_um=3.0, floor=min(min_score, 0.1), device=device, on_progress=on_progress
        )
        if recalibrate:
            min_score = _adopt(fit_min_score(found, current=min_score), out, manifest, "min_score", extra)
        scores = score_labelled_nuclei(found, min_score=min_score)
        extra["radius_um"] = 3.0
    else:
        manifest = read_manifest(out, task="segmentation")
        threshold = manifest.thresholds.get("segmentation", 0.5)
        pixels = labelled_region_pixels(out, held_out, device=device, on_progress=on_progress)
        if recalibrate:
            threshold = _adopt(fit_threshold(pixels, current=threshold), out, manifest, "segmentation", extra)
        scores = score_labelled_pixels(pixels, threshold=threshold)
    # precision is undefined (NaN) when nothing was found: null in JSON, which allows no NaN
    rows = [
        {k: _json_number(v) for k, v in (asdict(s) | {"rank": s.rank} | summary).items()}
        for s, summary in zip(scores, label_summary(held_out), strict=True)
    ]
    write_json_atomic(out / "validation.json", {"task": task, "slides": rows} | extra)
    return rows, extra.get("threshold_fit")


def _adopt(fit, out: Path, manifest, key: str, extra: dict) -> float:
    """Record a threshold fit in ``extra`` and, where it was adopted, write it to the manifest; the threshold now."""
    from dataclasses import asdict

    from inference import write_manifest

    extra["threshold_fit"] = asdict(fit)
    if fit.adopted:
        write_manifest(out, manifest.with_thresholds(**{key: fit.after}))
    return fit.after


def _echo_fit(fit: dict) -> None:
    what = "peak threshold" if fit["metric"] == "F1" else "segmentation threshold"
    typer.echo(
        f"{what} {fit['before']:g} -> {fit['after']:g} (pooled {fit['metric']} on the held-out slides "
        f"{_fmt(fit['score_before'])} -> {_fmt(fit['score_after'])}"
        + ("" if fit["adopted"] else "; under 0.005 better, kept")
        + f"): fit on these slides, so their {fit['metric']} above is not an independent estimate"
    )


def _json_number(value):
    """NaN (undefined precision or Dice) as None, inside tuples too: JSON has no NaN."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, tuple | list):
        return [_json_number(v) for v in value]
    return value


def domain_stats(
    model: Annotated[
        Path,
        typer.Argument(
            help="Model folder whose manifest gets the statistics (a shipped demo's is read-only: give --out)."
        ),
    ],
    slides: Annotated[
        list[Path],
        typer.Argument(
            help="The slides the model was trained on. Each is read at the pixel size its training recorded for it "
            "(the manifest's training.config.slide_mpp: a QuPath project's calibration), else at its file's own."
        ),
    ],
    held_out: Annotated[
        list[str] | None,
        typer.Option(
            help="In-domain slides not trained on, to calibrate the limits on (repeatable; a quoted glob such "
            "as 'held/he_2*.svs' is expanded). Without: each training slide against the others' statistics.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write a copy of the model with the statistics here.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", callback=check_device)] = "cpu",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Compute a model's training-domain statistics (the domain guard) and write them into its manifest.

    Runs member 0 over each slide as an analysis does, keeping its feature layers' channel means and stds
    per tile and each slide's stain vectors and tissue OD; the out-of-domain score and stain distance limits
    are calibrated on --held-out slides. A slide (training or held-out) is read at the pixel size the model's training recorded for it (the manifest's training.config.slide_mpp, where a QuPath project stated one), else at its file's own. The weights and their checksums are not touched.
    """
    import glob

    from bridge.progress import progress_bar
    from inference import (
        compute_domain_stats,
        read_manifest,
        recorded_slide_mpp,
        with_domain_stats,
        write_domain_stats,
    )

    copy = out is not None and out.resolve() != model.resolve()
    check_model_target(model, out, what="a copy with the statistics")
    held: list[str] = []
    for pattern in held_out or []:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise typer.BadParameter(f"{pattern!r} matches no file", param_hint="--held-out")
        held += matches
    try:
        # Each slide at the pixel size training read it at: the one its QuPath project stated, which the manifest
        # records by slide (a PNG a project calibrated states none itself), else its file's own.
        # No "leave the model option out": MODEL has no default here (the shipped demo's statistics are refused).
        manifest = read_manifest(model, verify=False, otherwise=None)
        slide_mpp = recorded_slide_mpp(manifest, [*slides, *held])
        for path, value in slide_mpp.items():
            typer.echo(f"{path}: read at {value:g} µm/px, as its training recorded (training.config.slide_mpp)")
        with progress_bar("domain statistics", enabled=progress) as on_progress:
            stats = compute_domain_stats(
                model,
                slides,
                held_out=held,
                device=device,
                on_progress=on_progress,
                slide_mpp=slide_mpp,
                mpp_advice=_domain_stats_mpp_advice,
                setting=option_setting,  # held_out: --held-out
            )
        if copy:  # renamed into place whole, or not at all
            write_model_copy(model, out, with_domain_stats(read_manifest(model, verify=False), stats))
            path = out / "manifest.json"
        else:
            path = write_domain_stats(model, stats)
    except (Pdl1Error, ValueError, OSError) as err:
        raise fail(err) from err
    except KeyboardInterrupt:  # was click's bare "Aborted!", which said nothing of the model
        target = out if copy else model
        raise interrupted(
            f"nothing was written; {target} is as it was{'' if copy else ' (the manifest is replaced whole)'}. "
            "Run pdl1 domain-stats again"
        ) from None
    cal = stats.calibration
    typer.echo(
        f"wrote {path}: {stats.train_tiles} training tiles of {len(stats.slides)} "
        f"slide{'' if len(stats.slides) == 1 else 's'}, "
        f"{len(stats.features.components)} of {stats.features.dim} feature directions; out-of-domain score "
        f"limit {_num(stats.feature_limit)}, stain distance limit {_num(stats.stain_limit_deg)}°"
    )
    for row in cal.get("slides", []):
        typer.echo(
            f"  {row['slide']}: out-of-domain score {_num(row['score'])}, stain distance "
            f"{_num(row['stain_distance_deg'])}°"
        )
    if stats.features.fitted_on_too_little:
        # 3 tiles gave 2 of 240 directions and a limit of 22410: a guard that flags nothing, written without a word.
        typer.echo(
            f"warning: {stats.train_tiles} training tiles give {len(stats.features.components)} feature directions, "
            "fewer than the guard keeps, so its limits rest on too little (the shipped "
            "segmentation model's: 226 tiles of 10 slides) and may flag nothing or everything; run it again with "
            "more or larger slides of the training domain",
            err=True,
        )


def _domain_stats_mpp_advice(value: str) -> str:
    """What to do about a slide `pdl1 domain-stats` finds no pixel size for: it has no --mpp (the library's
    advice, "pass ... as mpp", named none of its options)."""
    return (
        "`pdl1 domain-stats` reads a slide at the pixel size the model's training recorded for it (the manifest's "
        "training.config.slide_mpp, by slide file), else at its file's own: give the slide file training read, "
        "as the manifest names it; or re-save it with resolution tags stating "
        f"{value} (a TIFF, {TIFF_WITH_RESOLUTION}); or leave it out"
    )


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"  # n/a: not calibrated, or not measured
