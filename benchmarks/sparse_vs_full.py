"""Sparse labels against the full truth of the same slides, trained from scratch (issue #33).

``python -m benchmarks.sparse_vs_full [--work DIR] [--size 2048] [--tasks seg,nuclei] [--threads N] ...``

Acceptance: sparse labels (a few training regions per slide, a few hundred nucleus points) reach a
segmentation Dice and nuclei F1 within 0.03 of training on the full truth of the same slides, on held-out
slides. Phantoms (written once under ``--work``; seeds chosen before any run, never used by the shipped
models or another benchmark; 2048² px at 0.5 µm/px):

* training: seeds 941-946 (TPS 10, 30, 50, 70, 20, 60; shift 0, 0.15, 0, 0.3, 0.15, 0);
* validation, to compare variants on: seeds 961-962 (TPS 40, 55; shift 0, 0.15);
* held out: seeds 951-954 (TPS 25, 45, 65, 35; shift 0, 0.15, 0.3, 0).

Every label is a QuPath object read by ``bridge.labels`` as a GeoJSON export is
(``benchmarks.truth_labels``):

* segmentation, full: the truth's tissue as ``Training region`` areas, its whole positive area as
  ``PD-L1 positive`` (every tissue pixel a label); sparse: ``--regions`` squares of ``--region-um`` µm
  centred on true tissue, the true positive area inside them as ``PD-L1 positive``;
* nuclei, full: every true nucleus, under one ``Training region (all nuclei marked)`` covering the slide;
  sparse: ``--point-regions`` squares of ``--point-region-um`` µm, each ``all nuclei marked`` with the true
  nuclei in it, plus ``--scattered`` true nuclei drawn at random elsewhere on the slide.

Both of a pair train with the same library call (``pdl1 train seg`` / ``pdl1 train nuclei``), schedule and
seed, from scratch (``--init none``): from the demo both would stay near the demo and the test would say
little about the labels. The schedules are the shipped demo models' recipes (README "pdl1 train"), fixed
before the acceptance run: segmentation SGD (Nesterov) lr 0.01 to 1e-4, a dropped first cycle of 24 epochs
then 5 cycles of 4 (5 members), strong stain jitter, batch 16 of 128 px at 2 µm/px, at 40 iterations per
epoch (the demo had 80; halved for time); nuclei AdamW 3e-3, 3 cycles of 3 epochs of 40 iterations (2
members), light jitter, batch 12 of 96 px at 1 µm/px. The held-out slides are scored as ``pdl1 eval seg``
(Dice of the thresholded ensemble mean over the truth's tissue) and ``pdl1 eval nuclei`` (class-agnostic
detection F1 within 3 µm) score them; the validation slides likewise, and only they may choose between
variants. A model folder of the same config and labels under ``--work`` is reused. The table goes to
stdout, everything measured to ``WORK/sparse_vs_full_TAG.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.shift_finetune import mean_dice
from benchmarks.truth_labels import (
    PLACEMENTS,
    full_truth_labels,
    phantom_once,
    sparse_truth_labels,
    train_or_reuse,
    truth_point_labels,
)
from inference.evaluation.evaluate import evaluate_nuclei
from inference.models.ensemble import Ensemble
from inference.phantom.scene import PhantomSpec
from inference.training.labels import SlideLabels, nuclei_known_mask, region_target
from inference.training.train_nuclei import NucleiTrainConfig, train_nuclei
from inference.training.train_seg import SegTrainConfig

# (seed, TPS %, shift)
TRAIN = ((941, 10, 0.0), (942, 30, 0.15), (943, 50, 0.0), (944, 70, 0.3), (945, 20, 0.15), (946, 60, 0.0))
VALIDATION = ((961, 40, 0.0), (962, 55, 0.15))
HELD_OUT = ((951, 25, 0.0), (952, 45, 0.15), (953, 65, 0.3), (954, 35, 0.0))
TARGET = 0.03  # the acceptance: sparse within this of full, on the held-out mean
RADIUS_UM = 3.0  # pdl1 eval nuclei's matching radius


@dataclass(frozen=True)
class Phantoms:
    train: list[Path]
    validation: list[Path]
    held_out: list[Path]


def make_phantoms(work: Path, *, size: int) -> Phantoms:
    """The phantoms of the module docstring under ``work`` (kept: a second run reuses them)."""
    work.mkdir(parents=True, exist_ok=True)

    def write(prefix: str, rows: tuple) -> list[Path]:
        return [
            phantom_once(
                work / f"{prefix}_{seed}.svs", PhantomSpec(size, size, seed=seed, tps_percent=tps, shift=shift)
            )
            for seed, tps, shift in rows
        ]

    return Phantoms(write("train", TRAIN), write("val", VALIDATION), write("held", HELD_OUT))


def _model_grid(labels: SlideLabels, *, input_mpp: float, mpp: float) -> tuple[tuple[int, int], float]:
    """(height, width) of the slide at ``input_mpp``, and level-0 px per model px."""
    ds = input_mpp / mpp
    width, height = labels.image_size_px
    return (round(height / ds), round(width / ds)), ds


def labelled_pixels(labels: SlideLabels, *, input_mpp: float, mpp: float) -> dict[str, int]:
    """Pixels the segmentation loss sees per class, on the model's grid (``input_mpp``)."""
    shape_hw, ds = _model_grid(labels, input_mpp=input_mpp, mpp=mpp)
    target = region_target(labels, shape_hw=shape_hw, downsample=ds)
    return {"positive_px": int((target == 1).sum()), "negative_px": int((target == 0).sum())}


def known_pixels(labels: SlideLabels, *, input_mpp: float, mpp: float, known_radius_um: float) -> int:
    """Pixels whose nuclei heatmap target is known, on the model's grid."""
    shape_hw, ds = _model_grid(labels, input_mpp=input_mpp, mpp=mpp)
    known = nuclei_known_mask(labels, shape_hw=shape_hw, downsample=ds, radius_px=known_radius_um / input_mpp)
    return int(known.sum())


@dataclass(frozen=True)
class NucleiScores:
    """Per slide, as ``pdl1 eval nuclei`` scores them: detection F1 (class-agnostic, the acceptance's),
    the mean over classes of the class-aware F1, and the TPS absolute error (points)."""

    f1: list[float]
    class_f1_mean: list[float]
    tps_abs_error: list[float | None]

    @property
    def mean(self) -> float:
        return float(np.mean(self.f1))


def nuclei_scores(model_dir: Path, slides: list[Path]) -> NucleiScores:
    ensemble = Ensemble.load(model_dir, task="nuclei")
    results = [evaluate_nuclei(s, ensemble, radius_um=RADIUS_UM) for s in slides]
    return NucleiScores(
        f1=[r.overall.f1 for r in results],
        class_f1_mean=[float(np.mean([c.f1 for c in r.per_class])) for r in results],
        tps_abs_error=[r.tps_abs_error for r in results],
    )


def _seg_config(args: argparse.Namespace, out: Path, slides: tuple[str, ...]) -> SegTrainConfig:
    return SegTrainConfig(
        slides=slides,
        out_dir=str(out),
        init_model=None,
        optimizer="sgd",
        lr_max=args.seg_lr,
        lr_min=args.seg_lr / 100,
        first_cycle_epochs=args.seg_first_epochs,
        cycles=args.seg_cycles,
        epochs_per_cycle=args.seg_epochs_per_cycle,
        iterations_per_epoch=args.seg_iterations,
        batch_size=16,
        patch_px=128,
        stain_jitter="strong",
        seed=args.seed,
    )


def _nuclei_config(args: argparse.Namespace, out: Path, slides: tuple[str, ...]) -> NucleiTrainConfig:
    return NucleiTrainConfig(
        slides=slides,
        out_dir=str(out),
        init_model=None,
        cycles=args.nuclei_cycles,
        epochs_per_cycle=args.nuclei_epochs_per_cycle,
        iterations_per_epoch=args.nuclei_iterations,
        seed=args.seed,
    )


def run_seg(args: argparse.Namespace, phantoms: Phantoms, mpp: float) -> dict:
    arms = {
        "full": [full_truth_labels(p) for p in phantoms.train],
        "sparse": [
            sparse_truth_labels(
                p, regions=args.regions, region_um=args.region_um, seed=args.seed + i, placement=args.region_placement
            )
            for i, p in enumerate(phantoms.train)
        ],
    }
    result = {}
    for arm, labels in arms.items():
        config = _seg_config(args, args.work / f"seg_{arm}_{args.tag}", tuple(lab.slide for lab in labels))
        _, seconds = train_or_reuse(config, labels)
        counts = [labelled_pixels(lab, input_mpp=config.input_mpp, mpp=mpp) for lab in labels]
        val_mean, val = mean_dice(Path(config.out_dir), phantoms.validation)
        held_mean, held = mean_dice(Path(config.out_dir), phantoms.held_out)
        result[arm] = {
            "labels": [lab.source for lab in labels],
            "labelled_px": counts,
            "labelled_px_total": sum(c["positive_px"] + c["negative_px"] for c in counts),
            "validation_dice": val,
            "validation_mean": val_mean,
            "held_out_dice": held,
            "held_out_mean": held_mean,
            "train_seconds": seconds,
            "config": {k: v for k, v in asdict(config).items() if k != "out_dir"},
        }
    return result


def run_nuclei(args: argparse.Namespace, phantoms: Phantoms, mpp: float) -> dict:
    arms = {
        "full": [truth_point_labels(p, regions=0, region_um=0, scattered=-1, seed=0) for p in phantoms.train],
        "sparse": [
            truth_point_labels(
                p,
                regions=args.point_regions,
                region_um=args.point_region_um,
                scattered=args.scattered,
                seed=args.seed + i,
            )
            for i, p in enumerate(phantoms.train)
        ],
    }
    result = {}
    for arm, labels in arms.items():
        config = _nuclei_config(args, args.work / f"nuclei_{arm}_{args.tag}", tuple(lab.slide for lab in labels))
        _, seconds = train_or_reuse(config, labels, train=train_nuclei)
        val = nuclei_scores(Path(config.out_dir), phantoms.validation)
        held = nuclei_scores(Path(config.out_dir), phantoms.held_out)
        result[arm] = {
            "labels": [lab.source for lab in labels],
            "points": [len(lab.points_xy) for lab in labels],
            "points_total": int(sum(len(lab.points_xy) for lab in labels)),
            "known_px_total": sum(
                known_pixels(lab, input_mpp=config.input_mpp, mpp=mpp, known_radius_um=config.known_radius_um)
                for lab in labels
            ),
            "validation_f1": val.f1,
            "validation_mean": val.mean,
            "validation_class_f1_mean": val.class_f1_mean,
            "held_out_f1": held.f1,
            "held_out_mean": held.mean,
            "held_out_class_f1_mean": held.class_f1_mean,
            "held_out_tps_abs_error": held.tps_abs_error,
            "train_seconds": seconds,
            "config": {k: v for k, v in asdict(config).items() if k != "out_dir"},
        }
    return result


def _print_task(task: str, metric: str, result: dict, labelled: str) -> None:
    print(
        f"| {task} | labels | {labelled} | validation {metric} (961, 962) | held-out {metric} (951-954) | "
        "held-out mean | train s |"
    )
    print("|---|---|---|---|---|---|---|")
    for arm in ("full", "sparse"):
        r = result[arm]
        amount = r["labelled_px_total"] if task == "segmentation" else r["points_total"]
        per = " ".join(f"{v:.4f}" for v in r[f"held_out_{metric.lower()}"])
        val = " ".join(f"{v:.4f}" for v in r[f"validation_{metric.lower()}"])
        took = "reused" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        print(f"| {task} | {arm} | {amount} | {val} | {per} | {r['held_out_mean']:.4f} | {took} |")
    gap = result["full"]["held_out_mean"] - result["sparse"]["held_out_mean"]
    verdict = "met" if gap <= TARGET else "not met"
    print(f"{task}: full - sparse = {gap:+.4f} on the held-out mean (target <= {TARGET}): {verdict}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sparse_vs_full", description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/pdl1-sparse-vs-full"), help="phantoms and models")
    parser.add_argument("--size", type=int, default=2048, help="phantom edge, level-0 px at 0.5 µm/px")
    parser.add_argument("--tasks", default="seg,nuclei", help="comma-separated, of seg, nuclei")
    parser.add_argument("--seed", type=int, default=0, help="training seed; slide i's labels are drawn from seed+i")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--tag", default="a", help="names the model folders of a variant")
    parser.add_argument("--regions", type=int, default=3, help="segmentation: training regions per slide")
    parser.add_argument("--region-um", type=float, default=200.0, help="segmentation: training region edge, µm")
    parser.add_argument(
        "--region-placement",
        default="random",
        choices=PLACEMENTS,
        help="segmentation: regions on random tissue, or the first on a true positive pixel",
    )
    parser.add_argument("--seg-iterations", type=int, default=40, help="segmentation: iterations per epoch")
    parser.add_argument(
        "--seg-first-epochs", type=int, default=24, help="segmentation: epochs of the dropped first cycle"
    )
    parser.add_argument("--seg-cycles", type=int, default=6, help="segmentation: cycles (first dropped)")
    parser.add_argument("--seg-epochs-per-cycle", type=int, default=4, help="segmentation: epochs of later cycles")
    parser.add_argument("--seg-lr", type=float, default=0.01, help="segmentation: SGD peak learning rate")
    parser.add_argument("--point-regions", type=int, default=2, help="nuclei: 'all nuclei marked' regions per slide")
    parser.add_argument("--point-region-um", type=float, default=60.0, help="nuclei: their edge, µm")
    parser.add_argument("--scattered", type=int, default=10, help="nuclei: scattered points per slide")
    parser.add_argument("--nuclei-iterations", type=int, default=40, help="nuclei: iterations per epoch")
    parser.add_argument("--nuclei-cycles", type=int, default=3, help="nuclei: cycles (first dropped)")
    parser.add_argument("--nuclei-epochs-per-cycle", type=int, default=3)
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in ("seg", "nuclei")]
    if unknown:
        parser.error(f"unknown tasks {unknown}; choose from seg, nuclei")
    if args.threads:
        torch.set_num_threads(args.threads)

    phantoms = make_phantoms(args.work, size=args.size)
    mpp = PhantomSpec(args.size, args.size).mpp
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} on "
        f"{torch.get_num_threads()} thread(s); phantoms {args.size}² px at {mpp} µm/px; from scratch, seed {args.seed}",
        flush=True,
    )
    record: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    record["threads"] = torch.get_num_threads()
    out_json = args.work / f"sparse_vs_full_{args.tag}.json"
    for task in tasks:  # in the order given
        if task == "seg":
            record["segmentation"] = run_seg(args, phantoms, mpp)
            _print_task("segmentation", "Dice", record["segmentation"], "labelled px at 2 µm/px")
        else:
            record["nuclei"] = run_nuclei(args, phantoms, mpp)
            _print_task("nuclei", "F1", record["nuclei"], "points")
            for arm in ("full", "sparse"):
                r = record["nuclei"][arm]
                print(
                    f"  nuclei {arm}, held out: class-aware F1 (mean of classes) "
                    + " ".join(f"{v:.4f}" for v in r["held_out_class_f1_mean"])
                    + f" (mean {np.mean(r['held_out_class_f1_mean']):.4f}); TPS absolute error "
                    + " ".join("n/a" if v is None else f"{v:.1f}" for v in r["held_out_tps_abs_error"])
                )
        out_json.write_text(json.dumps(record, indent=1))
    print(f"written {out_json}")


if __name__ == "__main__":
    main()
