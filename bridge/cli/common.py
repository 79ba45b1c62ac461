"""Helpers several ``pdl1`` commands share: consoles, exits, the pipeline config and the batch run with its progress."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

console = Console(stderr=True)
# How to give an image file its pixel size, in the advice of commands that read only the file's (training from slides,
# nnU-Net export, domain statistics): resolution tags, as tifffile writes them.
TIFF_WITH_RESOLUTION = "tifffile: imwrite(path, rgb, resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit='CENTIMETER')"


# --stain's words (pdl1 run's and pdl1 import nnunet's) -> the stain a model manifest names. Also the names the run
# prints ("H&E (colour)", "H-DAB (colour)").
STAIN_WORDS = {"he": "H&E", "ihc": "H-DAB", "h&e": "H&E", "h-dab": "H-DAB"}


def stain_option(value: str) -> str:
    """A --stain value (he, ihc, H&E or H-DAB, in any case) as the stain a model manifest names; refused otherwise
    (pdl1 run's and pdl1 train nuclei's)."""
    word = value.lower()  # HE and IHC as readily as he and ihc
    if word not in STAIN_WORDS:
        raise typer.BadParameter(f"expected he or ihc (or H&E, H-DAB), got {word!r}", param_hint="--stain")
    return STAIN_WORDS[word]


def number_range(low: float | None = None, high: float | None = None) -> dict:
    """``min``, ``max`` and ``parser`` of a float option, to pass as ``typer.Option(..., **number_range(low, high))``;
    either bound may be left out, and with neither the option still takes finite numbers only.

    Typer shows the range in --help and checks it, but said NaN was out of it, in the words of whichever bound it
    compared first ("--mpp nan": "Input should be less than or equal to 64"), and took an infinity beyond a bound it
    lacked (``pdl1 eval nuclei --radius-um inf`` matched every pair, and scored F1 0.98); here text that is no
    number, NaN included, is said to be none, an infinity to be no finite number, and a number outside the range to be
    outside it. Typer checks no range itself for an option with a parser, so the check is all here.

    >>> number_range(0.05, 64)["parser"]("0.5"), number_range(low=0.1)["min"]
    (0.5, 0.1)
    """
    import math

    wanted = (
        f"from {low:g} to {high:g}"
        if low is not None and high is not None
        else f"of {low:g} or more"
        if low is not None
        else f"of {high:g} or less"
        if high is not None
        else "that is finite"
    )

    def parse(value: object) -> float:
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            number = math.nan
        if math.isnan(number):
            raise typer.BadParameter(f"{value} is not a number; give one {wanted}")
        if math.isinf(number) or (low is not None and number < low) or (high is not None and number > high):
            raise typer.BadParameter(f"{value} is outside the range; give a number {wanted}")
        return number

    bounds = {"min": low, "max": high}
    return {**{k: v for k, v in bounds.items() if v is not None}, "parser": parse}


# The width of output that is not a terminal (a log, CI, a batch run's capture): wider than any table or line, so
# none is wrapped or cut. A table stays as wide as its cells (rich does not stretch one that does not expand).
UNCUT_WIDTH = 1_000_000


def stdout() -> Console:
    """Tables go to stdout: at the terminal's width where it is one, else never wrapped or cut (:data:`UNCUT_WIDTH`;
    a log cut at 80 or 160 columns lost long image names and review reasons)."""
    import shutil
    import sys

    return Console(width=shutil.get_terminal_size().columns if sys.stdout.isatty() else UNCUT_WIDTH)


def folded_note(width: int, needed: int, whole_in: str | None = None) -> str:
    """What a table too wide for the terminal says under it: its cells are folded, none cut, and how to get one line
    a row (a file) or where every value also is (``whole_in``, a file the command wrote).

    >>> folded_note(80, 131)
    'the terminal is 80 columns, this table 131: cells are folded onto more lines, none is cut; for one line a row, widen the terminal or send the output to a file (> out.txt)'
    >>> folded_note(80, 131, "pdl1/targets.csv")[-52:]
    '(> out.txt); every value is also in pdl1/targets.csv'
    """
    note = (
        f"the terminal is {width} columns, this table {needed}: cells are folded onto more lines, none is cut; for one "
        "line a row, widen the terminal or send the output to a file (> out.txt)"
    )
    return note if whole_in is None else f"{note}; every value is also in {whole_in}"


def print_table(table: Any, *, whole_in: str | None = None) -> None:
    """Print a rich ``table`` to :func:`stdout`, never cutting a cell: on a terminal narrower than the table a cell is
    wrapped, and a word too long for its column (an image name, a path) folded onto more lines, where rich would cut
    it with …; the table's caption then says so (:func:`folded_note`). Output that is not a terminal is never
    narrower than a table (:data:`UNCUT_WIDTH`)."""
    out = stdout()
    for column in table.columns:
        column.overflow = "fold"
        column.no_wrap = False
    needed = out.measure(table, options=out.options.update_width(UNCUT_WIDTH)).maximum
    if needed > out.width:
        table.caption = folded_note(out.width, needed, whole_in)
        table.caption_justify = "left"
    out.print(table)


def fail(err: Exception) -> typer.Exit:
    from rich.markup import escape

    message = explained(err)
    # Messages quote files ("[analysis]" is no markup) and are not folded: rich broke a path longer than the
    # terminal inside it, so the path a user copies from the message named no file.
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return typer.Exit(code=1)


# Refused to read or to write: a permission, or (Windows) another program holding the file open, as QuPath or a
# spreadsheet does with what it has open.
_NOT_ALLOWED = (
    "you may not write (or read) there: choose a folder you can write to, or fix its permissions; a file another "
    "program holds open (Windows locks it) reads again once that program closes it"
)


def explained(err: Exception) -> str:
    """``err`` as a user reads it: an operating system's error (a read-only or full drive, a folder where a file
    is expected, ...) names the file, what went wrong and what to do, not "[Errno 30] Read-only file system:
    'out'"; any other error is its own message.

    >>> import errno
    >>> explained(OSError(errno.EROFS, "Read-only file system", "out/pdl1"))
    'out/pdl1: Read-only file system; the drive (or mount) is read-only: choose a folder on a writable one'
    >>> explained(ValueError("expected a number"))
    'expected a number'
    """
    import errno

    from inference import Pdl1Error

    if not isinstance(err, OSError) or isinstance(err, Pdl1Error) or err.strerror is None:
        return str(err)
    what = {
        errno.EACCES: _NOT_ALLOWED,
        errno.EPERM: _NOT_ALLOWED,
        errno.EROFS: "the drive (or mount) is read-only: choose a folder on a writable one",
        errno.ENOSPC: "the drive is full: free some space, or choose a folder on another drive",
        errno.EDQUOT: "your disk quota is used up: free some space, or choose a folder on another drive",
        errno.ENOENT: "no such file or folder: check the path",
        errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
        errno.EISDIR: "a folder is where a file was expected: give the file's path",
        errno.ENAMETOOLONG: "the name is too long for the file system: choose a shorter path",
        errno.ELOOP: "a symbolic link on the path leads back to itself: fix or remove that link",
    }.get(err.errno, "check the path and that the drive is there")
    files = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
    return f"{files + ': ' if files else ''}{err.strerror}; {what}"


def interrupted(what_is_kept: str) -> typer.Exit:
    """Ctrl-C: say what survived and how to go on, then exit 130 as a shell expects."""
    from rich.markup import escape

    console.print(
        f"[yellow]interrupted:[/yellow] {escape(what_is_kept)}", soft_wrap=True
    )  # it names paths, which may hold "["
    return typer.Exit(code=130)


def distinct_paths(paths: list[Path], *, done: str) -> list[Path]:
    """``paths`` with each slide or project once (``bridge.project.distinct_inputs``), a note printed for each
    repeat saying what was ``done`` with it."""
    from rich.markup import escape

    from bridge.project import distinct_inputs, repeat_note

    paths, repeats = distinct_inputs(paths)
    for again, first in repeats.items():
        console.print(f"[yellow]note:[/yellow] {escape(repeat_note(again, first, done))}", soft_wrap=True)
    return paths


def check_device(value: str) -> str:
    """A --device option's callback: a misspelt device is a usage error before any work, not torch's traceback
    (listing a dozen device types) at the first model load."""
    from bridge.project_config import problem_with

    problem = problem_with("device", value) or _absent_device(value)
    if problem is not None:
        raise typer.BadParameter(problem)
    return value


def _absent_device(device: str) -> str | None:
    """Why a well-formed --device is not on this machine (a CUDA GPU torch does not see), else None; every
    image of a run failed on it, and the service stopped with uvicorn's traceback."""
    if not device.startswith("cuda"):
        return None  # torch is not imported for the others
    from inference import cuda_device_problem

    problem = cuda_device_problem(device)
    return None if problem is None else f"{device!r} asked for, but {problem}"


