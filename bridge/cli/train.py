"""``pdl1 train``: the sub-app that trains segmentation ensembles and nuclei models on phantom slides."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bridge.cli.common import fail, interrupted
from inference import Pdl1Error

app = typer.Typer(help="Train models on phantom slides with truth.", no_args_is_help=True)

_TRAINING_KEPT = "{out} holds a checkpoint of the last finished epoch; the same command with --resume goes on from it"


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
FIRST_CYCLE_HELP = "Length of the first cycle in epochs (0: as --epochs-per-cycle); a long first cycle converges before members are kept."


@app.command("seg")
def train_seg(
    slides: Annotated[list[Path], typer.Argument(help="Phantom slides with truth beside them (pdl1 phantom).")],
    out: Annotated[Path, typer.Option(help="Model folder to write (manifest + members).")],
    cycles: Annotated[int, typer.Option(min=1, help="Cosine cycles (warm restarts).")] = 5,
    epochs_per_cycle: Annotated[int, typer.Option(min=1)] = 4,
    first_cycle_epochs: Annotated[int, typer.Option(min=0, help=FIRST_CYCLE_HELP)] = 0,
    iterations: Annotated[int, typer.Option(min=1, help="Iterations per epoch.")] = 40,
    members_per_cycle: Annotated[int, typer.Option(min=1, help="Members from the low-LR end of each cycle.")] = 1,
    drop_first_cycle: Annotated[bool, typer.Option(help="Leave out the first cycle's members.")] = True,
    optimizer: Annotated[str, typer.Option(help="adamw, or sgd (Nesterov momentum 0.99, as nnU-Net).")] = "adamw",
    lr_max: Annotated[float | None, typer.Option(min=0, help=LR_MAX_HELP, show_default=False)] = None,
    restart_lr: Annotated[float, typer.Option(min=0, help=RESTART_LR_HELP)] = 0.0,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    patch_px: Annotated[int, typer.Option(min=16, help="Training patch edge in model px.")] = 128,
    positive_fraction: Annotated[
        float, typer.Option(min=0, max=1, help="Share of patches centred on positive pixels (class balance).")
    ] = 0.5,
    features: Annotated[str, typer.Option(help="U-Net stage widths.")] = "8,16,32,64",
    input_mpp: Annotated[float, typer.Option(min=0.1, help="Model input resolution, µm/px.")] = 2.0,
    stain_jitter: Annotated[
        str,
        typer.Option(help="Colour augmentation: light (HED scale) or strong (also stain vectors and a colour cast)."),
    ] = "light",
    loss: Annotated[
        str, typer.Option(help="ce+dice (nnU-Net's compound loss) or ce (cross-entropy alone, calibrated).")
    ] = "ce+dice",
    seed: Annotated[int, typer.Option(min=0)] = 0,
    chains: Annotated[
        int,
        typer.Option(
            min=1,
            help="Independent cyclic runs pooled into one ensemble; chain k is seeded SEED+k and written to "
            "OUT/chain_k. Time grows with the number of chains.",
        ),
    ] = 1,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoints under OUT if present.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train a segmentation ensemble the nnUNet-B way (cyclic LR, members at the low ends)."""
    from bridge.progress import progress_bar
    from inference import SegTrainConfig, train_segmentation

    lr_peak, lr_floor = _lr_range(optimizer, lr_max)
    try:
        config = SegTrainConfig(
            slides=tuple(str(s) for s in slides),
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
        )
        with progress_bar("training", enabled=progress) as on_progress:
            manifest = train_segmentation(config, resume=resume, on_progress=on_progress)
    except (Pdl1Error, ValueError, OSError) as err:
        raise fail(err) from err
    except KeyboardInterrupt:
        raise interrupted(_TRAINING_KEPT.format(out=out)) from None
    typer.echo(
        f"wrote {out}: {len(manifest.members)} members "
        + ", ".join(f"{m.file} (cycle {m.cycle}, epoch {m.epoch})" for m in manifest.members)
    )


