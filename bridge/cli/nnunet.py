"""``pdl1 import nnunet`` and ``pdl1 export nnunet``: nnU-Net v2 models in, nnU-Net v2 datasets out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from bridge.cli.common import (
    STAIN_WORDS,
    TIFF_WITH_RESOLUTION,
    console,
    fail,
    interrupted,
    number_range,
    require_out_folder,
    warn_of_count,
)
from bridge.options import option_words
from inference import Pdl1Error

import_app = typer.Typer(
    rich_markup_mode=None,
    help="Bring models trained elsewhere in as model folders of this product.",
    no_args_is_help=True,
)
export_app = typer.Typer(rich_markup_mode=None, help="Write training data for other tools.", no_args_is_help=True)
# How `pdl1 import nnunet` names import_nnunet's arguments in the advice of its messages: --out is out_dir, the
# others are the arguments' names with dashes (--mpp, --folds, --checkpoints, --positive-label); a stain is given
# as he or ihc (the library's H&E and H-DAB: `--stain H&E` pasted into a shell runs `--stain H` in the background).
_IMPORT_OPTIONS = option_words(out_dir="--out")
_STAIN_OPTION_VALUES = {"H&E": "he", "H-DAB": "ihc"}


def _import_words(name: str, value: object = ..., /) -> str:
    """import_nnunet's setting ``name`` (given ``value``) as `pdl1 import nnunet` takes it.

    >>> _import_words("stain", "H&E"), _import_words("out_dir"), _import_words("folds", ["0", "1"])
    ('--stain he', '--out', '--folds 0 --folds 1')
    """
    if name == "stain" and isinstance(value, str):
        value = _STAIN_OPTION_VALUES.get(value, value)
    return _IMPORT_OPTIONS(name, value)


IMPORT_WORDS = _import_words


@import_app.command("nnunet")
def import_nnunet_cmd(
    results_folder: Annotated[
        Path,
        typer.Argument(help="nnU-Net v2 trained-model folder: nnUNet_results/DatasetNNN_NAME/TRAINER__PLANS__2d."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Model folder to write (manifest + safetensors members).")],
    mpp: Annotated[
        float,
        typer.Option(
            "--mpp",
            **number_range(0.05, 64.0),
            help="µm/px of the training images (nnU-Net keeps no unit for 2D images).",
        ),
    ],
    checkpoints: Annotated[
        list[str] | None,
        typer.Option(
            "--checkpoints",
            help="Checkpoint file names taken from every fold, repeatable (nnUNet-B: several of one cyclic run). "
            "Default checkpoint_final.pth.",
        ),
    ] = None,
    folds: Annotated[
        list[str] | None, typer.Option("--folds", help="Folds to take, repeatable (default: every fold_*).")
    ] = None,
    positive_label: Annotated[
        str | None,
        typer.Option("--positive-label", help="Label of the PD-L1 positive class (needed with more than 2 classes)."),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Model name (default: the dataset's).")] = None,
    stain: Annotated[
        str | None,
        typer.Option(
            "--stain",
            help="Stain it was trained on: H&E (or he) or H-DAB (or ihc, as pdl1 run's). Default: the stain `pdl1 "
            "export nnunet` recorded in the dataset, else H&E.",
        ),
    ] = None,
) -> None:
    """Import an nnU-Net v2 2D model: its checkpoints become the members of a segmentation ensemble.

    Checkpoints are read with torch's restricted unpickler (tensors and plain data only) and only their network weights are kept. Building the network needs the nnunet extra (dynamic_network_architectures). Use the result with `pdl1 run --seg-model OUT`.
    """
    from bridge.atomic import folder_replaced_whole
    from bridge.project import not_a_folder
    from inference import import_nnunet

    manifest_stain = None if stain is None else STAIN_WORDS.get(stain.lower())
    if stain is not None and manifest_stain is None:  # pdl1 run's words were refused: "not one of ('H&E', 'H-DAB')"
        raise typer.BadParameter(f"expected H&E (or he) or H-DAB (or ihc), got {stain!r}", param_hint="--stain")
    problem = not_a_folder(out.parent)  # --out itself a file or a full folder is said with the import's own checks
    if problem is not None:
        raise typer.BadParameter(
            f"{out}: its folder {out.parent} {problem}; --out names the model folder to write", param_hint="--out"
        )
    try:
        # Written into a folder beside --out and renamed onto it when whole: a failure or Ctrl-C part way
        # (a full disk, a member that will not save) leaves no half a model where `pdl1 run` would find it.
        with folder_replaced_whole(out) as part:
            manifest = import_nnunet(
                results_folder,
                out,
                mpp=mpp,
                checkpoints=checkpoints,
                folds=folds,
                positive_label=positive_label,
                name=name,
                stain=manifest_stain,
                write_into=part,
                setting=IMPORT_WORDS,
            )
    except (Pdl1Error, OSError, ValueError) as err:
        raise fail(err) from err
    except KeyboardInterrupt:
        raise interrupted(
            f"nothing was written: the model is written beside {out} and renamed onto it when whole; run the import "
            "again"
        ) from None
    arch = manifest.architecture.rsplit(".", 1)[-1]
    console.print(
        f"{out}: {len(manifest.members)} members ({arch}, {manifest.tile_size_px} px tiles at {manifest.input_mpp:g} "
        f"µm/px, classes {manifest.class_names}, positive {manifest.class_names[manifest.positive_class]!r})",
        markup=False,  # the class list prints as "['background', ...]", which rich would take for markup
    )
    for member in manifest.training["members"]:
        console.print(
            f"  {member['file']}: {member['checkpoint']} (fold {member['fold']}, epoch {member['epoch']})", markup=False
        )


def _one_stain(slides: list) -> str:
    """The stain of phantom slides to export, from their truth (H&E where a slide has none): one model is trained on
    one stain, so slides of both are refused. Mixed, they exported in silence, and the import took them for H&E."""
    from inference import truth_dir_for

    stains: dict[str, list[str]] = {}
    for slide in slides:
        path = Path(getattr(slide, "path", slide))
        try:
            summary = json.loads((truth_dir_for(path) / "truth.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):  # no truth (a test image), or damaged: the export's own reading says so
            continue
        stain = summary.get("stain", "H&E") if isinstance(summary, dict) else "H&E"
        stains.setdefault(str(stain), []).append(path.name)
    if len(stains) > 1:
        listing = "; ".join(f"{stain}: {', '.join(names)}" for stain, names in sorted(stains.items()))
        raise ValueError(
            f"the slides are of more than one stain ({listing}); a model is trained on one stain: export each "
            "stain's slides into a dataset of its own"
        )
    return next(iter(stains), "H&E")


def _entry_mpp_advice(value: str) -> str:
    """What to do about a project's image without a pixel size: the export reads the one QuPath states, else the
    file's. Its --mpp is the exported tiles' µm/px, not the image's (the library's advice, "pass ... as mpp",
    sent users to it)."""
    return (
        "`pdl1 export nnunet` reads an entry at the pixel size its QuPath project states (as `pdl1 run` does), "
        f"else at its file's: set it in QuPath (Image tab: Pixel width/height) to {value} and save the project; "
        f"or re-save the file where the entry finds it with resolution tags stating it (a TIFF, {TIFF_WITH_RESOLUTION}); "
        "or leave the entry out (--entries names those to train on, --test those to predict)"
    )


def _slide_file_mpp_advice(value: str) -> str:
    """What to do about a slide file without a pixel size: only the file can state one here."""
    return (
        "`pdl1 export nnunet` reads a slide file at its own pixel size: re-save it with resolution tags stating "
        f"{value} (a TIFF, {TIFF_WITH_RESOLUTION}); or export it from a QuPath project with the pixel size set "
        "there (Image tab: Pixel width/height); or leave it out"
    )


@export_app.command("nnunet")
def export_nnunet_cmd(
    images: Annotated[
        list[Path],
        typer.Argument(
            help="A QuPath project (folder or .qpproj) or slide files, phantoms with their truth beside them."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="nnUNet_raw/DatasetNNN_NAME to write (three digits, then a name).")
    ],
    mpp: Annotated[
        float,
        typer.Option(
            "--mpp",
            **number_range(0.05, 64.0),
            help="µm/px of the exported tiles (not the images': a project's come from QuPath, else from the file).",
        ),
    ] = 2.0,
    case_px: Annotated[
        int, typer.Option("--case-px", min=32, max=8192, help="Edge of each case (tile) in px at --mpp.")
    ] = 512,
    test: Annotated[
        list[str] | None,
        typer.Option(
            "--test",
            help="Images to predict, written to imagesTs/ whole (repeatable): slide files, or a project's image "
            "names or entry IDs.",
        ),
    ] = None,
    margin_px: Annotated[
        int,
        typer.Option(
            "--ignore-margin-px",
            min=0,
            max=256,
            help="Leave pixels this close to a class boundary unlabelled (ignore); phantom truth only.",
        ),
    ] = 0,
    labels: Annotated[
        str,
        typer.Option(
            help="qupath: the regions drawn in the project (training regions, PD-L1 positive/negative, Ignore*), "
            "through QuPath or its pdl1/labels/ exports; truth: phantom truth beside each slide. "
            "auto: qupath for a project, truth for slide files.",
        ),
    ] = "auto",
    qupath: Annotated[
        str, typer.Option(help="Read a project's labels through QuPath: auto, always or never (use the exports).")
    ] = "auto",
    search_dir: Annotated[
        list[Path] | None,
        typer.Option(
            help="A project's images: folder to search, with its subfolders, for images that are not where the "
            "project says (repeatable, as for pdl1 run).",
            exists=True,
            file_okay=False,
        ),
    ] = None,
    entries: Annotated[
        list[str] | None,
        typer.Option("--entries", help="A project's entries to export (ID or image name; repeatable). Default: all."),
    ] = None,
    from_review: Annotated[
        bool,
        typer.Option(
            help="A project's labels: also what a person changed in pdl1 results (regions and FN candidates "
            "reclassified PD-L1 positive or negative, deleted FN candidates as negative), as pdl1 train seg "
            "--from-review takes them."
        ),
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar (cases written).")] = True,
) -> None:
    """Write an nnU-Net v2 raw dataset: imagesTr/, labelsTr/ (with nnU-Net's ignore label), dataset.json, cases.json.

    Takes a QuPath project's images or slide files. A project's labels are the regions drawn in it (training regions, PD-L1 positive/negative areas, Ignore*; read through QuPath or from the pdl1/labels/ exports of qupath_scripts/pdl1_export_labels.groovy): pixels they do not decide get the ignore label. Slide files take phantom truth (<slide>.truth/): pixels the truth does not decide (mixed at --mpp), and with --ignore-margin-px those near a class boundary, get the ignore label. A project's images are read at the pixel size QuPath states for them (Image tab: Pixel width/height), else at their file's own, as `pdl1 run` reads them; slide files at their own. cases.json maps every case to its image (and project entry) and level-0 region; pdl1_export.json records the export (version, µm/px, label source and its settings, images); --test images go to imagesTs/ whole. Train it as the README's nnU-Net section says, then `pdl1 import nnunet`.
    """
    from bridge.nnunet_export import PhantomTruthLabels, QuPathRegionLabels, export_nnunet_dataset, project_images
    from bridge.progress import progress_bar

    if len(images) > 1 and any(p.is_dir() or p.suffix == ".qpproj" for p in images):
        raise typer.BadParameter("give one project, or slide files, not both", param_hint="IMAGES")
    if labels not in ("auto", "qupath", "truth"):
        raise typer.BadParameter(f"expected auto, qupath or truth, got {labels!r}", param_hint="--labels")
    if qupath not in ("auto", "always", "never"):
        raise typer.BadParameter(f"expected auto, always or never, got {qupath!r}", param_hint="--qupath")
    require_out_folder(out, what="the nnU-Net dataset (nnUNet_raw/DatasetNNN_NAME)")
    is_project = images[0].is_dir() or images[0].suffix == ".qpproj"
    if not is_project:
        both = [t for t in test or [] if any(Path(t).resolve() == p.resolve() for p in images)]
        if both:
            raise typer.BadParameter(
                f"{', '.join(both)} is given to train on and to predict (--test): an image is one or the other; "
                "leave it out of one of them",
                param_hint="--test",
            )
    if labels == "qupath" and not is_project:
        raise typer.BadParameter("QuPath labels come from a project: give the project", param_hint="--labels")
    if margin_px and is_project and labels != "truth":  # was ignored without a word
        raise typer.BadParameter(
            "--ignore-margin-px applies to phantom truth; a project's labels are the regions drawn in it, whose "
            "edges are where a person drew them: leave it out (or draw Ignore* areas along uncertain edges)",
            param_hint="--ignore-margin-px",
        )
    if from_review and not (is_project and labels != "truth"):
        raise typer.BadParameter(
            "--from-review reads a QuPath project's reviewed pdl1 results; phantom truth has none: leave it out",
            param_hint="--from-review",
        )
    if entries and not is_project:  # was ignored: every slide given was exported
        raise typer.BadParameter(
            "--entries chooses entries of a QuPath project; the images are slide files: give only the slides to export",
            param_hint="--entries",
        )
    # A project's entries are read at the pixel size QuPath states, else the file's; slide files at their own.
    advice = _entry_mpp_advice if is_project else _slide_file_mpp_advice
    try:
        if is_project:
            train, tests = project_images(images[0], test_names=test or [], search_dirs=tuple(search_dir or ()))
            if entries:
                named = {name for t in (*train, *tests) for name in (t.entry_id, t.image_name)}
                unknown = [e for e in entries if e not in named]
                if unknown and len(unknown) < len(entries):  # a misspelt one beside others was left out silently
                    listed = ", ".join(f"{t.entry_id} ({t.image_name})" for t in (*train, *tests))
                    raise typer.BadParameter(
                        f"no entry of the project is {', '.join(map(repr, unknown))}; its entries (ID and image name) "
                        f"are {listed}",
                        param_hint="--entries",
                    )
                chosen = [t for t in train if t.entry_id in entries or t.image_name in entries]
                if not chosen:
                    predicted = [t for t in tests if t.entry_id in entries or t.image_name in entries]
                    raise typer.BadParameter(
                        f"no entry of the project is one of {entries}"
                        if not predicted
                        else f"{', '.join(f'entry {t.entry_id} ({t.image_name})' for t in predicted)} is to be "
                        "predicted (--test), so --entries leaves nothing to train on: name labelled entries to train on",
                        param_hint="--entries",
                    )
                train = chosen
            if not train:
                raise typer.BadParameter(
                    "--test takes every entry of the project, so nothing is left to train on: leave the labelled "
                    "entries out of --test",
                    param_hint="--test",
                )
        else:
            train, tests = list(images), [Path(t) for t in test or []]
        if is_project and labels != "truth":
            from bridge.labels import (
                UNRECORDED_ANNOTATIONS_COUNT,
                UNRECORDED_ANNOTATIONS_WARNING,
                LabelRules,
                read_project_labels,
            )

            test_ids = {t.entry_id for t in tests}
            entries = tuple(t.entry_id for t in train if t.entry_id not in test_ids)
            drawn = read_project_labels(
                images[0],
                rules=LabelRules(points=False, from_review=from_review),
                entries=entries,
                qupath=qupath,
                search_dirs=tuple(search_dir or ()),
                mpp_advice=advice,
                reader="pdl1 export nnunet",
            )
            if (
                from_review
            ):  # the counts go to pdl1_export.json; what they cost a review is said here, as pdl1 train does
                warn_of_count(drawn, UNRECORDED_ANNOTATIONS_COUNT, UNRECORDED_ANNOTATIONS_WARNING)
            source = QuPathRegionLabels({lab.slide: lab for lab in drawn if lab.has_regions})
            unlabelled = [t for t in train if t.path.resolve() not in {Path(p).resolve() for p in source.by_slide}]
            if unlabelled:
                console.print(
                    "no region labels (skipped): " + ", ".join(t.image_name or t.path.name for t in unlabelled),
                    markup=False,
                )
                train = [t for t in train if t not in unlabelled]
            stain = "H&E"  # H-DAB entries are refused as their labels are read
        else:
            source = PhantomTruthLabels(margin_px=margin_px)
            stain = _one_stain([*train, *tests])
        # Every case read from its slide and written: minutes for a project of whole slides, said nothing till the end.
        with progress_bar("cases", enabled=progress) as on_progress:
            summary = export_nnunet_dataset(
                train,
                out,
                source=source,
                mpp=mpp,
                case_size_px=case_px,
                test_slides=tests,
                mpp_advice=advice,
                stain=stain,
                on_progress=on_progress,
            )
    except (Pdl1Error, OSError, ValueError) as err:
        raise fail(err) from err
    except KeyboardInterrupt:  # exit 130 without a word: was the dataset half there?
        raise interrupted(
            f"nothing was written: the dataset is written beside {out} and renamed onto it when whole; run the export "
            "again"
        ) from None
    console.print(
        f"{summary.folder}: {summary.training_cases} training cases, {summary.test_cases} test cases; "
        f"{summary.labelled_fraction:.1%} of training pixels labelled, {summary.positive_fraction:.1%} of them positive",
        markup=False,
    )