def check_runtime_word(value: str) -> str:
    """A --runtime option's callback: a word other than auto, torch or openvino is a usage error."""
    from bridge.project_config import problem_with

    problem = problem_with("runtime", value)
    if problem is not None:
        raise typer.BadParameter(problem)
    return value


def check_device_from_file(settings) -> None:
    """A device the project's config file names (a ``ProjectConfig``'s) but this machine lacks is the file's to
    mend: named there, with its line, not as --device, which the run was not given."""
    from bridge.project_config import FROM_COMMAND_LINE, FROM_DEFAULT, ConfigError

    if settings.source_of("device") in (FROM_COMMAND_LINE, FROM_DEFAULT):
        return  # --device is checked as it is parsed (pdl1 run's in pipeline_config); auto is always there
    problem = _absent_device(settings.device)
    if problem is not None:
        raise ConfigError(
            f"{settings.where('device')}: {problem}; change it in that file, or give --device, which overrides it"
        )


def check_training_device(value: str) -> str:
    """A training command's --device callback: as :func:`check_device`, and training takes no ``auto``."""
    if check_device(value) == "auto":
        raise typer.BadParameter("expected cpu, cuda or cuda:N (training does not choose a device), got 'auto'")
    return value


def pipeline_config(
    device: str,
    seg_model: Path | None,
    nuclei_model: Path | None,
    mpp: float | None,
    no_nuclei: bool = False,
    refine: bool = False,
    *,
    batch_size: int | None = None,
    nuclei_batch_size: int | None = None,
    read_workers: int | None = None,
    compile_members: bool = False,
    gpu_decode: bool | None = None,
    ihc_model: Path | None = None,
    nuclei_tta: bool | None = None,
    runtime: str = "auto",
):
    from bridge.environment import nvimgcodec_backend, openslide_only
    from bridge.project_config import problem_with
    from bridge.user_dirs import openvino_cache_dir
    from inference import NucleiConfig, PipelineConfig, SegmentConfig

    # Not a repeat of check_device: pdl1 run's --device has no parse-time callback (its default is the project's
    # pdl1-config.toml), so a --device it is given is checked here; the file's own device was checked before by
    # check_device_from_file, naming the file's line. The other commands check twice, at no cost.
    problem = problem_with("device", device) or _absent_device(device)
    if problem is not None:  # torch's own error, at the first model load, lists a dozen device types
        raise typer.BadParameter(problem, param_hint="--device")
    return PipelineConfig(
        seg_model_dir=None if seg_model is None else str(seg_model),
        nuclei_model_dir=None if nuclei_model is None else str(nuclei_model),
        ihc_model_dir=None if ihc_model is None else str(ihc_model),
        run_nuclei=not no_nuclei,
        device=device,
        mpp=mpp,
        refine_with_sua=refine,
        segment=SegmentConfig(
            batch_size=batch_size,
            read_workers=read_workers,
            compile=compile_members,
            read_on_device=gpu_decode,
            decode_backend=nvimgcodec_backend(),
            runtime=runtime,
        ),
        # --read-workers reached the segmentation alone: every IHC image read with the nuclei model's 2 threads.
        nuclei=NucleiConfig(
            batch_size=nuclei_batch_size,
            tta=nuclei_tta,
            runtime=runtime,
            **({} if read_workers is None else {"read_workers": read_workers}),
        ),
        openslide_only=openslide_only(),
        openvino_cache_dir=str(openvino_cache_dir()),
    )


# Above this many images, a run's closing table leaves out those --resume skipped (done by an earlier run).
SKIPPED_ROWS_SHOWN = 25


def outcome_table(outcomes, *, batch: int | None = None) -> None:
    from collections import Counter

    from rich.markup import escape
    from rich.table import Table

    from bridge.project import alike
    from bridge.review_advice import RUN_STAIN_FIX, review_advice
    from inference import INSUFFICIENT, cps_shown, cps_text, tps_text

    table = Table(title="pdl1 run")
    columns = ("image", "state", "stain", "TPS %", "category", "positive area %", "uncertainty", "candidates", "time s")
    ihc = any(o.cps_percent is not None for o in outcomes)
    if ihc:  # a PD-L1 IHC's CPS beside its TPS (an H&E has none: the column only where an image has one)
        columns = (*columns[:5], "CPS", *columns[5:])
    for col in columns:
        table.add_column(col, justify="left" if col in ("image", "state", "stain", "category") else "right")
    # QuPath lets two entries share an image name (one file typed H&E and H-DAB, 1.svs of two cases): those rows,
    # and the lines below, name the entry too. Plain slides cannot share a name (their outputs are named by it).
    shared = {name for name, count in Counter(o.name for o in outcomes).items() if count > 1}

    def label(o) -> str:
        return f"{o.name} (entry {o.key})" if o.name in shared else o.name

    # A --resume of a long batch: its rows of images done earlier buried the few this run analysed or failed on
    # (159 of 160 rows, with their review lines; helper-135). Left out above a few, and counted.
    # ``batch``: the images of the run, of which ``outcomes`` are those finished (a run stopped part-way).
    skipped = [o for o in outcomes if o.state == "skipped"]
    if (batch or len(outcomes)) > SKIPPED_ROWS_SHOWN and skipped and len(skipped) < len(outcomes):
        outcomes = [o for o in outcomes if o.state != "skipped"]
    else:
        skipped = []

    def cps_cell(o) -> str:
        # Under 100 tumour cells with its category, as the TPS's category column says (the TPS's cells are the CPS's).
        if o.cps_percent is None:
            return ""
        return cps_shown(cps_text(o.cps_percent), INSUFFICIENT if o.tps_category == INSUFFICIENT else None)

    for o in outcomes:

        def num(v, fmt=".1f"):
            return "" if v is None else format(v, fmt)

        flag = "" if o.uncertainty_flag is None else ("needs review" if o.uncertainty_flag else "ok")
        # A stain told from the colour is marked: a wrong call sends an image down the other stain's path.
        stain = (
            ""
            if o.stain is None
            else o.stain + (" (colour)" if (o.stain_source or "").startswith("its colour") else "")
        )
        tps = ("" if o.tps_percent is None else tps_text(o.tps_percent)) + (
            " (pred.)" if o.stain == "H&E" and o.tps_percent is not None else ""
        )
        # A row --resume skipped shows the results the earlier run recorded (blank, they read as lost), and says so.
        state = {"failed": "[red]failed[/red]", "skipped": "skipped (done earlier)"}.get(o.state, o.state)
        table.add_row(
            escape(label(o)),  # a file name may hold brackets, which rich reads as markup
            state,
            stain,
            tps,
            o.tps_category or "",
            *([] if not ihc else [cps_cell(o)]),
            num(o.positive_area_pct),
            flag,
            num(o.candidates, "d"),
            "" if o.state == "skipped" else num(o.seconds),  # this run spent none on it
        )
    if outcomes:
        print_table(table, whole_in="pdl1/targets.csv and each image's summary.json")
    if skipped:
        stdout().print(
            f"{len(skipped)} image{'s' if len(skipped) > 1 else ''} done by an earlier run "
            f"{'are' if len(skipped) > 1 else 'is'} left out of this table (their results are kept, in targets.csv "
            "beside the run's status.json; `pdl1 report` shows every image)",
            markup=False,
            highlight=False,
        )
    # Why each flagged image needs review, where a pathologist sees it (a stated stain its colour contradicts,
    # an image outside the model's domain): the table's "needs review" alone says not where to look.
    flagged = [o for o in outcomes if o.uncertainty_flag and o.review_reasons]
    for o in flagged:
        stdout().print(f"{label(o)}: needs review: {'; '.join(o.review_reasons)}", markup=False, highlight=False)
    # And what to do about each kind of reason, once: the reason says what tripped, not where to look.
    print_advice(
        "What to check:", review_advice((r for o in flagged for r in o.review_reasons), stain_fix=RUN_STAIN_FIX)
    )
    # Errors alike but for the image's own name (a slide folder that moved: one line per image, 160 of them;
    # helper-135) are said once, with the first image's, and the others named after it.
    for group in alike({o: o.error for o in outcomes if o.error}, _own_names).values():
        o = group[0]
        if o.name in o.error and o.name not in shared:  # our errors name their file already: say it once
            console.print(o.error, markup=False, highlight=False, soft_wrap=True)
        else:
            # Escaped: an error may hold brackets ("[models]" of a config, a path) that rich would take for markup.
            console.print(f"[red]{escape(label(o))}:[/red] {escape(o.error)}", highlight=False, soft_wrap=True)
        if len(group) > 1:
            others = ", ".join(label(x) for x in group[1:])
            console.print(
                f"and {len(group) - 1} more failed alike: {others}", markup=False, highlight=False, soft_wrap=True
            )


