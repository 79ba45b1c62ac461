"""The ``pdl1`` Typer app: the ``--log-level`` callback, ``version``, and every command and sub-app registered.

Importing this module is cheap: models, torch and slide readers load inside the commands.
"""

from __future__ import annotations

import logging
import warnings
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from bridge.cli import demo, evaluate, nnunet, run, serve, train
from bridge.cli.common import fail, interrupted
from inference import __version__, tune_allocator, tune_openmp


class _Pdl1Group(TyperGroup):
    """The root group: says what a Ctrl-C that no command caught stopped. Each command says what its own work
    kept; one that comes before that work (while the command loads its libraries, torch taking a second or two, and
    checks its input) reached Typer, which ends with exit 130 and not a word."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise interrupted(STARTING_INTERRUPTED) from None


# What a Ctrl-C that no command caught stopped: every command that writes catches its own around its work.
STARTING_INTERRUPTED = "while starting, before the command began its work; nothing was written"

app = typer.Typer(
    cls=_Pdl1Group,
    rich_markup_mode=None,
    name="pdl1",
    help="Uncertainty-aware PD-L1 deep learning for QuPath: phantom data, models, batch runs and the service.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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
    # Pillow's warning on a cut-off TIFF, with a line of its own source, came before the message that names the
    # damage and the fix (inference.slides.slide.damage_advice); that one is enough.
    warnings.filterwarnings("ignore", message="Truncated File Read", category=UserWarning, module=r"PIL\.")
    tune_allocator()  # before any model runs: tile buffers stay in the process (inference.allocator)
    tune_openmp()  # before torch loads: its threads stop spinning beside other busy processes (inference.openmp)


@app.command()
def version() -> None:
    """Print the version of pdl1-bridge and of the libraries it runs on."""
    import platform

    import numpy

    typer.echo(f"pdl1-bridge {__version__}")
    try:
        import openslide  # loads the OpenSlide library itself, which may be missing or broken

        openslide_version, broken = openslide.__library_version__, None
    except (ImportError, OSError) as err:  # the other versions are still worth printing, before the fix
        openslide_version, broken = "(cannot be loaded)", err
    typer.echo(f"python {platform.python_version()}, numpy {numpy.__version__}, openslide {openslide_version}")
    typer.echo(", ".join(f"{name} {_installed_version(name)}" for name in _RUNS_ON))
    if broken is not None:
        raise fail(
            RuntimeError(
                f"OpenSlide cannot be loaded ({type(broken).__name__}: {broken}); slides are read through it: "
                "reinstall it (pip install --force-reinstall openslide-python openslide-bin)"
            )
        ) from broken


# The libraries the analysis runs on beside numpy and OpenSlide, read from their installed metadata (importing torch
# would take seconds); the optional ones say when they are not installed.
_RUNS_ON = ("torch", "paquo", "shapely", "scikit-image", "fastapi", "openvino")


def _installed_version(name: str) -> str:
    """``name``'s installed version, or "(not installed)"."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed(name)
    except PackageNotFoundError:
        return "(not installed)"


# The order here is the order of `pdl1 --help`; the sub-apps are listed after the commands.
app.command("phantom")(demo.phantom)
app.command("calibrate")(evaluate.calibrate)
app.command("domain-stats")(train.domain_stats)
app.command("run")(run.run)
app.command("init-project")(run.init_project)
app.command("report")(run.report_cmd)
app.command("review-queue")(run.review_queue_cmd)
app.command("demo")(demo.demo)
app.command("serve")(serve.serve)
app.command("bench")(demo.bench)
app.add_typer(train.app, name="train")
app.add_typer(evaluate.app, name="eval")
app.add_typer(nnunet.import_app, name="import")
app.add_typer(nnunet.export_app, name="export")


if __name__ == "__main__":  # pragma: no cover
    app()
