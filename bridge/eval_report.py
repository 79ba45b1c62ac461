"""The evaluation report folder: a table (CSV and printed) and PNG plots.

Plots: reliability diagram, risk-coverage curves of the slide QC scores, histograms of aggregated
NPR uncertainty for false-negative vs true-negative NPRs (as Fig. 4 of the SUA paper), and
per-slide thumbnails overlaid with the probability, the uncertainty and the SUA candidates.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bridge.atomic import replaced_together
from bridge.targets import spreadsheet_row
from inference import SlideEvaluation, aurc, e_aurc, reliability, risk_coverage, spearman

log = logging.getLogger(__name__)

# provenance.json's key for the earlier run whose table this run did not rewrite (write_report).
KEPT_FROM_EARLIER_RUN = "kept_from_earlier_run"

# Slide-level QC scores whose failure detection the suite measures (higher = less trusted), and what each is.
QC_SCORES = {
    "mean_entropy": "mean predictive entropy over the analysed tissue",
    "mean_mi": "mean mutual information over the analysed tissue",
    "candidate_area_pct": "SUA candidate area, % of the analysed tissue",
    "out_of_domain_score": "the domain guard's out-of-domain score (network features)",
    "stain_distance_deg": "the domain guard's stain distance from the training stains",
}

# ihc_metrics.csv: a row per PD-L1 IHC slide.
IHC_COLUMNS = ("slide", "tps_predicted", "tps_truth", "tps_error", "category_right", "cps_predicted", "cps_truth")
IHC_COLUMNS += ("f1", "entropy_mean", "failed", "needs_review", "review_reasons")

COLUMNS = (
    "slide",
    "shift",
    "tissue_recall",
    "dice",
    "ensemble_rank",
    "members",
    "iou",
    "f1",
    "ece",
    "brier",
    "auroc_entropy_error",
    "auroc_mi_error",
    "auroc_prob_margin_error",
    "auroc_boundary_distance_error",
    "auprc_entropy_error",
    "mean_entropy",
    "mean_mi",
    "candidate_area_pct",
    "out_of_domain_score",
    "stain_distance_deg",
    "positive_area_error",
    "tps_predicted",
    "tps_truth",
    "positive_off_tumour_pct",
    "tps_member_disagreement",
    "unsettled_positive_area_pct",
    "failed",
    "needs_review",
    "fn_px",
    "fn_pct",
    "sua_candidates",
    "sua_f05",
    "sua_fncr",
    "sua_recall",
    "baseline_f05",
    "baseline_fncr",
    "baseline_recall",
)


def rows(evaluations: Sequence[SlideEvaluation]) -> list[dict[str, object]]:
    out = []
    for e in evaluations:
        out.append(
            {
                "slide": e.slide,
                "shift": e.shift,
                "tissue_recall": e.seg.tissue_recall,
                "dice": e.seg.dice_ensemble,
                "ensemble_rank": ensemble_rank(e),
                "members": len(e.seg.dice_members),
                "iou": e.iou,
                "f1": e.f1,
                "ece": e.ece,
                "brier": e.brier,
                "auroc_entropy_error": e.seg.auroc_entropy_error,
                "auroc_mi_error": e.seg.auroc_mi_error,
                "auroc_prob_margin_error": e.seg.auroc_prob_margin_error,
                "auroc_boundary_distance_error": e.seg.auroc_boundary_distance_error,
                "auprc_entropy_error": e.auprc_entropy_error,
                "mean_entropy": e.mean_entropy,
                "mean_mi": e.mean_mi,
                "candidate_area_pct": e.candidate_area_pct,
                "out_of_domain_score": e.out_of_domain_score,
                "stain_distance_deg": e.stain_distance_deg,
                "positive_area_error": e.positive_area_error,
                "tps_predicted": math.nan if e.tps_predicted is None else e.tps_predicted,
                "tps_truth": math.nan if e.tps_truth is None else e.tps_truth,
                "positive_off_tumour_pct": math.nan if e.positive_off_tumour_pct is None else e.positive_off_tumour_pct,
                "tps_member_disagreement": math.nan if e.tps_member_disagreement is None else e.tps_member_disagreement,
                "unsettled_positive_area_pct": math.nan
                if e.unsettled_positive_area_pct is None
                else e.unsettled_positive_area_pct,
                "failed": int(e.failed()),
                "needs_review": int(e.needs_review),
                "fn_px": e.sua.false_negative_px,
                "fn_pct": 100 * e.sua.false_negative_px / max(int(e.region.sum()), 1),
                "sua_candidates": e.candidates,
                "sua_f05": e.sua.f05,
                "sua_fncr": e.sua.fncr,
                "sua_recall": e.sua.recall,
                "baseline_f05": e.baseline.f05,
                "baseline_fncr": e.baseline.fncr,
                "baseline_recall": e.baseline.recall,
            }
        )
    return out


def ensemble_rank(e: SlideEvaluation) -> int:
    """1 + the number of members whose Dice beats the ensemble's on this slide (1: no member is better)."""
    return 1 + sum(d > e.seg.dice_ensemble for d in e.seg.dice_members)