def _own_names(outcome) -> list[str]:
    """What names an image in its error (its file name, stem and entry), left out to tell errors alike."""
    stem = Path(outcome.name).stem
    return [outcome.name, f"entry {outcome.key}"] + ([stem] if len(stem) > 2 else [])  # "a" would blank every a


def nothing_left_to_do(outcomes, *, shown: int = 5) -> str:
    """What a ``--resume`` run that skipped every image says instead of its table, naming those it skipped (the
    first ``shown`` of them).

    >>> from bridge.run import ImageOutcome
    >>> nothing_left_to_do([ImageOutcome("a", "a.svs", "skipped")])
    'nothing left to do: an earlier run finished the 1 image, so --resume skipped it: a.svs'
    >>> nothing_left_to_do([ImageOutcome(n, n, "skipped") for n in "abcdefg"], shown=2)
    'nothing left to do: an earlier run finished all 7 images, so --resume skipped them: a, b and 5 more'
    """
    from bridge.project import first_names

    names = [o.name for o in outcomes]
    listed = first_names(names, shown=shown)
    which = (
        "the 1 image, so --resume skipped it"
        if len(names) == 1
        else f"all {len(names)} images, so --resume skipped them"
    )
    return f"nothing left to do: an earlier run finished {which}: {listed}"


