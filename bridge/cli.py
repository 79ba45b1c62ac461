"""The ``pdl1`` command line.

Importing this module is cheap: models, torch and slide readers load inside the commands.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from typer.core import TyperGroup

from inference import __version__
from inference.errors import Pdl1Error

app = typer.Typer(
    name="pdl1",
    help="Uncertainty-aware PD-L1 deep learning for QuPath: phantom data, models, batch runs and the service.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
log = logging.getLogger("bridge")


def _stdout() -> Console:
    """Tables go to stdout; piped or captured output gets a width that keeps class names on one line."""
    import sys

    return Console(width=None if sys.stdout.isatty() else 160)


@app.callback()
def main(
    log_level: Annotated[
        str, typer.Option("--log-level", help="Logging level: DEBUG, INFO, WARNING or ERROR.")
    ] = "WARNING",
) -> None:
    """Uncertainty-aware PD-L1 deep learning for QuPath."""
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _fail(err: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {err}")
    return typer.Exit(code=1)


_TRAINING_KEPT = "{out} holds a checkpoint of the last finished epoch; the same command with --resume goes on from it"


def _interrupted(what_is_kept: str) -> typer.Exit:
    """Ctrl-C: say what survived and how to go on, then exit 130 as a shell expects."""
    console.print(f"[yellow]interrupted:[/yellow] {what_is_kept}")
    return typer.Exit(code=130)


@app.command()
def version() -> None:
    """Print the version of pdl1-bridge and of the libraries it runs on."""
    import platform

    import numpy
    import openslide

    typer.echo(f"pdl1-bridge {__version__}")
    typer.echo(
        f"python {platform.python_version()}, numpy {numpy.__version__}, openslide {openslide.__library_version__}"
    )


@app.command()
def phantom(
    out: Annotated[Path, typer.Argument(help="Slide to write: .svs (Aperio-style) or .tif (generic tiled TIFF).")],
    size: Annotated[int, typer.Option(min=1024, max=100_000, help="Edge length in level-0 px.")] = 8192,
    height: Annotated[int | None, typer.Option(min=1024, max=100_000, help="Height in px when not square.")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Random seed; the same seed gives the same bytes.")] = 1,
    tps: Annotated[float, typer.Option(min=0, max=100, help="Wanted tumour proportion score, %.")] = 30.0,
    shift: Annotated[
        float, typer.Option(min=0, max=1, help="Domain shift: stain, colour, blur and JPEG quality.")
    ] = 0.0,
    mpp: Annotated[float, typer.Option(min=0.1, max=2.0, help="Microns per level-0 pixel.")] = 0.5,
    weak_fraction: Annotated[
        float,
        typer.Option(
            min=0,
            max=0.95,
            help="Fraction of the positive area that expresses weakly (faint morphology, still positive).",
        ),
    ] = 0.0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Write a phantom H&E slide with its PD-L1 truth beside it (OUT stem + '.truth/')."""
    from bridge.phantom_truth import write_truth_geojson
    from bridge.progress import progress_bar
    from inference.phantom import PhantomSpec, write_phantom

    try:
        spec = PhantomSpec(
            size, height or size, seed=seed, mpp=mpp, tps_percent=tps, shift=shift, weak_fraction=weak_fraction
        )
        with progress_bar(f"phantom {out.name}", enabled=progress) as on_progress:
            truth = write_phantom(out, spec, on_progress=on_progress)
        write_truth_geojson(truth.truth_dir)
    except (Pdl1Error, ValueError, OSError) as err:
        raise _fail(err) from err
    counts = truth.summary["nuclei_counts"]
    tps_truth = truth.summary["tps_percent"]
    typer.echo(f"wrote {out} ({spec.width_px}x{spec.height_px} px, {spec.mpp} µm/px, levels {truth.summary['levels']})")
    typer.echo(
        f"truth in {truth.truth_dir}: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
        + (f", TPS {tps_truth:.1f}%" if tps_truth is not None else ", no tumour nuclei")
    )


