"""``pdl1 phantom``, ``pdl1 demo`` and ``pdl1 bench``: phantom data, the end-to-end demo, benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bridge.cli.common import (
    check_device,
    fail,
    interrupted,
    number_range,
    outcome_table,
    pairs_table,
    pipeline_config,
    require_out_folder,
    run_with_progress,
)
from inference import Pdl1Error


def phantom(
    out: Annotated[Path, typer.Argument(help="Slide to write: .svs (Aperio-style) or .tif (generic tiled TIFF).")],
    size: Annotated[int, typer.Option(min=1024, max=100_000, help="Edge length in level-0 px.")] = 8192,
    height: Annotated[int | None, typer.Option(min=1024, max=100_000, help="Height in px when not square.")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Random seed; the same seed gives the same bytes.")] = 1,
    tps: Annotated[float, typer.Option(**number_range(0, 100), help="Wanted tumour proportion score, %.")] = 30.0,
    shift: Annotated[
        float, typer.Option(**number_range(0, 1), help="Domain shift: stain, colour, blur and JPEG quality.")
    ] = 0.0,
    mpp: Annotated[float, typer.Option(**number_range(0.1, 2.0), help="Microns per level-0 pixel.")] = 0.5,
    weak_fraction: Annotated[
        float,
        typer.Option(
            **number_range(0, 0.95),
            help="Fraction of the positive area that expresses weakly (faint morphology, still positive).",
        ),
    ] = 0.0,
    ihc: Annotated[
        Path | None,
        typer.Option(
            help="Also write the PD-L1 IHC (haematoxylin-DAB) consecutive section of the same tissue here "
            "(.svs or .tif), with its truth beside it."
        ),
    ] = None,
    immune_positive: Annotated[
        float | None,
        typer.Option(
            **number_range(0, 1),
            help="With --ihc: mean share of PD-L1 positive immune cells (varies in space); 0.3 when not given.",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace OUT (and the --ihc file) and their truth where they exist already.")
    ] = False,
    reduced_levels: Annotated[
        str,
        typer.Option(
            help="How the levels below full resolution are made: rendered (from the scene at their downsample) "
            "or averaged (4x4 from the level above, as a scanner builds its pyramid).",
        ),
    ] = "rendered",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Write a phantom H&E slide (and with --ihc its PD-L1 IHC) with the truth beside it (stem + '.truth/').

    With --ihc, also the PD-L1 IHC section of the same tissue (rotated, shifted and deformed as a
    consecutive section) with its truth (TPS, CPS, intensities, the transform to the H&E).
    """
    from bridge.phantom_truth import write_truth_geojson
    from bridge.progress import progress_bar
    from inference import IhcSpec, PhantomSpec, cps_text, tps_text, write_ihc_phantom, write_phantom

    if reduced_levels not in ("rendered", "averaged"):  # the library's own check names its argument, not the option
        raise typer.BadParameter(
            f"expected rendered or averaged, got {reduced_levels!r}", param_hint="--reduced-levels"
        )
    if immune_positive is not None and ihc is None:
        raise typer.BadParameter("--immune-positive sets the IHC section's immune cells: add --ihc OUT_IHC.svs")
    if ihc is not None and ihc.resolve().with_suffix("") == out.resolve().with_suffix(""):
        raise typer.BadParameter(f"--ihc {ihc} would share its truth folder with {out}: give it another name")
    from bridge.project import not_a_folder
    from inference import check_slide_path

    for path, hint in ((out, "OUT"), (ihc, "--ihc")):
        if path is None:
            continue
        try:
            path.stat()
        except (FileNotFoundError, NotADirectoryError):
            pass  # a new file, or one under a file: said below
        except OSError as err:  # a name too long for the file system was a traceback from is_dir()
            raise fail(err) from err
        if path.is_dir():  # --overwrite must never be the way past this
            raise typer.BadParameter(
                f"{path} is a folder; give the slide file to write, e.g. {path / 'phantom.svs'}", param_hint=hint
            )
        try:  # both, before the H&E is written: a bad --ihc name left the H&E behind, in the way of the next try
            check_slide_path(path)
        except ValueError as err:
            raise fail(err) from err
        problem = not_a_folder(path.parent)
        if problem is not None:  # said before mkdir's bare "[Errno 17] File exists"
            raise typer.BadParameter(
                f"{path}: its folder {path.parent} {problem}; give a path in a folder (a missing one is made)",
                param_hint=hint,
            )
    existing = [p for p in (out, ihc) if p is not None and (p.exists() or p.with_suffix(".truth").exists())]
    if existing and not overwrite:
        # A slide may be in a project already; its truth may be scoring a run: replacing either is asked for.
        raise typer.BadParameter(
            f"{', '.join(map(str, existing))} (or its .truth folder) exists already: give another name, or "
            "--overwrite to replace it"
        )
    writing = out  # before the try: its Ctrl-C handler names what was being written
    try:
        spec = PhantomSpec(
            size,
            height or size,
            seed=seed,
            mpp=mpp,
            tps_percent=tps,
            shift=shift,
            weak_fraction=weak_fraction,
            reduced_levels=reduced_levels,
        )
        ihc_spec = IhcSpec(immune_positive_fraction=0.3 if immune_positive is None else immune_positive)
        with progress_bar(f"phantom {out.name}", enabled=progress) as on_progress:
            truth = write_phantom(out, spec, on_progress=on_progress)
        write_truth_geojson(truth.truth_dir)
        ihc_truth = None
        if ihc is not None:
            writing = ihc
            with progress_bar(f"phantom IHC {ihc.name}", enabled=progress) as on_progress:
                ihc_truth = write_ihc_phantom(ihc, spec, ihc_spec, paired_with=out, on_progress=on_progress)
            write_truth_geojson(ihc_truth.truth_dir)
    except (Pdl1Error, ValueError, OSError) as err:
        raise fail(err) from err
    except KeyboardInterrupt:  # was click's "Aborted!", leaving a slide cut short (and its truth) under OUT's name
        import shutil

        from inference import truth_dir_for

        writing.unlink(missing_ok=True)
        shutil.rmtree(truth_dir_for(writing), ignore_errors=True)
        kept = f"; {out} and its truth are whole" if writing == ihc else ""
        raise interrupted(
            f"{writing} was not finished: it and its truth are removed{kept}. Run pdl1 phantom again"
        ) from None
    for path, written in ((out, truth), (ihc, ihc_truth)):
        if written is None:
            continue
        summary = written.summary
        tps_truth, cps = summary["tps_percent"], summary.get("cps")
        typer.echo(
            f"wrote {path} ({summary['stain']}, {spec.width_px}x{spec.height_px} px, {spec.mpp} µm/px, "
            f"levels {summary['levels']})"
        )
        typer.echo(
            f"truth in {written.truth_dir}: "
            + ", ".join(f"{k} {v}" for k, v in summary["nuclei_counts"].items())
            + (f", TPS {tps_text(tps_truth)}%" if tps_truth is not None else ", no tumour nuclei")
            + (f", CPS {cps_text(cps)}" if cps is not None else "")
        )


