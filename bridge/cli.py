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