class _DefaultSuiteGroup(TyperGroup):
    """``pdl1 eval SLIDE...`` runs the ``suite`` subcommand; ``pdl1 eval seg|nuclei ...`` the others."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["suite", *args]
        return super().parse_args(ctx, args)


train_app = typer.Typer(help="Train models on phantom slides with truth.", no_args_is_help=True)
eval_app = typer.Typer(
    cls=_DefaultSuiteGroup,
    no_args_is_help=True,
    help="Evaluate on phantom slides against their truth. `pdl1 eval SLIDE... --out DIR` runs the full suite.",
)
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")


def _lr_range(optimizer: str, lr_max: float | None) -> tuple[float, float]:
    """(peak, floor) of the cyclic schedule: ``--lr-max`` or the optimizer's default peak, and a
    hundredth of it (an unknown optimizer is refused by the training config)."""
    if lr_max is None:
        from inference.cyclic import DEFAULT_LR_MAX

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


@train_app.command("seg")
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
    from inference.train_seg import SegTrainConfig, train_segmentation

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
        raise _fail(err) from err
    except KeyboardInterrupt:
        raise _interrupted(_TRAINING_KEPT.format(out=out)) from None
    typer.echo(
        f"wrote {out}: {len(manifest.members)} members "
        + ", ".join(f"{m.file} (cycle {m.cycle}, epoch {m.epoch})" for m in manifest.members)
    )


@eval_app.command("seg")
def eval_seg(
    slides: Annotated[list[Path], typer.Argument(help="Phantom slides with truth beside them.")],
    model: Annotated[
        Path | None, typer.Option(help="Segmentation ensemble folder; the shipped demo if omitted.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    threshold: Annotated[float | None, typer.Option(min=0, max=1, help="Override the manifest's threshold.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Dice of the ensemble and of every member, and AUROC of uncertainty for pixel errors, on the truth's grid."""
    from rich.table import Table

    from bridge.progress import progress_bar
    from inference.ensemble import Ensemble, demo_model_dir
    from inference.evaluate import evaluate_segmentation

    out = _stdout()
    results = []
    try:
        ensemble = Ensemble.load(model or demo_model_dir("seg"), task="segmentation", device=device)
        members = ensemble.manifest.members
        pooled = len({m.chain for m in members}) > 1
        for slide in slides:
            with progress_bar(f"eval {slide.name}", enabled=progress) as on_progress:
                result, maps = evaluate_segmentation(slide, ensemble, threshold=threshold, on_progress=on_progress)
            results.append(result)
            table = Table(
                title=f"{slide.name}: segmentation vs truth ({result.pixels} tissue px at {maps.mpp:g} µm/px)"
            )
            table.add_column("metric")
            table.add_column("value", justify="right")
            table.add_row("Dice, ensemble", f"{result.dice_ensemble:.4f}")
            for i, d in enumerate(result.dice_members):
                origin = f" (chain {members[i].chain}, cycle {members[i].cycle})" if pooled else ""
                table.add_row(f"Dice, member {i}{origin}", f"{d:.4f}")
            table.add_row("AUROC predictive entropy -> error", f"{result.auroc_entropy_error:.4f}")
            table.add_row("AUROC mutual information -> error", f"{result.auroc_mi_error:.4f}")
            table.add_row(
                "predictive entropy, wrong / right",
                f"{result.entropy_wrong_mean:.4f} / {result.entropy_right_mean:.4f}",
            )
            table.add_row(
                "mutual information, wrong / right", f"{result.mi_wrong_mean:.4f} / {result.mi_right_mean:.4f}"
            )
            table.add_row("mutual information, min", f"{result.mi_min:.2e}")
            out.print(table)
            best = max(result.dice_members, default=float("nan"))
            verdict = "yes" if result.dice_ensemble >= best else "no"
            out.print(
                f"ensemble Dice >= every member's: {verdict} ({result.dice_ensemble:.4f} vs best member {best:.4f})"
            )
    except (Pdl1Error, ValueError, OSError) as err:
        raise _fail(err) from err
    if len(results) > 1 and all(r.dice_members for r in results):
        _print_dice_summary(results, out)


