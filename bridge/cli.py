"""The ``pdl1`` command line.

Importing this module is cheap: models, torch and slide readers load inside the commands.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

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
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Write a phantom H&E slide with its PD-L1 truth beside it (OUT stem + '.truth/')."""
    from bridge.phantom_truth import write_truth_geojson
    from bridge.progress import progress_bar
    from inference.phantom import PhantomSpec, write_phantom

    try:
        spec = PhantomSpec(size, height or size, seed=seed, mpp=mpp, tps_percent=tps, shift=shift)
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


train_app = typer.Typer(help="Train models on phantom slides with truth.", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluate models on phantom slides against their truth.", no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")


def _features(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError as err:
        raise typer.BadParameter(f"expected comma-separated widths like 8,16,32,64, got {text!r}") from err
    if len(values) < 2 or min(values) < 1:
        raise typer.BadParameter(f"need at least two positive widths, got {text!r}")
    return values


@train_app.command("seg")
def train_seg(
    slides: Annotated[list[Path], typer.Argument(help="Phantom slides with truth beside them (pdl1 phantom).")],
    out: Annotated[Path, typer.Option(help="Model folder to write (manifest + members).")],
    cycles: Annotated[int, typer.Option(min=1, help="Cosine cycles (warm restarts).")] = 5,
    epochs_per_cycle: Annotated[int, typer.Option(min=1)] = 4,
    iterations: Annotated[int, typer.Option(min=1, help="Iterations per epoch.")] = 40,
    members_per_cycle: Annotated[int, typer.Option(min=1, help="Members from the low-LR end of each cycle.")] = 1,
    drop_first_cycle: Annotated[bool, typer.Option(help="Leave out the first cycle's members.")] = True,
    optimizer: Annotated[str, typer.Option(help="adamw, or sgd (Nesterov momentum 0.99, as nnU-Net).")] = "adamw",
    lr_max: Annotated[float, typer.Option(min=0, help="Learning rate at the start of each cycle.")] = 3e-3,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    patch_px: Annotated[int, typer.Option(min=16, help="Training patch edge in model px.")] = 128,
    features: Annotated[str, typer.Option(help="U-Net stage widths.")] = "8,16,32,64",
    input_mpp: Annotated[float, typer.Option(min=0.1, help="Model input resolution, µm/px.")] = 2.0,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint if present.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train a segmentation ensemble the nnUNet-B way (cyclic LR, members at the low ends)."""
    from bridge.progress import progress_bar
    from inference.train_seg import SegTrainConfig, train_segmentation

    try:
        config = SegTrainConfig(
            slides=tuple(str(s) for s in slides),
            out_dir=str(out),
            cycles=cycles,
            epochs_per_cycle=epochs_per_cycle,
            iterations_per_epoch=iterations,
            members_per_cycle=members_per_cycle,
            drop_first_cycle=drop_first_cycle,
            optimizer=optimizer,
            lr_max=lr_max,
            lr_min=lr_max / 100,
            batch_size=batch_size,
            patch_px=patch_px,
            features=_features(features),
            input_mpp=input_mpp,
            seed=seed,
            device=device,
        )
        with progress_bar("training", enabled=progress) as on_progress:
            manifest = train_segmentation(config, resume=resume, on_progress=on_progress)
    except (Pdl1Error, ValueError, OSError) as err:
        raise _fail(err) from err
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
    """Dice of the ensemble and of every member, and AUROC of uncertainty for pixel errors."""
    from rich.table import Table

    from bridge.progress import progress_bar
    from inference.ensemble import Ensemble, demo_model_dir
    from inference.evaluate import evaluate_segmentation

    out = Console()
    try:
        ensemble = Ensemble.load(model or demo_model_dir("seg"), task="segmentation", device=device)
        for slide in slides:
            with progress_bar(f"eval {slide.name}", enabled=progress) as on_progress:
                result, _ = evaluate_segmentation(slide, ensemble, threshold=threshold, on_progress=on_progress)
            table = Table(title=f"{slide.name}: segmentation vs truth ({result.pixels} tissue px)")
            table.add_column("metric")
            table.add_column("value", justify="right")
            table.add_row("Dice, ensemble", f"{result.dice_ensemble:.4f}")
            for i, d in enumerate(result.dice_members):
                table.add_row(f"Dice, member {i}", f"{d:.4f}")
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


@train_app.command("nuclei")
def train_nuclei_cmd(
    slides: Annotated[list[Path], typer.Argument(help="Phantom slides with truth beside them (pdl1 phantom).")],
    out: Annotated[Path, typer.Option(help="Model folder to write (manifest + members).")],
    cycles: Annotated[int, typer.Option(min=1, help="Cosine cycles (warm restarts).")] = 3,
    epochs_per_cycle: Annotated[int, typer.Option(min=1)] = 3,
    iterations: Annotated[int, typer.Option(min=1, help="Iterations per epoch.")] = 40,
    members_per_cycle: Annotated[int, typer.Option(min=1)] = 1,
    drop_first_cycle: Annotated[bool, typer.Option(help="Leave out the first cycle's members.")] = True,
    optimizer: Annotated[str, typer.Option(help="adamw or sgd.")] = "adamw",
    lr_max: Annotated[float, typer.Option(min=0)] = 3e-3,
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

    try:
        config = NucleiTrainConfig(
            slides=tuple(str(s) for s in slides),
            out_dir=str(out),
            cycles=cycles,
            epochs_per_cycle=epochs_per_cycle,
            iterations_per_epoch=iterations,
            members_per_cycle=members_per_cycle,
            drop_first_cycle=drop_first_cycle,
            optimizer=optimizer,
            lr_max=lr_max,
            lr_min=lr_max / 100,
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

    out = Console()
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


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo slide and results.")] = Path("pdl1-demo"),
    size: Annotated[int, typer.Option(min=1024, max=100_000, help="Phantom edge length in px.")] = 4096,
    seed: Annotated[int, typer.Option(min=0, help="Phantom seed (the demo models never saw 7).")] = 7,
    tps: Annotated[float, typer.Option(min=0, max=100)] = 40.0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Phantom slide -> shipped demo ensemble -> QuPath GeoJSON + summary, scored against the truth."""
    import json

    from bridge.objects import analysis_annotation, result_objects
    from bridge.phantom_truth import write_truth_geojson
    from bridge.progress import progress_bar
    from bridge.qupath_geojson import to_feature, write_features
    from inference.evaluate import evaluate_segmentation_maps, seg_truth_on_maps
    from inference.phantom import PhantomSpec, truth_dir_for, write_phantom
    from inference.pipeline import Models, PipelineConfig, analyse_slide
    from inference.regions import resample_mask
    from inference.slide import open_slide
    from inference.tissue import tissue_mask_for_slide

    slide_path = out / "phantom.svs"
    try:
        if not (truth_dir_for(slide_path) / "truth.json").is_file():
            with progress_bar("phantom slide", enabled=progress) as on_progress:
                write_phantom(slide_path, PhantomSpec(size, size, seed=seed, tps_percent=tps), on_progress=on_progress)
            write_truth_geojson(truth_dir_for(slide_path))
        config = PipelineConfig(device=device)
        models = Models(config)
        with progress_bar("segmentation ensemble", enabled=progress) as on_progress:
            result = analyse_slide(slide_path, models=models, config=config, on_progress=on_progress)
        geojson = out / "phantom.geojson"
        n = write_features(geojson, (to_feature(o) for o in [analysis_annotation(result), *result_objects(result)]))
        maps = result.maps
        truth = seg_truth_on_maps(slide_path, maps)
        with open_slide(slide_path) as slide:
            tissue = tissue_mask_for_slide(slide)
        region = (
            resample_mask(
                tissue.mask,
                tissue.downsample,
                shape_hw=maps.shape,
                origin_xy=maps.origin_xy,
                downsample=maps.downsample,
            )
            & maps.covered
        )
        scores = evaluate_segmentation_maps(maps, truth, region, threshold=result.summary["threshold"])
        summary = {
            "slide": str(slide_path),
            "run_id": result.run_id,
            "model": result.seg_model.name,
            "model_sha256": result.seg_model.sha256,
            "regions": len(result.regions),
            "tiles": len(result.tiles),
            "positive_area_um2": result.positive_area_um2,
            "analysed_area_um2": result.analysed_area_um2,
            "dice_vs_truth": scores.dice_ensemble,
            "auroc_entropy_error": scores.auroc_entropy_error,
            "config_hash": result.config_hash,
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    except (Pdl1Error, ValueError, OSError) as err:
        raise _fail(err) from err
    typer.echo(
        f"wrote {geojson} ({n} QuPath objects: {len(result.regions)} PD-L1 positive regions, "
        f"{len(result.tiles)} uncertainty tiles) and {out / 'summary.json'}"
    )
    area_pct = 100 * result.positive_area_um2 / max(result.analysed_area_um2, 1e-9)
    typer.echo(
        f"positive area {area_pct:.1f}% of analysed tissue; Dice vs truth {scores.dice_ensemble:.3f}; "
        f"AUROC entropy->error {scores.auroc_entropy_error:.3f}"
    )
    typer.echo(f"open {slide_path} in QuPath and drag {geojson.name} onto it to see the result")


@app.command()
def bench(
    name: Annotated[str, typer.Argument(help="Benchmark to run; 'list' shows them.")] = "list",
    quick: Annotated[bool, typer.Option(help="Smaller inputs, for a smoke run.")] = False,
) -> None:
    """Run a benchmark from benchmarks/ and print its table with ratios against its baseline."""
    from benchmarks import BENCHMARKS, run_benchmark

    if name == "list":
        for key, bench_cls in BENCHMARKS.items():
            typer.echo(f"{key:20s} {bench_cls.__doc__.strip().splitlines()[0]}")
        return
    try:
        run_benchmark(name, quick=quick)
    except KeyError as err:
        raise _fail(err) from err


if __name__ == "__main__":  # pragma: no cover
    app()