def ensemble_vs_members(evaluations: Sequence[SlideEvaluation]) -> dict[str, object]:
    """Mean Dice over slides of the ensemble and of each member, the ensemble's rank per slide and its wins."""
    n = min((len(e.seg.dice_members) for e in evaluations), default=0)
    ranks = [ensemble_rank(e) for e in evaluations]
    return {
        "ensemble_mean_dice": float(np.mean([e.seg.dice_ensemble for e in evaluations])) if evaluations else math.nan,
        "member_mean_dice": [float(np.mean([e.seg.dice_members[i] for e in evaluations])) for i in range(n)],
        "ranks": ranks,
        "wins": sum(r == 1 for r in ranks),
        "slides": len(evaluations),
    }


def measured_qc_scores(evaluations: Sequence[SlideEvaluation]) -> dict[str, np.ndarray]:
    """Each :data:`QC_SCORES` score per slide, leaving out those measured on no slide (e.g. a model without
    domain statistics)."""
    out = {}
    for name in QC_SCORES:
        scores = np.array([getattr(e, name) for e in evaluations], np.float64)
        if not np.isnan(scores).all():
            out[name] = scores
    return out


def failure_detection(evaluations: Sequence[SlideEvaluation]) -> list[dict[str, object]]:
    """AURC and E-AURC of each slide QC score (:data:`QC_SCORES`) for the slides that failed.

    Beside each: the AURC of a random score (the failure rate) and of a perfect one, and how the
    review flag the run applies does at its own limits: failures caught, false alarms.
    """
    failures = np.array([e.failed() for e in evaluations], bool)
    flagged = np.array([e.needs_review for e in evaluations], bool)
    bounds = {
        "random_aurc": float(failures.mean()) if failures.size else math.nan,
        "optimal_aurc": aurc(failures.astype(np.float64), failures),
    }
    rows = [*measured_qc_scores(evaluations).items(), ("needs_review", flagged.astype(np.float64))]
    out = [
        {
            "score": name,
            "meaning": QC_SCORES.get(name, "the review flag pdl1 run sets (its limits from the manifest)"),
            "aurc": aurc(scores, failures),
            "e_aurc": e_aurc(scores, failures),
            **bounds,
        }
        for name, scores in rows
    ]
    out[-1].update(
        {
            "caught": int((flagged & failures).sum()),
            "failures": int(failures.sum()),
            "false_alarms": int((flagged & ~failures).sum()),
            "successes": int((~failures).sum()),
        }
    )
    return out


