"""``pdl1 eval`` (``seg``, ``nuclei``, ``tps``, ``ihc``, ``registration``, ``suite``) and ``pdl1 calibrate``: scores against phantom truth, and SUA's calibration."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from bridge.cli.common import (
    check_device,
    check_model_target,
    distinct_paths,
    fail,
    interrupted,
    number_range,
    pipeline_config,
    print_table,
    require_out_folder,
    stdout,
    write_model_copy,
)
from inference import Pdl1Error, __version__, phantom_mpp_advice


class _DefaultSuiteGroup(TyperGroup):
    """``pdl1 eval SLIDE...`` (or ``pdl1 eval --out DIR SLIDE...``) runs the ``suite`` subcommand; ``pdl1 eval
    seg|nuclei ...`` the others."""

    def parse_args(self, ctx, args):
        # The group has no option but --help: an option first is the suite's (its --out written before the slides).
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["suite", *args]
        return super().parse_args(ctx, args)


def _require_model_stain(manifest, stain: str, *, option: str, folder, command: str) -> None:
    """Refuse a model of the wrong stain for its option before anything runs (the pipeline's own message would
    advise QuPath's image type or --stain, which eval has not)."""
    from inference import StainError, wrong_model_message

    if manifest.stain != stain:
        raise StainError(
            wrong_model_message(
                f"{option} {folder}",
                manifest,
                task=manifest.task,  # its task was checked as it was read
                stain=stain,
                needed_for=f"for {command}",
                fix=f"give one, or leave {option} out for the shipped one",
            )
        )


EVAL_MPP_ADVICE = phantom_mpp_advice("`pdl1 eval`")
REGISTRATION_MPP_ADVICE = phantom_mpp_advice(
    "`pdl1 eval registration` (whose --mpp is the resolution it registers at, not the slides')"
)
CALIBRATE_MPP_ADVICE = phantom_mpp_advice("`pdl1 calibrate`")


# What a Ctrl-C leaves of an eval command that writes nothing (its table is printed once every slide is scored).
EVAL_INTERRUPTED = "nothing was written (the scores are printed once every slide is scored); run it again"


def _check_truths(
    slides: list[Path], models_by_stain: dict, *, needs: tuple[str, ...] = (), mpp_advice=EVAL_MPP_ADVICE
) -> list:
    """Every slide's truth checked against its models, and its pixel size (from its header), before any runs: a bad
    slide fails the batch at once, named with all the others (:func:`inference.evaluation.evaluate.check_truths`)."""
    from inference import check_truths

    return check_truths(slides, models_by_stain, needs=needs, mpp_advice=mpp_advice)


NucleiModelOption = Annotated[
    str,
    typer.Option(
        help="Nuclei model for the predicted TPS, so a wrong TPS category counts as a failure (the shipped "
        "demo's by default); 'none' judges the positive area alone.",
    ),
]

app = typer.Typer(
    rich_markup_mode=None,
    cls=_DefaultSuiteGroup,
    no_args_is_help=True,
    help="Evaluate on phantom slides against their truth. `pdl1 eval SLIDE... --out DIR` runs the full suite.",
)


@app.command("seg")
def eval_seg(
    slides: Annotated[list[Path], typer.Argument(help="Phantom slides with truth beside them.")],
    model: Annotated[
        Path | None, typer.Option(help="Segmentation ensemble folder; the shipped demo if omitted.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", callback=check_device)] = "auto",
    threshold: Annotated[
        float | None, typer.Option(**number_range(0, 1), help="Override the manifest's threshold.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Dice of the ensemble and of every member, and AUROC of uncertainty for pixel errors, on the truth's grid."""
    slides = distinct_paths(slides, done="scored once")  # a glob and one of its files: counted once in the means
    from rich.table import Table

    from bridge.progress import progress_bar
    from inference import Ensemble, demo_model_dir, evaluate_segmentation

    out = stdout()
    results = []
    try:
        ensemble = Ensemble.load(model or demo_model_dir("seg"), task="segmentation", device=device)
        members = ensemble.manifest.members
        _check_truths(slides, {ensemble.manifest.stain: [("segmentation", ensemble.manifest)]}, needs=("spec",))
        pooled = len({m.chain for m in members}) > 1
        for i, slide in enumerate(slides, start=1):
            with progress_bar(eval_bar(slide, i, len(slides)), enabled=progress) as on_progress:
                result, maps = evaluate_segmentation(
                    slide, ensemble, threshold=threshold, on_progress=on_progress, mpp_advice=EVAL_MPP_ADVICE
                )
            results.append(result)
            table = Table(
                title=f"{slide.name}: segmentation vs truth ({result.pixels} truth tissue px at {maps.mpp:g} µm/px)"
            )
            table.add_column("metric")
            table.add_column("value", justify="right")
            table.add_row("tissue recall (truth's tissue analysed)", f"{result.tissue_recall:.3f}")
            table.add_row("tissue precision (analysed area that is tissue)", f"{result.tissue_precision:.3f}")
            table.add_row("Dice, ensemble", f"{result.dice_ensemble:.4f}")
            for i, d in enumerate(result.dice_members):
                origin = f" (chain {members[i].chain}, cycle {members[i].cycle})" if pooled else ""
                table.add_row(f"Dice, member {i}{origin}", f"{d:.4f}")
            table.add_row("AUROC predictive entropy -> error", f"{result.auroc_entropy_error:.4f}")
            table.add_row("AUROC mutual information -> error", f"{result.auroc_mi_error:.4f}")
            table.add_row(
                "  baseline: AUROC closeness of the mean probability to the threshold -> error",
                f"{result.auroc_prob_margin_error:.4f}",
            )
            table.add_row(
                "  baseline: AUROC closeness to the predicted boundary -> error",
                f"{result.auroc_boundary_distance_error:.4f}",
            )
            table.add_row(
                "predictive entropy, wrong / right",
                f"{result.entropy_wrong_mean:.4f} / {result.entropy_right_mean:.4f}",
            )
            table.add_row(
                "mutual information, wrong / right", f"{result.mi_wrong_mean:.4f} / {result.mi_right_mean:.4f}"
            )
            table.add_row("mutual information, min", f"{result.mi_min:.2e}")
            print_table(table)
            if len(result.dice_members) > 1:  # one member is the model itself: nothing to set beside it
                best = max(result.dice_members)
                verdict = "yes" if result.dice_ensemble >= best else "no"
                out.print(
                    f"ensemble Dice >= every member's: {verdict} ({result.dice_ensemble:.4f} vs best member {best:.4f})"
                )
    except (Pdl1Error, ValueError, OSError) as err:
        raise fail(err) from err
    except KeyboardInterrupt:  # exit 130 without a word
        raise interrupted(EVAL_INTERRUPTED) from None
    if len(results) > 1 and all(r.dice_members for r in results):
        _print_dice_summary(results, out)
    if results:
        out.print(_uncertainty_vs_baselines(results))


def _uncertainty_vs_baselines(results) -> str:
    """On how many slides (SegEvaluations) entropy and mutual information find pixel errors better than both baselines."""

    def beats(r, auroc: float) -> bool:
        return auroc > max(r.auroc_prob_margin_error, r.auroc_boundary_distance_error)

    return (
        f"uncertainty against its baselines (AUROC for pixel errors above both the mean probability's "
        f"closeness to the threshold and the distance to the predicted boundary): predictive entropy on "
        f"{sum(beats(r, r.auroc_entropy_error) for r in results)} of {len(results)} slides, mutual "
        f"information on {sum(beats(r, r.auroc_mi_error) for r in results)}"
    )


def _print_dice_summary(results, out) -> None:
    """Per-slide gaps, then Dice over all slides: the mean of per-slide Dice and pooled pixels."""
    from rich.table import Table

    from inference import pooled_dice

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
    print_table(table)
    wins = sum(r.dice_ensemble >= max(r.dice_members) for r in results)
    out.print(
        f"ensemble Dice >= every member's: {wins} of {len(results)} slides; mean of slides "
        f"{'yes' if mean_ens >= max(mean_members) else 'no'}; pooled {'yes' if pooled_ens >= max(pooled_members) else 'no'}"
    )


def _nuclei_evaluations(slides: list[Path], ensemble, *, radius_um: float, progress: bool):
    """Each slide with its :func:`inference.evaluate_nuclei` result, a progress bar per slide."""
    from bridge.progress import progress_bar
    from inference import evaluate_nuclei

    for i, slide in enumerate(slides, start=1):
        with progress_bar(eval_bar(slide, i, len(slides)), enabled=progress) as on_progress:
            yield (
                slide,
                evaluate_nuclei(
                    slide, ensemble, radius_um=radius_um, on_progress=on_progress, mpp_advice=EVAL_MPP_ADVICE
                ),
            )


@app.command("nuclei")
def eval_nuclei(
    slides: Annotated[list[Path], typer.Argument(help="Phantom slides with truth beside them.")],
    model: Annotated[Path | None, typer.Option(help="Nuclei model folder; the shipped demo if omitted.")] = None,
    radius_um: Annotated[
        float, typer.Option(**number_range(0.1), help="Matching radius; pairs beyond it never match.")
    ] = 3.0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", callback=check_device)] = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Precision, recall and F1 (overall and per class) and the TPS error of each slide.

    The TPS is the nuclei model's own classes' (on H&E its positive/negative head), not the predicted TPS of
    pdl1 run, whose PD-L1 call comes from the segmentation ensemble's maps: that one is pdl1 eval tps.
    """
    from inference import tps_text

    slides = distinct_paths(slides, done="scored once")  # a glob and one of its files: counted once in the means
    from rich.table import Table

    from inference import Ensemble, demo_model_dir

    try:
        ensemble = Ensemble.load(model or demo_model_dir("nuclei"), task="nuclei", device=device)
        _check_truths(slides, {ensemble.manifest.stain: [("nuclei", ensemble.manifest)]})
        table = Table(title=f"nuclei vs truth (match within {radius_um} µm)")
        for col in ("slide", "class", "precision", "recall", "F1", "TPS pred", "TPS truth", "TPS error"):
            table.add_column(col, justify="left" if col in ("slide", "class") else "right")
        for slide, r in _nuclei_evaluations(slides, ensemble, radius_um=radius_um, progress=progress):
            err = r.tps_abs_error

            def pct(t) -> str:
                return "n/a" if t.percent is None else f"{tps_text(t.percent)}% ({t.category})"

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
        print_table(table)
    except (Pdl1Error, ValueError, OSError) as err:
        raise fail(err) from err
    except KeyboardInterrupt:  # exit 130 without a word
        raise interrupted(EVAL_INTERRUPTED) from None


def eval_bar(slide: Path, i: int, n: int, *, unit: str = "slide") -> str:
    """The description of slide ``i`` of ``n``'s bar (``unit``: what is counted, ``pair`` for registration's IHC
    and H&E): each slide's bar named it alone, so a log of an evaluation of 40 slides never said how far it was.

    >>> eval_bar(Path("a.svs"), 2, 40), eval_bar(Path("a.svs"), 1, 1), eval_bar(Path("a.svs"), 2, 40, unit="pair")
    ('eval a.svs (slide 2 of 40)', 'eval a.svs', 'eval a.svs (pair 2 of 40)')
    """
    return f"eval {slide.name}" + (f" ({unit} {i} of {n})" if n > 1 else "")


def _reviewed_ihc(slides: list[Path], ensemble, *, models, config, radius_um: float, progress: bool):
    """Each IHC slide with its evaluation against the truth and, with ``models``, the review reasons and flag of
    ``pdl1 run`` on it as an image QuPath types H-DAB (else None, None).

    With ``models`` the slide is analysed once, as ``pdl1 run`` does, and that run's own nuclei are scored
    (the same tissue mask and detection settings as :func:`inference.evaluate_nuclei`, so the same cells)."""
    from inference import score_nuclei_on_truth

    if models is None:
        yield from (
            (slide, r, None, None)
            for slide, r in _nuclei_evaluations(slides, ensemble, radius_um=radius_um, progress=progress)
        )
        return
    for i, slide in enumerate(slides, start=1):
        run = _analysed_as(slide, "H-DAB", models=models, config=config, progress=progress, of=(i, len(slides)))
        r = score_nuclei_on_truth(slide, run.nuclei, mpp_um=run.mpp, radius_um=radius_um)
        yield slide, r, [x["reason"] for x in run.summary["review_reasons"]], run.uncertainty_flag


# How a user of `pdl1 eval` states a slide's stain, in the messages that refuse one (analyse_slide's stain_advice).
EVAL_STAIN_ADVICE = (
    "score it with the evaluation of its stain (`pdl1 eval ihc` for PD-L1 IHC phantoms, seg, nuclei or tps for H&E)"
)


def _analysed_as(slide: Path, stain: str, *, models, config, progress: bool, of: tuple[int, int] = (1, 1)):
    """``pdl1 run``'s analysis of an eval slide as an image QuPath types ``stain``, under a progress bar (``of``:
    the slide's place among those evaluated, :func:`eval_bar`)."""
    from bridge.progress import progress_bar
    from inference import analyse_slide

    with progress_bar(eval_bar(slide, *of), enabled=progress) as on_progress:
        return analyse_slide(
            slide,
            models=models,
            config=config,
            image_stain=stain,
            image_stain_source="pdl1 eval",
            stain_advice=EVAL_STAIN_ADVICE,
            mpp_advice=EVAL_MPP_ADVICE,
            on_progress=on_progress,
        )


def _review_line(failed: list[bool], flagged: list[bool], what: str) -> str:
    """'caught C of F failed slides (what); false alarms on A of O others'."""
    caught = sum(f and g for f, g in zip(failed, flagged, strict=True))
    alarms = sum(g and not f for f, g in zip(failed, flagged, strict=True))
    return (
        f"caught {caught} of {sum(failed)} failed slides ({what}); false alarms on {alarms} of "
        f"{len(failed) - sum(failed)} others"
    )


def _ihc_failure() -> str:
    from inference import IHC_FAILED_TPS_ERROR

    return f"TPS in the wrong category or off by more than {IHC_FAILED_TPS_ERROR:g} points"


@app.command("ihc")
def eval_ihc(
    slides: Annotated[list[Path], typer.Argument(help="Phantom PD-L1 IHC slides (pdl1 phantom --ihc) with truth.")],
    model: Annotated[Path | None, typer.Option(help="IHC nuclei model folder; the shipped demo if omitted.")] = None,
    radius_um: Annotated[
        float, typer.Option(**number_range(0.1), help="Matching radius; pairs beyond it never match.")
    ] = 3.0,
    review: Annotated[
        bool, typer.Option(help="Also analyse each slide as pdl1 run does (stated H-DAB) for its review flag.")
    ] = True,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", callback=check_device)] = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """TPS and CPS against the truth (error, cut-off category), nuclei F1 and intensity agreement, per IHC slide.

    With --review (default) each slide is also analysed as pdl1 run analyses an image QuPath types
    H-DAB, and its review reasons are shown; a slide failed when its TPS is in the wrong category or off by
    more than 5 points, and the flag's catches and false alarms are counted.
    """
    from inference import tps_text

    slides = distinct_paths(slides, done="scored once")  # a glob and one of its files: counted once in the means
    from rich.table import Table

    from inference import Ensemble, Models, demo_model_dir

    out = stdout()
    try:
        config = pipeline_config(device, None, None, None, no_nuclei=True, ihc_model=model) if review else None
        models = Models(config) if config is not None else None
        # With the review the pipeline's own IHC ensemble detects the cells; else it is loaded here.
        ensemble = (
            models.ihc()
            if models
            else Ensemble.load(model or demo_model_dir("nuclei-ihc"), task="nuclei", device=device)
        )
        folder = model or demo_model_dir("nuclei-ihc")
        _require_model_stain(ensemble.manifest, "H-DAB", option="--model", folder=folder, command="`pdl1 eval ihc`")
        _check_truths(slides, {"H-DAB": [("PD-L1 IHC nuclei", ensemble.manifest)]})
        table = Table(title=f"PD-L1 IHC vs truth ({ensemble.manifest.name}; nuclei matched within {radius_um} µm)")
        columns = ("slide", "TPS pred", "TPS truth", "TPS error", "category", "CPS pred", "CPS truth", "CPS error")
        for col in (*columns, "F1", "intensity agreement", "entropy mean", *(("review",) if review else ())):
            table.add_column(col, justify="left" if col in ("slide", "review") else "right")
        results, flagged = [], []
        for slide, r, reasons, flag in _reviewed_ihc(
            slides, ensemble, models=models, config=config, radius_um=radius_um, progress=progress
        ):
            results.append(r)
            if flag is not None:
                flagged.append(flag)

            def num(value: float | None, digits: int = 1) -> str:
                return "n/a" if value is None else f"{value:.{digits}f}"

            table.add_row(
                slide.name,
                "n/a" if r.tps_pred.percent is None else tps_text(r.tps_pred.percent),
                "n/a" if r.tps_truth.percent is None else tps_text(r.tps_truth.percent),
                num(r.tps_abs_error),
                "right" if r.category_right else f"WRONG ({r.tps_pred.category} vs {r.tps_truth.category})",
                num(None if r.cps_pred is None else r.cps_pred.percent),
                num(None if r.cps_truth is None else r.cps_truth.percent),
                num(r.cps_abs_error),
                f"{r.overall.f1:.3f}",
                num(r.intensity_agreement, 3),
                num(r.nuclei_entropy_mean, 3),
                *(() if reasons is None else ("; ".join(reasons) or "ok",)),
            )
        print_table(table)
        tps_errors = [r.tps_abs_error for r in results if r.tps_abs_error is not None]
        cps_errors = [r.cps_abs_error for r in results if r.cps_abs_error is not None]
        if tps_errors:
            out.print(
                f"TPS mean absolute error {sum(tps_errors) / len(tps_errors):.2f} points (max {max(tps_errors):.2f}); "
                f"category right on {sum(r.category_right for r in results)} of {len(results)} slides"
                + (f"; CPS mean absolute error {sum(cps_errors) / len(cps_errors):.2f}" if cps_errors else "")
                + f"; nuclei F1 min {min(r.overall.f1 for r in results):.3f}"
            )
        if flagged:
            failed = [r.failed() for r in results]
            out.print(f"review flag (as pdl1 run sets it): {_review_line(failed, flagged, _ihc_failure())}")
    except (Pdl1Error, ValueError, OSError) as err:
        raise fail(err) from err
    except KeyboardInterrupt:  # exit 130 without a word
        raise interrupted(EVAL_INTERRUPTED) from None


@app.command("tps")
def eval_tps(
    slides: Annotated[list[Path], typer.Argument(help="Phantom H&E slides with truth beside them.")],
    seg_model: Annotated[Path | None, typer.Option(help="Segmentation ensemble; the shipped demo if omitted.")] = None,
    nuclei_model: Annotated[Path | None, typer.Option(help="H&E nuclei model; the shipped demo if omitted.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", callback=check_device)] = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """The predicted TPS of H&E slides as pdl1 run gives it (nuclei typed by the nuclei model, PD-L1 from the
    ensemble's maps), against the truth: error, cut-off category, the members' range and the review flag."""
    slides = distinct_paths(slides, done="scored once")  # a glob and one of its files: counted once in the means
    from rich.table import Table

    from inference import Models, load_truth, tps_range_text, tps_text, tumour_proportion_score

    out = stdout()
    try:
        config = pipeline_config(device, seg_model, nuclei_model, None)
        models = Models(config)
        for option, m in (("--seg-model", models.seg), ("--nuclei-model", models.nuclei)):
            _require_model_stain(m.manifest, "H&E", option=option, folder=m.folder, command="`pdl1 eval tps`")
        _check_truths(
            slides,
            {"H&E": [("segmentation", models.seg.manifest), ("nuclei", models.nuclei.manifest)]},
            needs=("spec", "tps_percent", "nuclei_counts"),
        )
        table = Table(title="predicted TPS (H&E) vs truth")
        for col in ("slide", "shift", "truth", "predicted", "error", "members' range", "truth in range", "category"):
            table.add_column(col, justify="left" if col == "slide" else "right")
        table.add_column("review")
        errors, inside, right = [], 0, 0
        for i, slide in enumerate(slides, start=1):
            truth = load_truth(slide).summary
            r = _analysed_as(slide, "H&E", models=models, config=config, progress=progress, of=(i, len(slides)))
            low, high = r.summary.get("tps_low"), r.summary.get("tps_high")
            err = abs(r.tps.percent - truth["tps_percent"])
            errors.append(err)
            within = low is not None and low <= truth["tps_percent"] <= high
            inside += within
            good = (
                r.tps.category
                == tumour_proportion_score(
                    truth["nuclei_counts"]["Tumor: Positive"], truth["nuclei_counts"]["Tumor: Negative"]
                ).category
            )
            right += good
            table.add_row(
                slide.name,
                f"{truth['spec']['shift']:g}",
                tps_text(truth["tps_percent"]),
                tps_text(r.tps.percent),
                f"{err:.1f}",
                "n/a" if low is None else tps_range_text(low, high, percent=r.tps.percent),
                "yes" if within else "no",
                "right" if good else f"WRONG ({r.tps.category})",
                "; ".join(x["reason"] for x in r.summary.get("review_reasons", [])) or "ok",
            )
        print_table(table)
        out.print(
            f"mean absolute error {sum(errors) / len(errors):.2f} points (max {max(errors):.2f}); category right "
            f"on {right} of {len(errors)}; truth within the members' range on {inside} of {len(errors)}"
        )
    except (Pdl1Error, ValueError, OSError) as err:
        raise fail(err) from err
    except KeyboardInterrupt:  # exit 130 without a word
        raise interrupted(EVAL_INTERRUPTED) from None


@app.command("registration")
def eval_registration(
    slides: Annotated[
        list[Path], typer.Argument(help="Phantom PD-L1 IHC slides written with --ihc; each is registered to its H&E.")
    ],
    mpp: Annotated[float, typer.Option(**number_range(1.0, 64.0), help="Resolution registered at, µm/px.")] = 8.0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar per pair.")] = True,
) -> None:
    """Registration error of each IHC onto its H&E against the true section transform (median, p90, max µm)."""
    slides = distinct_paths(slides, done="scored once")  # a glob and one of its files: counted once in the means
    from rich.table import Table

    from bridge.progress import progress_bar
    from inference import evaluate_registration

    out = stdout()
    try:
        table = Table(
            title=f"IHC -> H&E registration vs the true transform (asked at {mpp:g} µm/px; small pairs finer)"
        )
        for col in ("IHC", "H&E", "at µm/px", "median µm", "p90 µm", "max µm", "estimated µm", "angle °", "ok"):
            table.add_column(col, justify="left" if col in ("IHC", "H&E", "ok") else "right")
        _check_truths(slides, {"H-DAB": []}, mpp_advice=REGISTRATION_MPP_ADVICE)
        medians = []
        for i, slide in enumerate(slides, start=1):
            # About a second a pair, said nothing until the table: minutes for a lab's 100 pairs.
            with progress_bar(eval_bar(slide, i, len(slides), unit="pair"), enabled=progress) as on_progress:
                on_progress(0, 1)
                r = evaluate_registration(slide, mpp=mpp, mpp_advice=REGISTRATION_MPP_ADVICE)
                on_progress(1, 1)
            medians.append(r.error_median_um)
            table.add_row(
                r.ihc_slide,
                r.he_slide,
                f"{r.registered_mpp:.3g}",
                f"{r.error_median_um:.1f}",
                f"{r.error_p90_um:.1f}",
                f"{r.error_max_um:.1f}",
                f"{r.estimated_error_um:.1f}",
                f"{r.angle_deg:.2f}",
                "yes" if r.ok else f"no: {r.reason}",
            )
        print_table(table)
        ordered = sorted(medians)
        out.print(
            f"median of the slides' median errors {statistics.median(ordered):.1f} µm; worst {ordered[-1]:.1f} µm"
        )
    except (Pdl1Error, ValueError, OSError) as err:
        raise fail(err) from err
    except KeyboardInterrupt:  # exit 130 without a word
        raise interrupted(EVAL_INTERRUPTED) from None


def _refuse_shared_stems(slides: list[Path], out: Path) -> None:
    """The suite names each slide's files after its stem (``OUT/<stem>_overlay.png``, its metrics row): two slides
    of one stem were scored whole and then refused as "opened twice among the files replaced together"."""
    from bridge.project import sharing_a_stem

    for same in sharing_a_stem(slides):
        stem = same[0].stem
        raise typer.BadParameter(
            f"{', '.join(map(str, same))} share the file name {stem!r}, so their overlays ({out / stem}_overlay.png) "
            "and rows would be one another's; rename one, or score them into different --out folders",
            param_hint="SLIDES",
        )


@app.command("suite")
def eval_suite(
    slides: Annotated[
        list[Path], typer.Argument(help="Phantom slides with truth beside them (H&E, and PD-L1 IHC from --ihc).")
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Report folder: metrics.csv (ihc_metrics.csv), PNG plots and provenance.json; new, empty or an "
            "earlier eval's (a folder of other files is refused)."
        ),
    ],
    model: Annotated[Path | None, typer.Option(help="Segmentation ensemble; the shipped demo if omitted.")] = None,
    nuclei_model: NucleiModelOption = "demo",
    ihc_model: Annotated[
        Path | None, typer.Option(help="PD-L1 IHC nuclei ensemble for the IHC slides; the shipped demo if omitted.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", callback=check_device)] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Segmentation, calibration and uncertainty metrics, and SUA against the pixel baseline, per H&E slide;
    the TPS and the review flag per PD-L1 IHC slide.

    H&E slides are scored over the truth's tissue (tissue recall printed). Then: the ensemble against its
    members (mean over slides, rank per slide, wins); slide failure detection (a failure: the predicted TPS in
    the wrong category, or the positive area off by more than 25 % of the truth's, or of 1 % of the tissue where
    the truth's is smaller) of each QC score as AURC / E-AURC, and the
    review flag's catches and false alarms; pixel-error AUROC of entropy and mutual information against their
    two baselines; SUA against the pixel baseline, wins counted. Slides whose truth is a PD-L1 IHC
    (pdl1 phantom --ihc) are analysed as pdl1 run analyses an image QuPath types H-DAB: TPS and CPS
    against the truth and the review flag (a failure: the TPS in the wrong category or off by more than 5
    points), then the flag's catches and false alarms over both stains.
    """
    from bridge.eval_report import holds_an_eval, is_report_file, write_report
    from bridge.progress import progress_bar
    from bridge.run_lock import output_folder_lock
    from inference import (
        Ensemble,
        PipelineConfig,
        demo_model_dir,
        evaluate_slide_suite,
        read_manifest,
        review_rule_for,
        sua_params_for,
    )

    console_out = stdout()
    slides = distinct_paths(slides, done="scored once")
    _refuse_shared_stems(slides, out)
    require_out_folder(out, what="the report")
    try:
        # Under the --out folder's lock, held from the start so a second eval into it is refused before its
        # computing: the .part files a killed eval left of its own files go first (bridge.run_lock.output_folder_lock).
        with output_folder_lock(
            out,
            command="eval",
            own=is_report_file,
            written_before=holds_an_eval,
            writes="it writes metrics.csv, ihc_metrics.csv, provenance.json and PNG plots",
        ):
            ensemble = Ensemble.load(model or demo_model_dir("seg"), task="segmentation", device=device)
            nuclei = _nuclei_model(nuclei_model, device)
            manifest = ensemble.manifest
            he_models = [("segmentation", manifest)]
            if nuclei is not None:
                _require_model_stain(
                    nuclei.manifest,
                    "H&E",
                    option="--nuclei-model",
                    folder=nuclei.folder,
                    command="scoring the H&E slides",
                )
                he_models.append(("nuclei", nuclei.manifest))
            # The IHC model loads only for IHC slides; its manifest is read here to check it against them first.
            ihc_folder = ihc_model or demo_model_dir("nuclei-ihc")
            ihc_manifest = read_manifest(ihc_folder, task="nuclei", verify=False)
            _require_model_stain(
                ihc_manifest, "H-DAB", option="--ihc-model", folder=ihc_folder, command="scoring the PD-L1 IHC slides"
            )
            truths = _check_truths(slides, {"H&E": he_models, "H-DAB": [("PD-L1 IHC nuclei", ihc_manifest)]})
            ihc_slides = [slide for slide, t in zip(slides, truths, strict=True) if t.summary.get("stain") == "H-DAB"]
            he_slides = [slide for slide in slides if slide not in ihc_slides]
            upper = manifest.thresholds.get("segmentation", 0.5)
            sua = sua_params_for(manifest, PipelineConfig(), upper=upper)
            pixel_threshold = manifest.thresholds.get("pixel_baseline_threshold", sua.threshold)
            evaluations = []
            for i, slide in enumerate(he_slides, start=1):
                with progress_bar(eval_bar(slide, i, len(he_slides)), enabled=progress) as on_progress:
                    evaluations.append(
                        evaluate_slide_suite(
                            slide,
                            ensemble,
                            sua=sua,
                            pixel_threshold=pixel_threshold,
                            review=review_rule_for(manifest),
                            nuclei_model=nuclei,
                            on_progress=on_progress,
                            mpp_advice=EVAL_MPP_ADVICE,
                        )
                    )
            ihc = _suite_ihc(ihc_slides, ihc_model=ihc_model, device=device, progress=progress)
            provenance = {
                "command": "pdl1 eval",
                "slides": [str(s) for s in he_slides],
                "ihc_slides": [str(s) for s in ihc_slides],
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
                # what made tps_predicted and the TPS part of `failed`; None: --nuclei-model none
                "nuclei_model": None
                if nuclei is None
                else {
                    "name": nuclei.manifest.name,
                    "version": nuclei.manifest.version,
                    "sha256": nuclei.manifest.checksum,
                    "folder": str(nuclei.folder),
                },
            }
            if ihc is not None:
                provenance["ihc_model"] = {
                    "name": ihc[0].name,
                    "version": ihc[0].version,
                    "sha256": ihc[0].checksum,
                    "folder": str(ihc_folder),
                }
            # metrics.csv, ihc_metrics.csv and the plots are replaced together and provenance.json, which says what made
            # them, last, the earlier one removed before the first: no reader pairs a new file with a stale provenance
            # or the new provenance with a stale file (bridge.atomic.replaced_together says why in that order). The table
            # of the other stain, where this run writes none and an earlier one did, keeps its run's provenance within
            # the new one (kept_from_earlier_run).
            written = write_report(evaluations, out, provenance=provenance, ihc_rows=None if ihc is None else ihc[1])
    except (Pdl1Error, ValueError, OSError) as err:
        raise fail(err) from err
    except KeyboardInterrupt:  # exit 130 without a word
        raise interrupted(
            f"{out} is as it was: the suite writes its tables and plots only when every slide is scored, and "
            "replaces them together; run it again"
        ) from None
    if evaluations:
        _print_suite(console_out, evaluations, manifest=manifest, sua=sua, nuclei=nuclei, written=written)
    if ihc is not None:
        failed, flagged = _print_ihc(console_out, ihc[0].name, ihc[1], written["ihc_metrics"])
        if evaluations:  # H&E failures and flags, then both stains together
            failed = [e.failed() for e in evaluations] + failed
            flagged = [e.needs_review for e in evaluations] + flagged
            console_out.print(
                f"review flag, both stains: {_review_line(failed, flagged, 'as defined for each stain above')}"
            )


def _print_suite(console_out, evaluations, *, manifest, sua, nuclei, written) -> None:
    """The H&E half of ``pdl1 eval suite``'s printout."""
    from rich.table import Table

    from bridge.eval_report import ensemble_vs_members, failure_detection, rows, slide_uncertainty_correlation

    table = Table(
        title=f"evaluation ({manifest.name} {manifest.version}, SUA on {sua.uncertainty}/{sua.aggregation}, "
        f"NPR [{sua.lower:g}, {sua.upper:g}), threshold {sua.threshold:.3g})"
    )
    shown = (
        "slide",
        "shift",
        "tissue_recall",
        "dice",
        "ensemble_rank",
        "positive_area_error",
        "failed",
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
    print_table(table, whole_in=", ".join(str(p) for p in written.values()))
    console_out.print(f"Spearman(slide mean entropy, 1 - Dice) = {slide_uncertainty_correlation(evaluations):.3f}")
    versus = ensemble_vs_members(evaluations)
    members = ", ".join(f"{d:.4f}" for d in versus["member_mean_dice"])
    console_out.print(
        f"ensemble vs members: mean Dice over slides {versus['ensemble_mean_dice']:.4f} vs members [{members}]; "
        f"ensemble best on {versus['wins']} of {versus['slides']} slides (its rank per slide: "
        f"{' '.join(str(r) for r in versus['ranks'])})"
    )
    what = "TPS category wrong or positive area off by > 25 %" if nuclei is not None else "positive area off by > 25 %"
    detection = Table(title=f"slide failure detection (failure: {what}; AURC lower is better)")
    for col in ("QC score", "AURC", "E-AURC", "random", "perfect"):
        detection.add_column(col, justify="left" if col == "QC score" else "right")
    detections = failure_detection(evaluations)
    for d in detections:
        detection.add_row(
            d["score"], f"{d['aurc']:.3f}", f"{d['e_aurc']:.3f}", f"{d['random_aurc']:.3f}", f"{d['optimal_aurc']:.3f}"
        )
    flag = detections[-1]  # the review flag's row comes last
    print_table(detection)
    console_out.print(
        f"review flag: caught {flag['caught']} of {flag['failures']} failed slides; "
        f"false alarms on {flag['false_alarms']} of {flag['successes']} others"
    )
    console_out.print(_uncertainty_vs_baselines([e.seg for e in evaluations]))
    sua_wins = 0
    for e in evaluations:
        better = e.sua.f05 > e.baseline.f05 and e.sua.fncr > e.baseline.fncr
        sua_wins += better
        console_out.print(
            f"{e.slide}: SUA F0.5 {e.sua.f05:.3f} vs pixel baseline {e.baseline.f05:.3f}; "
            f"FNCR {e.sua.fncr:.3f} vs {e.baseline.fncr:.3f} -> "
            + ("SUA better on both" if better else "SUA not better on both")
            + f" ({e.sua.false_negative_px} false-negative map px to find)"
        )
    console_out.print(
        f"SUA better than the pixel baseline on both F0.5 and FNCR: {sua_wins} of {len(evaluations)} slides"
    )
    console_out.print(f"report: {', '.join(str(p) for p in written.values())}", markup=False)


def _suite_ihc(slides: list[Path], *, ihc_model: Path | None, device: str, progress: bool):
    """The PD-L1 IHC slides of ``pdl1 eval suite``, each analysed as ``pdl1 run`` does: (the model's manifest, a
    row per slide for ``ihc_metrics.csv``), or None without IHC slides."""
    from inference import Models

    if not slides:
        return None
    config = pipeline_config(device, None, None, None, no_nuclei=True, ihc_model=ihc_model)
    models = Models(config)
    ensemble = models.ihc()
    records = []
    for slide, r, reasons, flag in _reviewed_ihc(
        slides, ensemble, models=models, config=config, radius_um=3.0, progress=progress
    ):
        records.append(
            {
                "slide": slide.name,
                "tps_predicted": r.tps_pred.percent,
                "tps_truth": r.tps_truth.percent,
                "tps_error": r.tps_abs_error,
                "category_right": int(r.category_right),
                "cps_predicted": None if r.cps_pred is None else r.cps_pred.percent,
                "cps_truth": None if r.cps_truth is None else r.cps_truth.percent,
                "f1": r.overall.f1,
                "entropy_mean": r.nuclei_entropy_mean,
                "failed": int(r.failed()),
                "needs_review": int(flag),
                "review_reasons": "; ".join(reasons),
            }
        )
    return ensemble.manifest, records


def _print_ihc(console_out, model_name: str, records: list[dict], written: Path) -> tuple[list[bool], list[bool]]:
    """The IHC half of ``pdl1 eval suite``'s printout; (failed, flagged) per slide."""
    from rich.table import Table

    from bridge.eval_report import IHC_COLUMNS
    from inference import tps_text

    table = Table(title=f"PD-L1 IHC slides ({model_name}): TPS and the review flag")
    for col in IHC_COLUMNS:
        table.add_column(col.replace("_", " "), justify="left" if col in ("slide", "review_reasons") else "right")

    def cell(key: str, value) -> str:
        if value is None:
            return "n/a"
        if isinstance(value, float):  # a TPS never rounded across a cut-off (1 %, 50 %)
            return tps_text(value) if key in ("tps_predicted", "tps_truth") else f"{value:.3f}"
        return str(value)

    for rec in records:
        table.add_row(*(cell(k, v) for k, v in rec.items()))
    print_table(table, whole_in=str(written))
    failed = [bool(rec["failed"]) for rec in records]
    flagged = [bool(rec["needs_review"]) for rec in records]
    console_out.print(f"review flag on PD-L1 IHC: {_review_line(failed, flagged, _ihc_failure())}")
    console_out.print(f"report: {written}", markup=False)
    return failed, flagged


def _one_of(words: str):
    """A word option's callback: a word other than those ``inference.<words>`` lists is a usage error before any
    slide is segmented (calibrate's own check comes after all of them)."""

    def check(value: str) -> str:
        import inference

        choices = getattr(inference, words)
        if value not in choices:
            raise typer.BadParameter(f"got {value!r}; expected one of {', '.join(choices)}")
        return value

    return check


# Below either, a written SUA calibration draws a warning: too little to trust a fitted threshold on.
_SUA_MIN_SLIDES = 3
_SUA_MIN_FALSE_NEGATIVES = 5


def calibrate(
    slides: Annotated[list[Path], typer.Argument(help="Validation phantom slides with truth (not the test slides).")],
    model: Annotated[
        Path | None,
        typer.Option(
            help="Segmentation ensemble to calibrate, in place unless --out; the shipped demo if omitted, which is "
            "read-only (give --out)."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write a calibrated copy here instead of updating --model.")] = None,
    min_fraction: Annotated[
        float,
        typer.Option(
            **number_range(0.5, 1.0), help="An NPR is a false negative when this share of its pixels is truly positive."
        ),
    ] = 0.9,
    uncertainty: Annotated[
        str,
        typer.Option(help="predictive_entropy, mutual_information or prob_std.", callback=_one_of("UNCERTAINTY_MAPS")),
    ] = "predictive_entropy",
    aggregation: Annotated[str, typer.Option(help="mean or p90.", callback=_one_of("AGGREGATIONS"))] = "mean",
    objective: Annotated[
        str,
        typer.Option(
            help="pixels: F0.5 over the pixels of flagged NPRs (the unit SUA is compared with the baseline in); "
            "regions: each NPR counts once.",
            callback=_one_of("CALIBRATION_OBJECTIVES"),
        ),
    ] = "pixels",
    nuclei_model: NucleiModelOption = "demo",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", callback=check_device)] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Choose SUA's threshold and lower bound (max F0.5) and the "needs review" rule; write them to the manifest.

    The review limits (mean entropy, SUA candidate area, predicted positive area) are fitted to catch at
    least 90 % of the validation slides that failed (predicted TPS in the wrong category, or positive area
    off by more than 25 % of the truth's, or of 1 % of the tissue where the truth's is smaller) at no more
    than 20 % false alarms on the others, besides what the domain guard
    flags, the slides whose ensemble members disagree on the TPS category and those whose unsettled share of
    the positive area reaches its limit (these two limits are not fitted); the search's ROC and the chosen
    point are printed. Slides without both failures and correct results leave the model's review limits as
    they are.
    """
    import dataclasses

    from bridge.cli.common import interrupted
    from bridge.progress import progress_bar
    from inference import (
        Ensemble,
        PipelineConfig,
        calibrate_ensemble,
        demo_model_dir,
        sua_fitted,
        sua_params_for,
        tps_text,
        write_manifest,
    )

    if model is None and out is None:
        raise typer.BadParameter(
            "the shipped demo is read-only: pass --out DIR for a calibrated copy", param_hint="--out"
        )
    # A slide named twice (a glob and one of its files, a symlink to it) counted twice in the fit.
    slides = distinct_paths(slides, done="calibrated on once")
    source = Path(model or demo_model_dir("seg"))
    check_model_target(source, out)
    in_place = out is None or out.resolve() == source.resolve()
    target = source if in_place else out
    try:
        ensemble = Ensemble.load(source, task="segmentation", device=device)
        nuclei = _nuclei_model(nuclei_model, device)
        with progress_bar("calibrating", enabled=progress) as bar:
            # A bar per slide and pass: one bar of every slide's tiles, each from 0 and naming none, then the
            # predicted TPS of every slide again in silence.
            stage = ["calibrating"]

            def on_slide(i: int, n: int, name: str, part: str) -> None:
                stage[0] = f"{part} {name} (slide {i} of {n})"

            def on_progress(done: int, total: int) -> None:
                bar(done, total, stage=stage[0])

            cal, review_cal = calibrate_ensemble(
                slides,
                ensemble,
                nuclei_model=nuclei,
                uncertainty=uncertainty,
                aggregation=aggregation,
                min_fraction=min_fraction,
                objective=objective,
                on_progress=on_progress,
                mpp_advice=CALIBRATE_MPP_ADVICE,
                on_slide=on_slide,
            )
        fitted = sua_fitted(cal)
        kept = sua_params_for(ensemble.manifest, PipelineConfig(), upper=cal.params.upper)
        sua_note = (
            ""
            if fitted
            else f"nothing to fit ({cal.n_regions} NPRs, {cal.n_false_negative} false negative), so the model's SUA "
            "thresholds stay; calibrate on slides whose predicted negative area misses positive tissue"
        )
        sua_calibration = {
            "uncertainty": uncertainty,
            "aggregation": aggregation,
            "min_fraction": min_fraction,
            "objective": objective,
            "calibrated_on": [p.name for p in slides],
            "f05": cal.f05,
            "pixel_baseline_f05": cal.pixel_f05,
            "nprs": cal.n_regions,
            "false_negative_nprs": cal.n_false_negative,
        }
        m = ensemble.manifest.with_thresholds(
            **(
                {
                    "sua_lower": cal.params.lower,
                    "sua_upper": cal.params.upper,
                    "sua_threshold": cal.params.threshold,
                    "pixel_baseline_threshold": cal.pixel_threshold,
                }
                if fitted
                else {}
            ),
            **(review_cal.limits or {}),
        )
        m = dataclasses.replace(
            m,
            extra={
                **m.extra,
                "sua": sua_calibration
                if fitted
                else _kept_sua(ensemble.manifest.extra, sua_calibration, kept, sua_note),
                "review": {
                    "calibrated_on": [p.name for p in slides],
                    "note": review_cal.note,
                    "catch": None if review_cal.fit is None else review_cal.fit.catch,
                    "false_alarm": None if review_cal.fit is None else review_cal.fit.false_alarm,
                },
            },
        )
        if in_place:
            write_manifest(target, m)  # written beside and renamed over the old manifest
        else:
            write_model_copy(source, target, m)
    except (Pdl1Error, ValueError, OSError) as err:
        raise fail(err) from err
    except KeyboardInterrupt:
        raise interrupted(f"nothing was written; {target} is as it was. Run pdl1 calibrate again") from None
    if fitted:
        typer.echo(
            f"SUA: NPR [{cal.params.lower:g}, {cal.params.upper:g}), {uncertainty}/{aggregation} > "
            f"{cal.params.threshold:.4g} ({objective} F0.5 {cal.f05:.3f} on {cal.n_regions} NPRs, "
            f"{cal.n_false_negative} false negative)"
        )
        typer.echo(f"pixel baseline threshold {cal.pixel_threshold:.4g} (pixel F0.5 {cal.pixel_f05:.3f})")
        if len(slides) < _SUA_MIN_SLIDES or cal.n_false_negative < _SUA_MIN_FALSE_NEGATIVES:
            # Written all the same (the user asked for it), but one odd region may have set the thresholds.
            typer.echo(
                f"warning: SUA's thresholds rest on {cal.n_false_negative} false-negative NPRs of {len(slides)} "
                f"slide{'s' if len(slides) != 1 else ''}: one odd region can set them; calibrate on at least "
                f"{_SUA_MIN_SLIDES} validation slides with {_SUA_MIN_FALSE_NEGATIVES} or more false-negative NPRs",
                err=True,
            )
    else:
        typer.echo(
            f"SUA kept: NPR [{kept.lower:g}, {kept.upper:g}), {kept.uncertainty}/{kept.aggregation} > "
            f"{kept.threshold:.4g}: {sua_note}"
        )
    for row in review_cal.slides:
        name, mean_pe, cand_pct, error, failed, positive_pct, out_of_domain, disagree, unsettled = row[:9]
        tps, truth_tps, wrong_category = row[9:]
        # The TPS beside the area, so a slide failed on its category alone does not read as failed on its area.
        predicted = "no tumour nuclei" if tps is None else f"{tps_text(tps)}%"
        tps_said = (
            ""
            if truth_tps is None
            else f", predicted TPS {predicted} vs truth {tps_text(truth_tps)}%{' (category wrong)' if wrong_category else ''}"
        )
        typer.echo(
            f"  {name}: mean entropy {mean_pe:.3f}, SUA candidates {cand_pct:.2f}% of tissue, predicted positive "
            f"{positive_pct:.2f}% of tissue{', out of domain' if out_of_domain else ''}"
            f"{', members disagree on the TPS category' if disagree else ''}"
            f"{', positive area unsettled' if unsettled else ''}{tps_said}, positive area off by "
            f"{error:.0%}{' (failed)' if failed else ''}"
        )
    if review_cal.fit is not None:
        roc = ", ".join(f"({fa:.2f}, {c:.2f})" for fa, c in review_cal.fit.roc)
        typer.echo(f"review ROC (false-alarm rate, catch rate) of the best rule at each false-alarm count: {roc}")
    from inference import REVIEW_NEVER, review_rule_for

    def limit(what: str, value: float, unit: str = "", *, below: bool = False) -> str:
        if below:
            return f"{what} never" if value < 0 else f"{what} <= {value:.4g}{unit}"
        return f"{what} never" if value >= REVIEW_NEVER else f"{what} >= {value:.4g}{unit}"

    rule = review_rule_for(m)
    typer.echo(
        f"needs review at {limit('mean entropy', rule['review_entropy'])} or "
        f"{limit('SUA candidate area', rule['review_candidate_area_pct'], '% of tissue')} or "
        f"{limit('predicted positive area', rule['review_positive_area_pct'], '% of tissue', below=True)} "
        f"or {limit('unsettled positive area', rule['review_unsettled_positive_area_pct'], '% of the positive')} "
        f"or out of the training domain"
        f"{' or members disagree on the TPS category' if nuclei is not None else ''}: {review_cal.note}"
    )
    typer.echo(f"wrote {Path(target) / 'manifest.json'}")


def _kept_sua(extra: dict, record: dict, kept, note: str) -> dict:
    """extra["sua"] of a calibration that kept the SUA thresholds: this run's record, with the uncertainty and
    aggregation the kept thresholds apply to (pdl1 run reads them here) and where those thresholds came from."""
    before = extra.get("sua", {})
    return {
        **record,
        "uncertainty": kept.uncertainty,
        "aggregation": kept.aggregation,
        "thresholds_kept": note,
        "kept_from": before.get("kept_from", before),
    }


def _nuclei_model(choice: str, device: str):
    """The nuclei ensemble --nuclei-model names ('demo': the shipped one; 'none': None)."""
    from inference import Ensemble, demo_model_dir

    if choice == "none":
        return None
    return Ensemble.load(demo_model_dir("nuclei") if choice == "demo" else choice, task="nuclei", device=device)