def _print_dice_summary(results, out) -> None:
    """Per-slide gaps, then Dice over all slides: the mean of per-slide Dice and pooled pixels."""
    from rich.table import Table

    from inference.evaluate import pooled_dice

    n = min(len(r.dice_members) for r in results)
    table = Table(title=f"Dice over {len(results)} slides: ensemble vs each of its {n} members")
    table.add_column("slides")
    table.add_column("ensemble", justify="right")
    for i in range(n):
        table.add_column(f"member {i}", justify="right")
    table.add_column("ensemble - best member", justify="right")

    def row(label: str, ens: float, members: tuple[float, ...]) -> None:
        table.add_row(label, f"{ens:.4f}", *(f"{d:.4f}" for d in members), f"{ens - max(members):+.4f}")

    for r in results:
        row(r.slide, r.dice_ensemble, r.dice_members[:n])
    mean_members = tuple(sum(r.dice_members[i] for r in results) / len(results) for i in range(n))
    mean_ens = sum(r.dice_ensemble for r in results) / len(results)
    row("mean of slides", mean_ens, mean_members)
    pooled_ens, pooled_members = pooled_dice(results)
    row("pooled pixels", pooled_ens, pooled_members)
    out.print(table)
    wins = sum(r.dice_ensemble >= max(r.dice_members) for r in results)
    out.print(
        f"ensemble Dice >= every member's: {wins} of {len(results)} slides; mean of slides "
        f"{'yes' if mean_ens >= max(mean_members) else 'no'}; pooled {'yes' if pooled_ens >= max(pooled_members) else 'no'}"
    )


@train_app.command("nuclei")
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
    seed: Annotated[int, typer.Option(min=0)] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint if present.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train the point-based nuclei classifier (Tumor: Positive / Tumor: Negative / Other) from truth points."""
    from bridge.progress import progress_bar
    from inference.train_nuclei import NucleiTrainConfig, train_nuclei

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
            seed=seed,
            device=device,
        )
        with progress_bar("training", enabled=progress) as on_progress:
            manifest = train_nuclei(config, resume=resume, on_progress=on_progress)
    except (Pdl1Error, ValueError, OSError) as err:
        raise _fail(err) from err
    except KeyboardInterrupt:
        raise _interrupted(_TRAINING_KEPT.format(out=out)) from None
    typer.echo(
        f"wrote {out}: {len(manifest.members)} members "
        + ", ".join(f"{m.file} (cycle {m.cycle}, epoch {m.epoch})" for m in manifest.members)
    )


@eval_app.command("nuclei")
def eval_nuclei(
    slides: Annotated[list[Path], typer.Argument(help="Phantom slides with truth beside them.")],
    model: Annotated[Path | None, typer.Option(help="Nuclei model folder; the shipped demo if omitted.")] = None,
    radius_um: Annotated[float, typer.Option(min=0.1, help="Matching radius; pairs beyond it never match.")] = 3.0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Precision, recall and F1 (overall and per class) and the TPS error of each slide."""
    from rich.table import Table

    from bridge.progress import progress_bar
    from inference.ensemble import Ensemble, demo_model_dir
    from inference.evaluate import evaluate_nuclei

    out = _stdout()
    try:
        ensemble = Ensemble.load(model or demo_model_dir("nuclei"), task="nuclei", device=device)
        table = Table(title=f"nuclei vs truth (match within {radius_um} µm)")
        for col in ("slide", "class", "precision", "recall", "F1", "TPS pred", "TPS truth", "TPS error"):
            table.add_column(col, justify="left" if col in ("slide", "class") else "right")
        for slide in slides:
            with progress_bar(f"eval {slide.name}", enabled=progress) as on_progress:
                r = evaluate_nuclei(slide, ensemble, radius_um=radius_um, on_progress=on_progress)
            err = r.tps_abs_error

            def pct(t) -> str:
                return "n/a" if t.percent is None else f"{t.percent:.1f}% ({t.category})"

            rows = [("all", r.overall), *zip(r.class_names, r.per_class, strict=True)]
            for i, (name, sc) in enumerate(rows):
                table.add_row(
                    slide.name if i == 0 else "",
                    name,
                    f"{sc.precision:.3f}",
                    f"{sc.recall:.3f}",
                    f"{sc.f1:.3f}",
                    pct(r.tps_pred) if i == 0 else "",
                    pct(r.tps_truth) if i == 0 else "",
                    ("n/a" if err is None else f"{err:.1f}") if i == 0 else "",
                )
        out.print(table)
    except (Pdl1Error, ValueError, OSError) as err:
        raise _fail(err) from err


