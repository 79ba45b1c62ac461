"""The demo with per-slide BatchNorm statistics on slides of its own domain, and pooled (issue #33, AdaBN).

``python -m benchmarks.batchnorm_demo_domain [--work DIR] [--weight 0.25] [--threads 1]``

Two checks of :mod:`benchmarks.batchnorm_stats` beside ``benchmarks.shift_finetune --batchnorm-stats``:

* own domain: the shipped demo segmentation ensemble with its own running statistics against statistics
  re-estimated on each slide's own tiles mixed ``--weight`` : ``1 - --weight`` with its own, on unseen phantoms
  of the demo's training domain (2048² px at 0.5 µm/px, seeds 801-808, TPS 2, 10, 25, 40, 55, 70, 85, 95,
  shifts 0, 0.15, 0.3 in turn), on shift 0.8's held-out slides (seeds 851-854, as ``shift_finetune``) and on
  more slides of ``shift_finetune``'s weak domain (shift 0.5, weak 0.5; seeds 811-818, TPS as 801-808);
* pooled: the demo's statistics re-estimated (``--weight`` 1) on three unlabelled unshifted slides together
  (874-876) and on the weak domain's three labelled slides together (841-843, shift 0.5, weak 0.5), scored on
  ``shift_finetune``'s validation slides (881-882 in the domain, 891-892 unshifted): how far whole-slide tissue
  statistics are from the demo's own, which came from training patches half centred on positive tissue.

Phantoms are written once under ``--work`` (``shift_finetune``'s names, so one folder serves both). Dice as
``pdl1 eval seg``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from benchmarks.batchnorm_stats import adapt_batchnorm
from benchmarks.shift_finetune import slide_tile_batches
from benchmarks.truth_labels import phantom_once
from inference.evaluation.evaluate import evaluate_segmentation
from inference.models.ensemble import Ensemble, demo_model_dir
from inference.phantom.scene import PhantomSpec

OWN_DOMAIN = tuple(zip(range(801, 809), (2, 10, 25, 40, 55, 70, 85, 95), (0, 0.15, 0.3) * 2 + (0, 0.15), strict=True))
SHIFT_08 = ((851, 25), (852, 45), (853, 65), (854, 35))
# More slides of shift_finetune's weak domain (shift 0.5, weak 0.5) than its 4 held out; TPS as OWN_DOMAIN's.
WEAK_DOMAIN = tuple(zip(range(811, 819), (2, 10, 25, 40, 55, 70, 85, 95), strict=True))


def phantom(work: Path, name: str, seed: int, tps: int, *, shift: float, weak: float = 0.0) -> Path:
    spec = PhantomSpec(2048, 2048, seed=seed, tps_percent=tps, shift=shift, weak_fraction=weak)
    return phantom_once(work / f"{name}.svs", spec)


def dice(slides: list[Path], ensemble: Ensemble) -> list[float]:
    return [evaluate_segmentation(s, ensemble)[0].dice_ensemble for s in slides]


def per_slide(unfolded: Ensemble, slides: list[Path], *, weight: float) -> list[float]:
    return [
        evaluate_segmentation(s, adapt_batchnorm(unfolded, slide_tile_batches(s, unfolded), weight=weight))[
            0
        ].dice_ensemble
        for s in slides
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.batchnorm_demo_domain", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/pdl1-shift-finetune"), help="phantoms")
    parser.add_argument("--weight", type=float, default=0.25, help="the slide's share of the statistics, (0, 1]")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    if not 0 < args.weight <= 1:
        parser.error(f"--weight must be in (0, 1], got {args.weight}")
    torch.set_num_threads(args.threads)
    work = args.work
    folded = Ensemble.load(demo_model_dir("seg"), task="segmentation")
    unfolded = Ensemble.load(demo_model_dir("seg"), task="segmentation", fold_bn=False)

    sets = {
        "demo's domain 801-808 (TPS 2-95, shift 0-0.3)": [
            phantom(work, f"demo_{seed}_s{shift:g}", seed, tps, shift=shift) for seed, tps, shift in OWN_DOMAIN
        ],
        "shift 0.8 held out 851-854": [phantom(work, f"held_{seed}", seed, tps, shift=0.8) for seed, tps in SHIFT_08],
        "weak domain (shift 0.5, weak 0.5) 811-818, TPS 2-95": [
            phantom(work, f"weak_{seed}_s0.5_w0.5", seed, tps, shift=0.5, weak=0.5) for seed, tps in WEAK_DOMAIN
        ],
    }
    print(f"| slides | own statistics | per slide, weight {args.weight:g} | change | worst slide |")
    print("|---|---|---|---|---|")
    rows = []
    for name, slides in sets.items():
        own, mixed = dice(slides, folded), per_slide(unfolded, slides, weight=args.weight)
        diff = np.array(mixed) - np.array(own)
        print(f"| {name} | {np.mean(own):.4f} | {np.mean(mixed):.4f} | {diff.mean():+.4f} | {diff.min():+.4f} |")
        rows.append((name, own, mixed))
    for name, own, mixed in rows:
        print(
            f"  {name}: own " + " ".join(f"{d:.3f}" for d in own) + "; per slide " + " ".join(f"{d:.3f}" for d in mixed)
        )

    weak = {"shift": 0.5, "weak": 0.5}
    validation = {
        "validation, domain (881-882)": [
            phantom(work, f"val_{s}_s0.5_w0.5", s, t, **weak) for s, t in ((881, 30), (882, 60))
        ],
        "validation, unshifted (891-892)": [
            phantom(work, f"val_{s}", s, t, shift=0.0) for s, t in ((891, 30), (892, 60))
        ],
    }
    pools = {
        "unlabelled unshifted 874-876": [
            phantom(work, f"unlabeled_{s}", s, t, shift=0.0) for s, t in ((874, 40), (875, 60), (876, 20))
        ],
        "labelled weak domain 841-843": [
            phantom(work, f"train_{s}_s0.5_w0.5", s, t, **weak) for s, t in ((841, 30), (842, 50), (843, 70))
        ],
    }
    print(
        "demo with its own statistics: "
        + "; ".join(f"{k} {np.mean(dice(v, folded)):.4f}" for k, v in validation.items())
    )
    for name, slides in pools.items():
        adapted = adapt_batchnorm(unfolded, [b for p in slides for b in slide_tile_batches(p, unfolded)])
        print(
            f"demo, statistics re-estimated on {name} pooled: "
            + "; ".join(f"{k} {np.mean(dice(v, adapted)):.4f}" for k, v in validation.items()),
            flush=True,
        )


if __name__ == "__main__":
    main()