def print_advice(title: str, advice: list[str]) -> None:
    """What to check (:func:`bridge.review_advice.review_advice`'s lines) under a table, after ``title``; nothing
    when there is none."""
    if advice:
        stdout().print(title, markup=False, highlight=False)
        for line in advice:
            stdout().print(f"  - {line}", markup=False, highlight=False, soft_wrap=True)


def pairs_table(path) -> None:
    """The cases a run compared (``pdl1/pairs.json``): H&E-predicted against IHC-measured, per case."""
    import json

    from rich.markup import escape
    from rich.table import Table

    from bridge.pairs import core_agreement_text
    from bridge.project import review_reason_text
    from bridge.review_advice import CASE_STAIN_FIX, review_advice
    from inference import tps_text

    cases = json.loads(path.read_text())["cases"]
    table = Table(title=f"H&E vs PD-L1 IHC, per case ({path})")
    columns = [
        "case",
        "TPS H&E (predicted)",
        "TPS IHC",
        "Dice",
        "registration µm",
        "entropy disagree / agree",
        "review",
    ]
    # A TMA's whole-image TPS mixes every core: its cores' agreement is what tells, in a column of its own, only
    # where a case has cores (a run without TMAs keeps the table it had).
    tma = any("cores_summary" in r or "why_cores_not_compared" in r for r in cases.values())
    if tma:
        columns.append("TMA cores")
    for col in columns:
        table.add_column(col, justify="left" if col in ("case", "review") or col.startswith("TMA") else "right")
    for case, record in cases.items():
        cores = []
        if tma:
            summary = record.get("cores_summary")
            cores = [escape(core_agreement_text(summary) if summary else record.get("why_cores_not_compared", ""))]
        c = record.get("comparison")
        if not c:
            # Why, in the review column, where a reader looks for what is wrong with a case: under "TPS H&E" it
            # read as the H&E's score. rich has no cell spanning columns, so the numbers' cells stay empty.
            why = record.get("why_not_compared", "") or "not compared"
            table.add_row(escape(case), "", "", "", "", "", escape(why), *cores)
            continue

        def num(v, fmt=".1f"):
            return "n/a" if v is None else format(v, fmt)

        table.add_row(
            escape(case),  # a case name is the user's metadata: brackets in it are no markup
            "n/a" if c["tps_he_predicted"] is None else tps_text(c["tps_he_predicted"]),
            "n/a" if c["tps_ihc"] is None else tps_text(c["tps_ihc"]),
            num(c["dice"], ".3f"),
            num(record["registration"]["error_um"]),
            f"{num(c['entropy_disagree'], '.3f')} / {num(c['entropy_agree'], '.3f')}",
            escape("; ".join(review_reason_text(r) for r in record.get("review_reasons", []))) or "ok",
            *cores,
        )
    print_table(table, whole_in=str(path))
    reasons = (r.get("reason", "") for record in cases.values() for r in record.get("review_reasons", []))
    # A case's images are of both stains: --stain would state its partner's too, so the fix is that image's type.
    print_advice("What to check (cases):", review_advice(reasons, stain_fix=CASE_STAIN_FIX))