@eval_app.command("suite")
def eval_suite(
    slides: Annotated[list[Path], typer.Argument(help="Phantom slides with truth beside them.")],
    out: Annotated[Path, typer.Option(help="Report folder: metrics.csv and PNG plots.")],
    model: Annotated[Path | None, typer.Option(help="Segmentation ensemble; the shipped demo if omitted.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Segmentation, calibration and uncertainty metrics, and SUA against the pixel baseline, per slide."""
    from rich.table import Table

    from bridge.eval_report import rows, slide_uncertainty_correlation, write_report
    from bridge.progress import progress_bar
    from inference.ensemble import Ensemble, demo_model_dir
    from inference.evaluate import evaluate_slide_suite
    from inference.pipeline import PipelineConfig, review_rule_for, sua_params_for

    console_out = _stdout()
    try:
        ensemble = Ensemble.load(model or demo_model_dir("seg"), task="segmentation", device=device)
        manifest = ensemble.manifest
        upper = manifest.thresholds.get("segmentation", 0.5)
        sua = sua_params_for(manifest, PipelineConfig(), upper=upper)
        pixel_threshold = manifest.thresholds.get("pixel_baseline_threshold", sua.threshold)
        evaluations = []
        for slide in slides:
            with progress_bar(f"eval {slide.name}", enabled=progress) as on_progress:
                evaluations.append(
                    evaluate_slide_suite(
                        slide,
                        ensemble,
                        sua=sua,
                        pixel_threshold=pixel_threshold,
                        review=review_rule_for(manifest),
                        on_progress=on_progress,
                    )
                )
        provenance = {
            "command": "pdl1 eval",
            "slides": [str(s) for s in slides],
            "pdl1_bridge": __version__,
            "model": {
                "name": manifest.name,
                "version": manifest.version,
                "sha256": manifest.checksum,
                "folder": str(ensemble.folder),
            },
            "sua": {
                "lower": sua.lower,
                "upper": sua.upper,
                "threshold": sua.threshold,
                "uncertainty": sua.uncertainty,
                "aggregation": sua.aggregation,
            },
            "pixel_baseline_threshold": pixel_threshold,
        }
        written = write_report(evaluations, out, provenance=provenance)
    except (Pdl1Error, ValueError, OSError) as err:
        raise _fail(err) from err
    table = Table(
        title=f"evaluation ({manifest.name} {manifest.version}, SUA on {sua.uncertainty}/{sua.aggregation}, "
        f"NPR [{sua.lower:g}, {sua.upper:g}), threshold {sua.threshold:.3g})"
    )
    shown = (
        "slide",
        "shift",
        "dice",
        "ece",
        "brier",
        "auroc_entropy_error",
        "mean_entropy",
        "needs_review",
        "fn_pct",
        "sua_candidates",
        "sua_f05",
        "baseline_f05",
        "sua_fncr",
        "baseline_fncr",
    )
    for col in shown:
        table.add_column(col.replace("_", " "), justify="left" if col == "slide" else "right")
    for row in rows(evaluations):
        table.add_row(*(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in shown))
    console_out.print(table)
    console_out.print(f"Spearman(slide mean entropy, 1 - Dice) = {slide_uncertainty_correlation(evaluations):.3f}")
    for e in evaluations:
        better = e.sua.f05 > e.baseline.f05 and e.sua.fncr > e.baseline.fncr
        console_out.print(
            f"{e.slide}: SUA F0.5 {e.sua.f05:.3f} vs pixel baseline {e.baseline.f05:.3f}; "
            f"FNCR {e.sua.fncr:.3f} vs {e.baseline.fncr:.3f} -> "
            + ("SUA better on both" if better else "SUA not better on both")
            + f" ({e.sua.false_negative_px} false-negative map px to find)"
        )
    console_out.print(f"report: {', '.join(str(p) for p in written.values())}")


@app.command()
def calibrate(
    slides: Annotated[list[Path], typer.Argument(help="Validation phantom slides with truth (not the test slides).")],
    model: Annotated[
        Path | None, typer.Option(help="Segmentation ensemble to calibrate; the shipped demo if omitted.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write a calibrated copy here instead of updating --model.")] = None,
    min_fraction: Annotated[
        float,
        typer.Option(
            min=0.5, max=1.0, help="An NPR is a false negative when this share of its pixels is truly positive."
        ),
    ] = 0.9,
    uncertainty: Annotated[
        str, typer.Option(help="predictive_entropy, mutual_information or prob_std.")
    ] = "predictive_entropy",
    aggregation: Annotated[str, typer.Option(help="mean or p90.")] = "mean",
    objective: Annotated[
        str,
        typer.Option(
            help="pixels: F0.5 over the pixels of flagged NPRs (the unit SUA is compared with the baseline in); "
            "regions: each NPR counts once."
        ),
    ] = "pixels",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Choose SUA's threshold and lower bound (max F0.5) and the "needs review" rule; write them to the manifest."""
    import dataclasses
    import shutil

    from bridge.progress import progress_bar
    from inference.ensemble import Ensemble, demo_model_dir
    from inference.evaluate import calibrate_ensemble
    from inference.manifest import write_manifest

    if model is None and out is None:
        raise typer.BadParameter(
            "the shipped demo is read-only: pass --out DIR for a calibrated copy", param_hint="--out"
        )
    source = model or demo_model_dir("seg")
    try:
        ensemble = Ensemble.load(source, task="segmentation", device=device)
        with progress_bar("calibrating", enabled=progress) as on_progress:
            cal, review = calibrate_ensemble(
                slides,
                ensemble,
                uncertainty=uncertainty,
                aggregation=aggregation,
                min_fraction=min_fraction,
                objective=objective,
                on_progress=on_progress,
            )
        target = out or source
        if out is not None and Path(out).resolve() != Path(source).resolve():
            shutil.copytree(source, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoint"))
        m = ensemble.manifest.with_thresholds(
            sua_lower=cal.params.lower,
            sua_upper=cal.params.upper,
            sua_threshold=cal.params.threshold,
            pixel_baseline_threshold=cal.pixel_threshold,
            **review,
        )
        m = dataclasses.replace(
            m,
            extra={
                **m.extra,
                "sua": {
                    "uncertainty": uncertainty,
                    "aggregation": aggregation,
                    "min_fraction": min_fraction,
                    "objective": objective,
                    "calibrated_on": [p.name for p in slides],
                    "f05": cal.f05,
                    "pixel_baseline_f05": cal.pixel_f05,
                    "nprs": cal.n_regions,
                    "false_negative_nprs": cal.n_false_negative,
                },
            },
        )
        write_manifest(target, m)
    except (Pdl1Error, ValueError, OSError) as err:
        raise _fail(err) from err
    typer.echo(
        f"SUA: NPR [{cal.params.lower:g}, {cal.params.upper:g}), {uncertainty}/{aggregation} > "
        f"{cal.params.threshold:.4g} ({objective} F0.5 {cal.f05:.3f} on {cal.n_regions} NPRs, "
        f"{cal.n_false_negative} false negative)"
    )
    typer.echo(
        f"pixel baseline threshold {cal.pixel_threshold:.4g} (pixel F0.5 {cal.pixel_f05:.3f}); "
        f"needs review at mean entropy >= {review['review_entropy']:.3f} or candidates >= "
        f"{review['review_candidate_area_pct']}% of tissue"
    )
    typer.echo(f"wrote {Path(target) / 'manifest.json'}")


def _pipeline_config(
    device: str,
    seg_model: Path | None,
    nuclei_model: Path | None,
    mpp: float | None,
    no_nuclei: bool = False,
    refine: bool = False,
    *,
    batch_size: int = 8,
    read_workers: int | None = None,
    compile_members: bool = False,
    gpu_decode: bool | None = None,
):
    from inference.pipeline import PipelineConfig
    from inference.segment import SegmentConfig

    return PipelineConfig(
        seg_model_dir=None if seg_model is None else str(seg_model),
        nuclei_model_dir=None if nuclei_model is None else str(nuclei_model),
        run_nuclei=not no_nuclei,
        device=device,
        mpp=mpp,
        refine_with_sua=refine,
        segment=SegmentConfig(
            batch_size=batch_size, read_workers=read_workers, compile=compile_members, read_on_device=gpu_decode
        ),
    )


def _outcome_table(outcomes) -> None:
    from rich.table import Table

    table = Table(title="pdl1 run")
    for col in ("image", "state", "TPS %", "category", "positive area %", "uncertainty", "candidates", "time s"):
        table.add_column(col, justify="left" if col in ("image", "state", "category") else "right")
    for o in outcomes:

        def num(v, fmt=".1f"):
            return "" if v is None else format(v, fmt)

        flag = "" if o.uncertainty_flag is None else ("needs review" if o.uncertainty_flag else "ok")
        table.add_row(
            o.name,
            o.state if o.state != "failed" else "[red]failed[/red]",
            num(o.tps_percent),
            o.tps_category or "",
            num(o.positive_area_pct),
            flag,
            num(o.candidates, "d"),
            num(o.seconds),
        )
    _stdout().print(table)
    for o in outcomes:
        if o.error:
            console.print(f"[red]{o.name}:[/red] {o.error}")


def _run_with_progress(inputs, run_config, *, progress: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from bridge.run import run_batch

    if not progress:
        return run_batch(inputs, run_config)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
    ) as bar:
        images = bar.add_task("images", total=None)
        tiles = bar.add_task("tiles", total=None)

        def on_image(i: int, n: int, name: str) -> None:
            bar.update(images, completed=i, total=n, description=f"images ({name})")
            bar.reset(tiles)

        def on_tiles(done: int, total: int) -> None:
            bar.update(tiles, completed=done, total=total)

        outcomes = run_batch(inputs, run_config, on_image=on_image, on_tiles=on_tiles)
        bar.update(images, completed=len(outcomes))
    return outcomes


def _run_ray_with_progress(inputs, run_config, *, address, progress: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from bridge.engine_ray import run_batch_ray

    if not progress:
        return run_batch_ray(inputs, run_config, address=address)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
    ) as bar:
        images = bar.add_task("images (ray)", total=None)

        def on_image(done: int, n: int, name: str) -> None:
            bar.update(images, completed=done, total=n, description=f"images (ray; last: {name})")

        return run_batch_ray(inputs, run_config, address=address, on_image=on_image)


@app.command()
def run(
    inputs: Annotated[list[Path], typer.Argument(help="A QuPath project (folder or .qpproj), or slide files.")],
    out: Annotated[
        Path | None, typer.Option(help="Output folder for plain slides (one GeoJSON + summary each).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Skip images a previous run finished.")] = False,
    report: Annotated[bool, typer.Option(help="Write the HTML/CSV report afterwards.")] = False,
    target_class: Annotated[
        list[str] | None, typer.Option("--class", help="Analyse annotations of this class (repeatable; needs QuPath).")
    ] = None,
    target_name: Annotated[
        list[str] | None, typer.Option("--name", help="Analyse annotations with this name (repeatable; needs QuPath).")
    ] = None,
    search_dir: Annotated[
        list[Path] | None,
        typer.Option(help="Folder to search, with its subfolders, for slides that moved (repeatable)."),
    ] = None,
    qupath: Annotated[
        str,
        typer.Option(help="auto: write into the project via paquo when QuPath is found, else sidecars; never; always."),
    ] = "auto",
    seg_model: Annotated[
        Path | None, typer.Option(help="Segmentation ensemble folder (default: shipped demo).")
    ] = None,
    nuclei_model: Annotated[Path | None, typer.Option(help="Nuclei model folder (default: shipped demo).")] = None,
    no_nuclei: Annotated[bool, typer.Option(help="Skip nuclei and TPS.")] = False,
    refine: Annotated[bool, typer.Option(help="Also report positive area with SUA candidates merged in.")] = False,
    mpp: Annotated[
        float | None,
        typer.Option(
            min=0.05, help="Microns per pixel of every image, instead of what the project or the files state."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    engine: Annotated[
        str, typer.Option(help="local (this process) or ray (one task per image on a Ray cluster).")
    ] = "local",
    address: Annotated[
        str | None, typer.Option(help="Ray cluster: auto, or ray://HOST:PORT; a local one when omitted.")
    ] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Segmentation tiles per forward pass (all members see each batch).")
    ] = 8,
    read_workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Threads reading tiles ahead; default 2 on the CPU; on CUDA 2 when the GPU decodes, "
            "else all cores but two (at most 12).",
        ),
    ] = None,
    compile_members: Annotated[
        bool,
        typer.Option("--compile", help="torch.compile the segmentation members (pays off on GPUs for long batches)."),
    ] = False,
    gpu_decode: Annotated[
        bool | None,
        typer.Option(
            "--gpu-decode/--cpu-decode",
            help="Decode the slides' JPEG tiles on the GPU (nvImageCodec, the gpu-cu12/gpu-cu13 extra) or on "
            "the CPU. Default: on the GPU wherever possible.",
            show_default=False,
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Analyse every image: segmentation ensemble + uncertainty + SUA + nuclei, then write to QuPath.

    Exits non-zero when any image failed; the others are finished and written all the same.
    """
    from bridge.run import RunConfig, iter_failed

    if qupath not in ("auto", "never", "always"):
        raise typer.BadParameter("expected auto, never or always", param_hint="--qupath")
    if engine not in ("local", "ray"):
        raise typer.BadParameter("expected local or ray", param_hint="--engine")
    if address is not None and engine != "ray":
        raise typer.BadParameter("--address goes with --engine ray", param_hint="--address")
    try:
        run_config = RunConfig(
            pipeline=_pipeline_config(
                device,
                seg_model,
                nuclei_model,
                mpp,
                no_nuclei,
                refine,
                batch_size=batch_size,
                read_workers=read_workers,
                compile_members=compile_members,
                gpu_decode=gpu_decode,
            ),
            out=out,
            resume=resume,
            qupath=qupath,
            target_classes=tuple(target_class or ()),
            target_names=tuple(target_name or ()),
            search_dirs=tuple(search_dir or ()),
        )
        if engine == "ray":
            outcomes = _run_ray_with_progress(inputs, run_config, address=address, progress=progress)
        else:
            outcomes = _run_with_progress(inputs, run_config, progress=progress)
    except (Pdl1Error, ValueError, OSError) as err:
        raise _fail(err) from err
    except KeyboardInterrupt:
        # Each image is written and recorded as it finishes, so stopping loses only the one in progress.
        raise _interrupted(
            "the images finished before it are written; run the same command with --resume to do the rest"
        ) from None
    _outcome_table(outcomes)
    if report:
        from bridge.report import write_report

        try:
            html_path, _ = write_report(inputs[0] if out is None else out)
            typer.echo(f"report: {html_path}")
        except (Pdl1Error, OSError) as err:  # e.g. every image failed: the table above says why
            console.print(f"[yellow]no report:[/yellow] {err}")
    if any(True for _ in iter_failed(outcomes)):
        raise typer.Exit(code=1)


@app.command("init-project")
def init_project(
    folder: Annotated[Path, typer.Argument(help="New, empty project folder.")],
    slides: Annotated[list[Path], typer.Argument(help="Slides to add.")],
    qupath: Annotated[
        str, typer.Option(help="auto: create through paquo when QuPath is found; never; always.")
    ] = "auto",
) -> None:
    """Create a QuPath project with the PD-L1 classes (and colours), the Groovy scripts and a default config."""
    from bridge.init_project import init_project_files, init_project_qupath
    from bridge.qupath import qupath_available

    try:
        ok, why = qupath_available() if qupath != "never" else (False, "")
        if qupath == "always" and not ok:
            raise _fail(Pdl1Error(why))
        qpproj = init_project_qupath(folder, slides) if ok else init_project_files(folder, slides)
    except (Pdl1Error, ValueError, OSError) as err:
        raise _fail(err) from err
    typer.echo(f"created {qpproj} with {len(slides)} images" + ("" if ok else " (written without QuPath)"))


@app.command("report")
def report_cmd(
    source: Annotated[Path, typer.Argument(help="A project run by `pdl1 run`, or its --out folder for slides.")],
    out: Annotated[Path | None, typer.Option(help="Report folder (default: SOURCE/pdl1/report).")] = None,
) -> None:
    """HTML and CSV report with per-image thumbnails overlaid with regions, uncertainty and candidates."""
    from bridge.report import write_report

    try:
        html_path, csv_path = write_report(source, out)
    except (Pdl1Error, ValueError, OSError) as err:
        raise _fail(err) from err
    typer.echo(f"wrote {html_path} and {csv_path}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo slide, project and report.")] = Path("pdl1-demo"),
    size: Annotated[int, typer.Option(min=1024, max=100_000, help="Phantom edge length in px.")] = 4096,
    seed: Annotated[int, typer.Option(min=0, help="Phantom seed (the demo models never saw 7).")] = 7,
    tps: Annotated[float, typer.Option(min=0, max=100)] = 40.0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Phantom slide -> QuPath project -> run (shipped demo models) -> report, scored against the truth."""
    import json
    import shutil

    from bridge.init_project import init_project_files
    from bridge.phantom_truth import write_truth_geojson
    from bridge.progress import progress_bar
    from bridge.report import write_report
    from bridge.run import RunConfig
    from inference.phantom import PhantomSpec, truth_dir_for, write_phantom

    slide_path = out / "slides" / "phantom.svs"
    project = out / "project"
    try:
        if not (truth_dir_for(slide_path) / "truth.json").is_file():
            with progress_bar("phantom slide", enabled=progress) as on_progress:
                write_phantom(slide_path, PhantomSpec(size, size, seed=seed, tps_percent=tps), on_progress=on_progress)
            write_truth_geojson(truth_dir_for(slide_path))
        if project.exists():
            shutil.rmtree(project)  # the demo's own folder: a fresh project every time
        init_project_files(project, [slide_path])
        run_config = RunConfig(pipeline=_pipeline_config(device, None, None, None), qupath="never")
        outcomes = _run_with_progress([project], run_config, progress=progress)
        html_path, _ = write_report(project)
    except (Pdl1Error, ValueError, OSError) as err:
        raise _fail(err) from err
    _outcome_table(outcomes)
    truth = json.loads((truth_dir_for(slide_path) / "truth.json").read_text())
    done = [o for o in outcomes if o.state == "done"]
    if done and done[0].tps_percent is not None:
        typer.echo(
            f"TPS {done[0].tps_percent:.1f}% vs truth {truth['tps_percent']:.1f}% "
            f"(error {abs(done[0].tps_percent - truth['tps_percent']):.1f} points)"
        )
    typer.echo(f"QuPath project: {project / 'project.qpproj'} (open it, then run scripts/pdl1_import_results.groovy)")
    typer.echo(f"report: {html_path}")
    if len(done) != len(outcomes):
        raise typer.Exit(code=1)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8765,
    token: Annotated[
        str | None, typer.Option(help="Shared secret every request must send as 'Authorization: Bearer TOKEN'.")
    ] = None,
    allow_root: Annotated[
        list[Path] | None,
        typer.Option(help="Folder whose images may be opened (repeatable; default: the current folder)."),
    ] = None,
    models: Annotated[
        Path | None, typer.Option(help="Folder with seg/ and nuclei/ model folders (default: shipped demo).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    keep_results: Annotated[
        int,
        typer.Option(
            min=1, help="Results of this many finished jobs are held for clients to fetch; older ones are released."
        ),
    ] = 16,
) -> None:
    """Start the HTTP service the QuPath scripts call (FastAPI + uvicorn; OpenAPI at /docs)."""
    try:
        import uvicorn

        from bridge.service import ServiceSettings, create_app
    except ImportError as err:
        raise _fail(
            Pdl1Error(f"the service needs the 'serve' extra: pip install 'pdl1-bridge[serve]' ({err})")
        ) from err
    seg = nuclei = None
    if models is not None:
        seg, nuclei = models / "seg", models / "nuclei"
    try:
        settings = ServiceSettings(
            host=host,
            port=port,
            token=token,
            allow_roots=tuple(allow_root or (Path.cwd(),)),
            pipeline=_pipeline_config(device, seg, nuclei, None),
            keep_results=keep_results,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--host/--token/--allow-root") from err
    console.print(
        f"pdl1 serve on http://{host}:{port} (images under {', '.join(str(r) for r in settings.allow_roots)})"
    )
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")


@app.command()
def bench(
    name: Annotated[str, typer.Argument(help="Benchmark to run; 'list' shows them.")] = "list",
    quick: Annotated[bool, typer.Option(help="Smaller inputs, for a smoke run.")] = False,
) -> None:
    """Run a benchmark from benchmarks/ and print its table with ratios against its baseline."""
    from benchmarks import list_benchmarks, run_benchmark

    if name == "list":
        for key, doc in list_benchmarks():
            typer.echo(f"{key:20s} {doc}")
        return
    try:
        run_benchmark(name, quick=quick)
    except (KeyError, RuntimeError) as err:  # unknown name, or a benchmark this machine cannot run
        raise _fail(err) from err


if __name__ == "__main__":  # pragma: no cover
    app()
