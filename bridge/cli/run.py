"""``pdl1 run``, ``pdl1 report``, ``pdl1 review-queue`` and ``pdl1 init-project``: batch analysis into QuPath
projects, its report and the review queue."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from bridge.cli.common import (
    check_device_from_file,
    console,
    distinct_paths,
    fail,
    interrupted,
    nothing_left_to_do,
    number_range,
    outcome_table,
    pairs_table,
    pipeline_config,
    run_with_progress,
    stain_option,
    stdout,
)
from bridge.options import option_setting
from bridge.project_config import ProjectConfig, config_path_for, problem_with, read_project_config
from bridge.targets import TARGETS_FILE
from inference import Pdl1Error

_OPTION_OF = {
    "device": "--device",
    "runtime": "--runtime",
    "outputs": "--output",
    "target_classes": "--class",
    "target_names": "--name",
    "uncertainty_tile_um": "--uncertainty-tile-um",
    "min_region_area_um2": "--min-region-area-um2",
    "seg_model": "--seg-model",
    "nuclei_model": "--nuclei-model",
    "ihc_model": "--ihc-model",
    "case_key": "--case-key",
}


def _settings(
    inputs: list[Path], config: Path | None, *, no_config: bool, given: dict[str, object], nuclei: bool | None
) -> ProjectConfig:
    """The run's settings: the options given, over the project's pdl1-config.toml (or --config), over the
    built-in defaults; ``nuclei`` (--nuclei/--no-nuclei) puts nuclei into the outputs or takes it out."""
    path = None if no_config else config or config_path_for(inputs)
    settings = (ProjectConfig() if path is None else read_project_config(path)).with_overrides(**given)
    if path is not None:
        console.print(f"settings: {path} (options given here override it)", soft_wrap=True, markup=False)
    if nuclei is False and "nuclei" in settings.outputs:
        # outputs = ["nuclei"] less nuclei is the regions alone (pdl1 run writes them always), not an empty list
        settings = settings.with_overrides(outputs=[o for o in settings.outputs if o != "nuclei"] or ["regions"])
    if nuclei and "nuclei" not in settings.outputs:
        settings = settings.with_overrides(outputs=[*settings.outputs, "nuclei"])
    if "regions" not in settings.outputs:
        console.print(
            f"[yellow]note:[/yellow] the outputs ({settings.source_of('outputs')}) leave out regions; pdl1 run "
            "writes them all the same, since the analysed annotation's positive-area measurements describe them",
            soft_wrap=True,
            highlight=False,
        )
    return settings


def _run_ray_with_progress(inputs, run_config, *, address, progress: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from bridge.engine_ray import run_batch_ray

    if not progress:
        return run_batch_ray(inputs, run_config, address=address)
    from bridge.progress import ProgressLines, writes_to_terminal

    if not writes_to_terminal(console.file):  # a log: a line as each image finishes (rich's bar drew only at its end)
        lines = ProgressLines("images (ray)")
        return run_batch_ray(
            inputs,
            run_config,
            address=address,
            on_image=lambda done, n, name: lines.update(done, n, f"last: {name}", always=True),
        )
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
    )
    # The bar starts with the first image finished, as the local engine's with the first begun: one started at
    # once stayed an empty 'images (ray) 0/?' above a refusal (nothing at --address) or a --resume that skipped all.
    images: list[int] = []

    def on_image(done: int, n: int, name: str) -> None:
        if not images:
            bar.start()
            images.append(bar.add_task("images (ray)", total=None))
        bar.update(images[0], completed=done, total=n, description=f"images (ray; last: {name})")

    try:
        return run_batch_ray(inputs, run_config, address=address, on_image=on_image)
    finally:
        if images:
            bar.stop()


# Each model option: the task and stain of the model it takes.
_MODEL_KIND = {
    "seg_model": ("segmentation", "H&E"),
    "nuclei_model": ("nuclei", "H&E"),
    "ihc_model": ("nuclei", "H-DAB"),
}


def _check_model_kinds(settings) -> None:
    """A model of another kind or stain than its option takes is refused before any image (each image failed
    with "a 'nuclei' model, but a 'segmentation' model is needed here", naming no option), and so is a folder that
    is not there (each image failed, blaming "the model option" for the config file's key). A model folder that
    does not read is left to the run, which names it per image."""
    from inference import ModelFileError, read_manifest, wrong_model_message

    for name, (task, stain) in _MODEL_KIND.items():
        folder = getattr(settings, name)
        if folder is None:
            continue
        option = _OPTION_OF[name]
        # Named with the file and line where the config file gave it, and undone there.
        from_file = settings.source_of(name) == str(settings.path)
        given = f"{settings.where(name)} = {folder}" if from_file else str(folder)
        shipped = "or remove the key for the shipped one" if from_file else f"or leave {option} out for the shipped one"
        if not Path(folder).is_dir():
            what = "a file, not a model folder" if Path(folder).exists() else "no such model folder"
            relative = " (a relative path is to the config file's folder)" if from_file else ""
            raise typer.BadParameter(
                f"{given}: {what}; give the folder that holds manifest.json and its members{relative}, {shipped}",
                param_hint=option,
            )
        try:
            manifest = read_manifest(folder, verify=False)
        except ModelFileError:
            continue
        if (manifest.task, manifest.stain) != (task, stain):
            fits = [other for other, kind in _MODEL_KIND.items() if kind == (manifest.task, manifest.stain)]
            fix = f"give one{f' (this one is for {_OPTION_OF[fits[0]]})' if fits else ''}, {shipped}"
            raise typer.BadParameter(
                wrong_model_message(given, manifest, task=task, stain=stain, needed_for=f"for {option}", fix=fix),
                param_hint=option,
            )


def run(
    inputs: Annotated[list[Path], typer.Argument(help="A QuPath project (folder or .qpproj), or slide files.")],
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output folder for plain slides (one GeoJSON + summary each); a project's results go into the "
            "project, so it takes none."
        ),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Skip images a previous run finished.")] = False,
    report: Annotated[bool, typer.Option(help="Write the HTML/CSV report afterwards.")] = False,
    target_class: Annotated[
        list[str] | None,
        typer.Option(
            "--class",
            help="Analyse annotations of this class (repeatable; a project's, read through QuPath, or without it "
            "from each image's export by qupath_scripts/pdl1_export_labels.groovy; an image without any but with a "
            "TMA grid has its cores analysed instead). Default: from pdl1-config.toml (target_classes), else none: "
            "each TMA core of an image with a TMA grid (through QuPath or its export), else the whole tissue of each "
            "image.",
        ),
    ] = None,
    target_name: Annotated[
        list[str] | None,
        typer.Option(
            "--name",
            help="Analyse annotations with this name (repeatable; read as --class's are). Default: from "
            "pdl1-config.toml (target_names), else none.",
        ),
    ] = None,
    case_key: Annotated[
        str | None,
        typer.Option(
            help="The entry metadata key that names each image's case, to pair an H&E with its PD-L1 IHC (images "
            "without it are paired by file name: B12_HE.svs, B12_PD-L1_22C3.svs). Default: from pdl1-config.toml "
            "(pairs.case_key), else case.",
        ),
    ] = None,
    output: Annotated[
        list[str] | None,
        typer.Option(
            help="What to compute and write: regions, uncertainty_tiles, sua, nuclei (repeatable; the regions "
            "are always written, and so are a PD-L1 IHC's cells, which are its score). Default: from "
            "pdl1-config.toml (outputs), else all four.",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="Settings file to take defaults from. Default: pdl1-config.toml beside the project, if there "
            "is one; options given here override it.",
            dir_okay=False,
        ),
    ] = None,
    no_config: Annotated[
        bool, typer.Option("--no-config", help="Ignore pdl1-config.toml: built-in defaults and these options only.")
    ] = False,
    search_dir: Annotated[
        list[Path] | None,
        typer.Option(
            help="Folder to search, with its subfolders, for slides that moved (repeatable). Written through "
            "QuPath, each entry whose slide is found away from its URI is pointed at it (as QuPath's Check project "
            "URIs does).",
            exists=True,
            file_okay=False,
        ),
    ] = None,
    qupath: Annotated[
        str,
        typer.Option(
            help="auto: write into the project via paquo when QuPath is found, else sidecars for "
            "pdl1_import_results.groovy (targets then read from pdl1_export_labels.groovy's export); never; always."
        ),
    ] = "auto",
    seg_model: Annotated[
        Path | None,
        typer.Option(
            help="Segmentation ensemble folder. Default: from pdl1-config.toml (models.segmentation), else the "
            "shipped demo."
        ),
    ] = None,
    nuclei_model: Annotated[
        Path | None,
        typer.Option(
            help="Nuclei model folder. Default: from pdl1-config.toml (models.nuclei), else the shipped demo."
        ),
    ] = None,
    ihc_model: Annotated[
        Path | None,
        typer.Option(
            help="PD-L1 IHC nuclei model folder, run on H-DAB images. Default: from pdl1-config.toml "
            "(models.ihc_nuclei), else the shipped demo."
        ),
    ] = None,
    nuclei: Annotated[
        bool | None,
        typer.Option(
            "--nuclei/--no-nuclei",
            help="Find nuclei on H&E and score the predicted TPS, or skip them: puts nuclei into the outputs, or "
            "takes it out (a PD-L1 IHC is scored by its cells either way). Default: as the outputs say.",
            show_default=False,
        ),
    ] = None,
    uncertainty_tile_um: Annotated[
        float | None,
        typer.Option(
            **number_range(),
            help="Edge of the uncertainty tiles in µm, 16 to 4,096. Default: from pdl1-config.toml, else 64.",
        ),
    ] = None,
    min_region_area_um2: Annotated[
        float | None,
        typer.Option(
            **number_range(0.0),
            help="Positive regions and SUA candidates smaller than this (µm², 0 to 1,000,000) are dropped. Default: "
            "from pdl1-config.toml, else 200.",
        ),
    ] = None,
    refine: Annotated[bool, typer.Option(help="Also report positive area with SUA candidates merged in.")] = False,
    mpp: Annotated[
        float | None,
        typer.Option(
            **number_range(0.05),
            help="Microns per pixel of every image, instead of what the project or the files state.",
        ),
    ] = None,
    stain: Annotated[
        str | None,
        typer.Option(
            help="The stain of every image: he (H&E: segmentation ensemble, SUA, predicted TPS) or ihc (PD-L1 "
            "IHC, haematoxylin-DAB: its cells scored, TPS and CPS), instead of QuPath's image types. The models "
            "run only on the stain they were trained on. Default: each image's type in the project, else the "
            "stain told from its colour.",
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(help="auto, cpu, cuda or cuda:N. Default: from pdl1-config.toml (analysis.device), else auto."),
    ] = None,
    runtime: Annotated[
        str | None,
        typer.Option(
            help="What runs the models' members: torch, openvino (CPU only; the openvino extra, each member "
            "converted once and cached beside its model; measured faster on a CPU busy with other work, a little "
            "slower on a quiet one) or auto (torch, as measured: benchmarks/README.md, runtimes). Default: from "
            "pdl1-config.toml (analysis.runtime), else auto.",
        ),
    ] = None,
    engine: Annotated[
        str, typer.Option(help="local (this process) or ray (one task per image on a Ray cluster).")
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster (with --engine ray): auto, HOST:PORT of its head node, or ray://HOST:PORT (Ray "
            "Client); a local one when omitted."
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Segmentation tiles per forward pass (all members see each batch). "
            "Default: 4 on the CPU, 8 on CUDA (measured).",
        ),
    ] = None,
    nuclei_batch_size: Annotated[
        int | None,
        typer.Option(min=1, help="Nuclei tiles per forward pass. Default: 2 on the CPU, 8 on CUDA (measured)."),
    ] = None,
    nuclei_tta: Annotated[
        bool | None,
        typer.Option(
            "--nuclei-tta/--no-nuclei-tta",
            help="Nuclei models (H&E and IHC) average their heatmaps over the 8 flips and 90° rotations of each "
            "tile: 8x their compute. Default: as each model's manifest says (pdl1 train nuclei --tta), else off.",
            show_default=False,
        ),
    ] = None,
    read_workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Threads reading tiles ahead, for every model; default 2 on the CPU; on CUDA 2 when the GPU "
            "decodes, else all cores but two (at most 12) for the segmentation and 2 for the nuclei models.",
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
    """Analyse every image on its stain's path (H&E: ensemble, SUA, predicted TPS; IHC: TPS, CPS), write to QuPath.

    Models, targets, outputs and device default to the project's pdl1-config.toml; options override it.
    Through QuPath a dearrayed TMA is analysed core by core (cores marked missing are left alone).
    Without QuPath (QuPath 0.7) annotations and TMA cores are read from each image's export by
    pdl1_export_labels.groovy, and pdl1_import_results.groovy puts each one's results under it.
    Each analysed target's score (TMA core, annotation or whole image) goes to pdl1/targets.csv.
    An H&E and its PD-L1 IHC of one case (entry metadata 'case', or --case-key; else file names: B12_HE.svs,
    B12_PD-L1.svs) are compared: pairs.json.

    Exits non-zero when any image failed; the others are finished and written all the same.
    """
    from bridge.run import RunConfig, iter_failed

    if qupath not in ("auto", "never", "always"):
        raise typer.BadParameter(f"expected auto, never or always, got {qupath!r}", param_hint="--qupath")
    stain_name = None if stain is None else stain_option(stain)
    if engine not in ("local", "ray"):
        raise typer.BadParameter(f"expected local or ray, got {engine!r}", param_hint="--engine")
    if address is not None and engine != "ray":
        raise typer.BadParameter("--address goes with --engine ray", param_hint="--address")
    if config is not None and no_config:
        raise typer.BadParameter("--config and --no-config exclude each other; give one", param_hint="--config")
    given = {
        "device": device,
        "runtime": runtime,
        "outputs": output,
        "target_classes": target_class,
        "target_names": target_name,
        "uncertainty_tile_um": uncertainty_tile_um,
        "min_region_area_um2": min_region_area_um2,
        "seg_model": seg_model,
        "nuclei_model": nuclei_model,
        "ihc_model": ihc_model,
        "case_key": case_key,
    }
    for name, value in given.items():
        problem = None if value is None else problem_with(name, value)
        if problem is not None:
            raise typer.BadParameter(problem, param_hint=_OPTION_OF[name])
    # A slide or project named twice (a glob and one of its files, a project's folder and its project.qpproj)
    # is one: run once, and its project's pdl1-config.toml read as for one input.
    inputs = distinct_paths(inputs, done="analysed once")
    folder = out if out is not None else (inputs[0] if inputs[0].is_dir() else inputs[0].parent)
    pairs, targets = folder / "pdl1" / "pairs.json", folder / "pdl1" / TARGETS_FILE
    # What each file was before the run: both are replaced whole (a new inode), so "written by this run" is "not the
    # same file", where comparing its mtime with the start missed one written within the file system's coarse tick.
    before = {path: _file_stamp(path) for path in (pairs, targets)}
    try:
        settings = _settings(inputs, config, no_config=no_config, given=given, nuclei=nuclei)
        check_device_from_file(settings)
        _check_model_kinds(settings)
        if refine and "sua" not in settings.outputs:
            raise typer.BadParameter(
                f"--refine merges the SUA candidates in, but the outputs ({settings.source_of('outputs')}) leave "
                "sua out; add --output sua or drop --refine",
                param_hint="--refine",
            )
        pipeline = replace(
            pipeline_config(
                settings.device,
                settings.seg_model,
                settings.nuclei_model,
                mpp,
                "nuclei" not in settings.outputs,
                refine,
                batch_size=batch_size,
                nuclei_batch_size=nuclei_batch_size,
                read_workers=read_workers,
                compile_members=compile_members,
                gpu_decode=gpu_decode,
                ihc_model=settings.ihc_model,
                nuclei_tta=nuclei_tta,
                runtime=settings.runtime,
            ),
            run_sua="sua" in settings.outputs,
            uncertainty_tile_um=settings.uncertainty_tile_um,
            min_region_area_um2=settings.min_region_area_um2,
        )
        # A runtime this machine cannot give (OpenVINO not installed, or asked for on a GPU) fails here, not per image.
        from inference import check_runtime

        check_runtime(settings.runtime, settings.device, compile_members=compile_members, setting=option_setting)
        run_config = RunConfig(
            pipeline=pipeline,
            out=out,
            resume=resume,
            qupath=qupath,
            target_classes=settings.target_classes,
            target_names=settings.target_names,
            search_dirs=tuple(search_dir or ()),
            include_tiles="uncertainty_tiles" in settings.outputs,
            settings=settings,
            stain=stain_name,
            case_key=settings.case_key,
        )
        if engine == "ray":
            outcomes = _run_ray_with_progress(inputs, run_config, address=address, progress=progress)
        else:
            outcomes = run_with_progress(inputs, run_config, progress=progress)
    except (Pdl1Error, ValueError, OSError) as err:
        raise fail(err) from err
    except KeyboardInterrupt as stop:
        # Each image is written and recorded as it finishes, so stopping loses only the one in progress; the table
        # shows those (it was left out, and a long batch stopped said nothing of what it had done).
        raise interrupted(_interrupted_text(stop)) from None
    if outcomes and all(o.state == "skipped" for o in outcomes):
        # A table of "skipped" rows (and, before, an empty progress bar) said it only row by row.
        stdout().print(nothing_left_to_do(outcomes), markup=False, highlight=False, soft_wrap=True)
    else:
        outcome_table(outcomes)
    if pairs.is_file() and _file_stamp(pairs) != before[pairs]:
        pairs_table(pairs)
    if targets.is_file() and _file_stamp(targets) != before[targets]:
        stdout().print(f"per-target results: {targets}", markup=False, highlight=False, soft_wrap=True)
    if report:
        from bridge.progress import progress_bar
        from bridge.report import write_report

        try:
            with progress_bar("report", enabled=progress) as on_progress:
                html_path, _ = write_report(inputs[0] if out is None else out, on_progress=on_progress)
            typer.echo(f"report: {html_path}")
        except (Pdl1Error, OSError) as err:  # e.g. every image failed: the table above says why
            from rich.markup import escape

            console.print(f"[yellow]no report:[/yellow] {escape(str(err))}", soft_wrap=True)
        except KeyboardInterrupt:  # after the table: the images are written, only the report is stopped
            raise interrupted(f"the images are analysed and written (above); {REPORT_INTERRUPTED}") from None
    if any(True for _ in iter_failed(outcomes)):
        raise typer.Exit(code=1)


# What a Ctrl-C while a report is drawn leaves: report.html and report.csv are each replaced whole at the end.
REPORT_INTERRUPTED = (
    "the report was not finished: its report.html and report.csv are still the earlier report's (or none); "
    "`pdl1 report` makes it"
)


def _interrupted_text(stop: KeyboardInterrupt) -> str:
    """What a Ctrl-C kept, after the table of the images finished before it (a :class:`bridge.run.RunInterrupted`);
    the general words where it came before any image (reading the models, the project)."""
    from bridge.run import RunInterrupted

    resume = "run the same command with --resume to do the rest"
    if not isinstance(stop, RunInterrupted):
        return f"the images finished before it are written; {resume}"
    if stop.outcomes:
        outcome_table(list(stop.outcomes), batch=stop.total)
    finished = len(stop.outcomes)
    during = "" if stop.stopped is None else f" while analysing {stop.stopped}, which is left as it was"
    return (
        f"stopped{during}; {finished} of {stop.total} images finished before it and "
        + ("is" if finished == 1 else "are")
        + " written"
        + (" (above)" if finished else "")
        + f"; {resume}"
    )


def init_project(
    folder: Annotated[Path, typer.Argument(help="New, empty project folder.")],
    slides: Annotated[
        list[Path], typer.Argument(help="Slides to add; a file named twice (or through a symlink) is added once.")
    ],
    qupath: Annotated[
        str, typer.Option(help="auto: create through paquo when QuPath is found; never; always.")
    ] = "auto",
    skip_unreadable: Annotated[
        bool,
        typer.Option(
            help="Add the slides that can be read and name the others, instead of creating nothing when one "
            "cannot be read."
        ),
    ] = False,
) -> None:
    """Create a QuPath project with the PD-L1 classes (and colours), the Groovy scripts and a default config.

    Every slide is checked first: the project is created only when all can be added (or, with
    --skip-unreadable, with those that can).
    """
    from bridge.init_project import init_project_files, init_project_qupath
    from bridge.project import read_project
    from bridge.qupath import qupath_available

    if qupath not in ("auto", "never", "always"):  # a mistyped "always" made a project without QuPath
        raise typer.BadParameter(f"expected auto, never or always, got {qupath!r}", param_hint="--qupath")
    # A slide named twice (a glob and one of its files, a symlink to it) was two entries of one image in QuPath.
    slides = distinct_paths(slides, done="added once")
    try:
        ok, why = qupath_available() if qupath != "never" else (False, "")
        if qupath == "always" and not ok:
            raise fail(Pdl1Error(why))
        make = init_project_qupath if ok else init_project_files
        qpproj = make(folder, slides, skip_unreadable=skip_unreadable)
        added = len(read_project(qpproj).entries)
    except (Pdl1Error, ValueError, OSError) as err:
        raise fail(err) from err
    count = (
        f"{added} image{'' if added == 1 else 's'}"
        if added == len(slides)
        else f"{added} of {len(slides)} images (the warning names those left out)"
    )
    typer.echo(f"created {qpproj} with {count}" + ("" if ok else " (written without QuPath)"))


def report_cmd(
    source: Annotated[
        Path,
        typer.Argument(
            help="A project run by `pdl1 run` or analysed in QuPath with pdl1_analyze.groovy (its records), or "
            "`pdl1 run`'s --out folder for slides."
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            help="Report folder (default: SOURCE/pdl1/report): new, empty or an earlier report's; a folder of other "
            "files is refused."
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar (images drawn).")] = True,
) -> None:
    """HTML and CSV report: thumbnails with the results overlaid, review reasons, each target's score, the cases.

    A target is a TMA core or an analysed annotation; their scores are also in the report's targets.csv."""
    from bridge.progress import progress_bar
    from bridge.report import write_report

    try:
        # Each thumbnail reads its slide: seconds per real slide, minutes for a study, said nothing until the end.
        with progress_bar("report", enabled=progress) as on_progress:
            html_path, csv_path = write_report(source, out, on_progress=on_progress)
    except (Pdl1Error, ValueError, OSError) as err:
        raise fail(err) from err
    except KeyboardInterrupt:  # ended with exit 130 and not a word
        raise interrupted(REPORT_INTERRUPTED) from None
    typer.echo(f"wrote {html_path}, {csv_path} and {csv_path.parent / TARGETS_FILE}")


def review_queue_cmd(
    project: Annotated[
        Path,
        typer.Argument(
            help="A QuPath project that `pdl1 run PROJECT` or pdl1_analyze.groovy in QuPath (its records) has analysed."
        ),
    ],
    out: Annotated[
        Path | None, typer.Option(help="CSV to write (default: PROJECT/pdl1/review_queue.csv).", show_default=False)
    ] = None,
    top: Annotated[
        int | None,
        typer.Option(min=1, help="List only the N best entries (metadata ranks them all).", show_default=False),
    ] = None,
    regions: Annotated[int, typer.Option(min=0, help="Regions listed per entry.")] = 5,
    qupath: Annotated[
        str, typer.Option(help="auto: write the entry metadata through paquo when QuPath is found; never; always.")
    ] = "auto",
    progress: Annotated[
        bool, typer.Option(help="Show a progress bar (entries read; through QuPath, then their labels).")
    ] = True,
) -> None:
    """Rank entries and regions by what labelling them would teach the model (uncertainty, SUA, domain).

    Writes a CSV with the entries best first, each followed by its regions (level-0 px boxes, centres in µm),
    and sets the entry metadata 'PD-L1 review rank' and 'PD-L1 review score': through QuPath (0.4.4 to 0.6) where it
    is found, and in each entry's summary.json, or pdl1/<entry ID>/review.json for an entry analysed in QuPath alone,
    from which pdl1_import_results.groovy sets them in QuPath (0.7 too: run it for the project). See the README for
    the score.
    """
    from collections import Counter

    from rich.markup import escape
    from rich.table import Table

    from bridge.cli.common import print_table
    from bridge.progress import progress_bar
    from bridge.review_queue import ReviewQueueInterrupted, write_review_queue

    if qupath not in ("auto", "never", "always"):  # a usage error before any entry is read, as run's
        raise typer.BadParameter(f"expected auto, never or always, got {qupath!r}", param_hint="--qupath")
    try:
        # Every entry's results are read (a run's objects.geojson holds every nucleus): minutes for a project of
        # whole slides, which said nothing until the table.
        with progress_bar("entries", enabled=progress) as on_progress:
            queue = write_review_queue(
                project,
                out=out,
                top=top,
                regions_per_entry=regions,
                qupath=qupath,
                on_progress=on_progress,
                on_labels_progress=lambda done, total: on_progress(done, total, stage="labels in QuPath"),
            )
    except (Pdl1Error, ValueError, OSError) as err:
        raise fail(err) from err
    except KeyboardInterrupt as stop:  # exit 130 and not a word: were the ranks half written?
        left = stop.left if isinstance(stop, ReviewQueueInterrupted) else REVIEW_QUEUE_NOT_WRITTEN
        raise interrupted(left) from None
    table = Table(title="review queue (label first at the top)")
    for column in ("rank", "image", "score", "regions", "first region (x, y, w, h px)", "reasons"):
        table.add_column(column)
    # Entries sharing an image name (one file typed H&E and H-DAB) are told apart by their ID, as in pdl1 run's table.
    shared = {name for name, count in Counter(e.image for e in queue.entries).items() if count > 1}
    shown = queue.entries[:top] if top else queue.entries
    for rank, entry in enumerate(shown, start=1):
        first = entry.regions[0] if entry.regions else None
        where = "" if first is None else f"{first.kind} " + ", ".join(str(round(v)) for v in first.bounds_px)
        if first is not None and first.target is not None:  # an image of several targets (TMA cores): which one
            where += f" ({first.target})"
        table.add_row(
            str(rank),
            escape(f"{entry.image} (entry {entry.entry_id})" if entry.image in shared else entry.image),
            f"{entry.score:.3f}",
            str(len(entry.regions)),
            where,
            escape("; ".join(entry.reasons)),
        )
    print_table(table, whole_in=str(queue.csv_path))
    for entry_id, name, why in queue.not_ranked:
        typer.echo(f"not ranked: {name} (entry {entry_id}): {why}")
    typer.echo(f"wrote {queue.csv_path}; entry metadata in the {queue.metadata_written_to}")


# A Ctrl-C before the project was held (its checks, looking for QuPath): nothing written.
REVIEW_QUEUE_NOT_WRITTEN = (
    "the review queue was not written: its CSV and the entries' review metadata are as they were (an earlier "
    "queue's, or none); run `pdl1 review-queue` again"
)


def _file_stamp(path: Path) -> tuple[int, int, int, int] | None:
    """What tells one version of a file from another (device, inode, size, mtime in ns); None where there is none."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns
