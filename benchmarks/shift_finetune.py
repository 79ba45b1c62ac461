"""Fine-tuning the demo ensemble on a shifted stain domain, with and without pseudo-labels (issue #33).

``python -m benchmarks.shift_finetune [--work DIR] [--size 2048] [--iterations 20] [--seed 0] [--runs ...]
[--shift 0.8] [--weak-fraction 0] [--anchor-weight 0,...] [--distill-weight 0,...] [--stain-jitter strong,...]
[--batchnorm-stats model,...] [--interpolate 1,...] [--extremes] [--domain-levels rendered]``

Acceptance: fine-tuning the shipped demo segmentation ensemble with sparse labels on 3 slides of a
shifted stain domain (``pdl1 phantom --shift 0.8``) raises held-out Dice in that domain by >= 0.10 and
lowers it on unshifted slides by at most 0.01. Phantoms (written once under ``--work``, seeds chosen
before any run and never used by the shipped models):

* training, shift 0.8: seeds 841-843 (TPS 30, 50, 70), sparse labels: ``--regions`` square
  ``Training region`` annotations of ``--region-um`` µm centred on true tissue, with the true positive area
  inside each as ``PD-L1 positive`` annotations, read by ``bridge.labels`` as a QuPath export is;
* unlabelled, shift 0.8: seeds 871-873 (TPS 40, 60, 20), for ``--unlabeled`` (pseudo-labels by the demo);
  unlabelled, unshifted: seeds 874-876 (TPS 40, 60, 20), the same for the domain the demo was made for,
  and labelled from their truth for the replay runs (below);
* validation, to compare variants on: shift 0.8 seeds 881-882, unshifted 891-892 (TPS 30, 60);
* held out, shift 0.8: seeds 851-854; held out, unshifted: seeds 861-864 (TPS 25, 45, 65, 35 both).

Every run is ``pdl1 train seg`` (the same library call) from the demo ensemble (``--init`` default) with one
schedule fixed beforehand (``--optimizer`` and ``--lr-max`` change it): AdamW, lr 1e-3 to 1e-5, 4 cycles of
2 epochs (first dropped: 3 members), strong stain jitter (``--stain-jitter``), batch 16, 128 px patches. Each
model is scored as ``pdl1 eval seg`` scores it (Dice of the thresholded ensemble mean against the truth, on the
truth's grid), as the mean over the validation and the held-out slides of each domain. The acceptance run (``3lab``) was
fixed before any result; other runs are variants, to be compared on the validation slides. The replay runs
(``3lab+3tru0``, ``3lab+3sp0``) ask whether keeping the old domain's labelled slides in the training set
(experience replay, joint training: "keep your earlier labelled slides when you add a new domain") holds the
unshifted slides where the demo had them: the 3 shifted slides' sparse labels plus the unshifted slides 874-876
labelled from their truth, in full (``tru0``: every tissue pixel) or sparsely as the domain's slides (``sp0``:
``--regions`` regions of ``--region-um`` µm, region seeds ``--seed`` + 3-5), without pseudo-labels. Patches are
drawn from the labelled slides uniformly, so half come from the replayed slides. The controls ``3tru0`` and
``3sp0`` fine-tune on those unshifted slides' labels alone: what the fine-tuning itself costs the unshifted
slides, with no new domain to learn. The held-out
slides decide nothing: they are only scored. A model folder under ``--work`` trained with the same
configuration is reused (its manifest records it).

``--shift`` and ``--weak-fraction`` move the labelled, unlabelled-shifted, validation and held-out domain
slides (same seeds) to another domain, for one where the demo actually fails: at shift 0.8 it already
scores about 0.96, so +0.10 cannot be reached there. Such phantoms are named with the domain
(``train_841_s0.5_w0.5.svs``); the unshifted ones stay as they are.

``--domain-levels averaged`` writes those domain slides (same seeds, the same level 0 and truth) with a
scanner's pyramid (``pdl1 phantom --reduced-levels averaged``: the 2 µm/px level the models read box-averaged
from level 0), named ``..._avg``: a lab's own slides at that stain shift, where the demo does worse. The
unshifted slides stay rendered, as before, so the unshifted limit is measured on the same slides; the held-out
unshifted slides (861-864) are also written averaged (``held_861_avg.svs``) and scored as an extra column: what
the scanner's pyramid alone costs.

``--anchor-weight`` (comma-separated) trains every run once per weight with L2-SP toward the demo's weights
(``pdl1 train seg --anchor-weight``; 0: without, as before), against forgetting the unshifted domain;
``--freeze-batchnorm`` keeps the demo's BatchNorm running statistics (``pdl1 train seg --freeze-batchnorm``). Each
fine-tuned model's squared distance from the demo's weights, ``sum((w - w_demo)^2)``, and its last epoch's
loss (and mean anchor penalty) are printed: the scale an anchor weight is chosen on.
``--distill-weight`` (comma-separated) trains every run once per weight with Learning without Forgetting
(``pdl1 train seg --distill-weight``: KL to the demo's last member's predictions, temperature
``--distill-temperature``, on every pixel without a label; 0: without); its last epoch's mean penalty is printed.
``--stain-jitter`` (comma-separated, ``strong`` as before, or ``light``, the demo's own) trains every run once per
stain jitter: strong jitter may erase the stain difference between the domain's weakly expressing tissue and
unshifted negative tissue.

``--batchnorm-stats`` (comma-separated, ``model`` first) scores every model once per choice of BatchNorm running
statistics, its weights unchanged: ``model`` (its own, as before), ``slide`` (AdaBN, Li et al. 2016: re-estimated
on each scored slide's own tissue tiles, :mod:`benchmarks.batchnorm_stats`; ``slide:W`` mixes W of them with
1 - W of the model's own), ``demo`` (the demo's put into the
fine-tuned members), ``domain`` (re-estimated on the labelled slides for a slide whose stain vectors are nearer
theirs than the demo's training stain, the demo's otherwise), ``known`` (the model's own for the domain's slides,
the demo's for unshifted ones: the domain known from where a slide came) and ``nearest`` (the model's own or the
demo's, whichever the slide's own statistics are nearer by mean KL divergence per channel). ``--extremes`` adds
held-out slides at TPS 5 and 90 (seeds 855-856 in the domain, 865-866 unshifted), where statistics of one slide
lean most on its share of positive tissue.

``--interpolate`` (comma-separated, in [0, 1]) scores every fine-tuned model once per ``alpha`` with its weights
moved back toward the demo's (WiSE-FT, :mod:`benchmarks.weight_interpolation`): ``w_demo + alpha * (w - w_demo)``
from the demo's last member (the one fine-tuning started from), BatchNorm statistics included, no retraining; 1 is
the model as trained (scored with every ``--batchnorm-stats``), the others with their own (interpolated) statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file

from benchmarks.batchnorm_stats import adapt_batchnorm, batchnorm_state, with_batchnorm_state
from benchmarks.truth_labels import (
    full_truth_labels,
    phantom_once,
    print_pseudo_labels,
    sparse_truth_labels,
    train_or_reuse,
)
from benchmarks.weight_interpolation import interpolated_ensemble
from inference.analysis.domain import angle_deg, slide_stain, stats_of_manifest
from inference.analysis.segment import SegmentConfig, plan_tiles
from inference.analysis.tiling import read_grid_tiles
from inference.evaluation.evaluate import evaluate_segmentation
from inference.models.ensemble import Ensemble, demo_model_dir
from inference.models.manifest import read_manifest
from inference.phantom.scene import PhantomSpec
from inference.slides.slide import open_slide
from inference.slides.stain_detect import detect_slide_stain
from inference.slides.tissue import TISSUE_METHOD_OF_STAIN, tissue_mask_for_slide
from inference.training.anchor import squared_distance
from inference.training.augment import STAIN_JITTERS
from inference.training.distill import DEFAULT_TEMPERATURE
from inference.training.labels import SlideLabels
from inference.training.pseudo import PseudoLabelRule, UnlabeledSlide
from inference.training.report import HISTORY_FILE
from inference.training.train_seg import SegTrainConfig

SHIFT = 0.8
ITERATIONS = 20  # per epoch; other counts are named in the model folder, which would otherwise be retrained over
TRAIN = ((841, 30), (842, 50), (843, 70))
UNLABELED = ((871, 40), (872, 60), (873, 20))
UNLABELED_UNSHIFTED = ((874, 40), (875, 60), (876, 20))
VALIDATION = ((30, 0), (60, 1))  # (TPS, index): seeds 881+i shifted, 891+i unshifted
HELD_OUT = ((25, 0), (45, 1), (65, 2), (35, 3))  # (TPS, index): seeds 851+i shifted, 861+i unshifted
# Held out at a low and a high TPS (--extremes): where statistics from one slide's own tiles lean most on
# its share of positive tissue. (TPS, index): seeds 851+i shifted, 861+i unshifted.
EXTREMES = ((5, 4), (90, 5))
# BatchNorm statistics each model is scored with (--batchnorm-stats); see STATS_HELP.
BATCHNORM_STATS = ("model", "slide", "demo", "domain", "known", "nearest")
STATS_HELP = (
    "model: the model's own running statistics; slide: re-estimated on each scored slide's own tissue tiles "
    "(AdaBN; slide:W mixes W of them with 1 - W of the model's own); demo: the demo's (its last member's) put "
    "into every member; domain: re-estimated on the labelled training slides' tiles for a slide whose stain "
    "vectors are nearer theirs than the demo's training stain, the demo's otherwise; known: the model's own for "
    "the domain's slides, the demo's for unshifted ones (the domain known from where a slide came); nearest: the "
    "model's own or the demo's, whichever the slide's own statistics are nearer (mean KL divergence per "
    "BatchNorm channel). known and nearest take each slide's Dice from the model and demo rows, so need both "
    "before them"
)
# The sets of the new domain (known: the rest are unshifted).
DOMAIN_SETS = ("val_shifted", "held_shifted", "extreme_shifted")
# How a replay run's unshifted slides are labelled: every true tissue pixel, or as the domain's slides.
REPLAY_LABELS = ("full", "sparse")


class Run(NamedTuple):
    """A training run: which phantoms it labels, pseudo-labels or replays."""

    what: str
    labelled: int  # shifted training slides (841-), sparse labels
    unlabelled: int  # unlabelled shifted slides (871-), pseudo-labelled
    unlabelled_unshifted: int  # unlabelled unshifted slides (874-), pseudo-labelled
    replayed: int = 0  # unshifted slides (874-) labelled from their truth: the old domain's labels replayed
    replay_labels: str = "full"  # of REPLAY_LABELS


RUNS = {
    "3lab": Run("sparse labels on 3 shifted slides (the acceptance run)", 3, 0, 0),
    "1lab": Run("sparse labels on 1 shifted slide", 1, 0, 0),
    "1lab+3unl": Run("sparse labels on 1 shifted slide + 3 unlabelled shifted (--unlabeled)", 1, 3, 0),
    "3lab+3unl": Run("sparse labels on 3 shifted slides + 3 unlabelled shifted (--unlabeled)", 3, 3, 0),
    "3lab+3unl0": Run("sparse labels on 3 shifted slides + 3 unlabelled unshifted (--unlabeled)", 3, 0, 3),
    "3lab+3tru0": Run("sparse labels on 3 shifted slides + the full truth of 3 unshifted (replay)", 3, 0, 0, 3, "full"),
    "3lab+3sp0": Run("sparse labels on 3 shifted slides + sparse labels on 3 unshifted (replay)", 3, 0, 0, 3, "sparse"),
    # Controls: the fine-tuning on the old domain's labels alone, with no new domain to learn.
    "3tru0": Run("the full truth of 3 unshifted slides alone (control)", 0, 0, 0, 3, "full"),
    "3sp0": Run("sparse labels on 3 unshifted slides alone (control)", 0, 0, 0, 3, "sparse"),
}


@dataclass(frozen=True)
class Phantoms:
    train: list[Path]
    unlabeled: list[Path]
    unlabeled_unshifted: list[Path]
    val_shifted: list[Path]
    val_unshifted: list[Path]
    held_shifted: list[Path]
    held_unshifted: list[Path]
    extreme_shifted: list[Path]
    extreme_unshifted: list[Path]
    # 861-864 with a scanner's pyramid (--domain-levels averaged only).
    held_unshifted_averaged: list[Path] = field(default_factory=list)


# How the domain's reduced levels are made (PhantomSpec.reduced_levels); the unshifted slides stay rendered.
DOMAIN_LEVELS = ("rendered", "averaged")


def make_phantoms(
    work: Path,
    *,
    size: int,
    shift: float = SHIFT,
    weak_fraction: float = 0.0,
    extremes: bool = False,
    domain_levels: str = "rendered",
) -> Phantoms:
    """The phantoms of the module docstring under ``work`` (kept: a second run reuses them); the domain's
    slides at ``shift`` and ``weak_fraction`` with ``domain_levels``, named with them unless they are the
    default domain."""
    if domain_levels not in DOMAIN_LEVELS:
        raise ValueError(f"domain_levels must be one of {DOMAIN_LEVELS}, got {domain_levels!r}")
    averaged = domain_levels == "averaged"
    tag = ("" if (shift, weak_fraction) == (SHIFT, 0.0) else f"_s{shift:g}_w{weak_fraction:g}") + (
        "_avg" if averaged else ""
    )

    def phantom(name: str, seed: int, tps: int, shift: float, weak: float = 0.0, levels: str = "rendered") -> Path:
        spec = PhantomSpec(
            size, size, seed=seed, tps_percent=tps, shift=shift, weak_fraction=weak, reduced_levels=levels
        )
        return phantom_once(work / f"{name}.svs", spec)

    def domain(name: str, seed: int, tps: int) -> Path:
        return phantom(f"{name}{tag}", seed, tps, shift, weak_fraction, domain_levels)

    return Phantoms(
        train=[domain(f"train_{s}", s, t) for s, t in TRAIN],
        unlabeled=[domain(f"unlabeled_{s}", s, t) for s, t in UNLABELED],
        unlabeled_unshifted=[phantom(f"unlabeled_{s}", s, t, 0.0) for s, t in UNLABELED_UNSHIFTED],
        val_shifted=[domain(f"val_{881 + i}", 881 + i, t) for t, i in VALIDATION],
        val_unshifted=[phantom(f"val_{891 + i}", 891 + i, t, 0.0) for t, i in VALIDATION],
        held_shifted=[domain(f"held_{851 + i}", 851 + i, t) for t, i in HELD_OUT],
        held_unshifted=[phantom(f"held_{861 + i}", 861 + i, t, 0.0) for t, i in HELD_OUT],
        extreme_shifted=[domain(f"held_{851 + i}", 851 + i, t) for t, i in EXTREMES] if extremes else [],
        extreme_unshifted=[phantom(f"held_{861 + i}", 861 + i, t, 0.0) for t, i in EXTREMES] if extremes else [],
        held_unshifted_averaged=[
            phantom(f"held_{861 + i}_avg", 861 + i, t, 0.0, levels="averaged") for t, i in HELD_OUT if averaged
        ],
    )


def run_labels(run: Run, phantoms: Phantoms, *, regions: int, region_um: float, seed: int) -> list[SlideLabels]:
    """The labels ``run`` trains on: sparse labels of its shifted training slides (region seeds ``seed`` + 0, 1,
    ...), then its replayed unshifted slides' (full truth, or sparse with region seeds continuing after the 3
    training slides': ``seed`` + 3, 4, ...)."""
    if run.replay_labels not in REPLAY_LABELS:
        raise ValueError(f"replay_labels must be one of {REPLAY_LABELS}, got {run.replay_labels!r}")
    labels = [
        sparse_truth_labels(p, regions=regions, region_um=region_um, seed=seed + i)
        for i, p in enumerate(phantoms.train[: run.labelled])
    ]
    for i, p in enumerate(phantoms.unlabeled_unshifted[: run.replayed]):
        if run.replay_labels == "full":
            labels.append(full_truth_labels(p))
        else:
            labels.append(sparse_truth_labels(p, regions=regions, region_um=region_um, seed=seed + len(TRAIN) + i))
    return labels