def _is_demo_project(project: Path, slides: tuple[Path, ...]) -> bool:
    """Whether ``project`` is one an earlier ``pdl1 demo`` made there: a QuPath project of the demo's slides only."""
    from bridge.project import read_project

    try:
        entries = read_project(project).entries
        demo = {slide.resolve() for slide in slides}
        return bool(entries) and all(Path(str(entry.path)).resolve() in demo for entry in entries)
    except (Pdl1Error, OSError, ValueError):
        return False


def _written_as(slide: Path, spec) -> bool:
    """Whether ``slide`` is a finished phantom of ``spec``: its ``truth.json`` (written last) records that spec."""
    import json

    from inference import PhantomSpec, truth_dir_for

    try:
        return PhantomSpec(**json.loads((truth_dir_for(slide) / "truth.json").read_text())["spec"]) == spec
    except (OSError, ValueError, KeyError, TypeError):  # missing, cut short, or of another generator
        return False


def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo slides, project and report.")] = Path("pdl1-demo"),
    size: Annotated[int, typer.Option(min=1024, max=100_000, help="Phantom edge length in px.")] = 4096,
    seed: Annotated[int, typer.Option(min=0, help="Phantom seed (the demo models never saw 7).")] = 7,
    tps: Annotated[
        float, typer.Option(**number_range(0, 100), help="Phantom's wanted tumour proportion score, %.")
    ] = 40.0,
    ihc: Annotated[
        bool, typer.Option(help="Also the PD-L1 IHC of the same tissue: scored by its cells, compared with the H&E.")
    ] = True,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", callback=check_device)] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Phantom H&E (and its PD-L1 IHC) -> QuPath project -> run (shipped demo models) -> report, scored
    against the truth."""
    import json
    import shutil

    from bridge.init_project import init_project_files
    from bridge.phantom_truth import write_truth_geojson
    from bridge.progress import progress_bar
    from bridge.report import write_report
    from bridge.run import RunConfig
    from inference import PhantomSpec, tps_text, truth_dir_for, write_ihc_phantom, write_phantom

    # The file names make the two one case (a trailing stain word names the stain, the rest the case).
    he_path = out / "slides" / "phantom_HE.svs"
    ihc_path = out / "slides" / "phantom_IHC.svs"
    project = out / "project"
    spec = PhantomSpec(size, size, seed=seed, tps_percent=tps)
    require_out_folder(out, what="the demo's slides, project and report")
    # The demo replaces its own project every time; --out naming a folder that holds another project deleted it.
    if project.exists() and not _is_demo_project(project, (he_path, ihc_path)):
        raise fail(
            Pdl1Error(
                f"{project} exists and is not a project `pdl1 demo` made (one of {he_path} and {ihc_path} only), "
                "so the demo will not replace it; give --out a new folder (or move that one away)"
            )
        )
    try:
        # An earlier demo's slides are kept only when they are this demo's: another --size, --seed or --tps was
        # run on the first demo's phantoms and scored against their truth. A rewritten H&E needs its IHC anew.
        new_he = not _written_as(he_path, spec)
        if new_he:
            (truth_dir_for(he_path) / "truth.json").unlink(missing_ok=True)  # unfinished until rewritten whole
            with progress_bar("phantom H&E", enabled=progress) as on_progress:
                write_phantom(he_path, spec, on_progress=on_progress)
            write_truth_geojson(truth_dir_for(he_path))
        if ihc and (new_he or not _written_as(ihc_path, spec)):
            (truth_dir_for(ihc_path) / "truth.json").unlink(missing_ok=True)
            with progress_bar("phantom PD-L1 IHC", enabled=progress) as on_progress:
                write_ihc_phantom(ihc_path, spec, paired_with=he_path, on_progress=on_progress)
            write_truth_geojson(truth_dir_for(ihc_path))
        if project.exists():
            shutil.rmtree(project)  # the demo's own folder: a fresh project every time
        init_project_files(project, [he_path, ihc_path] if ihc else [he_path])
        run_config = RunConfig(pipeline=pipeline_config(device, None, None, None), qupath="never")
        outcomes = run_with_progress([project], run_config, progress=progress)
        # Each thumbnail reads its slide: the demo's largest sizes drew them in silence after the run's bars.
        with progress_bar("report", enabled=progress) as on_progress:
            html_path, _ = write_report(project, on_progress=on_progress)
    except (Pdl1Error, ValueError, OSError) as err:
        raise fail(err) from err
    except KeyboardInterrupt:  # ended the demo without a word (exit 130)
        raise interrupted(
            f"the demo was not finished; the phantoms written whole in {out / 'slides'} are kept for the next "
            "demo of the same --size, --seed and --tps (one cut short is written again), the project is made anew. "
            "Run pdl1 demo again"
        ) from None
    outcome_table(outcomes)
    pairs = project / "pdl1" / "pairs.json"
    if pairs.is_file():
        pairs_table(pairs)
    labels = ("predicted TPS (H&E)", "TPS (PD-L1 IHC)")
    for outcome, path, what in zip(
        outcomes, (he_path, ihc_path)[: len(outcomes)], labels[: len(outcomes)], strict=True
    ):
        truth = json.loads((truth_dir_for(path) / "truth.json").read_text())
        if outcome.state == "done" and outcome.tps_percent is not None:
            typer.echo(
                f"{what} {tps_text(outcome.tps_percent)}% vs truth {tps_text(truth['tps_percent'])}% "
                f"(error {abs(outcome.tps_percent - truth['tps_percent']):.1f} points)"
            )
    typer.echo(f"QuPath project: {project / 'project.qpproj'} (open it, then run scripts/pdl1_import_results.groovy)")
    typer.echo(f"report: {html_path}")
    if any(o.state != "done" for o in outcomes):
        raise typer.Exit(code=1)


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
    except KeyboardInterrupt:
        raise interrupted("the benchmark was stopped; its table is printed only when it ends") from None
    except KeyError as err:  # an unknown name: str(KeyError) would quote the message
        raise fail(RuntimeError(err.args[0] if err.args else name)) from err
    except RuntimeError as err:  # a benchmark this machine cannot run
        raise fail(err) from err