def run_with_progress(inputs, run_config, *, progress: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from bridge.progress import ProgressLines, writes_to_terminal
    from bridge.run import run_batch

    if not progress:
        return run_batch(inputs, run_config)
    if not writes_to_terminal(console.file):  # a log (nohup, a scheduler): a line as each image starts, and at the end
        lines = ProgressLines("images")
        tiles = [ProgressLines("tiles")]  # a slide's own: a line at most every 30 s through a long one
        total = [0]

        def on_image_line(i: int, n: int, name: str) -> None:
            total[0] = n
            lines.update(i, n, f"next: {name}", always=True)
            tiles[0] = ProgressLines(f"tiles of {name}")

        outcomes = run_batch(
            inputs, run_config, on_image=on_image_line, on_tiles=lambda done, n: tiles[0].update(done, n)
        )
        if total[0]:
            lines.update(total[0], total[0], always=True)
        return outcomes
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
    )
    # The bars start with the first image: a run refused before any (no --out for slides, a project and slides
    # together) drew two empty bars above its error.
    tasks: dict[str, int] = {}

    def task(name: str) -> int:
        if not tasks:
            bar.start()
            tasks["images"] = bar.add_task("images", total=None)
            tasks["tiles"] = bar.add_task("tiles", total=None)
        return tasks[name]

    def on_image(i: int, n: int, name: str) -> None:
        bar.update(task("images"), completed=i, total=n, description=f"images ({name})")
        # Hidden until the image reports tiles: one that fails before tiling (a slide not found) showed the
        # last image's 'tiles 0/25', or a first one 'tiles 0/?', to the end of the run.
        bar.reset(task("tiles"), visible=False)

    def on_tiles(done: int, total: int) -> None:
        bar.update(task("tiles"), completed=done, total=total, visible=True)

    try:
        outcomes = run_batch(inputs, run_config, on_image=on_image, on_tiles=on_tiles)
        if tasks:
            bar.update(tasks["images"], completed=len(outcomes))
    finally:
        if tasks:
            tiles = next(t for t in bar.tasks if t.id == tasks["tiles"])
            if not tiles.finished:  # the last image failed (or was stopped) before its tiles were done
                bar.update(tasks["tiles"], visible=False)
            bar.stop()
    return outcomes


def require_out_folder(out: Path | None, *, what: str) -> None:
    """--out names a folder (new, or one that exists): a file there, or above it, would only fail at the end,
    after all the computing."""
    from bridge.project import not_a_folder

    problem = None if out is None else not_a_folder(out)
    if problem is not None:
        raise typer.BadParameter(f"{out} {problem}; --out must be a folder for {what}", param_hint="--out")


def _writable(path: Path) -> bool:
    """Whether ``path`` (a folder or a file) can be written, or its nearest existing parent where it does not exist."""
    import os

    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0))


def check_model_target(source: Path, out: Path | None, *, what: str = "a calibrated copy") -> None:
    """Refuse, before minutes of work, a model target that could not be written or would be wrongly overwritten:
    ``source`` itself (``out`` None or the same folder: its manifest is rewritten in place) or a new ``out``."""
    from inference import demo_model_dir

    require_out_folder(out, what=what)
    if out is None or out.resolve() == source.resolve():
        if source.resolve().is_relative_to(demo_model_dir("seg").resolve().parent):
            # Rewritten in place, the shipped model kept its name and checksums: every later run reported "shipped
            # demo" models with this command's statistics or limits.
            raise typer.BadParameter(
                f"{source} is a shipped demo model, which is read-only: pass --out DIR for {what}", param_hint="--out"
            )
        if not _writable(source) or not _writable(source / "manifest.json"):
            raise typer.BadParameter(
                f"{source} is not writable, so its manifest cannot be updated; pass --out DIR for {what}"
            )
        return
    if (out / "manifest.json").exists():
        raise typer.BadParameter(
            f"{out} already holds a model ({out / 'manifest.json'}), which {what} would overwrite; give a new "
            f"folder, or update that model in place by naming it as the model",
            param_hint="--out",
        )
    if out.is_dir() and any(out.iterdir()):
        raise typer.BadParameter(f"{out} is not empty; give a new or empty folder for {what}", param_hint="--out")
    if not _writable(out.parent):
        raise typer.BadParameter(f"cannot write in {out.parent}; give a folder you can write to", param_hint="--out")


def write_model_copy(source: Path, out: Path, manifest) -> None:
    """``source``'s model with ``manifest`` instead of its own, made in a temporary folder beside ``out`` and
    renamed into place, so an interrupted or failed command leaves no half-written model (the checkpoint of
    its training is left out)."""
    import shutil

    from bridge.atomic import folder_replaced_whole
    from inference import write_manifest

    with folder_replaced_whole(out) as part:
        shutil.copytree(source, part, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoint", "*.part"))
        write_manifest(part, manifest)


def warn_of_count(labels, count: str, says: str) -> None:
    """A warning naming each slide whose labels (``SlideLabels``) counted ``count``, with how many, then ``says``."""
    named = [f"{lab.source or lab.slide} ({lab.counts[count]})" for lab in labels if lab.counts.get(count)]
    if named:
        typer.echo(f"warning: {', '.join(named)}: {says}", err=True)