def mean_dice(model_dir: Path, slides: list[Path]) -> tuple[float, list[float]]:
    ensemble = Ensemble.load(model_dir, task="segmentation")
    per_slide = [evaluate_segmentation(s, ensemble)[0].dice_ensemble for s in slides]
    return float(np.mean(per_slide)), per_slide


SETS = (
    "val_shifted",
    "val_unshifted",
    "held_shifted",
    "held_unshifted",
    "extreme_shifted",
    "extreme_unshifted",
    "held_unshifted_averaged",
)
_TILES: dict[Path, list[np.ndarray]] = {}


def slide_tile_batches(path: Path, ensemble: Ensemble, *, batch_tiles: int = 16) -> list[np.ndarray]:
    """The tiles ``segment_slide`` analyses on ``path`` (its detected tissue, default grid), as (B, H, W, 3)
    uint8 batches of up to ``batch_tiles``; kept for the next model (all models here share the tile grid)."""
    if path not in _TILES:
        with open_slide(path) as slide:
            tissue = tissue_mask_for_slide(slide, method=TISSUE_METHOD_OF_STAIN[ensemble.manifest.stain])
            grid = plan_tiles(slide, ensemble, roi=None, tissue=tissue, config=SegmentConfig())
            tiles = [px for _, px in read_grid_tiles(slide, grid, mpp=ensemble.manifest.input_mpp, workers=0)]
        _TILES[path] = [np.stack(tiles[i : i + batch_tiles]) for i in range(0, len(tiles), batch_tiles)]
    return _TILES[path]


