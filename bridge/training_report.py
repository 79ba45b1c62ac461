"""``OUT/training_report.html`` after ``pdl1 train seg|nuclei``, and again from a model folder (``pdl1 train report``).

What it shows comes from the model folder: the manifest (members, label sources), each chain's
``training_history.json`` (loss and learning rate per iteration), ``validation.json`` (held-out slides),
and what training left in ``OUT/training_report/``: ``labels.json`` (areas and points per class and slide)
and ``examples.npz`` (tiles with their labels and the model's prediction). Those two are computed once, at
the end of training, when the labels and slides are at hand (:func:`record_training_data`); re-rendering
only draws. The numbers are computed in ``inference`` (:mod:`inference.training.report`); here they are
drawn (matplotlib) and written.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bridge.atomic import replace_atomically, save_figure
from bridge.project import write_json_atomic
from inference import IGNORE_LABEL, ExampleTile, LabelStatistics, Pdl1Error, read_training_curves

log = logging.getLogger(__name__)

REPORT_FILE = "training_report.html"
REPORT_DIR = "training_report"
LABELS_FILE = "labels.json"
EXAMPLES_FILE = "examples.npz"


class TrainingReportError(Pdl1Error, ValueError):
    """A folder that holds no trained model, or report data that does not read."""


def record_training_data(
    out: str | Path,
    *,
    task: str,
    labels: Sequence[Any] = (),
    held_out: Sequence[Any] = (),
    truth_slides: Sequence[str] = (),
    device: str = "cpu",
    on_progress: Callable[[int, int], None] | None = None,
) -> None:
    """Keep what only training has at hand: label statistics per slide and example tiles with predictions.

    ``labels``/``held_out``: the :class:`~inference.SlideLabels` trained on and held out; ``truth_slides``:
    phantom slides trained on their truth (no ``labels``). Example tiles come from the held-out slides when
    there are any, else from the training slides. ``on_progress(done, total)`` counts the slides whose
    statistics are read, and the example tiles last, as one.
    """
    from inference import example_tiles, label_statistics, open_labelled_slide, truth_statistics

    folder = Path(out) / REPORT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stats: list[tuple[str, LabelStatistics]] = []
    total = len(labels) + len(held_out) + len(truth_slides) + 1

    def count() -> None:
        if on_progress is not None:
            on_progress(len(stats), total)

    count()
    for role, group in (("training", labels), ("validation", held_out)):
        for lab in group:
            with open_labelled_slide(lab) as slide:  # at the pixel size training read it at
                mpp = slide.mpp.mean
            stats.append((role, label_statistics(lab, mpp=mpp)))
            count()
    for s in truth_slides:
        stats.append(("training", truth_statistics(s)))
        count()
    write_json_atomic(folder / LABELS_FILE, {"slides": [{"role": role} | asdict(s) for role, s in stats]})
    if held_out:
        tiles = example_tiles(out, task=task, labels=held_out, role="validation", device=device)
    elif labels:
        tiles = example_tiles(out, task=task, labels=labels, role="training", device=device)
    else:
        tiles = example_tiles(out, task=task, truth_slides=truth_slides, role="training", device=device)
    _save_examples(folder / EXAMPLES_FILE, tiles)
    if on_progress is not None:
        on_progress(total, total)


def _save_examples(path: Path, tiles: Sequence[ExampleTile]) -> None:
    """Tiles as plain arrays (no pickle) and their descriptions as one JSON string."""
    arrays: dict[str, np.ndarray] = {}
    meta = []
    for i, t in enumerate(tiles):
        arrays[f"rgb_{i}"] = t.rgb
        for name in ("label_mask", "prob"):
            value = getattr(t, name)
            if value is not None:
                arrays[f"{name}_{i}"] = value
        for name in ("label_xy", "label_class", "predicted_xy", "predicted_class"):
            arrays[f"{name}_{i}"] = np.asarray(getattr(t, name))
        meta.append(
            {
                "slide": t.slide,
                "role": t.role,
                "box_px": list(t.box_px),
                "mpp": t.mpp,
                "class_names": list(t.class_names),
                "threshold": t.threshold,
            }
        )
    arrays["meta"] = np.asarray(json.dumps(meta))
    part = path.with_name(path.name + ".part.npz")
    np.savez_compressed(part, **arrays)
    part.replace(path)


def _load_examples(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            return [
                m | {k.rsplit("_", 1)[0]: data[k] for k in data.files if k != "meta" and k.rsplit("_", 1)[1] == str(i)}
                for i, m in enumerate(meta)
            ]
    except (OSError, ValueError, KeyError) as err:
        raise TrainingReportError(f"{path} does not read ({err}); train again to make it") from err


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TrainingReportError(f"{path} does not read ({err})") from err


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curves_png(curves: Sequence[Any], path: Path) -> None:
    plt = _plt()
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, dpi=100)
    for c in curves:
        label = f"chain {c.chain}" if len(curves) > 1 else "per iteration"
        line = ax_loss.plot(c.step, c.loss, lw=0.7, alpha=0.45, label=label)[0]
        ax_loss.plot(c.epoch_end_step, c.epoch_loss, "o-", ms=3, color=line.get_color(), label="epoch mean")
        ax_lr.plot(c.step, c.learning_rate, lw=1, color=line.get_color())
        for end in c.epoch_end_step[np.isin(c.epoch, c.member_epochs)]:
            ax_loss.axvline(end, color=line.get_color(), ls=":", lw=0.8)
            ax_lr.axvline(end, color=line.get_color(), ls=":", lw=0.8)
    ax_loss.set_ylabel("training loss")
    ax_loss.legend(fontsize=7)
    ax_loss.set_title("dotted lines: epochs kept as ensemble members", fontsize=8)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_yscale("log")
    ax_lr.set_xlabel("iteration")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _validation_png(validation: dict, path: Path) -> None:
    plt = _plt()
    rows = validation["slides"]
    names = [Path(r["slide"]).name for r in rows]
    keys = ("dice",) if validation["task"] == "segmentation" else ("precision", "recall", "f1")
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows) * len(keys)), 3.5), dpi=100)
    width = 0.8 / len(keys)
    for k, key in enumerate(keys):
        values = [np.nan if r.get(key) is None else r[key] for r in rows]
        ax.bar(np.arange(len(rows)) + k * width, values, width, label=key)
    # Each member alone, as dots over the ensemble's bar of the same score (Dice, or F1).
    members_key, bar = ("dice_members", 0) if validation["task"] == "segmentation" else ("f1_members", len(keys) - 1)
    for i, r in enumerate(rows):
        members = [np.nan if m is None else m for m in r.get(members_key) or []]
        ax.plot([i + bar * width] * len(members), members, "k.", markersize=4, label="members" if i == 0 else None)
    ax.set_xticks(np.arange(len(rows)) + width * (len(keys) - 1) / 2, names, fontsize=7)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("held-out slides: the ensemble's scores (dots: each member alone)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


_CLASS_COLOURS = ((0.85, 0.1, 0.1), (0.1, 0.4, 0.9), (0.1, 0.7, 0.2), (0.9, 0.6, 0.0), (0.6, 0.2, 0.8))


def _example_png(tile: dict[str, Any], path: Path) -> None:
    plt = _plt()
    rgb = tile["rgb"]
    if "label_mask" in tile:
        fig, axes = plt.subplots(1, 3, figsize=(10, 3.6), dpi=100)
        mask = tile["label_mask"]
        overlay = np.zeros((*mask.shape, 4))
        overlay[mask == 1] = (1.0, 0.45, 0.0, 0.5)
        overlay[mask == 0] = (0.1, 0.4, 1.0, 0.3)
        overlay[mask == IGNORE_LABEL] = (0.5, 0.5, 0.5, 0.0)
        axes[0].imshow(rgb)
        axes[0].set_title("tile", fontsize=8)
        axes[1].imshow(rgb)
        axes[1].imshow(overlay)
        axes[1].set_title("labels: orange positive, blue negative", fontsize=8)
        shown = axes[2].imshow(tile["prob"], vmin=0, vmax=1, cmap="magma")
        if tile.get("threshold") is not None and np.isfinite(tile["prob"]).any():
            axes[2].contour(np.nan_to_num(tile["prob"]), levels=[tile["threshold"]], colors="cyan", linewidths=0.8)
        axes[2].set_title("predicted positive probability (cyan: threshold)", fontsize=8)
        fig.colorbar(shown, ax=axes[2], fraction=0.046)
    else:
        fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
        axes = [ax]
        ax.imshow(rgb)
        names = tile["class_names"]
        for i, name in enumerate(names):
            colour = _CLASS_COLOURS[i % len(_CLASS_COLOURS)]
            lab = tile["label_xy"][tile["label_class"] == i]
            pred = tile["predicted_xy"][tile["predicted_class"] == i]
            if len(lab):
                ax.scatter(lab[:, 0], lab[:, 1], s=40, facecolors="none", edgecolors=[colour], label=f"label {name}")
            if len(pred):
                ax.scatter(pred[:, 0], pred[:, 1], s=14, marker="x", c=[colour], label=f"predicted {name}")
        ax.legend(fontsize=6, loc="lower right")
        ax.set_title("circles: labelled nuclei, crosses: predicted", fontsize=8)
    for a in axes:
        a.set_axis_off()
    x, y, w, h = tile["box_px"]
    fig.suptitle(f"{Path(tile['slide']).name} ({tile['role']}), x {x}, y {y}, {w} x {h} px", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _num(value: Any, fmt: str = ".3f") -> str:
    """A float as ``fmt``; a count (an int) whole, with thousands separators: not '65536.000' px."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return format(value, fmt) if isinstance(value, float) else str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_training_report(out: str | Path, *, on_progress: Callable[[int, int], None] | None = None) -> Path:
    """Draw and write ``OUT/training_report.html`` (pictures in ``OUT/training_report/``); returns its path.
    ``on_progress(done, total)`` counts the pictures drawn (the curves, the validation plot, each example tile)."""
    out = Path(out)
    if out.name == "manifest.json" and out.is_file():  # the manifest named for its folder, as read_manifest takes
        out = out.parent
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        raise TrainingReportError(
            f"{out}: no manifest.json, so no trained model; give the --out folder of a finished `pdl1 train seg` "
            "or `pdl1 train nuclei` (an interrupted run writes none: finish it with --resume)"
        )
    manifest = _read_json(manifest_path)
    training = manifest.get("training") or {}
    members = manifest.get("members", [])
    folder = out / REPORT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    sections = []
    curves = read_training_curves(out, members)
    validation_path = out / "validation.json"
    tiles = _load_examples(folder / EXAMPLES_FILE)
    # Each picture is drawn with matplotlib: seconds for a report of many example tiles, after the training's bars.
    total = bool(curves) + validation_path.is_file() + len(tiles)
    drawn = [0]

    def drew(pictures: int) -> None:
        drawn[0] += pictures
        if on_progress is not None:
            on_progress(drawn[0], total)

    drew(0)
    rows = [
        (m.get("file"), m.get("chain", 0), m.get("cycle"), m.get("epoch"), _num(m.get("learning_rate"), ".2e"))
        for m in members
    ]
    losses = training.get("final_losses") or []
    rows = [(*r, _num(losses[i]) if i < len(losses) else "n/a") for i, r in enumerate(rows)]
    count = f"{len(members)} member{'' if len(members) == 1 else 's'}"
    sections.append(
        f"<h2>Model</h2><p>{html.escape(str(manifest.get('name')))} {html.escape(str(manifest.get('version')))}, "
        f"{html.escape(str(manifest.get('task')))}, {count}, "
        f"input {html.escape(str(manifest.get('input_mpp')))} µm/px, "
        f"stain {html.escape(str(manifest.get('stain', 'H&E')))}</p>"
        + _table(("member", "chain", "cycle", "epoch", "learning rate", "training loss (epoch mean)"), rows)
    )

    if curves:
        _curves_png(curves, folder / "curves.png")
        drew(1)
        notes = "".join(
            f"<p>chain {html.escape(str(c.chain))}: {c.epoch.size} epochs, {c.step.size} iterations"
            + (
                f"; epochs {html.escape(', '.join(map(str, c.missing_epochs)))} were run before the history was kept"
                if c.missing_epochs
                else ""
            )
            + "</p>"
            for c in curves
        )
        sections.append(f"<h2>Loss and learning rate</h2>{notes}<img src='{REPORT_DIR}/curves.png'>")
    else:
        why = (
            "it was trained by nnU-Net and imported (`pdl1 import nnunet`): nnU-Net's own progress.png and "
            "training logs in its results folder show its curves"
            if training.get("source") == "nnU-Net v2"
            else "this model was trained before the history was kept"
        )
        sections.append(f"<h2>Loss and learning rate</h2><p>No training_history.json: {html.escape(why)}.</p>")

    if validation_path.is_file():
        validation = _read_json(validation_path)
        _validation_png(validation, folder / "validation.png")
        drew(1)
        if validation["task"] == "segmentation":
            headers = ("slide", "labelled px", "positive px", "predicted px", "Dice", "members' Dice", "rank")
            keys = ("labelled_px", "positive_px", "predicted_px", "dice")
            members_key = "dice_members"
        else:
            headers = ("slide", "marked nuclei", "found", "matched", "precision", "recall", "F1", "members' F1", "rank")
            keys = ("n_labelled", "n_predicted", "n_matched", "precision", "recall", "f1")
            members_key = "f1_members"
        rows = [
            (
                Path(r["slide"]).name,
                *(_num(r.get(k)) for k in keys),
                " / ".join(_num(m) for m in r.get(members_key) or []) or "-",
                f"{r['rank']} of {len(r[members_key]) + 1}" if r.get("rank") else "-",
            )
            for r in validation["slides"]
        ]
        # The classes of the matched nuclei, and an IHC's TPS as marked and as found (validations that measured them).
        extra_cols = [
            (key, name)
            for key, name in (
                ("class_agreement", "classes right"),
                ("tps_marked_percent", "TPS marked %"),
                ("tps_found_percent", "TPS found %"),
            )
            if validation["task"] != "segmentation" and any(r.get(key) is not None for r in validation["slides"])
        ]
        if extra_cols:
            headers = (*headers, *(name for _, name in extra_cols))
            rows = [
                (*row, *(_num(r.get(k)) for k, _ in extra_cols))
                for row, r in zip(rows, validation["slides"], strict=True)
            ]
        fit = validation.get("threshold_fit")
        fit_note = (
            ""
            if not fit
            else f"<p>{'Peak' if fit.get('metric') == 'F1' else 'Segmentation'} threshold "
            f"{html.escape(_num(fit['before'], 'g'))} -> {html.escape(_num(fit['after'], 'g'))} (pooled "
            f"{html.escape(str(fit.get('metric', 'Dice')))} {html.escape(_num(fit['score_before']))} -> "
            f"{html.escape(_num(fit['score_after']))}"
            + ("" if fit["adopted"] else ", gain under 0.005: kept")
            + "), fit on these slides: their scores here are not an independent estimate.</p>"
        )
        sections.append(
            "<h2>Validation (held-out slides)</h2><p>Scores of the whole ensemble (its mean prediction) and of "
            "each member alone; rank is the ensemble's place among its members (1: no member better).</p>"
            + fit_note
            + _table(headers, rows)
            + f"<img src='{REPORT_DIR}/validation.png'>"
        )

    labels_path = folder / LABELS_FILE
    if labels_path.is_file():
        slides = _read_json(labels_path)["slides"]
        classes = sorted({c for s in slides for c in s["points"]})

        def area(s: dict, key: str) -> str:
            px2 = s[key]
            return _num(px2 * s["mpp"] ** 2, ",.0f") if s.get("mpp") else f"{px2:,.0f} px^2"

        rows = [
            (
                Path(s["slide"]).name,
                s["role"],
                s["training_regions"],
                area(s, "positive_px2"),
                area(s, "negative_px2"),
                area(s, "ignore_px2"),
                *(s["points"].get(c, 0) for c in classes),
            )
            for s in slides
        ]
        sections.append(
            "<h2>Labels per slide</h2><p>Areas in µm^2 as the losses see them (inside training regions and drawn "
            "areas, less Ignore*); points per class.</p>"
            + _table(
                ("slide", "role", "training regions", "positive µm^2", "negative µm^2", "ignore µm^2", *classes), rows
            )
        )

    data = training.get("data") or []
    if data:
        rows = []
        for d in data:
            counts = d.get("counts")
            rows.append(
                (
                    Path(str(d.get("slide"))).name,
                    d.get("source", "phantom truth"),
                    "; ".join(f"{k}: {v}" for k, v in counts.items()) if counts else "",
                    str(d.get("labels_sha256", ""))[:16],
                )
            )
        sections.append(
            "<h2>Label sources (manifest)</h2>" + _table(("slide", "source", "counts", "labels sha256"), rows)
        )

    if tiles:
        imgs = []
        for i, tile in enumerate(tiles):
            _example_png(tile, folder / f"example_{i}.png")
            drew(1)
            imgs.append(f"<img src='{REPORT_DIR}/example_{i}.png'>")
        sections.append("<h2>Example tiles</h2>" + "".join(imgs))

    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>pdl1-bridge training report</title><style>"
        "body{font-family:sans-serif;margin:2em}th,td{text-align:left;padding-right:1em}"
        "img{max-width:1000px;display:block;margin:.5em 0;border:1px solid #ccc}</style></head><body>"
        f"<h1>Training report: {html.escape(str(out))}</h1>" + "".join(sections) + "</body></html>"
    )
    path = out / REPORT_FILE
    with replace_atomically(path) as fh:
        fh.write(page)
    return path