def holds_an_eval(folder: Path) -> bool:
    """Whether ``folder`` holds an earlier ``pdl1 eval``'s output (its provenance.json says so)."""
    try:
        record = json.loads((folder / "provenance.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("command") == "pdl1 eval"


def is_report_file(name: str) -> bool:
    """Whether ``name`` is one of the files :func:`write_report` writes into its folder: the tables, the provenance
    and the PNG plots (``pdl1 eval`` removes their ``.part`` files a killed one left, and no others)."""
    return name in ("metrics.csv", "ihc_metrics.csv", "provenance.json") or name.lower().endswith(".png")


def write_report(
    evaluations: Sequence[SlideEvaluation],
    out_dir: str | Path,
    *,
    provenance: dict | None = None,
    ihc_rows: Sequence[dict] | None = None,
) -> dict[str, Path]:
    """Write an evaluation's report into ``out_dir``; returns what was written, by kind.

    ``metrics.csv`` and the PNG plots of the H&E slides (``evaluations``), ``ihc_metrics.csv`` of the PD-L1 IHC
    slides (``ihc_rows``, rows of :data:`IHC_COLUMNS`; None: no such table) and ``provenance.json``
    (``provenance``, with ``files``, the names of the files it describes, added). With IHC rows and no H&E
    slide there is no metrics.csv nor plots.

    A run that writes one of the two tables leaves the other where an earlier run wrote it, and its provenance
    with it: the new ``provenance.json`` carries, under :data:`KEPT_FROM_EARLIER_RUN`, the provenance of the
    earlier run that wrote that other table (the earlier ``provenance.json``, or the run it kept in turn), its
    ``files`` narrowed to those this run does not rewrite and that are still there; so every table in the folder
    stays described. A run that writes both tables, or the same one again with the other absent (H&E after H&E),
    keeps nothing: an earlier run's files it does not rewrite (the overlays of slides it left out) are no
    table's. Where the other table is there but no earlier provenance describes it, a warning says so.

    All are replaced together, ``provenance.json`` last (:func:`bridge.atomic.replaced_together`): each written
    in place, an interrupt left a table cut short that still read as complete; replaced one by one, the new
    provenance stood beside the earlier run's metrics.csv (and, written by another function before it, the new
    ihc_metrics.csv beside the earlier provenance, for good where the run had no H&E slide and wrote none).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    he = bool(evaluations) or ihc_rows is None
    kept = None
    described_before = _described_files(out) if provenance is not None else set()
    if provenance is not None and he != (ihc_rows is not None):  # one of the two tables: the other may be there
        kept = _kept_from_earlier_run(out, "ihc_metrics.csv" if he else "metrics.csv")
    with replaced_together(out / "provenance.json") as open_new:
        if he:
            writer = csv.DictWriter(open_new(out / "metrics.csv", newline=""), fieldnames=COLUMNS)
            writer.writeheader()
            for row in rows(evaluations):
                cells = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
                writer.writerow(spreadsheet_row(cells))
            written["metrics"] = out / "metrics.csv"
        if ihc_rows is not None:
            writer = csv.DictWriter(open_new(out / "ihc_metrics.csv", newline=""), fieldnames=IHC_COLUMNS)
            writer.writeheader()
            writer.writerows(spreadsheet_row(row) for row in ihc_rows)
            written["ihc_metrics"] = out / "ihc_metrics.csv"

        def save(fig, path: Path, **savefig_kwargs) -> None:
            fig.savefig(open_new(path, binary=True), format="png", **savefig_kwargs)

        if he:
            written |= _plots(evaluations, out, save, plt)
        if provenance is not None:
            record = {**provenance, "files": sorted(p.name for p in written.values())}
            if kept is not None:
                rewritten = set(record["files"]) | {"provenance.json"}
                # The kept table's own files: an IHC table has no plots, and an H&E table's overlays and plots
                # are no IHC table's (helper-136: a run of both tables, then H&E again, kept its old overlays
                # listed under the IHC table).
                own = (lambda n: n == "ihc_metrics.csv") if he else (lambda n: n != "ihc_metrics.csv")
                files = [n for n in kept["files"] if isinstance(n, str) and n not in rewritten and own(n)]
                record[KEPT_FROM_EARLIER_RUN] = {**kept, "files": sorted(n for n in files if (out / n).is_file())}
            json.dump(record, open_new(out / "provenance.json"), indent=2, default=str)
            written["provenance"] = out / "provenance.json"
    # An earlier run's files that no table describes now (the overlays of slides this run did not score) stayed as
    # pictures of slides the folder no longer reports; only files an earlier provenance listed as its own go.
    for name in sorted(described_before - _described_files(out)):
        try:
            (out / name).unlink(missing_ok=True)
        except OSError as err:
            log.warning(
                "%s: an earlier run's file, described by no table now, could not be removed (%s)", out / name, err
            )
    return written


def _described_files(out: Path) -> set[str]:
    """The files ``out``'s provenance.json lists as its run's, or the earlier run's it kept (none where it does not
    read): the files a ``pdl1 eval`` wrote there."""
    try:
        record = json.loads((out / "provenance.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    runs = [record, record.get(KEPT_FROM_EARLIER_RUN)] if isinstance(record, dict) else []
    names = {n for run in runs if isinstance(run, dict) and isinstance(run.get("files"), list) for n in run["files"]}
    return {n for n in names if isinstance(n, str) and Path(n).name == n and is_report_file(n)}


def _kept_from_earlier_run(out: Path, table: str) -> dict | None:
    """The provenance of the earlier run that wrote ``table`` in ``out`` (:func:`write_report`), without the run
    it kept in turn; None where ``table`` is not there, or (with a warning) no ``provenance.json`` there says."""
    if not (out / table).is_file():
        return None
    path = out / "provenance.json"
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        earlier, why = None, f"{path} could not be read ({err})"
    else:
        why = f"{path} does not name it among its files"
    runs = [earlier, earlier.get(KEPT_FROM_EARLIER_RUN)] if isinstance(earlier, dict) else []
    for run in runs:
        if isinstance(run, dict) and isinstance(run.get("files"), list) and table in run["files"]:
            return {k: v for k, v in run.items() if k != KEPT_FROM_EARLIER_RUN}
    log.warning(
        "%s, an earlier run's, is left as it is, but no provenance says what made it: %s; the new provenance.json "
        "describes this run's files only",
        out / table,
        why,
    )
    return None


def _plots(evaluations: Sequence[SlideEvaluation], out: Path, save, plt) -> dict[str, Path]:
    """The report's PNG plots, each saved through ``save(fig, path, dpi=...)``."""
    written: dict[str, Path] = {}
    # Reliability diagram over all slides (tissue pixels).
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for e in evaluations:
        conf, freq, counts = reliability(np.asarray(e.maps.prob)[e.region], e.truth[e.region], bins=10)
        ok = counts > 0
        ax.plot(conf[ok], freq[ok], "o-", label=f"{e.slide} (ECE {e.ece:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="mean predicted PD-L1 probability", ylabel="observed positive fraction", title="Reliability")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, out / "reliability.png", dpi=120)
    plt.close(fig)
    written["reliability"] = out / "reliability.png"

    # Risk-coverage of each slide QC score: failures among the slides it would trust most.
    failures = np.array([e.failed() for e in evaluations], bool)
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, scores in measured_qc_scores(evaluations).items():
        coverage, risk = risk_coverage(scores, failures)
        ax.plot(coverage, risk, "o-", ms=3, label=f"{name} (AURC {aurc(scores, failures):.3f})")
    if failures.size:
        coverage, risk = risk_coverage(failures.astype(np.float64), failures)
        ax.plot(coverage, risk, "k--", lw=0.8, label=f"perfect (AURC {risk.mean():.3f})")
    ax.set(xlabel="coverage (slides accepted)", ylabel="risk (failed share of accepted)", title="Slide QC")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, out / "risk_coverage.png", dpi=120)
    plt.close(fig)
    written["risk_coverage"] = out / "risk_coverage.png"

    # Aggregated uncertainty of false-negative vs true-negative NPRs.
    fig, ax = plt.subplots(figsize=(5, 3.5))
    fn = np.concatenate([e.npr_scores[e.npr_is_fn] for e in evaluations]) if evaluations else np.zeros(0)
    tn = np.concatenate([e.npr_scores[~e.npr_is_fn] for e in evaluations]) if evaluations else np.zeros(0)
    bins = np.linspace(0, max(float(np.max(np.concatenate([fn, tn, [0.01]]))), 0.01), 30)
    # A density of no values divides by zero (numpy warns, and draws nothing): an empty kind is named only.
    for values, what in ((tn, "true-negative"), (fn, "false-negative")):
        label = f"{what} NPRs ({len(values)})"
        if len(values):
            ax.hist(values, bins=bins, alpha=0.6, label=label, density=True)
        else:
            ax.plot([], [], label=label)
    ax.set(xlabel="aggregated uncertainty per NPR", ylabel="density", title="SUA: NPR uncertainty")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, out / "npr_uncertainty_hist.png", dpi=120)
    plt.close(fig)
    written["npr_hist"] = out / "npr_uncertainty_hist.png"

    for e in evaluations:
        fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
        prob = np.where(e.region, e.maps.prob, np.nan)
        pe = np.where(e.region, e.maps.predictive_entropy, np.nan)
        axes[0].imshow(e.truth, cmap="Greys", vmin=0, vmax=1)
        axes[0].set_title("truth: PD-L1 positive")
        axes[1].imshow(prob, cmap="magma", vmin=0, vmax=1)
        axes[1].set_title("ensemble mean probability")
        axes[2].imshow(pe, cmap="viridis", vmin=0, vmax=np.log(2))
        axes[2].set_title("predictive entropy")
        overlay = np.zeros((*e.truth.shape, 3))
        overlay[..., 0] = (np.asarray(e.maps.prob) >= 0.5) & e.region
        overlay[..., 1] = e.truth
        overlay[..., 2] = e.candidate_mask
        axes[3].imshow(overlay)
        axes[3].set_title("red pred, green truth, blue SUA")
        for a in axes:
            a.set_axis_off()
        fig.suptitle(
            f"{e.slide}: Dice {e.seg.dice_ensemble:.3f}, {e.candidates} SUA candidates"
            + (", needs review" if e.needs_review else "")
        )
        fig.tight_layout()
        path = out / f"{Path(e.slide).stem}_overlay.png"
        save(fig, path, dpi=100)
        plt.close(fig)
        written[f"overlay:{e.slide}"] = path
    return written


def slide_uncertainty_correlation(evaluations: Sequence[SlideEvaluation]) -> float:
    """Spearman correlation of slide mean entropy with 1 - Dice (does uncertainty track error?)."""
    return spearman(
        np.array([e.mean_entropy for e in evaluations]), np.array([1 - e.seg.dice_ensemble for e in evaluations])
    )