@app.command("nuclei")
def train_nuclei_cmd(
    slides: Annotated[list[Path], typer.Argument(help="Phantom slides with truth beside them (pdl1 phantom).")],
    out: Annotated[Path, typer.Option(help="Model folder to write (manifest + members).")],
    cycles: Annotated[int, typer.Option(min=1, help="Cosine cycles (warm restarts).")] = 3,
    epochs_per_cycle: Annotated[int, typer.Option(min=1)] = 3,
    first_cycle_epochs: Annotated[int, typer.Option(min=0, help=FIRST_CYCLE_HELP)] = 0,
    iterations: Annotated[int, typer.Option(min=1, help="Iterations per epoch.")] = 40,
    members_per_cycle: Annotated[int, typer.Option(min=1)] = 1,
    drop_first_cycle: Annotated[bool, typer.Option(help="Leave out the first cycle's members.")] = True,
    optimizer: Annotated[str, typer.Option(help="adamw or sgd.")] = "adamw",
    lr_max: Annotated[float | None, typer.Option(min=0, help=LR_MAX_HELP, show_default=False)] = None,
    restart_lr: Annotated[float, typer.Option(min=0, help=RESTART_LR_HELP)] = 0.0,
    batch_size: Annotated[int, typer.Option(min=1)] = 12,
    patch_px: Annotated[int, typer.Option(min=16, help="Training patch edge in model px (even).")] = 96,
    width: Annotated[int, typer.Option(min=4, help="Backbone channels.")] = 32,
    sigma_um: Annotated[float, typer.Option(min=0.1, help="Gaussian target sigma, µm.")] = 1.5,
    input_mpp: Annotated[float, typer.Option(min=0.1, help="Model input resolution, µm/px.")] = 1.0,
    stain_jitter: Annotated[
        str,
        typer.Option(help="Colour augmentation: light (HED scale) or strong (also stain vectors and a colour cast)."),
    ] = "light",
    seed: Annotated[int, typer.Option(min=0)] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint if present.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train the point-based nuclei classifier from truth points, on the stain of the slides given.

    H&E phantoms: Tumor: Positive / Tumor: Negative / Other. PD-L1 IHC phantoms (pdl1 phantom --ihc): also
    Immune cells: PD-L1 positive / negative, and the 2+/3+ membrane DAB limits calibrated on the truth.
    """
    from bridge.progress import progress_bar
    from inference import NucleiTrainConfig, train_nuclei

    lr_peak, lr_floor = _lr_range(optimizer, lr_max)
    try:
        config = NucleiTrainConfig(
            slides=tuple(str(s) for s in slides),
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
            seed=seed,
            device=device,
        )
        with progress_bar("training", enabled=progress) as on_progress:
            manifest = train_nuclei(config, resume=resume, on_progress=on_progress)
    except (Pdl1Error, ValueError, OSError) as err:
        raise fail(err) from err
    except KeyboardInterrupt:
        raise interrupted(_TRAINING_KEPT.format(out=out)) from None
    typer.echo(
        f"wrote {out}: {len(manifest.members)} members "
        + ", ".join(f"{m.file} (cycle {m.cycle}, epoch {m.epoch})" for m in manifest.members)
    )


def domain_stats(
    model: Annotated[Path, typer.Argument(help="Model folder whose manifest gets the statistics.")],
    slides: Annotated[list[Path], typer.Argument(help="The slides the model was trained on.")],
    held_out: Annotated[
        list[str] | None,
        typer.Option(
            help="In-domain slides not trained on, to calibrate the limits on (repeatable; a quoted glob such "
            "as 'held/he_2*.svs' is expanded). Without: each training slide against the others' statistics.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write a copy of the model with the statistics here.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "cpu",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Compute a model's training-domain statistics (the domain guard) and write them into its manifest.

    Runs member 0 over each slide as an analysis does, keeping its feature layers' channel means and stds
    per tile and each slide's stain vectors and tissue OD; the out-of-domain score and stain distance limits
    are calibrated on --held-out slides. The weights and their checksums are not touched.
    """
    import glob
    import shutil

    from bridge.progress import progress_bar
    from inference import compute_domain_stats, write_domain_stats

    held: list[str] = []
    for pattern in held_out or []:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise typer.BadParameter(f"{pattern!r} matches no file", param_hint="--held-out")
        held += matches
    try:
        with progress_bar("domain statistics", enabled=progress) as on_progress:
            stats = compute_domain_stats(model, slides, held_out=held, device=device, on_progress=on_progress)
        target = model
        if out is not None and out.resolve() != model.resolve():
            shutil.copytree(model, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoint"))
            target = out
        path = write_domain_stats(target, stats)
    except (Pdl1Error, ValueError, OSError) as err:
        raise fail(err) from err
    cal = stats.calibration
    typer.echo(
        f"wrote {path}: {stats.train_tiles} training tiles of {len(stats.slides)} slides, "
        f"{len(stats.features.components)} of {stats.features.dim} feature directions; out-of-domain score "
        f"limit {_num(stats.feature_limit)}, stain distance limit {_num(stats.stain_limit_deg)}°"
    )
    for row in cal.get("slides", []):
        typer.echo(
            f"  {row['slide']}: out-of-domain score {_num(row['score'])}, stain distance "
            f"{_num(row['stain_distance_deg'])}°"
        )


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"  # n/a: not calibrated, or not measured