def stain_of(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A slide's unit haematoxylin and second-stain OD vectors, as the domain guard measures them."""
    with open_slide(path) as slide:
        stain = slide_stain(detect_slide_stain(slide), slide.thumbnail(mpp=8.0))
    return np.asarray(stain.haematoxylin_od), np.asarray(stain.second_od)


def stain_distance(stain: tuple[np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray]) -> float:
    """The larger of the angles (degrees) between two stains' vectors, as ``stain_distance_deg``."""
    return max(angle_deg(stain[0], reference[0]), angle_deg(stain[1], reference[1]))


def mean_stain(stains: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    def unit(v: np.ndarray) -> np.ndarray:
        return v / np.linalg.norm(v)

    return unit(np.mean([s[0] for s in stains], axis=0)), unit(np.mean([s[1] for s in stains], axis=0))


def mean_kl(state: dict, reference: dict) -> float:
    """Mean over BatchNorm layers and channels of KL(N(state) || N(reference)), each channel a Gaussian of its
    running mean and variance (state dicts of :func:`batchnorm_state`)."""
    eps = 1e-5
    values = []
    for key in state:
        if not key.endswith("running_mean"):
            continue
        var_key = key.removesuffix("running_mean") + "running_var"
        m, v = state[key].double(), state[var_key].double() + eps
        mr, vr = reference[key].double(), reference[var_key].double() + eps
        values.append((0.5 * (v / vr + (m - mr) ** 2 / vr - 1 + torch.log(vr / v))).mean().item())
    return float(np.mean(values))


class StatsScorer:
    """Dice of a model with each BatchNorm statistics variant (``BATCHNORM_STATS``) on lists of slides."""

    def __init__(self, demo: Path, train_slides: list[Path]) -> None:
        self.demo = demo
        self.train_slides = train_slides
        demo_ensemble = Ensemble.load(demo, task="segmentation", fold_bn=False)
        self.demo_state = batchnorm_state(demo_ensemble.members[-1])
        stats, why = stats_of_manifest(demo_ensemble.manifest.extra)
        if stats is None:
            raise ValueError(f"the domain variant needs the demo's training stain: {why}")
        self.old_stain = (np.asarray(stats.haematoxylin_od), np.asarray(stats.second_od))
        self.new_stain = mean_stain([stain_of(p) for p in train_slides])
        self.assignments: dict[Path, tuple[bool, float, float]] = {}

    def near_new_domain(self, path: Path) -> tuple[bool, float, float]:
        """(nearer the labelled slides' stain than the demo's, distance to theirs, to the demo's), degrees."""
        if path not in self.assignments:
            stain = stain_of(path)
            to_new, to_old = stain_distance(stain, self.new_stain), stain_distance(stain, self.old_stain)
            self.assignments[path] = (to_new < to_old, to_new, to_old)
        return self.assignments[path]

    def nearest_is_own(self, model_dir: Path, path: Path) -> tuple[bool, float, float]:
        """Whether ``path``'s own BatchNorm statistics (estimated with ``model_dir``'s weights) are nearer the
        model's running statistics than the demo's: (that, mean KL to the model's, mean KL to the demo's)."""
        unfolded = Ensemble.load(model_dir, task="segmentation", fold_bn=False)
        on_slide = adapt_batchnorm(unfolded, slide_tile_batches(path, unfolded), fold_bn=False)
        to_own, to_demo = [], []
        for own, slide in zip(unfolded.members, on_slide.members, strict=True):
            own_state, slide_state = batchnorm_state(own), batchnorm_state(slide)
            to_own.append(mean_kl(slide_state, own_state))
            to_demo.append(mean_kl(slide_state, self.demo_state))
        kl_own, kl_demo = float(np.mean(to_own)), float(np.mean(to_demo))
        return kl_own < kl_demo, kl_own, kl_demo

    def dice(self, model_dir: Path, variant: str, slides: list[Path]) -> list[float]:
        if variant == "model":
            return mean_dice(model_dir, slides)[1]
        unfolded = Ensemble.load(model_dir, task="segmentation", fold_bn=False)
        demo_stats = None
        if variant in ("demo", "domain"):
            demo_stats = with_batchnorm_state(unfolded, self.demo_state)
        if variant == "demo":
            return [evaluate_segmentation(s, demo_stats)[0].dice_ensemble for s in slides]
        if variant == "domain":
            batches = [b for p in self.train_slides for b in slide_tile_batches(p, unfolded)]
            domain_stats = adapt_batchnorm(unfolded, batches)
            return [
                evaluate_segmentation(s, domain_stats if self.near_new_domain(s)[0] else demo_stats)[0].dice_ensemble
                for s in slides
            ]
        if variant == "slide" or variant.startswith("slide:"):
            weight = float(variant.removeprefix("slide:")) if ":" in variant else 1.0
            adapted = (adapt_batchnorm(unfolded, slide_tile_batches(s, unfolded), weight=weight) for s in slides)
            return [evaluate_segmentation(s, a)[0].dice_ensemble for s, a in zip(slides, adapted, strict=True)]
        raise ValueError(f"unknown BatchNorm statistics {variant!r}; choose from {', '.join(BATCHNORM_STATS)}")


def _last_member(model_dir: Path) -> dict:
    manifest = read_manifest(model_dir, verify=False)
    state = load_file(str(model_dir / manifest.members[-1].file))
    return {k: v.float() for k, v in state.items()}


def weight_distances(model_dir: Path, init_dir: Path) -> list[float]:
    """``sum((w - w_init)^2)`` over the parameters (not BatchNorm's running statistics) of each member of
    ``model_dir`` from the last member of ``init_dir`` (the one fine-tuning started from)."""
    from inference.models.unet import PlainConvUNet

    manifest = read_manifest(model_dir, verify=False)
    kwargs = manifest.architecture_kwargs
    model = PlainConvUNet(**{**kwargs, "features": tuple(kwargs["features"])})
    init = _last_member(init_dir)
    out = []
    for member in manifest.members:
        state = load_file(str(model_dir / member.file))
        model.load_state_dict({k: v.float() for k, v in state.items()})
        out.append(squared_distance(model, init))
    return out


def _last_epoch(model_dir: Path) -> dict:
    history = json.loads((model_dir / HISTORY_FILE).read_text())["epochs"]
    return history[-1]


def _slide_weight_ok(variant: str) -> bool:
    """``slide:W``: per-slide statistics mixed with the model's own, W in (0, 1] the slide's share."""
    if not variant.startswith("slide:"):
        return False
    try:
        return 0 < float(variant.removeprefix("slide:")) <= 1
    except ValueError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shift_finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/pdl1-shift-finetune"), help="phantoms and models")
    parser.add_argument("--size", type=int, default=2048, help="phantom edge, level-0 px at 0.5 µm/px")
    parser.add_argument("--regions", type=int, default=3, help="training regions per labelled slide")
    parser.add_argument("--region-um", type=float, default=200.0, help="training region edge, µm")
    parser.add_argument("--iterations", type=int, default=ITERATIONS, help="iterations per epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    parser.add_argument("--lr-max", type=float, default=1e-3, help="peak learning rate; the floor is a hundredth")
    parser.add_argument("--positive-fraction", type=float, default=0.5, help="share of patches centred on positives")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--shift", type=float, default=SHIFT, help="the domain's stain shift")
    parser.add_argument("--weak-fraction", type=float, default=0.0, help="the domain's weakly expressing share")
    parser.add_argument(
        "--anchor-weight",
        default="0",
        help="L2-SP weights toward the demo's weights, comma-separated; every run is trained once per weight (0: off)",
    )
    parser.add_argument(
        "--distill-weight",
        default="0",
        help="distillation (LwF) weights toward the demo's predictions on unlabelled pixels, comma-separated; every "
        "run is trained once per weight (0: off)",
    )
    parser.add_argument(
        "--distill-temperature", type=float, default=DEFAULT_TEMPERATURE, help="the distillation's temperature"
    )
    parser.add_argument(
        "--stain-jitter",
        default="strong",
        help=f"stain jitters to fine-tune with, comma-separated, of {', '.join(STAIN_JITTERS)}: every run once each",
    )
    parser.add_argument(
        "--pseudo-weight",
        type=float,
        default=PseudoLabelRule.weight,
        help="loss weight of a pseudo-labelled pixel (pdl1 train seg --pseudo-weight)",
    )
    parser.add_argument(
        "--freeze-batchnorm",
        action="store_true",
        help="BatchNorm keeps the demo's running statistics while fine-tuning (pdl1 train seg --freeze-batchnorm)",
    )
    parser.add_argument(
        "--batchnorm-stats",
        default="model",
        help=f"comma-separated BatchNorm statistics to score every model with, of {', '.join(BATCHNORM_STATS)}: "
        + STATS_HELP,
    )
    parser.add_argument(
        "--interpolate",
        default="1",
        help="comma-separated weights in [0, 1]: every fine-tuned model is scored once per weight with its weights "
        "that share of the way from the demo's (WiSE-FT; 1: as trained, 0: the demo's last member)",
    )
    parser.add_argument(
        "--extremes",
        action="store_true",
        help="also score held-out slides at TPS 5 and 90 (seeds 855-856 in the domain, 865-866 unshifted)",
    )
    parser.add_argument(
        "--validation-only",
        action="store_true",
        help="score the validation slides only (to choose among runs, e.g. anchor weights, with the held-out unseen)",
    )
    parser.add_argument(
        "--domain-levels",
        default="rendered",
        choices=DOMAIN_LEVELS,
        help="how the domain's slides' reduced levels are made (pdl1 phantom --reduced-levels): averaged, a "
        "scanner's pyramid, also scores held-out unshifted slides written so; the unshifted slides stay rendered",
    )
    args = parser.parse_args()
    try:
        anchors = [float(a) for a in args.anchor_weight.split(",")]
    except ValueError:
        parser.error(f"--anchor-weight: expected comma-separated numbers like 0,0.01,0.1, got {args.anchor_weight!r}")
    if any(not a >= 0 for a in anchors):
        parser.error(f"--anchor-weight: weights must be >= 0, got {args.anchor_weight!r}")
    try:
        distills = [float(a) for a in args.distill_weight.split(",")]
    except ValueError:
        parser.error(f"--distill-weight: expected comma-separated numbers like 0,1,10, got {args.distill_weight!r}")
    if any(not a >= 0 for a in distills):
        parser.error(f"--distill-weight: weights must be >= 0, got {args.distill_weight!r}")
    if not args.distill_temperature > 0:
        parser.error(f"--distill-temperature: must be > 0, got {args.distill_temperature:g}")
    jitters = args.stain_jitter.split(",")
    if any(j not in STAIN_JITTERS for j in jitters):
        parser.error(f"--stain-jitter: choose from {', '.join(STAIN_JITTERS)}, got {args.stain_jitter!r}")
    runs = args.runs.split(",")
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
    variants = args.batchnorm_stats.split(",")
    unknown = [v for v in variants if v not in BATCHNORM_STATS and not _slide_weight_ok(v)]
    if unknown:
        parser.error(f"--batchnorm-stats: unknown {unknown}; choose from {', '.join(BATCHNORM_STATS)}")
    if variants[0] != "model":
        parser.error("--batchnorm-stats: give model first (every change is against the demo with its own statistics)")
    for derived in ("known", "nearest"):
        if derived in variants and ("demo" not in variants or variants.index("demo") > variants.index(derived)):
            parser.error(f"--batchnorm-stats: {derived} takes the model and demo rows' Dice: give demo before it")

    try:
        alphas = [float(a) for a in args.interpolate.split(",")]
    except ValueError:
        parser.error(f"--interpolate: expected comma-separated numbers like 1,0.5,0.3, got {args.interpolate!r}")
    if any(not 0 <= a <= 1 for a in alphas):
        parser.error(f"--interpolate: weights must be in [0, 1] (1: the model as trained), got {args.interpolate!r}")

    phantoms = make_phantoms(
        args.work,
        size=args.size,
        shift=args.shift,
        weak_fraction=args.weak_fraction,
        extremes=args.extremes,
        domain_levels=args.domain_levels,
    )
    where = (
        f"shift {args.shift:g}"
        + (f", weak {args.weak_fraction:g}" if args.weak_fraction else "")
        + (", averaged levels" if args.domain_levels == "averaged" else "")
    )
    averaged_column = bool(phantoms.held_unshifted_averaged)
    labels = [
        sparse_truth_labels(p, regions=args.regions, region_um=args.region_um, seed=args.seed + i)
        for i, p in enumerate(phantoms.train)
    ]
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; phantoms {args.size}² px at "
        f"0.5 µm/px (model 2 µm/px); {args.regions} training regions of {args.region_um:g} µm per labelled slide "
        f"({', '.join(str(dict(lab.counts)) for lab in labels)}); {args.iterations} iterations per epoch, "
        f"batch 16, 128 px patches, {args.optimizer} lr {args.lr_max:g} to {args.lr_max / 100:g}, positive fraction "
        f"{args.positive_fraction:g}. Dice: mean over "
        "slides; change: against the demo on the same slides",
        flush=True,
    )
    print(
        f"| model | BatchNorm statistics | validation, {where} (2) | validation, unshifted (2) | "
        f"held-out, {where} (4) | change | held-out, unshifted (4) | change | "
        + ("held-out, unshifted, averaged levels (4) | change | " if averaged_column else "")
        + "train s |"
    )
    print("|---|---|---|---|---|---|---|---|---|" + ("---|---|" if averaged_column else ""), flush=True)
    demo = demo_model_dir("seg")
    per_slide: dict[str, dict[str, list[float]]] = {}
    choices: dict[str, list[str]] = {}
    scorer = StatsScorer(demo, phantoms.train) if variants != ["model"] else None

    sets = SETS[:2] if args.validation_only else SETS

    def score_variant(name: str, model_dir: Path, variant: str, ensemble: Ensemble | None = None) -> dict[str, float]:
        """Mean Dice per set of ``model_dir`` with BatchNorm statistics ``variant``, or of ``ensemble`` as it is."""
        means = {key: float("nan") for key in SETS}
        per_slide[f"{name} [{variant}]"] = {key: [] for key in SETS}
        for key in sets:
            slides = getattr(phantoms, key)
            if not slides:
                dice = []
            elif ensemble is not None:
                dice = [evaluate_segmentation(s, ensemble)[0].dice_ensemble for s in slides]
            elif variant in ("known", "nearest"):
                own, theirs = per_slide[f"{name} [model]"][key], per_slide[f"{name} [demo]"][key]
                if variant == "known":
                    pick_own = [key in DOMAIN_SETS] * len(slides)
                else:
                    nearest = [scorer.nearest_is_own(model_dir, s) for s in slides]
                    pick_own = [n[0] for n in nearest]
                    for s, (is_own, kl_own, kl_demo) in zip(slides, nearest, strict=True):
                        choices.setdefault(name, []).append(
                            f"{s.stem}: {kl_own:.3g} / {kl_demo:.3g}{' own' if is_own else ' demo'}"
                        )
                dice = [o if p else t for o, t, p in zip(own, theirs, pick_own, strict=True)]
            elif scorer is not None:
                dice = scorer.dice(model_dir, variant, slides)
            else:
                dice = mean_dice(model_dir, slides)[1]
            per_slide[f"{name} [{variant}]"][key] = dice
            means[key] = float(np.mean(dice)) if dice else float("nan")
        return means

    base: dict[str, float] = {}
    # What fine-tuning started from: the demo's last member (SegTrainConfig.init_model).
    demo_start = Ensemble.load(demo, task="segmentation", fold_bn=False).members[-1].state_dict()

    def row(name: str, variant: str, d: dict[str, float], took: str) -> None:
        print(
            f"| {name} | {variant} | {d['val_shifted']:.4f} | {d['val_unshifted']:.4f} | "
            f"{d['held_shifted']:.4f} | {d['held_shifted'] - base['held_shifted']:+.4f} | "
            f"{d['held_unshifted']:.4f} | {d['held_unshifted'] - base['held_unshifted']:+.4f} | "
            + (
                f"{d['held_unshifted_averaged']:.4f} | "
                f"{d['held_unshifted_averaged'] - base['held_unshifted_averaged']:+.4f} | "
                if averaged_column
                else ""
            )
            + f"{took} |",
            flush=True,
        )

    def score(name: str, model_dir: Path, *, took: str, fine_tuned: bool) -> None:
        for alpha in alphas if fine_tuned else [1.0]:
            if alpha != 1:  # WiSE-FT: its own statistics, interpolated with the weights
                unfolded = Ensemble.load(model_dir, task="segmentation", fold_bn=False)
                moved = interpolated_ensemble(unfolded, demo_start, alpha)
                label = f"{name}, weights {alpha:g} of the way from the demo's (WiSE-FT)"
                row(label, "model", score_variant(label, model_dir, "model", moved), took)
                continue
            for variant in variants:
                if variant in ("demo", "known", "nearest") and not fine_tuned:
                    continue  # the demo's own statistics are the demo's
                d = score_variant(name, model_dir, variant)
                if not base:
                    base.update(d)  # the demo with its own statistics: every change is against it
                row(name, variant, d, took)

    score("shipped demo ensemble", demo, took="0", fine_tuned=False)

    def fine_tune(run: str, anchor_weight: float, distill_weight: float = 0.0, jitter: str = "strong") -> None:
        spec = RUNS[run]
        what = spec.what
        run_labelled = run_labels(spec, phantoms, regions=args.regions, region_um=args.region_um, seed=args.seed)
        unlabeled = [*phantoms.unlabeled[: spec.unlabelled], *phantoms.unlabeled_unshifted[: spec.unlabelled_unshifted]]
        out = args.work / (
            f"model_{run}_seed{args.seed}_{args.optimizer}_{args.lr_max:g}_pf{args.positive_fraction:g}"
            f"_r{args.regions}x{args.region_um:g}{phantoms.train[0].stem.removeprefix(f'train_{TRAIN[0][0]}')}"
            + (f"_it{args.iterations}" if args.iterations != ITERATIONS else "")
            + (f"_anchor{anchor_weight:g}" if anchor_weight else "")
            + (f"_kd{distill_weight:g}" if distill_weight else "")
            + (
                f"T{args.distill_temperature:g}"
                if distill_weight and args.distill_temperature != DEFAULT_TEMPERATURE
                else ""
            )
            + (f"_j{jitter}" if jitter != "strong" else "")
            + ("_bnfrozen" if args.freeze_batchnorm else "")
            + (f"_pw{args.pseudo_weight:g}" if unlabeled and args.pseudo_weight != PseudoLabelRule.weight else "")
        )
        config = SegTrainConfig(
            slides=tuple(lab.slide for lab in run_labelled),
            out_dir=str(out),
            init_model=str(demo),
            cycles=4,
            epochs_per_cycle=2,
            iterations_per_epoch=args.iterations,
            batch_size=16,
            patch_px=128,
            optimizer=args.optimizer,
            lr_max=args.lr_max,
            lr_min=args.lr_max / 100,
            stain_jitter=jitter,
            positive_fraction=args.positive_fraction,
            seed=args.seed,
            unlabeled=tuple(UnlabeledSlide(str(p), name=p.name) for p in unlabeled),
            pseudo_model=str(demo) if unlabeled else None,
            pseudo_weight=args.pseudo_weight,
            anchor_weight=anchor_weight,
            freeze_batchnorm=args.freeze_batchnorm,
            distill_weight=distill_weight,
            distill_temperature=args.distill_temperature,
        )
        training, seconds = train_or_reuse(config, run_labelled)
        print_pseudo_labels(training)
        print(
            "  labelled px (model grid), positive share: "
            + "; ".join(
                f"{Path(d['slide']).name} {d['labelled_px']}, {d['positive_fraction_of_labelled']:.3f}"
                for d in training["data"]
            ),
            flush=True,
        )
        label = (
            run
            + (f" anchor {anchor_weight:g}" if anchor_weight else "")
            + (" BatchNorm frozen" if args.freeze_batchnorm else "")
            + (f" distill {distill_weight:g}" if distill_weight else "")
            + (f" {jitter} jitter" if jitter != "strong" else "")
        )
        last = _last_epoch(out)
        distances = weight_distances(out, demo)
        print(
            f"  {label}: squared distance from the demo's weights per member "
            + ", ".join(f"{d:.4g}" for d in distances)
            + f"; last epoch loss {last['loss']:.4f}"
            + (f", anchor penalty {last['anchor_penalty']:.4f}" if "anchor_penalty" in last else "")
            + (f", distillation penalty {last['distill_penalty']:.4f}" if "distill_penalty" in last else ""),
            flush=True,
        )
        what_anchor = (
            what
            + (f", anchor {anchor_weight:g} (L2-SP)" if anchor_weight else "")
            + (", BatchNorm statistics frozen" if args.freeze_batchnorm else "")
            + (f", distill {distill_weight:g} (LwF, T {args.distill_temperature:g})" if distill_weight else "")
            + (f", {jitter} stain jitter" if jitter != "strong" else "")
            + (f", pseudo-weight {args.pseudo_weight:g}" if unlabeled else "")
        )
        took = "reused" if seconds is None else f"{seconds:.0f}"
        score(f"fine-tuned, {what_anchor}", out, took=took, fine_tuned=True)

    for run in runs:
        for jitter in jitters:
            for distill_weight in distills:
                for anchor_weight in anchors:
                    fine_tune(run, anchor_weight, distill_weight, jitter)
    if scorer is not None and scorer.assignments:
        print(
            "stain distances (degrees) to the labelled slides' mean stain / the demo's training stain; * nearer theirs:"
        )
        for path, (near, to_new, to_old) in scorer.assignments.items():
            print(f"  {path.name}: {to_new:.1f} / {to_old:.1f}{' *' if near else ''}")
    if choices:
        print("nearest: mean KL of each slide's statistics to the model's own / the demo's, and the choice:")
        for name, rows in choices.items():
            print(f"  {name}: " + "; ".join(rows))
    print(
        "per slide (validation 881-882 | 891-892; held out 851-854 | 861-864"
        + ("; TPS 5, 90: 855-856 | 865-866" if args.extremes else "")
        + ("; unshifted, averaged levels: 861-864" if averaged_column else "")
        + "):"
    )
    for name, scores in per_slide.items():
        print(f"  {name}: " + " | ".join(" ".join(f"{d:.3f}" for d in scores[key]) for key in SETS))


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    main()
