"""What a membrane DAB limit on the IHC model's positive calls would do: QuPath's positive cell detection calls a cell
positive from its DAB alone, so would a lab's limit on the ring DAB keep real negatives negative?

``python -m benchmarks.membrane_gate [--real DATA] [--phantoms IHC_SLIDES...] [--model DIR] [--gates 0,0.08,...]``

Each limit turns the shipped IHC ensemble's positive calls (tumour and immune) whose membrane DAB, as the pipeline
measures it (:func:`inference.analysis.nuclei.detect_nuclei`'s ``membrane_dab_od``: the ring's 75th percentile at
the model's µm/px), lies under the limit into the matching negative class; the model runs once per image.

- ``--real DATA``: DeepLIIF's two training tiles (``benchmarks.real_ihc_points``' ``DATA`` and its scores: truth
  positives called positive, truth negatives called negative, the share called positive). The test tiles are not
  read: they are scored once, and this is a choice.
- ``--phantoms``: IHC phantoms with truth (e.g. the validation set, ``python -m benchmarks.review_phantoms val
  --seeds 2100-2159 --ihc``): TPS mean absolute error, worst error and slides failed (``pdl1 eval ihc``'s rule), at
  shift <= 0.8 and above, CPS mean absolute error, and the range over slides of the share of the positive tumour
  calls the limit turns negative, median and range (what a review reason "positive calls without membrane DAB"
  would read).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np

from inference.analysis.ihc import IMMUNE_NEGATIVE, IMMUNE_POSITIVE
from inference.analysis.nuclei import Nuclei
from inference.models.ensemble import Ensemble, demo_model_dir

DEFAULT_GATES_OD = (0.0, 0.08, 0.10, 0.12, 0.15, 0.20)
NEGATIVE_OF = {"Tumor: Positive": "Tumor: Negative", IMMUNE_POSITIVE: IMMUNE_NEGATIVE}
SHIFT_SPLIT = 0.8  # issue #31's range of stain shift


def gated(nuclei: Nuclei, limit_od: float) -> Nuclei:
    """``nuclei`` with each positive call (tumour or immune) whose membrane DAB lies under ``limit_od`` made the
    matching negative class; the rest as they were.

    >>> names = ("Tumor: Positive", "Tumor: Negative", "Immune cells: PD-L1 positive", "Immune cells: PD-L1 negative")
    >>> n = Nuclei(xy=np.zeros((3, 2)), cls=np.array([0, 0, 2]), score=np.ones(3), class_prob=np.ones(3),
    ...     positive_prob=np.ones(3), entropy=None, class_names=names, membrane_dab_od=np.array([0.05, 0.3, 0.05]))
    >>> gated(n, 0.1).cls.tolist()
    [1, 0, 3]
    """
    names = list(nuclei.class_names)
    cls = nuclei.cls.copy()
    low = nuclei.membrane_dab_od < limit_od
    for positive, negative in NEGATIVE_OF.items():
        if positive in names and negative in names:
            cls[(nuclei.cls == names.index(positive)) & low] = names.index(negative)
    return dataclasses.replace(nuclei, cls=cls)


def _gates(text: str) -> tuple[float, ...]:
    return tuple(float(g) for g in text.split(","))


def real_rows(data: Path, ensemble: Ensemble, gates: tuple[float, ...]) -> None:
    from benchmarks import real_ihc_points as real
    from benchmarks.stain_real_images import write_tiff

    tiles = [t for t in real.read_tiles(data) if t.split == "train"]
    totals = dict.fromkeys(gates, real.NO_SCORES)
    with tempfile.TemporaryDirectory() as work:
        for tile in tiles:
            found = real.detected_nuclei(write_tiff(tile.rgb, Path(work) / f"{tile.name}.tif", real.MPP), ensemble)
            for g in gates:
                n = gated(found, g)
                totals[g] += real.score_tile(tile, n.xy, real.call_names(n))
    print(f"\nDeepLIIF's {len(tiles)} training tiles ({sum(len(t.xy) for t in tiles)} points)\n")
    print(
        "| membrane DAB limit (OD) | truth positives called positive | truth negatives called negative "
        "| share called positive |"
    )
    print("|---|---|---|---|")
    for g in gates:
        s = totals[g]
        print(
            f"| {g:g} | {real._frac(s.truth_positive_called_positive)} "
            f"| {real._frac(s.truth_negative_called_negative)} | {real._frac(s.called_positive_share)} |",
            flush=True,
        )


def phantom_rows(slides: list[Path], ensemble: Ensemble, gates: tuple[float, ...]) -> None:
    from inference.evaluation.evaluate import load_truth, nuclei_in_tissue, score_nuclei_on_truth

    rows: list[tuple[float, dict[float, tuple[float, float | None, bool, float]]]] = []
    for path in slides:
        found, mpp_um = nuclei_in_tissue(path, ensemble)
        shift = float(load_truth(path).summary["spec"]["shift"])
        called = found.cls == list(found.class_names).index("Tumor: Positive")
        scored = {}
        for g in gates:
            e = score_nuclei_on_truth(path, gated(found, g), mpp_um=mpp_um)
            under = float((found.membrane_dab_od[called] < g).mean()) if called.any() else np.nan
            scored[g] = (e.tps_abs_error, e.cps_abs_error, e.failed(), under)
        rows.append((shift, scored))
        errors = ", ".join(f"{g:g} {s[0]:.1f}" for g, s in scored.items())
        print(f"{path.name} (shift {shift:.2f}), TPS error by limit: {errors}", flush=True)
    print(f"\n{len(slides)} IHC phantoms: TPS error by the limit\n")
    print(
        "| membrane DAB limit (OD) | shift <= 0.8: TPS MAE / worst / failed "
        "| shift > 0.8: TPS MAE / worst / failed | CPS MAE "
        "| positive tumour calls turned negative, per slide: median (range) |"
    )
    print("|---|---|---|---|---|")
    for g in gates:
        parts = []
        for low in (True, False):
            part = [s[g] for shift, s in rows if (shift <= SHIFT_SPLIT) == low]
            tps = np.array([p[0] for p in part], float)
            failed = sum(p[2] for p in part)
            parts.append(f"{np.nanmean(tps):.2f} / {np.nanmax(tps):.1f} / {failed} of {len(part)}" if part else "-")
        cps = np.nanmean([s[g][1] for _, s in rows if s[g][1] is not None])
        under = [s[g][3] for _, s in rows]
        spread = f"{np.nanmedian(under):.2f} ({np.nanmin(under):.2f}-{np.nanmax(under):.2f})"
        print(f"| {g:g} | {parts[0]} | {parts[1]} | {cps:.2f} | {spread} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.membrane_gate", description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, help="DeepLIIF's Datasets/Sample_Dataset folder")
    parser.add_argument("--phantoms", type=Path, nargs="*", default=[], help="IHC phantoms with truth")
    parser.add_argument("--model", type=Path, help="IHC nuclei model folder (the shipped one if omitted)")
    parser.add_argument("--gates", type=_gates, default=DEFAULT_GATES_OD, help="membrane DAB limits (OD), e.g. 0,0.1")
    args = parser.parse_args(argv)
    if args.real is None and not args.phantoms:
        parser.error("give --real DATA, --phantoms SLIDES... or both")
    ensemble = Ensemble.load(args.model or demo_model_dir("nuclei-ihc"), task="nuclei")
    if args.real is not None:
        real_rows(args.real, ensemble, args.gates)
    if args.phantoms:
        phantom_rows(args.phantoms, ensemble, args.gates)


if __name__ == "__main__":
    main()
